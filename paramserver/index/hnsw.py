"""HNSWIndex: an hnswlib graph over the rows of W."""
from __future__ import annotations

import threading
from typing import Any, Optional, Tuple

import numpy as np

from .base import ClassIndex, _file_bytes, _from_bytes, _sort_desc


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

    _OBJECTS = frozenset({"_hnsw"})

    def _objects(self) -> dict:
        return {"_hnsw": _file_bytes(self._hnsw.save_index)} if self._hnsw is not None else {}

    def _import_objects(self, arrays: dict) -> None:
        import hnswlib
        if "_hnsw" not in arrays:
            return
        index = hnswlib.Index(space="cosine" if self.metric == "angular" else "ip", dim=self.dim)
        _from_bytes(arrays["_hnsw"], lambda path: index.load_index(path, max_elements=self.num_classes))
        self._hnsw = index

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
