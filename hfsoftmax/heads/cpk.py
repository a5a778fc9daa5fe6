"""CPK, the paper's measure of a selection, and its adaptive allocation of M and T (Zhang et al.,
AAAI 2018, Sec. "Adaptive allocation"; its code never released it), as objects of their own.

:class:`CPKProbe` measures, on a probe of up to ``probe_size`` samples of the global batch, the mean
probability mass of the top-m classes (CPK(m), m = 1..k) and of the selected active set. The probe's
features go to the rows, never the rows to the trainer: the store's ``score`` op returns, per
feature, the log-sum-exp and the top-k of its eval logits (no margin) over the given classes, in
float64, each shard over its own rows in blocks. Over all K classes when K <= ``sample`` (exact); above,
from the active set plus a uniform sample of the other classes (:meth:`CPKProbe.sampled_mass`
states the estimator and its error). :class:`AdaptiveAllocation` turns the measurements into M
(:func:`choose_num_active`) and the index rebuild period T (:func:`next_rebuild_period`).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Stream tag of the probe's class sample (a Generator keyed by (seed, train step, tag)): apart from
# the selection's fill, keyed by (seed, train step).
_CPK_STREAM = 0x43504B

# (features [P, d], class ids [n] or None for all K, k) -> (log-sum-exp [P], top-k scores [P, <=k]),
# float64: the store's score op at the probe's step (Store.score)
Score = Callable[[np.ndarray, Optional[np.ndarray], int], tuple[np.ndarray, np.ndarray]]


def choose_num_active(curve: np.ndarray, tau_cp: float, m_min: int, m_max: int, num_classes: int) -> int:
    """Smallest M with mean CPK(M) >= tau_cp, clipped to [m_min, min(m_max, K)].

    Args:
        curve: [k] mean over samples of the top-m probability mass for m = 1..k (non-decreasing).
    """
    hi = max(1, min(int(m_max), int(num_classes)))
    lo = max(1, min(int(m_min), hi))
    reached = np.flatnonzero(np.asarray(curve) >= tau_cp)
    m = int(reached[0]) + 1 if reached.size else hi
    return int(min(max(m, lo), hi))


def next_rebuild_period(period: int, cpk_start: float, cpk_end: float, cpk_drop: float,
                        t_min: int, t_max: int) -> int:
    """T after one rebuild period: halve (>= t_min) if cpk_active fell by more than cpk_drop, else
    double (<= t_max)."""
    if cpk_start - cpk_end > cpk_drop:
        return max(int(t_min), int(period) // 2)
    return min(int(t_max), int(period) * 2)


class CPKProbe:
    """CPK of a head's selection, measured every ``every`` steps on ``probe_size`` samples.

    Args:
        num_classes: K.
        every: P, a probe every P train steps (0: never).
        probe_size: samples of the global batch in a probe.
        sample: classes a probe scores: all K when K <= sample (exact), else the active set plus a
            uniform sample of the rest.
        seed: keys the class sample (with the train step).
    """

    def __init__(self, num_classes: int, every: int, probe_size: int, sample: int, seed: int) -> None:
        self.num_classes = int(num_classes)
        self.every, self.probe_size, self.sample = int(every), int(probe_size), int(sample)
        self.seed = int(seed)

    def due(self, train_step: Optional[int]) -> bool:
        return bool(self.every and train_step is not None and train_step % self.every == 0)

    @property
    def sampled(self) -> bool:
        return self.num_classes > self.sample

    def sample_ids(self, active: np.ndarray, train_step: int) -> np.ndarray:
        """The uniform class sample S of a sampled probe: sorted ids [s] drawn without replacement from
        the classes not in ``active`` (sorted unique ids), s = min(K - |A|, max(sample - |A|,
        sample // 4, 1)). Keyed by (seed, train step) on a stream of its own (not the selection's
        fill): the same on every rank and on a rerun."""
        a = np.asarray(active, dtype=np.int64)
        n_c = self.num_classes - a.size
        s = min(n_c, max(self.sample - a.size, self.sample // 4, 1))
        if s <= 0:
            return np.empty(0, dtype=np.int64)
        rng = np.random.default_rng([self.seed, train_step, _CPK_STREAM])
        j = np.sort(rng.choice(n_c, size=s, replace=False))              # positions in the complement
        # the j-th class not in A is j + #{i : a_i - i <= j} (a sorted)
        return j + np.searchsorted(a - np.arange(a.size), j, side="right")

    @staticmethod
    def mass_over(probe: torch.Tensor, score: Score, ids: Optional[np.ndarray],
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Over the classes ``ids`` (None: all K), scored where they live: (logsumexp [P], top-k
        logits [P, <=k]), float64 on the probe's device."""
        lse, best = score(probe.detach().cpu().numpy(), ids, k)
        return (torch.from_numpy(np.asarray(lse, dtype=np.float64)).to(probe.device),
                torch.from_numpy(np.asarray(best, dtype=np.float64)).to(probe.device))

    @torch.no_grad()
    def exact_mass(self, probe: torch.Tensor, score: Score, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Over all K classes: (logsumexp [P], top-k probabilities [P, k] sorted desc)."""
        lse, best = self.mass_over(probe, score, None, min(int(k), self.num_classes))
        return lse, torch.exp(best - lse[:, None])

    @torch.no_grad()
    def sampled_mass(self, probe: torch.Tensor, score: Score, k: int, active: np.ndarray,
                     train_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`exact_mass` estimated from the active set A plus a uniform sample S of the rest:
        (log partition estimate [P], top-k probabilities [P, min(k, |A| + |S|)] sorted desc).

        For one probe sample with x_j = exp(logit_j), N = K - |A| classes outside A, s = |S|
        (:meth:`sample_ids`), the partition estimate is

            Zhat = sum_{j in A} x_j + (N / s) * sum_{j in S} x_j      (float64, in log space).

        (a) Zhat is unbiased for Z (A is fixed before S is drawn), with relative standard error

                se(Zhat) / Z = P_C * CV_C * sqrt((1 - s/N) / s)
                             <= sqrt(P_C * p_C * N (N - s) / ((N - 1) s))   ~ sqrt(P_C * N p_C / s),

            P_C = the probability mass outside A, CV_C = std / mean of x over those N classes (std
            with divisor N - 1), p_C = the largest probability outside A (the bound: sum x^2 <=
            max x * sum x). A flat remainder (N p_C ~ P_C) gives ~ P_C / sqrt(s); one strong class
            outside A makes it large. The log (what cpk_active divides by) has the same s.e. to first
            order. S is shared by the probe's samples, so their errors are correlated and the mean
            over the probe does not average them out.
        (b) The top-k are the k largest logits of A u S, each exp(logit) / Zhat: with T the true top-k,
            the result is (CPK_k - delta) * Z / Zhat with 0 <= delta <= p(T outside A u S) <= p(T outside A).
            So it is exact up to Z / Zhat (the s.e. of (a)) when T lies in A (a good index, k <= |A|),
            and low otherwise (for the random index the top-k beyond the labels are mostly missed):
            cpk_exact, and the adaptive M it drives, err on the conservative side. It never exceeds 1
            (N / s >= 1, so Zhat >= the sum over A u S).
        (c) Cost: |A| + s rows scored (``sample`` while |A| <= 3/4 sample) and P x (|A| + s) logits per
            probe, instead of K.
        """
        a = np.unique(np.asarray(active, dtype=np.int64))                         # sorted [|A|]
        samp = self.sample_ids(a, train_step)                                     # sorted [s]
        k = min(int(k), a.size + samp.size)
        lse, best = self.mass_over(probe, score, a, k)
        if samp.size:
            lse_s, best_s = self.mass_over(probe, score, samp, k)
            lse = torch.logaddexp(lse, lse_s + math.log((self.num_classes - a.size) / samp.size))
            best = torch.cat([best, best_s], dim=1).topk(k, dim=1).values
        return lse, torch.exp(best - lse[:, None])

    def curve(self, probe: torch.Tensor, score: Score, k: int, active: Optional[np.ndarray],
              train_step: int) -> tuple[torch.Tensor, np.ndarray]:
        """(log partition [P], mean CPK(m) for m = 1..k [k]): exact, or sampled around ``active``."""
        if self.sampled:
            if active is None:
                raise ValueError(f"a CPK probe at K={self.num_classes} > cpk_sample={self.sample} "
                                 f"needs this step's active ids")
            lse, probs = self.sampled_mass(probe, score, k, active, train_step)
        else:
            lse, probs = self.exact_mass(probe, score, k)
        curve = probs.cumsum(dim=1).mean(dim=0).cpu().numpy()                   # [k] mean CPK(m)
        if curve.size < k:
            # sampled with k > |A u S|: CPK(m) beyond is taken as CPK(|A u S|), a lower value
            curve = np.pad(curve, (0, k - curve.size), mode="edge")
        return lse, curve

    def active_mass(self, probe: torch.Tensor, score: Score, active: np.ndarray, lse: torch.Tensor) -> float:
        """Mean probability mass of the selected classes ``active`` on the probe (cpk_active), scored
        like the partition ``lse`` it divides by."""
        lse_a, _ = self.mass_over(probe, score, np.asarray(active, dtype=np.int64), 1)
        return float(torch.exp(lse_a - lse).mean().item())


class AdaptiveAllocation:
    """M from the CPK curve, T from how fast the selection goes stale (rules in selective.py's docstring).

    Args:
        tau_cp, m_min, m_max: the target CPK and the range of M.
        rebuild_every: T at the start; t_min, t_max: its range (defaults T // 8 and 8 T).
        cpk_drop: the fall of cpk_active within a rebuild period that halves T.
    """

    def __init__(self, tau_cp: float, m_min: int, m_max: int, rebuild_every: int, cpk_drop: float = 0.02,
                 t_min: Optional[int] = None, t_max: Optional[int] = None) -> None:
        self.tau_cp, self.m_min, self.m_max = float(tau_cp), int(m_min), int(m_max)
        self.cpk_drop = float(cpk_drop)
        self.t_min = int(t_min) if t_min is not None else max(1, int(rebuild_every) // 8)
        self.t_max = int(t_max) if t_max is not None else int(rebuild_every) * 8
        # the rebuild period being judged: index builds live at its start, first / last cpk_active
        self._builds: Optional[int] = None
        self._first: Optional[float] = None
        self._last: Optional[float] = None

    def choose_m(self, curve: np.ndarray, num_classes: int) -> int:
        return choose_num_active(curve, self.tau_cp, self.m_min, self.m_max, num_classes)

    def observe(self, cpk_active: float, builds: int, period: int) -> int:
        """One probe's cpk_active with the index's live-build count: the rebuild period T to use."""
        if self._builds is None or builds == self._builds:
            if self._builds is None:
                self._builds = builds
            if self._first is None:
                self._first = cpk_active
            self._last = cpk_active
            return period
        # A new build went live: judge the period that just ended, then start a new one.
        new_t = period
        if self._first is not None and self._last is not None:
            new_t = next_rebuild_period(period, self._first, self._last, self.cpk_drop, self.t_min, self.t_max)
            if new_t != period:
                logger.info("adaptive rebuild period: T %d -> %d (cpk_active %.3f -> %.3f)", period, new_t,
                            self._first, self._last)
        self._builds, self._first, self._last = builds, cpk_active, cpk_active
        return new_t
