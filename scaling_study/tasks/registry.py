"""The task registry: every task is a folder holding `task.yaml` and a `README.md` card.

    from scaling_study.tasks.registry import discover, resolve_names
    registry = discover([Path("my_tasks")])        # packaged tasks plus your own folders
    ids, unknown = resolve_names(["paper12", "wnut20_ner"], registry)

Discovery walks the folders: adding a task is adding a folder (in the package, or in a folder the
spec lists under `tasks.registry_paths`), with no code change; a user's folder with the id of a
packaged task replaces it. Suites come from each task's `suites` field, plus automatic ones:
`all`, and one per type (`ner`, `re`, `cls`). `suites.yaml` beside this file describes suites.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import field
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from scaling_study.errors import SpecError, SpecErrors, UserError
from scaling_study.tasks.loaders import check_options
from scaling_study.yamlio import line_of, read_yaml, validate

PACKAGED = Path(__file__).parent
TYPES = ("ner", "re", "cls")
_CONFIG = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


@dataclass(config=_CONFIG, kw_only=True)
class SplitInfo:
    """One split of a task's data."""

    file: str
    """File name inside the local mirror folder `<data_dir>/<task id>/`."""
    url: str | None = None
    """Public URL of the file (downloaded into the cache when no mirror has it); null if not directly downloadable."""
    num_examples: int | None = None
    """Examples (sentences for NER) in the released split, as its source reports; null if unknown."""


@dataclass(config=_CONFIG, kw_only=True)
class TaskInfo:
    """The contents of one `task.yaml`."""

    id: str
    """Task id; equals its folder's name."""
    name: str
    """The paper's name for the task."""
    type: Literal["ner", "re", "cls"]
    """Named-entity recognition, relation classification, or sequence classification."""
    domain: str
    """Scientific domain (biomedicine, chemistry, materials, computer_science, ...)."""
    description: str
    """One sentence on what is labelled."""
    version: int
    """Bumped when the data or labels change; part of every finetune id."""
    homepage: str
    """Project or paper page."""
    format: Literal["conll", "jsonl_markers", "scierc_json", "text_label"]
    """File format; loaders are per format, not per task (`loaders.FORMATS`)."""
    format_options: dict[str, Any] = field(default_factory=dict)
    """Options of the format's loader (columns, separators, documented quirks)."""
    label_scheme: Literal["iob1", "iob2", "labels"]
    """Tag scheme of NER files (IOB1 is converted to IOB2 on load), or `labels` for classification."""
    labels: list[str]
    """NER: entity types (without B-/I-); re and cls: the class labels as written in the files."""
    metric: Literal["entity_f1", "micro_f1", "macro_f1"]
    """Entity-level F1 (seqeval, strict IOB2) for NER; micro- or macro-F1 for classification."""
    splits: dict[str, SplitInfo]
    """`train`, `dev` and `test`."""
    suites: list[str] = field(default_factory=list)
    """Named suites this task belongs to (e.g. `paper12`)."""
    folder: str = field(default="", init=False)
    """The task's folder (set by discovery; not a YAML key)."""


@dataclasses.dataclass(frozen=True)
class Registry:
    tasks: dict[str, TaskInfo]
    suites: dict[str, list[str]]
    suite_descriptions: dict[str, str]

    def describe_names(self) -> str:
        return f"tasks {', '.join(sorted(self.tasks))}; suites {', '.join(sorted(self.suites))}"


