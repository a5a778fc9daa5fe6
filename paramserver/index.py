"""Class indexes over the rows of W and the per-batch active-class selection of HF-softmax.

Implements the "dynamic class selection" of Zhang et al., AAAI 2018, "Accelerated Training for
Massive Classification via Dynamic Class Selection": per mini-batch, the softmax is computed over
only M << K "active" classes -- the batch's own labels plus the classes whose weight vectors score
highest against the batch features. The paper finds those classes with a hashing forest (Annoy)
rebuilt every T steps from the current W; this module provides that index and the alternatives we
compare it with, all behind one interface (`ClassIndex.build(W)`, `ClassIndex.query(F, n)`):

- `ExactIndex`:   blocked matmul top-n over all rows; the reference for recall (and CPK).
- `HashingForest`: Annoy random-projection forest (angular or dot), the paper's index
                   (default ntrees = 50, as in the paper's code).
- `HNSWIndex`:    hnswlib graph index (angular = cosine space, dot = inner-product space).
- `IVFIndex`:     inverted file (k-means centroids + faiss IndexIVFFlat). Incremental: a step
                   changes only the M pushed rows, and `update(ids, rows)` re-assigns just those rows
                   to their nearest centroid, so the index stays fresh at per-step cost; only the
                   centroids age, and they are re-clustered rarely in the background.
- `GraphIndex`:   class-neighbour graph (each class's nearest classes, built in the background by an
                   IVF kNN search of W against itself in grouped matmuls); a query scores the
                   neighbours of each sample's LABEL against its feature, so the per-step cost is
                   B x (degree + 1) rows whatever K is; samples whose label row is still untrained
                   go to an IVF kept beside it. Takes the batch labels (`query(F, n, labels)`).
                   The default from 100K classes.
- `RandomIndex`:  random class ids; with `select_active` this is the Partial-FC style random
                   sampling baseline at the same M.

`IndexManager` owns the live index of one store shard: it rebuilds in a background thread (Annoy's
build, hnswlib's add and all faiss calls release the GIL), never queues builds, swaps the new index
in atomically, and reports build time, achieved rebuild period and staleness.

`select_active` turns per-feature candidates into exactly M unique active class ids (labels first)
and remaps the labels into 0..M-1.

This package never imports torch. annoy / faiss / hnswlib are imported lazily by the index that
needs them.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import shutil
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

METRICS = ("angular", "dot")
_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _normalize_rows(X: np.ndarray) -> np.ndarray:
    """Return a new float32 array with unit-L2 rows (zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, _EPS)).astype(np.float32, copy=False)


@contextlib.contextmanager
def _faiss_threads(n: Optional[int]) -> Iterator[None]:
    """Limit faiss' OpenMP threads for the calling thread (OpenMP's setting is per thread), so a
    background build leaves the other core to the trainer; restores the previous value."""
    if n is None:
        yield
        return
    import faiss

    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


def _sort_desc(ids: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sort each row of (ids [B, n], scores [B, n]) by descending score; -1 ids go last."""
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32, copy=False)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


# ----------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------
class ClassIndex:
    """Nearest-class index over the rows of one shard's W ([K, d], row i = class offset + i).

    Scores are "higher = better": the cosine for metric "angular" (normalized / margin heads) and
    the inner product for metric "dot" (plain linear head).

    Args:
        dim: feature dimension d.
        metric: "angular" or "dot".
        class_offset: global class id of row 0 (shards split class ids by range).
        seed: seed for any randomness in build or query.
    """

    name: str = "base"
    incremental: bool = False

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0) -> None:
        if not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if class_offset < 0:
            raise ValueError(f"class_offset must be >= 0, got {class_offset}")
        self.dim = int(dim)
        self.metric = metric
        self.class_offset = int(class_offset)
        self.seed = int(seed)
        self.num_classes = 0  # K of the last build
        # Threads the heavy build may use (None = library default). IndexManager sets 1 for
        # background builds so the trainer keeps the other core.
        self.build_threads: Optional[int] = None
        # Nice increment for a build subprocess (HashingForest); IndexManager sets it for background
        # builds so that the build only takes CPU the trainer leaves idle.
        self.build_nice = 0

    # -- validation shared by subclasses ------------------------------------------------------
    def _check_W(self, W: np.ndarray) -> np.ndarray:
        W = np.asarray(W)
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D [K, d], got shape {W.shape}")
        if W.shape[1] != self.dim:
            raise ValueError(f"W row dim {W.shape[1]} does not match index dim {self.dim}")
        if W.shape[0] == 0:
            raise ValueError("W has no rows (K = 0)")
        return np.ascontiguousarray(W, dtype=np.float32)

    def _check_query(self, F: np.ndarray, n: int) -> np.ndarray:
        if self.num_classes == 0:
            raise RuntimeError(f"{type(self).__name__}.query called before build()")
        F = np.asarray(F)
        if F.ndim != 2:
            raise ValueError(f"features F must be 2-D [B, d], got shape {F.shape}")
        if F.shape[1] != self.dim:
            raise ValueError(f"feature dim {F.shape[1]} does not match index dim {self.dim}")
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n (candidates per feature) must be an int >= 1, got {n!r}")
        return np.ascontiguousarray(F, dtype=np.float32)

    def _check_update(self, ids: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Validate an update (global ids [m], rows [m, d]); returns (local row indices int64, rows)."""
        local = np.asarray(ids, dtype=np.int64).reshape(-1) - self.class_offset
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] != local.size:
            raise ValueError(f"rows must be [len(ids)={local.size}, d], got shape {rows.shape}")
        if rows.shape[1] != self.dim:
            raise ValueError(f"rows dim {rows.shape[1]} does not match index dim {self.dim}")
        if local.size and (local.min() < 0 or local.max() >= self.num_classes):
            raise ValueError(f"ids must lie in [{self.class_offset}, {self.class_offset + self.num_classes}), "
                             f"got range [{local.min() + self.class_offset}, {local.max() + self.class_offset}]")
        return local, rows

    # -- API ------------------------------------------------------------------------------------
    def build(self, W: np.ndarray) -> None:
        """Build from W [K, d] float32. The index copies what it keeps, so W may change after."""
        raise NotImplementedError

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """F [B, d] -> (ids int64 [B, n] global class ids, -1 where fewer found;
        scores float32 [B, n], sorted descending per row). `labels` [B] (the batch's global class
        ids) is a hint only the label-driven GraphIndex uses; the others ignore it."""
        raise NotImplementedError

    def update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows of W changed (incremental indexes only)."""
        raise NotImplementedError(f"{type(self).__name__} is not incremental; rebuild it instead")

    def _pad(self, ids: np.ndarray, scores: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """Pad [B, m] results to [B, n] with id -1 / score -inf (when K < n)."""
        B, m = ids.shape
        if m >= n:
            return ids[:, :n], scores[:, :n]
        out_i = np.full((B, n), -1, dtype=np.int64)
        out_s = np.full((B, n), -np.inf, dtype=np.float32)
        out_i[:, :m] = ids
        out_s[:, :m] = scores
        return out_i, out_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, metric={self.metric!r}, K={self.num_classes})"


class ExactIndex(ClassIndex):
    """Exact top-n by blocked matmul; the reference every approximate index is measured against.

    Memory stays bounded at K = 1M: rows are scored in blocks of `block_rows`, and a running top-n
    ([B, n]) is merged with each block's top-n via np.argpartition. Incremental: `update` writes
    the pushed rows into its copy, so the index is never stale (the oracle selection in benchmarks).
    """

    name = "exact"
    incremental = True

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0,
                 block_rows: int = 65536) -> None:
        super().__init__(dim, metric, class_offset=class_offset, seed=seed)
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.block_rows = int(block_rows)
        self._W: Optional[np.ndarray] = None

    def build(self, W: np.ndarray) -> None:
        W = self._check_W(W)
        self._W = _normalize_rows(W) if self.metric == "angular" else W.copy()
        self.num_classes = W.shape[0]

    def update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Overwrite the changed rows (global ids [m], rows [m, d])."""
        if self._W is None:
            raise RuntimeError("ExactIndex.update called before build()")
        local, rows = self._check_update(ids, rows)
        self._W[local] = _normalize_rows(rows) if self.metric == "angular" else rows

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        F = self._check_query(F, n)
        assert self._W is not None
        if self.metric == "angular":
            F = _normalize_rows(F)
        B, K = F.shape[0], self.num_classes
        k = min(n, K)
        best_i = np.empty((B, 0), dtype=np.int64)
        best_s = np.empty((B, 0), dtype=np.float32)
        for start in range(0, K, self.block_rows):
            S = F @ self._W[start:start + self.block_rows].T  # [B, blk]
            kb = min(k, S.shape[1])
            part = np.argpartition(-S, kb - 1, axis=1)[:, :kb] if kb < S.shape[1] else \
                np.broadcast_to(np.arange(S.shape[1]), S.shape)
            cand_s = np.concatenate([best_s, np.take_along_axis(S, part, axis=1)], axis=1)
            cand_i = np.concatenate([best_i, part + start], axis=1)
            if cand_s.shape[1] > k:
                keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
                cand_s = np.take_along_axis(cand_s, keep, axis=1)
                cand_i = np.take_along_axis(cand_i, keep, axis=1)
            best_s, best_i = cand_s, cand_i
        ids, scores = _sort_desc(best_i + self.class_offset, best_s)
        return self._pad(ids, scores, n)


