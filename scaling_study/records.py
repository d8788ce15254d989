"""The study's MLflow records: one run per plan node, written by the study driver (and finetune trials).

    from scaling_study.records import Recorder
    recorder = Recorder(Tracker(uri, "smoke"), study, plan, layout)
    recorder.open()                                  # the study's run, its spec, every run of the study read once
    recorder.repair(state)                           # finished nodes whose runs are missing get them back
    run_id = recorder.run_of(pretrain_node)          # found again on a re-run, never duplicated
    recorder.corpus_done(corpus_node, manifest_dict); recorder.pretrain_done(run_id, final)
    cells = recorder.finetune_cells(run_node, source) # {epochs level: run id} for a trial's config
    recorder.close(failed=False)                     # ends every run of the study still RUNNING

    # in a finetune trial (workers.finetune_trial): learning curves, then each cell's result
    finetune(..., logger=EpochLogger(uri, cells))    # epoch/dev_f1, epoch/train_loss, ... with step = epoch
    log_cell(uri, cells["3"], result, out_dir, datasets=task_datasets(task, data))

Runs nest as study -> pretraining run (or external model) -> finetune job, plus one run per corpus
build under the study. Every run carries its node id and factor levels as tags and params
(`tracking.Tracker.run_for`); a finetune job's run also gets the derived factors results.load
reads (`grid.cell_factors`: parameters, tokens, FLOPs, task type and domain). Only the driver
creates runs; a finetune trial logs its results into the run ids it was given (`log_cell`), which
is what keeps one run per node under Ray retries.

What a user sees in the MLflow UI: the experiment tagged as model development
(`mlflow.experimentKind`; with MLflow 3.17's UI the runs table opens at `ui_url`, which `scaling-study
ui` prints, rather than at the GenAI overview); run names
that start with the factors that vary in the study (`run_name`); the full recipe as params on
pretraining and finetune runs (`recipe_params`, and a finetune result's `config`), as transformers'
MLflow callback logs its training arguments; per-epoch dev F1, train loss and LR with `step` =
epoch on every finetune job (`EpochLogger`: charts of learning curves); the corpus build as the
dataset input of each pretraining run and the task's train/dev/test examples as those of each
finetune job (`mlflow.entities.DatasetInput`, what `mlflow.log_input` logs); and no run left
RUNNING once the driver ends (`Recorder.close`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path

from scaling_study.artifacts import DONE_FILE, Layout, read_done
from scaling_study.grid import Node, Plan, cell_factors
from scaling_study.metrics import mlflow_metrics, mlflow_tags
from scaling_study.spec import Study
from scaling_study.storage import is_uri
from scaling_study.tracking import KIND_TAG, Tracker, redact_uri

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3's UI opens an experiment on its GenAI overview unless this tag says otherwise (the value
is the UI's `ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`). MLflow 3.17's UI reads the kind from its
GenAI / Model training switch instead (the browser's `mlflow.workflowType`, default GenAI) unless the
page's URL carries `workflowType=machine_learning`: `ui_url` is that URL."""


