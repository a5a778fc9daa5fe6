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

Sparse momentum ("lazy" above, or "unrolled"). In a dense momentum step a gradient keeps moving its
row on every later step: lr * g * (1 + m + m^2 + ...) = lr * g / (1 - m) in all. Under "lazy" a row
of a selective head, touched on a few per cent of the steps, receives only lr * g at its touch and
the rest of the series (decayed) at its next touch, maybe hundreds of steps later: its effective
learning rate is ~(1 - m) = 1/10 of the dense one. "unrolled" applies each touch's whole series at
once and keeps no buffer:

    w   = w - lr / (1 - momentum) * (grad + weight_decay * w)

the same total displacement per gradient as dense momentum SGD at a constant lr (Nesterov's series
sums to the same, so ``nesterov`` makes no difference there). That is why "unrolled" is the
training default: with lazy momentum a selective head fell well short of full softmax in top-1,
and unrolled closed most of the gap (docs/benchmarks.md, bench_accuracy). With M = K (every row
touched every step) "lazy" is exactly torch.optim.SGD and "unrolled" is plain SGD at lr / (1 - m),
without momentum's smoothing and with a tighter stability limit: when most rows are active every
step, choose "lazy".

Rounding: torch's CPU kernels compute ``a.add(b, alpha=s)`` as one fused multiply-add (one
rounding). With ``exact_rounding=True`` we reproduce that for float32 rows by computing each
``a + s*b`` in float64 (the product of two float32 is exact there) and rounding once, so the result
is bit-identical to torch.optim.SGD on CPU (tested). The default (False) multiplies then adds in the
row dtype, several times cheaper (no float64 temporaries or conversions; docs/benchmarks.md); each
of the 2-3 multiply-adds of a step may then differ from torch by one rounding (relative 6e-8 in
float32). For float64 rows the math is always plain numpy.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

SPARSE_MOMENTUM = ("lazy", "unrolled")


