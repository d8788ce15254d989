"""Run a study's plan on Ray, tracked in MLflow, idempotently.

    from scaling_study.orchestration import run_study
    summary = run_study(load_spec("experiments/smoke.yaml"))   # local Ray + local MLflow server
    summary.ok, summary.failed

    scaling-study run experiments/smoke.yaml                     # the same, with a live view of the grid
    scaling-study run experiments/x.yaml --address ray://head:10001   # an existing Ray cluster

What runs where (`Scheduler`): corpus builds are Ray tasks; each pretraining run is a Ray task that
drives a Ray Train `TorchTrainer` (it starts as soon as its corpus build is done); finetune runs are
Ray Tune trials, released by `ReadyFinetunes` (a Tune search algorithm) as soon as the checkpoint
they finetune exists, not after all pretraining ends, with the spec's per-job resources and
concurrency. Work lost with its Ray node is done again in the same invocation
(`workers.MAX_FAILURES`): Ray reruns a corpus build, Ray Train restarts a pretraining run's workers
from its last checkpoint (the task that drives it stays on the driver's node), Tune restarts a
finetune trial with the same MLflow runs. The stage bodies are in `scaling_study.workers`, the
MLflow records in `scaling_study.records`, the node states and live view in `scaling_study.studystate`.

Storage is the source of truth for what is done (`scaling_study.artifacts` has the layout): a
re-run skips every finished node, resumes pretraining runs from their last checkpoint, and redoes
unfinished finetune runs. `storage.root` may be a URI (`s3://bucket/prefix`, `gs://...`,
`file:///...`): every node then works in its machine's local mirror and uploads its output when
finished, the marker file last. The embedded MLflow server's sqlite db lives on the driver's
machine, in its mirror, and is uploaded when the driver ends (so `results` elsewhere finds it);
on a cluster, set `tracking.uri`. While it runs, the driver exports
progress metrics through Ray (`scaling_study.progress`, for the Grafana dashboards in `dashboards/`).

MLflow gets one run per node id (corpus, pretrain, external, finetune), created by this driver
only and found again by its `node_id` tag on a re-run; a finished node whose MLflow run is missing
(a lost tracking server) is logged again from storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher

from scaling_study import studies
from scaling_study.artifacts import (Layout, done_nodes, model_options, model_source, node_done, pull_tracking,
                                    push_tracking)
from scaling_study.grid import Node, Plan, expand
from scaling_study.lifecycle import (
    STORAGE_ERRNOS,
    Stopped,
    StudyLock,
    request_stop,
    stop_on_signals,
    storage_stop_reason,
    watch_storage,
)
from scaling_study.progress import StudyProgress
from scaling_study.raycluster import ray_cluster
from scaling_study.records import Recorder
from scaling_study.spec import Study
from scaling_study.studystate import Failure, StudyState, live_view, node_weights
from scaling_study.tracking import LocalMlflowServer, Tracker, check_server, redact_uri, tracking_calls
from scaling_study.workers import MAX_FAILURES, corpus_task, failure_reason, finetune_trial, pretrain_task


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A study ready to run: its plan expanded and its finished nodes found, once per invocation."""

    study: Study
    plan: Plan
    layout: Layout
    done: frozenset[str]
    damaged: dict = dataclasses.field(default_factory=dict)
    """{node id: why}: nodes whose marker is in storage but not the files it certifies; computed again."""


def prepare(study: Study) -> Prepared:
    plan, layout = expand(study), Layout.of(study)
    damaged: dict[str, str] = {}
    done = done_nodes(layout, plan, damaged)
    return Prepared(study, plan, layout, done, damaged)


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
    stopped: Stopped | None = None
    """Why the study stopped before its end (a signal, a lost tracking server, read-only storage)."""

    @property
    def ok(self) -> bool:
        return not self.failures and self.stopped is None

    @property
    def exit_code(self) -> int:
        """What `scaling-study run` exits with: 0, 1 (failures), or the stop's (143 for SIGTERM)."""
        return self.stopped.exit_code if self.stopped else 0 if self.ok else 1


