"""MLflow tracking for studies: a local server, one MLflow run per plan node, paginated reads.

    from scaling_study.tracking import LocalMlflowServer, Tracker
    with LocalMlflowServer("studies/mlflow") as server:          # sqlite + local artifacts, on 127.0.0.1
        tracker = Tracker(server.uri, "smoke")
        run_id = tracker.run_for(node, parent_run_id=study_run)   # found again on re-run, never duplicated
        tracker.client.log_metric(run_id, "f1", 71.2)
        runs = tracker.search()                                   # every run, all pages

Each run carries its node id and factor levels as tags (`node_id`, `node_kind`, `model_size`,
`data_volume`, `steps`, `task`, `epochs`, `seed`, ...) and the factor levels as params too, so the
MLflow UI can filter, group and chart by any factor. Runs are nested with MLflow's
`mlflow.parentRunId` tag: study, then pretraining run, then finetune job. Only one process (the
study driver) should create runs; workers log into a run id they are given, which is what keeps
"one run per node" true under Ray retries.

`MlflowClient.search_runs` returns at most one page (1,000 runs by default) and says nothing about
the rest; `Tracker.search` follows the page tokens.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from urllib.parse import unquote
from pathlib import Path

from scaling_study._env import QUIET_ENV
from scaling_study.errors import UserError
from scaling_study.lifecycle import alive, start_time

NODE_TAG = "node_id"
KIND_TAG = "node_kind"
STUDY_TAG = "study"
PARENT_TAG = "mlflow.parentRunId"
PAGE = 1000


class TrackingError(UserError):
    """The tracking server cannot be reached or used."""


class TrackingLost(TrackingError):
    """The tracking server stopped answering during a study: the node fails, a re-run redoes it."""

    exit_code = 1


class TrackingStoreError(TrackingError):
    """The tracking store is there but broken or failing (a damaged database, a server error): exit 1."""

    exit_code = 1


_SECRET_QUERY = re.compile(r"((?:token|password|secret|key|sig|signature)=)[^&\s'\"]+", re.IGNORECASE)
_AUTHORITY = re.compile(r"(://)([^/?#\s'\"<>]*)@")


def _redact_userinfo(match: re.Match) -> str:
    # the authority's user info runs to its *last* @: a raw @ in a password is still the password
    user, colon, _ = match.group(2).partition(":")
    return f"{match.group(1)}{user}:***@" if colon else f"{match.group(1)}***@"  # no colon: a token as user name


def redact_uri(uri: str) -> str:
    """The URI with its credentials replaced by ***: the password (`user:***@`), a token given as
    the user name (`***@`), token-like query values (`token=***`).

    Works on any text too (a traceback, an error message): every URI in it is redacted.
    """
    return _SECRET_QUERY.sub(r"\1***", _AUTHORITY.sub(_redact_userinfo, uri))


SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
URI_ALLOWED = ("http(s)://HOST[:PORT] of an MLflow server, or a database URI (sqlite:////abs/mlflow.db, "
                "postgresql://..., mysql://..., mssql://...)")


def uri_problem(uri: str) -> str | None:
    """What is wrong with a tracking URI, in words, or None. Checked before anything uses it:
    MLflow would take a plain path or `file://` for its deprecated file store (and create folders
    there), and a bad port or a missing database driver would fail deep inside a run."""
    scheme, sep, _ = uri.partition("://")
    scheme = scheme.lower()
    base = scheme.split("+")[0]
    if not sep:
        return "not a URI (a plain path would be MLflow's file store)"
    if base in SERVER_SCHEMES and "+" not in scheme:
        try:
            parts = urllib.parse.urlsplit(uri)
            parts.port  # noqa: B018 - raises for a port that is not a number in 0-65535
        except ValueError as exc:
            return f"bad port ({exc})"
        return None if parts.hostname else "no host name"
    if base not in DATABASE_SCHEMES:
        return ("MLflow's file store (file://) is not supported" if base == "file"
                else f"unsupported URI scheme {scheme!r}")
    if base == "sqlite":
        return None if uri.startswith(f"{scheme}:///") and len(uri) > len(scheme) + 4 else \
            "a sqlite URI needs a path (sqlite:////abs/path.db or sqlite:///relative.db)"
    from sqlalchemy.engine import make_url

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ImportError as exc:
        return f"its database driver is not installed ({exc})"
    except Exception as exc:  # sqlalchemy's ArgumentError, NoSuchModuleError
        return f"not a database URI ({' '.join(str(exc).split())[:120]})"
    return None


def check_uri(uri: str, what: str = "tracking URI") -> None:
    """Raise a one-line TrackingError (exit 2) for a URI `uri_problem` refuses."""
    problem = uri_problem(uri)
    if problem:
        raise TrackingError(f"{what} {redact_uri(uri)!r}: {problem}; allowed: {URI_ALLOWED}")


SQLITE_HEADER = b"SQLite format 3\0"


def check_sqlite_store(path: Path, uri: str) -> None:
    """Refuse, without changing it, a sqlite file that is no MLflow store: empty (MLflow would create
    its tables in it), not a database, or one without MLflow's tables (exit 1: the store is broken)."""
    import sqlite3

    problem = None
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise TrackingStoreError(f"tracking store {redact_uri(uri)}: cannot read it ({exc.strerror or exc})") from None
    if not head:
        problem = "an empty file, not an MLflow database"
    elif head != SQLITE_HEADER:
        problem = "not a sqlite database"
    else:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
                tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            tables, problem = set(), f"a damaged sqlite database ({exc})"
        if problem is None and not {"experiments", "runs", "alembic_version"} <= tables:
            problem = "a sqlite database without MLflow's tables"
    if problem:
        raise TrackingStoreError(f"tracking store {redact_uri(uri)}: {problem}; allowed: the mlflow.db an MLflow "
                                 "server wrote (restore it from a backup; the study's storage keeps every result, "
                                 "and a re-run with a fresh database logs them again)")


