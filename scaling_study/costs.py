"""What a study will cost before it runs: parameters, tokens, FLOPs, device-hours, corpus CPU-hours, storage.

    from scaling_study.costs import estimate, node_flops
    report = estimate(study, expand(study), device="h100")   # a CostReport
    report.totals.device_hours, report.pretrain_runs[0].flops
    estimate(study, plan, cpus=256, cpus_source="--cpus")     # corpus builds' wall time on 256 CPUs
    report.corpus_builds[0].cpu_hours, report.totals.corpus_wall_hours
    report.to_dict()                                          # plain JSON-able data (`plan --format json`)
    node_flops(study, plan)                                   # {node id: FLOPs} of every pretrain and finetune_run node
    report.adaptive_seeds                                     # adaptive seeds: expected and worst-case finetuning

Parameters are counted exactly (embeddings included) from the presets. Pretraining FLOPs are the
real forward and backward of the MLM model as we train it: the encoder on every token, the MLM head
only at masked positions (`models.mlm_flops_breakdown` says what is counted). Finetuning FLOPs are
the encoder plus the task head on `max_seq_len`-token examples (an upper bound: real examples are
often shorter), plus a forward pass over dev and test at each epochs level. Device-hours are FLOPs
over `peak_flops x MFU` of the named device (`presets/devices.yaml`); the assumptions are part of
the report. When the spec gives no corpus size, it is estimated from the files at 4.6 bytes per
token (measured on the 60 MB science corpus with a cased 16k WordPiece vocabulary).

Corpus builds run on CPUs, so they are costed in CPU-hours, never mixed with device-hours. A
study's corpus nodes (one per data volume, all on the spec's one corpus) are built together
(`scaling_study.corpus`): one scan over the whole corpus text, then per volume a tokenizer trained
on its sample and its documents tokenized and packed (a document of the 1% volume is tokenized
once for each of 1%, 10% and 100%). In core-seconds, with the rates of `presets/corpus_rates.yaml`
(bytes of UTF-8 text per core-second):

    corpus_bytes / scan_rate  +  sum over volumes (volume_bytes / pack_rate + sample_bytes / train_rate)

where corpus_bytes = the corpus's tokens x BYTES_PER_TOKEN (exactly the files' sizes when the
tokens are estimated from them), volume_bytes = its volume's tokens x BYTES_PER_TOKEN and
sample_bytes = min(volume_bytes, `corpus.tokenizer_sample`). Each corpus node's CPU-hours are its
pack and training plus an even share of the scan: every volume needs the whole scan, and the
volumes share it. Scan and pack spread over every CPU of the cluster, training is one process per
volume: a node's wall time is (scan share + pack) / CPUs + its training; the study's is
(scan + all packs) / CPUs + its trainings one after the other (the build's driver trains the
volumes' tokenizers in turn). Less than the sum of its nodes', since they share the scan.
The CPUs are `estimate`'s `cpus` (`plan --cpus N`, or a Ray cluster's with `plan --address`),
else this machine's.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict

from scaling_study.grid import KINDS, Node, Plan
from scaling_study.models import finetune_train_flops, load_corpus_rates, load_devices, pretrain_factors
from scaling_study.spec import Study

BYTES_PER_TOKEN = 4.6
WEIGHT_BYTES = 4  # fp32 safetensors
OPTIMIZER_BYTES = 8  # AdamW moments, fp32, kept with each checkpoint so any level can resume
TOKEN_BYTES = 4  # int32 token ids in the Parquet shards (before compression; an upper bound)
CORPUS_RATES = "default"
"""The entry of presets/corpus_rates.yaml that `estimate` costs corpus builds with."""
NODE_SYSTEM_BYTES = 60e9
"""An allowance for what a cluster node keeps besides the study (an estimate, not a measurement):
the unpacked rayproject/ray GPU image, the CUDA build of torch and the project's packages, pip's and
Hugging Face's caches, Ray's logs and /tmp."""


def corpus_tokens(study: Study) -> tuple[float | None, str]:
    """Tokens in the whole corpus and where the number comes from."""
    corpus = study.spec.corpus
    if corpus.total_tokens:
        return corpus.total_tokens, "declared in corpus.total_tokens"
    from scaling_study.errors import UserError
    from scaling_study.sources import input_files
    from scaling_study.spec import expand_env
    from scaling_study.storage import Store

    cache = Store(expand_env(study.spec.storage.root)).local / "cache"  # where corpus.urls are fetched
    try:  # local files and object-store prefixes; downloads only once fetched
        files = [f for f in input_files(study, cache_dir=cache, download=False) if f.size >= 0]
    except UserError:
        files = []
    if any(f.compression for f in files) or (files and corpus.format == "parquet"):
        return None, "unknown for compressed files: set corpus.total_tokens"
    size = sum(f.size for f in files)
    if size == 0:
        return None, "unknown: set corpus.total_tokens or make corpus.paths readable"
    return size / BYTES_PER_TOKEN, f"estimated from {size / 1e6:.1f} MB of text at {BYTES_PER_TOKEN} bytes/token"


def _num_labels(task) -> int:
    return 2 * len(task.labels) + 1 if task.type == "ner" else len(task.labels)


def _examples(study: Study, tid: str, split: str) -> int | None:
    info = study.tasks[tid].splits[split].num_examples
    cap = getattr(study.caps[tid], f"max_{split}_examples")
    if info is None:
        return cap
    return min(info, cap) if cap else info


# ----------------------------------------------------------------------------------- the report
# Field order is the JSON key order of `plan --format json`.


@dataclasses.dataclass
class DeviceAssumption:
    """The device the hours are for, and what it is assumed to sustain."""

    name: str
    description: str
    peak_flops: float
    peak_precision: str
    assumed_mfu: float
    throughput_flops: float
    """peak_flops x assumed_mfu."""
    source: str


@dataclasses.dataclass
class CpuAssumption:
    """The CPUs a corpus build spreads over, and what each core is assumed to do."""

    cpus: int
    cpus_source: str
    """Where the count comes from (--cpus, a Ray cluster, this machine)."""
    scan_rate: float
    """Bytes of text per core-second (presets/corpus_rates.yaml), as the next two."""
    pack_rate: float
    train_rate: float
    rates_source: str


@dataclasses.dataclass
class CorpusBuildCost:
    """One `corpus` node's share of its study's corpus build (the module docstring has the model);
    None where the corpus size is unknown."""

    id: str
    data_volume: str
    volume_bytes: float | None
    tokenizer_sample_bytes: float | None
    scan_cpu_hours: float | None
    """An even share of the one scan over the whole corpus text."""
    train_cpu_hours: float | None
    pack_cpu_hours: float | None
    cpu_hours: float | None
    """The three above."""
    wall_hours: float | None
    """(scan share + pack) over the CPUs, plus training (one process)."""


@dataclasses.dataclass
class CorpusSize:
    tokens: float | None
    source: str
    """Where the number comes from (declared, or estimated from the files' sizes)."""


@dataclasses.dataclass
class PretrainRunCost:
    """One `pretrain` node."""

    id: str
    model_size: str
    parameters: int
    data_volume: str
    volume_tokens: float | None
    """Tokens of its data volume (None when the corpus size is unknown)."""
    steps: int
    checkpoints: list[int]
    tokens: float
    """Tokens seen over all steps."""
    epochs_over_data: float | None
    flops: float
    flops_encoder: float
    flops_head: float
    device_hours: float


@dataclasses.dataclass
class TaskCost:
    """The finetune runs of one task, over every model and seed."""

    task: str
    runs: int = 0
    jobs: int = 0
    """Result cells (finetune nodes)."""
    flops: float = 0.0
    flops_unknown: int = 0
    """Runs not costed: unknown split sizes, or an external model without num_parameters."""
    type: str = ""
    train_examples: int | None = None
    test_examples: int | None = None
    device_hours: float = 0.0


@dataclasses.dataclass
class StorageCost:
    checkpoint_weights_bytes: float
    checkpoint_optimizer_bytes: float
    corpus_shards_bytes: float
    """An upper bound: int32 token ids before compression."""
    total_bytes: float
    node_disk: dict = dataclasses.field(default_factory=dict)
    """Local disk (bytes) each kind of cluster node needs, by part (`node_disk`)."""


@dataclasses.dataclass
class Totals:
    pretrain_flops: float
    finetune_flops: float
    flops: float
    pretrain_device_hours: float
    finetune_device_hours: float
    device_hours: float
    finetune_jobs_without_flops: int
    """Finetune runs not costed (the name is kept for the JSON)."""
    corpus_cpu_hours: float | None
    """CPU-hours of the corpus builds (None: the corpus size is unknown)."""
    corpus_wall_hours: float | None
    """Their wall time on the CPUs of `CostReport.cpu`."""


@dataclasses.dataclass
class AdaptiveCost:
    """The finetuning of an adaptive-seeds study (`finetune.seeds: {adaptive: ...}`): the plan holds
    `max` seeds of every cell (the worst case, which the totals count); the rule runs fewer."""

    min_seeds: int
    max_seeds: int
    jobs_min: int
    """Finetune jobs with `min` seeds everywhere (every comparison settled at once)."""
    jobs_expected: float
    jobs_max: int
    finetune_flops_min: float
    finetune_flops_expected: float
    finetune_flops_max: float
    finetune_device_hours_expected: float
    finetune_device_hours_max: float
    assumption: str
    """What the expected numbers assume (`adaptive_cost`)."""


@dataclasses.dataclass
class CostReport:
    """What `estimate` returns; `to_dict()` is the JSON of `plan --format json`."""

    study: str
    device: DeviceAssumption
    counts: dict[str, int]
    """Nodes per kind."""
    pretrain_runs: list[PretrainRunCost]
    finetune_by_task: list[TaskCost]
    """Sorted by task id."""
    storage: StorageCost
    corpus: CorpusSize | None
    """None for a study of external models only."""
    totals: Totals
    adaptive_seeds: AdaptiveCost | None = None
    """None unless the seeds are adaptive."""
    cpu: CpuAssumption | None = None
    """What the corpus builds' hours assume (`estimate` always sets it)."""
    corpus_builds: list[CorpusBuildCost] = dataclasses.field(default_factory=list)
    """One per `corpus` node, in plan order."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------- FLOPs per node


def _children(plan: Plan) -> dict[str, list[Node]]:
    """Node id -> its children, in plan order (`Plan.children` for every node at once)."""
    out: dict[str, list[Node]] = defaultdict(list)
    for node in plan.nodes.values():
        for parent in node.parents:
            out[parent].append(node)
    return out


def _pretrain_factors(study: Study, run: Node):
    vocab = study.spec.corpus.vocab_size
    return pretrain_factors(study.presets[run.factors["model_size"]], vocab, run.inputs["total_steps"],
                            study.spec.pretrain)


def _finetune_run_flops(study: Study, plan: Plan, run: Node, cells: int) -> float | None:
    """Training plus dev/test scoring at each of its `cells` levels; None when it cannot be costed."""
    tid = run.factors["task"]
    task = study.tasks[tid]
    train, dev, test = (_examples(study, tid, s) for s in ("train", "dev", "test"))
    if train is None or dev is None or test is None:
        return None
    seen = train * run.inputs["total_epochs"]
    scored = (dev + test) * cells  # forward only: a third of a training step
    model = plan.nodes[run.parents[0]]
    max_seq_len = study.spec.finetune.max_seq_len
    if model.kind == "checkpoint":
        preset = study.presets[model.factors["model_size"]]
        return finetune_train_flops(preset, study.spec.corpus.vocab_size,
                                    min(max_seq_len, preset.max_position_embeddings), seen + scored / 3,
                                    _num_labels(task), head="token" if task.type == "ner" else "sequence")
    ext = next(m for m in study.spec.external_models if m.name == model.factors["model"])
    if not ext.num_parameters:
        return None
    return 6 * ext.num_parameters * max_seq_len * (seen + scored / 3)


def node_flops(study: Study, plan: Plan) -> dict[str, float]:
    """Estimated training FLOPs of every `pretrain` and `finetune_run` node (what `estimate` sums).

    A finetune run that cannot be costed (unknown split sizes, or an external model without
    `num_parameters`) is left out. The study driver weighs its ETA with these.
    """
    children = _children(plan)
    out = {run.id: _pretrain_factors(study, run).flops for run in plan.of_kind("pretrain")}
    for run in plan.of_kind("finetune_run"):
        flops = _finetune_run_flops(study, plan, run, len(children[run.id]))
        if flops is not None:
            out[run.id] = flops
    return out


# ----------------------------------------------------------------------------------- the estimate


def _device(device: str, mfu: float | None) -> DeviceAssumption:
    devices = load_devices()
    if device not in devices:
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(devices)}")
    dev = devices[device]
    mfu = mfu or dev.assumed_mfu
    return DeviceAssumption(name=device, description=dev.description, peak_flops=dev.peak_flops,
                            peak_precision=dev.peak_precision, assumed_mfu=mfu, throughput_flops=dev.peak_flops * mfu,
                            source=dev.source)


def _volume_tokens(plan: Plan, total_tokens: float | None) -> dict[str, float | None]:
    """Corpus build id -> tokens of its data volume."""
    out = {}
    for build in plan.of_kind("corpus"):
        volume = build.inputs["volume"]
        out[build.id] = volume.get("tokens") or (volume["fraction"] * total_tokens if total_tokens else None)
    return out


def _pretrain_runs(study: Study, plan: Plan, flops: dict, volume_tokens: dict, children: dict,
                   per_hour: float) -> list[PretrainRunCost]:
    rows = []
    for run in plan.of_kind("pretrain"):
        factors = _pretrain_factors(study, run)
        tokens = volume_tokens[run.parents[0]]
        rows.append(PretrainRunCost(
            id=run.id, model_size=run.factors["model_size"], parameters=factors.parameters,
            data_volume=run.factors["data_volume"], volume_tokens=tokens, steps=run.inputs["total_steps"],
            checkpoints=sorted(c.inputs["step"] for c in children[run.id]), tokens=float(factors.tokens),
            epochs_over_data=factors.tokens / tokens if tokens else None, flops=flops[run.id],
            flops_encoder=factors.flops_encoder, flops_head=factors.flops_head, device_hours=flops[run.id] / per_hour))
    return rows


def _finetune_by_task(study: Study, plan: Plan, flops: dict, children: dict, per_hour: float) -> list[TaskCost]:
    by_task: dict[str, TaskCost] = {}
    for run in plan.of_kind("finetune_run"):
        tid = run.factors["task"]
        row = by_task.setdefault(tid, TaskCost(task=tid))
        row.runs += 1
        row.jobs += len(children[run.id])
        row.type, row.train_examples, row.test_examples = (study.tasks[tid].type, _examples(study, tid, "train"),
                                                           _examples(study, tid, "test"))
        if run.id in flops:
            row.flops += flops[run.id]
        else:
            row.flops_unknown += 1
    for row in by_task.values():
        row.device_hours = row.flops / per_hour
    return [by_task[tid] for tid in sorted(by_task)]


def _storage(pretrain_runs: list[PretrainRunCost], volume_tokens: dict) -> StorageCost:
    weights = optimizer = shards = 0.0
    for tokens in volume_tokens.values():
        shards += (tokens or 0) * TOKEN_BYTES
    for run in pretrain_runs:
        weights += len(run.checkpoints) * run.parameters * WEIGHT_BYTES
        optimizer += len(run.checkpoints) * run.parameters * OPTIMIZER_BYTES
    return StorageCost(checkpoint_weights_bytes=weights, checkpoint_optimizer_bytes=optimizer,
                       corpus_shards_bytes=shards, total_bytes=weights + optimizer + shards)


def node_disk(storage: StorageCost, pretrain_runs: list[PretrainRunCost], corpus: CorpusSize | None) -> dict:
    """Local disk (bytes) each kind of cluster node needs for the study, from `estimate`'s numbers;
    `ray_cluster.yaml`'s volumes are sized from it (docs/cluster.md, Disks; tests/test_cluster.py).

    Nodes work in their local mirror of the storage root and keep what they staged or fetched
    there (it is a cache), so each node needs room for the most it can come to hold:

    - `head`: the corpus builds run here (the only node up when a study starts); each writes its
      shards in the mirror and uploads them: every build's shards, plus the corpus text when it
      sits on the head's disk (`corpus_text`: tokens x BYTES_PER_TOKEN).
    - `pretrain_node`: rank 0 writes each checkpoint (weights and optimizer state) in its mirror
      before uploading it. At worst one node is rank 0 of every run: every checkpoint, plus each
      run's latest resume-only checkpoint and the next one being written beside it. No corpus
      shards: the workers stream them from storage.
    - `finetune_node`: each trial downloads a checkpoint's weights and tokenizer: at worst every
      checkpoint's weights.

    Each plus NODE_SYSTEM_BYTES.
    """
    checkpoint = [r.parameters * (WEIGHT_BYTES + OPTIMIZER_BYTES) for r in pretrain_runs]
    text = (corpus.tokens if corpus else None) or 0
    parts = {
        "head": {"corpus_shards": storage.corpus_shards_bytes, "corpus_text": text * BYTES_PER_TOKEN},
        "pretrain_node": {"checkpoints": storage.checkpoint_weights_bytes + storage.checkpoint_optimizer_bytes,
                          "resume_checkpoints": sum(checkpoint) + max(checkpoint, default=0)},
        "finetune_node": {"checkpoint_weights": storage.checkpoint_weights_bytes},
    }
    return {node: {**p, "system": NODE_SYSTEM_BYTES, "total": sum(p.values()) + NODE_SYSTEM_BYTES}
            for node, p in parts.items()}


def _cpu(cpus: int | None, cpus_source: str | None) -> CpuAssumption:
    rates = load_corpus_rates()[CORPUS_RATES]
    if cpus is None:
        cpus, cpus_source = os.cpu_count() or 1, "this machine's, os.cpu_count()"
    if cpus < 1:
        raise ValueError(f"cpus {cpus}: out of range; allowed: an integer >= 1")
    return CpuAssumption(cpus=cpus, cpus_source=cpus_source or "given", scan_rate=rates.scan_rate,
                         pack_rate=rates.pack_rate, train_rate=rates.train_rate, rates_source=rates.source)


def corpus_build_costs(study: Study, plan: Plan, corpus_tokens: float | None, volume_tokens: dict,
                       cpu: CpuAssumption) -> list[CorpusBuildCost]:
    """Each corpus node's CPU-hours and wall time (the model is in the module docstring)."""
    builds = plan.of_kind("corpus")
    if not builds:  # external models only
        return []
    scan = corpus_tokens * BYTES_PER_TOKEN / cpu.scan_rate / 3600 / len(builds) if corpus_tokens else None
    cap = study.spec.corpus.tokenizer_sample
    rows = []
    for build in builds:
        tokens = volume_tokens[build.id]
        volume = tokens * BYTES_PER_TOKEN if tokens else None
        sample = min(volume, cap) if volume else None
        train = sample / cpu.train_rate / 3600 if sample else None
        pack = volume / cpu.pack_rate / 3600 if volume else None
        known = None not in (scan, train, pack)
        rows.append(CorpusBuildCost(
            id=build.id, data_volume=build.factors["data_volume"], volume_bytes=volume, tokenizer_sample_bytes=sample,
            scan_cpu_hours=scan, train_cpu_hours=train, pack_cpu_hours=pack,
            cpu_hours=scan + train + pack if known else None,
            wall_hours=(scan + pack) / cpu.cpus + train if known else None))
    return rows


def _corpus_totals(rows: list[CorpusBuildCost], cpus: int) -> tuple[float | None, float | None]:
    """The study's corpus CPU-hours and wall time: the passes spread over the CPUs; the volumes'
    tokenizers are trained one after the other in the build's driver (counted as one core each)."""
    if any(r.cpu_hours is None for r in rows):
        return None, None
    spread = sum(r.scan_cpu_hours + r.pack_cpu_hours for r in rows)
    return sum(r.cpu_hours for r in rows), spread / cpus + sum(r.train_cpu_hours for r in rows)


SIMULATED_STUDIES = 3
"""Synthetic studies behind an adaptive study's expected cost (seeded: `plan` prints the same numbers)."""


def adaptive_cost(study: Study, plan: Plan, flops: dict[str, float], per_hour: float) -> AdaptiveCost | None:
    """Expected and worst-case finetuning of an adaptive-seeds study. Expected: the rule run on
    SIMULATED_STUDIES synthetic studies of this plan's design (`adaptive.synthetic_truth`: effects
    around the threshold; `adaptive.synthetic_draw`: seed noise by task type), as in
    benchmarks/adaptive.py; a real study's effects decide the real cost."""
    import numpy as np

    from scaling_study import adaptive

    rule = study.spec.finetune.adaptive
    if rule is None:
        return None
    design = adaptive.design_from_plan(study, plan)
    cells = design.cells.groupby("group", sort=False).size().to_dict()
    per_run = {adaptive.run_group(run): flops.get(run.id, 0.0) for run in plan.of_kind("finetune_run")}
    rng = np.random.default_rng(0)
    seeds = {g: 0.0 for g in design.groups}
    for _ in range(SIMULATED_STUDIES):
        truth = adaptive.synthetic_truth(design, rng, rule.threshold)
        for g, k in adaptive.simulate(design, rule, adaptive.synthetic_draw(design, truth, rng)).seeds_run().items():
            seeds[g] += k / SIMULATED_STUDIES
    expected = sum(seeds[g] * per_run[g] for g in design.groups)
    worst = sum(rule.max * per_run[g] for g in design.groups)
    sd = ", ".join(f"{kind} {value:g}" for kind, value in adaptive.SEED_SD.items())
    return AdaptiveCost(
        min_seeds=rule.min, max_seeds=rule.max, jobs_min=rule.min * len(design.cells),
        jobs_expected=sum(seeds[g] * cells[g] for g in design.groups), jobs_max=rule.max * len(design.cells),
        finetune_flops_min=sum(rule.min * per_run[g] for g in design.groups), finetune_flops_expected=expected,
        finetune_flops_max=worst, finetune_device_hours_expected=expected / per_hour,
        finetune_device_hours_max=worst / per_hour,
        assumption=f"the rule on {SIMULATED_STUDIES} synthetic studies of this plan: effects around the threshold, "
                   f"seed sd {sd} F1 points (benchmarks/adaptive.py); the totals count the worst case")


def estimate(study: Study, plan: Plan, device: str = "h100", mfu: float | None = None, *,
             cpus: int | None = None, cpus_source: str | None = None) -> CostReport:
    """The plan's costs on `device` (a name in presets/devices.yaml), its corpus builds on `cpus`
    CPUs (default: this machine's; `cpus_source` says where the number comes from); see the module
    docstring."""
    dev = _device(device, mfu)
    cpu = _cpu(cpus, cpus_source)
    per_hour = dev.throughput_flops * 3600
    spec = study.spec
    corpus = CorpusSize(*corpus_tokens(study)) if spec.corpus else None
    volume_tokens = _volume_tokens(plan, corpus.tokens if corpus else None)
    children = _children(plan)
    flops = node_flops(study, plan)
    pretrain_runs = _pretrain_runs(study, plan, flops, volume_tokens, children, per_hour)
    by_task = _finetune_by_task(study, plan, flops, children, per_hour)
    pre = sum(r.flops for r in pretrain_runs)
    ft = sum(r.flops for r in by_task)
    storage = _storage(pretrain_runs, volume_tokens)
    storage.node_disk = node_disk(storage, pretrain_runs, corpus)
    builds = corpus_build_costs(study, plan, corpus.tokens if corpus else None, volume_tokens, cpu)
    corpus_cpu, corpus_wall = _corpus_totals(builds, cpu.cpus)
    totals = Totals(pretrain_flops=pre, finetune_flops=ft, flops=pre + ft, pretrain_device_hours=pre / per_hour,
                    finetune_device_hours=ft / per_hour, device_hours=(pre + ft) / per_hour,
                    finetune_jobs_without_flops=sum(r.flops_unknown for r in by_task),
                    corpus_cpu_hours=corpus_cpu, corpus_wall_hours=corpus_wall)
    return CostReport(study=spec.name, device=dev, counts={kind: len(plan.of_kind(kind)) for kind in KINDS},
                      pretrain_runs=pretrain_runs, finetune_by_task=by_task,
                      storage=storage, corpus=corpus, totals=totals,
                      adaptive_seeds=adaptive_cost(study, plan, flops, per_hour), cpu=cpu, corpus_builds=builds)
