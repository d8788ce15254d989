"""The study's storage layout and the formats its stages hand each other.

    from scaling_study.artifacts import CorpusBuild, Layout, checkpoint_dir, latest_checkpoint, node_done
    layout = Layout.of(study)                       # <storage.root>/<study name>/, or its local mirror
    layout = Layout.named("smoke", "s3://bucket/studies")   # the same from a study name and a root
    pull_tracking(layout)                           # the folder of the embedded MLflow db on this machine
    layout.node(plan, node)                         # a node's folder on this machine
    node_done(layout, plan, node)                   # whether storage holds the node's finished output
    build = CorpusBuild.open(layout.location(plan, corpus_node))   # a finished build: a folder or a URI
    build.manifest.tokens, build.num_shards, build.tokenizer_dir, build.load_shard(0)   # shards read in place
    checkpoint_dir(out_dir, 500)                    # <out_dir>/checkpoints/step-00000500
    latest_checkpoint(out_dir)                      # the complete checkpoint with the most steps, or None

A study folder (`<storage.root>/<study name>/`):

    corpus/<cb-id>/                     a corpus build (scaling_study.corpus)
        manifest.json                   `Manifest`; written last: with it (and a known FORMAT) the build is complete
        tokenizer/                      an AutoTokenizer.from_pretrained folder
        shards/shard-00000.parquet      column `input_ids`: fixed_size_list<int32>[seq_len], in stream order
    pretrain/<pt-id>/                   a pretraining run (scaling_study.pretrain)
        checkpoints/step-XXXXXXXX/      one per step level: a save_pretrained folder (model and
                                        tokenizer) + trainer_state.pt, the marker, written last
        resume/step-XXXXXXXX/           the latest resume-only checkpoint (same files)
        final.json                      the run's final metrics and checkpoint locations
    finetune/<fr-id>/                   a finetune run (scaling_study.finetune): epochs_<L>/scores.json,
                                        predictions; DONE.json, written last, once MLflow has the results
    logs/<node-id>.log                  tracebacks of a node's failures
    adaptive_seeds.json                 with adaptive seeds: the decisions of each wave (`SEEDS_FILE`)
    mlflow/                             the embedded MLflow server's sqlite db and artifacts (on an
                                        object store: its mlflow.db, uploaded when the driver ends)
    cache/                              downloaded corpus URLs, the results cache

A stage writes its output out of sight and makes it visible at once (a rename on local disks; the
marker file uploaded last to object stores, `scaling_study.storage`), so a folder with its marker
is complete and one without it counts as absent.

This module imports neither torch nor Ray: readers (results, report, the CLI) find files here
without importing a stage or the study driver.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pyarrow.fs as pafs

from scaling_study.errors import SpecError, UserError
from scaling_study.spec import Study, expand_env, is_name
from scaling_study.storage import SCHEMES, Store, check_root, is_uri, write_atomic

if TYPE_CHECKING:
    import numpy as np

    from scaling_study.grid import Node, Plan

MANIFEST = "manifest.json"
"""A corpus build's marker and description (`Manifest`)."""
CORPUS_FORMAT = 1
"""Version of the corpus build layout; bump it when shards or manifest change meaning."""
STATE_FILE = "trainer_state.pt"
"""A checkpoint's trainer state (optimizer, data position, RNG): what resuming needs; its marker."""
DONE_FILE = "DONE.json"
"""A finetune run's marker: its cells' MLflow run ids and results (`write_done`)."""
FINAL_FILE = "final.json"
"""A pretraining run's final metrics and checkpoint locations."""
FILES_FILE = "files.json"
"""A checkpoint's file list (`file_list`), written just before its marker: what the marker certifies."""
HASHED_BYTES = 1 << 20
"""Files up to this size get a sha256 in a file list (config, tokenizer, scores); bigger ones (weights,
shards, optimizer state) their size only, which is what a truncated or half-copied file changes."""
SEEDS_FILE = "adaptive_seeds.json"
"""An adaptive-seeds study's decisions, per wave (`adaptive.SeedWaves.log`), in the study folder."""
NODE_FOLDERS = {"corpus": "corpus", "pretrain": "pretrain", "finetune_run": "finetune"}


