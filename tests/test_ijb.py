"""IJB-B/C 1:1: alignment, template pooling, TAR@FAR (hand-checked) and the command on a small fixture
in the standard layout (loose_crop/, meta/ijbc_*.txt) written here."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hfsoftmax.eval import ijb


def test_similarity_transform_recovers_a_known_one():
    a, s, t = 0.3, 1.7, np.array([5.0, -2.0])
    R = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    src = ijb.ARCFACE_5PTS
    dst = src @ (s * R).T + t
    A = ijb.similarity_transform(src, dst)
    np.testing.assert_allclose(A[:, :2], s * R, atol=1e-9)
    np.testing.assert_allclose(A[:, 2], t, atol=1e-9)


def test_template_pooling_and_tar_by_hand():
    # template 1: media 10 holds [1,0] and [3,0] (mean [2,0]), media 11 holds [0,2]: sum [2,2]
    feats = np.array([[1, 0], [3, 0], [0, 2], [0, 5], [-1, 0], [0, -1]], dtype=np.float64)
    templates = np.array([1, 1, 1, 2, 3, 4])
    medias = np.array([10, 10, 11, 20, 30, 40])
    ids, tf = ijb.template_features(feats, templates, medias)
    assert ids.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(tf, [[2 ** -0.5, 2 ** -0.5], [0, 1], [-1, 0], [0, -1]], atol=1e-12)
    pairs = np.array([[1, 2], [2, 4], [1, 3], [2, 3]])
    labels = np.array([1, 1, 0, 0])
    scores = ijb.pair_scores(ids, tf, pairs)
    np.testing.assert_allclose(scores, [2 ** -0.5, -1.0, -(2 ** -0.5), 0.0], atol=1e-12)
    # ROC by hand: threshold 0.707 -> TPR 1/2 at FPR 0; 0 -> FPR 1/2; -0.707 -> FPR 1; -1 -> TPR 1
    tar = ijb.tar_at_far(scores, labels, fars=(0.1, 0.5, 1.0))
    assert tar == {0.1: None, 0.5: 0.5, 1.0: 1.0}          # 0.1 x 2 negatives < 1: not resolvable


def _fixture(root, size=16, identities=4, per=4):
    from PIL import Image

    from hfsoftmax.config import DataConfig
    from hfsoftmax.data import synthetic

    spec = synthetic.spec_from_config(DataConfig(num_classes=identities, samples_per_class=per, image_size=size,
                                                 families=2))
    ds = synthetic.SyntheticIdentities(spec)
    os.makedirs(root / "loose_crop")
    os.makedirs(root / "meta")
    lmk, tid, pairs = [], [], []
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        img, c = ds[i]
        arr = ((img.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).clip(0, 255).astype(np.uint8)
        big = np.zeros((size + 8, size + 8, 3), np.uint8)      # a loose crop: the face offset by (3, 5)
        big[5:5 + size, 3:3 + size] = arr
        name = f"{i}.jpg"
        Image.fromarray(big).save(root / "loose_crop" / name, quality=95)
        pts = ijb.ARCFACE_5PTS * size / 112.0 + np.array([3.0, 5.0])
        lmk.append(name + " " + " ".join(f"{v:.4f}" for v in pts.reshape(-1)) + f" {rng.uniform(0.8, 1.0):.3f}")
        t = 2 * int(c) + (i % per >= per // 2)                  # two templates per identity
        tid.append(f"{name} {t} {100 + i // 2}")                  # media: pairs of consecutive images
    for t1 in range(2 * identities):
        for t2 in range(t1 + 1, 2 * identities):
            pairs.append(f"{t1} {t2} {int(t1 // 2 == t2 // 2)}")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lmk) + "\n")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tid) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root


def test_ijb_command_on_a_standard_layout(tmp_path, capsys):
    from hfsoftmax.config import load_config
    from hfsoftmax.eval.cli import load_model, main
    from hfsoftmax.train import train

    run = tmp_path / "run"
    train(load_config(None, ["data.num_classes=20", "data.samples_per_class=4", "data.image_size=16",
                             "data.val_identities=10", "data.val_pairs=20", "model.feature_dim=16",
                             "train.progress=false", "train.steps=3", "train.batch_size=8", f"train.out_dir={run}"]))
    root = _fixture(tmp_path / "IJBC")
    out = tmp_path / "out"
    assert main(["ijb", "--model", str(run / "ckpt_last.pt"), "--data", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| IJBC | 8 | 28 |" in printed and (out / "roc_ijbc.png").exists()
    got = json.loads((out / "ijbc.json").read_text())
    assert got["num_pairs"] == 28 and got["num_templates"] == 8 and got["num_images"] == 16
    # 24 negatives: FAR 1e-1 is resolvable, 1e-2 and below are not
    assert got["tar_at_far"]["0.1"] is not None and got["tar_at_far"]["0.01"] is None
    # the command's figures are the library's (align, embed, pool, score) on the same files
    model, size, _ = load_model(str(run / "ckpt_last.pt"))
    meta = ijb.load_meta(str(root))
    feats = ijb.embed_images(model, str(root), meta, size)
    r = ijb.evaluate_ijb(feats, meta)
    assert {f"{k:g}": v for k, v in r["tar_at_far"].items()} == got["tar_at_far"]


def test_bad_meta_is_named(tmp_path):
    root = _fixture(tmp_path / "IJBC")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("0.jpg 1\n")
    with pytest.raises(ijb.IJBError, match=r"ijbc_face_tid_mid.txt: line 1 has 2 fields"):
        ijb.load_meta(str(root))
