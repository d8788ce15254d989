"""`scaling-study plan` and friends on every experiments/ YAML, through the real console script."""

import json
import os
import re
import subprocess
import sys

import pytest

from scaling_study.cli import main

from conftest import EXPERIMENTS, REPO, SHARED, needs_mirror


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
@pytest.mark.parametrize("device", ["h100", "a100", "cpu"])
def test_plan_every_experiment(path, device, capsys):
    assert main(["plan", str(path), "--device", device]) == 0
    out = capsys.readouterr().out
    assert "finetune jobs" in out and f"{device}-hours" in out and "Assumed:" in out
    if int(re.search(r"(\d+) corpus builds, ", out).group(1)):
        assert "Corpus builds (CPU-hours; one scan" in out and "corpus builds " in out.split("Totals")[1]
        assert f"{os.cpu_count()} CPUs (this machine's" in out


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_plan_json(path, capsys):
    assert main(["plan", str(path), "--format", "json", "--nodes"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["finetune"] == len([n for n in report["nodes"] if n["kind"] == "finetune"]) > 0
    assert report["totals"]["device_hours"] > 0
    assert {"assumed_mfu", "peak_flops", "throughput_flops"} <= set(report["device"])
    for run in report["pretrain_runs"]:
        assert run["parameters"] > 0 and run["flops"] > 0
    builds = report["corpus_builds"]
    assert [b["id"] for b in builds] == [n["id"] for n in report["nodes"] if n["kind"] == "corpus"]
    assert report["totals"]["corpus_cpu_hours"] == pytest.approx(sum(b["cpu_hours"] for b in builds))


def test_plan_cpus_divide_the_corpus_builds_wall_time(capsys):
    """--cpus N: the same CPU-hours, the scan and the packs spread over N CPUs (costs' model)."""
    spec = str(REPO / "experiments" / "scholarbert.yaml")
    walls = {}
    for cpus in (16, 256):
        assert main(["plan", spec, "--format", "json", "--cpus", str(cpus)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["cpu"]["cpus"], report["cpu"]["cpus_source"]) == (cpus, "--cpus")
        walls[cpus] = report["totals"]["corpus_wall_hours"]
        train = max(b["train_cpu_hours"] for b in report["corpus_builds"])
        # the volumes' tokenizers are trained in turn, one core each
        assert walls[cpus] == pytest.approx((report["totals"]["corpus_cpu_hours"] - 3 * train) / cpus + 3 * train)
    assert walls[256] < walls[16]
    assert main(["plan", spec, "--cpus", "256"]) == 0
    out = capsys.readouterr().out
    assert "wall on 256 CPUs" in out and "Corpus builds: 256 CPUs (--cpus)" in out and "Measured: benchmarks" in out


@pytest.mark.slow
def test_plan_reads_a_ray_clusters_cpus(ray_head, capsys):
    """--address: the CPUs of a real Ray head (`ray start --head`), connected to and left again."""
    import ray

    spec = str(REPO / "experiments" / "smoke.yaml")
    with ray_head.in_this_process():
        assert main(["plan", spec, "--format", "json", "--address", ray_head.address]) == 0
        assert not ray.is_initialized()
    report = json.loads(capsys.readouterr().out)
    assert report["cpu"] == {**report["cpu"], "cpus": ray_head.num_cpus,
                             "cpus_source": f"the Ray cluster at {ray_head.address}, now"}


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


def _verbs(parser):
    """(name, parser) of every verb, `tasks list|show|check` included."""
    import argparse

    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield f"{prefix}{name}", child
                    yield from walk(child, f"{prefix}{name} ")

    return list(walk(parser, ""))


def test_every_verb_has_a_description_examples_and_help_for_every_option(capsys):
    import argparse

    from scaling_study.cli import build_parser

    verbs = dict(_verbs(build_parser()))
    assert {"plan", "run", "results", "report", "status", "submit", "ui", "validate", "tasks", "tasks list",
            "tasks show", "tasks check", "spec-reference", "presets"} <= set(verbs)
    for name, parser in verbs.items():
        with pytest.raises(SystemExit) as done:
            main([*name.split(), "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert parser.description and parser.description.split()[0] in text, name
        assert "examples:\n  scaling-study " + name.split()[0] in text, name
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


def test_tasks_actions_are_sub_commands_with_their_own_options(capsys):
    with pytest.raises(SystemExit):
        main(["tasks", "list", "--help"])
    out = capsys.readouterr().out
    assert "usage: scaling-study tasks list" in out and "--data-dir" not in out
    with pytest.raises(SystemExit) as done:
        main(["tasks", "list", "--data-dir", "x"])  # belongs to check only
    assert done.value.code == 2 and "unrecognized arguments: --data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tasks", "check", "--help"])
    assert "--data-dir" in capsys.readouterr().out


@needs_mirror("datasets")
def test_tasks_as_json(capsys):
    assert main(["tasks", "list", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "scierc_re" in {t["id"] for t in listed["tasks"]} and "scierc_re" in listed["suites"]["paper12"]
    assert main(["tasks", "show", "bc5cdr_ner", "scierc_re", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in shown] == ["bc5cdr_ner", "scierc_re"] and shown[0]["metric"] == "entity_f1"
    assert set(shown[1]["splits"]) == {"train", "dev", "test"} and shown[1]["folder"]
    code = main(["tasks", "check", "scierc_re", "--offline", "--data-dir", str(SHARED / "datasets"),
                 "--format", "json"])
    checked = json.loads(capsys.readouterr().out)
    assert code == 0 and checked["tasks"][0]["loaded"] and checked["tasks"][0]["splits"]["train"]["examples"] > 0