@contextlib.contextmanager
def tracking_uri(study: Study, layout: Layout, lock: StudyLock | None = None):
    """The study's MLflow URI: the spec's (checked before any compute) or an embedded local server,
    watched: restarted on the same store if it dies, the study stopped if it cannot be."""
    uri = studies.tracking_uri(study)  # the spec's, else $MLFLOW_TRACKING_URI
    if uri:
        check_server(uri)
        yield uri
        return
    try:  # an object-store root's db comes down first
        with LocalMlflowServer(pull_tracking(layout), on_start=lock.own if lock else None) as server:
            server.watch(on_lost=request_stop)
            yield server.uri
    except Stopped:  # a stopped study's runs are worth finding elsewhere too, if storage still takes them
        with contextlib.suppress(Exception):
            push_tracking(layout)
        raise
    push_tracking(layout)  # and goes back up, so that results, report and ui elsewhere find it


def run_study(study: Study, *, address: str | None = None, progress: bool = True,
              prepared: Prepared | None = None, extend: bool = False) -> Summary:
    """Execute the plan (see the module docstring); returns what happened, failures included.

    One driver per study (`lifecycle.StudyLock`: a second one gets `StudyBusy`). SIGTERM, SIGHUP,
    a tracking server that cannot be restarted and storage that turns read-only stop it early:
    `Summary.stopped` says why, what finished is kept. `prepared`: the study's `prepare(study)`,
    when the caller already has it (`scaling-study run`). `extend`: this spec may differ from the
    one the study's name was first run with (`studies.claim`).
    """
    prepared = prepared or prepare(study)
    plan, layout = prepared.plan, prepared.layout
    studies.check(study, layout, extend=extend)  # a different spec under a taken name stops here
    state = StudyState(plan, node_weights(study, plan), done=prepared.done)
    started = time.monotonic()
    box = {"trained": 0}
    if studies.tracking_uri(study):  # a server that is down: one line before anything is written, the lock too
        check_server(studies.tracking_uri(study))
    with StudyLock(layout.root, "run") as lock, stop_on_signals():
        try:
            with tracking_uri(study, layout, lock) as uri, watch_storage(layout.root):
                _drive(study, prepared, state, uri, lock, box, address=address, progress=progress, extend=extend)
            stopped = None
        except Stopped as stop:
            stopped = stop
        except OSError as exc:  # the driver's own write to storage that turned read-only
            if exc.errno not in STORAGE_ERRNOS:
                raise
            stopped = Stopped(storage_stop_reason(layout.root, exc), 1)
    return Summary(study.spec.name, layout.store.location, redact_uri(box.get("uri", "")), state.counts(),
                   state.failures, time.monotonic() - started, box["trained"], stopped)


def _drive(study: Study, prepared: Prepared, state: StudyState, uri: str, lock: StudyLock, box: dict, *,
           address: str | None, progress: bool, extend: bool) -> None:
    """Records first (the study's run, repairs from storage), then every unfinished node, then the close."""
    plan, layout = prepared.plan, prepared.layout
    box["uri"] = uri
    studies.claim(study, layout, extend=extend)  # the server answers: the study is this spec's now
    tracker = Tracker(uri, study.spec.tracking.experiment or study.spec.name, tags={"study_file": study.file})
    recorder = Recorder(tracker, study, plan, layout)
    recorder.open()
    recorder.repair(state)
    if state.unfinished():
        # stop_on_signals again: ray.init installs its own SIGTERM handler in the driver
        with ray_cluster(address, on_start=lock.own), stop_on_signals(), live_view(state, progress), \
                StudyProgress(study, state):
            scheduler = Scheduler(study, plan, layout, recorder, state)
            try:
                scheduler.run()
            finally:
                box["trained"] = scheduler.trained
    try:
        with tracking_calls(uri):
            recorder.close(failed=bool(state.failures))
    except Exception as exc:
        state.tracking_lost(None, failure_reason(exc))


