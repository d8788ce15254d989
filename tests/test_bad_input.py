"""Bad input through the command line, as a user meets it: task folders, dataset files, corpus files.

    pytest tests/test_bad_input.py
    python tests/test_bad_input.py     # the rows of docs/reliability.md: each case and today's message

Every case runs a real `scaling-study` verb (`tasks list|check`, `validate`, `run`) in-process on a
broken input written into a temporary folder and checks what the user gets: exit code 2, one line
per problem on stderr, `scaling-study: error: FILE[:LINE]: problem; allowed: ...` naming the file
(and line where there is one), no traceback, and not one file created or changed in the folder
(storage root, download cache). A few cases repeat through a real subprocess. Spec-file cases live
in tests/test_spec.py and tests/test_spec_fuzz.py; parser fuzzing in tests/test_loader_fuzz.py.
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from scaling_study.cli import main
from scaling_study.sources import MAX_DOCUMENT_BYTES
from scaling_study.tasks.loaders import MAX_LINE_CHARS
from scaling_study.tasks.registry import PACKAGED

from conftest import REPO

CONLL = "Aspirin\tB-Chemical\ncauses\tO\nrenal\tB-Disease\nfailure\tI-Disease\n\nOK\tO\n"
LONG = MAX_LINE_CHARS + 10


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALING_STUDY_OFFLINE", "1")
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SCALING_STUDY_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------------- inputs


def task_folder(root: Path, tid: str = "toy", base: str = "bc5cdr_ner", edit: Callable[[dict], None] | None = None,
                text: str | None = None) -> Path:
    """`<root>/reg/<tid>/task.yaml`: a packaged task renamed (and edited), or the given text."""
    folder = root / "reg" / tid
    shutil.copytree(PACKAGED / base, folder)
    data = yaml.safe_load((folder / "task.yaml").read_text())
    data["id"] = tid
    for split in data["splits"].values():
        split.pop("num_examples", None)
    if edit:
        edit(data)
    (folder / "task.yaml").write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    return root / "reg"


def data_files(root: Path, files: dict[str, str | bytes], tid: str = "toy", default: str = CONLL,
               names=("train.tsv", "dev.tsv", "test.tsv")) -> Path:
    """`<root>/data/<tid>/`: the split files, `default` where `files` gives none."""
    folder = root / "data" / tid
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        content = files.get(name, default)
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return root / "data"


SCIERC_TASK = {"format": "scierc_json", "format_options": {"target": "ner"}, "labels": ["Method", "Task"],
               "splits": {s: {"file": f"{s}.json"} for s in ("train", "dev", "test")}}
SCIERC_DOC = json.dumps({"doc_key": "d", "sentences": [["We", "use", "CNNs", "."]], "ner": [[[2, 2, "Method"]]],
                         "relations": [[]]})
CSV_TASK = {"type": "cls", "label_scheme": "labels", "metric": "macro_f1", "labels": ["0", "1"], "format": "text_label",
            "format_options": {"separator": ",", "text_column": "abstract", "label_column": "label",
                               "quirks": ["csv_header_named_columns", "csv_quoted_fields"]},
            "splits": {s: {"file": f"{s}.csv"} for s in ("train", "dev", "test")}}
CSV = 'doi,abstract,label\n1,"a, b",1\n2,c,0\n'
JSONL = '{"text": "we use << CNNs >> for [[ parsing ]] .", "label": "USED-FOR", "metadata": [2, 2, 4, 4]}\n'


def check_data(root: Path, files: dict, *, base: str = "bc5cdr_ner", task: dict | None = None,
               names=("train.tsv", "dev.tsv", "test.tsv"), default: str = CONLL) -> list[str]:
    """`tasks check toy` over a task folder and its data files."""
    reg = task_folder(root, base=base, edit=(lambda d: d.update(task)) if task else None)
    data = data_files(root, files, names=names, default=default)
    return ["tasks", "check", "toy", "--registry-path", str(reg), "--data-dir", str(data), "--offline"]


SPEC = {"name": "bad", "corpus": {"name": "toy", "paths": ["corpus"], "vocab_size": 1000},
        "model_sizes": ["debug"], "data_volumes": [1.0],
        "pretrain": {"steps": [10], "batch_size": 8, "seq_len": 64, "precision": "fp32"},
        "finetune": {"epochs": [1], "seeds": [0]},
        "tasks": {"include": ["toy"], "registry_paths": ["reg"], "data_dir": "data"},
        "storage": {"root": "store"}}


def run_with_corpus(root: Path, files: dict[str, str | bytes], paths=("corpus",)) -> list[str]:
    """`run` on a small study whose corpus folder holds `files` (valid task data)."""
    (root / "corpus").mkdir(exist_ok=True)
    for name, content in files.items():
        (root / "corpus" / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    task_folder(root)
    data_files(root, {})
    spec = {**SPEC, "corpus": {**SPEC["corpus"], "paths": list(paths)}}
    (root / "study.yaml").write_text(yaml.safe_dump(spec))
    return ["run", str(root / "study.yaml"), "--quiet"]


def run_with_data(root: Path, files: dict) -> list[str]:
    argv = run_with_corpus(root, {"a.txt": "one document\nanother one\n"})
    data_files(root, files)
    return argv


def run_with_external(root: Path, source: str, folders: tuple[str, ...] = ()) -> list[str]:
    """`run` on a small study with one external model from `source`, beside `folders` that exist."""
    argv = run_with_corpus(root, {"a.txt": "one document\nanother one\n"})
    for folder in folders:
        (root / folder).mkdir(parents=True)
    spec = yaml.safe_load((root / "study.yaml").read_text())
    (root / "study.yaml").write_text(yaml.safe_dump({**spec, "external_models": [{"name": "mine", "source": source}]}))
    return argv


def validate_with_task(root: Path, edit: Callable[[dict], None]) -> list[str]:
    task_folder(root, edit=edit)
    (root / "study.yaml").write_text(yaml.safe_dump(SPEC))
    return ["validate", str(root / "study.yaml")]


def unreadable(path: Path, monkeypatch) -> None:
    """A file the user cannot read: mode 000, or (as root, who reads anything) an injected EACCES."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real = builtins.open
    target = str(path.resolve())

    def guarded(file, *args, **kw):
        if isinstance(file, (str, Path)) and str(Path(file).resolve()) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


