"""One driver per study, and how drivers end: the study lock, a killed driver's leftovers, `ui` beside a
running study, signals, the embedded MLflow server's watchdog. Real processes and real MLflow servers;
the end-to-end faults (SIGTERM to a running study, a lost server mid-study, storage turning
read-only) are in tests/test_faults.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scaling_study.cli import main
from scaling_study.lifecycle import LEFTOVERS, StudyBusy, StudyLock, alive, check_free, reap_if_free, start_time
from scaling_study.tracking import LocalMlflowServer, TrackingError, _free_port, check_server

from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _wait_for(predicate, what: str, timeout: float = 120.0):
    """Poll until `predicate()` is true (a wait for a process to get somewhere, not a timing check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _holder(folder: Path, *, own_children: bool = False) -> subprocess.Popen:
    """A process that takes the study lock as `run` and waits (with two children it records as its own
    leftovers: one in a session of its own, as the MLflow server is, one not, as Ray's processes)."""
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        from scaling_study.lifecycle import StudyLock
        lock = StudyLock({str(folder)!r}, "run").acquire()
        if {own_children}:
            a = subprocess.Popen(["sleep", "600"], start_new_session=True)
            b = subprocess.Popen(["sleep", "600"])
            lock.own([a.pid], "MLflow server")
            lock.own([b.pid], "local Ray", folder={str(folder / 'ray-tmp')!r})
        print("held", flush=True)
        time.sleep(600)
    """)
    (folder / "ray-tmp").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _small_spec(root: Path) -> Path:
    from test_hostile_input import spec_file

    return spec_file(root, storage={"root": str(root / "studies")})  # study "bad", its task folder and data


def test_a_second_driver_is_refused_naming_the_first(tmp_path, capsys):
    folder = tmp_path / "studies" / "bad"
    holder = _holder(folder)
    try:
        with pytest.raises(StudyBusy, match=f"being run by process {holder.pid} "):
            StudyLock(folder, "run").acquire()
        with pytest.raises(StudyBusy):
            check_free(folder)
        assert main(["run", str(_small_spec(tmp_path))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"being run by process {holder.pid} (scaling-study run" in err[0], err
        assert f"kill {holder.pid}" in err[0]
    finally:
        holder.kill()
        holder.wait()
    with StudyLock(folder, "run"):  # the OS released it with its holder
        pass


def test_what_a_killed_driver_leaves_is_reaped_by_the_next_status(tmp_path, capsys):
    """SIGKILL of a driver leaves its MLflow server (own session) and Ray's processes running; the next
    `status` (or run, or ui) ends them and deletes the local Ray's folder. A recorded pid whose start
    time differs (the pid reused by another process) is left alone."""
    import json

    folder = tmp_path / "studies" / "bad"
    holder = _holder(folder, own_children=True)
    record = json.loads((folder / LEFTOVERS).read_text())
    children = [p["pid"] for p in record["processes"]]
    stranger = subprocess.Popen(["sleep", "600"])
    record["processes"].append({"pid": stranger.pid, "start": start_time(stranger.pid) - 1, "what": "reused pid"})
    (folder / LEFTOVERS).write_text(json.dumps(record))
    assert reap_if_free(folder) == []  # its driver is alive: nothing is touched
    holder.kill()
    holder.wait()
    assert all(alive(pid, None) for pid in children)  # they outlive the driver
    try:
        assert main(["status", "bad", "--root", str(tmp_path / "studies")]) == 2  # no tracking store: exit 2
        err = capsys.readouterr().err
        assert "ended what a killed driver of this study left running: MLflow server" in err, err
        assert not any(alive(pid, None) for pid in children)
        assert stranger.poll() is None, "a process with a reused pid was killed"
        assert not (folder / "ray-tmp").exists() and not (folder / LEFTOVERS).exists()
    finally:
        stranger.kill()
        for pid in children:
            if alive(pid, None):
                os.kill(pid, signal.SIGKILL)


def _mlflow_store(folder: Path) -> Path:
    """A real, empty MLflow store at `folder/mlflow.db` (a server started once over it)."""
    with LocalMlflowServer(folder):
        pass
    return folder / "mlflow.db"


def _ui(root: Path, name: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "scaling_study.cli", "ui", name, "--root", str(root), "--port",
                             str(_free_port("127.0.0.1"))], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line.startswith(f"MLflow UI for {name}: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
    return proc, line


@pytest.mark.slow  # three MLflow servers start
def test_ui_beside_a_live_server_attaches_and_sigterm_stops_its_child(tmp_path):
    """A first `ui` serves the store; a second attaches to that server (it never ends a live one), and
    so does an in-process start, refused; SIGTERM to the first `ui` ends its MLflow server too and
    exits 143 with one line."""
    root = tmp_path / "studies"
    _mlflow_store(root / "s" / "mlflow")
    first, line = _ui(root, "s")
    try:
        uri = line.split(": ", 1)[1].split()[0]
        server_pid = int((root / "s" / "mlflow" / "server.pid").read_text().split()[0])
        second, attached = _ui(root, "s")
        assert uri in attached and f"the server of process {first.pid}" in attached, attached
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 143
        check_server(uri)  # the first one's server still answers
        with pytest.raises(TrackingError, match=f"a live MLflow server \\(pid {server_pid}, owned by process "
                                                f"{first.pid}\\) already serves"):
            LocalMlflowServer(root / "s" / "mlflow").start()
        check_server(uri)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 143
        err = first.stderr.read()
        assert err.strip() == "scaling-study: stopped by SIGTERM", err
        assert not alive(server_pid, None)
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow  # three MLflow server starts
def test_the_watchdog_restarts_a_killed_server_on_the_same_port_or_reports_it_lost(tmp_path, capfd):
    lost: list[str] = []
    with LocalMlflowServer(tmp_path / "mlflow") as server:
        server.watch(on_lost=lost.append, every=0.2)
        uri, first = server.uri, server.process.pid
        os.killpg(first, signal.SIGKILL)
        _wait_for(lambda: server.restarts == 1 and server.process.pid != first and _answers(uri), "a restart")
        assert "the local MLflow server exited with code -9; restarting it on the same store" in capfd.readouterr().err
        (tmp_path / "mlflow" / "mlflow.db").write_bytes(b"garbage" * 100)  # now it cannot come back
        os.killpg(server.process.pid, signal.SIGKILL)
        _wait_for(lambda: lost, "the loss to be reported")
    assert "could not be restarted: local MLflow server exited with code" in lost[0], lost


def _answers(uri: str) -> bool:
    try:
        check_server(uri, timeout=2)
        return True
    except TrackingError:
        return False


def test_a_finished_run_never_flips_to_failed(tmp_path):
    """A node redone because its files were damaged, failing this time: its earlier FINISHED run keeps
    its status and results (records.Recorder.mark_failed)."""
    from scaling_study.records import Recorder
    from scaling_study.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "flip")
    done = tracker.run_for("ft-done", kind="finetune", name="done")
    tracker.client.set_terminated(done, "FINISHED")
    fresh = tracker.run_for("ft-fresh", kind="finetune", name="fresh")
    tracker.load_runs()  # as a driver sees them when it starts
    recorder = Recorder(tracker, None, None, None)
    recorder.mark_failed("ft-done")
    recorder.mark_failed("ft-fresh")
    assert tracker.client.get_run(done).info.status == "FINISHED"
    assert tracker.client.get_run(fresh).info.status == "FAILED"
