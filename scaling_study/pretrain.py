"""MLM pretraining: one readable loop (`train_mlm`), run as is or on every Ray Train worker.

    from scaling_study.pretrain import PretrainConfig, train_mlm, run_pretraining, MemoryLogger

    # one process (CPU or one GPU), on a corpus build folder (manifest.json, tokenizer/, shards/)
    config = PretrainConfig(preset=load_presets()["tiny"], vocab_size=16_000, total_steps=2_000,
                            checkpoint_steps=(500, 2_000), batch_size=32, precision="fp32")
    log = MemoryLogger()
    final = train_mlm(config, "studies/x/corpus/cb-...", "studies/x/pretrain/pt-...", logger=log)

    # the study's way: a Ray Train TorchTrainer with spec.pretrain.num_workers workers (DDP or FSDP2;
    # one worker: a Ray task of its own under Train's local mode)
    final = run_pretraining(study, plan, run_node, corpus_dir, out_dir,
                            logger_factory=functools.partial(MlflowLogger, uri, run_id))

What a run writes, under `out_dir`:

    checkpoints/step-00000500/    one per step level of the run (the `checkpoint` nodes):
        config.json, model.safetensors      AutoModelForMaskedLM.from_pretrained(folder)
        tokenizer.json, tokenizer_config.json, ...   AutoTokenizer.from_pretrained(folder)
        trainer_state.pt                    everything else a resume needs (see `save_checkpoint`)
    resume/step-00000800/         the latest extra resume-only checkpoint (`checkpoint_every`)
    ray/                          Ray Train's run folder (run_pretraining with 2 or more workers)

Each checkpoint is written to a temporary folder and moved into place with `os.replace`, so a
crash mid-write leaves the previous checkpoints valid; a restart (`resume=True`) continues from
the latest complete one, at the same data position, with the same RNG streams: the loss curve
of an interrupted run is the uninterrupted one (tests/test_pretrain.py checks it step by step).
For multi-node runs `out_dir` must be a filesystem every worker sees (NFS), or a storage URI
(`s3://...`, `scaling_study.storage`): on Ray Train each worker then trains in its node's local
mirror, rank 0 uploads each checkpoint (its trainer_state.pt last, the completeness marker), and a
restart downloads the latest stored checkpoint before resuming.

The step, in short: each worker reads its own shards (shard i -> worker i % N, reshuffled every
epoch from the seed; rows split i % N instead when there are fewer shards than workers) from where
the corpus build is stored, a folder or a storage URI, never copying the build (`ShardStream`:
one shard at a time, the next prefetched in a background thread); masks
each batch afresh (`Masker`: mask_rate of the non-special tokens, 80% [MASK] / 10% random /
10% kept); runs the encoder on every token but the MLM head only at the masked positions
(`mlm_loss`), which skips most of the head's FLOPs and the full-vocabulary logits; AdamW (fused
on GPU, foreach on CPU) or LAMB; gradient accumulation and clipping; bf16 autocast (TF32 for the
matmuls left in fp32 on GPU) or plain fp32. FSDP2 (`strategy="fsdp"`, in any process group, one
GPU included) with bf16 on GPU gathers parameters and reduces gradients in bf16 and keeps fp32
master shards (`MixedPrecisionPolicy`). On CPU the model's dropout and attention run through
`cpu_kernels.use_cpu_kernels` (the same math with cheaper random numbers and fewer passes over memory; about
8% of a step), unless `compile` hands them to torch.compile.
Metrics (loss, mlm_accuracy, lr, grad_norm, tokens_seen, tokens_per_s, mfu, and the corpus bytes
read by the workers that read the least and the most, shard_bytes_min/max) are reduced over
workers every `log_every` steps and logged by rank 0 only; nothing synchronises the device
between log steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from scaling_study import faults
from scaling_study.cpu_kernels import use_cpu_kernels
from scaling_study.artifacts import (
    MANIFEST,
    STATE_FILE,
    CorpusBuild,
    Manifest,
    checkpoint_dir,
    latest_checkpoint,
    prune_resume,
    pull_latest_checkpoint,
    push_checkpoint,
    remove_partial_checkpoints,
    write_file_list,
)
from scaling_study.models import ModelPreset, bert_config, load_devices, mlm_flops_breakdown
from scaling_study.schedules import Schedule, build_optimizer
from scaling_study.storage import follow_umask, no_space, replace_dir
from scaling_study.spec import PretrainRecipe

if TYPE_CHECKING:
    from scaling_study.grid import Node, Plan
    from scaling_study.spec import Study

__all__ = [
    "JsonlLogger",
    "MaskedLM",
    "Masker",
    "MemoryLogger",
    "MetricsLogger",
    "MlflowLogger",
    "PretrainConfig",
    "ShardStream",
    "mlm_loss",
    "run_pretraining",
    "train_mlm",
    "train_mlm_ray",
    "write_synthetic_corpus",
]

STATE_FORMAT = 1


# ----------------------------------------------------------------------------------- config


@dataclasses.dataclass(kw_only=True)
class PretrainConfig(PretrainRecipe):
    """Everything one pretraining run needs besides its corpus and output folder: the spec's recipe
    (`spec.PretrainRecipe`: batch_size, seq_len, lr, schedule, ..., each documented there), the
    run's model shape and steps, and the runtime-only settings below."""

    preset: ModelPreset
    vocab_size: int
    """The tokenizer's vocabulary size (the corpus build's manifest), not the spec's target."""
    total_steps: int
    """Optimizer steps the schedule spans (the run's largest step level)."""
    checkpoint_steps: tuple[int, ...] = ()
    """Steps after which a Hugging Face checkpoint is kept (the run's step levels); 0: the initial
    weights, before the first step (`pretrain.random_init`, the control arm)."""
    # --- runtime only: none of these changes what the run computes
    num_threads: int | None = None
    """torch intra-op threads (None: torch's default; Ray workers: their CPUs)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None: presets/devices.yaml by the detected device."""
    model_overrides: dict = dataclasses.field(default_factory=dict)
    """Extra `bert_config` settings (e.g. dropout 0 in tests); the default is BERT's."""
    provenance: dict = dataclasses.field(default_factory=dict)
    """Where the run comes from (study, model_size, data_volume, pretrain node), for the checkpoints'
    model cards (`model_card`); `from_study` fills it."""

    def __post_init__(self) -> None:
        self.checkpoint_steps = tuple(sorted(set(int(s) for s in self.checkpoint_steps)))
        self.betas = tuple(self.betas)
        if any(s < 0 or s > self.total_steps for s in self.checkpoint_steps):
            raise ValueError(f"checkpoint_steps {self.checkpoint_steps} must lie in [0, "
                             f"total_steps={self.total_steps}]")
        if not 0 < self.mask_rate < 1:
            raise ValueError(f"mask_rate must be in (0, 1), got {self.mask_rate}")

    def micro_batch_size(self, world_size: int) -> int:
        per_step = world_size * self.grad_accum
        if self.batch_size % per_step:
            raise ValueError(f"batch_size {self.batch_size} does not split over {world_size} workers x "
                             f"grad_accum {self.grad_accum}")
        return self.batch_size // per_step

    def schedule_fn(self) -> Schedule:
        return Schedule(total_steps=self.total_steps, schedule=self.schedule, warmup_fraction=self.warmup_fraction,
                        decay_fraction=self.decay_fraction, min_lr_ratio=self.min_lr_ratio)

    def identity(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        keep = ("vocab_size", "total_steps", "seq_len", "batch_size", "lr", "schedule", "warmup_fraction",
                "decay_fraction", "min_lr_ratio", "weight_decay", "mask_rate", "optimizer", "betas", "eps",
                "grad_clip", "precision", "seed")
        shape = {k: getattr(self.preset, k) for k in ("num_layers", "hidden_size", "num_heads", "ffn_size",
                                                      "max_position_embeddings")}
        return {**shape, **{k: getattr(self, k) for k in keep}}

    @classmethod
    def from_study(cls, study: Study, plan: Plan, run_node: Node, *, vocab_size: int, **runtime: Any) -> PretrainConfig:
        """The config of a `pretrain` node: spec.pretrain's recipe, its size's preset, its steps and levels."""
        if run_node.kind != "pretrain":
            raise ValueError(f"node {run_node.id} is a {run_node.kind!r} node, not 'pretrain'")
        p = study.spec.pretrain
        levels = sorted(c.inputs["step"] for c in plan.children(run_node.id) if c.kind == "checkpoint")
        recipe = {f.name: getattr(p, f.name) for f in dataclasses.fields(PretrainRecipe)}
        provenance = {"study": study.spec.name, "model_size": run_node.factors["model_size"],
                      "data_volume": run_node.factors["data_volume"], "pretrain_node": run_node.id}
        return cls(**{**recipe, "preset": study.presets[run_node.factors["model_size"]], "vocab_size": vocab_size,
                      "total_steps": run_node.inputs["total_steps"], "checkpoint_steps": tuple(levels),
                      "provenance": provenance, **runtime})


# ----------------------------------------------------------------------------------- data


class ShardStream:
    """This worker's rows, epoch after epoch, in an order fixed by (seed, epoch, rank).

    Shard i belongs to worker i % world (rows r % world of every shard when there are fewer shards
    than workers). Each epoch shuffles this worker's shards and the rows inside each. `position`
    (epoch, shard cursor, row cursor) is all a resume needs: the order is recomputed from the seed.

    Shards are read where the build is stored (`CorpusBuild.read_shard`: in place on a local or
    NFS folder, one GET each on an object store), only this worker's, and the next one is fetched
    and decoded in a background thread while the current one trains. `bytes_fetched` counts what
    was read so far, prefetched shards included.
    """

    def __init__(self, corpus: CorpusBuild, *, rank: int, world: int, seed: int, position: dict | None = None):
        self.corpus, self.rank, self.world, self.seed = corpus, rank, world, seed
        n = corpus.num_shards
        self.split_rows = n < world
        self.mine = list(range(n)) if self.split_rows else list(range(rank, n, world))
        pos = position or {"epoch": 0, "cursor": 0, "row": 0}
        self.epoch, self.cursor, self.row = pos["epoch"], pos["cursor"], pos["row"]
        self.bytes_fetched = 0
        self._lock = threading.Lock()
        self._rows: np.ndarray | None = None
        self._loaded: tuple[int, int] | None = None  # (epoch, cursor) of self._rows
        self._next: tuple[tuple[int, int], threading.Thread, dict] | None = None  # the prefetch in flight

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "row": self.row}

    def _fetch(self, epoch: int, cursor: int) -> np.ndarray:
        """The rows of the shard at (epoch, cursor), shuffled as that epoch orders them."""
        shard = int(np.random.default_rng([self.seed, epoch, self.rank]).permutation(self.mine)[cursor])
        data = self.corpus.read_shard(shard)
        with self._lock:
            self.bytes_fetched += len(data)
        rows = self.corpus.decode_shard(data)
        if self.split_rows:
            rows = rows[self.rank::self.world]
        return rows[np.random.default_rng([self.seed, epoch, self.rank, shard]).permutation(len(rows))]

    def _prefetch(self, key: tuple[int, int]) -> None:
        out: dict = {}

        def run() -> None:
            try:
                out["rows"] = self._fetch(*key)
            except BaseException as e:  # raised in the training thread, when it needs the shard
                out["error"] = e

        # a daemon thread: a run that ends (or dies) never waits for a shard it will not train on
        thread = threading.Thread(target=run, name=f"shard-prefetch-{self.rank}", daemon=True)
        thread.start()
        self._next = (key, thread, out)

    def _shard_rows(self) -> np.ndarray:
        key = (self.epoch, self.cursor)
        if self._loaded != key:
            if self._next is not None and self._next[0] == key:
                _, thread, out = self._next
                thread.join()
                if "error" in out:
                    raise out["error"]
                self._rows = out["rows"]
            else:
                self._rows = self._fetch(*key)
            self._loaded = key
            cursor = self.cursor + 1
            self._prefetch((self.epoch, cursor) if cursor < len(self.mine) else (self.epoch + 1, 0))
        return self._rows

    def next_batch(self, n: int) -> torch.Tensor:
        """The next `n` rows as an (n, seq_len) int64 tensor, crossing shards and epochs."""
        parts, need, empty = [], n, 0
        while need:
            rows = self._shard_rows()
            take = rows[self.row:self.row + need]
            parts.append(take)
            need -= len(take)
            self.row += len(take)
            if self.row >= len(rows):
                self.row, self.cursor = 0, self.cursor + 1
                if self.cursor >= len(self.mine):
                    self.cursor, self.epoch = 0, self.epoch + 1
                empty = empty + 1 if len(take) == 0 else 0
                if empty > len(self.mine):
                    raise ValueError(f"worker {self.rank} has no rows in {self.corpus.location}")
        return torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False))


