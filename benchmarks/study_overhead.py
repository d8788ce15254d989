"""How much a study's wall time exceeds the compute of its nodes: orchestration overhead.

    .venv/bin/python benchmarks/study_overhead.py                 # a small study in a temp folder
    .venv/bin/python benchmarks/study_overhead.py --spec my.yaml  # any spec (its storage root is used)
    .venv/bin/python benchmarks/study_overhead.py --spec experiments/smoke.yaml --baseline ../main
        # before and after in one run: the same spec with another checkout's code first, then this one,
        # each in a fresh working folder and machine cache (a relative storage root lands there)

Runs the study with `run_study` (local Ray, embedded MLflow server) and prints its wall time over
the sum of its nodes' own compute times: the corpus builds (`build_seconds` in each manifest), the
pretraining loops (`train_seconds` of `train_mlm`, measured in the process that trains) and the
finetune runs (the whole `finetune()` call, data loading included, measured inside the Tune trial;
a trial runs several finetune runs of one model, and the first run of each task's includes loading
what that task's runs share).
Everything else counts as overhead: starting Ray and the MLflow server, Ray Train runs,
Tune scheduling, MLflow calls, and cores left idle. A build of several data volumes is one task
with a manifest per volume, each counted: on 2 cores and 2 volumes, about the build's use of the
machine. The phase table splits the wall time where the overhead lies: the start-up before the
first node, corpus and pretraining (Ray Train's start of each run), finetuning (what packed trials
cut), and the close. Since nodes run side by side on the machine's
cores, the ratio can be below 1; the script also prints the cores used and the ratio per core
(wall x cores / compute), which is 1.0 for a perfectly packed machine. Target on this 2-core
machine: wall / compute <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMALL = {
    "name": "overhead",
    "corpus": {"name": "sci", "paths": [str(REPO.parent / "shared" / "corpus" / "scitldr_abstracts.txt")],
               "vocab_size": 4000},
    "model_sizes": ["debug", "tiny"],
    "data_volumes": ["100%"],
    "pretrain": {"steps": [300, 600], "batch_size": 32, "seq_len": 128, "precision": "fp32", "lr": 1e-3,
                 "log_every": 50},
    "finetune": {"epochs": [1, 2], "seeds": [0], "lr": 5e-4, "batch_size": 32, "max_seq_len": 128,
                 "max_concurrent": 2},
    "tasks": {"include": ["bc5cdr_ner", "scierc_re", "paper_field_cls"], "max_train_examples": 600,
              "max_dev_examples": 200, "max_test_examples": 400,
              "data_dir": str(REPO.parent / "shared" / "datasets")},
}


def node_intervals(root: Path) -> dict[str, list[tuple[float, float]]]:
    """Per kind, each node's (start, end) in wall-clock seconds: it ends when its record is written
    (the file's mtime) and started its own compute seconds before that (the record is written
    right after the compute, or after the finetune run's logging: the interval shifts, not grows)."""
    out: dict[str, list[tuple[float, float]]] = {"corpus": [], "pretrain": [], "finetune": []}
    records = [("corpus", "corpus/*/manifest.json", "build_seconds"), ("pretrain", "pretrain/*/final.json",
               "train_seconds"), ("finetune", "finetune/*/DONE.json", "seconds")]
    for kind, pattern, key in records:
        for path in root.glob(pattern):
            end = path.stat().st_mtime
            out[kind].append((end - json.loads(path.read_text())[key], end))
    return out


def phases(spans: dict[str, list[tuple[float, float]]], began: float, ended: float, cores: int) -> list[tuple]:
    """Where the overhead is: (phase, wall, node compute in it, wall x cores / compute) for the
    start-up (until the first node computes), corpus and pretraining (until the first finetune
    run), finetuning (until the last node ends) and the close."""
    every = [span for kind in spans.values() for span in kind]
    first, first_ft = min(s for s, _ in every), min((s for s, _ in spans["finetune"]), default=None)
    last = max(e for _, e in every)
    bounds = [("start-up", began, first), ("corpus and pretraining", first, first_ft or last),
              ("finetuning", first_ft or last, last), ("close", last, ended)]
    rows = []
    for name, lo, hi in bounds:
        compute = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in every)
        rows.append((name, hi - lo, compute, (hi - lo) * cores / compute if compute else float("inf")))
    return rows