# ----------------------------------------------------------------------------------- what a marker certifies


def file_list(folder: Path, *, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{path relative to `folder`: {"bytes": size[, "sha256": hex]}} of every file under it but `exclude`:
    what a marker (a checkpoint's files.json, DONE.json, a build's manifest) certifies."""
    import hashlib

    out = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if rel in exclude:
            continue
        size = path.stat().st_size
        out[rel] = {"bytes": size}
        if size <= HASHED_BYTES:
            out[rel]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def files_problem(store: Store, rel: str, files: dict) -> str | None:
    """How what storage holds under `rel` differs from a marker's `files` (`file_list`), in words; None
    when it matches. Sizes always (one listing); checksums of the small files on a local store."""
    import hashlib

    actual = store.sizes(rel)
    for name, want in sorted(files.items()):
        got = actual.get(name)
        if got is None:
            return f"{name} is missing"
        if got != want.get("bytes"):
            return f"{name} has {got:,} bytes, its marker says {want.get('bytes', 0):,}"
        if "sha256" in want and not store.remote:
            try:
                digest = hashlib.sha256((store.local / rel / name).read_bytes()).hexdigest()
            except OSError as exc:
                return f"{name} cannot be read ({exc.strerror or exc})"
            if digest != want["sha256"]:
                return f"{name} differs from its marker's checksum"
    return None


# ----------------------------------------------------------------------------------- corpus builds


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a finished corpus build holds: `manifest.json` in the build folder."""

    node_id: str
    inputs: dict
    """The corpus node's inputs (what its id hashes)."""
    seq_len: int
    vocab_size: int
    """Actual vocabulary size (at most `inputs["vocab_size"]`; smaller on a small corpus)."""
    special_tokens: dict
    """Ids of pad, unk, cls, sep, mask."""
    tokenizer_hash: str
    """sha256 of `tokenizer/tokenizer.json`."""
    corpus_documents: int
    """Documents (non-blank lines) in the whole corpus."""
    tokenizer_documents: int
    """Documents the tokenizer was trained on: the volume's smallest keys, up to corpus.tokenizer_sample bytes."""
    documents: int
    """Documents in the subset, all packed."""
    tokens: int
    """WordPiece tokens of the subset's documents plus one [SEP] each: the packed stream."""
    sequences: int
    dropped_tokens: int
    """Stream tokens after the last full sequence, not written. tokens = sequences*(seq_len-1) + dropped."""
    shards: list
    """[{"file": "shards/shard-00000.parquet", "sequences": n}, ...] in piece order."""
    input_files: list
    """[{"path", "bytes", "mtime"} (+ "url" for downloads)] as read."""
    build_seconds: float
    """Wall time of the whole build (every volume built with it)."""
    created: str
    tokenizer_chars: int = 0
    """Characters of the tokenizer's sample (at most `wordpiece.PAIR_COUNT_LIMIT`)."""
    pieces: int = 0
    """Pieces the input was read in (`sources.pieces`): the build's units of parallel work."""
    corpus_bytes: int = 0
    """UTF-8 bytes of the corpus's documents (all of them, not only the volume's)."""
    stage_seconds: dict = dataclasses.field(default_factory=dict, compare=False)
    """Wall seconds of the build's passes (scan, sample, train, count/boundary, pack)."""
    tokenizer: str = "tokenizer"
    packing: str = ("each row: [CLS] + seq_len-1 ids of a piece's stream (its documents of the volume in "
                    "file order, [SEP] after each); each piece's incomplete last row is dropped")
    format: int = CORPUS_FORMAT
    files: dict = dataclasses.field(default_factory=dict, compare=False)
    """Every file of the build but the manifest (`file_list`: sizes, checksums of the small ones),
    filled in by `write` (a certificate, not part of what the build is: not compared); a build whose
    files differ is damaged and rebuilt (empty: not checked)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def parse(cls, text: str | None) -> Manifest | None:
        """The manifest in `text`, or None if there is none, it is malformed, or of another FORMAT
        (built by an incompatible version: a rebuild, not a mix)."""
        try:
            manifest = cls.from_dict(json.loads(text)) if text is not None else None
        except (ValueError, TypeError):
            return None
        return manifest if manifest is not None and manifest.format == CORPUS_FORMAT else None

    def write(self, folder: Path) -> None:
        """Write the manifest into the finished build `folder`, with the list of its files."""
        data = {**self.to_dict(), "files": self.files or file_list(folder, exclude=(MANIFEST,))}
        write_atomic(Path(folder) / MANIFEST, json.dumps(data, indent=2) + "\n")

    @property
    def special_ids(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.special_tokens.items()}


def read_manifest(folder: Path | str) -> Manifest | None:
    """The manifest of a finished build in `folder`, or None (no build, an incomplete one, another FORMAT)."""
    folder = Path(folder)
    try:
        manifest = Manifest.parse((folder / MANIFEST).read_text())
    except OSError:
        return None
    if manifest is None:
        return None
    files = [folder / s["file"] for s in manifest.shards] + [folder / manifest.tokenizer / "tokenizer.json"]
    if not all(f.is_file() for f in files):
        return None
    return manifest if not manifest.files or files_problem(Store(folder), "", manifest.files) is None else None


@dataclasses.dataclass(frozen=True)
class CorpusBuild:
    """A finished corpus build: its manifest, and its shards read where they are stored.

    A plain path (a local or NFS folder) is read in place. A storage URI (`s3://`, `gs://`,
    `file://`) is never copied whole: each shard is read from the store when it is asked for (one
    GET), and only the tokenizer (a few MB) comes down to the local mirror, when it is first used.
    """

    root: Path
    """The build's folder on this machine: the folder itself, or its local mirror for a URI."""
    manifest: Manifest
    store: Store | None = None
    """The build in storage when it was opened from a URI; None for a plain path."""

    @classmethod
    def open(cls, root: Path | str) -> CorpusBuild:
        if is_uri(root):
            store = Store(root)
            manifest = Manifest.parse(store.read_text(MANIFEST))  # the marker: uploaded after the shards
            build = cls(store.local, manifest, store) if manifest is not None else None
        else:
            manifest = read_manifest(root)
            build = cls(Path(root), manifest) if manifest is not None else None
        if build is None:
            raise FileNotFoundError(f"{root}: no finished corpus build (no valid {MANIFEST})")
        if not manifest.shards:
            raise ValueError(f"{root}/{MANIFEST}: the corpus has no shards")
        return build

    @property
    def location(self) -> str:
        """Where the build is stored: its URI, or its folder."""
        return self.store.location if self.store is not None else str(self.root)

    @property
    def seq_len(self) -> int:
        return int(self.manifest.seq_len)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest.vocab_size)

    @property
    def special_ids(self) -> dict[str, int]:
        """pad, unk, cls, sep, mask -> id."""
        return self.manifest.special_ids

    @functools.cached_property
    def tokenizer_dir(self) -> Path:
        """The tokenizer's folder on this machine (downloaded to the mirror on first use for a URI)."""
        if self.store is not None:
            return self.store.download(self.manifest.tokenizer)
        return self.root / self.manifest.tokenizer

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def shard_paths(self) -> list[Path]:
        """The Parquet shards of a local build, in stream order (`read_shard` reads any build)."""
        if self.store is not None:
            raise ValueError(f"{self.location}: the shards are in storage; read them with read_shard")
        return [self.root / s["file"] for s in self.manifest.shards]

    def read_shard(self, index: int) -> bytes:
        """Shard `index`'s file, whole, from where the build is stored (no local copy)."""
        file = self.manifest.shards[index]["file"]
        if self.store is None:
            return (self.root / file).read_bytes()
        with self.store.fs.open_input_stream(self.store.path(file)) as f:
            return f.read()

    def decode_shard(self, data: bytes) -> np.ndarray:
        """A shard file's bytes (`read_shard`) as a (sequences, seq_len) array of token ids."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(pa.BufferReader(data), columns=["input_ids"])
        return table.column(0).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, self.seq_len)

    def load_shard(self, index: int) -> np.ndarray:
        """Shard `index` as a (sequences, seq_len) array of token ids."""
        return self.decode_shard(self.read_shard(index))


# ----------------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out_dir: str | Path, step: int, *, kind: Literal["checkpoints", "resume"] = "checkpoints") -> Path:
    return Path(out_dir) / kind / f"step-{step:08d}"


def _step(name: str) -> int | None:
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def write_file_list(folder: Path) -> None:
    """A checkpoint's files.json: every file written so far (weights, tokenizer, trainer state), for `checkpoint_problem`."""
    (Path(folder) / FILES_FILE).write_text(json.dumps({"files": file_list(folder, exclude=(FILES_FILE,))}, indent=1))


