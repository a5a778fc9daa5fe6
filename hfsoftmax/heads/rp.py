"""Random-projection softmax and the recovery of the full classifier by dual random projection.

Follows the abstract of Yuan et al., "Accelerating Deep Learning with Millions of Classes" (ECCV 2020):
train a slimmed model whose softmax classifier sees a randomly projected feature, then recover the
original classifier. The paper body is not available to us; the recovery implemented here is ours and
follows *dual random projection* (Zhang, Mahdavi, Jin, Yang, Zhu, "Recovering the Optimal Solution
by Dual Random Projection", COLT 2013).

Training. A fixed Gaussian matrix ``P`` [d, m] (entries N(0, 1/m), so ``E[P P^T] = I``; drawn from a
seed and saved as a buffer) projects the feature, and the trained classifier is ``W_s`` [K, m]:
``logits = (x P) W_s^T``. The head costs m/d of full softmax in memory and arithmetic.

Recovery (after training, backbone fixed). Write the full problem as L2-regularised softmax
regression ``min_W (1/n) sum_i CE(W x_i, y_i) + (lambda / 2) ||W||^2``. Its optimality condition is
``W* = -(1 / (lambda n)) sum_i (p*_i - y_i) x_i^T``, where ``p*_i`` are the optimum's class
probabilities: the vectors ``p*_i - y_i`` are the dual variables. The projected problem (same loss and
lambda on features ``P^T x_i``) has dual variables ``p_i - y_i`` that approximate the full ones when
the data are close to low rank (Zhang et al., Theorem 1: relative error O(sqrt(r / m)) for rank r), so

    W_hat = -(1 / (lambda n)) * sum_i (p_i - y_i) x_i^T

with the *slim* model's probabilities ``p_i`` and the *full* d-dim features ``x_i`` recovers a K x d
classifier close to W*. SGD with weight decay ``lambda`` minimises exactly this objective (the
decay is the gradient of (lambda/2)||W||^2), so ``optim.weight_decay`` is the lambda to use, and n is
the number of training samples. The theory is for the plain softmax: CosFace/ArcFace margins are
accepted for training but :func:`recover_classifier` refuses them.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .base import ClassifierHead
from .full import FullSoftmax
from .margin import Margin, MarginParam, fp32_logits, logits_dtype

logger = logging.getLogger(__name__)


class RPSoftmax(ClassifierHead):
    """Softmax over K classes on a fixed random projection of the feature: logits = (F P) W^T.

    Args:
        num_classes: K.
        feature_dim: d, the backbone's feature size.
        proj_dim: m < d, the projected size the classifier sees.
        seed: draws P (and only P).
        margin, scale, margin_m: a :class:`~hfsoftmax.heads.margin.Margin`, applied to the projected
            feature (recovery supports margin="none" only; the train loop trains RP plain).
        init_std: std of the normal initialisation of W [K, m].
        device: where W and P live.
    """

    def __init__(self, num_classes: int, feature_dim: int, proj_dim: int, seed: int = 0, margin: str = "none",
                 scale: float = 64.0, margin_m: MarginParam = 0.35, init_std: float = 0.01,
                 device: torch.device | str | None = None) -> None:
        super().__init__(num_classes, feature_dim)
        if proj_dim <= 0 or proj_dim >= feature_dim:
            raise ValueError(f"RP softmax: proj_dim m = {proj_dim} must satisfy 0 < m < d = {feature_dim} "
                             f"(m >= d gains nothing over full softmax)")
        self.rule = Margin(margin, scale, margin_m)
        self.proj_dim, self.seed = proj_dim, seed
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(feature_dim, proj_dim, generator=g) / math.sqrt(proj_dim)   # [d, m], E[P P^T] = I
        self.register_buffer("proj", proj.to(device))
        self.weight = nn.Parameter(torch.empty(num_classes, proj_dim, device=device).normal_(0.0, init_std))
        logger.info("RP softmax: K=%d d=%d m=%d, classifier %d parameters = %.4f x full softmax",
                    num_classes, feature_dim, proj_dim, self.weight.numel(), proj_dim / feature_dim)

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int, feature_dim: int, device: torch.device | str | None = None,
                    seed: int = 0) -> "RPSoftmax":
        """Build from a :class:`hfsoftmax.config.HeadConfig` (``cfg.rp.proj_dim``, margin settings)."""
        m = cfg.rp.proj_dim
        if m <= 0 or m >= feature_dim:
            raise ConfigError(f"head.rp.proj_dim m = {m} must satisfy 0 < m < model.feature_dim d = {feature_dim} "
                             f"(m >= d gains nothing over full softmax)")
        rule = Margin.from_config(cfg)
        return cls(num_classes, feature_dim, m, seed=seed, margin=rule.kind, scale=rule.scale, margin_m=rule.m,
                   device=device)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B, m], in fp32 with autocast off (the head's logits are fp32, see heads/full.py)."""
        self.check_features(features)
        dtype = logits_dtype(features, self.proj)
        with fp32_logits(features.device):
            return features.to(dtype) @ self.proj.to(dtype)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.rule.logits(self.project(features), self.weight, labels)
        with fp32_logits(logits.device):
            return F.cross_entropy(logits, labels)

    def scores_block(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return self.rule.logits(self.project(features), self.weight[start:end])

    def param_ratio(self) -> float:
        """Trained classifier parameters relative to full softmax's K * d (P is fixed, not trained)."""
        return self.proj_dim / self.feature_dim

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, proj_dim={self.proj_dim}, "
                f"margin={self.rule.kind}")


