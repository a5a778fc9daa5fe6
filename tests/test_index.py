"""Tests for paramserver/index/: class indexes (parity/recall against brute force), the
background IndexManager (old index answers during a build, builds never queue, incremental updates
replayed), and select_active against a plain-Python reference implementation."""
from __future__ import annotations

import threading
import time
from typing import List, Tuple

import numpy as np
import pytest

from paramserver.index import (ClassIndex, ExactIndex, IndexManager, IVFIndex, default_index_name,
                               make_index, select_active)

K, D, N = 4000, 32, 20


def clustered(K: int, d: int, n_clusters: int, noise: float, seed: int) -> np.ndarray:
    """Rows = a random cluster centre + isotropic noise: like class vectors of related identities.
    With noise = 1.0 in d = 32 the noise norm (~5.7) equals the centre norm, so a query's top-20
    mixes rows of its own cluster (20 rows on average) with rows of neighbouring clusters: a real
    search, not a cluster lookup (at noise 0.5 every index scores recall ~1 and the floor tests
    nothing)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    return (centres[rng.integers(0, n_clusters, K)] + noise * rng.standard_normal((K, d))).astype(np.float32)


def queries_near(W: np.ndarray, B: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (W[rng.integers(0, W.shape[0], B)] + 0.2 * rng.standard_normal((B, W.shape[1]))).astype(np.float32)


def brute(W: np.ndarray, F: np.ndarray, n: int, metric: str) -> Tuple[np.ndarray, np.ndarray]:
    """Trusted reference: the full score matrix and a full sort."""
    if metric == "angular":
        W = W / np.linalg.norm(W, axis=1, keepdims=True)
        F = F / np.linalg.norm(F, axis=1, keepdims=True)
    S = F.astype(np.float64) @ W.T.astype(np.float64)
    ids = np.argsort(-S, axis=1)[:, :n]
    return ids, np.take_along_axis(S, ids, axis=1)


def recall(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / ref.shape[1] for a, b in zip(ids, ref)]))


@pytest.fixture(scope="module")
def data() -> Tuple[np.ndarray, np.ndarray]:
    W = clustered(K, D, n_clusters=200, noise=1.0, seed=0)
    return W, queries_near(W, 64, seed=1)


# ---------------------------------------------------------------------------------- indexes
@pytest.mark.parametrize("metric", ["angular", "dot"])
def test_exact_equals_brute_force(data, metric):
    W, F = data
    index = make_index("exact", D, metric, class_offset=1000, block_rows=700)  # 6 blocks, merged
    index.build(W)
    ids, scores = index.query(F, N)
    ref_ids, ref_s = brute(W, F, N, metric)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (64, N)
    assert recall(ids - 1000, ref_ids) == 1.0
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_exact_pads_when_fewer_rows_than_n():
    W = clustered(5, D, 2, 0.5, seed=3)
    index = make_index("exact", D, "dot")
    index.build(W)
    ids, scores = index.query(W[:2], 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4]


# Recall floors, measured on this data over seeds 0-2 (recall@20 vs brute force):
#   forest (Annoy, 50 trees, search_k = n * ntrees = 1000, i.e. ~1/4 of the 4000 rows inspected):
#     angular 0.96-0.97, dot 0.92-0.94  -> floor 0.85
#   ivf (63 lists, nprobe 8, i.e. ~1/8 of the rows scored):  angular ~0.81, dot ~0.78 -> floor 0.7
#   hnsw (M 16, ef 128): 0.998-1.0 -> floor 0.95
# Each floor sits ~0.07-0.1 under the worst seed (room for platform variation), while a real bug
# (wrong id mapping or offset, score conversion, metric) drops recall to ~0: random ids give
# n / K = 0.005.
FLOORS = {"forest": 0.85, "ivf": 0.7, "hnsw": 0.95}


@pytest.mark.parametrize("name", ["forest", "ivf", "hnsw"])
@pytest.mark.parametrize("metric", ["angular", "dot"])
def test_approximate_recall_floor(data, name, metric):
    W, F = data
    index = make_index(name, D, metric, class_offset=7, seed=0)
    index.build(W)
    ids, scores = index.query(F, N)
    ref_ids, _ = brute(W, F, N, metric)
    r = recall(ids - 7, ref_ids)
    assert r >= FLOORS[name], f"{name}/{metric} recall@{N} {r:.3f} < floor {FLOORS[name]}"
    # Scores are the true cosine / inner product of the returned rows, sorted descending.
    S = brute(W, F, K, metric)
    full = np.empty((64, K))
    np.put_along_axis(full, S[0], S[1], axis=1)
    np.testing.assert_allclose(scores, np.take_along_axis(full, ids - 7, axis=1), rtol=1e-3, atol=1e-3)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_random_index_ids_in_range(data):
    W, F = data
    index = make_index("random", D, class_offset=10, seed=0)
    index.build(W)
    ids, scores = index.query(F, N)
    assert ids.shape == (64, N) and ids.min() >= 10 and ids.max() < 10 + K
    assert recall(ids - 10, brute(W, F, N, "dot")[0]) < 0.05


@pytest.mark.parametrize("metric", ["angular", "dot"])
def test_ivf_update_moves_changed_rows(data, metric):
    W, F = data
    W = W.copy()
    index = make_index("ivf", D, metric, seed=0)
    index.build(W)
    assert index.incremental
    rng = np.random.default_rng(5)
    changed = rng.choice(K, 300, replace=False)
    # Move the changed rows onto other rows' positions (other clusters): they must now be found there.
    new_rows = W[rng.integers(0, K, 300)] * 1.5 + 0.01 * rng.standard_normal((300, D)).astype(np.float32)
    W[changed] = new_rows
    index.update(changed, new_rows)
    ids, _ = index.query(new_rows[:50], 1)
    expect = brute(W, new_rows[:50], 1, metric)[0][:, 0]  # (for dot, not always the row itself)
    assert (ids[:, 0] == expect).mean() >= 0.95
    if metric == "angular":
        assert (ids[:, 0] == changed[:50]).mean() >= 0.95
    # And overall recall against exact search on the new W holds.
    ids, _ = index.query(F, N)
    assert recall(ids, brute(W, F, N, metric)[0]) >= FLOORS["ivf"]


def test_update_on_non_incremental_index_raises(data):
    W, _ = data
    index = make_index("random", D)
    index.build(W)
    with pytest.raises(NotImplementedError, match="not incremental"):
        index.update(np.array([0]), W[:1])


@pytest.mark.parametrize("metric", ["angular", "dot"])
def test_exact_update_keeps_the_index_current(data, metric):
    W, _ = data
    index = make_index("exact", D, metric)
    W2 = W.copy()                            # the store's rows: the index reads them, no copy
    index.build(W2)
    rng = np.random.default_rng(1)
    ids = rng.choice(len(W), 50, replace=False)
    rows = -3.0 * W[ids]                     # each changed row now points away from where it was
    W2[ids] = rows                           # the store writes them, then tells the index
    index.update(ids, rows)
    got, _ = index.query(rows, 5)
    assert np.array_equal(got, brute(W2, rows, 5, metric)[0])
    with pytest.raises(ValueError, match="ids must lie"):
        index.update(np.array([len(W)]), W[:1])


def test_bad_input_errors_name_the_field(data):
    W, F = data
    index = make_index("exact", D)
    with pytest.raises(RuntimeError, match="before build"):
        index.query(F, 3)
    index.build(W)
    with pytest.raises(ValueError, match=r"feature dim 7 does not match index dim 32"):
        index.query(np.zeros((2, 7), np.float32), 3)
    with pytest.raises(ValueError, match=r"W row dim 5 does not match index dim 32"):
        index.build(np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="unknown index name 'annoy'"):
        make_index("annoy", D)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ntree'\] for index 'forest'"):
        make_index("forest", D, ntree=5)
    with pytest.raises(ValueError, match="metric"):
        make_index("exact", D, "cosine")
    ivf = make_index("ivf", D)
    ivf.build(W)
    with pytest.raises(ValueError, match=r"rows dim 3 does not match index dim 32"):
        ivf.update(np.array([1]), np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="ids must lie in"):
        ivf.update(np.array([K]), np.zeros((1, D), np.float32))


# ---------------------------------------------------------------------------------- manager
class FakeStore:
    """What IndexManager needs from a WeightStore: dim, num_classes, rows_view()."""

    def __init__(self, W: np.ndarray) -> None:
        self.W = W
        self.dim, self.num_classes = W.shape[1], W.shape[0]

    def rows_view(self) -> np.ndarray:
        return self.W


class GatedExact(ExactIndex):
    """Exact index whose build blocks on a shared Event after the first build (a 'slow build')."""

    gate = threading.Event()
    builds: List[int] = []

    def build(self, W: np.ndarray) -> None:
        GatedExact.builds.append(1)
        if len(GatedExact.builds) > 1:
            assert GatedExact.gate.wait(20), "test gate never opened"
        super().build(W)


def test_query_during_background_build_uses_old_index_and_builds_never_queue():
    GatedExact.gate.clear()
    GatedExact.builds = []
    W0 = clustered(500, 16, 5, 0.5, seed=0)
    store = FakeStore(W0.copy())
    mgr = IndexManager(lambda: GatedExact(16, "dot"), rebuild_every=10, deterministic=False)
    try:
        assert mgr.maybe_rebuild(store, 0) is True        # first build: synchronous
        assert mgr.stats()["builds"] == 1 and not mgr.stats()["building"]
        assert mgr.maybe_rebuild(store, 5) is False       # < rebuild_every steps
        F = queries_near(W0, 8, seed=2)
        old_ids, _ = mgr.query(F, 5)
        store.W = -W0                                      # W changes a lot: answers must differ
        assert mgr.maybe_rebuild(store, 10) is True       # background build starts, blocks on gate
        assert mgr.stats()["building"]
        t0 = time.perf_counter()
        ids, _ = mgr.query(F, 5)                           # answered by the old index at once
        assert time.perf_counter() - t0 < 1.0
        np.testing.assert_array_equal(ids, old_ids)
        assert mgr.maybe_rebuild(store, 25) is False      # builds never queue
        assert mgr.maybe_rebuild(store, 40) is False
        assert len(GatedExact.builds) == 2
        GatedExact.gate.set()
        mgr.close(timeout=10)
        st = mgr.stats()
        assert st["builds"] == 2 and not st["building"]
        assert st["staleness_steps"] == 40 - 10          # source W is from step 10, now step 40
        assert st["achieved_period_steps"] == 10
        new_ids, _ = mgr.query(F, 5)
        np.testing.assert_array_equal(new_ids, brute(-W0, F, 5, "dot")[0])
    finally:
        GatedExact.gate.set()
        mgr.close(timeout=10)


class GatedIVF(IVFIndex):
    gate = threading.Event()
    started = threading.Event()

    def build(self, W: np.ndarray) -> None:
        if GatedIVF.started.is_set():  # the second build waits
            assert GatedIVF.gate.wait(20)
        GatedIVF.started.set()
        super().build(W)


def test_incremental_updates_during_build_are_replayed():
    GatedIVF.gate.clear()
    GatedIVF.started.clear()
    W = clustered(2000, 16, 20, 0.5, seed=4)
    store = FakeStore(W.copy())
    mgr = IndexManager(lambda: GatedIVF(16, "angular", seed=0), rebuild_every=1, deterministic=False)
    try:
        mgr.maybe_rebuild(store, 0)
        snapshot = store.W.copy()
        store.W = snapshot                      # the build reads this array; keep it unchanged
        assert mgr.maybe_rebuild(store, 1)      # gated background build from `snapshot`
        rng = np.random.default_rng(0)
        ids = rng.choice(2000, 100, replace=False)
        rows = -snapshot[ids]                   # changed after the build started
        live = snapshot.copy()                  # the store's rows now (the build still reads `snapshot`)
        live[ids] = rows
        store.W = live
        mgr.rows_changed(ids, rows, step=2)     # goes to the live index; the ids to the build's log
        assert mgr.maybe_rebuild(store, 2) is False          # (a build runs: none starts)
        got, _ = mgr.query(rows[:20], 1)
        assert (got[:, 0] == ids[:20]).mean() >= 0.9  # live incremental index already current
        assert mgr.stats()["staleness_steps"] == 0
        GatedIVF.gate.set()
        mgr.close(timeout=20)
        assert mgr.stats()["builds"] == 2
        got, _ = mgr.query(rows[:20], 1)        # the new index re-read the changed ids from the live rows
        assert (got[:, 0] == ids[:20]).mean() >= 0.9
        assert mgr.stats()["staleness_steps"] == 0
    finally:
        GatedIVF.gate.set()
        mgr.close(timeout=20)


class FailingIndex(ExactIndex):
    calls = 0

    def build(self, W: np.ndarray) -> None:
        FailingIndex.calls += 1
        if FailingIndex.calls > 1:
            raise MemoryError("boom")
        super().build(W)


def test_background_build_failure_surfaces_and_old_index_stays():
    FailingIndex.calls = 0
    W = clustered(100, 8, 3, 0.5, seed=0)
    mgr = IndexManager(lambda: FailingIndex(8), rebuild_every=1, deterministic=False)
    store = FakeStore(W)
    mgr.maybe_rebuild(store, 0)
    assert mgr.maybe_rebuild(store, 1)
    mgr.close(timeout=10)
    assert mgr.query(W[:2], 1)[0].shape == (2, 1)  # old index still serves
    with pytest.raises(RuntimeError, match="background index build failed"):
        mgr.maybe_rebuild(store, 2)


class SleepyExact(ExactIndex):
    def build(self, W: np.ndarray) -> None:
        time.sleep(0.2)
        super().build(W)


def test_max_duty_spaces_builds():
    """max_duty = 0.5: after a 0.2 s build, the next may start only 0.4 s after the last start."""
    W = np.eye(4, dtype=np.float32)
    mgr = IndexManager(lambda: SleepyExact(4), rebuild_every=1, background=False, max_duty=0.5, deterministic=False)
    store = FakeStore(W)
    t0 = time.monotonic()
    assert mgr.maybe_rebuild(store, 0)           # takes ~0.2 s
    assert not mgr.maybe_rebuild(store, 1)       # ~0.2 s after the start: too soon
    time.sleep(max(0.0, 0.45 - (time.monotonic() - t0)))
    assert mgr.maybe_rebuild(store, 2)
    with pytest.raises(ValueError, match="max_duty"):
        IndexManager(lambda: ExactIndex(4), rebuild_every=1, max_duty=0.0)


def test_manager_query_before_build_and_bad_args():
    mgr = IndexManager(lambda: ExactIndex(4), rebuild_every=3, background=False)
    ids, scores = mgr.query(np.zeros((2, 4), np.float32), 3)    # none live: no candidates (random fill)
    assert (ids == -1).all() and ids.shape == (2, 3) and np.isneginf(scores).all()
    assert mgr.stats()["fallback_queries"] == 1 and not mgr.stats()["live"]
    with pytest.raises(ValueError, match="rebuild_every"):
        IndexManager(lambda: ExactIndex(4), rebuild_every=0)
    W = np.eye(4, dtype=np.float32)
    mgr.build_now(W, step=0)
    assert mgr.query(W, 1)[0][:, 0].tolist() == [0, 1, 2, 3]
    assert mgr.maybe_rebuild(FakeStore(W), 3) is True and mgr.stats()["builds"] == 2  # synchronous


# ---------------------------------------------------------------------------------- select_active
def reference_select(cand_ids, cand_scores, labels, M):
    """Plain-Python statement of the rule: labels (first appearance), then candidates by best score."""
    active: List[int] = []
    for lab in labels.tolist():
        if lab not in active:
            active.append(lab)
    if M < len(active):
        raise ValueError
    best = {}
    for c, s in zip(cand_ids.ravel().tolist(), cand_scores.ravel().tolist()):
        if c >= 0 and c not in active and (c not in best or s > best[c]):
            best[c] = s
    ranked = sorted(best, key=lambda c: -best[c])
    active += ranked[: M - len(active)]
    return active


@pytest.mark.parametrize("K_cls,B,n,M", [(1000, 16, 8, 100),     # candidates exceed M: truncation
                                         (1000, 16, 3, 200),     # short: random fill (small K)
                                         (200_000, 32, 4, 400),  # short: random fill (rejection path)
                                         (50, 40, 10, 50)])      # M == K
def test_select_active_matches_reference(K_cls, B, n, M):
    rng = np.random.default_rng(K_cls + M)
    labels = rng.integers(0, min(K_cls, 30), B)             # duplicate labels
    cand = rng.integers(0, K_cls, (B, n))
    cand[:, 0] = labels                                      # labels appear among candidates too
    cand[rng.random((B, n)) < 0.1] = -1                      # some "not found"
    scores = rng.standard_normal((B, n)).astype(np.float32)  # distinct: no ties
    active, remapped = select_active(cand, scores, labels, M, K_cls, np.random.default_rng(0))
    ref = reference_select(cand, scores, labels, M)
    assert active.dtype == np.int64 and remapped.dtype == np.int64
    assert active.shape == (M,) and len(np.unique(active)) == M
    assert active[: len(ref)].tolist() == ref
    fill = active[len(ref):]
    assert fill.min(initial=0) >= 0 and fill.max(initial=0) < K_cls
    np.testing.assert_array_equal(active[remapped], labels)
    assert remapped.max() < len(np.unique(labels))           # labels occupy the first slots


def test_select_active_random_fill_is_uniform_and_cheap():
    K_cls, M = 1_000_000, 1000
    labels = np.array([5, 5, 999_999])
    rng = np.random.default_rng(1)
    means = []
    for _ in range(20):
        active, _ = select_active(np.full((3, 2), -1), np.zeros((3, 2)), labels, M, K_cls, rng)
        assert active[:2].tolist() == [5, 999_999] and len(np.unique(active)) == M
        means.append(active[2:].mean())
    # Uniform over [0, K): mean K/2, std of the mean over 20 x 998 draws ~ K / sqrt(12 * 19960) ~ 2k.
    assert abs(np.mean(means) - K_cls / 2) < 15_000
    # Timing sanity at the target shape (B=256, n=80, M=1000, K=1M): well under 5 ms on a quiet
    # machine; the bound here is loose because the test machine is shared.
    cand = rng.integers(0, K_cls, (256, 80))
    scores = rng.random((256, 80)).astype(np.float32)
    labels = rng.integers(0, K_cls, 256)
    t0 = time.perf_counter()
    for _ in range(10):
        select_active(cand, scores, labels, M, K_cls, rng)
    assert (time.perf_counter() - t0) / 10 < 0.05


def test_select_active_errors():
    rng = np.random.default_rng(0)
    labels = np.arange(10)
    with pytest.raises(ValueError, match=r"M=5 is smaller than the batch's 10 unique labels"):
        select_active(np.zeros((10, 1), np.int64), np.zeros((10, 1)), labels, 5, 100, rng)
    with pytest.raises(ValueError, match=r"M=200 is larger than num_classes K=100"):
        select_active(np.zeros((10, 1), np.int64), np.zeros((10, 1)), labels, 200, 100, rng)
    with pytest.raises(ValueError, match="labels must lie in"):
        select_active(np.zeros((1, 1), np.int64), np.zeros((1, 1)), np.array([100]), 5, 100, rng)
    with pytest.raises(ValueError, match="cand_scores"):
        select_active(np.zeros((2, 2), np.int64), np.zeros((2, 3)), labels, 20, 100, rng)


def test_manager_with_select_active_end_to_end(data):
    """The store's select(F, labels, M) path: query the live index, then select_active."""
    W, F = data
    mgr = IndexManager(lambda: make_index("forest", D, "angular", ntrees=10), rebuild_every=100)
    mgr.build_now(W)
    labels = np.arange(64) * 3
    ids, scores = mgr.query(F, N)
    active, remapped = select_active(ids, scores, labels, 300, K, np.random.default_rng(0))
    assert len(np.unique(active)) == 300 and (active[remapped] == labels).all()
    assert isinstance(mgr.index, ClassIndex)
    mgr.close()