class Masker:
    """Dynamic MLM masking of a batch, with torch ops on the batch at once.

    Selects each non-special token with probability `rate` (special tokens never), then replaces
    80% of the selected with [MASK], 10% with a random non-special token and keeps 10%. One
    uniform draw decides both: given u < rate, u / rate is uniform on [0, 1).
    """

    def __init__(self, *, vocab_size: int, special_ids: Sequence[int], mask_id: int, rate: float):
        self.rate, self.mask_id = rate, mask_id
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[torch.tensor(sorted(set(special_ids)), dtype=torch.long)] = True
        self.normal_ids = (~self.special).nonzero().squeeze(1)

    def __call__(self, ids: torch.Tensor, generator: torch.Generator | None = None):
        """-> (inputs, positions, targets): masked ids (same shape), flat indices of the predicted
        positions, and the original ids there."""
        u = torch.rand(ids.shape, generator=generator)
        u.masked_fill_(self.special[ids], 1.0)
        flat_u = u.view(-1)
        positions = (flat_u < self.rate).nonzero().squeeze(1)
        if positions.numel() == 0:  # tiny batches only; an empty loss would be NaN
            positions = (flat_u < 1.0).nonzero()[:1].squeeze(1)
        targets = ids.view(-1)[positions]
        r = flat_u[positions] / self.rate
        inputs = ids.clone().view(-1)
        inputs[positions[r < 0.8]] = self.mask_id
        swap = positions[(r >= 0.8) & (r < 0.9)]
        pick = torch.randint(len(self.normal_ids), (swap.numel(),), generator=generator)
        inputs[swap] = self.normal_ids[pick]
        return inputs.view_as(ids), positions, targets


