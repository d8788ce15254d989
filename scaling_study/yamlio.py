"""Load YAML config files into typed dataclasses, with one-line errors that name file, line and field.

    from scaling_study.yamlio import load_typed
    spec = load_typed(StudySpec, "experiments/smoke.yaml")        # raises SpecErrors

`read_yaml` parses with three fixes over plain `yaml.safe_load`: duplicate keys are errors (PyYAML
keeps the last one silently), `5e-4` is a float as in YAML 1.2 (YAML 1.1 makes it a string), and
every field path remembers its line so that errors can point at it. `validate` runs a pydantic
dataclass over the data and turns each pydantic error into a `SpecError` line.
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

from scaling_study.errors import SpecError, SpecErrors

Path_ = tuple  # a field path: ("pretrain", "steps", 1)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` and `5E+3` as floats (YAML 1.2), not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _walk(node: yaml.Node, path: Path_, lines: dict, file: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise SpecError(
                    file, format_path(path + (key,)), problem=f"duplicate key (first on line {seen[key]})",
                    line=line, allowed="each key once per mapping",
                )
            seen[key] = line
            _walk(value_node, path + (key,), lines, file)
            lines[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, file)


def read_yaml(file: str | Path, text: str | None = None) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML text (or the file) into plain data plus a map from field path to line number."""
    name = str(file)
    if text is None:
        try:
            raw = Path(file).read_bytes()
        except FileNotFoundError:
            raise SpecError(name, "", problem="file not found", allowed="a path to an existing YAML file") from None
        except IsADirectoryError:
            raise SpecError(name, "", problem="is a folder", allowed="a path to a YAML file") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SpecError(name, "", problem=f"not UTF-8 text (byte {err.start})", allowed="a UTF-8 YAML file") from None
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        lines: dict[Path_, int] = {}
        if node is not None:
            _walk(node, (), lines, name)
        data = loader.construct_document(node) if node is not None else None
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
