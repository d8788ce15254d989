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

from scaling_study.adaptive import StudySeeds
from scaling_study.artifacts import (DONE_FILE, STATE_FILE, Layout, done_nodes, model_source, pull_tracking,
                                     push_tracking, read_done)
from scaling_study.grid import Node, Plan, expand
from scaling_study.progress import StudyProgress
from scaling_study.raycluster import ray_cluster
from scaling_study.records import Recorder
from scaling_study.spec import Study, expand_env
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


def prepare(study: Study) -> Prepared:
    plan, layout = expand(study), Layout.of(study)
    return Prepared(study, plan, layout, done_nodes(layout, plan))


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
    with LocalMlflowServer(pull_tracking(layout)) as server:  # an object-store root's db comes down first
        yield server.uri
    push_tracking(layout)  # and goes back up, so that results, report and ui elsewhere find it


def run_study(study: Study, *, address: str | None = None, progress: bool = True,
              prepared: Prepared | None = None) -> Summary:
    """Execute the plan (see the module docstring); returns what happened, failures included.

    `prepared`: the study's `prepare(study)`, when the caller already has it (`scaling-study run`).
    """
    prepared = prepared or prepare(study)
    plan, layout = prepared.plan, prepared.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    state = StudyState(plan, node_weights(study, plan), done=prepared.done)
    started = time.monotonic()
    trained = 0
    seeds = StudySeeds(study, plan, prepared.done, lambda run: read_done(layout.read(plan, run, DONE_FILE)))
    first = seeds.release()  # every unfinished run, or an adaptive rule's next wave
    with tracking_uri(study, layout) as uri:
        tracker = Tracker(uri, study.spec.tracking.experiment or study.spec.name, tags={"study_file": study.file})
        recorder = Recorder(tracker, study, plan, layout)
        recorder.open()
        recorder.repair(state)
        if first or any(n.kind != "finetune_run" for n in state.unfinished()):
            with ray_cluster(address), live_view(state, progress), StudyProgress(study, state):
                trained = Scheduler(study, plan, layout, recorder, state, seeds, first).run()
        try:
            with tracking_calls(uri):
                decisions = seeds.close(state, layout)  # skipped jobs; adaptive seeds' decisions file
                if decisions:
                    recorder.log_study_file(decisions)
                recorder.close(failed=bool(state.failures))
        except Exception as exc:
            state.tracking_lost(None, failure_reason(exc))
    return Summary(study.spec.name, layout.store.location, redact_uri(uri), state.counts(), state.failures,
                   time.monotonic() - started, trained)


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

    def run(self) -> int:
        """Compute every unfinished node; returns how many finished well."""
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
                    and self.layout.has(self.plan, ck, STATE_FILE):
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
        """What a finetune trial needs (`workers.finetune_trial`): finetune runs of one model on one
        task, run one after the other in one process; their cells' MLflow runs are created here."""
        source = model_source(self.study, self.layout, self.plan, self.plan.nodes[runs[0].parents[0]])
        configs = []
        for run in runs:
            with tracking_calls(self.recorder.uri):
                cells = self.recorder.finetune_cells(run, source)
            configs.append({"node": run.id, "seed": run.inputs["seed"], "levels": sorted(int(e) for e in cells),
                            "out_dir": self.layout.location(self.plan, run), "log": self.layout.log(run.id),
                            "cells": cells})
        return {"runs": configs, "model_source": source, "task": runs[0].factors["task"],
                "cpus": self.study.spec.finetune.cpus_per_job}

    def trial_slots(self) -> int:
        """Finetune trials the cluster's CPUs and GPUs hold now (`max_concurrent`, when set)."""
        import ray

        f = self.study.spec.finetune
        if f.max_concurrent:
            return f.max_concurrent
        have = ray.cluster_resources()
        slots = have.get("CPU", 0) // f.cpus_per_job
        if f.gpus_per_job:
            slots = min(slots, have.get("GPU", 0) // f.gpus_per_job)
        return int(slots)

    def release_finetunes(self) -> None:
        """The finetune runs `self.seeds` releases, as Ray Tune trials, each once its model exists."""
        from ray import tune

        if not self.first:
            return
        f = self.study.spec.finetune
        searcher = ReadyFinetunes(self.seeds, self.first, self.readiness, self.trial_config, self.state,
                                  self.trial_slots, fixed=bool(f.max_concurrent))
        # the URI (it may hold a password) travels as a parameter, not in the config Tune writes to disk
        trainable = tune.with_resources(
            tune.with_parameters(finetune_trial, study=self.study, uri=self.recorder.uri),
            {"cpu": f.cpus_per_job, "gpu": f.gpus_per_job})
        store = self.layout.store
        tuner = tune.Tuner(
            trainable,  # at most one trial per run: the searcher says when there are no more
            # a slot's worker process is kept for its next trial: torch and transformers imported once
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


SLOTS_EVERY = 10.0
"""Seconds between two looks at the cluster's resources while finetuning (nodes come and go)."""


class ReadyFinetunes(Searcher):
    """A Ray Tune search algorithm that hands out finetune runs whose model is ready.

    `suggest` returns a trial config as soon as some released run's checkpoint exists, `None` while
    pretraining is still producing them or trials whose results may release more are running, and
    FINISHED when nothing is left to hand out. A trial packs runs of one model and one task (seeds,
    epoch levels): a share of the ready runs per slot (the trials the cluster holds, `slots`), so
    that one process loads the checkpoint and encodes the task once while every slot still gets
    work. Without `max_concurrent`, at most twice the slots are handed out at once. Each run a trial reports
    (`on_trial_result`) goes to the study's seeds (`adaptive.StudySeeds`), which may release more.
    """

    def __init__(self, seeds: StudySeeds, first: list[Node], readiness: Callable[[Node], bool | None],
                 make_config: Callable[[list[Node]], dict], state: StudyState,
                 slots: Callable[[], int] = lambda: 1, *, fixed: bool = False):
        super().__init__(metric="test_f1", mode="max")
        self.seeds, self.pending, self.readiness, self.make_config = seeds, list(first), readiness, make_config
        self.st, self._slots, self.fixed, self._seen = state, slots, fixed, (-1e9, 1)
        self.trials: dict[str, list[Node]] = {}
        self.live: set[str] = set()
        self.outcome: dict[str, str] = {}  # run id -> "" (done) or why it failed

    def slots(self) -> int:
        """Trials the cluster holds (`Scheduler.trial_slots`), asked again every SLOTS_EVERY seconds."""
        if time.monotonic() - self._seen[0] > SLOTS_EVERY:
            self._seen = (time.monotonic(), self._slots())
        return self._seen[1]

    def suggest(self, trial_id: str):
        slots = self.slots()
        # without max_concurrent, twice what fits now: an autoscaler sees demand and grows the cluster
        if not self.fixed and len(self.live) >= max(1, 2 * slots):
            return None
        ready, known = [], {}
        for node in list(self.pending):
            model = node.parents[0]
            if model not in known:  # one readiness check per model: its runs share it
                known[model] = self.readiness(node)
            if known[model] is None:
                self.pending.remove(node)
                self._ended(node, failed=True)
            elif known[model]:
                ready.append(node)
        if ready:
            first, size = ready[0], -(-len(ready) // max(1, slots))
            pack = [n for n in ready if (n.parents[0], n.factors["task"]) == (first.parents[0], first.factors["task"])]
            pack = pack[:size]
            for node in pack:
                self.pending.remove(node)
            try:
                config = self.make_config(pack)
            except Exception as exc:  # tracking lost: these cells fail, a re-run redoes them
                for node in pack:
                    for cell in self.st.plan.children(node.id):
                        self.st.fail(cell, failure_reason(exc), None)
                    self._ended(node, failed=True)
                return None
            self.trials[trial_id] = pack
            self.live.add(trial_id)
            for node in pack:
                for cell in self.st.plan.children(node.id):
                    self.st.set(cell.id, "running")
            return config
        if not self.pending and not self.live:
            self.pending += self.seeds.release()
            return self.suggest(trial_id) if self.pending else Searcher.FINISHED
        return None

    def _ended(self, node: Node, *, failed: bool) -> None:
        if failed:
            self.seeds.failed(node)
        else:
            self.seeds.finished(node)
        self.pending += self.seeds.release()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        node = next((n for n in self.trials.get(trial_id, []) if n.id == result.get("node")), None)
        if node is None or node.id in self.outcome:  # a retried trial reports its finished runs again
            return
        reason = result.get("failure") or ""
        self.outcome[node.id] = reason
        for cell in self.st.plan.children(node.id):
            self.st.set(cell.id, "failed" if reason else "done")
        self._ended(node, failed=bool(reason))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        if result and not error:
            self.on_trial_result(trial_id, result)
        for node in self.trials.get(trial_id, []):
            if node.id not in self.outcome:  # its process died, or the trial ended before it
                for cell in self.st.plan.children(node.id):
                    self.st.set(cell.id, "failed")
                self._ended(node, failed=True)

    def __getstate__(self) -> dict:
        # Tune pickles its search algorithm for Tuner.restore, which we never use (storage says
        # what is done); the driver-side callbacks and locks do not pickle.
        return {"pending": [n.id for n in self.pending], "trials": {k: [n.id for n in v] for k, v in self.trials.items()}}

    def save(self, checkpoint_path: str) -> None:  # nothing to save: storage says what is done
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass
