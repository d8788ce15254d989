"""Read a task's split file into plain Python examples; one loader per file format, not per task.

    from scaling_study.tasks.loaders import load_split
    split = load_split(task, Path("shared/datasets/bc5cdr_ner/train.tsv"), "train")
    split.examples[0]   # NER: {"tokens": [...], "tags": ["B-Chemical", "O", ...], "line": 1}
                        # re/cls: {"text": "...", "label": "USED-FOR", "entities": [[s, e], [s, e]], "line": 1}
    split.notes         # {"untagged lines read as O (untagged_lines_are_O)": 32, ...}
    FORMATS["conll"].options, FORMATS["conll"].quirks   # what a task.yaml may say, per format

Formats (`task.yaml` `format`, options in `format_options`):

- `conll`: one token per line, sentences separated by any run of blank lines; `token_column` and
  `tag_column` (negative counts from the end: -1 is the last column; never the same column);
  `separator` `"\\t"`, `" "` or `"whitespace"`. `-DOCSTART-` lines (with or without columns) are
  skipped wherever they occur.
- `jsonl_markers`: JSON lines `{text, label, ...}`; `entity_markers` lists open/close pairs
  (`["<<", ">>", "[[", "]]"]`) that wrap the two arguments inside `text`, or `[]` for plain text.
  A marker is a marker only where it stands as one (see `_marker_candidates`); the same characters
  elsewhere (`STA2>>17-phenyl`) are text and are kept.
- `scierc_json`: the raw SciERC release (one document per line: `sentences`, `ner`, `relations`);
  `target: ner` gives sentences with IOB2 tags, `target: re` one marked example per relation.
- `text_label`: CSV/TSV; `text_column`/`label_column` are header names or 0-based numbers.

Each format is one `Format` record (in `FORMATS`, beside its loader below): the task types it can
hold, its options, and the quirks it knows. Tags come out as IOB2 whatever the file's scheme
(`label_scheme: iob1` is converted). The quirks a dataset's README documents are named in
`format_options.quirks`; each record's `quirks` says what each one changes. Anything else unusual in
a file is a `UserError` naming file, line, what is wrong and what is allowed: the loaders never guess.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import stat
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from scaling_study.errors import SpecError, UserError

if TYPE_CHECKING:  # registry imports this module (check_options); the type only annotates here
    from scaling_study.tasks.registry import TaskInfo

SPLITS = ("train", "dev", "test")
MAX_LINE_CHARS = 1 << 20
"""Longest line a split file may have (1,048,576 characters; real files stay under 6,000). Longer
lines are refused with their line number: they come from a file that is not what the task says.
(`text_label` files also obey the csv module's limit of 131,072 characters per field.)"""
MAX_JSON_DEPTH = 20
"""Deepest nesting of arrays and objects in a JSON line (SciERC documents nest 4 deep); deeper lines
are refused with their line number, as are integers over Python's 4,300-digit conversion limit."""


@dataclasses.dataclass
class LoadedSplit:
    """The examples of one split file, and counts of the documented quirks met while reading it."""

    examples: list[dict]
    path: str
    notes: Counter = dataclasses.field(default_factory=Counter)


@dataclasses.dataclass(frozen=True)
class Format:
    """One split-file format: what it holds, what a task.yaml may say about it, how it is read."""

    name: str
    types: tuple[str, ...]
    """Task types whose files it can hold."""
    options: dict[str, str]
    """`format_options` key -> what it accepts (`quirks` is added to every format)."""
    quirks: dict[str, str]
    """Quirk name -> what the loader does about it. Informational quirks change nothing but are
    accepted so that a task.yaml can record what its README says."""
    check: Callable[[_Options], None]
    """Fills in the defaults of the options and refuses bad values (`_Options.need`)."""
    load: Callable[[TaskInfo, dict, str, str, str, LoadedSplit], None]
    """(task, checked options, text, path, split, out): the file's examples into `out.examples`."""


@dataclasses.dataclass
class _Options:
    """A task's `format_options` being checked; errors name its task.yaml."""

    task: TaskInfo
    file: str
    values: dict
    allowed: dict[str, str]

    def need(self, key: str, ok: Callable[[Any], bool], default: Any = dataclasses.MISSING) -> None:
        """Fill in `default` when `key` is absent (or refuse its absence), then refuse a value `ok` rejects."""
        if key not in self.values:
            if default is dataclasses.MISSING:
                raise SpecError(self.file, f"format_options.{key}", problem="missing", allowed=self.allowed[key])
            self.values[key] = default
        if not ok(self.values[key]):
            raise SpecError(self.file, f"format_options.{key}", self.values[key], self.allowed[key],
                            problem="invalid value")

    def refuse(self, key: str, allowed: str, problem: str) -> None:
        raise SpecError(self.file, f"format_options.{key}", self.values[key], allowed, problem=problem)


def tag_set(task: TaskInfo) -> list[str]:
    """The model's label list: NER `O, B-T1, I-T1, B-T2, ...` in `labels` order; else `labels`."""
    if task.type != "ner":
        return list(task.labels)
    return ["O"] + [f"{p}-{t}" for t in task.labels for p in ("B", "I")]


def check_options(task: TaskInfo) -> dict[str, Any]:
    """`format_options` with defaults, checked against the format; raises SpecError naming task.yaml."""
    file = str(Path(task.folder) / "task.yaml") if task.folder else f"task {task.id}"
    fmt = FORMATS[task.format]
    allowed = {**fmt.options, "quirks": "a list of quirk names"}
    opts = _Options(task, file, dict(task.format_options), allowed)
    for key in opts.values:
        if key not in allowed:
            raise SpecError(file, f"format_options.{key}", opts.values[key],
                            f"for format {task.format}: {', '.join(allowed)}", problem="unknown option")
    quirks = opts.values.get("quirks") or []
    if not isinstance(quirks, list):
        raise SpecError(file, "format_options.quirks", quirks, "a list of quirk names", problem="not a list")
    for i, q in enumerate(quirks):
        if not isinstance(q, str) or q not in fmt.quirks:
            raise SpecError(file, f"format_options.quirks[{i}]", q,
                            f"for format {task.format}: {', '.join(sorted(fmt.quirks))} (see docs/tasks.md)",
                            problem="unknown quirk")
    opts.values["quirks"] = set(quirks)
    fmt.check(opts)
    if task.type not in fmt.types:
        fits = [name for name, f in FORMATS.items() if task.type in f.types]
        fits = [", ".join(fits[:-1]), fits[-1]] if len(fits) > 1 else fits
        raise SpecError(file, "format", task.format, f"{' or '.join(fits)} for {task.type}",
                        problem=f"does not fit type {task.type}")
    return opts.values


def load_split(task: TaskInfo, path: Path, split: str) -> LoadedSplit:
    """Read one split file of `task`; raises UserError on anything the task's quirks do not allow."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read, a device never end
            raise _fail(str(path), None, "not a regular file", "a readable UTF-8 text file")
        raw = Path(path).read_bytes()
    except OSError as exc:  # unreadable, a folder, vanished since it was located
        raise _fail(str(path), None, f"cannot read the file ({exc.strerror or exc})",
                    "a readable UTF-8 text file") from None
    return parse_split(task, raw, str(path), split)


def parse_split(task: TaskInfo, raw: bytes, path: str, split: str) -> LoadedSplit:
    """`load_split` on the bytes of a file; `path` only names it in messages."""
    opts = check_options(task)
    text = _decode(raw, path)
    out = LoadedSplit(examples=[], path=path)
    FORMATS[task.format].load(task, opts, text, path, split, out)
    if not out.examples:
        raise UserError(f"{path}: no examples in the file; allowed: a {task.format} file with at least one "
                        f"{'sentence' if task.type == 'ner' else 'example'}")
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------- helpers


def _fail(path: str, line: int | None, problem: str, allowed: str) -> UserError:
    where = f"{path}:{line}" if line else path
    return UserError(f"{where}: {problem}; allowed: {allowed}")


def _decode(raw: bytes, path: str) -> str:
    """The file's text; empty, binary (NUL bytes), non-UTF-8 files and over-long lines are refused."""
    if not raw.strip():
        raise _fail(path, None, "empty file", "a UTF-8 text file with at least one example")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise _fail(path, raw.count(b"\n", 0, nul) + 1, f"a NUL byte at byte {nul}: a binary file, or UTF-16/32 "
                    "text", "UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _fail(path, line, f"bytes that are not UTF-8 ({raw[exc.start:exc.start + 4]!r} at byte "
                    f"{exc.start})", "UTF-8 text") from None
    if len(text) > MAX_LINE_CHARS:  # only a long file can hold a long line: find it in one pass
        for n, line in enumerate(text.split("\n"), start=1):
            if len(line) > MAX_LINE_CHARS:
                raise _fail(path, n, f"a line of {len(line):,} characters",
                            f"at most {MAX_LINE_CHARS:,} characters per line")
    return text.removeprefix("\ufeff")


def _lines(text: str) -> list[str]:
    # Split on "\n" only: str.splitlines() also breaks at \x1c, \x85, \u2028, ... which occur in tokens.
    return [line.removesuffix("\r") for line in text.split("\n")]


def _tag_allowed(task: TaskInfo) -> str:
    scheme = "IOB1 or IOB2" if task.label_scheme == "iob1" else "IOB2"
    return f"O, or B-/I- ({scheme}) with one of the types {', '.join(task.labels)}"


def _check_tag(tag: str, task: TaskInfo, path: str, line: int) -> None:
    if tag == "O":
        return
    if tag[:2] not in ("B-", "I-") or tag[2:] not in task.labels:
        raise _fail(path, line, f"tag {tag!r} is not in the task's label set", _tag_allowed(task))


def _iob_fix(tags: list[str], lines: list[int], task: TaskInfo, path: str, allow_violations: bool,
             notes: Counter) -> list[str]:
    """IOB1 -> IOB2, or check IOB2 (an I-X must follow B-X or I-X)."""
    out = []
    prev = "O"
    for tag, line in zip(tags, lines):
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            if task.label_scheme == "iob1":
                tag = "B-" + tag[2:]
                notes["IOB1 entity starts converted to B- (IOB2)"] += 1
            elif allow_violations:
                notes["I- tags that IOB2 does not allow, kept as released (iob2_violation_in_<split>)"] += 1
            else:
                raise _fail(path, line, f"{tag} after {prev}: IOB2 does not allow an I- tag that does not continue "
                            f"an entity of its type", f"B-{tag[2:]} to start an entity (or declare "
                            f"label_scheme: iob1, or an iob2_violation_in_<split> quirk if the README documents it)")
        out.append(tag)
        prev = tag
    return out


def _json_line(line: str, path: str, n: int, allowed: str) -> Any:
    """One JSON line parsed within the limits (`MAX_JSON_DEPTH`, Python's integer digits); one-line errors."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _fail(path, n, f"not JSON ({exc.msg} at column {exc.colno})", allowed) from None
    except RecursionError:  # the parser gives up near Python's recursion limit, long before memory does
        raise _fail(path, n, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", allowed) from None
    except ValueError as exc:  # an integer literal over sys.get_int_max_str_digits() digits
        raise _fail(path, n, f"a JSON number too long to read ({str(exc).split(':')[0]})", allowed) from None
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []
    while stack:
        item, level = stack.pop()
        if level > MAX_JSON_DEPTH:
            raise _fail(path, n, f"JSON nested deeper than {MAX_JSON_DEPTH} levels", allowed)
        stack.extend((x, level + 1) for x in (item.values() if isinstance(item, dict) else item)
                     if isinstance(x, (list, dict)))
    return value


# ----------------------------------------------------------------------------------- conll


def _conll_options(o: _Options) -> None:
    o.need("token_column", _is_int, 0)
    o.need("tag_column", _is_int, -1)
    o.need("separator", lambda v: v in ("\t", " ", "whitespace"), "whitespace")
    o.need("docstart", lambda v: isinstance(v, bool), False)
    tok, tag = o.values["token_column"], o.values["tag_column"]
    if tok == tag:  # same sign and value: the same column in every file (other pairs are checked per file)
        o.refuse("token_column", f"a column other than tag_column ({tag})", "the tag column")
    if "multi_label_tags" in o.values["quirks"] and tok >= 0 and tok > tag >= 0:
        o.refuse("token_column", f"a column before tag_column ({tag}): with multi_label_tags every column from "
                 "tag_column on is a tag", "among the tag columns")


def _conll_columns(line: str, n: int, opts: dict, first: list[int], path: str) -> list[str]:
    """The line's columns, checked: the token and the tag column exist and differ, and every token line
    has as many columns as the file's first one (`first`: [count, line], filled on the first line)."""
    sep, tok_col, tag_col, quirks = opts["separator"], opts["token_column"], opts["tag_column"], opts["quirks"]
    shown = {"\t": "TAB", " ": "space", "whitespace": "whitespace"}[sep]
    if "rsplit_on_last_space" in quirks:
        cols = line.rsplit(sep if sep != "whitespace" else " ", 1)
        if len(cols) != 2:
            raise _fail(path, n, f"no {shown} before the tag (line {line!r})",
                        "TOKEN<space>TAG, split at the last space")
        return cols
    cols = line.split() if sep == "whitespace" else line.split(sep)
    if "multi_label_tags" in quirks:
        if len(cols) <= max(tok_col, tag_col):
            raise _fail(path, n, f"{len(cols)} columns", f"at least {max(tok_col, tag_col) + 1} "
                        f"{shown}-separated columns (tags from column {tag_col} on)")
        if tok_col % len(cols) >= tag_col % len(cols):
            raise _fail(path, n, f"{len(cols)} columns: token_column {tok_col} is among the tag columns "
                        f"(from tag_column {tag_col} on)", "a token column before the tag columns")
        return cols
    if first:
        if len(cols) != first[0]:
            raise _fail(path, n, f"{len(cols)} {shown}-separated columns, but the file's first token line "
                        f"(line {first[1]}) has {first[0]}", f"{first[0]} columns on every token line")
        return cols
    ncols = len(cols)
    first += [ncols, n]
    if not (-ncols <= tok_col < ncols and -ncols <= tag_col < ncols) or ncols < 2:
        raise _fail(path, n, f"{ncols} {shown}-separated column(s), but token_column {tok_col} and tag_column "
                    f"{tag_col}", "a token and a tag column on every line (check format_options.separator and "
                    "the column indices)")
    if tok_col % ncols == tag_col % ncols:
        raise _fail(path, n, f"{ncols} {shown}-separated columns: token_column {tok_col} and tag_column {tag_col} "
                    "are the same column", "a token column other than the tag column (check "
                    "format_options.token_column)")
    return cols


def _load_conll(task: TaskInfo, opts: dict, text: str, path: str, split: str, out: LoadedSplit) -> None:
    quirks = opts["quirks"]
    multi = "multi_label_tags" in quirks
    tok_col, tag_col = opts["token_column"], opts["tag_column"]
    allow_violations = f"iob2_violation_in_{split}" in quirks
    first: list[int] = []
    tokens: list[str] = []
    tags: list[str] = []
    where: list[int] = []
    prev_type = ""

    def flush() -> None:
        nonlocal prev_type
        if tokens:
            fixed = _iob_fix(tags, where, task, path, allow_violations, out.notes)
            out.examples.append({"tokens": list(tokens), "tags": fixed, "line": where[0]})
        tokens.clear(), tags.clear(), where.clear()
        prev_type = ""

    for n, line in enumerate(_lines(text), start=1):
        if not line.strip():
            flush()
            continue
        if line.startswith("-DOCSTART-"):
            flush()
            out.notes["-DOCSTART- lines skipped"] += 1
            continue
        cols = _conll_columns(line, n, opts, first, path)
        token = cols[tok_col].strip()
        if multi:
            candidates = [c.strip() for c in cols[tag_col:] if c.strip()] or [""]
            tag = _pick_tag(candidates, prev_type, out.notes)
        else:
            tag = cols[tag_col].strip()
        if tag == "":
            if "untagged_lines_are_O" not in quirks:
                raise _fail(path, n, "empty tag", _tag_allowed(task) + " (or the untagged_lines_are_O quirk)")
            tag = "O"
            out.notes["untagged lines read as O (untagged_lines_are_O)"] += 1
        if token == "":
            if "empty_token_lines" not in quirks:
                raise _fail(path, n, "empty token", "a non-empty token (or the empty_token_lines quirk)")
            out.notes["empty tokens kept (empty_token_lines)"] += 1
        if " " in token:
            out.notes["tokens containing a space (token_may_contain_space)"] += 1
        _check_tag(tag, task, path, n)
        prev_type = tag[2:] if tag != "O" else ""
        tokens.append(token)
        tags.append(tag)
        where.append(n)
    flush()


def _pick_tag(candidates: list[str], prev_type: str, notes: Counter) -> str:
    if len(candidates) > 1:
        notes["tokens with several tags, one kept (multi_label_tags)"] += 1
    if prev_type and f"I-{prev_type}" in candidates:
        return f"I-{prev_type}"
    for tag in candidates:
        if tag.startswith("B-"):
            return tag
    tag = candidates[0]
    if len(candidates) > 1 and tag.startswith("I-") and tag[2:] != prev_type:
        notes["I- tags left without their entity, made B- (multi_label_tags)"] += 1
        return "B-" + tag[2:]
    return tag


CONLL = Format(
    name="conll", types=("ner",), check=_conll_options, load=_load_conll,
    options={"token_column": "an integer column index (negative counts from the end), not the tag column",
             "tag_column": "an integer column index (-1 = last)",
             "separator": '"\\t", " " or "whitespace"',
             "docstart": "true/false: whether the files have -DOCSTART- lines (they are skipped either way)"},
    quirks={
        "rsplit_on_last_space": "each line is split once, at its last space (`line.rsplit(' ', 1)`): token, tag; "
                                "the token may contain spaces",
        "token_may_contain_space": "tokens with inner spaces are kept (with `rsplit_on_last_space`)",
        "untagged_lines_are_O": "a line whose tag field is empty (`TOKEN ` with a trailing separator) is tagged O",
        "empty_token_lines": "a line with an empty token (` O`) is a token, not a sentence break",
        "blank_line_runs_vary": "informational: any run of blank lines is one sentence boundary (always so)",
        "double_blank_line_before_docstart": "informational: any run of blank lines is one boundary (always so)",
        "docstart_line_two_columns": "informational: `-DOCSTART-` lines are skipped whatever their columns",
        "docstart_line_without_tabs": "informational: `-DOCSTART-` lines are skipped whatever their columns",
        "iob2_violation_in_train": "the train file may have I-X tags that IOB2 does not allow (after O or another "
                                   "type); kept as released, so strict decoding drops them",
        "iob2_violation_in_dev": "as iob2_violation_in_train, for the dev file",
        "iob2_violation_in_test": "as iob2_violation_in_train, for the test file",
        "multi_label_tags": "every column from `tag_column` on is a tag; one is kept per token: the one continuing "
                            "the previous token's entity, else the first B-, else the first; an I- tag left without "
                            "its entity becomes B- (counted)",
        "extra_metadata_columns": "informational: columns other than token and tag are ignored (always so)",
        "train_rebuilt_tokenization_differs": "informational: train is tokenised differently from dev/test",
        "requires_conversion_from_kaggle_json": "informational: the files must be made by a conversion first; data "
                                                "lookup says so when they are missing",
    })


# ----------------------------------------------------------------------------------- jsonl_markers


def _marker_candidates(text: str, marker: str, opening: bool, glued: bool) -> list[int]:
    """Where `marker` stands as a marker: a whitespace-separated token, or with the glued quirk with
    whitespace on its inner side only (`pan-[[ erbB ]]`, `<< Ang II >>-induced`). Everywhere else the
    characters are text (`STA2>>17-phenyl`, `2-[[2-hydroxy`)."""
    found = []
    i = text.find(marker)
    while i >= 0:
        j = i + len(marker)
        before = i == 0 or text[i - 1].isspace()
        after = j == len(text) or text[j].isspace()
        inner = (j < len(text) and text[j].isspace()) if opening else (i > 0 and text[i - 1].isspace())
        if inner if glued else before and after:
            found.append(i)
        i = text.find(marker, i + 1)
    return found


def _marker_pair(text: str, open_: str, close: str, markers: list[str], glued: bool, path: str,
                 line: int) -> tuple[int, int]:
    """(position of the open marker, position of its close marker): the one open marker and the first
    close marker after it; a close marker elsewhere is text (`94 >> probenecid >> flufenamic`)."""
    def read(glued: bool) -> tuple[list[int], list[int], list[int]]:
        opens = _marker_candidates(text, open_, True, glued)
        closes = _marker_candidates(text, close, False, glued)
        return opens, [c for c in closes if opens and c >= opens[0] + len(open_)], closes

    opens, after, closes = read(glued)
    if len(opens) != 1 or not after:
        glued_opens, glued_after, _ = read(True)
        if not glued and len(glued_opens) == 1 and glued_after:
            raise _fail(path, line, f"marker {open_!r} or {close!r} touches neighbouring text",
                        "markers as separate whitespace tokens (or the markers_glued_to_adjacent_text quirk)")
        if len(opens) == 1 and closes:
            raise _fail(path, line, f"{close!r} before {open_!r}", f"{open_} argument {close}")
        how = "with whitespace on its inner side" if glued else "as a separate whitespace token"
        raise _fail(path, line, f"marker {open_!r} occurs {len(opens)} times and {close!r} {len(closes)} times",
                    f"each of {' '.join(markers)} exactly once {how}, the close after the open (the same "
                    "characters elsewhere are text)")
    if not text[opens[0] + len(open_):after[0]].strip():
        raise _fail(path, line, f"nothing between {open_!r} and {close!r}", "a non-empty argument")
    return opens[0], after[0]


def _marker_spans(text: str, markers: list[str], quirks: set[str], path: str, line: int,
                  notes: Counter) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Character spans of the two marked arguments (inside the markers, without the padding spaces),
    and the positions of the markers themselves (open, close per pair)."""
    as_text = "marker_characters_in_text" in quirks
    if not as_text:
        for open_, close in (markers[0:2], markers[2:4]):
            if text.count(open_) != 1 or text.count(close) != 1:
                raise _fail(path, line, f"marker {open_!r} occurs {text.count(open_)} times and {close!r} "
                            f"{text.count(close)} times", f"each of {' '.join(markers)} exactly once (or the "
                            "marker_characters_in_text quirk where the README says they also occur as text)")
    glued = "markers_glued_to_adjacent_text" in quirks
    pairs = [_marker_pair(text, o, c, markers, glued, path, line) for o, c in (markers[0:2], markers[2:4])]
    (a0, a1), (b0, b1) = pairs
    if a0 < b0 < a1 < b1 or b0 < a0 < b1 < a1:
        order = " ... ".join(m for _, m in sorted(zip((a0, a1, b0, b1), markers)))
        raise _fail(path, line, f"the two arguments cross ({order})", "two arguments side by side, or one "
                    "inside the other")
    spans = []
    for (start, end), open_ in zip(pairs, markers[0::2]):
        inner = text[start + len(open_):end]
        lead = len(inner) - len(inner.lstrip())
        spans.append([start + len(open_) + lead, start + len(open_) + len(inner.rstrip())])
    for marker in markers if as_text else ():
        if text.count(marker) > 1:
            notes[f"examples with {marker!r} as text besides the marker (marker_characters_in_text)"] += 1
    return spans, pairs


def _unmarked_token_spans(text: str, markers: list[str], pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Inclusive token offsets of the two arguments in the sentence without markers (SciBERT's metadata)."""
    blank = list(text)
    for (start, end), open_, close in zip(pairs, markers[0::2], markers[1::2]):
        blank[start:start + len(open_)] = " " * len(open_)
        blank[end:end + len(close)] = " " * len(close)
    unmarked = "".join(blank)
    return [[len(unmarked[:start].split()), len(unmarked[:end].split()) - 1] for start, end in pairs]


def _load_jsonl_markers(task: TaskInfo, opts: dict, text: str, path: str, split: str, out: LoadedSplit) -> None:
    quirks, markers = opts["quirks"], opts["entity_markers"]
    tfield, lfield = opts["text_field"], opts["label_field"]
    shape = f'one JSON object per line, {{"{tfield}": ..., "{lfield}": ...}}'
    for n, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        record = _json_line(line, path, n, shape)
        if not isinstance(record, dict) or not isinstance(record.get(tfield), str) or lfield not in record:
            raise _fail(path, n, f"not an object with a string {tfield!r} and a {lfield!r}",
                        f'{{"{tfield}": "<text>", "{lfield}": "<label>", ...}}')
        label = record[lfield]
        if not isinstance(label, str) or label not in task.labels:
            raise _fail(path, n, f"label {label!r} is not in the task's label set", ", ".join(task.labels))
        sentence = record[tfield]
        entities, pairs = _marker_spans(sentence, markers, quirks, path, n, out.notes) if markers else ([], [])
        meta = record.get("metadata")
        if "empty_metadata" in quirks and meta not in (None, []):
            raise _fail(path, n, f"metadata {meta!r}", "[] (empty_metadata)")
        if "metadata_token_offsets" in quirks and markers:
            offsets = _unmarked_token_spans(sentence, markers, pairs)
            ok = (isinstance(meta, list) and len(meta) == 4 and all(map(_is_int, meta))
                  and sorted([meta[0:2], meta[2:4]]) == sorted(offsets))
            if not ok:
                raise _fail(path, n, f"metadata {meta!r} does not match the marked spans (token offsets "
                            f"{offsets[0]} and {offsets[1]} in the unmarked sentence)",
                            "the 4 inclusive token offsets of the two marked spans (metadata_token_offsets)")
        if markers and entities[0][0] > entities[1][0]:
            out.notes[f"examples where {markers[2]} comes before {markers[0]}"] += 1
        if not sentence.strip():
            out.notes["empty texts"] += 1
        out.examples.append({"text": sentence, "label": label, "entities": entities, "line": n})


def _jsonl_markers_options(o: _Options) -> None:
    o.need("text_field", lambda v: isinstance(v, str), "text")
    o.need("label_field", lambda v: isinstance(v, str), "label")
    o.need("entity_markers", lambda v: isinstance(v, list) and len(v) in (0, 4) and len(set(v)) == len(v)
           and all(isinstance(m, str) and m.strip() == m and m for m in v), [])


JSONL_MARKERS = Format(
    name="jsonl_markers", types=("re", "cls"), check=_jsonl_markers_options, load=_load_jsonl_markers,
    options={"text_field": "the JSON key of the text (default text)",
             "label_field": "the JSON key of the label (default label)",
             "entity_markers": "[] or [open1, close1, open2, close2]"},
    quirks={
        "markers_glued_to_adjacent_text": "markers may touch neighbouring text on their outer side (`pan-[[ erbB ]]`, "
                                          "`<< Ang II >>-induced`) and are markers where their inner side is "
                                          "whitespace; without this quirk every marker is a whitespace-separated "
                                          "token. Elsewhere the same characters are text",
        "marker_characters_in_text": "the marker strings also occur as text (`STA2>>17-phenyl`, `94 >> probenecid`, "
                                     "`2-[[2-hydroxy`): an occurrence is a marker only where it stands as one (the "
                                     "one open marker, then the first close marker after it); the others are kept "
                                     "as text (counted). Without this quirk each marker occurs exactly once",
        "markers_by_position_not_role": "informational: the first marker pair wraps the argument that comes "
                                        "first; examples where it does not are counted",
        "marker_type_gives_role": "informational: the marker pair carries the argument's role",
        "marker_order_varies": "informational: either marker pair may come first",
        "metadata_token_offsets": "`metadata` must hold the 4 inclusive token offsets of the two marked spans in "
                                  "the unmarked sentence; checked on every line",
        "empty_metadata": "`metadata` must be `[]` (or absent); checked on every line",
        "train_dev_derived_from_official_dev": "informational: train/dev are a partition of the official dev split "
                                               "(see the README)",
    })


# ----------------------------------------------------------------------------------- scierc_json


def _scierc_document(doc: Any) -> tuple[list, list, list]:
    """The document's sentences, ner and relations lists, their shapes checked; raises ValueError."""
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("sentences", "ner", "relations")):
        raise ValueError("an object with the lists sentences, ner and relations is needed")
    sentences, ner, relations = doc["sentences"], doc["ner"], doc["relations"]
    if not len(sentences) == len(ner) == len(relations):
        raise ValueError("sentences, ner and relations differ in length")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for i, (sent, spans, rels) in enumerate(zip(sentences, ner, relations)):
        if not isinstance(sent, list) or not sent or not all(isinstance(t, str) and t for t in sent):
            raise ValueError(f"sentences[{i}] is not a non-empty list of non-empty token strings")
        for what, items, ints in (("ner", spans, 2), ("relations", rels, 4)):
            if not isinstance(items, list) or not all(
                    isinstance(x, list) and len(x) == ints + 1 and all(map(is_int, x[:ints])) and isinstance(x[ints], str)
                    for x in items):
                raise ValueError(f"{what}[{i}] is not a list of [{', '.join(['int'] * ints)}, label] items")
    return sentences, ner, relations


def _scierc_relation(sent: list[str], head: tuple[int, int], tail: tuple[int, int],
                     markers: list[str]) -> tuple[str, list[list[int]]]:
    """The sentence with the head and tail marked as in SciBERT's files (`[[ head ]]`, `<< tail >>`, markers
    as separate tokens), and the character spans of both arguments."""
    ho, hc, to, tc = markers
    pieces: list[str] = []
    first: dict[int, int] = {}  # token index -> its piece index in the marked sentence
    for i, tok in enumerate(sent):
        pieces += [ho] if i == head[0] else []
        pieces += [to] if i == tail[0] else []
        first[i] = len(pieces)
        pieces.append(tok)
        pieces += [hc] if i == head[1] else []
        pieces += [tc] if i == tail[1] else []
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece) + 1)
    spans = [[starts[first[a]], starts[first[b]] + len(sent[b])] for a, b in (head, tail)]
    return " ".join(pieces), spans


