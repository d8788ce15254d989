"""Security properties: no outbound traffic, local servers on loopback only, no credentials in
logs or MLflow, study paths that cannot leave the storage root. docs/reliability.md lists them.
Ray token auth for the Jobs client is tested in tests/test_cluster.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from scaling_study.cli import main
from scaling_study.errors import UserError

from conftest import REPO, needs_mirror

SECRET = "TOPSECRET-7f3a"
LOOPBACK = ("127.", "::1", "::ffff:127.")


def _netns_available() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


# Records, in every Python process that starts with this folder on PYTHONPATH (the CLI, the MLflow
# server, every Ray worker), each attempt to resolve or reach a non-loopback address.
AUDIT_HOOK = '''
import ipaddress, json, os, sys

_LOG = os.environ.get("SS_NET_AUDIT")
_LOCAL_NAMES = {None, "", b"", "localhost", b"localhost"}


def _loopback(host):
    if host in _LOCAL_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _hook(event, args):
    try:
        if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            address = args[-1] if event != "socket.connect" else args[1]
            if not isinstance(address, tuple) or _loopback(address[0]):
                return
        elif event == "socket.getaddrinfo":
            if _loopback(args[0]):
                return
        elif event in ("socket.gethostbyname", "socket.gethostbyaddr"):
            if _loopback(args[0]):
                return
        else:
            return
        with open(_LOG, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[:2], "event": event,
                                "args": [repr(a) for a in (args[1:] if event == "socket.connect" else args[:2])]})
                    + "\\n")
    except Exception:
        pass


if _LOG:
    sys.addaudithook(_hook)
'''

# Inside the (network-less) namespace: an MLflow server whose URI carries a password, the study
# run through the CLI, a sampler of every listening socket of every process of ours, then a dump
# of what MLflow holds.
DRIVER = '''
import json, os, subprocess, sys, threading, time
import psutil, yaml
from mlflow.tracking import MlflowClient
from scaling_study.tracking import LocalMlflowServer

out = sys.argv[1]
listeners, names, stop = set(), {}, threading.Event()

def sample():
    # by pid: a Ray actor's process title changes with the task it runs, so a listener is judged by
    # every name its process had
    me = psutil.Process()
    while not stop.is_set():
        for p in [me] + me.children(recursive=True):
            try:
                names.setdefault(p.pid, set()).add(p.name())
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        listeners.add((p.pid, c.laddr.ip))
            except psutil.Error:
                pass
        time.sleep(0.5)

with LocalMlflowServer(os.path.join(out, "mlflow-server")) as server:
    uri = server.uri.replace("http://", "http://scaler:%s@")
    spec = yaml.safe_load(open(sys.argv[2]))
    spec["tracking"] = {"uri": uri}  # the password written literally in the spec
    yaml.safe_dump(spec, open(sys.argv[2], "w"))
    threading.Thread(target=sample, daemon=True).start()
    res = subprocess.run([sys.executable, "-m", "scaling_study.cli", "run", sys.argv[2], "--quiet"],
                         capture_output=True, text=True)
    stop.set()
    client = MlflowClient(server.uri)
    runs = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            runs.append({"params": run.data.params, "tags": run.data.tags, "experiment_tags": exp.tags})
json.dump({"rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr, "runs": runs,
           "listeners": [[sorted(names.get(pid, ())), ip] for pid, ip in sorted(listeners)]}, open(os.path.join(out, "report.json"), "w"))
''' % SECRET


@pytest.mark.slow
@needs_mirror("datasets")
def test_a_study_runs_without_network_listens_on_loopback_and_logs_no_credentials(tmp_path):
    """A one-cell study through the CLI, in a network namespace with only loopback (when
    `unshare -n` is allowed) and with every Python process recording non-loopback connects and
    name lookups. The tracking URI carries a password, written literally in the spec."""
    from test_faults import _small_study

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    (tmp_path / "driver.py").write_text(DRIVER)
    path = _small_study(tmp_path, "offline")
    audit = tmp_path / "net-audit.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}", "SS_NET_AUDIT": str(audit)}
    command = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path), str(path)]
    isolated = _netns_available()
    if isolated:
        command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rc"] == 0, report["stderr"][-3000:]

    attempts = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    # Known, not ours to switch off: Ray 2.60 starts its dashboard process even with
    # include_dashboard=False (loading only its usage-stats module), and that module probes the
    # cloud metadata endpoints before it checks whether usage stats are enabled
    # (ray/dashboard/modules/usage_stats/usage_stats_head.py, run()).
    probes = [a for a in attempts if a["argv"][0].endswith("ray/dashboard/dashboard.py")
              and any(m in " ".join(a["args"]) for m in ("169.254.169.254", "metadata.google.internal"))]
    assert [a for a in attempts if a not in probes] == [], attempts[:10]
    assert report["listeners"], "the sampler saw no listening socket at all"
    exposed = {(" / ".join(names), ip) for names, ip in report["listeners"] if not ip.startswith(LOOPBACK)}
    # Known: torch.distributed's TCPStore (the rendezvous store rank 0 of a Ray Train run opens)
    # listens on all interfaces whatever host it is given; torch 2.13 has no option to change it.
    # Its process is a Ray Train worker, whose title also names the task it runs at the moment
    # (e.g. ray::execute._shutdown_torch while the run closes).
    assert {(names, ip) for names, ip in exposed if "ray::RayTrainW" not in names} == set(), exposed

    assert "scaler:***@127.0.0.1" in report["stdout"]  # the summary's Tracking: line, redacted
    assert SECRET not in report["stdout"] + report["stderr"]
    assert report["runs"] and SECRET not in json.dumps(report["runs"])
    leaks = [p for folder in (tmp_path / "studies", tmp_path / "mlflow-server") for p in folder.rglob("*")
             if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []  # node logs, Tune's trial files, MLflow's database and artifacts (spec.yaml)
    print(f"network namespace: {isolated}; cloud metadata probes by Ray's dashboard: {len(probes)}; "
          f"listeners outside loopback: {sorted(exposed)}")


def test_local_ray_and_mlflow_listen_on_loopback_only(tmp_path):
    """The study's local Ray (GCS, raylet, workers, agents) and MLflow server: every listening
    socket of every process they start is on 127.0.0.1; the node advertises 127.0.0.1; no usage
    stats file is written; Ray Train's preemption watcher (raycluster.LOCAL_ENV) is off."""
    import psutil
    import ray

    from scaling_study.raycluster import ray_cluster
    from scaling_study.tracking import LocalMlflowServer

    with ray_cluster(None), LocalMlflowServer(tmp_path / "mlflow"):
        assert ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()) == "127.0.0.1"
        # and what a one-machine Ray needs not run is off in its processes, not in this one's environment
        watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
        assert ray.get(ray.remote(lambda: os.environ.get(watcher)).remote()) == "0"
        assert watcher not in os.environ
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        me = psutil.Process()
        listeners = set()
        for p in me.children(recursive=True) + [me]:
            try:
                listeners |= {(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                pass
        assert not list(session.rglob("usage_stats.json"))
    assert listeners
    exposed = [(name, ip) for name, ip in listeners if not ip.startswith(LOOPBACK)]
    assert exposed == [], exposed


def test_telemetry_and_usage_stats_are_off_without_any_setting(tmp_path):
    """A fresh interpreter with none of the opt-out variables set: importing the package is enough."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "RAY_USAGE_STATS_ENABLED", "HF_HUB_DISABLE_TELEMETRY")}
    env["PYTHONPATH"] = str(REPO)
    code = textwrap.dedent("""
        import scaling_study
        from mlflow.telemetry.utils import is_telemetry_disabled
        from ray._common.usage.usage_lib import usage_stats_enabled
        from huggingface_hub import constants
        print(is_telemetry_disabled(), usage_stats_enabled(), constants.HF_HUB_DISABLE_TELEMETRY)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["True", "False", "True"]


# ----------------------------------------------------------------------------------- credentials


def test_credentials_are_redacted_in_node_logs_and_failure_reasons(tmp_path):
    from scaling_study.workers import failure_reason, node_log
    from scaling_study.tracking import redact_uri

    message = f"API request to http://scaler:{SECRET}@10.1.2.3:5000/api/2.0 failed; see https://h/x?token={SECRET}"
    log = tmp_path / "logs" / "ft-1.log"
    with pytest.raises(RuntimeError), node_log(log):
        raise RuntimeError(message)
    assert SECRET not in log.read_text() and "scaler:***@10.1.2.3" in log.read_text()
    assert SECRET not in failure_reason(RuntimeError(message)) and "token=***" in failure_reason(RuntimeError(message))
    assert redact_uri(f"mlflow at 'http://a:{SECRET}@h:1' down") == "mlflow at 'http://a:***@h:1' down"


# ----------------------------------------------------------------------------------- paths


def _spec(tmp_path: Path, **changes) -> Path:
    spec = {"name": "safe", "corpus": {"name": "c", "paths": ["corpus.txt"], "vocab_size": 1000},
            "model_sizes": ["debug"], "data_volumes": ["100%"],
            "pretrain": {"steps": [10], "batch_size": 8, "seq_len": 64},
            "finetune": {"epochs": [1], "seeds": [0]}, "tasks": {"include": ["scierc_re"]},
            "storage": {"root": str(tmp_path / "studies")}}
    for key, value in changes.items():
        if isinstance(value, dict):
            spec[key] = {**spec.get(key, {}), **value}
        else:
            spec[key] = value
    (tmp_path / "corpus.txt").write_text("a line of text\n")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _task_folder(root: Path, folder: str, **changes) -> Path:
    task = yaml.safe_load((REPO / "scaling_study" / "tasks" / "scierc_re" / "task.yaml").read_text())
    task["id"] = folder
    task.update(changes)
    (root / folder).mkdir(parents=True)
    (root / folder / "task.yaml").write_text(yaml.safe_dump(task))
    return root


ESCAPES = {
    "name-dotdot": (dict(name="../../etc"), "name: not a valid name"),
    "name-absolute": (dict(name="/etc"), "name: not a valid name"),
    "name-slash": (dict(name="a/b"), "name: not a valid name"),
    "name-dotdot-inside": (dict(name="a..b"), "name: not a valid name"),
    "task-id-slash": (dict(tasks={"include": ["../scierc_re"]}),
                      "tasks.include[0]: unknown task or suite; got '../scierc_re'"),
    "task-id-absolute": (dict(tasks={"include": ["/etc/passwd"]}),
                         "tasks.include[0]: unknown task or suite; got '/etc/passwd'"),
    "experiment-name-is-no-path": (dict(name="ok", tracking={"experiment": "../../x"}), None),
}


@pytest.mark.parametrize("case", ESCAPES, ids=list(ESCAPES))
def test_names_from_specs_cannot_escape_the_storage_root(case, tmp_path, capsys):
    changes, expected = ESCAPES[case]
    path = _spec(tmp_path, **changes)
    if expected is None:  # the MLflow experiment name is never a path: validate accepts it, nothing more
        assert main(["validate", str(path)]) == 0
        return
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "studies").exists() and not (tmp_path.parent / "etc").exists()


@pytest.mark.parametrize("field, value, expected", [
    ("id", "../evil", "id: id differs from its folder"),
    ("splits", {"train": {"file": "../../../../etc/passwd"}, "dev": {"file": "dev.txt"}, "test": {"file": "t.txt"}},
     "splits.train.file: the file would lie outside the task's data folder"),
    ("splits", {"train": {"file": "/etc/passwd"}, "dev": {"file": "dev.txt"}, "test": {"file": "t.txt"}},
     "splits.train.file: the file would lie outside the task's data folder"),
], ids=["task-id", "split-file-dotdot", "split-file-absolute"])
def test_task_folders_cannot_point_outside_their_data_folder(field, value, expected, tmp_path, capsys):
    registry = _task_folder(tmp_path / "my_tasks", "evil", **{field: value})
    path = _spec(tmp_path, tasks={"include": ["evil"], "registry_paths": [str(registry)]})
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "studies").exists()


@pytest.mark.parametrize("where", ["study-folder", "node-folder"])
def test_links_out_of_the_storage_root_are_refused(where, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = _spec(tmp_path)
    root = tmp_path / "studies"
    root.mkdir()
    if where == "study-folder":
        (root / "safe").symlink_to(outside, target_is_directory=True)
    else:
        (root / "safe").mkdir()
        (root / "safe" / "finetune").symlink_to(outside, target_is_directory=True)
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "storage:" in err[0] and "outside the" in err[0], err
    assert not any(outside.iterdir())
    from scaling_study.artifacts import Layout
    from scaling_study.spec import load_spec

    with pytest.raises(UserError):
        Layout.of(load_spec(path))  # `results`, `status` and `ui` on the spec file refuse it too
