"""The study's MLflow records: one run per plan node, written by the study driver (and finetune trials).

    from scaling_study.records import Recorder
    recorder = Recorder(Tracker(uri, "smoke"), study, plan, layout)
    recorder.open()                                  # the study's run, its spec, every run of the study read once
    recorder.repair(state)                           # finished nodes whose runs are missing get them back
    run_id = recorder.run_of(pretrain_node)          # found again on a re-run, never duplicated
    recorder.corpus_done(corpus_node, manifest_dict); recorder.pretrain_done(run_id, final)
    cells = recorder.finetune_cells(run_node, source) # {epochs level: run id} for a trial's config
    recorder.close(failed=False)

Runs nest as study -> pretraining run (or external model) -> finetune job, plus one run per corpus
build under the study. Every run carries its node id and factor levels as tags and params
(`tracking.Tracker.run_for`); a finetune job's run also gets the derived factors results.load
reads (`grid.cell_factors`: parameters, tokens, FLOPs, task type and domain). Only the driver
creates runs; a finetune trial logs its results into the run ids it was given (`log_cell`), which
is what keeps one run per node under Ray retries.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

from scaling_study.artifacts import DONE_FILE, Layout, read_done
from scaling_study.grid import Node, Plan, cell_factors
from scaling_study.metrics import mlflow_metrics, mlflow_tags
from scaling_study.spec import Study
from scaling_study.storage import is_uri
from scaling_study.tracking import Tracker, redact_uri


def run_name(node: Node) -> str:
    f = node.factors
    if node.kind == "finetune":
        return f"{f.get('model')} | {f['task']} | {f['epochs']} ep | seed {f['seed']}"
    if node.kind == "pretrain":
        return f"{f['model_size']} | {f['data_volume']} | {f['total_steps']} steps"
    if node.kind == "corpus":
        return f"corpus | {f['data_volume']}"
    return str(f.get("model", node.id))


def parent_run(tracker: Tracker, plan: Plan, node: Node, study_run: str, anchors: dict[str, str]) -> str:
    """The MLflow run a node's run nests under: study -> pretraining run (or external model) -> finetune job.

    `anchors` caches the runs of pretraining runs and external models by node id."""
    if node.kind in ("corpus", "pretrain", "external"):
        return study_run
    if node.kind != "finetune":
        raise ValueError(node.kind)
    model = plan.nodes[plan.nodes[node.parents[0]].parents[0]]
    anchor = plan.nodes[model.parents[0]] if model.kind == "checkpoint" else model
    if anchor.id not in anchors:
        tags = {"corpus_id": anchor.parents[0]} if anchor.kind == "pretrain" else None
        anchors[anchor.id] = tracker.run_for(anchor.id, kind=anchor.kind, name=run_name(anchor),
                                             factors=dict(anchor.factors), parent_run_id=study_run, tags=tags)
    return anchors[anchor.id]


def log_cell(uri: str, run_id: str, result: dict, out: Path) -> None:
    """Log one finetune cell's result and artifacts to its MLflow run and finish the run."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in mlflow_metrics(result).items()]
    tags = [RunTag(k, v) for k, v in mlflow_tags(result).items()]
    client.log_batch(run_id, metrics=metrics, tags=tags, synchronous=True)
    for name in result.get("artifacts", []):
        path = out / name
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")


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
        self._anchors: dict[str, str] = {}
        self._manifests: dict[str, dict] = {}

    @property
    def uri(self) -> str:
        return self.tracker.uri

    def open(self) -> str:
        """Read every run of the study once, then find or create the study's run and log the spec once."""
        self.tracker.load_runs()
        name = self.study.spec.name
        self.study_run = self.tracker.run_for(f"study-{name}", kind="study", name=name)
        if not any(a.path == "spec.yaml" for a in self.tracker.client.list_artifacts(self.study_run)):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "spec.yaml"
                # a tracking.uri written with its password stays in the user's file, not in MLflow
                path.write_text(redact_uri(Path(self.study.file).read_text(encoding="utf-8")), encoding="utf-8")
                self.tracker.client.log_artifact(self.study_run, str(path))
        return self.study_run

    def log_study_file(self, path: Path) -> None:
        """A file of the whole study (adaptive seeds' decisions) as an artifact of the study's run."""
        self.tracker.client.log_artifact(self.study_run, str(path))

    def close(self, *, failed: bool) -> None:
        self.tracker.client.set_terminated(self.study_run, "FAILED" if failed else "FINISHED")

    def run_of(self, node: Node, *, tags: dict | None = None) -> str:
        """The node's run: found (by its node id) or created under its parent."""
        factors = self.cell_factors(node) if node.kind == "finetune" else dict(node.factors)
        if node.kind == "pretrain":
            tags = {"corpus_id": node.parents[0], **(tags or {})}
        return self.tracker.run_for(node.id, kind=node.kind, name=run_name(node), factors=factors, tags=tags,
                                    parent_run_id=parent_run(self.tracker, self.plan, node, self.study_run,
                                                             self._anchors))

    def cell_factors(self, cell: Node) -> dict:
        """A finetune cell's factors plus the derived ones results.load reads (grid.cell_factors)."""
        model = self.plan.nodes[self.plan.nodes[cell.parents[0]].parents[0]]
        manifest = {}
        if model.kind == "checkpoint":  # the real vocabulary and token count are the corpus build's
            corpus = self.plan.nodes[self.plan.nodes[model.parents[0]].parents[0]]
            if corpus.id not in self._manifests:
                found = self.layout.manifest(self.plan, corpus)
                self._manifests[corpus.id] = found.to_dict() if found else {}
            manifest = self._manifests[corpus.id]
        return {**cell.factors, **cell_factors(self.study, self.plan, cell, vocab_size=manifest.get("vocab_size"),
                                               volume_tokens=manifest.get("tokens"))}

    def corpus_done(self, node: Node, manifest: dict) -> None:
        log_corpus(self.tracker, self.run_of(node), manifest)

    def pretrain_done(self, run_id: str, final: dict) -> None:
        log_final(self.tracker, run_id, final)

    def finetune_cells(self, run_node: Node, source: str) -> dict[str, str]:
        """{epochs level: run id} of a finetune run's cells, created (or found) before its trial starts."""
        model = self.plan.nodes[run_node.parents[0]]
        tags = {"finetune_run_id": run_node.id, "model_id": model.id, "model_source": source}
        return {str(cell.inputs["epochs"]): self.run_of(cell, tags=tags) for cell in self.plan.children(run_node.id)}

    def mark_failed(self, node_id: str) -> None:
        """Best effort: a failed node's run says FAILED (a re-run finds and reuses it either way)."""
        with contextlib.suppress(Exception):
            run = self.tracker.find_run(node_id)
            if run is not None:
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
