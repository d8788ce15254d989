"""results.load, loss_curves and `scaling-study results` against a real local MLflow server.

The runs are logged as the study driver logs them (`Tracker.run_for`, `records.log_cell`,
`log_corpus`, the pretraining `MlflowLogger`), with F1 values known in advance; some finetune runs
carry only the grid's factors, as runs logged before `grid.cell_factors` existed do.
"""

import copy
import io
import json

import pandas as pd
import pytest
import yaml

from scaling_study import results, runreader
from scaling_study.cli import main
from scaling_study.grid import cell_factors, expand
from scaling_study.models import count_parameters, mlm_train_flops
from scaling_study.records import log_cell, log_corpus, log_final, parent_run
from scaling_study.pretrain import MlflowLogger
from scaling_study.spec import spec_from_data
from scaling_study.tracking import Tracker

VOCAB = 900  # the corpus build's real vocabulary, smaller than the spec's 1000
TOKENS = {"50%": 5_000, "100%": 10_000}
SPEC = {
    "name": "res",
    "corpus": {"name": "toy", "paths": ["corpus.txt"], "vocab_size": 1000},
    "model_sizes": ["debug"],
    "data_volumes": [0.5, 1.0],
    "pretrain": {"steps": [10, 20], "batch_size": 8, "seq_len": 64},
    "finetune": {"epochs": [1, 2], "seeds": [0]},
    "tasks": {"include": ["bc5cdr_ner", "scierc_re"]},
    "external_models": [{"name": "ext-bert", "source": "bert-base-cased", "num_parameters": 108_310_272}],
}


def true_f1(cell) -> float:
    f = cell.factors
    base = 0.40 if f["model_size"] == "external" else 0.30 + 0.01 * f["steps"]
    return round(base + 0.05 * f["epochs"] + 0.02 * f["seed"] + (0.1 if f["task"] == "scierc_re" else 0.0), 6)


