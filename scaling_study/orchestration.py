"""Run a study's plan on Ray, tracked in MLflow, idempotently.

    from scaling_study.orchestration import run_study
    summary = run_study(load_spec("experiments/smoke.yaml"))   # local Ray + local MLflow server
    summary.ok, summary.failed

    scaling-study run experiments/smoke.yaml                     # the same, with a live view of the grid
    scaling-study run experiments/x.yaml --address ray://head:10001   # an existing Ray cluster

What runs where (`Scheduler`): corpus builds are Ray tasks; each pretraining run is a Ray task that
drives a Ray Train `TorchTrainer` (it starts as soon as its corpus build is done; a one-worker run's
loop is one more Ray task, under Train's local mode: `pretrain.train_mlm_ray`); finetune runs are
Ray Tune trials, released by `searcher.ReadyFinetunes` (a Tune search algorithm) as soon as the checkpoint
they finetune exists, not after all pretraining ends, with the spec's per-job resources and
concurrency. Work lost with its Ray node is done again in the same invocation
(`workers.MAX_FAILURES`): Ray reruns a corpus build, Ray Train restarts a pretraining run's workers
from its last checkpoint (the task that drives it stays on the driver's node; Ray reruns a one-worker
run's task, which resumes from that checkpoint likewise), Tune restarts a
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
from typing import Any, Callable

from scaling_study import studies
from scaling_study.adaptive import StudySeeds
from scaling_study.artifacts import (DONE_FILE, Layout, done_nodes, model_options, model_source, node_done,
                                     pull_tracking, push_tracking, read_done)
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
from scaling_study.searcher import ReadyFinetunes
from scaling_study.spec import Study
from scaling_study.studystate import Failure, StudyState, live_view, node_weights
from scaling_study.tracking import LocalMlflowServer, Tracker, check_server, redact_uri, tracking_calls
from scaling_study.workers import MAX_FAILURES, corpus_task, failure_reason, finetune_trial, pretrain_task

SLOTS_EVERY = 10.0
"""Seconds between two reads of the cluster's resources while finetuning (nodes come and go)."""


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
def tracking_uri(given: str | None, layout: Layout, lock: StudyLock | None = None):
    """A `ready()` that returns the study's MLflow URI once it answers: `given` (the spec's or
    $MLFLOW_TRACKING_URI, `studies.tracking_uri`, already checked by the caller), or an embedded
    local server's, watched from then on: restarted on the same store if it dies, the study stopped
    if it cannot be. The server starts in the background, so that a local Ray can start beside it
    (each takes seconds)."""
    if given:
        yield lambda: given
        return

    def ready() -> str:
        uri = server.wait_ready()
        server.watch(on_lost=request_stop)
        return uri

    try:  # an object-store root's db comes down first
        with LocalMlflowServer(pull_tracking(layout), on_start=lock.own if lock else None).start(wait=False) \
                as server:
            yield ready
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
    given = studies.tracking_uri(study)
    if given:  # a server that is down: one line before anything is written, the lock too
        check_server(given)
    with StudyLock(layout.root, "run") as lock, stop_on_signals():
        try:
            with tracking_uri(given, layout, lock) as ready, watch_storage(layout.root):
                _drive(study, prepared, state, ready, lock, box, address=address, progress=progress,
                       extend=extend)
            stopped = None
        except Stopped as stop:
            stopped = stop
        except OSError as exc:  # the driver's own write to storage that turned read-only
            if exc.errno not in STORAGE_ERRNOS:
                raise
            stopped = Stopped(storage_stop_reason(layout.root, exc), 1)
    return Summary(study.spec.name, layout.store.location, redact_uri(box.get("uri", "")), state.counts(),
                   state.failures, time.monotonic() - started, box["trained"], stopped)


