"""Feature extraction for evaluation: batched forward passes, optional flip-sum, L2 normalisation.

Flip-sum (as in the InsightFace evaluation protocol): the embedding of an image is
``f(x) + f(hflip(x))``, then L2-normalised.
"""
from __future__ import annotations

import logging
import os
from typing import Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)


def extract_features(model: nn.Module, images: torch.Tensor, batch_size: int = 64, flip: bool = True,
                     device: Union[str, torch.device] = "cpu", progress: bool = True) -> np.ndarray:
    """Embed images with ``model`` in eval mode.

    Args:
        model: maps [B, 3, H, W] -> [B, d]; moved to ``device`` and run in eval mode (its
            train/eval mode is restored afterwards, so training can call this mid-run).
        images: float32 [N, 3, H, W] (normalised as the datasets produce them).
        batch_size: images per forward pass.
        flip: add the embedding of the left-right flipped image before normalising.
        device: where the forward passes run.
        progress: show a tqdm bar (on a terminal only: none in a log file).
    Returns:
        float32 [N, d], each row of unit L2 norm.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = model.to(device)
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in tqdm(range(0, images.shape[0], batch_size), desc="extract", leave=False,
                          disable=None if progress else True):
            x = images[start:start + batch_size].to(device)  # [b, 3, H, W]
            f = model(x)                                     # [b, d]
            if flip:
                f = f + model(torch.flip(x, dims=[3]))
            f = f.float()
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
            out.append(f.cpu().numpy())
    model.train(was_training)
    if not out:
        raise ValueError("no images to extract features from")
    return np.concatenate(out, axis=0).astype(np.float32)


def save_features(path: str, features: np.ndarray) -> None:
    """Save a feature matrix as ``.npy`` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.npy"
    np.save(tmp, features)
    os.replace(tmp, path)
