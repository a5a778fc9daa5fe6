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
# Env: CONFIG=path.yaml, NPROC=N processes per node (default: one per GPU, else 1), PYTHON=interpreter;
# several nodes: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or RDZV_ENDPOINT), run on every node
# (scripts/_launch_args.sh), with NODE_ADDRS and PARAMSERVER_TOKEN for a server shard per node.
set -eu
CALLER_DIR=$(pwd)
cd "$(dirname "$0")/.."
SYNTHETIC_CONFIG=configs/synthetic_hf.yaml
DATASET_CONFIG=configs/faces_hf.yaml
. scripts/_launch_args.sh

RESOLVED=$("$PY" -m hfsoftmax.launch get --world "$WORLD" store.kind store.address train.out_dir --config "$CONFIG" "$@")
KIND=$(printf '%s\n' "$RESOLVED" | sed -n 1p)
ADDRESS=$(printf '%s\n' "$RESOLVED" | sed -n 2p)
OUT_DIR=$(printf '%s\n' "$RESOLVED" | sed -n 3p)

# exec: the trainer replaces the (sub)shell running this, so its pid is the trainer's own.
run_trainer() {
  if [ "$WORLD" -gt 1 ]; then
    # shellcheck disable=SC2086
    exec "$PY" -m torch.distributed.run $TORCHRUN -m hfsoftmax.train --config "$CONFIG" "$@"
  else
    exec "$PY" -m hfsoftmax.train --config "$CONFIG" "$@"
  fi
}

if [ "$KIND" = "local" ]; then
  if [ "$WORLD" -gt 1 ]; then
    echo "error: store.kind=local keeps the class matrix inside one process; use NPROC=1 or a parameter server" >&2
    exit 2
  fi
  echo "store: in-process (no parameter server)"
  run_trainer "$@" store.kind=local
  exit $?
fi

if [ "$KIND" = "sharded" ]; then
  echo "store: sharded by rows across the $WORLD training rank(s) (no parameter server)"
  run_trainer "$@" store.kind=sharded
  exit $?
fi

if [ -n "$ADDRESS" ]; then
  echo "store: parameter server at $ADDRESS (not started by this script)"
  run_trainer store.kind=remote "$@"
  exit $?
fi

# Start our own server. Its arguments come from the resolved config so the store matches the run.
# Several nodes: each node serves shard NODE_RANK of NNODES at NODE_ADDRS[NODE_RANK]:PS_PORT+NODE_RANK
# (NODE_ADDRS: the nodes' addresses, comma-separated, the same list on every node), every rank uses
# all the shards, and PARAMSERVER_TOKEN (the same secret on every node) guards them.
SERVER_ARGS=$("$PY" -m hfsoftmax.launch server-args --num-clients "$WORLD" --config "$CONFIG" "$@")
mkdir -p "$OUT_DIR"
if [ "$NNODES" -gt 1 ]; then
  if [ -z "${NODE_ADDRS:-}" ] || [ -z "${PARAMSERVER_TOKEN:-}" ]; then
    echo "error: NNODES=$NNODES with a parameter server needs NODE_ADDRS=host0,host1,... (every node's address, in node order) and PARAMSERVER_TOKEN (the same secret on every node); or store.address=..., or store.kind=sharded" >&2
    exit 2
  fi
  PS_PORT=${PS_PORT:-29600}
  BIND=""
  ADDRESS=""
  i=0
  for host in $(printf '%s\n' "$NODE_ADDRS" | tr ',' ' '); do
    ADDRESS="${ADDRESS:+$ADDRESS,}tcp://$host:$((PS_PORT + i))"
    if [ $i -eq "$NODE_RANK" ]; then BIND="tcp://$host:$((PS_PORT + i))"; fi
    i=$((i + 1))
  done
  if [ $i -ne "$NNODES" ] || [ -z "$BIND" ]; then
    echo "error: NODE_ADDRS lists $i address(es), NNODES=$NNODES (NODE_RANK=$NODE_RANK)" >&2
    exit 2
  fi
  SHARD="--shard $NODE_RANK/$NNODES"
  READY="$OUT_DIR/paramserver-$NODE_RANK.addr"
  LOG="$OUT_DIR/paramserver-$NODE_RANK.log"
  TOKEN=$PARAMSERVER_TOKEN
else
  BIND="tcp://127.0.0.1:0"
  SHARD=""
  READY="$OUT_DIR/paramserver.addr"
  LOG="$OUT_DIR/paramserver.log"
  TOKEN=$("$PY" -c "import secrets; print(secrets.token_hex(16))")
fi
rm -f "$READY"
# shellcheck disable=SC2086
PARAMSERVER_TOKEN="$TOKEN" "$PY" paramserver/paramserver.py --bind "$BIND" --ready-file "$READY" \
  --no-final-snapshot $SHARD $SERVER_ARGS >"$LOG" 2>&1 &
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
if [ "$NNODES" -gt 1 ]; then
  echo "store: parameter server shard $NODE_RANK/$NNODES started at $(cat "$READY") (pid $PS_PID, log $LOG); all shards: $ADDRESS"
else
  ADDRESS=$(cat "$READY")
  echo "store: parameter server started at $ADDRESS (pid $PS_PID, log $LOG)"
fi
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
if [ "$WORLD" -gt 1 ] && [ -s "$HFSOFTMAX_ERROR_FILE" ]; then cat "$HFSOFTMAX_ERROR_FILE" >&2; fi   # a rank's one-line error, last
rm -f "$HFSOFTMAX_ERROR_FILE"
exit $STATUS
