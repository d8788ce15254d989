#!/usr/bin/env bash
# Reproducible CPU install into ./.venv: exact versions from requirements/cpu.lock, torch kept at
# its CPU build (installed first and pinned, so no dependency can pull a CUDA build of several GB).
#
#   bash scripts/install-cpu.sh            # then: .venv/bin/scaling-study --help
#   bash scripts/install-cpu.sh --tests    # also Debian's chromium, which the report test drives headless
#
# Where pip cannot find the CPU wheel (torch==2.13.0+cpu) on its own, point it at PyTorch's CPU
# index first:  export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c requirements/cpu.lock torch
"${pip[@]}" install -c requirements/cpu.lock -e ".[test]"
.venv/bin/python - <<'PY'
import torch
assert not torch.version.cuda, f"expected the CPU build of torch, got CUDA {torch.version.cuda}"
print(f"scaling-study installed in .venv (torch {torch.__version__}, CPU build)")
PY
if [ "${1:-}" = "--tests" ] && ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: no chromium, and no root apt-get to install it: tests/test_report.py's browser test will skip" >&2
  fi
fi