def checkpoint_problem(store: Store, rel: str) -> str | None:
    """How a complete checkpoint (its trainer_state.pt there) differs from its file list, or None
    (also for one written before checkpoints had file lists)."""
    text = store.read_text(f"{rel}/{FILES_FILE}")
    if text is None:
        return None
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {FILES_FILE} is unreadable"
    return files_problem(store, rel, files)


def latest_checkpoint(out_dir: str | Path, needed: tuple[int, ...] = ()) -> Path | None:
    """The complete, undamaged checkpoint (level or resume-only) with the most steps, or None.

    `needed`: the run's level steps; a level that is missing or damaged must be written again, so
    the answer is the latest checkpoint before the first such level."""
    store = Store(out_dir)
    intact = {}
    for kind in ("checkpoints", "resume"):
        for folder in (Path(out_dir) / kind).glob("step-*"):
            step = _step(folder.name)
            if step is not None and (folder / STATE_FILE).is_file():
                intact[(step, kind == "checkpoints")] = checkpoint_problem(store, f"{kind}/{folder.name}") is None
    redo = [s for s in needed if not intact.get((s, True))]
    found = [(step, level) for (step, level), ok in intact.items() if ok and (not redo or step < min(redo))]
    return checkpoint_dir(out_dir, max(found)[0], kind="checkpoints" if max(found)[1] else "resume") if found else None