def _mask_generator(seed: int, rank: int, step: int, micro_step: int) -> torch.Generator:
    # Seeded per batch, not a running stream: a resumed run masks exactly as the original did.
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 1_009 + micro_step)
    return g


# ----------------------------------------------------------------------------------- model


class MaskedLM(nn.Module):
    """BertForMaskedLM whose head runs only at the given positions.

    `forward(input_ids, positions)` -> logits (len(positions), vocab). A module of its own (not a
    function of `model.bert` and `model.cls`) so that DDP's and FSDP2's forward hooks see the call.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # No attention mask: packed sequences have no padding, and SDPA without a mask takes the
        # fastest kernel.
        hidden = self.model.bert(input_ids).last_hidden_state
        return self.model.cls(hidden.flatten(0, 1).index_select(0, positions))


def mlm_loss(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor):
    """-> (loss, logits): mean cross-entropy over the predicted positions.

    `model` is a `MaskedLM` (or DDP/FSDP around one) or a plain BertForMaskedLM. Equals
    `BertForMaskedLM(input_ids, labels=labels).loss` with labels = targets at positions, -100
    elsewhere.
    """
    if not isinstance(model, MaskedLM) and hasattr(model, "bert") and hasattr(model, "cls"):
        model = MaskedLM(model)
    logits = model(input_ids, positions)
    return _CrossEntropy.apply(logits.float(), targets), logits


class _CrossEntropy(torch.autograd.Function):
    """F.cross_entropy (mean), with a backward that reuses the log-probabilities' memory.

    The head's logits are (masked positions x vocabulary), 75 MB per BERT-mini batch: torch's own
    backward allocates and zero-fills a tensor that size for the NLL step, then another for the
    log-softmax step. The gradient, (softmax - one_hot(target)) / n, is written over the saved
    log-probabilities instead (a small gain on CPU: under 1% of a step in an A/B under load).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = logits.log_softmax(-1)
        ctx.save_for_backward(logp, targets)
        return -logp.gather(1, targets.unsqueeze(1)).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logp, targets = ctx.saved_tensors
        rows = torch.arange(len(targets), device=targets.device)
        probs = logp.exp_()  # the graph is freed after this backward: nothing else reads logp
        probs[rows, targets] -= 1
        return probs.mul_(grad / len(targets)), None


def new_model(config: PretrainConfig) -> nn.Module:
    from transformers import BertForMaskedLM

    overrides = {"attn_implementation": "sdpa", **config.model_overrides}
    return BertForMaskedLM(bert_config(config.preset, config.vocab_size, **overrides))


