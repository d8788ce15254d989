"""The terminal during a run: the live table stays, what a user cannot act on goes to the study's log."""

import os
import subprocess
import sys
import textwrap

from conftest import REPO

NOISE = ["Configuration for experiment", "raylet: 6 PYTHON worker processes", "Token authentication is enabled",
         "tensorboard --logdir", "View detailed results here"]
SCRIPT = textwrap.dedent('''
    import logging, os, subprocess, sys, time
    from rich.table import Table
    from scaling_study.studystate import live_view, quiet_terminal

    class State:  # what live_view draws: a study's table of node counts
        def table(self):
            table = Table(title="LIVE-TABLE")
            table.add_column("nodes")
            table.add_row("finetune")
            return table

    logging.basicConfig()
    with quiet_terminal(sys.argv[1], enabled=sys.argv[2] == "1") as log:
        with live_view(State(), True):
            print("Configuration for experiment")                       # Python's stdout (Tune)
            print("raylet: 6 PYTHON worker processes", file=sys.stderr)  # Python's stderr
            os.write(2, b"Token authentication is enabled\\n")         # the file descriptor itself
            subprocess.run(["echo", "tensorboard --logdir"])            # a child process (raylet, GCS)
            logging.getLogger("ray.tune").warning("View detailed results here")
            time.sleep(1.5)
    print(f"summary; log {log}")
''')


def run(tmp_path, enabled: bool):
    log = tmp_path / "logs" / "driver.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if enabled else "0"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res, log


def test_quiet_terminal_keeps_the_live_table_and_logs_the_rest(tmp_path):
    res, log = run(tmp_path, True)
    assert "LIVE-TABLE" in res.stdout and f"summary; log {log}" in res.stdout
    for line in NOISE:
        assert line not in res.stdout + res.stderr, line
        assert line in log.read_text(), line


def test_without_a_terminal_everything_stays_on_it(tmp_path):
    res, log = run(tmp_path, False)
    assert "LIVE-TABLE" in res.stdout and "summary; log None" in res.stdout
    assert all(line in res.stdout + res.stderr for line in NOISE) and not log.exists()
