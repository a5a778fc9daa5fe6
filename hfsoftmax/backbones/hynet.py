"""Hynet: the small VGG-like network of the HF-softmax paper (Zhang et al., AAAI 2018).

3x3 conv stages separated by four 2x2 max-pools, then a 1x1 conv down to 256 channels and an FC
to the feature dimension (BN after the FC, as for the face ResNets).
"""
from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Hynet(nn.Module):
    def __init__(self, feature_dim: int = 256, image_size: int = 112, dropout: float = 0.0,
                 widths: tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)) -> None:
        super().__init__()
        if image_size % 16:
            raise ValueError(f"Hynet needs an image_size divisible by 16, got {image_size}")
        w = widths
        self.features = nn.Sequential(
            _conv(3, w[0]), _conv(w[0], w[1]), nn.MaxPool2d(2),
            _conv(w[1], w[1]), _conv(w[1], w[2]), nn.MaxPool2d(2),
            _conv(w[2], w[2]), _conv(w[2], w[3]), nn.MaxPool2d(2),
            _conv(w[3], w[3]), _conv(w[3], w[4]), nn.MaxPool2d(2),
            _conv(w[4], 256, k=1),
        )
        side = image_size // 16
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(256 * side * side, feature_dim),
                                   nn.BatchNorm1d(feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))
