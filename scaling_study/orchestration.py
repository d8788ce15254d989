"""Run a study's plan on Ray, tracked in MLflow, idempotently.

    from scaling_study.orchestration import run_study
    summary = run_study(load_spec("experiments/smoke.yaml"))   # local Ray + local MLflow server
    summary.ok, summary.failed

    scaling-study run experiments/smoke.yaml                     # the same, with a live view of the grid
    scaling-study run experiments/x.yaml --address ray://head:10001   # an existing Ray cluster

What runs where: corpus builds are Ray tasks; each pretraining run is a Ray task that drives a Ray
Train `TorchTrainer` (it starts as soon as its corpus build is done); finetune runs are Ray Tune
trials, released by `ReadyFinetunes` (a Tune search algorithm) as soon as the checkpoint they
finetune exists, not after all pretraining ends, with the spec's per-job resources and concurrency.

Storage is the source of truth for what is done (`<storage.root>/<study>/`):

    corpus/<cb-id>/manifest.json            a finished corpus build
    pretrain/<pt-id>/checkpoints/step-N/    a finished checkpoint (written atomically)
    finetune/<fr-id>/DONE.json              a finished finetune run, written after MLflow has its results
    logs/<node-id>.log                      the traceback of a failed node
    mlflow/                                 the embedded MLflow server's sqlite db and artifacts

`storage.root` may be a URI (`s3://bucket/prefix`, `gs://...`, `file:///...`): every node then
works in its machine's local mirror of the study folder and uploads its output when finished,
the marker file (manifest.json, a checkpoint's trainer_state.pt, DONE.json) last; inputs
(corpus shards, checkpoints) are downloaded to the mirror first (`scaling_study.storage`). The
embedded MLflow server's sqlite db stays on the driver's machine, in its mirror: on a cluster, set
`tracking.uri`. While it runs, the driver exports progress metrics through Ray
(`scaling_study.progress`, for the Grafana dashboards in `dashboards/`).

A re-run skips every finished node, resumes pretraining runs from their last checkpoint, and
redoes unfinished finetune runs. MLflow gets one run per node id (corpus, pretrain, external,
finetune), created by this driver only and found again by its `node_id` tag on a re-run;
a finished node whose MLflow run is missing (a lost tracking server) is logged again from storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ray.tune.search import Searcher

from scaling_study import faults
from scaling_study._env import QUIET_ENV
from scaling_study.errors import UserError
from scaling_study.grid import Node, Plan, cell_factors, expand
from scaling_study.progress import StudyProgress, throughput_logger
from scaling_study.spec import Study, expand_env
from scaling_study.storage import SCHEMES, Store, check_root, is_uri, local_copy
from scaling_study.tracking import LocalMlflowServer, Tracker, check_server, redact_uri, tracking_calls

DONE_FILE = "DONE.json"
FINAL_FILE = "final.json"


# ----------------------------------------------------------------------------------- storage


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each node's output lives under the study's folder.

    `store` is that folder in storage (a local folder, or a URI: `scaling_study.storage`);
    `root` is where this machine sees it: the folder itself, or its local mirror for a URI.
    """

    root: Path
    store: Store

    @classmethod
    def of(cls, study: Study) -> Layout:
        root = expand_env(study.spec.storage.root)
        problem = check_root(root)
        if problem:  # the spec checks it too; ${VAR} may expand to something else now
            raise UserError(f"{study.file}: storage.root: {problem}; got {root!r}; allowed: a local folder or a "
                            f"URI of scheme {', '.join(s + '://' for s in SCHEMES)}")
        if is_uri(root):
            store = Store(f"{root.rstrip('/')}/{study.spec.name}")
            return cls(store.local, store)  # object stores have no links to check
        base = Path(root).expanduser().resolve()
        layout = cls(base / study.spec.name, Store(base / study.spec.name))
        layout.check_contained(base, study.file)
        return layout

    def rel(self, plan: Plan, node: Node) -> str:
        """A node's folder, relative to the study's folder."""
        return str(self.node(plan, node).relative_to(self.root))

    def check_contained(self, base: Path, file: str) -> None:
        """Refuse a study folder (or a folder in it, two levels down) that leads outside `base` by a link.

        The study name is a plain name (spec validation) and node folders are hashes, so only a
        symbolic link placed in the storage root could send a study's writes elsewhere.
        """
        inside = self.root.resolve()
        if not inside.is_relative_to(base) or inside == base:
            raise UserError(f"{file}: storage: {self.root} leads to {inside}, outside the storage root {base}; "
                            "allowed: a real folder inside it (set storage.root to store a study elsewhere)")
        for path in [*self.root.glob("*"), *self.root.glob("*/*")] if inside.is_dir() else []:
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                raise UserError(f"{file}: storage: {path} is a link to {path.resolve()}, outside the study folder "
                                f"{self.root}; allowed: folders inside it")

    def node(self, plan: Plan, node: Node) -> Path:
        from scaling_study.pretrain import checkpoint_dir

        if node.kind == "checkpoint":
            return checkpoint_dir(self.root / "pretrain" / node.parents[0], node.inputs["step"])
        folder = {"corpus": "corpus", "pretrain": "pretrain", "finetune_run": "finetune"}[node.kind]
        return self.root / folder / node.id

    def location(self, plan: Plan, node: Node) -> str:
        """A node's folder in storage: what Ray tasks get (a path, or a URI they download from)."""
        return self.store.url(self.rel(plan, node))

    def has(self, plan: Plan, node: Node, name: str) -> bool:
        return self.store.is_file(f"{self.rel(plan, node)}/{name}")

    def log(self, node_id: str) -> str:
        """The node's log in storage (a path, or a URI)."""
        return self.store.url(f"logs/{node_id}.log")

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"