def _parallelize(model: MaskedLM, strategy: str, world: int, device: torch.device,
                 precision: str = "fp32") -> nn.Module:
    """DDP (world > 1), or FSDP2 in any process group (one GPU too: its bf16 policy is the point);
    a single process without one trains the plain model."""
    if strategy == "fsdp" and torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.distributed.fsdp import fully_shard

        policy = _mixed_precision(precision, device)
        for layer in model.model.bert.encoder.layer:
            fully_shard(layer, mp_policy=policy)
        # the root holds embeddings and head: the tied weight stays in one unit
        return fully_shard(model, mp_policy=policy)
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _mixed_precision(precision: str, device: torch.device):
    """FSDP2's policy: with bf16 on GPU, parameters are all-gathered and used in bf16 and gradients
    reduce-scattered in bf16 (half the bytes of both collectives), while each rank's shard of the
    parameters and the optimizer state stay fp32 (the master copy). Otherwise fp32 throughout: on
    CPU, autocast alone does the bf16 matmuls and gloo's collectives stay in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    return MixedPrecisionPolicy()


def _sharded(model: nn.Module) -> bool:
    """Whether `model` is FSDP2-sharded (its state dicts gather across ranks)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _set_grad_sync(model: nn.Module, sync: bool) -> None:
    # A flag rather than DDP's no_sync() context: no_sync must wrap the backward too, which would
    # split the step over two code paths (nanoGPT does the same).
    if hasattr(model, "require_backward_grad_sync"):
        model.require_backward_grad_sync = sync
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


# ----------------------------------------------------------------------------------- loggers


class MetricsLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class MemoryLogger:
    """Keeps every logged row: `history` is a list of {"step": ..., **metrics}."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.history.append({"step": step, **metrics})


class JsonlLogger:
    """Appends one JSON line per log call to `path` (readable from another process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


class MlflowLogger:
    """Logs to an existing MLflow run (the orchestration creates it); one `log_batch` per call."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from scaling_study.tracking import tracking_calls

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        # a lost server fails the run (Ray Train restarts it from its checkpoint, up to max_failures),
        # rather than leaving a silent gap in the curve
        with tracking_calls(self.tracking_uri):
            self._client.log_batch(self.run_id, metrics=rows, synchronous=True)

    def __getstate__(self) -> dict:  # travels to a Ray worker without its client
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}


# ----------------------------------------------------------------------------------- checkpoints


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this process trains: its rank among `world` processes, and its device."""

    rank: int
    world: int
    device: torch.device


@dataclasses.dataclass
class TrainState:
    """What a checkpoint saves and a resume restores, besides the config: `_start` returns it."""

    model: MaskedLM
    """The plain model (its weights are what a checkpoint's safetensors hold)."""
    wrapped: nn.Module
    """The same model as it trains: itself, or wrapped for DDP or FSDP."""
    optimizer: torch.optim.Optimizer
    step: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)
    """The last logged metrics."""
    position: dict | None = None
    """This rank's data position (`ShardStream.position`); None: the start of the data."""


def save_checkpoint(folder: Path, state: TrainState, config: PretrainConfig, corpus: CorpusBuild,
                    where: Placement) -> Path:
    """Collective: every rank calls it. Rank 0 writes `folder` (via a temporary folder).

    trainer_state.pt holds: format, step, tokens_seen, world_size, config (`identity()`), the
    optimizer state (FSDP: full, keyed by parameter name), scheduler (schedule settings and the
    LR of the last step; the LR is a pure function of the step), rng (per rank: torch CPU and
    CUDA generator states; masking and data order are seeded per batch and epoch and need none),
    data (per rank: epoch, shard cursor, row cursor) and the last logged metrics.
    """
    rng_and_data = _gather((_rng_state(where.device), state.position), where.world)
    if _sharded(state.wrapped):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(state.wrapped, options=options)
        optim_state = get_optimizer_state_dict(state.wrapped, state.optimizer, options=options)
    else:
        model_state, optim_state = None, state.optimizer.state_dict()
    if where.rank == 0:
        saved = _Saved(model_state=model_state, optimizer=optim_state, step=state.step, world=where.world,
                       rng=[r for r, _ in rng_and_data], data=[d for _, d in rng_and_data], metrics=state.metrics,
                       lr=state.optimizer.param_groups[0]["lr"])
        with _quiet_hf():
            _write_checkpoint(folder, saved, state.model, config, corpus)
    if where.world > 1:
        torch.distributed.barrier()
    return folder


@contextlib.contextmanager
def _quiet_hf():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@dataclasses.dataclass
class _Saved:
    """What rank 0 writes, gathered from every rank."""

    model_state: dict | None
    """FSDP: the full state dict gathered from the shards; None: the plain model's own weights."""
    optimizer: dict
    step: int
    world: int
    rng: list
    """Per rank: torch CPU (and CUDA) generator states."""
    data: list
    """Per rank: its data position."""
    metrics: dict
    lr: float

    def trainer_state(self, config: PretrainConfig) -> dict:
        """The contents of trainer_state.pt (see `save_checkpoint`)."""
        return {
            "format": STATE_FORMAT, "step": self.step, "tokens_seen": self.step * config.batch_size * config.seq_len,
            "world_size": self.world, "config": config.identity(), "optimizer": self.optimizer,
            "scheduler": {**dataclasses.asdict(config.schedule_fn()), "step": self.step, "lr": self.lr},
            "rng": self.rng, "data": self.data, "metrics": self.metrics,
        }


