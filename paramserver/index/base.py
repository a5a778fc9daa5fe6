"""The interface every class index implements, and the helpers they share."""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Optional, Tuple

import numpy as np

METRICS = ("angular", "dot")
_EPS = 1e-12


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
class BuildCancelled(RuntimeError):
    """A build stopped by :meth:`ClassIndex.cancel` (a retired build)."""


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
        self._cancel = threading.Event()   # set by cancel(): a running build may stop early

    def cancel(self) -> None:
        """Ask a running build to stop (the graph build checks between lists; a build subprocess
        is killed); the index is then unusable. Builds that cannot stop finish and are discarded."""
        self._cancel.set()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise BuildCancelled(f"{type(self).__name__} build cancelled")

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
        """Build from W [K, d] float32. Indexes that score on rows (exact, graph) keep a reference to
        W and read it at query time (the store's live rows; no copy); the others keep what they
        built from it (a forest, an HNSW graph, IVF lists)."""
        raise NotImplementedError

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """F [B, d] -> (ids int64 [B, n] global class ids, -1 where fewer found;
        scores float32 [B, n], sorted descending per row). `labels` [B] (the batch's global class
        ids) is a hint only the label-driven GraphIndex uses; the others ignore it."""
        raise NotImplementedError

    def bind_rows(self, W: np.ndarray) -> None:
        """Read rows from ``W`` from now on (indexes that score on the store's rows: exact, graph).
        The others keep what they built and ignore it."""

    def _rebind_rows(self, W: np.ndarray) -> np.ndarray:
        """``W`` checked for :meth:`bind_rows`: the shape the index was built over."""
        W = self._check_W(W)
        if W.shape[0] != self.num_classes:
            raise ValueError(f"bind_rows: W has {W.shape[0]} rows, the index {self.num_classes}")
        return W

    def inherit(self, previous: "ClassIndex") -> None:
        """Called before a rebuild with the live index: keep what can be carried over (GraphIndex
        keeps its cold-path IVF). Default: nothing."""

    def update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows of W changed (incremental indexes only)."""
        raise NotImplementedError(f"{type(self).__name__} is not incremental; rebuild it instead")

    # -- state, for exact resume (IndexManager.export_state) --------------------------------------
    # Attributes that are not the index's state: synchronisation, the store's rows (a reference the
    # importer binds again), a previous index kept for a rebuild, library handles kept alive only.
    _NOT_STATE = frozenset({"_lock", "_cancel", "_rows", "_W", "_inherit_ivf", "_keep_quantizer"})

    def export_state(self) -> Tuple[dict, dict]:
        """(meta, arrays): the built index as JSON-able values and numpy arrays, no pickle; library
        objects through :meth:`_export_objects`. Raises NotImplementedError for a value it cannot
        write (the caller then rebuilds instead)."""
        meta: dict = {"class": type(self).__name__}
        arrays: dict = {}
        for key, value in vars(self).items():
            if key in self._NOT_STATE or key in self._OBJECTS:
                continue
            if isinstance(value, np.ndarray):
                arrays[key] = value
            elif isinstance(value, np.generic):
                meta[key] = value.item()
            elif value is None or isinstance(value, (bool, int, float, str)):
                meta[key] = value
            elif isinstance(value, ClassIndex):
                sub_meta, sub_arrays = value.export_state()
                meta[key] = sub_meta
                arrays.update({f"{key}.{k}": v for k, v in sub_arrays.items()})
            else:
                raise NotImplementedError(f"{type(self).__name__}.{key} ({type(value).__name__}) has no exported form")
        for key, value in self._objects().items():
            if value is not None:
                arrays[key] = value
        return meta, arrays

    def import_state(self, meta: dict, arrays: dict, rows: Optional[np.ndarray]) -> None:
        """Become the index :meth:`export_state` wrote (this object made by the same factory), reading
        the store's ``rows`` where the index scores on them."""
        if meta.get("class") != type(self).__name__:
            raise ValueError(f"index state of a {meta.get('class')}, not a {type(self).__name__}")
        objects = self._OBJECTS
        for key, value in meta.items():
            if key == "class":
                continue
            if isinstance(value, dict) and "class" in value:       # a nested index (the graph's IVF)
                sub = self._nested(key)
                sub.import_state(value, {k[len(key) + 1:]: v for k, v in arrays.items()
                                         if k.startswith(key + ".")}, rows)
                setattr(self, key, sub)
            else:
                setattr(self, key, value)
        for key, value in arrays.items():
            if "." not in key and key not in objects:
                setattr(self, key, value)
        self._import_objects({k: v for k, v in arrays.items() if k in objects})
        if rows is not None and self.num_classes:
            self.bind_rows(rows)

    _OBJECTS: frozenset = frozenset()     # attributes holding library objects (:meth:`_objects`)

    def _objects(self) -> dict:
        """Library objects of the built index (the attributes of ``_OBJECTS``) as uint8 arrays."""
        return {}

    def _import_objects(self, arrays: dict) -> None:
        """Library objects back from :meth:`_objects`' arrays."""

    def _nested(self, key: str) -> "ClassIndex":
        """A fresh index for the nested index attribute ``key`` (its state is imported into it)."""
        raise NotImplementedError(f"{type(self).__name__} holds no nested index '{key}'")

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


