"""What runs on Ray workers: one function per stage, each writing its node's output to storage.

    ray.remote(corpus_task).remote(study, node, out_dir, log)            # -> the build's manifest, as a dict
    ray.remote(pretrain_task).remote(study, plan, node_id, corpus_dir, out_dir, uri, run_id, log)  # -> final metrics
    tune.with_parameters(finetune_trial, study=study, uri=uri)           # a Ray Tune trainable

`out_dir`, `corpus_dir` and `log` are storage locations (`Layout.location`): paths, or URIs whose
files each worker stages in its machine's mirror and uploads with the marker file last (a corpus
build is not staged: pretraining workers stream their shards from it). A failure
appends its traceback to the node's log (`node_log`) and propagates to the driver, which records
the node as failed (`failure_reason` gives the one line the summary shows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
import traceback
from pathlib import Path
from typing import Any

from scaling_study import faults
from scaling_study.artifacts import FINAL_FILE, MANIFEST, STATE_FILE, write_done
from scaling_study.grid import Node, Plan
from scaling_study.spec import Study
from scaling_study.storage import Store, local_copy
from scaling_study.tracking import redact_uri, tracking_calls

MAX_FAILURES = 2
"""Restarts a node's work gets after its process or Ray node dies: Ray task retries for a corpus
build, Ray Train worker-group restarts (from the last checkpoint) for a pretraining run, Tune
retries for a finetune trial. Ray Train also retries a plain error that many times; a trial's
own error is not retried (`finetune_trial`)."""

@contextlib.contextmanager
def node_log(location: str | Path):
    """On an exception, write its traceback to the node's log (the summary points there), then re-raise."""
    try:
        yield
    except BaseException:
        folder, _, name = str(location).rpartition("/")
        # tracebacks can quote a tracking URI: never its password
        Store(folder).append_text(name, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                                        f"{redact_uri(traceback.format_exc())}\n")
        raise


def failure_reason(exc: BaseException) -> str:
    """The root cause's first line, without Ray's wrapping."""
    cause = exc
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    text = str(cause).strip().splitlines()
    lines = [line for line in text if line.strip() and not line.startswith(("Traceback", "  File", "ray::"))]
    return redact_uri(lines[-1] if lines else type(cause).__name__)[:300]


def corpus_task(study: Study, node: Node, out_dir: str, log: str) -> dict:
    """Build a corpus node into `out_dir` (scaling_study.corpus); returns its manifest."""
    from scaling_study.corpus import build_corpus

    with node_log(log):
        out = Store(out_dir)  # a URI: build in the local mirror, then upload with the manifest last
        cache = out.local.parent.parent / "cache"  # <study>/cache, as corpus.urls documents
        manifest = build_corpus(study, node, out.local, progress=False, cache_dir=cache)
        out.upload(last=(MANIFEST,))
        return dataclasses.asdict(manifest)


def pretrain_task(study: Study, plan: Plan, node_id: str, corpus_dir: str, out_dir: str, uri: str,
                  run_id: str, log: str, _corpus: Any = None) -> dict:
    """Run a pretrain node with Ray Train (scaling_study.pretrain), logging to its MLflow run;
    returns the final metrics. `_corpus`: the corpus build's task, so that Ray starts this after it."""
    from scaling_study.pretrain import MlflowLogger, run_pretraining
    from scaling_study.progress import throughput_logger

    with node_log(log):
        mlflow_logger = functools.partial(MlflowLogger, uri, run_id)
        final = run_pretraining(study, plan, plan.nodes[node_id], corpus_dir, out_dir, max_failures=MAX_FAILURES,
                                logger_factory=functools.partial(throughput_logger, study.spec.name, node_id,
                                                                 mlflow_logger))
        final = json.loads(json.dumps(final, default=str))
        Store(out_dir).write_text(FINAL_FILE, json.dumps(final, indent=1))
        return final


def finetune_trial(config: dict, study: Study | None = None, uri: str = "") -> None:
    """One Tune trial: finetune a model on a task with a seed, log each epoch level's cell, mark done.

    `config` (the driver's `Scheduler.trial_config`): node, model_source, model_options (an external
    model's revision and do_lower_case), task, seed, levels, out_dir, log, cells ({epochs level:
    MLflow run id}), cpus. Tune retries a trial whose process
    or node died; one that fails by itself (missing data, a lost tracking server, a bug) would fail
    the same way again, so it reports its error (`failure`, one line) instead of raising.
    """
    from ray import tune

    try:
        with node_log(config["log"]):
            score = _finetune_run(config, study, uri)
    except Exception as exc:
        tune.report({"test_f1": float("nan"), "failure": failure_reason(exc)})
        return
    tune.report({"test_f1": score})


def _finetune_run(config: dict, study: Study, uri: str) -> float:
    import torch

    from scaling_study.finetune import FinetuneConfig, finetune
    from scaling_study.records import EpochLogger, log_cell, task_datasets
    from scaling_study.tasks.data import load_task_data, mirror_dirs

    torch.set_num_threads(max(1, int(config["cpus"])))
    store = Store(config["out_dir"])  # a URI: work in the local mirror, upload with DONE.json last
    start = time.perf_counter()
    task = study.tasks[config["task"]]
    # an object-store tasks.data_dir: this task's folder comes down to this node's mirror first
    data = load_task_data(task, mirror_dirs(None, study, tasks=[task.id]), caps=study.caps[task.id])
    model = local_copy(config["model_source"], exclude=(STATE_FILE,))  # weights and tokenizer only
    results = finetune(model, task, data, FinetuneConfig.from_spec(study.spec.finetune),
                       config["levels"], config["seed"], store.local, logger=EpochLogger(uri, config["cells"]),
                       **config.get("model_options", {}))
    seconds = time.perf_counter() - start  # the node's own compute, for benchmarks/study_overhead.py
    cells = config["cells"]
    faults.point("finetune-log")
    datasets = task_datasets(task, data)  # the splits as used: MLflow dataset inputs of every cell
    with tracking_calls(uri):  # a lost server fails the run before DONE.json: a re-run redoes it
        for result in results:
            log_cell(uri, cells[str(result["epochs"])], result, store.local, datasets=datasets)
    store.upload()
    write_done(store, cells=cells, results=results, seconds=seconds)
    return float(results[-1]["test"]["f1"])
