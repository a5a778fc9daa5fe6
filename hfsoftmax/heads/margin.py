"""The logit rule every head uses: plain linear, CosFace, ArcFace, or InsightFace's combined margin.

- Plain: logits = F @ W^T (no normalisation, no scale).
- CosFace / LMCL (Wang et al., CVPR 2018): target logit s * (cos(theta) - m).
- ArcFace (Deng et al., CVPR 2019): target logit s * cos(theta + m); where theta + m > pi the
  function would stop decreasing, so past that point the target logit is s * (cos(theta) - m sin(m)),
  the usual monotone continuation.
- Combined (InsightFace): target logit s * (cos(m1 * theta + m2) - m3), with ``m = (m1, m2, m3)``;
  ArcFace is (1, m, 0) (up to its continuation past pi), CosFace (1, 0, m), SphereFace-style
  multiplicative margins m1 > 1. As in InsightFace, no continuation: keep m1 * theta + m2 <= pi.
Non-target logits are s * cos(theta). One :class:`Margin` object holds the rule and its parameters,
checked once; the full, selective, RP heads and the CPK probe all call it, so they compute the same
thing. MACH and RP train with the plain rule only (:func:`normalize_margin`, the one place that says so).

Precision: logits, margins and the cross-entropy run in fp32 (fp64 stays fp64) with autocast off,
whatever the caller's autocast (:func:`fp32_logits`). Under CUDA's autocast the matmul would be
bf16/fp16 while ``acos`` runs in fp32 (a dtype clash in the scatter of the combined margin), and in
bf16 cos 0.9985 and 0.9995 round to the same value: at s = 64 that is ~0.1 nat of noise per logit.
The backbone keeps its low precision; only the head's [B, C] block is fp32 (as arcface_torch does).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MARGINS = ("none", "cosface", "arcface", "combined")
# Heads whose classifier is a plain softmax by construction, and why: a margin in their config is
# replaced by "none" (with a warning), so that "head.name=mach" on a CosFace config just works.
PLAIN_ONLY = {"mach": "its meta-classifiers are plain softmaxes over buckets",
              "rp": "its classifier recovery assumes a plain softmax"}

MarginParam = Union[float, tuple[float, float, float]]


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


def check_margin(kind: str) -> str:
    if kind not in MARGINS:
        raise ValueError(f"unknown margin '{kind}' (choose from {', '.join(MARGINS)})")
    return kind


def index_metric(kind: str) -> str:
    """Index metric for a head's logits: inner product for plain linear, cosine for margin heads."""
    return "dot" if check_margin(kind) == "none" else "angular"


def normalize_margin(head_cfg: Any) -> Any:
    """THE rule for heads that train a plain softmax only (:data:`PLAIN_ONLY`): their config's margin
    becomes "none", with a warning, so the run's saved config says what it trained. Returns the config."""
    why = PLAIN_ONLY.get(head_cfg.name)
    if why is not None and head_cfg.margin != "none":
        logger.warning("head.margin=%s does not apply to head.name=%s (%s): training it with a plain softmax "
                       "(head.margin=none)", head_cfg.margin, head_cfg.name, why)
        head_cfg.margin = "none"
    return head_cfg


@dataclass(frozen=True)
class Margin:
    """A head's logit rule: ``kind`` (none | cosface | arcface | combined), scale ``s``, and ``m``
    (a float; (m1, m2, m3) for combined). Checked when built."""

    kind: str = "none"
    scale: float = 64.0
    m: MarginParam = 0.35

    def __post_init__(self) -> None:
        check_margin(self.kind)
        if self.kind == "combined":
            if not (isinstance(self.m, (tuple, list)) and len(self.m) == 3):
                raise ValueError(f"the combined margin needs m = (m1, m2, m3), got {self.m!r}")
            object.__setattr__(self, "m", tuple(float(v) for v in self.m))
        else:
            object.__setattr__(self, "m", float(self.m))
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def from_config(cls, head_cfg: Any) -> "Margin":
        """From a :class:`hfsoftmax.config.HeadConfig`: margin, scale, margin_m or (m1, m2, m3)."""
        m = ((head_cfg.m1, head_cfg.m2, head_cfg.m3) if head_cfg.margin == "combined" else head_cfg.margin_m)
        return cls(head_cfg.margin, head_cfg.scale, m)

    @property
    def metric(self) -> str:
        return index_metric(self.kind)

    @property
    def eval_scale(self) -> float | None:
        """The eval logits as a store scores them (``Store.score``): None for ``F @ W^T`` (plain),
        else the scale of ``s * cos``."""
        return None if self.kind == "none" else self.scale

    def logits(self, features: torch.Tensor, weight: torch.Tensor,
               target: torch.Tensor | None = None, partial: bool = False) -> torch.Tensor:
        """Logits [B, C] of features [B, d] against class rows weight [C, d], in fp32 (fp64 if an input
        is fp64) with autocast off, whatever the caller's autocast.

        Args:
            target: [B] column index of each sample's true class in ``weight`` (None: no margin, eval).
            partial: ``weight`` is a part of the classes (a rank's shard): a target of -1 means the
                sample's class is elsewhere, and its row gets no margin here.
        """
        dtype = logits_dtype(features, weight)
        with fp32_logits(features.device):
            return self._logits(features.to(dtype), weight.to(dtype), target, partial)

    def _logits(self, features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor | None,
                partial: bool = False) -> torch.Tensor:
        if self.kind == "none":
            return features @ weight.t()
        cos = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t()        # [B, C]
        if target is None or cos.shape[1] == 0:
            return self.scale * cos
        here = None
        if partial:
            here, target = (target >= 0)[:, None], target.clamp_min(0)
        cos_t = cos.gather(1, target[:, None]).clamp(-1.0, 1.0)                    # [B, 1]
        if self.kind == "combined":
            m1, m2, m3 = self.m
            theta = torch.acos(cos_t.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
            new_t = torch.cos(m1 * theta + m2) - m3
        elif self.kind == "cosface":
            new_t = cos_t - self.m
        else:
            m = self.m
            sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(_sqrt_eps(cos_t.dtype)))
            phi = cos_t * math.cos(m) - sin_t * math.sin(m)                       # cos(theta + m)
            # theta + m > pi  <=>  cos(theta) < cos(pi - m)
            new_t = torch.where(cos_t > math.cos(math.pi - m), phi, cos_t - m * math.sin(m))
        if here is not None:      # rows whose class another rank holds: their column 0 written back as is
            new_t = torch.where(here, new_t, cos.gather(1, target[:, None]))
        return self.scale * cos.scatter(1, target[:, None], new_t)


def margin_logits(features: torch.Tensor, weight: torch.Tensor, target: torch.Tensor | None,
                  margin: str, scale: float, m: MarginParam) -> torch.Tensor:
    """:meth:`Margin.logits` as a function: ``Margin(margin, scale, m).logits(features, weight, target)``."""
    return Margin(margin, scale, m).logits(features, weight, target)
