"""How fast `results.load` reads a big study from an MLflow server, against plain `mlflow.search_runs`.

    .venv/bin/python benchmarks/results_load.py                  # 10,000 runs, db kept in /tmp/ss-results-bench
    .venv/bin/python benchmarks/results_load.py --runs 2000 --db-dir /tmp/other

Starts a local MLflow server (127.0.0.1, sqlite, `tracking.LocalMlflowServer`) and, the first time,
logs a synthetic study into it: corpus and pretraining runs, then `--runs` finetune runs shaped as
the study driver logs them (the real `grid.expand` of a paper-sized spec, the factor tags and
params of `grid.cell_factors`, the metrics of `orchestration._flat_metrics`), with `log_batch` from
a few threads. The populated folder is kept, so later invocations skip that. Then it times:

- plain: `mlflow.search_runs(experiment_ids=[...], max_results=N)` (a pandas frame of every run),
- ours, cold: `results.load` with no cache (every finished finetune run, factors derived, Parquet written),
- ours, warm: `results.load` again (an incremental refresh: nothing changed),
- ours, incremental: after 100 more runs are logged (which are then deleted again, keeping the db as it was).

Target: 10,000 runs in at most 10 s, cold. Timings on a shared machine are noisy; each is the best of `--repeat`.
"""

from __future__ import annotations

import argparse
import json
import os
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
from scaling_study.orchestration import _flat_metrics  # noqa: E402
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
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in _flat_metrics(result).items()],
                         params=[Param(k, str(v)) for k, v in factors.items()], tags=_tags({"collapsed": False}))
        # spread over the last 30 hours, as a real study's runs are: a refresh re-reads only the last minute's
        client.set_terminated(run.info.run_id, "FINISHED", end_time=end_time or now - 30 * 3_600_000 + 10_000 * i)
        return run.info.run_id

    if threads <= 1:
        return [log(item) for item in enumerate(cells)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(log, enumerate(cells)))


def best_of(repeat: int, fn):
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--db-dir", default="/tmp/ss-results-bench", help="kept between invocations")
    parser.add_argument("--threads", type=int, default=4, help="for the 100 runs logged through the server")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--page-size", type=int, default=results.PAGE_SIZE)
    args = parser.parse_args()

    import mlflow

    folder = Path(args.db_dir) / f"runs-{args.runs}"
    marker = folder / "populated.json"
    if not marker.is_file():
        # straight into the sqlite store, in a RAM folder: through a server, or with sqlite's fsyncs on
        # a busy disk, logging 10,000 runs takes most of an hour; reading them is what is measured
        staging = Path(tempfile.mkdtemp(prefix="ss-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        try:
            start = time.perf_counter()
            populate(f"sqlite:///{staging / 'mlflow.db'}", args.runs, threads=1)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(staging, folder / "mlflow")
            marker.write_text(json.dumps({"runs": args.runs}))
            print(f"logged {args.runs:,} finetune runs in {time.perf_counter() - start:.1f} s (once; kept in {folder})")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    with LocalMlflowServer(folder / "mlflow") as server:
        mlflow.set_tracking_uri(server.uri)
        experiment = mlflow.get_experiment_by_name(STUDY).experiment_id
        cache = Path(tempfile.mkdtemp(prefix="ss-bench-cache-"))
        try:
            plain_s, plain = best_of(args.repeat, lambda: mlflow.search_runs(
                experiment_ids=[experiment], max_results=100_000))

            def cold():
                shutil.rmtree(cache, ignore_errors=True)
                return results.load(STUDY, tracking_uri=server.uri, cache_dir=cache, page_size=args.page_size)

            cold_s, df = best_of(args.repeat, cold)
            warm_s, warm = best_of(args.repeat, lambda: results.load(STUDY, tracking_uri=server.uri, cache_dir=cache,
                                                                      page_size=args.page_size))
            added = populate(server.uri, 100, threads=args.threads, offset=args.runs, end_time=int(time.time() * 1000))
            start = time.perf_counter()
            incr = results.load(STUDY, tracking_uri=server.uri, cache_dir=cache, page_size=args.page_size)
            incr_s = time.perf_counter() - start
            from mlflow.tracking import MlflowClient

            client = MlflowClient(server.uri)
            for run_id in added:  # leave the kept db as it was
                client.delete_run(run_id)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    finetune_plain = int((plain["tags.node_kind"] == "finetune").sum())
    print(f"runs: {len(plain):,} in the experiment, {finetune_plain:,} finetune; "
          f"results.load rows: {len(df):,} (cold), {len(warm):,} (warm), {len(incr):,} (after +100)")
    print(f"plain mlflow.search_runs(max_results=100000): {plain_s:6.2f} s  (no factors derived, no cache)")
    print(f"results.load, cold (no cache):                {cold_s:6.2f} s  ratio {cold_s / plain_s:.2f}x plain")
    print(f"results.load, warm (cache, nothing new):      {warm_s:6.2f} s  fetched {warm.attrs['fetched']} runs")
    print(f"results.load, incremental (+100 runs):        {incr_s:6.2f} s  fetched {incr.attrs['fetched']} runs")
    print(f"target: cold <= 10 s for 10,000 runs: {'met' if cold_s <= 10 else 'NOT met'} "
          f"(page size {args.page_size:,}; best of {args.repeat}; shared machine: noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
