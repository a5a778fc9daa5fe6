"""Data-loading benchmark: images/s decoding InsightFace ``train.rec`` beside a folder of JPEGs.

Builds, in a temporary folder, N face-sized JPEGs (default 2000 at 112x112, smooth random images so
the JPEGs are about the size of real face crops), packed once as ``train.rec``/``train.idx``
(InsightFace layout) and once as images/<label>/<n>.jpg + train_list.txt (what tools/rec2img.py
writes). Then it reads them through ``dataset_from_path`` and a DataLoader (batch 64, random flip)
with 0, 1, 2 and 4 workers: the .rec with float32 images made in the workers (the old path) and
with uint8 images normalised after the loader (what training does now, on the device), and the
folder with uint8. Each configuration does one untimed warm-up pass (starts the persistent workers,
fills the page cache) and the best of three timed passes over all N images, so the sources are compared from
memory, as in steady-state training. Worker counts above the machine's cores measure contention,
not scaling (``cpus`` in the RESULT line).

    python benchmarks/bench_data.py [--n 2000] [--size 112] [--workers 0,1,2,4]

Ends with one line: RESULT key=value ...  (imgs/s per source, path and worker count; ratios)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hfsoftmax.data.binset import encode_jpeg  # noqa: E402
from hfsoftmax.data.datasets import dataset_from_path  # noqa: E402
from hfsoftmax.data.recordio import write_insightface_rec  # noqa: E402
from hfsoftmax.data.transforms import normalize_images  # noqa: E402

logger = logging.getLogger(__name__)


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: a bilinear-upsampled 8x8 random image plus mild noise (face-like JPEG size)."""
    from PIL import Image
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    big = np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.int16)
    return np.clip(big + rng.integers(-6, 7, big.shape), 0, 255).astype(np.uint8)


def build(root: str, n: int, size: int, per_class: int = 20) -> tuple[str, str]:
    """Write the same n JPEGs as a .rec folder and as an image-list folder; returns both paths."""
    rng = np.random.default_rng(0)
    items = []
    img_dir = os.path.join(root, "folder")
    for i in tqdm(range(n), desc="make images"):
        label = i // per_class
        jpeg = encode_jpeg(smooth_image(rng, size))
        items.append((jpeg, label))
        d = os.path.join(img_dir, "images", str(label))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i % per_class}.jpg"), "wb") as f:
            f.write(jpeg)
    with open(os.path.join(img_dir, "train_list.txt"), "w") as f:
        f.writelines(f"images/{lbl}/{i % per_class}.jpg {lbl}\n" for i, (_, lbl) in enumerate(items))
    rec_dir = os.path.join(root, "rec")
    write_insightface_rec(rec_dir, items, image_size=size)
    mean_kb = sum(len(j) for j, _ in items) / n / 1024
    logger.info("%d images, mean JPEG %.1f KiB", n, mean_kb)
    return rec_dir, img_dir


def images_per_second(path: str, size: int, workers: int, uint8: bool, batch: int = 64, passes: int = 3) -> float:
    """Best of ``passes`` timed passes of a DataLoader over the whole dataset (the loader the trainer builds: one
    for the run, workers persistent). uint8: workers hand over uint8 images, normalised after the
    loader as the train loop does on the device (here the CPU: its cost is inside the figure)."""
    ds = dataset_from_path(path, size, train=True, uint8=uint8)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up: workers start, files are cached
        pass
    best = 0.0
    for _ in range(passes):     # the best of a few timed passes: this machine's other load is noise
        t0 = time.perf_counter()
        seen = 0
        for x, _ in loader:
            x = normalize_images(x)
            seen += x.shape[0]
        best = max(best, seen / (time.perf_counter() - t0))
    del loader
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images")
    ap.add_argument("--size", type=int, default=112, help="image side")
    ap.add_argument("--workers", default="0,1,2,4", help="comma-separated DataLoader worker counts")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(1)  # decoding is the work measured; keep the main process to one core
    workers = [int(w) for w in args.workers.split(",")]
    kv: list[str] = [f"n={args.n}", f"size={args.size}", f"cpus={os.cpu_count()}"]
    with tempfile.TemporaryDirectory(prefix="bench_data_") as root:
        rec_dir, img_dir = build(root, args.n, args.size)
        print(f"{'workers':>7} {'rec f32':>9} {'rec u8':>9} {'u8/f32':>7} {'folder u8':>10} {'rec/folder':>10}")
        base = None
        for w in workers:
            r32 = images_per_second(rec_dir, args.size, w, uint8=False)
            r8 = images_per_second(rec_dir, args.size, w, uint8=True)
            f8 = images_per_second(img_dir, args.size, w, uint8=True)
            base = base or r8
            print(f"{w:>7} {r32:>9.0f} {r8:>9.0f} {r8 / r32:>7.2f} {f8:>10.0f} {r8 / f8:>10.2f}")
            kv += [f"rec_f32_w{w}={r32:.0f}", f"rec_u8_w{w}={r8:.0f}", f"u8_over_f32_w{w}={r8 / r32:.2f}",
                   f"folder_u8_w{w}={f8:.0f}", f"rec_u8_w{w}_over_w{workers[0]}={r8 / base:.2f}"]
    print("RESULT " + " ".join(kv))


if __name__ == "__main__":
    main()