def _file_bytes(save) -> np.ndarray:
    """What ``save(path)`` writes, as a uint8 array (a library index that only saves to files)."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="hfsoftmax-index-")
    os.close(fd)
    try:
        save(path)
        return np.fromfile(path, dtype=np.uint8)
    finally:
        os.remove(path)


def _from_bytes(data: np.ndarray, load) -> None:
    """``load(path)`` of a file holding ``data`` (removed afterwards: a library that maps it keeps the
    mapping)."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="hfsoftmax-index-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(np.asarray(data, dtype=np.uint8).tobytes())
        load(path)
    finally:
        os.remove(path)


# k-means samples at most this many rows (at 10M classes nlist * 64 would be 640K rows x 10K lists
# per iteration, minutes on one core; 128K keeps >= 13 points per list, enough to place a centroid
# for a proposer whose candidates are re-scored).
MAX_TRAIN_ROWS = 131_072
# From this many lists, rows find their nearest lists through an HNSW graph over the centroids
# (a flat search of 10M rows against 10K centroids would be 2.6e13 multiply-adds).
HNSW_LISTS = 2048


def _default_nlist(K: int) -> int:
    """Lists of an IVF / graph build over K rows: round(sqrt(K)) up to 1M rows (lists of ~1000), then
    K // 1000 (lists stay ~1000 rows, so a build's cost grows linearly in K, not as K^1.5); at most
    K // 8, at least 1."""
    return max(1, min(max(int(round(math.sqrt(K))), K // 1000), K // 8))


def kmeans_centroids(W: np.ndarray, nlist: int, niter: int, tppc: int, seed: int, threads: Optional[int],
                     spherical: bool, prep) -> np.ndarray:
    """k-means centroids [nlist, d] (faiss) on a seeded sample of at most nlist * tppc (and
    MAX_TRAIN_ROWS) rows of W, each prepared by ``prep`` (e.g. normalised); W is never copied whole."""
    import faiss

    K = W.shape[0]
    with _faiss_threads(threads):
        rng = np.random.default_rng(seed)
        n_train = min(K, nlist * tppc, max(MAX_TRAIN_ROWS, nlist))
        sample = prep(W if n_train == K else W[np.sort(rng.choice(K, n_train, replace=False))])
        km = faiss.Kmeans(W.shape[1], nlist, niter=niter, seed=seed, spherical=spherical,
                          max_points_per_centroid=tppc, verbose=False)
        km.train(sample)
        return np.ascontiguousarray(km.centroids, dtype=np.float32)


def coarse_quantizer(C: np.ndarray, inner_product: bool):
    """A faiss index over the centroids C for nearest-list search: flat below HNSW_LISTS lists, HNSW above."""
    import faiss

    d = C.shape[1]
    metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
    if C.shape[0] > HNSW_LISTS:
        q = faiss.IndexHNSWFlat(d, 32, metric)
        q.hnsw.efSearch = 64
    else:
        q = faiss.IndexFlatIP(d) if inner_product else faiss.IndexFlatL2(d)
    q.add(C)
    return q