def node_done(layout: Layout, plan: Plan, node: Node) -> bool:
    """Whether storage holds a node's finished output."""
    from scaling_study.corpus import FORMAT, MANIFEST, read_manifest
    from scaling_study.pretrain import STATE_FILE

    if node.kind == "corpus":
        if not layout.store.remote:
            return read_manifest(layout.node(plan, node)) is not None
        text = layout.store.read_text(f"{layout.rel(plan, node)}/{MANIFEST}")  # uploaded last: the marker
        return text is not None and json.loads(text).get("format") == FORMAT
    if node.kind == "checkpoint":
        return layout.has(plan, node, STATE_FILE)
    if node.kind == "pretrain":
        return all(node_done(layout, plan, ck) for ck in plan.children(node.id))
    if node.kind == "external":
        return True
    if node.kind == "finetune_run":
        return layout.has(plan, node, DONE_FILE)
    return node_done(layout, plan, plan.nodes[node.parents[0]])  # a finetune cell: its run


def model_source(study: Study, layout: Layout, plan: Plan, model: Node) -> str:
    """What a finetune run loads: a checkpoint folder, or an external model's folder or hub id."""
    if model.kind == "checkpoint":
        return layout.location(plan, model)
    source = model.inputs["source"]
    if source.startswith((".", "/", "~", "$")):
        return str(study.resolve_path(source))
    return source


# ----------------------------------------------------------------------------------- state and view


STATES = ("pending", "running", "done", "failed", "blocked")
SHOWN = ("corpus", "pretrain", "checkpoint", "finetune")


@dataclasses.dataclass
class Failure:
    node: str
    kind: str
    what: str
    reason: str
    log: str


