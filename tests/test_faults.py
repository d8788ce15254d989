"""Faults a study survives: a killed pretraining worker, a checkpoint write cut short (full disk,
kill), an MLflow server down at start or lost mid-study. The killed driver is
tests/test_orchestration.py::test_killed_driver_then_rerun_completes.

Faults are real (a SIGKILL, a dead server process, an OSError raised where the disk would raise
it); `scaling_study.faults` only picks the moment, keyed by $SCALING_STUDY_FAULT. docs/reliability.md
lists every fault with what happens and the test here that proves it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from scaling_study import faults
from scaling_study.artifacts import STATE_FILE, checkpoint_dir, latest_checkpoint
from scaling_study.pretrain import (
    JsonlLogger,
    MemoryLogger,
    train_mlm,
    train_mlm_ray,
)

from conftest import REPO, needs_mirror
from test_pretrain import _config, _restore_threads, synthetic  # noqa: F401 (fixtures, shared)


def _fault(monkeypatch, tmp_path: Path, spec: str) -> Path:
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv(faults.ENV, spec)
    monkeypatch.setenv(faults.ENV_ONCE, str(marker))
    return marker


CHECKPOINTED = dict(total_steps=10, checkpoint_steps=(5, 10))
"""The checkpoint-write tests: a level checkpoint at 5 and a fault while writing the one at 10."""


@pytest.fixture(scope="module")
def uninterrupted(synthetic, tmp_path_factory) -> dict:
    return train_mlm(_config(**CHECKPOINTED), synthetic, tmp_path_factory.mktemp("straight"))


def _losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows}


# ----------------------------------------------------------------------------------- the fault points


def test_several_faults_each_strike_once_and_a_stall_returns(tmp_path, monkeypatch):
    """`a=2:enospc;b:stall=0.01`: each fault at its own point and value, once (its own marker);
    the cluster test (tests/test_cluster_sim.py) holds workers with a stall while it removes their node."""
    marker = _fault(monkeypatch, tmp_path, "a=2:enospc;b:stall=0.01")
    faults.point("a", 1)  # another value: nothing
    with pytest.raises(OSError, match="injected at a=2"):
        faults.point("a", 2)
    faults.point("a", 2)  # struck once already
    faults.point("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{marker.name}-a", f"{marker.name}-b"]
    monkeypatch.setenv(faults.ENV, "a:explode")
    with pytest.raises(ValueError, match="unknown action 'explode'; allowed: kill, enospc, kill-pid=PATH, stall"):
        faults.point("a")


# ----------------------------------------------------------------------------------- pretraining worker


@pytest.mark.slow
def test_killed_pretraining_worker_restarts_from_its_last_checkpoint(synthetic, tmp_path, monkeypatch):
    """SIGKILL of the only pretraining worker after step 8; resume checkpoints every 5 steps.

    A one-worker run is one Ray task under Ray Train's local mode (no worker group, so no `ray/`
    run folder); Ray runs the task again (max_retries=1, what FailureConfig(max_failures=1) gives
    a group); the train function resumes from our own checkpoint folder (`resume=True`: step 5,
    with optimizer, RNG and data position), not from a Ray-registered checkpoint (we report none).
    The worker-group restart of 2 workers is tests/test_cluster_sim.py's. Tolerance 1e-6
    on every loss from the resume point to the end, as for an in-process resume: fp32 on CPU with
    the same thread count repeats the same operations in the same order, so the curves agree
    exactly in practice; 1e-6 leaves room for nothing but float printing.
    """
    from scaling_study.raycluster import ray_cluster

    config = _config(total_steps=16, checkpoint_steps=(16,), checkpoint_every=5)
    straight = MemoryLogger()
    expected = train_mlm(config, synthetic, tmp_path / "straight", logger=straight)

    marker = _fault(monkeypatch, tmp_path, "pretrain-step=8:kill")
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    with ray_cluster(None):  # the study's local Ray; the workers inherit the fault from this environment
        final = train_mlm_ray(config, synthetic, tmp_path / "killed", num_workers=1, max_failures=1,
                              logger_factory=functools.partial(JsonlLogger, log.path))
    assert marker.exists(), "the worker was never killed"
    rows = log.read()
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, 8)) + list(range(6, 17)), steps  # died after step 8 (before logging it)
    want = _losses(straight.history)
    assert max(abs(r["loss"] - want[r["step"]]) for r in rows) <= 1e-6
    assert final["step"] == 16 and abs(final["loss"] - expected["loss"]) <= 1e-6
    assert not (tmp_path / "killed" / "ray").exists(), "a one-worker run started a Ray Train worker group"


def test_an_error_in_a_one_worker_run_is_retried_from_its_checkpoint(synthetic, uninterrupted, tmp_path, monkeypatch):
    """An error raised in a one-worker run (ENOSPC writing step 10's checkpoint, once) is retried as
    a worker group's would be (`retry_exceptions`): the second attempt resumes from step 5 and ends
    at the uninterrupted loss. With no retries left the error itself reaches the caller."""
    from scaling_study.raycluster import ray_cluster

    config = _config(**CHECKPOINTED)
    marker = _fault(monkeypatch, tmp_path, "checkpoint-write=10:enospc")
    with ray_cluster(None):  # its workers inherit the fault from this environment
        final = train_mlm_ray(config, synthetic, tmp_path / "retried", num_workers=1, max_failures=1)
    assert marker.exists(), "the fault never struck"
    assert final["step"] == 10 and abs(final["loss"] - uninterrupted["loss"]) <= 1e-6
    monkeypatch.delenv(faults.ENV_ONCE)  # from now on it strikes every time
    with ray_cluster(None), pytest.raises(OSError, match="No space left on"):
        train_mlm_ray(config, synthetic, tmp_path / "failed", num_workers=1, max_failures=1)


# ----------------------------------------------------------------------------------- checkpoint writes


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(synthetic, uninterrupted, tmp_path, monkeypatch):
    """ENOSPC while step 10's (the last) checkpoint is written: the run fails with the OSError, step 5 stays
    the latest complete checkpoint, nothing of step 10 is left, and a resume finishes the run."""
    from transformers import AutoModelForMaskedLM

    config = _config(**CHECKPOINTED)
    out = tmp_path / "run"
    _fault(monkeypatch, tmp_path, "checkpoint-write=10:enospc")
    with pytest.raises(OSError, match="No space left on") as info:
        train_mlm(config, synthetic, out)
    assert info.value.errno == 28
    assert latest_checkpoint(out) == checkpoint_dir(out, 5)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005"]  # temp folder removed
    AutoModelForMaskedLM.from_pretrained(checkpoint_dir(out, 5))
    assert torch.load(checkpoint_dir(out, 5) / STATE_FILE, weights_only=True)["step"] == 5

    monkeypatch.delenv(faults.ENV)  # the disk has room again
    final = train_mlm(config, synthetic, out)
    assert final["step"] == 10 and abs(final["loss"] - uninterrupted["loss"]) <= 1e-6


def test_killed_checkpoint_write_leaves_the_previous_checkpoint_valid(synthetic, uninterrupted, tmp_path):
    """SIGKILL of the training process half-way through writing step 10's checkpoint (weights
    written, trainer state not yet). The half checkpoint is not taken as done (no step-10 folder,
    `latest_checkpoint` is step 5); the next start removes it and resumes from step 5."""
    from transformers import AutoModelForMaskedLM

    config = _config(**CHECKPOINTED)
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_pretrain import _config, _restore_threads, synthetic  # noqa: F401 (fixtures, shared)
        from scaling_study.pretrain import train_mlm
        train_mlm(_config(total_steps=10, checkpoint_steps=(5, 10)), {str(synthetic)!r}, {str(out)!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), faults.ENV: "checkpoint-write=10:kill"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[0].startswith(".tmp-step-00000010-") and names[1:] == ["step-00000005"], names
    half = out / "checkpoints" / names[0]
    assert (half / "config.json").is_file() and not (half / STATE_FILE).exists()  # really half written
    assert latest_checkpoint(out) == checkpoint_dir(out, 5)
    AutoModelForMaskedLM.from_pretrained(checkpoint_dir(out, 5))
    # artifacts.node_done asks storage the same question: a checkpoint is done iff its state file is there
    assert (checkpoint_dir(out, 5) / STATE_FILE).is_file() and not checkpoint_dir(out, 10).exists()

    final = train_mlm(config, synthetic, out)
    assert not half.exists()
    assert final["step"] == 10 and abs(final["loss"] - uninterrupted["loss"]) <= 1e-6


# ----------------------------------------------------------------------------------- corpus build


@pytest.mark.slow
@needs_mirror("datasets")
def test_a_killed_corpus_build_is_rerun_by_ray_and_resumes(tmp_path, monkeypatch):
    """The corpus build's Ray worker is SIGKILLed once its tokenizer is trained and saved; Ray runs
    the task again on the same node, which takes over the dead attempt's folder (no scan, no
    training again) and writes the same build as one never killed; the study then finishes."""
    import dataclasses

    from scaling_study.artifacts import Layout, read_manifest
    from scaling_study.corpus import build_corpus
    from scaling_study.grid import expand
    from scaling_study.orchestration import run_study
    from scaling_study.spec import load_spec

    study = load_spec(_small_study(tmp_path, "corpus-kill"))
    plan = expand(study)
    node = plan.of_kind("corpus")[0]
    marker = _fault(monkeypatch, tmp_path, "corpus-checkpoint=0:kill")
    summary = run_study(study, progress=False)
    assert marker.exists(), "the corpus build was never killed"
    assert summary.ok, summary.failures
    built = Layout.of(study).node(plan, node)
    manifest = read_manifest(built)
    assert manifest.stage_seconds["resumed after"] > 0  # the second attempt took the first one's folder over

    monkeypatch.delenv(faults.ENV)
    build_corpus(study, node, tmp_path / "clean" / node.id, progress=False)
    clean = read_manifest(tmp_path / "clean" / node.id)  # as written: with its file list
    assert clean.files and manifest.files == clean.files
    same = {"created", "build_seconds", "stage_seconds"}
    assert {k: v for k, v in dataclasses.asdict(manifest).items() if k not in same} == \
        {k: v for k, v in dataclasses.asdict(clean).items() if k not in same}
    for shard in clean.shards:
        assert (built / shard["file"]).read_bytes() == (tmp_path / "clean" / node.id / shard["file"]).read_bytes()


# ----------------------------------------------------------------------------------- tracking server


def _small_study(folder: Path, name: str, **tracking) -> Path:
    """The micro study of test_orchestration cut to one cell: corpus, pretraining, one finetune run."""
    from test_orchestration import micro_spec

    path = micro_spec(folder, name=name, **({"tracking": tracking} if tracking else {}))
    spec = yaml.safe_load(path.read_text())
    spec["pretrain"]["steps"] = [10]
    spec["finetune"]["epochs"] = [1]
    spec["tasks"]["include"] = ["scierc_re"]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@needs_mirror("corpus")
def test_tracking_server_down_at_start_is_one_line_exit_2_before_any_compute(tmp_path):
    from scaling_study.artifacts import Layout
    from scaling_study.spec import load_spec
    from scaling_study.tracking import _free_port

    port = _free_port("127.0.0.1")  # nothing listens there
    path = _small_study(tmp_path, "down", uri=f"http://alice:hunter2@127.0.0.1:{port}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "scaling_study.cli", "run", str(path), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scaling-study: error: MLflow tracking server at "), lines
    assert f"http://alice:***@127.0.0.1:{port} is not reachable" in lines[0]
    assert "hunter2" not in res.stderr + res.stdout
    root = Layout.of(load_spec(path)).root
    assert not root.exists() or not any(root.iterdir())  # no corpus, no pretraining, no logs


@pytest.mark.slow
@needs_mirror("datasets")
def test_tracking_lost_mid_study_fails_the_node_and_a_rerun_completes(tmp_path, monkeypatch):
    """The MLflow server is killed (SIGKILL of its process group) just before the finetune run logs
    its results. That run fails with a one-line reason and writes no DONE.json; corpus and
    pretraining, finished before, stay done. A re-run with the server back trains only the
    finetune run and ends with exactly one FINISHED MLflow run per node, each cell with its score."""
    from scaling_study.grid import expand
    from scaling_study.artifacts import DONE_FILE, Layout
    from scaling_study.orchestration import run_study
    from scaling_study.spec import load_spec

    from test_orchestration import mlflow_runs

    study = load_spec(_small_study(tmp_path, "lost"))
    plan = expand(study)
    layout = Layout.of(study)
    # MLflow's client retries a dead server for about 4 minutes by default; this test wants the outcome
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    marker = _fault(monkeypatch, tmp_path, f"finetune-log:kill-pid={layout.mlflow / 'server.pid'}")

    first = run_study(study, progress=False)
    assert marker.exists(), "the tracking server was never killed"
    assert not first.ok
    cells = {c.id for c in plan.of_kind("finetune")}
    failed = {f.node: f.reason for f in first.failures if f.kind == "finetune"}
    assert set(failed) == cells
    for reason in failed.values():
        assert "MLflow tracking server at http://127.0.0.1:" in reason and "failed mid-study" in reason, reason
    assert not list(layout.root.rglob(DONE_FILE))
    assert first.counts["corpus"]["done"] == 1 and first.counts["pretrain"]["done"] == 1

    monkeypatch.delenv(faults.ENV)
    second = run_study(study, progress=False)
    assert second.ok, second.failures
    assert second.trained == 1  # the finetune run; corpus and pretraining came from storage
    runs = mlflow_runs(study)
    per_node = Counter(r.data.tags["node_id"] for r in runs)
    wanted = {n.id for n in plan.nodes.values() if n.kind in ("corpus", "pretrain", "finetune")}
    assert set(per_node) == wanted | {f"study-{study.spec.name}"} and max(per_node.values()) == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all("test_f1" in r.data.metrics for r in runs if r.data.tags["node_id"] in cells)


# ----------------------------------------------------------------------------------- a real full disk


@contextlib.contextmanager
def small_disk(path: Path, size: int):
    """A tmpfs of `size` bytes mounted at `path` (needs root and mount rights: CI's container has them)."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): needs root and mount rights")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_a_real_full_disk_during_a_checkpoint_says_where_and_keeps_the_previous_one(synthetic, uninterrupted,
                                                                                    tmp_path):
    """Pretraining on a tmpfs with room for one checkpoint and not two. torch, writing the trainer state
    on a full disk, raises `RuntimeError: unexpected pos` (the injected-ENOSPC test above never saw
    that): the run says "No space left on <the folder>" with the size a checkpoint needs; step 5 stays
    the latest checkpoint and loads; with room again (remounted larger) the run resumes to the
    uninterrupted final loss."""
    from transformers import AutoModelForMaskedLM

    config = _config(**CHECKPOINTED)
    train_mlm(_config(total_steps=5, checkpoint_steps=(5,)), synthetic, tmp_path / "probe")
    size = _folder_bytes(checkpoint_dir(tmp_path / "probe", 5))
    with small_disk(tmp_path / "disk", size + size // 2) as disk:
        out = disk / "run"
        with pytest.raises(OSError) as info:
            train_mlm(config, synthetic, out)
        assert info.value.errno == errno.ENOSPC
        message = str(info.value)
        assert f"No space left on {out / 'checkpoints'}: it needs about " in message, message
        assert latest_checkpoint(out) == checkpoint_dir(out, 5)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005"]  # the half one is gone
        AutoModelForMaskedLM.from_pretrained(checkpoint_dir(out, 5))
        subprocess.run(["mount", "-o", f"remount,size={4 * size}", str(disk)], check=True)
        final = train_mlm(config, synthetic, out)
        assert final["step"] == 10 and abs(final["loss"] - uninterrupted["loss"]) <= 1e-6


# ----------------------------------------------------------------------------------- damaged files


def test_a_damaged_checkpoint_is_not_resumed_from_and_is_written_again(synthetic, uninterrupted, tmp_path):
    """model.safetensors of the step-5 level cut to half: that checkpoint no longer counts (its files.json
    has the size), the run starts again before it (here: from scratch), writes step 5 and 10 anew,
    and ends with the uninterrupted loss."""
    from scaling_study.artifacts import FILES_FILE, checkpoint_problem
    from scaling_study.storage import Store

    config = _config(**CHECKPOINTED)
    out = tmp_path / "run"
    train_mlm(config, synthetic, out)
    weights = checkpoint_dir(out, 5) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert checkpoint_problem(Store(out), "checkpoints/step-00000005") == (
        f"model.safetensors has {size // 2:,} bytes, its marker says {size:,}")
    assert latest_checkpoint(out) == checkpoint_dir(out, 10)  # without the levels: the intact latest
    assert latest_checkpoint(out, config.checkpoint_steps) is None  # level 5 must be written again
    final = train_mlm(config, synthetic, out)
    assert weights.stat().st_size == size and checkpoint_problem(Store(out), "checkpoints/step-00000005") is None
    assert final["step"] == 10 and abs(final["loss"] - uninterrupted["loss"]) <= 1e-6
    assert "sha256" in json.loads((checkpoint_dir(out, 5) / FILES_FILE).read_text())["files"]["config.json"]


def _study_layout(tmp_path):
    from conftest import BASE_SPEC
    from scaling_study.artifacts import Layout
    from scaling_study.grid import expand
    from scaling_study.spec import spec_from_data

    study = spec_from_data({**BASE_SPEC, "storage": {"root": str(tmp_path / "studies")}})
    return Layout.of(study), expand(study)


def test_markers_certify_their_files(tmp_path):
    """A finetune run's DONE.json and a corpus build's manifest list their folders' files: a file cut
    short, a shard gone, a checksum that differs or a marker that is not JSON make the node not done,
    and `done_nodes` says why."""
    from scaling_study.artifacts import DONE_FILE, Manifest, done_nodes, node_done, write_done
    from scaling_study.storage import Store

    layout, plan = _study_layout(tmp_path)
    run = plan.of_kind("finetune_run")[0]
    folder = layout.node(plan, run)
    (folder / "epochs_1").mkdir(parents=True)
    (folder / "epochs_1" / "scores.json").write_text('{"f1": 0.5}')
    write_done(Store(folder), cells={"1": "r1"}, results=[{"epochs": 1}], seconds=1.0)
    assert node_done(layout, plan, run)
    (folder / "epochs_1" / "scores.json").write_text('{"f1": 0.9}')  # same size, other bytes
    damaged: dict = {}
    assert run.id not in done_nodes(layout, plan, damaged)
    assert damaged == {run.id: "epochs_1/scores.json differs from its marker's checksum"}
    (folder / DONE_FILE).write_text('{"cells": {"1": "r1"}, "res')  # cut short
    assert not node_done(layout, plan, run) and done_nodes(layout, plan, damaged) is not None
    assert damaged[run.id] == "its DONE.json is unreadable"

    corpus = plan.of_kind("corpus")[0]
    build = layout.node(plan, corpus)
    (build / "shards").mkdir(parents=True)
    (build / "tokenizer").mkdir()
    (build / "shards" / "shard-00000.parquet").write_bytes(b"x" * 1000)
    (build / "tokenizer" / "tokenizer.json").write_text("{}")
    Manifest(node_id=corpus.id, inputs={}, seq_len=8, vocab_size=10, special_tokens={}, tokenizer_hash="",
             corpus_documents=1, tokenizer_documents=1, documents=1, tokens=1, sequences=1, dropped_tokens=0,
             shards=[{"file": "shards/shard-00000.parquet", "sequences": 1}], input_files=[], build_seconds=0,
             created="").write(build)
    assert node_done(layout, plan, corpus)
    (build / "shards" / "shard-00000.parquet").write_bytes(b"x" * 10)
    damaged = {}
    assert corpus.id not in done_nodes(layout, plan, damaged)
    assert damaged[corpus.id] == "shards/shard-00000.parquet has 10 bytes, its marker says 1,000"


# ----------------------------------------------------------------------------------- the driver's own faults


class _Run:
    """`scaling-study run` in a process of its own, its output in files (a pipe nobody reads would fill
    and stop it)."""

    def __init__(self, path: Path, **env):
        self.out, self.err = path.with_suffix(".out"), path.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "scaling_study.cli", "run", str(path), "--quiet"],
                                         env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=out, stderr=err)

    def communicate(self, timeout: float) -> tuple[str, str]:
        self.proc.wait(timeout=timeout)
        return self.out.read_text(), self.err.read_text()

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()