def remove_partial_checkpoints(out_dir: Path) -> None:
    """Finish what a killed checkpoint write left: restore a re-saved checkpoint moved aside, drop temp folders."""
    from scaling_study.storage import restore_replaced

    for kind in ("checkpoints", "resume"):
        restore_replaced(Path(out_dir) / kind, marker=STATE_FILE)
        for folder in (Path(out_dir) / kind).glob(".*-step-*"):
            shutil.rmtree(folder, ignore_errors=True)


def prune_resume(out_dir: Path, keep_after: int) -> None:
    """Drop resume-only checkpoints older than step `keep_after` (only the latest is kept)."""
    for folder in (Path(out_dir) / "resume").glob("step-*"):
        step = _step(folder.name)
        if step is not None and step < keep_after:
            shutil.rmtree(folder, ignore_errors=True)


def _stored_steps(store: Store, kind: str) -> list[tuple[int, bool, str]]:
    return [(_step(name), kind == "checkpoints", f"{kind}/{name}") for name in store.list(kind)
            if _step(name) is not None and store.is_file(f"{kind}/{name}/{STATE_FILE}")
            and checkpoint_problem(store, f"{kind}/{name}") is None]


def push_checkpoint(out: Store, folder: Path) -> None:
    """Upload a checkpoint folder written under `out.local` (its trainer state last: the marker),
    then drop the stored resume-only checkpoints it supersedes. Nothing for a plain local store."""
    if not out.remote:
        return
    out.upload(str(Path(folder).relative_to(out.local)), last=(STATE_FILE,))
    step = _step(Path(folder).name)
    for name in out.list("resume"):
        if _step(name) is not None and _step(name) < step:
            out.delete(f"resume/{name}")


