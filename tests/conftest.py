"""Shared test setup: offline, no telemetry, and a valid study spec to mutate."""

import atexit
import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["SCALING_STUDY_OFFLINE"] = "1"  # task data and corpora from local mirrors only: no downloads
# Ray Train's controller polls its workers every 2 s, so each run's start and end are noticed up to
# 2 s late: over the suite's few dozen runs, a minute. A missed poll is not a failure (it waits on).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# `run` records each study in the user's index (scaling_study.studies): the tests' own, removed at exit
_INDEX = tempfile.mkdtemp(prefix="ss-index-", dir="/tmp")
os.environ["SCALING_STUDY_INDEX"] = os.path.join(_INDEX, "studies.json")
atexit.register(shutil.rmtree, _INDEX, True)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # the tests' studies use their embedded servers unless they say

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
SHARED = REPO.parent / "shared"  # the local mirror of corpus and task data (CI lays it beside the clone)

BASE_SPEC = {
    "name": "unit",
    "corpus": {"name": "toy", "paths": ["corpus.txt"], "vocab_size": 1000},
    "model_sizes": ["debug", "tiny"],
    "data_volumes": [0.5, 1.0],
    "pretrain": {"steps": [10, 20], "batch_size": 8, "seq_len": 64, "precision": "fp32"},
    "finetune": {"epochs": [1, 2], "seeds": [0]},
    "tasks": {"include": ["bc5cdr_ner", "scierc_re", "paper_field_cls"], "max_train_examples": 50},
}


@pytest.fixture
def base_spec() -> dict:
    return copy.deepcopy(BASE_SPEC)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local MLflow server (sqlite store in a temporary folder) for one test module; stopped after it."""
    from scaling_study.tracking import LocalMlflowServer

    with LocalMlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real `ray start --head` on 127.0.0.1 with free ports and token auth, for one test module.

    Yields a `ray_head.RayHead`: `.address` (GCS), `.dashboard_url` (Jobs API), `.metrics_url`
    (Prometheus, exported every second), `.env` (RAY_AUTH_MODE/RAY_AUTH_TOKEN a client needs),
    `.headers()`, `.in_this_process()` (this process as a driver). Jobs and workers run with this
    venv's commands on PATH, this checkout first on PYTHONPATH, `$SCALING_STUDY_HOME` and
    `$SCALING_STUDY_CACHE` (`.extra_env`) in a temporary folder. Stopped by PID.
    """
    import shutil
    import sys
    import tempfile

    from ray_head import RayHead

    home = tmp_path_factory.mktemp("cluster-home")
    temp = tempfile.mkdtemp(prefix="ss-", dir="/tmp")  # Ray's unix socket paths must stay < 107 chars
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "SCALING_STUDY_HOME": str(home), "SCALING_STUDY_CACHE": str(home / "cache")}
    # metrics every second, not every 10: the dashboards test scrapes a run of a minute or two
    head = RayHead(temp, env=env, system_config={"metrics_report_interval_ms": 1000}).start()
    try:
        yield head
    finally:
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)


def micro_corpus(folder: Path) -> Path:
    """A 300-line excerpt of the ../shared science corpus in `folder`: a corpus build of seconds."""
    corpus = folder / "corpus.txt"
    if not corpus.exists():
        lines = (SHARED / "corpus" / "matsci_glass_abstracts.txt").read_text().splitlines()[:300]
        corpus.write_text("\n".join(lines) + "\n")
    return corpus


def needs_mirror(part: str = "datasets"):
    """Skip where the ../shared mirror (its `part`: datasets or corpus) is absent; CI always has it."""
    return pytest.mark.skipif(not (SHARED / part).is_dir(), reason=f"needs the ../shared mirror ({part}/)")


class S3Server:
    """moto's S3-compatible server on 127.0.0.1 (see the `s3_server` fixture)."""

    def __init__(self):
        import socket

        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def bucket(self, name: str | None = None) -> str:
        """A new, empty bucket; returns its URI, s3://NAME."""
        import uuid

        name = name or f"bucket-{uuid.uuid4().hex[:10]}"
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket_uri: str, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix`, all pages."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket_uri[len("s3://"):], Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on a free 127.0.0.1 port, for the whole session, reached
    as users reach one: `$AWS_ENDPOINT_URL` and credentials in the environment (set here for the
    session, so local Rays and simulated cluster nodes started later inherit them; restored after).
    Yields an `S3Server`: `.endpoint`, `.bucket()` (a new bucket's s3:// URI), `.keys(uri)`, `.client`."""
    server = S3Server()
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in (*env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")}
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        os.environ.pop(key, None)
    os.environ.update(env)
    server.server.start()
    try:
        yield server
    finally:
        server.server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