@pytest.mark.parametrize("subprocess", [False, True])
def test_forest_build_paths_match_floor(data, subprocess):
    """Both build paths (in this process; in a spawned process, the default for large K) give the
    same answers: same seed, same rows, same trees."""
    W, F = data
    index = make_index("forest", D, "angular", subprocess=subprocess, build_threads=1)
    index.build(W)
    got = index.query(F, N)[0]
    assert recall(got, brute(W, F, N, "angular")[0]) >= FLOORS["forest"]
    if subprocess:
        other = make_index("forest", D, "angular", subprocess=False, build_threads=1)
        other.build(W)
        assert np.array_equal(got, other.query(F, N)[0])


def test_default_index_name():
    assert default_index_name(1000) == "forest" and default_index_name(1_000_000) == "graph"
    with pytest.raises(ValueError, match="num_classes"):
        default_index_name(0)


# --- GraphIndex (label-driven class-neighbour graph) -------------------------------------------------
# Neighbour recall@16 of the graph against brute-force kNN of the rows, on `clustered` data (noise 1.0,
# the hard setting above), each row searching its 8 nearest of 63 lists (like IVF nprobe 8, whose
# feature recall is ~0.8 here). Measured over seeds 0-2: 0.834-0.847 (probe 3: 0.68-0.70) -> floor
# 0.75; a wrong id mapping (members vs candidates, the self-exclusion, the list bounds) gives ~0
# (random ids: degree / K = 0.004).
def test_graph_neighbour_recall_and_exact_fresh_scores(data):
    W, _ = data
    g = make_index("graph", D, "angular", class_offset=5, seed=0, degree=16, probe=8, cold_cos=-1.0)
    live = W.copy()                                              # the store's rows: the index keeps a reference
    g.build(live)
    ref = brute(W, W, 17, "angular")[0][:, 1:]                    # each row's 16 nearest other rows
    graph = g._graph.astype(np.int64)
    assert (graph >= 0).all() and not (graph == np.arange(K)[:, None]).any()
    r = recall(graph, ref)
    assert r >= 0.75, f"graph neighbour recall@16 {r:.3f} < floor 0.75"

    # query with labels: candidates = the label's row and its neighbours, scored exactly and fresh
    rng = np.random.default_rng(2)
    labels = rng.choice(K, 64, replace=False)
    F = (W[labels] + 0.3 * rng.standard_normal((64, D))).astype(np.float32)
    changed = rng.choice(K, 300, replace=False)
    W2 = live
    W2[changed] = rng.standard_normal((300, D)).astype(np.float32)   # the store updates its rows in place
    g.update(changed + 5, W2[changed])
    assert g._rows is live and g._ivf.codec == "sq8"             # no private copy of the rows
    ids, scores = g.query(F, 8, labels=labels + 5)
    assert ids.shape == (64, 8) and (ids >= 5).all() and (ids < K + 5).all()
    for b in range(64):
        allowed = {labels[b]} | set(graph[labels[b]].tolist())
        assert set((ids[b] - 5).tolist()) <= allowed
        cand = np.array(sorted(allowed))
        s = _normalize(W2[cand]) @ _normalize(F[b:b + 1])[0]
        np.testing.assert_allclose(scores[b], np.sort(s)[::-1][:8], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="labels must be"):
        g.query(F, 8, labels=labels[:3])