def _load_scierc_json(task: TaskInfo, opts: dict, text: str, path: str, split: str, out: LoadedSplit) -> None:
    """Raw SciERC: NER sentences (nested spans flattened: a later span overwrites an earlier one's tokens,
    as SciBERT's flat files do) or relation examples marked as in SciBERT's files (head [[ ]], tail << >>)."""
    target = opts["target"]
    shape = ('{"doc_key": ..., "sentences": [[tokens]], "ner": [[[start, end, type]]], '
             '"relations": [[[s1, e1, s2, e2, label]]]} per line')
    for n, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            sentences, ner, relations = _scierc_document(_json_line(line, path, n, shape))
        except ValueError as exc:
            raise _fail(path, n, f"not a SciERC document ({exc})", shape) from None
        offset = 0
        for sent, spans, rels in zip(sentences, ner, relations):
            size = len(sent)

            def local(a: Any, b: Any, what: str) -> tuple[int, int]:
                if not (isinstance(a, int) and isinstance(b, int) and offset <= a <= b < offset + size):
                    raise _fail(path, n, f"{what} span {[a, b]} outside its sentence (document tokens "
                                f"{offset}-{offset + size - 1})", "inclusive document-level token offsets")
                return a - offset, b - offset

            if target == "ner":
                owner: list[int] = [-1] * size
                types: list[str] = []
                for k, span in enumerate(spans):
                    a, b = local(span[0], span[1], "entity")
                    if span[2] not in task.labels:
                        raise _fail(path, n, f"entity type {span[2]!r} is not in the label set", ", ".join(task.labels))
                    types.append(span[2])
                    if any(o >= 0 for o in owner[a:b + 1]):
                        out.notes["nested or overlapping spans flattened (later span wins)"] += 1
                    owner[a:b + 1] = [k] * (b - a + 1)
                tags = ["O" if o < 0 else ("I-" if i and owner[i - 1] == o else "B-") + types[o]
                        for i, o in enumerate(owner)]
                out.examples.append({"tokens": list(sent), "tags": tags, "line": n})
            else:
                for s1, e1, s2, e2, label in rels:
                    if label not in task.labels:
                        raise _fail(path, n, f"relation {label!r} is not in the label set", ", ".join(task.labels))
                    head, tail = local(s1, e1, "relation argument"), local(s2, e2, "relation argument")
                    sentence, entities = _scierc_relation(sent, head, tail,
                                                          [*opts["head_markers"], *opts["tail_markers"]])
                    out.examples.append({"text": sentence, "label": label, "entities": entities, "line": n})
            offset += size