def _cli_run(path: Path, **env) -> _Run:
    return _Run(path, **env)


def _wait_for(predicate, what: str, timeout: float = 600.0, run: _Run | None = None):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if run is not None and run.returncode is not None:
            raise AssertionError(f"the run ended ({run.returncode}) before {what}: {run.err.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@needs_mirror("datasets")
def test_a_lost_server_is_restarted_and_a_damaged_checkpoint_rebuilt(tmp_path):
    """The embedded MLflow server is SIGKILLed just before the finetune run logs (MLflow's client
    retrying as it does by default): the driver restarts it at once on the same store and port and
    the study finishes in the same invocation, exit 0, one FINISHED run per node. Then the
    checkpoint's weights are cut short: the next run says the checkpoint is damaged, pretrains it
    again, and leaves the finished finetune run (and its MLflow run) alone."""
    from scaling_study.artifacts import DONE_FILE, Layout
    from scaling_study.grid import expand
    from scaling_study.spec import load_spec

    from test_orchestration import mlflow_runs

    path = _small_study(tmp_path, "lost")
    study = load_spec(path)
    layout, plan = Layout.of(study), expand(study)
    marker = tmp_path / "fired"
    first = _cli_run(path, **{faults.ENV: f"finetune-log:kill-pid={layout.mlflow / 'server.pid'}",
                              faults.ENV_ONCE: str(marker)})
    out, err = first.communicate(timeout=1500)
    assert marker.exists(), "the tracking server was never killed"
    assert first.returncode == 0, (out[-2000:], err[-3000:])
    assert "the local MLflow server exited with code -9; restarting it on the same store" in err
    runs = mlflow_runs(study)
    wanted = {n.id for n in plan.nodes.values() if n.kind in ("corpus", "pretrain", "finetune")}
    assert Counter(r.data.tags["node_id"] for r in runs) == Counter(wanted | {f"study-{study.spec.name}"})
    assert all(r.info.status == "FINISHED" for r in runs)

    (ck,) = plan.of_kind("checkpoint")
    weights = layout.node(plan, ck) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 3)
    (run_node,) = plan.of_kind("finetune_run")
    done_mtime = (layout.node(plan, run_node) / DONE_FILE).stat().st_mtime_ns
    second = _cli_run(path)
    out, err = second.communicate(timeout=1500)
    assert second.returncode == 0, (out[-2000:], err[-3000:])
    assert f"checkpoint {ck.id} ({layout.rel(plan, ck)}) is damaged: model.safetensors has {size // 3:,} bytes, " \
           f"its marker says {size:,}; it is computed again" in err, err
    assert weights.stat().st_size == size
    assert (layout.node(plan, run_node) / DONE_FILE).stat().st_mtime_ns == done_mtime
    again = mlflow_runs(study)
    assert len(again) == len(runs) and all(r.info.status == "FINISHED" for r in again)


