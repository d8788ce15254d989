"""The study's MLflow records as a user meets them, against a real local MLflow server: the experiment
opens on its runs table, run names lead with what varies, the recipe is in params, learning curves
have a step per epoch, corpus builds and task splits are dataset inputs, no run is left RUNNING, and
an extended study keeps both specs. The runs are logged through `records.Recorder` as the driver
does, without Ray; the last test opens the MLflow UI in headless Chromium."""

import copy
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from scaling_study import records, results, studies
from scaling_study.artifacts import Layout
from scaling_study.cli import main
from scaling_study.grid import expand
from scaling_study.spec import load_spec
from scaling_study.tasks.data import TaskData
from scaling_study.tracking import Tracker

from conftest import BASE_SPEC

SPEC = {**copy.deepcopy(BASE_SPEC), "name": "rec", "model_sizes": ["debug"], "data_volumes": [1.0],
        "tasks": {"include": ["scierc_re"], "max_train_examples": 50},
        "external_models": [{"name": "ext-bert", "source": "bert-base-cased", "num_parameters": 108_310_272}]}
MANIFEST = {"node_id": "", "documents": 300, "tokens": 40_000, "sequences": 600, "vocab_size": 900, "seq_len": 64,
            "tokenizer_hash": "ab" * 32, "dropped_tokens": 12}


def task_data(task) -> TaskData:
    """A few relation examples per split, as `load_task_data` returns them."""
    from collections import Counter as Notes

    splits = {split: [{"text": f"[[ a{i} ]] uses << b{i} >>", "label": task.labels[i % len(task.labels)]}
                      for i in range(n)] for split, n in (("train", 6), ("dev", 3), ("test", 4))}
    return TaskData(task=task, splits=splits, files={s: f"/data/scierc_re/{s}.jsonl" for s in splits},
                    full_sizes={"train": 1861, "dev": 275, "test": 551}, notes={s: Notes() for s in splits})


def result(task, epochs: int, f1: float, config: dict) -> dict:
    return {"task": task.id, "metric": task.metric, "epochs": epochs, "dev": {"f1": f1 - 0.02},
            "test": {"f1": f1}, "train_loss": 0.4, "collapse": False, "collapse_reasons": [], "config": config}


@pytest.fixture(scope="module")
def logged(server, tmp_path_factory):
    """One study logged as the driver logs it: corpus, pretraining, external model, every finetune job
    of one checkpoint and of the external model; the second checkpoint's jobs never start."""
    from scaling_study.finetune import ALGORITHM, FinetuneConfig

    folder = tmp_path_factory.mktemp("rec")
    (folder / "corpus.txt").write_text("a b c\n")
    path = folder / "rec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "storage": {"root": str(folder / "studies")}}))
    study = load_spec(path)
    plan, layout = expand(study), Layout.of(study)
    studies.claim(study, layout)
    recorder = records.Recorder(Tracker(server.uri, "rec"), study, plan, layout)
    recorder.open()
    corpus, pretrain = plan.of_kind("corpus")[0], plan.of_kind("pretrain")[0]
    pretrain_run = recorder.run_of(pretrain)  # launched before its corpus is built, as the driver does
    recorder.corpus_done(corpus, {**MANIFEST, "node_id": corpus.id})
    task = study.tasks["scierc_re"]
    config = {**dataclasses.asdict(FinetuneConfig.from_spec(study.spec.finetune)), **ALGORITHM}
    first = plan.of_kind("checkpoint")[0]
    for run_node in [r for r in plan.of_kind("finetune_run") if r.parents[0] in (first.id, *[
            m.id for m in plan.of_kind("external")])]:
        cells = recorder.finetune_cells(run_node, "/x")
        curve = records.EpochLogger(server.uri, cells)
        for epoch, dev in ((1, 0.30), (2, 0.35)):
            curve({"epoch": epoch, "train_loss": 1.0 / epoch, "end_train_loss": 0.9 / epoch, "lr": 1e-5 * epoch,
                   "dev_f1": dev, "train_seconds": 1.0})
        for level, run_id in cells.items():
            records.log_cell(server.uri, run_id, result(task, int(level), 0.3 + 0.05 * int(level), config), folder,
                             datasets=records.task_datasets(task, task_data(task)))
    recorder.close(failed=False)
    runs = Tracker(server.uri, "rec").search()
    return study, plan, recorder, pretrain_run, {r.data.tags["node_id"]: r for r in runs}


