"""Loaders per format, data lookup (mirror, cache, download), caps, and `scaling-study tasks check`.

The real mirror (`../shared/datasets`) is used where it exists; every quirk and every error case is
also checked on small files written here, so the tests say exactly what each rule does.
"""

import functools
import http.server
import json
import re
import threading
import pytest
import yaml

from scaling_study.cli import main
from scaling_study.errors import SpecError, UserError
from scaling_study.spec import TaskCaps, spec_from_data
from scaling_study.tasks.data import DataNotFound, load_task_data, locate_split, mirror_dirs, sample
from scaling_study.tasks.loaders import FORMATS, check_options, load_split, tag_set
from scaling_study.tasks.registry import discover, load_task

from conftest import BASE_SPEC, REPO

MIRROR = REPO.parent / "shared" / "datasets"
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason="no shared/datasets mirror")

# Sentences (NER) or examples per split, and entities / labels per type, as the mirror READMEs give them.
# Two deliberate differences, both documented quirks: matsci_ner dev MAT and scienceie_ner test Process
# each have one span that only lenient decoding counts (an I- tag IOB2 does not allow).
README = {
    "bc5cdr_ner": ((4560, 4581, 4797), {"train": {"Chemical": 5203, "Disease": 4182},
                                        "test": {"Chemical": 5385, "Disease": 4424}}),
    "jnlpba_ner": ((17097, 1739, 3856), {"train": {"protein": 27803, "DNA": 8481, "RNA": 844, "cell_type": 6192,
                                                   "cell_line": 3430},
                                         "dev": {"protein": 2466, "DNA": 1052, "RNA": 107, "cell_type": 526,
                                                 "cell_line": 400}}),
    "matsci_ner": ((4402, 511, 546), {"dev": {"MAT": 725 - 1, "PRO": 641, "DSC": 415, "CMT": 190, "SMT": 230,
                                              "APL": 96, "SPL": 45},
                                      "test": {"MAT": 682, "PRO": 772, "DSC": 437, "CMT": 195, "SMT": 171,
                                               "APL": 170, "SPL": 75}}),
    "scierc_ner": ((1861, 275, 551), {"train": {"OtherScientificTerm": 1527, "Method": 1436, "Generic": 950,
                                                "Task": 887, "Material": 541, "Metric": 231}}),
    "scienceie_ner": ((2534, 416, 860), {"train": {"Process": 2757, "Material": 2167, "Task": 1094},
                                         "test": {"Process": 887 - 1, "Material": 793, "Task": 187}}),
    "scierc_re": ((3219, 455, 974), {"test": {"USED-FOR": 533, "CONJUNCTION": 123, "EVALUATE-FOR": 91,
                                              "HYPONYM-OF": 67, "PART-OF": 63, "FEATURE-OF": 59, "COMPARE": 38}}),
    "paper_field_cls": ((5037, 561, 22399), {"train": {"business": 724, "economics": 723, "geography": 687,
                                                       "medicine": 729, "politics": 761, "psychology": 729,
                                                       "sociology": 684}}),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test reaches the internet; the download cache is a temporary folder."""
    monkeypatch.setenv("SCALING_STUDY_OFFLINE", "1")
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SCALING_STUDY_DATA_DIR", raising=False)


def make_task(tmp_path, *, fmt="conll", options=None, labels=("A", "B"), scheme="iob2", type_="ner",
              metric=None, tid="toy", files=None, urls=None):
    """A task folder (task.yaml + README) and its data folder `<tmp>/data/<tid>/`; returns (task, data dir)."""
    folder = tmp_path / "tasks" / tid
    folder.mkdir(parents=True, exist_ok=True)
    files = files or {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"}
    spec = {
        "id": tid, "name": tid, "type": type_, "domain": "test", "description": "toy", "version": 1,
        "homepage": "http://example.org", "format": fmt, "format_options": options or {}, "label_scheme": scheme,
        "labels": list(labels), "metric": metric or ("entity_f1" if type_ == "ner" else "macro_f1"),
        "splits": {s: {"file": f, "url": (urls or {}).get(s)} for s, f in files.items()},
    }
    (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (folder / "README.md").write_text("# toy\n")
    data = tmp_path / "data"
    (data / tid).mkdir(parents=True, exist_ok=True)
    return load_task(folder), data


def write(data_dir, tid, name, text, mode="w"):
    path = data_dir / tid / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def conll_task(tmp_path, text, *, split="train", **kw):
    kw.setdefault("options", {"token_column": 0, "tag_column": -1, "separator": "\t"})
    task, data = make_task(tmp_path, **kw)
    return load_split(task, write(data, task.id, f"{split}.txt", text), split)


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------- the real mirror


@needs_mirror
@pytest.mark.parametrize("tid", sorted(README))
def test_mirror_split_sizes_and_labels_match_readmes(tid):
    task = discover().tasks[tid]
    data = load_task_data(task, [MIRROR])
    sizes, per_type = README[tid]
    assert tuple(data.sizes[s] for s in ("train", "dev", "test")) == sizes
    for split, expected in per_type.items():
        if task.type == "ner":
            from scaling_study.metrics import entity_spans

            got = {}
            for ex in data.splits[split]:
                assert len(ex["tokens"]) == len(ex["tags"])
                for kind, _, _ in entity_spans(ex["tags"]):
                    got[kind] = got.get(kind, 0) + 1
        else:
            got = {}
            for ex in data.splits[split]:
                got[ex["label"]] = got.get(ex["label"], 0) + 1
        assert got == expected, split
    assert set(data.label_list) == set(tag_set(task))


@needs_mirror
def test_tasks_check_cli_on_the_mirror(capsys):
    assert main(["tasks", "check", "--data-dir", str(MIRROR), "--offline"]) == 0
    out = capsys.readouterr().out
    for tid, (sizes, _) in README.items():
        block = out.split(f"\n{tid} (")[1]
        got = [int(m.group(2)) for m in re.finditer(r"^  (train|dev|test) +(\d+) ", block, re.M)][:3]
        assert got == list(sizes), tid
    assert "7 task(s) loaded" in out
    for tid in ("chemprot_re", "battery_cls", "coleridge_ner"):
        assert f"{tid}: skipped, data not found" in out
    assert "32 x untagged lines read as O" in out


@needs_mirror
def test_matsci_quirks_on_the_real_files():
    data = load_task_data(discover().tasks["matsci_ner"], [MIRROR])
    notes = data.notes
    assert notes["dev"]["untagged lines read as O (untagged_lines_are_O)"] == 32
    assert notes["train"]["empty tokens kept (empty_token_lines)"] == 3
    assert notes["train"]["tokens containing a space (token_may_contain_space)"] == 2
    tokens = [t for ex in data.splits["train"] for t in ex["tokens"]]
    assert "MPam 1/2" in tokens and "" in tokens and "{112}<111>" in tokens  # trailing space stripped
    assert sum(notes["dev"][k] for k in notes["dev"] if "IOB2 does not allow" in k) == 1


@needs_mirror
def test_scierc_raw_json_reproduces_the_flat_files(tmp_path):
    raw = MIRROR / "scierc_ner" / "raw_scierc_json"
    files = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
    registry = discover()
    re_task, _ = make_task(tmp_path, fmt="scierc_json", options={"target": "re"}, type_="re", scheme="labels",
                           labels=registry.tasks["scierc_re"].labels, tid="scierc_raw_re", files=files)
    ner_task, _ = make_task(tmp_path, fmt="scierc_json", options={"target": "ner"},
                            labels=registry.tasks["scierc_ner"].labels, tid="scierc_raw_ner", files=files)
    for split in ("train", "dev", "test"):
        ours = load_split(re_task, raw / files[split], split).examples
        scibert = load_split(registry.tasks["scierc_re"], MIRROR / "scierc_re" / f"{split}.txt", split).examples
        # entities come in marker-pair order: [head, tail] here, entity_markers order (<< first) there
        assert [(e["text"], e["label"], sorted(e["entities"])) for e in ours] == \
               [(e["text"], e["label"], sorted(e["entities"])) for e in scibert]
        ours = load_split(ner_task, raw / files[split], split).examples
        flat = load_split(registry.tasks["scierc_ner"], MIRROR / "scierc_ner" / f"{split}.txt", split).examples
        assert [e["tokens"] for e in ours] == [e["tokens"] for e in flat]
        same = sum(a["tags"] == b["tags"] for a, b in zip(ours, flat))
        assert same >= 0.98 * len(flat)  # SciBERT's flattening differs in a few nested same-type spans


def test_every_packaged_quirk_is_known_and_documented():
    docs = (REPO / "docs" / "tasks.md").read_text()
    for tid, task in discover().tasks.items():
        check_options(task)
        for quirk in task.format_options.get("quirks", []):
            assert quirk in FORMATS[task.format].quirks, (tid, quirk)
    for fmt in FORMATS.values():
        for quirk in fmt.quirks:
            assert f"`{quirk}`" in docs, quirk


def test_one_record_per_format_and_no_import_cycle():
    """`format` in task.yaml allows exactly the formats with a record; loaders does not import the registry."""
    import subprocess
    import sys
    import typing

    from scaling_study.tasks.registry import TaskInfo

    assert set(typing.get_args(typing.get_type_hints(TaskInfo)["format"])) == set(FORMATS)
    assert all(name == fmt.name and fmt.types for name, fmt in FORMATS.items())
    code = "import sys, scaling_study.tasks.loaders; print('scaling_study.tasks.registry' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------- conll


def test_conll_blank_line_runs_docstart_and_crlf(tmp_path):
    text = ("-DOCSTART-\tO\n\nw1\tB-A\nw2\tI-A\n\n\n\nw3\tO\r\n-DOCSTART- (doc 2)\nw4\tB-B\n\n"
            "-DOCSTART-\n\n\nw5\tO\nw6\tB-A\n")
    split = conll_task(tmp_path, text)
    assert [e["tokens"] for e in split.examples] == [["w1", "w2"], ["w3"], ["w4"], ["w5", "w6"]]
    assert [e["line"] for e in split.examples] == [3, 8, 10, 15]
    assert split.notes["-DOCSTART- lines skipped"] == 3


def test_conll_columns_and_separators(tmp_path):
    four = "Tok NN O I-A\nen NN O I-A\n. NN O O\n"
    split = conll_task(tmp_path, four, options={"token_column": 0, "tag_column": 3, "separator": " "},
                       scheme="iob1")
    assert split.examples[0]["tags"] == ["B-A", "I-A", "O"]
    ws = "Tok \t NN   B-B\nx\tNN\tO\n"
    split = conll_task(tmp_path, ws, options={"token_column": 0, "tag_column": -1, "separator": "whitespace"})
    assert split.examples[0] == {"tokens": ["Tok", "x"], "tags": ["B-B", "O"], "line": 1}


def test_iob1_is_converted_to_iob2(tmp_path):
    text = "a\tI-A\nb\tI-A\nc\tB-A\nd\tO\ne\tI-B\nf\tI-A\ng\tB-B\n"
    split = conll_task(tmp_path, text, scheme="iob1")
    assert split.examples[0]["tags"] == ["B-A", "I-A", "B-A", "O", "B-B", "B-A", "B-B"]


def test_iob2_violation_is_an_error_unless_documented_for_that_split(tmp_path):
    text = "a\tB-A\nb\tI-A\n\nc\tO\nd\tI-B\n"
    message = error_of(conll_task, tmp_path, text)
    assert message.startswith(str(tmp_path / "data" / "toy" / "train.txt") + ":5: I-B after O: IOB2 does not allow")
    assert "allowed: B-B" in message
    quirk = {"token_column": 0, "tag_column": -1, "separator": "\t", "quirks": ["iob2_violation_in_dev"]}
    kept = conll_task(tmp_path, text, split="dev", options=quirk)
    assert kept.examples[1]["tags"] == ["O", "I-B"]  # kept as released; strict scoring drops it
    assert "test.txt:5: I-B after O" in error_of(conll_task, tmp_path, text, split="test", options=quirk)


@pytest.mark.parametrize("text,line,fragment", [
    ("a\tO\nb\tO\tx\n", 2, "3 TAB-separated columns, but the file's first token line (line 1) has 2; allowed: 2"),
    ("a\tO\nb\tB-C\n", 2, "tag 'B-C' is not in the task's label set; allowed: O, or B-/I- (IOB2) with one of "
                         "the types A, B"),
    ("a\tO\nb\tE-A\n", 2, "tag 'E-A' is not in the task's label set"),
    ("a\tO\nb\t\n", 2, "empty tag; allowed:"),
    ("a\tO\n\t O\n", 2, "empty token; allowed: a non-empty token (or the empty_token_lines quirk)"),
    ("onecolumn\n", 1, "1 TAB-separated column(s), but token_column 0 and tag_column -1"),
])
def test_conll_errors_name_file_and_line(tmp_path, text, line, fragment):
    message = error_of(conll_task, tmp_path, text)
    assert f"train.txt:{line}: " in message and fragment in message, message


def test_empty_and_non_utf8_files(tmp_path):
    task, data = make_task(tmp_path, options={"separator": "\t"})
    assert "train.txt: empty file; allowed:" in error_of(load_split, task, write(data, "toy", "train.txt", "\n \n"),
                                                          "train")
    bad = write(data, "toy", "train.txt", b"a\tO\nb\tO\n\xe9t\xe9\tO\n", mode="wb")
    message = error_of(load_split, task, bad, "train")
    assert "train.txt:3: bytes that are not UTF-8" in message and "allowed: UTF-8 text" in message
    only_docstart = write(data, "toy", "train.txt", "-DOCSTART-\tO\n\n")
    assert "no examples in the file" in error_of(load_split, task, only_docstart, "train")


def test_matsci_style_quirks(tmp_path):
    """rsplit on the last space, untagged lines, tokens with spaces, empty tokens (matsci_ner's README)."""
    options = {"token_column": 0, "tag_column": -1, "separator": " ",
               "quirks": ["rsplit_on_last_space", "untagged_lines_are_O", "token_may_contain_space",
                          "empty_token_lines", "blank_line_runs_vary"]}
    text = "MPam 1/2  O\n O\nC \nFe B-A\n\n\nx I-A\n"
    with pytest.raises(UserError):
        conll_task(tmp_path, text, options=options)  # x I-A after a blank line: not allowed
    split = conll_task(tmp_path, text.replace("x I-A", "x B-A"), options=options)
    assert split.examples[0] == {"tokens": ["MPam 1/2", "", "C", "Fe"], "tags": ["O", "O", "O", "B-A"], "line": 1}
    assert split.notes["untagged lines read as O (untagged_lines_are_O)"] == 1
    without = {**options, "quirks": ["rsplit_on_last_space"]}
    assert ":2: empty token" in error_of(conll_task, tmp_path, "a O\n O\n", options=without)
    assert ":1: empty tag" in error_of(conll_task, tmp_path, "C \n", options=without)
    assert ":1: no space before the tag" in error_of(conll_task, tmp_path, "C\n", options=without)


def test_multi_label_tags_keep_one_tag_per_token(tmp_path):
    options = {"token_column": 0, "tag_column": 2, "separator": " ",
               "quirks": ["multi_label_tags", "extra_metadata_columns"]}
    text = "a q1 B-A B-B\nb q1 I-B I-A\nc q1 O\nd q1 I-A B-B\ne q1 I-A I-B\nf q1 I-A O\n"
    split = conll_task(tmp_path, text, options=options)
    # a: the first B-; b: continues A; c: O; d: no continuation, the first B-; e: continues B;
    # f: nothing to continue, no B-: the first tag, I-A, which starts no entity, becomes B-A
    assert split.examples[0]["tags"] == ["B-A", "I-A", "O", "B-B", "I-B", "B-A"]
    assert split.notes["I- tags left without their entity, made B- (multi_label_tags)"] == 1
    assert ":1: 3 columns; allowed: at least 4" in error_of(conll_task, tmp_path, "a q1 O\n", options={
        **options, "tag_column": 3})
    assert ":1: 4 columns: token_column -1 is among the tag columns (from tag_column 2 on)" in error_of(
        conll_task, tmp_path, "a q1 B-A B-B\nb q1 O\n", options={**options, "token_column": -1})
    with pytest.raises(SpecError, match=r"format_options.token_column: among the tag columns; got 3; allowed: a "
                                        r"column before tag_column \(2\)"):
        make_task(tmp_path, options={**options, "token_column": 3})


def test_token_column_is_never_the_tag_column(tmp_path):
    """`token_column: -1` with tags last read the tags as tokens; refused in task.yaml or at the first line."""
    with pytest.raises(SpecError, match=r"format_options.token_column: the tag column; got -1; allowed: a column "
                                        r"other than tag_column \(-1\)"):
        make_task(tmp_path, options={"token_column": -1})
    message = error_of(conll_task, tmp_path, "a\tx\tO\n", options={"token_column": 2, "tag_column": -1,
                                                                    "separator": "\t"})
    assert "train.txt:1: 3 TAB-separated columns: token_column 2 and tag_column -1 are the same column" in message


def test_a_split_that_is_no_regular_file_is_refused_unread(tmp_path):
    """A FIFO would block `read_bytes` for ever; `load_split` looks before it reads."""
    import os

    task, data = make_task(tmp_path, options={"separator": "\t"})
    os.mkfifo(data / "toy" / "train.txt")
    assert "train.txt: not a regular file; allowed:" in error_of(load_split, task, data / "toy" / "train.txt",
                                                                 "train")


def test_unknown_quirk_and_option_are_spec_errors(tmp_path):
    """Found when the task folder is read (load_task runs check_options), with the task.yaml line."""
    with pytest.raises(SpecError, match=r"task.yaml:\d+: format_options.quirks\[0\]: unknown quirk; got 'made_up'; "
                                        r"allowed: .*rsplit_on_last_space"):
        make_task(tmp_path, options={"separator": "\t", "quirks": ["made_up"]})
    with pytest.raises(SpecError, match="format_options.sep: unknown option"):
        make_task(tmp_path, options={"sep": "\t"})
    with pytest.raises(SpecError, match="format_options.separator: invalid value"):
        make_task(tmp_path, options={"separator": ";"})
    task, _ = make_task(tmp_path, options={"separator": "\t"})
    task.format_options["separator"] = ";"
    with pytest.raises(SpecError, match="format_options.separator: invalid value"):
        check_options(task)


# ----------------------------------------------------------------------------------- jsonl_markers


RE_OPTS = {"entity_markers": ["<<", ">>", "[[", "]]"]}


def re_task(tmp_path, text, quirks=(), split="train"):
    task, data = make_task(tmp_path, fmt="jsonl_markers", options={**RE_OPTS, "quirks": list(quirks)},
                           type_="re", scheme="labels", labels=["R1", "R2"])
    return load_split(task, write(data, task.id, f"{split}.txt", text), split)


def test_jsonl_markers_separate_tokens_and_spans(tmp_path):
    line = {"text": "the << big dog >> saw [[ cats ]] .", "label": "R1", "metadata": [4, 4, 1, 2]}
    split = re_task(tmp_path, json.dumps(line) + "\n\n", quirks=["metadata_token_offsets"])
    ex = split.examples[0]
    assert [ex["text"][s:e] for s, e in ex["entities"]] == ["big dog", "cats"]
    bad = {**line, "metadata": [1, 2, 4, 4, 9]}
    assert ":1: metadata [1, 2, 4, 4, 9] does not match" in error_of(re_task, tmp_path, json.dumps(bad),
                                                                     ["metadata_token_offsets"])


def test_jsonl_markers_glued_to_text_only_with_the_quirk(tmp_path):
    line = json.dumps({"text": "<< Ang II >>-induced pan-[[ erbB ]] ([[x", "label": "R2", "metadata": []})
    assert "occurs 2 times" in error_of(re_task, tmp_path, line, ["markers_glued_to_adjacent_text"])
    line = json.dumps({"text": "<< Ang II >>-induced pan-[[ erbB ]].", "label": "R2", "metadata": []})
    assert "touches neighbouring text" in error_of(re_task, tmp_path, line)
    split = re_task(tmp_path, line, ["markers_glued_to_adjacent_text", "empty_metadata"])
    ex = split.examples[0]
    assert [ex["text"][s:e] for s, e in ex["entities"]] == ["Ang II", "erbB"]
    with_meta = line.replace('"metadata": []', '"metadata": [1, 2]')
    assert "metadata [1, 2]; allowed: [] (empty_metadata)" in error_of(re_task, tmp_path, with_meta,
                                                                       ["markers_glued_to_adjacent_text",
                                                                        "empty_metadata"])


CHEMPROT_QUIRKS = ["markers_glued_to_adjacent_text", "marker_characters_in_text", "empty_metadata"]
# The shapes of ChemProt's lines that hold marker strings as text (39 of its 10,065; words here made up
# around the fragments the issue and the task card quote): a potency order after the markers, a `>>`
# glued to the open marker of the other pair, `>>` as whitespace tokens after a close, `[[` inside
# chemical names (one glued on both sides, one with a space before it).
CHEMPROT_SHAPES = [
    ("the order for << HVA Ca2+ channels >> was sulprostone>[[ PGE2 ]], PGE1>STA2>>17-phenyl-trinor-PGE2.",
     ["HVA Ca2+ channels", "PGE2"], {">>"}),
    ("the order for << HVA Ca2+ channels >> was sulprostone>PGE2, PGE1>STA2>>[[ 17-phenyl-trinor-PGE2 ]].",
     ["HVA Ca2+ channels", "17-phenyl-trinor-PGE2"], {">>"}),
    ("<< Panx1 >> currents fell: [[ carbenoxolone ]] > DIDS > acid 94 >> probenecid >> flufenamic acid.",
     ["Panx1", "carbenoxolone"], {">>"}),
    ("<< Panx1 >> currents fell: carbenoxolone > DIDS > acid 94 >> [[ probenecid ]] >> flufenamic acid.",
     ["Panx1", "probenecid"], {">>"}),
    ("a combination of << 2-[2-[[2-hydroxy-3-phenoxy]propyl]amino]ethoxy >> (a [[ beta(1)-adrenoceptor ]] "
     "antagonist)", ["2-[2-[[2-hydroxy-3-phenoxy]propyl]amino]ethoxy", "beta(1)-adrenoceptor"], {"[["}),
    ("the << alpha(1B)-adrenoceptor >> antagonist [[ 4-amino-2-[1-(benzyloxycarbonyl)-2(S)- "
     "[[(1,1-dimethylethyl)amino]carbonyl]-piperazinyl ]] (L-765314)",
     ["alpha(1B)-adrenoceptor", "4-amino-2-[1-(benzyloxycarbonyl)-2(S)- [[(1,1-dimethylethyl)amino]carbonyl]"
      "-piperazinyl"], {"[["}),
    ("<< PGE1 >>- and PGE2-induced inhibition of the [[ HVA Ca2+ channels ]] is mediated", ["PGE1",
                                                                                      "HVA Ca2+ channels"], set()),
]


@pytest.mark.parametrize("text,arguments,as_text", CHEMPROT_SHAPES)
def test_chemprot_marker_strings_in_text_are_text(tmp_path, text, arguments, as_text):
    line = json.dumps({"text": text, "label": "R1", "metadata": []})
    split = re_task(tmp_path, line, CHEMPROT_QUIRKS)
    ex = split.examples[0]
    assert [text[s:e] for s, e in ex["entities"]] == arguments
    assert {m for m in ("<<", ">>", "[[", "]]") if f"examples with {m!r} as text besides the marker "
            "(marker_characters_in_text)" in split.notes} == as_text
    if as_text:  # without the quirk the file is refused, as before: the task card must say it
        assert "times; allowed: each of << >> [[ ]] exactly once (or the marker_characters_in_text quirk" in \
            error_of(re_task, tmp_path, line, ["markers_glued_to_adjacent_text"])


def test_chemprot_task_reads_a_file_of_its_real_shape(tmp_path):
    """The packaged task.yaml, on split files shaped like the released ones (the files are not mirrored)."""
    task = discover().tasks["chemprot_re"]
    folder = tmp_path / "chemprot_re"
    folder.mkdir()
    lines = [json.dumps({"text": text, "label": label, "metadata": []})
             for (text, _, _), label in zip(CHEMPROT_SHAPES, task.labels)]
    for split in ("train", "dev", "test"):
        (folder / task.splits[split].file).write_text("\n".join(lines) + "\n")
    data = load_task_data(task, [tmp_path], allow_download=False)
    assert data.sizes == {"train": 7, "dev": 7, "test": 7}
    assert sum(data.notes["dev"].values()) == 6 and data.splits["test"][2]["label"] == task.labels[2]


@pytest.mark.parametrize("quirks", [[], ["markers_glued_to_adjacent_text", "marker_characters_in_text"]])
@pytest.mark.parametrize("text,fragment", [
    ("a [[ b << c ]] d >> e", "the two arguments cross ([[ ... << ... ]] ... >>)"),
    ("a << b [[ c >> d ]] e", "the two arguments cross (<< ... [[ ... >> ... ]])"),
])
def test_crossing_markers_are_refused(tmp_path, quirks, text, fragment):
    message = error_of(re_task, tmp_path, json.dumps({"text": text, "label": "R1"}), quirks)
    assert ":1: " + fragment + "; allowed: two arguments side by side, or one inside the other" in message
    nested = re_task(tmp_path, json.dumps({"text": "a [[ b << c >> d ]] e", "label": "R1"}), quirks)
    assert [nested.examples[0]["text"][s:e] for s, e in nested.examples[0]["entities"]] == ["c", "b << c >> d"]


def test_marker_strings_as_text_still_need_one_marker_each(tmp_path):
    quirks = ["markers_glued_to_adjacent_text", "marker_characters_in_text"]
    two = json.dumps({"text": "<< a >> x [[ b ]] and [[ c ]]", "label": "R1"})
    assert ":1: marker '[[' occurs 2 times and ']]' 2 times; allowed: each of << >> [[ ]] exactly once with " \
        "whitespace on its inner side" in error_of(re_task, tmp_path, two, quirks)
    none = json.dumps({"text": "<< a >> x b>>[[c]]", "label": "R1"})
    assert "marker '[[' occurs 0 times and ']]' 0 times" in error_of(re_task, tmp_path, none, quirks)


@pytest.mark.parametrize("line,fragment", [
    ("{not json", "not JSON (Expecting property name"),
    ('{"text": "a << b >> [[ c ]]", "label": "R9"}', "label 'R9' is not in the task's label set; allowed: R1, R2"),
    ('{"text": "a << b >> c", "label": "R1"}', "marker '[[' occurs 0 times"),
    ('{"text": "a >> b << [[ c ]]", "label": "R1"}', "'>>' before '<<'"),
    ('{"txt": "a", "label": "R1"}', "not an object with a string 'text'"),
])
def test_jsonl_errors(tmp_path, line, fragment):
    message = error_of(re_task, tmp_path, '{"text": "x << y >> [[ z ]]", "label": "R1"}\n' + line)
    assert "train.txt:2: " in message and fragment in message, message


def test_plain_jsonl_classification(tmp_path):
    task, data = make_task(tmp_path, fmt="jsonl_markers", options={"entity_markers": []}, type_="cls",
                           scheme="labels", labels=["x", "y"])
    split = load_split(task, write(data, "toy", "train.txt", '{"text": "a [[ b", "label": "y", "metadata": []}\n'),
                       "train")
    assert split.examples == [{"text": "a [[ b", "label": "y", "entities": [], "line": 1}]


# ----------------------------------------------------------------------------------- text_label


def test_csv_named_columns_with_quotes(tmp_path):
    task, data = make_task(tmp_path, fmt="text_label", type_="cls", scheme="labels", labels=["0", "1"],
                           options={"separator": ",", "text_column": "abstract", "label_column": "label",
                                    "quirks": ["csv_header_named_columns", "csv_quoted_fields"]})
    text = 'doi,abstract,label\n1,"Li-ion, cathodes\nand more",1\n2,,0\n'
    split = load_split(task, write(data, "toy", "train.txt", text), "train")
    assert [(e["text"], e["label"], e["line"]) for e in split.examples] == [("Li-ion, cathodes\nand more", "1", 3),
                                                                           ("", "0", 4)]
    assert "'abstract' is not in the header" in error_of(load_split, task, write(data, "toy", "train.txt",
                                                                                  "doi,text,label\n1,a,1\n"), "train")
    assert "train.txt:3: 2 fields, the first row has 3" in error_of(
        load_split, task, write(data, "toy", "train.txt", "doi,abstract,label\n1,a,1\n2,b\n"), "train")


def test_tsv_numbered_columns_without_header(tmp_path):
    task, data = make_task(tmp_path, fmt="text_label", type_="cls", scheme="labels", labels=["neg", "pos"],
                           options={"separator": "\t", "text_column": 1, "label_column": 0})
    split = load_split(task, write(data, "toy", "train.txt", 'pos\ta "quoted" title\nneg\tb\n'), "train")
    assert [(e["text"], e["label"]) for e in split.examples] == [('a "quoted" title', "pos"), ("b", "neg")]
    assert ":2: label 'maybe'" in error_of(load_split, task, write(data, "toy", "train.txt", "pos\ta\nmaybe\tb\n"),
                                           "train")


# ----------------------------------------------------------------------------------- lookup, caps


def _toy_files(data, tid="toy"):
    for split in ("train", "dev", "test"):
        write(data, tid, f"{split}.txt", "".join(f"w{i}\tB-A\n\n" for i in range(10)))


def test_mirror_order_env_and_spec_data_dir(tmp_path, monkeypatch):
    task, data = make_task(tmp_path, options={"separator": "\t"})
    _toy_files(data)
    other = tmp_path / "other"
    (other / "toy").mkdir(parents=True)
    (other / "toy" / "train.txt").write_text("z\tO\n")
    assert locate_split(task, "train", mirror_dirs(other)) == other / "toy" / "train.txt"
    monkeypatch.setenv("SCALING_STUDY_DATA_DIR", str(data))
    dirs = mirror_dirs(other)
    assert dirs == [other.resolve(), data.resolve()]
    assert locate_split(task, "dev", dirs) == data.resolve() / "toy" / "dev.txt"  # falls through to the next mirror
    monkeypatch.delenv("SCALING_STUDY_DATA_DIR")
    spec_file = tmp_path / "study.yaml"
    spec = {**BASE_SPEC, "tasks": {"include": ["scierc_re"], "data_dir": "data"}}
    study = spec_from_data(spec, str(spec_file))
    assert mirror_dirs(study=study) == [data.resolve()]


def test_missing_data_names_task_paths_and_remedy(tmp_path):
    task, data = make_task(tmp_path, options={"separator": "\t"}, urls={"train": "http://127.0.0.1:9/train.txt"})
    message = error_of(load_task_data, task, [data])
    assert isinstance(pytest.raises(DataNotFound, load_task_data, task, [data]).value, UserError)
    assert message.startswith("task toy: no data for split train: tried ")
    assert str(data / "toy" / "train.txt") in message and "cache " in message
    assert "download http://127.0.0.1:9/train.txt skipped (offline)" in message
    assert "--data-dir" in message and "SCALING_STUDY_DATA_DIR" in message and "tasks.data_dir" in message


def test_download_into_cache_from_a_local_server(tmp_path, monkeypatch):
    served = tmp_path / "www"
    served.mkdir()
    (served / "train.txt").write_text("a\tB-A\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    task, data = make_task(tmp_path, options={"separator": "\t"},
                           urls={"train": f"{url}/train.txt", "dev": f"{url}/missing.txt"})
    monkeypatch.delenv("SCALING_STUDY_OFFLINE")
    try:
        path = locate_split(task, "train", [data], cache_dir=tmp_path / "c")
        assert path.read_text() == "a\tB-A\n" and path.is_relative_to(tmp_path / "c" / "toy")
        assert "404" in error_of(locate_split, task, "dev", [data], cache_dir=tmp_path / "c")
    finally:
        server.shutdown()
        server.server_close()
    assert locate_split(task, "train", [data], cache_dir=tmp_path / "c") == path  # cached: no server needed
    assert not list((tmp_path / "c").rglob("*.part"))


def test_caps_are_seeded_deterministic_samples(tmp_path):
    items = list(range(100))
    a = sample(items, 10, task_id="t", split="train", seed=0)
    assert a == sample(items, 10, task_id="t", split="train", seed=0) == sorted(a) and len(set(a)) == 10
    assert a != sample(items, 10, task_id="t", split="train", seed=1)
    assert a != sample(items, 10, task_id="t", split="dev", seed=0)
    assert sample(items, 1000, task_id="t", split="train") == items
    task, data = make_task(tmp_path, options={"separator": "\t"})
    _toy_files(data)
    loaded = load_task_data(task, [data], caps=TaskCaps(max_train_examples=3, max_test_examples=20))
    assert loaded.sizes == {"train": 3, "dev": 10, "test": 10} and loaded.full_sizes["train"] == 10
    assert loaded.dataset("train").column_names == ["tokens", "tags", "line"]


def test_tasks_check_exit_codes(tmp_path, capsys):
    task, data = make_task(tmp_path, options={"separator": "\t"})
    _toy_files(data)
    registry = str(tmp_path / "tasks")
    assert main(["tasks", "check", "toy", "--registry-path", registry, "--data-dir", str(data)]) == 0
    assert "train     10 sentences" in capsys.readouterr().out
    spec = yaml.safe_load((tmp_path / "tasks" / "toy" / "task.yaml").read_text())
    spec["splits"]["train"]["num_examples"] = 11
    (tmp_path / "tasks" / "toy" / "task.yaml").write_text(yaml.safe_dump(spec))
    assert main(["tasks", "check", "toy", "--registry-path", registry, "--data-dir", str(data)]) == 1
    assert "MISMATCH: task.yaml says 11" in capsys.readouterr().out
    write(data, "toy", "dev.txt", "a\tO\nb\tB-Z\n")
    assert main(["tasks", "check", "toy", "--registry-path", registry, "--data-dir", str(data)]) == 2
    assert "dev.txt:2: tag 'B-Z' is not in the task's label set" in capsys.readouterr().err
    assert main(["tasks", "check", "toy", "--registry-path", registry, "--data-dir", str(tmp_path)]) == 0
    assert "toy: skipped, data not found" in capsys.readouterr().out
    assert main(["tasks", "check", "nope"]) == 2
