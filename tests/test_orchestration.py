"""`scaling-study run` end to end on a real local Ray and a real local MLflow server.

A micro study (debug model, one 300-line corpus file, two tasks capped to a few dozen examples)
keeps each run to a minute or two. The smoke study itself (the README's main job) takes about
4-5 minutes on 2 cores alone, too long for the suite: run it by hand with the README command.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from scaling_study import results
from scaling_study.grid import expand
from scaling_study.artifacts import DONE_FILE, Layout
from scaling_study.orchestration import run_study
from scaling_study.spec import load_spec

from conftest import REPO, SHARED, micro_corpus, needs_mirror

pytestmark = [pytest.mark.slow,
              needs_mirror("datasets")]


def micro_spec(folder: Path, name: str = "micro", **changes) -> Path:
    corpus = micro_corpus(folder)
    spec = {
        "name": name,
        "corpus": {"name": "sci", "paths": ["corpus.txt"], "vocab_size": 1500},
        "model_sizes": ["debug"],
        "data_volumes": ["100%"],
        "pretrain": {"steps": [10, 20], "batch_size": 8, "seq_len": 64, "precision": "fp32", "lr": 1e-3,
                     "log_every": 5},
        "finetune": {"epochs": [1, 2], "seeds": [0], "lr": 1e-3, "batch_size": 16, "max_seq_len": 64},
        # relative, as in experiments/: trials run in other working directories (a bug once)
        "tasks": {"include": ["bc5cdr_ner", "scierc_re"], "max_train_examples": 48, "max_dev_examples": 16,
                  "max_test_examples": 32, "data_dir": os.path.relpath(SHARED / "datasets", folder)},
        "storage": {"root": str(folder / "studies")},
        **changes,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def mlflow_runs(study) -> list:
    from mlflow.tracking import MlflowClient

    db = Layout.of(study).mlflow / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(study.spec.name)
    return results.search_all(client, experiment.experiment_id)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    study = load_spec(micro_spec(folder))
    summary = run_study(study, progress=False)
    return study, summary


def test_every_cell_has_a_score(finished):
    study, summary = finished
    assert summary.ok, summary.failures
    plan = expand(study)
    df = results.load(study.file)
    cells = plan.of_kind("finetune")
    assert len(df) == len(cells) == 2 * 2 * 2  # checkpoints x tasks x epochs (x 1 seed)
    assert set(df["node_id"]) == {c.id for c in cells}
    assert df["test_f1"].notna().all() and df["dev_f1"].notna().all()
    assert set(zip(df["steps"], df["task"], df["epochs"])) == {
        (s, t, e) for s in (10, 20) for t in ("bc5cdr_ner", "scierc_re") for e in (1, 2)}


def test_tracking_layout(finished):
    study, _ = finished
    runs = mlflow_runs(study)
    kinds = Counter(r.data.tags["node_kind"] for r in runs)
    assert kinds == {"study": 1, "corpus": 1, "pretrain": 1, "finetune": 8}
    by_node = {r.data.tags["node_id"]: r for r in runs}
    study_run = by_node[f"study-{study.spec.name}"]
    pretrain = next(r for r in runs if r.data.tags["node_kind"] == "pretrain")
    assert pretrain.data.tags["mlflow.parentRunId"] == study_run.info.run_id
    assert "loss" in pretrain.data.metrics and pretrain.data.tags["checkpoint.00000020"].startswith("file://")
    for run in runs:
        if run.data.tags["node_kind"] == "finetune":
            assert run.data.tags["mlflow.parentRunId"] == pretrain.info.run_id
            assert {"task", "epochs", "seed", "model_size", "data_volume", "steps"} <= set(run.data.params)
    assert [a.path for a in study_run_artifacts(study, study_run)] == ["spec.yaml"]


def test_what_the_mlflow_ui_shows(finished):
    """The experiment is model development, no run is left RUNNING, pretraining and finetune runs carry
    their recipe, finetune jobs their learning curves and dataset inputs; checkpoints a model card."""
    from mlflow.tracking import MlflowClient

    study, _ = finished
    client = MlflowClient(f"sqlite:///{Layout.of(study).mlflow / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study.spec.name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = mlflow_runs(study)
    assert {r.info.status for r in runs} == {"FINISHED"}
    pretrain = next(r for r in runs if r.data.tags["node_kind"] == "pretrain")
    assert (pretrain.data.params["lr"], pretrain.data.params["seq_len"]) == ("0.001", "64")
    assert [i.dataset.name for i in pretrain.inputs.dataset_inputs] == ["sci/100%"]
    cell = next(r for r in runs if r.data.tags["node_kind"] == "finetune" and r.data.params["epochs"] == "2")
    assert (cell.data.params["lr"], cell.data.params["optimizer"], cell.data.params["max_seq_len"]) == \
        ("0.001", "adamw", "64")
    assert sorted(m.step for m in client.get_metric_history(cell.info.run_id, "epoch/dev_f1")) == [1, 2]
    task = cell.data.params["task"]
    splits = sorted(i.dataset.name for i in cell.inputs.dataset_inputs)
    assert splits == [f"{task}/{split}" for split in ("dev", "test", "train")]
    assert cell.info.run_name.startswith(f"{task} | 2 ep | ")  # what varies first: task, epochs, steps
    for folder in Layout.of(study).root.glob("pretrain/*/checkpoints/step-*"):
        assert "tokens seen" in (folder / "README.md").read_text()
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 512


def test_external_folders_and_the_control_arm_end_to_end(tmp_path):
    """Issue 15: two local-folder external models, one an uncased folder written as a bare relative
    path (any path that exists is local), one cased with only config.json, weights and vocab.txt and
    its casing from the spec, beside the random-init control arm. Results hold both models and the
    control's cells at steps 0; each tokenizer is as cased as its model."""
    import shutil

    from scaling_study.finetune import build_scratch_model

    texts = micro_corpus(tmp_path).read_text().splitlines()
    build_scratch_model(tmp_path / "models" / "uncased", texts, preset="debug", vocab_size=600, lowercase=True)
    full = build_scratch_model(tmp_path / "full", texts, preset="debug", vocab_size=600, lowercase=False)
    cased = tmp_path / "models" / "cased"
    cased.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(full / name, cased / name)
    vocab = json.loads((full / "tokenizer.json").read_text())["model"]["vocab"]  # as older checkpoints ship it
    (cased / "vocab.txt").write_text("".join(f"{piece}\n" for piece in sorted(vocab, key=vocab.get)))
    spec = micro_spec(tmp_path, "ext", external_models=[
        {"name": "uncased", "source": "models/uncased"},
        {"name": "cased", "source": "models/cased", "do_lower_case": False}])
    data = yaml.safe_load(spec.read_text())
    data["pretrain"].update(steps=[10], random_init=True)
    data["finetune"]["epochs"] = [1]
    data["tasks"]["include"] = ["bc5cdr_ner"]
    spec.write_text(yaml.safe_dump(data))
    summary = run_study(load_spec(spec), progress=False)
    assert summary.ok, summary.failures
    df = results.load(str(spec))
    assert sorted(df["model"]) == ["cased", "debug | 100%", "debug | 100% | no pretraining", "uncased"]
    assert df.set_index("model")["steps"].to_dict()["debug | 100% | no pretraining"] == 0
    assert df["test_f1"].notna().all() and set(df.loc[df["model_source"] == "external", "model"]) == {"cased",
                                                                                                    "uncased"}
    lowercase = {r.data.params.get("model", r.data.tags.get("model")): r.data.tags["tokenizer_lowercase"]
                 for r in mlflow_runs(load_spec(spec)) if r.data.tags["node_kind"] == "finetune"}
    assert lowercase["cased"] == "False" and lowercase["uncased"] == "True"
    assert df.set_index("model").loc["cased", "test_unk_share"] < 0.05  # "Aspirin" stays a word, not [UNK]


