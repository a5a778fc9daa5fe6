"""A tiny CNN for CPU demos and tests: three conv stages, global pooling, FC, BN embedding."""
from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Small enough to train thousands of steps on 2 CPU cores at 32x32 input."""

    def __init__(self, feature_dim: int = 128, image_size: int = 32, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"TinyNet needs an image_size divisible by 4, got {image_size}")
        if norm not in ("batch", "group"):
            raise ValueError(f"TinyNet norm must be 'batch' or 'group', got '{norm}'")
        if width < 1 or (norm == "group" and width % 8):
            raise ValueError(f"TinyNet width must be a positive integer (a multiple of 8 with norm=group), got {width}")

        def norm2d(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(8, c)

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, width, 1), block(width, width, 1),
            block(width, 2 * width, 2), block(2 * width, 2 * width, 1),
            block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)        # keeps a little spatial layout: [B, 4w, 2, 2]
        self.fc = nn.Linear(4 * width * 4, feature_dim)
        self.bn = nn.BatchNorm1d(feature_dim) if norm == "batch" else nn.LayerNorm(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # [B, 16w]
        return self.bn(self.fc(x))                  # [B, d]