class StudyState:
    """Every node's state, shared by the driver, the Tune searcher and the live view (one lock)."""

    def __init__(self, plan: Plan, weights: dict[str, float]):
        self.plan, self.weights = plan, weights
        self.state = {nid: "pending" for nid in plan.nodes}
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.done_at_start = 0.0

    def set(self, nid: str, state: str) -> None:
        with self.lock:
            self.state[nid] = state

    def fail(self, node: Node, reason: str, log: str | None, *, state: str = "failed") -> None:
        what = " ".join(f"{k}={v}" for k, v in node.factors.items())
        with self.lock:
            self.state[node.id] = state
            self.failures.append(Failure(node.id, node.kind, what, reason, str(log) if log else ""))

    def tracking_lost(self, node: Node | None, reason: str, *, what: str = "tracking") -> None:
        """A node's output is done (or the study ended) but MLflow did not take its record: a re-run logs it.

        Also, with `what`, a failure no node can be named for (the summary lists it; the exit is 1).
        """
        with self.lock:
            self.failures.append(Failure(node.id if node else self.plan.study, node.kind if node else "study",
                                         what, reason, ""))

    def counts(self) -> dict[str, dict[str, int]]:
        out = {kind: dict.fromkeys(STATES, 0) for kind in SHOWN}
        with self.lock:
            for nid, state in self.state.items():
                kind = self.plan.nodes[nid].kind
                if kind in out:
                    out[kind][state] += 1
        return out

    def eta_seconds(self) -> float | None:
        """Remaining work at the rate of this invocation so far (work = estimated FLOPs)."""
        with self.lock:
            done = sum(w for nid, w in self.weights.items() if self.state[nid] == "done")
            left = sum(w for nid, w in self.weights.items() if self.state[nid] in ("pending", "running"))
        done -= self.done_at_start
        elapsed = time.monotonic() - self.started
        return left * elapsed / done if done > 0 else None

    def table(self):
        from rich.table import Table

        eta = self.eta_seconds()
        elapsed = time.monotonic() - self.started
        title = f"{self.plan.study}: {elapsed / 60:.1f} min" + (f", ETA {eta / 60:.1f} min" if eta is not None else "")
        table = Table(title=title, title_justify="left")
        table.add_column("nodes")
        for state in STATES:
            table.add_column(state, justify="right")
        for kind, row in self.counts().items():
            table.add_row(kind, *(str(row[s]) for s in STATES))
        return table


def _weights(study: Study, plan: Plan) -> dict[str, float]:
    """Estimated FLOPs per node, for the ETA; finetune cells share their run's."""
    from scaling_study.costs import estimate

    report = estimate(study, plan, "cpu")
    weights = {run.id: run.flops for run in report.pretrain_runs}
    per_run = {row.task: row.flops / max(row.runs, 1) for row in report.finetune_by_task}
    for node in plan.of_kind("finetune"):
        run = plan.nodes[node.parents[0]]
        weights[node.id] = per_run.get(node.factors["task"], 0.0) / max(len(plan.children(run.id)), 1)
    for node in plan.of_kind("corpus"):
        weights[node.id] = 1e9
    return weights


# ----------------------------------------------------------------------------------- Ray tasks


@contextlib.contextmanager
def _node_log(location: str | Path):
    """On an exception, write its traceback to the node's log (the summary points there), then re-raise."""
    try:
        yield
    except BaseException:
        folder, _, name = str(location).rpartition("/")
        # tracebacks can quote a tracking URI: never its password
        Store(folder).append_text(name, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                                        f"{redact_uri(traceback.format_exc())}\n")
        raise


def _corpus_task(study: Study, node: Node, out_dir: str, log: str) -> dict:
    from scaling_study.corpus import MANIFEST, build_corpus

    with _node_log(log):
        out = Store(out_dir)  # a URI: build in the local mirror, then upload with the manifest last
        cache = out.local.parent.parent / "cache"  # <study>/cache, as corpus.urls documents
        manifest = build_corpus(study, node, out.local, progress=False, cache_dir=cache)
        out.upload(last=(MANIFEST,))
        return dataclasses.asdict(manifest)


def _pretrain_task(study: Study, plan: Plan, node_id: str, corpus_dir: str, out_dir: str, uri: str,
                   run_id: str, log: str, _corpus: Any = None) -> dict:
    from scaling_study.pretrain import MlflowLogger, run_pretraining

    with _node_log(log):
        mlflow_logger = functools.partial(MlflowLogger, uri, run_id)
        final = run_pretraining(study, plan, plan.nodes[node_id], corpus_dir, out_dir, max_failures=2,
                                logger_factory=functools.partial(throughput_logger, study.spec.name, node_id,
                                                                 mlflow_logger))
        final = json.loads(json.dumps(final, default=str))
        Store(out_dir).write_text(FINAL_FILE, json.dumps(final, indent=1))
        return final


