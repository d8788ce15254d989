"""Finetune a checkpoint on a task: NER (token classification), relation classification with entity
markers, and sequence classification. One plain training loop, dynamic padding, no HF Trainer.

    from scaling_study.finetune import FinetuneConfig, finetune
    from scaling_study.tasks.data import load_task_data, mirror_dirs
    data = load_task_data(task, mirror_dirs("../shared/datasets"), caps=study.caps[task.id])
    results = finetune("studies/x/ck-1234", task, data, FinetuneConfig(lr=5e-4), epoch_levels=[1, 3],
                       seed=0, out_dir="out/scierc_re")
    results[-1]["test"]["f1"], results[-1]["selected_epoch"], results[-1]["collapse"]
    inputs = prepare("studies/x/ck-1234", task, data, config)   # tokenizer, encoded task, weights: once
    for seed in (0, 1, 2):                                      # several runs of one model on one task
        finetune("studies/x/ck-1234", task, data, config, [1, 3], seed, f"out/{seed}", inputs=inputs)

Each result (one per epoch level) holds `dev` and `test` scores (with `per_type`; NER also the
conlleval scores), `score` (test F1), `majority_f1` (test score of always predicting the majority
training class; 0 for NER), `train_loss` (mean over the level's last epoch), `train_losses`,
`end_train_loss` (`metrics.end_loss`: the last steps up to the end of the selected epoch),
`tokenizer` (`tokenizer_facts` on the test split: whether it lowercases, the share of [UNK] pieces),
`examples_per_s` (training only), `collapse` and `collapse_reasons` (`metrics.detect_collapse`, on
the test predictions and `end_train_loss`), and `artifacts`: paths relative to `out_dir` of
`epochs_<L>/scores.json` (this dict) and the test predictions (`test_predictions.conll`,
`TOKEN<TAB>GOLD<TAB>PRED`, or `test_predictions.jsonl`), which `metrics.rescore` re-scores.
`metrics.mlflow_metrics(result)` and `metrics.mlflow_tags(result)` are what MLflow records of it.

`model_source` is a checkpoint folder (`save_pretrained` model + tokenizer) or a Hugging Face id;
`revision=` pins a hub id's commit, tag or branch; the tokenizer's casing comes from the model's
files or `do_lower_case=` (`load_tokenizer`), never from a default.

Batches (`batches`): `random` (default) cuts a seeded shuffle into batches; `by_length` groups
examples of similar lengths into a batch (`epoch_batches`), about half the padded tokens, a slightly
different recipe. Each batch is padded to its longest example.

Protocols. `trajectory`: one run of max(levels) epochs, its LR schedule (linear warmup, linear decay
to 0) laid over all of them, scored at each level on the way. `independent`: one run per level,
each with its own schedule over its own epochs.

Selection ("select on dev, score on test"). With `select="best_dev"` (default) the model is scored
on dev after every epoch; the result at epoch level L is the model state at the end of the epoch
e <= L of the same run with the highest dev score (the earliest one on ties): early stopping within
a budget of L epochs, so the dev-selected state never peeks at test and a result at L never uses an
epoch after L. Test is scored once per level, with that state. `select="last"` scores the state at
the end of epoch L. Results report `selected_epoch`, the dev scores of the selected state and of
the last epoch.

Words and sub-words (NER): every word's first sub-token carries its label, the other pieces -100;
a word's prediction is its first piece's; words cut off by `max_seq_len` are predicted O (counted
in `truncated_words`); words that the tokenizer maps to no piece at all (empty or dropped
characters) are fed as the unknown token so they still get a prediction.

On CPU the model's dropout and attention run through `cpu_kernels.use_cpu_kernels` (the same math,
cheaper random numbers: 5-15% of a tiny model's run here).

Determinism: a seed fixes the new head's initialisation, the data order (a seeded generator),
dropout (`torch.manual_seed`) and the choice of deterministic kernels
(`torch.use_deterministic_algorithms`, warn-only), so the same seed on the same machine repeats its
scores. On CPU that is exact; on CUDA, PyTorch's memory-efficient SDPA backward has no deterministic
kernel (it warns), so tiny differences are possible unless the model uses `attn_implementation="eager"`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch

from scaling_study.cpu_kernels import use_cpu_kernels
from scaling_study.errors import UserError
from scaling_study.metrics import (
    detect_collapse,
    end_loss,
    label_entropy,
    majority_baseline,
    score,
    write_conll_predictions,
    write_jsonl_predictions,
)
from scaling_study.spec import FinetuneRecipe
from scaling_study.tasks.data import TaskData
from scaling_study.tasks.registry import TaskInfo


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig(FinetuneRecipe):
    """What shapes one finetuning run besides the model, the task, the epochs and the seed: the
    spec's recipe (`spec.FinetuneRecipe`: protocol, lr, batch_size, max_seq_len, warmup_fraction,
    weight_decay, precision, batches, each documented there) plus the settings below, which no spec sets."""

    select: Literal["best_dev", "last"] = "best_dev"
    """Which epoch's state a level's result uses (see the module docstring)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm; None turns clipping off."""
    eval_batch_size: int = 128
    """Examples per forward pass when scoring."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ..."""

    @classmethod
    def from_spec(cls, spec: FinetuneRecipe, **overrides: Any) -> FinetuneConfig:
        """From a spec.FinetuneSpec: every field of its recipe, then `overrides`."""
        recipe = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FinetuneRecipe)}
        return cls(**{**recipe, **overrides})


