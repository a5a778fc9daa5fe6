"""The sampled CPK probe of SelectiveSoftmax (K > cpk_sample; ``sampled_mass`` in heads/selective.py)
against the exact pass over all K, at K = 5000.

The tolerances are the docstring's error statement, computed from the exact probabilities: the
partition estimate Zhat has relative s.e. se = P_C * CV_C * sqrt((1 - s/N) / s) (so z = (Zhat/Z - 1)
/ se has mean 0 and mean square 1), and the top-k mass is (CPK - delta) * Z / Zhat with
0 <= delta <= p(true top-k outside A u S).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hfsoftmax.config import ConfigError
from paramserver.store import WeightStore
from test_selective import head_on, local_store

K, D, CLUSTERS = 5000, 16, 50          # 50 clusters of 100 classes (class j in cluster j % 50)
B, M, SAMPLE = 16, 1000, 2000          # probe = batch; |A| = M; s = SAMPLE - M = 1000 of N = 4000
STEPS = 100                            # independent class samples S (one per train step)


def clustered_rows(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, D))
    return (centres[np.arange(K) % CLUSTERS] + 0.3 * rng.standard_normal((K, D))).astype(np.float32)


def clustered_store() -> WeightStore:
    store = local_store(K, D, init_std=0.05)
    store.set_rows(np.arange(K), clustered_rows())
    store.index.build_now(store.rows_view(), step=0)
    return store


def batch(rows: np.ndarray, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """B samples near their label's row, the labels in 4 clusters (4 each): the exact index with 100
    candidates per sample finds whole clusters, so A holds each sample's high-probability classes."""
    rng = np.random.default_rng(seed)
    labels = (rng.choice(CLUSTERS, 4, replace=False).repeat(4) + CLUSTERS * rng.integers(0, K // CLUSTERS, B))
    feats = rows[labels] + 0.3 * rng.standard_normal((B, D)).astype(np.float32)
    return torch.from_numpy(feats), torch.from_numpy(labels.astype(np.int64))


def exact_logits(store: WeightStore, feats: torch.Tensor) -> torch.Tensor:
    """[B, K] logits over all K (brute force), in the store's dtype as the head computes them."""
    W = torch.from_numpy(store.pull(np.arange(K))).to(feats.dtype)
    return (feats @ W.t()).double()


def stated_se(p: torch.Tensor, active: np.ndarray, s: int) -> torch.Tensor:
    """[B] the docstring's relative s.e. of Zhat: P_C * CV_C * sqrt((1 - s/N) / s)."""
    out = torch.ones(K, dtype=torch.bool)
    out[torch.from_numpy(active)] = False
    pc = p[:, out]                                                     # [B, N] ~ x_j over C
    n = pc.shape[1]
    cv = pc.std(dim=1) / pc.mean(dim=1)                                # divisor N - 1
    return pc.sum(1) * cv * math.sqrt((1 - s / n) / s)


def topk_outside(p: torch.Tensor, k: int, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] exact CPK(k), [B] mass of the true top-k outside ``ids``: the bound on delta)."""
    top = p.topk(k, dim=1)
    inside = torch.zeros(K, dtype=torch.bool)
    inside[torch.from_numpy(ids)] = True
    return top.values.sum(1), (top.values * (~inside[top.indices]).double()).sum(1)


def test_partition_estimate_is_unbiased_at_the_stated_standard_error() -> None:
    store = clustered_store()
    head = head_on(store, M, candidates=100, cpk_sample=SAMPLE)
    feats, labels = batch(clustered_rows())
    head.begin_step(0, 0.0)
    active, _ = head.select(feats.numpy(), labels.numpy(), M)
    a = np.unique(active)
    s = head.cpk_sample_ids(a).size
    assert a.size == M and s == SAMPLE - M
    logits = exact_logits(store, feats)
    p, log_z = torch.softmax(logits, dim=1), torch.logsumexp(logits, dim=1)
    se = stated_se(p, a, s)                                            # [B]
    # A good index: each sample's top-100 classes are active, so CPK(100) is exact up to Z / Zhat.
    cpk100, delta100 = topk_outside(p, 100, a)
    assert (delta100 == 0).all()
    z = []
    for t in range(STEPS):                                              # a new S per train step
        head.begin_step(t, 0.0)
        lse, probs = head.sampled_mass(feats, M, active)
        rel = torch.exp(lse - log_z) - 1                               # Zhat / Z - 1
        assert (rel.abs() <= 5 * se).all(), (t, rel, se)
        z.append((rel / se).numpy())
        est100 = probs[:, :100].sum(1)
        torch.testing.assert_close(est100, cpk100 / (1 + rel), rtol=1e-6, atol=0)
        assert ((est100 - cpk100).abs() <= cpk100 * 5 * se / (1 - 5 * se)).all()
    z = np.array(z)                                                    # [STEPS, B]
    # The steps' S are independent and a step's mean of B unit-variance z's has variance <= 1, so the
    # grand mean has s.d. <= 1/sqrt(STEPS); a wrong scale factor (K/s, (K-|A|)/(|A|+s), 1) shifts it
    # by >= 1 here. The mean square checks the s.e. itself is honest (neither under- nor overstated).
    assert abs(z.mean()) <= 4 / math.sqrt(STEPS), z.mean()
    assert 0.6 <= (z ** 2).mean() <= 1.5, (z ** 2).mean()


def test_sampled_probe_within_the_stated_error_of_the_exact_one() -> None:
    rows = clustered_rows()
    feats, labels = batch(rows)
    out = {}
    for name, sample in (("exact", K), ("sampled", SAMPLE)):
        store = clustered_store()
        head = head_on(store, M, candidates=100, cpk_every=1, cpk_probe=B, cpk_sample=sample)
        head.begin_step(0, 0.0)
        head(feats.clone().requires_grad_(), labels).backward()
        head.end_step(0)
        out[name] = (head, store)
    exact, (head, store) = out["exact"][0].stats(), out["sampled"]
    st = head.stats()
    assert exact["cpk_sampled"] == 0.0 and st["cpk_sampled"] == 1.0
    a = np.unique(head.last_active)
    samp = head.cpk_sample_ids(a)                                      # the probe's S (same step)
    assert np.array_equal(np.unique(out["exact"][0].last_active), a)     # the same active set
    logits = exact_logits(store, feats)
    p, log_z = torch.softmax(logits, dim=1), torch.logsumexp(logits, dim=1)
    cpk, delta_max = topk_outside(p, M, np.union1d(a, samp))
    se = stated_se(p, a, samp.size)
    p_active = p[:, torch.from_numpy(a)].sum(1)
    assert exact["cpk_exact"] == pytest.approx(cpk.mean().item(), rel=1e-6)
    assert exact["cpk_active"] == pytest.approx(p_active.mean().item(), rel=1e-6)
    # The probe's partition is the estimate of sampled_mass, and cpk_active divides by it.
    lse, probs = head.sampled_mass(feats, M, head.last_active)
    torch.testing.assert_close(head._probe_lse, lse, rtol=0, atol=0)
    assert st["cpk_exact"] == pytest.approx(probs.sum(1).mean().item(), rel=1e-12)
    # Per sample: numerator within [CPK - delta_max, CPK] (the top-k of A u S, exactly).
    num = probs.sum(1) * torch.exp(lse - log_z)                          # sum of the top-k exp / Z
    assert (num <= cpk * (1 + 1e-6)).all() and (num >= (cpk - delta_max) * (1 - 1e-6)).all()
    # The metric: Z / Zhat within 1 +- 5 se (a), less delta (b).
    ratio_err = 5 * se / (1 - 5 * se)
    tol_exact = (cpk * ratio_err + delta_max).mean().item()
    tol_active = (p_active * ratio_err).mean().item()
    assert abs(st["cpk_exact"] - exact["cpk_exact"]) <= tol_exact, (st, exact, tol_exact)
    assert abs(st["cpk_active"] - exact["cpk_active"]) <= tol_active, (st, exact, tol_active)
    assert st["cpk_exact"] <= 1.0 and st["cpk_active"] <= 1.0


def test_exact_when_k_within_cpk_sample_and_a_full_sample_is_exact() -> None:
    feats, labels = batch(clustered_rows())
    for sample in (K, 200_000):                                        # K <= cpk_sample: the exact pass
        store = clustered_store()
        head = head_on(store, M, candidates=100, cpk_every=1, cpk_probe=B, cpk_sample=sample)
        head.begin_step(0, 0.0)
        head(feats.clone().requires_grad_(), labels).backward()
        head.end_step(0)
        st = head.stats()
        lse, probs = head.exact_mass(feats, M)                         # lr = 0: W unchanged
        assert st["cpk_sampled"] == 0.0
        assert st["cpk_exact"] == probs.cumsum(dim=1).mean(dim=0)[M - 1].item()
        assert torch.equal(head._probe_lse, lse)
    # sampled_mass itself: when S is the whole complement (N / s = 1) it is the exact pass (float64 rows).
    store = WeightStore(K, D, dtype="float64", momentum=0.0, weight_decay=0.0)
    store.set_rows(np.arange(K), clustered_rows().astype(np.float64))
    head = head_on(store, M, index="random", cpk_sample=K, block_size=700)
    head.begin_step(0, 0.0)
    active = np.random.default_rng(5).choice(K, M, replace=False)
    samp = head.cpk_sample_ids(np.sort(active))
    np.testing.assert_array_equal(samp, np.setdiff1d(np.arange(K), active))
    f64 = feats.double()
    lse_s, probs_s = head.sampled_mass(f64, M, active)
    lse_e, probs_e = head.exact_mass(f64, M)
    torch.testing.assert_close(lse_s, lse_e, rtol=1e-12, atol=0)
    torch.testing.assert_close(probs_s, probs_e, rtol=1e-12, atol=1e-300)


def test_sampled_probe_scores_cpk_sample_rows_not_k_and_pulls_none() -> None:
    """The probe's features go to the rows (the store's score op): a step pulls its M active rows,
    probe or not, and the probe scores |A| + s rows (then the M active ones for cpk_active), not K."""
    feats, labels = batch(clustered_rows())
    # (cpk_sample, rows of the probe): |A| + s with s = max(cpk_sample - |A|, cpk_sample // 4)
    for sample, probe_rows in ((SAMPLE, SAMPLE), (1200, M + 300), (K, K)):
        store = clustered_store()
        head = head_on(store, M, candidates=100, cpk_every=2, cpk_probe=B, cpk_sample=sample)
        pulled, scored = [], []
        for t in range(2):                                             # a probe step, then a plain one
            before = store.stats()
            head.begin_step(t, 0.0)
            head(feats.clone().requires_grad_(), labels).backward()
            head.end_step(t)
            pulled.append(store.stats()["rows_pulled"] - before["rows_pulled"])
            scored.append(store.stats()["rows_scored"] - before["rows_scored"])
        assert pulled == [M, M], (sample, pulled)
        assert scored == [probe_rows + M, 0], (sample, scored)
        assert head.stats()["cpk_sampled"] == float(sample < K)
        if sample < K:
            assert probe_rows <= sample + M


def test_adaptive_m_from_the_sampled_probe() -> None:
    from hfsoftmax.heads.selective import choose_num_active

    feats, labels = batch(clustered_rows())
    store = clustered_store()
    head = head_on(store, M, candidates=100, cpk_every=1, cpk_probe=B, cpk_sample=SAMPLE, adaptive=True,
                   tau_cp=0.9, m_min=20, m_max=1500)
    head.begin_step(0, 0.0)
    a0, _ = head.select(feats.numpy(), labels.numpy(), M)              # what the probe is built on
    _, probs = head.sampled_mass(feats, 1500, a0)
    want = choose_num_active(probs.cumsum(1).mean(0).numpy(), 0.9, 20, 1500, K)
    head(feats.clone().requires_grad_(), labels).backward()
    head.end_step(0)
    assert want != M and head.num_active == want
    assert len(head.last_active) == want and set(labels.tolist()) <= set(head.last_active.tolist())
    assert head.stats()["cpk_sampled"] == 1.0


def test_cpk_sample_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="cpk_sample"):
        head_on(local_store(50, 4), 10, cpk_sample=0)