def load_task(folder: Path) -> TaskInfo:
    """Read and check `<folder>/task.yaml`; raises SpecErrors naming the file and field."""
    file = folder / "task.yaml"
    data, lines = read_yaml(file)
    if data is None:
        raise SpecError(str(file), "", problem="empty file",
                        allowed="a mapping with id, name, type, format, labels, splits, ... (see docs/tasks.md)")
    task: TaskInfo = validate(TaskInfo, data, str(file), lines)
    errors = []

    def err(path: tuple, value: Any, allowed: str, problem: str) -> None:
        errors.append(SpecError(str(file), ".".join(map(str, path)), value, allowed, problem=problem,
                                line=line_of(lines, path)))

    if task.id != folder.name:
        err(("id",), task.id, f"the folder's name, {folder.name!r}", "id differs from its folder")
    missing = {"train", "dev", "test"} - set(task.splits)
    if missing:
        err(("splits",), sorted(task.splits), "train, dev and test", f"missing split(s) {', '.join(sorted(missing))}")
    for split, info in task.splits.items():  # looked up as <data_dir>/<id>/<file>, downloaded into the cache
        if info.file in ("", ".", "..") or any(c in info.file for c in "/\\\0"):
            err(("splits", split, "file"), info.file, "a plain file name (no folders, no ..)",
                "the file would lie outside the task's data folder")
    extra = set(task.splits) - {"train", "dev", "test"}
    if extra:
        err(("splits",), sorted(extra), "train, dev and test", "unknown split name")
    ner = task.type == "ner"
    if ner != (task.label_scheme in ("iob1", "iob2")):
        err(("label_scheme",), task.label_scheme, "iob1 or iob2 for ner; labels for re and cls",
            f"does not fit type {task.type}")
    if ner != (task.metric == "entity_f1"):
        err(("metric",), task.metric, "entity_f1 for ner; micro_f1 or macro_f1 for re and cls",
            f"does not fit type {task.type}")
    if not task.labels or len(set(task.labels)) != len(task.labels):
        err(("labels",), task.labels, "a non-empty list of distinct labels", "empty or repeated labels")
    if errors:
        raise SpecErrors(errors)
    task.folder = str(folder)
    try:  # a bad format option is found when the registry is read, not when a run first loads data
        check_options(task)
    except SpecError as exc:
        path = tuple(int(k) if k.isdigit() else k for k in re.split(r"[.\[\]]+", exc.field) if k)
        raise SpecError(exc.file, exc.field, exc.value, exc.allowed, problem=exc.problem,
                        line=line_of(lines, path)) from None
    return task


def _task_folders(root: Path) -> list[Path]:
    """The folders in `root` holding a task.yaml. A folder that cannot be read is an error, not
    skipped (glob would skip it silently, and its tasks would be "unknown")."""
    allowed = "a readable folder of task folders, each holding a task.yaml"
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"{root}: cannot read the folder ({exc.strerror or exc}); allowed: {allowed}") from None
    found = []
    for entry in entries:
        try:
            if not entry.is_dir():
                continue
            os.lstat(Path(entry.path) / "task.yaml")  # a task.yaml that is a bad link: read_yaml says so
        except (FileNotFoundError, NotADirectoryError):
            continue  # not a task folder: a README, __pycache__, ...
        except OSError as exc:
            raise UserError(f"{entry.path}: cannot read the task folder ({exc.strerror or exc}); "
                            f"allowed: {allowed}") from None
        found.append(Path(entry.path))
    return found


@functools.lru_cache(maxsize=1)
def _packaged() -> tuple[dict[str, TaskInfo], dict[str, str]]:
    tasks = {folder.name: load_task(folder) for folder in _task_folders(PACKAGED)}
    descriptions = yaml.safe_load((PACKAGED / "suites.yaml").read_text()) or {}
    return tasks, descriptions


def discover(extra_dirs: Iterable[Path] = ()) -> Registry:
    """The packaged tasks, then each folder's task folders (a later one with the same id wins)."""
    packaged, descriptions = _packaged()
    tasks = dict(packaged)
    for root in extra_dirs:
        if not Path(root).is_dir():
            raise UserError(f"{root}: not a folder; allowed: a folder of task folders, each holding a task.yaml "
                            f"(--registry-path, tasks.registry_paths)")
        for folder in _task_folders(Path(root)):
            tasks[folder.name] = load_task(folder)
    suites: dict[str, list[str]] = {"all": sorted(tasks)}
    for kind in TYPES:
        suites[kind] = sorted(t for t, info in tasks.items() if info.type == kind)
    for tid, info in sorted(tasks.items()):
        for suite in info.suites:
            suites.setdefault(suite, []).append(tid)
    descriptions = {"all": "every registered task", "ner": "named-entity recognition tasks",
                    "re": "relation classification tasks", "cls": "sequence classification tasks", **descriptions}
    return Registry(tasks=tasks, suites=suites, suite_descriptions=descriptions)


def resolve_names(names: Iterable[str], registry: Registry) -> tuple[set[str], list[str]]:
    """Expand suite names to task ids; returns (ids, names that are neither task nor suite)."""
    ids: set[str] = set()
    unknown = []
    for name in names:
        if name in registry.tasks:
            ids.add(name)
        elif name in registry.suites:
            ids.update(registry.suites[name])
        else:
            unknown.append(name)
    return ids, unknown
