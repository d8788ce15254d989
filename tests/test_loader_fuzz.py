"""Fuzzing the dataset parsers: whatever the bytes, only the documented UserError escapes.

    pytest tests/test_loader_fuzz.py                          # CI: a fixed, derandomized sample
    FUZZ_LOADER_EXAMPLES=5000 pytest tests/test_loader_fuzz.py # a longer local pass

Every loader format of `scaling_study/tasks/loaders.py` (conll with and without quirks,
jsonl_markers with markers and without, scierc_json for ner and re, text_label) gets random bytes
and mutated real input: seed files are a few lines written here plus, where the shared mirror
exists, the first lines of its real split files; mutations work on bytes, lines, columns, tags and
(for JSON) on the parsed values. A parse either returns examples that keep the loader's promises
(tokens and tags of equal length, tags in the task's IOB2 tag set, labels in its label set,
entity spans inside the text) or raises a one-line UserError naming the file.
"""

import copy
import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaling_study.errors import UserError
from scaling_study.tasks.loaders import parse_split, tag_set
from scaling_study.tasks.registry import PACKAGED, SplitInfo, TaskInfo, discover

from conftest import REPO

MIRROR = REPO.parent / "shared" / "datasets"
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_LOADER_EXAMPLES", "60")), deadline=None, derandomize=True,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

SCIERC_LABELS = ["Task", "Method", "Metric", "Material", "OtherScientificTerm", "Generic"]
SCIERC_RELS = ["USED-FOR", "CONJUNCTION", "EVALUATE-FOR", "HYPONYM-OF", "PART-OF", "FEATURE-OF", "COMPARE"]


def _task(base: str | None = None, **fields) -> TaskInfo:
    """A packaged task, or a scierc_json one made here (no packaged task uses that format)."""
    if base is not None:
        return copy.deepcopy(discover().tasks[base])
    data = {"id": "fuzz", "name": "fuzz", "domain": "cs", "description": "fuzz", "version": 1,
            "homepage": "http://example.org", "format": "scierc_json", "metric": "entity_f1",
            "splits": {s: SplitInfo(file=f"{s}.json") for s in ("train", "dev", "test")}, **fields}
    return TaskInfo(**data)


SCIERC_DOC = json.dumps({"doc_key": "X", "sentences": [["We", "use", "CNNs", "for", "parsing", "."],
                                                       ["It", "works", "."]],
                         "ner": [[[2, 2, "Method"], [4, 4, "Task"], [2, 4, "Generic"]], [[6, 6, "Generic"]]],
                         "relations": [[[2, 2, 4, 4, "USED-FOR"]], []]})

