"""Corpus builds on Ray Data: the same manifests and byte-identical shards in this process (no Ray),
on a Ray of 1 CPU and of 2 CPUs, and on a 2-node `ray.cluster_utils.Cluster` whose pieces run on
both nodes; and a study's volumes built by one task for all of them."""

import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from scaling_study.artifacts import CorpusBuild
from scaling_study.corpus import build_corpora
from scaling_study.corpus_passes import map_pieces
from scaling_study.raycluster import loopback_only
from scaling_study.sources import input_files, pieces

from conftest import BASE_SPEC
from test_corpus import make_study

pytestmark = pytest.mark.slow
VOLUMES = ["10%", "50%", "100%"]
PIECE_BYTES = 40_000  # about 10 pieces of the 1,000 synthetic documents


def node_of(piece) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def build_all(study, nodes, folder: Path) -> tuple[list, list[bytes]]:
    """The volumes' manifests (what a build is, less its timings) and every shard's bytes."""
    order = [nodes[v] for v in VOLUMES]
    manifests = build_corpora(study, order, [folder / n.id for n in order], progress=False,
                              piece_bytes=PIECE_BYTES, shard_sequences=40)
    shards = [p.read_bytes() for n in order for p in CorpusBuild.open(folder / n.id).shard_paths]
    keep = [{k: v for k, v in m.to_dict().items() if k not in ("build_seconds", "created", "stage_seconds", "files")}
            | {"files": {f: e.get("sha256", e["bytes"]) for f, e in m.files.items()}} for m in manifests]
    return keep, shards


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus-ray")
    study, nodes = make_study(folder, copy.deepcopy(BASE_SPEC), VOLUMES)
    assert len(pieces(input_files(study, cache_dir=folder, download=False), "text", PIECE_BYTES)) >= 8
    return study, nodes, folder, build_all(study, nodes, folder / "local")


@pytest.fixture
def ray_temp():
    temp = tempfile.mkdtemp(prefix="ss-", dir="/tmp")  # Ray's unix sockets need a short path
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    yield temp
    os.environ.pop("RAY_TMPDIR") if old is None else os.environ.__setitem__("RAY_TMPDIR", old)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("cpus", [1, 2])
def test_ray_data_builds_what_one_process_builds(reference, ray_temp, cpus):
    import ray

    study, nodes, folder, (manifests, shards) = reference
    with loopback_only():
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=ray_temp,
                 _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        got_manifests, got_shards = build_all(study, nodes, folder / f"ray-{cpus}")
    finally:
        ray.shutdown()
    assert got_manifests == manifests
    assert got_shards == shards


def test_a_two_node_cluster_builds_the_same_bytes(reference, ray_temp):
    import ray
    from ray.cluster_utils import Cluster

    study, nodes, folder, (manifests, shards) = reference
    os.makedirs(f"{ray_temp}/ray", exist_ok=True)  # Cluster() writes the "current cluster" file there
    with loopback_only():
        cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, node_ip_address="127.0.0.1",
                                                                   temp_dir=ray_temp, include_dashboard=False))
    try:
        with loopback_only():
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        where = list(map_pieces(node_of, [object()] * 40, {}, label="where"))
        assert len(set(where)) == 2  # pieces run on both nodes
        got_manifests, got_shards = build_all(study, nodes, folder / "cluster")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert got_manifests == manifests
    assert got_shards == shards
