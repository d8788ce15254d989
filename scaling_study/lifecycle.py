"""One driver per study, and how a driver ends: the study lock, what a killed driver leaves, signals.

    from scaling_study.lifecycle import StudyLock, reap_if_free, stop_on_signals
    with StudyLock(layout.root, "run") as lock:        # a second holder gets StudyBusy (exit 2), naming this one
        server = LocalMlflowServer(folder, on_start=lock.own)   # processes that outlive a killed driver
        with stop_on_signals():                        # SIGTERM, SIGHUP -> `Stopped` in the main thread
            ...
    reap_if_free(layout.root)                          # `status`: end what a SIGKILLed driver left running

The lock is `fcntl.flock` on `<study>/.driver.lock`, so the OS releases it when its holder dies,
however it dies; the holder writes who it is there (pid, verb, command line, start time) for the
message a second driver gets. Processes a driver starts that would outlive it (the MLflow server,
in its own session; the local Ray's GCS, raylet and agents) are listed in `<study>/.driver.json`.
When the lock is free again nobody owns them: the next `run`, `ui` or `status` ends the ones still
running (a pid counts only with the start time it was recorded with, so a reused pid is never
touched) and deletes the local Ray's temporary folder.

`Stopped` is a BaseException, like KeyboardInterrupt: `except Exception` in library code does not
swallow it, and `with` blocks on the way up stop their servers. `request_stop` raises it in the
main thread from any thread (a tracking server that cannot be restarted, storage gone read-only).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from scaling_study.errors import UserError

LOCK_FILE = ".driver.lock"
LEFTOVERS = ".driver.json"
SIGNAL_EXIT = {signal.SIGTERM: 143, signal.SIGHUP: 129}
"""Exit codes of `scaling-study run` and `ui` stopped by a signal: the shell's 128 + signal number."""


class StudyBusy(UserError):
    """Another live process holds the study (exit 2)."""


class Stopped(BaseException):
    """The study was told to stop: by a signal (`exit_code` 128 + its number), or by a fault the driver
    cannot carry on through (`exit_code` 1)."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat), or None if it is gone (or a
    zombie: ended, waiting for a parent to collect it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])  # state is field 3, start time field 22


def alive(pid: int, started: int | None) -> bool:
    """Whether the process recorded as (pid, started) still runs (not a later process with its pid)."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


