"""What an outside tester broke (issue 17), as a user meets it: every case a real CLI verb, one line, no
traceback, nothing written, the documented exit code (2 for bad input, 1 for a broken store).

    pytest tests/test_hostile_input.py
    python tests/test_hostile_input.py      # the rows of docs/reliability.md: each case and today's message

Classes: YAML that parses but is not plain data (spec and task.yaml), file kinds (FIFO, device,
link loop, unreadable), outputs (`-o`), stores and URIs, numbers on the command line, and specs that
were accepted although wrong. The fuzz test over the same shapes and kinds is tests/test_cli_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sqlite3
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from scaling_study.cli import main

from test_bad_input import SPEC, _tree, data_files, run_with_corpus, task_folder, unreadable

BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
"""Nine levels of nine aliases ("billion laughs"): 387 million values once expanded."""
SHAPES = {  # YAML that parses but is not a plain mapping of scalars
    "complex-key": ("? [a, b]\n: 1\n", "a key that is a list or mapping"),
    "recursive-alias": ("name: &r [*r]\n", "alias *r inside its own anchor"),
    "recursive-merge": ("name: &r {<<: *r}\n", "alias *r inside its own anchor"),
    "deep-nesting": ("name: " + "[" * 500 + "]" * 500 + "\n", "nested deeper than 32 levels"),
    "alias-bomb": (BOMB, "more than 100,000 values once its aliases are expanded"),
    "typed-empty-int": ("name: !!int ''\n", "name: not a valid !!int; got ''"),
    "typed-empty-float": ("name: !!float ''\n", "name: not a valid !!float"),
    "typed-timestamp": ("name: !!timestamp x\n", "name: not a valid !!timestamp; got 'x'"),
    "huge-integer": ("name: " + "9" * 5000 + "\n", "name: an integer of 5,000 digits"),
    "integer-beyond-64-bits": ("name: 18446744073709551616\n", "an integer of 20 digits"),
    "binary-tag": ("name: !!binary aGVsbG8=\n", "YAML tag !!binary is not allowed"),
    "python-tag": ("name: !!python/object/apply:os.system [true]\n", "YAML tag !!python/object/apply:os.system"),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("SCALING_STUDY_OFFLINE", "1")
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SCALING_STUDY_DATA_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    category: str
    input: str
    setup: Callable  # (tmp folder, monkeypatch) -> argv
    expect: str
    """A fragment of the one error line; `{tmp}` is the test's folder."""
    code: int = 2


def spec_file(root: Path, text: str | None = None, **changes) -> Path:
    """`study.yaml`: test_bad_input's small study (its task folder and data too), edited, or the given text."""
    if not (root / "reg").exists():
        task_folder(root)
        data_files(root, {})
        (root / "corpus").mkdir()
        (root / "corpus" / "a.txt").write_text("one document\nanother one\n")
    path = root / "study.yaml"
    path.write_text(text if text is not None else yaml.safe_dump({**SPEC, **changes}, sort_keys=False))
    return path


def validate(text: str | None = None, **changes):
    return lambda t, mp: ["validate", str(spec_file(t, text, **changes))]


def task_yaml(text: str):
    return lambda t, mp: ["tasks", "list", "--registry-path", str(task_folder(t, text=text))]


def odd_spec(make: Callable[[Path], None], verb: str = "validate"):
    """A verb on a spec path that holds something other than a regular file."""
    def setup(t, mp):
        path = t / "odd.yaml"
        make(path)
        return [verb, str(path)] + (["--device", "cpu"] if verb == "plan" else [])
    return setup


def unreadable_spec(t, mp):
    path = spec_file(t)
    unreadable(path, mp)
    return ["validate", str(path)]


def unreadable_task_yaml(t, mp):
    reg = task_folder(t)
    unreadable(reg / "toy" / "task.yaml", mp)
    return ["tasks", "list", "--registry-path", str(reg)]


