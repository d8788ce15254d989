"""Fuzzing every verb that reads a file with hostile YAML shapes and file kinds: whatever it gets, a
verb ends (no hang) with exit 0, 1 or 2 and only one-line messages; never a traceback.

    pytest tests/test_cli_fuzz.py                         # CI: derandomized, 1,500 examples per test
    FUZZ_CLI_EXAMPLES=20000 pytest tests/test_cli_fuzz.py  # locally, once in a while

Shapes (tests/test_hostile_input.py has one case of each): complex keys, anchors and aliases
(recursive ones, alias bombs of up to 9 x 10), merge keys, nesting up to 600 deep, typed scalars
with text that does not fit the tag, other tags (!!binary, !!set, !!python/..., local ones),
integers of up to 6,000 digits, duplicate keys, several documents, control characters, put in place of
a random field of a valid spec (or task.yaml), or as the whole file. File kinds: a regular file,
a FIFO, a link loop, a link to nowhere, a link to /dev/zero, a folder, an empty file, a file over
the size limit, and one the user may not read. Verbs: validate, plan, run (only on input that is
refused: a valid spec would start a study), ui, results, report, status, submit (likewise), and
tasks list/show/check through --registry-path for task.yaml.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import signal
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaling_study.cli import main
from scaling_study.errors import UserError

from test_bad_input import SPEC, data_files, task_folder

EXAMPLES = int(os.environ.get("FUZZ_CLI_EXAMPLES", "1500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
HANG_S = 120
"""A verb that has not answered in this long is hanging (a FIFO opened, an alias bomb expanded); the
modules the verbs import are imported first (`_warm`), so this is no import time on a busy machine."""

_word = st.text("abcxyz019_-", min_size=1, max_size=6)
_scalar_text = st.one_of(st.just(""), st.text(max_size=12), st.sampled_from(["x", "1.5", "2024-13-45", "0x1F", "~"]))


def _bomb(levels: int, width: int) -> str:
    text = "l0: &l0 [" + ", ".join(["lol"] * width) + "]\n"
    for i in range(1, levels):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]\n"
    return text


fragments = st.one_of(
    st.builds(lambda k: f"? [{k}, b]\n: 1", _word),                                     # complex key
    st.builds(lambda k: f"? {{{k}: 1}}\n: 2", _word),
    st.builds(lambda a: f"&{a} [*{a}]", _word),                                        # recursive alias
    st.builds(lambda a: f"&{a} {{<<: *{a}}}", _word),                                  # recursive merge
    st.builds(lambda n: "[" * n + "]" * n, st.integers(1, 60) | st.just(600)),           # deep nesting
    st.builds(lambda n: "{a: " * n + "1" + "}" * n, st.integers(1, 100)),
    st.builds(lambda tag, text: f"!!{tag} {yaml.safe_dump(text).splitlines()[0] if text else chr(39) * 2}",
              st.sampled_from(["int", "float", "timestamp", "bool", "null", "str"]), _scalar_text),
    st.builds(lambda tag: f"!!{tag} x", st.sampled_from(["binary", "set", "omap", "pairs", "python/object:os.system",
                                                         "python/name:os.system"])),
    st.builds(lambda t: f"!{t} x", _word),                                             # a local tag
    st.builds(lambda n, sign: sign + "9" * n, st.integers(1, 6000), st.sampled_from(["", "-", "+"])),
    st.builds(lambda n: "0x" + "f" * n, st.integers(1, 40)),
    st.just("*undefined"),
    st.builds(lambda k: f"{{{k}: 1, {k}: 2}}", _word),                                 # duplicate key
    st.text(alphabet=st.characters(codec="utf-8"), max_size=30).map(lambda t: yaml.safe_dump(t).splitlines()[0]),
    st.sampled_from(["\x00", "\x07", "\ufeff", "\t", "---\n", "...", "%YAML 1.1", "|", ">", "? ", "- -", "{", "]"]),
)


def _spec_paths(data, prefix=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield prefix + (key,)
            yield from _spec_paths(value, prefix + (key,))


SPEC_FIELDS = list(_spec_paths(SPEC))


@st.composite
def hostile_yaml(draw, base: dict) -> str:
    """A YAML text: `base` with one field replaced by a hostile fragment, or a whole hostile file."""
    how = draw(st.sampled_from(["field", "field", "field", "whole", "bomb", "documents"]))
    if how == "bomb":
        return _bomb(draw(st.integers(2, 9)), draw(st.integers(1, 10))) + yaml.safe_dump(base)
    if how == "documents":
        return yaml.safe_dump(base) + "---\n" + yaml.safe_dump(base)
    fragment = draw(fragments)
    if how == "whole":
        return fragment + "\n"
    path = draw(st.sampled_from(list(_spec_paths(base)) or [("name",)]))
    marker = "__HOSTILE__"
    data = yaml.safe_load(yaml.safe_dump(base))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = marker
    return yaml.safe_dump(data, sort_keys=False, width=10_000).replace(marker, fragment.replace("\n", " "))


KINDS = ("regular", "regular", "regular", "fifo", "loop", "dangling", "dev-zero", "folder", "empty", "huge",
         "unreadable")
SPEC_VERBS = ("validate", "plan", "run", "ui", "results", "report", "status", "submit")
TASK_VERBS = ("tasks list", "tasks show", "tasks check")


def _place(path: Path, kind: str, text: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "loop":
        os.symlink(path, path)
    elif kind == "dangling":
        os.symlink(path.with_name("gone"), path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_text({"empty": "", "huge": "#" * (2 << 20) + "\n"}.get(kind, text), encoding="utf-8",
                        errors="surrogatepass")


@contextlib.contextmanager
def _unreadable(path: Path, on: bool):
    """`path` unreadable: as root (who reads anything) an injected EACCES from open()."""
    if not on:
        yield
        return
    real, target = builtins.open, str(path)

    def guarded(file, *args, **kw):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kw)

    builtins.open = io.open = guarded
    try:
        yield
    finally:
        builtins.open, io.open = real, real


@contextlib.contextmanager
def _no_hang():
    def alarm(signum, frame):
        raise AssertionError(f"the verb hung for {HANG_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module", autouse=True)
def _warm():
    import importlib

    for name in ("scaling_study.orchestration", "scaling_study.report", "scaling_study.results",
                 "scaling_study.submit", "scaling_study.corpus", "scaling_study.tasks.data", "transformers"):
        importlib.import_module(name)


def _loads(path: Path) -> bool:
    from scaling_study.spec import load_spec

    try:
        load_spec(path)
        return True
    except UserError:
        return False


def _argv(verb: str, spec: Path, root: Path) -> list[str] | None:
    if verb in ("run", "submit") and _loads(spec):
        return None  # valid: it would start a study (or reach for a cluster)
    extra = {"plan": ["--device", "cpu"], "submit": ["--address", "http://127.0.0.1:1"], "run": ["--quiet"],
             "report": ["-o", str(root / "r.html")]}.get(verb, [])
    return [verb, str(spec), *extra]


def _check(argv: list[str], capsys) -> None:
    capsys.readouterr()
    with _no_hang():
        code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in out + err, err
    for line in err.splitlines():
        assert line.startswith(("scaling-study: error: ", "scaling-study: warning: ", "scaling-study: note: ")), \
            (argv, line)
    if code:
        assert err.strip(), (argv, code)


def _env(root: Path):
    os.environ["SCALING_STUDY_OFFLINE"] = "1"
    os.environ["SCALING_STUDY_CACHE"] = str(root / "cache")
    os.environ.pop("SCALING_STUDY_DATA_DIR", None)


@pytest.fixture(scope="module")
def study_folder():
    """One folder for every example (a spec there, its task folder, data and corpus): the verbs write
    nothing for bad input (test_bad_input checks it), so examples only swap the spec file."""
    with tempfile.TemporaryDirectory(prefix="fz-") as tmp:
        root = Path(tmp)
        task_folder(root)
        data_files(root, {})
        (root / "corpus").mkdir()
        (root / "corpus" / "a.txt").write_text("one document\n")
        yield root


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)


@FUZZ
@given(text=hostile_yaml(SPEC), kind=st.sampled_from(KINDS), verb=st.sampled_from(SPEC_VERBS))
def test_spec_verbs(text, kind, verb, study_folder, capsys):
    root = study_folder
    _env(root)
    spec = root / "study.yaml"
    _place(spec, kind, text)  # SPEC's storage.root is "store", in this folder
    cwd = os.getcwd()
    os.chdir(root)
    try:
        argv = _argv(verb, spec, root)
        if argv is not None:
            with _unreadable(spec, kind == "unreadable"):
                _check(argv, capsys)
    finally:
        os.chdir(cwd)
        _remove(spec)
    assert not (root / "store").exists() and not (root / "cache").exists()


@FUZZ
@given(text=hostile_yaml({"id": "toy", "name": "Toy", "type": "ner", "labels": ["A"], "format": "conll"}),
       kind=st.sampled_from(KINDS), verb=st.sampled_from(TASK_VERBS))
def test_task_yaml_verbs(text, kind, verb, study_folder, capsys):
    root = study_folder
    _env(root)
    path = root / "reg" / "toy" / "task.yaml"
    good = path.read_bytes() if path.is_file() else None
    _remove(path)
    _place(path, kind, text)
    argv = [*verb.split(), *(["toy"] if verb != "tasks list" else []), "--registry-path", str(root / "reg")]
    if verb == "tasks check":
        argv += ["--data-dir", str(root / "data"), "--offline"]
    try:
        with _unreadable(path, kind == "unreadable"):
            _check(argv, capsys)
    finally:
        _remove(path)
        path.write_bytes(good)


def test_the_shapes_reach_the_reader():
    """The generator is not vacuous: its texts hold each hostile construct the docstring names."""
    seen = set()

    @settings(max_examples=300, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(hostile_yaml(SPEC))
    def collect(text):
        for name, needle in (("complex key", "? "), ("alias", "*"), ("tag", "!!"), ("deep", "[[[["),
                             ("bomb", "&l0"), ("digits", "9" * 50)):
            if needle in text:
                seen.add(name)

    collect()
    assert seen == {"complex key", "alias", "tag", "deep", "bomb", "digits"}, seen