class Scheduler:
    """Starts every unfinished node as soon as its inputs exist, and records how each ends."""

    def __init__(self, study: Study, plan: Plan, layout: Layout, recorder: Recorder, state: StudyState):
        self.study, self.plan, self.layout, self.recorder, self.state = study, plan, layout, recorder, state
        self.refs: dict[str, Any] = {}  # node id -> the Ray task computing it
        self.finished: set[str] = set()  # nodes whose task has ended (well or not)
        self.pretrain_runs: dict[str, str] = {}  # pretrain node -> its MLflow run
        self.trained = 0

    def run(self) -> int:
        """Compute every unfinished node; returns how many finished well (also `self.trained`)."""
        import ray

        self.study_ref, self.plan_ref = ray.put(self.study), ray.put(self.plan)
        self.launch_corpus_builds()
        self.launch_pretraining()
        self.release_finetunes()
        self.drain()
        return self.trained

    def _todo(self, kind: str) -> list[Node]:
        return [n for n in self.plan.of_kind(kind) if self.state.state[n.id] != "done"]

    def launch_corpus_builds(self) -> None:
        import ray

        # Ray reruns a build whose worker or node died (max_retries counts only those, not errors)
        task = ray.remote(num_cpus=1, max_retries=MAX_FAILURES)(corpus_task)
        for node in self._todo("corpus"):
            self.refs[node.id] = task.remote(self.study_ref, node, self.layout.location(self.plan, node),
                                             self.layout.log(node.id))
            self.state.set(node.id, "running")

    def launch_pretraining(self) -> None:
        """One Ray task per unfinished pretraining run; Ray starts each once its corpus build is done."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # It only drives Ray Train, whose controller runs where it runs: on the driver's node, so
        # that losing a worker node loses workers (Train restarts them), never the run's driver
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(pretrain_task)
        for node in self._todo("pretrain"):
            corpus = self.plan.nodes[node.parents[0]]
            try:
                with tracking_calls(self.recorder.uri):
                    run_id = self.recorder.run_of(node)
            except Exception as exc:  # not started untracked: its finetunes are blocked, a re-run redoes it
                self.state.fail(node, failure_reason(exc), None)
                continue
            self.pretrain_runs[node.id] = run_id
            self.refs[node.id] = task.remote(
                self.study_ref, self.plan_ref, node.id, self.layout.location(self.plan, corpus),
                self.layout.location(self.plan, node), self.recorder.uri, run_id, self.layout.log(node.id),
                self.refs.get(corpus.id))
            self.state.set(node.id, "running")

    def poll(self) -> None:
        """Record finished or failed Ray tasks, and checkpoints that appeared."""
        import ray

        for nid, ref in list(self.refs.items()):
            if nid not in self.finished and ray.wait([ref], timeout=0)[0]:
                self.finished.add(nid)
                self._record(self.plan.nodes[nid], ref)
        for ck in self.plan.of_kind("checkpoint"):
            if self.state.state[ck.id] == "pending" and self.state.state[ck.parents[0]] == "running":
                self.state.set(ck.id, "running")
            # only runs this driver started can add checkpoints (a failed run's earlier levels count)
            if self.state.state[ck.id] != "done" and ck.parents[0] in self.refs \
                    and node_done(self.layout, self.plan, ck):
                self.state.set(ck.id, "done")

    def _record(self, node: Node, ref) -> None:
        import ray

        try:
            value = ray.get(ref)
        except Exception as exc:  # the task's own error, or its corpus build's
            corpus = node.parents[0] if node.kind == "pretrain" else None
            if corpus and self.state.state[corpus] == "failed":
                self.state.fail(node, f"not run: corpus build {corpus} failed", self.layout.log(corpus),
                                state="blocked")
            else:
                self.state.fail(node, failure_reason(exc), self.layout.log(node.id))
            if node.kind == "pretrain":
                self.recorder.mark_failed(node.id)
            return
        self.trained += 1
        self.state.set(node.id, "done")
        try:
            with tracking_calls(self.recorder.uri):
                if node.kind == "corpus":
                    self.recorder.corpus_done(node, value)
                else:
                    self.recorder.pretrain_done(self.pretrain_runs[node.id], value)
        except Exception as exc:  # done in storage; the re-run's Recorder.repair logs it
            self.state.tracking_lost(node, failure_reason(exc))

    def readiness(self, run_node: Node) -> bool | None:
        """True when a finetune run's model exists, False while it may still come, None if it never will."""
        self.poll()
        model = self.plan.nodes[run_node.parents[0]]
        if model.kind == "external" or self.state.state[model.id] == "done":
            return True
        pretrain_id = model.parents[0]
        if self.state.state[pretrain_id] == "failed" or pretrain_id in self.finished:
            for cell in self.plan.children(run_node.id):
                self.state.fail(cell, f"not run: pretraining run {pretrain_id} failed", self.layout.log(pretrain_id),
                                state="blocked")
            return None
        return False

    def trial_config(self, run_node: Node) -> dict:
        """What a finetune trial needs (`workers.finetune_trial`); its cells' MLflow runs are created here."""
        model = self.plan.nodes[run_node.parents[0]]
        source = model_source(self.study, self.layout, self.plan, model)
        with tracking_calls(self.recorder.uri):
            cells = self.recorder.finetune_cells(run_node, source)
        return {"node": run_node.id, "model_source": source, "model_options": model_options(self.study, model),
                "task": run_node.factors["task"],
                "seed": run_node.inputs["seed"], "levels": sorted(int(e) for e in cells),
                "out_dir": self.layout.location(self.plan, run_node), "log": self.layout.log(run_node.id),
                "cells": cells, "cpus": self.study.spec.finetune.cpus_per_job}

    def release_finetunes(self) -> None:
        """Every unfinished finetune run as a Ray Tune trial, each released once its model exists."""
        from ray import tune

        pending = self._todo("finetune_run")
        if not pending:
            return
        f = self.study.spec.finetune
        searcher = ReadyFinetunes(pending, self.readiness, self.trial_config, self.state)
        # the URI (it may hold a password) travels as a parameter, not in the config Tune writes to disk
        trainable = tune.with_resources(
            tune.with_parameters(finetune_trial, study=self.study, uri=self.recorder.uri),
            {"cpu": f.cpus_per_job, "gpu": f.gpus_per_job})
        store = self.layout.store
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(pending),
                                        max_concurrent_trials=f.max_concurrent or 0),
            run_config=tune.RunConfig(name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=store.path("ray_results"),
                                      storage_filesystem=store.fs if store.remote else None, verbose=0,
                                      # a trial lost with its node starts again (same config, same MLflow
                                      # runs); one that failed by itself reports it (finetune_trial)
                                      failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)))
        grid = tuner.fit()
        self._record_trials(grid)

    def _record_trials(self, grid) -> None:
        for result in grid:
            reason = (result.metrics or {}).get("failure")  # the trial's own error (workers.finetune_trial)
            if result.error is None and reason is None:
                self.trained += 1
                continue
            reason = reason or failure_reason(result.error)  # or its process died, retries and all
            if not (result.config or {}).get("node"):  # died before Tune kept its config: no node to name
                self.state.tracking_lost(None, reason, what="finetune trial")
                continue
            run_node = self.plan.nodes[result.config["node"]]
            for cell in self.plan.children(run_node.id):
                self.state.fail(cell, reason, self.layout.log(run_node.id))
                self.recorder.mark_failed(cell.id)

    def drain(self) -> None:
        """Wait for pretraining whose checkpoints no finetune run needed any more."""
        while len(self.finished) < len(self.refs):
            time.sleep(1)
            self.poll()
        self.poll()


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
                        self.st.fail(cell, failure_reason(exc), None)
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
            self.st.set(cell.id, "failed" if error or (result or {}).get("failure") else "done")

    def __getstate__(self) -> dict:
        # Tune pickles its search algorithm for Tuner.restore, which we never use (storage says
        # what is done); the driver-side callbacks and locks do not pickle.
        return {"pending": [n.id for n in self.pending], "trials": {k: v.id for k, v in self.trials.items()}}

    def save(self, checkpoint_path: str) -> None:  # nothing to save: storage says what is done
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass
