"""Print training runs side by side from their metrics.jsonl: the final evaluation and speed.

    python tools/compare_runs.py runs/synthetic_hf runs/synthetic_random [...]

One row per run: head, M (num_active) and K, held-out verification accuracy of each set (a dataset
folder's .bin files), top-1 / top-5 identification over all K (synthetic runs with data.val_samples),
top-1 / top-5 classification on data.val_path, the last CPK probe, steps, wall time and samples/s.
Evaluation columns appear only when some run has them (a run on a list or folder without .bin files
and without data.val_path evaluates nothing). A run without a final 'done' record is an error naming
its file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml


def summary(run_dir: str) -> dict[str, Any]:
    """The figures of one finished run (its last eval, done and train records, and its config)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (is {run_dir} a training run directory?)")
    last: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {lineno} is not JSON") from None
            last[rec.get("event", "")] = rec
    if "done" not in last:
        raise ValueError(f"{path}: the run has not finished (no final 'done' record)")
    cfg: dict[str, Any] = {}
    cfg_path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    head = cfg.get("head", {})
    ev, done, tr = last.get("eval", {}), last["done"], last.get("train", {})
    return {"run": run_dir, "head": head.get("name", "?"),
            "M": tr.get("num_active", head.get("num_active")) if head.get("name") in ("hf", "random") else None,
            "K": done.get("num_classes"),
            "verification": {k[:-4]: v for k, v in ev.items() if k.endswith("_acc")},
            "top1": ev.get("heldout_top1"), "top5": ev.get("heldout_top5"),
            "val_top1": ev.get("val_top1"), "val_top5": ev.get("val_top5"),
            "cpk": tr.get("cpk_active"), "steps": done.get("steps"), "wall_s": done.get("wall_s"),
            "samples_per_s": done.get("samples_per_s")}


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


# (column title, row key) of the evaluation figures, shown only when some run has them
_EVAL_COLUMNS = (("top-1 (%)", "top1"), ("top-5 (%)", "top5"), ("val top-1 (%)", "val_top1"),
                 ("val top-5 (%)", "val_top5"))


def format_table(rows: list[dict[str, Any]]) -> str:
    sets = sorted({s for r in rows for s in r["verification"]})
    evals = [(title, key) for title, key in _EVAL_COLUMNS if any(r.get(key) is not None for r in rows)]
    head = (["run", "head", "M / K"] + [f"{s} verif. (%)" for s in sets] + [title for title, _ in evals]
            + ["CPK(M)", "steps", "wall (s)", "samples/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        mk = f"{r['M']} / {r['K']}" if r["M"] else f"all / {r['K']}"
        cells = ([r["run"], r["head"], mk] + [_pct(r["verification"].get(s)) for s in sets]
                 + [_pct(r.get(key)) for _, key in evals]
                 + [_num(r["cpk"], ".3f"), str(r["steps"]), _num(r["wall_s"], ".0f"), _num(r["samples_per_s"], ".0f")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (train.out_dir)")
    args = ap.parse_args(argv)
    try:
        rows = [summary(r) for r in args.runs]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
