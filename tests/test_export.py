"""Deployment: ONNX export of trained backbones (onnxruntime equals torch within 1e-4 on real
images of the synthetic set) and the feature-extraction command for a folder of images."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnxruntime as ort  # noqa: E402  (installed by `make test`: requirements-test.txt; never skipped)

from tools import export_onnx, extract_features  # noqa: E402


def _synthetic_images(folder, n=6, size=16):
    """Real images of the synthetic identities, written as JPEG files."""
    from PIL import Image

    from hfsoftmax.config import DataConfig
    from hfsoftmax.data import synthetic

    spec = synthetic.spec_from_config(DataConfig(num_classes=20, samples_per_class=2, image_size=size))
    ds = synthetic.SyntheticIdentities(spec)
    folder.mkdir()
    for i in range(n):
        img, _ = ds[i]                                        # [3, S, S] in [-1, 1]
        arr = ((img.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:02d}.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from hfsoftmax.config import load_config
    from hfsoftmax.train import train

    out = tmp_path_factory.mktemp("run")
    train(load_config(None, ["data.num_classes=20", "data.samples_per_class=4", "data.image_size=16",
                             "data.val_identities=10", "data.val_pairs=20", "model.feature_dim=16",
                             "train.progress=false", "train.steps=3", "train.batch_size=8", f"train.out_dir={out}"]))
    return str(out / "ckpt_last.pt")


def test_onnx_matches_torch_on_real_images(tmp_path, tiny_ckpt, capsys):
    from hfsoftmax.data.transforms import decode_image, to_tensor_normalized
    from hfsoftmax.eval.cli import load_model

    out = str(tmp_path / "m.onnx")
    assert export_onnx.main(["--checkpoint", tiny_ckpt, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "dynamic batch" in text and "onnxruntime check" in text
    folder = _synthetic_images(tmp_path / "imgs")
    x = torch.stack([to_tensor_normalized(decode_image(open(p, "rb").read(), str(p)), 16)
                     for p in sorted(folder.iterdir())])
    model, _, _ = load_model(tiny_ckpt)
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    for b in (1, len(x)):                                    # the batch axis is dynamic
        got = sess.run(["embeddings"], {"images": x[:b].numpy()})[0]
        with torch.no_grad():
            want = model(x[:b]).numpy()
        assert np.abs(got - want).max() < 1e-4


def test_face_resnet_exports(tmp_path):
    from hfsoftmax.backbones import get_backbone

    net = get_backbone("resnet18", 32, 112, dropout=0.2).eval()
    ck = tmp_path / "r18.pt"
    torch.save({"model": net.state_dict(), "config": {"model": {"backbone": "resnet18", "feature_dim": 32},
                                                       "data": {"image_size": 112}}}, ck)
    export_onnx.export(str(ck), str(tmp_path / "r18.onnx"))
    assert export_onnx.check(str(ck), str(tmp_path / "r18.onnx"), batch=2) < 1e-4


def test_extract_features_of_a_folder(tmp_path, tiny_ckpt):
    from hfsoftmax.data.transforms import decode_image, to_tensor_normalized
    from hfsoftmax.eval.cli import load_model
    from hfsoftmax.eval.extract import extract_features as ref_extract

    folder = _synthetic_images(tmp_path / "imgs")
    out = str(tmp_path / "f.npy")
    assert extract_features.main(["--checkpoint", tiny_ckpt, "--images", str(folder), "--out", out]) == 0
    feats = np.load(out)
    paths = open(out + ".paths.txt").read().split()
    assert feats.shape == (6, 16) and len(paths) == 6 and paths == sorted(paths)
    model, _, _ = load_model(tiny_ckpt)
    x = torch.stack([to_tensor_normalized(decode_image(open(p, "rb").read(), p), 16) for p in paths])
    np.testing.assert_allclose(feats, ref_extract(model, x, flip=True, progress=False), atol=1e-6)
    (folder / "bad.jpg").write_bytes(b"not an image")
    assert extract_features.main(["--checkpoint", tiny_ckpt, "--images", str(folder), "--out", out]) == 2