def test_graph_cold_labels_are_answered_by_the_ivf_and_moved_rows_reassigned(data):
    W, F = data
    g = make_index("graph", D, "angular", class_offset=3, seed=0, cold_cos=0.3)
    g.build(W)
    rng = np.random.default_rng(4)
    labels = rng.choice(K, 64, replace=False)
    warm_f = (W[labels] + 0.2 * rng.standard_normal((64, D))).astype(np.float32)   # cos with own row ~1
    cold_f = -warm_f                                                                   # cos ~ -1: cold
    ids_cold, s_cold = g.query(cold_f, 8, labels=labels + 3)
    np.testing.assert_array_equal(ids_cold, g.query(cold_f, 8)[0])   # as if no label: the IVF path
    assert g.cold_queries == 128 and g.queries == 128
    ref = brute(W, cold_f, 8, "angular")[0]
    assert recall(ids_cold - 3, ref) >= 0.6                           # IVF recall (floor above: 0.7)
    np.testing.assert_allclose(s_cold, np.take_along_axis(
        _normalize(cold_f) @ _normalize(W).T, ids_cold - 3, axis=1), rtol=1e-4, atol=1e-5)
    ids_warm, _ = g.query(warm_f, 8, labels=labels + 3)
    assert g.cold_queries == 128 and g.queries == 192                 # warm ones took the graph
    graph = g._graph.astype(np.int64)
    assert all(set((ids_warm[b] - 3).tolist()) <= {labels[b]} | set(graph[labels[b]].tolist()) for b in range(64))
    # update: rows that moved are re-assigned in the IVF (it holds their new direction), rows that
    # barely moved are left where they are
    moved, nudged = labels[:10], labels[10:20]
    new = W.copy()
    new[moved] = -W[moved]
    new[nudged] = W[nudged] * 1.001 + 1e-4
    ids = np.concatenate([moved, nudged])
    before = g._ivf.reconstruct(nudged + 3)
    g.update(ids + 3, new[ids])
    # the cold IVF holds 8-bit codes (a quarter of W's bytes): reconstructions within SQ8's error
    cos = (_normalize(g._ivf.reconstruct(moved + 3)) * _normalize(new[moved])).sum(1)
    assert cos.min() > 0.995, cos
    np.testing.assert_array_equal(g._ivf.reconstruct(nudged + 3), before)