def log_study(uri: str, spec: dict, folder, *, seeds=None, old_style=lambda cell: False, end_time=None) -> dict:
    """Log a synthetic study the way orchestration does; returns {cell id: run id} of the finetune runs."""
    study = spec_from_data(copy.deepcopy(spec))
    plan = expand(study)
    tracker = Tracker(uri, study.spec.name)
    study_run = tracker.run_for(f"study-{study.spec.name}", kind="study", name=study.spec.name)
    if not tracker.client.list_artifacts(study_run):
        (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
        tracker.client.log_artifact(study_run, str(folder / "spec.yaml"))
    for node in plan.of_kind("corpus"):
        run_id = tracker.run_for(node.id, kind="corpus", name="corpus", factors=dict(node.factors), parent_run_id=study_run)
        log_corpus(tracker, run_id, {"tokens": TOKENS[node.factors["data_volume"]], "vocab_size": VOCAB})
    for node in plan.of_kind("pretrain"):
        if tracker.find_run(node.id):
            continue
        run_id = tracker.run_for(node.id, kind="pretrain", name="pt", factors=dict(node.factors),
                                 parent_run_id=study_run, tags={"corpus_id": node.parents[0]})
        for step in (5, 10, 15, 20):
            MlflowLogger(uri, run_id).log_metrics({"loss": 9.0 - step / 10, "tokens_seen": step * 8 * 64.0,
                                                   "mlm_accuracy": step / 100}, step)
        log_final(tracker, run_id, {})
    runs, anchors = {}, {}
    for cell in plan.of_kind("finetune"):
        if seeds is not None and cell.factors["seed"] not in seeds:
            continue
        factors = dict(cell.factors)
        if not old_style(cell):
            volume = cell.factors.get("data_volume")
            factors.update(cell_factors(study, plan, cell, vocab_size=VOCAB, volume_tokens=TOKENS.get(volume)))
        run_id = tracker.run_for(cell.id, kind="finetune", name="ft", factors=factors, tags={"model_source": "/x"},
                                 parent_run_id=parent_run(tracker, plan, cell, study_run, anchors))
        f1 = true_f1(cell)
        collapse = cell.factors["task"] == "scierc_re" and cell.factors["epochs"] == 1
        log_cell(uri, run_id, {"dev": {"f1": f1 - 0.01}, "test": {"f1": f1, "precision": f1}, "train_loss": 0.5,
                                "collapse": collapse, "collapse_reasons": ["majority"] if collapse else []}, folder)
        if end_time is not None:  # a run that ended earlier
            tracker.client.set_terminated(run_id, "FINISHED", end_time=end_time)
        runs[cell.id] = run_id
    return runs


@pytest.fixture(scope="module")
def logged(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("res")
    runs = log_study(server.uri, SPEC, folder, old_style=lambda c: c.factors.get("data_volume") == "50%")
    df = results.load("res", tracking_uri=server.uri, root=folder / "studies")
    return folder, runs, df


def test_column_contract(logged):
    _, runs, df = logged
    study = spec_from_data(copy.deepcopy(SPEC))
    plan = expand(study)
    assert list(df.columns[:len(results.COLUMNS)]) == list(results.COLUMNS)
    assert list(df.columns[-1:]) == ["collapsed"] and df["collapsed"].dtype == bool
    assert {"test_f1", "dev_f1", "test_precision", "train_loss"} <= set(df.columns)
    for col in results.INT_COLUMNS:
        assert df[col].dtype == "Int64", col
    assert df["pretrain_flops"].dtype == "float64" and df["test_f1"].dtype == "float64"
    assert len(df) == len(runs) == 20 and set(df["run_id"]) == set(runs.values())
    assert set(df["study"]) == {"res"} and df["node_id"].notna().all()
    by_node = df.set_index("node_id")
    preset = study.presets["debug"]
    for cell_id in runs:
        cell, row = plan.nodes[cell_id], by_node.loc[cell_id]
        assert row["test_f1"] == pytest.approx(true_f1(cell)) and row["dev_f1"] == pytest.approx(true_f1(cell) - 0.01)
        assert row["collapsed"] == (cell.factors["task"] == "scierc_re" and cell.factors["epochs"] == 1)
        assert (row["task"], row["epochs"], row["seed"]) == (cell.factors["task"], cell.factors["epochs"], 0)
        assert (row["task_type"], row["domain"]) == (study.tasks[row["task"]].type, study.tasks[row["task"]].domain)
        if cell.factors["model_size"] == "external":
            assert (row["model"], row["model_source"], row["parameters"]) == ("ext-bert", "external", 108_310_272)
            for col in ("model_size", "data_volume", "pretrain_tokens", "pretrain_flops", "steps", "tokens"):
                assert pd.isna(row[col]), col
            continue
        volume, steps = cell.factors["data_volume"], cell.factors["steps"]
        # the same for runs that logged these factors and for older runs they are derived for
        assert (row["model"], row["model_source"], row["model_size"]) == (f"debug | {volume}", "pretrained", "debug")
        assert (row["data_volume"], row["steps"], row["tokens"]) == (volume, steps, TOKENS[volume])
        assert row["parameters"] == count_parameters(preset, VOCAB)
        assert row["pretrain_tokens"] == steps * 8 * 64
        assert row["pretrain_flops"] == pytest.approx(mlm_train_flops(preset, VOCAB, 64, steps * 8, 0.15))


def test_pages_smaller_than_the_study(logged, server):
    folder, runs, df = logged
    paged = results.load("res", tracking_uri=server.uri, root=folder / "studies", page_size=3, use_cache=False)
    assert paged.attrs["fetched"] == len(runs) and paged.attrs["mode"] == "full"
    pd.testing.assert_frame_equal(paged, df)


def test_incremental_refresh_equals_a_full_load(server, tmp_path):
    from mlflow.tracking import MlflowClient

    spec = {**copy.deepcopy(SPEC), "name": "incr", "data_volumes": [1.0], "external_models": [],
            "tasks": {"include": ["scierc_re"]}, "finetune": {"epochs": [1, 2], "seeds": [0, 1, 2]}}
    root = tmp_path / "studies"
    load = dict(tracking_uri=server.uri, root=root, overlap_s=0)  # exact counts of what is fetched
    first = log_study(server.uri, spec, tmp_path, seeds=[0, 1], end_time=1_000_000_000_000)  # ended in 2001
    cold = results.load("incr", **load)
    assert cold.attrs["mode"] == "full" and len(cold) == len(first) == 8
    assert (root / "incr" / "cache").is_dir() and cold.attrs["cache"].endswith(".parquet")

    added = log_study(server.uri, spec, tmp_path, seeds=[2])
    client = MlflowClient(server.uri)
    gone = first[sorted(first)[0]]
    client.delete_run(gone)
    warm = results.load("incr", **load)
    assert warm.attrs["mode"] == "incremental" and warm.attrs["fetched"] == len(added) == 4  # only the new runs
    assert gone not in set(warm["run_id"]) and set(added.values()) <= set(warm["run_id"])
    pd.testing.assert_frame_equal(warm, results.load("incr", **load, use_cache=False))
    pd.testing.assert_frame_equal(results.load("incr", **load, refresh=False), warm)
    assert len(results.load("incr", tracking_uri=server.uri, root=root)) == len(warm)  # with the default overlap

    client.restore_run(gone)  # restored: its end time is old, so only the deleted-runs check finds it
    client.set_tag(first[sorted(first)[1]], "x", "1")  # not re-finished: not fetched again
    again = results.load("incr", **load)
    assert gone in set(again["run_id"]) and again.attrs["fetched"] == 1
    pd.testing.assert_frame_equal(again, results.load("incr", **load, use_cache=False))


def test_cache_only_without_a_cache_is_a_clear_error(tmp_path):
    with pytest.raises(results.UserError, match="no results cache at .*allowed: load with refresh"):
        results.load("nothing", root=tmp_path, refresh=False)


def test_loss_curves(logged, server):
    folder, _, _ = logged
    curves = results.loss_curves("res", tracking_uri=server.uri, root=folder / "studies")
    assert list(curves.columns) == ["pretrain_node_id", "model_size", "data_volume", "parameters", "step",
                                    "tokens_seen", "loss", "mlm_accuracy"]
    assert len(curves) == 2 * 4 and set(curves["data_volume"]) == {"50%", "100%"}
    assert (curves["parameters"] == count_parameters(spec_from_data(copy.deepcopy(SPEC)).presets["debug"], VOCAB)).all()
    one = curves[curves["data_volume"] == "50%"]
    assert list(one["step"]) == [5, 10, 15, 20] and list(one["tokens_seen"]) == [s * 512 for s in (5, 10, 15, 20)]
    assert list(one["loss"]) == pytest.approx([9.0 - s / 10 for s in (5, 10, 15, 20)])


def test_select_and_pivot(logged):
    """The paper table's definition: other factors at their largest level, collapsed runs left out, points."""
    _, _, df = logged
    sub = results.select(df, results.parse_where(["task=scierc_re", "model_size=debug", "steps=10,20"]))
    assert len(sub) == 8 and set(sub["task"]) == {"scierc_re"}
    table = results.pivot(sub, "data_volume", "epochs", "test_f1")
    # steps at 20 (the largest): 0.30 + 0.01 x 20 + 0.05 x 2 epochs + 0.1 for scierc_re; 1 epoch collapsed
    assert list(table.columns) == ["data_volume", "2"]
    assert table.set_index("data_volume").loc["50%", "2"] == pytest.approx(70.0)
    assert "pretraining steps 20" in table.attrs["definition"] and "left out (2 of 4 jobs" in table.attrs["definition"]
    table = results.pivot(sub, "data_volume", "epochs", "test_f1", include_collapsed=True)
    assert table.set_index("data_volume").loc["50%", "1"] == pytest.approx(65.0)
    assert "collapsed runs included (2 of 4 jobs)" in table.attrs["definition"]
    assert results.pivot(sub, "data_volume", "epochs", "train_loss").attrs["definition"].startswith(
        "train_loss as logged, mean over seeds")


def _cli(capsys, *args):
    code = main(["results", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_formats(logged, server, capsys, tmp_path):
    folder, _, df = logged
    common = ["res", "--tracking-uri", server.uri, "--root", str(folder / "studies")]
    code, out, err = _cli(capsys, *common, "--pivot", "task", "model", "--format", "csv")
    assert code == 0 and err.startswith("# test_f1 in points (100 x the fraction)")   # stdout stays CSV
    table = pd.read_csv(io.StringIO(out)).set_index("task")
    top = df[(df["steps"].isna() | (df["steps"] == 20)) & (df["epochs"] == 2) & ~df["collapsed"]]
    expected = top.groupby(["task", "model"])["test_f1"].mean() * 100
    assert list(table.columns) == ["debug | 50%", "debug | 100%", "ext-bert"]
    assert table.loc["scierc_re", "ext-bert"] == pytest.approx(expected[("scierc_re", "ext-bert")])
    assert table.loc["bc5cdr_ner", "debug | 100%"] == pytest.approx(expected[("bc5cdr_ner", "debug | 100%")])

    code, out, _ = _cli(capsys, *common, "--where", "task=bc5cdr_ner", "--where", "model_source=external",
                        "--format", "json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 2 and {r["model"] for r in rows} == {"ext-bert"}
    assert set(results.COLUMNS) <= set(rows[0])

    assert _cli(capsys, *common, "--format", "parquet", "-o", str(tmp_path / "r.parquet"))[0] == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r.parquet"), df)

    code, out, _ = _cli(capsys, *common, "--no-refresh", "--pivot", "task", "epochs")
    head, columns = out.splitlines()[:2]
    assert code == 0 and "scierc_re" in out and columns.split() == ["task", "1", "2"]
    assert head.startswith("# test_f1 in points") and "model size debug, data volume 100%, pretraining steps 20" in head


def test_cli_report_on_a_logged_study(logged, server, capsys, tmp_path):
    folder, _, df = logged
    out = tmp_path / "res.html"
    common = ["report", "res", "--tracking-uri", server.uri, "--root", str(folder / "studies"), "-o", str(out)]
    assert main(common) == 0 and capsys.readouterr().out.strip() == f"report: {out}"
    text = out.read_text()
    assert "left out of the table, verdicts and fits" in text and (tmp_path / "res-figures" / "plot-loss.svg").is_file()
    assert "SciERC (RE)" not in text and "<td class='name'>SciERC</td>" in text        # display names
    assert main([*common, "--include-collapsed"]) == 0
    assert f"Collapsed runs: {int(df['collapsed'].sum())} of {len(df)} jobs, included." in out.read_text()


@pytest.mark.parametrize("args, flag, bad", [
    (["--where", "size=tiny"], "--where", "'size'"),
    (["--where", "model_size=huge"], "--where", "'huge'"),
    (["--where", "task"], "--where", "'task'"),
    (["--pivot", "task", "colour"], "--pivot", "'colour'"),
    (["--pivot", "task", "model", "--value", "model_size"], "--value", "model_size"),
    (["--format", "parquet"], "--format parquet", "-o"),
])
def test_cli_errors(logged, server, capsys, args, flag, bad):
    folder, _, _ = logged
    code, out, err = _cli(capsys, "res", "--tracking-uri", server.uri, "--root", str(folder / "studies"),
                          "--no-refresh", *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and flag in err and bad in err and "allowed:" in err
    if "unknown column" in err:
        assert "test_f1" in err and "model_size" in err


def test_sqlite_read_directly_equals_mlflow_reads(logged, server):
    """The SQL reader of a local sqlite store, MLflow's own store, and REST give the same frame."""
    _, _, df = logged
    uri = f"sqlite:///{server.root / 'mlflow.db'}"
    direct = results.load("res", tracking_uri=uri, use_cache=False)
    assert isinstance(runreader.open_reader(uri, "res"), runreader.SqliteReader)
    pd.testing.assert_frame_equal(direct, df)
    pd.testing.assert_frame_equal(results.load("res", tracking_uri=uri, use_cache=False, direct=False), df)
    curves = results.loss_curves("res", tracking_uri=uri)
    pd.testing.assert_frame_equal(curves, results.loss_curves("res", tracking_uri=server.uri))