def _finetune_trial(config: dict, study: Study | None = None, uri: str = "") -> None:
    """One Tune trial: finetune a model on a task with a seed, log each epoch level's cell, mark done."""
    import torch
    from ray import tune

    from scaling_study.finetune import FinetuneConfig, finetune
    from scaling_study.tasks.data import load_task_data, mirror_dirs

    from scaling_study.pretrain import STATE_FILE

    torch.set_num_threads(max(1, int(config["cpus"])))
    store = Store(config["out_dir"])  # a URI: work in the local mirror, upload with DONE.json last
    out = store.local
    with _node_log(config["log"]):
        start = time.perf_counter()
        task = study.tasks[config["task"]]
        data = load_task_data(task, mirror_dirs(None, study), caps=study.caps[task.id])
        model = local_copy(config["model_source"], exclude=(STATE_FILE,))  # weights and tokenizer only
        results = finetune(model, task, data, FinetuneConfig.from_spec(study.spec.finetune),
                           config["levels"], config["seed"], out)
        seconds = time.perf_counter() - start  # the node's own compute, for benchmarks/study_overhead.py
        cells = config["cells"]
        faults.point("finetune-log")
        with tracking_calls(uri):  # a lost server fails the run before DONE.json: a re-run redoes it
            for result in results:
                _log_cell(uri, cells[str(result["epochs"])], result, out)
        store.upload()
        store.write_text(DONE_FILE, json.dumps({"cells": cells, "results": results, "seconds": seconds},
                                               indent=1, default=str))
        tune.report({"test_f1": float(results[-1]["test"]["f1"])})


