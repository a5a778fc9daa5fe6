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
rounding). For float32/float16 rows we reproduce that by computing each ``a + s*b`` in float64 (the
product of two float32 is exact there) and rounding once, so the float32 result is bit-identical to
torch on CPUs with FMA. For float64 rows the math is plain numpy (equal to torch to ~1 ulp).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SGDConfig:
    """Hyper-parameters of the row-sparse SGD; the learning rate travels with every push.

    Args:
        momentum: momentum factor (0 disables the buffer update, buffers stay zero).
        weight_decay: L2 factor added to the gradient of touched rows.
        nesterov: Nesterov momentum in PyTorch's formulation (needs momentum > 0).
    """

    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False

    def __post_init__(self) -> None:
        if not np.isfinite(self.momentum) or self.momentum < 0.0:
            raise ValueError(f"SGDConfig: momentum must be a finite number >= 0, got {self.momentum!r}")
        if not np.isfinite(self.weight_decay) or self.weight_decay < 0.0:
            raise ValueError(f"SGDConfig: weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.nesterov and self.momentum <= 0.0:
            raise ValueError("SGDConfig: nesterov=True requires momentum > 0 (as torch.optim.SGD)")

    def to_dict(self) -> dict:
        return {"momentum": float(self.momentum), "weight_decay": float(self.weight_decay),
                "nesterov": bool(self.nesterov)}


def _fma_inplace(a: np.ndarray, scale: float, b: np.ndarray, tmp: np.ndarray | None) -> None:
    """a += scale * b with a single rounding to a.dtype (torch's fused ``a.add_(b, alpha=scale)``).

    ``tmp`` is a float64 work array of a's shape, or None when a is float64 (plain numpy then).
    """
    if tmp is None:
        a += a.dtype.type(scale) * b
        return
    # scale is rounded to the row dtype first, as torch casts alpha to the tensor's scalar type.
    np.multiply(b, np.float64(a.dtype.type(scale)), out=tmp)  # exact in float64 for float32 inputs
    tmp += a                                                  # one rounding to float64 ...
    np.copyto(a, tmp, casting="same_kind")                    # ... then to a.dtype: a fused a + s*b


def sgd_update_rows(w: np.ndarray, buf: np.ndarray, grad: np.ndarray, lr: float, cfg: SGDConfig) -> None:
    """Apply one SGD step in place to gathered rows.

    Args:
        w: [n, d] copies of the touched rows of W (updated in place).
        buf: [n, d] their momentum buffers (updated in place).
        grad: [n, d] summed gradient of each row (one entry per distinct row); may be overwritten.
        lr: learning rate of this step.
        cfg: momentum / weight decay / nesterov.
    """
    tmp = None if w.dtype == np.float64 else np.empty(w.shape, dtype=np.float64)
    g = grad
    if cfg.weight_decay != 0.0:
        _fma_inplace(g, cfg.weight_decay, w, tmp)          # g = grad + wd * w
    if cfg.momentum != 0.0:
        buf *= w.dtype.type(cfg.momentum)                     # buf = m * buf + g  (two roundings, as torch)
        buf += g
        if cfg.nesterov:
            _fma_inplace(g, cfg.momentum, buf, tmp)         # g = g + m * buf
        else:
            g = buf
    _fma_inplace(w, -lr, g, tmp)                            # w = w - lr * g
