"""Embeddings of a folder of images (or a list file) with a trained backbone, as a .npy.

    python tools/extract_features.py --checkpoint runs/x/ckpt_last.pt --images photos/ --out feats.npy \
        [--no-flip] [--batch-size 64] [--device cpu]

``--images``: a folder (every .jpg/.jpeg/.png/.bmp below it, sorted by path) or a text file with one
image path per line (relative to the file's folder; an optional second column is ignored, so a
``train_list.txt`` works). Images are decoded with Pillow, resized to the checkpoint's image size
and normalised as in training; with flip-sum (default) the embedding is that of the image plus that
of its mirror. Writes ``--out`` [n, d] float32 (rows L2-normalised) and ``<out>.paths.txt`` (row i's
image). A file that cannot be decoded is an error naming it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hfsoftmax.data.transforms import decode_image, to_tensor_normalized  # noqa: E402
from hfsoftmax.eval.cli import EvalError, load_model  # noqa: E402
from hfsoftmax.eval.extract import extract_features, save_features  # noqa: E402

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(src: str) -> list[str]:
    if os.path.isdir(src):
        found = [os.path.join(r, f) for r, _, fs in os.walk(src) for f in fs if f.lower().endswith(IMAGE_EXT)]
        return sorted(found)
    if not os.path.isfile(src):
        raise EvalError(f"--images {src}: neither a folder nor a list file")
    root = os.path.dirname(os.path.abspath(src))
    with open(src, encoding="utf-8") as f:
        return [os.path.join(root, ln.split()[0]) for ln in f if ln.strip()]


def embed(checkpoint: str, paths: list[str], flip: bool = True, batch_size: int = 64, device: str = "cpu",
          chunk: int = 1024) -> np.ndarray:
    model, size, _ = load_model(checkpoint)
    out = []
    for s in range(0, len(paths), chunk):       # decode a chunk at a time: bounded memory
        imgs = []
        for p in paths[s:s + chunk]:
            try:
                with open(p, "rb") as f:
                    imgs.append(to_tensor_normalized(decode_image(f.read(), p), size))
            except OSError as e:
                raise EvalError(f"{p}: cannot read image ({e.strerror})") from None
        out.append(extract_features(model, torch.stack(imgs), batch_size=batch_size, flip=flip,
                                    device=torch.device(device), progress=False))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Embeddings of a folder or list of images, as a .npy")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, help="a folder of images, or a list file of paths")
    p.add_argument("--out", required=True, help="the .npy to write ([n, d] float32, unit rows)")
    p.add_argument("--no-flip", action="store_true", help="no flip-sum (the image's embedding alone)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        paths = list_images(a.images)
        if not paths:
            raise EvalError(f"--images {a.images}: no images found")
        feats = embed(a.checkpoint, paths, flip=not a.no_flip, batch_size=a.batch_size, device=a.device)
    except (EvalError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_features(a.out, feats)
    with open(a.out + ".paths.txt", "w", encoding="utf-8") as f:
        f.writelines(p + "\n" for p in paths)
    print(f"wrote {a.out}: {feats.shape[0]} x {feats.shape[1]} embeddings (flip-sum {'off' if a.no_flip else 'on'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