@dataclasses.dataclass
class Inputs:
    """What every finetune run of one model on one task shares (`prepare`): made once, then passed to
    each `finetune` call (a Tune trial runs the seeds and epoch levels of a checkpoint's tasks, a task at a time)."""

    tokenizer: Any
    """`load_tokenizer`'s: the task's markers added."""
    feats: dict[str, list[dict]]
    """`encode`d examples per split."""
    weights: dict | None
    """The checkpoint's weights (`model.safetensors`), read once and copied for each run; None for a
    hub id or a sharded checkpoint (`from_pretrained` reads those each time)."""


def prepare(model_source: str | Path, task: TaskInfo, data: TaskData, config: FinetuneRecipe, *,
            revision: str | None = None, do_lower_case: bool | None = None,
            cache_dir: str | Path | None = None) -> Inputs:
    """Load the tokenizer and the checkpoint's weights, and encode the task (`cached_features`)."""
    tokenizer = load_tokenizer(model_source, task, revision=revision, do_lower_case=do_lower_case)
    weights = Path(model_source) / "model.safetensors"
    if weights.is_file() and revision is None:
        from safetensors.torch import load_file

        weights = load_file(str(weights))
    else:
        weights = None
    return Inputs(tokenizer, cached_features(task, tokenizer, data, config.max_seq_len, cache_dir), weights)


def finetune(model_source: str | Path, task: TaskInfo, data: TaskData, config: FinetuneConfig,
             epoch_levels: Iterable[int], seed: int, out_dir: str | Path,
             logger: Callable[[dict], None] | None = None, *, revision: str | None = None,
             do_lower_case: bool | None = None, inputs: Inputs | None = None) -> list[dict]:
    """Finetune and score at each epoch level; one result dict per level, also written to `out_dir`.

    `revision` pins a hub model's commit, tag or branch; `do_lower_case` the tokenizer's casing where
    the model does not say (see `load_tokenizer`). `inputs`: this model's and task's `prepare`, when
    the caller runs several seeds (the same results as without it)."""
    levels = sorted(set(int(e) for e in epoch_levels))
    if not levels or levels[0] < 1:
        raise ValueError(f"epoch_levels must be positive integers, got {list(epoch_levels)}")
    for split in ("train", "dev", "test"):
        if not data.splits.get(split):
            raise UserError(f"task {task.id}: split {split} has no examples; allowed: data with train, dev and test")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                          else config.device)
    labels = data.label_list
    inputs = inputs or prepare(model_source, task, data, config, revision=revision, do_lower_case=do_lower_case)
    tokenizer = inputs.tokenizer
    job = _Job(task=task, data=data, feats=inputs.feats, labels=labels, config=config, seed=seed, device=device,
               pad_id=tokenizer.pad_token_id or 0, out=out, logger=logger,
               tokenizer=tokenizer_facts(tokenizer, inputs.feats["test"]))
    runs = [levels] if config.protocol == "trajectory" else [[level] for level in levels]
    results = []
    with _deterministic():
        for run_levels in runs:
            torch.manual_seed(seed)  # the new head's init and dropout; each run starts from the same state
            model = load_model(model_source, task, labels, len(tokenizer), revision=revision,
                               weights=inputs.weights).to(device)
            if device.type == "cpu":
                use_cpu_kernels(model)
            results += _train_run(model, job, run_levels)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


