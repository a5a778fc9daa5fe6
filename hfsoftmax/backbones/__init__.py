"""Backbones: image [B, 3, H, W] (or, for ``identity`` / ``mlp``, features [B, d_in]) -> embedding [B, feature_dim].

``get_backbone(name, feature_dim, image_size, input_dim=...)`` is the one factory that training, evaluation and
tools use, so a checkpoint's config (``model.backbone``) is enough to rebuild its network.
"""
from __future__ import annotations

from torch import nn

from .hynet import Hynet
from .mlp import Identity, MLPProjector
from .mobilefacenet import ARCFACE_TORCH, MobileFaceNet
from .resnet import RESNET_DEPTHS, FaceResNet
from .tiny import TinyNet

BACKBONES = (("tiny", "hynet", "mobilefacenet") + tuple(ARCFACE_TORCH)
             + tuple(f"resnet{d}" for d in RESNET_DEPTHS) + ("identity", "mlp"))
# backbones over precomputed features [B, d_in] (data.path=feats.npy), not images
FEATURE_BACKBONES = ("identity", "mlp")
# arcface_torch's names for the same IR-ResNets, and its MobileFaceNet
ALIASES = {**{f"r{d}": f"resnet{d}" for d in RESNET_DEPTHS}, "mbf": "mobilefacenet"}


def get_backbone(name: str, feature_dim: int, image_size: int = 112, dropout: float = 0.0,
                 norm: str = "batch", width: int = 32, input_dim: int = 0, hidden_dim: int = 0) -> nn.Module:
    """Build a backbone by name.

    Args:
        name: one of ``tiny``, ``hynet``, ``mobilefacenet``, ``resnet18`` .. ``resnet100`` (or an alias: r18, mbf, ...).
        feature_dim: embedding size d.
        image_size: input side in pixels (112 for the face nets; tiny accepts any multiple of 4).
        dropout: dropout before the embedding FC (face ResNet, Hynet).
        norm: tiny only, ``batch`` or ``group`` (GroupNorm is per-sample, so DDP equals one process).
        width: tiny only, the channels of its first stage (then 2x and 4x).
        input_dim: identity / mlp only, the features' width d_in (image_size is then unused).
        hidden_dim: mlp only, its hidden width (0: max(input_dim, feature_dim)).
    """
    from ..config import ConfigError

    name = ALIASES.get(name, name)
    try:
        return _build(name, feature_dim, image_size, dropout, norm, width, input_dim, hidden_dim)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        if name in FEATURE_BACKBONES:
            raise ConfigError(str(e)) from None
        raise ConfigError(f"model.backbone={name} with data.image_size={image_size}: {e}") from None


def _build(name: str, feature_dim: int, image_size: int, dropout: float, norm: str, width: int,
           input_dim: int, hidden_dim: int) -> nn.Module:
    from ..config import ConfigError

    if name == "identity":
        return Identity(feature_dim=feature_dim, input_dim=input_dim)
    if name == "mlp":
        return MLPProjector(feature_dim=feature_dim, input_dim=input_dim, hidden=hidden_dim)
    if name == "tiny":
        return TinyNet(feature_dim=feature_dim, image_size=image_size, width=width, norm=norm)
    if name == "mobilefacenet":
        return MobileFaceNet(feature_dim=feature_dim, image_size=image_size)
    if name in ARCFACE_TORCH:    # arcface_torch's mbf / mbf_large: our MobileFaceNet at their scale and blocks
        return MobileFaceNet(feature_dim=feature_dim, image_size=image_size, **ARCFACE_TORCH[name])
    if name == "hynet":
        return Hynet(feature_dim=feature_dim, image_size=image_size, dropout=dropout)
    if name.startswith("resnet") and name[len("resnet"):].isdigit() and int(name[6:]) in RESNET_DEPTHS:
        return FaceResNet(depth=int(name[6:]), feature_dim=feature_dim, image_size=image_size, dropout=dropout)
    raise ConfigError(f"unknown backbone '{name}' (model.backbone: choose from {', '.join(BACKBONES)}, or "
                      f"{', '.join(ALIASES)})")


__all__ = ["get_backbone", "BACKBONES", "FEATURE_BACKBONES", "FaceResNet", "Hynet", "Identity", "MLPProjector",
           "MobileFaceNet", "TinyNet"]
