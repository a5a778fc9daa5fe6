"""InsightFace verification ``.bin`` sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

Format: a pickle of the tuple ``(bins, issame_list)`` where ``bins`` is a list of 2N encoded images
(JPEG bytes) and ``issame_list`` a list of N booleans; images ``2i`` and ``2i + 1`` form pair ``i``.
Files written by Python 2 hold the images as ``str``; they are read with ``encoding="bytes"``, and
any element that comes back as ``str`` or a numpy byte array is converted to ``bytes``.

A ``.bin`` is usually downloaded, and a pickle can name any importable callable to run while it
loads. The loader therefore resolves only the few globals such a file needs (bytes as Python 3
pickles them, numpy arrays and scalars) and refuses any other with an error naming the file.
Each issame flag must be a bool or 0/1; anything else is an error naming its index.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hfsoftmax.data.transforms import decode_image, to_tensor_normalized

logger = logging.getLogger(__name__)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """uint8 [H, W, 3] RGB array -> JPEG bytes."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"encode_jpeg expects uint8 [H, W, 3], got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_bin(path: str, jpeg_bytes: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a ``.bin`` (pickle protocol 2, readable by Python 2 and 3) atomically."""
    if len(jpeg_bytes) != 2 * len(issame):
        raise ValueError(f"{path}: {len(jpeg_bytes)} images cannot form {len(issame)} pairs (need {2 * len(issame)})")
    payload = ([bytes(b) for b in jpeg_bytes], [bool(s) for s in issame])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=2)
    os.replace(tmp, path)


def _as_bytes(x: Any, path: str, i: int) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, bytearray):
        return bytes(x)
    if isinstance(x, str):  # a Python 2 str unpickled as text: latin-1 maps code points to bytes 1:1
        return x.encode("latin-1")
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        return x.tobytes()
    raise ValueError(f"{path}: image {i} is a {type(x).__name__}, not encoded image bytes")


#: the only globals a .bin pickle may name: bytes/bytearray as protocol 2 writes them from Python 3,
#: numpy arrays and scalars (some tools store images as uint8 arrays, flags as numpy bools)
_SAFE_GLOBALS = {
    ("_codecs", "encode"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("__builtin__", "bytes"), ("__builtin__", "bytearray"),  # the names Python 3 writes at protocol 2
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "bool_"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
}


class _BinUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only :data:`_SAFE_GLOBALS` (never arbitrary code)."""

    def __init__(self, f: Any, path: str) -> None:
        super().__init__(f, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise ValueError(f"{self._path}: the pickle names {module}.{name}; a .bin holds only image bytes and "
                         f"issame flags, so it is refused (loading it could run code)")


def _as_flag(x: Any, path: str, i: int) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)) and int(x) in (0, 1):
        return bool(x)
    raise ValueError(f"{path}: issame flag {i} is {x!r} ({type(x).__name__}), not a bool or 0/1")


def read_bin(path: str) -> tuple[list[bytes], np.ndarray]:
    """Raw contents of a ``.bin``: (2N encoded images, issame bool [N]), checked for consistency."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification set not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = _BinUnpickler(f, path).load()
    except ValueError as exc:
        if str(exc).startswith(f"{path}: the pickle names"):
            raise
        raise ValueError(f"{path}: not a readable .bin pickle ({exc})") from None
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .bin pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    images = [_as_bytes(b, path, i) for i, b in enumerate(bins)]
    if isinstance(issame, np.ndarray):
        issame = issame.reshape(-1).tolist()
    if not isinstance(issame, (list, tuple)):
        raise ValueError(f"{path}: issame is a {type(issame).__name__}, expected a list of flags")
    flags = np.asarray([_as_flag(s, path, i) for i, s in enumerate(issame)], dtype=bool)
    if len(images) != 2 * len(flags):
        raise ValueError(f"{path}: {len(images)} images but {len(flags)} issame flags "
                         f"(expected {2 * len(flags)} images)")
    return images, flags


def load_bin(path: str, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Decode a ``.bin`` into (images float32 [2N, 3, H, W] in [-1, 1], issame bool [N]).

    Raises:
        ValueError: naming the file and image index when an image does not decode.
    """
    images, flags = read_bin(path)
    out = torch.empty((len(images), 3, image_size, image_size), dtype=torch.float32)
    name = os.path.basename(path)
    for i, data in enumerate(tqdm(images, desc=f"decode {name}", leave=False, disable=True if len(images) < 2000 else None)):
        out[i] = to_tensor_normalized(decode_image(data, f"{path}: image {i}"), image_size)
    logger.info("loaded %s: %d pairs (%d same)", path, len(flags), int(flags.sum()))
    return out, flags
