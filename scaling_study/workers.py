"""What runs on Ray workers: one function per stage, each writing its node's output to storage.

    ray.remote(corpus_task, num_returns=len(nodes)).remote(study, nodes, out_dirs, logs)  # -> each volume's manifest
    ray.remote(pretrain_task).remote(study, plan, node_id, corpus_dir, out_dir, uri, run_id, log)  # -> final metrics
    tune.with_parameters(finetune_trial, study=study, uri=uri)           # a Ray Tune trainable: runs of one model

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
from scaling_study.artifacts import DONE_FILE, FINAL_FILE, MANIFEST, STATE_FILE, write_done
from scaling_study.grid import Node, Plan
from scaling_study.spec import Study
from scaling_study.storage import Store, local_copy
from scaling_study.tracking import redact_uri, tracking_calls

MAX_FAILURES = 2
"""Restarts a node's work gets after its process or Ray node dies: Ray task retries for a corpus
build, Ray Train worker-group restarts (from the last checkpoint) for a pretraining run (Ray task
retries for a one-worker run, `pretrain._one_worker`), Tune retries for a finetune trial. A
pretraining run's plain error is retried that many times too; a trial's own error is not
(`finetune_trial`)."""

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


def corpus_task(study: Study, nodes: list[Node], out_dirs: list[str], logs: list[str]) -> Any:
    """Build corpus nodes, the volumes of one corpus, into `out_dirs` (scaling_study.corpus), in one
    build; returns their manifests as dicts, one Ray return value per node (the only value for one)."""
    from scaling_study.corpus import build_corpora

    with contextlib.ExitStack() as logged:
        for log in logs:  # a failure is every node's: each log gets the traceback
            logged.enter_context(node_log(log))
        outs = [Store(d) for d in out_dirs]  # URIs: build in the local mirrors, then upload, manifests last
        cache = outs[0].local.parent.parent / "cache"  # <study>/cache, as corpus.urls documents
        manifests = build_corpora(study, nodes, [o.local for o in outs], progress=False, cache_dir=cache)
        for out in outs:
            out.upload(last=(MANIFEST,))
        values = [dataclasses.asdict(m) for m in manifests]
        return values if len(values) > 1 else values[0]


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
    """One Tune trial: finetune runs of one model (tasks, seeds, epoch levels), one after the other.

    `config` (the driver's `Scheduler.trial_config`): model_source, model_options (an external
    model's revision and do_lower_case), cpus, and `runs`, each with node, task, seed, levels,
    out_dir, log and cells ({epochs level: MLflow run id}). The model's local copy is made once and
    each task's data and encoding once (`_Shared`); each run logs its own cells, uploads its folder
    and writes its own DONE.json, then reports (`node`, `test_f1`, `failure`), so a trial killed
    half-way leaves its finished runs done, and Tune's retry (a lost process or node) skips them.
    A run that fails by itself (missing data, a lost tracking server, a bug) would fail the same way
    again, so it reports its error (`failure`, one line) instead of raising.
    """
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(config["cpus"])))
    shared = _Shared(config, study)
    for run in config["runs"]:
        report = {"node": run["node"], "test_f1": float("nan"), "failure": ""}
        try:
            with node_log(run["log"]):
                report["test_f1"] = _finetune_run(run, shared, study, uri)
        except Exception as exc:
            report["failure"] = failure_reason(exc)
        tune.report(report)


class _Shared:
    """What a trial's runs share, made on first use: the model's local copy, and per task its data
    and `finetune.prepare`'s tokenizer, encoded task and weights (the runs come grouped by task:
    only the current task's are kept). A failure to make one is kept and raised again for every run
    that needs it (each run's log gets the traceback)."""

    def __init__(self, config: dict, study: Study):
        self.config, self.study = config, study
        self._model: tuple | None = None  # (local copy, or None) and the error making it, or None
        self._task: tuple | None = None  # (task id, what it made or None, its error or None)

    def get(self, task_id: str):
        if self._task is None or self._task[0] != task_id:
            self._task = (task_id, *_attempt(lambda: self._make(task_id)))
        return _outcome(self._task[1:])

    def model(self) -> Path:
        if self._model is None:  # weights and tokenizer only
            self._model = _attempt(lambda: local_copy(self.config["model_source"], exclude=(STATE_FILE,)))
        return _outcome(self._model)

    def _make(self, task_id: str):
        from scaling_study.finetune import FinetuneConfig, prepare
        from scaling_study.tasks.data import load_task_data, mirror_dirs

        study = self.study
        task = study.tasks[task_id]
        # an object-store tasks.data_dir: this task's folder comes down to this node's mirror first
        data = load_task_data(task, mirror_dirs(None, study, tasks=[task.id]), caps=study.caps[task.id])
        model = self.model()
        config = FinetuneConfig.from_spec(study.spec.finetune)
        return task, data, model, config, prepare(model, task, data, config,
                                                  **self.config.get("model_options", {}))


def _attempt(make) -> tuple:
    """(make(), None), or (None, the exception it raised): kept, to raise again for every run."""
    try:
        return make(), None
    except Exception as exc:
        return None, exc


def _outcome(made: tuple):
    if made[1] is not None:
        raise made[1]
    return made[0]


def _finetune_run(run: dict, shared: _Shared, study: Study, uri: str) -> float:
    from scaling_study.finetune import finetune
    from scaling_study.records import EpochLogger, log_cell, task_datasets

    store = Store(run["out_dir"])  # a URI: work in the local mirror, upload with DONE.json last
    if store.is_file(DONE_FILE):  # a retried trial: this run finished before the process was lost
        return float("nan")
    start = time.perf_counter()  # the first run's time includes loading what the trial's runs share
    task, data, model, config, inputs = shared.get(run["task"])
    results = finetune(model, task, data, config, run["levels"], run["seed"], store.local,
                       logger=EpochLogger(uri, run["cells"]), inputs=inputs)
    seconds = time.perf_counter() - start  # the node's own compute, for benchmarks/study_overhead.py
    cells = run["cells"]
    faults.point("finetune-log")
    datasets = task_datasets(task, data)  # the splits as used: MLflow dataset inputs of every cell
    with tracking_calls(uri):  # a lost server fails the run before DONE.json: a re-run redoes it
        for result in results:
            log_cell(uri, cells[str(result["epochs"])], result, store.local, datasets=datasets)
    store.upload()
    write_done(store, cells=cells, results=results, seconds=seconds)
    return float(results[-1]["test"]["f1"])