@dataclass(frozen=True)
class SGDConfig:
    """Hyper-parameters of the row-sparse SGD; the learning rate travels with every push.

    Args:
        momentum: momentum factor (0 disables the buffer update, buffers stay zero).
        weight_decay: L2 factor added to the gradient of touched rows.
        nesterov: Nesterov momentum in PyTorch's formulation (needs momentum > 0).
        exact_rounding: round every multiply-add once, as torch's fused CPU kernels (bit-identical
            to torch.optim.SGD; several times slower update arithmetic: float64 temporaries).
        sparse_momentum: "lazy" (torch.optim.SGD on the touched rows) or "unrolled" (each touch
            moves its row by the whole momentum series, no buffer; see the module docstring).
    """

    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    exact_rounding: bool = False
    sparse_momentum: str = "lazy"

    def __post_init__(self) -> None:
        if not np.isfinite(self.momentum) or self.momentum < 0.0:
            raise ValueError(f"SGDConfig: momentum must be a finite number >= 0, got {self.momentum!r}")
        if not np.isfinite(self.weight_decay) or self.weight_decay < 0.0:
            raise ValueError(f"SGDConfig: weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.nesterov and self.momentum <= 0.0:
            raise ValueError("SGDConfig: nesterov=True requires momentum > 0 (as torch.optim.SGD)")
        if self.sparse_momentum not in SPARSE_MOMENTUM:
            raise ValueError(f"SGDConfig: sparse_momentum must be one of {SPARSE_MOMENTUM}, got {self.sparse_momentum!r}")
        if self.sparse_momentum == "unrolled" and self.momentum >= 1.0:
            raise ValueError(f"SGDConfig: sparse_momentum='unrolled' needs momentum < 1, got {self.momentum!r}")

    @property
    def has_buffer(self) -> bool:
        """Whether the rule keeps a momentum buffer ("lazy" with momentum > 0); "unrolled" and
        momentum 0 keep none, so a store allocates, gathers and snapshots no second K x d matrix."""
        return self.sparse_momentum == "lazy" and self.momentum != 0.0

    def to_dict(self) -> dict:
        return {"momentum": float(self.momentum), "weight_decay": float(self.weight_decay),
                "nesterov": bool(self.nesterov), "exact_rounding": bool(self.exact_rounding),
                "sparse_momentum": self.sparse_momentum}

    @classmethod
    def from_dict(cls, d: dict) -> "SGDConfig":
        """Inverse of :meth:`to_dict` (manifests written before ``sparse_momentum`` existed are "lazy")."""
        return cls(momentum=float(d["momentum"]), weight_decay=float(d["weight_decay"]), nesterov=bool(d["nesterov"]),
                   exact_rounding=bool(d.get("exact_rounding", False)),
                   sparse_momentum=str(d.get("sparse_momentum", "lazy")))


# Rows are updated in blocks of about this many bytes per work array, so the gathered rows, their
# momentum and the temporaries of one block stay in the CPU cache between the ~6 arithmetic passes
# (one pass over 1000 x 512 float32 rows each is DRAM-bound; blocks are faster: docs/benchmarks.md).
BLOCK_BYTES = 256 << 10


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
        n = math.prod(shape)
        if n * dt.itemsize > self.max_bytes:
            return np.empty(shape, dtype=dt)
        buf = self._bufs.get((key, dt.str))
        if buf is None or buf.size < n:
            buf = np.empty(n, dtype=dt)
            self._bufs[(key, dt.str)] = buf
        return buf[:n].reshape(shape)


def _muladd(out: np.ndarray, a: np.ndarray, s: np.generic, b: np.ndarray, t32: np.ndarray,
            t64: Optional[np.ndarray]) -> np.ndarray:
    """out = a + s * b (out may be a; ``t32`` is a scratch of out's shape/dtype, not out).

    ``s`` is already a scalar of the row dtype (torch casts alpha to it). With ``t64`` (a float64
    scratch) the sum is rounded once, as torch's fused ``a.add(b, alpha=s)``; without it, numpy's
    multiply-then-add.
    """
    if t64 is None:
        np.multiply(b, s, out=t32)
        np.add(a, t32, out=out)
        return out
    np.multiply(b, np.float64(s), out=t64)  # exact in float64 for float32 inputs (24 + 24 bit mantissas)
    t64 += a                                # one rounding to float64 ...
    np.copyto(out, t64, casting="same_kind")  # ... then to the row dtype: a single fused rounding
    return out


class _Block:
    """The scalars and work arrays of one update, sized for blocks of at most ``rows`` rows."""

    __slots__ = ("rows", "wd", "mom", "neg_lr", "nesterov", "t32", "g", "t64")

    def __init__(self, d: int, dtype: np.dtype, lr: float, cfg: SGDConfig, sc: Scratch,
                 rows: Optional[int] = None) -> None:
        dt = np.dtype(dtype)
        self.rows = max(1, int(rows) if rows else BLOCK_BYTES // max(1, d * dt.itemsize))
        # Scalars in the row dtype, as torch casts alpha / momentum / weight decay.
        self.wd = dt.type(cfg.weight_decay) if cfg.weight_decay != 0.0 else None
        self.mom = dt.type(cfg.momentum) if cfg.momentum != 0.0 else None
        self.neg_lr = dt.type(-lr)
        self.nesterov = cfg.nesterov
        if cfg.sparse_momentum == "unrolled" and self.mom is not None:  # no buffer, the series at once
            self.mom, self.neg_lr, self.nesterov = None, dt.type(-lr / (1.0 - cfg.momentum)), False
        exact = cfg.exact_rounding and dt != np.float64
        self.t32 = sc.get("sgd_t32", (self.rows, d), dt)
        self.g = sc.get("sgd_g", (self.rows, d), dt)
        self.t64 = sc.get("sgd_t64", (self.rows, d), np.float64) if exact else None

    def step(self, w: np.ndarray, buf: np.ndarray, grad: np.ndarray) -> None:
        """The SGD step on k <= rows gathered rows, in place (``grad`` only read)."""
        k = len(w)
        t32, t64 = self.t32[:k], (self.t64[:k] if self.t64 is not None else None)
        g = grad
        if self.wd is not None:
            g = _muladd(self.g[:k], grad, self.wd, w, t32, t64)     # g = grad + wd * w
        if self.mom is not None:
            buf *= self.mom                                       # buf = m * buf + g (two roundings, as torch)
            buf += g
            if self.nesterov:
                g = _muladd(self.g[:k], g, self.mom, buf, t32, t64)  # g = g + m * buf (g may alias the output)
            else:
                g = buf
        _muladd(w, w, self.neg_lr, g, t32, t64)                   # w = w - lr * g


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
    blk = _Block(w.shape[1], w.dtype, lr, cfg, scratch or Scratch(max_bytes=0))
    for s in range(0, len(w), blk.rows):
        e = s + blk.rows
        blk.step(w[s:e], buf[s:e], grad[s:e])


def sgd_update_indexed(W: np.ndarray, M: Optional[np.ndarray], idx: np.ndarray, grad: np.ndarray, lr: float,
                       cfg: SGDConfig, scratch: Optional[Scratch] = None, block_rows: Optional[int] = None) -> None:
    """One SGD step on rows ``idx`` of ``W`` and of their momentum ``M``, in place.

    Block by block (``BLOCK_BYTES`` per work array, or ``block_rows``): gather the block's rows of W
    and M into reused buffers, update them while they are in cache, scatter them back. Same
    arithmetic, in the same order, as :func:`sgd_update_rows` on the whole gathered set.

    Args:
        W, M: [K, d] the class matrix and its momentum (C-contiguous); M is None for a rule
            without a buffer (``cfg.has_buffer`` False): then only W's rows are gathered.
        idx: [n] distinct local row indices, all valid (validated by the caller).
        grad: [n, d] the summed gradient of row ``idx[i]`` in ``grad[i]``; only read.
        lr, cfg, scratch: as :func:`sgd_update_rows`.
        block_rows: rows per block (tests use small blocks to cover the block edges).
    """
    n, d = grad.shape
    sc = scratch or Scratch(max_bytes=0)
    blk = _Block(d, W.dtype, lr, cfg, sc, block_rows)
    if M is None and blk.mom is not None:
        raise ValueError("sgd_update_indexed: this rule needs a momentum buffer (M is None)")
    wb = sc.get("blk_w", (blk.rows, d), W.dtype)
    bb = sc.get("blk_buf", (blk.rows, d), W.dtype) if M is not None else None
    for s in range(0, n, blk.rows):
        i = idx[s:s + blk.rows]
        k = len(i)
        # mode="clip": ids are validated; "raise" would make take() buffer its output.
        w = np.take(W, i, axis=0, out=wb[:k], mode="clip")
        if M is None:
            blk.step(w, w, grad[s:s + k])   # no buffer: the rule never reads it
            W[i] = w
            continue
        b = np.take(M, i, axis=0, out=bb[:k], mode="clip")
        blk.step(w, b, grad[s:s + k])
        W[i] = w
        M[i] = b