# ----------------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    category: str
    input: str
    setup: Callable[[Path], list[str]]
    expect: tuple[str, ...]
    """Fragments of the error line; `{tmp}` is the test's folder."""
    lines: int = 1
    fault: str | None = None  # a file made unreadable after setup


def _long_jsonl() -> str:
    return json.dumps({"text": "x " * (LONG // 2) + "<< a >> [[ b ]]", "label": "USED-FOR"}) + "\n"


CASES = [
    # task folders: `tasks list --registry-path` reads every task.yaml; `validate` reads a spec's registry_paths
    Case("task-yaml-syntax", "task folder", "task.yaml with an unclosed bracket",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(t, text="id: [toy\nname: x\n"))],
         ("reg/toy/task.yaml:2: <top level>: YAML syntax error", "allowed: valid YAML")),
    Case("task-yaml-empty", "task folder", "empty task.yaml",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(t, text=""))],
         ("reg/toy/task.yaml: <top level>: empty file; allowed: a mapping with id, name",)),
    Case("task-yaml-not-utf8", "task folder", "task.yaml in Latin-1",
         lambda t: _latin1_task(t), ("reg/toy/task.yaml: <top level>: not UTF-8 text",)),
    Case("task-yaml-list", "task folder", "task.yaml holding a list",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(t, text="- id: toy\n"))],
         ("reg/toy/task.yaml:1: <top level>: expected a mapping",)),
    Case("task-duplicate-key", "task folder", "task.yaml with `labels` twice",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(t, text=yaml.safe_dump(
             {"id": "toy"}) + "labels: [A]\nlabels: [B]\n"))], ("task.yaml:3: labels: duplicate key (first on line 2)",)),
    Case("task-missing-splits", "task folder", "splits without dev and test",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(
             t, edit=lambda d: d.update(splits={"train": d["splits"]["train"]})))],
         ("task.yaml:", "splits: missing split(s) dev, test", "allowed: train, dev and test")),
    Case("task-unknown-split", "task folder", "a `validation` split besides train/dev/test",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(
             t, edit=lambda d: d["splits"].update(validation=d["splits"]["dev"])))],
         ("splits: unknown split name; got ['validation']",)),
    Case("task-unknown-label-scheme", "task folder", "label_scheme: iobes",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(t, edit=lambda d: d.update(label_scheme="iobes")))],
         ("label_scheme: got 'iobes'; allowed: 'iob1', 'iob2' or 'labels'",)),
    Case("task-scheme-vs-type", "task folder", "label_scheme: labels on a ner task",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(t, edit=lambda d: d.update(label_scheme="labels")))],
         ("label_scheme: does not fit type ner; got 'labels'; allowed: iob1 or iob2 for ner",)),
    Case("task-unknown-option", "task folder", "format_options.sep (a typo)",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(
             t, edit=lambda d: d["format_options"].update(sep="\t")))],
         ("task.yaml:", "format_options.sep: unknown option", "allowed: for format conll: token_column")),
    Case("task-unknown-quirk", "task folder", "a quirk the loader does not know",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(
             t, edit=lambda d: d["format_options"].update(quirks=["made_up"])))],
         ("format_options.quirks[0]: unknown quirk; got 'made_up'; allowed: for format conll:",)),
    Case("task-bad-separator", "task folder", 'separator: ";" for conll',
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(
             t, edit=lambda d: d["format_options"].update(separator=";")))],
         ("format_options.separator: invalid value; got ';'",)),
    Case("task-token-is-tag-column", "task folder", "conll token_column 1 with tag_column 1",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(
             t, edit=lambda d: d["format_options"].update(token_column=1)))],
         ("format_options.token_column: the tag column; got 1; allowed: a column other than tag_column (1)",)),
    Case("task-format-vs-type", "task folder", "format text_label on a ner task",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(
             t, edit=lambda d: d.update(format="text_label", format_options={"text_column": 0, "label_column": 1})))],
         ("format: does not fit type ner; got 'text_label'; allowed: conll or scierc_json for ner",)),
    Case("task-id-folder", "task folder", "id differs from the folder name",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(t, edit=lambda d: d.update(id="other")))],
         ("id: id differs from its folder; got 'other'",)),
    Case("task-bad-type-field", "task folder", "version: one (not an integer)",
         lambda t: ["tasks", "list", "--registry-path", str(task_folder(t, edit=lambda d: d.update(version="one")))],
         ("version: got 'one'; allowed: a valid integer",)),
    Case("registry-path-missing", "task folder", "--registry-path to a folder that does not exist",
         lambda t: ["tasks", "list", "--registry-path", str(t / "nowhere")],
         ("nowhere: not a folder; allowed: a folder of task folders",)),
    Case("spec-with-bad-task", "task folder", "validate: a spec whose registry_paths holds a bad task",
         lambda t: validate_with_task(t, lambda d: d.update(metric="micro_f1")),
         ("reg/toy/task.yaml:", "metric: does not fit type ner; got 'micro_f1'",)),
    # dataset files: `tasks check` reads every split of the task
    Case("conll-columns", "dataset file", "a conll line with 3 columns where the file has 2",
         lambda t: check_data(t, {"dev.tsv": "a\tO\nb\tO\textra\n"}),
         ("data/toy/dev.tsv:2: 3 TAB-separated columns, but the file's first token line (line 1) has 2; "
          "allowed: 2 columns on every token line",)),
    Case("conll-one-column", "dataset file", "a conll file with no tag column (wrong separator)",
         lambda t: check_data(t, {"train.tsv": "a O\nb O\n"}),
         ("train.tsv:1: 1 TAB-separated column(s), but token_column 0 and tag_column 1",)),
    Case("conll-unknown-tag", "dataset file", "tag B-Drug outside the label set",
         lambda t: check_data(t, {"test.tsv": "a\tO\nb\tB-Drug\n"}),
         ("test.tsv:2: tag 'B-Drug' is not in the task's label set; allowed: O, or B-/I- (IOB2) with one of the "
          "types Chemical, Disease",)),
    Case("conll-bad-prefix", "dataset file", "tag E-Chemical (IOBES) in an IOB2 file",
         lambda t: check_data(t, {"train.tsv": "a\tE-Chemical\n"}), ("train.tsv:1: tag 'E-Chemical' is not",)),
    Case("conll-iob-violation", "dataset file", "I-Disease after O (IOB2 violation)",
         lambda t: check_data(t, {"dev.tsv": "a\tB-Chemical\nb\tO\nc\tI-Disease\n"}),
         ("dev.tsv:3: I-Disease after O: IOB2 does not allow", "allowed: B-Disease to start an entity")),
    Case("conll-empty-tag", "dataset file", "a token line with an empty tag",
         lambda t: check_data(t, {"train.tsv": "a\tO\nb\t\n"}), ("train.tsv:2: empty tag; allowed:",)),
    Case("data-empty-file", "dataset file", "an empty split file",
         lambda t: check_data(t, {"dev.tsv": ""}), ("dev.tsv: empty file; allowed: a UTF-8 text file",)),
    Case("data-blank-file", "dataset file", "a split file of blank lines",
         lambda t: check_data(t, {"dev.tsv": "\n \n\t\n"}), ("dev.tsv: empty file",)),
    Case("data-only-docstart", "dataset file", "a conll file with only -DOCSTART-",
         lambda t: check_data(t, {"test.tsv": "-DOCSTART-\tO\n\n"}),
         ("test.tsv: no examples in the file; allowed: a conll file with at least one sentence",)),
    Case("data-not-utf8", "dataset file", "Latin-1 bytes on line 3",
         lambda t: check_data(t, {"train.tsv": b"a\tO\nb\tO\ncaf\xe9\tO\n"}),
         ("train.tsv:3: bytes that are not UTF-8 (b'\\xe9\\tO\\n' at byte 11); allowed: UTF-8 text",)),
    Case("data-binary", "dataset file", "a gzip file named train.tsv",
         lambda t: check_data(t, {"train.tsv": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"}),
         ("train.tsv:1: a NUL byte at byte 3: a binary file, or UTF-16/32 text; allowed: UTF-8 text",)),
    Case("data-utf16", "dataset file", "the split saved as UTF-16",
         lambda t: check_data(t, {"dev.tsv": CONLL.encode("utf-16")}), ("dev.tsv:1: a NUL byte at byte 3",)),
    Case("data-long-line", "dataset file", f"a conll line over {MAX_LINE_CHARS:,} characters",
         lambda t: check_data(t, {"dev.tsv": "a\tO\n" + "x" * LONG + "\tO\n"}),
         (f"dev.tsv:2: a line of {LONG + 2:,} characters; allowed: at most {MAX_LINE_CHARS:,} characters per line",)),
    Case("data-unreadable", "dataset file", "a split file the user may not read",
         lambda t: check_data(t, {}), ("dev.tsv: cannot read the file (Permission denied); allowed: a readable",),
         fault="data/toy/dev.tsv"),
    Case("jsonl-not-json", "dataset file", "jsonl_markers: a line that is not JSON",
         lambda t: check_data(t, {"dev.txt": JSONL + "{text: 1}\n"}, base="scierc_re", default=JSONL,
                              names=("train.txt", "dev.txt", "test.txt")),
         ("dev.txt:2: not JSON (Expecting property name enclosed in double quotes at column 2)",)),
    Case("jsonl-unknown-label", "dataset file", "jsonl_markers: label outside the label set",
         lambda t: check_data(t, {"test.txt": JSONL.replace("USED-FOR", "CAUSES")}, base="scierc_re", default=JSONL,
                              names=("train.txt", "dev.txt", "test.txt")),
         ("test.txt:1: label 'CAUSES' is not in the task's label set; allowed: USED-FOR, CONJUNCTION",)),
    Case("jsonl-missing-marker", "dataset file", "jsonl_markers: the [[ ]] argument is not marked",
         lambda t: check_data(t, {"train.txt": JSONL.replace("[[ parsing ]]", "parsing")}, base="scierc_re",
                              default=JSONL, names=("train.txt", "dev.txt", "test.txt")),
         ("train.txt:1: marker '[[' occurs 0 times and ']]' 0 times; allowed: each of << >> [[ ]] exactly once",)),
    Case("jsonl-long-line", "dataset file", f"jsonl_markers: a line of over {MAX_LINE_CHARS:,} characters",
         lambda t: check_data(t, {"train.txt": _long_jsonl()}, base="scierc_re", default=JSONL,
                              names=("train.txt", "dev.txt", "test.txt")),
         ("train.txt:1: a line of", f"allowed: at most {MAX_LINE_CHARS:,} characters per line")),
    Case("jsonl-deep-nesting", "dataset file", "jsonl_markers: a line of 2,000 `[`",
         lambda t: check_data(t, {"train.txt": "[" * 2000 + "\n"}, base="scierc_re", default=JSONL,
                              names=("train.txt", "dev.txt", "test.txt")),
         ("train.txt:1: JSON nested deeper than 20 levels; allowed: one JSON object per line",)),
    Case("jsonl-nested-21", "dataset file", "jsonl_markers: metadata nested 21 deep (parses, refused by the limit)",
         lambda t: check_data(t, {"dev.txt": JSONL.replace("[2, 2, 4, 4]", "[" * 20 + "]" * 20)}, base="scierc_re",
                              default=JSONL, names=("train.txt", "dev.txt", "test.txt")),
         ("dev.txt:1: JSON nested deeper than 20 levels",)),
    Case("jsonl-long-number", "dataset file", "jsonl_markers: a 5,000-digit number",
         lambda t: check_data(t, {"test.txt": JSONL.replace("[2, 2, 4, 4]", "9" * 5000)}, base="scierc_re",
                              default=JSONL, names=("train.txt", "dev.txt", "test.txt")),
         ("test.txt:1: a JSON number too long to read (Exceeds the limit (4300 digits) for integer string "
          "conversion)",)),
    Case("scierc-deep-nesting", "dataset file", "scierc_json: a document line of 2,000 `[`",
         lambda t: check_data(t, {"dev.json": "[" * 2000 + "\n"}, task=SCIERC_TASK, default=SCIERC_DOC,
                              names=("train.json", "dev.json", "test.json")),
         ("dev.json:1: JSON nested deeper than 20 levels; allowed: {\"doc_key\"",)),
    Case("jsonl-crossing-markers", "dataset file", "jsonl_markers: crossing arguments `a [[ b << c ]] d >> e`",
         lambda t: check_data(t, {"train.txt": JSONL.replace("<< CNNs >> for [[ parsing ]]",
                                                             "[[ CNNs << for ]] parsing >>")},
                              base="scierc_re", default=JSONL, names=("train.txt", "dev.txt", "test.txt")),
         ("train.txt:1: the two arguments cross ([[ ... << ... ]] ... >>); allowed: two arguments side by side, "
          "or one inside the other",)),
    Case("conll-token-is-tag-column", "dataset file", "token_column -1 (the last) = tag_column 1 in a 2-column file",
         lambda t: check_data(t, {}, task={"format_options": {"separator": "\t", "token_column": -1, "tag_column": 1}}),
         ("train.tsv:1: 2 TAB-separated columns: token_column -1 and tag_column 1 are the same column",)),
    Case("check-data-dir-missing", "dataset file", "tasks check --data-dir to a folder that does not exist",
         lambda t: [*check_data(t, {})[:-2], str(t / "nowhere"), "--offline"],
         ("--data-dir {tmp}/nowhere: no such folder; allowed: a folder holding one folder per task id",)),
    Case("data-split-is-folder", "dataset file", "a folder where dev.tsv should be",
         lambda t: _odd_split(t, "dev.tsv", os.mkdir), ("data/toy/dev.tsv: the split file is a folder; allowed: a "
                                                        "regular file holding the split",)),
    Case("data-split-is-fifo", "dataset file", "a FIFO (named pipe) where test.tsv should be (a reader would block)",
         lambda t: _odd_split(t, "test.tsv", os.mkfifo), ("data/toy/test.tsv: the split file is a FIFO (named pipe)",)),
    Case("data-split-link-loop", "dataset file", "train.tsv a symbolic link to itself",
         lambda t: _odd_split(t, "train.tsv", lambda p: os.symlink(p, p)),
         ("data/toy/train.tsv: the split file is a symbolic-link loop; allowed: a regular file holding the split",)),
    Case("scierc-span-outside", "dataset file", "scierc_json: an entity span past its sentence",
         lambda t: check_data(t, {"dev.json": SCIERC_DOC.replace("[2, 2,", "[2, 9,")}, task=SCIERC_TASK,
                              default=SCIERC_DOC, names=("train.json", "dev.json", "test.json")),
         ("dev.json:1: entity span [2, 9] outside its sentence (document tokens 0-3)",)),
    Case("scierc-bad-shape", "dataset file", "scierc_json: an entity of 2 items, not [start, end, type]",
         lambda t: check_data(t, {"train.json": SCIERC_DOC.replace('[2, 2, "Method"]', "[2, 2]")}, task=SCIERC_TASK,
                              default=SCIERC_DOC, names=("train.json", "dev.json", "test.json")),
         ("train.json:1: not a SciERC document (ner[0] is not a list of [int, int, label] items)",)),
    Case("scierc-unknown-type", "dataset file", "scierc_json: an entity type outside the label set",
         lambda t: check_data(t, {"test.json": SCIERC_DOC.replace("Method", "Metric")}, task=SCIERC_TASK,
                              default=SCIERC_DOC, names=("train.json", "dev.json", "test.json")),
         ("test.json:1: entity type 'Metric' is not in the label set; allowed: Method, Task",)),
    Case("csv-field-count", "dataset file", "text_label: a row with 2 fields where the header has 3",
         lambda t: check_data(t, {"dev.csv": CSV + "3,d\n"}, task=CSV_TASK, default=CSV,
                              names=("train.csv", "dev.csv", "test.csv")),
         ("dev.csv:4: 2 fields, the first row has 3; allowed: 3 fields per row",)),
    Case("csv-unknown-label", "dataset file", "text_label: label 2 in a 0/1 task",
         lambda t: check_data(t, {"test.csv": CSV + "3,d,2\n"}, task=CSV_TASK, default=CSV,
                              names=("train.csv", "dev.csv", "test.csv")),
         ("test.csv:4: label '2' is not in the task's label set; allowed: 0, 1",)),
    Case("csv-unclosed-quote", "dataset file", "text_label: a quote never closed",
         lambda t: check_data(t, {"train.csv": 'doi,abstract,label\n1,"a, b,1\n'}, task=CSV_TASK, default=CSV,
                              names=("train.csv", "dev.csv", "test.csv")),
         ("train.csv:2: unreadable CSV (unexpected end of data)",)),
    Case("csv-missing-column", "dataset file", "text_label: the header lacks the text column",
         lambda t: check_data(t, {"train.csv": "doi,text,label\n1,a,1\n"}, task=CSV_TASK, default=CSV,
                              names=("train.csv", "dev.csv", "test.csv")),
         ("train.csv:1: text_column 'abstract' is not in the header ['doi', 'text', 'label']; allowed: one of doi, "
          "text, label",)),
    Case("run-bad-task-data", "dataset file", "run: a malformed dev file stops the run before anything starts",
         lambda t: run_with_data(t, {"dev.tsv": "a\tO\nb\tB-Drug\n"}),
         ("data/toy/dev.tsv:2: tag 'B-Drug' is not in the task's label set",)),
    # external models: `run` reads each source as a folder or a hub id before it starts anything
    Case("external-two-readings", "external model", "a source that is a hub id and a missing folder beside the spec",
         lambda t: run_with_external(t, "models/mine", folders=("models",)),
         ("study.yaml: external_models[0].source: reads two ways: the local folder {tmp}/models/mine, which does "
          "not exist (though {tmp}/models does), or the Hugging Face id models/mine; got 'models/mine'; allowed: "
          "./models/mine once that folder exists",)),
    Case("external-no-such-folder", "external model", "a source that is no existing folder and no hub id",
         lambda t: run_with_external(t, "models/bio/mine"),
         ("study.yaml: external_models[0].source: no folder ({tmp}/models/bio/mine does not exist) and no Hugging "
          "Face id; got 'models/bio/mine'; allowed: an existing folder, or a Hugging Face id (name or org/name)",)),
    # corpus files: `run` checks them before it starts Ray, MLflow or writes anything
    Case("corpus-missing", "corpus file", "corpus.paths names a file that does not exist",
         lambda t: run_with_corpus(t, {}, paths=("nope.txt",)),
         ("study.yaml: corpus.paths[0]: no such file or folder: {tmp}/nope.txt; got 'nope.txt'",)),
    Case("corpus-no-text-files", "corpus file", "a corpus folder with no *.txt file",
         lambda t: run_with_corpus(t, {"notes.md": "x\n"}),
         ("study.yaml: corpus.paths[0]: folder {tmp}/corpus holds no *.txt file",)),
    Case("corpus-empty", "corpus file", "an empty corpus file",
         lambda t: run_with_corpus(t, {"a.txt": ""}),
         ("corpus/a.txt: corpus 'toy' has no documents (every file is empty or blank)",)),
    Case("corpus-blank", "corpus file", "corpus files of blank lines only",
         lambda t: run_with_corpus(t, {"a.txt": "\n\n", "b.txt": " \r\n"}),
         ("corpus (2 files): corpus 'toy' has no documents",)),
    Case("corpus-not-utf8", "corpus file", "Latin-1 bytes on line 2",
         lambda t: run_with_corpus(t, {"a.txt": b"fine\ncaf\xe9\n"}),
         ("corpus/a.txt:2: not UTF-8 (byte 0xe9 at byte 4 of the line); allowed: UTF-8 text, one document per line",)),
    Case("corpus-binary", "corpus file", "a gzip file named corpus.txt",
         lambda t: run_with_corpus(t, {"a.txt": b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"}),
         ("corpus/a.txt:1: a NUL byte at byte 4 of the file: a binary file, or UTF-16 text",)),
    Case("corpus-utf16", "corpus file", "the corpus saved as UTF-16",
         lambda t: run_with_corpus(t, {"a.txt": "one document\n".encode("utf-16")}),
         ("corpus/a.txt:1: a NUL byte",)),
    Case("corpus-long-line", "corpus file", f"a line over {MAX_DOCUMENT_BYTES:,} bytes (a file without newlines)",
         lambda t: run_with_corpus(t, {"a.txt": "ok\n" + "x" * (MAX_DOCUMENT_BYTES + 1)}),
         (f"corpus/a.txt:2: a line longer than {MAX_DOCUMENT_BYTES:,} bytes",)),
    Case("corpus-unreadable", "corpus file", "a corpus file the user may not read",
         lambda t: run_with_corpus(t, {"a.txt": "doc\n"}),
         ("corpus/a.txt: cannot read the corpus file (Permission denied); allowed: a readable UTF-8 text file",),
         fault="corpus/a.txt"),
]


def _odd_split(root: Path, name: str, make: Callable[[str], None]) -> list[str]:
    """`tasks check` where one split file's name holds something other than a regular file."""
    argv = check_data(root, {})
    path = root / "data" / "toy" / name
    path.unlink()
    make(str(path))
    return argv


def _latin1_task(root: Path) -> list[str]:
    reg = task_folder(root)
    (reg / "toy" / "task.yaml").write_bytes("id: caf\xe9\n".encode("latin-1"))
    return ["tasks", "list", "--registry-path", str(reg)]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in root.rglob("*")}


def run_case(case: Case, root: Path, capsys, monkeypatch) -> list[str]:
    argv = case.setup(root)
    if case.fault:
        unreadable(root / case.fault, monkeypatch)
    before = _tree(root)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    assert len(lines) == case.lines, err
    assert _tree(root) == before, "bad input left files behind"
    assert not (root / "store").exists() and not (root / "cache").exists()
    for line in lines:
        assert line.startswith("scaling-study: error: ") and "; allowed: " in line, line
    return lines


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    lines = run_case(case, tmp_path, capsys, monkeypatch)
    for fragment in case.expect:
        fragment = fragment.replace("{tmp}", str(tmp_path))
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def test_enough_cases_in_every_category():
    counts = {c: sum(case.category == c for case in CASES) for c in ("task folder", "dataset file", "corpus file")}
    assert counts["task folder"] >= 10 and counts["dataset file"] >= 15 and counts["corpus file"] >= 8, counts
    assert len({c.id for c in CASES}) == len(CASES)


def test_long_lines_under_the_limits_load(tmp_path, capsys):
    """Just under the limits, long lines are read in linear time: one token of ~1M characters and a
    100,000-token sentence without a blank line."""
    token = "x" * (MAX_LINE_CHARS - 20)
    sentence = "".join(f"w{i}\tO\n" for i in range(100_000))
    argv = check_data(tmp_path, {"train.tsv": f"{token}\tB-Chemical\n\n" + sentence})
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train      2 sentences,  100001 words" in out, out


def test_nul_bytes_deep_in_a_corpus_file_are_text(tmp_path):
    """Real text has stray NULs (the science corpus: 74 in one file); only a NUL in a file's first
    BINARY_SNIFF_BYTES makes it binary."""
    from scaling_study.corpus import check_corpus
    from scaling_study.sources import BINARY_SNIFF_BYTES
    from scaling_study.spec import load_spec

    argv = run_with_corpus(tmp_path, {"a.txt": "x" * BINARY_SNIFF_BYTES + "\nstray \0 byte\n"})
    assert [f.path for f in check_corpus(load_spec(argv[1]))] == [str(tmp_path / "corpus" / "a.txt")]


def test_ctrl_c_is_one_line_and_code_130(monkeypatch, capsys):
    from scaling_study import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_presets", interrupted)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "scaling-study: interrupted\n"


def test_doc_lists_every_case():
    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in doc]
    assert not missing, f"docs/reliability.md lacks {missing}: regenerate with `python tests/test_bad_input.py`"


@pytest.mark.parametrize("case_id", ["task-yaml-syntax", "conll-unknown-tag",
                                     pytest.param("corpus-not-utf8", marks=pytest.mark.slow)])  # run imports Ray
def test_through_the_console_script(case_id, tmp_path):
    """The real process: exit code 2, the one line on stderr, no traceback, nothing written."""
    case = next(c for c in CASES if c.id == case_id)
    argv = case.setup(tmp_path)
    before = _tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "scaling_study.cli", *argv], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scaling-study: error: ")
    assert case.expect[0].replace("{tmp}", str(tmp_path)) in lines[0]
    assert _tree(tmp_path) == before


if __name__ == "__main__":  # print the docs/reliability.md table of the cases above, with today's messages
    import tempfile

    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
            root = Path(tmp).resolve()
            mp.chdir(root)
            mp.setenv("SCALING_STUDY_OFFLINE", "1")
            mp.setenv("SCALING_STUDY_CACHE", str(root / "cache"))
            argv = case.setup(root)
            if case.fault:
                unreadable(root / case.fault, mp)
            err = io.StringIO()
            mp.setattr(sys, "stderr", err)
            mp.setattr(sys, "stdout", io.StringIO())
            code = main(argv)
        message = err.getvalue().strip().replace(str(root) + "/", "").replace("scaling-study: error: ", "")
        if len(message) > 150:
            message = message[:147] + "..."
        verb = " ".join(argv[:2]) if argv[0] == "tasks" else argv[0]
        rows.append(f"| {case.category} | `{case.id}`: {case.input} | `{verb}` | {message.replace('|', '/')} | "
                    f"{code} | test_bad_input.py::test_bad_input |")
    print("\n".join(rows))