def _write_checkpoint(folder: Path, saved: _Saved, model: MaskedLM, config: PretrainConfig,
                      corpus: CorpusBuild) -> None:
    from transformers import AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if saved.model_state is None:
            model.model.save_pretrained(tmp)
        else:  # FSDP: a plain CPU copy from the gathered full state
            hf = new_model(config)
            hf.load_state_dict({k.removeprefix("model."): v for k, v in saved.model_state.items()})
            hf.save_pretrained(tmp)
        # the model's position limit, not the tokenizer's 1e30: a long input truncates instead of crashing
        limit = config.preset.max_position_embeddings
        AutoTokenizer.from_pretrained(corpus.tokenizer_dir, model_max_length=limit).save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(saved, config, corpus), encoding="utf-8")
        faults.point("checkpoint-write", saved.step)  # weights written, trainer state not yet: a half checkpoint
        torch.save(saved.trainer_state(config), tmp / STATE_FILE)
        follow_umask(tmp)  # safetensors writes 0600; its siblings follow the umask
        write_file_list(tmp)  # sizes and checksums: a checkpoint damaged later is not taken as done
    except BaseException as exc:
        # a full disk: say where and how much (torch only says "unexpected pos"), and give the space back
        previous = latest_checkpoint(folder.parent.parent)
        needed = (sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous
                  else 3 * 4 * model.model.num_parameters())  # weights and two Adam moments, fp32
        full = no_space(exc, folder.parent, needed) if isinstance(exc, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)  # the old checkpoints stay
        if full is not None:
            raise full from None
        raise
    replace_dir(tmp, folder)


def model_card(saved: _Saved, config: PretrainConfig, corpus: CorpusBuild) -> str:
    """A checkpoint's README.md (a Hugging Face model card): what it is and where it comes from."""
    p, prov, m = config.preset, config.provenance, corpus.manifest
    tokens = saved.step * config.batch_size * config.seq_len
    loss = saved.metrics.get("loss")
    rows = [("study", prov.get("study", "?")), ("model size", f"{prov.get('model_size', '?')}: {p.num_layers} layers, "
             f"hidden {p.hidden_size}, {p.num_heads} heads, FFN {p.ffn_size}, {p.max_position_embeddings} positions"),
            ("data volume", f"{prov.get('data_volume', '?')} ({m.tokens:,} tokens, {m.documents:,} documents)"),
            ("corpus build", f"{m.node_id} (tokenizer {m.tokenizer_hash[:12] or '?'}, vocabulary {m.vocab_size:,})"),
            ("pretraining run", prov.get("pretrain_node", "?")),
            ("steps", f"{saved.step:,} of {config.total_steps:,} ({config.schedule} schedule, peak lr {config.lr:g}, "
                      f"{config.optimizer}, {config.precision})"),
            ("tokens seen", f"{tokens:,} ({config.batch_size} sequences x {config.seq_len} tokens per step)"),
            ("MLM loss", f"{loss:.4f} (the last logged: a mean over up to {config.log_every} steps)"
                         if loss is not None else "not logged yet")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"---\nlibrary_name: transformers\npipeline_tag: fill-mask\ntags:\n- scaling-study\n- bert\n---\n\n"
            f"# {prov.get('study', 'scaling-study')}: {prov.get('model_size', '')} | {prov.get('data_volume', '')} | "
            f"step {saved.step}\n\nA BERT masked language model pretrained from scratch by `scaling-study` "
            f"(masked-language modelling, {config.mask_rate:.0%} of tokens). Load it with "
            f"`AutoModelForMaskedLM.from_pretrained` and `AutoTokenizer.from_pretrained` on this folder.\n\n"
            f"| | |\n|---|---|\n{table}\n")


def _load_weights(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder}: checkpoint does not fit the model (missing {sorted(set(missing) - tied)}, "
                         f"unexpected {unexpected})")


# ----------------------------------------------------------------------------------- the loop


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _keep_freed_memory() -> None:
    """Let glibc keep freed activation buffers instead of returning them to the OS.

    Above its mmap threshold glibc maps every large allocation afresh and unmaps it on free, so
    each training step page-faults its activations in again (about 70k faults and 0.1 s of
    system time per BERT-mini step on 2 cores); keeping them in the heap removes that (the usual
    advice is jemalloc or tcmalloc; this needs no preload). Process-wide; CPU runs only.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): leave the allocator alone
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)  # allocations up to 1 GiB come from the heap
    libc.mallopt(m_trim_threshold, 1 << 30)  # and up to 1 GiB of free heap is kept


def device_peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device from presets/devices.yaml: `cpu`, or the GPU by its name."""
    devices = load_devices()
    if device.type == "cpu":
        return devices["cpu"].peak_flops
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "a100"):
        if key in name:
            return devices[key].peak_flops
    return None