# (task, split, the mirror file to take lines from, synthetic seed lines)
FORMATS = {
    "conll": (lambda: _task("bc5cdr_ner"), "train", "bc5cdr_ner/train.tsv",
              "Aspirin\tB-Chemical\ncauses\tO\nrenal\tB-Disease\nfailure\tI-Disease\n.\tO\n\nOK\tO\n"),
    "conll_quirks": (lambda: _task("matsci_ner"), "dev", "matsci_ner/dev.txt",
                     "MPam 1/2  O\n O\nC \nFe B-MAT\nfilms I-MAT\n\n\nx B-PRO\n"),
    "conll_iob1_4col": (lambda: _task("jnlpba_ner"), "train", "jnlpba_ner/train.txt",
                        "-DOCSTART-\tO\n\nIL-2\tNN\tx\tB-protein\ngene\tNN\tx\tI-protein\n.\t.\tx\tO\n"),
    "jsonl_markers": (lambda: _task("scierc_re"), "train", "scierc_re/train.txt",
                      json.dumps({"text": "we use << CNNs >> for [[ parsing ]] .", "label": "USED-FOR",
                                  "metadata": [2, 2, 4, 4]}) + "\n"),
    "jsonl_glued": (lambda: _task("chemprot_re"), "train", None,
                    json.dumps({"text": "<< Ang II >>-induced pan-[[ erbB ]].", "label": "UPREGULATOR",
                                "metadata": []}) + "\n"),
    "jsonl_plain": (lambda: _task("paper_field_cls"), "train", "paper_field_cls/train.txt",
                    json.dumps({"text": "Markets and prices", "label": "economics", "metadata": []}) + "\n"),
    "scierc_ner": (lambda: _task(type="ner", label_scheme="iob2", labels=SCIERC_LABELS,
                                 format_options={"target": "ner"}), "train",
                   "scierc_ner/raw_scierc_json/train.json", SCIERC_DOC + "\n"),
    "scierc_re": (lambda: _task(type="re", label_scheme="labels", labels=SCIERC_RELS, metric="micro_f1",
                                format_options={"target": "re"}), "train",
                  "scierc_ner/raw_scierc_json/dev.json", SCIERC_DOC + "\n"),
    "text_label": (lambda: _task("battery_cls"), "train", None,
                   'doi,abstract,label\n1,"Li-ion, cathodes\nand more",1\n2,plain text,0\n3,"a ""quote""",1\n'),
    "text_label_tsv": (lambda: _task(type="cls", label_scheme="labels", labels=["neg", "pos"], metric="macro_f1",
                                     format="text_label", format_options={"separator": "\t", "text_column": 1,
                                                                          "label_column": 0}), "train", None,
                       "pos\ta title\nneg\tanother one\n"),
}


def _seeds(name: str) -> list[bytes]:
    _, _, mirror_file, synthetic = FORMATS[name]
    seeds = [synthetic.encode()]
    if mirror_file and (MIRROR / mirror_file).is_file():
        with open(MIRROR / mirror_file, "rb") as f:
            seeds.append(b"".join(f.readline() for _ in range(4)))
    return seeds


TASKS = {name: spec[0]() for name, spec in FORMATS.items()}
SEEDS = {name: _seeds(name) for name in FORMATS}

NOISE = st.sampled_from(["\t", " ", "\n", "\n\n", "\r\n", "O", "B-", "I-", "B-Chemical", "I-Disease", "I-MAT",
                         "B-protein", "<<", ">>", "[[", "]]", '"', ",", "{", "}", "[", "]", ":", "-DOCSTART-",
                         "\ufeff", "\u2028", "\x85", "é", "null", "1e999", "-1", "999999", "[]", "{}"])


def _mutate_json_value(value, data):
    """Replace one value somewhere inside a parsed JSON document with a random one."""
    junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 30), st.floats(allow_nan=True), st.text(max_size=6),
                     st.sampled_from(SCIERC_LABELS + SCIERC_RELS + ["O", "B-Task"]),
                     st.lists(st.integers(-2, 12), max_size=6), st.just([]), st.just({}))
    path = []
    node = value
    while isinstance(node, (list, dict)) and node and data.draw(st.booleans(), label="descend"):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        node = node[key]
    if not path:
        return data.draw(junk)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
    if action == "replace":
        parent[path[-1]] = data.draw(junk)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, list):
        parent.insert(path[-1], copy.deepcopy(parent[path[-1]]))
    return value


