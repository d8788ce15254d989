"""Expand a study spec into its plan: a DAG of nodes with content-addressed ids.

    from scaling_study.spec import load_spec
    from scaling_study.grid import expand
    plan = expand(load_spec("experiments/smoke.yaml"))
    plan.of_kind("finetune")          # one node per (model, task, epochs level, seed) cell
    plan.downstream(node_id)          # everything that depends on a node

`expand` is pure: the same spec gives the same plan, ids included, on any machine. Node kinds, in
dependency order:

- `corpus`: one build per data volume (tokenizer, tokenised and packed Parquet shards).
- `pretrain`: one MLM training run, per size x volume (`trajectory`) or per size x volume x steps
  level (`independent`).
- `checkpoint`: the model after a number of steps of a pretraining run; one per steps level, plus
  step 0 (the initial weights: the control arm) with `pretrain.random_init`.
- `external`: a published model (Hugging Face id or local folder).
- `finetune_run`: one finetuning run of a checkpoint or external model on a task with a seed
  (`trajectory`: over the largest epochs level; `independent`: one per epochs level). With adaptive
  seeds the plan holds every seed up to the rule's `max`, with the ids a fixed list of them has;
  the study driver runs only those the rule asks for (`scaling_study.adaptive`).
- `finetune`: one result cell, the finetune run's model after an epochs level, scored on the test split.

An id is `<kind prefix>-<16 hex>` of the SHA-256 of the node's inputs as canonical JSON, parents'
ids included. The inputs are exactly what determines the node's output: resources (workers, GPUs,
gradient accumulation), tracking and storage are left out, so moving a study from a laptop to a
cluster keeps every id; any level's position in the YAML is left out (levels are sets). A
`pretrain` node hashes its schedule length but not its set of checkpoint levels, so adding a level
adds checkpoint nodes without renaming the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from scaling_study.spec import Study

KINDS = ("corpus", "pretrain", "checkpoint", "external", "finetune_run", "finetune")
_PREFIX = {"corpus": "cb", "pretrain": "pt", "checkpoint": "ck", "external": "ex", "finetune_run": "fr",
           "finetune": "ft"}


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def node_id(kind: str, inputs: dict, parents: tuple[str, ...]) -> str:
    payload = canonical_json({"kind": kind, "inputs": inputs, "parents": sorted(parents)})
    return f"{_PREFIX[kind]}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


@dataclasses.dataclass(frozen=True)
class Node:
    """One unit of work or result in the plan."""

    id: str
    kind: str
    parents: tuple[str, ...]
    inputs: dict
    """Exactly what the id hashes (besides the kind and the parents' ids)."""
    factors: dict
    """The factor levels this node belongs to (model, model_size, data_volume, steps, task, epochs,
    seed), for tags, tables and grouping; not hashed."""

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "parents": list(self.parents)}


@dataclasses.dataclass(frozen=True)
class Plan:
    study: str
    nodes: dict[str, Node]
    """In dependency order: every node comes after its parents."""

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def children(self, nid: str) -> list[Node]:
        return [n for n in self.nodes.values() if nid in n.parents]

    def downstream(self, nid: str) -> set[str]:
        """Ids of every node that depends on `nid`, directly or not (not `nid` itself)."""
        out: set[str] = set()
        frontier = [nid]
        while frontier:
            current = frontier.pop()
            for child in self.children(current):
                if child.id not in out:
                    out.add(child.id)
                    frontier.append(child.id)
        return out

    def to_dict(self) -> dict:
        return {"study": self.study, "nodes": [n.to_dict() for n in self.nodes.values()]}


CORPUS_BUILDER = 2
"""Version of the corpus builder, part of every corpus node's id: bump it when the same inputs would
build other subsets, tokenizers or rows (2: one Ray Data build for all volumes, content-hash keys,
bounded tokenizer samples, packing per piece), so that old builds are rebuilt, never mixed in."""


def _corpus_inputs(study: Study) -> dict:
    c = study.spec.corpus
    return {
        "name": c.name, "version": c.version, "sources": sorted(c.paths) + sorted(c.urls),
        "format": c.format, "text_field": c.text_field, "tokenizer_sample": c.tokenizer_sample,
        "vocab_size": c.vocab_size, "cased": c.cased, "min_frequency": c.min_frequency, "seed": c.seed,
        "seq_len": study.spec.pretrain.seq_len, "builder": CORPUS_BUILDER,
    }


def _pretrain_inputs(study: Study) -> dict:
    p = study.spec.pretrain
    keys = ("batch_size", "seq_len", "lr", "schedule", "warmup_fraction", "min_lr_ratio", "weight_decay",
            "mask_rate", "optimizer", "betas", "eps", "grad_clip", "precision", "seed")
    out = {k: getattr(p, k) for k in keys}
    if p.schedule == "wsd":
        out["decay_fraction"] = p.decay_fraction
    return out


def _finetune_inputs(study: Study) -> dict:
    f = study.spec.finetune
    keys = ("lr", "batch_size", "max_seq_len", "warmup_fraction", "weight_decay", "precision")
    out = {k: getattr(f, k) for k in keys}
    if f.batches != "random":  # named only when set, so the ids of runs from before the field stay
        out["batches"] = f.batches
    return out


