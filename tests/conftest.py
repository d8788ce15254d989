"""Shared test setup: offline, no telemetry, and a valid study spec to mutate."""

import copy
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["SCALING_STUDY_OFFLINE"] = "1"  # task data and corpora from local mirrors only: no downloads

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
