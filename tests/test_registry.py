"""The task registry: folders as data, suites, user folders, and precise errors for bad task.yaml files."""

import shutil

import pytest
import yaml

from scaling_study.errors import SpecErrors
from scaling_study.spec import spec_from_data
from scaling_study.tasks.registry import PACKAGED, discover, load_task

from conftest import BASE_SPEC

PAPER12 = {"bc5cdr_ner", "jnlpba_ner", "ncbi_disease_ner", "chemdner_ner", "matsci_ner", "scienceexam_ner",
           "scierc_ner", "coleridge_ner", "chemprot_re", "scierc_re", "paper_field_cls", "battery_cls"}


def test_packaged_tasks_and_suites():
    registry = discover()
    assert set(registry.suites["paper12"]) == PAPER12
    assert "scienceie_ner" in registry.tasks and "scienceie_ner" not in registry.suites["paper12"]
    for tid, task in registry.tasks.items():
        assert task.id == tid
        assert (PACKAGED / tid / "README.md").stat().st_size > 200, f"{tid} has no real card"
        assert set(task.splits) == {"train", "dev", "test"}
    types = {t.type for t in registry.tasks.values()}
    assert types == {"ner", "re", "cls"}
    assert registry.suites["re"] == ["chemprot_re", "scierc_re"]


# counts the mirrored READMEs under shared/datasets give (sentences for NER, examples otherwise)
MIRROR_COUNTS = {
    "bc5cdr_ner": (4560, 4581, 4797), "jnlpba_ner": (17097, 1739, 3856), "matsci_ner": (4402, 511, 546),
    "scierc_ner": (1861, 275, 551), "scierc_re": (3219, 455, 974), "paper_field_cls": (5037, 561, 22399),
}


@pytest.mark.parametrize("tid", sorted(MIRROR_COUNTS))
def test_split_counts_recorded(tid):
    task = discover().tasks[tid]
    assert tuple(task.splits[s].num_examples for s in ("train", "dev", "test")) == MIRROR_COUNTS[tid]


def _copy_task(tmp_path, tid="scierc_re", new_id="my_re", **changes):
    root = tmp_path / "tasks"
    shutil.copytree(PACKAGED / tid, root / new_id)
    data = yaml.safe_load((root / new_id / "task.yaml").read_text())
    data["id"] = new_id
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (root / new_id / "task.yaml").write_text(yaml.safe_dump(data))
    return root


def test_user_folder_adds_a_task_without_code(tmp_path):
    root = _copy_task(tmp_path, suites=["mine"])
    registry = discover([root])
    assert "my_re" in registry.tasks and registry.suites["mine"] == ["my_re"]
    spec = {**BASE_SPEC, "tasks": {"include": ["mine", "bc5cdr_ner"], "registry_paths": [str(root)]}}
    assert set(spec_from_data(spec).tasks) == {"my_re", "bc5cdr_ner"}


@pytest.mark.parametrize("changes,fragment", [
    ({"type": "parsing"}, "type: got 'parsing'; allowed: 'ner', 're' or 'cls'"),
    ({"metric": "entity_f1"}, "metric: does not fit type re"),
    ({"label_scheme": "iobes"}, "label_scheme: got 'iobes'"),
    ({"labels": []}, "labels: empty or repeated labels"),
    ({"splits": {"train": {"file": "t.txt"}}}, "splits: missing split(s) dev, test"),
    ({"format": "xml"}, "format: got 'xml'"),
    ({"version": "one"}, "version: got 'one'"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"name": None}, "name: required field is missing"),
])
def test_bad_task_yaml(tmp_path, changes, fragment):
    root = _copy_task(tmp_path, **changes)
    with pytest.raises(SpecErrors) as info:
        load_task(root / "my_re")
    assert fragment in str(info.value) and "task.yaml" in str(info.value)


def test_task_id_must_match_folder(tmp_path):
    root = _copy_task(tmp_path)
    (root / "my_re").rename(root / "other_re")
    with pytest.raises(SpecErrors, match="id differs from its folder"):
        load_task(root / "other_re")
