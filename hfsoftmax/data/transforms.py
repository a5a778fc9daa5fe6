"""Image transforms shared by every dataset (no torchvision).

Contract: an image becomes a float32 tensor [3, H, W], RGB, normalised as ``(x / 255 - 0.5) / 0.5``
so values lie in [-1, 1]; or, for training loaders, the uint8 tensor [3, H, W] that
:func:`normalize_images` turns into exactly that float tensor on the device.
"""
from __future__ import annotations

import io
import logging
from typing import Optional

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) to an RGB PIL image.

    Raises:
        ValueError: naming ``where`` (file and record) when the bytes are not a decodable image.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force the decode here so a corrupt payload fails with our message
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        # PIL's "cannot identify" message embeds a BytesIO repr with an address: say it plainly
        reason = "unrecognised image format" if "BytesIO" in str(exc) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{where}: payload of {len(data)} bytes is not a decodable image ({reason})") from None
    return img.convert("RGB")


def to_tensor_uint8(img: Image.Image, image_size: Optional[int] = None) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]; resized (bilinear) to image_size x image_size when given and
    different. What DataLoader workers hand over: a quarter of the bytes of float32, normalised later
    on the device by :func:`normalize_images`."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3], read-only view of the image
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))   # one copy, [3, H, W]


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (any leading shape) -> float32 ``(x / 255 - 0.5) / 0.5`` in [-1, 1], on x's device;
    float images pass through unchanged (they are normalised already)."""
    if x.dtype != torch.uint8:
        return x
    # x / 127.5 - 1 is bitwise (x / 255 - 0.5) / 0.5 (scaling by 2 is exact); in place on one new
    # tensor: a third of the memory traffic of the three-temporary form (docs/benchmarks.md)
    return x.float().div_(127.5).sub_(1.0)


def to_tensor_normalized(img: Image.Image, image_size: Optional[int] = None) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]; resized (bilinear) to image_size x image_size
    when given and different."""
    return normalize_images(to_tensor_uint8(img, image_size))


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flip a [..., H, W] tensor left-right with probability p (torch RNG, so DataLoader seeds it)."""
    if torch.rand((), generator=generator).item() < p:
        return torch.flip(x, dims=[-1])
    return x


def keyed_coin(seed: int, epoch: int, index: int) -> bool:
    """A fair coin that is a pure function of (seed, epoch, index) (splitmix64 of the three)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return bool((z ^ (z >> 31)) & 1)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Deterministic left-right flip of a [..., H, W] tensor."""
    return torch.flip(x, dims=[-1])