def study_run_artifacts(study, run):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{Layout.of(study).mlflow / 'mlflow.db'}").list_artifacts(run.info.run_id)


def test_rerun_trains_nothing_and_adds_no_runs(finished):
    study, _ = finished
    before = sorted(r.info.run_id for r in mlflow_runs(study))
    layout = Layout.of(study)
    stamps = {p: p.stat().st_mtime_ns for p in layout.root.rglob(DONE_FILE)}
    again = run_study(study, progress=False)
    assert again.ok and again.trained == 0
    assert sorted(r.info.run_id for r in mlflow_runs(study)) == before
    assert {p: p.stat().st_mtime_ns for p in layout.root.rglob(DONE_FILE)} == stamps


def test_lost_tracking_is_restored_from_storage(finished):
    """A finished node whose MLflow run is gone (server lost) is logged again, without training."""
    study, _ = finished
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Layout.of(study).mlflow / 'mlflow.db'}")
    victim = next(r for r in mlflow_runs(study) if r.data.tags["node_kind"] == "finetune")
    client.delete_run(victim.info.run_id)
    again = run_study(study, progress=False)
    assert again.trained == 0
    restored = [r for r in mlflow_runs(study) if r.data.tags["node_id"] == victim.data.tags["node_id"]]
    assert len(restored) == 1 and restored[0].data.metrics["test_f1"] == victim.data.metrics["test_f1"]