# ----------------------------------------------------------------------------------- the loop


ALGORITHM = {"optimizer": "adamw", "schedule": "linear"}
"""What `_train_run` trains with whatever the recipe (AdamW; linear warmup, then linear decay to 0):
a result's `config` says so beside the recipe, and MLflow logs both as params."""


@dataclasses.dataclass
class _Job:
    """What every run of one `finetune` call shares: the task, its data and features, how to train."""

    task: TaskInfo
    data: TaskData
    feats: dict[str, list[dict]]
    """`encode`d examples per split."""
    labels: list[str]
    config: FinetuneConfig
    seed: int
    device: torch.device
    pad_id: int
    out: Path
    logger: Callable[[dict], None] | None = None
    tokenizer: dict = dataclasses.field(default_factory=dict)
    """`tokenizer_facts`: what the results say of the tokenizer."""

    def score_split(self, model, split: str) -> tuple[dict, list]:
        return evaluate(model, self.task, self.data.splits[split], self.feats[split], self.labels, self.config,
                        self.device, self.pad_id)


@dataclasses.dataclass
class _Selected:
    """The state a level's result scores: the best dev epoch so far (`select="last"`: the last epoch)."""

    epoch: int
    dev: dict
    end_train_loss: float
    """`metrics.end_loss` of the training steps up to the end of this epoch."""
    state: dict | None
    """A copy of the weights, kept while a later epoch may be scored with them; None otherwise."""


@dataclasses.dataclass
class _Level:
    """One epoch level, scored: what the loop hands to `_result`."""

    epoch: int
    total_epochs: int
    selected: _Selected
    dev_last: float | None
    """Dev F1 at the end of this epoch (None when dev was not scored then)."""
    test: dict
    preds: list
    """Test predictions of the selected state (tags per word, or labels)."""
    epoch_losses: list[float]
    """Mean train loss of each epoch so far."""
    train_seconds: float


