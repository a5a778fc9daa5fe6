"""Top-k classification of a held-out list over all K: equal to a direct computation for the full head
and for selective heads on a store (in-process, and two server shards), the same answer from both
kinds of head on one W, logged by training (data.val_path) and reproduced by the classify command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import paramserver.store as pstore
from hfsoftmax.config import HeadConfig, load_config
from hfsoftmax.eval.classify import summarize, topk_hits, val_list_path
from hfsoftmax.heads import FullSoftmax
from hfsoftmax.heads.selective import SelectiveSoftmax
from hfsoftmax.train import train
from paramserver.client import RemoteStore
from paramserver.store import WeightStore, shard_ranges
from test_paramserver_server import inthread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, D, N = 301, 8, 40          # K a multiple of no block size below


def direct_hits(W: np.ndarray, feats: np.ndarray, labels: np.ndarray, scale: float | None) -> np.ndarray:
    """[N, 5] hits of a float64 torch reference: F @ W^T, or scale * cos."""
    w, f = torch.from_numpy(W).double(), torch.from_numpy(feats).double()
    s = f @ w.t() if scale is None else scale * F.normalize(f, dim=1) @ F.normalize(w, dim=1).t()
    top = s.topk(5, dim=1).indices.numpy()
    return top == labels[:, None]


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((K, D)).astype(np.float32)
    labels = rng.integers(0, K, N)
    # features near their label's row (top-1 often right, not always) and some far off
    feats = (W[labels] + 1.5 * rng.standard_normal((N, D))).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return W, feats, labels


def full_head(W: np.ndarray, margin: str) -> FullSoftmax:
    head = FullSoftmax(K, D, margin=margin, scale=16.0)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(W))
    return head


def selective(store, margin: str) -> SelectiveSoftmax:
    return SelectiveSoftmax.from_config(HeadConfig(name="hf", margin=margin, scale=16.0, num_active=16), store, K, D)


@pytest.mark.parametrize("margin", ["none", "cosface"])
def test_topk_equals_a_direct_computation_for_full_and_selective_heads(margin, monkeypatch) -> None:
    W, feats, labels = data()
    scale = None if margin == "none" else 16.0
    want = direct_hits(W, feats, labels, scale)
    assert 0 < want[:, 0].mean() < 1                     # neither trivial nor hopeless
    full = full_head(W, margin)
    got_full = topk_hits(full, torch.from_numpy(feats), torch.from_numpy(labels), "cpu").numpy()
    np.testing.assert_array_equal(got_full, want)
    # the full head's blocked walk, blocks of 64 rows (K = 4 * 64 + 45)
    ids = full.topk(torch.from_numpy(feats), 5, block_size=64)[1].numpy()
    np.testing.assert_array_equal(ids == labels[:, None], want)

    monkeypatch.setattr(pstore, "SCORE_BLOCK_ROWS", 64)  # the store scores in blocks too
    store = WeightStore(K, D, init="zeros")
    store._W[:] = W
    head = selective(store, margin)
    got = topk_hits(head, torch.from_numpy(feats), torch.from_numpy(labels), "cpu").numpy()
    np.testing.assert_array_equal(got, want)
    assert store.stats()["rows_pulled"] == 0             # scored where the rows live
    assert summarize(torch.from_numpy(got)) == summarize(torch.from_numpy(got_full))


def test_topk_on_a_two_shard_server_equals_a_direct_computation(monkeypatch) -> None:
    monkeypatch.setattr(pstore, "SCORE_BLOCK_ROWS", 64)
    _, feats, labels = data(1)
    shards = [WeightStore(hi - lo, D, seed=3, init_std=0.5, class_offset=lo, total_classes=K)
              for lo, hi in shard_ranges(K, 2)]
    W = WeightStore(K, D, seed=3, init_std=0.5).pull(np.arange(K))   # the shards' rows, in one store
    labels = np.argsort(-(feats @ W.T), axis=1)[:, 0].copy()
    labels[::3] = (labels[::3] + 1) % K                  # some wrong top-1
    want = direct_hits(W, feats, labels, 16.0)
    with inthread(shards[0]) as (_, a0), inthread(shards[1]) as (_, a1):
        rs = RemoteStore([a0, a1], K, D, timeout=10)
        head = selective(rs, "cosface")
        try:
            got = topk_hits(head, torch.from_numpy(feats), torch.from_numpy(labels), "cpu").numpy()
        finally:
            head.close()
    np.testing.assert_array_equal(got, want)
    assert 0 < got[:, 0].mean() < 1
    assert shards[0].stats()["rows_pulled"] == shards[1].stats()["rows_pulled"] == 0


def test_labels_outside_k_are_refused() -> None:
    W, feats, _ = data()
    with pytest.raises(ValueError, match="outside the K=301"):
        topk_hits(full_head(W, "none"), torch.from_numpy(feats[:2]), torch.tensor([0, K]), "cpu")


# --------------------------------------------------------------------------------------------- #
# Training with a held-out list, and the classify command on its checkpoint.

def list_folder(folder, classes: int = 6, train_per: int = 4, val_per: int = 2, size: int = 16):
    """A tools/rec2img.py-style folder: images/<c>/<n>.jpg, train_list.txt and val_list.txt."""
    rng = np.random.default_rng(0)
    train_lines, val_lines = [], []
    for c in range(classes):
        base = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((size // 4, size // 4, 1)))
        os.makedirs(folder / "images" / str(c), exist_ok=True)
        for n in range(train_per + val_per):
            img = np.clip(base + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / "images" / str(c) / f"{n}.jpg", quality=95)
            (train_lines if n < train_per else val_lines).append(f"images/{c}/{n}.jpg {c}\n")
    (folder / "train_list.txt").write_text("".join(train_lines))
    (folder / "val_list.txt").write_text("".join(val_lines))
    return folder


def run_args(data_dir, out, head: str) -> list[str]:
    return [f"data.path={data_dir}", "data.image_size=16", "model.feature_dim=16", "train.progress=false",
            "train.batch_size=8", "train.steps=6", "train.log_every=3", "train.eval_every=3", f"head.name={head}",
            "head.margin=cosface", "head.scale=8", "head.num_active=4", "store.kind=local", "optim.lr=0.05",
            f"train.out_dir={out}"]


@pytest.mark.parametrize("head", ["full", "hf"])
def test_training_logs_val_topk_and_the_cli_reproduces_it(tmp_path, head, capsys) -> None:
    from hfsoftmax.eval.cli import main as eval_main

    folder = list_folder(tmp_path / "data")
    assert val_list_path(str(folder), "") == str(folder / "val_list.txt")     # rec2img's list, by default
    assert val_list_path(str(folder), "none") == ""
    out = tmp_path / head
    extra = [] if head == "hf" else [f"data.val_path={folder / 'val_list.txt'}"]
    result = train(load_config(None, run_args(folder, out, head) + extra))
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert [e["step"] for e in evals] == [3, 6]          # every train.eval_every steps and at the end
    assert all(e["val_samples"] == 12 and 0 <= e["val_top1"] <= e["val_top5"] <= 1 for e in evals)
    final = result["classification"]
    assert evals[-1]["val_top1"] == final["top1"] and evals[-1]["val_top5"] == final["top5"]

    cli_out = tmp_path / f"cli_{head}"
    assert eval_main(["classify", "--model", str(out / "ckpt_last.pt"), "--data", str(folder / "val_list.txt"),
                      "--out", str(cli_out)]) == 0
    got = json.loads((cli_out / "classify.json").read_text())
    assert got["samples"] == 12 and got["num_classes"] == 6
    assert got["top1"] == final["top1"] and got["top5"] == final["top5"]
    assert "| 12 |" in (cli_out / "classify.md").read_text()
    if head == "hf":   # W from the running server that holds it, not from the snapshot file
        ck = torch.load(out / "ckpt_last.pt", weights_only=False)
        with inthread(WeightStore.from_snapshot(str(out / ck["store_snapshot"]))) as (server, addr):
            assert eval_main(["classify", "--model", str(out / "ckpt_last.pt"), "--data", str(folder),
                              "--out", str(tmp_path / "srv"), "--server", addr]) == 0
            assert server.store.stats()["rows_pulled"] == 0
        srv = json.loads((tmp_path / "srv" / "classify.json").read_text())
        assert (srv["top1"], srv["top5"], srv["w_from"]) == (final["top1"], final["top5"], addr)
    capsys.readouterr()
    # a list that is not there: one line, exit 2
    assert eval_main(["classify", "--model", str(out / "ckpt_last.pt"), "--data", str(tmp_path / "nope.txt"),
                      "--out", str(cli_out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "nope.txt" in err[-1] and "Traceback" not in "\n".join(err)


def test_missing_checkpoint_is_one_line(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "hfsoftmax.eval", "classify", "--model", str(tmp_path / "no.pt"),
                        "--data", str(tmp_path / "val_list.txt"), "--out", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'no.pt'}"]
