"""Feature-level datasets (features .npy/.npz + identity/mlp backbones) and image-folder datasets."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from hfsoftmax.backbones import get_backbone
from hfsoftmax.config import ConfigError, load_config
from hfsoftmax.data.binset import encode_jpeg
from hfsoftmax.data.datasets import ImageFolderDataset, dataset_from_path
from hfsoftmax.data.features import FeatureDataset, make_separable
from hfsoftmax.launch import num_classes_of
from hfsoftmax.train import train

K, D = 20, 32
COMMON = ["train.progress=false", "train.log_every=10", "train.batch_size=32", "optim.lr=0.1",
          "optim.warmup_steps=0", "optim.schedule=constant", "head.margin=none", "train.device=cpu"]


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    """Train and held-out splits of one clearly separable set: K=20 centres at distance ~8 apart,
    per-sample noise of norm ~1.7 (nearest centre is exact); chance top-1 is 1/20."""
    root = tmp_path_factory.mktemp("feats")
    feats, labels = make_separable(640, K, D, seed=0, out_dir=str(root / "train"))
    x, y = np.load(feats), np.load(labels)
    # the held-out split: new samples around the training classes' centres (estimated from 32 each)
    rng = np.random.default_rng(1)
    centres = np.stack([x[y == k].mean(0) for k in range(K)])
    vy = rng.integers(0, K, 200)
    vx = (centres[vy] + 0.3 * rng.standard_normal((200, D))).astype(np.float32)
    val = str(root / "val.npz")
    np.savez(val, features=vx, labels=vy)
    return feats, labels, val


def test_feature_dataset_items_mmap_and_formats(tmp_path):
    feats, labels = make_separable(50, 5, 8, seed=3, out_dir=str(tmp_path), dtype=np.float16)
    ds = dataset_from_path(feats, 32, labels=labels)
    assert isinstance(ds, FeatureDataset) and len(ds) == 50 and ds.num_classes == 5 and ds.input_dim == 8
    x, y = ds[7]
    assert x.dtype == torch.float32 and x.shape == (8,) and y == int(np.load(labels)[7])
    assert isinstance(ds._features(), np.memmap)                    # mapped, not read
    clone = pickle.loads(pickle.dumps(ds))                          # a spawned worker maps the file itself
    assert clone._feats is None and torch.equal(clone[7][0], x)
    # the same set as text labels and as one .npz
    txt = tmp_path / "labels.txt"
    txt.write_text("\n".join(str(v) for v in np.load(labels)) + "\n")
    assert dataset_from_path(feats, 32, labels=str(txt))[7][1] == y
    npz, _ = make_separable(50, 5, 8, seed=3, out_dir=str(tmp_path / "z"), npz=True, dtype=np.float16)
    z = dataset_from_path(npz, 32)
    assert torch.equal(z[7][0], x) and z[7][1] == y and z.num_classes == 5
    # a relative data.labels is found beside the features file
    assert FeatureDataset(feats, "labels.npy").num_classes == 5


def test_labels_out_of_range_and_missing_are_one_line_errors_naming_the_file(tmp_path):
    feats, labels = make_separable(30, 3, 4, seed=0, out_dir=str(tmp_path))
    bad = np.load(labels)
    bad[11] = -2
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError) as e:
        dataset_from_path(feats, 32, labels=str(tmp_path / "bad.npy"))
    msg = str(e.value)
    assert "bad.npy" in msg and "index 11" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"labels\.npy: label 2 at index \d+ is outside \[0, 2\)"):
        FeatureDataset(feats, labels, num_classes=2)
    with pytest.raises(ValueError, match=r"feats\.npy: a \.npy features file needs its labels"):
        dataset_from_path(feats, 32)
    (tmp_path / "short.txt").write_text("0\n1\nx\n")
    with pytest.raises(ValueError, match=r"short\.txt: line 3 is not an integer"):
        dataset_from_path(feats, 32, labels=str(tmp_path / "short.txt"))
    np.save(tmp_path / "few.npy", np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"few\.npy: 4 labels for 30 feature rows"):
        dataset_from_path(feats, 32, labels=str(tmp_path / "few.npy"))


def test_backbone_checks_are_one_line_errors_naming_the_file(tmp_path, separable):
    feats, labels, _ = separable
    base = COMMON + [f"data.path={feats}", f"data.labels={labels}", f"train.out_dir={tmp_path / 'r'}",
                     "train.steps=1"]
    with pytest.raises(ConfigError) as e:
        train(load_config(None, base + ["model.backbone=identity", "model.feature_dim=16"]))
    msg = str(e.value)
    assert feats in msg and "feature_dim=16" in msg and str(D) in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"holds features \[n, 32\], not images: use model.backbone=identity"):
        train(load_config(None, base + ["model.backbone=tiny"]))
    with pytest.raises(ConfigError, match=r"model.input_dim=7 but .*feats\.npy holds features of width 32"):
        train(load_config(None, base + ["model.backbone=mlp", "model.input_dim=7"]))
    with pytest.raises(ConfigError, match="model.backbone=mlp trains over precomputed features"):
        train(load_config(None, COMMON + ["model.backbone=mlp", f"train.out_dir={tmp_path / 's'}"]))


def test_mlp_and_identity_backbones():
    m = get_backbone("mlp", 16, 112, input_dim=D, hidden_dim=24)
    assert m(torch.randn(4, D)).shape == (4, 16)
    assert get_backbone("mlp", 16, input_dim=D).net[0].out_features == D     # hidden: max(d_in, d)
    x = torch.randn(3, D)
    assert torch.equal(get_backbone("identity", D, input_dim=D)(x), x)
    with pytest.raises(ConfigError, match="needs the features' width"):
        get_backbone("mlp", 16)


@pytest.mark.parametrize("backbone,head", [("identity", "full"), ("mlp", "full"), ("mlp", "hf")])
def test_features_train_and_top1_beats_chance(tmp_path, separable, backbone, head):
    feats, labels, val = separable
    dim = D if backbone == "identity" else 16
    cfg = load_config(None, COMMON + [
        f"data.path={feats}", f"data.labels={labels}", f"data.val_path={val}", f"train.out_dir={tmp_path}",
        f"model.backbone={backbone}", f"model.feature_dim={dim}", f"head.name={head}", "store.kind=local",
        "head.num_active=10", "head.index=exact", "head.scale=16", "train.steps=60"])
    res = train(cfg)
    assert res["num_classes"] == K
    top1 = res["classification"]["top1"]
    assert res["classification"]["samples"] == 200
    assert top1 > 0.8, (backbone, head, top1)          # chance: 1 / 20
    saved = (tmp_path / "config.yaml").read_text()
    assert f"input_dim: {D}" in saved                  # the resolved d_in: the run dir can rebuild the backbone
    ck = torch.load(tmp_path / "ckpt_last.pt", map_location="cpu", weights_only=False)
    rebuilt = get_backbone(backbone, dim, input_dim=ck["config"]["model"]["input_dim"])
    rebuilt.load_state_dict(ck["model"])
    assert num_classes_of(cfg) == K                   # the launcher's K (train_hf.sh's server) from the labels


def write_folder(root, names, per_class=2, size=20):
    rng = np.random.default_rng(0)
    for name in names:
        os.makedirs(os.path.join(root, name, "sub"), exist_ok=True)
        for j in range(per_class):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            where = os.path.join(root, name, "sub" if j % 2 else "", f"{j}.jpg")
            with open(where, "wb") as f:
                f.write(encode_jpeg(img))
    (root / "notes.txt").write_text("not a class\n")


def test_image_folder_maps_names_stably(tmp_path):
    names = ["10", "2", "zebra", "Alice", "007", "b c"]
    write_folder(tmp_path, names)
    os.makedirs(tmp_path / ".hidden")
    a = dataset_from_path(str(tmp_path), 16, train=False)
    b = ImageFolderDataset(str(tmp_path), 16, train=False)
    assert isinstance(a, ImageFolderDataset)
    assert a.classes == b.classes == {n: i for i, n in enumerate(sorted(names))}
    assert a.paths == b.paths and a.num_classes == len(names) and len(a) == 2 * len(names)
    for i in range(len(a)):          # every image carries its folder's id (sub-folders included)
        assert a.labels[i] == a.classes[a.paths[i].split(os.sep)[0]]
    img, y = a[3]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and y == a.labels[3]


def test_rec2img_folder_is_not_an_image_folder(tmp_path):
    write_folder(tmp_path, ["a", "b"])
    (tmp_path / "train_list.txt").write_text("a/0.jpg 0\nb/0.jpg 1\n")
    assert not isinstance(dataset_from_path(str(tmp_path), 16), ImageFolderDataset)


def test_image_folder_trains_and_writes_classes_json(tmp_path):
    data = tmp_path / "data"
    names = ["zz", "3", "11", "cat"]
    write_folder(data, names, per_class=4)
    out = tmp_path / "run"
    res = train(load_config(None, COMMON + [
        f"data.path={data}", f"train.out_dir={out}", "data.image_size=16", "model.feature_dim=8",
        "train.steps=2", "train.batch_size=4", "model.width=8"]))
    assert res["num_classes"] == 4 and res["steps"] == 2
    assert json.loads((out / "classes.json").read_text()) == {n: i for i, n in enumerate(sorted(names))}


def test_a_features_run_is_scored_by_the_classify_tool_with_npy_labels_beside(tmp_path, separable):
    """python -m hfsoftmax.eval classify on a features checkpoint and a held-out .npy whose labels sit
    beside it (val.labels.npy): the same top-1 as the run's own final evaluation."""
    import subprocess
    import sys

    feats, labels, val = separable
    with np.load(val) as z:
        vx, vy = z["features"], z["labels"]
    np.save(tmp_path / "val.npy", vx)
    np.save(tmp_path / "val.labels.npy", vy)
    res = train(load_config(None, COMMON + [
        f"data.path={feats}", f"data.labels={labels}", f"data.val_path={tmp_path / 'val.npy'}",
        f"train.out_dir={tmp_path / 'run'}", "model.backbone=mlp", "model.feature_dim=16", "head.name=hf",
        "store.kind=local", "head.num_active=10", "head.index=exact", "head.scale=16", "train.steps=40"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "hfsoftmax.eval", "classify", "--model",
                        str(tmp_path / "run" / "ckpt_last.pt"), "--data", str(tmp_path / "val.npy"), "--out",
                        str(tmp_path / "cls")], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "cls" / "classify.json").read_text())
    assert got["samples"] == 200 and abs(got["top1"] - res["classification"]["top1"]) < 1e-9
    # no labels anywhere: one line naming both ways
    np.save(tmp_path / "lone.npy", vx)
    with pytest.raises(ValueError, match="lone.labels.npy"):
        FeatureDataset(str(tmp_path / "lone.npy"))


def test_rp_recover_rebuilds_an_mlp_backbone_and_reads_the_features_labels(tmp_path, separable):
    import importlib.util
    import sys

    feats, labels, _ = separable
    train(load_config(None, COMMON + [f"data.path={feats}", f"data.labels={labels}", "data.val_path=none",
                                      f"train.out_dir={tmp_path}", "model.backbone=mlp", "model.feature_dim=16",
                                      "head.name=rp", "head.rp.proj_dim=8", "train.steps=5"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("rp_recover", os.path.join(root, "tools", "rp_recover.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rp_recover"] = mod
    spec.loader.exec_module(mod)
    W = mod.recover_from_checkpoint(str(tmp_path / "ckpt_last.pt"), str(tmp_path / "W.npy"))
    assert tuple(W.shape) == (K, 16) and np.load(tmp_path / "W.npy").shape == (K, 16)