def _train_run(model, job: _Job, levels: list[int]) -> list[dict]:
    """One finetuning run over max(levels) epochs; a result at each level (see the module docstring)."""
    from transformers import get_linear_schedule_with_warmup

    config, train = job.config, job.feats["train"]
    total_epochs = levels[-1]
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * total_epochs
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                  fused=job.device.type in ("cpu", "cuda"))  # one kernel per step, as the Trainer
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), total_steps)
    autocast = torch.autocast(job.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    order = torch.Generator().manual_seed(job.seed)
    lengths = [len(f["input_ids"]) for f in train]
    best: _Selected | None = None
    losses: list[float] = []
    step_losses: list[float] = []
    train_seconds = 0.0
    results = []
    for epoch in range(1, total_epochs + 1):
        model.train()
        start = time.perf_counter()
        epoch_steps = []
        for idx in epoch_batches(lengths, config.batch_size, order, config.batches):
            batch = collate([train[i] for i in idx], job.pad_id, job.device)
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_steps.append(loss.detach())
        step_losses += torch.stack(epoch_steps).tolist()  # one device sync per epoch, not per step
        losses.append(sum(step_losses[-steps_per_epoch:]) / steps_per_epoch)
        train_seconds += time.perf_counter() - start
        record = {"epoch": epoch, "train_loss": losses[-1], "end_train_loss": end_loss(step_losses),
                  "lr": scheduler.get_last_lr()[0], "train_seconds": train_seconds}
        if config.select == "best_dev" or epoch in levels:
            dev, _ = job.score_split(model, "dev")
            record["dev_f1"] = dev["f1"]
            if config.select == "last" or best is None or dev["f1"] > best.dev["f1"]:
                keep = epoch < total_epochs and config.select == "best_dev"  # a later level may need this state
                best = _Selected(epoch, dev, record["end_train_loss"], _copy_state(model) if keep else None)
        if job.logger:
            job.logger(record)
        if epoch in levels:
            with _weights(model, best.state if best.epoch != epoch else None):
                test, preds = job.score_split(model, "test")
            results.append(_result(job, _Level(epoch, total_epochs, best, record.get("dev_f1"), test, preds,
                                               list(losses), train_seconds)))
    return results


# ----------------------------------------------------------------------------------- pieces


def load_tokenizer(source: str | Path, task: TaskInfo, *, revision: str | None = None,
                   do_lower_case: bool | None = None):
    """The checkpoint's tokenizer, with the task's entity markers added as special tokens.

    Casing comes from the model, never from a default: `do_lower_case` where given (the spec's
    `external_models[].do_lower_case`), else the model's `tokenizer_config.json`, its `tokenizer.json`
    normalizer, or its `config.json`. A WordPiece tokenizer whose model says none of these is a
    UserError: transformers would lowercase it, and a cased vocabulary then reads "Aspirin" as [UNK]."""
    from transformers import AutoTokenizer

    def load(**kw):
        try:
            return AutoTokenizer.from_pretrained(str(source), revision=revision, **kw)
        except (OSError, ValueError) as exc:
            raise UserError(f"model {source}: cannot load its tokenizer ({str(exc).splitlines()[0]}); allowed: a "
                            "folder saved with save_pretrained (model and tokenizer) or a Hugging Face id") from None

    tokenizer = load()
    if not tokenizer.is_fast:
        raise UserError(f"model {source}: the tokenizer is not a fast (tokenizers) one; allowed: a tokenizer "
                        "with word_ids(), e.g. saved from BertTokenizer in transformers 5")
    declared = do_lower_case if do_lower_case is not None else declared_casing(source, revision)
    if declared is None and hasattr(tokenizer, "do_lower_case"):  # a casing switch that the model leaves unset
        raise UserError(f"model {source}: its tokenizer does not say whether it lowercases (no do_lower_case in "
                        "tokenizer_config.json or config.json, no tokenizer.json); allowed: "
                        "external_models[].do_lower_case: true for an uncased model, false for a cased one")
    if declared is not None and _lowercases(tokenizer) != declared:
        tokenizer = load(do_lower_case=declared)
        if _lowercases(tokenizer) != declared:
            raise UserError(f"model {source}: its tokenizer cannot be made to {'' if declared else 'not '}"
                            f"lowercase; allowed: do_lower_case {str(not declared).lower()} for this model")
    markers = task.format_options.get("entity_markers") or []
    if task.format == "scierc_json" and task.type != "ner":
        markers = [*task.format_options.get("head_markers", ["[[", "]]"]),
                   *task.format_options.get("tail_markers", ["<<", ">>"])]
    if markers:
        tokenizer.add_special_tokens({"additional_special_tokens": list(markers)},
                                     replace_extra_special_tokens=False)
    return tokenizer


def tokenizer_facts(tokenizer, feats: list[dict]) -> dict:
    """`lowercase` (whether the tokenizer lowercases, as loaded) and `unk_share` (the share of the
    split's word pieces, special tokens aside, that are the unknown token): a cased vocabulary read
    lowercased shows as a high share."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    pieces = [i for f in feats for i in f["input_ids"] if i not in special]
    unk = sum(i == tokenizer.unk_token_id for i in pieces)
    return {"lowercase": _lowercases(tokenizer), "unk_share": unk / len(pieces) if pieces else 0.0}


def declared_casing(source: str | Path, revision: str | None = None) -> bool | None:
    """Whether a model's files say its tokenizer lowercases: `do_lower_case` in tokenizer_config.json,
    else the normalizer of tokenizer.json, else `do_lower_case` in config.json; None when none says."""
    from transformers.utils import cached_file

    def read(name: str) -> dict | None:
        path = cached_file(str(source), name, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8")) if path else None
        except (OSError, ValueError):
            return None  # from_pretrained reports a broken file itself
        return data if isinstance(data, dict) else None

    config = read("tokenizer_config.json") or {}
    if isinstance(config.get("do_lower_case"), bool):
        return config["do_lower_case"]
    fast = read("tokenizer.json")
    if fast is not None:
        return _normalizer_lowercases(fast.get("normalizer"))
    config = read("config.json") or {}
    return config["do_lower_case"] if isinstance(config.get("do_lower_case"), bool) else None


def _normalizer_lowercases(normalizer: Any) -> bool:
    """Whether a tokenizer.json `normalizer` entry lowercases (BertNormalizer, Lowercase, or a Sequence of them)."""
    if not isinstance(normalizer, dict):
        return False
    if normalizer.get("type") == "Sequence":
        return any(_normalizer_lowercases(n) for n in normalizer.get("normalizers") or [])
    return normalizer.get("type") == "Lowercase" or (normalizer.get("type") == "BertNormalizer"
                                                     and normalizer.get("lowercase", True) is not False)


def _lowercases(tokenizer) -> bool:
    """What the loaded tokenizer does (not what its attributes say): does its normalizer lowercase?"""
    normalizer = tokenizer.backend_tokenizer.normalizer
    return normalizer is not None and normalizer.normalize_str("A") == "a"


def load_model(source: str | Path, task: TaskInfo, labels: list[str], vocab_size: int, *,
               revision: str | None = None, weights: dict | None = None):
    """The checkpoint with a new classification head (initialised from the torch RNG: seed first).
    `weights`: the checkpoint's state dict, already read (`prepare`); copied, never trained in place."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING,
    )

    ner = task.type == "ner"
    cls = AutoModelForTokenClassification if ner else AutoModelForSequenceClassification
    head = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)})
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized weights" is the point of finetuning
    try:
        if weights is not None:  # the same model and RNG draws as from the folder (tests/test_finetune.py)
            config = AutoConfig.from_pretrained(str(source), revision=revision, **head)
            concrete = (MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING if ner else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)
            model = concrete[type(config)].from_pretrained(None, config=config,
                                                           state_dict={k: v.clone() for k, v in weights.items()})
        else:
            model = cls.from_pretrained(str(source), revision=revision, **head)
        if vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)  # entity markers added to the tokenizer; rows from the RNG
    except (OSError, ValueError) as exc:
        raise UserError(f"model {source}: cannot load it ({str(exc).splitlines()[0]}); allowed: a folder "
                        "saved with save_pretrained or a Hugging Face id") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model


