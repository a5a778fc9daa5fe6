"""ExactIndex: blocked matmul top-n over all rows (the reference for recall and CPK)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .base import ClassIndex, _normalize_rows, _sort_desc


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