def test_experiment_opens_as_model_development(logged):
    _, _, recorder, _, _ = logged
    tags = recorder.tracker.client.get_experiment(recorder.tracker.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_names_lead_with_the_factors_that_vary(logged):
    study, plan, recorder, _, runs = logged
    assert recorder.varying == {"model", "steps", "epochs", "model_size"}  # one task, seed and volume
    names = {runs[n.id].info.run_name for n in plan.of_kind("finetune") if n.id in runs}
    assert "2 ep | 10 steps | debug | scierc_re | seed 0 | 100%" in names
    assert "2 ep | ext-bert | scierc_re | seed 0" in names
    varying = frozenset({"task", "seed"})
    cell = next(n for n in plan.of_kind("finetune") if n.factors.get("steps") == 20 and n.factors["epochs"] == 1)
    assert records.run_name(cell, varying) == "scierc_re | seed 0 | 1 ep | 20 steps | debug | 100%"
    assert records.run_name(plan.of_kind("pretrain")[0]) == "debug | 100% | 20 steps"


def test_pretraining_and_finetune_runs_carry_their_recipe(logged):
    study, plan, _, pretrain_run, runs = logged
    params = runs[plan.of_kind("pretrain")[0].id].data.params
    p = study.spec.pretrain
    for key in ("lr", "batch_size", "seq_len", "warmup_fraction", "schedule", "optimizer", "precision", "betas",
                "weight_decay", "mask_rate", "grad_clip", "num_workers", "num_layers", "hidden_size"):
        assert key in params, key
    assert (params["lr"], params["batch_size"], params["seq_len"]) == (str(p.lr), str(p.batch_size), str(p.seq_len))
    assert params["checkpoint_steps"] == "10,20" and params["vocab_size"] == "900"  # the corpus build's real one
    cell = next(n for n in plan.of_kind("finetune") if n.id in runs and n.factors["model_size"] == "debug")
    params = runs[cell.id].data.params
    f = study.spec.finetune
    assert (params["lr"], params["batch_size"], params["max_seq_len"]) == (str(f.lr), str(f.batch_size),
                                                                           str(f.max_seq_len))
    assert (params["optimizer"], params["schedule"], params["select"]) == ("adamw", "linear", "best_dev")
    assert {"task", "epochs", "seed", "steps"} <= set(params)  # the factor levels stay
    external = runs[plan.of_kind("external")[0].id].data.params
    assert (external["source"], external["num_parameters"]) == ("bert-base-cased", "108310272")


def test_dev_metrics_per_epoch_make_learning_curves(logged, server):
    from mlflow.tracking import MlflowClient

    _, plan, _, _, runs = logged
    client = MlflowClient(server.uri)
    for cell in plan.of_kind("finetune"):
        if cell.id not in runs:
            continue
        history = client.get_metric_history(runs[cell.id].info.run_id, "epoch/dev_f1")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
            [(1, 0.30), (2, 0.35)][:cell.factors["epochs"]]
        assert runs[cell.id].data.metrics["dev_f1"] == pytest.approx(0.28 + 0.05 * cell.factors["epochs"])
    df = results.load("rec", tracking_uri=server.uri, use_cache=False)
    assert not [c for c in df.columns if c.startswith("epoch/")]  # curves are not result columns


def test_corpus_build_and_task_splits_are_dataset_inputs(logged):
    _, plan, _, pretrain_run, runs = logged
    corpus = plan.of_kind("corpus")[0]
    inputs = runs[plan.of_kind("pretrain")[0].id].inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "toy/100%" and dataset.digest == corpus.id.split("-", 1)[1][:16]
    assert json.loads(dataset.profile)["tokens"] == 40_000
    assert json.loads(dataset.source)["uri"].startswith("file:///") and dataset.source_type == "local"
    cell = next(n for n in plan.of_kind("finetune") if n.id in runs)
    splits = {i.dataset.name: ({t.key: t.value for t in i.tags}["mlflow.data.context"], json.loads(i.dataset.profile))
              for i in runs[cell.id].inputs.dataset_inputs}
    assert set(splits) == {"scierc_re/train", "scierc_re/dev", "scierc_re/test"}
    assert splits["scierc_re/train"][0] == "train" and splits["scierc_re/train"][1]["num_rows"] == 6
    assert splits["scierc_re/test"][1]["num_rows_in_file"] == 551


def test_no_run_is_left_running(logged, capsys):
    _, plan, recorder, _, runs = logged
    status = Counter((r.data.tags["node_kind"], r.info.status) for r in runs.values())
    assert ("external", "FINISHED") in status and ("study", "FINISHED") in status
    assert not [k for k in status if k[1] == "RUNNING"]
    # the pretraining run was never finished by its task: the driver ended before it did
    assert runs[plan.of_kind("pretrain")[0].id].info.status == "KILLED"
    assert main(["status", "rec", "--tracking-uri", recorder.uri, "--format", "json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["finetune"]["FINISHED"] == sum(1 for n in plan.of_kind("finetune") if n.id in runs)
    assert "RUNNING" not in counts.get("external", {})


def test_an_extended_study_keeps_both_specs(logged, tmp_path):
    study, plan, recorder, _, _ = logged
    client = recorder.tracker.client
    more = yaml.safe_load(Path(study.file).read_text())
    more["finetune"]["seeds"] = [0, 1]
    path = Path(study.file).with_name("rec-more.yaml")
    path.write_text(yaml.safe_dump(more))
    extended = load_spec(path)
    fingerprints = [studies.fingerprint(study), studies.claim(extended, Layout.of(extended), extend=True)]
    again = records.Recorder(Tracker(recorder.uri, "rec"), extended, expand(extended), Layout.of(extended))
    assert again.open() == recorder.study_run
    logged_specs = {a.path for a in client.list_artifacts(recorder.study_run, "specs")}
    assert logged_specs == {f"specs/{fp}.yaml" for fp in fingerprints}
    assert client.get_run(recorder.study_run).data.tags["spec_fingerprints"] == ",".join(fingerprints)


EXPAND = """(() => {
    const more = [...document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]')]
        .filter(b => !b.dataset.clicked);
    more.forEach(b => { b.dataset.clicked = 1; b.click(); });
    return more.length; })()"""
"""Click every run's expander in the runs table once (nested runs: study > pretraining run > finetune job)."""


def _evaluate(browser, session, expression: str):
    reply = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
    return reply["result"].get("value")


def _runs_table(browser, session, names: list[str], timeout: float = 120) -> dict:
    """Poll the MLflow UI page, expanding nested runs, until every one of `names` shows (or time is up);
    returns the page's text and location."""
    probe = "JSON.stringify({text: document.body ? document.body.innerText : '', hash: location.hash})"
    deadline = time.monotonic() + timeout
    while True:
        page = json.loads(_evaluate(browser, session, probe) or '{"text": "", "hash": ""}')
        if all(name in page["text"] for name in names) or time.monotonic() > deadline:
            return page
        _evaluate(browser, session, EXPAND)
        time.sleep(1)


@pytest.mark.slow
def test_the_mlflow_ui_opens_on_the_runs_table(logged, server, tmp_path):
    """Headless Chromium on the page `records.ui_url` gives: the runs table with every run of the study,
    nested, not MLflow 3's GenAI overview. The screenshot (runs-table.png in tmp_path) is for a person."""
    import base64

    from test_report import Chromium, chromium

    if chromium() is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    _, plan, recorder, _, runs = logged
    names = [run.info.run_name for run in runs.values()]
    browser = Chromium(chromium(), tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": 1800, "height": 1000, "deviceScaleFactor": 1,
                                                            "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": records.ui_url(server.uri, recorder.tracker.experiment_id)},
                     session=session)
        page = _runs_table(browser, session, names)
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        (tmp_path / "runs-table.png").write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    assert "Detect Issues" not in page["text"] and "/overview" not in page["hash"], page["hash"]
    assert f"{len(runs)} matching runs" in page["text"], page["text"][:2000]
    assert [n for n in names if n not in page["text"]] == [], page["text"][:3000]