def test_failed_node_does_not_stop_others(tmp_path, capsys):
    """A task whose data is missing fails; the other task's jobs finish; exit 1 names the failure and its log."""
    from scaling_study.cli import main

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "bc5cdr_ner").symlink_to(SHARED / "datasets" / "bc5cdr_ner")
    path = micro_spec(tmp_path, name="partial")
    spec = yaml.safe_load(path.read_text())
    spec["tasks"]["data_dir"] = str(mirror)
    spec["pretrain"]["steps"] = [10]
    spec["finetune"]["epochs"] = [1]
    path.write_text(yaml.safe_dump(spec))
    code = main(["run", str(path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED finetune_run" in out or "FAILED finetune" in out
    assert "scierc_re" in out and "log:" in out
    assert "UI: scaling-study ui" in out and "Tracking: http" not in out  # the embedded server is gone by now
    df = results.load(str(path))
    assert list(df["task"]) == ["bc5cdr_ner"]


def _wait_for(predicate, timeout: float, proc, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:  # say why: the driver's own last words
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise AssertionError(f"the driver ended (exit {proc.returncode}) before the kill:\n{tail}")
        time.sleep(0.5)
    raise AssertionError("timed out waiting for the study to make progress")


def test_killed_driver_then_rerun_completes(tmp_path):
    import psutil

    path = micro_spec(tmp_path, name="killed")
    study = load_spec(path)
    layout = Layout.of(study)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "scaling_study.cli", "run", str(path), "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    children = []
    try:
        _wait_for(lambda: any(layout.root.rglob(DONE_FILE)), 300, proc, log)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crash would
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(3)  # Ray notices its driver is gone; what is left of what we started, we end
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    finished_before = {p: p.stat().st_mtime_ns for p in layout.root.rglob(DONE_FILE)}
    checkpoints_before = {p: p.stat().st_mtime_ns for p in layout.root.glob("pretrain/*/checkpoints/*/config.json")}
    assert finished_before and checkpoints_before

    summary = run_study(study, progress=False)
    assert summary.ok, summary.failures
    for p, stamp in finished_before.items():
        assert p.stat().st_mtime_ns == stamp, f"{p} was recomputed"
    for p, stamp in checkpoints_before.items():
        assert p.stat().st_mtime_ns == stamp, f"{p} was retrained"
    runs = mlflow_runs(study)
    per_node = Counter(r.data.tags["node_id"] for r in runs)
    assert max(per_node.values()) == 1
    assert set(per_node) >= {n.id for n in expand(study).nodes.values() if n.kind in ("corpus", "pretrain", "finetune")}
    assert all(r.info.status == "FINISHED" for r in runs)



def test_finetune_trials_leave_the_cpus_of_builds_and_pretraining_still_to_finish(tmp_path):
    """Tune hands a finished trial's process the next trial, CPUs and all: trials run only where
    unfinished corpus builds (every CPU) and pretraining runs (their workers' CPUs) leave room."""
    import yaml

    from scaling_study.orchestration import Scheduler
    from scaling_study.studystate import StudyState, node_weights

    path = micro_spec(tmp_path, name="slots")
    data = yaml.safe_load(path.read_text())
    data["model_sizes"] = ["debug", "tiny"]  # two pretraining runs
    data["pretrain"].update(num_workers=2, cpus_per_worker=1)
    path.write_text(yaml.safe_dump(data))
    study = load_spec(path)
    plan = expand(study)
    scheduler = Scheduler(study, plan, Layout.of(study), None, StudyState(plan, node_weights(study, plan)), first=[])
    corpus, runs = plan.of_kind("corpus"), plan.of_kind("pretrain")
    assert len(runs) == 2
    scheduler.refs = {n.id: None for n in corpus + runs}
    assert scheduler.trial_slots({"CPU": 8}) == 0  # the build's passes take every CPU
    scheduler.finished |= {n.id for n in corpus}
    assert scheduler.trial_slots({"CPU": 8}) == 4 and scheduler.trial_slots({"CPU": 3}) == 0
    scheduler.finished.add(runs[0].id)
    assert scheduler.trial_slots({"CPU": 8}) == 6 and scheduler.trial_slots({"CPU": 3}) == 1
    scheduler.finished.add(runs[1].id)
    assert scheduler.trial_slots({"CPU": 8}) == 8 and scheduler.trial_slots({"CPU": 0}) == 1  # a growing cluster
    data["finetune"].update(max_concurrent=3, cpus_per_job=2)
    path.write_text(yaml.safe_dump(data))
    capped = Scheduler(load_spec(path), plan, Layout.of(study), None, scheduler.state, first=[])
    assert capped.trial_slots({"CPU": 8}) == 3 and capped.trial_slots({"CPU": 5}) == 2


def test_adaptive_seeds_run_in_waves_and_reuse_every_job(finished, tmp_path):
    """An adaptive micro study (seeds 2 to 4): every cell gets seeds 0-1, more only where a comparison
    stayed open, always a prefix; packed trials (fewer trials than runs); the decisions in the study
    folder and on the study's MLflow run; a re-run trains nothing; the fixed study with 4 seeds
    trains only the runs the rule skipped. Its corpus build and pretraining run are the `finished`
    study's (the same spec sections, so the same content-addressed nodes): copied, not recomputed."""
    import json
    import shutil

    from scaling_study.artifacts import SEEDS_FILE

    finetune = {"epochs": [1, 2], "lr": 1e-3, "batch_size": 16, "max_seq_len": 64,
                "seeds": {"adaptive": {"min": 2, "max": 4}}}
    study = load_spec(micro_spec(tmp_path, "waves", finetune=finetune))
    plan, layout = expand(study), Layout.of(study)
    built = Layout.of(finished[0])
    for kind in ("corpus", "pretrain"):
        for node in plan.of_kind(kind):
            shutil.copytree(built.node(plan, node), layout.node(plan, node))
    summary = run_study(study, progress=False)
    assert summary.ok, summary.failures
    done = [r for r in plan.of_kind("finetune_run") if layout.has(plan, r, DONE_FILE)]
    assert summary.trained == len(done)  # finetune runs only: the copied build and checkpoints were found
    seeds = {}
    for run in done:
        seeds.setdefault((run.parents[0], run.factors["task"]), []).append(run.inputs["seed"])
    assert len(seeds) == 4 and all(sorted(s) == list(range(len(s))) and len(s) >= 2 for s in seeds.values())
    counts = summary.counts["finetune"]
    assert counts["done"] == 2 * len(done) and counts["done"] + counts["skipped"] == len(plan.of_kind("finetune"))
    decisions = json.loads((layout.root / SEEDS_FILE).read_text())
    assert decisions["rule"]["max"] == 4 and decisions["waves"][0]["seeds"] == 2
    assert len(decisions["comparisons"]) == 8  # steps 10 -> 20 and epochs 1 -> 2, per task and level
    assert sorted(g["seeds"] for g in decisions["groups"]) == sorted(len(s) for s in seeds.values())
    study_run = next(r for r in mlflow_runs(study) if r.data.tags["node_kind"] == "study")
    assert {a.path for a in study_run_artifacts(study, study_run)} == {"spec.yaml", SEEDS_FILE}
    assert len(results.load(study.file)) == 2 * len(done)
    trials = list(layout.root.glob("ray_results/finetune-*/*/params.json"))
    assert 0 < len(trials) < len(done)

    again = run_study(study, progress=False)
    assert again.ok and again.trained == 0
    fixed = load_spec(micro_spec(tmp_path, "waves", finetune={**finetune, "seeds": [0, 1, 2, 3]}))
    grown = run_study(fixed, progress=False)
    assert grown.ok and grown.trained == len(plan.of_kind("finetune_run")) - len(done)
