"""IVFIndex: incremental inverted file (k-means centroids + faiss lists)."""
from __future__ import annotations

import threading
from typing import Any, Optional, Tuple

import numpy as np

from .base import (MAX_TRAIN_ROWS, ClassIndex, _default_nlist, _faiss_threads, _normalize_rows, _sort_desc,
                   coarse_quantizer, kmeans_centroids)


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
        nlist: number of lists (None: round(sqrt(K)) up to 1M rows, then K // 1000; at most K // 8).
        nprobe: lists probed per query (None: max(8, nlist // 32); like Annoy's search_k, the scan
            budget per query, ~nprobe * K / nlist rows, should stay roughly fixed as K grows).
        niter: k-means iterations.
        train_points_per_centroid: k-means runs on a sample of this many rows per centroid.
        codec: what the lists hold per row: "flat" (float32 rows: a copy of W, exact list scores) or
            "sq8" (8-bit scalar-quantised residuals: d bytes per row, a quarter of float32 W; the
            scores are approximate, which a proposer whose candidates are re-scored on the store's
            rows -- GraphIndex's cold path -- does not mind).
        query_threads: faiss threads for the per-step calls (query, update); None = faiss default.
            1 by default: when the cores are oversubscribed, OpenMP threads spin at barriers and a
            small per-step update runs many times slower on two threads than on one
            (docs/benchmarks.md, bench_index).
    """

    name = "ivf"
    incremental = True

    def __init__(self, dim: int, metric: str = "angular", *, class_offset: int = 0, seed: int = 0,
                 nlist: Optional[int] = None, nprobe: Optional[int] = None, niter: int = 10,
                 train_points_per_centroid: int = 64, query_threads: Optional[int] = 1,
                 codec: str = "flat") -> None:
        super().__init__(dim, metric, class_offset=class_offset, seed=seed)
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if niter < 1:
            raise ValueError(f"niter must be >= 1, got {niter}")
        if train_points_per_centroid < 1:
            raise ValueError(f"train_points_per_centroid must be >= 1, got {train_points_per_centroid}")
        if codec not in ("flat", "sq8"):
            raise ValueError(f"codec must be 'flat' or 'sq8', got {codec!r}")
        self.codec = codec
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

    _OBJECTS = frozenset({"_ivf"})

    def _objects(self) -> dict:
        import faiss
        return {"_ivf": faiss.serialize_index(self._ivf)} if self._ivf is not None else {}

    def _import_objects(self, arrays: dict) -> None:
        import faiss
        self._ivf = faiss.deserialize_index(np.asarray(arrays["_ivf"])) if "_ivf" in arrays else None

    def _prep(self, X: np.ndarray) -> np.ndarray:
        return _normalize_rows(X) if self.metric == "angular" else np.ascontiguousarray(X, dtype=np.float32)

    def build(self, W: np.ndarray, centroids: Optional[np.ndarray] = None, assign: Optional[np.ndarray] = None) -> None:
        """Build over W; ``centroids`` [nlist, d]: use these lists (e.g. the graph's k-means) instead of
        clustering again; ``assign`` [K]: each row's list, already found (no second nearest-list search)."""
        import faiss

        W = self._check_W(W)
        K = W.shape[0]
        nlist = min(self.nlist_opt or _default_nlist(K), K) if centroids is None else centroids.shape[0]
        nprobe = min(self.nprobe_opt or max(8, nlist // 32), nlist)
        with _faiss_threads(self.build_threads):
            if centroids is None:
                centroids = kmeans_centroids(W, nlist, self.niter, self.train_points_per_centroid, self.seed, None,
                                             self.metric == "angular", self._prep)
            centroids = np.ascontiguousarray(centroids, dtype=np.float32)
            quantizer = coarse_quantizer(centroids, inner_product=False)
            if self.codec == "flat":
                ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
                ivf.is_trained = True
            else:
                ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                    faiss.METRIC_INNER_PRODUCT)
                rng = np.random.default_rng(self.seed)
                n_train = min(K, MAX_TRAIN_ROWS)
                ivf.train(self._prep(W if n_train == K else W[np.sort(rng.choice(K, n_train, replace=False))]))
                # (the quantiser's ranges; the centroids are in already)
            ivf.set_direct_map_type(faiss.DirectMap.Array)  # ids 0..K-1 -> (list, offset)
            for lo in range(0, K, 65536):                    # W is read in blocks, never copied whole
                X = self._prep(W[lo:lo + 65536])
                if assign is None:
                    ivf.add(X)
                else:                                        # ids lo.. in order, lists given
                    a = np.ascontiguousarray(assign[lo:lo + 65536], dtype=np.int64)
                    ivf.add_core(len(X), faiss.swig_ptr(X), None, faiss.swig_ptr(a))
            ivf.nprobe = nprobe
        self._keep_quantizer = quantizer  # the IVF does not own it from Python's side
        # Each row's list and the cosine to that list's centroid when it was assigned (int32 + float16
        # per row): `drifted` finds the rows that moved away from their list without reading codes.
        lists = (faiss.vector_to_array(ivf.direct_map.array) >> 32).astype(np.int32)
        unit_c = _normalize_rows(centroids)
        cos0 = np.empty(K, dtype=np.float16)
        for lo in range(0, K, 65536):
            cos0[lo:lo + 65536] = np.einsum("md,md->m", _normalize_rows(W[lo:lo + 65536]), unit_c[lists[lo:lo + 65536]])
        with self._lock:
            self._ivf, self._centroids = ivf, centroids
            self._unit_c, self._list, self._cos0 = unit_c, lists, cos0
            self.nlist, self.nprobe, self.num_classes = nlist, nprobe, K

    def drifted(self, ids: np.ndarray, rows: np.ndarray, drift: float) -> np.ndarray:
        """Mask [m] of the rows (global ids, new values) whose cosine to their list's centroid fell by
        more than ``drift`` since they were assigned: those a re-assignment may move."""
        local = np.asarray(ids, dtype=np.int64).reshape(-1) - self.class_offset
        with self._lock:
            cos = np.einsum("md,md->m", _normalize_rows(rows), self._unit_c[self._list[local]])
            return cos < self._cos0[local].astype(np.float32) - drift

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
            dm = self._ivf.direct_map
            lists = np.fromiter((dm.get(int(i)) >> 32 for i in local), dtype=np.int32, count=local.size)
            self._list[local] = lists
            self._cos0[local] = np.einsum("md,md->m", _normalize_rows(X), self._unit_c[lists])

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
