"""A study on a simulated Ray cluster: a head and two worker nodes on 127.0.0.1, each worker node
with one CPU, its own cache (its "disk") and a custom resource, storage and task data on a real
S3-compatible server (moto's, conftest's `s3_server`). Nodes are lost for real
(`Cluster.remove_node`: every process of the node SIGKILLed) and replaced, as an autoscaler would.

One study run (module fixture `lost_nodes`) loses a node twice: during pretraining (2 Ray Train
workers, one per node) and while its finetune trial runs on it. `scaling_study.faults` only picks
the moments: a `stall` holds the pretraining workers at step 8 (after the step-5 resume checkpoint
went up) and the trial before it logs its results, and the fixture removes the node while they
wait. The tests then check what each loss did.

Why each worker node has one CPU: a node then fits one pretraining worker, so Ray Train's default
placement (PACK) puts the two workers on two nodes, as a cluster of one-GPU machines would; no
spec field for the placement strategy is needed.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import SHARED, micro_corpus, needs_mirror

pytestmark = [pytest.mark.slow, needs_mirror("datasets"), needs_mirror("corpus")]

TASK = "scierc_re"
STALL_S = 300  # longer than anything the fixture waits for; a removed node ends the stall
WORKER = "RayTrainWorker"
TOLERANCE = 1e-6
"""fp32 on CPU, one thread per worker, two ranks: the restarted run repeats the same operations in
the same order (gloo sums two numbers, which commutes exactly), so the curves agree exactly in
practice, as for a single-worker restart (docs/reliability.md, fault 1)."""


class SimCluster:
    """`ray.cluster_utils.Cluster` on 127.0.0.1: a head without CPUs (the driver's node) and worker
    nodes of one CPU, resource `sim_node` and their own `$SCALING_STUDY_CACHE` each."""

    def __init__(self, folder: Path, temp: str):
        """`temp`: Ray's temp dir, short (its unix sockets), and $RAY_TMPDIR already: Cluster() writes the
        "current cluster" address file there (default /tmp/ray, where any plain ray.init() on this
        machine would find it)."""
        from ray.cluster_utils import Cluster

        self.folder, self.count, self.temp = folder, 0, temp
        os.makedirs(f"{temp}/ray", exist_ok=True)
        # nodes declared dead 1-3 s after they go, not 15-30 s
        config = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2,
                  "health_check_initial_delay_ms": 1000}
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, node_ip_address="127.0.0.1", temp_dir=self.temp, include_dashboard=False,
            _system_config=config))
        self.nodes = {}

    def add(self):
        self.count += 1
        cache = self.folder / f"node-{self.count}-cache"
        node = self.cluster.add_node(num_cpus=1, resources={"sim_node": 1}, node_ip_address="127.0.0.1",
                                     env_vars={"SCALING_STUDY_CACHE": str(cache)})
        self.nodes[node.node_id] = (node, cache)
        return node

    def remove(self, node_id: str) -> None:
        self.cluster.remove_node(self.nodes[node_id][0], allow_graceful=False)

    def actors(self, name: str | None = None) -> list[dict]:
        """Ray actors (alive and dead) from the GCS, oldest first; of class `name` if given."""
        table = self.cluster.global_state.actor_table(None).values()
        return sorted((a for a in table if name is None or a["ActorClassName"] == name),
                      key=lambda a: a["StartTime"])

    def cache(self, node_id: str) -> Path:
        return self.nodes[node_id][1]

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


def cluster_spec(folder: Path, bucket: str) -> Path:
    """The micro study of tests/test_orchestration.py cut to one cell, on 2 pretraining workers with
    a resume checkpoint every 5 steps and a loss every step, storage and task data on S3."""
    from test_orchestration import micro_spec

    path = micro_spec(folder, name="nodes")
    spec = yaml.safe_load(path.read_text())
    spec["pretrain"].update(steps=[20], num_workers=2, checkpoint_every=5, log_every=1)
    spec["finetune"]["epochs"] = [1]
    spec["tasks"].update(include=[TASK], data_dir=f"{bucket}/tasks")
    spec["storage"]["root"] = f"{bucket}/studies"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def upload_task(s3_server, bucket: str) -> None:
    """The task's data in the bucket only: it has no public URL the nodes could use (offline anyway)."""
    name = bucket[len("s3://"):]
    for f in sorted((SHARED / "datasets" / TASK).iterdir()):
        s3_server.client.upload_file(str(f), name, f"tasks/{TASK}/{f.name}")


class NodeLosses:
    """Removes the node of a pretraining worker (both wait at step 8: one stalls, the other in the
    next all-reduce), then the node of the stalled finetune trial, each as soon as its stall fires,
    and adds a new node after each (an autoscaler replacing it).

    It runs in the main thread (Ray's `Node` registers signal handlers, which only the main thread
    may), the study in another one (Ray Train and Tune skip their Ctrl-C handlers there)."""

    def __init__(self, cluster: SimCluster, marker: Path):
        self.cluster, self.marker = cluster, marker
        self.removed: dict[str, str] = {}  # what was lost -> its node id

    def _wait(self, point: str, study: threading.Thread) -> bool:
        fired = Path(f"{self.marker}-{point}")
        while not fired.exists():
            if not study.is_alive():
                return False
            time.sleep(0.2)
        return True

    def _lose(self, what: str, actor: dict) -> None:
        node_id = actor["Address"]["NodeID"]
        self.cluster.remove(node_id)
        self.removed[what] = node_id
        self.cluster.add()

    def run(self, study: threading.Thread) -> None:
        if not self._wait("pretrain-step", study):
            return
        alive = [a for a in self.cluster.actors(WORKER) if a["State"] == "ALIVE"]
        self._lose("pretraining", alive[0])
        if not self._wait("finetune-log", study):
            return
        on_head = {a["ActorClassName"] for a in self.cluster.actors() if a["Address"]["NodeID"] not in self.cluster.nodes}
        trial = [a for a in self.cluster.actors() if a["State"] == "ALIVE" and a["Address"]["NodeID"] in self.cluster.nodes
                 and a["ActorClassName"] not in on_head | {WORKER}]
        self._lose("finetune", trial[0])


class StudyThread(threading.Thread):
    def __init__(self, study):
        super().__init__(daemon=True)
        self.study, self.summary, self.error = study, None, None

    def run(self) -> None:
        from scaling_study.orchestration import run_study

        try:
            self.summary = run_study(self.study, progress=False)  # inside the initialised Ray: it uses it
        except BaseException as exc:  # re-raised in the fixture
            self.error = exc


def _reference_rank(rank: int, config, corpus: str, out: str, port: int, log: str) -> None:
    """One rank of the uninterrupted reference run: train_mlm in a 2-process gloo group, as torchrun would."""
    import torch.distributed as dist

    from scaling_study.pretrain import JsonlLogger, train_mlm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        train_mlm(config, corpus, out, logger=JsonlLogger(log) if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def reference_losses(study, folder: Path) -> dict[int, float]:
    """The study's pretraining run, uninterrupted, on 2 processes: {step: loss}."""
    import torch.multiprocessing as mp

    from scaling_study.artifacts import Layout
    from scaling_study.grid import expand
    from scaling_study.pretrain import JsonlLogger, PretrainConfig
    from scaling_study.storage import Store

    plan = expand(study)
    layout = Layout.of(study)
    corpus, run = plan.of_kind("corpus")[0], plan.of_kind("pretrain")[0]
    manifest = layout.manifest(plan, corpus)
    local = Store(layout.location(plan, corpus)).download()
    config = PretrainConfig.from_study(study, plan, run, vocab_size=manifest.vocab_size,
                                       num_threads=study.spec.pretrain.cpus_per_worker)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = folder / "reference.jsonl"
    mp.spawn(_reference_rank, args=(config, str(local), str(folder / "reference"), port, str(log)), nprocs=2)
    return {r["step"]: r["loss"] for r in JsonlLogger(log).read()}


@pytest.fixture(scope="module")
def lost_nodes(s3_server, tmp_path_factory):
    """The study run with both node losses; yields what the tests look at."""
    from ray import init, shutdown

    from scaling_study import faults
    from scaling_study.raycluster import loopback_only
    from scaling_study.spec import load_spec

    folder = tmp_path_factory.mktemp("nodes")
    bucket = s3_server.bucket()
    upload_task(s3_server, bucket)
    micro_corpus(folder)
    study = load_spec(cluster_spec(folder, bucket))
    marker = folder / "fired"
    env = {faults.ENV: f"pretrain-step=8:stall={STALL_S};finetune-log:stall={STALL_S}", faults.ENV_ONCE: str(marker),
           "SCALING_STUDY_CACHE": str(folder / "driver-cache")}
    with pytest.MonkeyPatch.context() as mp, loopback_only():
        for key, value in env.items():
            mp.setenv(key, value)  # the nodes started below inherit them (the cache: their own)
        temp = tempfile.mkdtemp(prefix="ss-", dir="/tmp")
        mp.setenv("RAY_TMPDIR", temp)
        cluster = SimCluster(folder, temp)
        try:
            first = [cluster.add(), cluster.add()]
            init(address=cluster.cluster.address, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
            runner, losses = StudyThread(study), NodeLosses(cluster, marker)
            runner.start()
            try:
                losses.run(runner)
            finally:
                runner.join()
            if runner.error is not None:
                raise runner.error
            yield {"study": study, "summary": runner.summary, "cluster": cluster, "losses": losses, "marker": marker,
                   "first_nodes": [n.node_id for n in first], "folder": folder, "bucket": bucket}
        finally:
            shutdown()
            cluster.shutdown()


def mlflow_runs(study) -> list:
    from mlflow.tracking import MlflowClient

    from scaling_study import results
    from scaling_study.artifacts import Layout

    client = MlflowClient(f"sqlite:///{Layout.of(study).mlflow / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study.spec.name)
    return results.search_all(client, experiment.experiment_id)


def test_the_study_completes_in_one_invocation_despite_two_lost_nodes(lost_nodes):
    summary, losses = lost_nodes["summary"], lost_nodes["losses"]
    assert set(losses.removed) == {"pretraining", "finetune"}, losses.removed
    assert summary.ok, summary.failures
    assert summary.trained == 3  # corpus, pretraining, the finetune run: nothing left for a re-run
    runs = mlflow_runs(lost_nodes["study"])
    per_node = Counter(r.data.tags["node_id"] for r in runs)
    assert max(per_node.values()) == 1, per_node  # the retried trial logged into the runs made for it
    assert all(r.info.status == "FINISHED" for r in runs)
    cell = next(r for r in runs if r.data.tags["node_kind"] == "finetune")
    assert "test_f1" in cell.data.metrics


def test_pretraining_workers_spread_over_two_nodes(lost_nodes):
    """Placement from the workers' own node ids (the GCS actor table): the first worker group had
    one worker on each of the two worker nodes; the restarted group, the survivor and the new node."""
    cluster = lost_nodes["cluster"]
    workers = cluster.actors(WORKER)
    assert len(workers) == 4, [(a["State"], a["Address"]["NodeID"]) for a in workers]  # two groups of two
    first, second = ({a["Address"]["NodeID"] for a in workers[:2]}, {a["Address"]["NodeID"] for a in workers[2:]})
    assert first == set(lost_nodes["first_nodes"])
    lost = lost_nodes["losses"].removed["pretraining"]
    assert lost in first and lost not in second and len(second) == 2


def test_pretraining_restarts_from_its_last_checkpoint_with_the_uninterrupted_losses(lost_nodes):
    """Ray Train restarted the worker group on the surviving and the new node from the step-5
    checkpoint on S3 (the new node's cache was empty): steps 6-7 are logged twice, and every
    logged loss equals the uninterrupted 2-process run's within TOLERANCE."""
    from mlflow.tracking import MlflowClient

    from scaling_study.artifacts import Layout

    study = lost_nodes["study"]
    run = next(r for r in mlflow_runs(study) if r.data.tags["node_kind"] == "pretrain")
    client = MlflowClient(f"sqlite:///{Layout.of(study).mlflow / 'mlflow.db'}")
    history = sorted((m.timestamp, m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    steps = [step for _, step, _ in history]
    assert sorted(steps) == sorted([*range(1, 8), *range(6, 21)]), steps  # stalled at 8, resumed after 5
    expected = reference_losses(study, lost_nodes["folder"])
    assert sorted(expected) == list(range(1, 21))
    assert max(abs(value - expected[step]) for _, step, value in history) <= TOLERANCE


def test_the_lost_finetune_trial_is_retried_on_another_node(lost_nodes):
    """Tune retried the trial (FailureConfig(max_failures=2)) on another node, which fetched the task's
    data from S3 into its own cache (tasks.data_dir) and finetuned there."""
    cluster, losses = lost_nodes["cluster"], lost_nodes["losses"]
    assert Path(f"{lost_nodes['marker']}-finetune-log").exists()
    lost = losses.removed["finetune"]
    survivors = [nid for nid in cluster.nodes if nid != lost and nid != losses.removed["pretraining"]]
    bucket = lost_nodes["bucket"][len("s3://"):]
    synced = [nid for nid in survivors
              if (cluster.cache(nid) / "mirror" / "s3" / bucket / "tasks" / TASK / "train.txt").is_file()]
    assert len(synced) == 1, synced  # the retry's node, and only it: the data reaches a node when it needs it
    finetuned = cluster.cache(synced[0]) / "mirror" / "s3" / bucket / "studies" / "nodes" / "finetune"
    assert [p.name for p in finetuned.glob("*/epochs_1/scores.json")] == ["scores.json"]
