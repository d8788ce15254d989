"""Study progress as Prometheus metrics, exported through Ray's metrics agent (`ray.util.metrics`).

    from scaling_study.progress import StudyProgress, throughput_logger
    with StudyProgress(study, state):          # the driver: node counts and device-hours, every 2 s
        ...run the study...
    logger_factory = functools.partial(throughput_logger, "smoke", "pt-1234", inner_factory)  # rank 0's logger

The names are fixed: the Grafana dashboards in `dashboards/` rely on them. Ray exports each with
the prefix `ray_` (`ray_scaling_study_nodes`) on every node's metrics port
(`ray start --metrics-export-port`), next to its own metrics:

    scaling_study_nodes{study, kind, state}        gauge: nodes of a kind (corpus, pretrain, checkpoint,
                                                   finetune) in a state (pending, running, done, failed, blocked, skipped)
    scaling_study_tokens_per_second{study, node}   gauge: a pretraining run's throughput, all workers
    scaling_study_mfu{study, node}                 gauge: its model FLOPs utilisation (0-1)
    scaling_study_device_hours_used{study}         gauge: device-hours held by the nodes this driver ran
    scaling_study_device_hours_planned{study}      gauge: `costs.estimate`'s device-hours for those nodes

Tokens/s and MFU are set by the pretraining run's rank 0 itself, in its Ray Train worker, at each
log step (the same numbers it logs to MLflow): relaying them to the driver would need a report
(a barrier over all workers, about 1.8 s each) or an extra actor, and the worker's gauge already
carries the node. The driver sets the rest from its own state. A device is a GPU when the spec
asks for GPUs, else one worker (pretraining) or one job (finetuning); "used" integrates the
devices of running nodes over time, "planned" divides the estimated FLOPs of the same nodes by
the cluster's device (its `accelerator_type`, `cpu` without GPUs) at its assumed MFU. Both count
this invocation's work: after a resume, what was done before is in neither.

Outside a Ray worker or a connected driver (plain `train_mlm`, `plan`), nothing is exported and
nothing is printed. Ray drops a gauge a few seconds after its process stops reporting it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
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
}


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

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # metrics must never stop a study
                self.publish()

    def __enter__(self) -> StudyProgress:
        if gauge("scaling_study_nodes") is not None:
            if self.device is None:
                self.device = cluster_device()
            self._last = time.monotonic()
            self.publish()
            self._thread = threading.Thread(target=self._loop, name="study-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            with contextlib.suppress(Exception):
                self.publish()
