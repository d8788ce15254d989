"""`scaling-study plan` and friends on every experiments/ YAML, through the real console script."""

import json
import os
import subprocess
import sys

import pytest

from scaling_study.cli import main

from conftest import EXPERIMENTS, REPO


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
@pytest.mark.parametrize("device", ["h100", "a100", "cpu"])
def test_plan_every_experiment(path, device, capsys):
    assert main(["plan", str(path), "--device", device]) == 0
    out = capsys.readouterr().out
    assert "finetune jobs" in out and f"{device}-hours" in out and "Assumed:" in out


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_plan_json(path, capsys):
    assert main(["plan", str(path), "--format", "json", "--nodes"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["finetune"] == len([n for n in report["nodes"] if n["kind"] == "finetune"]) > 0
    assert report["totals"]["device_hours"] > 0
    assert {"assumed_mfu", "peak_flops", "throughput_flops"} <= set(report["device"])
    for run in report["pretrain_runs"]:
        assert run["parameters"] > 0 and run["flops"] > 0


def test_console_script_exit_codes(tmp_path):
    """The installed entry point: 0 on a good spec, 2 and one line on a bad one."""
    exe = [sys.executable, "-m", "scaling_study.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(exe + ["plan", str(EXPERIMENTS[0])], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfinetune: {epochs: [2, 1]}\ntasks: {include: [scierc_re]}\n")
    res = subprocess.run(exe + ["plan", str(bad)], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "finetune.epochs: levels must be strictly increasing" in res.stderr


def test_unknown_device(capsys):
    assert main(["plan", str(EXPERIMENTS[0]), "--device", "tpu"]) == 2
    assert "allowed: h100" in capsys.readouterr().err


def test_tasks_and_presets(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert "suite paper12:" in out and "scierc_re" in out
    assert main(["tasks", "show", "bc5cdr_ner"]) == 0
    assert "entity_f1" in capsys.readouterr().out
    assert main(["tasks", "show", "nope"]) == 2
    assert main(["presets", "--vocab-size", "50000"]) == 0
    assert "355M" in capsys.readouterr().out  # ScholarBERT (large, 50k vocab): 355,139,408