class StudyLock:
    """Exclusive hold of a study folder by one driver (`run`, or `ui` serving its own server)."""

    def __init__(self, folder: str | Path, verb: str):
        self.folder, self.verb = Path(folder), verb
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def holder(self) -> dict:
        """Who holds the lock, as its holder wrote it ({} if unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def busy_error(self) -> StudyBusy:
        h = self.holder()
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if h.get("since") else "?"
        who = f"process {h.get('pid', '?')} (scaling-study {h.get('verb', '?')}, {' '.join(h.get('argv', []))[:120]}, " \
              f"since {since})"
        if h.get("verb") == "ui":
            return StudyBusy(f"study folder {self.folder}: open in the MLflow UI by {who}, which serves its tracking "
                             f"store; allowed: stop that UI (Ctrl-C there, or kill {h.get('pid', '?')}), then run; a "
                             "UI opened while a study runs attaches to the run's server")
        return StudyBusy(f"study folder {self.folder}: being run by {who}; allowed: one driver per study: wait for it "
                         f"to end, or stop it (kill {h.get('pid', '?')}: it stops cleanly); `scaling-study ui` "
                         "attaches to its MLflow server")

    def acquire(self) -> StudyLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644))
            # held read-only: a file open for writing all along would keep the filesystem from being
            # remounted read-only, and flock needs no write access
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise UserError(f"{self.folder}: cannot take the study's lock {LOCK_FILE} ({exc.strerror or exc}); "
                            "allowed: a writable storage folder") from None
        for attempt in range(5):  # `check_free` and `status` probe it for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    os.close(fd)
                    raise self.busy_error() from None
                time.sleep(0.2)
        self.fd = fd
        reap(self.folder)  # the last holder died without cleaning up
        info = {"pid": os.getpid(), "verb": self.verb, "argv": sys.argv[1:], "since": time.time()}
        self.path.write_text(json.dumps(info))
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            (self.folder / LEFTOVERS).unlink(missing_ok=True)
            self.path.write_text("")
        os.close(self.fd)  # closing releases the flock
        self.fd = None

    def own(self, pids: list[int], what: str, *, folder: str | Path | None = None) -> None:
        """Record processes this driver started that would outlive it if it were killed (and a folder
        to delete with them), for `reap`."""
        record = _read_leftovers(self.folder)
        record.setdefault("processes", []).extend({"pid": p, "start": start_time(p), "what": what} for p in pids)
        if folder:
            record.setdefault("folders", []).append(str(folder))
        with contextlib.suppress(OSError):  # storage gone read-only: nothing to record, nothing lost but this
            (self.folder / LEFTOVERS).write_text(json.dumps(record))

    def __enter__(self) -> StudyLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(folder: str | Path, verb: str = "run") -> None:
    """Raise StudyBusy now if a live driver holds the study (a quick probe: nothing is taken)."""
    lock = StudyLock(folder, verb)
    if not lock.path.exists():
        return
    fd = os.open(lock.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise lock.busy_error() from None
    finally:
        os.close(fd)


def _read_leftovers(folder: Path) -> dict:
    try:
        return json.loads((folder / LEFTOVERS).read_text())
    except (OSError, ValueError):
        return {}


def reap(folder: str | Path) -> list[str]:
    """End what a dead driver of this study left running (only call it holding the lock); returns
    what it ended, for a message."""
    folder = Path(folder)
    record = _read_leftovers(folder)
    procs = [p for p in record.get("processes", []) if alive(p["pid"], p.get("start"))]
    for p in procs:
        with contextlib.suppress(OSError):
            if os.getpgid(p["pid"]) == p["pid"]:  # a session of its own (the MLflow server and its workers)
                os.killpg(p["pid"], signal.SIGTERM)
            else:
                os.kill(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p["pid"], p.get("start")) for p in procs):
        time.sleep(0.1)
    for p in procs:
        if alive(p["pid"], p.get("start")):
            with contextlib.suppress(OSError):
                os.kill(p["pid"], signal.SIGKILL)
    for path in record.get("folders", []):
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        (folder / LEFTOVERS).unlink(missing_ok=True)
    return [f"{p['what']} (pid {p['pid']})" for p in procs]


def reap_if_free(folder: str | Path) -> list[str]:
    """`reap` when no live driver holds the study (`status` calls it); otherwise nothing."""
    folder = Path(folder)
    if not (folder / LEFTOVERS).exists() or not (folder / LOCK_FILE).exists():
        return []
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live driver: its processes are its own
        os.close(fd)
        return []
    try:
        return reap(folder)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- signals

_pending: list[Stopped] = []
_depth = [0]  # nested stop_on_signals blocks (the driver enters one again after ray.init)


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM and SIGHUP raise `Stopped` in the main thread (the first one; a
    second is the default again: the process ends at once), and `request_stop` works.

    Enter it after `ray.init`: Ray installs its own SIGTERM handler in the driver.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for sig in SIGNAL_EXIT:
            signal.signal(sig, signal.SIG_DFL)
        stop = _pending.pop() if _pending else Stopped(f"stopped by {signal.Signals(signum).name}",
                                                       SIGNAL_EXIT[signum])
        raise stop

    saved = {sig: signal.signal(sig, handler) for sig in SIGNAL_EXIT}
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if not _depth[0]:
            _pending.clear()
        for sig, old in saved.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def request_stop(reason: str, exit_code: int = 1) -> bool:
    """From any thread: stop the study (raise `Stopped(reason)` in the main thread, inside
    `stop_on_signals`), as SIGTERM would, but with this reason and exit code. Returns whether a
    stop could be requested (False outside `stop_on_signals`: the caller reports the fault itself)."""
    if not _depth[0]:
        return False
    _pending.append(Stopped(reason, exit_code))
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    return True


STORAGE_ERRNOS = {30: "read-only", 13: "not writable", 1: "not writable", 5: "failing (I/O error)"}
"""EROFS, EACCES, EPERM, EIO: storage the study can no longer write; it stops instead of stalling."""


@contextlib.contextmanager
def watch_storage(folder: str | Path, every: float = 5.0):
    """Within the block, check every `every` s that the study folder still takes a write; when it
    does not (remounted read-only, permissions taken away, I/O errors), `request_stop` at once: every
    node would fail slowly, and the tracking server's retries would stall the driver for minutes."""
    folder = Path(folder)
    done = threading.Event()

    def loop() -> None:
        probe = folder / f".probe-{os.getpid()}"
        while not done.wait(every):
            try:
                probe.write_bytes(b"1")
                probe.unlink()
            except OSError as exc:
                if exc.errno in STORAGE_ERRNOS:
                    request_stop(storage_stop_reason(folder, exc))
                    return

    thread = threading.Thread(target=loop, name="storage-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def storage_stop_reason(folder: str | Path, exc: OSError) -> str:
    return (f"storage {folder} is {STORAGE_ERRNOS.get(exc.errno, 'failing')} ({exc.strerror or exc}); "
            "the study stopped: finished nodes are kept, a re-run once it is writable again does the rest")
