"""Corpus builds at scale: today's per-volume builder against the Ray Data builder, one run, ratios.

    .venv/bin/python benchmarks/corpus_scale.py                   # 600 MB input (10 copies), 1 and 2 CPUs
    .venv/bin/python benchmarks/corpus_scale.py --quick           # a dry run in about a minute (2 x 3 MB)
    .venv/bin/python benchmarks/corpus_scale.py --copies 4 --limit-mb 20 --cpus 1,2 --json /tmp/cs.json
    .venv/bin/python benchmarks/corpus_scale.py --baseline ../old-checkout   # old code from a folder
    .venv/bin/python benchmarks/corpus_scale.py --baseline-rev 1469728       # (default) old code from git

Input: the 60 MB science mirror ($SCALING_STUDY_CORPUS_DIR, default ../shared/corpus) repeated
`--copies` times, every line of copy k prefixed with `c<k> `, so no document repeats (keys hash a
document's bytes in the new builder; identical copies would be drawn all together or not at all)
and each copy adds a word to the vocabulary. `--limit-mb` takes only the first lines of each file
(in proportion to its size) per copy. The copies are written once under `--work` and reused.

Spec: 3 volumes (1%, 10%, 100%), vocab 8000 (as experiments/smoke.yaml and corpus_memory.py), seq_len
128. Builders, each in a subprocess pinned with `taskset -c 0..k-1` for every k in `--cpus`:
- old: `build_corpus(study, node, out, progress=False)` once per corpus node (3 reads of the input
  per volume), with PYTHONPATH at the baseline checkout (`--baseline DIR`, or `git archive` of
  `--baseline-rev` unpacked under the work folder), RAYON_NUM_THREADS=k, TOKENIZERS_PARALLELISM=true.
- new: `ray.init(num_cpus=k)` then `build_corpora(study, nodes, outs, progress=False)` with
  PYTHONPATH at this checkout (a local Ray on 127.0.0.1).

Measured per (builder, k): wall seconds of the build calls (imports and `ray.init` excluded;
`ray.init` is shown apart), MB/s of input text (input bytes / wall; not bytes read), MB/s and
tokens/s per core (/ k), and RSS sampled every 0.5 s over the subprocess tree (psutil): peak of
the driver, peak of any busy Ray worker process (`ray::<task>`, not the idle pool), and peak of
the tree's sum. RSS counts pages of Ray's shared object store in every process that maps them.
"Worker" below is the busy Ray worker peak where tasks ran in Ray workers, else the driver (the old
builder's only process).
The new builder also runs on `--memory-copies` (default copies and copies/2) at the largest k, to
show whether memory per worker stays flat in the corpus size. Last, the new builder's per-core
rate (input bytes per core-second at the largest k) projects the build of experiments/
scholarbert.yaml (corpus.total_tokens x costs.BYTES_PER_TOKEN) onto the ray_cluster.yaml CPUs,
assuming the build spreads linearly. Outputs under --work are removed after each build.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("SCALING_STUDY_CORPUS_DIR", str(REPO.parent / "shared" / "corpus")))
VOLUMES = ["1%", "10%", "100%"]
GOAL = 1.8
SAMPLE_S = 0.5
INSTANCE_VCPUS = {"m6i.4xlarge": 16, "p4d.24xlarge": 96, "g5.2xlarge": 8}
"""Fallback for node types of ray_cluster.yaml without `resources: {CPU: ...}` (AWS vCPU counts)."""


# ----------------------------------------------------------------------------------- input and spec


def _write_copy(src: Path, dest: Path, k: int, share: int | None) -> None:
    """Copy k of `src`, every line prefixed `c<k> `; only the first `share` bytes' lines when set."""
    prefix, written = f"c{k} ".encode(), 0
    tmp = dest.with_name(dest.name + ".part")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        for line in fin:
            if share is not None and written >= share:
                break
            if line.strip():
                fout.write(prefix + line)
                written += len(line)
    os.replace(tmp, dest)


