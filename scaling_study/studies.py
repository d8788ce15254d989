"""A study's identity and whereabouts: its name stands for one spec (by fingerprint), and a per-user
index says where a study of that name is stored, so readers find it from any working directory.

    from scaling_study import studies
    studies.claim(study, layout)                   # `run`: refuses a different spec under a taken name
    studies.claim(study, layout, extend=True)      # `run --extend`: this spec joins the study's specs
    studies.fingerprint(study)                     # 16 hex digits: the hash of the plan's node ids
    studies.where("smoke")                         # Whereabouts(root, spec) from the index, or None

Identity. A study's `name` is its identity: one storage folder (`<root>/<name>/`), one MLflow
experiment, one study run. Its spec's fingerprint is the hash of the plan's node ids, which hash
exactly what determines results (`grid.expand`), so resources, tracking, storage, the description
and the task data's folder do not change it, and anything that changes a result does. The first
`run` of a name records the fingerprint in `<root>/<name>/study.json` and keeps the spec's text in
`<root>/<name>/specs/<fingerprint>.yaml`; a later `run` of a spec with another fingerprint under
the same name is refused (bad input: exit 2, naming both files and the fields that differ, nothing
written) unless `--extend` says it extends the study (more seeds, tasks or levels): then its
fingerprint and text are recorded beside the first. A study folder written before study.json
existed is claimed by the first spec run over it.

Whereabouts. Every `run` records, in the user's index (`$XDG_STATE_HOME/scaling-study/studies.json`,
default `~/.local/state/scaling-study/studies.json`; `$SCALING_STUDY_INDEX` names another file),
the study's absolute storage root and spec file. A reader given a bare name and no `--root`
(`results smoke`, `results.load("smoke")`, `report`, `status`, `ui`) looks in `./studies/<name>`
first, as before, then in the index: the root where a study of that name last ran. A spec file
given instead of a name resolves as the spec says (its `storage.root`, relative to the working
directory). The index is a convenience: a machine without one (a read-only home) still runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path

from scaling_study.errors import UserError
from scaling_study.spec import Study
from scaling_study.tracking import redact_uri

RECORD = "study.json"
SPECS = "specs"
DEFAULT_ROOT = "studies"
_NOT_IDENTITY = {
    (): ("description", "tracking", "storage"),
    ("pretrain",): ("num_workers", "gpus_per_worker", "cpus_per_worker", "compile", "log_every",
                    "checkpoint_every", "strategy", "grad_accum"),
    ("finetune",): ("gpus_per_job", "cpus_per_job", "max_concurrent"),
    ("tasks",): ("data_dir", "registry_paths"),
}
"""Spec fields left out of the comparison of two specs: they change where or how fast a study runs,
not its results (the fingerprint, from the plan, leaves them out by construction)."""


def fingerprint(study: Study) -> str:
    """The hash of the study's plan node ids (see the module docstring)."""
    from scaling_study.grid import canonical_json, expand

    return hashlib.sha256(canonical_json(sorted(expand(study).nodes)).encode()).hexdigest()[:16]


def comparable(study: Study) -> dict:
    """The spec as plain data without the fields that are not its identity (`_NOT_IDENTITY`)."""
    data = json.loads(json.dumps(dataclasses.asdict(study.spec), default=str))
    for path, keys in _NOT_IDENTITY.items():
        section = data
        for key in path:
            section = section.get(key) or {}
        for key in keys:
            section.pop(key, None)
    return data


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`field: old -> new` for every leaf that differs between two `comparable` dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _read_record(store) -> dict | None:
    text = store.read_text(RECORD)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None  # a broken record is claimed again, as a folder from before records
    return record if isinstance(record, dict) and isinstance(record.get("specs"), list) else None


