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

Precision: logits, margins and the cross-entropy run in fp32 (fp64 stays fp64) with autocast off,
whatever the caller's autocast (:func:`fp32_logits`). Under CUDA's autocast the matmul would be
bf16/fp16 while ``acos`` runs in fp32 (a dtype clash in the scatter of the combined margin), and in
bf16 cos 0.9985 and 0.9995 round to the same value: at s = 64 that is ~0.1 nat of noise per logit.
The backbone keeps its low precision; only the head's [B, C] block is fp32 (as arcface_torch does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import ClassifierHead

MARGINS = ("none", "cosface", "arcface", "combined")


def logits_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64: the dtype every head computes its logits in."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype) if t.is_floating_point() else dtype
    return dtype


def fp32_logits(device: torch.device) -> torch.autocast:
    """A region without autocast on ``device``: a head's logits, margin and softmax inside it run in
    the dtype of their inputs, which the head casts to :func:`logits_dtype`."""
    return torch.autocast(device_type=device.type, enabled=False)


def _sqrt_eps(dtype: torch.dtype) -> float:
    """Smallest value clamped under a square root: 1e-12 is 0 in fp16 (an inf gradient there)."""
    return max(1e-12, torch.finfo(dtype).tiny)


def margin_param(cfg: object) -> float | tuple[float, float, float]:
    """The ``m`` of :func:`margin_logits` from a HeadConfig: margin_m, or (m1, m2, m3) for combined."""
    if getattr(cfg, "margin", None) == "combined":
        return (float(cfg.m1), float(cfg.m2), float(cfg.m3))
    return float(cfg.margin_m)


def margin_logits(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor | None,
                  margin: str, scale: float, m: float | tuple[float, float, float]) -> torch.Tensor:
    """Logits [B, C] of features [B, d] against class rows weight [C, d], in fp32 (fp64 if an input
    is fp64) with autocast off, whatever the caller's autocast (module docstring).

    Args:
        target: [B] column index of each sample's true class in ``weight`` (None: no margin, eval).
        margin: none | cosface | arcface | combined (then ``m`` is (m1, m2, m3)).
    """
    if margin not in MARGINS:
        raise ValueError(f"unknown margin '{margin}' (choose from {', '.join(MARGINS)})")
    dtype = logits_dtype(features, weight)
    with fp32_logits(features.device):
        return _margin_logits(features.to(dtype), weight.to(dtype), target, margin, scale, m)


def _margin_logits(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor | None,
                   margin: str, scale: float, m: float | tuple[float, float, float]) -> torch.Tensor:
    if margin == "none":
        return features @ weight.t()
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
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(_sqrt_eps(cos_t.dtype)))
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
        logits = self.logits(features, labels)                                  # [B, K] fp32
        with fp32_logits(logits.device):
            return F.cross_entropy(logits, labels)

    def scores_block(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return margin_logits(features, self.weight[start:end], None, self.margin, self.scale, self.margin_m)
