"""benchmarks/gpu_check.sh --cpu: the GPU check's three steps at tiny sizes on CPU, so that the
script cannot rot between GPU runs (its numbers are printed by the script, never asserted)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED


@pytest.mark.slow
def test_gpu_check_runs_its_steps_on_cpu(tmp_path):
    data = Path(os.environ.get("SCALING_STUDY_DATA_DIR") or SHARED / "datasets")
    if not (data / "scierc_re").is_dir():
        pytest.skip(f"needs the task mirror ({data}/scierc_re)")
    env = {**os.environ, "PYTHON": sys.executable, "SCALING_STUDY_DATA_DIR": str(data),
           "SCALING_STUDY_CACHE": str(tmp_path / "cache")}
    script = REPO / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), "--cpu", "--json", str(tmp_path / "out.json")], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())

    variants = [(r["strategy"], r["compile"]) for r in out["pretrain"]]
    assert variants == [("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True)]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and 0 < r["mfu"] < 1 for r in out["pretrain"])
    fanout = out["fanout"]
    assert fanout["trials"] == 4 and all(x > 0 for x in fanout["examples_per_s_per_trial"])
    assert all(0 <= f1 <= 1 for f1 in fanout["test_f1"])
    study = out["study"]
    assert study["exit_status"] == 0 and study["result_rows"] == 1 and study["tracking"].startswith("embedded")
    assert "pretrain fsdp compile=True" in proc.stdout and "examples/s" in proc.stdout