def pull_latest_checkpoint(out: Store, needed: tuple[int, ...] = ()) -> Path | None:
    """Make the local mirror resume from the latest stored checkpoint: download it unless it is
    there, and drop local checkpoints past it (written, never uploaded: every rank, on every
    node, must resume from the same step). Returns its local folder, None when storage has none."""
    if not out.remote:
        return latest_checkpoint(out.local, needed)
    found = _stored_steps(out, "checkpoints") + _stored_steps(out, "resume")
    redo = [s for s in needed if not any(f[:2] == (s, True) for f in found)]
    found = [f for f in found if not redo or f[0] < min(redo)]
    step, _, rel = max(found) if found else (0, False, None)
    for kind in ("checkpoints", "resume"):
        for folder in (out.local / kind).glob("step-*"):
            if _step(folder.name) is not None and _step(folder.name) > step:
                shutil.rmtree(folder, ignore_errors=True)
    if rel is not None:
        out.download(rel, last=(STATE_FILE,))  # files already there are kept
    return latest_checkpoint(out.local, needed)


# ----------------------------------------------------------------------------------- finetune runs


def write_done(out: Store, *, cells: dict[str, str], results: list[dict], seconds: float) -> None:
    """Mark a finetune run finished: its cells' MLflow run ids (by epochs level), results, and the
    files of its folder (`file_list`, from the local copy: what was uploaded)."""
    files = file_list(out.local, exclude=(DONE_FILE,)) if out.local.is_dir() else {}
    out.write_text(DONE_FILE, json.dumps({"cells": cells, "results": results, "seconds": seconds, "files": files},
                                         indent=1, default=str))


def read_done(text: str | None) -> dict | None:
    """A finetune run's DONE.json (`write_done`), or None (none there, or not a DONE.json: damaged)."""
    try:
        done = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return done if isinstance(done, dict) and isinstance(done.get("results"), list) else None


# ----------------------------------------------------------------------------------- the study folder


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each node's output lives under the study's folder.

    `store` is that folder in storage (a local folder, or a URI: `scaling_study.storage`);
    `root` is where this machine sees it: the folder itself, or its local mirror for a URI.
    """

    root: Path
    store: Store

    @classmethod
    def of(cls, study: Study) -> Layout:
        return cls.named(study.spec.name, expand_env(study.spec.storage.root), file=study.file,
                         field="storage.root")

    @classmethod
    def named(cls, name: str, root: str, *, file: str | None = None, field: str = "--root") -> Layout:
        """The folder of study `name` under the storage root `root` (a path or a URI), as `of` finds it
        from the spec; readers given a study's name (`results NAME --root ROOT`) use this. The name is
        checked here, where it is read: `../x` would put the study's cache outside the root."""
        if not is_name(name):
            raise UserError(f"study {name!r}: not a study name; allowed: a study's name (1-64 characters from "
                            "A-Z a-z 0-9 . _ -, no '..') or its spec file (.yaml)")
        problem = check_root(root)
        if problem:  # the spec checks it too; ${VAR} may expand to something else now
            raise UserError(f"{file + ': ' if file else ''}{field}: {problem}; got {root!r}; allowed: a local folder "
                            f"or a URI of scheme {', '.join(s + '://' for s in SCHEMES)}")
        if is_uri(root):
            store = Store(f"{root.rstrip('/')}/{name}")
            return cls(store.local, store)  # object stores have no links to check
        base = Path(root).expanduser().resolve()
        layout = cls(base / name, Store(base / name))
        layout.check_contained(base, file or field)
        return layout

    def check_contained(self, base: Path, file: str) -> None:
        """Refuse a study folder (or a folder in it, two levels down) that leads outside `base` by a link.

        The study name is a plain name (spec validation) and node folders are hashes, so only a
        symbolic link placed in the storage root could send a study's writes elsewhere.
        """
        inside = self.root.resolve()
        if not inside.is_relative_to(base) or inside == base:
            raise UserError(f"{file}: storage: {self.root} leads to {inside}, outside the storage root {base}; "
                            "allowed: a real folder inside it (set storage.root to store a study elsewhere)")
        for path in [*self.root.glob("*"), *self.root.glob("*/*")] if inside.is_dir() else []:
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                raise UserError(f"{file}: storage: {path} is a link to {path.resolve()}, outside the study folder "
                                f"{self.root}; allowed: folders inside it")

    def rel(self, plan: Plan, node: Node) -> str:
        """A node's folder, relative to the study's folder."""
        if node.kind == "checkpoint":
            return str(checkpoint_dir(Path("pretrain") / node.parents[0], node.inputs["step"]))
        return f"{NODE_FOLDERS[node.kind]}/{node.id}"

    def node(self, plan: Plan, node: Node) -> Path:
        """A node's folder on this machine."""
        return self.root / self.rel(plan, node)

    def location(self, plan: Plan, node: Node) -> str:
        """A node's folder in storage: what Ray tasks get (a path, or a URI they download from)."""
        return self.store.url(self.rel(plan, node))

    def has(self, plan: Plan, node: Node, name: str) -> bool:
        return self.store.is_file(f"{self.rel(plan, node)}/{name}")

    def read(self, plan: Plan, node: Node, name: str) -> str | None:
        """A small file of a node's folder, from storage; None if it is not there."""
        return self.store.read_text(f"{self.rel(plan, node)}/{name}")

    def manifest(self, plan: Plan, corpus: Node) -> Manifest | None:
        """A corpus build's manifest, from storage (the marker: uploaded last)."""
        if not self.store.remote:
            return read_manifest(self.node(plan, corpus))
        return Manifest.parse(self.read(plan, corpus, MANIFEST))

    def log(self, node_id: str) -> str:
        """The node's log in storage (a path, or a URI)."""
        return self.store.url(f"logs/{node_id}.log")

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def cache(self) -> Path:
        return self.root / "cache"