def unreadable_folder(which: str):
    """--registry-path to a folder (or a task folder in it) the user may not read: mode 000, or as
    root (who reads anything) an injected EACCES from the call that lists or looks into it."""
    def setup(t, mp):
        reg = task_folder(t)
        target = reg if which == "registry" else reg / "toy"
        if os.geteuid() != 0:
            target.chmod(0)
            return ["tasks", "list", "--registry-path", str(reg)]
        real_scandir, real_lstat = os.scandir, os.lstat

        def scandir(path="."):
            if os.path.abspath(path) == str(target):
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        def lstat(path, *a, **kw):
            if os.path.dirname(os.path.abspath(path)) == str(target):
                raise PermissionError(13, "Permission denied", str(path))
            return real_lstat(path, *a, **kw)

        mp.setattr(os, "scandir", scandir)
        mp.setattr(os, "lstat", lstat)
        return ["tasks", "list", "--registry-path", str(reg)]
    return setup


def mlflow_db(root: Path, content: bytes | str, name: str = "bad") -> Path:
    """`<root>/studies/<name>/mlflow/mlflow.db` holding `content`: bytes, or SQL for a sqlite database."""
    db = root / "studies" / name / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True)
    if isinstance(content, str):
        with sqlite3.connect(db) as con:
            con.executescript(content)
        con.close()
    else:
        db.write_bytes(content)
    return db


def store_case(verb: str, content: bytes | str):
    def setup(t, mp):
        mlflow_db(t, content)
        return [verb, "bad"] + (["-o", str(t / "r.html")] if verb == "report" else [])
    return setup


def run_spec(**changes):
    """`run` on the small study with spec fields changed (the inputs are valid otherwise)."""
    def setup(t, mp):
        argv = run_with_corpus(t, {"a.txt": "one document\nanother one\n"})
        spec = yaml.safe_load(Path(argv[1]).read_text())
        for key, value in changes.items():
            section, _, field = key.partition("__")
            if field:
                spec[section][field] = value
            else:
                spec[section] = value
        Path(argv[1]).write_text(yaml.safe_dump(spec, sort_keys=False))
        return argv
    return setup


def run_corpus_path(make: Callable[[Path], None]):
    def setup(t, mp):
        argv = run_with_corpus(t, {}, paths=("odd.txt",))
        make(t / "odd.txt")
        return argv
    return setup


