"""What resuming a killed corpus build saves: a clean build, then builds killed and resumed, in one run.

    .venv/bin/python benchmarks/corpus_resume.py                  # /work/shared/corpus, volumes 10% and 100%
    .venv/bin/python benchmarks/corpus_resume.py --corpus DIR --volumes 1% 10% 100% --kill-at 0 4

Every build runs in a fresh subprocess (its own local Ray): first a clean build of the volumes;
then, for each `--kill-at N`, a build SIGKILLed at the fault point `corpus-checkpoint=N` (0: once
the tokenizers are trained and saved; N: once a volume's Nth shard is closed and saved; default: 0
and half the largest volume's shards) followed by a build of the same folders, which resumes it.
Without resume the second build would cost a whole clean build; the table prints what it cost
instead, the ratio to the clean build, and checks that the resumed shards, tokenizers and file
lists are byte-identical to the clean build's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = os.environ.get("SCALING_STUDY_CORPUS_DIR", str(REPO.parent / "shared" / "corpus"))


def child(corpus: str, out: str, volumes: list[str], vocab_size: int) -> None:
    """Build `volumes` of `corpus` under `out` (a killed build there is resumed); print one JSON line."""
    sys.path.insert(0, str(REPO))
    from scaling_study.corpus import build_corpora
    from scaling_study.grid import expand
    from scaling_study.spec import spec_from_data

    spec = {"name": "bench", "corpus": {"name": "bench", "paths": [corpus], "vocab_size": vocab_size},
            "model_sizes": ["debug"], "data_volumes": volumes,
            "pretrain": {"steps": [1], "batch_size": 8, "seq_len": 128},
            "finetune": {"epochs": [1]}, "tasks": {"include": ["bc5cdr_ner"]}}
    study = spec_from_data(spec, str(Path(out) / "spec.yaml"))
    nodes = list(expand(study).of_kind("corpus"))
    start = time.perf_counter()
    manifests = build_corpora(study, nodes, [Path(out) / n.id for n in nodes], progress=False)
    print(json.dumps({"wall_s": time.perf_counter() - start, "nodes": [n.id for n in nodes],
                      "shards": [len(m.shards) for m in manifests],
                      "stage_seconds": [m.stage_seconds for m in manifests]}))


def build(args, out: Path, fault: str | None = None) -> tuple[int, float, dict | None]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("SCALING_STUDY_FAULT", None)
    if fault:
        env["SCALING_STUDY_FAULT"] = fault
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", args.corpus, str(out), str(args.vocab_size),
                           *args.volumes], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    last = proc.stdout.strip().splitlines()[-1:] if proc.returncode == 0 else []
    if proc.returncode not in (0, -9):
        sys.exit(f"corpus_resume: a build failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.returncode, wall, json.loads(last[0]) if last else None


def contents(folder: Path) -> dict[str, bytes]:
    """Every file of a finished build but its manifest's timing fields (the manifest's file list kept)."""
    found = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = json.loads(found.pop("manifest.json"))
    for key in ("created", "build_seconds", "stage_seconds"):
        manifest.pop(key)
    return found | {"manifest": json.dumps(manifest, sort_keys=True).encode()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[5:], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--volumes", nargs="+", default=["10%", "100%"])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--kill-at", type=int, nargs="*", help="fault points (default: 0 and half the shards)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="resume-", dir="/tmp"))
    try:
        _, clean_wall, clean = build(args, work / "clean")
        print(f"clean build: {clean_wall:.1f} s, shards per volume {clean['shards']}", flush=True)
        kills = args.kill_at if args.kill_at is not None else [0, max(clean["shards"]) // 2]
        rows = []
        for n in kills:
            out = work / f"killed-{n}"
            rc, killed_wall, _ = build(args, out, f"corpus-checkpoint={n}:kill")
            if rc != -9:
                sys.exit(f"corpus_resume: the build was not killed at corpus-checkpoint={n} (too few shards?)")
            _, resumed_wall, resumed = build(args, out)
            same = all(contents(work / "clean" / node) == contents(out / node) for node in clean["nodes"])
            rows.append((n, killed_wall, resumed_wall, same))
        print(f"\n| killed at | killed build | resumed build | resumed / clean ({clean_wall:.1f} s) | "
              f"identical to clean |\n|---|---|---|---|---|")
        for n, killed_wall, resumed_wall, same in rows:
            where = "tokenizers saved" if n == 0 else f"shard {n} closed"
            print(f"| {where} | {killed_wall:.1f} s | {resumed_wall:.1f} s | {resumed_wall / clean_wall:.2f} | "
                  f"{'yes' if same else 'NO'} |")
        if not all(r[3] for r in rows):
            sys.exit("corpus_resume: a resumed build differs from the clean one")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