def test_graph_query_without_or_with_foreign_labels_enters_near_the_feature(data):
    W, F = data
    g = make_index("graph", D, "dot", class_offset=100, seed=0, cold_nprobe=0)
    g.build(W)
    ref = brute(W, F, 1, "dot")[0][:, 0]
    for labels in (None, np.zeros(64, dtype=np.int64)):          # label 0 lies in another shard
        ids, scores = g.query(F, 8, labels=labels)
        assert ids.shape == (64, 8) and (ids[:, 0] >= 100).all()
        # the greedy walk from the cluster nearest each feature finds its nearest row (measured
        # 0.56-0.69 over seeds 0-2 on this hard data; without the walk 0.2-0.33); a broken entry
        # (wrong centroid / representative / offset) gives ~0
        hit = np.mean([ref[b] + 100 in ids[b] for b in range(64)])
        assert hit >= 0.45, hit
        np.testing.assert_allclose(scores[:, 0], np.einsum("bd,bd->b", F, W[ids[:, 0] - 100]), rtol=1e-4, atol=1e-4)


def _normalize(X: np.ndarray) -> np.ndarray:
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_graph_built_in_a_subprocess_equals_the_in_process_build(data):
    W, _ = data
    a = make_index("graph", D, "angular", seed=0, subprocess=False, cold_nprobe=0)
    b = make_index("graph", D, "angular", seed=0, subprocess=True, cold_nprobe=0)
    a.build(W)
    b.build(W)
    np.testing.assert_array_equal(a._graph, b._graph)
    np.testing.assert_array_equal(a._reps, b._reps)
    # with the cold-path IVF: the subprocess hands its nearest lists back for the IVF's assignment
    a = make_index("graph", D, "angular", seed=0, subprocess=False)
    b = make_index("graph", D, "angular", seed=0, subprocess=True)
    a.build(W)
    b.build(W)
    np.testing.assert_array_equal(a._graph, b._graph)
    np.testing.assert_array_equal(a._ivf._list, b._ivf._list)