def ui_url(uri: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs table (see `EXPERIMENT_KIND`)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


EPOCH_METRICS = ("dev_f1", "train_loss", "end_train_loss", "lr")
"""What `EpochLogger` logs per epoch, as `epoch/<name>` (apart from the result's own `dev_f1`, ...)."""


_NAME_PARTS = {
    "finetune": (("task", "{}"), ("epochs", "{} ep"), ("seed", "seed {}"), ("steps", "{} steps"),
                 ("model_size", "{}"), ("data_volume", "{}")),
    "pretrain": (("model_size", "{}"), ("data_volume", "{}"), ("total_steps", "{} steps")),
}


def varying_factors(plan: Plan) -> frozenset[str]:
    """The factors with more than one level among the plan's finetune jobs and pretraining runs."""
    levels: dict[str, set] = {}
    for node in [*plan.of_kind("finetune"), *plan.of_kind("pretrain")]:
        for key, value in node.factors.items():
            levels.setdefault(key, set()).add(str(value))
    return frozenset(k for k, v in levels.items() if len(v) > 1)


def run_name(node: Node, varying: frozenset[str] | set[str] = frozenset()) -> str:
    """A run's name, the factors that vary in the study first (the MLflow runs table cuts long names).

    A finetune job: task, epochs, seed, steps, size, volume (an external model's name last, in place
    of steps, size and volume), e.g. `bc5cdr_ner | 3 ep | seed 0 | 2000 steps | tiny | 10%`."""
    f = node.factors
    if node.kind == "corpus":
        return f"corpus | {f['data_volume']}"
    if node.kind not in _NAME_PARTS:
        return str(f.get("model", node.id))
    external = f.get("model_size") == "external"
    parts = [(key, form.format(f[key])) for key, form in _NAME_PARTS[node.kind]
             if f.get(key) is not None and not (external and key in ("model_size", "data_volume"))]
    if external:
        parts.append(("model", str(f.get("model"))))
    order = sorted(range(len(parts)), key=lambda i: (parts[i][0] not in varying, i))
    return " | ".join(parts[i][1] for i in order)


def recipe_params(study: Study, plan: Plan, node: Node) -> dict:
    """The recipe of a pretraining run (every `spec.PretrainRecipe` setting, its workers, its model
    shape and checkpoint levels) or what an external model is (source, revision, casing, size), as
    MLflow params beside the factor levels. A finetune job's recipe is its result's `config`."""
    from scaling_study.spec import PretrainRecipe

    if node.kind == "external":
        ext = next((m for m in study.spec.external_models if m.name == node.factors.get("model")), None)
        return {k: getattr(ext, k) for k in ("source", "revision", "do_lower_case", "num_parameters")} if ext else {}
    if node.kind != "pretrain":
        return {}
    p = study.spec.pretrain
    preset = study.presets[node.factors["model_size"]]
    out = {f.name: getattr(p, f.name) for f in dataclasses.fields(PretrainRecipe)}
    out.update({k: getattr(p, k) for k in ("num_workers", "gpus_per_worker", "cpus_per_worker")})
    out.update({k: getattr(preset, k) for k in ("num_layers", "hidden_size", "num_heads", "ffn_size",
                                                 "max_position_embeddings")})
    out["checkpoint_steps"] = ",".join(str(c.inputs["step"]) for c in plan.children(node.id))
    out["target_vocab_size"] = study.spec.corpus.vocab_size
    return out


def parent_run(tracker: Tracker, plan: Plan, node: Node, study_run: str, anchors: dict[str, str], *,
               varying: frozenset[str] = frozenset(), params=None) -> str:
    """The MLflow run a node's run nests under: study -> pretraining run (or external model) -> finetune job.

    `anchors` caches the runs of pretraining runs and external models by node id; a new one is named
    with `varying` (`run_name`) and gets `params(node)` as params."""
    if node.kind in ("corpus", "pretrain", "external"):
        return study_run
    if node.kind != "finetune":
        raise ValueError(node.kind)
    model = plan.nodes[plan.nodes[node.parents[0]].parents[0]]
    anchor = plan.nodes[model.parents[0]] if model.kind == "checkpoint" else model
    if anchor.id not in anchors:
        tags = {"corpus_id": anchor.parents[0]} if anchor.kind == "pretrain" else None
        anchors[anchor.id] = tracker.run_for(anchor.id, kind=anchor.kind, name=run_name(anchor, varying),
                                             factors=dict(anchor.factors), parent_run_id=study_run, tags=tags,
                                             params=params(anchor) if params else None)
    return anchors[anchor.id]


def log_cell(uri: str, run_id: str, result: dict, out: Path, *, datasets: list | None = None) -> None:
    """Log one finetune cell's result, recipe (`result["config"]`), inputs and artifacts to its MLflow
    run, and finish the run."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in mlflow_metrics(result).items()]
    tags = [RunTag(k, v) for k, v in mlflow_tags(result).items()]
    config = result.get("config")
    recipe = {k: v for k, v in (config or {}).items() if k != "device"}
    params = [Param(k, str(v)) for k, v in recipe.items()]  # logged again on repair: the same values
    client.log_batch(run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
    if datasets:
        client.log_inputs(run_id, datasets=datasets)
    for name in result.get("artifacts", []):
        path = out / name
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")


class EpochLogger:
    """`finetune(..., logger=)`: each epoch's record (`EPOCH_METRICS`) as `epoch/<name>` metrics with
    step = epoch, on the run of every cell whose epochs level the epoch is within (a 3-epoch job
    shows epochs 1-3 of its trajectory)."""

    def __init__(self, uri: str, cells: dict[str, str]):
        from mlflow.tracking import MlflowClient

        self.uri, self.cells = uri, {int(level): run for level, run in cells.items()}
        self.client = MlflowClient(tracking_uri=uri)

    def __call__(self, record: dict) -> None:
        from mlflow.entities import Metric

        from scaling_study.tracking import tracking_calls

        epoch, now = int(record["epoch"]), int(time.time() * 1000)
        metrics = [Metric(f"epoch/{k}", float(record[k]), now, epoch) for k in EPOCH_METRICS
                   if isinstance(record.get(k), (int, float))]
        with tracking_calls(self.uri):
            for level, run_id in self.cells.items():
                if epoch <= level and metrics:
                    self.client.log_batch(run_id, metrics=metrics, synchronous=True)


def _dataset(name: str, digest: str, location: str, profile: dict, context: str):
    """An MLflow dataset input (`mlflow.log_input`'s entity) of a file or folder in storage."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    uri = location if is_uri(location) else Path(location).resolve().as_uri()
    scheme = uri.split("://", 1)[0]
    source_type = {"file": "local", "s3": "s3", "gs": "gs"}.get(scheme, scheme)
    dataset = Dataset(name=name, digest=digest[:16], source_type=source_type, source=json.dumps({"uri": uri}),
                      profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def task_datasets(task, data) -> list:
    """A task's train, dev and test examples as used (after caps), one dataset input each; the digest
    hashes the examples themselves."""
    out = []
    for split, examples in data.splits.items():
        digest = hashlib.sha256(json.dumps(examples, sort_keys=True, default=str).encode()).hexdigest()
        profile = {"num_rows": len(examples), "num_rows_in_file": data.full_sizes.get(split), "task": task.id,
                   "task_version": task.version, "type": task.type}
        out.append(_dataset(f"{task.id}/{split}", digest, str(data.files.get(split, "")), profile, split))
    return out


def corpus_dataset(corpus: Node, location: str, manifest: dict):
    """A corpus build (its folder in storage) as the dataset input of a pretraining run."""
    keys = ("documents", "tokens", "sequences", "seq_len", "vocab_size", "tokenizer_hash", "dropped_tokens")
    profile = {"volume": corpus.factors.get("data_volume"), **{k: manifest.get(k) for k in keys if k in manifest}}
    name = f"{corpus.inputs.get('name', 'corpus')}/{corpus.factors.get('data_volume')}"
    return _dataset(name, corpus.id.split("-", 1)[-1], location, profile, "train")


def log_corpus(tracker: Tracker, run_id: str, manifest: dict) -> None:
    """A corpus build's counts and tokenizer hash, from its manifest; finishes the run."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(manifest[k]), now, 0) for k in ("documents", "tokens", "sequences", "vocab_size")
               if isinstance(manifest.get(k), (int, float))]
    tracker.client.log_batch(run_id, metrics=metrics,
                             params=[Param("tokenizer_hash", str(manifest.get("tokenizer_hash", "")))])
    tracker.client.set_terminated(run_id, "FINISHED")


def log_final(tracker: Tracker, run_id: str, final: dict) -> None:
    """A pretraining run's checkpoint locations as tags (`checkpoint.00000500`); finishes the run."""
    for step, folder in (final.get("checkpoints") or {}).items():
        tracker.client.set_tag(run_id, f"checkpoint.{int(step):08d}",
                               folder if is_uri(folder) else Path(folder).resolve().as_uri())
    tracker.client.set_terminated(run_id, "FINISHED")


class Recorder:
    """The MLflow runs of one study's nodes (see the module docstring)."""

    def __init__(self, tracker: Tracker, study: Study, plan: Plan, layout: Layout):
        self.tracker, self.study, self.plan, self.layout = tracker, study, plan, layout
        self.study_run = ""
        self.varying = varying_factors(plan) if plan is not None else frozenset()
        self._anchors: dict[str, str] = {}
        self._manifests: dict[str, dict] = {}

    @property
    def uri(self) -> str:
        return self.tracker.uri

    def open(self) -> str:
        """Read every run of the study once, then find or create the study's run and log the spec once
        (each further spec of an extended study too, as specs/<fingerprint>.yaml)."""
        client = self.tracker.client
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(self.tracker.experiment_id, key, value)
        self.tracker.load_runs()
        name = self.study.spec.name
        self.study_run = self.tracker.run_for(f"study-{name}", kind="study", name=name)
        logged = {a.path for a in client.list_artifacts(self.study_run)}
        if "spec.yaml" not in logged:
            self._log_spec("spec.yaml", Path(self.study.file).read_text(encoding="utf-8"))
        from scaling_study import studies

        recorded = studies.specs(self.layout)
        if len(recorded) > 1:
            logged |= {a.path for a in client.list_artifacts(self.study_run, "specs")}
            for spec in recorded:
                text = self.layout.store.read_text(f"{studies.SPECS}/{spec['fingerprint']}.yaml")
                if text is not None and f"specs/{spec['fingerprint']}.yaml" not in logged:
                    self._log_spec(f"specs/{spec['fingerprint']}.yaml", text)
            client.set_tag(self.study_run, "spec_fingerprints", ",".join(s["fingerprint"] for s in recorded))
        return self.study_run

    def _log_spec(self, rel: str, text: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(rel).name
            # a tracking.uri written with its password stays in the user's file, not in MLflow
            path.write_text(redact_uri(text), encoding="utf-8")
            self.tracker.client.log_artifact(self.study_run, str(path), str(Path(rel).parent) if "/" in rel else None)

    def log_study_file(self, path: Path) -> None:
        """A file of the whole study (adaptive seeds' decisions) as an artifact of the study's run."""
        self.tracker.client.log_artifact(self.study_run, str(path))

    def close(self, *, failed: bool) -> None:
        """End the study's run, and every run of the study still RUNNING: an external model's (it has
        nothing of its own to finish) as FINISHED, any other (the driver ends before its node did) KILLED."""
        client = self.tracker.client
        for run in self.tracker.search("attributes.status = 'RUNNING'"):
            if run.info.run_id != self.study_run:
                external = run.data.tags.get(KIND_TAG) == "external"
                client.set_terminated(run.info.run_id, "FINISHED" if external else "KILLED")
        client.set_terminated(self.study_run, "FAILED" if failed else "FINISHED")

    def run_of(self, node: Node, *, tags: dict | None = None) -> str:
        """The node's run: found (by its node id) or created under its parent."""
        factors = self.cell_factors(node) if node.kind == "finetune" else dict(node.factors)
        if node.kind == "pretrain":
            tags = {"corpus_id": node.parents[0], **(tags or {})}
        parent = parent_run(self.tracker, self.plan, node, self.study_run, self._anchors, varying=self.varying,
                            params=self.params)
        run_id = self.tracker.run_for(node.id, kind=node.kind, name=run_name(node, self.varying), factors=factors,
                                      tags=tags, parent_run_id=parent, params=self.params(node))
        if node.kind == "pretrain":
            self._link_corpus(node, run_id)
        return run_id

    def params(self, node: Node) -> dict:
        return recipe_params(self.study, self.plan, node)

    def _link_corpus(self, node: Node, run_id: str) -> None:
        """The corpus build as a pretraining run's dataset input, with its real vocabulary, once built."""
        corpus = self.plan.nodes[node.parents[0]]
        manifest = self._manifest(corpus)
        if manifest:
            dataset = corpus_dataset(corpus, self.layout.location(self.plan, corpus), manifest)
            self.tracker.client.log_inputs(run_id, datasets=[dataset])
            self.tracker.client.log_param(run_id, "vocab_size", manifest.get("vocab_size"))

    def _manifest(self, corpus: Node) -> dict:
        if not self._manifests.get(corpus.id):
            found = self.layout.manifest(self.plan, corpus)
            self._manifests[corpus.id] = found.to_dict() if found else {}
        return self._manifests[corpus.id]

    def cell_factors(self, cell: Node) -> dict:
        """A finetune cell's factors plus the derived ones results.load reads (grid.cell_factors)."""
        model = self.plan.nodes[self.plan.nodes[cell.parents[0]].parents[0]]
        manifest = {}
        if model.kind == "checkpoint":  # the real vocabulary and token count are the corpus build's
            manifest = self._manifest(self.plan.nodes[self.plan.nodes[model.parents[0]].parents[0]])
        return {**cell.factors, **cell_factors(self.study, self.plan, cell, vocab_size=manifest.get("vocab_size"),
                                               volume_tokens=manifest.get("tokens"))}

    def corpus_done(self, node: Node, manifest: dict) -> None:
        log_corpus(self.tracker, self.run_of(node), manifest)
        self._manifests[node.id] = manifest
        for pretrain in self.plan.children(node.id):  # their runs exist: the driver made them at launch
            run = self.tracker.find_run(pretrain.id)
            if run is not None:
                self._link_corpus(pretrain, run.info.run_id)

    def pretrain_done(self, run_id: str, final: dict) -> None:
        log_final(self.tracker, run_id, final)

    def finetune_cells(self, run_node: Node, source: str) -> dict[str, str]:
        """{epochs level: run id} of a finetune run's cells, created (or found) before its trial starts."""
        model = self.plan.nodes[run_node.parents[0]]
        tags = {"finetune_run_id": run_node.id, "model_id": model.id, "model_source": source}
        return {str(cell.inputs["epochs"]): self.run_of(cell, tags=tags) for cell in self.plan.children(run_node.id)}

    def mark_failed(self, node_id: str) -> None:
        """Best effort: a failed node's run says FAILED (a re-run finds and reuses it either way).

        A run that FINISHED before keeps its status and results: they were computed from inputs that
        were sound then (a node is redone when its files were damaged since, and may fail again)."""
        with contextlib.suppress(Exception):
            run = self.tracker.find_run(node_id)
            if run is not None and run.info.status != "FINISHED":
                self.tracker.client.set_terminated(run.info.run_id, "FAILED")

    def _finished(self, node_id: str) -> bool:
        run = self.tracker.find_run(node_id)
        return run is not None and run.info.status == "FINISHED"

    def repair(self, state) -> None:
        """Finished nodes whose MLflow runs are missing or unfinished get them back from storage
        (a lost tracking server, a killed driver): the runs come from one search of the study."""
        plan, layout = self.plan, self.layout
        for node in plan.of_kind("corpus"):
            if state.state[node.id] == "done" and not self._finished(node.id):
                log_corpus(self.tracker, self.run_of(node), layout.manifest(plan, node).to_dict())
        for node in plan.of_kind("pretrain"):  # a driver killed after the last checkpoint leaves it RUNNING
            if state.state[node.id] == "done" and not self._finished(node.id):
                checkpoints = {ck.inputs["step"]: layout.location(plan, ck) for ck in plan.children(node.id)}
                log_final(self.tracker, self.run_of(node), {"checkpoints": checkpoints})
        for run_node in plan.of_kind("finetune_run"):
            if state.state[run_node.id] == "done":
                self._repair_finetune(run_node)

    def _repair_finetune(self, run_node: Node) -> None:
        saved = read_done(self.layout.read(self.plan, run_node, DONE_FILE))
        for result in saved["results"] if saved else []:
            cell = next(c for c in self.plan.children(run_node.id) if c.inputs["epochs"] == result["epochs"])
            if self._finished(cell.id):
                continue
            run_id = self.run_of(cell)
            if self.layout.store.remote:  # its artifacts, for MLflow
                self.layout.store.download(self.layout.rel(self.plan, run_node))
            log_cell(self.uri, run_id, result, self.layout.node(self.plan, run_node))
