"""Face ResNets in the IR style (ArcFace, Deng et al. CVPR 2019; "improved residual" units).

Differences from ImageNet ResNets, all for 112x112 aligned faces: a stride-1 3x3 stem (no max-pool),
pre-activation-like units BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN with the stride on
the second conv, and an embedding head BN2d -> dropout -> flatten -> FC -> BN1d instead of global
pooling, so the spatial layout of the face survives into the embedding.
"""
from __future__ import annotations

import torch
from torch import nn

# units per stage for each depth (stages of 64, 128, 256, 512 channels, each halving the side)
RESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
}


class IRBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class FaceResNet(nn.Module):
    """IR-ResNet-{18,34,50,100}: [B, 3, S, S] -> [B, feature_dim], S = 112 by convention."""

    def __init__(self, depth: int = 50, feature_dim: int = 512, image_size: int = 112, dropout: float = 0.0,
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"face ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        if image_size % 16:
            raise ValueError(f"face ResNet needs an image_size divisible by 16, got {image_size}")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.PReLU(widths[0]))
        layers: list[nn.Module] = []
        cin = widths[0]
        for units, cout in zip(RESNET_DEPTHS[depth], widths):
            for i in range(units):
                layers.append(IRBlock(cin, cout, 2 if i == 0 else 1))
                cin = cout
        self.body = nn.Sequential(*layers)
        side = image_size // 16                       # 7 for 112x112
        self.head = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Dropout(dropout), nn.Flatten(),
            nn.Linear(cin * side * side, feature_dim), nn.BatchNorm1d(feature_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))     # [B, d]