def test_graph_on_degenerate_rows_is_valid():
    """All-zero rows (a store with init=zeros) fall into one k-means list, whose candidates the build
    samples (else it would score all K x K pairs: 62 s and 2 GB at 20K x 64, 0.3 s now); every row
    still gets `degree` distinct neighbours other than itself."""
    W = np.zeros((3000, 8), np.float32)
    g = make_index("graph", 8, "angular", seed=0, degree=6, cold_nprobe=0)
    g.build(W)
    graph = g._graph.astype(np.int64)
    assert (graph >= 0).all() and not (graph == np.arange(3000)[:, None]).any()
    assert all(len(set(r)) == 6 for r in graph.tolist())


class JitteryExact(ExactIndex):
    """A non-incremental exact index whose build takes ``delay`` seconds (a slow, timing-dependent
    build) and that, like a forest, answers from what it built (a copy), not from the live rows."""

    incremental = False
    delay = 0.0

    def build(self, W: np.ndarray) -> None:
        time.sleep(JitteryExact.delay)
        super().build(np.array(W, copy=True))

    def bind_rows(self, W: np.ndarray) -> None:
        pass


def _run_with_build_delay(delay: float, deterministic: bool) -> tuple[list, dict]:
    JitteryExact.delay = 0.0
    W0 = clustered(200, 16, 5, 0.5, seed=0)
    store = FakeStore(W0.copy())
    F = queries_near(W0, 6, seed=2)
    mgr = IndexManager(lambda: JitteryExact(16, "dot"), rebuild_every=4, deterministic=deterministic)
    try:
        mgr.maybe_rebuild(store, 0)
        JitteryExact.delay = delay
        out = []
        for step in range(1, 21):
            rows = np.arange(step * 7, step * 7 + 7) % 200
            store.W[rows] = -store.W[rows] * 1.5              # a store update (under its lock)
            mgr.maybe_rebuild(store, step)
            out.append(mgr.query(F, 5)[0])
            time.sleep(0.005)
        return out, mgr.stats()
    finally:
        mgr.close(timeout=10)


