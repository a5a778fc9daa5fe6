"""10-fold verification protocol: hand-computed answers and a brute-force reference."""
from __future__ import annotations

import numpy as np
import pytest

from hfsoftmax.eval.verification import THRESHOLDS, evaluate, pair_distances


def pairs_at(distances: list[float], scale: float = 1.0) -> np.ndarray:
    """[2N, 2] embeddings whose pair i has squared L2 distance distances[i] after normalisation."""
    rows = []
    for k, d in enumerate(distances):
        phi = 0.37 * k  # rotate each pair differently so only the within-pair angle matters
        theta = np.arccos(1.0 - d / 2.0)
        rows.append([np.cos(phi), np.sin(phi)])
        rows.append([np.cos(phi + theta), np.sin(phi + theta)])
    return np.asarray(rows) * scale


def test_pair_distances_match_construction():
    d = [0.0, 0.305, 1.505, 2.0, 3.99]
    np.testing.assert_allclose(pair_distances(pairs_at(d, scale=7.0)), d, atol=1e-9)


def test_thresholds_grid():
    assert len(THRESHOLDS) == 401 and THRESHOLDS[0] == 0.0 and THRESHOLDS[-1] == 4.0
    assert THRESHOLDS[31] == 0.31


def test_hand_computed_ten_folds():
    # 5 same pairs at 0.305, 4 different pairs at 1.505, one hard different pair at 0.205.
    # Each fold holds one pair. Worked by hand: every training set's best threshold is 0.31
    # (8/9 correct); the hard pair is the only held-out error -> accuracy 0.9, std 0.3.
    # VAL@FAR=1e-3: the training FAR must be 0; with the hard pair in training the largest such
    # threshold is 0.20 (no same pair accepted -> VAL 0); when the hard pair is held out it is 1.50,
    # which accepts the hard pair -> FAR 1 on that fold, 0.1 on average.
    d = [0.305, 1.505, 0.305, 0.205, 1.505, 0.305, 1.505, 0.305, 1.505, 0.305]
    same = [True, False, True, False, False, True, False, True, False, True]
    r = evaluate(pairs_at(d, scale=3.0), np.array(same), nfolds=10, far_target=1e-3, require_resolvable=False)
    assert r["num_pairs"] == 10
    assert r["accuracy"] == pytest.approx(0.9)
    assert r["accuracy_std"] == pytest.approx(0.3)
    assert r["threshold"] == pytest.approx(0.31)
    assert r["best_thresholds"] == [pytest.approx(0.31)] * 10
    assert r["fold_accuracies"][3] == 0.0 and sum(r["fold_accuracies"]) == pytest.approx(9.0)
    assert r["val"] == pytest.approx(0.0)
    assert r["far"] == pytest.approx(0.1)
    assert len(r["tpr"]) == len(r["fpr"]) == 401
    # by default 4 training negatives cannot resolve FAR = 1e-3: no VAL, and the note says why
    r = evaluate(pairs_at(d, scale=3.0), np.array(same), nfolds=10, far_target=1e-3)
    assert r["val"] is None and r["far"] is None and "4 negative pairs, 1000 are needed" in r["val_note"]
    assert r["accuracy"] == pytest.approx(0.9)


def test_separable_set_is_perfect():
    rng = np.random.default_rng(0)
    n = 200
    same = rng.random(n) < 0.5
    d = np.where(same, rng.uniform(0.1, 0.8, n), rng.uniform(1.2, 2.5, n))
    r = evaluate(pairs_at(list(d)), same, require_resolvable=False)
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0
    # VAL uses the largest threshold with training FAR <= 1e-3 (i.e. 0 here), which sits just
    # below the closest *training* different pair, so a held-out different pair may slip under it
    assert r["val"] == 1.0 and r["far"] < 0.05
    assert r["auc"] == pytest.approx(1.0)
    # the ROC starts at (0, 0) and ends at (1, 1)
    assert r["tpr"][0] == 0.0 and r["fpr"][0] == 0.0 and r["tpr"][-1] == 1.0 and r["fpr"][-1] == 1.0


def reference_accuracy(emb: np.ndarray, issame: np.ndarray, nfolds: int) -> tuple[float, float]:
    """Slow, loop-based restatement of the protocol (independent of the vectorised code)."""
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    n = len(issame)
    dist = [float(np.sum((emb[2 * i] - emb[2 * i + 1]) ** 2)) for i in range(n)]
    sizes = [n // nfolds + (1 if k < n % nfolds else 0) for k in range(nfolds)]
    starts = np.cumsum([0] + sizes)
    accs = []
    for k in range(nfolds):
        test = set(range(starts[k], starts[k + 1]))
        best_t, best_acc = None, -1.0
        for t in [i / 100 for i in range(401)]:
            correct = sum((dist[i] < t) == issame[i] for i in range(n) if i not in test)
            acc = correct / (n - len(test))
            if acc > best_acc:
                best_t, best_acc = t, acc
        accs.append(sum((dist[i] < best_t) == issame[i] for i in test) / len(test))
    return float(np.mean(accs)), float(np.std(accs))


def test_matches_reference_on_noisy_features():
    rng = np.random.default_rng(1)
    n, dim = 53, 8  # uneven folds on purpose
    base = rng.normal(size=(n, dim))
    same = rng.random(n) < 0.5
    other = np.where(same[:, None], base + rng.normal(scale=0.9, size=(n, dim)), rng.normal(size=(n, dim)))
    emb = np.empty((2 * n, dim))
    emb[0::2], emb[1::2] = base, other
    r = evaluate(emb, same, nfolds=10)
    acc, std = reference_accuracy(emb, same, 10)
    assert 0.5 < acc < 1.0  # not a degenerate case
    assert r["accuracy"] == pytest.approx(acc) and r["accuracy_std"] == pytest.approx(std)


@pytest.mark.parametrize("shape,flags,msg", [
    ((7, 4), 3, "even"),
    ((8, 4), 3, "issame has 3"),
    ((8, 4), 4, "nfolds"),
])
def test_bad_shapes_raise(shape, flags, msg):
    with pytest.raises(ValueError, match=msg):
        evaluate(np.ones(shape), np.ones(flags, dtype=bool), nfolds=10)


def test_pairs_sorted_by_kind_get_stratified_folds_and_a_whole_roc(caplog):
    """All positives first, then all negatives (contiguous folds would each hold one kind): the
    folds are stratified, the ROC covers all pairs (AUC near 1 for a good model, not 0.3), and the
    accuracy equals that of the same pairs interleaved."""
    rng = np.random.default_rng(3)
    n = 600
    same = np.arange(n) < n // 2
    d = np.where(same, rng.uniform(0.2, 1.1, n), rng.uniform(0.9, 2.0, n))
    with caplog.at_level("WARNING"):
        r = evaluate(pairs_at(list(d)), same)
    assert "stratified" in caplog.text
    order = np.argsort(rng.random(n))
    mixed = evaluate(pairs_at(list(d[order])), same[order])
    assert r["auc"] > 0.95 and abs(r["auc"] - mixed["auc"]) < 1e-9
    assert r["tpr"][-1] == 1.0 and abs(r["accuracy"] - mixed["accuracy"]) < 0.03
    assert r["val"] is None and "hold 270 negative pairs, 1000 are needed" in r["val_note"]