def train_mlm(config: PretrainConfig, corpus_dir: str | Path, out_dir: str | Path, *, resume: bool = True,
              logger: MetricsLogger | None = None, stop_after: int | None = None,
              device: torch.device | str | None = None,
              on_checkpoint: Callable[[int, Path, dict], None] | None = None) -> dict:
    """Pretrain (or continue pretraining) one model; returns the last logged metrics and the step.

    Runs in one process, or in each of N processes of an initialised torch.distributed group
    (Ray Train, torchrun). `stop_after` ends the loop early at that step (the schedule still spans
    `total_steps`), as an interruption would. `on_checkpoint(step, folder, metrics)` runs on every
    rank after each checkpoint (run_pretraining reports to Ray there).
    """
    started = time.perf_counter()  # the node's own time, for benchmarks/study_overhead.py
    rank, world = _rank_world()
    device = torch.device(device) if device is not None else _default_device()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if device.type == "cuda" and config.precision == "bf16":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    if device.type == "cpu":
        _keep_freed_memory()
    corpus = CorpusBuild.open(corpus_dir)
    if corpus.seq_len != config.seq_len or corpus.vocab_size != config.vocab_size:
        raise ValueError(f"{corpus.location}: seq_len {corpus.seq_len} / vocab {corpus.vocab_size}, but the run "
                         f"expects {config.seq_len} / {config.vocab_size}")
    out_dir = Path(out_dir)
    where = Placement(rank, world, device)
    if 0 in config.checkpoint_steps:
        _initial_checkpoint(config, corpus, out_dir, where, on_checkpoint)
    run = _start(config, out_dir, resume=resume, where=where)
    model, optimizer, step, metrics = run.wrapped, run.optimizer, run.step, run.metrics
    stream = ShardStream(corpus, rank=rank, world=world, seed=config.seed, position=run.position)
    masker = Masker(vocab_size=config.vocab_size, special_ids=list(corpus.special_ids.values()),
                    mask_id=corpus.special_ids["mask"], rate=config.mask_rate)
    schedule = config.schedule_fn()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    micro_batch = config.micro_batch_size(world)
    window = _Window(config, world, device, peak=config.peak_flops or device_peak_flops(device), step=step)

    while step < config.total_steps and (stop_after is None or step < stop_after):
        log_now = (step + 1) % config.log_every == 0 or step + 1 in (config.total_steps, stop_after)
        lr = config.lr * schedule.multiplier(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(config.grad_accum):
            inputs, positions, targets = masker(stream.next_batch(micro_batch),
                                                _mask_generator(config.seed, rank, step, micro_step))
            if device.type == "cuda":
                inputs, positions, targets = (t.pin_memory().to(device, non_blocking=True)
                                              for t in (inputs, positions, targets))
            _set_grad_sync(model, micro_step == config.grad_accum - 1)
            with autocast:
                loss, logits = mlm_loss(model, inputs, positions, targets)
            (loss / config.grad_accum).backward()
            window.add(loss, positions.numel(), logits if log_now and micro_step == config.grad_accum - 1 else None,
                       targets)
        if config.grad_clip:
            window.grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        faults.point("pretrain-step", step)

        if log_now:
            metrics = window.close(step, lr, epoch=stream.epoch, fetched=stream.bytes_fetched)
            if rank == 0 and logger is not None:
                logger.log_metrics(metrics, step)
        level = step in config.checkpoint_steps
        if level or (config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.total_steps):
            paused = time.perf_counter()
            folder = checkpoint_dir(out_dir, step, kind="checkpoints" if level else "resume")
            save_checkpoint(folder, dataclasses.replace(run, step=step, metrics=metrics, position=stream.position),
                            config, corpus, where)
            if rank == 0:
                prune_resume(out_dir, step)
            if on_checkpoint is not None:
                on_checkpoint(step, folder, metrics)
            window.paused += time.perf_counter() - paused  # keep saving out of tokens_per_s
    return {"step": step, **metrics, "train_seconds": time.perf_counter() - started}


def _initial_checkpoint(config: PretrainConfig, corpus: CorpusBuild, out_dir: Path, where: Placement,
                        on_checkpoint: Callable[[int, Path, dict], None] | None) -> None:
    """Write the step-0 checkpoint unless it exists: the state a fresh start trains from (`_start`
    without resuming, weights, optimizer, RNG and data position), so resuming from it is starting
    afresh. The RNG streams are forked: writing it changes nothing of the run itself, nor does
    writing it after the run has moved on (random_init switched on for a finished study)."""
    folder = checkpoint_dir(out_dir, 0)
    if (folder / STATE_FILE).is_file():
        return
    devices = [where.device] if where.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        save_checkpoint(folder, _start(config, out_dir, resume=False, where=where), config, corpus, where)
    if on_checkpoint is not None:
        on_checkpoint(0, folder, {})


def _start(config: PretrainConfig, out_dir: Path, *, resume: bool, where: Placement) -> TrainState:
    """The model (plain and wrapped for DDP/FSDP), optimizer and position to train from: a fresh
    start, or the latest complete checkpoint in `out_dir`."""
    rank, world, device = where.rank, where.world, where.device
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = MaskedLM(new_model(config))
    if rank == 0:
        remove_partial_checkpoints(out_dir)
    start = latest_checkpoint(out_dir, config.checkpoint_steps) if resume else None
    state = torch.load(start / STATE_FILE, map_location="cpu", weights_only=True) if start else None
    if state is not None:
        if state["config"] != config.identity():
            now = config.identity()
            diff = {k: (v, now.get(k)) for k, v in state["config"].items() if now.get(k) != v}
            raise ValueError(f"{start}: written by a different run configuration (saved, now): {diff}")
        _load_weights(model.model, start)
    model.to(device)
    if device.type == "cpu" and not config.compile:  # compiled code fuses its own dropout
        use_cpu_kernels(model.model)
    if config.compile:  # the encoder only: its shapes are static, the head's input varies with the mask
        model.model.bert.compile()
    wrapped = _parallelize(model, config.strategy, world, device, config.precision)
    optimizer = build_optimizer(wrapped, name=config.optimizer, lr=config.lr, betas=config.betas, eps=config.eps,
                                weight_decay=config.weight_decay, device=device)
    run = TrainState(model=model, wrapped=wrapped, optimizer=optimizer)
    if state is None:
        torch.manual_seed(config.seed + 1 + rank)  # dropout masks differ across ranks
        return run
    if _sharded(wrapped):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(wrapped, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    run.step, run.metrics = state["step"], dict(state["metrics"])
    if state["world_size"] == world:
        _set_rng_state(state["rng"][rank], device)
        run.position = state["data"][rank]
    else:
        warnings.warn(f"{start}: saved with {state['world_size']} workers, resumed with {world}: the data order "
                      "restarts at the next epoch", stacklevel=3)
        torch.manual_seed(config.seed + 1 + rank)
        run.position = {"epoch": max(d["epoch"] for d in state["data"]) + 1, "cursor": 0, "row": 0}
    return run


class _Window:
    """Metrics over the steps since the last log, accumulated on the device without syncing it."""

    def __init__(self, config: PretrainConfig, world: int, device: torch.device, *, peak: float | None, step: int):
        self.config, self.world, self.peak = config, world, peak
        # loss sum, micro-batches, masked positions; correct and predicted of the last micro-batch
        self.stats = torch.zeros(5, dtype=torch.float64, device=device)
        self.grad_norm: torch.Tensor | None = None
        self.start_step, self.t0, self.paused = step, time.perf_counter(), 0.0

    def add(self, loss: torch.Tensor, predicted: int, logits: torch.Tensor | None, targets: torch.Tensor) -> None:
        self.stats[0] += loss.detach()
        self.stats[1] += 1
        self.stats[2] += predicted
        if logits is not None:  # accuracy: one argmax per log step is enough
            self.stats[3] += (logits.detach().argmax(-1) == targets).sum()
            self.stats[4] += predicted

    def close(self, step: int, lr: float, *, epoch: int, fetched: int = 0) -> dict:
        """Reduce over workers, turn into metrics, start the next window. Collective.

        `fetched`: this worker's corpus bytes read so far (`ShardStream.bytes_fetched`), logged as
        the least and the most any worker read (each worker should read about its share only)."""
        c = self.config
        extremes = torch.tensor([fetched, -fetched], dtype=torch.float64, device=self.stats.device)
        if self.world > 1:
            torch.distributed.all_reduce(self.stats)
            torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
        loss_sum, micro_batches, masked, correct, predicted = self.stats.tolist()
        seconds = time.perf_counter() - self.t0 - self.paused
        steps, tokens_per_step = step - self.start_step, c.batch_size * c.seq_len
        mask_fraction = masked / (steps * tokens_per_step)
        flops = mlm_flops_breakdown(c.preset, c.vocab_size, c.seq_len, steps * c.batch_size, min(mask_fraction, 1.0))
        metrics = {
            "loss": loss_sum / micro_batches, "mlm_accuracy": correct / predicted, "lr": lr,
            "tokens_seen": float(step * tokens_per_step), "tokens_per_s": steps * tokens_per_step / seconds,
            "mfu": flops["total"] / seconds / (self.peak * self.world) if self.peak else float("nan"),
            "mask_fraction": mask_fraction, "epoch": float(epoch),
            "shard_bytes_max": extremes[0].item(), "shard_bytes_min": -extremes[1].item(),
        }
        if self.grad_norm is not None:
            norm = self.grad_norm
            metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.stats.zero_()
        self.start_step, self.t0, self.paused = step, time.perf_counter(), 0.0
        return metrics


# ----------------------------------------------------------------------------------- Ray Train


def _ray_worker(args: dict) -> dict:
    """What every Ray Train worker runs: train_mlm, with a Ray report at each checkpoint.

    `ray.train.report` is a barrier over all workers and costs about 1.8 s, so it is called only
    with checkpoints, never per log step; rank 0's logger does the logging, and rank 0's return
    value (the final metrics) comes back as `Result.return_value`.
    """
    import ray.train
    import ray.train.torch

    from scaling_study import storage

    rank = ray.train.get_context().get_world_rank()
    factory = args.get("logger_factory")
    logger = factory() if factory is not None and rank == 0 else None
    # URI storage: train in this node's mirror; the checkpoint to resume from comes down first, and
    # each checkpoint goes up before the report (a plain path: all no-ops). The corpus is not
    # copied: each worker streams its own shards from storage (ShardStream).
    out = storage.Store(args["out_dir"])
    if args.get("resume", True):
        pull_latest_checkpoint(out, args["config"].checkpoint_steps)

    def report(step: int, folder: Path, metrics: dict) -> None:
        if rank == 0:
            push_checkpoint(out, folder)
        ray.train.report({**metrics, "step": step, "checkpoint_dir": out.url(str(folder.relative_to(out.local)))})

    return train_mlm(args["config"], args["corpus_dir"], out.local, resume=args.get("resume", True),
                     logger=logger, device=ray.train.torch.get_device(), on_checkpoint=report)


def train_mlm_ray(config: PretrainConfig, corpus_dir: str | Path, out_dir: str | Path, *, num_workers: int = 1,
                  cpus_per_worker: int = 1, gpus_per_worker: float = 0, name: str | None = None,
                  logger_factory: Callable[[], MetricsLogger] | None = None, resume: bool = True,
                  max_failures: int = 0) -> dict:
    """`train_mlm` on `num_workers` Ray Train workers (DDP, or FSDP2 with config.strategy="fsdp").

    Needs a running Ray (`ray.init(...)`; else a local one starts). Each worker gets
    `cpus_per_worker` CPUs (and torch threads) and `gpus_per_worker` GPUs. `logger_factory` must
    pickle (e.g. `functools.partial(MlflowLogger, uri, run_id)`); it is called on rank 0 only.
    A restarted worker group (`max_failures`) resumes from the latest checkpoint in `out_dir`.
    Returns rank 0's final metrics (`train_mlm`'s return value). `corpus_dir` and `out_dir` may be
    storage URIs (`scaling_study.storage`): each worker then trains in its node's local mirror.
    One worker trains in a Ray task of its own (`_one_worker`), not in a worker group.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from scaling_study.storage import Store

    out = Store(out_dir)
    name = name or out.local.name
    if config.num_threads is None:
        config = dataclasses.replace(config, num_threads=cpus_per_worker)
    loop_config = {"config": config, "corpus_dir": Store(corpus_dir).location, "out_dir": out.location,
                   "logger_factory": logger_factory, "resume": resume}
    if num_workers == 1:
        return _one_worker(loop_config, name, cpus=cpus_per_worker, gpus=gpus_per_worker,
                           max_failures=max_failures)
    # Ray Train runs the loop in a thread, and glibc gives a thread its own malloc arena, whose large
    # blocks are mmapped and unmapped every step whatever mallopt says: about 80k page faults and
    # 7% of the time per BERT-mini step on CPU. One arena keeps them in the reusable main heap.
    # (A Ray task runs in its process's main thread, and needs none of this.)
    runtime_env = None if gpus_per_worker else {"env_vars": {"MALLOC_ARENA_MAX": "1"}}
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=out.path("ray"),
                             storage_filesystem=out.fs if out.remote else None,
                             failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env=runtime_env),
    )
    return dict(_fit_and_release(trainer).return_value)


def _one_worker(loop_config: dict, name: str, *, cpus: int, gpus: float, max_failures: int) -> dict:
    """A one-worker run: `_ray_worker` in one Ray task holding the worker's CPUs and GPUs, under
    Ray Train's local mode (`num_workers=0`: the same train function, context and reports).

    A worker group of one buys nothing but its cost: Ray Train's controller, placement group and
    its cleaner, dataset manager and sync actors, and a process group of one, about 14 CPU-s and 5
    processes per run on a 2-core machine before the first step. What the group's restart gave,
    the task's retries give: its process or node lost, or an error raised (`retry_exceptions`, as
    `FailureConfig` counts any worker failure), Ray runs it again, up to `max_failures` times,
    wherever its resources are free, and it resumes from the latest checkpoint in storage.
    """
    import ray

    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=max_failures, retry_exceptions=True)(_local_fit)
    return ray.get(task.remote(loop_config, name))


def _local_fit(loop_config: dict, name: str) -> dict:
    """`_one_worker`'s task. Local mode starts no controller and installs no SIGINT handler, so
    there is nothing for `_fit_and_release` to let go of."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_ray_worker, train_loop_config=loop_config, scaling_config=ScalingConfig(num_workers=0),
                           run_config=RunConfig(name=name))
    return dict(trainer.fit().return_value)


