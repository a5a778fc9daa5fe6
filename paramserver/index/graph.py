"""GraphIndex: each class's nearest classes, scored against the feature of a sample of that label."""
from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Callable, Optional, Tuple

import numpy as np

from .base import (_EPS, HNSW_LISTS, ClassIndex, _default_nlist, _faiss_threads, _normalize_rows, _sort_desc,
                   kmeans_centroids)
from ..shm import shared_source
from .ivf import IVFIndex
from .spawn import ChildBuild


def _unit(X: np.ndarray) -> np.ndarray:
    """Unit rows of a gathered block (float32, a new array)."""
    return _normalize_rows(np.asarray(X, dtype=np.float32))


def _nearest_lists(W: np.ndarray, C: np.ndarray, p: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Each row's p nearest lists by cosine (int32 [K, p], best first) and the cosine to the first
    (float32 [K]), W read in blocks, all in BLAS matmuls.

    Up to HNSW_LISTS lists every row is scored against every centroid. Above, two levels: the
    centroids are clustered into ~sqrt(nlist) groups, each row scores the group centres and then
    only the centroids of its `_GROUPS_PROBED` best groups (10M rows x 10K lists: ~4e11
    multiply-adds instead of 2.6e13, and a matmul beats a graph search per row at this size)."""
    K, nlist = W.shape[0], C.shape[0]
    top = np.empty((K, p), dtype=np.int32)
    sim0 = np.empty(K, dtype=np.float32)
    if nlist <= HNSW_LISTS:
        for lo in range(0, K, _ROW_BLOCK // 4):
            S = _unit(W[lo:lo + _ROW_BLOCK // 4]) @ C.T
            t = np.argpartition(-S, p - 1, axis=1)[:, :p] if p < nlist else np.broadcast_to(np.arange(nlist), S.shape)
            ts = np.take_along_axis(S, t, axis=1)
            o = np.argsort(-ts, axis=1, kind="stable")
            top[lo:lo + len(S)] = np.take_along_axis(t, o, axis=1)
            sim0[lo:lo + len(S)] = np.take_along_axis(ts, o, axis=1)[:, 0]
        return top, sim0
    G = max(2, int(round(math.sqrt(nlist))))
    GC = _normalize_rows(kmeans_centroids(C, G, 10, max(8, -(-nlist // G)), seed, None, True, _unit))
    group = np.argmax(C @ GC.T, axis=1)                       # each centroid's group
    order = np.argsort(group, kind="stable")
    gb = np.concatenate(([0], np.cumsum(np.bincount(group, minlength=G))))
    a = min(_GROUPS_PROBED, G)
    for lo in range(0, K, _ROW_BLOCK):
        X = _unit(W[lo:lo + _ROW_BLOCK])
        n = len(X)
        gs = X @ GC.T                                          # [n, G]
        tg = np.argpartition(-gs, a - 1, axis=1)[:, :a] if a < G else np.broadcast_to(np.arange(G), gs.shape)
        cand_i = np.full((n, a, p), -1, dtype=np.int64)
        cand_s = np.full((n, a, p), -np.inf, dtype=np.float32)
        rows_of = np.argsort(tg.reshape(-1), kind="stable")   # (row, slot) pairs grouped by group
        rb = np.concatenate(([0], np.cumsum(np.bincount(tg.reshape(-1), minlength=G))))
        for g in range(G):
            pairs = rows_of[rb[g]:rb[g + 1]]
            mem = order[gb[g]:gb[g + 1]]
            if pairs.size == 0 or mem.size == 0:
                continue
            r, slot = pairs // a, pairs % a
            S = X[r] @ C[mem].T                               # [q, members of g]
            k = min(p, mem.size)
            t = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < mem.size else np.broadcast_to(np.arange(mem.size), S.shape)
            cand_i[r, slot, :k] = mem[t]
            cand_s[r, slot, :k] = np.take_along_axis(S, t, axis=1)
        cand_i, cand_s = cand_i.reshape(n, -1), cand_s.reshape(n, -1)
        t = np.argsort(-cand_s, axis=1, kind="stable")[:, :p]
        bi = np.take_along_axis(cand_i, t, axis=1)
        bi = np.where(bi < 0, bi[:, :1], bi)                   # fewer than p found: repeat the nearest
        top[lo:lo + n] = bi
        sim0[lo:lo + n] = np.take_along_axis(cand_s, t[:, :1], axis=1)[:, 0]
    return top, sim0


_GROUPS_PROBED = 4


def _neighbour_graph(W: np.ndarray, nlist: int, probe: int, degree: int, niter: int, tppc: int, seed: int,
                     threads: Optional[int], check: Optional[Callable[[], None]] = None,
                     centroids: Optional[np.ndarray] = None,
                     lists: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GraphIndex's build over the rows of W [K, d] (read in place, never copied: blocks are
    normalised as they are gathered): (graph int32 [K, degree], unit centroids [nlist, d], list
    representatives int64 [nlist]). See the GraphIndex docstring.

    Memory beyond W: each row's running top-`degree` (ids int32 + scores float16, K x degree x 6
    bytes), its `probe` nearest lists (K x probe int32) and one block's scores. ``check`` is called
    between lists (it raises to stop a retired build). ``centroids``: the lists' centroids (None:
    k-means here); ``lists``: :func:`_nearest_lists` of W and them, if already computed."""
    K, d = W.shape
    with _faiss_threads(threads):
        if centroids is None:
            centroids = kmeans_centroids(W, nlist, niter, tppc, seed, None, True, _unit)
        C = _normalize_rows(np.ascontiguousarray(centroids, dtype=np.float32))
        nlist = C.shape[0]
        p = min(probe, nlist)
        # each row's p nearest lists (best first) and the cosine to its own list's centroid
        top, sim0 = lists if lists is not None else _nearest_lists(W, C, p, seed)
    assign = top[:, 0]
    order = np.argsort(assign, kind="stable")          # rows grouped by their own list
    bounds = np.concatenate(([0], np.cumsum(np.bincount(assign, minlength=nlist))))
    # (row, slot) pairs grouped by probed list: list j is searched by every row that has it
    # among its p nearest lists, in one matmul of those rows against j's members.
    by_list = np.argsort(top.reshape(-1), kind="stable")
    qbounds = np.concatenate(([0], np.cumsum(np.bincount(top.reshape(-1), minlength=nlist))))
    del top
    deg = min(degree, K - 1)
    best_i = np.full((K, deg), -1, dtype=np.int32)     # running top-deg over the probed lists
    best_s = np.full((K, deg), -np.inf, dtype=np.float16)   # cosines: float16 is plenty to rank neighbours
    reps = np.zeros(nlist, dtype=np.int64)
    block = 4096  # query rows per matmul: bounds the [block, members] score matrix
    # A list far larger than the average (degenerate rows: all-zero or identical rows all fall into
    # one list) would make the build K x K; its candidates are a seeded sample of `cap` members
    # (such rows are near-ties anyway), which bounds the build at ~4x its normal cost.
    cap = max(4 * -(-K // nlist), 4 * degree, 256)
    sub_rng = np.random.default_rng([seed, 11])
    for lst in range(nlist):
        if check is not None and lst % 16 == 0:
            check()
        mem = order[bounds[lst]:bounds[lst + 1]]
        if mem.size == 0:
            continue
        reps[lst] = mem[np.argmax(sim0[mem])]
        rows_q = by_list[qbounds[lst]:qbounds[lst + 1]] // p     # each row once: its p lists differ
        cm = mem if mem.size <= cap else np.sort(sub_rng.choice(mem, cap, replace=False))
        Xm = _unit(W[cm])
        for lo in range(0, rows_q.size, block):
            rq = rows_q[lo:lo + block]
            S = _unit(W[rq]) @ Xm.T                           # [q, candidate members]
            own = np.flatnonzero(assign[rq] == lst)
            if own.size:                                      # not its own neighbour
                r, c = np.nonzero(rq[own][:, None] == cm[None, :])
                S[own[r], c] = -np.inf
            k = min(deg, cm.size)
            t = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < cm.size else \
                np.broadcast_to(np.arange(cm.size), S.shape)
            cand_i = np.concatenate([best_i[rq], cm[t].astype(np.int32)], axis=1)
            cand_s = np.concatenate([best_s[rq].astype(np.float32), np.take_along_axis(S, t, axis=1)], axis=1)
            keep = np.argpartition(-cand_s, deg - 1, axis=1)[:, :deg]
            best_i[rq] = np.take_along_axis(cand_i, keep, axis=1)
            best_s[rq] = np.take_along_axis(cand_s, keep, axis=1)
    for lo in range(0, K, _ROW_BLOCK):                         # sort each row's neighbours, best first
        bs = best_s[lo:lo + _ROW_BLOCK].astype(np.float32)
        srt = np.argsort(-bs, axis=1, kind="stable")
        bi = np.take_along_axis(best_i[lo:lo + _ROW_BLOCK], srt, axis=1)
        bi[~np.isfinite(np.take_along_axis(bs, srt, axis=1))] = -1
        best_i[lo:lo + _ROW_BLOCK] = bi
    del best_s
    if deg == degree:
        return best_i, C, reps
    graph = np.full((K, degree), -1, dtype=np.int32)
    graph[:, :deg] = best_i
    return graph, C, reps


_ROW_BLOCK = 65536     # rows per block of the whole-K passes of a build


def _graph_build_worker(X: np.ndarray, workdir: str, nlist: int, probe: int, degree: int, niter: int, tppc: int,
                        seed: int, threads: Optional[int]) -> None:
    """Child body of GraphIndex.build (spawn.py): the rows X (mapped) and the unit centroids
    (``workdir/C.npy``) -> each row's own list in ``assign.npy`` (as soon as known: the parent's
    cold-path IVF is built from it meanwhile), then the graph arrays in ``graph.npz``."""
    C = np.load(os.path.join(workdir, "C.npy"))
    with _faiss_threads(threads):
        lists = _nearest_lists(X, C, min(probe, C.shape[0]), seed)
    assign_path = os.path.join(workdir, "assign.npy")
    with open(assign_path + ".part", "wb") as f:
        np.save(f, lists[0][:, 0])
    os.replace(assign_path + ".part", assign_path)   # whole or absent: the parent polls for it
    graph, C, reps = _neighbour_graph(X, nlist, probe, degree, niter, tppc, seed, threads, centroids=C, lists=lists)
    np.savez(os.path.join(workdir, "graph.npz"), graph=graph, C=C, reps=reps)


class GraphIndex(ClassIndex):
    """Class-neighbour graph: each class's `degree` nearest classes (cosine of their rows), built in
    the background; a query scores the neighbours of each sample's LABEL against the feature.

    Why: at B = 256 a per-feature probe of an IVF or a forest touches most of W every step (256
    queries x nprobe lists), which costs several times the M-row softmax step itself
    (docs/benchmarks.md). The hard negatives of a sample are the classes its feature scores
    highest, and once training is under way the feature lies near its label's row, so they are the
    label's nearest classes (the "doppelganger" lists of face recognition). The graph holds those
    lists; a step gathers B x (degree + 1) rows and scores them with the features -- per-step cost
    independent of K. The scores are exact and fresh (the index keeps a copy of the rows, updated
    every step like IVF); only the neighbour SETS age, and they are recomputed at each rebuild.

    Query, per sample b with feature f_b and label y_b:
    - warm (the label is a class of this shard and cos(f_b, row y_b) >= `cold_cos`): candidates =
      {y_b} + graph[y_b], scored f_b . row (cosine for "angular") on the fresh rows;
    - cold (the label row does not agree with the feature yet -- an untrained row, whose neighbour
      list was computed from noise; or no label / a label of another shard): an IVF kept beside the
      graph (`cold_nprobe` lists per feature) proposes candidates, re-scored on the fresh rows. Its
      rows are re-assigned only when they moved (cosine to the held row < 1 - `cold_drift`: a
      label's row after its step, not the many slightly pushed negatives). `cold_nprobe = 0`: a
      greedy walk instead (from the member nearest to f_b's nearest centroid, `hops` moves).
    Early in training most samples are cold and the step costs about IVF's; once the rows are
    trained almost all are warm. The cold path is what brings the graph's accuracy close to IVF's
    in a short run, where many label rows are still untrained when first seen (docs/benchmarks.md,
    bench_accuracy). `queries` / `cold_queries` count samples since the build.
    With S shards each shard proposes only its own classes; a label's neighbours in other shards
    come from the cold path.

    Build: spherical k-means (faiss) on a sample; every row is assigned to its nearest centroid and
    searches its `probe` nearest lists (an IVF kNN search of W against itself). The work is grouped
    by list -- one BLAS matmul of all rows probing list j against j's members -- so it runs at
    matmul speed, not at a per-query scan's. Cost ~ K * probe * (K / nlist) * d multiply-adds
    (seconds at 100K, over a minute at 1M on one core; docs/benchmarks.md). From
    `SUBPROCESS_MIN_ROWS` rows (or `subprocess=True`) it runs in a spawned process (its per-list
    loop holds the GIL between numpy calls, which in a thread stalls the trainer at every hand-off
    and raises the background rebuild's step-rate cost; docs/benchmarks.md), while the calling
    thread builds the cold-path IVF.

    Args (besides the base ones):
        degree: neighbours kept per class (graph out-degree).
        nlist: k-means lists (None: round(sqrt(K)) up to 1M rows, then K // 1000; at most K // 8).
        probe: lists searched for each list's neighbours (itself included).
        hops: greedy steps of the walk (only with cold_nprobe = 0).
        cold_cos: a label row whose cosine with the feature is below this makes the sample cold
            (-1: never).
        cold_nprobe: lists the cold-path IVF probes per feature (0: no IVF, walk instead).
        cold_drift: rows whose cosine to their cold-IVF list's centroid fell by more than this are re-assigned.
        niter, train_points_per_centroid: k-means iterations and sample size per centroid.
        subprocess: build the graph in a spawned process (None: from SUBPROCESS_MIN_ROWS rows, mapping
            W when it is the store's shared-memory matrix, else through a temp copy up to
            SUBPROCESS_MAX_BYTES of W; above that, in the calling thread, reading W in place).
        cold_codec: what the cold-path IVF holds per row ("sq8": 8-bit codes; "flat": float32 rows).
        ivf_every: a rebuild keeps the live index's cold-path IVF (incremental, kept current by the
            updates) and makes a new one every ``ivf_every`` builds (see :meth:`inherit`).
    """

    name = "graph"
    incremental = True
    SUBPROCESS_MIN_ROWS = 50_000
    SUBPROCESS_MAX_BYTES = 1 << 30

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0,
                 degree: int = 32, nlist: Optional[int] = None, probe: int = 3, hops: int = 3,
                 cold_cos: float = 0.3, cold_nprobe: int = 8, cold_drift: float = 0.01, niter: int = 10,
                 train_points_per_centroid: int = 64, subprocess: Optional[bool] = None,
                 cold_codec: str = "sq8", ivf_every: int = 4) -> None:
        super().__init__(dim, metric, class_offset=class_offset, seed=seed)
        self.cold_codec = cold_codec
        for key, val in (("degree", degree), ("probe", probe), ("niter", niter),
                         ("train_points_per_centroid", train_points_per_centroid)):
            if not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{key} must be an int >= 1, got {val!r}")
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        if not isinstance(hops, (int, np.integer)) or hops < 0:
            raise ValueError(f"hops must be an int >= 0, got {hops!r}")
        if not isinstance(cold_nprobe, (int, np.integer)) or cold_nprobe < 0:
            raise ValueError(f"cold_nprobe must be an int >= 0, got {cold_nprobe!r}")
        self.degree, self.nlist_opt, self.probe, self.hops = int(degree), nlist, int(probe), int(hops)
        self.cold_cos, self.cold_nprobe, self.cold_drift = float(cold_cos), int(cold_nprobe), float(cold_drift)
        self._ivf: Optional[IVFIndex] = None         # feature search for cold samples (cold_nprobe > 0)
        self.subprocess = subprocess
        if not isinstance(ivf_every, (int, np.integer)) or ivf_every < 1:
            raise ValueError(f"ivf_every must be an int >= 1, got {ivf_every!r}")
        self.ivf_every = int(ivf_every)
        self._inherit_ivf: Optional[IVFIndex] = None   # the live index's IVF, kept by a rebuild
        self._ivf_age = 0                               # rebuilds the IVF has been kept through
        self.queries = self.cold_queries = 0         # samples answered, and of those by the cold path
        self.niter, self.train_points_per_centroid = int(niter), int(train_points_per_centroid)
        self.nlist = 0
        self._rows: Optional[np.ndarray] = None       # [K, d] the store's rows (a reference, never a copy)
        self._graph: Optional[np.ndarray] = None      # [K, degree] int32 local ids, -1 = none
        self._centroids: Optional[np.ndarray] = None  # [nlist, d] unit
        self._reps: Optional[np.ndarray] = None       # [nlist] member nearest each centroid
        self._lock = threading.Lock()

    def _nested(self, key: str) -> ClassIndex:
        if key != "_ivf":
            return super()._nested(key)
        return IVFIndex(self.dim, self.metric, class_offset=self.class_offset, seed=self.seed, codec=self.cold_codec)

    @property
    def neighbours(self) -> Optional[np.ndarray]:
        """The graph of the last build: [K, degree] int32 local class ids, best first, -1 = none."""
        return self._graph

    def build(self, W: np.ndarray) -> None:
        """Build over W [K, d] float32 and keep a REFERENCE to it: queries score the rows W holds when
        they run (the store's live rows; :meth:`bind_rows` moves the reference, e.g. from the copy a
        deterministic build read to the live matrix)."""
        W = self._check_W(W)
        K = W.shape[0]
        nlist = self.nlist_opt or _default_nlist(K)
        nlist = min(nlist, K)
        args = (nlist, self.probe, self.degree, self.niter, self.train_points_per_centroid, self.seed,
                self.build_threads)
        shared = shared_source(W)    # the store's W in shared memory: a child maps it, no copy at any size
        use_subprocess = self.subprocess if self.subprocess is not None else \
            K >= self.SUBPROCESS_MIN_ROWS and (shared is not None or W.nbytes <= self.SUBPROCESS_MAX_BYTES)
        # One k-means for the graph's lists and the cold-path IVF's (it dominated a 10M build twice over).
        with _faiss_threads(self.build_threads):
            C = _normalize_rows(kmeans_centroids(W, nlist, self.niter, self.train_points_per_centroid, self.seed,
                                                 None, True, _unit))
        self._check_cancel()
        # The per-list loop holds the GIL between its numpy calls; in a background thread that stalls
        # the trainer at every hand-off (more step rate lost to rebuilds; docs/benchmarks.md), so graphs are
        # built in a spawned process (spawn.py) while this thread builds the IVF. The child maps the
        # store's W when it is in shared memory (paramserver/shm.py: any size), else reads a temp .npy
        # up to SUBPROCESS_MAX_BYTES; above that, without shared memory, the build reads W in place in
        # this thread: a temp copy of a 10 GB matrix costs more than the GIL hand-offs.
        child = ChildBuild(self.name, _graph_build_worker, W, args, nice=self.build_nice,
                           cancel=self._cancel) if use_subprocess else None
        with child if child is not None else contextlib.nullcontext():
            lists = None
            if child is not None:
                np.save(child.path("C.npy"), C)
                child.start()
            else:   # in this thread: each row's nearest lists once, for the IVF and the graph
                with _faiss_threads(self.build_threads):
                    lists = _nearest_lists(W, C, min(self.probe, C.shape[0]), self.seed)
                self._check_cancel()
            ivf = None
            inherited = self._inherit_ivf is not None and self._inherit_ivf.num_classes == K
            if inherited:
                ivf, self._inherit_ivf = self._inherit_ivf, None
            elif self.cold_nprobe:
                self._ivf_age = 0
                ivf = IVFIndex(self.dim, self.metric, class_offset=self.class_offset, seed=self.seed, nlist=nlist,
                               nprobe=self.cold_nprobe, niter=self.niter,
                               train_points_per_centroid=self.train_points_per_centroid, codec=self.cold_codec)
                ivf.build_threads = self.build_threads
                # the child's nearest lists: one search of W for the IVF and the graph
                assign = lists[0][:, 0] if child is None else np.load(child.wait_file("assign.npy"))
                ivf.build(W, centroids=C, assign=assign)
            if child is not None:
                child.join()
                with np.load(child.path("graph.npz")) as z:
                    graph, C, reps = z["graph"], z["C"], z["reps"]
            else:
                graph, C, reps = _neighbour_graph(W, *args, check=self._check_cancel, centroids=C, lists=lists)
        with self._lock:
            self._rows, self._graph, self._centroids, self._reps = W, graph, C, reps
            self._ivf = ivf
            self.nlist, self.num_classes = nlist, K

    def bind_rows(self, W: np.ndarray) -> None:
        """Score on ``W`` (same shape) from now on: the live store rows after a build from a copy."""
        W = self._rebind_rows(W)
        with self._lock:
            self._rows = W

    def inherit(self, previous: "ClassIndex") -> None:
        """A rebuild keeps the live index's cold-path IVF: it is incremental (every update moves the
        rows that drifted), so only its centroids age; rebuilding it each time doubled the build's
        memory (8-bit codes: a quarter of W, twice) and time. The graph's own lists are re-clustered.
        Every ``ivf_every``-th build makes a new IVF."""
        if (isinstance(previous, GraphIndex) and previous._ivf is not None and self.cold_nprobe
                and previous.class_offset == self.class_offset and previous.dim == self.dim
                and previous.metric == self.metric and previous._ivf_age + 1 < self.ivf_every):
            self._inherit_ivf, self._ivf_age = previous._ivf, previous._ivf_age + 1

    def update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows changed (global ids [m], their new rows [m, d]): the scores read the store's rows, so
        only the cold-path IVF moves rows that drifted; the neighbour sets wait for a rebuild."""
        if self._rows is None:
            raise RuntimeError("GraphIndex.update called before build()")
        local, rows = self._check_update(ids, rows)
        with self._lock:
            ivf = self._ivf
        if ivf is not None and local.size:
            # Re-assign in the IVF only the rows that moved (their cosine to their list's centroid fell
            # by more than cold_drift): a label's row after its step, not the many slightly pushed negatives.
            # Its scores are never used (cold candidates are re-scored on the fresh rows), so the
            # IVF only has to keep each row in about the right list.
            gids = local + self.class_offset
            moved = ivf.drifted(gids, rows, self.cold_drift)   # no decoding of the held codes
            if moved.any():
                ivf.update(gids[moved], rows[moved])

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        F = self._check_query(F, n)
        Q = _normalize_rows(F) if self.metric == "angular" else F
        B, K = F.shape[0], self.num_classes
        with self._lock:
            rows, graph, C, reps = self._rows, self._graph, self._centroids, self._reps
            assert rows is not None and graph is not None and C is not None and reps is not None
            entry = np.full(B, -1, dtype=np.int64)
            if labels is not None:
                lab = np.asarray(labels, dtype=np.int64).reshape(-1)
                if lab.shape[0] != B:
                    raise ValueError(f"labels must be [B={B}], got {lab.shape[0]} entries")
                local = lab - self.class_offset
                mine = np.flatnonzero((local >= 0) & (local < K))
                entry[mine] = local[mine]
                if mine.size and self.cold_cos > -1.0:
                    # A label row that does not agree with its feature yet (untrained: its graph
                    # neighbours were computed from noise) is no entry: search from the feature.
                    r = np.asarray(rows[entry[mine]], dtype=np.float32)
                    cos = np.einsum("bd,bd->b", r, F[mine]) / np.maximum(
                        np.linalg.norm(r, axis=1) * np.linalg.norm(F[mine], axis=1), _EPS)
                    entry[mine[cos < self.cold_cos]] = -1
            lost = np.flatnonzero(entry < 0)
            ivf = self._ivf
            if lost.size and ivf is None:  # enter at the cluster nearest the feature and walk
                # greedily to the best-scoring row (a few hops of B x degree scores each)
                entry[lost] = reps[np.argmax(_normalize_rows(F[lost]) @ C.T, axis=1)]
                for _ in range(self.hops):
                    c, s = self._score(rows, graph, entry[lost], Q[lost], self.metric)
                    entry[lost] = c[np.arange(lost.size), np.argmax(s, axis=1)]
            self.queries += B
            self.cold_queries += int(lost.size)
            if ivf is None:
                lost = lost[:0]
            warm = np.flatnonzero(entry >= 0)
            cand, S = self._score(rows, graph, entry[warm], Q[warm], self.metric)   # [b, 1 + degree] fresh scores
            if lost.size:  # the IVF proposes, the fresh rows score
                assert ivf is not None
                ci, _ = ivf.query(F[lost], n)
                ci = ci - self.class_offset
                ok = ci >= 0
                cs = _scores(rows, np.where(ok, ci, 0), Q[lost], self.metric)
                cs[~ok] = -np.inf
                width = max(cand.shape[1], ci.shape[1])
                c_all = np.full((B, width), -1, dtype=np.int64)
                s_all = np.full((B, width), -np.inf, dtype=S.dtype)
                c_all[warm, :cand.shape[1]], s_all[warm, :S.shape[1]] = cand, S
                c_all[lost, :ci.shape[1]], s_all[lost, :cs.shape[1]] = ci, cs
                cand, S = c_all, s_all
        k = min(n, S.shape[1])
        top = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < S.shape[1] else \
            np.broadcast_to(np.arange(S.shape[1]), S.shape)
        ids = np.take_along_axis(cand, top, axis=1)
        scores = np.take_along_axis(S, top, axis=1).astype(np.float32)
        ids = np.where(np.isfinite(scores), ids + self.class_offset, -1)
        ids, scores = _sort_desc(ids, scores)
        return self._pad(ids, scores, n)

    @staticmethod
    def _score(rows: np.ndarray, graph: np.ndarray, entry: np.ndarray, Q: np.ndarray,
               metric: str) -> Tuple[np.ndarray, np.ndarray]:
        """Candidates {e} + graph[e] per query and their scores q . row (-inf where none)."""
        cand = np.concatenate([entry[:, None], graph[entry]], axis=1).astype(np.int64)
        ok = cand >= 0
        S = _scores(rows, np.where(ok, cand, 0), Q, metric)
        S[~ok] = -np.inf
        return cand, S


def _scores(rows: np.ndarray, cand: np.ndarray, Q: np.ndarray, metric: str) -> np.ndarray:
    """[b, c] scores of the rows ``cand`` [b, c] against the queries Q [b, d] (unit for angular):
    q . row, divided by |row| for "angular" (the rows are the store's, not normalised)."""
    R = rows[cand]                                                   # [b, c, d] gathered
    S = np.matmul(R, Q[:, :, None])[:, :, 0]
    if metric == "angular":
        S /= np.maximum(np.sqrt(np.einsum("bcd,bcd->bc", R, R)), _EPS)
    return S
