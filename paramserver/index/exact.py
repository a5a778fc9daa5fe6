"""ExactIndex: blocked matmul top-n over all rows (the reference for recall and CPK)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .base import _EPS, ClassIndex, _normalize_rows, _sort_desc


class ExactIndex(ClassIndex):
    """Exact top-n by blocked matmul; the reference every approximate index is measured against.

    Memory stays bounded at K = 1M: rows are scored in blocks of `block_rows`, and a running top-n
    ([B, n]) is merged with each block's top-n via np.argpartition. It scores the rows of the W it
    was built over (a reference to the store's rows, no copy; "angular" keeps their norms, K floats,
    refreshed by `update`), so it is never stale (the oracle selection in benchmarks).
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
        self._inv_norm: Optional[np.ndarray] = None   # [K] 1 / |row| ("angular")

    def build(self, W: np.ndarray) -> None:
        W = self._check_W(W)
        inv = None
        if self.metric == "angular":
            inv = np.empty(W.shape[0], dtype=np.float32)
            for lo in range(0, W.shape[0], self.block_rows):
                inv[lo:lo + self.block_rows] = 1.0 / np.maximum(np.linalg.norm(W[lo:lo + self.block_rows], axis=1), _EPS)
        self._W, self._inv_norm = W, inv
        self.num_classes = W.shape[0]

    def bind_rows(self, W: np.ndarray) -> None:
        """Score on ``W`` (same shape) from now on: the live store rows after a build from a copy."""
        self._W = self._rebind_rows(W)

    def update(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows changed (global ids [m], rows [m, d]; W itself holds them): refresh their norms."""
        if self._W is None:
            raise RuntimeError("ExactIndex.update called before build()")
        local, rows = self._check_update(ids, rows)
        if self._inv_norm is not None and local.size:
            self._inv_norm[local] = 1.0 / np.maximum(np.linalg.norm(rows, axis=1), _EPS)

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
            if self._inv_norm is not None:
                S *= self._inv_norm[start:start + self.block_rows]
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
