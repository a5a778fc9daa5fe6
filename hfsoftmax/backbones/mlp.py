"""Backbones over precomputed features ([B, d_in] float32, not images): the extreme-classification
setting where a fixed encoder's embeddings are classified (MACH, PECOS and their benchmarks).

* ``Identity``: the features are the embedding (d_in must equal model.feature_dim).
* ``MLPProjector``: d_in -> hidden -> feature_dim, Linear + BN + ReLU then Linear + BN (the BN on the
  embedding as in the face nets' heads, so margin heads see centred features).
"""
from __future__ import annotations

import torch
from torch import nn


class Identity(nn.Module):
    """[B, d] -> [B, d]: train only the classifier over fixed features."""

    def __init__(self, feature_dim: int, input_dim: int) -> None:
        super().__init__()
        if input_dim != feature_dim:
            raise ValueError(f"model.backbone=identity passes the features through, so model.feature_dim "
                             f"({feature_dim}) must equal the features' width d_in ({input_dim})")
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"identity backbone expects features [B, {self.feature_dim}], got {tuple(x.shape)}")
        return x


class MLPProjector(nn.Module):
    """[B, input_dim] -> [B, feature_dim] through one hidden layer of ``hidden`` units."""

    def __init__(self, feature_dim: int, input_dim: int, hidden: int = 0) -> None:
        super().__init__()
        if input_dim <= 0:
            raise ValueError("model.backbone=mlp needs the features' width: set model.input_dim or train on a "
                             "features file (data.path=feats.npy)")
        hidden = hidden or max(input_dim, feature_dim)
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, feature_dim, bias=False), nn.BatchNorm1d(feature_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [B, input_dim] -> [B, feature_dim]
        return self.net(x)
