"""The one interface every classifier head follows.

``loss = head(features, labels)`` trains; ``head.scores(features)`` / ``head.topk(features, k)``
evaluate. ``scores`` returns a [B, K] tensor and is meant for small K; ``topk`` walks the classes in
blocks of ``block_size`` so that a [B, K] tensor never exists at once, which is what large-K
evaluation needs. Subclasses implement ``forward`` and ``scores_block``.
"""
from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Base class: a loss over K classes on d-dim features."""

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        if num_classes <= 0 or feature_dim <= 0:
            raise ValueError(f"num_classes and feature_dim must be positive, got {num_classes}, {feature_dim}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def scores_block(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:  # pragma: no cover
        """Scores of classes [start, end) for each feature: [B, end - start] (no margin applied)."""
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K] class scores; use :meth:`topk` when K is large."""
        return self.scores_block(features, 0, self.num_classes)

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int = 5, block_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (values, class ids) over all K classes, in blocks: memory O(B * (k + block_size))."""
        k = min(k, self.num_classes)
        best_v = best_i = None
        for start in range(0, self.num_classes, block_size):
            end = min(start + block_size, self.num_classes)
            s = self.scores_block(features, start, end)                       # [B, blk]
            v, i = s.topk(min(k, end - start), dim=1)
            i = i + start
            if best_v is None:
                best_v, best_i = v, i
            else:
                v = torch.cat([best_v, v], 1)
                i = torch.cat([best_i, i], 1)
                best_v, sel = v.topk(min(k, v.shape[1]), dim=1)  # block_size < k: fewer so far
                best_i = i.gather(1, sel)
        return best_v, best_i

    def check_features(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"{type(self).__name__}: features must be [B, {self.feature_dim}], "
                             f"got {tuple(features.shape)}")
