"""Exact resume of HF-softmax with a real class index at M < K (issue 23, item 13): the store snapshot
holds the live index and the build due to go live, so 3 steps + a resumed 3 equal 6 straight,
bitwise, for every index; and without that state the resumed run differs (the test can fail)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hfsoftmax.config import load_config
from hfsoftmax.train import train
from paramserver.snapshot import INDEX_META, read_manifest

RUN = ["data.num_classes=60", "data.samples_per_class=4", "data.image_size=16", "data.val_identities=10",
       "data.val_pairs=20", "data.val_samples=0", "model.feature_dim=16", "train.progress=false",
       "train.log_every=1", "optim.lr=0.05", "optim.warmup_steps=2", "head.name=hf", "head.num_active=24",
       "head.candidates=8", "head.rebuild_every=2", "head.margin=cosface", "head.scale=8", "head.margin_m=0.2",
       "head.cpk_every=0", "train.batch_size=8", "train.steps=7", "store.kind=local", "train.deterministic=true",
       "head.degree=4", "head.nlist=4", "head.ntrees=4"]


def _run(out, *extra: str) -> None:
    train(load_config(None, RUN + [f"train.out_dir={out}", *extra]))


def _final(out) -> tuple[dict, np.ndarray]:
    ck = torch.load(out / "ckpt_last.pt", map_location="cpu", weights_only=False)
    snap = out / ck["store_snapshot"]
    return ck["model"], np.load(snap / read_manifest(str(snap))["files"]["W"])


@pytest.mark.parametrize("index", ["forest", "graph", "ivf", "hnsw"])
def test_hf_resume_with_a_class_index_is_exact(tmp_path, index) -> None:
    # T = 2: builds at 0, 2, 4, 6; a checkpoint at step 3 holds the index live since step 2 and the
    # build of step 2, due at step 4
    _run(tmp_path / "a", f"head.index={index}", "train.ckpt_every=3", "train.keep_every=3")
    _run(tmp_path / "b", f"head.index={index}", f"train.resume={tmp_path / 'a' / 'ckpt_00000003.pt'}")
    assert (tmp_path / "a" / "store_00000003" / INDEX_META).exists()
    (ma, Wa), (mb, Wb) = _final(tmp_path / "a"), _final(tmp_path / "b")
    np.testing.assert_array_equal(Wa, Wb)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), (index, k)


def test_without_the_saved_index_the_resumed_run_differs(tmp_path, monkeypatch) -> None:
    _run(tmp_path / "a", "head.index=forest", "train.ckpt_every=3", "train.keep_every=3")
    os.remove(tmp_path / "a" / "store_00000003" / INDEX_META)          # an older snapshot: rebuilt on restore
    _run(tmp_path / "b", "head.index=forest", f"train.resume={tmp_path / 'a' / 'ckpt_00000003.pt'}")
    (_, Wa), (_, Wb) = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert not np.array_equal(Wa, Wb)


def test_an_index_that_cannot_be_saved_is_rebuilt(tmp_path, monkeypatch) -> None:
    def refuse(self):
        raise NotImplementedError("test: no exported form")
    monkeypatch.setattr("paramserver.index.base.ClassIndex.export_state", refuse)
    _run(tmp_path / "a", "head.index=forest", "train.ckpt_every=3", "train.keep_every=3", "train.steps=4")
    assert not (tmp_path / "a" / "store_00000003" / INDEX_META).exists()
    _run(tmp_path / "b", "head.index=forest", f"train.resume={tmp_path / 'a' / 'ckpt_00000003.pt'}",
         "train.steps=4")
    assert torch.load(tmp_path / "b" / "ckpt_last.pt", weights_only=False)["step"] == 4


def test_only_deterministic_swaps_save_their_index() -> None:
    """Builds that follow timing (W above the deterministic limit) are not saved: a resume could not
    be exact anyway, and a large forest would weigh more than W in every snapshot."""
    from paramserver.index import IndexManager, make_index

    W = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    for det, saved in ((False, False), (True, True)):
        mgr = IndexManager(lambda: make_index("exact", 8, "angular"), 2, background=True, deterministic=det)
        mgr.build_now(W, 0)
        assert (mgr.export_state() is not None) == saved, det
        mgr.close()
    mgr = IndexManager(lambda: make_index("exact", 8, "angular"), 2, background=False)    # synchronous builds
    mgr.build_now(W, 0)
    assert mgr.export_state() is not None
