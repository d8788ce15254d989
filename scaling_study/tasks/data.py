"""Find a task's split files (local mirror, then cache, then download) and load them, capped if asked.

    from scaling_study.tasks.data import load_task_data, mirror_dirs
    dirs = mirror_dirs("../shared/datasets")              # or mirror_dirs(study=study)
    data = load_task_data(registry.tasks["scierc_re"], dirs, caps=study.caps["scierc_re"])
    data.splits["train"][0], data.label_list, data.sizes, data.files
    data.dataset("train")                                 # a datasets.Dataset of the same examples

Lookup, per split: `<dir>/<task id>/<split file>` in each mirror folder in order (`--data-dir`,
`$SCALING_STUDY_DATA_DIR`, the spec's `tasks.data_dir`), then the download cache
(`tasks/` in the machine's cache, `$SCALING_STUDY_CACHE`, default `~/.cache/scaling-study`), then
the split's `url`, downloaded into the cache (`scaling_study.downloads`; `allow_download=False` or
`$SCALING_STUDY_OFFLINE=1` skips that). When all fail: a `DataNotFound` (a `UserError`) naming the
task, every place tried and how to provide the data. Something under a split file's name that is
not a regular file (a folder, a FIFO, a link loop) is a plain `UserError`: the data is there but
wrong, and a FIFO would block the reader. `check_task_data(study)` reads every split of a study's
tasks up front (`scaling-study run` does, so a malformed file stops the run before any compute).

Caps (`TaskCaps`) keep a seeded random sample of each split, in file order. The sample depends only
on (task id, split, cap, sample_seed), never on the finetuning seed, so every seed and every model
of a study sees the same examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from collections import Counter
from pathlib import Path
from typing import Iterable

from scaling_study import downloads
from scaling_study.errors import UserError, file_problem
from scaling_study.tasks.loaders import SPLITS, LoadedSplit, load_split, tag_set
from scaling_study.tasks.registry import TaskInfo

ENV_DATA_DIR = "SCALING_STUDY_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 30


class DataNotFound(UserError):
    """No mirror, cache or download had a task's file."""


@dataclasses.dataclass
class TaskData:
    """A task's examples per split (after caps), and where they came from."""

    task: TaskInfo
    splits: dict[str, list[dict]]
    files: dict[str, str]
    """The file each split was read from."""
    full_sizes: dict[str, int]
    """Examples per split before caps."""
    notes: dict[str, Counter]
    """Per split: counts of the documented quirks met while reading (see loaders.QUIRKS)."""

    @property
    def sizes(self) -> dict[str, int]:
        return {split: len(examples) for split, examples in self.splits.items()}

    @property
    def label_list(self) -> list[str]:
        """What the model predicts: NER tags `O, B-T, I-T, ...` or the class labels."""
        return tag_set(self.task)

    def dataset(self, split: str):
        """The split as a `datasets.Dataset` (columns tokens/tags/line, or text/label/entities/line)."""
        import datasets

        return datasets.Dataset.from_list(self.splits[split])


def mirror_dirs(data_dir: str | Path | None = None, study=None, *, tasks: Iterable[str] | None = None) -> list[Path]:
    """Mirror folders to try, in order: an explicit folder, `$SCALING_STUDY_DATA_DIR`, the spec's `tasks.data_dir`
    (an object-store URI: `tasks`' folders, default the study's, synced to this machine first)."""
    dirs = [Path(data_dir).expanduser()] if data_dir else []
    if os.environ.get(ENV_DATA_DIR):
        dirs.append(Path(os.environ[ENV_DATA_DIR]).expanduser())
    if study is not None and study.spec.tasks.data_dir:
        dirs.append(_study_data_dir(study, study.tasks if tasks is None else tasks))
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _study_data_dir(study, tasks: Iterable[str]) -> Path:
    """The spec's `tasks.data_dir` on this machine: a folder, or for a URI (`s3://bucket/tasks`) its
    local mirror, into which each task's folder `<URI>/<task id>/` is downloaded (files already
    there with the same size are kept), so task data with no public URL reaches every node."""
    from scaling_study.spec import expand_env
    from scaling_study.storage import Store, is_uri

    location = expand_env(study.spec.tasks.data_dir)
    if not is_uri(location):
        return study.resolve_path(study.spec.tasks.data_dir)
    store = Store(location)
    for tid in sorted(tasks):
        if store.exists(tid):  # absent: the lookup goes on to the cache and the download, and says so
            store.download(tid)
    return store.local


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where task downloads go: `cache_dir`, or `tasks/` in the machine's cache (`downloads.cache_root`)."""
    return Path(cache_dir).expanduser() if cache_dir else downloads.cache_root() / "tasks"


def cached_path(task: TaskInfo, split: str, cache_dir: str | Path | None = None) -> Path | None:
    """Where the split's download lives in the cache (keyed by URL, so a new URL is a new file)."""
    url = task.splits[split].url
    if not url:
        return None
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / task.id / key / task.splits[split].file


