"""Storage roots on local disks, shared filesystems and object stores, with a local mirror.

    from scaling_study.storage import Store
    out = Store("s3://bucket/studies/x/pretrain/pt-1")   # or "gs://...", "file:///abs", "/a/local/folder"
    out.local                                  # where this machine reads and writes it: a folder
    out.exists("checkpoints/step-00000500/trainer_state.pt")
    out.upload("checkpoints/step-00000500", last=("trainer_state.pt",))   # the marker goes up last
    out.download("checkpoints/step-00000500", exclude=("trainer_state.pt",))  # -> the local folder
    out.write_text("final.json", text)         # atomic on local disks; one PUT on object stores

A plain path (no `scheme://`) is used in place: `local` is the folder itself and `upload` and
`download` do nothing, so a local or NFS root costs no copies. A URI is opened with
`pyarrow.fs.FileSystem.from_uri` (`s3://`, `gs://`, `file://`; credentials from the usual chain,
e.g. an instance profile) or, for other protocols, with fsspec behind pyarrow's `FSSpecHandler`.
An S3-compatible server other than AWS (MinIO, Ceph, moto's) is named the AWS way, in
`$AWS_ENDPOINT_URL_S3` or `$AWS_ENDPOINT_URL` (`from_uri` honours both; pyarrow's
`S3FileSystem()` constructor does not), on every machine that runs a part of the study.
Its `local` folder is a mirror under the cache (`$SCALING_STUDY_CACHE`, default
`~/.cache/scaling-study`): work is staged there and uploaded when finished, and inputs are
downloaded there before use. `file://` takes the object-store path on purpose (tests run the code
an `s3://` root runs); use a plain path for a shared filesystem.

Object stores have no rename, so a folder counts as complete by a marker file that is uploaded
after everything else (a corpus build's `manifest.json`, a checkpoint's `trainer_state.pt`, a
finetune run's `DONE.json`); a killed upload leaves a folder without its marker, which readers
treat as absent. Downloads are per file, each written under a temporary name and renamed, with
the marker last, so the local mirror follows the same rule, and concurrent downloads of the same
folder on one machine (ranks of one node, trials) are safe. The mirror is a cache: delete it
whenever nothing runs.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import tempfile
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

from scaling_study import faults
from scaling_study.downloads import cache_root

__all__ = ["SCHEMES", "Store", "cache_root", "check_root", "is_uri", "local_copy", "replace_dir", "restore_replaced",
           "write_atomic"]

SCHEMES = ("file", "s3", "gs")
"""URI schemes a study's `storage.root` may use (validated with the spec)."""
_PYARROW_SCHEMES = {"file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}
_THREADS = 8
_OBJECT_STORES = tuple(getattr(pafs, name) for name in ("S3FileSystem", "GcsFileSystem") if hasattr(pafs, name))


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def check_root(root: str) -> str | None:
    """The problem with a storage root, or None: a plain path (a folder, or where one can be made),
    or a URI of one of `SCHEMES`."""
    if not is_uri(root):
        return _folder_problem(Path(root).expanduser())
    scheme, _, rest = root.partition("://")
    if scheme.lower() not in SCHEMES:
        return f"unsupported URI scheme {scheme!r}"
    if scheme.lower() != "file" and not rest.split("/")[0]:
        return "no bucket in the URI"
    if scheme.lower() == "file" and not rest.startswith("/"):
        return "a file:// URI needs an absolute path (file:///abs/path)"
    return _folder_problem(Path(urllib.parse.unquote(urllib.parse.urlsplit(root).path))) if scheme == "file" else None


_PSEUDO = ("/proc", "/sys", "/dev")
"""Kernel pseudo-filesystems (/dev/shm, a tmpfs, is storage)."""


def _folder_problem(path: Path) -> str | None:
    """A root that is a file (or under one), or on a kernel pseudo-filesystem, can never hold a study."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop
        return f"cannot resolve the path ({getattr(exc, 'strerror', None) or exc})"
    if any(resolved.is_relative_to(p) for p in _PSEUDO) and not resolved.is_relative_to("/dev/shm"):
        return f"{resolved} is on a kernel pseudo-filesystem ({resolved.parts[1]}), not storage"
    for folder in (resolved, *resolved.parents):
        if folder.exists():
            return None if folder.is_dir() else f"{folder} is a file, not a folder"
    return None


ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Where an S3-compatible server other than AWS answers (the first one set wins, as in the AWS SDKs)."""


def _filesystem(scheme: str, netloc: str) -> pafs.FileSystem:
    endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None) if scheme == "s3" else None
    return _open_filesystem(scheme, netloc, endpoint)