def check(study: Study, layout, *, extend: bool = False) -> dict | None:
    """Refuse (UserError) a spec whose fingerprint the study folder does not hold, unless `extend`;
    returns the stored record (None: nothing stored yet). Reads only."""
    record = _read_record(layout.store)
    if record is None or not record["specs"]:
        return record
    mine = fingerprint(study)
    if extend or any(s.get("fingerprint") == mine for s in record["specs"]):
        return record
    first = record["specs"][0]
    diff = differences(first.get("spec") or {}, comparable(study))
    what = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "") if diff else \
        "the same fields, but a different plan (a task's version or a model preset changed)"
    raise UserError(f"{study.file}: name: study {study.spec.name!r} in {layout.store.location} was run from "
                    f"{first.get('file', '?')} with a different spec ({what}); got fingerprint {mine}, stored "
                    f"{', '.join(s.get('fingerprint', '?') for s in record['specs'])}; allowed: another name, or "
                    "--extend when this spec extends that study (both specs are then kept)")


def claim(study: Study, layout, *, extend: bool = False) -> str:
    """`check`, then record this spec's fingerprint and text in the study folder and the study's
    whereabouts in the user's index; returns the fingerprint."""
    record = check(study, layout, extend=extend) or {"name": study.spec.name, "specs": []}
    mine = fingerprint(study)
    if not any(s.get("fingerprint") == mine for s in record["specs"]):
        file = str(Path(study.file).resolve())
        record["specs"].append({"fingerprint": mine, "file": file, "spec": comparable(study),
                                "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                    timespec="seconds")})
        with contextlib.suppress(OSError):  # a tracking.uri's password stays in the user's file
            text = redact_uri(Path(study.file).read_text(encoding="utf-8"))
            layout.store.write_text(f"{SPECS}/{mine}.yaml", text)
        layout.store.write_text(RECORD, json.dumps(record, indent=1) + "\n")
    remember(study, layout)
    return mine


def specs(layout) -> list[dict]:
    """The specs recorded for the study folder, first one first (fingerprint, file, spec, recorded)."""
    record = _read_record(layout.store)
    return record["specs"] if record else []


# ----------------------------------------------------------------------------------- the index


@dataclasses.dataclass(frozen=True)
class Whereabouts:
    root: str
    """The storage root (absolute path or URI) the study ran under."""
    spec: str
    """The spec file it last ran from (absolute)."""


def index_path() -> Path:
    if os.environ.get("SCALING_STUDY_INDEX"):
        return Path(os.environ["SCALING_STUDY_INDEX"]).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state).expanduser() / "scaling-study" / "studies.json"


def _index() -> dict:
    try:
        data = json.loads(index_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(study: Study, layout) -> None:
    """Record where the study is stored in the user's index (best effort: no index, no harm)."""
    from scaling_study.storage import write_atomic

    store = layout.store
    root = store.location.rsplit("/", 1)[0] if store.remote else str(Path(store.location).parent)
    index = _index()
    index[study.spec.name] = {"root": root, "spec": str(Path(study.file).resolve())}
    with contextlib.suppress(OSError):
        write_atomic(index_path(), json.dumps(index, indent=1, sort_keys=True) + "\n")


def where(name: str) -> Whereabouts | None:
    """Where the study `name` last ran, by the user's index; None if it is not there."""
    entry = _index().get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("root"), str):
        return None
    return Whereabouts(entry["root"], str(entry.get("spec", "")))


def root_of(name: str, root: str | Path | None) -> str:
    """The storage root a reader uses for the study `name`: `root` when given; else `./studies` when
    the study is there; else the root the index recorded; else `./studies` (whose error says so)."""
    if root is not None:
        return str(root)
    if (Path(DEFAULT_ROOT) / name).is_dir():
        return DEFAULT_ROOT
    found = where(name)
    return found.root if found else DEFAULT_ROOT


def tracking_uri(study: Study | None) -> str | None:
    """The MLflow server a study logs to: its spec's tracking.uri (`${VAR}` expanded), else
    $MLFLOW_TRACKING_URI, else None (the embedded server in the study's folder)."""
    from scaling_study.spec import expand_env

    if study is not None and study.spec.tracking.uri:
        return expand_env(study.spec.tracking.uri)
    return os.environ.get("MLFLOW_TRACKING_URI") or None
