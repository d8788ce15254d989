"""What a study will cost before it runs: parameters, tokens, FLOPs, device-hours, storage.

    from scaling_study.costs import estimate
    report = estimate(study, expand(study), device="h100")   # a JSON-able dict
    report["totals"]["device_hours"]

Parameters are counted exactly (embeddings included) from the presets. Pretraining FLOPs are the
real forward and backward of the MLM model as we train it: the encoder on every token, the MLM head
only at masked positions (`models.mlm_flops_breakdown` says what is counted). Finetuning FLOPs are
the encoder plus the task head on `max_seq_len`-token examples (an upper bound: real examples are
often shorter), plus a forward pass over dev and test at each epochs level. Device-hours are FLOPs
over `peak_flops x MFU` of the named device (`presets/devices.yaml`); the assumptions are part of
the report. When the spec gives no corpus size, it is estimated from the files at 4.6 bytes per
token (measured on the 60 MB science corpus with a cased 16k WordPiece vocabulary).
"""

from __future__ import annotations

from collections import defaultdict
from scaling_study.grid import Plan
from scaling_study.models import count_parameters, finetune_train_flops, load_devices, mlm_flops_breakdown
from scaling_study.spec import Study

BYTES_PER_TOKEN = 4.6
WEIGHT_BYTES = 4  # fp32 safetensors
OPTIMIZER_BYTES = 8  # AdamW moments, fp32, kept with each checkpoint so any level can resume
TOKEN_BYTES = 4  # int32 token ids in the Parquet shards (before compression; an upper bound)
NODE_SYSTEM_BYTES = 60e9
"""An allowance for what a cluster node keeps besides the study (an estimate, not a measurement):
the unpacked rayproject/ray GPU image, the CUDA build of torch and the project's packages, pip's and
Hugging Face's caches, Ray's logs and /tmp."""


def corpus_tokens(study: Study) -> tuple[float | None, str]:
    """Tokens in the whole corpus and where the number comes from."""
    corpus = study.spec.corpus
    if corpus.total_tokens:
        return corpus.total_tokens, "declared in corpus.total_tokens"
    size = 0
    for raw in corpus.paths:
        path = study.resolve_path(raw)
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
        size += sum(f.stat().st_size for f in files)
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


def estimate(study: Study, plan: Plan, device: str = "h100", mfu: float | None = None) -> dict:
    """The plan's costs on `device` (a name in presets/devices.yaml); see the module docstring."""
    devices = load_devices()
    if device not in devices:
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(devices)}")
    dev = devices[device]
    mfu = mfu or dev.assumed_mfu
    flops_per_hour = dev.peak_flops * mfu * 3600
    spec = study.spec
    out: dict = {
        "study": spec.name,
        "device": {"name": device, "description": dev.description, "peak_flops": dev.peak_flops,
                   "peak_precision": dev.peak_precision, "assumed_mfu": mfu,
                   "throughput_flops": dev.peak_flops * mfu, "source": dev.source},
        "counts": {kind: len(plan.of_kind(kind)) for kind in
                   ("corpus", "pretrain", "checkpoint", "external", "finetune_run", "finetune")},
        "pretrain_runs": [], "finetune_by_task": [], "storage": {},
    }

    vocab = spec.corpus.vocab_size if spec.corpus else None
    params_of: dict[str, int | None] = {}
    total_tokens, tokens_source = corpus_tokens(study) if spec.corpus else (None, "")
    out["corpus"] = {"tokens": total_tokens, "source": tokens_source} if spec.corpus else None
    storage_weights = storage_optimizer = storage_corpus = 0.0
    volume_tokens: dict[str, float | None] = {}

    for build in plan.of_kind("corpus"):
        volume = build.inputs["volume"]
        tokens = volume.get("tokens") or (volume["fraction"] * total_tokens if total_tokens else None)
        volume_tokens[build.id] = tokens
        storage_corpus += (tokens or 0) * TOKEN_BYTES

    for run in plan.of_kind("pretrain"):
        build = plan.nodes[run.parents[0]]
        preset = study.presets[run.factors["model_size"]]
        params = count_parameters(preset, vocab)
        p = spec.pretrain
        sequences = run.inputs["total_steps"] * p.batch_size
        flops = mlm_flops_breakdown(preset, vocab, p.seq_len, sequences, p.mask_rate)
        checkpoints = plan.children(run.id)
        for ck in checkpoints:
            params_of[ck.id] = params
        tokens = volume_tokens[build.id]
        storage_weights += len(checkpoints) * params * WEIGHT_BYTES
        storage_optimizer += len(checkpoints) * params * OPTIMIZER_BYTES
        out["pretrain_runs"].append({
            "id": run.id, "model_size": run.factors["model_size"], "parameters": params,
            "data_volume": run.factors["data_volume"], "volume_tokens": tokens,
            "steps": run.inputs["total_steps"], "checkpoints": sorted(c.inputs["step"] for c in checkpoints),
            "tokens": flops["tokens"], "epochs_over_data": flops["tokens"] / tokens if tokens else None,
            "flops": flops["total"], "flops_encoder": flops["encoder"], "flops_head": flops["head"],
            "device_hours": flops["total"] / flops_per_hour,
        })

    for ext in plan.of_kind("external"):
        model = next(m for m in spec.external_models if m.name == ext.factors["model"])
        params_of[ext.id] = model.num_parameters

    out["finetune_by_task"] = _finetune_by_task(study, plan, params_of, vocab, flops_per_hour)

    pre_flops = sum(r["flops"] for r in out["pretrain_runs"])
    ft_flops = sum(r["flops"] for r in out["finetune_by_task"])
    out["storage"] = {"checkpoint_weights_bytes": storage_weights, "checkpoint_optimizer_bytes": storage_optimizer,
                      "corpus_shards_bytes": storage_corpus,
                      "total_bytes": storage_weights + storage_optimizer + storage_corpus}
    out["storage"]["node_disk"] = node_disk(out)
    out["totals"] = {
        "pretrain_flops": pre_flops, "finetune_flops": ft_flops, "flops": pre_flops + ft_flops,
        "pretrain_device_hours": pre_flops / flops_per_hour, "finetune_device_hours": ft_flops / flops_per_hour,
        "device_hours": (pre_flops + ft_flops) / flops_per_hour,
        "finetune_jobs_without_flops": sum(r["flops_unknown"] for r in out["finetune_by_task"]),
    }
    return out



