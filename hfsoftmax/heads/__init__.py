"""Classifier heads behind one interface: ``loss = head(features, labels)``, ``head.scores(features)``.

``build_head(cfg.head, num_classes, feature_dim, device, store=None)`` picks one from the config:
full (linear/CosFace/ArcFace/combined), hf and random (selective softmax on a parameter store), mach,
rp; the margin rule is :class:`~hfsoftmax.heads.margin.Margin` (plain only for mach and rp).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import ClassifierHead
from .full import FullSoftmax
from .margin import Margin, margin_logits, normalize_margin


def build_head(cfg: Any, num_classes: int, feature_dim: int, device: torch.device | str | None = None,
               store: Any = None, seed: int = 0, pipeline: bool = False, prefetch: bool = True) -> ClassifierHead:
    """Build the head named by ``cfg.name`` (a :class:`hfsoftmax.config.HeadConfig`)."""
    normalize_margin(cfg)
    if cfg.name == "full":
        rule = Margin.from_config(cfg)
        return FullSoftmax(num_classes, feature_dim, margin=rule.kind, scale=rule.scale, margin_m=rule.m, device=device)
    if cfg.name in ("hf", "random"):
        from .selective import SelectiveSoftmax
        if store is None:
            raise ValueError(f"head '{cfg.name}' needs a parameter store (store.kind=local or remote)")
        return SelectiveSoftmax.from_config(cfg, store, num_classes, feature_dim, seed=seed, pipeline=pipeline,
                                            prefetch=prefetch)
    if cfg.name == "mach":
        from .mach import MachHead
        return MachHead.from_config(cfg, num_classes, feature_dim, device=device, seed=seed)
    if cfg.name == "rp":
        from .rp import RPSoftmax
        return RPSoftmax.from_config(cfg, num_classes, feature_dim, device=device, seed=seed)
    raise ValueError(f"unknown head '{cfg.name}'")


__all__ = ["ClassifierHead", "FullSoftmax", "Margin", "margin_logits", "build_head"]