def _scierc_json_options(o: _Options) -> None:
    o.need("target", lambda v: v in ("ner", "re"))
    pair = lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(m, str) and m for m in v)  # noqa: E731
    o.need("head_markers", pair, ["[[", "]]"])
    o.need("tail_markers", pair, ["<<", ">>"])
    if (o.values["target"] == "ner") != (o.task.type == "ner"):
        o.refuse("target", f"{'ner' if o.task.type == 'ner' else 're'} for a task of type {o.task.type}",
                 "does not fit the task type")


SCIERC_JSON = Format(
    name="scierc_json", types=("ner", "re", "cls"), check=_scierc_json_options, load=_load_scierc_json,
    options={"target": "ner or re",
             "head_markers": "[open, close] around the relation's first argument (default [[, ]])",
             "tail_markers": "[open, close] around the second argument (default <<, >>)"},
    quirks={})


# ----------------------------------------------------------------------------------- text_label


def _load_text_label(task: TaskInfo, opts: dict, text: str, path: str, split: str, out: LoadedSplit) -> None:
    quirks = opts["quirks"]
    quoting = csv.QUOTE_MINIMAL if "csv_quoted_fields" in quirks else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=opts["separator"], quoting=quoting,
                        strict=True)
    columns = {"text": opts["text_column"], "label": opts["label_column"]}
    width = None
    try:
        for row in reader:
            n = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if width is None and opts["header"]:
                width = len(row)
                for what, col in columns.items():
                    if isinstance(col, str):
                        if col not in row:
                            raise _fail(path, n, f"{what}_column {col!r} is not in the header {row}",
                                        f"one of {', '.join(row)}")
                        columns[what] = row.index(col)
                    elif col >= len(row):
                        raise _fail(path, n, f"{what}_column {col} but the header has {len(row)} columns",
                                    f"0 to {len(row) - 1}")
                continue
            if width is None:
                width = len(row)
            if len(row) != width:
                raise _fail(path, n, f"{len(row)} fields, the first row has {width}",
                            f"{width} fields per row" + ("" if quoting == csv.QUOTE_MINIMAL else
                                                         " (or the csv_quoted_fields quirk for quoted fields)"))
            if max(columns.values()) >= width:
                raise _fail(path, n, f"{width} columns, but text_column/label_column "
                            f"{columns['text']}/{columns['label']}", f"column numbers 0 to {width - 1}")
            label = row[columns["label"]].strip()
            if label not in task.labels:
                raise _fail(path, n, f"label {label!r} is not in the task's label set", ", ".join(task.labels))
            out.examples.append({"text": row[columns["text"]], "label": label, "entities": [], "line": n})
    except csv.Error as exc:
        raise _fail(path, reader.line_num, f"unreadable CSV ({exc})",
                    f"{opts['separator']!r}-separated rows, double-quoted fields") from None


