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


def _muladd(out: np.ndarray, a: np.ndarray, scale: float, b: np.ndarray, tmp: Optional[np.ndarray]) -> np.ndarray:
    """out = a + scale * b (out may be a). With ``tmp`` (a float64 work array of the same shape) the
    result is rounded once, as torch's fused ``a.add(b, alpha=scale)``; without it, numpy's
    multiply-then-add. ``scale`` is first rounded to the row dtype, as torch casts alpha."""
    s = a.dtype.type(scale)
    if tmp is None:
        if out is a:
            a += s * b
        else:
            np.multiply(b, s, out=out)
            out += a
        return out
    np.multiply(b, np.float64(s), out=tmp)  # exact in float64 for float32 inputs (24 + 24 bit mantissas)
    tmp += a                                # one rounding to float64 ...
    np.copyto(out, tmp, casting="same_kind")  # ... then to the row dtype: a single fused rounding
    return out


def sgd_update_rows(w: np.ndarray, buf: np.ndarray, grad: np.ndarray, lr: float, cfg: SGDConfig) -> None:
    """Apply one SGD step in place to gathered rows.

    Args:
        w: [n, d] copies of the touched rows of W (updated in place).
        buf: [n, d] their momentum buffers (updated in place).
        grad: [n, d] summed gradient of each row (one entry per distinct row); only read.
        lr: learning rate of this step.
        cfg: momentum / weight decay / nesterov / rounding.
    """
    exact = cfg.exact_rounding and w.dtype != np.float64
    tmp = np.empty(w.shape, dtype=np.float64) if exact else None
    g = grad
    if cfg.weight_decay != 0.0:
        g = _muladd(np.empty_like(w), grad, cfg.weight_decay, w, tmp)   # g = grad + wd * w
    if cfg.momentum != 0.0:
        buf *= w.dtype.type(cfg.momentum)                               # buf = m * buf + g (two roundings, as torch)
        buf += g
        if cfg.nesterov:
            g = _muladd(g if g is not grad else np.empty_like(w), g, cfg.momentum, buf, tmp)  # g = g + m * buf
        else:
            g = buf
    _muladd(w, w, -lr, g, tmp)                                          # w = w - lr * g
