"""Selective softmax head (HF-softmax, Zhang et al. AAAI 2018) on an in-process WeightStore.

Parity with FullSoftmax at M = K (loss, dL/dF and the SGD update of W) for plain, CosFace and
ArcFace logits; selection invariants; the random baseline; blockwise scores/topk; CPK against a
brute-force softmax; the adaptive M / T rules; step numbering across snapshot + restore; bad input.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hfsoftmax.config import Config
from hfsoftmax.dist import DistInfo
from hfsoftmax.heads import FullSoftmax, build_head
from hfsoftmax.heads.selective import (SelectiveSoftmax, choose_num_active, index_spec, make_store,
                                       next_rebuild_period)
from paramserver.index import IndexManager, make_index
from paramserver.store import WeightStore

MARGIN_M = {"none": 0.0, "cosface": 0.35, "arcface": 0.5}


def local_store(K: int, d: int, index: str = "exact", metric: str = "dot", seed: int = 0,
                init_std: float = 0.5, rebuild_every: int = 1000) -> WeightStore:
    """lr-only SGD (no momentum, no weight decay) so one step is W - lr * grad exactly; synchronous
    index rebuilds every ``rebuild_every`` steps."""
    store = WeightStore(K, d, momentum=0.0, weight_decay=0.0, seed=seed, init_std=init_std)
    mgr = IndexManager(lambda: make_index(index, d, metric, seed=seed), rebuild_every=rebuild_every,
                       background=False)
    mgr.build_now(store.rows_view(), step=0)
    store.attach_index(mgr)
    return store


def head_on(store: WeightStore, M: int, margin: str = "none", **kw) -> SelectiveSoftmax:
    kw.setdefault("index", "exact")
    return SelectiveSoftmax(store, store.num_classes, store.dim, M, margin=margin, scale=8.0,
                            margin_m=MARGIN_M[margin], **kw)


@pytest.mark.parametrize("margin", ["none", "cosface", "arcface"])
@pytest.mark.parametrize("shortcut", [True, False])
def test_m_equals_k_matches_full_softmax(margin: str, shortcut: bool) -> None:
    K, d, B, lr = 37, 12, 16, 0.3
    store = local_store(K, d, metric="dot" if margin == "none" else "angular")
    W0 = store.pull(np.arange(K))
    head = head_on(store, K, margin, shortcut_full=shortcut, candidates=8)
    full = FullSoftmax(K, d, margin=margin, scale=8.0, margin_m=MARGIN_M[margin])
    with torch.no_grad():
        full.weight.copy_(torch.from_numpy(W0))
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(B, d, generator=g)
    labels = torch.randint(0, K, (B,), generator=g)
    labels[:4] = labels[4]                                  # duplicates in the batch

    f1 = feats.clone().requires_grad_()
    head.begin_step(0, lr)
    loss = head(f1, labels)
    loss.backward()
    head.end_step(0)
    f2 = feats.clone().requires_grad_()
    ref = full(f2, labels)
    ref.backward()

    if not shortcut:  # the selected order is a permutation with the labels first
        assert not np.array_equal(head.last_active, np.arange(K))
    assert sorted(head.last_active.tolist()) == list(range(K))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-4, atol=1e-6)
    assert store.step == 1
    W1 = store.pull(np.arange(K))
    expect = W0 - lr * full.weight.grad.numpy()
    np.testing.assert_allclose(W1, expect, rtol=1e-5, atol=1e-6)
    assert np.abs(W1 - W0).max() > 1e-4                      # the update did happen


def test_labels_always_active_exactly_m_unique_and_only_active_rows_move() -> None:
    K, d, M, B = 300, 8, 40, 24
    rng = np.random.default_rng(0)
    for index in ("exact", "graph", "random"):
        store = local_store(K, d, index=index)
        head = head_on(store, M, index=index, candidates=5)
        for step in range(6):
            labels = torch.from_numpy(rng.integers(0, 15, size=B))       # many duplicates
            feats = torch.randn(B, d, requires_grad=True)
            before = store.pull(np.arange(K))
            head.begin_step(step, 0.1)
            head(feats, labels).backward()
            head.end_step(step)
            act = head.last_active
            assert act.shape == (M,) and len(np.unique(act)) == M
            assert set(labels.tolist()) <= set(act.tolist())
            moved = np.flatnonzero(np.abs(store.pull(np.arange(K)) - before).max(axis=1) > 0)
            assert set(moved.tolist()) <= set(act.tolist())
        assert store.step == 6


def test_selection_remaps_labels_and_is_reproducible() -> None:
    K, d, M = 120, 8, 30
    store = local_store(K, d)
    head = head_on(store, M, candidates=4)
    feats = np.random.default_rng(1).standard_normal((10, d)).astype(np.float32)
    labels = np.array([5, 5, 7, 100, 7, 3, 3, 3, 9, 5])
    head.begin_step(3, 0.1)
    a1, r1 = head.select(feats, labels, M)
    a2, r2 = head.select(feats, labels, M)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(a1[r1], labels)
    np.testing.assert_array_equal(a1[:5], [5, 7, 100, 3, 9])            # labels first, first-seen order


def clustered_store(K: int, d: int, index: str) -> WeightStore:
    """Rows in 10 tight clusters, so the classes near a feature carry most of its probability."""
    store = local_store(K, d, index=index, init_std=0.05)
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((10, d)).astype(np.float32) * 3
    rows = centres[np.arange(K) % 10] + 0.3 * rng.standard_normal((K, d)).astype(np.float32)
    store.set_rows(np.arange(K), rows.astype(np.float32))
    store.index.build_now(store.rows_view(), step=0)
    return store


def test_random_baseline_differs_from_hf_and_captures_less_mass() -> None:
    K, d, M, B = 400, 16, 40, 8
    hf_store, rnd_store = clustered_store(K, d, "exact"), clustered_store(K, d, "exact")
    W = hf_store.pull(np.arange(K))
    labels = torch.arange(0, 10 * B, 10)                  # all in cluster 0
    feats = torch.from_numpy(W[labels.numpy()]) + 0.1 * torch.randn(B, d)
    res = {}
    for name, store in (("hf", hf_store), ("random", rnd_store)):
        head = head_on(store, M, index=name if name == "random" else "exact", candidates=40, cpk_every=1)
        head.begin_step(0, 0.0)
        head(feats.clone().requires_grad_(), labels).backward()
        head.end_step(0)
        res[name] = (set(head.last_active.tolist()), head.stats())
    assert res["hf"][0] != res["random"][0]
    hf, rnd = res["hf"][1], res["random"][1]
    assert hf["cpk_exact"] == pytest.approx(rnd["cpk_exact"], rel=1e-6)   # same W, same probe
    assert hf["cpk_active"] > 0.9 * hf["cpk_exact"]
    assert rnd["cpk_active"] < hf["cpk_active"] - 0.2


@pytest.mark.parametrize("margin", ["none", "cosface"])
def test_scores_and_topk_equal_full_softmax(margin: str) -> None:
    K, d = 53, 10
    store = local_store(K, d)
    head = head_on(store, 10, margin, block_size=16)
    full = FullSoftmax(K, d, margin=margin, scale=8.0, margin_m=MARGIN_M[margin])
    with torch.no_grad():
        full.weight.copy_(torch.from_numpy(store.pull(np.arange(K))))
    feats = torch.randn(6, d)
    torch.testing.assert_close(head.scores(feats), full.scores(feats))
    v1, i1 = head.topk(feats, k=7)
    v2, i2 = full.topk(feats, k=7, block_size=16)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(i1, i2)


def test_cpk_exact_and_active_match_brute_force() -> None:
    K, d, M, B = 90, 8, 12, 20
    store = local_store(K, d, init_std=1.0)
    head = head_on(store, M, cpk_every=2, block_size=7, cpk_probe=16)
    W = torch.from_numpy(store.pull(np.arange(K)))
    feats = torch.randn(B, d)
    labels = torch.randint(0, 6, (B,))
    head.begin_step(0, 0.0)
    head(feats.clone().requires_grad_(), labels).backward()
    head.end_step(0)
    p = torch.softmax((feats[:16] @ W.t()).double(), dim=1)               # [16, K]
    exact = p.topk(M, dim=1).values.sum(1).mean().item()
    active = p[:, torch.from_numpy(head.last_active)].sum(1).mean().item()
    st = head.stats()
    assert st["cpk_exact"] == pytest.approx(exact, rel=1e-6)
    assert st["cpk_active"] == pytest.approx(active, rel=1e-6)
    assert st["cpk_step"] == 0 and st["num_active"] == M
    assert st["cpk_active"] <= st["cpk_exact"] + 1e-9          # no M classes hold more than the top M


def test_adaptive_rules() -> None:
    curve = np.array([0.5, 0.7, 0.85, 0.92, 0.97, 1.0])
    assert choose_num_active(curve, 0.9, 1, 100, 1000) == 4
    assert choose_num_active(curve, 0.9, 5, 100, 1000) == 5                # m_min
    assert choose_num_active(curve, 0.9, 1, 3, 1000) == 3                  # m_max
    assert choose_num_active(curve, 0.999, 1, 100, 1000) == 6
    assert choose_num_active(curve[:3], 0.99, 1, 50, 1000) == 50           # never reached -> m_max
    assert choose_num_active(curve, 0.1, 1, 50, 20) == 1
    assert next_rebuild_period(100, 0.95, 0.90, 0.02, 10, 800) == 50      # stale: halve
    assert next_rebuild_period(12, 0.95, 0.90, 0.02, 10, 800) == 10       # floor
    assert next_rebuild_period(100, 0.95, 0.94, 0.02, 10, 800) == 200     # holds: double
    assert next_rebuild_period(500, 0.95, 0.96, 0.02, 10, 800) == 800     # cap


def test_adaptive_m_follows_tau_and_grows_for_labels() -> None:
    K, d, B = 150, 8, 12
    store = local_store(K, d, init_std=1.0)
    head = head_on(store, 40, cpk_every=1, adaptive=True, tau_cp=0.8, m_min=2, m_max=120, cpk_probe=B)
    W = torch.from_numpy(store.pull(np.arange(K)))
    feats = torch.randn(B, d) * 2
    labels = torch.zeros(B, dtype=torch.long)
    head.begin_step(0, 0.0)
    head(feats.clone().requires_grad_(), labels).backward()
    head.end_step(0)
    p = torch.sort(torch.softmax((feats @ W.t()).double(), 1), 1, descending=True).values
    curve = p.cumsum(1).mean(0).numpy()
    want = max(2, int(np.flatnonzero(curve >= 0.8)[0]) + 1)
    assert head.num_active == want and head.stats()["num_active"] == want
    assert head.stats()["cpk_exact"] >= 0.8
    # A batch with more unique labels than the adapted M grows M for that step.
    head.adapt.m_max = head.adapt.m_min = 2       # the adaptive rule (heads/cpk.py)
    labels = torch.arange(B)
    head.begin_step(1, 0.0)
    head(feats.clone().requires_grad_(), labels).backward()
    head.end_step(1)
    assert len(head.last_active) == B and head.num_active == 2
    assert head.get_extra_state() == {"num_active": 2, "rebuild_every": 100}


class FakeManager:
    """An index manager whose build counter the test drives."""

    def __init__(self) -> None:
        self.builds, self.rebuild_every = 1, 64

    def stats(self) -> dict:
        return {"builds": self.builds, "staleness_steps": 0, "last_build_s": 0.5}


def test_adaptive_rebuild_period_halves_when_stale_and_doubles_when_held() -> None:
    store = local_store(20, 4)
    mgr = FakeManager()
    store.attach_index(mgr)
    head = head_on(store, 5, cpk_every=1, adaptive=True, rebuild_every=64, t_min=16, t_max=256)
    head._adapt_rebuild_period(0.95)
    head._adapt_rebuild_period(0.80)          # fell within the period
    mgr.builds = 2
    head._adapt_rebuild_period(0.96)          # new build live: judge the last period
    assert head.rebuild_every == 32 and mgr.rebuild_every == 32
    head._adapt_rebuild_period(0.955)         # held
    mgr.builds = 3
    head._adapt_rebuild_period(0.96)
    assert head.rebuild_every == 64 and mgr.rebuild_every == 64
    st = head.stats()
    assert st["rebuild_every"] == 64 and st["index_builds"] == 3 and st["index_last_build_s"] == 0.5


def test_step_numbering_across_snapshot_restore(tmp_path, caplog) -> None:
    K, d, B = 30, 6, 8
    store = local_store(K, d, rebuild_every=1)
    head = head_on(store, 10, candidates=4)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(B, d, generator=g), torch.randint(0, K, (B,), generator=g)) for _ in range(4)]

    def run(h: SelectiveSoftmax, steps: range) -> None:
        for s in steps:
            h.begin_step(s, 0.2)
            h(batches[s][0].clone().requires_grad_(), batches[s][1]).backward()
            h.end_step(s)

    run(head, range(4))
    ref = store.pull(np.arange(K))
    store2 = local_store(K, d, rebuild_every=1)
    head2 = head_on(store2, 10, candidates=4)
    run(head2, range(2))
    store2.snapshot(str(tmp_path / "snap"))
    # Resume as train.py does it: fresh store (index built from the init W), then restore.
    store3 = local_store(K, d, rebuild_every=1)
    store3.restore(str(tmp_path / "snap"))
    head3 = head_on(store3, 10, candidates=4)
    run(head3, range(2, 4))                    # store step == checkpoint step (offset 0)
    assert store3.index.stats()["builds"] == 3  # init, after steps 2 and 3 (the restore takes the saved index)
    np.testing.assert_array_equal(store3.pull(np.arange(K)), ref)
    # A store that is ahead of the loop (reused server): mapped with a warning, still trains.
    head4 = head_on(store3, 10, candidates=4)
    with caplog.at_level(logging.WARNING, logger="hfsoftmax.heads.selective"):
        run(head4, range(0, 2))
    assert store3.step == 6 and "store steps are train step +4" in caplog.text


def test_bad_input_errors() -> None:
    store = local_store(50, 8)
    head = head_on(store, 4)
    head.begin_step(0, 0.1)
    # more unique labels than M: M grows for this step (every label active), counted
    head(torch.randn(6, 8, requires_grad=True), torch.arange(6)).backward()
    assert len(head.last_active) == 6 and head.num_active == 4 and head.stats()["m_grown_steps"] == 1
    head.end_step(0)
    head.begin_step(1, 0.1)
    with pytest.raises(ValueError, match=r"dim=8.*feature_dim=16"):
        SelectiveSoftmax(store, 50, 16, 4)
    with pytest.raises(ValueError, match=r"\[B, 8\].*\(6, 5\)"):
        head(torch.randn(6, 5), torch.arange(6))
    with pytest.raises(ValueError, match=r"num_classes=50"):
        head(torch.randn(2, 8), torch.tensor([1, 50]))
    with pytest.raises(RuntimeError, match="begin_step"):
        head_on(store, 4)(torch.randn(2, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_active M=60"):
        head_on(store, 60)


def test_make_store_and_build_head_from_config() -> None:
    cfg = Config()
    cfg.model.feature_dim = 8
    cfg.head.name, cfg.head.index, cfg.head.margin = "hf", "forest", "arcface"
    cfg.head.ntrees, cfg.head.num_active, cfg.head.candidates = 4, 12, 6
    cfg.optim.momentum, cfg.optim.weight_decay = 0.0, 0.0
    with pytest.raises(ValueError, match="world_size=2.*store.kind=remote"):
        make_store(cfg, 40, DistInfo(0, 2, 0, torch.device("cpu")))
    store = make_store(cfg, 40, DistInfo(0, 1, 0, torch.device("cpu")))
    try:
        assert store.index.stats()["name"] == "forest" and store.index.index.metric == "angular"
        head = build_head(cfg.head, 40, 8, store=store)
        assert isinstance(head, SelectiveSoftmax) and head.rule.kind == "arcface"
        head.begin_step(0, 0.1)
        head(torch.randn(5, 8, requires_grad=True), torch.tensor([1, 2, 3, 3, 39])).backward()
        head.end_step(0)
        assert store.step == 1 and len(head.last_active) == 12
        assert head.stats()["index_builds"] == 1
    finally:
        store.index.close()
    cfg.optim.momentum, cfg.optim.sparse_momentum = 0.9, "lazy"
    cfg.head.index, cfg.head.degree = "graph", 5
    store = make_store(cfg, 40, DistInfo(0, 1, 0, torch.device("cpu")))
    try:
        assert store.opt.sparse_momentum == "lazy" and store.index.index.name == "graph"
        assert store.index.index.degree == 5
    finally:
        store.index.close()
    from hfsoftmax.launch import server_args
    args = server_args(cfg, 1)
    assert args[args.index("--sparse-momentum") + 1] == "lazy" and args[args.index("--degree") + 1] == "5"
    assert server_args(Config(), 1)[server_args(Config(), 1).index("--sparse-momentum") + 1] == "unrolled"
    # head.deterministic reaches both the embedded manager and the server's flags
    for mode, want in (("auto", None), ("on", True), ("off", False)):
        cfg.head.deterministic = mode
        assert index_spec(cfg.head, 40).manager(8).deterministic is want
        args = server_args(cfg, 1)
        assert args[args.index("--deterministic") + 1] == mode
    cfg.head.deterministic = "auto"
    cfg.head.name, cfg.head.index, cfg.head.nlist = "random", "ivf", 0
    assert index_spec(cfg.head, 40).name == "none"          # the random head never queries: no index
    cfg.head.name, cfg.head.margin = "hf", "none"
    assert index_spec(cfg.head, 40).manager(8).factory().metric == "dot"
    cfg.store.kind = "nfs"
    with pytest.raises(ValueError, match="unknown store.kind 'nfs'"):
        make_store(cfg, 40, DistInfo(0, 1, 0, torch.device("cpu")))


def test_a_late_background_push_uses_its_own_steps_lr() -> None:
    """A pipelined push that leaves after the next step began (a slow reduce-scatter, a loaded
    machine) carries its own step's lr, not the lr the training thread has moved on to (the flake of
    test_multirank's 2-ranks-equal-1 test: with halving lrs, W came out halved)."""
    import threading

    K, d = 20, 4
    stores = [WeightStore(K, d, momentum=0.0, weight_decay=0.0, seed=3) for _ in range(2)]
    feats, labels = torch.randn(3, d, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 5, 7])
    for store, pipelined in zip(stores, (True, False)):
        head = SelectiveSoftmax(store, K, d, 6, index="random", pipeline=pipelined)
        release = threading.Event()
        if pipelined:
            push_job = head._push_job
            head._push_job = lambda *a: (release.wait(), push_job(*a))     # the push leaves late
        head.begin_step(0, 0.5)
        head(feats.clone().requires_grad_(), labels).backward()
        head.end_step(0)
        head.begin_step(1, 0.1)                   # the next step has begun (its lr) ...
        release.set()                             # ... before step 0's push leaves
        head.flush()
        assert store.step == 1
        head.close()
    np.testing.assert_array_equal(stores[0].pull(np.arange(K)), stores[1].pull(np.arange(K)))
