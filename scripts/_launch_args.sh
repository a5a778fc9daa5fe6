# Sourced by train.sh and train_hf.sh (POSIX sh): turns their command line into PY, CONFIG, NPROC
# and the trainer's overrides in "$@". Set CALLER_DIR, SYNTHETIC_CONFIG and DATASET_CONFIG first.
#   first argument without '=' -> a dataset path (becomes data.path=...); the rest are key=value
#   CONFIG, NPROC, PYTHON from the environment win over the defaults. Without PYTHON the project's
#   own environment (.venv, made by `make setup`) is used when it exists, so the scripts work from
#   a fresh shell without activating anything.
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
DATA=""
if [ $# -gt 0 ]; then
  case "$1" in
    *=*) ;;                       # an override, not a path
    *) DATA=$1; shift ;;
  esac
fi
case "$DATA" in
  ""|/*) ;;
  *) DATA="${CALLER_DIR:-.}/$DATA" ;;   # relative to where the user ran the script, not the repo
esac
if [ -n "$DATA" ]; then
  CONFIG=${CONFIG:-$DATASET_CONFIG}
  set -- "data.path=$DATA" "$@"
else
  CONFIG=${CONFIG:-$SYNTHETIC_CONFIG}
fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
# Several nodes, the way torchrun users expect: NNODES (default 1) and NODE_RANK (0) with
# MASTER_ADDR / MASTER_PORT (default 29500), or RDZV_ENDPOINT=host:port (+ RDZV_ID) for torchrun's
# c10d rendezvous. TORCHRUN holds torchrun's launch arguments; WORLD = NNODES x NPROC ranks.
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD=$((NNODES * NPROC))
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  TORCHRUN="--nnodes $NNODES --nproc_per_node $NPROC --rdzv_backend c10d --rdzv_endpoint $RDZV_ENDPOINT --rdzv_id ${RDZV_ID:-hfsoftmax}"
elif [ "$NNODES" -gt 1 ]; then
  if [ -z "${MASTER_ADDR:-}" ]; then
    echo "error: NNODES=$NNODES needs MASTER_ADDR (node 0's address; with MASTER_PORT, default 29500) or RDZV_ENDPOINT=host:port" >&2
    exit 2
  fi
  TORCHRUN="--nnodes $NNODES --node_rank $NODE_RANK --master_addr $MASTER_ADDR --master_port ${MASTER_PORT:-29500} --nproc_per_node $NPROC"
else
  TORCHRUN="--standalone --nproc_per_node $NPROC"
fi
