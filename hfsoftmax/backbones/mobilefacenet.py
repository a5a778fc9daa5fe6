"""MobileFaceNet (Chen et al., CCBR 2018, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices"): a MobileNetV2-style net for 112x112 faces, about 1M parameters.

conv3x3/2 (64) -> depthwise conv3x3 (64) -> inverted-residual bottlenecks (expansion t, output c,
repeats n, first stride s): (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2),
(2, 128, 2, 1) -> conv1x1 (512) -> global depthwise conv 7x7 ("GDC", linear) -> conv1x1 to the
feature dim (linear) -> BN. PReLU activations, as in the paper.

``scale`` and ``blocks`` give the configurations InsightFace arcface_torch trains
(``backbones/mobilefacenet.py`` there): the same layer sequence with every block output
(c above, and the stem) ``scale`` times wider while the expanded widths stay those of the paper
(128, 256, 512, 256), the stem's second 3x3 conv in 64 groups (depthwise only at scale 1), and
``blocks = (b0, b1, b2, b3)``: b0 > 1 puts b0 stride-1 bottlenecks (expanded to 128) in place of
that conv; the three stages have 1 + b1, 1 + b2, 1 + b3 bottlenecks. ``blocks=(1, 4, 6, 2)`` is
the paper's. :data:`ARCFACE_TORCH` names their ``mbf`` and ``mbf_large``;
:mod:`hfsoftmax.backbones.convert` maps their weights onto these.
"""
from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), the paper's Table 1
SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
PAPER_BLOCKS = (1, 4, 6, 2)         # the repeats above as arcface_torch counts them: n = 1 + b1, 1, b2, 1, b3
#: arcface_torch's get_model('mbf') and get_model('mbf_large') as MobileFaceNet keyword arguments
ARCFACE_TORCH = {"arcface_mbf": {"scale": 2, "blocks": (1, 4, 6, 2)},
                 "arcface_mbf_large": {"scale": 4, "blocks": (2, 8, 12, 4)}}


def _conv_bn(cin: int, cout: int, k: int, s: int, groups: int = 1, act: bool = True,
             pad: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2 if pad is None else pad, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """1x1 expansion to ``mid`` (default ``cin * t``) -> depthwise 3x3 (stride) -> linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, t: int, mid: int | None = None) -> None:
        super().__init__()
        mid = cin * t if mid is None else mid
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(_conv_bn(cin, mid, 1, 1), _conv_bn(mid, mid, 3, stride, groups=mid),
                                  _conv_bn(mid, cout, 1, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """[B, 3, S, S] -> [B, feature_dim]; S divisible by 16 (7 x 7 before the GDC at 112)."""

    def __init__(self, feature_dim: int = 128, image_size: int = 112, scale: int = 1,
                 blocks: tuple[int, int, int, int] = PAPER_BLOCKS) -> None:
        super().__init__()
        if image_size % 16:
            raise ValueError(f"MobileFaceNet needs an image_size divisible by 16, got {image_size}")
        if scale < 1 or len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"MobileFaceNet needs scale >= 1 and four blocks >= 1, got {scale}, {tuple(blocks)}")
        width = 64 * scale
        layers: list[nn.Module] = [_conv_bn(3, width, 3, 2)]
        layers.append(_conv_bn(width, width, 3, 1, groups=64) if blocks[0] == 1 else
                      nn.Sequential(*(Bottleneck(width, width, 1, 2, mid=128) for _ in range(blocks[0]))))
        base = 64                                           # the paper's input width: the expansions are t x base
        repeats = (1 + blocks[1], 1, blocks[2], 1, blocks[3])
        for (t, c, _, s), n in zip(SETTINGS, repeats):
            for i in range(n):
                layers.append(Bottleneck(width, c * scale, s if i == 0 else 1, t, mid=base * t))
                width, base = c * scale, c
        layers.append(_conv_bn(width, 512, 1, 1))
        self.body = nn.Sequential(*layers)
        side = image_size // 16
        self.gdc = _conv_bn(512, 512, side, 1, groups=512, act=False, pad=0)   # global depthwise: [B, 512, 1, 1]
        # a 1x1 conv over the [B, 512, 1, 1] GDC output, then BN1d
        self.embed = nn.Sequential(nn.Conv2d(512, feature_dim, 1, bias=False), nn.Flatten(),
                                   nn.BatchNorm1d(feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.gdc(self.body(x)))                # [B, d]
