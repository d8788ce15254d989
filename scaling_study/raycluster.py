"""The Ray a study runs on: an existing cluster, or a local one started and stopped around the run.

    from scaling_study.raycluster import ray_cluster
    with ray_cluster(None):              # local Ray on 127.0.0.1 (its temp dir under /tmp), stopped after
        ...
    with ray_cluster("ray://head:10001"):  # or $RAY_ADDRESS: connect, and disconnect after
        ...

Inside an initialised Ray (a submitted job, a test's cluster) it does nothing. A local Ray binds
127.0.0.1 only (`loopback_only`) and runs without what one machine has no use for (`LOCAL_ENV`).

    cluster_cpus("ray://head:10001")     # the CPUs of a cluster now (`scaling-study plan --address`)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from scaling_study._env import QUIET_ENV

# What a Ray on one machine has no use for, switched off in the environment its processes inherit
# (a value the user set wins). Ray Train's preemption watcher polls for nodes being drained (spot
# instances, an autoscaler scaling down); a local Ray has none, and the watcher is one more actor
# process per pretraining run (its start and polling: 1-2 CPU-seconds a run on a 2-core laptop).
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextlib.contextmanager
def ray_cluster(address: str | None, *, on_start=None):
    """Connect to `address` (or $RAY_ADDRESS); else start a local Ray for the duration, and stop it.

    `on_start(pids, what, folder=...)` hears of the local Ray's processes (GCS, raylet, agents) and
    its temporary folder: they outlive a SIGKILLed driver (`lifecycle.StudyLock.own`)."""
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
        with loopback_only(), environment({k: v for k, v in LOCAL_ENV.items() if k not in os.environ}):
            ray.init(num_cpus=os.cpu_count(), _temp_dir=temp, _node_ip_address="127.0.0.1", **common)
        if on_start is not None:
            node = ray._private.worker._global_node
            pids = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
            on_start(pids, "local Ray", folder=temp)
    try:
        yield
    finally:
        ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def cluster_cpus(address: str) -> int:
    """The CPUs of the Ray cluster at `address` now: connect, read, disconnect (in a connected
    process: that cluster's). An autoscaling cluster may add nodes later."""
    import ray

    from scaling_study.errors import UserError

    try:
        with ray_cluster(address):
            return int(ray.cluster_resources().get("CPU", 0))
    except Exception as exc:  # Ray's ConnectionError, a bad address, a refused token
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise UserError(f"--address {address}: cannot read the cluster's CPUs: {lines[0]}; allowed: a running "
                        "Ray cluster's address (as `run --address`), or --cpus N") from None


def check_local_resources(study, address: str | None) -> None:
    """Refuse a job that asks for more CPUs or GPUs than the local Ray will have: Ray would keep it
    pending forever. Nothing to check on a cluster (`address`, $RAY_ADDRESS), which may grow."""
    import sys

    from scaling_study.errors import SpecError, SpecErrors

    ray = sys.modules.get("ray")
    if address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        return
    f, p = study.spec.finetune, study.spec.pretrain if study.spec.model_sizes else None
    cpus = os.cpu_count() or 1
    gpus = _local_gpus() if f.gpus_per_job or (p and p.gpus_per_worker) else 0
    asks = [("finetune.cpus_per_job", f.cpus_per_job, 1, cpus, "CPUs"),
            ("finetune.gpus_per_job", f.gpus_per_job, 1, gpus, "GPUs")]
    if p is not None:
        asks += [("pretrain.cpus_per_worker", p.cpus_per_worker, p.num_workers, cpus, "CPUs"),
                 ("pretrain.gpus_per_worker", p.gpus_per_worker, p.num_workers, gpus, "GPUs")]
    errors = []
    for field, value, workers, have, what in asks:
        if value * workers > have:
            times = f" x {workers} workers" if workers > 1 else ""
            errors.append(SpecError(study.file, field, value, f"at most {have:g} {what} in all, this machine's, or "
                                    "a Ray cluster (--address)", problem=f"{value:g}{times} is more {what} than the "
                                    f"local Ray has ({have:g}): the job would wait forever"))
    if errors:
        raise SpecErrors(errors)


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set `values` in os.environ for the block (processes started in it inherit them), then put
    back what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def loopback_only():
    """Make a local Ray advertise and bind 127.0.0.1, not the machine's interface address.

    Ray turns `_node_ip_address="127.0.0.1"` into the interface address unless it believes it
    cannot form a cluster (its macOS/Windows default, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). With
    that, the GCS, raylet, workers and agents listen on 127.0.0.1 (tests/test_security.py checks
    every socket). The variable reaches the processes Ray starts through the environment; this
    process read it at import, so its constant is set for the call too.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with environment({ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