def _annoy_build_worker(w_path: str, out_path: str, dim: int, metric: str, ntrees: int, seed: int,
                        n_jobs: int, nice: int) -> None:
    """Subprocess body of HashingForest.build: rows from an .npy file -> Annoy index file."""
    import annoy

    if nice and hasattr(os, "nice"):
        os.nice(nice)

    W = np.load(w_path, mmap_mode="r")
    index = annoy.AnnoyIndex(dim, metric)
    index.set_seed(seed)
    for i in range(W.shape[0]):
        index.add_item(i, W[i])
    index.build(ntrees, n_jobs=n_jobs)
    index.save(out_path)


class HashingForest(ClassIndex):
    """The paper's hashing forest: an Annoy forest of random-projection trees over the rows of W.

    Annoy's "angular" distance is sqrt(2 - 2 cos), converted back to the cosine here; its "dot"
    distance is the inner product itself. search_k = -1 means Annoy's default (n * ntrees).

    Annoy has no bulk add: one Python call per row (~31 s at 1M x 512), holding the GIL, which in a
    background thread stalls the trainer's thread at every GIL hand-off. With subprocess=True
    (default) the build runs in a spawned process: the rows go to a temp .npy, the child adds and
    builds and saves, and the parent memory-maps the saved index (Annoy's load is an mmap).
    subprocess=None (default) picks the subprocess only from ``SUBPROCESS_MIN_ROWS`` rows on: below
    that the add loop takes milliseconds and starting a Python process would cost far more.
    """

    name = "forest"
    SUBPROCESS_MIN_ROWS = 50_000

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0,
                 ntrees: int = 50, search_k: int = -1, subprocess: Optional[bool] = None) -> None:
        super().__init__(dim, metric, class_offset=class_offset, seed=seed)
        if ntrees < 1:
            raise ValueError(f"ntrees must be >= 1, got {ntrees}")
        if search_k < -1 or search_k == 0:
            raise ValueError(f"search_k must be -1 (Annoy default) or >= 1, got {search_k}")
        self.ntrees = int(ntrees)
        self.search_k = int(search_k)
        self.subprocess = subprocess
        self._annoy: Any = None

    def build(self, W: np.ndarray) -> None:
        import annoy

        W = self._check_W(W)
        n_jobs = self.build_threads if self.build_threads else -1
        use_subprocess = self.subprocess if self.subprocess is not None else W.shape[0] >= self.SUBPROCESS_MIN_ROWS
        if use_subprocess:
            self._annoy = self._build_in_subprocess(W, n_jobs)
        else:
            index = annoy.AnnoyIndex(self.dim, self.metric)
            index.set_seed(self.seed)
            for i in range(W.shape[0]):  # passing the numpy row beats .tolist() in annoy 1.17
                index.add_item(i, W[i])
            index.build(self.ntrees, n_jobs=n_jobs)  # releases the GIL
            self._annoy = index
        self.num_classes = W.shape[0]

    def _build_in_subprocess(self, W: np.ndarray, n_jobs: int) -> Any:
        import multiprocessing
        import shutil
        import tempfile

        import annoy

        tmp = tempfile.mkdtemp(prefix="hf_forest_")
        try:
            w_path, out_path = os.path.join(tmp, "W.npy"), os.path.join(tmp, "forest.ann")
            np.save(w_path, W)
            # spawn, not fork: the parent has threads (trainer, ZeroMQ, OpenMP) that fork would copy
            # mid-lock.
            proc = multiprocessing.get_context("spawn").Process(
                target=_annoy_build_worker, name="hf-forest-build",
                args=(w_path, out_path, self.dim, self.metric, self.ntrees, self.seed, n_jobs,
                      self.build_nice))
            proc.start()
            proc.join()  # releases the GIL
            if proc.exitcode != 0:
                raise RuntimeError(f"forest build subprocess failed with exit code {proc.exitcode}")
            index = annoy.AnnoyIndex(self.dim, self.metric)
            index.load(out_path)  # mmap; the mapping outlives the file's unlink below
            return index
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        F = self._check_query(F, n)
        B = F.shape[0]
        ids = np.full((B, n), -1, dtype=np.int64)
        scores = np.full((B, n), -np.inf, dtype=np.float32)
        for b in range(B):
            got, dist = self._annoy.get_nns_by_vector(F[b], n, self.search_k, True)
            m = len(got)
            if m == 0:
                continue
            ids[b, :m] = got
            d = np.asarray(dist, dtype=np.float32)
            scores[b, :m] = 1.0 - 0.5 * d * d if self.metric == "angular" else d
        ids = np.where(ids >= 0, ids + self.class_offset, -1)
        return _sort_desc(ids, scores)


