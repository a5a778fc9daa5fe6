"""Full softmax over all K classes, with the logits of a :class:`~hfsoftmax.heads.margin.Margin`
(plain linear, CosFace, ArcFace, combined), in fp32 whatever the autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ClassifierHead
from .margin import Margin, MarginParam, fp32_logits


class FullSoftmax(ClassifierHead):
    """Cross-entropy over all K classes; W [K, d] is an ordinary parameter on the device."""

    def __init__(self, num_classes: int, feature_dim: int, margin: str = "none", scale: float = 64.0,
                 margin_m: MarginParam = 0.35, init_std: float = 0.01, device: torch.device | str | None = None) -> None:
        super().__init__(num_classes, feature_dim)
        self.rule = Margin(margin, scale, margin_m)
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim, device=device).normal_(0.0, init_std))

    def logits(self, features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.rule.logits(features, self.weight, labels)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        logits = self.logits(features, labels)                                  # [B, K] fp32
        with fp32_logits(logits.device):
            return F.cross_entropy(logits, labels)

    def scores_block(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return self.rule.logits(features, self.weight[start:end])
