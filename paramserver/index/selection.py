"""select_active: per-batch candidates -> exactly M unique active classes, labels first."""
from __future__ import annotations

from typing import Tuple

import numpy as np


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
