"""The cluster path on one GPU: Ray Train pretraining, a Ray Tune fan-out, a micro study end to end.

    bash benchmarks/gpu_check.sh                    # on one H100/H200: under 8 minutes
    bash benchmarks/gpu_check.sh --cpu              # the same steps at tiny sizes on CPU (tests/test_gpu_check.py)
    bash benchmarks/gpu_check.sh --only pretrain    # one step: pretrain, fanout or study
    bash benchmarks/gpu_check.sh --json out.json    # also write the numbers as JSON

Run it through `gpu_check.sh`, which installs Ray from a carried `.whl` folder first where the
machine has none. Three steps, in one local Ray (the machine's CPUs and GPU):

  pretrain  one Ray Train run (`TorchTrainer`, 1 worker, 1 GPU) that trains BERT-large (seq 128,
            bf16, AdamW, BERT's dropout) with DDP and with FSDP2, each eager and under
            torch.compile, on random token ids streamed from a corpus build: tokens/s and MFU
            (model FLOPs over the device's dense bf16 peak, presets/devices.yaml) over the log
            windows after the first. With one worker DDP has nothing to wrap, so `ddp` is the plain
            model with autocast; `fsdp` is `fully_shard` with bf16 parameters and reduction
            (MixedPrecisionPolicy), the paper recipe's path.
  fanout    a Ray Tune run of 4 finetune trials at 0.25 GPU each (`tune.with_resources`) on a real
            task (scierc_re, from the task mirror), a BERT-base shape built from its config:
            examples/s per trial, all trials' examples over the fan-out's wall time, and the GPU's
            utilisation sampled by nvidia-smi while they run.
  study     `scaling-study run` on a micro study (debug model, one task, capped) with
            `pretrain.gpus_per_worker: 1` and `finetune.gpus_per_job: 0.25`, tracked by the
            embedded MLflow server, then `results.load`: one row per result cell. MLflow does not fit
            beside Ray in what travels to a GPU machine (gpu_check.sh): without it the step is
            skipped and says so.

`--cpu` runs the same steps with the debug preset, seq 32, a few steps and tiny task caps, on CPU
(gloo; fractional CPUs instead of fractional GPUs; torch.compile with dynamo's eager backend, so
that the tracing runs but no C++ is built), to keep the script from rotting; its numbers mean
nothing. Task data: `--data-dir`, else $SCALING_STUDY_DATA_DIR, else ../shared/datasets
beside the repository, else `.gpu-data/` in it (copy ../shared/datasets/scierc_re there to carry it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TASK = "scierc_re"
VARIANTS = [("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True)]  # eager first: compile is slow


def sizes(cpu: bool) -> dict:
    """Model and run sizes of each step: BERT-large on a GPU, the debug preset on CPU."""
    if cpu:
        return {"preset": "debug", "vocab": 1000, "seq_len": 32, "batch": 8, "steps": 6, "log_every": 2,
                "finetune_preset": "debug", "max_train": 24, "max_eval": 8, "study_steps": 4}
    return {"preset": "large", "vocab": 30522, "seq_len": 128, "batch": 256, "steps": 25, "log_every": 5,
            "finetune_preset": "base", "max_train": None, "max_eval": 200, "study_steps": 40}


# ----------------------------------------------------------------------------------- (a) pretraining


def _pretrain_worker(args: dict) -> list[dict]:
    """On the Ray Train worker: every variant in turn, each a fresh model; rank 0's rows come back."""
    import ray.train.torch
    import torch

    from scaling_study.models import load_presets
    from scaling_study.pretrain import MemoryLogger, PretrainConfig, train_mlm

    s, device = args["sizes"], ray.train.torch.get_device()
    if device.type == "cpu":  # dynamo's tracing and guards, without Inductor's C++ build (minutes on CPU)
        torch.nn.Module.compile = functools.partialmethod(torch.nn.Module.compile, backend="eager")
    rows = []
    for strategy, compiled in VARIANTS:
        config = PretrainConfig(
            preset=load_presets()[s["preset"]], vocab_size=s["vocab"], total_steps=s["steps"], seq_len=s["seq_len"],
            batch_size=s["batch"], lr=1e-4, warmup_fraction=0.0, schedule="constant", precision="bf16",
            strategy=strategy, compile=compiled, log_every=s["log_every"], num_threads=args["threads"])
        log = MemoryLogger()
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        train_mlm(config, args["corpus"], Path(args["out"]) / f"{strategy}-{compiled}", resume=False, logger=log,
                  device=device)
        measured = log.history[1:] or log.history  # the first window holds the warmup (and the compile)
        rows.append({
            "strategy": strategy, "compile": compiled, "loss": log.history[-1]["loss"],
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in measured),
            "mfu": statistics.fmean(r["mfu"] for r in measured), "wall_s": time.perf_counter() - started,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        })
    return rows