TRACKING_DB = "mlflow/mlflow.db"
"""The embedded MLflow server's database, relative to the study's folder."""
_TRACKING_STAMP = "mlflow/.stored"


def _stored_stamp(layout: Layout) -> str | None:
    info = layout.store.fs.get_file_info(layout.store.path(TRACKING_DB))
    return None if info.type == pafs.FileType.NotFound else f"{info.size} {info.mtime_ns}"


def push_tracking(layout: Layout) -> None:
    """Upload the embedded MLflow server's database (the server stopped) to an object-store root, so
    that `results`, `report` and `ui` elsewhere find it (the run artifacts stay in this mirror:
    the database names them by local path). Nothing for a plain local root."""
    if not layout.store.remote or not (layout.root / TRACKING_DB).is_file():
        return
    layout.store.upload(TRACKING_DB)
    write_atomic(layout.root / _TRACKING_STAMP, _stored_stamp(layout) or "")


def pull_tracking(layout: Layout) -> Path:
    """The folder holding the study's embedded MLflow database on this machine (`Layout.mlflow`).

    On an object-store root, the stored database comes down unless this mirror's own is newer: a
    database without a stamp was written here (this machine ran the driver), one whose stamp
    matches storage is current; any other is replaced by the stored copy. (The stamp is the stored
    size and time, to the second: a copy stored again within a second at the same size looks the same.)
    """
    local = layout.root / TRACKING_DB
    if not layout.store.remote:
        return layout.mlflow
    stored = _stored_stamp(layout)
    stamp = layout.root / _TRACKING_STAMP
    own = local.is_file() and not stamp.is_file()
    if stored is None or own or (local.is_file() and stamp.read_text() == stored):
        return layout.mlflow
    local.unlink(missing_ok=True)  # the download keeps files of the same size: this one changes in place
    layout.store.download(TRACKING_DB)
    write_atomic(stamp, stored)
    return layout.mlflow


def node_done(layout: Layout, plan: Plan, node: Node) -> bool:
    """Whether storage holds a node's finished output: its marker, and the files the marker certifies."""
    if node.kind == "corpus":
        return layout.manifest(plan, node) is not None and node_damage(layout, plan, node) is None
    if node.kind == "checkpoint":
        return layout.has(plan, node, STATE_FILE) and node_damage(layout, plan, node) is None
    if node.kind == "pretrain":
        return all(node_done(layout, plan, ck) for ck in plan.children(node.id))
    if node.kind == "external":
        return True
    if node.kind == "finetune_run":
        return read_done(layout.read(plan, node, DONE_FILE)) is not None and node_damage(layout, plan, node) is None
    return node_done(layout, plan, plan.nodes[node.parents[0]])  # a finetune cell: its run


