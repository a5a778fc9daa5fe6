"""In-process WeightStore: bitwise parity with torch.optim.SGD, sync steps, bad input, snapshots, shards."""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

from paramserver.optim import Scratch, SGDConfig, sgd_update_indexed, sgd_update_rows
from paramserver.store import (BadRequestError, StaleStepError, SyncTimeoutError, WeightStore, init_rows,
                               shard_ranges)


def torch_reference(W0: np.ndarray, pushes: list, momentum: float, wd: float, nesterov: bool):
    """Each row is its own torch parameter, stepped only when touched (grad None otherwise).

    pushes: per step, (lr, [(ids, grads) per client in client order]). Returns (W, momentum buffers).
    """
    K, d = W0.shape
    params = [torch.nn.Parameter(torch.from_numpy(W0[i].copy())) for i in range(K)]
    opt = torch.optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    for lr, per_client in pushes:
        g = np.zeros((K, d), dtype=W0.dtype)
        touched = set()
        for ids, grads in per_client:  # duplicates summed left to right, clients in order
            for i, row in zip(ids, grads):
                g[i] += row
                touched.add(int(i))
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(g[i].copy()) if i in touched else None
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    W = np.stack([p.detach().numpy() for p in params])
    B = np.stack([opt.state[p]["momentum_buffer"].numpy() if p in opt.state and momentum else
                  np.zeros(d, W0.dtype) for p in params])
    return W, B


def make_pushes(K: int, d: int, steps: int, clients: int, n: int, seed: int, dtype=np.float32) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(steps):
        lr = 0.1 * 0.9 ** s
        out.append((lr, [(rng.integers(0, K, n), rng.standard_normal((n, d)).astype(dtype)) for _ in range(clients)]))
    return out


@pytest.mark.parametrize("nesterov,wd,momentum", [(False, 5e-4, 0.9), (True, 1e-2, 0.8), (False, 0.0, 0.0)])
def test_sgd_bitwise_parity_with_torch(nesterov: bool, wd: float, momentum: float) -> None:
    K, d, R = 24, 16, 2
    store = WeightStore(K, d, init_std=0.1, momentum=momentum, weight_decay=wd, nesterov=nesterov, num_clients=R,
                        exact_rounding=True)
    W0 = store.pull(np.arange(K))
    pushes = make_pushes(K, d, steps=12, clients=R, n=9, seed=3)  # duplicates within and across clients
    for s, (lr, per_client) in enumerate(pushes):
        for c, (ids, grads) in enumerate(per_client):
            store.push(ids, grads, step=s, lr=lr, client_id=c)
    assert store.step == len(pushes)
    W_ref, B_ref = torch_reference(W0, pushes, momentum, wd, nesterov)
    np.testing.assert_array_equal(store.pull(np.arange(K)), W_ref)
    if momentum:
        np.testing.assert_array_equal(store.pull(np.arange(K), matrix="momentum"), B_ref)
    else:   # momentum 0 keeps no buffer: nothing to pull
        with pytest.raises(BadRequestError, match="no momentum buffer"):
            store.pull(np.arange(K), matrix="momentum")


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("nesterov,wd,momentum", [(False, 5e-4, 0.9), (True, 1e-2, 0.8), (False, 0.0, 0.0),
                                                  (True, 0.0, 0.9)])
def test_blocked_update_equals_whole_update(exact: bool, nesterov: bool, wd: float, momentum: float) -> None:
    """Gather/update/scatter in blocks (edges: 1, 3, n-1, n, more than n rows) is bitwise the one-shot update."""
    K, d, n = 40, 8, 17
    rng = np.random.default_rng(7)
    cfg = SGDConfig(momentum=momentum, weight_decay=wd, nesterov=nesterov, exact_rounding=exact)
    W0 = rng.standard_normal((K, d)).astype(np.float32)
    M0 = rng.standard_normal((K, d)).astype(np.float32)
    idx = rng.permutation(K)[:n]  # distinct, unsorted
    grad = rng.standard_normal((n, d)).astype(np.float32)
    w, b = W0[idx].copy(), M0[idx].copy()
    sgd_update_rows(w, b, grad, 0.05, cfg)
    W_ref, M_ref = W0.copy(), M0.copy()
    W_ref[idx], M_ref[idx] = w, b
    for rows in (1, 3, n - 1, n, 64):
        W, M = W0.copy(), M0.copy()
        sgd_update_indexed(W, M, idx, grad, 0.05, cfg, Scratch(), block_rows=rows)
        np.testing.assert_array_equal(W, W_ref)
        np.testing.assert_array_equal(M, M_ref)


