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
