"""Study progress as Prometheus metrics, exported through Ray's metrics agent (`ray.util.metrics`).

    from scaling_study.progress import CorpusProgress, StudyProgress, throughput_logger
    with StudyProgress(study, state):          # the driver: node counts and device-hours, every 2 s
        ...run the study...
    logger_factory = functools.partial(throughput_logger, "smoke", "pt-1234", inner_factory)  # rank 0's logger

    # a corpus build, in its Ray task: one per stage, over the corpus nodes the stage works for
    with CorpusProgress(study.spec.name, [n.id for n in nodes], "pack", total=pieces, total_bytes=size) as p:
        for ...:                               # as pieces finish
            p.update(done, done_bytes)         # cheap: publishes at most once a second

The names are fixed: the Grafana dashboards in `dashboards/` rely on them. Ray exports each with
the prefix `ray_` (`ray_scaling_study_nodes`) on every node's metrics port
(`ray start --metrics-export-port`), next to its own metrics:

    scaling_study_nodes{study, kind, state}        gauge: nodes of a kind (corpus, pretrain, checkpoint,
                                                   finetune) in a state (pending, running, done, failed, blocked, skipped)
    scaling_study_tokens_per_second{study, node}   gauge: a pretraining run's throughput, all workers
    scaling_study_mfu{study, node}                 gauge: its model FLOPs utilisation (0-1)
    scaling_study_device_hours_used{study}         gauge: device-hours held by the nodes this driver ran
    scaling_study_device_hours_planned{study}      gauge: `costs.estimate`'s device-hours for those nodes
    scaling_study_corpus_pieces{study, node, state}   gauge: a corpus build's pieces (about 64 MB of
                                                   input text each) in its current stage, state done or total
    scaling_study_corpus_bytes_per_second{study, node} gauge: input text per second in that stage, since it began

Tokens/s and MFU are set by the pretraining run's rank 0 itself, in its Ray Train worker, at each
log step (the same numbers it logs to MLflow): relaying them to the driver would need a report
(a barrier over all workers, about 1.8 s each) or an extra actor, and the worker's gauge already
carries the node. The driver sets the rest from its own state. A device is a GPU when the spec
asks for GPUs, else one worker (pretraining) or one job (finetuning); "used" integrates the
devices of running nodes over time, "planned" divides the estimated FLOPs of the same nodes by
the cluster's device (its `accelerator_type`, `cpu` without GPUs) at its assumed MFU. Both count
this invocation's work: after a resume, what was done before is in neither.

Corpus builds report through `CorpusProgress`, made by the builder in its Ray task for each stage
(`CORPUS_STAGES`): it sets the two corpus gauges of every node the stage works for (a shared scan
counts for all of a study's volumes) and puts the same numbers in Ray's key-value store (the
GCS's, `ray.experimental.internal_kv`, namespace `KV_NAMESPACE`, a key per study and node), where
the driver's `StudyProgress` reads them for the live table (`StudyState.corpus`). Why that
channel: the build runs in another process, maybe on another node, so a file in the study's
local folder is not seen by the driver, and one in storage would be an object-store write a
second; gauges cannot be read back without a Prometheus; an actor is a process to start and
stop. The key-value store is reached by every worker and driver of the cluster, Ray Client
included, costs nothing when unused, and Ray's own libraries (Tune, Train, Serve) keep state
there; its names start with an underscore, so the calls are in `_kv` alone. The driver clears a
study's keys when it starts and when it ends.

Outside a Ray worker or a connected driver (plain `train_mlm`, `build_corpus`, `plan`), nothing is
exported and nothing is printed. Ray drops a gauge a few seconds after its process stops reporting it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from scaling_study.studystate import StudyState
    from scaling_study.spec import Study

PREFIX = "ray_"
"""What Ray puts before a metric's name in its Prometheus export."""
METRICS = {
    "scaling_study_nodes": ("Study nodes by kind and state", ("study", "kind", "state")),
    "scaling_study_tokens_per_second": ("Pretraining tokens per second, all workers", ("study", "node")),
    "scaling_study_mfu": ("Pretraining model FLOPs utilisation (0-1)", ("study", "node")),
    "scaling_study_device_hours_used": ("Device-hours held by the nodes this driver ran", ("study",)),
    "scaling_study_device_hours_planned": ("Estimated device-hours of the nodes this driver runs", ("study",)),
    "scaling_study_corpus_pieces": ("Corpus build pieces of the current stage, done or total",
                                    ("study", "node", "state")),
    "scaling_study_corpus_bytes_per_second": ("Corpus build input text per second in the current stage",
                                              ("study", "node")),
}
CORPUS_STAGES = ("scan", "sample", "count", "pack")
"""A corpus build's stages, in order: the scan of the whole corpus (keys, histograms), the
tokenizer samples, the token counts of token-count volumes, tokenizing and packing."""
KV_NAMESPACE = "scaling_study"
"""The namespace of Ray's key-value store that corpus progress goes through."""


