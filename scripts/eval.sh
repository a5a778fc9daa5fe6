#!/bin/sh
# Evaluate a training checkpoint on every verification .bin in a folder (lfw, cfp_fp, agedb_30, ...).
#   sh scripts/eval.sh ARCH MODEL_PATH DATASET_PATH OUTPUTS
# ARCH: backbone name (tiny, hynet, resnet50, ...) or "auto" to read it from the checkpoint.
# Writes OUTPUTS/results.md, OUTPUTS/results.json and OUTPUTS/roc_<set>.png.
# Environment: PYTHON (default: the project's .venv, else python3), DEVICE (default cpu), BATCH_SIZE (default 64).
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python3; fi
if [ "$#" -ne 4 ]; then
    echo "usage: sh scripts/eval.sh ARCH MODEL_PATH DATASET_PATH OUTPUTS" >&2
    exit 2
fi
ARCH=$1; MODEL=$2; DATA=$3; OUT=$4
if [ ! -f "$MODEL" ]; then echo "error: checkpoint not found: $MODEL" >&2; exit 2; fi
if [ ! -e "$DATA" ]; then echo "error: dataset path not found: $DATA" >&2; exit 2; fi
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m hfsoftmax.eval verify --arch "$ARCH" --model "$MODEL" --data "$DATA" \
    --out "$OUT" --device "${DEVICE:-cpu}" --batch-size "${BATCH_SIZE:-64}"