def test_deterministic_swap_makes_selection_independent_of_build_timing():
    """A new index goes live at the next multiple of T after its build started, whatever the build
    takes (the store waits for a late one): two runs with different build times select the same."""
    fast, st_fast = _run_with_build_delay(0.0, True)
    slow, st_slow = _run_with_build_delay(0.05, True)
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    assert min(st_fast["builds"], st_slow["builds"]) >= 5 and st_slow["deterministic"]   # live at 0, 8, 12, 16, 20
    assert st_slow["swap_wait_s"] > 0.0                       # late builds were waited for, and counted
    # without it the swap step follows the timing
    free_fast, _ = _run_with_build_delay(0.0, False)
    free_slow, _ = _run_with_build_delay(0.05, False)
    assert any((a != b).any() for a, b in zip(free_fast, free_slow))


def test_deterministic_auto_is_on_only_for_a_small_w_and_can_be_forced():
    """auto: deterministic swaps up to copy_limit_bytes of W (64 MiB by default), free above it, where a
    build can outlast T steps and stall every client; True forces them at any size, False never."""
    W = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)     # 4 KiB
    from paramserver.index.manager import DETERMINISTIC_MODES
    assert DETERMINISTIC_MODES == {"auto": None, "on": True, "off": False}
    assert IndexManager(lambda: ExactIndex(16, "dot"), rebuild_every=4).copy_limit_bytes == 64 << 20
    for limit, forced, want in ((W.nbytes, None, True), (W.nbytes - 1, None, False), (W.nbytes - 1, True, True),
                                (W.nbytes, False, False)):
        mgr = IndexManager(lambda: ExactIndex(16, "dot"), rebuild_every=4, deterministic=forced,
                           copy_limit_bytes=limit)
        try:
            assert mgr._is_deterministic(W) is want, (limit, forced)
        finally:
            mgr.close(timeout=10)


