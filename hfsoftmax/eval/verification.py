"""Pair verification with the standard LFW-style 10-fold protocol.

Protocol (as used for LFW, CFP-FP, AgeDB-30 and the other InsightFace ``.bin`` sets):

* the embeddings come in interleaved pairs: rows ``2i`` and ``2i + 1`` form pair ``i`` and
  ``issame[i]`` says whether they show the same identity;
* every embedding is L2-normalised here (callers need not do it), and a pair's score is the
  squared L2 distance between its two unit vectors, in ``[0, 4]``;
* a pair is predicted "same" when its distance is strictly below a threshold; the candidate
  thresholds are ``0, 0.01, ..., 4.00`` (401 values);
* the pairs are split into ``nfolds`` contiguous folds (no shuffling, so results are reproducible
  and comparable with published numbers: the standard sets hold both kinds of pairs in every
  fold). When a contiguous fold would hold only one kind (a file sorted positives-then-negatives),
  the folds are stratified instead (positives and negatives each dealt round-robin), with a
  warning: a single-class fold makes its threshold choice and accuracy meaningless. For each fold
  the threshold with the best accuracy on the other ``nfolds - 1`` folds is applied to the
  held-out fold. Accuracy is the mean (and std) of the held-out accuracies;
* VAL at FAR: on the training folds, take the largest threshold whose false-accept rate is
  ``<= far_target``; report the validation rate (true-accept rate) and the FAR it gives on the
  held-out fold, mean and std over folds. Only when the training folds hold at least
  ``1 / far_target`` negative pairs (600 negatives cannot resolve a FAR of 1e-3): otherwise ``val``
  and ``far`` are None and ``val_note`` says how many negatives were there and needed;
* the ROC curve and its AUC: TPR and FPR per threshold over all pairs (a threshold sweep needs
  no folds; per-fold curves averaged break when a fold holds one kind of pair).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: candidate thresholds on the squared L2 distance between unit vectors (0..4 in 0.01 steps)
THRESHOLDS: np.ndarray = np.round(np.arange(0.0, 4.0 + 1e-9, 0.01), 2)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation of a [n, d] array (float64 result)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distances [N] between the interleaved pairs of a [2N, d] embedding array.

    The rows are L2-normalised first, so the distances lie in [0, 4].
    """
    emb = l2_normalize(embeddings)
    diff = emb[0::2] - emb[1::2]  # [N, d]
    return np.sum(diff * diff, axis=1)


def fold_indices(num_pairs: int, nfolds: int, issame: np.ndarray | None = None) -> list[np.ndarray]:
    """Contiguous, unshuffled folds (sizes differ by at most one, the first folds are larger); with
    ``issame``, stratified folds instead when a contiguous fold would hold a single kind of pair."""
    folds = np.array_split(np.arange(num_pairs), nfolds)
    if issame is None or all(0 < issame[f].sum() < len(f) for f in folds):
        return folds
    pos, neg = np.flatnonzero(issame), np.flatnonzero(~issame)
    strat = [np.sort(np.concatenate([pos[k::nfolds], neg[k::nfolds]])) for k in range(nfolds)]
    if all(0 < issame[f].sum() < len(f) for f in strat):
        logger.warning("verification: a contiguous fold holds a single kind of pair (pairs sorted by kind?): "
                       "using %d stratified folds", nfolds)
        return strat
    logger.warning("verification: %d positive and %d negative pairs cannot give every one of %d folds both "
                   "kinds; per-fold accuracy is less meaningful", len(pos), len(neg), nfolds)
    return folds


