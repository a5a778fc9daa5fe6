"""Unpack an InsightFace ``train.rec`` into JPEG files plus train/val image lists.

    python tools/rec2img.py --in-folder faces_emore --out-folder faces_emore_img [--val-ratio 0.05] [--seed 42]

Output (paths relative to --out-folder, the layout ``dataset_from_path`` and scripts/train*.sh read)::

    images/<label>/<n>.jpg      n counts an identity's images in record order
    train_list.txt              "images/<label>/<n>.jpg <label>" per line
    val_list.txt                the same for the held-out images

The split is per identity and seeded: round(val_ratio * n) of an identity's n images go to
validation, but at least one stays in training. Resumable: images already on disk are not
rewritten (every image is written to a temp file and renamed, so a file that exists is whole).
JPEG payloads are copied byte for byte; other image payloads are re-encoded as JPEG.
Reading uses ``train.idx`` when present and falls back to a sequential scan of ``train.rec``
(records with an empty payload, i.e. InsightFace's header and identity records, are skipped).
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections import defaultdict
from typing import Iterator

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hfsoftmax.data.recordio import (RecordIOReader, class_of, read_insightface_layout, read_property,  # noqa: E402
                                     unpack)
from hfsoftmax.data.transforms import decode_image  # noqa: E402

logger = logging.getLogger(__name__)

JPEG_SOI = b"\xff\xd8\xff"


def iter_images(rec_path: str) -> Iterator[tuple[str, int, bytes]]:
    """(where, label, payload) for every image record, by .idx order or sequentially."""
    idx_path = os.path.splitext(rec_path)[0] + ".idx"
    if os.path.isfile(idx_path):
        reader = RecordIOReader(rec_path, idx_path)
        layout = read_insightface_layout(reader)
        prop = read_property(os.path.dirname(os.path.abspath(rec_path)))
        num = len(layout.identity_ranges) if layout.identity_ranges is not None else (prop[0] if prop else None)
        for key in tqdm(layout.image_keys, desc="records", unit="img", disable=None):
            where = f"{rec_path}: record {key}"
            header, payload = unpack(reader.read_idx(key), where)
            yield where, layout.check_label(key, class_of(header.label, where), where, num), payload
        reader.close()
        return
    logger.info("%s not found: reading %s sequentially", idx_path, rec_path)
    reader = RecordIOReader(rec_path, "")
    for n, rec in enumerate(tqdm(reader, desc="records", unit="rec", disable=None)):
        where = f"{rec_path}: record #{n} (sequential)"
        header, payload = unpack(rec, where)
        if not payload:  # header / identity-range records carry no image
            continue
        yield where, class_of(header.label, where), payload


def as_jpeg(payload: bytes, where: str) -> bytes:
    """The payload when it is a JPEG that decodes; other images re-encoded; errors name ``where``."""
    img = decode_image(payload, where)  # validates even JPEGs: never write a broken file
    if payload.startswith(JPEG_SOI):
        return payload
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def split_val(n: int, val_ratio: float, rng: np.random.Generator) -> set[int]:
    """Indices (of n) held out for validation; always leaves at least one for training."""
    k = min(int(round(val_ratio * n)), n - 1)
    return set(rng.permutation(n)[:k].tolist()) if k > 0 else set()


def rec2img(in_folder: str, out_folder: str, val_ratio: float = 0.05, seed: int = 42,
            skip_bad: bool = False) -> dict[str, int]:
    """Unpack ``in_folder/train.rec``; returns counts (written, existing, skipped, train, val)."""
    rec_path = os.path.join(in_folder, "train.rec")
    if not os.path.isfile(rec_path):
        raise FileNotFoundError(f"train.rec not found in {in_folder}")
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    per_label: dict[int, list[str]] = defaultdict(list)
    counts = {"written": 0, "existing": 0, "skipped": 0}
    made_dirs: set[int] = set()
    for where, label, payload in iter_images(rec_path):
        rel = f"images/{label}/{len(per_label[label])}.jpg"
        path = os.path.join(out_folder, rel)
        if os.path.isfile(path):
            counts["existing"] += 1  # resumed run: written (atomically) before
        else:
            try:
                data = as_jpeg(payload, where)
            except ValueError as exc:
                if not skip_bad:
                    raise
                counts["skipped"] += 1
                logger.warning("skipped (%d so far): %s", counts["skipped"], exc)
                continue
            if label not in made_dirs:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                made_dirs.add(label)
            _write_atomic(path, data)
            counts["written"] += 1
        per_label[label].append(rel)
    if not per_label:
        raise ValueError(f"{rec_path}: no image records")
    rng = np.random.default_rng(seed)
    train_lines, val_lines = [], []
    for label in sorted(per_label):
        rels = per_label[label]
        held = split_val(len(rels), val_ratio, rng)
        for i, rel in enumerate(rels):
            (val_lines if i in held else train_lines).append(f"{rel} {label}\n")
    _write_atomic(os.path.join(out_folder, "train_list.txt"), "".join(train_lines).encode())
    _write_atomic(os.path.join(out_folder, "val_list.txt"), "".join(val_lines).encode())
    counts.update(train=len(train_lines), val=len(val_lines), classes=len(per_label))
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-folder", required=True, help="folder with train.rec (and train.idx)")
    ap.add_argument("--out-folder", required=True, help="where images/ and the lists go")
    ap.add_argument("--val-ratio", type=float, default=0.05, help="fraction of each identity held out")
    ap.add_argument("--seed", type=int, default=42, help="seed of the train/val split")
    ap.add_argument("--skip-bad", action="store_true", help="count and skip undecodable images")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        os.makedirs(args.out_folder, exist_ok=True)
        c = rec2img(args.in_folder, args.out_folder, args.val_ratio, args.seed, args.skip_bad)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("%d classes: %d train / %d val images (%d written, %d already there, %d skipped)",
                c["classes"], c["train"], c["val"], c["written"], c["existing"], c["skipped"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