def _mutate(raw: bytes, data) -> bytes:
    lines = raw.split(b"\n")
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        kind = data.draw(st.sampled_from(["byte", "insert", "delete_line", "dup_line", "swap_cols", "cut_col",
                                          "add_col", "retag", "json", "truncate"]))
        lines = lines or [b""]
        i = data.draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        if kind == "byte" and line:
            j = data.draw(st.integers(0, len(line) - 1))
            lines[i] = line[:j] + bytes([data.draw(st.integers(0, 255))]) + line[j + 1:]
        elif kind == "insert":
            j = data.draw(st.integers(0, len(line)))
            lines[i] = line[:j] + data.draw(NOISE).encode() + line[j:]
        elif kind == "delete_line" and lines:
            del lines[i]
        elif kind == "dup_line" and lines:
            lines.insert(i, line)
        elif kind in ("swap_cols", "cut_col", "add_col", "retag"):
            sep = b"\t" if b"\t" in line else b" " if b" " in line else b","
            cols = line.split(sep)
            if kind == "swap_cols" and len(cols) > 1:
                cols[0], cols[-1] = cols[-1], cols[0]
            elif kind == "cut_col" and len(cols) > 1:
                del cols[data.draw(st.integers(0, len(cols) - 1))]
            elif kind == "add_col":
                cols.insert(data.draw(st.integers(0, len(cols))), data.draw(NOISE).encode())
            elif kind == "retag":
                cols[-1] = data.draw(NOISE).encode()
            lines[i] = sep.join(cols)
        elif kind == "json":
            try:
                value = json.loads(line)
            except ValueError:
                continue
            lines[i] = json.dumps(_mutate_json_value(value, data)).encode()
        elif kind == "truncate" and lines:
            joined = b"\n".join(lines)
            lines = joined[:data.draw(st.integers(0, len(joined)))].split(b"\n")
    return b"\n".join(lines)


def _check(name: str, raw: bytes) -> None:
    task = TASKS[name]
    split = FORMATS[name][1]
    try:
        loaded = parse_split(task, raw, f"fuzz/{split}.txt", split)
    except UserError as err:
        message = str(err)
        assert message.startswith("fuzz/") and "\n" not in message and "allowed:" in message, message
        return
    tags = set(tag_set(task))
    for ex in loaded.examples:
        if task.type == "ner":
            assert len(ex["tokens"]) == len(ex["tags"]) > 0
            assert set(ex["tags"]) <= tags, ex
        else:
            assert ex["label"] in task.labels and isinstance(ex["text"], str)
            for start, end in ex["entities"]:
                assert 0 <= start < end <= len(ex["text"])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_seeds_parse(name):
    for raw in SEEDS[name]:
        assert parse_split(TASKS[name], raw, "seed.txt", FORMATS[name][1]).examples


@pytest.mark.parametrize("name", sorted(FORMATS))
@FUZZ
@given(data=st.data())
def test_mutated_real_input(name, data):
    raw = data.draw(st.sampled_from(SEEDS[name]), label="seed")
    _check(name, _mutate(raw, data))


@pytest.mark.parametrize("name", sorted(FORMATS))
@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 3))
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_random_bytes(name, raw):
    _check(name, raw)


def test_packaged_tasks_cover_every_format():
    formats = {t.format for t in discover().tasks.values()} | {"scierc_json"}
    assert formats == {TASKS[n].format for n in FORMATS}
    assert (PACKAGED / "bc5cdr_ner" / "task.yaml").is_file()


@pytest.mark.parametrize("name,raw,fragment", [
    ("scierc_re", SCIERC_DOC.replace('[2, 2, 4, 4, "USED-FOR"]', '[2, 2, 4, "USED-FOR"]'),
     "relations[0] is not a list of [int, int, int, int, label] items"),
    ("scierc_ner", SCIERC_DOC.replace('[2, 2, "Method"]', '[2, null, "Method"]'), "ner[0] is not a list of"),
    ("scierc_ner", SCIERC_DOC.replace('["It", "works", "."]', "[]"), "sentences[1] is not a non-empty list"),
    ("jsonl_markers", FORMATS["jsonl_markers"][3].replace("[2, 2, 4, 4]", "[null, 2, 4, 4]"),
     "metadata [None, 2, 4, 4] does not match the marked spans"),
])
def test_found_by_fuzzing(name, raw, fragment):
    """Inputs the long fuzzing pass found escaping as ValueError/TypeError (see docs/reliability.md)."""
    with pytest.raises(UserError, match=re.escape(fragment)):
        parse_split(TASKS[name], raw.encode(), "fuzz/train.txt", FORMATS[name][1])
