"""Errors a user can fix: bad specs, task folders, data files.

    from scaling_study.errors import UserError
    raise SpecError("spec.yaml", "pretrain.steps[1]", 0, "a positive integer", line=12)

Every `UserError` renders as one line, `FILE:LINE: FIELD: got VALUE; allowed: WHAT`, and the CLI
turns it into exit code 2 with no traceback. Anything else escaping is a bug.
"""

from __future__ import annotations

import reprlib

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 8


def show_value(value: object) -> str:
    """A short, single-line repr of a user's value for an error message."""
    return _short.repr(value).replace("\n", "\\n")


class UserError(Exception):
    """Input the user can fix. `str(err)` is the whole one-line message."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split("\n")))


class SpecError(UserError):
    """A field of a YAML file (a study spec, a task.yaml, a preset file) is wrong."""

    _MISSING = object()

    def __init__(
        self,
        file: str,
        field: str,
        value: object = _MISSING,
        allowed: str = "",
        *,
        line: int | None = None,
        problem: str = "",
    ):
        self.file, self.field, self.value, self.allowed, self.line = file, field, value, allowed, line
        self.problem = problem
        where = f"{file}:{line}" if line else file
        parts = [f"{where}: {field or '<top level>'}:"]
        if problem:
            parts.append(problem + (";" if value is not self._MISSING or allowed else ""))
        if value is not self._MISSING:
            parts.append(f"got {show_value(value)}" + (";" if allowed else ""))
        if allowed:
            parts.append(f"allowed: {allowed}")
        super().__init__(" ".join(parts))


class SpecErrors(UserError):
    """Several `SpecError`s found in one pass; one line each, in file order."""

    def __init__(self, errors: list[SpecError]):
        self.errors = sorted(errors, key=lambda e: (e.line or 0, e.field))
        Exception.__init__(self, "\n".join(str(e) for e in self.errors))