def encode(task: TaskInfo, tokenizer, examples: list[dict], labels: list[str], max_len: int) -> list[dict]:
    """Token ids and label ids per example (NER: -100 on all but each word's first piece)."""
    label_id = {label: i for i, label in enumerate(labels)}
    if task.type != "ner":
        ids = tokenizer([ex["text"] for ex in examples], truncation=False)["input_ids"]
        return [{"input_ids": x if len(x) <= max_len else x[:max_len - 1] + x[-1:], "labels": label_id[ex["label"]],
                 "truncated": len(x) > max_len} for x, ex in zip(ids, examples)]
    unk = tokenizer.unk_token or "[UNK]"
    words = [ex["tokens"] for ex in examples]
    probe = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    for i, ws in enumerate(words):
        present = set(probe.word_ids(i))
        if len(present - {None}) < len(ws):
            words[i] = [w if j in present else unk for j, w in enumerate(ws)]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
    feats = []
    for i, ex in enumerate(examples):
        word_ids = enc.word_ids(i)
        label_ids = [-100] * len(word_ids)
        starts = [-1] * len(ex["tokens"])
        for pos, w in enumerate(word_ids):
            if w is not None and starts[w] < 0:
                starts[w] = pos
                label_ids[pos] = label_id[ex["tags"][w]]
        feats.append({"input_ids": enc["input_ids"][i], "labels": label_ids, "word_starts": starts})
    return feats


