"""Load YAML config files into typed dataclasses, with one-line errors that name file, line and field.

    from scaling_study.yamlio import load_typed
    spec = load_typed(StudySpec, "experiments/smoke.yaml")        # raises SpecErrors

`read_yaml` parses with four fixes over plain `yaml.safe_load`: duplicate keys are errors (PyYAML
keeps the last one silently), `5e-4` is a float as in YAML 1.2 (YAML 1.1 makes it a string),
every field path remembers its line so that errors can point at it, and only plain data passes:
the file must be a regular file of at most MAX_YAML_BYTES, nested at most MAX_YAML_DEPTH deep,
with at most MAX_YAML_NODES values once aliases are expanded (an alias bomb is refused before it
expands), keys that are plain text, no tags beyond the core schema's and integers within 64 bits.
`validate` runs a pydantic dataclass over the data and turns each pydantic error into a `SpecError`
line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import pydantic
import yaml

from scaling_study.errors import SpecError, SpecErrors, file_problem

Path_ = tuple  # a field path: ("pretrain", "steps", 1)


class _Resolver(yaml.resolver.Resolver):
    """YAML 1.1's implicit tags, plus `1e-4` and `5E+3` as floats (YAML 1.2), not strings."""


_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer,
              yaml.constructor.SafeConstructor, _Resolver):
    """SafeLoader with `_Resolver`."""

    def __init__(self, stream):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _Resolver.__init__(self)


class _Replay(yaml.composer.Composer, yaml.constructor.SafeConstructor, _Resolver):
    """Composes and constructs from events already parsed (and checked) by `_check_events`: the
    pure-Python parser is most of the time a spec takes to load, so it runs once."""

    def __init__(self, events: list):
        self._events, self._next = events, 0
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _Resolver.__init__(self)

    def check_event(self, *choices) -> bool:
        if self._next >= len(self._events):
            return False
        return not choices or isinstance(self._events[self._next], choices)

    def peek_event(self):
        return self._events[self._next] if self._next < len(self._events) else None

    def get_event(self):
        event = self.peek_event()
        self._next += 1
        return event

    def dispose(self) -> None:
        pass


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


MAX_YAML_BYTES = 1 << 20
"""Largest spec or task.yaml read (1 MiB; the paper's spec is 3 kB): a bigger file is a wrong file."""
MAX_YAML_DEPTH = 32
"""Deepest nesting of lists and mappings (specs nest 4 deep)."""
MAX_YAML_NODES = 100_000
"""Most values a file may hold once its aliases are expanded: bounds an alias bomb ("billion laughs")."""
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")}
_SEQ, _MAP, _MERGE = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map", "tag:yaml.org,2002:merge"
_STRUCTURE = "plain values (text, numbers, true/false, null), lists and mappings"
_SCALAR_ALLOWED = {"tag:yaml.org,2002:int": "an integer such as 42 (or the text quoted, without the tag)",
                   "tag:yaml.org,2002:float": "a number such as 0.5 or 1e-4 (or the text quoted, without the tag)",
                   "tag:yaml.org,2002:timestamp": "a date such as 2024-05-31 (or the text quoted)",
                   "tag:yaml.org,2002:bool": "true or false", "tag:yaml.org,2002:null": "null, or nothing"}


def _short_tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _check_events(text: str, file: str) -> list:
    """One pass over the parser's events (no recursion, no alias expansion): refuse nesting deeper
    than MAX_YAML_DEPTH, an alias inside its own anchor, and more than MAX_YAML_NODES values with
    the aliases expanded. PyYAML's composer and constructor recurse per level and copy per alias."""
    sizes: dict[str, int] = {}
    stack: list[list] = [[None, 0]]  # [anchor, values so far] per open collection
    events = []
    for event in yaml.parse(text, Loader=_Loader):
        events.append(event)
        line = event.start_mark.line + 1
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) > MAX_YAML_DEPTH:
                raise SpecError(file, "", problem=f"nested deeper than {MAX_YAML_DEPTH} levels", line=line,
                                allowed=f"{_STRUCTURE}, at most {MAX_YAML_DEPTH} levels deep")
            stack.append([event.anchor, 1])
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, count = stack.pop()
        elif isinstance(event, yaml.AliasEvent):
            if any(frame[0] == event.anchor for frame in stack):
                raise SpecError(file, "", problem=f"alias *{event.anchor} inside its own anchor (a recursive "
                                f"structure)", line=line, allowed=f"{_STRUCTURE}; an alias may repeat a value "
                                "defined before it, not contain itself")
            anchor, count = None, sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            anchor, count = event.anchor, 1
        else:
            continue
        if anchor is not None:
            sizes[anchor] = count
        stack[-1][1] += count
        if sum(frame[1] for frame in stack) > MAX_YAML_NODES:
            raise SpecError(file, "", problem=f"more than {MAX_YAML_NODES:,} values once its aliases are "
                            "expanded", line=line, allowed=f"{_STRUCTURE}; aliases that repeat a few values")
    return events