def _text_label_options(o: _Options) -> None:
    o.need("separator", lambda v: isinstance(v, str) and len(v) == 1, ",")
    col = lambda v: _is_int(v) and v >= 0 or isinstance(v, str) and v != ""  # noqa: E731
    o.need("text_column", col)
    o.need("label_column", col)
    named = isinstance(o.values["text_column"], str) or isinstance(o.values["label_column"], str)
    o.need("header", lambda v: isinstance(v, bool) and (v or not named),
           named or "csv_header_named_columns" in o.values["quirks"])


TEXT_LABEL = Format(
    name="text_label", types=("re", "cls"), check=_text_label_options, load=_load_text_label,
    options={"separator": 'one character, e.g. "," or "\\t"',
             "text_column": "a header name or a 0-based column number",
             "label_column": "a header name or a 0-based column number",
             "header": "true/false: whether the first row is a header (default: true when columns are names)"},
    quirks={
        "csv_header_named_columns": "the first row is a header; columns are chosen by name",
        "csv_quoted_fields": "fields may be quoted (`\"...\"`, with separators and newlines inside); without it "
                             "quotes are ordinary characters",
        "duplicate_validation_file": "informational: the source also has another validation file; only the one "
                                     "named in `splits.dev` is read",
    })


FORMATS: dict[str, Format] = {f.name: f for f in (CONLL, JSONL_MARKERS, SCIERC_JSON, TEXT_LABEL)}
"""Every split-file format, by the name a task.yaml gives in `format`."""
