"""Full softmax over all K classes, with plain-linear, CosFace or ArcFace logits.

- CosFace / LMCL (Wang et al., CVPR 2018): target logit s * (cos(theta) - m).
- Combined (InsightFace): target logit s * (cos(m1 * theta + m2) - m3), with ``m = (m1, m2, m3)``;
  ArcFace is (1, m, 0) (up to its continuation past pi), CosFace (1, 0, m), SphereFace-style
  multiplicative margins m1 > 1. As in InsightFace, no continuation: keep m1 * theta + m2 <= pi.
- ArcFace (Deng et al., CVPR 2019): target logit s * cos(theta + m); where theta + m > pi the
  function would stop decreasing, so past that point the target logit is s * (cos(theta) - m sin(m)),
  the usual monotone continuation.
Non-target logits are s * cos(theta). Plain: logits = F @ W^T (no normalisation, no scale).
``margin_logits`` is shared with the selective (HF-softmax) head so both compute the same thing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import ClassifierHead

MARGINS = ("none", "cosface", "arcface", "combined")


def margin_param(cfg: object) -> float | tuple[float, float, float]:
    """The ``m`` of :func:`margin_logits` from a HeadConfig: margin_m, or (m1, m2, m3) for combined."""
    if getattr(cfg, "margin", None) == "combined":
        return (float(cfg.m1), float(cfg.m2), float(cfg.m3))
    return float(cfg.margin_m)


def margin_logits(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor | None,
                  margin: str, scale: float, m: float | tuple[float, float, float]) -> torch.Tensor:
    """Logits [B, C] of features [B, d] against class rows weight [C, d].

    Args:
        target: [B] column index of each sample's true class in ``weight`` (None: no margin, eval).
        margin: none | cosface | arcface | combined (then ``m`` is (m1, m2, m3)).
    """
    if margin == "none":
        return features @ weight.t()
    if margin not in MARGINS:
        raise ValueError(f"unknown margin '{margin}' (choose from {', '.join(MARGINS)})")
    cos = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t()        # [B, C]
    if target is None:
        return scale * cos
    cos_t = cos.gather(1, target[:, None]).clamp(-1.0, 1.0)                    # [B, 1]
    if margin == "combined":
        m1, m2, m3 = m
        theta = torch.acos(cos_t.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        new_t = torch.cos(m1 * theta + m2) - m3
    elif margin == "cosface":
        new_t = cos_t - m
    else:
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(1e-12))
        phi = cos_t * math.cos(m) - sin_t * math.sin(m)                       # cos(theta + m)
        # theta + m > pi  <=>  cos(theta) < cos(pi - m)
        new_t = torch.where(cos_t > math.cos(math.pi - m), phi, cos_t - m * math.sin(m))
    logits = cos.scatter(1, target[:, None], new_t)
    return scale * logits


class FullSoftmax(ClassifierHead):
    """Cross-entropy over all K classes; W [K, d] is an ordinary parameter on the device."""

    def __init__(self, num_classes: int, feature_dim: int, margin: str = "none", scale: float = 64.0,
                 margin_m: float = 0.35, init_std: float = 0.01, device: torch.device | str | None = None) -> None:
        super().__init__(num_classes, feature_dim)
        if margin not in MARGINS:
            raise ValueError(f"unknown margin '{margin}' (choose from {', '.join(MARGINS)})")
        self.margin, self.scale, self.margin_m = margin, scale, margin_m
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim, device=device).normal_(0.0, init_std))

    def logits(self, features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return margin_logits(features, self.weight, labels, self.margin, self.scale, self.margin_m)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        return F.cross_entropy(self.logits(features, labels), labels)

    def scores_block(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return margin_logits(features, self.weight[start:end], None, self.margin, self.scale, self.margin_m)