def _task_inputs(study: Study, tid: str) -> dict:
    info, caps = study.tasks[tid], study.caps[tid]
    return {"id": tid, "version": info.version, **dataclasses.asdict(caps)}


def expand(study: Study) -> Plan:
    """The plan of a validated study (see the module docstring)."""
    spec = study.spec
    nodes: dict[str, Node] = {}

    def add(kind: str, inputs: dict, parents: tuple[str, ...], factors: dict) -> Node:
        node = Node(node_id(kind, inputs, parents), kind, tuple(sorted(parents)), inputs, factors)
        nodes.setdefault(node.id, node)
        return node

    models: list[Node] = []  # checkpoints and external models, the things finetuned
    if spec.model_sizes:
        corpus = _corpus_inputs(study)
        train = _pretrain_inputs(study)
        steps = spec.pretrain.steps
        schedules = [steps] if spec.pretrain.protocol == "trajectory" else [[s] for s in steps]
        control = [0] if spec.pretrain.random_init else []  # the step-0 checkpoint, of the first run only
        for volume in study.volumes:
            build = add("corpus", {**corpus, "volume": volume.key()}, (), {"data_volume": volume.label})
            for size in sorted(study.presets):
                preset = study.presets[size]
                arch = {"num_layers": preset.num_layers, "hidden_size": preset.hidden_size,
                        "num_heads": preset.num_heads, "ffn_size": preset.ffn_size,
                        "max_position_embeddings": preset.max_position_embeddings,
                        "vocab_size": spec.corpus.vocab_size}
                for i, levels in enumerate(schedules):
                    factors = {"model_size": size, "data_volume": volume.label}
                    run = add("pretrain", {"arch": arch, "train": train, "total_steps": levels[-1]}, (build.id,),
                              {**factors, "total_steps": levels[-1]})
                    for step in (control if i == 0 else []) + levels:
                        models.append(add("checkpoint", {"step": step}, (run.id,),
                                          {**factors, "model": f"{size}/{volume.label}/{step}", "steps": step}))
    for ext in sorted(spec.external_models, key=lambda m: m.name):
        models.append(add("external", {"source": ext.source, "revision": ext.revision}, (),
                          {"model": ext.name, "model_size": "external"}))

    finetune = _finetune_inputs(study)
    epochs = spec.finetune.epochs
    schedules = [epochs] if spec.finetune.protocol == "trajectory" else [[e] for e in epochs]
    for model in models:
        for tid in study.tasks:
            task = _task_inputs(study, tid)
            for seed in spec.finetune.seed_levels:  # an adaptive rule's: all max of them
                for levels in schedules:
                    factors = {**{k: v for k, v in model.factors.items() if k != "total_steps"},
                               "task": tid, "seed": seed}
                    run = add("finetune_run", {"task": task, "train": finetune, "seed": seed,
                                               "total_epochs": levels[-1]}, (model.id,),
                              {**factors, "total_epochs": levels[-1]})
                    for level in levels:
                        add("finetune", {"epochs": level}, (run.id,), {**factors, "epochs": level})
    return Plan(study=spec.name, nodes=nodes)


def iter_cells(plan: Plan) -> Iterator[tuple[Node, Node, Node]]:
    """(finetune cell, its finetune run, the model it finetunes) for every result cell."""
    for cell in plan.of_kind("finetune"):
        run = plan.nodes[cell.parents[0]]
        yield cell, run, plan.nodes[run.parents[0]]


def cell_factors(study: Study, plan: Plan, cell: Node, *, vocab_size: int | None = None,
                 volume_tokens: int | None = None) -> dict:
    """The derived factors of a finetune cell, logged with its MLflow run so results need not guess.

    `parameters` (exact, of the pretrained `BertForMaskedLM`), `pretrain_tokens` and
    `pretrain_flops` up to the checkpoint, `tokens` of its data volume, `task_type`, `domain`.
    `vocab_size` and `volume_tokens` come from the corpus build's manifest (the real vocabulary
    can be smaller than the spec's); without them the corpus-dependent factors are left out.
    """
    from scaling_study.models import pretrain_factors

    task = study.tasks[cell.factors["task"]]
    out: dict = {"task_type": task.type, "domain": task.domain}
    model = plan.nodes[plan.nodes[cell.parents[0]].parents[0]]
    if model.kind == "external":
        ext = next((m for m in study.spec.external_models if m.name == model.factors["model"]), None)
        if ext is not None and ext.num_parameters:
            out["parameters"] = int(ext.num_parameters)
        return out
    preset = study.presets[model.factors["model_size"]]
    factors = pretrain_factors(preset, vocab_size, model.inputs["step"], study.spec.pretrain)
    out["pretrain_tokens"] = factors.tokens
    if volume_tokens is not None:
        out["tokens"] = int(volume_tokens)
    if vocab_size is not None:
        out["parameters"] = factors.parameters
        out["pretrain_flops"] = factors.flops
    return out
