"""tools/make_shapes.py: the rec2img layout, deterministic images, a clear error past 2496 classes;
the dataset it writes trains through the small-data recipe and is evaluated on its held-out list."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "make_shapes.py")


def _make(out, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], capture_output=True, text=True,
                          timeout=120)


def test_make_shapes_writes_the_rec2img_layout_deterministically(tmp_path) -> None:
    r = _make(tmp_path / "a", "--classes", "30", "--train", "3", "--val", "1", "--size", "16")
    assert r.returncode == 0, r.stderr
    train = (tmp_path / "a" / "train_list.txt").read_text().split("\n")[:-1]
    val = (tmp_path / "a" / "val_list.txt").read_text().split("\n")[:-1]
    assert len(train) == 90 and len(val) == 30
    assert train[0] == "images/0/0.jpg 0" and val[-1] == "images/29/3.jpg 29"
    _make(tmp_path / "b", "--classes", "30", "--train", "3", "--val", "1", "--size", "16")
    for rel in ("images/0/0.jpg", "images/29/3.jpg"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    bad = _make(tmp_path / "c", "--classes", "3000")
    assert bad.returncode == 2 and "2496" in bad.stderr.strip().splitlines()[-1]


def test_the_small_data_recipe_trains_on_it_and_reports_top_k(tmp_path) -> None:
    from hfsoftmax.config import load_config
    from hfsoftmax.train import train

    assert _make(tmp_path / "d", "--classes", "40", "--train", "4", "--val", "1", "--size", "16").returncode == 0
    res = train(load_config(os.path.join(ROOT, "configs", "small_data_hf.yaml"), [
        f"data.path={tmp_path / 'd'}", "data.image_size=16", "data.flip=false", "data.num_workers=0",
        "store.kind=local", "head.num_active=20", "train.batch_size=16", "train.steps=6", "train.eval_every=3",
        "train.progress=false", f"train.out_dir={tmp_path / 'run'}", "optim.warmup_steps=2"]))
    c = res["classification"]
    assert c["samples"] == 40 and 0.0 <= c["top1"] <= c["top5"] <= 1.0
