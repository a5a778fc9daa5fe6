"""Load InsightFace arcface_torch IResNet weights (``backbone.pth`` of iresnet18/34/50/100) into
:class:`~hfsoftmax.backbones.resnet.FaceResNet`, for evaluation and fine-tuning.

Both are the same network (IR units BN -> conv -> BN -> PReLU -> conv(stride) -> BN, a 1x1 conv +
BN shortcut where the shape changes, BN2d -> dropout -> flatten -> FC -> BN1d head); only the
parameter names differ::

    conv1 / bn1 / prelu                 -> stem.0 / stem.1 / stem.2
    layerL.i.{bn1,conv1,bn2,prelu,conv2,bn3}  -> body.k.body.{0..5}   (k counts units over layers)
    layerL.i.downsample.{0,1}           -> body.k.shortcut.{0,1}
    bn2 / fc / features                 -> head.0 / head.3 / head.4
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from .resnet import RESNET_DEPTHS

_UNIT = {"bn1": 0, "conv1": 1, "bn2": 2, "prelu": 3, "conv2": 4, "bn3": 5}
_TOP = {"conv1": "stem.0", "bn1": "stem.1", "prelu": "stem.2", "bn2": "head.0", "fc": "head.3", "features": "head.4"}


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key   # saved from DDP


def is_arcface_torch(state: Mapping[str, torch.Tensor]) -> bool:
    keys = {_strip(k) for k in state}
    return "layer1.0.conv1.weight" in keys and "fc.weight" in keys


def arcface_torch_depth(state: Mapping[str, torch.Tensor]) -> int:
    """The IResNet depth whose units per layer the state dict holds."""
    counts = tuple(len({int(m.group(1)) for k in state if (m := re.match(rf"layer{L}\.(\d+)\.", _strip(k)))})
                   for L in range(1, 5))
    for depth, units in RESNET_DEPTHS.items():
        if units == counts:
            return depth
    raise ValueError(f"arcface_torch state dict with {counts} units per layer matches no IResNet depth "
                     f"({ {d: u for d, u in RESNET_DEPTHS.items()} })")


def backbone_state(obj: object) -> tuple[dict[str, torch.Tensor], Optional[int]]:
    """Our backbone state dict from a loaded file: an hfsoftmax checkpoint (``model``), a bare state
    dict, DDP ``module.`` prefixes stripped, arcface_torch IResNet names mapped. Returns (state, the
    IResNet depth when it was an arcface_torch file, else None); ValueError when it is none of these."""
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("no backbone state_dict (a checkpoint's 'model' or a bare state dict)")
    state = {_strip(k): v for k, v in state.items()}
    if is_arcface_torch(state):
        return from_arcface_torch(state), arcface_torch_depth(state)
    return state, None


def from_arcface_torch(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """arcface_torch IResNet state dict -> FaceResNet state dict (a key neither knows is an error)."""
    depth = arcface_torch_depth(state)
    offsets, k = {}, 0
    for L, units in enumerate(RESNET_DEPTHS[depth], 1):
        offsets[L] = k
        k += units
    out: dict[str, torch.Tensor] = {}
    for key, val in state.items():
        key = _strip(key)
        m = re.match(r"layer(\d)\.(\d+)\.(\w+?)\.(.+)$", key)
        if m:
            L, i, part, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            unit = offsets[L] + i
            if part == "downsample":
                idx, rest = rest.split(".", 1)
                out[f"body.{unit}.shortcut.{idx}.{rest}"] = val
            elif part in _UNIT:
                out[f"body.{unit}.body.{_UNIT[part]}.{rest}"] = val
            else:
                raise ValueError(f"arcface_torch key {key}: unknown unit part '{part}'")
            continue
        top, _, rest = key.partition(".")
        if top not in _TOP:
            raise ValueError(f"arcface_torch key {key}: not part of an IResNet")
        out[f"{_TOP[top]}.{rest}"] = val
    return out
