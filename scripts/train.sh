#!/bin/sh
# Full-softmax training (the baseline head; CosFace/ArcFace margins via config).
#
#   sh scripts/train.sh [dataset_path] [key=value ...]
#
# No dataset path: the built-in synthetic identities (configs/synthetic_full.yaml).
# A dataset path (an InsightFace folder with train.rec/train.idx, a rec2img folder with
# train_list.txt, or a list file): configs/faces_full.yaml; every *.bin beside it is evaluated.
# Env: CONFIG=path.yaml picks another config; NPROC=N processes per node (default: one per GPU,
#      else 1); PYTHON=python interpreter; several nodes: NNODES, NODE_RANK, MASTER_ADDR,
#      MASTER_PORT (or RDZV_ENDPOINT), run on every node (scripts/_launch_args.sh).
set -eu
CALLER_DIR=$(pwd)
cd "$(dirname "$0")/.."
SYNTHETIC_CONFIG=configs/synthetic_full.yaml
DATASET_CONFIG=configs/faces_full.yaml
. scripts/_launch_args.sh
if [ "$WORLD" -gt 1 ]; then
  echo "launching torchrun: node $NODE_RANK of $NNODES, $NPROC processes each ($CONFIG)"
  HFSOFTMAX_ERROR_FILE=$(mktemp -u "${TMPDIR:-/tmp}/hfsoftmax-error.XXXXXX")
  export HFSOFTMAX_ERROR_FILE
  set +e
  # shellcheck disable=SC2086
  "$PY" -m torch.distributed.run $TORCHRUN -m hfsoftmax.train --config "$CONFIG" "$@"
  STATUS=$?
  if [ -s "$HFSOFTMAX_ERROR_FILE" ]; then cat "$HFSOFTMAX_ERROR_FILE" >&2; fi   # the rank's one line, last
  rm -f "$HFSOFTMAX_ERROR_FILE"
  exit $STATUS
fi
exec "$PY" -m hfsoftmax.train --config "$CONFIG" "$@"
