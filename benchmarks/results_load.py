"""How fast `results.load` reads a big study from an MLflow server, against plain `mlflow.search_runs`.

    .venv/bin/python benchmarks/results_load.py                  # 10,000 runs, db kept in /tmp/ss-results-bench
    .venv/bin/python benchmarks/results_load.py --runs 2000 --db-dir /tmp/other

Starts a local MLflow server (127.0.0.1, sqlite, `tracking.LocalMlflowServer`) over a study
folder and, the first time, logs a synthetic study into it: corpus and pretraining runs, then
`--runs` finetune runs shaped as the study driver logs them (the real `grid.expand` of a
paper-sized spec, the factor tags and params of `grid.cell_factors`, the metrics of
`metrics.mlflow_metrics`, `log_batch` per run). That goes straight into the sqlite store in
/dev/shm (10,000 runs through a server took most of an hour on a busy 2-core machine) and is
kept, so later invocations skip it. Then it times:

- plain: `mlflow.search_runs(experiment_ids=[...], max_results=N)` (a pandas frame of every run),
- ours, cold: `results.load` with no cache (every finished finetune run, factors derived, Parquet written),
- ours, warm: `results.load` again (an incremental refresh: nothing changed),
- ours, incremental: after 100 more runs are logged (which are then deleted again, keeping the db as it was),
- ours, from the study's own sqlite store (`results.load("bench", root=...)`, no tracking URI: what
  `scaling-study results` does for a study run with the embedded server), cold and warm.

Each line shows wall time and CPU seconds of this process and of the server.

Target: 10,000 runs in at most 10 s, cold. Timings on a shared machine are noisy; each is the best of `--repeat`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scaling_study import results  # noqa: E402
from scaling_study.grid import cell_factors, expand, iter_cells  # noqa: E402
from scaling_study.metrics import mlflow_metrics  # noqa: E402
from scaling_study.spec import spec_from_data  # noqa: E402
from scaling_study.tracking import LocalMlflowServer  # noqa: E402

STUDY = "bench"
SPEC = {
    "name": STUDY,
    "corpus": {"name": "sci", "paths": ["corpus.txt"], "vocab_size": 30000},
    "model_sizes": ["tiny", "mini", "small", "base", "large"],
    "data_volumes": ["1%", "10%", "100%"],
    "pretrain": {"steps": [1000, 10000, 50000, 100000], "batch_size": 256, "seq_len": 128},
    "finetune": {"epochs": [1, 2, 3], "seeds": [0, 1, 2, 3, 4]},
    "tasks": {"include": ["paper12"]},
}
VOLUME_TOKENS = {"1%": 22_000_000, "10%": 220_000_000, "100%": 2_200_000_000}


def _tags(values: dict) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in values.items() if v is not None]


def populate(uri: str, n: int, *, threads: int = 8, end_time: int | None = None, offset: int = 0) -> list[str]:
    """Log `n` finetune runs (cells `offset`... of the plan) plus their study, corpus and pretrain runs."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    study = spec_from_data(json.loads(json.dumps(SPEC)))
    plan = expand(study)
    found = client.get_experiment_by_name(STUDY)
    experiment = found.experiment_id if found else client.create_experiment(STUDY)
    anchors = {}
    if offset == 0:
        root = client.create_run(experiment, run_name=STUDY, tags={"node_id": f"study-{STUDY}", "node_kind": "study"})
        for node in plan.of_kind("corpus"):
            run = client.create_run(experiment, tags={"node_id": node.id, "node_kind": "corpus",
                                                      "mlflow.parentRunId": root.info.run_id})
            client.log_batch(run.info.run_id, metrics=[
                Metric("tokens", VOLUME_TOKENS[node.factors["data_volume"]], 0, 0), Metric("vocab_size", 30000, 0, 0)])
            client.set_terminated(run.info.run_id)
        for node in plan.of_kind("pretrain"):
            tags = {"node_id": node.id, "node_kind": "pretrain", "corpus_id": node.parents[0], **node.factors,
                    "mlflow.parentRunId": root.info.run_id}
            run = client.create_run(experiment, tags={k: str(v) for k, v in tags.items()})
            client.set_terminated(run.info.run_id)
            anchors[node.id] = run.info.run_id
    else:
        for run in results.search_all(client, experiment, "tags.node_kind = 'pretrain'"):
            anchors[run.data.tags["node_id"]] = run.info.run_id
    cells = list(iter_cells(plan))[offset:offset + n]
    noise = np.random.default_rng(offset).normal(0, 0.02, len(cells))
    if len(cells) < n:
        raise SystemExit(f"the synthetic plan has {len(cells) + offset} cells; ask for at most that many runs")
    now = int(time.time() * 1000)

    def log(item) -> str:
        i, (cell, run_node, model) = item
        extra = cell_factors(study, plan, cell, vocab_size=30000,
                             volume_tokens=VOLUME_TOKENS[cell.factors["data_volume"]])
        factors = {**cell.factors, **extra}
        tags = {"node_id": cell.id, "node_kind": "finetune", "study": STUDY, "finetune_run_id": run_node.id,
                "model_id": model.id, "model_source": f"/studies/{STUDY}/pretrain/{model.parents[0]}",
                "mlflow.parentRunId": anchors[model.parents[0]], **factors}
        run = client.create_run(experiment, run_name=f"{cell.factors['model']} | {cell.factors['task']}",
                                start_time=now - 31 * 3_600_000, tags={k: str(v) for k, v in tags.items()})
        f1 = float(np.clip(0.55 + 0.02 * np.log10(extra["parameters"]) + noise[i], 0, 1))
        result = {"dev": {"f1": f1 + 0.01, "precision": f1, "recall": f1, "loss": 0.3},
                  "test": {"f1": f1, "precision": f1, "recall": f1, "loss": 0.3},
                  "train_loss": 0.2, "examples_per_s": 900.0, "train_seconds": 60.0, "selected_epoch": 1,
                  "majority_f1": 0.1, "collapse": False}
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in mlflow_metrics(result).items()],
                         params=[Param(k, str(v)) for k, v in factors.items()], tags=_tags({"collapsed": False}))
        # spread over the last 30 hours, as a real study's runs are: a refresh re-reads only the last minute's
        client.set_terminated(run.info.run_id, "FINISHED", end_time=end_time or now - 30 * 3_600_000 + 10_000 * i)
        return run.info.run_id

    if threads <= 1:
        return [log(item) for item in enumerate(cells)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(log, enumerate(cells)))


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (the MLflow server forks its workers)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def timed(repeat: int, fn, server_pid: int | None = None):
    """Best wall time of `repeat` calls, with that call's client and server CPU seconds, and its value."""
    best = None
    for _ in range(repeat):
        cpu0, srv0, start = time.process_time(), cpu_seconds(server_pid) if server_pid else 0.0, time.perf_counter()
        value = fn()
        wall = time.perf_counter() - start
        row = (wall, time.process_time() - cpu0, (cpu_seconds(server_pid) - srv0) if server_pid else 0.0, value)
        best = row if best is None or wall < best[0] else best
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--db-dir", default="/tmp/ss-results-bench", help="kept between invocations")
    parser.add_argument("--threads", type=int, default=4, help="for the 100 runs logged through the server")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--page-size", type=int, default=results.PAGE_SIZE)
    args = parser.parse_args()

    import mlflow
    from mlflow.tracking import MlflowClient

    root = Path(args.db_dir) / f"runs-{args.runs}"  # a storage root: <root>/<study>/mlflow, as `run` lays it out
    folder = root / STUDY / "mlflow"
    marker = root / "populated.json"
    if not marker.is_file():
        # straight into the sqlite store, in a RAM folder: through a server, or with sqlite's fsyncs on
        # a busy disk, logging 10,000 runs takes most of an hour; reading them is what is measured
        staging = Path(tempfile.mkdtemp(prefix="ss-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        try:
            start = time.perf_counter()
            populate(f"sqlite:///{staging / 'mlflow.db'}", args.runs, threads=1)
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(staging, folder)
            marker.write_text(json.dumps({"runs": args.runs}))
            print(f"logged {args.runs:,} finetune runs in {time.perf_counter() - start:.1f} s (once; kept in {root})")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    cache = Path(tempfile.mkdtemp(prefix="ss-bench-cache-"))
    lines = []

    def show(label: str, row, note: str = "") -> float:
        wall, client, server_cpu, _ = row
        cpu = f"client {client:5.2f} s" + (f" + server {server_cpu:5.2f} s" if server_cpu else "") + " CPU"
        lines.append(f"{label:<52} {wall:6.2f} s wall  ({cpu}){note}")
        return wall

    try:
        with LocalMlflowServer(folder) as server:
            pid = server.process.pid
            mlflow.set_tracking_uri(server.uri)
            experiment = mlflow.get_experiment_by_name(STUDY).experiment_id
            over = dict(tracking_uri=server.uri, cache_dir=cache, page_size=args.page_size)

            def cold():
                shutil.rmtree(cache, ignore_errors=True)
                return results.load(STUDY, **over)

            plain = timed(args.repeat, lambda: mlflow.search_runs(experiment_ids=[experiment], max_results=100_000),
                          pid)
            rest = timed(args.repeat, cold, pid)
            warm = timed(args.repeat, lambda: results.load(STUDY, **over), pid)
            added = populate(server.uri, 100, threads=args.threads, offset=args.runs, end_time=int(time.time() * 1000))
            incr = timed(1, lambda: results.load(STUDY, **over), pid)
            client = MlflowClient(server.uri)
            for run_id in added:  # leave the kept db as it was
                client.delete_run(run_id)
            # the study's own sqlite store, as results.load("bench", root=...) reads it, with the server up
            direct_over = dict(root=root, cache_dir=cache, page_size=args.page_size)

            def direct_cold():
                shutil.rmtree(cache, ignore_errors=True)
                return results.load(STUDY, **direct_over)

            direct = timed(args.repeat, direct_cold)
            direct_warm = timed(args.repeat, lambda: results.load(STUDY, **direct_over))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    frame, df = plain[3], rest[3]
    print(f"runs: {len(frame):,} in the experiment, {int((frame['tags.node_kind'] == 'finetune').sum()):,} finetune; "
          f"results.load rows: {len(df):,} over REST, {len(direct[3]):,} from sqlite")
    base = show("plain mlflow.search_runs(max_results=100000), REST", plain, "  (every run, no factors, no cache)")
    ours = show("results.load over REST, cold (no cache)", rest, f"  ratio {rest[0] / base:.2f}x plain")
    show("results.load over REST, warm (nothing new)", warm, f"  fetched {warm[3].attrs['fetched']} runs")
    show("results.load over REST, incremental (+100 runs)", incr, f"  fetched {incr[3].attrs['fetched']} runs")
    own = show("results.load of the study's sqlite store, cold", direct, f"  ratio {direct[0] / base:.2f}x plain")
    show("results.load of the study's sqlite store, warm", direct_warm,
         f"  fetched {direct_warm[3].attrs['fetched']} runs")
    print("\n".join(lines))
    print(f"target: {args.runs:,} runs loaded in <= 10 s: REST {'met' if ours <= 10 else 'NOT met'} ({ours:.1f} s), "
          f"study's store {'met' if own <= 10 else 'NOT met'} ({own:.1f} s); page size {args.page_size:,}, "
          f"best of {args.repeat}; shared machine: wall times are noisy, CPU seconds less so")
    return 0


if __name__ == "__main__":
    sys.exit(main())