def test_bitwise_parity_with_torch_over_several_blocks() -> None:
    """Pushes of hundreds of 512-wide rows span several update blocks; still bit-identical to torch."""
    K, d, R = 700, 512, 2
    store = WeightStore(K, d, init_std=0.1, num_clients=R, nesterov=True, exact_rounding=True)
    W0 = store.pull(np.arange(K))
    rng = np.random.default_rng(11)
    pushes = []
    for s in range(3):
        per_client = [(np.sort(rng.choice(K, 300, replace=False)), rng.standard_normal((300, d)).astype(np.float32))
                      for _ in range(R)]
        pushes.append((0.1 * 0.9 ** s, per_client))
        for c, (ids, grads) in enumerate(per_client):
            store.push(ids, grads, step=s, lr=pushes[-1][0], client_id=c)
    one = WeightStore(K, d, init_std=0.1, exact_rounding=True, nesterov=True)  # single client: sorted-ids fast path
    ids, grads = np.arange(0, K, 2), rng.standard_normal((K // 2, d)).astype(np.float32)
    one.push(ids, grads, 0, 0.1)
    W_ref, B_ref = torch_reference(W0, pushes, 0.9, 5e-4, True)
    np.testing.assert_array_equal(store.pull(np.arange(K)), W_ref)
    np.testing.assert_array_equal(store.pull(np.arange(K), matrix="momentum"), B_ref)
    W1_ref, B1_ref = torch_reference(W0, [(0.1, [(ids, grads)])], 0.9, 5e-4, True)
    np.testing.assert_array_equal(one.pull(np.arange(K)), W1_ref)
    np.testing.assert_array_equal(one.pull(np.arange(K), matrix="momentum"), B1_ref)


@pytest.mark.parametrize("nesterov", [False, True])
def test_default_rounding_matches_torch_to_float32_rounding(nesterov: bool) -> None:
    K, d = 24, 16
    store = WeightStore(K, d, init_std=0.1, nesterov=nesterov, num_clients=2)
    W0 = store.pull(np.arange(K))
    pushes = make_pushes(K, d, steps=12, clients=2, n=9, seed=3)
    for s, (lr, per_client) in enumerate(pushes):
        for c, (ids, grads) in enumerate(per_client):
            store.push(ids, grads, step=s, lr=lr, client_id=c)
    W_ref, B_ref = torch_reference(W0, pushes, 0.9, 5e-4, nesterov)
    np.testing.assert_allclose(store.pull(np.arange(K)), W_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(store.pull(np.arange(K), matrix="momentum"), B_ref, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(store.pull(np.arange(K)), W0)


def test_float64_parity_with_torch() -> None:
    K, d = 10, 8
    store = WeightStore(K, d, dtype="float64", init_std=0.1, nesterov=True)
    W0 = store.pull(np.arange(K))
    pushes = make_pushes(K, d, steps=6, clients=1, n=5, seed=1, dtype=np.float64)
    for s, (lr, [(ids, grads)]) in enumerate(pushes):
        store.push(ids, grads, s, lr)
    W_ref, _ = torch_reference(W0, pushes, 0.9, 5e-4, True)
    np.testing.assert_allclose(store.pull(np.arange(K)), W_ref, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("nesterov", [False, True])
def test_unrolled_momentum_moves_a_row_as_far_as_dense_momentum_does(nesterov: bool) -> None:
    """One gradient impulse: dense torch SGD (momentum 0.8, the row then stepped with zero gradients
    until the series has died out) and one "unrolled" push end at the same row; the unrolled store
    keeps no momentum, and a lazy store moves the row by only (1 - m) of that (Nesterov: (1 - m^2))
    until the row's next touch."""
    d, lr, m = 16, 0.05, 0.8
    rng = np.random.default_rng(0)
    g = rng.standard_normal((1, d)).astype(np.float32)
    unrolled = WeightStore(3, d, init_std=0.1, momentum=m, weight_decay=0.0, nesterov=nesterov,
                           sparse_momentum="unrolled")
    lazy = WeightStore(3, d, init_std=0.1, momentum=m, weight_decay=0.0, nesterov=nesterov)
    w0 = unrolled.pull([1])[0]
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([p], lr=lr, momentum=m, nesterov=nesterov)
    p.grad = torch.from_numpy(g[0].copy())
    opt.step()
    for _ in range(200):                                  # m^200 ~ 4e-20: the series is summed
        p.grad = torch.zeros(d)
        opt.step()
    unrolled.push([1], g, 0, lr)
    lazy.push([1], g, 0, lr)
    np.testing.assert_allclose(unrolled.pull([1])[0], p.detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(BadRequestError, match="no momentum buffer"):
        unrolled.pull(np.arange(3), matrix="momentum")
    first = (1 - m) * ((1 + m) if nesterov else 1)        # lazy: lr * g (Nesterov: lr * g * (1 + m)) for now
    np.testing.assert_allclose(lazy.pull([1])[0] - w0, first * (unrolled.pull([1])[0] - w0), rtol=1e-4, atol=1e-7)
    # weight decay is unrolled with the gradient: w - lr / (1 - m) * (g + wd * w)
    st = WeightStore(3, d, init_std=0.1, momentum=m, weight_decay=0.01, sparse_momentum="unrolled")
    w0 = st.pull([2])[0]
    st.push([2], g, 0, lr)
    np.testing.assert_allclose(st.pull([2])[0], w0 - lr / (1 - m) * (g[0] + 0.01 * w0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sparse_momentum must be one of"):
        WeightStore(3, d, sparse_momentum="eager")


def test_unrolled_is_kept_in_snapshots(tmp_path) -> None:
    st = WeightStore(4, 2, sparse_momentum="unrolled")
    st.snapshot(str(tmp_path / "s"))
    assert WeightStore.from_snapshot(str(tmp_path / "s")).opt.sparse_momentum == "unrolled"
    lazy = WeightStore(4, 2)
    lazy.restore(str(tmp_path / "s"), in_place=True)
    assert lazy.opt.sparse_momentum == "unrolled"


def test_untouched_rows_do_not_move() -> None:
    store = WeightStore(8, 4, num_clients=1)
    before = store.pull(np.arange(8))
    store.push([1, 3], np.ones((2, 4), np.float32), 0, 0.5)
    after = store.pull(np.arange(8))
    np.testing.assert_array_equal(np.delete(after, [1, 3], 0), np.delete(before, [1, 3], 0))
    assert not np.array_equal(after[[1, 3]], before[[1, 3]])


def test_three_clients_synchronous_and_pull_waits() -> None:
    R = 3
    store = WeightStore(30, 4, num_clients=R, sync_timeout=5.0)
    got: dict = {}

    def client(c: int) -> None:
        for s in range(4):
            rows = store.pull(np.arange(30), step=s)  # sees exactly the weights after step s-1
            got[(c, s)] = rows
            time.sleep(0.002 * c)  # clients arrive in different orders
            store.push(np.arange(c, 30, 3), np.full((10, 4), 0.1 * (c + 1), np.float32), s, 0.1, client_id=c)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(R)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert store.step == 4
    for s in range(4):  # every client saw the same weights at each step
        np.testing.assert_array_equal(got[(0, s)], got[(1, s)])
        np.testing.assert_array_equal(got[(0, s)], got[(2, s)])


def test_pull_timeout_names_missing_clients() -> None:
    store = WeightStore(10, 4, num_clients=3)
    store.push([1], np.ones((1, 4), np.float32), 0, 0.1, client_id=0)
    store.push([2], np.ones((1, 4), np.float32), 0, 0.1, client_id=2)
    t0 = time.monotonic()
    with pytest.raises(SyncTimeoutError, match=r"client ids \[1\] of 3 have not pushed step 0"):
        store.pull([0], step=1, timeout=0.3)
    assert time.monotonic() - t0 < 2.0


def test_one_step_ahead_push_is_buffered() -> None:
    store = WeightStore(10, 4, num_clients=2)
    g = np.ones((1, 4), np.float32)
    store.push([1], g, 0, 0.1, client_id=0)
    store.push([1], g, 1, 0.1, client_id=0)  # client 0 runs ahead by one step
    assert store.step == 0
    store.push([1], g, 0, 0.1, client_id=1)
    assert store.step == 1
    store.push([1], g, 1, 0.1, client_id=1)
    assert store.step == 2


def _bad_pushes(store: WeightStore) -> list:
    d = store.dim
    g = np.ones((2, d), np.float32)
    nan = g.copy()
    nan[1, 0] = np.nan
    inf = g.copy()
    inf[0, 0] = np.inf
    return [
        (BadRequestError, lambda: store.push([0, store.num_classes], g, store.step, 0.1)),  # out of range
        (BadRequestError, lambda: store.push([-1, 0], g, store.step, 0.1)),
        (BadRequestError, lambda: store.push(np.array([0.0, 1.0]), g, store.step, 0.1)),  # not integers
        (BadRequestError, lambda: store.push([[0, 1]], g, store.step, 0.1)),
        (BadRequestError, lambda: store.push([0, 1], np.ones((2, d + 1), np.float32), store.step, 0.1)),  # shape
        (BadRequestError, lambda: store.push([0, 1], np.ones((2, d), np.float64), store.step, 0.1)),  # dtype
        (BadRequestError, lambda: store.push([0, 1], nan, store.step, 0.1)),
        (BadRequestError, lambda: store.push([0, 1], inf, store.step, 0.1)),
        (StaleStepError, lambda: store.push([0, 1], g, store.step - 1, 0.1)),  # already applied
        (StaleStepError, lambda: store.push([0, 1], g, store.step + 2, 0.1)),
        (BadRequestError, lambda: store.push([0, 1], g, store.step, float("nan"))),
        (BadRequestError, lambda: store.push([0, 1], g, store.step, 0.1, client_id=7)),
        (BadRequestError, lambda: store.set_rows([0, 0], g)),
        (BadRequestError, lambda: store.set_rows([0, 1], g, matrix="bias")),
        (BadRequestError, lambda: store.pull([0], matrix="bias")),
    ]


def test_bad_input_raises_and_leaves_matrix_bit_identical() -> None:
    store = WeightStore(12, 4, num_clients=1)
    store.push([1, 2], np.ones((2, 4), np.float32), 0, 0.1)
    W, B, step = store.pull(np.arange(12)), store.pull(np.arange(12), matrix="momentum"), store.step
    for exc, call in _bad_pushes(store):
        with pytest.raises(exc):
            call()
        np.testing.assert_array_equal(store.pull(np.arange(12)), W)
        np.testing.assert_array_equal(store.pull(np.arange(12), matrix="momentum"), B)
        assert store.step == step


def test_lr_mismatch_and_double_push_refused() -> None:
    store = WeightStore(5, 2, num_clients=2)
    g = np.ones((1, 2), np.float32)
    store.push([0], g, 0, 0.1, client_id=0)
    with pytest.raises(BadRequestError, match="differs"):
        store.push([0], g, 0, 0.2, client_id=1)
    with pytest.raises(BadRequestError, match="already pushed"):
        store.push([0], g, 0, 0.1, client_id=0)
    assert store.step == 0


def test_snapshot_restore_roundtrip(tmp_path) -> None:
    store = WeightStore(50, 8, nesterov=True, momentum=0.7, num_clients=1)
    for s in range(3):
        store.push([1, 2, 3], np.full((3, 8), s + 1.0, np.float32), s, 0.1)
    path = str(tmp_path / "snap")
    store.snapshot(path)
    man = json.load(open(os.path.join(path, "manifest.json")))
    assert (man["num_classes"], man["dim"], man["dtype"], man["step"]) == (50, 8, "float32", 3)
    assert man["optimizer"] == {"momentum": 0.7, "weight_decay": 5e-4, "nesterov": True, "exact_rounding": False,
                                "sparse_momentum": "lazy"}
    W, B = store.pull(np.arange(50)), store.pull(np.arange(50), matrix="momentum")
    store.push([4], np.ones((1, 8), np.float32), 3, 0.1)
    store.snapshot(path)  # overwriting an existing snapshot is atomic too
    store.restore(str(tmp_path / "snap"))
    assert store.step == 4
    other = WeightStore.from_snapshot(path)
    np.testing.assert_array_equal(other.pull(np.arange(50)), store.pull(np.arange(50)))
    assert other.opt == SGDConfig(0.7, 5e-4, True) and other.step == 4
    fresh = WeightStore(50, 8, seed=9)
    fresh.restore(path, in_place=True)
    np.testing.assert_array_equal(fresh.pull(np.arange(50)), store.pull(np.arange(50)))
    assert not np.array_equal(W, store.pull(np.arange(50))) and B.shape == (50, 8)
    assert not [n for n in os.listdir(tmp_path) if n != "snap"]  # no temporary leftovers


def test_restore_refuses_mismatch_and_corruption(tmp_path) -> None:
    store = WeightStore(20, 4)
    path = str(tmp_path / "s")
    store.snapshot(path)
    with pytest.raises(BadRequestError, match="dim"):
        WeightStore(20, 5).restore(path)
    other = WeightStore(20, 4, seed=1)
    before = other.pull(np.arange(20))
    with open(os.path.join(path, "momentum.npy"), "r+b") as f:
        f.truncate(200)
    with pytest.raises(BadRequestError, match="momentum.npy"):
        other.restore(path)
    np.testing.assert_array_equal(other.pull(np.arange(20)), before)  # untouched
    json.dump({"format": "x"}, open(os.path.join(path, "manifest.json"), "w"))
    with pytest.raises(BadRequestError, match="format"):
        WeightStore.from_snapshot(path)


def test_shards_hold_the_rows_of_the_whole_matrix() -> None:
    K, d = 10000, 3  # crosses init blocks
    assert shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    whole = WeightStore(K, d, seed=5).pull(np.arange(K))
    parts = [WeightStore(hi - lo, d, seed=5, class_offset=lo, total_classes=K).pull(np.arange(lo, hi))
             for lo, hi in shard_ranges(K, 3)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    np.testing.assert_array_equal(init_rows(4000, 4200, d, "float32", "normal", 0.01, 5), whole[4000:4200])
    with pytest.raises(BadRequestError, match="out of range"):
        WeightStore(10, 2, class_offset=10).pull([3])


class FakeIndex:
    """Exact inner-product index over a store's rows, recording the hook calls."""

    def __init__(self, store: WeightStore) -> None:
        self.store = store
        self.changed: list = []
        self.rebuilds: list = []

    def query(self, feats: np.ndarray, n: int, labels=None):
        lo, _ = self.store.class_range
        scores = feats @ self.store.rows_view().T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        return top + lo, np.take_along_axis(scores, top, axis=1)

    def rows_changed(self, ids, rows, step) -> None:
        self.changed.append((np.array(ids), np.array(rows), step))

    def maybe_rebuild(self, store, step) -> None:
        self.rebuilds.append(step)

    # the rest of paramserver.api.IndexHook: no rebuilds of its own
    rebuild_every = 0

    def reset(self, W, step) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def close(self, timeout=None) -> None:
        pass


def test_index_hooks_and_query() -> None:
    store = WeightStore(20, 4, num_clients=1)
    with pytest.raises(BadRequestError, match="no class index"):
        store.query(np.ones((1, 4), np.float32), 3)
    idx = FakeIndex(store)
    store.attach_index(idx)
    store.push([5, 2, 5], np.ones((3, 4), np.float32), 0, 0.1)
    (ids, rows, step), = idx.changed
    assert step == 1 and idx.rebuilds == [1]
    np.testing.assert_array_equal(np.sort(ids), [2, 5])
    np.testing.assert_array_equal(rows, store.pull(ids))
    feats = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    got_ids, got_scores = store.query(feats, 5)
    assert got_ids.shape == (3, 5) and got_ids.dtype == np.int64 and got_scores.dtype == np.float32
    full = feats @ store.pull(np.arange(20)).T
    np.testing.assert_array_equal(got_ids[:, 0], full.argmax(1))


def test_stats() -> None:
    store = WeightStore(10, 4)
    store.push([1], np.ones((1, 4), np.float32), 0, 0.1)
    st = store.stats()
    assert st["rows"] == 10 and st["bytes"] == 2 * 10 * 4 * 4 and st["step"] == 1 and st["pushes"] == 1
    assert st["pushes_per_s"] > 0


_CRASH_CHILD = r"""
import os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from paramserver.store import WeightStore
path, crash_at, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
st = WeightStore(30, 4, seed=1, momentum=0.9)
for s in range(steps):
    st.push([1, 2, 3], np.full((3, 4), 0.1 * (s + 1), np.float32), s, 0.5)
real, calls = os.replace, [0]
def dying_replace(a, b):
    calls[0] += 1
    if calls[0] == crash_at:
        os._exit(9)          # killed right before this rename
    real(a, b)
os.replace = dying_replace
st.snapshot(path)
"""


@pytest.mark.parametrize("crash_at,steps", [(1, 3), (2, 3), (3, 3), (2, 4), (3, 4)])
def test_snapshot_killed_at_each_rename_restores_the_acknowledged_step(tmp_path, crash_at, steps) -> None:
    """Snapshot step 3 (acknowledged), then re-snapshot the same path at step 3 or 4 and die before
    rename 1..3 (the manifest, path -> .old, .tmp -> path): restore comes back at step >= 3 with
    that step's rows, and no .tmp/.old leftovers remain."""
    import subprocess
    import sys

    from paramserver.store import WeightStore

    path = str(tmp_path / "snap")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ok = subprocess.run([sys.executable, "-c", _CRASH_CHILD, root, path, "0", "3"], timeout=60)
    assert ok.returncode == 0
    died = subprocess.run([sys.executable, "-c", _CRASH_CHILD, root, path, str(crash_at), str(steps)], timeout=60)
    assert died.returncode == 9
    st = WeightStore(30, 4, seed=0)
    man = st.restore(path)
    ref = WeightStore(30, 4, seed=1, momentum=0.9)
    for s in range(man["step"]):
        ref.push([1, 2, 3], np.full((3, 4), 0.1 * (s + 1), np.float32), s, 0.5)
    assert man["step"] >= 3
    np.testing.assert_array_equal(st.pull(np.arange(30)), ref.pull(np.arange(30)))
    assert sorted(os.listdir(tmp_path)) == ["snap"]


def test_snapshot_never_replaces_what_is_not_a_snapshot(tmp_path) -> None:
    from paramserver.store import WeightStore

    st = WeightStore(10, 2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    (tmp_path / "file.txt").write_text("keep me")
    for p in (tmp_path / "mine", tmp_path / "file.txt"):
        with pytest.raises(BadRequestError, match="not a snapshot.*refusing to replace"):
            st.snapshot(str(p))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "file.txt").read_text() == "keep me"
    st.snapshot(str(tmp_path / "s"))
    st.snapshot(str(tmp_path / "s"))                  # a snapshot may replace a snapshot
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "mine", "s"]


def test_lean_store_keeps_no_momentum_matrix(tmp_path) -> None:
    """Under "unrolled" (and momentum 0) no momentum buffer exists: none allocated, counted, written
    or restored; a "lazy" store keeps one. Old snapshots with a momentum file still restore."""
    K, d = 40, 8
    lean = WeightStore(K, d, sparse_momentum="unrolled", weight_decay=0.01)
    assert lean._M is None and lean.stats()["bytes"] == K * d * 4 and not lean.stats()["momentum_buffer"]
    assert WeightStore(K, d, momentum=0.0)._M is None
    lazy = WeightStore(K, d)
    assert lazy.stats()["bytes"] == 2 * K * d * 4 and lazy.stats()["momentum_buffer"]
    g = np.random.default_rng(0).standard_normal((3, d)).astype(np.float32)
    lean.push([1, 5, 9], g, 0, 0.1)
    with pytest.raises(BadRequestError, match="no momentum buffer"):    # refused like set_rows
        lean.pull(np.arange(K), matrix="momentum")
    with pytest.raises(BadRequestError, match="no momentum buffer"):
        lean.set_rows([0], np.ones((1, d), np.float32), matrix="momentum")
    man = lean.snapshot(str(tmp_path / "lean"))
    assert man["files"] == {"W": "W.npy"} and sorted(os.listdir(tmp_path / "lean")) == ["W.npy", "manifest.json"]
    back = WeightStore.from_snapshot(str(tmp_path / "lean"))
    assert back._M is None and back.step == 1
    np.testing.assert_array_equal(back.pull(np.arange(K)), lean.pull(np.arange(K)))
    # a snapshot written before the lean store: unrolled with an all-zero momentum.npy
    old = tmp_path / "old"
    lean.snapshot(str(old))
    np.save(old / "momentum.npy", np.zeros((K, d), np.float32))
    mpath = old / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"]["momentum"] = "momentum.npy"
    mpath.write_text(json.dumps(m))
    fresh = WeightStore(K, d, sparse_momentum="unrolled", weight_decay=0.01)
    fresh.restore(str(old))
    assert fresh._M is None and fresh.step == 1
    np.testing.assert_array_equal(fresh.pull(np.arange(K)), lean.pull(np.arange(K)))
    # a lazy snapshot restored into a lean store brings its buffer (and its optimizer) along
    lazy.push([2, 3], g[:2], 0, 0.1)
    lazy.snapshot(str(tmp_path / "lazy"))
    fresh.restore(str(tmp_path / "lazy"), in_place=True)
    assert fresh._M is not None and fresh.opt.sparse_momentum == "lazy"
    np.testing.assert_array_equal(fresh.pull(np.arange(K), matrix="momentum"), lazy.pull(np.arange(K), matrix="momentum"))
    assert fresh.pull([2], matrix="momentum").any()
    # a lazy manifest whose momentum file entry is missing is refused by name
    m = json.loads((tmp_path / "lazy" / "manifest.json").read_text())
    del m["files"]["momentum"]
    (tmp_path / "lazy" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BadRequestError, match="'files' must map W and momentum"):
        fresh.restore(str(tmp_path / "lazy"))


def test_overflow_bound_from_the_push_norm_neither_misses_nor_over_refuses() -> None:
    """The update's overflow guard uses the pushed gradient's norm (no extra pass): a gradient whose
    norm overflows but whose elements are moderate is applied; one that would overflow is refused."""
    d = 16
    st = WeightStore(4, d, sparse_momentum="unrolled", weight_decay=0.0)
    w0 = st.pull(np.arange(4))
    big = np.full((2, d), 1e20, np.float32)                 # |g|^2 overflows float32, lr * g does not
    st.push([0, 1], big, 0, 1e-3)
    assert st.stats()["refused_updates"] == 0
    np.testing.assert_allclose(st.pull([0, 1]), w0[:2] - 1e-3 / 0.1 * big, rtol=1e-6)
    st.push([2], np.full((1, d), 3e37, np.float32), 1, 1.0)  # lr/(1-m) * g = 3e38 > the 1e30 limit
    assert st.stats()["refused_updates"] == 1
    np.testing.assert_array_equal(st.pull([2]), w0[2:3])
    with pytest.raises(BadRequestError, match="NaN or Inf"):
        st.push([3], np.full((1, d), np.inf, np.float32), 2, 1.0)


def test_pull_into_a_reused_buffer() -> None:
    st = WeightStore(30, 4, sparse_momentum="unrolled")
    buf = np.empty((3, 4), np.float32)
    got = st.pull([7, 2, 29], out=buf)
    assert got is buf
    np.testing.assert_array_equal(buf, st.pull(np.arange(30))[[7, 2, 29]])
    with pytest.raises(BadRequestError, match="no momentum buffer"):
        st.pull([0, 1, 2], matrix="momentum", out=buf)
    for bad in (np.empty((2, 4), np.float32), np.empty((3, 4), np.float64), np.empty((4, 3), np.float32).T):
        with pytest.raises(BadRequestError, match="out must be"):
            st.pull([1, 2, 3], out=bad)
