#!/bin/sh
# Check that N ranks can all-reduce (gloo on CPU, NCCL on GPUs): prints PASS or FAIL, exit 0 or 1.
#
#   sh scripts/test_distributed.sh            # NPROC = number of GPUs, or 2 on CPU
#   NPROC=4 sh scripts/test_distributed.sh
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" tools/dist_check.py