CASES = [
    *(Case(f"spec-{key}", "YAML shape", f"spec: {key.replace('-', ' ')}", validate(text), expect)
      for key, (text, expect) in SHAPES.items()),
    *(Case(f"task-yaml-{key}", "YAML shape", f"task.yaml: {key.replace('-', ' ')}", task_yaml(text), expect)
      for key, (text, expect) in SHAPES.items() if key in ("complex-key", "recursive-alias", "deep-nesting",
                                                           "alias-bomb", "typed-empty-int", "huge-integer")),
    # file kinds: every reader asks what the path is before it opens it
    Case("spec-fifo-validate", "file kind", "the spec is a FIFO (validate would block forever)",
         odd_spec(os.mkfifo), "odd.yaml: <top level>: is a FIFO (named pipe)"),
    Case("spec-fifo-plan", "file kind", "the spec is a FIFO (plan)", odd_spec(os.mkfifo, "plan"),
         "odd.yaml: <top level>: is a FIFO (named pipe)"),
    Case("spec-fifo-run", "file kind", "the spec is a FIFO (run)", odd_spec(os.mkfifo, "run"),
         "odd.yaml: <top level>: is a FIFO (named pipe)"),
    Case("spec-device", "file kind", "the spec is a link to /dev/zero (a read never ends)",
         odd_spec(lambda p: os.symlink("/dev/zero", p)), "odd.yaml: <top level>: is a device"),
    Case("spec-link-loop", "file kind", "the spec is a symbolic link to itself",
         odd_spec(lambda p: os.symlink(p, p)), "odd.yaml: <top level>: is a symbolic-link loop"),
    Case("spec-dangling-link", "file kind", "the spec is a link to nowhere",
         odd_spec(lambda p: os.symlink(p.with_name("gone.yaml"), p)), "odd.yaml: <top level>: is a link to nowhere"),
    Case("spec-too-large", "file kind", "a 2 MB spec", odd_spec(lambda p: p.write_text("#" * 2_000_000 + "\n")),
         "odd.yaml: <top level>: larger than 1,048,576 bytes"),
    Case("spec-unreadable", "file kind", "a spec the user may not read", unreadable_spec,
         "study.yaml: <top level>: cannot read the file (Permission denied); allowed: a readable YAML file"),
    Case("task-yaml-fifo", "file kind", "a task.yaml that is a FIFO",
         lambda t, mp: _task_yaml_kind(t, os.mkfifo), "reg/toy/task.yaml: <top level>: is a FIFO (named pipe)"),
    Case("task-yaml-unreadable", "file kind", "a task.yaml the user may not read", unreadable_task_yaml,
         "reg/toy/task.yaml: <top level>: cannot read the file (Permission denied)"),
    Case("registry-unreadable", "file kind", "--registry-path to a folder the user may not read (was skipped)",
         unreadable_folder("registry"), "reg: cannot read the folder (Permission denied)"),
    Case("task-folder-unreadable", "file kind", "a task folder the user may not read (was skipped)",
         unreadable_folder("task"), "reg/toy: cannot read the task folder (Permission denied)"),
    # outputs
    Case("results-o-missing-folder", "output", "results -o into a folder that does not exist",
         lambda t, mp: ["results", "x", "--format", "csv", "-o", str(t / "nowhere" / "r.csv")],
         "-o {tmp}/nowhere/r.csv: no folder {tmp}/nowhere to write it into"),
    Case("results-o-folder", "output", "results -o onto a folder",
         lambda t, mp: (t / "out").mkdir() or ["results", "x", "-o", str(t / "out")], "-o {tmp}/out: is a folder"),
    Case("results-parquet-missing-folder", "output", "results --format parquet -o into a missing folder",
         lambda t, mp: ["results", "x", "--format", "parquet", "-o", str(t / "no" / "r.parquet")],
         "-o {tmp}/no/r.parquet: no folder {tmp}/no"),
    Case("report-o-folder", "output", "report -o onto a folder (left a .tmp file)",
         lambda t, mp: (t / "out").mkdir() or ["report", "x", "-o", str(t / "out")],
         "report: -o {tmp}/out: is a folder"),
    # stores and URIs
    *(Case(f"garbage-db-{verb}", "store", f"{verb}: a mlflow.db that is not a database",
           store_case(verb, b"this is not a database\n" * 40), "tracking store sqlite:///", code=1)
      for verb in ("results", "status", "report")),
    Case("empty-db-results", "store", "results: an empty mlflow.db (a read verb made it a store)",
         store_case("results", b""), "an empty file, not an MLflow database", code=1),
    Case("tables-missing-db", "store", "status: a sqlite file without MLflow's tables",
         store_case("status", "CREATE TABLE notes (x TEXT);"), "a sqlite database without MLflow's tables",
         code=1),
    Case("tracking-uri-garbage", "URI", "results --tracking-uri garbage (MLflow's file store, a folder made)",
         lambda t, mp: ["results", "x", "--tracking-uri", "garbage"], "--tracking-uri 'garbage': not a URI"),
    Case("tracking-uri-file", "URI", "status --tracking-uri file:///...",
         lambda t, mp: ["status", "x", "--tracking-uri", f"file://{t}/mlruns"], "MLflow's file store (file://) is not"),
    Case("tracking-uri-no-driver", "URI", "results --tracking-uri postgresql://... without its driver",
         lambda t, mp: ["results", "x", "--tracking-uri", "postgresql+pg8000://u:pw@127.0.0.1/db"],
         "its database driver is not installed"),
    Case("tracking-uri-bad-port", "URI", "report --tracking-uri http://127.0.0.1:abc/",
         lambda t, mp: ["report", "x", "--tracking-uri", "http://127.0.0.1:abc/"], "bad port"),
    Case("spec-tracking-ftp", "URI", "tracking.uri: ftp://... in a spec (validate passed, run crashed)",
         validate(tracking={"uri": "ftp://host/x"}), "tracking.uri: unsupported URI scheme 'ftp'"),
    Case("results-name-escape", "URI", "results ../x --tracking-uri (its cache went outside --root)",
         lambda t, mp: ["results", "../x", "--tracking-uri", "http://127.0.0.1:1"], "study '../x': not a study name"),
    Case("report-name-escape", "URI", "report a/b", lambda t, mp: ["report", "a/b"], "study 'a/b': not a study name"),
    # numbers on the command line
    *(Case(f"presets-vocab-{v}", "CLI number", f"presets --vocab-size {v}",
           lambda t, mp, v=v: ["presets", "--vocab-size", v], f"--vocab-size {v}: must be positive") for v in ("0", "-5")),
    *(Case(f"plan-mfu-{v}", "CLI number", f"plan --mfu {v}",
           lambda t, mp, v=v: ["plan", str(spec_file(t)), "--mfu", v], f"--mfu {v}: out of range")
      for v in ("0", "-1", "nan", "1.5")),
    *(Case(f"plan-cpus-{v}", "CLI number", f"plan --cpus {v}",
           lambda t, mp, v=v: ["plan", str(spec_file(t)), "--cpus", v], f"--cpus {v}: must be positive")
      for v in ("0", "-5")),
    # accepted although wrong
    Case("name-newline", "accepted", 'name: "micro\\n" (the regex\'s $ let it through)', validate(name="micro\n"),
         "name: not a valid name; got 'micro\\n'"),
    Case("seed-beyond-64-bits", "accepted", "finetune.seeds: [2**64] (failed inside Ray)",
         validate(finetune={"epochs": [1], "seeds": [2**64]}), "an integer of 20 digits"),
    Case("seed-beyond-32-bits", "accepted", "finetune.seeds: [2**40] (numpy takes 32 bits)",
         validate(finetune={"epochs": [1], "seeds": [2**40]}), "finetune.seeds[0]: out of range"),
    Case("storage-root-file", "accepted", "storage.root is a file",
         lambda t, mp: (t / "afile").write_text("x") and ["validate", str(spec_file(t, storage={"root": "afile"}))],
         "storage.root: {tmp}/afile is a file, not a folder"),
    Case("storage-root-proc", "accepted", "storage.root under /proc", validate(storage={"root": "/proc/studies"}),
         "storage.root: /proc/studies is on a kernel pseudo-filesystem"),
    Case("max-seq-len-positions", "accepted", "finetune.max_seq_len 1024 on a 512-position model",
         validate(finetune={"epochs": [1], "max_seq_len": 1024}), "finetune.max_seq_len: longer than the model"),
    Case("vocab-size-1", "accepted", "corpus.vocab_size: 1 (built 276 tokens, plan counted 1)",
         validate(corpus={**SPEC["corpus"], "vocab_size": 1}), "corpus.vocab_size: too small"),
    Case("data-dir-missing", "accepted", "run: tasks.data_dir that does not exist",
         run_spec(tasks__data_dir="no_such_data"), "tasks.data_dir: no such folder: {tmp}/no_such_data"),
    Case("external-folder-missing", "accepted", "run: an external model's local folder that does not exist",
         run_spec(external_models=[{"name": "mine", "source": "./no_model"}]),
         "external_models[0].source: no such folder: {tmp}/no_model"),
    Case("corpus-fifo", "accepted", "run: a corpus path that is a FIFO (said: no such file)",
         run_corpus_path(os.mkfifo), "corpus.paths[0]: {tmp}/odd.txt is a FIFO (named pipe)"),
    Case("corpus-dev-zero", "accepted", "run: a corpus path that is /dev/zero (a link to it)",
         run_corpus_path(lambda p: os.symlink("/dev/zero", p)), "corpus.paths[0]: {tmp}/odd.txt is a device"),
    Case("volume-selects-nothing", "accepted", "run: a data volume that selects none of the documents",
         run_spec(data_volumes=[1e-9]), "data_volumes[0]: selects none of the corpus's 2 documents"),
    Case("cpus-per-job", "accepted", "run: finetune.cpus_per_job above this machine's CPUs, no cluster",
         run_spec(finetune__cpus_per_job=4096), "finetune.cpus_per_job: 4096 is more CPUs than the local Ray has"),
]