def _scalar(loader: yaml.SafeLoader, node: yaml.ScalarNode, path: Path_, file: str) -> Any:
    line = node.start_mark.line + 1
    if node.tag not in _PLAIN_TAGS:
        raise SpecError(file, format_path(path), problem=f"YAML tag {_short_tag(node.tag)} is not allowed",
                        line=line, allowed=_STRUCTURE)
    try:
        value = loader.construct_object(node)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, yaml.YAMLError) as exc:
        digits = sum(c.isdigit() for c in node.value)
        if "digits" in str(exc):  # Python's int-from-text limit (4,300 digits)
            problem, allowed = f"an integer of {digits:,} digits", "integers from -2**63 to 2**63 - 1"
        else:
            problem, allowed = f"not a valid {_short_tag(node.tag)}", _SCALAR_ALLOWED.get(node.tag, _STRUCTURE)
        raise SpecError(file, format_path(path), node.value, allowed, problem=problem, line=line) from None
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise SpecError(file, format_path(path), problem=f"an integer of {len(str(abs(value)))} digits",
                        line=line, allowed="integers from -2**63 to 2**63 - 1")
    return value


def _build(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, lines: dict, file: str) -> Any:
    """The plain data of a composed node, with every field path's line; refuses what is not
    `_STRUCTURE` (complex keys, tags such as !!binary or !!set), naming the field."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        return _scalar(loader, node, path, file)
    if node.tag not in (_SEQ, _MAP):
        raise SpecError(file, format_path(path), problem=f"YAML tag {_short_tag(node.tag)} is not allowed",
                        line=node.start_mark.line + 1, allowed=_STRUCTURE)
    if isinstance(node, yaml.SequenceNode):
        return [_build(loader, item, path + (i,), lines, file) for i, item in enumerate(node.value)]
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            raise SpecError(file, format_path(path), problem="a key that is a list or mapping (`? [a, b]`)",
                            line=line, allowed="keys that are plain text")
        if key_node.tag == _MERGE:
            continue
        if key_node.value in seen:
            raise SpecError(
                file, format_path(path + (key_node.value,)), line=line, allowed="each key once per mapping",
                problem=f"duplicate key (first on line {seen[key_node.value]})",
            )
        seen[key_node.value] = line
    if any(k.tag == _MERGE for k, _ in node.value):
        loader.flatten_mapping(node)  # `<<: *defaults`: the merged keys first, the mapping's own after them
    out: dict = {}
    for key_node, value_node in node.value:
        key = _scalar(loader, key_node, path + (key_node.value,), file)
        key = key if isinstance(key, (str, int, float, bool)) or key is None else key_node.value
        out[key] = _build(loader, value_node, path + (key_node.value,), lines, file)
        lines[path + (key_node.value,)] = key_node.start_mark.line + 1
    return out


def read_text(file: str | Path, *, what: str = "YAML file", limit: int = MAX_YAML_BYTES) -> str:
    """A user's small text file, refused in one line unless it is a readable regular file of at
    most `limit` bytes in UTF-8 (a FIFO or a device is never opened: it would block or never end)."""
    name = str(file)
    allowed = f"a path to a {what}"
    problem = file_problem(file)
    if problem == "no such file":
        raise SpecError(name, "", problem="file not found", allowed=f"a path to an existing {what}")
    if problem == "a folder":
        raise SpecError(name, "", problem="is a folder", allowed=allowed)
    if problem:
        raise SpecError(name, "", problem=f"is {problem}" if problem.startswith("a ") else problem,
                        allowed=f"{allowed} (a regular file)")
    try:
        with open(file, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise SpecError(name, "", problem=f"cannot read the file ({exc.strerror or exc})",
                        allowed=f"a readable {what}") from None
    if len(raw) > limit:
        raise SpecError(name, "", problem=f"larger than {limit:,} bytes", allowed=f"a {what} of at most {limit:,} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(name, "", problem=f"not UTF-8 text (byte {err.start})", allowed=f"a UTF-8 {what}") from None


def read_yaml(file: str | Path, text: str | None = None) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML text (or the file) into plain data plus a map from field path to line number.

    Only plain data: scalars, lists and mappings with plain keys, at most MAX_YAML_DEPTH deep and
    MAX_YAML_NODES values with aliases expanded, integers within 64 bits; anything else is one
    `SpecError` naming the line."""
    name = str(file)
    if text is None:
        text = read_text(file)
    elif len(text) > MAX_YAML_BYTES:
        raise SpecError(name, "", problem=f"larger than {MAX_YAML_BYTES:,} characters",
                        allowed=f"a YAML file of at most {MAX_YAML_BYTES:,} bytes")
    loader = None
    try:
        loader = _Replay(_check_events(text, name))
        node = loader.get_single_node()
        lines: dict[Path_, int] = {}
        data = _build(loader, node, (), lines, name) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = " ".join(str(err.problem or err.context or "invalid YAML").split())
        raise SpecError(name, "", problem=f"YAML syntax error: {problem}", line=mark.line + 1 if mark else None,
                        allowed="valid YAML (check indentation, colons and quotes)") from None
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1 if isinstance(err.position, int) else None
        raise SpecError(name, "", problem=f"character #x{err.character:04x} is not allowed in YAML", line=line,
                        allowed="printable Unicode text") from None
    except yaml.YAMLError as err:
        raise SpecError(name, "", problem=f"YAML error: {' '.join(str(err).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def line_of(lines: dict[Path_, int], path: Path_) -> int | None:
    """Line of the deepest known prefix of `path` (a missing key points at its parent)."""
    for end in range(len(path), -1, -1):
        if tuple(path[:end]) in lines:
            return lines[tuple(path[:end])]
    return None


def unwrap_type(tp: Any) -> list[Any]:
    """The types a hint admits, with Annotated and unions flattened."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return unwrap_type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(tp) for t in unwrap_type(arg)]
    return [tp]


def _type_at(root: type, path: Path_) -> Any:
    """The declared type at a field path, following dataclass fields, lists and dicts."""
    current: list[Any] = [root]
    for part in path:
        nxt = []
        for tp in current:
            if dataclasses.is_dataclass(tp) and isinstance(part, str):
                hints = typing.get_type_hints(tp, include_extras=True)
                if part in hints:
                    nxt += unwrap_type(hints[part])
            elif typing.get_origin(tp) in (list, tuple) and isinstance(part, int):
                nxt += unwrap_type(typing.get_args(tp)[0])
            elif typing.get_origin(tp) is dict:
                nxt += unwrap_type(typing.get_args(tp)[1])
        current = nxt
    return next((t for t in current if dataclasses.is_dataclass(t)), None)


def field_names(tp: type) -> list[str]:
    return [f.name for f in dataclasses.fields(tp) if f.init]


# pydantic's JSON-mode words, in YAML's
_YAML_WORDS = {"a valid array": "a list", "a valid dictionary": "a mapping", "an object": "a mapping",
               "a valid dictionary or instance": "a mapping"}


def _clean_loc(loc: tuple) -> Path_:
    # pydantic puts union-arm and function names ("function-after[...]", "int") into loc
    out = []
    for part in loc:
        if isinstance(part, str) and (part.startswith(("function-", "union[", "list[", "dict[", "tagged-union"))
                                      or part in {"int", "float", "str", "bool", "none", "list", "dict"}):
            continue
        if isinstance(part, str) and part.startswith("[") and part.endswith("]"):
            continue
        out.append(part)
    return tuple(out)


def validate(cls: type, data: Any, file: str, lines: dict[Path_, int], prefix: Path_ = ()) -> Any:
    """Build `cls` (a pydantic dataclass) from `data` or raise SpecErrors, one line per problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(file, format_path(prefix), data, f"a mapping with keys {', '.join(field_names(cls))}",
                        line=line_of(lines, prefix), problem="expected a mapping")
    try:
        # JSON mode: strict about scalars (no "32" for an int) yet takes mappings for nested
        # dataclasses, which strict Python mode refuses. YAML dates and the like become strings.
        return _adapter(cls).validate_json(json.dumps(data, default=str))
    except pydantic.ValidationError as err:
        errors, seen = [], set()
        for item in err.errors(include_url=False):
            path = prefix + _clean_loc(item["loc"])
            kind, msg = item["type"], item["msg"]
            value = item.get("input", SpecError._MISSING)
            if kind in ("extra_forbidden", "unexpected_keyword_argument"):
                owner = _type_at(cls, path[len(prefix):-1])
                allowed = ", ".join(field_names(owner)) if owner else "see the docs"
                one = SpecError(file, format_path(path), problem="unknown key", allowed=allowed,
                                line=line_of(lines, path))
            elif kind == "missing":
                one = SpecError(file, format_path(path), problem="required field is missing",
                                line=line_of(lines, path), allowed="see the field's documentation")
            elif msg.startswith("Input should be "):
                allowed = _YAML_WORDS.get(msg[len("Input should be "):], msg[len("Input should be "):])
                if kind == "dataclass_type":
                    owner = _type_at(cls, path[len(prefix):])
                    allowed = f"a mapping with keys {', '.join(field_names(owner))}" if owner else allowed
                one = SpecError(file, format_path(path), value, allowed, line=line_of(lines, path))
            else:
                text = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
                problem, _, allowed = text.partition("; allowed: ")
                one = SpecError(file, format_path(path), value, allowed, problem=problem, line=line_of(lines, path))
            if str(one) not in seen:
                seen.add(str(one))
                errors.append(one)
        raise SpecErrors(errors) from None


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def load_typed(cls: type, file: str | Path, text: str | None = None) -> Any:
    data, lines = read_yaml(file, text)
    return validate(cls, data, str(file), lines)
