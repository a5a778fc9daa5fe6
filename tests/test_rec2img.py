"""tools/rec2img.py on a tiny .rec: files, lists, split, resume, bad records."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from hfsoftmax.data.binset import encode_jpeg
from hfsoftmax.data.datasets import ImageListDataset, dataset_from_path
from hfsoftmax.data.recordio import IRHeader, RecordIOWriter, pack, write_insightface_rec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import rec2img  # noqa: E402

LABELS = [0] * 5 + [1] + [2] * 20 + [3] * 3


def make_rec(folder):
    rng = np.random.default_rng(0)
    items = [(encode_jpeg(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), lbl) for lbl in LABELS]
    write_insightface_rec(str(folder), items, image_size=8, label_as_array=True)
    return items


def run_tool(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "rec2img.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_rec2img_lists_and_bytes(tmp_path):
    items = make_rec(tmp_path / "rec")
    out = tmp_path / "img"
    proc = run_tool("--in-folder", str(tmp_path / "rec"), "--out-folder", str(out), "--val-ratio", "0.2")
    assert proc.returncode == 0, proc.stderr
    train = (out / "train_list.txt").read_text().splitlines()
    val = (out / "val_list.txt").read_text().splitlines()
    # per identity: round(0.2 n) held out, at least one kept: 5 -> 1, 1 -> 0, 20 -> 4, 3 -> 1
    assert len(val) == 6 and len(train) == len(LABELS) - 6
    assert sorted(int(v.split()[1]) for v in val) == [0, 2, 2, 2, 2, 3]
    assert not set(train) & set(val)
    for line in train + val:
        rel, label = line.split()
        assert rel.startswith(f"images/{label}/") and rel.endswith(".jpg")
    # the JPEG bytes are the record payloads, in record order per identity
    assert (out / "images" / "2" / "0.jpg").read_bytes() == items[6][0]
    assert (out / "images" / "3" / "2.jpg").read_bytes() == items[-1][0]
    # the lists are what training reads
    ds = dataset_from_path(str(out), image_size=8, train=True)
    assert isinstance(ds, ImageListDataset) and ds.num_classes == 4 and len(ds) == len(train)
    assert ds[0][1] == int(train[0].split()[1]) and ds[0][0].shape == (3, 8, 8)
    vs = dataset_from_path(str(out / "val_list.txt"), image_size=8, train=False)
    assert len(vs) == 6


def test_rec2img_seeded_and_resumable(tmp_path):
    make_rec(tmp_path / "rec")
    c1 = rec2img.rec2img(str(tmp_path / "rec"), str(tmp_path / "a"), 0.3, seed=1)
    assert c1["written"] == len(LABELS) and c1["existing"] == 0
    lists = (tmp_path / "a" / "val_list.txt").read_text()
    os.remove(tmp_path / "a" / "images" / "2" / "7.jpg")  # as if cut off mid-run
    c2 = rec2img.rec2img(str(tmp_path / "rec"), str(tmp_path / "a"), 0.3, seed=1)
    assert c2["written"] == 1 and c2["existing"] == len(LABELS) - 1
    assert (tmp_path / "a" / "val_list.txt").read_text() == lists
    rec2img.rec2img(str(tmp_path / "rec"), str(tmp_path / "b"), 0.3, seed=2)
    assert (tmp_path / "b" / "val_list.txt").read_text() != lists


def test_rec2img_without_idx_and_bad_payload(tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    good = encode_jpeg(np.full((8, 8, 3), 100, np.uint8))
    with RecordIOWriter(str(rec / "train.rec")) as w:  # no .idx: sequential scan
        w.write(pack(IRHeader(2, np.array([4, 6], np.float32), 0, 0), b""))
        w.write(pack(IRHeader(0, 0.0, 1, 0), good))
        w.write(pack(IRHeader(0, 1.0, 2, 0), b"not an image"))
        w.write(pack(IRHeader(0, 1.0, 3, 0), good))
    proc = run_tool("--in-folder", str(rec), "--out-folder", str(tmp_path / "o"))
    assert proc.returncode == 2 and "train.rec: record #2 (sequential)" in proc.stderr
    assert "Traceback" not in proc.stderr
    c = rec2img.rec2img(str(rec), str(tmp_path / "o"), 0.0, skip_bad=True)
    assert c["skipped"] == 1 and c["train"] == 2
    assert (tmp_path / "o" / "train_list.txt").read_text() == "images/0/0.jpg 0\nimages/1/0.jpg 1\n"