class HNSWIndex(ClassIndex):
    """HNSW graph index (hnswlib). Space "cosine" for angular, "ip" for dot; both return
    1 - similarity as distance, converted back to the similarity here."""

    name = "hnsw"

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0,
                 M: int = 16, ef_construction: int = 100, ef_search: int = 128) -> None:
        super().__init__(dim, metric, class_offset=class_offset, seed=seed)
        for key, val in (("M", M), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            if val < 1:
                raise ValueError(f"{key} must be >= 1, got {val}")
        self.M = int(M)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self._hnsw: Any = None
        self._lock = threading.Lock()  # set_ef + knn_query must pair up

    def build(self, W: np.ndarray) -> None:
        import hnswlib

        W = self._check_W(W)
        index = hnswlib.Index(space="cosine" if self.metric == "angular" else "ip", dim=self.dim)
        index.init_index(max_elements=W.shape[0], ef_construction=self.ef_construction, M=self.M,
                         random_seed=self.seed)
        index.add_items(W, np.arange(W.shape[0]), num_threads=self.build_threads or -1)
        self._hnsw = index
        self.num_classes = W.shape[0]

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        F = self._check_query(F, n)
        k = min(n, self.num_classes)
        with self._lock:
            self._hnsw.set_ef(max(self.ef_search, k))
            labels, dist = self._hnsw.knn_query(F, k=k)
        ids = labels.astype(np.int64) + self.class_offset
        ids, scores = _sort_desc(ids, (1.0 - dist).astype(np.float32))
        return self._pad(ids, scores, n)


class IVFIndex(ClassIndex):
    """Incremental inverted-file index (IVF): k-means centroids over W, each row in the list of its
    nearest centroid (faiss IndexIVFFlat with an array direct map).

    `update(ids, rows)` re-assigns just the changed rows (faiss update_vectors: O(1) removal from
    the old list, append to the new one), so the rows themselves are never stale; only the
    centroids age, and a rebuild (re-clustering) is needed rarely.

    Assignment is by L2 to the centroids (k-means' own criterion, which keeps the residual
    w - c small); probing ranks centroids by q . c, so for a member w of list c,
    q . w = q . c + q . (w - c) ~ q . c. For angular, rows and queries are normalized and the
    centroids are spherical, where L2 and inner-product rankings coincide. Members of the probed
    lists are scored exactly.

    Args (besides the base ones):
        nlist: number of lists (None: round(sqrt(K)), at most K // 8, at least 1).
        nprobe: lists probed per query (None: max(8, nlist // 32); like Annoy's search_k, the scan
            budget per query, ~nprobe * K / nlist rows, should stay roughly fixed as K grows).
        niter: k-means iterations.
        train_points_per_centroid: k-means runs on a sample of this many rows per centroid.
        query_threads: faiss threads for the per-step calls (query, update); None = faiss default.
            1 by default: measured on a loaded 2-core machine, a 1000-row update takes 0.6 ms on one
            OpenMP thread and ~24 ms on two (threads spin at barriers when cores are oversubscribed).
    """

    name = "ivf"
    incremental = True

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0,
                 nlist: Optional[int] = None, nprobe: Optional[int] = None, niter: int = 10,
                 train_points_per_centroid: int = 64, query_threads: Optional[int] = 1) -> None:
        super().__init__(dim, metric, class_offset=class_offset, seed=seed)
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if niter < 1:
            raise ValueError(f"niter must be >= 1, got {niter}")
        if train_points_per_centroid < 1:
            raise ValueError(f"train_points_per_centroid must be >= 1, got {train_points_per_centroid}")
        self.nlist_opt = nlist
        self.nprobe_opt = nprobe
        self.niter = int(niter)
        self.train_points_per_centroid = int(train_points_per_centroid)
        if query_threads is not None and query_threads < 1:
            raise ValueError(f"query_threads must be >= 1 or None, got {query_threads}")
        self.query_threads = query_threads
        self.nlist = 0
        self.nprobe = 0
        self._ivf: Any = None
        self._centroids: Optional[np.ndarray] = None  # [nlist, d], for probing by q . c
        self._lock = threading.Lock()  # update_vectors reshapes the lists under a concurrent search

    def _prep(self, X: np.ndarray) -> np.ndarray:
        return _normalize_rows(X) if self.metric == "angular" else np.ascontiguousarray(X, dtype=np.float32)

    def build(self, W: np.ndarray) -> None:
        import faiss

        W = self._check_W(W)
        K = W.shape[0]
        X = self._prep(W)
        nlist = self.nlist_opt or max(1, min(int(round(math.sqrt(K))), K // 8))
        nlist = min(nlist, K)
        nprobe = min(self.nprobe_opt or max(8, nlist // 32), nlist)
        with _faiss_threads(self.build_threads):
            rng = np.random.default_rng(self.seed)
            n_train = min(K, nlist * self.train_points_per_centroid)
            sample = X if n_train == K else X[np.sort(rng.choice(K, n_train, replace=False))]
            km = faiss.Kmeans(self.dim, nlist, niter=self.niter, seed=self.seed,
                              spherical=self.metric == "angular",
                              max_points_per_centroid=self.train_points_per_centroid, verbose=False)
            km.train(sample)
            centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
            quantizer = faiss.IndexFlatL2(self.dim)
            quantizer.add(centroids)
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.is_trained = True
            ivf.set_direct_map_type(faiss.DirectMap.Array)  # ids 0..K-1 -> (list, offset)
            ivf.add(X)
            ivf.nprobe = nprobe
        self._keep_quantizer = quantizer  # the IVF does not own it from Python's side
        with self._lock:
            self._ivf, self._centroids = ivf, centroids
            self.nlist, self.nprobe, self.num_classes = nlist, nprobe, K

    def update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Re-assign the changed rows (global ids [m], rows [m, d]) to their nearest centroid."""
        if self._ivf is None:
            raise RuntimeError("IVFIndex.update called before build()")
        local, rows = self._check_update(ids, rows)
        if local.size == 0:
            return
        # faiss requires unique ids in one update: keep the last occurrence of each.
        rev_u, rev_first = np.unique(local[::-1], return_index=True)
        if rev_u.size != local.size:
            keep = local.size - 1 - rev_first
            local, rows = local[keep], rows[keep]
        X = self._prep(rows)
        with self._lock, _faiss_threads(self.query_threads):
            self._ivf.update_vectors(np.ascontiguousarray(local), X)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The rows [m, d] the index holds for global ids (normalized for "angular")."""
        local = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1) - self.class_offset)
        with self._lock:
            return self._ivf.reconstruct_batch(local)

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        F = self._check_query(F, n)
        Q = _normalize_rows(F) if self.metric == "angular" else F
        assert self._centroids is not None
        k = min(n, self.num_classes)
        # Probe the nprobe centroids with the highest q . c (see the class docstring).
        C = Q @ self._centroids.T  # [B, nlist]
        p = self.nprobe
        probe = np.argpartition(-C, p - 1, axis=1)[:, :p] if p < C.shape[1] else \
            np.broadcast_to(np.arange(C.shape[1]), C.shape)
        probe_s = np.take_along_axis(C, probe, axis=1)
        with self._lock, _faiss_threads(self.query_threads):
            D, I = self._ivf.search_preassigned(Q, k, np.ascontiguousarray(probe, dtype=np.int64),
                                                np.ascontiguousarray(probe_s, dtype=np.float32))
        ids = np.where(I >= 0, I + self.class_offset, -1).astype(np.int64)
        ids, scores = _sort_desc(ids, D.astype(np.float32))
        return self._pad(ids, scores, n)


def _neighbour_graph(X: np.ndarray, nlist: int, probe: int, degree: int, niter: int, tppc: int, seed: int,
                     threads: Optional[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GraphIndex's build over unit rows X [K, d]: (graph int32 [K, degree], unit centroids
    [nlist, d], list representatives int64 [nlist]). See the GraphIndex docstring."""
    import faiss

    K = X.shape[0]
    with _faiss_threads(threads):
        rng = np.random.default_rng(seed)
        n_train = min(K, nlist * tppc)
        sample = X if n_train == K else X[np.sort(rng.choice(K, n_train, replace=False))]
        km = faiss.Kmeans(X.shape[1], nlist, niter=niter, seed=seed, spherical=True,
                          max_points_per_centroid=tppc, verbose=False)
        km.train(sample)
        C = _normalize_rows(np.ascontiguousarray(km.centroids, dtype=np.float32))
        flat = faiss.IndexFlatIP(X.shape[1])
        flat.add(C)
        p = min(probe, nlist)
        sims, top = flat.search(X, p)                   # each row's p nearest lists, best first
    assign = top[:, 0]
    order = np.argsort(assign, kind="stable")          # rows grouped by their own list
    bounds = np.concatenate(([0], np.cumsum(np.bincount(assign, minlength=nlist))))
    # (row, slot) pairs grouped by probed list: list j is searched by every row that has it
    # among its p nearest lists, in one matmul of those rows against j's members.
    probed = top.reshape(-1)
    by_list = np.argsort(probed, kind="stable")
    qbounds = np.concatenate(([0], np.cumsum(np.bincount(probed, minlength=nlist))))
    deg = min(degree, K - 1)
    part_i = np.full((K, p, deg), -1, dtype=np.int32)  # per (row, probed list) top-deg
    part_s = np.full((K, p, deg), -np.inf, dtype=np.float32)
    reps = np.zeros(nlist, dtype=np.int64)
    block = 4096  # query rows per matmul: bounds the [block, members] score matrix
    # A list far larger than the average (degenerate rows: all-zero or identical rows all fall into
    # one list) would make the build K x K; its candidates are a seeded sample of `cap` members
    # (such rows are near-ties anyway), which bounds the build at ~4x its normal cost.
    cap = max(4 * -(-K // nlist), 4 * degree, 256)
    sub_rng = np.random.default_rng([seed, 11])
    for lst in range(nlist):
        mem = order[bounds[lst]:bounds[lst + 1]]
        if mem.size == 0:
            continue
        reps[lst] = mem[np.argmax(sims[mem, 0])]
        pairs = by_list[qbounds[lst]:qbounds[lst + 1]]
        rows_q, slot = pairs // p, pairs % p
        cm = mem if mem.size <= cap else np.sort(sub_rng.choice(mem, cap, replace=False))
        Xm = X[cm]
        for lo in range(0, rows_q.size, block):
            rq, sl = rows_q[lo:lo + block], slot[lo:lo + block]
            S = X[rq] @ Xm.T                                  # [q, candidate members]
            own = np.flatnonzero(assign[rq] == lst)
            if own.size:                                      # not its own neighbour
                r, c = np.nonzero(rq[own][:, None] == cm[None, :])
                S[own[r], c] = -np.inf
            k = min(deg, cm.size)
            t = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < cm.size else \
                np.broadcast_to(np.arange(cm.size), S.shape)
            part_i[rq, sl, :k] = cm[t]
            part_s[rq, sl, :k] = np.take_along_axis(S, t, axis=1)
    part_i, part_s = part_i.reshape(K, -1), part_s.reshape(K, -1)
    best = np.argpartition(-part_s, deg - 1, axis=1)[:, :deg] if deg < part_s.shape[1] else \
        np.broadcast_to(np.arange(part_s.shape[1]), part_s.shape)
    bs = np.take_along_axis(part_s, best, axis=1)
    best = np.take_along_axis(best, np.argsort(-bs, axis=1, kind="stable"), axis=1)
    graph = np.full((K, degree), -1, dtype=np.int32)
    graph[:, :deg] = np.take_along_axis(part_i, best, axis=1)
    graph[:, :deg][~np.isfinite(np.take_along_axis(part_s, best, axis=1))] = -1
    return graph, C, reps


_BUILD_DIRS: set = set()  # temp dirs of graph builds in flight (a build thread is a daemon)


@atexit.register
def _remove_build_dirs() -> None:
    for path in list(_BUILD_DIRS):
        shutil.rmtree(path, ignore_errors=True)


def _graph_build_worker(x_path: str, out_path: str, nlist: int, probe: int, degree: int, niter: int, tppc: int,
                        seed: int, threads: Optional[int], nice: int) -> None:
    """Subprocess body of GraphIndex.build: unit rows from an .npy file -> graph arrays in an .npz."""
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    graph, C, reps = _neighbour_graph(np.load(x_path, mmap_mode="r"), nlist, probe, degree, niter, tppc, seed, threads)
    np.savez(out_path, graph=graph, C=C, reps=reps)


class GraphIndex(ClassIndex):
    """Class-neighbour graph: each class's `degree` nearest classes (cosine of their rows), built in
    the background; a query scores the neighbours of each sample's LABEL against the feature.

    Why: at B = 256 a per-feature probe of an IVF or a forest touches most of W every step (256
    queries x nprobe lists), which costs 5-9x the M-row softmax step itself. The hard negatives of a
    sample are the classes its feature scores highest, and once training is under way the feature
    lies near its label's row, so they are the label's nearest classes (the "doppelganger" lists of
    face recognition). The graph holds those lists; a step gathers B x (degree + 1) rows and scores
    them with the features -- per-step cost independent of K. The scores are exact and fresh (the
    index keeps a copy of the rows, updated every step like IVF); only the neighbour SETS age, and
    they are recomputed at each rebuild.

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
    trained almost all are warm. Measured (benchmarks/bench_accuracy.py, K = 100K, 600 steps): the
    cold path lifts top-1 from 22 % (label lists only) to 33 % (IVF alone: 35 %); 28 % of the
    samples were still cold at the end. `queries` / `cold_queries` count samples since the build.
    With S shards each shard proposes only its own classes; a label's neighbours in other shards
    come from the cold path.

    Build: spherical k-means (faiss) on a sample; every row is assigned to its nearest centroid and
    searches its `probe` nearest lists (an IVF kNN search of W against itself). The work is grouped
    by list -- one BLAS matmul of all rows probing list j against j's members -- so it runs at
    matmul speed, not at a per-query scan's. Cost ~ K * probe * (K / nlist) * d multiply-adds
    (4 s at 100K x 512, 93 s at 1M on one core). From `SUBPROCESS_MIN_ROWS` rows (or
    `subprocess=True`) it runs in a spawned process (its per-list loop holds the GIL between numpy
    calls, which stalled the trainer's thread: background rebuild cost 6.6 % -> 2.4 % at 100K),
    while the calling thread builds the cold-path IVF.

    Args (besides the base ones):
        degree: neighbours kept per class (graph out-degree).
        nlist: k-means lists (None: round(sqrt(K)), at most K // 8, at least 1).
        probe: lists searched for each list's neighbours (itself included).
        hops: greedy steps of the walk (only with cold_nprobe = 0).
        cold_cos: a label row whose cosine with the feature is below this makes the sample cold
            (-1: never).
        cold_nprobe: lists the cold-path IVF probes per feature (0: no IVF, walk instead).
        cold_drift: rows whose direction moved by more than this (1 - cosine) are re-assigned.
        niter, train_points_per_centroid: k-means iterations and sample size per centroid.
        subprocess: build the graph in a spawned process (None: from SUBPROCESS_MIN_ROWS rows).
    """

    name = "graph"
    incremental = True
    SUBPROCESS_MIN_ROWS = 50_000

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0,
                 degree: int = 32, nlist: Optional[int] = None, probe: int = 3, hops: int = 3,
                 cold_cos: float = 0.3, cold_nprobe: int = 8, cold_drift: float = 0.01, niter: int = 10,
                 train_points_per_centroid: int = 64, subprocess: Optional[bool] = None) -> None:
        super().__init__(dim, metric, class_offset=class_offset, seed=seed)
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
        self.queries = self.cold_queries = 0         # samples answered, and of those by the cold path
        self.niter, self.train_points_per_centroid = int(niter), int(train_points_per_centroid)
        self.nlist = 0
        self._rows: Optional[np.ndarray] = None       # [K, d] what queries score (unit rows for angular)
        self._graph: Optional[np.ndarray] = None      # [K, degree] int32 local ids, -1 = none
        self._centroids: Optional[np.ndarray] = None  # [nlist, d] unit
        self._reps: Optional[np.ndarray] = None       # [nlist] member nearest each centroid
        self._lock = threading.Lock()

    def build(self, W: np.ndarray) -> None:
        W = self._check_W(W)
        K = W.shape[0]
        X = _normalize_rows(W)  # neighbours are by cosine for both metrics
        rows = X if self.metric == "angular" else W.copy()
        nlist = min(self.nlist_opt or max(1, min(int(round(math.sqrt(K))), K // 8)), K)
        args = (nlist, self.probe, self.degree, self.niter, self.train_points_per_centroid, self.seed,
                self.build_threads)
        use_subprocess = self.subprocess if self.subprocess is not None else K >= self.SUBPROCESS_MIN_ROWS
        proc = tmp = None
        if use_subprocess:
            # The per-list loop holds the GIL between its numpy calls; in a background thread that
            # stalls the trainer at every hand-off (measured: rebuild cost 3 % -> 6.6 % at 100K), so
            # large graphs are built in a spawned process while this thread builds the IVF.
            import multiprocessing
            import tempfile

            tmp = tempfile.mkdtemp(prefix="hf_graph_")
            _BUILD_DIRS.add(tmp)  # removed at exit if the process ends mid-build
            np.save(os.path.join(tmp, "X.npy"), X)
            # daemon: a build still running when the trainer or server exits is terminated, not awaited
            proc = multiprocessing.get_context("spawn").Process(
                target=_graph_build_worker, name="hf-graph-build", daemon=True,
                args=(os.path.join(tmp, "X.npy"), os.path.join(tmp, "graph.npz"), *args, self.build_nice))
            proc.start()
        try:
            ivf = None
            if self.cold_nprobe:
                ivf = IVFIndex(self.dim, self.metric, class_offset=self.class_offset, seed=self.seed, nlist=nlist,
                               nprobe=self.cold_nprobe, niter=self.niter,
                               train_points_per_centroid=self.train_points_per_centroid)
                ivf.build_threads = self.build_threads
                ivf.build(W)
            if proc is not None:
                proc.join()  # releases the GIL
                if proc.exitcode != 0:
                    raise RuntimeError(f"graph build subprocess failed with exit code {proc.exitcode}")
                with np.load(os.path.join(tmp, "graph.npz")) as z:
                    graph, C, reps = z["graph"], z["C"], z["reps"]
            else:
                graph, C, reps = _neighbour_graph(X, *args)
        finally:
            if proc is not None and proc.is_alive():
                proc.kill()
                proc.join()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                _BUILD_DIRS.discard(tmp)
        with self._lock:
            self._rows, self._graph, self._centroids, self._reps = rows, graph, C, reps
            self._ivf = ivf
            self.nlist, self.num_classes = nlist, K

    def update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Overwrite the changed rows (global ids [m], rows [m, d]); the neighbour sets wait for a rebuild."""
        if self._rows is None:
            raise RuntimeError("GraphIndex.update called before build()")
        local, rows = self._check_update(ids, rows)
        with self._lock:
            self._rows[local] = _normalize_rows(rows) if self.metric == "angular" else rows
            ivf = self._ivf
        if ivf is not None and local.size:
            # Re-assign in the IVF only the rows that moved (cosine to the held row below
            # 1 - cold_drift): a label's row after its step, not the many slightly pushed negatives.
            # Its scores are never used (cold candidates are re-scored on the fresh rows), so the
            # IVF only has to keep each row in about the right list.
            gids = local + self.class_offset
            held, new = _normalize_rows(ivf.reconstruct(gids)), _normalize_rows(rows)
            moved = np.einsum("md,md->m", held, new) < 1.0 - self.cold_drift
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
                    r = rows[entry[mine]]
                    cos = np.einsum("bd,bd->b", r, F[mine]) / np.maximum(
                        np.linalg.norm(r, axis=1) * np.linalg.norm(F[mine], axis=1), _EPS)
                    entry[mine[cos < self.cold_cos]] = -1
            lost = np.flatnonzero(entry < 0)
            ivf = self._ivf
            if lost.size and ivf is None:  # enter at the cluster nearest the feature and walk
                # greedily to the best-scoring row (a few hops of B x degree scores each)
                entry[lost] = reps[np.argmax(_normalize_rows(F[lost]) @ C.T, axis=1)]
                for _ in range(self.hops):
                    c, s = self._score(rows, graph, entry[lost], Q[lost])
                    entry[lost] = c[np.arange(lost.size), np.argmax(s, axis=1)]
            self.queries += B
            self.cold_queries += int(lost.size)
            if ivf is None:
                lost = lost[:0]
            warm = np.flatnonzero(entry >= 0)
            cand, S = self._score(rows, graph, entry[warm], Q[warm])   # [b, 1 + degree] fresh scores
            if lost.size:  # the IVF proposes, the fresh rows score
                assert ivf is not None
                ci, _ = ivf.query(F[lost], n)
                ci = ci - self.class_offset
                ok = ci >= 0
                cs = np.matmul(rows[np.where(ok, ci, 0)], Q[lost][:, :, None])[:, :, 0]
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
    def _score(rows: np.ndarray, graph: np.ndarray, entry: np.ndarray, Q: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Candidates {e} + graph[e] per query and their scores q . row (-inf where none)."""
        cand = np.concatenate([entry[:, None], graph[entry]], axis=1).astype(np.int64)
        ok = cand >= 0
        S = np.matmul(rows[np.where(ok, cand, 0)], Q[:, :, None])[:, :, 0]
        S[~ok] = -np.inf
        return cand, S


class RandomIndex(ClassIndex):
    """Random class ids (uniform, with replacement; select_active removes duplicates), score 0.

    With `select_active` this gives the Partial-FC style baseline: the batch's labels plus random
    classes, at the same M as the smart selection.
    """

    name = "random"

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0) -> None:
        super().__init__(dim, metric, class_offset=class_offset, seed=seed)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # numpy Generators are not thread-safe

    def build(self, W: np.ndarray) -> None:
        self.num_classes = self._check_W(W).shape[0]

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        F = self._check_query(F, n)
        with self._lock:
            ids = self._rng.integers(0, self.num_classes, size=(F.shape[0], n), dtype=np.int64)
        return ids + self.class_offset, np.zeros((F.shape[0], n), dtype=np.float32)


_INDEXES: Dict[str, type] = {c.name: c for c in (ExactIndex, HashingForest, HNSWIndex, IVFIndex, GraphIndex,
                                                  RandomIndex)}
_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "exact": ("block_rows",),
    "forest": ("ntrees", "search_k", "subprocess"),
    "hnsw": ("M", "ef_construction", "ef_search"),
    "ivf": ("nlist", "nprobe", "niter", "train_points_per_centroid", "query_threads"),
    "graph": ("degree", "nlist", "probe", "hops", "cold_cos", "cold_nprobe", "cold_drift", "niter",
              "train_points_per_centroid", "subprocess"),
    "random": (),
}


# Measured by benchmarks/bench_index.py at K = 100K, d = 512 (clustered rows, angular, B = 256,
# n = 50, M = 1000; a heavily loaded 2-core machine): IVF built 6.7x faster than the 50-tree forest
# (7.6 s vs 51 s), queried 2x faster (257 vs 506 ms), with higher recall@50 (0.37 vs 0.30) and
# equal or better negative-class CPK (0.270 vs 0.266; exact 0.300, random 0.012), and it stays
# fresh through per-step updates (1000 rows in ~1-14 ms) where the forest is a full rebuild
# behind. But IVF's per-feature scan still costs 5-9x the M-row step at 100K-1M (benchmarks/
# bench_head.py). The graph index (label neighbours for warm samples, the IVF only for samples whose
# label row is still cold) is 1.3x the random-rows floor at 100K and 1M with CPK as high as IVF's,
# and in benchmarks/bench_accuracy.py (K = 100K, 600 steps) within 2 points of IVF in top-1 and
# above it in verification (see the README). So the graph is the default from this size up; the
# forest stays the paper's index below it.
LARGE_K = 100_000


def default_index_name(num_classes: int) -> str:
    """The index to use for K classes by default: "graph" for K >= LARGE_K, else "forest"."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return "graph" if num_classes >= LARGE_K else "forest"


def make_index(name: str, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0,
               build_threads: Optional[int] = None, **options: Any) -> ClassIndex:
    """Construct an index by name: "exact", "forest" (Annoy; ntrees=50, search_k=-1), "hnsw"
    (M, ef_construction, ef_search), "ivf" (nlist, nprobe, niter, train_points_per_centroid),
    "random". Unknown names or options raise ValueError naming them."""
    if name not in _INDEXES:
        raise ValueError(f"unknown index name {name!r}; choose one of {sorted(_INDEXES)}")
    bad = sorted(set(options) - set(_OPTIONS[name]))
    if bad:
        raise ValueError(f"unknown option(s) {bad} for index {name!r}; allowed: {list(_OPTIONS[name])}")
    index: ClassIndex = _INDEXES[name](dim, metric, class_offset=class_offset, seed=seed, **options)
    if build_threads is not None:
        if build_threads < 1:
            raise ValueError(f"build_threads must be >= 1, got {build_threads}")
        index.build_threads = int(build_threads)
    return index


# ----------------------------------------------------------------------------------------------
# background rebuilds
# ----------------------------------------------------------------------------------------------
class IndexManager:
    """Owns the live index of one store shard; rebuilds in the background and swaps atomically.

    Scheduling (the paper rebuilds every T steps; at K = 1M an Annoy build takes ~96 s against
    ~22 ms per step, so T can only be a minimum): a build starts when at least `rebuild_every` steps
    (and `min_interval_s` seconds) have passed since the last build STARTED and no build is
    running -- builds never queue. Queries always use the current index and never wait for a build.

    The background build reads the live W without a full snapshot (a 2 GB copy at 1M x 512 would
    itself stall a step): rows pushed during the build may be read at either version, which an
    approximate index tolerates. For an incremental index (IVF), the rows changed during the build
    are recorded and replayed onto the new index before it goes live, so no update is lost.

    The build runs in a thread: Annoy's build, hnswlib's add_items and faiss all release the GIL
    (Annoy's per-row add_item loop does not, but each call is short). It uses `background_threads`
    threads and a raised nice value (Linux; per thread, and for a build subprocess), so that on a
    busy machine the build takes only CPU the trainer leaves idle. A niced thread that holds the
    GIL for long (Annoy's per-row add_item loop) would starve the trainer instead -- a priority
    inversion measured at a ~50% step-rate cost -- so HashingForest builds in a subprocess.

    Args:
        factory: returns a fresh, unbuilt ClassIndex (metric, offset, options already bound).
        rebuild_every: minimum steps between build starts (T); >= 1.
        background: build in a thread (True) or synchronously inside maybe_rebuild (False).
        min_interval_s: minimum seconds between build starts.
        background_threads: library threads for background builds (None = library default).
        background_nice: nice increment of the build thread (Linux; 0 disables).
        max_duty: at most this fraction of wall time is spent building: after a build of b seconds
            the next one starts no sooner than b / max_duty seconds after it started (1 = back to
            back). On a machine whose cores the trainer needs, the step-rate cost is roughly
            max_duty times the cost of continuous rebuilds.
        deterministic: make the index a function of the step, not of timing, so a seed reproduces
            a run: builds start at multiples of T only, read a copy of W taken at that step (under
            the store's lock: consistent), and go live at the next multiple of T (the store then
            waits for a late build, logged as ``wait_s``); rows changed meanwhile are replayed onto
            an incremental index before it goes live. None (default): on when the copy of W is at
            most ``copy_limit_bytes`` (1 GiB: up to 500K x 512 fp32), else off with a log line (a
            2 GB+ copy per build and waits on a minutes-long build cost more than reproducibility
            is worth there). ``min_interval_s`` and ``max_duty`` apply only when off.
    """

    def __init__(self, factory: Callable[[], ClassIndex], rebuild_every: int, background: bool = True,
                 min_interval_s: float = 0.0, *, background_threads: Optional[int] = 1,
                 background_nice: int = 10, max_duty: float = 1.0, deterministic: Optional[bool] = None,
                 copy_limit_bytes: int = 1 << 30) -> None:
        if not callable(factory):
            raise ValueError(f"factory must be callable, got {factory!r}")
        if rebuild_every < 1:
            raise ValueError(f"rebuild_every must be >= 1, got {rebuild_every}")
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        if not 0.0 < max_duty <= 1.0:
            raise ValueError(f"max_duty must be in (0, 1], got {max_duty}")
        self.max_duty = float(max_duty)
        self.factory = factory
        self.rebuild_every = int(rebuild_every)
        self.background = bool(background)
        self.min_interval_s = float(min_interval_s)
        self.background_threads = background_threads
        self.background_nice = int(background_nice)

        self._lock = threading.Lock()      # guards the fields below; never held during a build
        self._index: Optional[ClassIndex] = None
        self._source_step = 0              # step of the W the live index reflects
        self._built_step = 0               # step at which the live index's build started
        self._step = 0                     # latest step seen
        self._thread: Optional[threading.Thread] = None
        self._building = False
        self._pending: Optional[List[Tuple[np.ndarray, np.ndarray, int]]] = None  # updates during an incremental build
        self._last_start_step: Optional[int] = None
        self._last_start_time = -math.inf
        self._build_times: List[float] = []
        self._start_steps: List[int] = []  # start step of every completed build
        self._start_times: List[float] = []
        self._error: Optional[BaseException] = None
        self._closed = False
        self._name = "?"
        self.deterministic = deterministic
        self.copy_limit_bytes = int(copy_limit_bytes)
        self._gen = 0                      # build generation: a restore retires a running build
        self._ready: Optional[ClassIndex] = None   # deterministic: built, waiting for its live step
        self._ready_step = 0               # its build (source) step
        self._live_at: Optional[int] = None  # deterministic: step at which the running build goes live
        self._waits: List[float] = []      # deterministic: seconds the store waited for late builds

    # -- building ---------------------------------------------------------------------------
    def _is_deterministic(self, W: np.ndarray) -> bool:
        if self.deterministic is None:
            self.deterministic = W.nbytes <= self.copy_limit_bytes
            if not self.deterministic:
                logger.info("index builds read the live W (%.1f GB > the %.1f GB copy limit): background builds go "
                            "live when done, so runs are not bitwise reproducible", W.nbytes / 1e9,
                            self.copy_limit_bytes / 1e9)
        return bool(self.deterministic)

    def build_now(self, W: np.ndarray, step: Optional[int] = None) -> None:
        """Synchronous build from W (first build, restore, tests); the result goes live at once.
        A background build still running is retired: its result is discarded."""
        step = self._step if step is None else int(step)
        with self._lock:
            self._gen += 1
            self._building = False
            self._ready, self._live_at = None, None
            self._step = step
        index = self.factory()
        self._run_build(index, W, step, background=False)

    def _go_live(self, step: int) -> None:
        """Deterministic mode, at the build's live step: wait for it, replay, swap (store lock held)."""
        t0 = time.perf_counter()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join()
        waited = time.perf_counter() - t0
        if self._error is not None:
            return                          # raised by maybe_rebuild; the old index stays live
        with self._lock:
            index, batch = self._ready, self._pending or []
            self._ready, self._live_at, self._pending = None, None, None
        if index is None:
            return
        for ids, rows, _ in batch:          # rows changed since the build's last replay
            index.update(ids, rows)
        with self._lock:
            self._index = index
            self._source_step = step if index.incremental else self._ready_step
            self._built_step = self._ready_step
            self._name = index.name
        self._waits.append(waited)
        if waited > 0.01:
            logger.info("index %s went live at step %d after waiting %.2fs for its build (deterministic swap)",
                        index.name, step, waited)

    def maybe_rebuild(self, store: Any, step: int) -> bool:
        """Called by the store after each applied update. Returns True if a build was started."""
        if self._error is not None:
            err, self._error = self._error, None
            with self._lock:
                self._ready, self._live_at, self._pending = None, None, None
            raise RuntimeError(f"background index build failed: {err!r}") from err
        step = int(step)
        if self._live_at is not None and step >= self._live_at:
            self._go_live(step)
        with self._lock:
            self._step = max(self._step, step)
            if self._closed or self._building or self._live_at is not None:
                return False
            first = self._index is None
            W_live = store.weights() if hasattr(store, "weights") else store.rows_view()
            det = self.background and not first and self._is_deterministic(W_live)
            if det and step % self.rebuild_every:
                return False                # deterministic builds start at multiples of T only
            if not first and not det:
                if self._last_start_step is not None and step - self._last_start_step < self.rebuild_every:
                    return False
                wait_s = self.min_interval_s
                if self._build_times and self.max_duty < 1.0:
                    wait_s = max(wait_s, self._build_times[-1] / self.max_duty)
                if time.monotonic() - self._last_start_time < wait_s:
                    return False
            index = self.factory()
            self._building = True
            self._pending = [] if index.incremental and not first else None
            self._last_start_step, self._last_start_time = step, time.monotonic()
            if det:
                self._live_at = step + self.rebuild_every
        # The live [K_shard, d] rows: `weights()` per the agreed interface; WeightStore names it
        # `rows_view()` (a read-only view), so accept either. Deterministic: a copy taken now, while
        # the store's lock holds every update back.
        W = np.array(W_live, copy=True) if det else W_live
        if first or not self.background:
            # No index yet: nothing could answer a query, so the first build is synchronous.
            self._run_build(index, W, step, background=False, claimed=True)
        else:
            if self.background_threads is not None:
                index.build_threads = self.background_threads
            index.build_nice = self.background_nice
            self._thread = threading.Thread(target=self._run_build, args=(index, W, step, True, True, det),
                                            name=f"index-build-{index.name}", daemon=True)
            self._thread.start()
        return True

    def _run_build(self, index: ClassIndex, W: np.ndarray, step: int, background: bool,
                   claimed: bool = False, deferred: bool = False) -> None:
        """Build `index` from W, replay pending incremental updates, swap it in atomically
        (``deferred``: leave it ready for :meth:`_go_live` at its live step instead)."""
        gen = self._gen
        if not claimed:
            with self._lock:
                if self._building:
                    raise RuntimeError("a build is already running; builds never queue")
                self._building = True
                self._pending = None
                self._last_start_step, self._last_start_time = step, time.monotonic()
        t0 = time.perf_counter()
        try:
            if background and self.background_nice and hasattr(os, "setpriority"):
                with contextlib.suppress(OSError):  # per-thread on Linux: only this thread yields
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.background_nice)
            index.build(W)
            source_step = step
            while True:  # replay rows changed during the build, then swap with nothing pending
                with self._lock:
                    if gen != self._gen:       # retired by a restore: discard
                        logger.info("index %s build of step %d retired (the store was restored)", index.name, step)
                        return
                    batch = self._pending or []
                    if not batch and deferred:
                        self._ready, self._ready_step = index, step
                        self._build_times.append(time.perf_counter() - t0)
                        self._start_steps.append(step)
                        self._start_times.append(self._last_start_time)
                        self._pending = [] if index.incremental else None
                        break
                    if not batch:
                        self._index = index
                        self._pending = None
                        self._source_step = max(source_step, step)
                        self._built_step = step
                        self._build_times.append(time.perf_counter() - t0)
                        self._start_steps.append(step)
                        self._start_times.append(self._last_start_time)
                        self._name = index.name
                        break
                    self._pending = []
                for ids, rows, s in batch:
                    index.update(ids, rows)
                    source_step = max(source_step, s)
            logger.info("index %s built: K=%d in %.2fs (started at step %d)", index.name,
                        index.num_classes, self._build_times[-1], step)
        except BaseException as err:  # surface it on the next maybe_rebuild, keep the old index
            logger.exception("index build failed")
            if not background:
                raise
            self._error = err
        finally:
            with self._lock:
                if gen == self._gen:
                    self._building = False
                    if self._ready is None:
                        self._pending = None

    # -- per step -----------------------------------------------------------------------------
    def rows_changed(self, ids: np.ndarray, rows: np.ndarray, step: int) -> None:
        """Forward changed rows to an incremental live index (and record them for a running
        incremental build); a no-op for the other indexes."""
        with self._lock:
            self._step = max(self._step, int(step))
            index = self._index
            if self._pending is not None:
                self._pending.append((np.array(ids, dtype=np.int64, copy=True), np.array(rows, copy=True), int(step)))
            if index is not None and index.incremental:
                index.update(ids, rows)
                self._source_step = max(self._source_step, int(step))

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Query the live index; never waits for a running build."""
        with self._lock:
            index = self._index
        if index is None:
            raise RuntimeError("no index yet: call build_now(W) or maybe_rebuild(store, step) first")
        return index.query(F, n) if labels is None else index.query(F, n, labels)

    @property
    def index(self) -> Optional[ClassIndex]:
        """The live index (None before the first build)."""
        return self._index

    def stats(self) -> Dict[str, Any]:
        """builds, last_build_s, mean_build_s, staleness_steps (steps since the live index's source
        W; for an incremental index the rows are current, so this counts steps since the last
        forwarded update), steps_since_build (age of the build itself, e.g. IVF centroids),
        achieved_period_steps / achieved_period_s (mean gap between build starts), building, name."""
        with self._lock:
            n = len(self._build_times)
            period = float(np.mean(np.diff(self._start_steps))) if n >= 2 else float("nan")
            period_s = float(np.mean(np.diff(self._start_times))) if n >= 2 else float("nan")
            return {
                "name": self._name,
                "builds": n,
                "last_build_s": self._build_times[-1] if n else float("nan"),
                "mean_build_s": float(np.mean(self._build_times)) if n else float("nan"),
                "staleness_steps": self._step - self._source_step if self._index is not None else -1,
                "steps_since_build": self._step - self._built_step if self._index is not None else -1,
                "achieved_period_steps": period,
                "achieved_period_s": period_s,
                "building": self._building,
                "deterministic": bool(self.deterministic),
                "swap_wait_s": float(np.sum(self._waits)) if self._waits else 0.0,
                "incremental": bool(self._index is not None and self._index.incremental),
            }

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop starting builds and join a running one (builds cannot be interrupted)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


# ----------------------------------------------------------------------------------------------
# active-class selection
# ----------------------------------------------------------------------------------------------
def select_active(cand_ids: np.ndarray, cand_scores: np.ndarray, labels: np.ndarray, num_active: int,
                  num_classes: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Choose exactly M = num_active unique active classes for one batch (HF-softmax step 2).

    Order: the batch's unique labels (first-appearance order), then candidate classes by
    descending best score over the batch (ids < 0 and duplicates ignored; the weakest are
    truncated when too many), then uniform random classes not yet chosen when candidates run short.

    Args:
        cand_ids: [B, n] (or any shape) int global class ids from an index query, -1 = none.
        cand_scores: scores of the same shape, higher = better.
        labels: [B] int global class ids of the batch.
        num_active: M.
        num_classes: K, total number of classes (ids lie in [0, K)).
        rng: source of the random fill.

    Returns:
        active int64 [M] and remapped labels int64 [B] with active[remapped] == labels.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    M, K = int(num_active), int(num_classes)
    if M > K:
        raise ValueError(f"num_active M={M} is larger than num_classes K={K}")
    if labels.size and (labels.min() < 0 or labels.max() >= K):
        raise ValueError(f"labels must lie in [0, num_classes={K}), got range [{labels.min()}, {labels.max()}]")
    cand_ids = np.asarray(cand_ids).reshape(-1).astype(np.int64, copy=False)
    cand_scores = np.asarray(cand_scores, dtype=np.float32).reshape(-1)
    if cand_ids.shape != cand_scores.shape:
        raise ValueError(f"cand_ids has {cand_ids.size} entries but cand_scores has {cand_scores.size}")

    # Unique labels in first-appearance order, and each label's rank in that order.
    uniq, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    lab_u = uniq[order]
    L = lab_u.size
    if M < L:
        raise ValueError(f"num_active M={M} is smaller than the batch's {L} unique labels")
    rank = np.empty(L, dtype=np.int64)
    rank[order] = np.arange(L)
    remapped = rank[inverse.reshape(-1)]

    # Candidates: drop -1 / out-of-range; one sort by class id groups duplicates, whose best score
    # a segmented max gives; then drop the labels and keep the M - L best classes.
    ok = (cand_ids >= 0) & (cand_ids < K)
    c, s = cand_ids[ok], cand_scores[ok]
    room = M - L
    if c.size and room > 0:
        by_id = np.argsort(c, kind="stable")
        c, s = c[by_id], s[by_id]
        starts = np.flatnonzero(np.concatenate(([True], c[1:] != c[:-1])))
        u, best = c[starts], np.maximum.reduceat(s, starts)  # [U] unique ids (sorted), best scores
        if L:
            pos = np.minimum(np.searchsorted(uniq, u), L - 1)  # uniq: sorted unique labels
            not_label = uniq[pos] != u
            u, best = u[not_label], best[not_label]
        if u.size > room:  # keep the strongest `room`, truncating the weakest
            top = np.argpartition(-best, room - 1)[:room]
            u, best = u[top], best[top]
        cand = u[np.argsort(-best, kind="stable")]
    else:
        cand = np.empty(0, dtype=np.int64)

    need = M - L - cand.size
    parts = [lab_u, cand]
    if need > 0:
        parts.append(_random_fill(np.concatenate(parts), need, K, rng))
    active = np.concatenate(parts).astype(np.int64, copy=False)
    return active, remapped


def _random_fill(chosen: np.ndarray, need: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """`need` distinct classes drawn uniformly from [0, K) minus `chosen`, in random order.

    Rejection sampling keeps memory O(M), not O(K); when the free pool is small relative to the
    request (only when K is small) it falls back to an explicit permutation of the free classes.
    """
    free = K - chosen.size
    if need > free:
        raise ValueError(f"cannot fill {need} classes: only {free} of num_classes={K} remain")
    if free < 4 * need or K <= 65536:
        pool = np.setdiff1d(np.arange(K, dtype=np.int64), chosen, assume_unique=True)
        return rng.permutation(pool)[:need]
    out = np.empty(0, dtype=np.int64)
    taken = chosen  # grows to chosen + out; O(M) memory
    while out.size < need:
        draw = rng.integers(0, K, size=2 * (need - out.size) + 16, dtype=np.int64)
        draw = draw[~np.isin(draw, taken)]
        _, first = np.unique(draw, return_index=True)
        draw = draw[np.sort(first)]  # dedup keeping draw order (keeps the sample uniform)
        out = np.concatenate([out, draw[: need - out.size]])
        taken = np.concatenate([chosen, out])
    return out