def _task_yaml_kind(root: Path, make: Callable[[str], None]) -> list[str]:
    reg = task_folder(root)
    (reg / "toy" / "task.yaml").unlink()
    make(str(reg / "toy" / "task.yaml"))
    return ["tasks", "list", "--registry-path", str(reg)]


def run_case(case: Case, root: Path, capsys, monkeypatch) -> str:
    argv = case.setup(root, monkeypatch)
    before = _tree(root)
    db = next(root.glob("studies/*/mlflow/mlflow.db"), None)
    db_bytes = db.read_bytes() if db else None
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == case.code, (code, out, err)
    assert "Traceback" not in err + out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scaling-study: error: "), err
    assert _tree(root) == before, "bad input left files behind"
    if db is not None:
        assert db.read_bytes() == db_bytes, "a read verb changed the tracking store"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case, tmp_path, capsys, monkeypatch):
    line = run_case(case, tmp_path, capsys, monkeypatch)
    fragment = case.expect.replace("{tmp}", str(tmp_path))
    assert fragment in line, f"{fragment!r} not in {line!r}"


def test_every_class_has_cases():
    counts = {c: sum(case.category == c for case in CASES) for c in {case.category for case in CASES}}
    assert counts["YAML shape"] >= 15 and counts["file kind"] >= 10 and counts["accepted"] >= 12, counts
    assert len({c.id for c in CASES}) == len(CASES)