def make_input(mirror: Path, work: Path, copies: int, limit_mb: float | None) -> Path:
    """A folder of `copies` prefixed copies of the mirror's *.txt files (hard links into a pool, so
    the 10x and 5x inputs share their files); written once, reused when present."""
    files = sorted(mirror.glob("*.txt"))
    if not files:
        raise SystemExit(f"{mirror}: no *.txt files; set SCALING_STUDY_CORPUS_DIR to the corpus mirror")
    tag = "full" if limit_mb is None else f"{limit_mb:g}mb"
    pool, folder = work / f"pool-{tag}", work / f"corpus-{copies}x-{tag}"
    if folder.is_dir():
        return folder
    pool.mkdir(parents=True, exist_ok=True)
    total = sum(f.stat().st_size for f in files)
    tmp = work / f".{folder.name}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for k in range(copies):
        for f in files:
            dest = pool / f"c{k:03d}_{f.name}"
            if not dest.exists():
                share = None if limit_mb is None else max(1, int(limit_mb * 1e6 * f.stat().st_size / total))
                _write_copy(f, dest, k, share)
            os.link(dest, tmp / dest.name)
    os.replace(tmp, folder)
    return folder


def write_spec(work: Path, corpus: Path, vocab_size: int, seq_len: int) -> Path:
    import yaml

    spec = {
        "name": "corpus-scale",
        "corpus": {"name": "scale", "paths": [str(corpus)], "vocab_size": vocab_size, "cased": True},
        "model_sizes": ["debug"], "data_volumes": VOLUMES,
        "pretrain": {"steps": [1], "batch_size": 8, "seq_len": seq_len},
        "finetune": {"epochs": [1]}, "tasks": {"include": ["bc5cdr_ner"]},
    }
    path = work / f"spec-{corpus.name}-v{vocab_size}-s{seq_len}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def baseline_checkout(work: Path, baseline: str | None, rev: str) -> Path:
    """The old code: `--baseline DIR` as given, else `git archive <rev>` unpacked once under `work`
    (read-only use of the repository: no worktree entry to prune later)."""
    if baseline:
        path = Path(baseline).resolve()
        if not (path / "scaling_study" / "corpus.py").is_file():
            raise SystemExit(f"--baseline {baseline}: no scaling_study/corpus.py there; "
                             f"allowed: a checkout of the project")
        return path
    full = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if full.returncode:
        raise SystemExit(f"--baseline-rev {rev}: not a commit of {REPO} ({full.stderr.strip()})")
    commit = full.stdout.strip()
    path = work / f"baseline-{commit[:12]}"
    if not path.is_dir():
        tmp = work / f".{path.name}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------- the child: one build


def _manifest_row(node, manifest) -> dict:
    row = {k: getattr(manifest, k) for k in ("tokens", "sequences", "documents", "build_seconds", "vocab_size")}
    row["volume"] = node.inputs["volume"]
    row["shards"] = len(manifest.shards)
    row["input_bytes"] = sum(f["bytes"] for f in manifest.input_files)
    stages = getattr(manifest, "stage_seconds", None)
    if isinstance(stages, dict):
        row["stage_seconds"] = stages
    return row


