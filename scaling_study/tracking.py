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
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from urllib.parse import unquote
from pathlib import Path

from scaling_study._env import QUIET_ENV
from scaling_study.errors import UserError

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


_SECRET_QUERY = re.compile(r"((?:token|password|secret|key|sig|signature)=)[^&\s'\"]+", re.IGNORECASE)
_USERINFO = re.compile(r"(://[^/:@\s'\"]+:)[^/@\s'\"]+@")


def redact_uri(uri: str) -> str:
    """The URI with any password in it and any token-like query value replaced by ***.

    Works on any text too (a traceback, an error message): every URI in it is redacted.
    """
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", uri))


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
    """Raise TrackingError (one line) unless an MLflow server answers at an http(s) `uri`."""
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
    raise TrackingError(f"MLflow tracking server at {redact_uri(uri)} is not reachable ({problem}); "
                        "start it, fix tracking.uri, or leave tracking.uri empty for a local server")


class LocalMlflowServer:
    """An MLflow server this process starts and stops: sqlite backend, artifacts in `root`, bound to 127.0.0.1.

    `scaling-study ui` uses the same layout to serve the UI over a finished study.
    """

    def __init__(self, root: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 90.0):
        self.root = Path(root).resolve()
        self.host, self.port, self.startup_timeout = host, port, startup_timeout
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def pid_file(self) -> Path:
        return self.root / "server.pid"

    def _reap_stale(self) -> None:
        """End a server a previous, killed invocation started over this same database (its pid file says so)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            return
        if self.backend_uri in cmdline and "mlflow" in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
                for _ in range(50):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.1)

    def start(self) -> LocalMlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self._reap_stale()
        self.port = self.port or _free_port(self.host)
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
        self.pid_file.write_text(f"{self.process.pid} {self.backend_uri}\n")
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.root / "server.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise TrackingError(f"local MLflow server exited with code {self.process.returncode}: "
                                    f"{tail[0] if tail else 'no output'} (log: {self.root / 'server.log'})")
            try:
                check_server(self.uri, timeout=2)
                return self
            except TrackingError:
                time.sleep(0.3)
        self.stop()
        raise TrackingError(f"local MLflow server did not answer within {self.startup_timeout:.0f} s "
                            f"(log: {self.root / 'server.log'})")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> LocalMlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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
