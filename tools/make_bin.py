"""Write an InsightFace-style verification ``.bin`` from image files and a pair list.

    python tools/make_bin.py --pairs PAIRS.txt --out lfw_like.bin [--root DIR] [--image-size 112]

PAIRS.txt has one pair per line: ``path_a path_b issame`` with issame 1/0 (or true/false); paths
are relative to ``--root`` (default: the pair file's folder). JPEG files are stored as they are;
other images (or any image when --image-size asks for a resize) are re-encoded as JPEG.
The output is a pickle (protocol 2) of (list of 2N JPEG bytes, list of N bools).
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hfsoftmax.data.binset import encode_jpeg, write_bin  # noqa: E402

logger = logging.getLogger(__name__)


def read_pairs(path: str) -> list[tuple[str, str, bool]]:
    """Parse ``path_a path_b issame`` lines; raises ValueError naming the file and line."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            flag = parts[-1].lower() if len(parts) == 3 else ""
            if flag not in ("1", "0", "true", "false"):
                raise ValueError(f"{path}: line {lineno} is not 'path_a path_b issame': {line.strip()[:80]!r}")
            pairs.append((parts[0], parts[1], flag in ("1", "true")))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def image_bytes(path: str, image_size: int | None) -> bytes:
    """JPEG bytes for one image file (kept verbatim when already a JPEG of the wanted size)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as src:  # decode the bytes already read; no second open
            fmt = src.format
            img = src.convert("RGB")
    except Exception as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    if fmt == "JPEG" and (image_size is None or img.size == (image_size, image_size)):
        return data
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return encode_jpeg(np.asarray(img, dtype=np.uint8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", required=True, help="text file: path_a path_b issame")
    ap.add_argument("--out", required=True, help="output .bin")
    ap.add_argument("--root", default=None, help="folder the image paths are relative to")
    ap.add_argument("--image-size", type=int, default=None, help="resize to this square side")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        pairs = read_pairs(args.pairs)
        root = args.root or os.path.dirname(os.path.abspath(args.pairs))
        images, issame = [], []
        for a, b, same in tqdm(pairs, desc="pairs", disable=None):
            for p in (a, b):
                full = p if os.path.isabs(p) else os.path.join(root, p)
                if not os.path.isfile(full):
                    raise FileNotFoundError(f"image not found: {full}")
                images.append(image_bytes(full, args.image_size))
            issame.append(same)
        write_bin(args.out, images, issame)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("wrote %s: %d pairs (%d same)", args.out, len(issame), sum(issame))
    return 0


if __name__ == "__main__":
    sys.exit(main())