def locate_split(task: TaskInfo, split: str, dirs: Iterable[Path] = (), *, cache_dir: str | Path | None = None,
                 allow_download: bool = True) -> Path:
    """The local file holding `split` of `task`, downloading it if needed; raises DataNotFound."""
    info = task.splits[split]
    tried = []
    dirs = list(dirs)
    if not dirs:
        tried.append(f"no mirror folder (none of --data-dir, ${ENV_DATA_DIR}, tasks.data_dir given)")
    for d in dirs:
        path = Path(d) / task.id / info.file
        if _regular_file(path):
            return path
        tried.append(str(path))
    cached = cached_path(task, split, cache_dir)
    if cached is not None:
        if _regular_file(cached):
            return cached
        tried.append(f"cache {cached}")
        if not allow_download:
            tried.append(f"download {info.url} skipped (offline)")
        else:
            try:
                return downloads.fetch(info.url, cached, timeout=DOWNLOAD_TIMEOUT_S)
            except downloads.DownloadError as exc:
                tried.append(f"download {info.url} skipped (offline)" if exc.offline
                             else f"download {info.url} failed ({exc.reason})")
    else:
        tried.append("no public URL in task.yaml")
    hint = (f"put {info.file} (and the other split files) in <data_dir>/{task.id}/ and pass --data-dir, set "
            f"${ENV_DATA_DIR} or the spec's tasks.data_dir")
    if "requires_conversion_from_kaggle_json" in (task.format_options.get("quirks") or []):
        hint = "convert the source data first (see the task's README), then " + hint
    readme = Path(task.folder) / "README.md" if task.folder else None
    raise DataNotFound(f"task {task.id}: no data for split {split}: tried {'; '.join(tried)}; {hint}"
                       + (f" (source: {readme})" if readme else ""))


def _regular_file(path: Path) -> bool:
    """Whether `path` is a regular file (or a link to one); False when nothing is there. Anything else
    under a split file's name (a folder, a FIFO, which would block the reader, a socket, a device, a
    link to nowhere or a link loop) is a UserError: the data is there but wrong, not missing."""
    problem = file_problem(path)
    if problem is None:
        return True
    if problem == "no such file":  # (or `<dir>/<id>` is a file: not a task folder)
        return False
    if problem.startswith("cannot look at it"):  # EACCES on a folder on the way, ...
        raise UserError(f"{path}: cannot look at the split file{problem.removeprefix('cannot look at it')}; "
                        "allowed: a readable regular file")
    raise UserError(f"{path}: the split file is {problem}; allowed: a regular file holding the split")


def sample(examples: list, cap: int | None, *, task_id: str, split: str, seed: int = 0) -> list:
    """At most `cap` examples, a seeded random subset in file order; all of them when `cap` is None."""
    if cap is None or cap >= len(examples):
        return list(examples)
    rng = random.Random(f"{task_id}/{split}/{cap}/{seed}")  # a str seed is hashed stably (not hash())
    keep = sorted(rng.sample(range(len(examples)), cap))
    return [examples[i] for i in keep]


def load_task_data(task: TaskInfo, dirs: Iterable[Path] = (), *, caps=None, cache_dir: str | Path | None = None,
                   allow_download: bool = True, splits: Iterable[str] = SPLITS, sample_seed: int = 0) -> TaskData:
    """Locate, read and cap the splits of `task` (`caps`: a spec.TaskCaps or None)."""
    dirs = list(dirs)
    loaded: dict[str, LoadedSplit] = {}
    for split in splits:
        path = locate_split(task, split, dirs, cache_dir=cache_dir, allow_download=allow_download)
        loaded[split] = load_split(task, path, split)
    out = TaskData(task=task, splits={}, files={}, full_sizes={}, notes={})
    for split, got in loaded.items():
        cap = getattr(caps, f"max_{split}_examples", None) if caps is not None else None
        out.splits[split] = sample(got.examples, cap, task_id=task.id, split=split, seed=sample_seed)
        out.files[split] = got.path
        out.full_sizes[split] = len(got.examples)
        out.notes[split] = got.notes
    return out


def check_task_data(study, tasks: Iterable[str] | None = None) -> dict[str, str]:
    """Read every split of the study's tasks (or of `tasks`) before a run: a malformed file raises its
    UserError now, not in a finetune trial hours later. Returns {task id: why} for tasks whose data
    is not found (their finetune runs fail and say so; the rest of the study still runs)."""
    dirs = mirror_dirs(study=study, tasks=tasks)
    missing: dict[str, str] = {}
    for tid in sorted(study.tasks if tasks is None else tasks):
        task = study.tasks[tid]
        for split in SPLITS:
            try:
                path = locate_split(task, split, dirs)
            except DataNotFound as exc:
                missing[tid] = str(exc)
                break
            load_split(task, path, split)
    return missing