class BackgroundGated(ExactIndex):
    """Exact index whose background (non-main-thread) builds block on a gate."""

    gate = threading.Event()

    def build(self, W: np.ndarray) -> None:
        if threading.current_thread() is not threading.main_thread():
            assert BackgroundGated.gate.wait(20), "test gate never opened"
        super().build(W)


def test_restore_retires_a_running_build():
    BackgroundGated.gate.clear()
    W0 = clustered(100, 16, 5, 0.5, seed=0)
    store = FakeStore(W0.copy())
    mgr = IndexManager(lambda: BackgroundGated(16, "dot"), rebuild_every=2, deterministic=True)
    try:
        mgr.maybe_rebuild(store, 0)
        assert mgr.maybe_rebuild(store, 2) is True                # background build, blocked
        mgr.build_now(-W0, step=7)                                 # a restore: built now, live now
        F = queries_near(W0, 4, seed=1)
        np.testing.assert_array_equal(mgr.query(F, 3)[0], brute(-W0, F, 3, "dot")[0])
        BackgroundGated.gate.set()
        time.sleep(0.2)
        mgr.maybe_rebuild(store, 8)                                # the retired build never goes live
        np.testing.assert_array_equal(mgr.query(F, 3)[0], brute(-W0, F, 3, "dot")[0])
    finally:
        BackgroundGated.gate.set()
        mgr.close(timeout=10)


def test_one_mapping_from_head_config_to_index_options():
    """The head (embedded store), the server's flags and the launcher's server arguments give the
    same index options: all go through paramserver.index.index_options / index_cli_args."""
    from paramserver.index import index_cli_args, index_options
    from paramserver.paramserver import build_parser

    from hfsoftmax.config import load_config

    cfg = load_config(None, ["head.nlist=7", "head.nprobe=3", "head.degree=5", "head.ntrees=9", "head.search_k=44"])
    for name in ("forest", "ivf", "graph", "exact", "random"):
        from_head = index_options(name, cfg.head)
        args = build_parser().parse_args(["--num-classes", "10", "--dim", "4", "--index", name,
                                          *index_cli_args(name, cfg.head)])
        assert index_options(name, args) == from_head, name
        make_index(name, 4, **from_head)  # every option is one the index takes
    assert index_options("graph", cfg.head) == {"degree": 5, "nlist": 7, "cold_nprobe": 3}
    assert index_options("ivf", {"nlist": 0, "nprobe": 2}) == {"nlist": None, "nprobe": 2}


class CancellableGate(ExactIndex):
    """Exact index whose build waits on a gate, checking for cancellation (a long graph build)."""

    gate = threading.Event()
    started: List[int] = []

    def build(self, W: np.ndarray) -> None:
        CancellableGate.started.append(1)
        while not CancellableGate.gate.wait(0.01):
            # cancel read before the gate: a test opens the gate before it closes the manager (which
            # cancels the running build), so a build that sees the cancel also sees the open gate
            if self._cancel.is_set() and not CancellableGate.gate.is_set():
                self._check_cancel()
        super().build(W)


