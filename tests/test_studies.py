"""A study's name is its identity (one spec fingerprint, or an extension the user declares), and a
bare name finds the study from any working directory (the user's index)."""

import os
from pathlib import Path

import pytest
import yaml

from scaling_study import results, studies
from scaling_study.artifacts import Layout
from scaling_study.cli import main
from scaling_study.errors import UserError
from scaling_study.spec import load_spec


def write_spec(folder: Path, spec: dict, file: str = "study.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("a b c\n")
    spec = {**spec, "storage": {"root": str(folder.parent / "studies")}}
    (folder / file).write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / file


def files_under(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def test_fingerprint_is_the_plan_not_where_or_how_fast_it_runs(tmp_path, base_spec):
    first = load_spec(write_spec(tmp_path / "a", base_spec))
    moved = dict(base_spec, description="same study, more workers",
                 pretrain={**base_spec["pretrain"], "num_workers": 2, "log_every": 5},
                 finetune={**base_spec["finetune"], "cpus_per_job": 4, "max_concurrent": 2},
                 tracking={"uri": "http://127.0.0.1:5999"})
    assert studies.fingerprint(load_spec(write_spec(tmp_path / "b", moved))) == studies.fingerprint(first)
    other = dict(base_spec, finetune={**base_spec["finetune"], "lr": 1e-4})
    assert studies.fingerprint(load_spec(write_spec(tmp_path / "c", other))) != studies.fingerprint(first)


def test_a_different_spec_under_a_taken_name_is_refused_unless_it_extends(tmp_path, base_spec):
    first = load_spec(write_spec(tmp_path / "a", base_spec))
    layout = Layout.of(first)
    mine = studies.claim(first, layout)
    assert studies.claim(first, layout) == mine  # the same spec again: nothing new
    more = dict(base_spec, finetune={**base_spec["finetune"], "lr": 1e-4, "seeds": [0, 1]})
    second = load_spec(write_spec(tmp_path / "b", more, "more.yaml"))
    with pytest.raises(UserError) as refused:
        studies.claim(second, Layout.of(second))
    text = str(refused.value)
    assert "\n" not in text and text.startswith(f"{second.file}: name: study 'unit'")
    assert str((tmp_path / "a" / "study.yaml").resolve()) in text
    assert "finetune.lr: 2e-05 -> 0.0001" in text and "finetune.seeds: [0] -> [0, 1]" in text and "--extend" in text
    assert [s["fingerprint"] for s in studies.specs(layout)] == [mine]
    added = studies.claim(second, Layout.of(second), extend=True)
    kept = studies.specs(layout)
    assert [s["fingerprint"] for s in kept] == [mine, added]
    assert kept[1]["file"] == str(Path(second.file).resolve())
    for fp, spec in ((mine, first), (added, second)):
        assert (layout.root / "specs" / f"{fp}.yaml").read_text() == Path(spec.file).read_text()
    studies.claim(second, Layout.of(second))  # extended once: its spec belongs to the study now


def test_run_refuses_a_different_spec_before_writing_anything(tmp_path, base_spec, capsys):
    first = load_spec(write_spec(tmp_path / "a", base_spec))
    studies.claim(first, Layout.of(first))
    changed = write_spec(tmp_path / "b", dict(base_spec, model_sizes=["debug"]), "other.yaml")
    before = files_under(tmp_path / "studies")
    assert main(["run", str(changed), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other.yaml: name: study 'unit'" in err and "a/study.yaml" in err
    assert 'model_sizes: ["debug", "tiny"] -> ["debug"]' in err
    assert files_under(tmp_path / "studies") == before


def test_a_bare_name_finds_the_study_from_any_working_directory(tmp_path, base_spec, monkeypatch):
    study = load_spec(write_spec(tmp_path / "a", base_spec))
    layout = Layout.of(study)
    studies.claim(study, layout)
    (layout.mlflow).mkdir(parents=True)
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{layout.mlflow / 'mlflow.db'}").search_experiments()  # an empty MLflow store
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert studies.where("unit") == studies.Whereabouts(str(tmp_path / "studies"), str(Path(study.file).resolve()))
    assert results.locate("unit") == (f"sqlite:///{layout.mlflow / 'mlflow.db'}", "unit")
    # a study of that name under ./studies comes first; --root (root=) overrides both
    (elsewhere / "studies" / "unit").mkdir(parents=True)
    assert studies.root_of("unit", None) == "studies"
    assert studies.root_of("unit", tmp_path / "studies") == str(tmp_path / "studies")
    with pytest.raises(UserError, match="no results at"):
        results.locate("unit")
    assert studies.where("nobody") is None and studies.root_of("nobody", None) == "studies"


def test_mlflow_tracking_uri_is_honoured_where_a_uri_is_read(tmp_path, base_spec, monkeypatch):
    study = load_spec(write_spec(tmp_path / "a", base_spec))
    studies.claim(study, Layout.of(study))
    assert studies.tracking_uri(study) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert studies.tracking_uri(study) == "http://127.0.0.1:5999"
    assert results._source("unit", None, None).uri == "http://127.0.0.1:5999"
    assert results._source(study.file, None, None).uri == "http://127.0.0.1:5999"
    assert results._source("unit", "http://127.0.0.1:6000", None).uri == "http://127.0.0.1:6000"
    tracked = load_spec(write_spec(tmp_path / "b", dict(base_spec, tracking={"uri": "http://127.0.0.1:7000"})))
    assert studies.tracking_uri(tracked) == "http://127.0.0.1:7000"  # the spec's own comes first


def test_the_index_is_a_convenience(tmp_path, base_spec, monkeypatch):
    """A home where the index cannot be written does not stop a run."""
    monkeypatch.setenv("SCALING_STUDY_INDEX", str(tmp_path / "file" / "studies.json"))
    (tmp_path / "file").write_text("not a folder")
    study = load_spec(write_spec(tmp_path / "a", base_spec))
    studies.claim(study, Layout.of(study))
    assert studies.where("unit") is None and os.path.isfile(Layout.of(study).root / studies.RECORD)


def test_the_kept_spec_holds_no_password(tmp_path, base_spec):
    spec = dict(base_spec, tracking={"uri": "http://scaler:TOPSECRET@127.0.0.1:5999"})
    study = load_spec(write_spec(tmp_path / "a", spec))
    layout = Layout.of(study)
    mine = studies.claim(study, layout)
    kept = (layout.root / "specs" / f"{mine}.yaml").read_text()
    assert "TOPSECRET" not in kept and "scaler:***@127.0.0.1" in kept
    assert "TOPSECRET" not in (layout.root / studies.RECORD).read_text()
