#!/bin/sh
# HF-softmax training: the class matrix lives in a parameter server, a class index picks the
# M active classes of every batch.
#
#   sh scripts/train_hf.sh [dataset_path] [key=value ...]
#
# No dataset path: the built-in synthetic identities (configs/synthetic_hf.yaml); a path: an
# InsightFace folder (train.rec/train.idx), a rec2img folder or a list file (configs/faces_hf.yaml).
# The parameter server: with store.address=tcp://... the trainer uses that server (or shards,
# comma-separated); otherwise this script starts one on a free loopback port, prints where it
# runs, and stops it when training ends, fails or is interrupted. store.kind=local runs without
# any server (the store inside the single training process); store.kind=sharded splits the class
# matrix by rows across the training ranks' devices (model-parallel, no server).
# Env: CONFIG=path.yaml, NPROC=N processes (default: one per GPU, else 1), PYTHON=interpreter.
set -eu
CALLER_DIR=$(pwd)
cd "$(dirname "$0")/.."
SYNTHETIC_CONFIG=configs/synthetic_hf.yaml
DATASET_CONFIG=configs/faces_hf.yaml
. scripts/_launch_args.sh

RESOLVED=$("$PY" -m hfsoftmax.launch get store.kind store.address train.out_dir --config "$CONFIG" "$@")
KIND=$(printf '%s\n' "$RESOLVED" | sed -n 1p)
ADDRESS=$(printf '%s\n' "$RESOLVED" | sed -n 2p)
OUT_DIR=$(printf '%s\n' "$RESOLVED" | sed -n 3p)

# exec: the trainer replaces the (sub)shell running this, so its pid is the trainer's own.
run_trainer() {
  if [ "$NPROC" -gt 1 ]; then
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m hfsoftmax.train --config "$CONFIG" "$@"
  else
    exec "$PY" -m hfsoftmax.train --config "$CONFIG" "$@"
  fi
}

if [ "$KIND" = "local" ]; then
  if [ "$NPROC" -gt 1 ]; then
    echo "error: store.kind=local keeps the class matrix inside one process; use NPROC=1 or a parameter server" >&2
    exit 2
  fi
  echo "store: in-process (no parameter server)"
  run_trainer "$@"
  exit $?
fi

if [ "$KIND" = "sharded" ]; then
  echo "store: sharded by rows across the $NPROC training rank(s) (no parameter server)"
  run_trainer "$@"
  exit $?
fi

if [ -n "$ADDRESS" ]; then
  echo "store: parameter server at $ADDRESS (not started by this script)"
  run_trainer store.kind=remote "$@"
  exit $?
fi

# Start our own server. Its arguments come from the resolved config so the store matches the run.
SERVER_ARGS=$("$PY" -m hfsoftmax.launch server-args --num-clients "$NPROC" --config "$CONFIG" "$@")
mkdir -p "$OUT_DIR"
READY="$OUT_DIR/paramserver.addr"
LOG="$OUT_DIR/paramserver.log"
TOKEN=$("$PY" -c "import secrets; print(secrets.token_hex(16))")
rm -f "$READY"
# shellcheck disable=SC2086
PARAMSERVER_TOKEN="$TOKEN" "$PY" paramserver/paramserver.py --bind "tcp://127.0.0.1:0" --ready-file "$READY" \
  --no-final-snapshot $SERVER_ARGS >"$LOG" 2>&1 &
PS_PID=$!
cleanup() {
  if kill -0 "$PS_PID" 2>/dev/null; then
    kill -TERM "$PS_PID" 2>/dev/null || true
    i=0
    while kill -0 "$PS_PID" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$PS_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

i=0
while [ ! -s "$READY" ]; do
  if ! kill -0 "$PS_PID" 2>/dev/null; then
    echo "error: the parameter server exited during start-up; its log ($LOG):" >&2
    tail -n 20 "$LOG" >&2
    exit 1
  fi
  i=$((i + 1))
  if [ $i -gt 600 ]; then
    echo "error: the parameter server did not come up within 60 s; see $LOG" >&2
    exit 1
  fi
  sleep 0.1
done
ADDRESS=$(cat "$READY")
echo "store: parameter server started at $ADDRESS (pid $PS_PID, log $LOG)"
set +e
# The token reaches the trainer through the environment, not its command line (ps shows that).
export PARAMSERVER_TOKEN="$TOKEN"
HFSOFTMAX_ERROR_FILE=$(mktemp -u "${TMPDIR:-/tmp}/hfsoftmax-error.XXXXXX")
export HFSOFTMAX_ERROR_FILE
# In the background and waited for, so a plain `kill` of this script is handled at once (sh runs
# traps only between commands): the trainer and then the server are stopped.
run_trainer store.kind=remote "store.address=$ADDRESS" "$@" &
TRAINER_PID=$!
stop_all() {   # bounded: TERM, up to 5 s, then KILL; then the server
  kill -TERM "$TRAINER_PID" 2>/dev/null || true
  j=0
  while kill -0 "$TRAINER_PID" 2>/dev/null && [ $j -lt 50 ]; do sleep 0.1; j=$((j + 1)); done
  kill -KILL "$TRAINER_PID" 2>/dev/null || true
  cleanup
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
wait "$TRAINER_PID"
STATUS=$?
set -e
if [ "$NPROC" -gt 1 ] && [ -s "$HFSOFTMAX_ERROR_FILE" ]; then cat "$HFSOFTMAX_ERROR_FILE" >&2; fi   # a rank's one-line error, last
rm -f "$HFSOFTMAX_ERROR_FILE"
exit $STATUS
