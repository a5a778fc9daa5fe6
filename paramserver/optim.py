"""Row-sparse SGD with momentum, weight decay and optional Nesterov, lr given per update.

This is the update of ``torch.optim.SGD`` (dampening 0, the PyTorch formulation, not Sutskever's)
applied to only the rows of the class matrix that a step touched, as in HF-softmax (Zhang et al.,
AAAI 2018) where a step only sees its M active classes:

    g   = grad + weight_decay * w          (touched rows only)
    buf = momentum * buf + g               (buf starts at zero, so the first touch gives buf = g,
                                            exactly what torch does when it clones g into buf)
    g   = g + momentum * buf   if nesterov else   buf
    w   = w - lr * g

Equivalence proved by ``tests/test_paramserver_store.py``: every row follows exactly the sequence
that ``torch.optim.SGD`` gives to that row held as its own parameter, stepped only at the steps where
the row was touched (torch skips parameters whose ``.grad`` is None). Untouched rows are not decayed
and their momentum does not move (unlike a dense step with a zero gradient).

Rounding: torch's CPU kernels compute ``a.add(b, alpha=s)`` as one fused multiply-add (one
rounding). With ``exact_rounding=True`` we reproduce that for float32 rows by computing each
``a + s*b`` in float64 (the product of two float32 is exact there) and rounding once, so the result
is bit-identical to torch.optim.SGD on CPU (tested). The default (False) multiplies then adds in the
row dtype, ~4x cheaper; each of the 2-3 multiply-adds of a step may then differ from torch by one
rounding (relative 6e-8 in float32). For float64 rows the math is always plain numpy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SGDConfig:
    """Hyper-parameters of the row-sparse SGD; the learning rate travels with every push.

    Args:
        momentum: momentum factor (0 disables the buffer update, buffers stay zero).
        weight_decay: L2 factor added to the gradient of touched rows.
        nesterov: Nesterov momentum in PyTorch's formulation (needs momentum > 0).
        exact_rounding: round every multiply-add once, as torch's fused CPU kernels (bit-identical
            to torch.optim.SGD; about 4x slower update arithmetic).
    """

    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    exact_rounding: bool = False

    def __post_init__(self) -> None:
        if not np.isfinite(self.momentum) or self.momentum < 0.0:
            raise ValueError(f"SGDConfig: momentum must be a finite number >= 0, got {self.momentum!r}")
        if not np.isfinite(self.weight_decay) or self.weight_decay < 0.0:
            raise ValueError(f"SGDConfig: weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.nesterov and self.momentum <= 0.0:
            raise ValueError("SGDConfig: nesterov=True requires momentum > 0 (as torch.optim.SGD)")

    def to_dict(self) -> dict:
        return {"momentum": float(self.momentum), "weight_decay": float(self.weight_decay),
                "nesterov": bool(self.nesterov), "exact_rounding": bool(self.exact_rounding)}


class Scratch:
    """Reusable work arrays, so a step does not allocate (and page-fault in) fresh megabytes.

    ``get(key, shape, dtype)`` returns a view of a buffer kept per (key, dtype), grown on demand;
    requests above ``max_bytes`` get a fresh array instead of being kept. Not thread-safe: one per
    store, used under its lock.
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self._bufs: dict[tuple[str, str], np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        if n * dt.itemsize > self.max_bytes:
            return np.empty(shape, dtype=dt)
        buf = self._bufs.get((key, dt.str))
        if buf is None or buf.size < n:
            buf = np.empty(n, dtype=dt)
            self._bufs[(key, dt.str)] = buf
        return buf[:n].reshape(shape)


def _muladd(out: np.ndarray, a: np.ndarray, scale: float, b: np.ndarray, t32: np.ndarray,
            t64: Optional[np.ndarray]) -> np.ndarray:
    """out = a + scale * b (out may be a; ``t32`` is a scratch of out's shape/dtype, not out).

    With ``t64`` (a float64 scratch) the sum is rounded once, as torch's fused
    ``a.add(b, alpha=scale)``; without it, numpy's multiply-then-add. ``scale`` is first rounded to
    the row dtype, as torch casts alpha.
    """
    s = a.dtype.type(scale)
    if t64 is None:
        np.multiply(b, s, out=t32)
        np.add(a, t32, out=out)
        return out
    np.multiply(b, np.float64(s), out=t64)  # exact in float64 for float32 inputs (24 + 24 bit mantissas)
    t64 += a                                # one rounding to float64 ...
    np.copyto(out, t64, casting="same_kind")  # ... then to the row dtype: a single fused rounding
    return out


def sgd_update_rows(w: np.ndarray, buf: np.ndarray, grad: np.ndarray, lr: float, cfg: SGDConfig,
                    scratch: Optional[Scratch] = None) -> None:
    """Apply one SGD step in place to gathered rows.

    Args:
        w: [n, d] copies of the touched rows of W (updated in place).
        buf: [n, d] their momentum buffers (updated in place).
        grad: [n, d] summed gradient of each row (one entry per distinct row); only read.
        lr: learning rate of this step.
        cfg: momentum / weight decay / nesterov / rounding.
        scratch: reusable work arrays (default: fresh ones).
    """
    sc = scratch or Scratch(max_bytes=0)
    exact = cfg.exact_rounding and w.dtype != np.float64
    t64 = sc.get("sgd_t64", w.shape, np.float64) if exact else None
    t32 = sc.get("sgd_t32", w.shape, w.dtype)
    g = grad
    if cfg.weight_decay != 0.0:
        g = _muladd(sc.get("sgd_g", w.shape, w.dtype), grad, cfg.weight_decay, w, t32, t64)  # g = grad + wd * w
    if cfg.momentum != 0.0:
        buf *= w.dtype.type(cfg.momentum)                      # buf = m * buf + g (two roundings, as torch)
        buf += g
        if cfg.nesterov:
            out = g if g is not grad else sc.get("sgd_g", w.shape, w.dtype)
            g = _muladd(out, g, cfg.momentum, buf, t32, t64)   # g = g + m * buf
        else:
            g = buf
    _muladd(w, w, -lr, g, t32, t64)                            # w = w - lr * g
