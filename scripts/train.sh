#!/bin/sh
# Full-softmax training (the baseline head; CosFace/ArcFace margins via config).
#
#   sh scripts/train.sh [dataset_path] [key=value ...]
#
# No dataset path: the built-in synthetic identities (configs/synthetic_full.yaml).
# A dataset path (an InsightFace folder with train.rec/train.idx, a rec2img folder with
# train_list.txt, or a list file): configs/faces_full.yaml; every *.bin beside it is evaluated.
# Env: CONFIG=path.yaml picks another config; NPROC=N processes (default: one per GPU, else 1);
#      PYTHON=python interpreter.
set -eu
CALLER_DIR=$(pwd)
cd "$(dirname "$0")/.."
SYNTHETIC_CONFIG=configs/synthetic_full.yaml
DATASET_CONFIG=configs/faces_full.yaml
. scripts/_launch_args.sh
if [ "$NPROC" -gt 1 ]; then
  echo "launching torchrun with $NPROC processes ($CONFIG)"
  HFSOFTMAX_ERROR_FILE=$(mktemp -u "${TMPDIR:-/tmp}/hfsoftmax-error.XXXXXX")
  export HFSOFTMAX_ERROR_FILE
  set +e
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m hfsoftmax.train --config "$CONFIG" "$@"
  STATUS=$?
  if [ -s "$HFSOFTMAX_ERROR_FILE" ]; then cat "$HFSOFTMAX_ERROR_FILE" >&2; fi   # the rank's one line, last
  rm -f "$HFSOFTMAX_ERROR_FILE"
  exit $STATUS
fi
exec "$PY" -m hfsoftmax.train --config "$CONFIG" "$@"