def pretrain_check(cpu: bool, tmp: Path, threads: int) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from scaling_study.pretrain import write_synthetic_corpus

    s = sizes(cpu)
    corpus = write_synthetic_corpus(tmp / "corpus", vocab_size=s["vocab"], seq_len=s["seq_len"],
                                    num_sequences=min(s["steps"] * s["batch"], 65_536), num_shards=8)
    trainer = TorchTrainer(
        _pretrain_worker,
        train_loop_config={"sizes": s, "corpus": f"file://{corpus}", "out": str(tmp / "pretrain"),
                           "threads": threads},  # file://: the object-store path, shards streamed
        scaling_config=ScalingConfig(num_workers=1, use_gpu=not cpu, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name="gpu-check-pretrain", storage_path=str(tmp / "ray")))
    return list(trainer.fit().return_value)


# ----------------------------------------------------------------------------------- (b) finetune fan-out


def _finetune_trial(config: dict) -> None:
    import torch
    from ray import tune

    from scaling_study.finetune import FinetuneConfig, finetune
    from scaling_study.spec import TaskCaps
    from scaling_study.tasks.data import load_task_data, mirror_dirs
    from scaling_study.tasks.registry import discover

    torch.set_num_threads(max(1, int(config["cpus"])))
    task = discover().tasks[TASK]
    caps = TaskCaps(max_train_examples=config["max_train"], max_dev_examples=config["max_eval"],
                    max_test_examples=config["max_eval"])
    data = load_task_data(task, mirror_dirs(config["data_dir"]), caps=caps, allow_download=False)
    fc = FinetuneConfig(lr=5e-5, batch_size=32, max_seq_len=128, precision="bf16", select="last")
    result = finetune(config["model"], task, data, fc, [1], config["seed"], config["out"])[-1]
    tune.report({"examples_per_s": result["examples_per_s"], "train_examples": data.sizes["train"],
                 "test_f1": result["test"]["f1"]})


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 200 ms while in the `with` block (nothing without nvidia-smi)."""

    def __enter__(self) -> GpuSampler:
        self.samples: list[float] = []
        exe = shutil.which("nvidia-smi")
        self.proc = exe and subprocess.Popen(
            [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.samples = [float(x) for x in out.split() if x.replace(".", "").isdigit()]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def fanout_check(cpu: bool, tmp: Path, data_dir: Path) -> dict:
    from ray import tune

    from scaling_study.finetune import build_scratch_model
    from scaling_study.tasks.data import load_task_data, mirror_dirs
    from scaling_study.tasks.registry import discover

    s = sizes(cpu)
    train = load_task_data(discover().tasks[TASK], mirror_dirs(data_dir), allow_download=False).splits["train"]
    texts = [ex.get("text") or " ".join(ex.get("tokens", [])) for ex in train][:s["max_train"] or None]
    model = build_scratch_model(tmp / "ft-model", texts, preset=s["finetune_preset"], vocab_size=8000)
    share = {"cpu": 0.5} if cpu else {"cpu": 2, "gpu": 0.25}  # four trials on one device at once
    space = {"model": str(model), "data_dir": str(data_dir), "max_train": s["max_train"], "max_eval": s["max_eval"],
             "cpus": share["cpu"], "seed": tune.grid_search([0, 1, 2, 3]), "out": str(tmp / "ft")}
    tuner = tune.Tuner(tune.with_resources(_finetune_trial, share), param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=4),
                       run_config=tune.RunConfig(name="gpu-check-fanout", storage_path=str(tmp / "ray"), verbose=0))
    started = time.perf_counter()
    with GpuSampler() as gpu:
        grid = tuner.fit()
    wall = time.perf_counter() - started
    rows = [r.metrics for r in grid]
    if any(r.error for r in grid):
        raise RuntimeError(f"finetune trials failed: {[str(r.error) for r in grid if r.error]}")
    return {"trials": len(rows), "gpu_share": share.get("gpu", 0), "wall_s": wall,
            "examples_per_s_per_trial": [r["examples_per_s"] for r in rows],
            "examples_per_s_all": sum(r["train_examples"] for r in rows) / wall,
            "test_f1": [r["test_f1"] for r in rows], "gpu_util_mean": gpu.mean, "gpu_util_samples": len(gpu.samples)}


# ----------------------------------------------------------------------------------- (c) micro study


def study_check(cpu: bool, tmp: Path, data_dir: Path) -> dict:
    import importlib.util

    import yaml

    if importlib.util.find_spec("mlflow") is None:
        return {"skipped": "MLflow is not installed (it does not travel beside Ray): carry .whl-mlflow"}
    from scaling_study import results
    from scaling_study.cli import main as cli
    from scaling_study.tasks.data import load_task_data, mirror_dirs
    from scaling_study.tasks.registry import discover

    s = sizes(cpu)
    train = load_task_data(discover().tasks[TASK], mirror_dirs(data_dir), allow_download=False).splits["train"]
    (tmp / "corpus.txt").write_text("\n".join(ex.get("text") or " ".join(ex["tokens"]) for ex in train) + "\n")
    spec = {
        "name": "gpucheck", "corpus": {"name": TASK, "paths": [str(tmp / "corpus.txt")], "vocab_size": 1500},
        "model_sizes": ["debug"], "data_volumes": ["100%"],
        "pretrain": {"steps": [s["study_steps"]], "batch_size": 16, "seq_len": 64, "precision": "bf16",
                     "lr": 1e-3, "log_every": s["study_steps"] // 2, "gpus_per_worker": 0 if cpu else 1},
        "finetune": {"epochs": [1], "seeds": [0] if cpu else [0, 1, 2, 3], "lr": 1e-3, "batch_size": 16,
                     "max_seq_len": 64, "gpus_per_job": 0 if cpu else 0.25},
        "tasks": {"include": [TASK], "data_dir": str(data_dir), "max_train_examples": 32,
                  "max_dev_examples": 16, "max_test_examples": 16},
        "storage": {"root": str(tmp / "studies")},
    }
    (tmp / "gpucheck.yaml").write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    status = cli(["run", str(tmp / "gpucheck.yaml"), "--quiet"])
    wall = time.perf_counter() - started
    frame = results.load(str(tmp / "gpucheck.yaml")) if status == 0 else None
    return {"exit_status": status, "wall_s": wall, "tracking": "embedded MLflow server (sqlite)",
            "result_rows": None if frame is None else len(frame),
            "test_f1": None if frame is None else [float(x) for x in frame["test_f1"]]}


# ----------------------------------------------------------------------------------- main


def _data_dir(given: str | None) -> Path:
    for candidate in (given, os.environ.get("SCALING_STUDY_DATA_DIR"), REPO.parent / "shared" / "datasets",
                      REPO / ".gpu-data"):
        if candidate and (Path(candidate) / TASK).is_dir():
            return Path(candidate).resolve()
    raise SystemExit(f"gpu_check: no task data for {TASK}: give --data-dir or copy ../shared/datasets/{TASK} "
                     "into .gpu-data/")


def report(results: dict) -> None:
    for row in results.get("pretrain", []):
        mfu = f"MFU {row['mfu']:.1%}" if row["mfu"] == row["mfu"] else "MFU n/a"
        print(f"pretrain {row['strategy']:4s} compile={str(row['compile']):5s} {row['tokens_per_s']:12,.0f} tokens/s "
              f"{mfu}  loss {row['loss']:.3f}  ({row['wall_s']:.0f} s)")
    if "fanout" in results:
        f = results["fanout"]
        util = f"GPU utilisation {f['gpu_util_mean']:.0f}% ({f['gpu_util_samples']} samples)" \
            if f["gpu_util_mean"] is not None else "GPU utilisation n/a (no nvidia-smi)"
        per = ", ".join(f"{x:.0f}" for x in f["examples_per_s_per_trial"])
        print(f"fanout {f['trials']} trials at {f['gpu_share']} GPU: {per} examples/s each, "
              f"{f['examples_per_s_all']:.1f} examples/s over the fan-out's {f['wall_s']:.0f} s; {util}")
    if "study" in results:
        s = results["study"]
        print(f"study skipped: {s['skipped']}" if "skipped" in s else
              f"study exit {s['exit_status']} in {s['wall_s']:.0f} s, {s['result_rows']} result rows, "
              f"tracking: {s['tracking']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU (CI)")
    parser.add_argument("--only", choices=["pretrain", "fanout", "study"], action="append",
                        help="run only these steps (repeatable)")
    parser.add_argument("--data-dir", help=f"task mirror holding {TASK}/")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)

    import ray
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run with --cpu for the CPU variant")
        return 0
    steps = args.only or ["pretrain", "fanout", "study"]
    data_dir = _data_dir(args.data_dir) if {"fanout", "study"} & set(steps) else None
    cpus = os.cpu_count() or 2
    threads = 1 if args.cpu else max(1, min(8, cpus // 2))
    temp = tempfile.mkdtemp(prefix="ss-", dir="/tmp")  # Ray's unix sockets need a short path
    os.environ.setdefault("SCALING_STUDY_CACHE", f"{temp}/cache")  # storage mirrors; Ray's workers inherit it
    out: dict = {"device": torch.cuda.get_device_name(0) if not args.cpu else "cpu", "torch": torch.__version__,
                 "ray": ray.__version__}
    print(f"gpu_check: {out['device']}, torch {out['torch']}, ray {out['ray']}, steps {', '.join(steps)}", flush=True)
    from scaling_study.raycluster import loopback_only

    with loopback_only():
        ray.init(num_cpus=max(cpus, 2), num_gpus=0 if args.cpu else 1, include_dashboard=False, _temp_dir=temp,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=True, logging_level="WARNING")
    try:
        work = Path(temp) / "work"
        checks = {"pretrain": lambda: pretrain_check(args.cpu, work, threads),
                  "fanout": lambda: fanout_check(args.cpu, work, data_dir),
                  "study": lambda: study_check(args.cpu, work, data_dir)}
        for step in steps:
            started = time.perf_counter()
            out[step] = checks[step]()
            print(f"gpu_check: {step} done in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0 if out.get("study", {}).get("exit_status", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