def _drive(study: Study, prepared: Prepared, state: StudyState, ready: Callable[[], str],
           lock: StudyLock, box: dict, *, address: str | None, progress: bool, extend: bool) -> None:
    """Records first (the study's run, repairs from storage), then every unfinished node, then the close.
    `ready()` (from `tracking_uri`) returns the tracking URI once the server answers."""
    plan, layout = prepared.plan, prepared.layout
    seeds = StudySeeds(study, plan, prepared.done, lambda run: read_done(layout.read(plan, run, DONE_FILE)))
    first = seeds.release()  # every unfinished run, or an adaptive rule's next wave
    compute = bool(first) or any(n.kind != "finetune_run" for n in state.unfinished())
    with contextlib.ExitStack() as stack:
        if compute:  # Ray starts while the embedded MLflow server does; neither needs the other yet
            stack.enter_context(ray_cluster(address, on_start=lock.own))
            stack.enter_context(stop_on_signals())  # again: ray.init installs its own SIGTERM handler
        box["uri"] = uri = ready()
        studies.claim(study, layout, extend=extend)  # the server answers: the study is this spec's now
        tracker = Tracker(uri, study.spec.tracking.experiment or study.spec.name, tags={"study_file": study.file})
        recorder = Recorder(tracker, study, plan, layout)
        recorder.open()
        recorder.repair(state)
        if compute:
            with live_view(state, progress), StudyProgress(study, state):
                scheduler = Scheduler(study, plan, layout, recorder, state, seeds, first)
                try:
                    scheduler.run()
                finally:
                    box["trained"] = scheduler.trained
    try:
        with tracking_calls(uri):
            decisions = seeds.close(state, layout)  # skipped jobs; adaptive seeds' decisions file
            if decisions:
                recorder.log_study_file(decisions)
            recorder.close(failed=bool(state.failures))
    except Exception as exc:
        state.tracking_lost(None, failure_reason(exc))


