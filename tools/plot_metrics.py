"""Curves of a run directory's metrics.jsonl as PNGs (Pillow only): loss, lr, samples/s, CPK,
the exposed parameter-server wait, and held-out verification.

    python tools/plot_metrics.py runs/synthetic_hf [--out runs/synthetic_hf/plots]

One PNG per figure that has data (``loss.png``, ``lr.png``, ``samples_per_s.png``, ``cpk.png``,
``ps_wait_ms.png``, ``verification.png``), x = training step. A line that is not JSON is an error
naming the file and line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

# (file, title, [(metrics key, legend)], event)
FIGURES = [
    ("loss.png", "training loss", [("loss", "loss")], "train"),
    ("lr.png", "learning rate", [("lr", "lr")], "train"),
    ("samples_per_s.png", "samples / s", [("samples_per_s", "samples/s")], "train"),
    ("cpk.png", "CPK: probability mass of the active set", [("cpk_exact", "exact top-M"), ("cpk_active", "selected")],
     "train"),
    ("ps_wait_ms.png", "exposed parameter-server wait (ms / step)", [("ps_wait_ms", "ps_wait_ms")], "train"),
]
COLOURS = [(200, 30, 30), (30, 90, 200), (20, 150, 60), (160, 60, 170), (220, 140, 0)]


def read_metrics(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
    return out


def line_plot(path: str, title: str, series: Sequence[tuple[str, list[float], list[float]]],
              size: tuple[int, int] = (560, 360), xlabel: str = "step") -> None:
    """Draw (legend, xs, ys) series on shared linear axes; atomic write."""
    from PIL import Image, ImageDraw

    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy if math.isfinite(y)]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    w, h = size
    left, right, top, bottom = 70, 20, 36, 40
    pw, ph = w - left - right, h - top - bottom
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph

    for k in range(6):
        fx, fy = x0 + k * (x1 - x0) / 5, y0 + k * (y1 - y0) / 5
        d.line([xy(fx, y0), xy(fx, y1)], fill=(230, 230, 230))
        d.line([xy(x0, fy), xy(x1, fy)], fill=(230, 230, 230))
        px, py = xy(fx, y0)
        d.text((px - 12, py + 4), f"{fx:.4g}", fill="black")
        px, py = xy(x0, fy)
        d.text((px - 64, py - 6), f"{fy:.4g}", fill="black")
    d.rectangle([xy(x0, y1), xy(x1, y0)], outline="black")
    for i, (name, sx, sy) in enumerate(series):
        c = COLOURS[i % len(COLOURS)]
        pts = [xy(x, y) for x, y in zip(sx, sy) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=c)
        d.text((left + 8 + 140 * i, top + ph - 16), name, fill=c)   # legend along the bottom
    d.text((left, 10), title, fill="black")
    d.text((left + pw // 2 - 3 * len(xlabel), h - 18), xlabel, fill="black")
    tmp = f"{path}.tmp.{os.getpid()}.png"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the figures of ``run_dir/metrics.jsonl``; returns the paths written."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    recs = read_metrics(path)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    figures = list(FIGURES)
    acc_keys = sorted({k for r in recs if r.get("event") == "eval" for k in r if k.endswith("_acc")})
    if acc_keys:
        figures.append(("verification.png", "held-out verification accuracy", [(k, k[:-4]) for k in acc_keys], "eval"))
    for name, title, keys, event in figures:
        series = []
        for key, legend in keys:
            pts = [(r["step"], float(r[key])) for r in recs
                   if r.get("event") == event and isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                series.append((legend, [p[0] for p in pts], [p[1] for p in pts]))
        if series:
            line_plot(os.path.join(out_dir, name), title, series)
            written.append(os.path.join(out_dir, name))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="PNG curves of a run directory's metrics.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    a = p.parse_args(argv)
    try:
        paths = plot_run(a.run_dir, a.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for q in paths:
        print(q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