@functools.cache
def _gauges() -> dict[str, Any]:
    from ray.util.metrics import Gauge

    return {name: Gauge(name, description=doc, tag_keys=tags) for name, (doc, tags) in METRICS.items()}


def gauge(name: str):
    """The named gauge, or None when this process is no Ray worker or connected driver."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return _gauges()[name]
    except Exception:  # no Ray, or one without its metrics support: progress is optional
        return None


class ThroughputLogger:
    """A pretraining `MetricsLogger` that sets the run's tokens/s and MFU gauges, then passes the
    metrics on to `inner` (e.g. the MLflow logger)."""

    def __init__(self, study: str, node: str, inner: Any = None):
        self.tags, self.inner = {"study": study, "node": node}, inner

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, name in (("tokens_per_s", "scaling_study_tokens_per_second"), ("mfu", "scaling_study_mfu")):
            value, g = metrics.get(key), gauge(name)
            if g is not None and isinstance(value, (int, float)) and math.isfinite(value):
                g.set(float(value), tags=self.tags)
        if self.inner is not None:
            self.inner.log_metrics(metrics, step)


def throughput_logger(study: str, node: str, inner_factory: Callable[[], Any] | None = None) -> ThroughputLogger:
    """A `ThroughputLogger` around `inner_factory()`; partial it for `train_mlm_ray`'s logger_factory."""
    return ThroughputLogger(study, node, inner_factory() if inner_factory is not None else None)


