"""The store's ``score`` op: features scored against rows where the rows live (one shard, two shards
over the wire), equal to a direct computation; the CPK probe and the top-k evaluation use it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paramserver.api import BadRequestError
from paramserver.client import RemoteStore
from paramserver.store import WeightStore, shard_ranges
from test_paramserver_server import inthread

K, D, B = 150, 8, 5


def direct(W: np.ndarray, feats: np.ndarray, ids: np.ndarray | None, scale: float | None):
    """Reference in torch, float64: (lse [B], logits [B, n], ids [n])."""
    ids = np.arange(len(W)) if ids is None else ids
    w, f = torch.from_numpy(W[ids]).double(), torch.from_numpy(feats).double()
    s = f @ w.t() if scale is None else scale * F.normalize(f, dim=1) @ F.normalize(w, dim=1).t()
    return torch.logsumexp(s, dim=1).numpy(), s.numpy(), ids


def check(got, want, k: int) -> None:
    lse, top, top_ids = got
    ref_lse, s, ids = want
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-6)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top_ids, ids[order])
    np.testing.assert_allclose(top, np.take_along_axis(s, order, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [None, 16.0])
@pytest.mark.parametrize("subset", [False, True])
def test_score_one_shard_and_two_equal_a_direct_computation(scale, subset) -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((B, D)).astype(np.float32)
    ids = rng.choice(K, 40, replace=False) if subset else None
    whole = WeightStore(K, D, seed=3, init_std=0.5)
    W = whole.pull(np.arange(K))
    want = direct(W, feats, ids, scale)
    check(whole.score(feats, 7, ids=ids, scale=scale), want, 7)
    shards = [WeightStore(hi - lo, D, seed=3, init_std=0.5, class_offset=lo, total_classes=K)
              for lo, hi in shard_ranges(K, 2)]
    with inthread(shards[0]) as (_, a0), inthread(shards[1]) as (_, a1), RemoteStore([a0, a1], K, D, timeout=10) as rs:
        check(rs.score(feats, 7, ids=ids, scale=scale), want, 7)
        # k beyond the rows scored: all of them, sorted
        lse, top, top_ids = rs.score(feats, 10_000, ids=ids, scale=scale)
        assert top.shape == (B, K if ids is None else 40)
        assert shards[0].stats()["rows_scored"] + shards[1].stats()["rows_scored"] == 2 * (K if ids is None else 40)
        assert shards[0].stats()["rows_pulled"] == 0                 # no row travelled


def test_score_waits_for_its_step_and_refuses_bad_input() -> None:
    store = WeightStore(20, 4, seed=1, num_clients=1)
    feats = np.ones((2, 4), np.float32)
    with inthread(store) as (_, addr), RemoteStore([addr], 20, 4, timeout=10) as rs:
        rs.push([3], np.full((1, 4), -100.0, np.float32), 0, 1.0)
        lse, top, ids = rs.score(feats, 1, step=1)                    # after update 0: row 3 leads
        assert ids[:, 0].tolist() == [3, 3]
        for bad, msg in ((np.full((2, 4), np.nan, np.float32), "NaN or Inf"), (np.ones((2, 5), np.float32), r"\[B, 4\]")):
            with pytest.raises(BadRequestError, match=msg):
                rs.score(bad, 2)
        with pytest.raises(BadRequestError, match="out of range"):
            rs.score(feats, 2, ids=[25])
        with pytest.raises(BadRequestError, match="k must be"):
            store.score(feats, 0)
        assert rs.pull([3]).shape == (1, 4)                           # the server is alive