def _finetune_by_task(study: Study, plan: Plan, params_of: dict, vocab: int | None, flops_per_hour: float) -> list:
    """Per task: finetune runs, jobs (cells), training FLOPs and device-hours (`estimate`)."""
    f = study.spec.finetune
    by_task: dict[str, dict] = defaultdict(lambda: {"runs": 0, "jobs": 0, "flops": 0.0, "flops_unknown": 0})
    for run in plan.of_kind("finetune_run"):
        tid = run.factors["task"]
        task = study.tasks[tid]
        row = by_task[tid]
        cells = plan.children(run.id)
        row["runs"] += 1
        row["jobs"] += len(cells)
        model = plan.nodes[run.parents[0]]
        train, dev, test = (_examples(study, tid, s) for s in ("train", "dev", "test"))
        row.update(type=task.type, train_examples=train, test_examples=test)
        if train is None or dev is None or test is None:
            row["flops_unknown"] += 1
            continue
        seen = train * run.inputs["total_epochs"]
        scored = (dev + test) * len(cells)  # forward only: a third of a training step
        if model.kind == "checkpoint":
            preset = study.presets[model.factors["model_size"]]
            flops = finetune_train_flops(preset, vocab, min(f.max_seq_len, preset.max_position_embeddings),
                                         seen + scored / 3, _num_labels(task),
                                         head="token" if task.type == "ner" else "sequence")
        elif params_of.get(model.id):
            flops = 6 * params_of[model.id] * f.max_seq_len * (seen + scored / 3)
        else:
            row["flops_unknown"] += 1
            continue
        row["flops"] += flops
    for row in by_task.values():
        row["device_hours"] = row["flops"] / flops_per_hour
    return [{"task": tid, **by_task[tid]} for tid in sorted(by_task)]


def node_disk(report: dict) -> dict:
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
    s = report["storage"]
    checkpoint = [r["parameters"] * (WEIGHT_BYTES + OPTIMIZER_BYTES) for r in report["pretrain_runs"]]
    text = (report["corpus"] or {}).get("tokens") or 0
    parts = {
        "head": {"corpus_shards": s["corpus_shards_bytes"], "corpus_text": text * BYTES_PER_TOKEN},
        "pretrain_node": {"checkpoints": s["checkpoint_weights_bytes"] + s["checkpoint_optimizer_bytes"],
                          "resume_checkpoints": sum(checkpoint) + max(checkpoint, default=0)},
        "finetune_node": {"checkpoint_weights": s["checkpoint_weights_bytes"]},
    }
    return {node: {**p, "system": NODE_SYSTEM_BYTES, "total": sum(p.values()) + NODE_SYSTEM_BYTES}
            for node, p in parts.items()}