def _kv():
    """Ray's internal key-value store (`ray.experimental.internal_kv`), or None outside Ray."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is in none
    try:
        if ray is None or not ray.is_initialized():
            return None
        from ray.experimental import internal_kv

        return internal_kv if internal_kv._internal_kv_initialized() else None
    except Exception:  # a Ray without it: the table shows no corpus progress, nothing else changes
        return None


def _corpus_key(study: str, node: str) -> str:
    return f"corpus_progress/{study}/{node}"


class CorpusProgress:
    """One stage of a corpus build, as it goes: the corpus gauges of each of `nodes` (corpus node
    ids) and the row the driver's live table reads (see the module docstring). `total` pieces
    holding `total_bytes` of input text; `update(done, done_bytes)` as pieces finish, `close()` at
    the end of the stage (or use it as a context manager). Publishes at most once per `interval`
    seconds, and once more on close; outside Ray it only counts."""

    def __init__(self, study: str, nodes: list[str], stage: str, total: int, total_bytes: int, *,
                 interval: float = 1.0):
        if stage not in CORPUS_STAGES:
            raise ValueError(f"stage {stage!r}: unknown; allowed: {', '.join(CORPUS_STAGES)}")
        self.study, self.nodes, self.stage, self.interval = study, list(nodes), stage, interval
        self.total, self.total_bytes, self.done, self.done_bytes = total, total_bytes, 0, 0
        self.started = time.monotonic()
        self._last = -math.inf
        self._on = sys.modules.get("ray") is not None  # then whether Ray is up, when publishing
        if self._on:
            self._publish()

    def bytes_per_second(self) -> float:
        """Input text per second since the stage began."""
        return self.done_bytes / max(time.monotonic() - self.started, 1e-9)

    def row(self, *, closed: bool = False) -> dict:
        return {"stage": self.stage, "done": self.done, "total": self.total, "done_bytes": self.done_bytes,
                "total_bytes": self.total_bytes, "bytes_per_second": self.bytes_per_second(),
                "seconds": time.monotonic() - self.started, "closed": closed}

    def update(self, done: int, done_bytes: int) -> None:
        self.done, self.done_bytes = done, done_bytes
        if self._on and time.monotonic() - self._last >= self.interval:
            self._publish()

    def close(self) -> None:
        if self._on:
            self._publish(closed=True)
        self._on = False

    def __enter__(self) -> CorpusProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _publish(self, *, closed: bool = False) -> None:
        self._last = time.monotonic()
        with contextlib.suppress(Exception):  # progress must never stop a build
            pieces, rate = gauge("scaling_study_corpus_pieces"), gauge("scaling_study_corpus_bytes_per_second")
            kv = _kv()
            if pieces is None and kv is None:
                self._on = False  # not in Ray: nothing to publish to, ever
                return
            row = self.row(closed=closed)
            for node in self.nodes:
                tags = {"study": self.study, "node": node}
                if pieces is not None:
                    pieces.set(self.done, tags={**tags, "state": "done"})
                    pieces.set(self.total, tags={**tags, "state": "total"})
                    rate.set(row["bytes_per_second"], tags=tags)
                if kv is not None:
                    kv._internal_kv_put(_corpus_key(self.study, node), json.dumps(row), overwrite=True,
                                        namespace=KV_NAMESPACE)


def corpus_progress(study: str, nodes: Iterable[str]) -> dict[str, dict]:
    """The last `CorpusProgress.row` each of `nodes` reported, by node id; {} outside Ray."""
    kv, out = _kv(), {}
    if kv is None:
        return out
    for node in nodes:
        value = kv._internal_kv_get(_corpus_key(study, node), namespace=KV_NAMESPACE)
        if value:
            out[node] = json.loads(value)
    return out


def clear_corpus_progress(study: str, nodes: Iterable[str]) -> None:
    """Forget what `nodes` reported (a build of an earlier run, or of this one, now over)."""
    kv = _kv()
    for node in nodes if kv is not None else ():
        kv._internal_kv_del(_corpus_key(study, node), namespace=KV_NAMESPACE)


def cluster_device() -> str:
    """The name in presets/devices.yaml of the cluster's GPUs (by Ray's `accelerator_type`), `cpu`
    without GPUs, `h100` for GPUs of an unknown type (as `scaling-study plan` assumes)."""
    import ray

    from scaling_study.models import load_devices

    resources = ray.cluster_resources()
    if not resources.get("GPU"):
        return "cpu"
    types = [k.split(":", 1)[1].lower() for k in resources if k.startswith("accelerator_type:")]
    return next((name for name in load_devices() if name != "cpu" and any(name in t for t in types)), "h100")


class StudyProgress:
    """Publishes the driver's node counts and device-hours every `interval` seconds, from a thread,
    while used as a context manager (and once more at the end)."""

    def __init__(self, study: Study, state: StudyState, *, interval: float = 2.0, device: str | None = None):
        self.study, self.state, self.interval = study, state, interval
        self.tags = {"study": study.spec.name}
        self.used_hours = 0.0
        self.device = device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = time.monotonic()
        self._todo = {nid for nid, s in state.state.items() if s != "done"}  # this invocation's work

    def devices(self, nid: str) -> float:
        spec, node = self.study.spec, self.state.plan.nodes[nid]
        if node.kind == "pretrain":
            return spec.pretrain.num_workers * (spec.pretrain.gpus_per_worker or 1)
        if node.kind == "finetune_run":
            return spec.finetune.gpus_per_job or 1
        return 0.0

    def planned_hours(self) -> float:
        from scaling_study.models import load_devices

        dev = load_devices()[self.device]
        flops = sum(w for nid, w in self.state.weights.items()
                    if nid in self._todo and self.state.plan.nodes[nid].kind in ("pretrain", "finetune"))
        return flops / (dev.peak_flops * dev.assumed_mfu * 3600)

    def _running(self) -> set[str]:
        """Nodes holding devices now: pretraining runs past their corpus build, finetune runs."""
        plan = self.state.plan
        with self.state.lock:
            states = dict(self.state.state)
        running = {nid for nid, s in states.items() if s == "running" and plan.nodes[nid].kind == "pretrain"
                   and states[plan.nodes[nid].parents[0]] == "done"}
        running |= {plan.nodes[nid].parents[0] for nid, s in states.items()
                    if s == "running" and plan.nodes[nid].kind == "finetune"}
        return running

    def publish(self) -> None:
        now = time.monotonic()
        self.used_hours += sum(self.devices(nid) for nid in self._running()) * (now - self._last) / 3600
        self._last = now
        nodes = gauge("scaling_study_nodes")
        if nodes is None:
            return
        for kind, row in self.state.counts().items():
            for state, count in row.items():
                nodes.set(count, tags={**self.tags, "kind": kind, "state": state})
        gauge("scaling_study_device_hours_used").set(self.used_hours, tags=self.tags)
        gauge("scaling_study_device_hours_planned").set(self.planned_hours(), tags=self.tags)

    def read_corpus(self) -> None:
        """The corpus builds' progress into the state (`StudyState.corpus`), for the live table."""
        running = [n.id for n in self.state.plan.of_kind("corpus") if self.state.state[n.id] == "running"]
        self.state.set_corpus(corpus_progress(self.tags["study"], running))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for step in (self.read_corpus, self.publish):
                with contextlib.suppress(Exception):  # metrics must never stop a study
                    step()

    def __enter__(self) -> StudyProgress:
        if gauge("scaling_study_nodes") is not None:
            if self.device is None:
                self.device = cluster_device()
            with contextlib.suppress(Exception):  # what an earlier driver's builds left
                clear_corpus_progress(self.tags["study"], self._corpus_todo())
            self._last = time.monotonic()
            self.publish()
            self._thread = threading.Thread(target=self._loop, name="study-progress", daemon=True)
            self._thread.start()
        return self

    def _corpus_todo(self) -> list[str]:
        return [n.id for n in self.state.plan.of_kind("corpus") if n.id in self._todo]

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            with contextlib.suppress(Exception):
                self.publish()
            with contextlib.suppress(Exception):
                clear_corpus_progress(self.tags["study"], self._corpus_todo())