@pytest.mark.slow
@needs_mirror("corpus")
def test_sigterm_stops_a_running_study_cleanly(tmp_path):
    """SIGTERM to `scaling-study run` while Ray trains: exit 143, the summary and a STOPPED line, no
    traceback or Ray stack dump, and none of the processes it started (its MLflow server, the local
    Ray) left running; the study's lock is free for the next run."""
    import json

    from scaling_study.artifacts import Layout
    from scaling_study.lifecycle import LEFTOVERS, StudyLock, alive
    from scaling_study.spec import load_spec

    path = _small_study(tmp_path, "term")
    root = Layout.of(load_spec(path)).root
    proc = _cli_run(path)
    _wait_for(lambda: "local Ray" in ((root / LEFTOVERS).read_text() if (root / LEFTOVERS).exists() else ""),
              "the local Ray to start", run=proc)
    started = json.loads((root / LEFTOVERS).read_text())["processes"]
    proc.proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (out[-2000:], err[-3000:])
    assert "STOPPED: stopped by SIGTERM (exit 143)" in out and "finetune jobs 0/1" in out, out
    assert "Traceback" not in err and "*** SIGTERM" not in err and "Aborted" not in err, err[-3000:]
    assert not [p for p in started if alive(p["pid"], p["start"])]
    with StudyLock(root, "run"):
        pass