@functools.lru_cache(maxsize=None)
def _open_filesystem(scheme: str, netloc: str, endpoint: str | None) -> pafs.FileSystem:
    # One per bucket, endpoint and process: from_uri asks S3 for the bucket's region (a network
    # call); it reads the endpoint from the environment itself, which is why it is part of the key.
    if scheme in _PYARROW_SCHEMES:
        return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")[0]
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fsspec.filesystem(scheme)))


class Store:
    """A folder in storage (see the module docstring); pickles as its location."""

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        self.remote = is_uri(location)
        if self.remote:
            self.location = location.rstrip("/")
            parts = urllib.parse.urlsplit(self.location)
            self.scheme, netloc = parts.scheme.lower(), parts.netloc
            self.base = parts.path if self.scheme == "file" else f"{netloc}{parts.path}"
            self.local = cache_root() / "mirror" / self.scheme / netloc / parts.path.lstrip("/")
            self._netloc = netloc
        else:
            self.local = Path(location).expanduser().resolve()
            self.location, self.base, self.scheme = str(self.local), str(self.local), ""

    def __reduce__(self):
        return Store, (self.location,)

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.scheme, self._netloc) if self.remote else pafs.LocalFileSystem()

    def child(self, rel: str) -> Store:
        return Store(self.url(rel))

    def url(self, rel: str = "") -> str:
        """The location of `rel`: a URI for remote stores, an absolute path otherwise."""
        rel = rel.strip("/")
        if not rel:
            return self.location
        return f"{self.location}/{rel}" if self.remote else str(self.local / rel)

    def path(self, rel: str = "") -> str:
        """`rel` as a path on `fs` (what pyarrow and Ray's storage_filesystem take)."""
        rel = rel.strip("/")
        return f"{self.base.rstrip('/')}/{rel}" if rel else self.base

    # ------------------------------------------------------------------ small files

    def _info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (self.local / rel).exists()
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        if not self.remote:
            return (self.local / rel).is_file()
        return self._info(rel).type == pafs.FileType.File

    def sizes(self, rel: str = "") -> dict[str, int]:
        """Every file under `rel` (recursively) by its path relative to `rel`, with its size: one listing."""
        base = self.path(rel).rstrip("/")
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {info.path[len(base) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}

    def read_text(self, rel: str) -> str | None:
        """The file's text, or None if there is none."""
        if not self.remote:
            try:
                return (self.local / rel).read_text()
            except FileNotFoundError:
                return None
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Write a small file whole: readers see the old file or the new one, never a part."""
        if not self.remote:
            write_atomic(self.local / rel, text)
            return
        with tempfile.NamedTemporaryFile("w", delete=False, suffix=".txt") as f:
            f.write(text)
        try:
            self._put(Path(f.name), self.path(rel))
        finally:
            os.unlink(f.name)

    def append_text(self, rel: str, text: str) -> None:
        """Append to a small file (logs): read, extend and rewrite it on object stores."""
        if not self.remote:
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("a") as f:
                f.write(text)
            return
        self.write_text(rel, (self.read_text(rel) or "") + text)

    def delete(self, rel: str) -> None:
        """Remove a file or folder; nothing if it is not there."""
        if not self.remote:
            target = self.local / rel
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            return
        info = self._info(rel)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def list(self, rel: str = "") -> list[str]:
        """Names of the entries directly in folder `rel` (empty if there is none)."""
        if not self.remote:
            folder = self.local / rel
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    # ------------------------------------------------------------------ folders

    def _put(self, source: Path, dest: str) -> None:
        fs = self.fs
        parent = dest.rsplit("/", 1)[0]
        if isinstance(fs, pafs.LocalFileSystem):  # a real rename exists: use it
            fs.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{dest.rsplit('/', 1)[1]}.tmp-{os.getpid()}"
            pafs.copy_files(str(source), tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            fs.move(tmp, dest)
        else:  # an object appears whole when its upload completes
            if not isinstance(fs, _OBJECT_STORES):  # S3 would store a marker object per call
                fs.create_dir(parent, recursive=True)
            pafs.copy_files(str(source), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def upload(self, rel: str = "", *, last: tuple[str, ...] = ()) -> None:
        """Copy the local file or folder `rel` up; files named in `last` go after all others, in
        that order. Nothing for a plain local store."""
        if not self.remote:
            return
        source = self.local / rel
        if source.is_file():
            self._put(source, self.path(rel))
            return
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        first = [p for p in files if p.name not in last]

        def put(p: Path) -> None:
            faults.point("upload", p.name)  # a process killed here leaves the folder without its marker
            self._put(p, self.path(str(p.relative_to(self.local))))

        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(put, first))
        for name in last:
            for p in files:
                if p.name == name:
                    put(p)

    def download(self, rel: str = "", *, exclude: tuple[str, ...] = (), last: tuple[str, ...] = ()) -> Path:
        """Mirror the file or folder `rel` into `local` and return its local path; files already
        there with the same size are kept. Nothing to do for a plain local store."""
        target = self.local / rel
        if not self.remote:
            return target
        info = self._info(rel)
        if info.type == pafs.FileType.File:
            entries = [info]
        elif info.type == pafs.FileType.Directory:
            entries = [e for e in self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True))
                       if e.type == pafs.FileType.File]
        else:
            raise FileNotFoundError(f"{self.url(rel)}: no such file or folder")
        entries = [e for e in entries if e.base_name not in exclude]
        ordered = ([e for e in entries if e.base_name not in last]
                   + [e for name in last for e in entries if e.base_name == name])
        tmp_dir = cache_root() / ".tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)

        base = self.base.strip("/")

        def fetch(entry: pafs.FileInfo) -> None:
            dest = self.local / entry.path.lstrip("/")[len(base) + 1:]
            if dest.is_file() and dest.stat().st_size == entry.size:
                return
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=dest.name[:40] + ".")
            os.close(fd)
            try:
                pafs.copy_files(entry.path, tmp, source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                os.replace(tmp, dest)  # the cache and the mirror share a filesystem
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

        body = ordered[:len(ordered) - sum(e.base_name in last for e in ordered)]
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(fetch, body))
        for entry in ordered[len(body):]:
            fetch(entry)
        return target


# ----------------------------------------------------------------------------------- local atomic writes


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file whole: readers see the old file or the new one, never a part (fsync, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def no_space(exc: BaseException, path: Path, needed: int) -> OSError | None:
    """The error to raise for a write that failed because `path`'s disk is full, or None if it was not
    that: a real full disk shows as ENOSPC, or as whatever the writer makes of a short write (torch's
    `RuntimeError: unexpected pos`, safetensors' own errors), with no room left. Call it before the
    half-written files are removed (their space is what is missing)."""
    try:
        free = shutil.disk_usage(Path(path)).free
    except OSError:
        return None
    if not (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) and free >= 1 << 20:
        return None

    def mb(n: int) -> str:
        return f"{n / 1e6:,.1f} MB"

    return OSError(errno.ENOSPC, f"No space left on {path}: it needs about {mb(needed)}, {mb(free)} free; what "
                                 "was there before stays valid, and a re-run resumes once there is room")


def _umask() -> int:
    try:  # read, not set: os.umask's set-and-restore would race with threads creating files
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode the umask gives new ones (files 0666 & ~umask,
    folders 0777 & ~umask): some writers (safetensors) create files 0600, which colleagues on shared
    storage cannot read."""
    mask = _umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an existing `final` is moved aside first and removed after,
    so at every moment one complete copy exists (`restore_replaced` finishes a killed swap)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def restore_replaced(parent: Path, *, marker: str) -> None:
    """Undo a `replace_dir` killed between its two renames: the moved-aside copy (complete by its
    `marker` file) goes back in place when nothing took it."""
    for old in Path(parent).glob(".old-*"):
        final = old.with_name(old.name[len(".old-"):].rsplit("-", 1)[0])
        if not final.exists() and (old / marker).is_file():
            os.replace(old, final)


def local_copy(location: str, *, exclude: tuple[str, ...] = ()) -> str:
    """A local folder holding `location`: itself if it is not a URI, else its downloaded mirror.
    Leaves Hugging Face ids and other non-URIs alone."""
    if not is_uri(location):
        return location
    return str(Store(location).download(exclude=exclude))