def _rates(predict: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TPR, FPR and accuracy per threshold.

    Args:
        predict: bool [T, n], predicted "same" for each threshold and pair.
        actual: bool [n], the ground truth.
    Returns:
        (tpr [T], fpr [T], acc [T]); a rate with an empty denominator is 0.
    """
    tp = np.sum(predict & actual[None, :], axis=1)
    fp = np.sum(predict & ~actual[None, :], axis=1)
    n_same = int(actual.sum())
    n_diff = int(actual.size - n_same)
    tpr = tp / n_same if n_same else np.zeros(predict.shape[0])
    fpr = fp / n_diff if n_diff else np.zeros(predict.shape[0])
    tn = n_diff - fp
    acc = (tp + tn) / max(actual.size, 1)
    return tpr.astype(np.float64), fpr.astype(np.float64), acc.astype(np.float64)


def evaluate(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10,
             far_target: float = 1e-3, require_resolvable: bool = True) -> dict[str, Any]:
    """Run the 10-fold verification protocol described in the module docstring.

    Args:
        embeddings: float [2N, d]; rows 2i and 2i+1 are pair i. Normalised here.
        issame: bool [N], True when pair i shows one identity.
        nfolds: number of folds (10 in the standard protocol).
        far_target: the false-accept rate at which VAL is reported.
        require_resolvable: report VAL only when the training folds hold >= 1/far_target negatives.
    Returns:
        dict with ``accuracy``, ``accuracy_std`` (fractions), ``val``, ``val_std``, ``far``,
        ``far_std``, ``threshold`` (mean best threshold), ``best_thresholds`` and
        ``fold_accuracies`` (per fold), ``tpr``, ``fpr``, ``thresholds`` (ROC lists),
        ``auc``, ``num_pairs``, ``nfolds``, ``far_target``.
    Raises:
        ValueError: on shape mismatches or too few pairs for the folds.
    """
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame).astype(bool).reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] % 2 != 0:
        raise ValueError(f"embeddings must be [2N, d] with an even row count, got shape {embeddings.shape}")
    num_pairs = embeddings.shape[0] // 2
    if issame.shape[0] != num_pairs:
        raise ValueError(f"{embeddings.shape[0]} embeddings make {num_pairs} pairs but issame has "
                         f"{issame.shape[0]} flags")
    if nfolds < 2 or num_pairs < nfolds:
        raise ValueError(f"need nfolds >= 2 and at least nfolds pairs, got nfolds={nfolds}, pairs={num_pairs}")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("embeddings contain NaN or Inf")

    dist = pair_distances(embeddings)  # [N]
    # predict[t, i]: pair i called "same" at threshold t  -> [T, N]
    predict = dist[None, :] < THRESHOLDS[:, None]
    folds = fold_indices(num_pairs, nfolds, issame)
    n_neg_train = min(int((~issame).sum() - (~issame[f]).sum()) for f in folds)
    val_ok = n_neg_train * far_target >= 1.0 or not require_resolvable

    fold_acc, best_thr = [], []
    vals, fars = [], []
    tprs, fprs = [], []
    for k, test_idx in enumerate(folds):
        train_mask = np.ones(num_pairs, dtype=bool)
        train_mask[test_idx] = False
        p_train, a_train = predict[:, train_mask], issame[train_mask]
        p_test, a_test = predict[:, test_idx], issame[test_idx]

        # accuracy: best threshold on the training folds (first one on ties), applied to the test fold
        _, far_train, acc_train = _rates(p_train, a_train)
        t_best = int(np.argmax(acc_train))
        tpr_test, fpr_test, acc_test = _rates(p_test, a_test)
        best_thr.append(float(THRESHOLDS[t_best]))
        fold_acc.append(float(acc_test[t_best]))
        tprs.append(tpr_test)
        fprs.append(fpr_test)

        # VAL@FAR: largest threshold whose training FAR stays within the target (FAR is
        # non-decreasing in the threshold, and FAR = 0 at threshold 0, so one always exists)
        ok = np.nonzero(far_train <= far_target)[0]
        t_val = int(ok[-1])
        vals.append(float(tpr_test[t_val]))
        fars.append(float(fpr_test[t_val]))
        logger.debug("fold %d: thr=%.2f acc=%.4f val=%.4f far=%.5f", k, THRESHOLDS[t_best],
                     acc_test[t_best], tpr_test[t_val], fpr_test[t_val])

    # ROC over all pairs; AUC by trapezoids over FPR (it rises with the threshold), closed at (1, 1)
    tpr_all, fpr_all, _ = _rates(predict, issame)
    f, t = np.concatenate([[0.0], fpr_all, [1.0]]), np.concatenate([[0.0], tpr_all, [1.0]])
    auc = float(np.sum(np.diff(f) * (t[1:] + t[:-1]) / 2.0))
    note = None
    if not val_ok:
        note = (f"VAL@FAR={far_target:g} not reported: the training folds hold {n_neg_train} negative pairs, "
                f"{int(np.ceil(1.0 / far_target))} are needed to resolve that FAR")
    return {
        "accuracy": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "val": float(np.mean(vals)) if val_ok else None,
        "val_std": float(np.std(vals)) if val_ok else None,
        "far": float(np.mean(fars)) if val_ok else None,
        "far_std": float(np.std(fars)) if val_ok else None,
        "val_note": note,
        "threshold": float(np.mean(best_thr)),
        "best_thresholds": best_thr,
        "fold_accuracies": fold_acc,
        "tpr": tpr_all.tolist(),
        "fpr": fpr_all.tolist(),
        "thresholds": THRESHOLDS.tolist(),
        "auc": auc,
        "num_pairs": int(num_pairs),
        "nfolds": int(nfolds),
        "far_target": float(far_target),
    }
