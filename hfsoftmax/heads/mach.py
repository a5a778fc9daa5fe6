"""MACH: Merged-Average Classifiers via Hashing.

Implements Medini, Huang, Wang, Shrivastava, "Extreme Classification in Log Memory using Count-Min
Sketch" (NeurIPS 2019), and its predecessor "Training 100,000 Classes on a Single Titan X" (WWW 2018).

K classes are folded into B buckets by R independent 2-universal hashes
``h_r(k) = ((a_r * k + b_r) mod p) mod B`` with a prime ``p > K``. Each of the R "meta-classifiers"
is a B-way softmax on the shared feature (optionally through a small hidden layer of its own) and is
trained with cross-entropy against ``h_r(y)``; the loss is the mean over r. A class is scored by the
mean over r of the probability its bucket receives, ``score(k | x) = mean_r P_r[h_r(k)](x)``. That is
a monotone form of the paper's unbiased estimator ``B / (B - 1) * (mean_r P_r[h_r(k)] - 1 / B)``, so
rankings (top-1, top-5) are identical. The classifier holds ``R * B * d`` weights instead of
``K * d``.

The hash parameters ``a, b, p`` are int64 buffers, so they live in ``state_dict()`` and a checkpoint
restores the exact class-to-bucket map. The [R, K] bucket table is never stored: hashing a block of
class ids is a few integer ops, cheaper than reading 64 MB (R = 16, K = 1M, int32) per evaluation.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .base import ClassifierHead
from .margin import fp32_logits, logits_dtype

logger = logging.getLogger(__name__)

# The Mersenne prime 2^31 - 1: larger than any K we index (class ids fit int32), and small enough that
# a * k + b < 2^62 never overflows int64 for a, b < p and k < p.
MERSENNE_31 = 2_147_483_647
_COUNT_BLOCK = 1 << 20       # class ids hashed at once when checking that every bucket is non-empty


def default_num_buckets(num_classes: int, num_hashes: int) -> int:
    """B when the config leaves ``num_buckets = 0``: ``min(ceil(sqrt(K)), (K - 1) // (2R))``, at least 2.

    Why sqrt(K): each bucket then holds about sqrt(K) classes and the whole head holds
    ``R * sqrt(K) * d`` weights (K = 1M, R = 16: B = 1000, 1.6% of full softmax; K = 100K: B = 317,
    5%), in the range of the authors' settings (R = 16..32, B of hundreds to thousands). Two classes
    collide in all R tables with probability ``B^-R``, negligible at these sizes, so the estimator can
    still tell every class apart. The cap ``(K - 1) // (2R)`` keeps ``R * B <= K / 2`` for small K, so
    MACH always saves at least half of the classifier memory.
    """
    cap = (num_classes - 1) // (2 * num_hashes)
    b = min(math.isqrt(num_classes - 1) + 1, cap)
    if b < 2:
        raise ConfigError(f"MACH: K = {num_classes} classes is too few for R = {num_hashes} hashes "
                         f"(need R * B < K with B >= 2, i.e. K > {4 * num_hashes}; lower head.mach.num_hashes)")
    return b


class MachHead(ClassifierHead):
    """R independent B-way softmax classifiers over hashed labels; class score = mean bucket probability.

    Args:
        num_classes: K.
        feature_dim: d.
        num_hashes: R, the number of independent hashes / meta-classifiers.
        num_buckets: B, buckets per hash (2 <= B <= K).
        hidden: >0 puts a hidden layer (Linear d->hidden, ReLU) in front of each meta-classifier.
        seed: draws the hash parameters (and nothing else: weights use the global torch RNG).
        identity_hash: tests only: ``h_r(k) = k`` for every r (needs B == K), which makes R = 1 exactly
            full softmax. Requires ``allow_no_gain``.
        allow_no_gain: permit ``R * B >= K`` (no memory saving). Tests only; never set from a config.
        init_std: std of the normal initialisation of the weights (as in FullSoftmax).
        max_redraws: per hash, how many draws of (a, b) to try before giving up on filling every bucket.
        device: where the weights and hash buffers live.
    """

    def __init__(self, num_classes: int, feature_dim: int, num_hashes: int, num_buckets: int, hidden: int = 0,
                 seed: int = 0, identity_hash: bool = False, allow_no_gain: bool = False, init_std: float = 0.01,
                 max_redraws: int = 100, device: torch.device | str | None = None) -> None:
        super().__init__(num_classes, feature_dim)
        R, B, K = num_hashes, num_buckets, num_classes
        if R < 1:
            raise ValueError(f"MACH: num_hashes R must be >= 1, got {R}")
        if B < 2 or B > K:
            raise ValueError(f"MACH: num_buckets B must be in [2, K = {K}], got {B}")
        if hidden < 0:
            raise ValueError(f"MACH: hidden must be >= 0, got {hidden}")
        if K >= MERSENNE_31:
            raise ValueError(f"MACH: K = {K} must be below the hash prime p = {MERSENNE_31}")
        if R * B >= K and not allow_no_gain:
            raise ValueError(f"MACH: R * B = {R} * {B} = {R * B} is not smaller than K = {K}; MACH would use "
                             f"at least as much classifier memory as full softmax (lower num_hashes or num_buckets)")
        if identity_hash and B != K:
            raise ValueError(f"MACH: identity_hash needs num_buckets == num_classes, got B = {B}, K = {K}")
        if identity_hash and not allow_no_gain:
            raise ValueError("MACH: identity_hash is a test device and needs allow_no_gain=True")
        self.num_hashes, self.num_buckets, self.hidden, self.seed = R, B, hidden, seed

        a, b = self._draw_hashes(R, B, K, seed, identity_hash, max_redraws)
        self.register_buffer("hash_a", a.to(device))                                    # [R] int64
        self.register_buffer("hash_b", b.to(device))                                    # [R] int64
        self.register_buffer("hash_p", torch.tensor(MERSENNE_31, dtype=torch.int64, device=device))

        in_dim = hidden if hidden > 0 else feature_dim
        if hidden > 0:
            # Per-head hidden layer: [R, H, d] weights and [R, H] biases, applied with one einsum.
            self.hidden_weight = nn.Parameter(
                torch.empty(R, hidden, feature_dim, device=device).normal_(0.0, 1.0 / math.sqrt(feature_dim)))
            self.hidden_bias = nn.Parameter(torch.zeros(R, hidden, device=device))
        else:
            self.register_parameter("hidden_weight", None)
            self.register_parameter("hidden_bias", None)
        # No bias in the output layer, like FullSoftmax: with identity hashes and R = 1 the two coincide.
        self.weight = nn.Parameter(torch.empty(R, B, in_dim, device=device).normal_(0.0, init_std))  # [R, B, in]
        logger.info("MACH head: K=%d R=%d B=%d hidden=%d, %d parameters = %.4f x full softmax (%d)",
                    K, R, B, hidden, self.num_parameters(), self.param_ratio(), K * feature_dim)

    # ----------------------------------------------------------------------------------------- #
    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, feature_dim: int, device: torch.device | str | None = None,
                    seed: int = 0) -> "MachHead":
        """Build from a :class:`hfsoftmax.config.HeadConfig` (``cfg.mach``: num_hashes, num_buckets, hidden).

        ``num_buckets = 0`` picks B with :func:`default_num_buckets`. A config whose R * B is not
        smaller than K is refused (ValueError naming R, B and K).
        """
        mc = cfg.mach
        R = mc.num_hashes
        if R < 1:
            raise ConfigError(f"head.mach.num_hashes must be >= 1, got {R}")
        B = mc.num_buckets if mc.num_buckets > 0 else default_num_buckets(num_classes, R)
        if R * B >= num_classes:
            raise ConfigError(f"head.mach: R * B = {R} * {B} = {R * B} is not smaller than K = {num_classes}; "
                             f"MACH gains nothing over full softmax (lower head.mach.num_hashes or num_buckets)")
        return cls(num_classes, feature_dim, num_hashes=R, num_buckets=B, hidden=mc.hidden, seed=seed, device=device)

    @staticmethod
    def _draw_hashes(R: int, B: int, K: int, seed: int, identity: bool, max_redraws: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (a_r, b_r), a_r in [1, p), b_r in [0, p), redrawing each r until all B buckets are used."""
        if identity:
            return torch.ones(R, dtype=torch.int64), torch.zeros(R, dtype=torch.int64)
        g = torch.Generator().manual_seed(seed)
        a = torch.empty(R, dtype=torch.int64)
        b = torch.empty(R, dtype=torch.int64)
        for r in range(R):
            for attempt in range(max_redraws):
                ar = int(torch.randint(1, MERSENNE_31, (1,), generator=g))
                br = int(torch.randint(0, MERSENNE_31, (1,), generator=g))
                counts = torch.zeros(B, dtype=torch.int64)
                for start in range(0, K, _COUNT_BLOCK):
                    k = torch.arange(start, min(start + _COUNT_BLOCK, K), dtype=torch.int64)
                    counts += torch.bincount(((ar * k + br) % MERSENNE_31) % B, minlength=B)
                if bool((counts > 0).all()):
                    break
            else:
                raise ValueError(f"MACH: hash {r} left a bucket empty in {max_redraws} draws "
                                 f"(K = {K} classes into B = {B} buckets; lower B)")
            a[r], b[r] = ar, br
        return a, b

    # ----------------------------------------------------------------------------------------- #
    def buckets(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Bucket of each class id under every hash: [n] int -> [R, n] int64."""
        k = class_ids.to(device=self.hash_a.device, dtype=torch.int64)
        return ((self.hash_a[:, None] * k[None, :] + self.hash_b[:, None]) % self.hash_p) % self.num_buckets

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_ratio(self) -> float:
        """Classifier parameters relative to full softmax's K * d."""
        return self.num_parameters() / float(self.num_classes * self.feature_dim)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Bucket logits of every meta-classifier: features [N, d] -> [R, N, B]."""
        self.check_features(features)
        dtype = logits_dtype(features, self.weight)
        with fp32_logits(features.device):       # fp32 whatever the caller's autocast (heads/full.py)
            h = features.to(dtype)
            if self.hidden_weight is not None:
                # [N, d] x [R, H, d] -> [R, N, H]
                h = F.relu(torch.einsum("nd,rhd->rnh", h, self.hidden_weight.to(dtype))
                           + self.hidden_bias[:, None, :].to(dtype))
                return torch.einsum("rnh,rbh->rnb", h, self.weight.to(dtype))
            return torch.einsum("nd,rbd->rnb", h, self.weight.to(dtype))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over r of cross-entropy(logits_r, h_r(y))."""
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"MACH: labels must be [{features.shape[0]}], got {tuple(labels.shape)}")
        if labels.numel() and labels.device.type == "cpu" and (int(labels.min()) < 0
                                                               or int(labels.max()) >= self.num_classes):
            # A hash maps any integer somewhere, so an out-of-range label would train silently wrong.
            # Checked here for host labels only: on an accelerator the two int() would be host syncs
            # every step; the train loop checks each batch's host labels (train.check_labels) instead.
            raise ValueError(f"MACH: labels must lie in [0, {self.num_classes}), got min {int(labels.min())}, "
                             f"max {int(labels.max())}")
        logits = self.logits(features)                                          # [R, N, B]
        targets = self.buckets(labels)                                          # [R, N]
        # Every r has the same N, so the mean over R * N rows is the mean over r of per-head means.
        with fp32_logits(logits.device):
            return F.cross_entropy(logits.reshape(-1, self.num_buckets), targets.reshape(-1))

    def bucket_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Softmax over buckets per meta-classifier: [R, N, B]."""
        return self.logits(features).softmax(dim=-1)

    def _gather(self, probs: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """mean_r probs[r, :, h_r(k)] for k in [start, end): [N, end - start].

        Accumulates one hash at a time, so memory is O(N * (end - start)), never O(R * N * block).
        """
        if not 0 <= start < end <= self.num_classes:
            raise ValueError(f"MACH: class range [{start}, {end}) is not inside [0, {self.num_classes})")
        idx = self.buckets(torch.arange(start, end, device=probs.device))       # [R, blk]
        out = probs[0][:, idx[0]]                                               # [N, blk]
        for r in range(1, self.num_hashes):
            out += probs[r][:, idx[r]]
        return out / self.num_hashes

    def scores_block(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Class scores mean_r P_r[h_r(k)](x) of classes [start, end): [N, end - start]."""
        return self._gather(self.bucket_probs(features), start, end)

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int = 5, block_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, class ids) over all K, in class blocks; bucket probabilities computed once."""
        probs = self.bucket_probs(features)                                     # [R, N, B]
        k = min(k, self.num_classes)
        best_v = best_i = None
        for start in range(0, self.num_classes, block_size):
            end = min(start + block_size, self.num_classes)
            v, i = self._gather(probs, start, end).topk(min(k, end - start), dim=1)
            i = i + start
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                v, sel = v.topk(min(k, v.shape[1]), dim=1)  # block_size < k: fewer so far
                i = i.gather(1, sel)
            best_v, best_i = v, i
        return best_v, best_i

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, R={self.num_hashes}, "
                f"B={self.num_buckets}, hidden={self.hidden}, param_ratio={self.param_ratio():.4f}")
