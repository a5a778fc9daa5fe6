"""MobileFaceNet (Chen et al., CCBR 2018, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices"): a MobileNetV2-style net for 112x112 faces, about 1M parameters.

conv3x3/2 (64) -> depthwise conv3x3 (64) -> inverted-residual bottlenecks (expansion t, output c,
repeats n, first stride s): (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2),
(2, 128, 2, 1) -> conv1x1 (512) -> global depthwise conv 7x7 ("GDC", linear) -> conv1x1 to the
feature dim (linear) -> BN. PReLU activations, as in the paper. ``arcface_torch``'s ``mbf`` is a
variant of this net; its weights are not mapped here.
"""
from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), the paper's Table 1
SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


def _conv_bn(cin: int, cout: int, k: int, s: int, groups: int = 1, act: bool = True,
             pad: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2 if pad is None else pad, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        mid = cin * t
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(_conv_bn(cin, mid, 1, 1), _conv_bn(mid, mid, 3, stride, groups=mid),
                                  _conv_bn(mid, cout, 1, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """[B, 3, S, S] -> [B, feature_dim]; S divisible by 16 (7 x 7 before the GDC at 112)."""

    def __init__(self, feature_dim: int = 128, image_size: int = 112) -> None:
        super().__init__()
        if image_size % 16:
            raise ValueError(f"MobileFaceNet needs an image_size divisible by 16, got {image_size}")
        layers: list[nn.Module] = [_conv_bn(3, 64, 3, 2), _conv_bn(64, 64, 3, 1, groups=64)]
        cin = 64
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 512, 1, 1))
        self.body = nn.Sequential(*layers)
        side = image_size // 16
        self.gdc = _conv_bn(512, 512, side, 1, groups=512, act=False, pad=0)   # global depthwise: [B, 512, 1, 1]
        # a 1x1 conv over the [B, 512, 1, 1] GDC output, then BN1d
        self.embed = nn.Sequential(nn.Conv2d(512, feature_dim, 1, bias=False), nn.Flatten(),
                                   nn.BatchNorm1d(feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.gdc(self.body(x)))                # [B, d]