def cached_features(task: TaskInfo, tokenizer, data: TaskData, max_len: int,
                    cache_dir: str | Path | None = None) -> dict[str, list[dict]]:
    """`encode` of every split, cached on this machine (`<cache>/features/`) under a hash of what
    decides it: the tokenizer as it stands (vocabulary, normalizer, added markers), the examples
    themselves (the task's data after its caps), the labels and `max_len`. Checkpoints of one
    pretraining run share a tokenizer, so their trials encode a task once per node."""
    import hashlib
    import pickle

    from scaling_study.downloads import cache_root
    from scaling_study.storage import write_atomic

    key = hashlib.sha256()
    for part in (tokenizer.backend_tokenizer.to_str(), json.dumps(data.splits, sort_keys=True, default=str),
                 json.dumps([task.type, data.label_list, max_len])):
        key.update(part.encode())
    path = Path(cache_dir or cache_root() / "features") / f"{task.id}-{key.hexdigest()[:24]}.pkl"
    if path.is_file():
        with contextlib.suppress(Exception):  # a cache: anything unreadable is made again
            return pickle.loads(path.read_bytes())
    feats = {split: encode(task, tokenizer, examples, data.label_list, max_len)
             for split, examples in data.splits.items()}
    with contextlib.suppress(OSError):  # a full or read-only disk only costs the next trial the encoding
        write_atomic(path, pickle.dumps(feats, protocol=pickle.HIGHEST_PROTOCOL))
    return feats


GROUP_BATCHES = 50
"""`by_length` sorts groups of this many batches (Hugging Face's `LengthGroupedSampler` default)."""