def _flat_metrics(result: dict) -> dict[str, float]:
    out = {}
    for split in ("dev", "test"):
        for key, value in (result.get(split) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{split}_{key}"] = float(value)
    for key in ("train_loss", "examples_per_s", "train_seconds", "selected_epoch", "majority_f1"):
        if isinstance(result.get(key), (int, float)):
            out[key] = float(result[key])
    out["collapsed"] = float(bool(result.get("collapse")))
    return out


def _log_cell(uri: str, run_id: str, result: dict, out: Path) -> None:
    """Log one finetune cell's result to its MLflow run and finish the run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in _flat_metrics(result).items()]
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    collapse = result.get("collapse")
    client.set_tag(run_id, "collapsed", str(bool(collapse)))
    if collapse:
        client.set_tag(run_id, "collapse_reason", "; ".join(map(str, result.get("collapse_reasons") or []))[:500])
    for name in result.get("artifacts", []):
        path = out / name
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")


class ReadyFinetunes(Searcher):
    """A Ray Tune search algorithm that hands out finetune runs whose model is ready.

    `suggest` returns a trial config as soon as some pending run's checkpoint exists, `None` while
    pretraining is still producing them, and FINISHED when every run has been handed out or can
    never run (its pretraining failed).
    """

    def __init__(self, pending: list[Node], readiness: Callable[[Node], bool | None],
                 make_config: Callable[[Node], dict], state: StudyState):
        super().__init__(metric="test_f1", mode="max")
        self.pending, self.readiness, self.make_config, self.st = list(pending), readiness, make_config, state
        self.trials: dict[str, Node] = {}

    def suggest(self, trial_id: str):
        for node in list(self.pending):
            ready = self.readiness(node)
            if ready is None:
                self.pending.remove(node)
            elif ready:
                self.pending.remove(node)
                try:
                    config = self.make_config(node)
                except Exception as exc:  # tracking lost: these cells fail, a re-run redoes them
                    for cell in self.st.plan.children(node.id):
                        self.st.fail(cell, _reason(exc), None)
                    continue
                self.trials[trial_id] = node
                for cell in self.st.plan.children(node.id):
                    self.st.set(cell.id, "running")
                return config
        return Searcher.FINISHED if not self.pending else None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        node = self.trials.get(trial_id)
        if node is None:
            return
        for cell in self.st.plan.children(node.id):
            self.st.set(cell.id, "failed" if error else "done")

    def __getstate__(self) -> dict:
        # Tune pickles its search algorithm for Tuner.restore, which we never use (storage says
        # what is done); the driver-side callbacks and locks do not pickle.
        return {"pending": [n.id for n in self.pending], "trials": {k: v.id for k, v in self.trials.items()}}

    def save(self, checkpoint_path: str) -> None:  # nothing to save: storage says what is done
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


# ----------------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class Summary:
    study: str
    root: str
    tracking_uri: str
    counts: dict
    failures: list[Failure]
    seconds: float
    trained: int
    """Nodes computed by this invocation (0 for a finished study)."""

    @property
    def ok(self) -> bool:
        return not self.failures


@contextlib.contextmanager
def tracking_uri(study: Study, layout: Layout):
    """The study's MLflow URI: the spec's (checked before any compute) or an embedded local server."""
    uri = expand_env(study.spec.tracking.uri) if study.spec.tracking.uri else None
    if uri:
        check_server(uri)
        yield uri
        return
    with LocalMlflowServer(layout.mlflow) as server:
        yield server.uri


@contextlib.contextmanager
def ray_cluster(address: str | None):
    """Connect to `address` (or $RAY_ADDRESS); else start a local Ray for the duration, and stop it."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    common = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="WARNING")
    temp = None
    if address:
        ray.init(address=address, runtime_env={"env_vars": dict(QUIET_ENV)}, **common)
    else:
        temp = tempfile.mkdtemp(prefix="ss-", dir="/tmp")  # Ray's unix sockets need a short path
        with _loopback_only():
            ray.init(num_cpus=os.cpu_count(), _temp_dir=temp, _node_ip_address="127.0.0.1", **common)
    try:
        yield
    finally:
        ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def _loopback_only():
    """Make a local Ray advertise and bind 127.0.0.1, not the machine's interface address.

    Ray turns `_node_ip_address="127.0.0.1"` into the interface address unless it believes it
    cannot form a cluster (its macOS/Windows default, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). With
    that, the GCS, raylet, workers and agents listen on 127.0.0.1 (tests/test_security.py checks
    every socket). The variable reaches the processes Ray starts through the environment; this
    process read it at import, so its constant is set for the call too.
    """
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env


def _live(state: StudyState, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from rich.live import Live

    class _View:
        def __rich__(self):
            return state.table()

    return Live(_View(), refresh_per_second=1, transient=False)


def run_study(study: Study, *, address: str | None = None, progress: bool = True) -> Summary:
    """Execute the plan (see the module docstring); returns what happened, failures included."""
    plan = expand(study)
    layout = Layout.of(study)
    layout.root.mkdir(parents=True, exist_ok=True)
    state = StudyState(plan, _weights(study, plan))
    for node in plan.nodes.values():
        if node_done(layout, plan, node):
            state.set(node.id, "done")
    state.done_at_start = sum(w for nid, w in state.weights.items() if state.state[nid] == "done")
    started = time.monotonic()
    trained = 0
    with tracking_uri(study, layout) as uri:
        tracker = Tracker(uri, study.spec.tracking.experiment or study.spec.name,
                          tags={"study_file": study.file})
        study_run = tracker.run_for(f"study-{study.spec.name}", kind="study", name=study.spec.name)
        _log_spec_once(tracker, study_run, study)
        _repair_tracking(study, plan, layout, tracker, study_run, state)
        work = [n for n in plan.nodes.values() if state.state[n.id] != "done" and n.kind in
                ("corpus", "pretrain", "finetune_run")]
        if work:
            with ray_cluster(address), _live(state, progress), StudyProgress(study, state):
                trained = _execute(study, plan, layout, tracker, study_run, state)
        try:
            with tracking_calls(uri):
                tracker.client.set_terminated(study_run, "FAILED" if state.failures else "FINISHED")
        except Exception as exc:
            state.tracking_lost(None, _reason(exc))
    return Summary(study.spec.name, layout.store.location, redact_uri(uri), state.counts(), state.failures,
                   time.monotonic() - started, trained)


def _log_spec_once(tracker: Tracker, run_id: str, study: Study) -> None:
    if not any(a.path == "spec.yaml" for a in tracker.client.list_artifacts(run_id)):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "spec.yaml"
            # a tracking.uri written with its password stays in the user's file, not in MLflow
            path.write_text(redact_uri(Path(study.file).read_text(encoding="utf-8")), encoding="utf-8")
            tracker.client.log_artifact(run_id, str(path))


def _parent_run(tracker: Tracker, plan: Plan, node: Node, study_run: str, cache: dict) -> str:
    """The MLflow run a node's run nests under: study -> pretraining run (or external model) -> finetune job."""
    if node.kind in ("corpus", "pretrain", "external"):
        return study_run
    if node.kind == "finetune":
        model = plan.nodes[plan.nodes[node.parents[0]].parents[0]]
        anchor = plan.nodes[model.parents[0]] if model.kind == "checkpoint" else model
        if anchor.id not in cache:
            cache[anchor.id] = tracker.run_for(anchor.id, kind=anchor.kind, name=_name(anchor),
                                               factors=_factors(anchor), parent_run_id=study_run)
        return cache[anchor.id]
    raise ValueError(node.kind)


def _name(node: Node) -> str:
    f = node.factors
    if node.kind == "finetune":
        return f"{f.get('model')} | {f['task']} | {f['epochs']} ep | seed {f['seed']}"
    if node.kind == "pretrain":
        return f"{f['model_size']} | {f['data_volume']} | {f['total_steps']} steps"
    if node.kind == "corpus":
        return f"corpus | {f['data_volume']}"
    return str(f.get("model", node.id))


def _factors(node: Node) -> dict:
    return {k: v for k, v in node.factors.items()}


def _cell_factors(study: Study, plan: Plan, layout: Layout, cell: Node) -> dict:
    """A finetune cell's factors plus the derived ones results.load reads (grid.cell_factors)."""
    from scaling_study.corpus import MANIFEST

    model = plan.nodes[plan.nodes[cell.parents[0]].parents[0]]
    manifest = {}
    if model.kind == "checkpoint":  # the real vocabulary and token count are the corpus build's
        corpus = plan.nodes[plan.nodes[model.parents[0]].parents[0]]
        manifest = json.loads(layout.store.read_text(f"{layout.rel(plan, corpus)}/{MANIFEST}") or "{}")
    return {**_factors(cell), **cell_factors(study, plan, cell, vocab_size=manifest.get("vocab_size"),
                                             volume_tokens=manifest.get("tokens"))}


def _repair_tracking(study, plan, layout, tracker, study_run, state) -> None:
    """Finished nodes whose MLflow runs are missing or unfinished get them back from storage."""
    from scaling_study.corpus import MANIFEST

    cache: dict[str, str] = {}
    for node in plan.of_kind("corpus"):  # tracking lost (or the driver killed) after the build finished
        text = layout.store.read_text(f"{layout.rel(plan, node)}/{MANIFEST}") if state.state[node.id] == "done" \
            else None
        existing = tracker.find_run(node.id) if text is not None else None
        if text is None or (existing is not None and existing.info.status == "FINISHED"):
            continue
        run_id = tracker.run_for(node.id, kind="corpus", name=_name(node), factors=_factors(node),
                                 parent_run_id=study_run)
        _log_corpus(tracker, run_id, json.loads(text))
    for node in plan.of_kind("pretrain"):  # a driver killed after the last checkpoint leaves it RUNNING
        if state.state[node.id] != "done":
            continue
        existing = tracker.find_run(node.id)
        if existing is not None and existing.info.status == "FINISHED":
            continue
        run_id = tracker.run_for(node.id, kind="pretrain", name=_name(node), factors=_factors(node),
                                 parent_run_id=study_run, tags={"corpus_id": node.parents[0]})
        checkpoints = {ck.inputs["step"]: layout.location(plan, ck) for ck in plan.children(node.id)}
        _log_final(tracker, run_id, {"checkpoints": checkpoints})
    for run_node in plan.of_kind("finetune_run"):
        text = layout.store.read_text(f"{layout.rel(plan, run_node)}/{DONE_FILE}")
        if text is None:
            continue
        saved = json.loads(text)
        for result in saved["results"]:
            cell = next(c for c in plan.children(run_node.id) if c.inputs["epochs"] == result["epochs"])
            existing = tracker.find_run(cell.id)
            if existing is not None and existing.info.status == "FINISHED":
                continue
            run_id = tracker.run_for(cell.id, kind="finetune", name=_name(cell),
                                     factors=_cell_factors(study, plan, layout, cell),
                                     parent_run_id=_parent_run(tracker, plan, cell, study_run, cache))
            if layout.store.remote:  # its artifacts, for MLflow
                layout.store.download(layout.rel(plan, run_node))
            _log_cell(tracker.uri, run_id, result, layout.node(plan, run_node))


def _execute(study: Study, plan: Plan, layout: Layout, tracker: Tracker, study_run: str, state: StudyState) -> int:
    import ray
    from ray import tune

    spec = study.spec
    cache: dict[str, str] = {}
    corpus_task = ray.remote(num_cpus=1, max_retries=0)(_corpus_task)
    pretrain_task = ray.remote(num_cpus=0, max_retries=0)(_pretrain_task)
    refs: dict[str, Any] = {}
    study_ref = ray.put(study)
    plan_ref = ray.put(plan)
    trained = 0

    for node in plan.of_kind("corpus"):
        if state.state[node.id] != "done":
            refs[node.id] = corpus_task.remote(study_ref, node, layout.location(plan, node), layout.log(node.id))
            state.set(node.id, "running")
    for node in plan.of_kind("pretrain"):
        if state.state[node.id] == "done":
            continue
        corpus = plan.nodes[node.parents[0]]
        try:
            with tracking_calls(tracker.uri):
                run_id = tracker.run_for(node.id, kind="pretrain", name=_name(node), factors=_factors(node),
                                         parent_run_id=study_run, tags={"corpus_id": corpus.id})
        except Exception as exc:  # not started untracked: its finetunes are blocked, a re-run redoes it
            state.fail(node, _reason(exc), None)
            continue
        cache[node.id] = run_id
        refs[node.id] = pretrain_task.remote(study_ref, plan_ref, node.id, layout.location(plan, corpus),
                                             layout.location(plan, node), tracker.uri, run_id,
                                             layout.log(node.id), refs.get(corpus.id))
        state.set(node.id, "running")

    finished: set[str] = set()

    def poll_refs() -> None:
        """Record finished or failed Ray tasks, and checkpoints that appeared."""
        nonlocal trained
        for nid, ref in list(refs.items()):
            if nid in finished:
                continue
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            finished.add(nid)
            node = plan.nodes[nid]
            try:
                value = ray.get(ref)
            except Exception as exc:  # the task's own error, or its corpus build's
                corpus = node.parents[0] if node.kind == "pretrain" else None
                if corpus and state.state[corpus] == "failed":
                    state.fail(node, f"not run: corpus build {corpus} failed", layout.log(corpus), state="blocked")
                else:
                    state.fail(node, _reason(exc), layout.log(nid))
                if node.kind == "pretrain":
                    with contextlib.suppress(Exception):  # a re-run finds the run again either way
                        tracker.client.set_terminated(cache[nid], "FAILED")
                continue
            trained += 1
            state.set(nid, "done")
            try:
                with tracking_calls(tracker.uri):
                    if node.kind == "corpus":
                        run_id = tracker.run_for(nid, kind="corpus", name=_name(node), factors=_factors(node),
                                                 parent_run_id=study_run)
                        _log_corpus(tracker, run_id, value)
                    else:
                        _log_final(tracker, cache[nid], value)
            except Exception as exc:  # done in storage; the re-run's _repair_tracking logs it
                state.tracking_lost(node, _reason(exc))
        for ck in plan.of_kind("checkpoint"):
            if state.state[ck.id] != "done" and node_done(layout, plan, ck):
                state.set(ck.id, "done")
            elif state.state[ck.id] == "pending" and state.state[ck.parents[0]] == "running":
                state.set(ck.id, "running")

    def readiness(run_node: Node) -> bool | None:
        poll_refs()
        model = plan.nodes[run_node.parents[0]]
        if model.kind == "external" or state.state[model.id] == "done":
            return True
        pretrain_id = model.parents[0]
        if state.state[pretrain_id] == "failed" or (pretrain_id in finished and state.state[model.id] != "done"):
            for cell in plan.children(run_node.id):
                state.fail(cell, f"not run: pretraining run {pretrain_id} failed", layout.log(pretrain_id),
                           state="blocked")
            return None
        return False

    def make_config(run_node: Node) -> dict:
        model = plan.nodes[run_node.parents[0]]
        cells = {}
        for cell in plan.children(run_node.id):
            tags = {"finetune_run_id": run_node.id, "model_id": model.id,
                    "model_source": model_source(study, layout, plan, model)}
            with tracking_calls(tracker.uri):
                cells[str(cell.inputs["epochs"])] = tracker.run_for(
                    cell.id, kind="finetune", name=_name(cell), factors=_cell_factors(study, plan, layout, cell),
                    tags=tags, parent_run_id=_parent_run(tracker, plan, cell, study_run, cache))
        return {"node": run_node.id, "model_source": model_source(study, layout, plan, model),
                "task": run_node.factors["task"], "seed": run_node.inputs["seed"],
                "levels": sorted(int(e) for e in cells), "out_dir": layout.location(plan, run_node),
                "log": layout.log(run_node.id), "cells": cells, "cpus": spec.finetune.cpus_per_job}

    pending = [n for n in plan.of_kind("finetune_run") if state.state[n.id] != "done"]
    if pending:
        searcher = ReadyFinetunes(pending, readiness, make_config, state)
        # the URI (it may hold a password) travels as a parameter, not in the config Tune writes to disk
        trainable = tune.with_resources(tune.with_parameters(_finetune_trial, study=study, uri=tracker.uri),
                                        {"cpu": spec.finetune.cpus_per_job, "gpu": spec.finetune.gpus_per_job})
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(pending),
                                        max_concurrent_trials=spec.finetune.max_concurrent or 0),
            run_config=tune.RunConfig(name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=layout.store.path("ray_results"),
                                      storage_filesystem=layout.store.fs if layout.store.remote else None, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        for result in grid:
            if result.error is None:
                continue
            if not (result.config or {}).get("node"):  # died before Tune kept its config: no node to name
                state.tracking_lost(None, _reason(result.error), what="finetune trial")
                continue
            run_node = plan.nodes[result.config["node"]]
            for cell in plan.children(run_node.id):
                state.fail(cell, _reason(result.error), layout.log(run_node.id))
                with contextlib.suppress(Exception):
                    tracker.client.set_terminated(tracker.find_run(cell.id).info.run_id, "FAILED")
        trained += sum(1 for r in grid if r.error is None)
    while len(finished) < len(refs):  # pretraining whose checkpoints nobody needed any more
        time.sleep(1)
        poll_refs()
    poll_refs()
    return trained


def _reason(exc: BaseException) -> str:
    """The root cause's first line, without Ray's wrapping."""
    cause = exc
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    text = str(cause).strip().splitlines()
    lines = [line for line in text if line.strip() and not line.startswith(("Traceback", "  File", "ray::"))]
    return redact_uri(lines[-1] if lines else type(cause).__name__)[:300]


def _log_corpus(tracker: Tracker, run_id: str, manifest: dict) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(manifest[k]), now, 0) for k in ("documents", "tokens", "sequences", "vocab_size")
               if isinstance(manifest.get(k), (int, float))]
    tracker.client.log_batch(run_id, metrics=metrics,
                             params=[Param("tokenizer_hash", str(manifest.get("tokenizer_hash", "")))])
    tracker.client.set_terminated(run_id, "FINISHED")


def _log_final(tracker: Tracker, run_id: str, final: dict) -> None:
    for step, folder in (final.get("checkpoints") or {}).items():
        tracker.client.set_tag(run_id, f"checkpoint.{int(step):08d}",
                               folder if is_uri(folder) else Path(folder).resolve().as_uri())
    tracker.client.set_terminated(run_id, "FINISHED")