def test_first_build_never_blocks_and_selection_falls_back_to_random_fill():
    """A large W's first build runs in the background: start() returns at once, queries answer
    "no candidates" (select_active then fills at random), counted; the index goes live when built
    (free mode) or at the first multiple of T (deterministic)."""
    from paramserver.store import WeightStore

    for det in (False, True):
        CancellableGate.gate.clear()
        store = WeightStore(300, 8, sparse_momentum="unrolled", weight_decay=0.0)
        mgr = IndexManager(lambda: CancellableGate(8, "dot"), rebuild_every=5, deterministic=det,
                           sync_first_build_bytes=0)
        try:
            t0 = time.perf_counter()
            mgr.start(store.rows_view(), step=0)
            store.attach_index(mgr)
            assert time.perf_counter() - t0 < 1.0 and mgr.stats()["building"]
            ids, _ = store.query(np.ones((4, 8), np.float32), 6)
            assert (ids == -1).all() and mgr.stats()["fallback_queries"] == 1
            active, _ = select_active(ids, np.zeros(ids.shape, np.float32), np.array([3, 3, 7, 9]), 10, 300,
                                      np.random.default_rng(0))
            assert len(set(active.tolist())) == 10 and active[:3].tolist() == [3, 7, 9]
            CancellableGate.gate.set()
            for step in range(4):                       # steps 1..4: free mode goes live once built
                store.push([1], np.ones((1, 8), np.float32), step, 0.1)
                time.sleep(0.05)
            assert mgr.stats()["live"] is (not det)
            store.push([1], np.ones((1, 8), np.float32), 4, 0.1)   # step 5 = T: deterministic goes live
            assert mgr.stats()["live"] and store.query(np.ones((2, 8), np.float32), 3)[0].min() >= 0
        finally:
            CancellableGate.gate.set()
            mgr.close(timeout=10)


def test_reset_retires_a_running_build_and_restore_answers_at_once(tmp_path):
    """store.restore during a running (first) build: answers at once, the running build is stopped
    (cancelled, never raised as an error), the restored rows' build goes live, no second build ran
    beside the first."""
    from paramserver.store import WeightStore

    CancellableGate.gate.clear()
    CancellableGate.started = []
    src = WeightStore(300, 8, seed=1, sparse_momentum="unrolled")
    src.snapshot(str(tmp_path / "snap"))
    store = WeightStore(300, 8, seed=2, sparse_momentum="unrolled")
    mgr = IndexManager(lambda: CancellableGate(8, "dot"), rebuild_every=5, deterministic=False,
                       sync_first_build_bytes=0)
    try:
        mgr.start(store.rows_view(), step=0)
        store.attach_index(mgr)
        t0 = time.perf_counter()
        store.restore(str(tmp_path / "snap"))             # the gate is closed: the first build still runs
        assert time.perf_counter() - t0 < 1.0
        assert not mgr.stats()["live"]
        deadline = time.monotonic() + 5
        while len(CancellableGate.started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(CancellableGate.started) == 2           # the retired build stopped, the new one began
        CancellableGate.gate.set()
        mgr.close(timeout=10)
        st = mgr.stats()
        assert st["live"] and st["builds"] == 1
        F = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
        np.testing.assert_array_equal(store.query(F, 4)[0], brute(src.pull(np.arange(300)), F, 4, "dot")[0])
        mgr.maybe_rebuild(store, 1)                        # the retired build left no error to raise
    finally:
        CancellableGate.gate.set()
        mgr.close(timeout=10)


def test_graph_build_stops_when_cancelled():
    W = clustered(4000, 16, 20, 0.5, seed=1)
    g = make_index("graph", 16, "angular", seed=0, cold_nprobe=0, subprocess=False)
    g.cancel()
    from paramserver.index.base import BuildCancelled
    with pytest.raises(BuildCancelled):
        g.build(W)


def test_nearest_lists_two_level_agrees_with_the_flat_search():
    """Above HNSW_LISTS centroids the rows' nearest lists come from a two-level search (groups of
    centroids, then the members of the best groups): it must agree with scoring every centroid."""
    from paramserver.index import base, graph

    rng = np.random.default_rng(0)
    C = _normalize(clustered(2400, 32, 60, 0.3, seed=1))           # 2400 > HNSW_LISTS centroids
    W = (C[rng.integers(0, 2400, 20000)] + 0.15 * rng.standard_normal((20000, 32))).astype(np.float32)
    assert C.shape[0] > base.HNSW_LISTS
    top, sim0 = graph._nearest_lists(W, C, 3)
    exact = np.argsort(-(_normalize(W) @ C.T), axis=1)[:, :3]
    assert (top[:, 0] == exact[:, 0]).mean() >= 0.95
    np.testing.assert_allclose(sim0, (_normalize(W) * C[top[:, 0]]).sum(1), rtol=1e-4, atol=1e-5)
    assert all(len(set(r)) == 3 for r in top[:200].tolist())       # three distinct lists each


def test_graph_rebuilds_keep_the_cold_ivf_and_renew_it_every_ivf_every_builds():
    W = clustered(3000, 16, 20, 0.5, seed=2)
    store = FakeStore(W.copy())
    mgr = IndexManager(lambda: make_index("graph", 16, "angular", seed=0, ivf_every=3), rebuild_every=1,
                       background=False)
    ivfs = []
    for step in range(5):
        mgr.maybe_rebuild(store, step)
        ivfs.append(mgr.index._ivf)
    assert mgr.stats()["builds"] == 5
    assert ivfs[0] is ivfs[1] is ivfs[2] and ivfs[3] is not ivfs[2] and ivfs[3] is ivfs[4]
    ids, _ = mgr.query(-W[:4], 3)                       # no labels: the (kept) IVF answers
    assert (ids >= 0).all()