def _fit_and_release(trainer):
    """`trainer.fit()`, then drop Ray Train's hold on its controller actor. Called in a main thread
    (a Ray task's, the CLI's), fit() installs a SIGINT handler that keeps the controller's handle:
    the controller and the actors it owns (dataset manager, placement-group cleaner) then stay alive,
    polling, until the process ends; in a study's Ray worker, that is the whole study (4 runs of the
    smoke study kept 8 such processes through its finetuning). The caller's handler comes back."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if main and before is not None:
            signal.signal(signal.SIGINT, before)


def run_pretraining(study: Study, plan: Plan, run_node: Node, corpus_dir: str | Path, out_dir: str | Path, *,
                    logger_factory: Callable[[], MetricsLogger] | None = None, max_failures: int = 0) -> dict:
    """Run one `pretrain` node of a plan with Ray Train, as its spec says (workers, GPUs, strategy).

    Checkpoints land in `out_dir/checkpoints/step-XXXXXXXX/`, one per `checkpoint` child of the
    node. Finished or partly finished runs resume from `out_dir`. Returns the final metrics plus
    `checkpoints`: {step: folder} of the level checkpoints present.
    """
    from scaling_study.storage import Store

    p = study.spec.pretrain
    manifest = Manifest.parse(Store(corpus_dir).read_text(MANIFEST))  # the shards stay where they are
    if manifest is None:
        raise FileNotFoundError(f"{corpus_dir}: no finished corpus build (no valid {MANIFEST})")
    config = PretrainConfig.from_study(study, plan, run_node, vocab_size=manifest.vocab_size)
    final = train_mlm_ray(config, corpus_dir, out_dir, num_workers=p.num_workers, cpus_per_worker=p.cpus_per_worker,
                          gpus_per_worker=p.gpus_per_worker, name=run_node.id, logger_factory=logger_factory,
                          max_failures=max_failures)
    out = Store(out_dir)
    levels = {s: str(checkpoint_dir("", s)) for s in config.checkpoint_steps}
    final["checkpoints"] = {s: out.url(rel) for s, rel in levels.items() if out.is_file(f"{rel}/{STATE_FILE}")}
    return final


# ----------------------------------------------------------------------------------- synthetic data


def write_synthetic_corpus(root: str | Path, *, vocab_size: int = 30522, seq_len: int = 128,
                           num_sequences: int = 4096, num_shards: int = 2, seed: int = 0) -> Path:
    """A corpus build folder of uniformly random token ids, for benchmarks and plumbing tests.

    Follows the corpus contract (manifest.json, tokenizer/, shards/shard-XXXXX.parquet with one
    `input_ids` column of seq_len int32 ids per row, starting with [CLS]). Nothing can be learnt
    from it beyond token frequencies.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import BertTokenizer

    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + [f"tok{i}" for i in range(len(specials), vocab_size)]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=False).save_pretrained(root / "tokenizer")
    rng = np.random.default_rng(seed)
    shards = []
    for i, count in enumerate(np.diff(np.linspace(0, num_sequences, num_shards + 1).astype(int))):
        ids = rng.integers(len(specials), vocab_size, size=(count, seq_len), dtype=np.int32)
        ids[:, 0] = 2
        column = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq_len)
        file = f"shards/shard-{i:05d}.parquet"
        pq.write_table(pa.table({"input_ids": column}), root / file)
        shards.append({"file": file, "sequences": int(count)})
    tokens = num_sequences * (seq_len - 1)
    Manifest(node_id="synthetic", inputs={"synthetic": True, "seed": seed}, seq_len=seq_len, vocab_size=vocab_size,
             special_tokens=dict(zip(("pad", "unk", "cls", "sep", "mask"), range(5))), tokenizer_hash="",
             corpus_documents=0, tokenizer_documents=0, documents=0, tokens=tokens, sequences=num_sequences,
             dropped_tokens=0, shards=shards, input_files=[], build_seconds=0.0, created="").write(root)
    return root