def test_doc_lists_every_case():
    from conftest import REPO

    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in doc]
    assert not missing, f"docs/reliability.md lacks {missing}: regenerate with `python tests/test_hostile_input.py`"


def test_plain_yaml_still_loads(tmp_path):
    """What the limits leave alone: an anchor and merge key used a few times, dates, integers within 64
    bits, a seed of 2**32 - 1."""
    from scaling_study.spec import load_spec
    from scaling_study.yamlio import read_yaml

    parsed, lines = read_yaml("x.yaml", "a: &a {x: 2024-05-31, n: 9223372036854775807}\nb: {<<: *a, y: 1}\n"
                                        "c: [*a, *a]\n")
    assert parsed["b"] == {"x": parsed["a"]["x"], "n": 2**63 - 1, "y": 1} and str(parsed["a"]["x"]) == "2024-05-31"
    assert parsed["c"] == [parsed["a"]] * 2 and lines[("b", "y")] == 2
    path = spec_file(tmp_path, finetune={"epochs": [1], "seeds": [2**32 - 1]})
    assert load_spec(path).spec.finetune.seeds == [2**32 - 1]


if __name__ == "__main__":  # print the docs/reliability.md rows of the cases above, with today's messages
    import tempfile

    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
            root = Path(tmp).resolve()
            mp.chdir(root)
            mp.setenv("SCALING_STUDY_OFFLINE", "1")
            mp.setenv("SCALING_STUDY_CACHE", str(root / "cache"))
            argv = case.setup(root, mp)
            err = io.StringIO()
            mp.setattr(sys, "stderr", err)
            mp.setattr(sys, "stdout", io.StringIO())
            code = main(argv)
        message = err.getvalue().strip().replace(str(root) + "/", "").replace("scaling-study: error: ", "")
        if len(message) > 150:
            message = message[:147] + "..."
        rows.append(f"| {case.category} | `{case.id}`: {case.input} | `{argv[0]}` | {message.replace('|', '/')} | "
                    f"{code} |")
    print("\n".join(rows))