def epoch_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                  how: Literal["random", "by_length"] = "random") -> list[list[int]]:
    """One epoch's batches of example indices (`FinetuneRecipe.batches`), drawn from `generator`.

    `random`: a permutation cut into batches of `batch_size`. `by_length`: the same permutation cut
    into groups of GROUP_BATCHES batches, each group sorted by length (ties keep the shuffled order)
    and cut into batches, whose order is then shuffled with the same generator. Either way every
    example comes once and only the last batch may be short (each group but the last is whole)."""
    perm = torch.randperm(len(lengths), generator=generator)
    if how == "random":
        return [idx.tolist() for idx in perm.split(batch_size)]
    if how != "by_length":
        raise UserError(f"finetune.batches: {how!r} is not a batching; allowed: random, by_length")
    batches = []
    for group in perm.split(GROUP_BATCHES * batch_size):
        ordered = sorted(group.tolist(), key=lengths.__getitem__)
        batches += [ordered[k:k + batch_size] for k in range(0, len(ordered), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def collate(feats: list[dict], pad_id: int, device: torch.device, with_labels: bool = True) -> dict:
    """Pad to the longest example of the batch."""
    n = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((len(feats), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(feats), n), dtype=torch.long)
    for i, f in enumerate(feats):
        ids[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, :len(f["input_ids"])] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if with_labels:
        if isinstance(feats[0]["labels"], list):
            labels = torch.full((len(feats), n), -100, dtype=torch.long)
            for i, f in enumerate(feats):
                labels[i, :len(f["labels"])] = torch.tensor(f["labels"])
        else:
            labels = torch.tensor([f["labels"] for f in feats])
        batch["labels"] = labels.to(device)
    return batch


@torch.inference_mode()
def predict(model, feats: list[dict], config: FinetuneConfig, device: torch.device, pad_id: int) -> list:
    """Predicted label ids: per word (NER, -1 where a word has no piece) or per example."""
    model.eval()
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))  # less padding
    out: list = [None] * len(feats)
    for k in range(0, len(order), config.eval_batch_size):
        chunk = order[k:k + config.eval_batch_size]
        batch = collate([feats[i] for i in chunk], pad_id, device, with_labels=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            best = model(**batch).logits.argmax(-1).cpu()
        for row, i in enumerate(chunk):
            if "word_starts" in feats[i]:
                out[i] = [int(best[row, s]) if s >= 0 else -1 for s in feats[i]["word_starts"]]
            else:
                out[i] = int(best[row])
    return out


def evaluate(model, task: TaskInfo, examples: list[dict], feats: list[dict], labels: list[str],
             config: FinetuneConfig, device: torch.device, pad_id: int) -> tuple[dict, list]:
    """(scores, predicted labels) on one split; words without a prediction are O."""
    ids = predict(model, feats, config, device, pad_id)
    if task.type == "ner":
        pred = [[labels[i] if i >= 0 else "O" for i in seq] for seq in ids]
        gold = [ex["tags"] for ex in examples]
    else:
        pred = [labels[i] for i in ids]
        gold = [ex["label"] for ex in examples]
    return score(task.metric, gold, pred, labels if task.type != "ner" else None), pred


def _result(job: _Job, level: _Level) -> dict:
    """One level's result, with its artifacts (scores JSON, re-scorable test predictions) written."""
    task, data, feats, config = job.task, job.data, job.feats, job.config
    ner = task.type == "ner"
    train_gold = [t for ex in data.splits["train"] for t in ex["tags"]] if ner else \
        [ex["label"] for ex in data.splits["train"]]
    test_gold = [ex["tags"] for ex in data.splits["test"]] if ner else [ex["label"] for ex in data.splits["test"]]
    collapse = detect_collapse(task.metric, test_gold, level.preds, end_train_loss=level.selected.end_train_loss,
                               prior_loss=label_entropy(train_gold))
    level_dir = job.out / f"epochs_{level.epoch}"
    level_dir.mkdir(parents=True, exist_ok=True)
    if ner:
        predictions = level_dir / "test_predictions.conll"
        write_conll_predictions(predictions, [ex["tokens"] for ex in data.splits["test"]], test_gold, level.preds)
        truncated = sum(s < 0 for f in feats["test"] for s in f["word_starts"])
    else:
        predictions = level_dir / "test_predictions.jsonl"
        write_jsonl_predictions(predictions, [ex["text"] for ex in data.splits["test"]], test_gold, level.preds)
        truncated = sum(f["truncated"] for f in feats["test"])
    examples_seen = len(feats["train"]) * level.epoch
    seconds = level.train_seconds
    result = {
        "task": task.id, "task_version": task.version, "metric": task.metric, "seed": job.seed,
        "protocol": config.protocol, "epochs": level.epoch, "total_epochs": level.total_epochs,
        "select": config.select, "selected_epoch": level.selected.epoch, "score": level.test["f1"],
        "dev": level.selected.dev, "dev_last": {"f1": level.dev_last}, "test": level.test,
        "majority_f1": majority_baseline(task.metric, train_gold if not ner else [], test_gold, job.labels),
        "train_loss": level.epoch_losses[-1], "end_train_loss": level.selected.end_train_loss,
        "train_losses": level.epoch_losses, "train_seconds": seconds,
        "examples_per_s": examples_seen / seconds if seconds else None,
        "num_examples": {s: len(v) for s, v in data.splits.items()},
        "truncated_test": {"words" if ner else "examples": int(truncated)},
        "collapse": collapse["collapse"], "collapse_reasons": collapse["reasons"], "collapse_detail": collapse,
        "tokenizer": job.tokenizer,
        "config": {**dataclasses.asdict(config), **ALGORITHM},
        "artifacts": [str((level_dir / "scores.json").relative_to(job.out)), str(predictions.relative_to(job.out))],
    }
    (level_dir / "scores.json").write_text(json.dumps(result, indent=2))
    return result


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layernorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _copy_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _weights(model, state: dict | None):
    """Temporarily load `state` into `model` (None: leave it as it is)."""
    if state is None:
        yield
        return
    current = _copy_state(model)
    model.load_state_dict(state)
    try:
        yield
    finally:
        model.load_state_dict(current)


@contextlib.contextmanager
def _deterministic():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# ----------------------------------------------------------------------------------- scratch models


def build_scratch_model(folder: str | Path, texts: Iterable[str], preset: str = "tiny", vocab_size: int = 4000,
                        seed: int = 0, lowercase: bool = False) -> Path:
    """A randomly initialised BERT (MLM) with a WordPiece vocabulary trained on `texts`, saved with its
    tokenizer: the from-scratch baseline, and what tests and benchmarks finetune without a hub."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertForMaskedLM, BertTokenizer

    from scaling_study.wordpiece import continuation_tokens
    from scaling_study.models import bert_config, load_presets

    texts = list(texts)
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # the `##c` tokens registered first, as the corpus builds do: else the vocabulary differs from
    # process to process (huggingface/tokenizers#1794), and so do the scores finetuned from it
    continuations = continuation_tokens({c for text in texts for c in text}, cased=not lowercase)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, continuing_subword_prefix="##",
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *continuations])
    wordpiece.train_from_iterator(texts, trainer)
    tokenizer = BertTokenizer(vocab=wordpiece.get_vocab(), do_lower_case=lowercase)
    torch.manual_seed(seed)
    model = BertForMaskedLM(bert_config(load_presets()[preset], len(tokenizer)))
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
