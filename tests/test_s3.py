"""A micro study end to end on a real S3-compatible server: moto's, on 127.0.0.1 (conftest's
`s3_server`), behind `storage.root: s3://BUCKET/studies` and `tasks.data_dir: s3://BUCKET/tasks`,
found the way users point at one, through `$AWS_ENDPOINT_URL` (credentials in the environment).

The study's one pretraining worker (a Ray task) is SIGKILLed while it uploads its first checkpoint,
before the marker (`trainer_state.pt`) goes up (`scaling_study.faults` point `upload`): that
checkpoint counts as absent, Ray runs the task again, which resumes from what storage holds
(nothing yet) and redoes it, in the same invocation. Then `results`, `report` and `ui` read the study from another
machine (an empty cache), given its name and `--root s3://...`, or its spec.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, micro_corpus, needs_mirror

pytestmark = [pytest.mark.slow, needs_mirror("datasets"), needs_mirror("corpus")]


def s3_spec(folder: Path, bucket: str) -> Path:
    """tests/test_orchestration.py's micro study cut to one cell (one checkpoint, task and epochs
    level), all on S3."""
    from test_cluster_sim import TASK
    from test_orchestration import micro_spec

    path = micro_spec(folder, name="s3")
    spec = yaml.safe_load(path.read_text())
    spec["pretrain"]["steps"] = [10]
    spec["finetune"]["epochs"] = [1]
    spec["tasks"].update(include=[TASK], data_dir=f"{bucket}/tasks")
    spec["storage"]["root"] = f"{bucket}/studies"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def s3_study(s3_server, tmp_path_factory):
    from test_cluster_sim import upload_task

    from scaling_study import faults
    from scaling_study.orchestration import run_study
    from scaling_study.spec import load_spec

    folder = tmp_path_factory.mktemp("s3")
    bucket = s3_server.bucket()
    upload_task(s3_server, bucket)
    micro_corpus(folder)
    study = load_spec(s3_spec(folder, bucket))
    marker = folder / "fired"
    with pytest.MonkeyPatch.context() as mp:  # the local Ray's workers inherit these
        mp.setenv("SCALING_STUDY_CACHE", str(folder / "cache"))
        mp.setenv(faults.ENV, "upload=trainer_state.pt:kill")
        mp.setenv(faults.ENV_ONCE, str(marker))
        summary = run_study(study, progress=False)
    yield {"study": study, "summary": summary, "bucket": bucket, "marker": marker, "folder": folder,
           "cache": folder / "cache"}


def test_the_study_runs_on_s3_and_redoes_the_checkpoint_whose_upload_was_killed(s3_study, s3_server):
    from mlflow.tracking import MlflowClient

    from scaling_study.artifacts import Layout, done_nodes
    from scaling_study.grid import expand

    study, summary, bucket = s3_study["study"], s3_study["summary"], s3_study["bucket"]
    assert s3_study["marker"].exists(), "the upload was never killed"
    assert summary.ok, summary.failures
    assert summary.root == f"{bucket}/studies/s3" and summary.trained == 3  # corpus, pretraining, the trial
    keys = s3_server.keys(bucket, "studies/s3/")
    rel = [k[len("studies/s3/"):] for k in keys]
    assert sum(k.endswith("/trainer_state.pt") for k in rel) == 1 and sum(k.endswith("/DONE.json") for k in rel) == 1
    assert sum(k.startswith("corpus/") and k.endswith("/manifest.json") for k in rel) == 1
    assert "mlflow/mlflow.db" in rel and not any(".tmp" in k for k in rel)
    plan = expand(study)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALING_STUDY_CACHE", str(s3_study["cache"]))
        layout = Layout.of(study)
        assert done_nodes(layout, plan) == frozenset(plan.nodes)
        client = MlflowClient(f"sqlite:///{layout.mlflow / 'mlflow.db'}")
    run = next(r for r in client.search_runs([client.get_experiment_by_name("s3").experiment_id])
               if r.data.tags["node_kind"] == "pretrain")
    history = sorted((m.timestamp, m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    # killed with step 10's checkpoint up but its marker not: it was not resumed from, it was redone
    assert [step for _, step, _ in history] == [5, 10, 5, 10]
    first, again = {s: v for _, s, v in history[:2]}, {s: v for _, s, v in history[2:]}
    assert max(abs(first[s] - again[s]) for s in (5, 10)) <= 1e-6


def test_a_rerun_on_another_machine_trains_nothing(s3_study, tmp_path, monkeypatch):
    """A new driver machine (an empty cache): storage says what is done, the stored MLflow database
    comes down, so no run is added either."""
    from scaling_study.orchestration import run_study

    from test_cluster_sim import mlflow_runs

    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp_path / "elsewhere"))
    before = s3_study["study"]
    again = run_study(before, progress=False)
    assert again.ok and again.trained == 0
    runs = mlflow_runs(before)
    assert len(runs) == 4 and len({r.data.tags["node_id"] for r in runs}) == 4  # study, corpus, pretrain, the cell


def test_results_report_and_ui_by_name_and_by_spec_from_another_machine(s3_study, tmp_path, monkeypatch, capsys):
    from scaling_study.cli import main
    from scaling_study.tracking import _free_port

    root = f"{s3_study['bucket']}/studies"
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp_path / "laptop"))  # nothing of the study here yet
    assert main(["results", "s3", "--root", root, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["test_f1"] is not None and rows[0]["task"] == "scierc_re"
    assert main(["results", s3_study["study"].file, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert main(["report", "s3", "--root", root, "-o", str(tmp_path / "report.html")]) == 0
    assert "SciERC" in (tmp_path / "report.html").read_text()  # the task by its display name

    port = _free_port("127.0.0.1")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCALING_STUDY_CACHE": str(tmp_path / "another")}
    ui = subprocess.Popen([sys.executable, "-m", "scaling_study.cli", "ui", "s3", "--root", root, "--port", str(port)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ui.stdout.readline()
        assert line.startswith(f"MLflow UI for s3: http://127.0.0.1:{port}"), line + ui.stdout.read()
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=s3"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert json.loads(resp.read())["experiment"]["name"] == "s3"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ui.pid, signal.SIGINT)  # Ctrl-C: the command stops its server and exits
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
    assert ui.returncode == 0