def _check_recoverable(head: ClassifierHead) -> None:
    if not isinstance(head, (RPSoftmax, FullSoftmax)):
        raise TypeError(f"recover_classifier needs an RPSoftmax (or a FullSoftmax, whose recovery is the "
                        f"identity at its optimum), got {type(head).__name__}")
    if head.rule.kind != "none":
        raise ValueError(f"recover_classifier: the dual-random-projection recovery holds for the plain "
                         f"L2-regularised softmax; this head has margin '{head.rule.kind}'")


@torch.no_grad()
def recover_classifier(head: ClassifierHead, feature_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       weight_decay: float, num_samples: int | None = None, class_block: int = 65536,
                       out_dtype: torch.dtype | None = None, out_device: torch.device | str | None = None
                       ) -> torch.Tensor:
    """Recover the K x d classifier ``W_hat = -(1/(lambda n)) sum_i (p_i - y_i) x_i^T`` in one pass.

    Args:
        head: the trained slim model (an :class:`RPSoftmax`, margin "none"). A :class:`FullSoftmax`
            is accepted too: at the optimum of the full problem the formula returns its weights exactly.
        feature_batches: iterable of (features [b, d] full backbone features, labels [b]), the
            training set, each sample once, with the backbone fixed.
        weight_decay: lambda, the L2 coefficient the head was trained with (optim.weight_decay).
        num_samples: n; None -> the number of samples seen in ``feature_batches``.
        class_block: classes scored at once: memory per batch is O(b * class_block) beyond the output.
        out_dtype: accumulation/output dtype (default: the first batch's feature dtype).
        out_device: where the [K, d] result accumulates (default: the head's device).

    Returns:
        W_hat [K, d].

    The probabilities need the softmax normaliser over all K first, so each batch is scored twice in
    class blocks: a pass for the log-sum-exp [b], then a pass adding ``(p - y)^T x`` block by block.
    """
    _check_recoverable(head)
    if not weight_decay > 0:
        raise ValueError(f"recover_classifier: weight_decay (lambda) must be > 0, got {weight_decay}")
    if class_block <= 0:
        raise ValueError(f"recover_classifier: class_block must be positive, got {class_block}")
    K, d = head.num_classes, head.feature_dim
    device = head.weight.device
    acc: torch.Tensor | None = None
    seen = 0
    for features, labels in feature_batches:
        features = features.to(device)
        labels = labels.to(device)
        head.check_features(features)
        if labels.shape != (features.shape[0],):
            raise ValueError(f"recover_classifier: labels must be [{features.shape[0]}], got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= K):
            raise ValueError(f"recover_classifier: labels must lie in [0, {K}), got min {int(labels.min())}, "
                             f"max {int(labels.max())}")
        if acc is None:
            acc = torch.zeros(K, d, dtype=out_dtype or features.dtype, device=out_device or device)
        x = features.to(acc.dtype)
        # Pass 1: log of the softmax normaliser over all K, [b], accumulated over class blocks.
        lse = torch.full((features.shape[0],), -math.inf, dtype=features.dtype, device=device)
        for start in range(0, K, class_block):
            end = min(start + class_block, K)
            lse = torch.logaddexp(lse, head.scores_block(features, start, end).logsumexp(dim=1))
        # Pass 2: sum_i (p_i - y_i) x_i^T for the classes of each block: [blk, b] @ [b, d].
        for start in range(0, K, class_block):
            end = min(start + class_block, K)
            resid = (head.scores_block(features, start, end) - lse[:, None]).exp()       # [b, blk] = p
            inside = (labels >= start) & (labels < end)
            rows = inside.nonzero(as_tuple=True)[0]
            resid[rows, labels[rows] - start] -= 1.0                                      # p - y
            acc[start:end] += (resid.t().to(acc.dtype) @ x).to(acc.device)               # [blk, d]
        seen += features.shape[0]
    if acc is None or seen == 0:
        raise ValueError("recover_classifier: feature_batches yielded no samples")
    n = seen if num_samples is None else num_samples
    if n <= 0:
        raise ValueError(f"recover_classifier: num_samples must be positive, got {n}")
    acc.mul_(-1.0 / (weight_decay * n))
    logger.info("recovered a %d x %d classifier from %d samples (n = %d, lambda = %g)", K, d, seen, n, weight_decay)
    return acc