@pytest.mark.slow
@needs_mirror("corpus")
def test_storage_turning_read_only_stops_the_study_with_a_summary(tmp_path):
    """The storage root (a tmpfs) is remounted read-only while the study runs (tracking on a server
    elsewhere). The driver notices within seconds and stops: exit 1, the summary with a STOPPED line
    naming the folder, no traceback; before, nodes failed slowly for about 17 minutes and the driver
    ended in a traceback."""
    from scaling_study.tracking import LocalMlflowServer

    with small_disk(tmp_path / "disk", 512 << 20) as disk, LocalMlflowServer(tmp_path / "mlflow") as server:
        path = _small_study(tmp_path, "ro", uri=server.uri)
        spec = yaml.safe_load(path.read_text())
        spec["storage"]["root"] = str(disk / "studies")
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        proc = _cli_run(path)
        _wait_for(lambda: any((disk / "studies" / "ro" / "corpus").glob("*/manifest.json")), "the corpus build",
                  run=proc)

        def remounted() -> bool:  # busy while a file there is open for writing: try again
            return subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0

        _wait_for(remounted, "a read-only remount", timeout=120)
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=False)
    assert proc.returncode == 1, (out[-2000:], err[-3000:])
    assert f"STOPPED: storage {disk / 'studies' / 'ro'} is read-only" in out, out
    assert "Traceback" not in err, err[-3000:]
