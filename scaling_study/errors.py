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


def file_problem(path) -> str | None:
    """What keeps `path` from being read as a regular file, in words (None when it is one).

    A FIFO would block its reader forever and a device such as /dev/zero never ends, so every
    reader of a user's file asks this first: "no such file", "a link to nowhere", "a
    symbolic-link loop", "a folder", "a FIFO (named pipe)", "a socket", "a device", or "cannot look
    at it (...)".
    """
    import errno
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "a link to nowhere" if os.path.islink(path) else "no such file"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic-link loop"
        return f"cannot look at it ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")


def output_problem(path) -> str | None:
    """What keeps `path` from being written as a file (`-o FILE`), in words: a folder there, or no
    folder to hold it (None: fine; an existing file, a FIFO or /dev/stdout is written)."""
    import os

    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isdir(path):
        return "is a folder"
    parent = os.path.dirname(path)
    if not os.path.exists(parent):
        return f"no folder {parent} to write it into"
    if not os.path.isdir(parent):
        return f"{parent} is not a folder"
    return None
