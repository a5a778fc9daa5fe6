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


def run_tool(capsys, *args):
    """The command line, in-process (a subprocess per call would double this file's run time)."""
    rc = rec2img.main(list(args))
    return rc, capsys.readouterr().err


def test_rec2img_lists_and_bytes(tmp_path, capsys):
    items = make_rec(tmp_path / "rec")
    out = tmp_path / "img"
    rc, err = run_tool(capsys, "--in-folder", str(tmp_path / "rec"), "--out-folder", str(out), "--val-ratio", "0.2")
    assert rc == 0, err
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


def test_rec2img_without_idx_and_bad_payload(tmp_path, capsys):
    rec = tmp_path / "rec"
    rec.mkdir()
    good = encode_jpeg(np.full((8, 8, 3), 100, np.uint8))
    with RecordIOWriter(str(rec / "train.rec")) as w:  # no .idx: sequential scan
        w.write(pack(IRHeader(2, np.array([4, 6], np.float32), 0, 0), b""))
        w.write(pack(IRHeader(0, 0.0, 1, 0), good))
        w.write(pack(IRHeader(0, 1.0, 2, 0), b"not an image"))
        w.write(pack(IRHeader(0, 1.0, 3, 0), good))
    rc, err = run_tool(capsys, "--in-folder", str(rec), "--out-folder", str(tmp_path / "o"))
    assert rc == 2 and "train.rec: record #2 (sequential)" in err
    assert [ln for ln in err.splitlines() if "error" in ln.lower()] == [err.strip().splitlines()[-1]]
    assert "Traceback" not in err
    c = rec2img.rec2img(str(rec), str(tmp_path / "o"), 0.0, skip_bad=True)
    assert c["skipped"] == 1 and c["train"] == 2
    assert (tmp_path / "o" / "train_list.txt").read_text() == "images/0/0.jpg 0\nimages/1/0.jpg 1\n"


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "scripts", "train.sh")), reason="train.sh not present")
def test_train_sh_accepts_rec2img_output(tmp_path):
    """The README path: rec2img's folder handed to scripts/train.sh as it is (2 tiny CPU steps)."""
    rng = np.random.default_rng(0)
    items = [(encode_jpeg(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), k // 3) for k in range(12)]
    write_insightface_rec(str(tmp_path / "rec"), items, image_size=16)
    rec2img.rec2img(str(tmp_path / "rec"), str(tmp_path / "img"), 0.34)
    env = dict(os.environ, PYTHON=sys.executable, CONFIG="configs/base.yaml", NPROC="1")
    proc = subprocess.run(["sh", "scripts/train.sh", str(tmp_path / "img"), "train.steps=2", "train.batch_size=4",
                           "data.image_size=16", f"train.out_dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import torch
    ckpt = torch.load(tmp_path / "run" / "ckpt_last.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"]["data"]["path"] == str(tmp_path / "img") and ckpt["step"] == 2
    assert ckpt.get("num_classes", 4) == 4
