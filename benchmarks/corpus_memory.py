"""Peak memory of a corpus build must not grow with the corpus: build 1x and 10x the same corpus.

    .venv/bin/python benchmarks/corpus_memory.py                       # /work/shared/corpus, vocab 8000
    .venv/bin/python benchmarks/corpus_memory.py --corpus DIR --repeat 10 --vocab-size 8000

Each build runs in a fresh subprocess (100% volume, seq_len 128) that reports its own peak RSS
(`ru_maxrss`, which `RUSAGE_CHILDREN` would merge across children) and its RSS after imports, so
the difference is what the build itself holds. The 10x corpus is written as real copies under a
short temp folder and deleted afterwards. Target: peak RSS ratio (10x / 1x) near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = os.environ.get("SCALING_STUDY_CORPUS_DIR", str(REPO.parent / "shared" / "corpus"))


def child(corpus: str, out: str, vocab_size: int, seq_len: int) -> None:
    """Build the 100% volume of `corpus` into `out`; print one JSON line of measurements."""
    sys.path.insert(0, str(REPO))
    from scaling_study.corpus import build_corpus
    from scaling_study.grid import expand
    from scaling_study.spec import spec_from_data

    spec = {
        "name": "bench",
        "corpus": {"name": "bench", "paths": [corpus], "vocab_size": vocab_size},
        "model_sizes": ["debug"], "data_volumes": ["100%"],
        "pretrain": {"steps": [1], "batch_size": 8, "seq_len": seq_len},
        "finetune": {"epochs": [1]}, "tasks": {"include": ["bc5cdr_ner"]},
    }
    study = spec_from_data(spec, str(Path(out) / "spec.yaml"))
    node = expand(study).of_kind("corpus")[0]
    import tokenizers, transformers, pyarrow.parquet  # noqa: F401,E401  (import cost is not the build's)

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    manifest = build_corpus(study, node, Path(out) / node.id, progress=False)
    print(json.dumps({
        "wall_s": time.perf_counter() - start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mb": rss_imports / 1024, "bytes": sum(f["bytes"] for f in manifest.input_files),
        "documents": manifest.documents, "tokens": manifest.tokens, "sequences": manifest.sequences,
        "shards": len(manifest.shards), "vocab_size": manifest.vocab_size,
    }))


def run(corpus: Path, out: Path, vocab_size: int, seq_len: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(corpus), str(out), str(vocab_size), str(seq_len)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"build of {corpus} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="folder of *.txt files")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        corpus, out, vocab, seq_len = args.child
        return child(corpus, out, int(vocab), int(seq_len))

    corpus = Path(args.corpus).resolve()
    files = sorted(corpus.glob("*.txt"))
    work = Path(tempfile.mkdtemp(prefix="cm", dir="/tmp" if Path("/tmp").is_dir() else None))
    try:
        repeated = work / "x"
        repeated.mkdir()
        for i in range(args.repeat):
            for f in files:
                shutil.copyfile(f, repeated / f"{i:02d}_{f.name}")
        results = {}
        for name, source in (("1x", corpus), (f"{args.repeat}x", repeated)):
            (work / f"out-{name}").mkdir()
            results[name] = r = run(source, work / f"out-{name}", args.vocab_size, args.seq_len)
            print(f"{name:>4}: {r['bytes'] / 1e6:7.1f} MB, {r['documents']:,} docs, {r['tokens']:,} tokens, "
                  f"{r['sequences']:,} sequences in {r['shards']} shards | wall {r['wall_s']:6.1f} s "
                  f"({r['bytes'] / 1e6 / r['wall_s']:.2f} MB/s) | peak RSS {r['peak_rss_mb']:6.0f} MB "
                  f"(after imports {r['rss_after_imports_mb']:.0f} MB)", flush=True)
        small, big = results["1x"], results[f"{args.repeat}x"]
        print(f"peak RSS ratio {args.repeat}x/1x: {big['peak_rss_mb'] / small['peak_rss_mb']:.2f}; "
              f"build-only (peak - after imports): {big['peak_rss_mb'] - big['rss_after_imports_mb']:.0f} MB vs "
              f"{small['peak_rss_mb'] - small['rss_after_imports_mb']:.0f} MB; "
              f"wall ratio {big['wall_s'] / small['wall_s']:.2f} for {big['bytes'] / small['bytes']:.0f}x the data")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
