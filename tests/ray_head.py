"""A real Ray head node for tests: `ray start --head` on 127.0.0.1, free ports, token auth, stopped by PID.

    from ray_head import RayHead
    with RayHead("/tmp/ss-xyz") as head:          # a short temp dir: Ray's unix sockets need < 107 chars
        head.address            # "127.0.0.1:<gcs port>"   (ray.init(address=...) with head.env applied)
        head.dashboard_url      # "http://127.0.0.1:<port>"   (the Jobs API)
        head.metrics_url        # "http://127.0.0.1:<port>/metrics"   (Ray's Prometheus endpoint)
        head.env                # what a client process needs: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN=...
        with head.in_this_process():      # the test's own process as a driver, e.g. run_study(address=...)
            ray.init(address=head.address)

The `ray_head` fixture in conftest.py starts one per test module. The machine is shared, so the head
never touches the default ports and is stopped without `ray stop` (which ends every Ray on the
machine): `ray start` runs in a session of its own, and every process of that session (GCS,
raylet, dashboard, workers, job drivers) is ended by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """PIDs of the live processes of session `sid` (workers set their own process group, not session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, session
            if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is already dead
                pids.append(int(entry.name))
    return pids


def process_token() -> str:
    """The token Ray in this process sends once token auth is on (RAY_AUTH_TOKEN, its path, ~/.ray/auth_token).

    Ray 2.60 turns token auth on for every local `ray.init()` and caches that token for the process,
    so a head with any other token would refuse a later in-process `ray.init(address=head.address)`.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        if loader.has_token(ignore_auth_mode=True):
            return loader.get_raw_token(ignore_auth_mode=True)
    except (ImportError, AttributeError):
        pass
    return secrets.token_hex(16)


def _reload_ray_auth() -> None:
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class RayHead:
    """`ray start --head` with its own temp dir and ports; token auth on unless `token=False`."""

    def __init__(self, temp_dir: str | Path, *, num_cpus: int = 2, token: bool = True,
                 env: dict[str, str] | None = None, system_config: dict | None = None,
                 startup_timeout: float = 120.0):
        self.temp_dir = Path(temp_dir)
        self.num_cpus, self.startup_timeout = num_cpus, startup_timeout
        self.system_config = system_config or {}
        self.port, self.dashboard_port, self.metrics_port = free_port(), free_port(), free_port()
        # explicit either way: with RAY_AUTH_MODE unset, `ray start` turns auth on if ~/.ray/auth_token exists
        self.env = ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": process_token()} if token
                    else {"RAY_AUTH_MODE": "disabled"})
        self.extra_env = env or {}
        self.sid: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def headers(self) -> dict[str, str]:
        token = self.env.get("RAY_AUTH_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    @contextlib.contextmanager
    def in_this_process(self):
        """Let this process's Ray talk to the head while the block runs: the head's auth settings in
        os.environ and Ray's cached config re-read (Ray reads RAY_AUTH_MODE when it is imported); both
        restored afterwards, so that later tests in the process see what they saw before."""
        from scaling_study.raycluster import environment

        try:
            with environment(self.env):
                _reload_ray_auth()
                yield self
        finally:
            _reload_ray_auth()

    def start(self) -> RayHead:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--metrics-export-port", str(self.metrics_port), "--ray-client-server-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", str(self.num_cpus),
               "--disable-usage-stats", "--temp-dir", str(self.temp_dir)]
        if self.system_config:
            cmd += ["--system-config", json.dumps(self.system_config)]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.env, **self.extra_env}
        log = self.temp_dir / "ray_start.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.sid = proc.pid
        try:
            code = proc.wait(timeout=self.startup_timeout)
            if code != 0:
                raise RuntimeError(f"ray start exited with {code}: {log.read_text()[-2000:]}")
            self._wait_for_dashboard()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_dashboard(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=self.headers())
        while True:
            try:
                with urllib.request.urlopen(request, timeout=2):
                    return
            except (urllib.error.URLError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray dashboard at {self.dashboard_url} did not answer: {exc}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """End every process of the head's session: SIGTERM, then SIGKILL what is left after a few seconds.

        The session holds everything that names the head's temp dir (raylet, GCS, agents, task and actor
        workers, job drivers: checked with /proc), so no sweep by command line is needed."""
        if self.sid is None:
            return
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            pids = session_pids(self.sid)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = session_pids(self.sid)
            if not pids:
                break
        self.sid = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
