#!/bin/sh
# Check that N ranks can all-reduce (gloo on CPU, NCCL on GPUs): prints PASS or FAIL, exit 0 or 1.
#
#   sh scripts/test_distributed.sh            # NPROC = number of GPUs, or 2 on CPU
#   NPROC=4 sh scripts/test_distributed.sh
set -eu
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "FAIL: $PY cannot import torch (run 'make setup' first, or set PYTHON)"
  exit 1
fi
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" tools/dist_check.py || { echo "FAIL"; exit 1; }