def _build_new(study, nodes, outs, k: int, ray_tmp: str) -> tuple[str, float, list]:
    """ray.init on k CPUs, then build_corpora; returns (builder, ray_init_s, manifests)."""
    import ray

    from scaling_study.corpus import build_corpora
    from scaling_study.raycluster import loopback_only

    start = time.perf_counter()
    with loopback_only():
        ray.init(num_cpus=k, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    ray_init_s = time.perf_counter() - start
    try:
        return "new", ray_init_s, list(build_corpora(study, nodes, outs, progress=False))
    finally:
        ray.shutdown()


def child(builder: str, spec_file: str, out_root: str, k: int, ray_tmp: str) -> None:
    """Build every corpus node of the spec with `builder` (old | new); print one JSON line. The code
    comes from PYTHONPATH (this file adds nothing to sys.path), so the old builder is the baseline's."""
    from scaling_study.grid import expand
    from scaling_study.spec import load_spec

    study = load_spec(spec_file)
    nodes = expand(study).of_kind("corpus")
    outs = [Path(out_root) / n.id for n in nodes]
    import ray, tokenizers, transformers, pyarrow.parquet  # noqa: F401,E401  (import cost is not the build's)

    start = time.perf_counter()
    ray_init_s = 0.0
    if builder == "old":
        from scaling_study.corpus import build_corpus

        manifests = [build_corpus(study, n, o, progress=False) for n, o in zip(nodes, outs)]
    else:
        builder, ray_init_s, manifests = _build_new(study, nodes, outs, k, ray_tmp)
    wall = time.perf_counter() - start - ray_init_s
    print(json.dumps({"builder": builder, "wall_s": wall, "ray_init_s": ray_init_s,
                      "manifests": [_manifest_row(n, m) for n, m in zip(nodes, manifests)]}))


# ----------------------------------------------------------------------------------- running and sampling


class TreeSampler(threading.Thread):
    """Peak RSS over a process tree, sampled every SAMPLE_S: the driver, any busy Ray worker (a
    `ray::<task or actor>` process; `ray::IDLE` ones are the pool Ray starts ahead), Ray's own
    processes (raylet, GCS, its `ray::...Agent`s), and the sum over the tree."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak = {"driver": 0, "ray_worker": 0, "ray_idle": 0, "ray_system": 0, "tree_sum": 0}
        self.ray_workers_seen = 0
        self._workers: set[int] = set()

    def _sample(self, root) -> None:
        import psutil

        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                rss, argv = proc.memory_info().rss, proc.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            title = argv[0] if argv else ""
            role = ("driver" if proc.pid == self.pid else "ray_idle" if title.startswith("ray::IDLE") else
                    "ray_system" if title.endswith("Agent") else  # ray::DashboardAgent, ray::RuntimeEnvAgent
                    "ray_worker" if title.startswith("ray::") else "ray_system")
            if role == "ray_worker":
                self._workers.add(proc.pid)
            self.peak[role] = max(self.peak[role], rss)
            total += rss
        self.peak["tree_sum"] = max(self.peak["tree_sum"], total)
        self.ray_workers_seen = len(self._workers)

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            while not self.stop.is_set():
                self._sample(root)
                self.stop.wait(SAMPLE_S)
        except psutil.NoSuchProcess:
            pass


def run_build(builder: str, code: Path, spec: Path, out_root: Path, k: int, ray_tmp: Path, log: Path) -> dict:
    """One build in a pinned subprocess; its JSON line plus RSS peaks and the tree's CPU seconds."""
    env = {**os.environ, "PYTHONPATH": str(code), "SCALING_STUDY_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    if builder == "old":
        env.update(RAYON_NUM_THREADS=str(k), TOKENIZERS_PARALLELISM="true")
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    cmd = ["taskset", "-c", f"0-{k - 1}", sys.executable, str(Path(__file__).resolve()),
           "--child", builder, str(spec), str(out_root), str(k), str(ray_tmp)]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        stdout, _ = proc.communicate()
        sampler.stop.set()
        sampler.join()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out_root, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(f"{builder} build on {k} CPU(s) failed (exit {proc.returncode}); its log: {log}\n"
                         + log.read_text()[-3000:])
    result = json.loads(stdout.strip().splitlines()[-1])
    peak = sampler.peak
    worker = peak["ray_worker"] if sampler.ray_workers_seen else peak["driver"]  # the old builder: its process
    result.update(k=k, peak_rss_mb={r: v / 2**20 for r, v in peak.items()}, peak_worker_rss_mb=worker / 2**20,
                  ray_workers_seen=sampler.ray_workers_seen,
                  tree_cpu_s=(cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime))
    return _rates(result)


def _rates(r: dict) -> dict:
    k, wall = r["k"], r["wall_s"]
    r["input_bytes"] = r["manifests"][0]["input_bytes"]
    r["tokens"] = sum(m["tokens"] for m in r["manifests"])
    r["mb_per_s"] = r["input_bytes"] / 1e6 / wall
    r["mb_per_s_per_core"] = r["mb_per_s"] / k
    r["bytes_per_core_s"] = r["input_bytes"] / wall / k
    r["tokens_per_s_per_core"] = r["tokens"] / wall / k
    return r


# ----------------------------------------------------------------------------------- projection


def cluster_cpus(path: Path) -> tuple[int, int, str]:
    """(CPUs of the whole cluster at max_workers, CPUs of the head, what was counted) from ray_cluster.yaml."""
    import yaml

    conf = yaml.safe_load(path.read_text())
    types, head = conf["available_node_types"], conf["head_node_type"]

    def cpus(name: str) -> tuple[int, str]:
        t = types[name]
        if "CPU" in (t.get("resources") or {}):
            return int(t["resources"]["CPU"]), "resources.CPU"
        itype = (t.get("node_config") or {}).get("InstanceType")
        if itype in INSTANCE_VCPUS:
            return INSTANCE_VCPUS[itype], f"{itype} vCPUs"
        raise SystemExit(f"{path}: node type {name} has no resources.CPU and an unknown InstanceType {itype!r}")

    head_cpus, head_src = cpus(head)
    parts, total, room = [f"head '{head}' {head_cpus} ({head_src})"], head_cpus, conf.get("max_workers", 10**9)
    workers = sorted((n for n in types if n != head), key=lambda n: -cpus(n)[0])
    for name in workers:  # the largest nodes first where the cluster's max_workers caps the sum
        count = min(int(types[name].get("max_workers", 0)), room)
        room -= count
        each, src = cpus(name)
        parts.append(f"{count} x '{name}' {each} ({src})")
        total += count * each
    what = " + ".join(parts) + f" = {total} CPUs: every worker type at its max_workers (cluster max_workers " \
           f"{conf.get('max_workers')})"
    return total, head_cpus, what


def projection(rate: float) -> dict:
    """The scholarbert.yaml corpus build at `rate` input bytes per core-second."""
    sys.path.insert(0, str(REPO))
    from scaling_study.costs import BYTES_PER_TOKEN, corpus_tokens
    from scaling_study.spec import load_spec

    study = load_spec(REPO / "experiments" / "scholarbert.yaml")
    tokens, source = corpus_tokens(study)
    size = tokens * BYTES_PER_TOKEN
    cluster, head, what = cluster_cpus(REPO / "ray_cluster.yaml")
    cpu_hours = size / rate / 3600
    return {"corpus_bytes": size, "tokens": tokens, "tokens_source": source, "bytes_per_token": BYTES_PER_TOKEN,
            "volumes": [v.label for v in study.volumes], "vocab_size": study.spec.corpus.vocab_size,
            "cpu_hours": cpu_hours, "cluster_cpus": cluster, "cluster_hours": cpu_hours / cluster,
            "head_cpus": head, "head_hours": cpu_hours / head, "counted": what}


def stage_rates(run: dict) -> dict:
    """Input bytes per core-second of each stage in the manifests' `stage_seconds`, if they have it. A
    stage with the same seconds in every manifest is one shared stage (counted once), else summed."""
    rows = [m["stage_seconds"] for m in run["manifests"] if "stage_seconds" in m]
    if not rows:
        return {}
    out = {}
    for stage in sorted({s for row in rows for s in row}):
        values = [row.get(stage, 0.0) for row in rows]
        seconds = values[0] if len(set(values)) == 1 else sum(values)
        if seconds > 0:
            out[stage] = run["input_bytes"] / seconds / run["k"]
    return out


# ----------------------------------------------------------------------------------- report


def _row(r: dict) -> str:
    p = r["peak_rss_mb"]
    return (f"{r['builder']:<6}{r['k']:>3}{r['wall_s']:>9.1f}{r['mb_per_s']:>8.2f}{r['mb_per_s_per_core']:>10.2f}"
            f"{r['tokens_per_s_per_core']:>12,.0f}{r['peak_worker_rss_mb']:>12.0f}{p['driver']:>11.0f}"
            f"{p['tree_sum']:>10.0f}{r['ray_init_s']:>9.1f}{r['tree_cpu_s']:>9.1f}")


HEADER = (f"{'build':<6}{'k':>3}{'wall s':>9}{'MB/s':>8}{'MB/s/core':>10}{'tok/s/core':>12}{'worker MB':>12}"
          f"{'driver MB':>11}{'tree MB':>10}{'init s':>9}{'CPU s':>9}")
LEGEND = ("(wall: the build calls; MB: peak RSS of the busiest worker process / the driver / the whole tree; "
          "init: ray.init; CPU: the tree's CPU seconds, imports and Ray's start included)")


def print_ratios(old: dict, new: dict) -> dict:
    ratios = {k: old[k]["wall_s"] / new[k]["wall_s"] for k in sorted(set(old) & set(new))}
    for k, x in ratios.items():
        print(f"new/old speed on {k} CPU(s): {x:.2f}x "
              f"(old {old[k]['wall_s']:.1f} s, new {new[k]['wall_s']:.1f} s)")
    if 2 in new and 2 in old:
        line = f"Ray Data build on 2 CPUs vs today's builder: {ratios[2]:.2f}x (goal >= {GOAL}x)"
        extra = f"; vs today's builder on 1 CPU: {old[1]['wall_s'] / new[2]['wall_s']:.2f}x" if 1 in old else ""
        print(line + f" [today's builder also on 2 CPUs{extra}]")
    return {str(k): x for k, x in ratios.items()}


def print_memory(runs: dict) -> dict:
    """`runs`: copies -> new-builder run at the largest k."""
    (big, b), (small, s) = sorted(runs.items(), reverse=True)
    ratio = b["peak_worker_rss_mb"] / s["peak_worker_rss_mb"]
    who = "Ray worker" if b["ray_workers_seen"] else "driver (no Ray workers ran)"
    print(f"memory per worker, {b['builder']} builder on {b['k']} CPU(s), peak {who} RSS: "
          f"{big} copies ({b['input_bytes'] / 1e6:.1f} MB) {b['peak_worker_rss_mb']:.0f} MB, "
          f"{small} copies ({s['input_bytes'] / 1e6:.1f} MB) {s['peak_worker_rss_mb']:.0f} MB: "
          f"ratio {ratio:.2f} for {b['input_bytes'] / s['input_bytes']:.1f}x the input (flat = 1.00); "
          f"driver {b['peak_rss_mb']['driver']:.0f} vs {s['peak_rss_mb']['driver']:.0f} MB")
    return {"copies": [big, small], "peak_worker_rss_mb": [b["peak_worker_rss_mb"], s["peak_worker_rss_mb"]],
            "peak_driver_rss_mb": [b["peak_rss_mb"]["driver"], s["peak_rss_mb"]["driver"]], "ratio": ratio}


def print_rates(run: dict, describe: str) -> dict:
    stages = stage_rates(run)
    print(f"per-core rate ({run['builder']} builder, {run['k']} CPU(s)): {run['bytes_per_core_s']:.3e} input bytes "
          f"per core-second ({run['tokens_per_s_per_core']:,.0f} tokens/s per core)")
    print("for presets (paste):")
    print("corpus_build:")
    print(f"  bytes_per_core_second: {run['bytes_per_core_s']:.3e}")
    if stages:
        print("  stage_bytes_per_core_second: {" + ", ".join(f"{s}: {v:.3e}" for s, v in stages.items()) + "}")
    print(f'  source: "Measured: benchmarks/corpus_scale.py, {describe}, {run["k"]} CPU(s), '
          f'{time.strftime("%Y-%m-%d")}"')
    return {"bytes_per_core_s": run["bytes_per_core_s"], "stages": stages}


def print_projection(rate: float, bench_vocab: int) -> dict:
    p = projection(rate)
    print(f"projected scholarbert.yaml corpus build: {p['cpu_hours']:,.0f} CPU-hours, {p['cluster_hours']:.1f} hours "
          f"wall on {p['cluster_cpus']} CPUs ({p['head_hours']:.1f} hours on the head's {p['head_cpus']} alone)")
    print(f"  corpus: {p['tokens']:.4g} tokens ({p['tokens_source']}) x {p['bytes_per_token']} bytes/token = "
          f"{p['corpus_bytes'] / 1e9:,.1f} GB; volumes {', '.join(p['volumes'])} (benchmark: {', '.join(VOLUMES)}); "
          f"vocab {p['vocab_size']} (benchmark: {bench_vocab}); linear in bytes and CPUs assumed")
    print(f"  CPUs counted from ray_cluster.yaml: {p['counted']}")
    return p


# ----------------------------------------------------------------------------------- main


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=None, help="copies of the mirror (default 10; --quick: 2)")
    parser.add_argument("--limit-mb", type=float, default=None, help="MB taken from the mirror per copy (default all)")
    parser.add_argument("--quick", action="store_true", help="dry run: --copies 2 --limit-mb 3 unless given")
    parser.add_argument("--cpus", default="1,2", help="CPU counts to pin each build to (default 1,2)")
    parser.add_argument("--memory-copies", default=None, help="two copy counts for the memory check "
                        "(default: --copies and half of it; 'none' skips it)")
    parser.add_argument("--work", default="/tmp/corpus-scale", help="cache of inputs, baseline code, logs")
    parser.add_argument("--baseline", default=None, help="a checkout of the old code (default: --baseline-rev)")
    parser.add_argument("--baseline-rev", default="1469728", help="commit of the old code, unpacked under --work")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", default=None, help="also write every measurement here")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.copies = 2 if args.copies is None else args.copies
        args.limit_mb = 3.0 if args.limit_mb is None else args.limit_mb
    args.copies = 10 if args.copies is None else args.copies
    return args


def _check_cpus(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        ks = []
    have = len(os.sched_getaffinity(0))
    if not ks or ks[0] < 1 or ks[-1] > have:
        raise SystemExit(f"--cpus {text}: allowed: comma-separated counts from 1 to {have} (this machine's CPUs)")
    return ks


def _memory_pair(args) -> list[int]:
    if args.memory_copies == "none":
        return []
    pair = ([int(x) for x in args.memory_copies.split(",")] if args.memory_copies
            else [args.copies, args.copies // 2])
    if len(pair) != 2 or min(pair) < 1 or pair[0] == pair[1]:
        if args.memory_copies:
            raise SystemExit(f"--memory-copies {args.memory_copies}: allowed: two different counts >= 1, e.g. 10,5")
        return []
    return pair


def measure(args, ks: list[int], work: Path, old_code: Path, ray_tmp: Path) -> dict:
    """Every build; prints a table row as each one ends."""
    runs, spec = {"old": {}, "new": {}, "memory": {}}, {}
    for copies in sorted({args.copies, *_memory_pair(args)}):
        corpus = make_input(MIRROR, work, copies, args.limit_mb)
        spec[copies] = write_spec(work, corpus, args.vocab_size, args.seq_len)
    corpus = make_input(MIRROR, work, args.copies, args.limit_mb)
    print(f"input: {sum(f.stat().st_size for f in corpus.glob('*.txt')) / 1e6:.1f} MB ({args.copies} copies of "
          f"{MIRROR}{'' if args.limit_mb is None else f', {args.limit_mb:g} MB each'}): {corpus}",
          f"spec: volumes {', '.join(VOLUMES)}, vocab {args.vocab_size}, seq_len {args.seq_len}: {spec[args.copies]}",
          f"old code: {old_code}; new code: {REPO}", "", HEADER, LEGEND, sep="\n", flush=True)
    for k in ks:
        for builder, code in (("old", old_code), ("new", REPO)):
            run = run_build(builder, code, spec[args.copies], work / "out", k, ray_tmp,
                            work / f"log-{builder}-k{k}.txt")
            runs["old" if builder == "old" else "new"][k] = run
            print(_row(run), flush=True)
    for copies in _memory_pair(args):
        if copies == args.copies:
            runs["memory"][copies] = runs["new"][ks[-1]]
            continue
        runs["memory"][copies] = run = run_build("new", REPO, spec[copies], work / "out", ks[-1], ray_tmp,
                                                 work / f"log-new-k{ks[-1]}-{copies}x.txt")
        print(_row(run) + f"   ({copies} copies, memory check)", flush=True)
    return runs


def main() -> int:
    args = _arguments()
    if args.child:
        builder, spec, out, k, ray_tmp = args.child
        return child(builder, spec, out, int(k), ray_tmp)
    ks = _check_cpus(args.cpus)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path(f"/tmp/rcs-{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    started = time.perf_counter()
    try:
        old_code = baseline_checkout(work, args.baseline, args.baseline_rev)
        runs = measure(args, ks, work, old_code, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print("load average at the end " + "/".join(f"{x:.1f}" for x in os.getloadavg())
          + " (1/5/15 min; other work on the machine slows the builds)\n")
    out = {"args": vars(args), "old_code": str(old_code), "runs": {b: {str(k): r for k, r in v.items()}
                                                                   for b, v in runs.items()}}
    out["ratios"] = print_ratios(runs["old"], runs["new"])
    if len(runs["memory"]) == 2:
        out["memory"] = print_memory(runs["memory"])
    best = runs["new"][ks[-1]]
    describe = (f"{best['input_bytes'] / 1e6:.1f} MB, volumes {'/'.join(VOLUMES)}, vocab {args.vocab_size}, "
                f"seq_len {args.seq_len}, {best['builder']} builder")
    out["rates"] = print_rates(best, describe)
    out["projection"] = print_projection(best["bytes_per_core_s"], args.vocab_size)
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        print(f"measurements written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