class Scheduler:
    """Starts every unfinished node as soon as its inputs exist, and records how each ends."""

    def __init__(self, study: Study, plan: Plan, layout: Layout, recorder: Recorder, state: StudyState,
                 seeds: StudySeeds | None = None, first: list[Node] | None = None):
        self.study, self.plan, self.layout, self.recorder, self.state = study, plan, layout, recorder, state
        self.seeds = seeds or StudySeeds(study, plan, (), lambda run: None)
        self.first = self.seeds.release() if first is None else first
        self.refs: dict[str, Any] = {}  # node id -> the Ray task computing it
        self.finished: set[str] = set()  # nodes whose task has ended (well or not)
        self.pretrain_runs: dict[str, str] = {}  # pretrain node -> its MLflow run
        self.trained = 0
        self._seen: tuple[float, dict] = (-1e9, {})  # when the cluster's resources were read, and them

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

        nodes = self._todo("corpus")
        if not nodes:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # One build for every volume (scaling_study.corpus). Its task only drives Ray Data and writes
        # the shards (no CPU of its own: the pieces' tasks take them all), on the driver's node, whose
        # disk is sized for them (costs.node_disk); Ray reruns it when its worker or node died
        # (max_retries counts only those, not errors).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        task = ray.remote(num_cpus=0, max_retries=MAX_FAILURES, num_returns=len(nodes),
                          scheduling_strategy=here)(corpus_task)
        refs = task.remote(self.study_ref, nodes, [self.layout.location(self.plan, n) for n in nodes],
                           [self.layout.log(n.id) for n in nodes])
        for node, ref in zip(nodes, refs if len(nodes) > 1 else [refs]):
            self.refs[node.id] = ref
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

    def trial_config(self, runs: list[Node]) -> dict:
        """What a finetune trial needs (`workers.finetune_trial`): finetune runs of one model (on one
        or more tasks), run one after the other in one process; their cells' MLflow runs are created here."""
        model = self.plan.nodes[runs[0].parents[0]]
        source = model_source(self.study, self.layout, self.plan, model)
        configs = []
        for run in runs:
            with tracking_calls(self.recorder.uri):
                cells = self.recorder.finetune_cells(run, source)
            configs.append({"node": run.id, "task": run.factors["task"], "seed": run.inputs["seed"],
                            "levels": sorted(int(e) for e in cells), "out_dir": self.layout.location(self.plan, run),
                            "log": self.layout.log(run.id), "cells": cells})
        return {"runs": configs, "model_source": source, "model_options": model_options(self.study, model),
                "cpus": self.study.spec.finetune.cpus_per_job}

    def trial_slots(self, have: dict | None = None) -> int:
        """Finetune trials to run now: what the cluster's CPUs and GPUs (`have`, else
        `ray.cluster_resources()`, read again every SLOTS_EVERY s) hold beside the corpus builds and
        pretraining runs not finished yet, at most `max_concurrent`. Those come first: a build's
        passes take every CPU, and a run's checkpoints are what finetunes wait for. A trial started
        in their place would keep its CPUs (Tune hands a finished trial's process the next trial),
        and the build or run would wait behind the finetunes of every model that is ready."""
        f, p = self.study.spec.finetune, self.study.spec.pretrain
        if have is None:  # the live cluster: what has finished since the last look first
            self.poll()
            have = self._resources()
        unfinished = self._unfinished()
        if "corpus" in unfinished:
            return 0
        runs = unfinished.count("pretrain") * p.num_workers
        slots = (have.get("CPU", 0) - runs * p.cpus_per_worker) // f.cpus_per_job
        if f.gpus_per_job:
            slots = min(slots, (have.get("GPU", 0) - runs * p.gpus_per_worker) // f.gpus_per_job)
        if not runs:  # at least one: on a cluster still growing, its demand brings the nodes it needs
            slots = max(1, slots)
        return int(max(0, min(slots, f.max_concurrent or slots)))

    def reserving(self) -> bool:
        """Whether a corpus build or pretraining run this driver started has not finished yet."""
        return bool(self._unfinished())

    def _unfinished(self) -> list[str]:
        """The kinds of the corpus builds and pretraining runs started here and not finished yet."""
        return [self.plan.nodes[n].kind for n in self.refs if n not in self.finished]

    def _resources(self) -> dict:
        import ray

        if time.monotonic() - self._seen[0] > SLOTS_EVERY:  # nodes come and go; asking costs a GCS call
            self._seen = (time.monotonic(), ray.cluster_resources())
        return self._seen[1]

    def release_finetunes(self) -> None:
        """The finetune runs `self.seeds` releases, as Ray Tune trials, each once its model exists."""
        from ray import tune

        if not self.first:
            return
        f = self.study.spec.finetune
        searcher = ReadyFinetunes(self.seeds, self.first, self.readiness, self.trial_config, self.state,
                                  self.trial_slots, fixed=bool(f.max_concurrent), reserved=self.reserving)
        # a finished trial's process runs the next one (torch and transformers imported once per slot):
        # trial_slots keeps the trials off the CPUs that builds and pretraining runs still need
        # the URI (it may hold a password) travels as a parameter, not in the config Tune writes to disk
        trainable = tune.with_resources(
            tune.with_parameters(finetune_trial, study=self.study, uri=self.recorder.uri),
            {"cpu": f.cpus_per_job, "gpu": f.gpus_per_job})
        store = self.layout.store
        tuner = tune.Tuner(
            trainable,  # at most one trial per run: the searcher says when there are no more
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(self._todo("finetune_run")),
                                        max_concurrent_trials=f.max_concurrent or 0, reuse_actors=True),
            run_config=tune.RunConfig(name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=store.path("ray_results"),
                                      storage_filesystem=store.fs if store.remote else None, verbose=0,
                                      # a trial lost with its node starts again (same config, same MLflow
                                      # runs); one that failed by itself reports it (finetune_trial)
                                      failure_config=tune.FailureConfig(max_failures=MAX_FAILURES)))
        grid = tuner.fit()
        self._record_trials(grid, searcher.outcome)

    def _record_trials(self, grid, outcome: dict[str, str]) -> None:
        """`outcome`: run id -> "" (done) or its own error (workers.finetune_trial), from the searcher."""
        for result in grid:
            runs = [r["node"] for r in (result.config or {}).get("runs", [])]
            if not runs and result.error is not None:  # died before Tune kept its config: no node to name
                self.state.tracking_lost(None, failure_reason(result.error), what="finetune trial")
            for nid in runs:
                reason = outcome.get(nid)
                if reason == "":
                    self.trained += 1
                    continue
                # or its process died (retries and all), or the trial ended before it
                reason = reason or (failure_reason(result.error) if result.error is not None
                                    else "the trial ended before this run")
                for cell in self.plan.children(nid):
                    self.state.fail(cell, reason, self.layout.log(nid))
                    self.recorder.mark_failed(cell.id)

    def drain(self) -> None:
        """Wait for pretraining whose checkpoints no finetune run needed any more."""
        while len(self.finished) < len(self.refs):
            time.sleep(1)
            self.poll()
        self.poll()
