"""HashingForest: the paper's Annoy random-projection forest over the rows of W."""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import numpy as np

from .base import ClassIndex, _file_bytes, _from_bytes, _sort_desc
from .spawn import run_in_child


def _annoy_build_worker(W: np.ndarray, workdir: str, dim: int, metric: str, ntrees: int, seed: int,
                        n_jobs: int) -> None:
    """Child body of HashingForest.build (spawn.py): the rows W (mapped) -> ``workdir/forest.ann``."""
    import annoy

    index = annoy.AnnoyIndex(dim, metric)
    index.set_seed(seed)
    for i in range(W.shape[0]):
        index.add_item(i, W[i])
    index.build(ntrees, n_jobs=n_jobs)
    index.save(os.path.join(workdir, "forest.ann"))


class HashingForest(ClassIndex):
    """The paper's hashing forest: an Annoy forest of random-projection trees over the rows of W.

    Annoy's "angular" distance is sqrt(2 - 2 cos), converted back to the cosine here; its "dot"
    distance is the inner product itself. search_k = -1 means Annoy's default (n * ntrees).

    Annoy has no bulk add: one Python call per row (tens of seconds at 1M rows; docs/benchmarks.md),
    holding the GIL, which in a background thread stalls the trainer's thread at every GIL
    hand-off. With subprocess=True the build runs in a spawned process (spawn.py: the child maps the
    store's rows when they are in shared memory, else reads a temp .npy), adds and builds and saves,
    and the parent memory-maps the saved index (Annoy's load is an mmap).
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

    _OBJECTS = frozenset({"_annoy"})

    def _objects(self) -> dict:
        return {"_annoy": _file_bytes(self._annoy.save)} if self._annoy is not None else {}

    def _import_objects(self, arrays: dict) -> None:
        import annoy
        if "_annoy" not in arrays:
            return
        index = annoy.AnnoyIndex(self.dim, self.metric)
        _from_bytes(arrays["_annoy"], index.load)        # an mmap: it outlives the file's removal
        self._annoy = index

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
        import annoy

        def load(workdir: str) -> Any:
            index = annoy.AnnoyIndex(self.dim, self.metric)
            index.load(os.path.join(workdir, "forest.ann"))  # mmap; the mapping outlives the file's removal
            return index

        return run_in_child(self.name, _annoy_build_worker, W,
                            (self.dim, self.metric, self.ntrees, self.seed, n_jobs),
                            load=load, nice=self.build_nice, cancel=self._cancel)

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