def before_and_after(baseline: Path, spec: str | None) -> int:
    """This script of `baseline`'s checkout, then of this one, each in a subprocess with its own code,
    working folder and machine cache; prints both and the change of the wall time and of the ratio
    per core. A spec inside this checkout is each checkout's own copy of it (experiments/smoke.yaml
    as each version of the code runs it)."""
    import re
    import subprocess

    ratios, walls = {}, {}
    for label, repo in (("before", baseline), ("after", REPO)):
        with tempfile.TemporaryDirectory(prefix=f"ss-{label}-", dir="/tmp") as tmp:
            env = {**os.environ, "PYTHONPATH": str(repo), "SCALING_STUDY_CACHE": str(Path(tmp) / "cache")}
            cmd = [sys.executable, str(repo / "benchmarks" / "study_overhead.py")]
            if spec:
                path = Path(spec).resolve()
                path = repo / path.relative_to(REPO) if path.is_relative_to(REPO) else path
                cmd += ["--spec", str(path)]
            started = time.perf_counter()
            done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
            print(f"--- {label}: {repo} ({time.perf_counter() - started:.0f} s, exit {done.returncode})")
            print(done.stdout.strip() or done.stderr.strip()[-2000:])
            found = re.search(r"wall x cores / compute:\s*([0-9.]+)", done.stdout)
            if done.returncode or not found:
                return 1
            ratios[label] = float(found.group(1))
            walls[label] = float(re.search(r"wall time:\s*([0-9.]+)", done.stdout).group(1))
    print(f"wall time: before {walls['before']:.1f} s, after {walls['after']:.1f} s "
          f"({walls['after'] / walls['before']:.3f}x)")
    print(f"wall x cores / compute: before {ratios['before']:.3f}, after {ratios['after']:.3f} (target <= 1.15)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=None, help="a study spec (default: a small built-in study)")
    parser.add_argument("--baseline", default=None, help="another checkout: measure its code first, then this one's")
    args = parser.parse_args()
    os.environ.setdefault("SCALING_STUDY_OFFLINE", "1")
    if args.baseline:
        return before_and_after(Path(args.baseline).resolve(), args.spec)

    from scaling_study.orchestration import Layout, run_study
    from scaling_study.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="ss-bench-") as tmp:
        if args.spec:
            path = Path(args.spec)
        else:
            path = Path(tmp) / "overhead.yaml"
            path.write_text(yaml.safe_dump({**SMALL, "storage": {"root": str(Path(tmp) / "studies")}}))
        study = load_spec(path)
        start, began = time.perf_counter(), time.time()
        summary = run_study(study, progress=False)
        wall, ended = time.perf_counter() - start, time.time()
        if not summary.ok:
            print("study failed:", *(f"{f.node}: {f.reason}" for f in summary.failures), sep="\n  ")
            return 1
        if summary.trained == 0:
            print("nothing was computed (a finished study): remove its storage folder to measure")
            return 1
        spans = node_intervals(Layout.of(study).root)
    parts = {kind: sum(e - s for s, e in kind_spans) for kind, kind_spans in spans.items()}
    compute = sum(parts.values())
    cores = os.cpu_count()
    print(f"study: {study.spec.name}, {summary.trained} nodes computed, {cores} cores; load average at the end "
          + "/".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min: the machine's other work shows here)")
    print(f"wall time:          {wall:8.1f} s")
    print("node compute:       " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + f"; total {compute:.1f} s")
    print(f"wall / compute:     {wall / compute:8.3f}   (target <= 1.15)")
    print(f"wall x cores / compute: {wall * cores / compute:6.3f}   (1.0 = every core busy with node compute)")
    print("by phase (wall, node compute in it, wall x cores / compute):")
    for name, span, inside, ratio in phases(spans, began, ended, cores):
        print(f"  {name:24s} {span:7.1f} s {inside:8.1f} s " + (f"{ratio:8.3f}" if inside else "  no node"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