@contextlib.contextmanager
def reading(uri: str):
    """Turn a failing read of a tracking store (MLflow, sqlalchemy, the network) into one line, exit 1."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:
        if not isinstance(exc, (MlflowException, OSError)) and not type(exc).__module__.startswith(
                ("sqlalchemy", "requests", "urllib3", "sqlite3")):
            raise
        first = (redact_uri(str(exc)).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrackingStoreError(f"tracking store {redact_uri(uri)} failed to answer ({first})") from None


@contextlib.contextmanager
def tracking_calls(uri: str):
    """Turn a failed MLflow call into a one-line `TrackingLost` naming the (redacted) server.

    MLflow's client already retries a refused or failed request with backoff (7 times, about 4
    minutes by default; MLFLOW_HTTP_REQUEST_MAX_RETRIES), so a short outage passes unnoticed;
    what reaches here is an outage longer than that.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except TrackingError:
        raise
    except (MlflowException, OSError) as exc:
        first = (redact_uri(str(exc)).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrackingLost(f"MLflow tracking server at {redact_uri(uri)} failed mid-study ({first}); "
                           "a re-run redoes or re-logs this node") from None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError (one line) unless `uri` is a usable tracking URI (`uri_problem`) and, for
    http(s), an MLflow server answers there."""
    check_uri(uri)
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    request = urllib.request.Request(f"{uri.rstrip('/')}/health")
    if parts.username is not None:  # urllib takes user:password@ for part of the host name; MLflow sends Basic auth
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        request = urllib.request.Request(f"{parts._replace(netloc=netloc).geturl().rstrip('/')}/health")
        token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        problem = str(getattr(exc, "reason", exc))
    except http.client.HTTPException as exc:  # something that is not an HTTP server holds the port
        problem = f"the reply is not HTTP: {type(exc).__name__}"
    raise TrackingError(f"MLflow tracking server at {redact_uri(uri)} is not reachable ({problem}); "
                        "start it, fix tracking.uri, or leave tracking.uri empty for a local server")


class LocalMlflowServer:
    """An MLflow server this process starts and stops: sqlite backend, artifacts in `root`, bound to 127.0.0.1.

    `scaling-study ui` uses the same layout to serve the UI over a finished study, or attaches to
    the server a running study owns (`live`). A live server is never ended by another process: the
    pid file `server.pid` names the server and the process that owns it, and only a server whose
    owner has died (a SIGKILLed driver) is ended by the next start. `on_start(pids, what)` hears of
    each server process started (`lifecycle.StudyLock.own`, so a killed driver's server is reaped).
    `watch()` keeps it running: a server that exits or stops answering is restarted on the same
    store and port, so the URI every worker holds stays valid. A port it chose itself, that another
    process took before the server bound it, is chosen again before the first answer (`wait_ready`
    returns the URI then).
    """

    def __init__(self, root: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 90.0, on_start=None):
        self.root = Path(root).resolve()
        self.host, self.port, self.startup_timeout = host, port, startup_timeout
        self.on_start = on_start
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._moves = 0 if port is None else None  # times the chosen port was taken; None: never move
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def pid_file(self) -> Path:
        return self.root / "server.pid"

    @classmethod
    def live(cls, root: str | Path) -> dict | None:
        """The server another live process runs over this store ({pid, port, uri, owner}), or None."""
        info = _read_pid_file(Path(root).resolve() / "server.pid")
        if info is None or not _is_server(info, f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"):
            return None
        if not _alive(info.get("owner"), info.get("owner_start")) or info.get("owner") == os.getpid():
            return None
        return {**info, "uri": f"http://{info.get('host', '127.0.0.1')}:{info['port']}"}

    @staticmethod
    def live_pid(info: dict) -> bool:
        """Whether the server `live` found still runs."""
        return _is_server(info, info.get("backend", ""))

    def _reap_orphan(self) -> None:
        """End a server over this store whose owner has died (a killed driver); refuse to touch a live one."""
        info = _read_pid_file(self.pid_file)
        if info is None or not _is_server(info, self.backend_uri):
            return
        if _alive(info.get("owner"), info.get("owner_start")) and info.get("owner") != os.getpid():
            raise TrackingError(f"a live MLflow server (pid {info['pid']}, owned by process {info.get('owner')}) "
                                f"already serves {self.root / 'mlflow.db'} at http://127.0.0.1:{info.get('port')}; "
                                f"allowed: use that server, or stop process {info.get('owner')} first")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(info["pid"], signal.SIGTERM)
            for _ in range(50):
                if not Path(f"/proc/{info['pid']}").exists():
                    break
                time.sleep(0.1)

    def start(self, wait: bool = True) -> LocalMlflowServer:
        """Start the server; with `wait=False` return at once (its start takes seconds of imports) and
        call `wait_ready()` before the first request."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._reap_orphan()
        self.port = self.port or _free_port(self.host)
        self._spawn()
        if wait:
            self.wait_ready()
        return self

    def _spawn(self) -> None:
        log = open(self.root / "server.log", "ab")
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--default-artifact-root", str(self.root / "artifacts"), "--host", self.host,
               "--port", str(self.port), "--workers", "1"]
        # own session: stop() can end the server and the workers it forks, and nothing else
        # MLflow 3's server also starts a job runner with a dozen worker processes; studies use none
        env = {**os.environ, **QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=env, cwd=self.root)
        log.close()
        me = os.getpid()
        info = {"port": self.port, "host": self.host, "backend": self.backend_uri, "owner": me,
                "owner_start": start_time(me), "start": start_time(self.process.pid)}
        with contextlib.suppress(OSError):  # read-only storage: the server's own start fails and says so
            self.pid_file.write_text(f"{self.process.pid}\n{json.dumps(info)}\n")
        if self.on_start is not None:
            self.on_start([self.process.pid], "MLflow server")

    def wait_ready(self) -> str:
        """Return the server's URI once it answers; raise TrackingError if it exits or does not answer."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.root / "server.log").read_text(errors="replace").strip().splitlines()[-20:]
                if self._moves is not None and self._moves < 3 and _port_taken(tail):
                    # a port is free when chosen and bound seconds later, after MLflow's imports; on a
                    # busy node (a local Ray starting beside it) another process may take it between
                    self._moves += 1
                    self.port = _free_port(self.host)
                    self._spawn()
                    continue
                raise TrackingError(f"local MLflow server exited with code {self.process.returncode}: "
                                    f"{tail[-1] if tail else 'no output'} (log: {self.root / 'server.log'})")
            try:
                check_server(self.uri, timeout=2)
                self._moves = None  # the URI is out now: restarts keep this port
                return self.uri
            except TrackingError:
                time.sleep(0.3)
        self.stop()
        raise TrackingError(f"local MLflow server did not answer within {self.startup_timeout:.0f} s "
                            f"(log: {self.root / 'server.log'})")

    def watch(self, on_lost, *, every: float = 0.5, probe_every: float = 5.0, misses: int = 3,
              max_restarts: int = 5) -> None:
        """Keep the server up from a thread: one that exits, or misses `misses` health probes in a row,
        is restarted at once on the same store and port (say so on stderr). `on_lost(reason)` when it
        cannot be (it does not come back, or has been restarted `max_restarts` times)."""
        def loop() -> None:
            missed, last_probe = 0, time.monotonic()
            while not self._stopping.wait(every):
                why = None
                if self.process.poll() is not None:
                    why = f"exited with code {self.process.returncode}"
                elif time.monotonic() - last_probe >= probe_every:
                    last_probe = time.monotonic()
                    try:
                        check_server(self.uri, timeout=5)
                        missed = 0
                    except TrackingError:
                        missed += 1
                    why = f"did not answer {misses} health checks" if missed >= misses else None
                if why is None or self._stopping.is_set():
                    continue
                missed = 0
                if self.restarts >= max_restarts:
                    on_lost(f"the local MLflow server {why}, after {self.restarts} restarts; "
                            f"log: {self.root / 'server.log'}")
                    return
                try:
                    self._restart(why)
                except TrackingError as exc:
                    on_lost(f"the local MLflow server {why} and could not be restarted: {exc}")
                    return

        self._watcher = threading.Thread(target=loop, name="mlflow-watch", daemon=True)
        self._watcher.start()

    def _restart(self, why: str) -> None:
        self.restarts += 1
        print(f"scaling-study: warning: the local MLflow server {why}; restarting it on the same store "
              f"({self.uri}, restart {self.restarts})", file=sys.stderr, flush=True)
        if self.process.poll() is None:
            _end_group(self.process)
        self._spawn()
        self.wait_ready()

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=self.startup_timeout + 20)
        if self.process is None or self.process.poll() is not None:
            return
        _end_group(self.process)
        self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> LocalMlflowServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_taken(log_tail: list[str]) -> bool:
    """Whether a server's last log lines say its port was in use (uvicorn's and gunicorn's words)."""
    return any("address already in use" in line.lower() or "errno 98" in line.lower() for line in log_tail)


def _end_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _alive(pid: int | None, started: int | None) -> bool:
    return bool(pid) and alive(pid, started)


def _read_pid_file(path: Path) -> dict | None:
    """`server.pid`: the server's pid on the first line (what faults.py reads), then its details as JSON."""
    try:
        first, _, rest = path.read_text().partition("\n")
        return {"pid": int(first.split()[0]), **json.loads(rest or "{}")}
    except (OSError, ValueError, IndexError):
        return None


def _is_server(info: dict, backend_uri: str) -> bool:
    """Whether the pid file's process is still that MLflow server over this store (not a reused pid)."""
    if not _alive(info["pid"], info.get("start")):
        return False
    try:
        cmdline = Path(f"/proc/{info['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return backend_uri in cmdline and "mlflow" in cmdline


def _tag_value(value: object) -> str:
    return str(value)[:5000]


def search_all(client, experiment_id: str, filter_string: str = "", *, page_size: int = PAGE,
               deleted: bool = False, limit: int | None = None) -> list:
    """Every run matching `filter_string` (at most `limit`), following page tokens: MLflow's
    `search_runs` returns one page and says nothing about the rest. `deleted`: the deleted runs instead."""
    from mlflow.entities import ViewType

    view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, run_view_type=view,
                                  max_results=page_size, page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (limit and len(runs) >= limit):
            return runs[:limit] if limit else runs


class Tracker:
    """One MLflow experiment (a study) and its runs, one per plan node."""

    def __init__(self, uri: str, experiment: str, *, tags: dict | None = None):
        from mlflow.tracking import MlflowClient

        check_server(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, tags={k: _tag_value(v) for k, v in (tags or {}).items()})
        self.experiment = experiment
        self._runs: dict | None = None  # node id -> run, once `load_runs` has read them

    def load_runs(self) -> None:
        """Read every run of the experiment once (one paginated search); `find_run` and `run_for`
        answer from it afterwards. Only this tracker may create runs in the experiment meanwhile."""
        runs: dict = {}
        for run in self.search():
            node = run.data.tags.get(NODE_TAG)
            if node in runs:
                raise TrackingError(f"several MLflow runs carry node id {node} in experiment "
                                    f"{self.experiment!r}; expected one")
            if node is not None:
                runs[node] = run
        self._runs = runs

    def search(self, filter_string: str = "", *, max_results: int | None = None) -> list:
        """Every run of the experiment matching `filter_string`, following page tokens."""
        return search_all(self.client, self.experiment_id, filter_string, limit=max_results)

    def find_run(self, node_id: str):
        """The run of a node, or None. More than one means something bypassed `run_for`: an error."""
        if self._runs is not None:
            return self._runs.get(node_id)
        runs = self.search(f"tags.{NODE_TAG} = '{node_id}'")
        if len(runs) > 1:
            raise TrackingError(f"{len(runs)} MLflow runs carry node id {node_id} in experiment "
                                f"{self.experiment!r}; expected one")
        return runs[0] if runs else None

    def run_for(self, node_id: str, *, kind: str, name: str, factors: dict | None = None,
                parent_run_id: str | None = None, tags: dict | None = None, params: dict | None = None) -> str:
        """The id of the node's run: the existing one, or a new one tagged with the node and its factors
        (as tags and params), with `params` (a recipe) as params too."""
        existing = self.find_run(node_id)
        if existing is not None:
            return existing.info.run_id
        all_tags = {NODE_TAG: node_id, KIND_TAG: kind, STUDY_TAG: self.experiment, **(tags or {}),
                    **{k: v for k, v in (factors or {}).items() if v is not None}}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={k: _tag_value(v) for k, v in all_tags.items()})
        values = {**(params or {}), **(factors or {})}
        if values:
            from mlflow.entities import Param

            self.client.log_batch(run.info.run_id, params=[Param(k, _tag_value(v)) for k, v in values.items()
                                                           if v is not None])
        if self._runs is not None:
            self._runs[node_id] = run
        return run.info.run_id
