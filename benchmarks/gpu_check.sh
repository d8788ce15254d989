#!/usr/bin/env bash
# The cluster path on one GPU (benchmarks/gpu_check.py says what each step measures): Ray Train
# pretraining of BERT-large (bf16; DDP and FSDP2; eager and torch.compile: tokens/s, MFU), a Ray
# Tune fan-out of 4 finetune trials at 0.25 GPU (examples/s, GPU utilisation) and a micro study
# end to end with gpus_per_worker: 1. Under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                   # on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu             # the same steps at tiny sizes on CPU (CI: tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --only study      # one step (pretrain, fanout, study); --json FILE for the numbers
#
# A GPU machine may have no Ray: build the wheels here first, in the repository root, and carry
# them (`.whl`); this script installs them to /tmp/site when `import ray` fails:
#   bash ../shared/tools/gpu-wheels.sh && echo /.whl/ >> .git/info/exclude
# MLflow (the study step's tracking) does not fit beside Ray in what travels (64 MiB): without it
# the study step is skipped and says so. A `.whl-mlflow` folder of its wheels, carried in a second
# call on the same warm machine (`--only study`), is installed the same way.
# Task data (scierc_re, 1.2 MB): $SCALING_STUDY_DATA_DIR, ../shared/datasets, or a copy in .gpu-data/
# (mkdir -p .gpu-data && cp -r ../shared/datasets/scierc_re .gpu-data/; carry it too).
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=/tmp/site
install() {  # a folder of wheels into $site, without an index or their dependencies
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$1"/*.whl
}
if ! "$py" -c "import ray" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu_check: no Ray here and no .whl folder to install it from (../shared/tools/gpu-wheels.sh)" >&2
    exit 1
  fi
  install .whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$py" -c "import mlflow" 2>/dev/null && [ -d .whl-mlflow ]; then
  install .whl-mlflow
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_check.py "$@"
