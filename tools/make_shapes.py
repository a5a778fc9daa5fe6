"""Render a real-like image classification dataset that is not faces: K classes of coloured shapes
with a letter, as JPEG files in the layout ``tools/rec2img.py`` writes (``images/<label>/<n>.jpg``,
``train_list.txt``, ``val_list.txt``), so ``data.path=<out>`` trains on it and evaluates top-k on
the held-out list.

A class is (shape, colour, letter): 8 shapes x 12 colours x 26 letters = 2496 classes at most, so
neighbouring classes differ in one attribute only (hard negatives: the same shape and letter in
another colour, ...). An image draws its class with nuisance: position, size, rotation, background
shade, blur and pixel noise, all from a generator seeded by (seed, class, image). A mirror of a
letter is another glyph, so train it with ``data.flip=false``.

    python tools/make_shapes.py --out data/shapes --classes 2000 --train 8 --val 2 --size 32
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "bar", "hexagon")
COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(LETTERS)


def class_of(k: int) -> tuple[str, tuple[int, int, int], str]:
    """Class k's (shape, colour, letter); classes are spread so that k and k + 1 differ in the letter."""
    letter = LETTERS[k % len(LETTERS)]
    rest = k // len(LETTERS)
    return SHAPES[rest % len(SHAPES)], COLOURS[(rest // len(SHAPES)) % len(COLOURS)], letter


def render(k: int, n: int, size: int, seed: int) -> "object":
    """Image n of class k (a PIL image, RGB, size x size)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    shape, colour, letter = class_of(k)
    g = np.random.default_rng([seed, k, n])
    S = 64                                                    # drawn at 64 px, then resized
    bg = tuple(int(v) for v in g.integers(0, 90, 3))
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    r = S * g.uniform(0.28, 0.40)
    cx, cy = S / 2 + g.uniform(-6, 6), S / 2 + g.uniform(-6, 6)
    col = tuple(int(np.clip(c + g.normal(0, 12), 0, 255)) for c in colour)
    rot = g.uniform(-0.3, 0.3)

    def poly(m: int, phase: float = 0.0, rr: float = r) -> list[tuple[float, float]]:
        return [(cx + rr * math.cos(phase + rot + 2 * math.pi * i / m), cy + rr * math.sin(phase + rot + 2 * math.pi * i / m))
                for i in range(m)]

    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=max(3, int(r / 3)))
    elif shape == "square":
        d.polygon(poly(4, math.pi / 4), fill=col)
    elif shape == "diamond":
        d.polygon(poly(4), fill=col)
    elif shape == "triangle":
        d.polygon(poly(3, -math.pi / 2), fill=col)
    elif shape == "hexagon":
        d.polygon(poly(6), fill=col)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    else:                                                     # bar
        d.polygon([(cx - r, cy - r / 3), (cx + r, cy - r / 3), (cx + r, cy + r / 3), (cx - r, cy + r / 3)], fill=col)
    font = ImageFont.load_default()
    ink = (255, 255, 255) if sum(colour) < 380 else (0, 0, 0)
    tx, ty = cx - 3 + g.uniform(-2, 2), cy - 6 + g.uniform(-2, 2)
    for dx in (0, 1):                                         # a bolder glyph: the default font is thin
        d.text((tx + dx, ty), letter, fill=ink, font=font)
    img = img.filter(ImageFilter.GaussianBlur(g.uniform(0.0, 0.8))).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) + g.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=2000)
    ap.add_argument("--train", type=int, default=8, help="training images per class")
    ap.add_argument("--val", type=int, default=2, help="held-out images per class (val_list.txt)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not 1 <= a.classes <= MAX_CLASSES:
        print(f"error: --classes must lie in [1, {MAX_CLASSES}] (shapes x colours x letters), got {a.classes}",
              file=sys.stderr)
        return 2
    if a.train < 1 or a.val < 0 or a.size < 8:
        print("error: need --train >= 1, --val >= 0, --size >= 8", file=sys.stderr)
        return 2
    train, val = [], []
    for k in range(a.classes):
        folder = os.path.join(a.out, "images", str(k))
        os.makedirs(folder, exist_ok=True)
        for n in range(a.train + a.val):
            rel = f"images/{k}/{n}.jpg"
            render(k, n, a.size, a.seed).save(os.path.join(a.out, rel), quality=92)
            (train if n < a.train else val).append(f"{rel} {k}")
    for name, lines in (("train_list.txt", train), ("val_list.txt", val)):
        with open(os.path.join(a.out, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    print(f"{a.classes} classes: {len(train)} training and {len(val)} held-out images in {a.out} "
          f"(train_list.txt, val_list.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