def node_damage(layout: Layout, plan: Plan, node: Node) -> str | None:
    """Why a node whose marker is in storage is not done: its files differ from what the marker
    certifies (a truncated checkpoint, a shard gone), or the marker itself is unreadable. None for
    an intact node, and for one without a marker (not finished: nothing damaged)."""
    rel = layout.rel(plan, node)
    if node.kind == "corpus":
        text = layout.read(plan, node, MANIFEST)
        manifest = Manifest.parse(text)
        if text is not None and manifest is None:
            return f"its {MANIFEST} is unreadable or of another format"
        return files_problem(layout.store, rel, manifest.files) if manifest and manifest.files else None
    if node.kind == "checkpoint":
        return checkpoint_problem(layout.store, rel) if layout.has(plan, node, STATE_FILE) else None
    if node.kind == "finetune_run":
        text = layout.read(plan, node, DONE_FILE)
        done = read_done(text)
        if text is not None and done is None:
            return f"its {DONE_FILE} is unreadable"
        return files_problem(layout.store, rel, done.get("files") or {}) if done else None
    return None


def done_nodes(layout: Layout, plan: Plan, damaged: dict[str, str] | None = None) -> frozenset[str]:
    """Every finished node, asking storage once per marker (a request each on object stores).
    `damaged` gets {node id: why} of the nodes whose marker is there but not their files: they are
    not done, so they are computed again."""
    done: set[str] = set()
    for node in plan.nodes.values():  # dependency order: a node's children come after it
        if node.kind in ("pretrain", "finetune"):
            continue
        if node_done(layout, plan, node):
            done.add(node.id)
        elif damaged is not None and (why := node_damage(layout, plan, node)):
            damaged[node.id] = why
    for node in plan.of_kind("pretrain"):
        if all(ck.id in done for ck in plan.children(node.id)):
            done.add(node.id)
    done.update(cell.id for cell in plan.of_kind("finetune") if cell.parents[0] in done)
    return frozenset(done)


def model_source(study: Study, layout: Layout, plan: Plan, model: Node) -> str:
    """What a finetune run loads: a checkpoint folder, or an external model's folder or hub id
    (`external_source`)."""
    if model.kind == "checkpoint":
        return layout.location(plan, model)
    return external_source(study, model.inputs["source"])


def model_options(study: Study, model: Node) -> dict:
    """How finetuning loads an external model (`finetune.finetune`'s `revision` and `do_lower_case`, as
    the spec's external_models entry says); nothing for a checkpoint, whose files say it all."""
    if model.kind != "external":
        return {}
    ext = next(m for m in study.spec.external_models if m.name == model.factors["model"])
    return {"revision": ext.revision, "do_lower_case": ext.do_lower_case}


_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")


def external_source(study: Study, source: str) -> str:
    """An external model's source as finetuning loads it: a local folder (absolute) or a hub id.

    Any path that exists is local (relative to the spec's folder; `${VAR}` and `~` expand), and so
    is one written as a path (`./`, `/`, `~`, `$`). Anything else is a hub id (`name` or `org/name`);
    one whose first part is a folder beside the spec (`models/scibert`, with `models/` there but not
    `models/scibert`) reads as both, and is a SpecError naming both readings; so is a source that is
    neither an existing path nor a hub id."""
    path = study.resolve_path(source)
    if source.startswith((".", "/", "~", "$")) or path.exists():
        return str(path)
    index = next((i for i, m in enumerate(study.spec.external_models) if m.source == source), None)
    field = f"external_models[{index}].source" if index is not None else "external_models[].source"
    if not _HUB_ID.match(source) or ".." in source or "--" in source:
        raise SpecError(study.file, field, source, "an existing folder, or a Hugging Face id (name or org/name)",
                        problem=f"no folder ({path} does not exist) and no Hugging Face id")
    if "/" in source and path.parent.is_dir():
        raise SpecError(study.file, field, source, f"./{source} once that folder exists, or a hub id whose first "
                        "part is no folder beside the spec",
                        problem=f"reads two ways: the local folder {path}, which does not exist (though "
                                f"{path.parent} does), or the Hugging Face id {source}")
    return source
