"""Load InsightFace arcface_torch weights (``backbone.pth``) into our backbones, for evaluation and
fine-tuning: IResNet (iresnet18/34/50/100) into :class:`~hfsoftmax.backbones.resnet.FaceResNet`,
MobileFaceNet (``mbf``, ``mbf_large``) into :class:`~hfsoftmax.backbones.mobilefacenet.MobileFaceNet`
built with their ``scale`` and ``blocks`` (``ARCFACE_TORCH`` there). DDP ``module.`` prefixes are
stripped; the layout is told from the keys.

IResNet: both are the same network (IR units BN -> conv -> BN -> PReLU -> conv(stride) -> BN, a
1x1 conv + BN shortcut where the shape changes, BN2d -> dropout -> flatten -> FC -> BN1d head);
only the parameter names differ::

    conv1 / bn1 / prelu                 -> stem.0 / stem.1 / stem.2
    layerL.i.{bn1,conv1,bn2,prelu,conv2,bn3}  -> body.k.body.{0..5}   (k counts units over layers)
    layerL.i.downsample.{0,1}           -> body.k.shortcut.{0,1}
    bn2 / fc / features                 -> head.0 / head.3 / head.4

MobileFaceNet: the same network too (conv-BN-PReLU stem, inverted-residual units 1x1 expand ->
depthwise 3x3 -> linear 1x1, conv 1x1 to 512, linear 7x7 depthwise GDC, FC without bias, BN1d),
with their blocks (b0, b1, b2, b3). Their top level is a list ``layers.0 .. layers.7``; a conv-BN
block is ``<block>.layers.{0 conv, 1 BN, 2 PReLU}``, a unit ``<unit>.layers.{0,1,2}.<block>``, a
run of units ``<run>.layers.j.<unit>``. Ours is one ``body`` list::

    layers.0.layers.q                   -> body.0.q                   (conv 3x3/2 stem)
    layers.1.layers.q                   -> body.1.q                   (b0 = 1: grouped conv 3x3)
    layers.1.layers.j.layers.p.layers.q -> body.1.j.body.p.q          (b0 > 1: b0 units)
    layers.2.layers.p.layers.q          -> body.2.body.p.q            (stride-2 unit)
    layers.3.layers.j.layers.p.layers.q -> body.(3+j).body.p.q        (b1 units)
    layers.4 / layers.5.layers.j        -> body.(3+b1) / body.(4+b1+j)
    layers.6 / layers.7.layers.j        -> body.(4+b1+b2) / body.(5+b1+b2+j)
    conv_sep.layers.q                   -> body.(5+b1+b2+b3).q        (conv 1x1 to 512)
    features.layers.0.layers.q          -> gdc.q                      (GDC: depthwise 7x7 + BN)
    features.layers.2.weight [d, 512]   -> embed.0.weight [d, 512, 1, 1]   (their Linear, our 1x1 conv)
    features.layers.3                   -> embed.2                    (BN1d)
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from .mobilefacenet import ARCFACE_TORCH
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


def backbone_state(obj: object) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """Our backbone state dict from a loaded file: an hfsoftmax checkpoint (``model``), a bare state
    dict, DDP ``module.`` prefixes stripped, arcface_torch IResNet or MobileFaceNet names mapped.
    Returns (state, None), or for an arcface_torch file (state, its model config: ``backbone`` as
    get_backbone names it, ``feature_dim``); ValueError when it is none of these."""
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("no backbone state_dict (a checkpoint's 'model' or a bare state dict)")
    state = {_strip(k): v for k, v in state.items()}
    if is_arcface_torch(state):
        model = {"backbone": f"resnet{arcface_torch_depth(state)}", "feature_dim": int(state["fc.weight"].shape[0])}
        return from_arcface_torch(state), model
    if is_arcface_torch_mbf(state):
        model = {"backbone": arcface_torch_mbf_name(state),
                 "feature_dim": int(state["features.layers.2.weight"].shape[0])}
        return from_arcface_torch_mbf(state), model
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


# arcface_torch MobileFaceNet: the top-level indices holding one stride-2 unit, and a run of units
_MBF_UNITS, _MBF_RUNS = (2, 4, 6), (3, 5, 7)


def is_arcface_torch_mbf(state: Mapping[str, torch.Tensor]) -> bool:
    keys = {_strip(k) for k in state}
    return "conv_sep.layers.0.weight" in keys and "features.layers.2.weight" in keys


def _run_length(keys: set[str], top: int) -> int:
    return len({int(m.group(1)) for k in keys if (m := re.match(rf"layers\.{top}\.layers\.(\d+)\.layers\.", k))})


def arcface_torch_mbf_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The MobileFaceNet keyword arguments (``scale``, ``blocks``) of an arcface_torch mbf state dict."""
    keys = {_strip(k) for k in state}
    stem = next((v for k, v in state.items() if _strip(k) == "layers.0.layers.0.weight"), None)
    if stem is None or stem.shape[0] % 64:
        raise ValueError("arcface_torch MobileFaceNet state dict without a 64 x scale channel stem (layers.0.layers.0)")
    b0 = 1 if "layers.1.layers.0.weight" in keys else _run_length(keys, 1)
    return {"scale": int(stem.shape[0]) // 64, "blocks": (b0, *(_run_length(keys, t) for t in _MBF_RUNS))}


def arcface_torch_mbf_name(state: Mapping[str, torch.Tensor]) -> str:
    """Our backbone name (hfsoftmax.backbones.mobilefacenet.ARCFACE_TORCH) of an arcface_torch mbf state dict."""
    cfg = arcface_torch_mbf_config(state)
    for name, known in ARCFACE_TORCH.items():
        if known["scale"] == cfg["scale"] and tuple(known["blocks"]) == cfg["blocks"]:
            return name
    raise ValueError(f"arcface_torch MobileFaceNet with scale={cfg['scale']}, blocks={cfg['blocks']} is none of "
                     f"{ {n: (c['scale'], c['blocks']) for n, c in ARCFACE_TORCH.items()} }")


def from_arcface_torch_mbf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """arcface_torch MobileFaceNet state dict -> our MobileFaceNet (its scale and blocks) state dict;
    a key neither knows is an error."""
    _, b1, b2, b3 = arcface_torch_mbf_config(state)["blocks"]
    first = {2: 2, 3: 3, 4: 3 + b1, 5: 4 + b1, 6: 4 + b1 + b2, 7: 5 + b1 + b2}   # body index of layers.t (t >= 2)
    out: dict[str, torch.Tensor] = {}
    for key, val in state.items():
        key = _strip(key)
        name = None
        if m := re.fullmatch(r"layers\.(\d+)\.layers\.(\d+)\.(\w+)", key):            # a conv-BN(-PReLU) block
            if int(m.group(1)) in (0, 1):
                name = f"body.{m.group(1)}.{m.group(2)}.{m.group(3)}"
        elif m := re.fullmatch(r"layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.(\w+)", key):   # a unit
            if int(m.group(1)) in _MBF_UNITS:
                name = f"body.{first[int(m.group(1))]}.body.{m.group(2)}.{m.group(3)}.{m.group(4)}"
        elif m := re.fullmatch(r"layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.(\w+)", key):  # a run
            t, j, rest = int(m.group(1)), int(m.group(2)), f"body.{m.group(3)}.{m.group(4)}.{m.group(5)}"
            if t == 1:
                name = f"body.1.{j}.{rest}"
            elif t in _MBF_RUNS:
                name = f"body.{first[t] + j}.{rest}"
        elif m := re.fullmatch(r"conv_sep\.layers\.(\d+)\.(\w+)", key):
            name = f"body.{5 + b1 + b2 + b3}.{m.group(1)}.{m.group(2)}"
        elif m := re.fullmatch(r"features\.layers\.0\.layers\.(\d+)\.(\w+)", key):
            name = f"gdc.{m.group(1)}.{m.group(2)}"
        elif key == "features.layers.2.weight":                 # Linear [d, 512] == 1x1 conv [d, 512, 1, 1]
            name, val = "embed.0.weight", val.reshape(*val.shape, 1, 1)
        elif m := re.fullmatch(r"features\.layers\.3\.(\w+)", key):
            name = f"embed.2.{m.group(1)}"
        if name is None:
            raise ValueError(f"arcface_torch key {key}: not part of a MobileFaceNet")
        out[name] = val
    return out
