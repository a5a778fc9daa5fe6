#!/bin/sh
# What `make train` runs: HF-softmax (the main job, scripts/train_hf.sh), then the same run with
# random class sampling at the same M (the Partial-FC-style baseline), then both side by side.
#
#   sh scripts/demo.sh [dataset_path] [key=value ...]
#
# The arguments go to both runs; the baseline writes to <train.out_dir>_random.
# Env: as scripts/train_hf.sh (CONFIG, NPROC, PYTHON).
set -eu
CALLER_DIR=$(pwd)
cd "$(dirname "$0")/.."
SYNTHETIC_CONFIG=configs/synthetic_hf.yaml
DATASET_CONFIG=configs/faces_hf.yaml
. scripts/_launch_args.sh          # sets PY, CONFIG and turns a dataset path into data.path=...
OUT_DIR=$("$PY" -m hfsoftmax.launch get train.out_dir --config "$CONFIG" "$@")
export CONFIG NPROC                # resolved once (NPROC asks torch for the GPUs: seconds)
sh scripts/train_hf.sh "$@"
echo
echo "baseline: random class sampling at the same M ($OUT_DIR""_random)"
sh scripts/train_hf.sh "$@" head.name=random head.index=random "train.out_dir=${OUT_DIR}_random"
echo
echo "HF-softmax beside random sampling at the same M (same data, steps and seed):"
"$PY" tools/compare_runs.py "$OUT_DIR" "${OUT_DIR}_random"
