"""WeightStore: the K x d class matrix of HF-softmax (Zhang et al., AAAI 2018) and its momentum.

Rows are pulled and pushed by global class id; a store may hold one contiguous shard of the ids
(``class_offset`` .. ``class_offset + num_classes``, see :func:`shard_ranges`). Used in-process (the
embedded default, no server) and behind ``paramserver/server.py``.

Step semantics (synchronous SGD over R clients, client ids 0..R-1):
  * Steps are numbered from 0. ``store.step`` is the number of applied updates, i.e. the step whose
    pushes are being collected now.
  * ``push(ids, grads, step, lr, client_id)`` records one client's row gradients for ``step``. When
    all R clients have pushed ``step``, their gradients are summed (duplicate ids too) and one
    row-sparse SGD update (``paramserver/optim.py``) is applied with that step's lr; ``store.step``
    becomes ``step + 1``. A client may push ``store.step`` or ``store.step + 1`` (one step ahead);
    older steps are refused (already applied) and further ones too. Pushes never block.
  * ``pull(ids, step=s)`` blocks until ``store.step >= s`` (it sees the weights after step s-1's
    update), at most ``sync_timeout`` seconds; the timeout error names the clients that have not
    pushed. ``pull(ids)`` returns the current rows at once.
  * All R clients of one step must send the same lr.

Every bad input raises :class:`BadRequestError` before anything is modified, so a refused push or
set_rows leaves the matrix bit-identical.

Snapshots (files, naming, atomic write, recovery, pruning: ``paramserver/snapshot.py``): the store
writes ``W`` and, when the optimizer keeps a momentum buffer ("lazy" with momentum > 0), ``momentum``,
and a manifest with ``num_classes``, ``class_offset``, ``total_classes``, ``dim``, ``dtype``, ``step``,
``optimizer`` ({momentum, weight_decay, nesterov, exact_rounding, sparse_momentum}), ``init`` and
``files`` (``momentum`` only when written). A store whose rule keeps no buffer ("unrolled", or
momentum 0: the default of training) holds, updates and writes no momentum matrix; restoring an
older snapshot that has one (all-zero under "unrolled") still works. Pushes still being collected
are not part of a snapshot. ``restore(path)`` is an instance method that loads a snapshot in place
(same rows, dim and dtype required); :meth:`WeightStore.from_snapshot` builds a new store from one.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any, Optional

import numpy as np

from paramserver import snapshot as snap
from paramserver.api import BadRequestError, IndexHook, StaleStepError, StoreError, SyncTimeoutError  # noqa: F401
from paramserver.optim import Scratch, SGDConfig, sgd_update_indexed
from paramserver.shm import alloc_shared, release_shared, shared_source

logger = logging.getLogger(__name__)

# Largest change an update may make to a row element; far above any trained weight, far below the
# float32 limit (3.4e38), so an accepted update can never turn a row into inf.
_MAX_ROW_STEP = 1e30

SUPPORTED_DTYPES = snap.DTYPES
INIT_SCHEMES = ("normal", "uniform", "zeros")
# score(): rows scored at once (B x 65536 scores: 16 MB at B = 64 in float32)
SCORE_BLOCK_ROWS = 65536
# Rows are initialised in fixed blocks of global ids, each from its own seed, so a shard produces
# exactly the rows that the unsharded matrix would hold (S shards == 1 shard).
INIT_BLOCK_ROWS = 4096
MATRICES = snap.MATRICES


def shard_ranges(num_classes: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous class-id ranges of S shards: shard i holds [i*K//S, (i+1)*K//S)."""
    if num_classes <= 0 or num_shards <= 0 or num_shards > num_classes:
        raise ValueError(f"shard_ranges: need 0 < num_shards <= num_classes, got K={num_classes}, S={num_shards}")
    return [(i * num_classes // num_shards, (i + 1) * num_classes // num_shards) for i in range(num_shards)]


def init_rows(lo: int, hi: int, dim: int, dtype: str, init: str, init_std: float, seed: int,
              out: Optional[np.ndarray] = None, threads: int = 1) -> np.ndarray:
    """Rows [lo, hi) of the initial matrix, independent of how the ids are sharded.

    ``normal``: N(0, init_std^2); ``uniform``: U(-init_std, init_std); ``zeros``. ``out``: fill this
    [hi - lo, dim] array in place; ``threads``: blocks drawn by that many threads (numpy's generators
    release the GIL: 2 threads draw 10M x 256 normals in ~24 s instead of ~47 s); the values do
    not depend on either.
    """
    if out is None:
        out = np.empty((hi - lo, dim), dtype=dtype)
    if init == "zeros":
        out.fill(0)
        return out
    b0, b1 = lo // INIT_BLOCK_ROWS, (hi - 1) // INIT_BLOCK_ROWS
    dt = np.dtype(dtype)

    def fill(blocks: range) -> None:
        for b in blocks:
            # Always draw the whole block so its values never depend on where a shard boundary falls.
            rng = np.random.default_rng([seed, b])
            start = b * INIT_BLOCK_ROWS
            if init == "normal":
                vals = rng.standard_normal((INIT_BLOCK_ROWS, dim), dtype=dt.type)
                vals *= dt.type(init_std)
            else:
                vals = rng.uniform(-init_std, init_std, size=(INIT_BLOCK_ROWS, dim)).astype(dtype, copy=False)
            s, e = max(lo, start), min(hi, start + INIT_BLOCK_ROWS)
            out[s - lo:e - lo] = vals[s - start:e - start]

    n = max(1, min(int(threads), b1 - b0 + 1))
    _parallel([lambda i=i: fill(range(b0 + i, b1 + 1, n)) for i in range(n)])
    return out


def _parallel(fns: list) -> list:
    """Run the callables in threads; return their results in order, re-raising the first error."""
    results: list = [None] * len(fns)
    errors: list = []

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # handed to the caller below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(1, len(fns))]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _sum_duplicates(sids: np.ndarray, grads: np.ndarray, order: np.ndarray,
                    first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum rows of ``grads`` that share an id, left to right in push order.

    ``sids = ids[order]`` (stable sort), ``first`` marks the first of each run of equal ids.
    The k-th occurrence of every id is added in one vectorised pass, so the sum is the plain
    sequential one (g = g0 + g1 + g2 ...), which is what a dense ``index_add_``/``+=`` reference
    gives; ``np.add.reduceat`` would associate differently and break bitwise parity.
    Returns (unique ids [u], summed grads [u, d]).
    """
    starts = np.flatnonzero(first)
    uniq = sids[starts]
    group = np.cumsum(first) - 1                       # [n] index into uniq
    rank = np.arange(len(sids)) - starts[group]        # [n] occurrence number within its id
    g = grads[order[rank == 0]]                        # first occurrences, in uniq order
    for k in range(1, int(rank.max()) + 1):
        sel = rank == k
        g[group[sel]] += grads[order[sel]]
    return uniq, g


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest scores [B, k] sorted descending and their ids (ties: the earlier column)."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part.sort(axis=1)                              # column order: ties resolve as a stable sort would
        scores, ids = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _finite_or_none(d: dict) -> dict:
    """Stats go out as JSON, which has no inf/nan: those become None (e.g. "no build yet")."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


class WeightStore:
    """Row-sparse store of the class matrix W [num_classes, dim] plus its momentum buffer.

    Args:
        num_classes: rows held by this store (the whole K, or one shard's share).
        dim: feature dimension d.
        dtype: "float32" or "float64".
        init: "normal", "uniform" or "zeros" (see :func:`init_rows`).
        init_std: std of the normal init / half-width of the uniform one.
        seed: init seed; rows depend on (seed, global id) only.
        momentum, weight_decay, nesterov: the SGD of ``paramserver/optim.py``.
        num_clients: R, the clients whose pushes make up one synchronous step.
        sync_timeout: seconds a ``pull(step=...)`` waits by default.
        class_offset: global id of this store's first row (shards).
        total_classes: K of the whole matrix (defaults to class_offset + num_classes).
        exact_rounding: bit-identical rounding to torch.optim.SGD on CPU (see optim.py), slower.
        sparse_momentum: "lazy" (torch.optim.SGD on the touched rows) or "unrolled" (see optim.py).
    """

    def __init__(self, num_classes: int, dim: int, dtype: str = "float32", init: str = "normal",
                 init_std: float = 0.01, seed: int = 0, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = False, num_clients: int = 1, sync_timeout: float = 60.0,
                 class_offset: int = 0, total_classes: Optional[int] = None, exact_rounding: bool = False,
                 sparse_momentum: str = "lazy", _rows: Optional[np.ndarray] = None, init_threads: int = 1,
                 defer_init: bool = False, shared_rows: bool = False) -> None:
        if not isinstance(num_classes, (int, np.integer)) or num_classes <= 0:
            raise ValueError(f"WeightStore: num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"WeightStore: dim must be a positive integer, got {dim!r}")
        if str(dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"WeightStore: dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        if init not in INIT_SCHEMES:
            raise ValueError(f"WeightStore: init must be one of {INIT_SCHEMES}, got {init!r}")
        if num_clients <= 0:
            raise ValueError(f"WeightStore: num_clients must be >= 1, got {num_clients!r}")
        if class_offset < 0:
            raise ValueError(f"WeightStore: class_offset must be >= 0, got {class_offset!r}")
        self._K = int(num_classes)
        self._d = int(dim)
        self._dtype = np.dtype(str(dtype))
        self._offset = int(class_offset)
        self._total = int(total_classes) if total_classes is not None else self._offset + self._K
        if self._total < self._offset + self._K:
            raise ValueError(f"WeightStore: total_classes={self._total} < class_offset+num_classes")
        self.opt = SGDConfig(momentum=float(momentum), weight_decay=float(weight_decay), nesterov=bool(nesterov),
                             exact_rounding=bool(exact_rounding), sparse_momentum=str(sparse_momentum))
        self.num_clients = int(num_clients)
        self.sync_timeout = float(sync_timeout)
        self.init_desc = {"init": init, "init_std": float(init_std), "seed": int(seed)}
        self._rows_ready = threading.Event()
        self._init_thread: Optional[threading.Thread] = None
        if _rows is not None:  # from_snapshot: rows already loaded
            self._W = _rows
            self._rows_ready.set()
        elif defer_init:
            # The server binds and answers at once; the rows are drawn in the background (10M x 256:
            # ~24 s on 2 cores) and every operation on them waits for that (a server parks them).
            self._W = self._new_rows(shared_rows)
            args = (self._offset, self._offset + self._K, self._d, str(self._dtype), init, float(init_std), int(seed))

            def fill() -> None:
                t0 = time.perf_counter()
                init_rows(*args, out=self._W, threads=init_threads)
                logger.info("rows initialised (%d x %d) in %.1fs", self._K, self._d, time.perf_counter() - t0)
                self._rows_ready.set()

            self._init_thread = threading.Thread(target=fill, name="store-init", daemon=True)
            self._init_thread.start()
        else:
            self._W = init_rows(self._offset, self._offset + self._K, self._d, str(self._dtype), init,
                                float(init_std), int(seed), out=self._new_rows(shared_rows), threads=init_threads)
            self._rows_ready.set()
        # momentum buffers; zero == "never touched" (see optim.py). np.zeros maps pages lazily. None
        # when the rule keeps no buffer (the default "unrolled"): no second K x d matrix at all.
        self._M: Optional[np.ndarray] = np.zeros(self._W.shape, dtype=self._dtype) if self.opt.has_buffer else None
        self._scratch = Scratch()
        self._step = 0
        # step -> client_id -> (local ids int64 [n], grads [n, d] owned copy, lr)
        # step -> client_id -> (local ids int64 [n], grads [n, d], lr, Frobenius norm of grads)
        self._pending: dict[int, dict[int, tuple[np.ndarray, np.ndarray, float, float]]] = {}
        self._cond = threading.Condition()
        self._index: Any = None
        self._t0 = time.monotonic()
        # refused_updates: steps whose summed gradient would overflow W (applied as empty updates);
        # index_errors: failed index updates or builds (the store keeps serving with the live index).
        # steps (recent ones) whose update was refused for overflow: a server's push reply says so
        self._refused_steps: collections.deque = collections.deque(maxlen=1024)
        self._counts = {"pushes": 0, "pulls": 0, "rows_pushed": 0, "rows_pulled": 0, "scores": 0, "rows_scored": 0,
                        "updates": 0,
                        "refused_updates": 0, "index_errors": 0}

    # ------------------------------------------------------------------ properties
    @property
    def rows_ready(self) -> bool:
        """Whether W holds its rows (False only while a deferred init is drawing them)."""
        return self._rows_ready.is_set()

    def wait_rows(self, timeout: Optional[float] = None) -> None:
        """Wait for a deferred init of the rows; SyncTimeoutError after ``timeout`` (default: sync_timeout;
        math.inf: for as long as it takes)."""
        if self._rows_ready.is_set():
            return
        limit = self.sync_timeout if timeout is None else float(timeout)
        if not self._rows_ready.wait(None if math.isinf(limit) else limit):
            raise SyncTimeoutError(f"the store's rows ({self._K} x {self._d}) are still being initialised after "
                                   f"{limit:.0f}s")

    @property
    def num_classes(self) -> int:
        """Rows held by this store."""
        return self._K

    @property
    def dim(self) -> int:
        return self._d

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def step(self) -> int:
        """Number of applied updates (= the step whose pushes are being collected)."""
        return self._step

    @property
    def class_range(self) -> tuple[int, int]:
        """Global ids [lo, hi) held here."""
        return self._offset, self._offset + self._K

    @property
    def total_classes(self) -> int:
        return self._total

    # ------------------------------------------------------------------ validation
    def _local_ids(self, ids: Any, what: str = "ids") -> np.ndarray:
        """Global ids -> local row indices (int64 [n]); raises BadRequestError on bad input."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise BadRequestError(f"{what}: expected a 1-D array of row ids, got shape {list(arr.shape)}")
        if arr.dtype.kind not in "iu":
            if arr.size == 0:
                arr = arr.astype(np.int64)
            else:
                raise BadRequestError(f"{what}: row ids must be integers, got dtype {arr.dtype}")
        loc = arr.astype(np.int64) - self._offset
        if loc.size:
            bad = (loc < 0) | (loc >= self._K)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                lo, hi = self.class_range
                raise BadRequestError(f"{what}: row id {int(arr[i])} at position {i} is out of range [{lo}, {hi})")
        return loc

    def _check_rows(self, rows: Any, n: int, what: str) -> float:
        """Validate rows [n, d] of the store's dtype, all finite; returns their Frobenius norm (an upper
        bound of every |element|), from one BLAS pass that also detects NaN / Inf."""
        if not isinstance(rows, np.ndarray):
            raise BadRequestError(f"{what}: expected a numpy array, got {type(rows).__name__}")
        if rows.shape != (n, self._d):
            raise BadRequestError(f"{what}: shape {list(rows.shape)} does not match [{n}, {self._d}] (len(ids), dim)")
        if rows.dtype != self._dtype:
            raise BadRequestError(f"{what}: dtype {rows.dtype} does not match the store's {self._dtype}")
        if not rows.size:
            return 0.0
        flat = rows.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            sq = float(np.dot(flat, flat))   # NaN / Inf anywhere -> not finite; so does an overflow of the square
        if not math.isfinite(sq):
            if not np.isfinite(rows).all():
                raise BadRequestError(f"{what}: contains NaN or Inf")
            return math.inf              # finite but huge (|x| > ~1e19): the update's own bound decides
        return math.sqrt(sq)

    @staticmethod
    def _check_matrix(matrix: str) -> str:
        if matrix not in MATRICES:
            raise BadRequestError(f"unknown matrix {matrix!r}; known: {list(MATRICES)}")
        return matrix

    def check_matrix_held(self, matrix: str, op: str) -> str:
        """``matrix`` is known and held by this store: a store whose rule keeps no momentum buffer
        ("unrolled", or momentum 0) refuses to pull or set "momentum" (BadRequestError)."""
        self._check_matrix(matrix)
        if matrix == "momentum" and self._M is None:
            raise BadRequestError(f"{op}: this store keeps no momentum buffer (sparse_momentum="
                                  f"{self.opt.sparse_momentum!r}, momentum={self.opt.momentum}): matrix 'momentum' "
                                  f"exists only under sparse_momentum 'lazy' with momentum > 0")
        return matrix

    # ------------------------------------------------------------------ pull / push
    def missing_clients(self, step: Optional[int] = None) -> list[int]:
        """Clients that have not pushed ``step`` (default: the step being collected)."""
        s = self._step if step is None else step
        got = self._pending.get(s, {})
        return [c for c in range(self.num_clients) if c not in got]

    def pull(self, ids: Any, step: Optional[int] = None, timeout: Optional[float] = None,
             matrix: str = "W", out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows ``ids`` (global) as a new array [n, d] (or written into ``out``, a reused C-contiguous
        [n, d] buffer of the store's dtype, and returned); with ``step``, first wait for store.step >= step."""
        self.wait_rows(timeout)
        self.check_matrix_held(matrix, "pull")
        loc = self._local_ids(ids)
        if out is not None and (not isinstance(out, np.ndarray) or out.shape != (len(loc), self._d)
                                or out.dtype != self._dtype or not out.flags.c_contiguous or not out.flags.writeable):
            raise BadRequestError(f"pull: out must be a writable C-contiguous {self._dtype} array of shape "
                                  f"[{len(loc)}, {self._d}]")
        with self._cond:
            self._wait_for_step(step, timeout, "pull")
            self.check_matrix_held(matrix, "pull")   # a restore during the wait may have changed the rule
            # mode="clip": ids are validated; "raise" would make take() buffer its output
            out = np.take(self._W if matrix == "W" else self._M, loc, axis=0, out=out, mode="clip")
            self._counts["pulls"] += 1
            self._counts["rows_pulled"] += len(loc)
        return out

    def score(self, features: Any, k: int, ids: Any = None, scale: Optional[float] = None,
              step: Optional[int] = None, timeout: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score features against rows where the rows live: per feature, the log-sum-exp of its scores
        over rows ``ids`` (global; None: every row of this store) and its top ``k`` of them.

        Scores are the eval logits of a head: ``F @ W^T`` (``scale`` None, a plain linear head) or
        ``scale * cos(F, W)`` (a margin head). They are computed in blocks of SCORE_BLOCK_ROWS rows in
        the dtype of features and rows (fp32 for both fp32), reduced in float64. Only B x (1 + 2k)
        numbers leave, whatever the number of rows (a CPK probe, a top-k evaluation over all K).

        Returns:
            (lse float64 [B], top scores float64 [B, k'] sorted descending, their global ids int64
            [B, k']), k' = min(k, rows scored); with no rows, lse is -inf and k' = 0.
        """
        self.wait_rows(timeout)
        F = np.asarray(features)
        if F.ndim != 2 or F.shape[1] != self._d or F.dtype.kind != "f":
            raise BadRequestError(f"score: features must be a float [B, {self._d}] array, got {F.dtype} {list(F.shape)}")
        if not np.isfinite(F).all():
            raise BadRequestError("score: features hold NaN or Inf")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise BadRequestError(f"score: k must be an integer >= 1, got {k!r}")
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
            raise BadRequestError(f"score: scale must be a finite number or absent, got {scale!r}")
        loc = None if ids is None else self._local_ids(ids, "score ids")
        n = self._K if loc is None else loc.size
        dtype = np.promote_types(F.dtype, self._dtype)
        Fx = F.astype(dtype)
        if scale is not None:
            Fx = Fx / np.maximum(np.linalg.norm(Fx, axis=1, keepdims=True), 1e-12)
        B, kk = F.shape[0], min(int(k), n)
        lse = np.full(B, -np.inf)
        best_s, best_i = np.empty((B, 0)), np.empty((B, 0), dtype=np.int64)
        with self._cond:
            self._wait_for_step(step, timeout, "score")
        for lo in range(0, n, SCORE_BLOCK_ROWS):
            hi = min(lo + SCORE_BLOCK_ROWS, n)
            rows = np.arange(lo, hi) if loc is None else loc[lo:hi]                    # local row ids
            with self._cond:
                W = (self._W[lo:hi] if loc is None else np.take(self._W, rows, axis=0)).astype(dtype, copy=False)
                if scale is not None:
                    W = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
                blk = (Fx @ W.T).astype(np.float64)                                    # [B, blk]
            if scale is not None:
                blk *= scale
            top = blk.max(axis=1)
            lse = np.logaddexp(lse, top + np.log(np.exp(blk - top[:, None]).sum(axis=1)))
            cand_s = np.concatenate([best_s, blk], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(rows + self._offset, blk.shape)], axis=1)
            best_s, best_i = _top_k(cand_s, cand_i, kk)
        with self._cond:
            self._counts["scores"] += 1
            self._counts["rows_scored"] += n
        return lse, best_s, best_i

    def _wait_for_step(self, step: Optional[int], timeout: Optional[float], op: str) -> None:
        """With ``step``: wait (lock held) until store.step >= step, or SyncTimeoutError naming the
        clients that have not pushed (pull and query)."""
        if step is None:
            return
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise BadRequestError(f"{op}: step must be a non-negative integer, got {step!r}")
        if self._step < step:
            limit = self.sync_timeout if timeout is None else float(timeout)
            if not self._cond.wait_for(lambda: self._step >= step, timeout=limit):
                raise SyncTimeoutError(self.timeout_message(step, limit, op))

    def timeout_message(self, step: int, waited: float, op: str = "pull") -> str:
        return (f"{op} for step {step} timed out after {waited:.1f}s: store is at step {self._step}, "
                f"client ids {self.missing_clients()} of {self.num_clients} have not pushed step {self._step}")

    def push(self, ids: Any, grads: np.ndarray, step: int, lr: float, client_id: int = 0, copy: bool = True,
             apply: bool = True) -> bool:
        """Record client ``client_id``'s row gradients for ``step``; returns True if an update was applied
        (False also when the update of ``step`` was refused for overflow: W unchanged, see refused_updates).

        ``grads`` [n, d] must have the store's dtype, be finite, and match ``len(ids)``; duplicate ids
        are summed. With ``copy`` (default) a push that has to wait for other clients keeps a copy,
        so the caller may reuse its array; ``copy=False`` keeps a reference (the caller promises not
        to modify it, e.g. a received network frame). ``apply=False`` leaves a completed step for
        :meth:`apply_pending` (the server answers the push first, then updates); the return value
        then says whether the step is complete.
        """
        self.wait_rows()
        loc = self._local_ids(ids)
        norm = self._check_rows(grads, len(loc), "push grads")
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise BadRequestError(f"push: step must be a non-negative integer, got {step!r}")
        if not isinstance(client_id, (int, np.integer)) or not 0 <= client_id < self.num_clients:
            raise BadRequestError(f"push: client_id must be in [0, {self.num_clients}), got {client_id!r}")
        try:
            lr = float(lr)
        except (TypeError, ValueError):
            raise BadRequestError(f"push: lr must be a number, got {lr!r}") from None
        if not np.isfinite(lr) or lr < 0 or not np.isfinite(self._dtype.type(lr)):
            raise BadRequestError(f"push: lr must be finite and >= 0 (also as {self._dtype}), got {lr!r}")
        step, client_id = int(step), int(client_id)
        with self._cond:
            if step < self._step:
                raise StaleStepError(f"push for step {step} refused: already applied (store is at step {self._step})")
            if step > self._step + 1:
                raise StaleStepError(f"push for step {step} refused: store is at step {self._step}, "
                                     f"clients may push at most one step ahead")
            got = self._pending.get(step, {})
            if client_id in got:
                raise BadRequestError(f"push: client {client_id} already pushed step {step}")
            for other, (_, _, olr, _) in got.items():
                if olr != lr:
                    raise BadRequestError(f"push: lr {lr!r} for step {step} differs from client {other}'s {olr!r}")
            completes = step == self._step and len(got) + 1 == self.num_clients
            keep = grads if (completes or not copy) else np.array(grads, copy=True)  # only read, never written
            self._pending.setdefault(step, {})[client_id] = (loc, keep, lr, norm)
            self._counts["pushes"] += 1
            self._counts["rows_pushed"] += len(loc)
            if not apply:
                return len(self._pending.get(self._step, {})) == self.num_clients
            return self._apply_ready() and not self.update_refused(step)

    def forget_client(self, client_id: int) -> int:
        """Drop the pending (not yet applied) pushes of ``client_id``: a client that (re)registers is
        a new process, and a dead predecessor's gradient must not be applied in its name. Returns
        how many pushes were dropped."""
        with self._cond:
            dropped = 0
            for step in list(self._pending):
                if self._pending[step].pop(int(client_id), None) is not None:
                    dropped += 1
                if not self._pending[step]:
                    del self._pending[step]
            return dropped

    def apply_pending(self) -> bool:
        """Apply every step whose R pushes are all in (see ``push(apply=False)``); True if any was."""
        with self._cond:
            return self._apply_ready()

    def pending_update_fits(self) -> bool:
        """Whether the complete step being collected surely passes the overflow guard of its update,
        from the pushes' norms alone (no pass over the gradients): every element of the summed
        gradient is at most sum over pushes of sqrt(rows) * norm. False means "not sure": the
        update itself decides (a server then applies it before answering the push)."""
        with self._cond:
            entries = self._pending.get(self._step, {})
            if len(entries) != self.num_clients:
                return False
            lr = next(iter(entries.values()))[2]
            gmax = sum(math.sqrt(len(ids)) * norm for ids, _, _, norm in entries.values())
            m = self.opt.momentum
            return math.isfinite(gmax) and lr / max(1.0 - m, 1e-12) * (1.0 + m) * gmax < _MAX_ROW_STEP

    def update_refused(self, step: int) -> bool:
        """Whether the update of ``step`` was refused for overflow (recent steps; see refused_updates)."""
        return int(step) in self._refused_steps

    def _apply_ready(self) -> bool:
        applied = False
        while len(self._pending.get(self._step, {})) == self.num_clients:
            if not self._apply(self._pending.pop(self._step)):
                self._refused_steps.append(self._step - 1)
            applied = True
        if applied:
            self._cond.notify_all()
        return applied

    def _apply(self, entries: dict[int, tuple[np.ndarray, np.ndarray, float, float]]) -> bool:
        """Sum the R clients' gradients of the current step and apply one SGD update (lock held);
        False when the update was refused for overflow (applied as an empty one, W unchanged)."""
        accepted = True
        order_clients = sorted(entries)
        lr = entries[order_clients[0]][2]
        # With no duplicate id, every element of the applied gradient is one client's element, so
        # the largest client norm bounds it (no pass over g); duplicates are summed and g measured.
        norm_bound = max(entries[c][3] for c in order_clients)
        if len(order_clients) == 1:
            ids, grads, _, _ = entries[order_clients[0]]
        else:
            ids = np.concatenate([entries[c][0] for c in order_clients])
            grads = np.concatenate([entries[c][1] for c in order_clients])
        if ids.size:
            if len(ids) == 1 or bool((ids[1:] > ids[:-1]).all()):
                uniq, g = ids, grads  # strictly increasing (the usual client order): no duplicates, no sort
            else:
                order = np.argsort(ids, kind="stable")  # stable: duplicates summed in client, then position order
                sids = ids[order]
                first = np.ones(len(sids), dtype=bool)
                first[1:] = sids[1:] != sids[:-1]
                if first.all():
                    uniq, g = ids, grads  # no duplicates: keep the caller's order (grads are only read)
                else:
                    uniq, g = _sum_duplicates(sids, grads, order, first)
                    norm_bound = math.nan  # measure the sum itself
            # Every gradient is finite, but their sum over duplicated ids (or clients) may not be, and
            # lr * g may overflow: such an update is refused as a whole and W stays bit-identical.
            # |step| <= lr/(1-m) * (1+m) * max|g| bounds every variant of the SGD rule.
            bound = self._step_bound(g, lr, norm_bound)
            if not bound < _MAX_ROW_STEP:
                self._counts["refused_updates"] += 1
                logger.error("step %d: update refused, W unchanged (the summed gradient of %d rows times lr %g is "
                             "%s: over the limit %g; clients %s)", self._step, len(uniq), lr, bound,
                             _MAX_ROW_STEP, order_clients)
                uniq = uniq[:0]
                accepted = False
            else:
                # Gather, update and scatter back block by block (W and momentum rows stay in cache).
                sgd_update_indexed(self._W, self._M, uniq, g, lr, self.opt, self._scratch)
        else:
            uniq = ids
        self._step += 1
        self._counts["updates"] += 1
        # The index follows W; a failure there (e.g. a build process killed by the OOM killer) must
        # not lose the applied step or take the server down: logged, counted, the live index kept.
        try:
            if self._index is not None:
                if uniq.size:
                    self._index.rows_changed(uniq + self._offset, self._W[uniq], self._step)   # a copy of the rows
                self._index.maybe_rebuild(self, self._step)
        except Exception as e:
            self._counts["index_errors"] += 1
            logger.error("step %d: index update failed (%s: %s); serving on with the live index",
                         self._step, type(e).__name__, e)
        return accepted

    def _step_bound(self, g: np.ndarray, lr: float, gmax: float = math.nan) -> float:
        """Upper bound of |change| of any updated row element: lr/(1-m) * (1+m) * max|g| (nan if g is
        not finite). ``gmax``: a known bound of max|g| (a client's norm); measured from g when not
        finite or when it alone would refuse the update."""
        m = self.opt.momentum
        scale = lr / max(1.0 - m, 1e-12) * (1.0 + m)
        if math.isfinite(gmax) and scale * gmax < _MAX_ROW_STEP:
            return scale * gmax
        hi, lo = float(g.max()), float(g.min())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            return float("nan")
        return scale * max(hi, -lo)

    def set_rows(self, ids: Any, rows: np.ndarray, matrix: str = "W") -> None:
        """Overwrite rows ``ids`` of ``matrix`` ("W" or "momentum"); ids must be distinct."""
        self.wait_rows()
        self._check_matrix(matrix)
        loc = self._local_ids(ids)
        self._check_rows(rows, len(loc), "set_rows rows")
        if len(np.unique(loc)) != len(loc):
            raise BadRequestError("set_rows: ids must be distinct")
        self.check_matrix_held(matrix, "set_rows")
        with self._cond:
            (self._W if matrix == "W" else self._M)[loc] = rows
            if matrix == "W" and self._index is not None and len(loc):
                self._index.rows_changed(loc + self._offset, np.array(rows), self._step)

    # ------------------------------------------------------------------ index hook
    def attach_index(self, manager: IndexHook) -> None:
        """Attach a class index (:class:`paramserver.api.IndexHook`: an IndexManager)."""
        self._index = manager

    @property
    def index(self) -> Optional[IndexHook]:
        return self._index

    @property
    def name(self) -> str:
        return "in-process store"

    def register(self) -> None:
        """Nothing to do in one process (the Store protocol's rejoin of a restarted client)."""

    def clone(self) -> "WeightStore":
        """This store itself: it is thread-safe, and a second thread needs no handle of its own."""
        return self

    def close(self) -> None:
        """Stop the attached index's background builds (idempotent)."""
        if self._index is not None:
            self._index.close()

    def _new_rows(self, shared: bool) -> np.ndarray:
        """An uninitialised K x d matrix; ``shared``: in shared memory when this machine allows (see
        paramserver/shm.py: an index build in a child process then maps W instead of copying it)."""
        shape = (self._K, self._d)
        arr = alloc_shared(shape, str(self._dtype)) if shared else None
        return arr if arr is not None else np.empty(shape, dtype=self._dtype)

    @property
    def rows_shared(self) -> bool:
        """W lives in shared memory (a child process can map it)."""
        return shared_source(self._W) is not None

    def rows_view(self) -> np.ndarray:
        """The live W rows [num_classes, d] (read-only view, for index builders; row i = id offset+i)."""
        v = self._W.view()
        v.flags.writeable = False
        return v

    def query(self, features: np.ndarray, n: int, labels: Optional[np.ndarray] = None, step: Optional[int] = None,
              timeout: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` candidate classes per feature from the attached index: (ids int64 [B, n], scores float32 [B, n]).

        ``labels`` [B]: the batch's global class ids (the graph index enters at each sample's label;
        the other indexes ignore them). ``step``: first wait (as :meth:`pull`) until store.step >= step,
        so the index already holds that step's updated rows."""
        self.wait_rows(timeout)
        feats, labels = self.check_query(features, n, labels)   # refused before any wait
        with self._cond:
            self._wait_for_step(step, timeout, "query")
        if self._index is None:
            raise BadRequestError("query: no class index is attached to this store (attach_index first)")
        # labels only when given: an attached index written for query(F, n) keeps working
        ids, scores = self._index.query(feats, int(n)) if labels is None else self._index.query(feats, int(n), labels)
        return np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)

    def check_query(self, features: Any, n: Any, labels: Any = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Validate a query's inputs (BadRequestError naming the field): features a finite float
        [B, d] array, n a positive integer, labels (optional) integer [B] global class ids in
        [0, total_classes) (the graph index starts each sample's search at its label's row).
        Returns (features, labels) as arrays."""
        feats = np.asarray(features)
        if feats.ndim != 2 or feats.shape[1] != self._d or feats.dtype.kind != "f":
            raise BadRequestError(f"query: features must be a float [B, {self._d}] array, got {feats.dtype} "
                                  f"{list(feats.shape)}")
        if not np.isfinite(feats).all():
            raise BadRequestError("query: features hold NaN or Inf")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
            raise BadRequestError(f"query: n must be a positive integer, got {n!r}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (feats.shape[0],) or labels.dtype.kind not in "iu":
                raise BadRequestError(f"query: labels must be integer [B={feats.shape[0]}], got "
                                      f"{labels.dtype} {list(labels.shape)}")
            bad = (labels < 0) | (labels >= self._total)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise BadRequestError(f"query: labels: class id {int(labels[i])} at position {i} is out of range "
                                      f"[0, {self._total})")
        return feats, labels

    # ------------------------------------------------------------------ snapshots
    def manifest(self) -> dict:
        """What a snapshot of this store records besides its matrices (the format: paramserver/snapshot.py)."""
        return {"format": snap.FORMAT, "version": snap.VERSION, "num_classes": self._K,
                "class_offset": self._offset, "total_classes": self._total, "dim": self._d,
                "dtype": str(self._dtype), "step": self._step, "optimizer": self.opt.to_dict(),
                "init": self.init_desc, "files": snap.matrix_files(self._matrices()),
                "created_unix": time.time()}

    def snapshot(self, path: str, prune_keep: Optional[Any] = None, fsync: bool = False) -> dict:
        """Write W, momentum and the manifest to directory ``path`` atomically; returns the manifest.

        ``prune_keep``: then remove the older ``store_NNNNNNNN`` siblings of ``path`` but these names
        and the newest older one (:func:`paramserver.snapshot.prune_snapshots`; a server does the same
        for its client). ``fsync`` also forces the data to disk (survives power loss, not only a
        killed process).
        """
        self.wait_rows()
        with snap.writing(path) as tmp:
            with self._cond:   # no update between the manifest's step and the rows written
                man = self.manifest()
                snap.write_matrices(tmp, man, self._matrices(), fsync)
                index = self._index.export_state() if self._index is not None else None
            if index is not None:     # the class index, for an exact resume (read only by restore)
                snap.write_index_state(tmp, *index)
            snap.write_manifest(tmp, man)
        logger.info("snapshot of step %d written to %s (%.1f MB)", man["step"], path,
                    self._nbytes() / 1e6)
        if prune_keep is not None:
            snap.prune_snapshots(path, set(prune_keep), keep_previous=True)
        return man

    def _matrices(self) -> dict:
        """The matrices this store holds: W, and momentum when its rule keeps a buffer."""
        return {"W": self._W} if self._M is None else {"W": self._W, "momentum": self._M}

    def _nbytes(self) -> int:
        return int(sum(a.nbytes for a in self._matrices().values()))

    def restore(self, path: str, in_place: bool = False) -> dict:
        """Load snapshot ``path`` into this store (same rows, dim, dtype required); returns its manifest.

        The step and optimizer settings are taken from the snapshot; pending pushes are dropped.
        By default the files are read into new arrays that replace the old ones only when both were
        read completely and match their checksums (a bad file leaves the store untouched);
        ``in_place=True`` reads straight into the existing arrays instead (no second copy in memory,
        for large matrices), after checking every file's header, size and checksum (a first read
        pass), so a refused restore leaves the store untouched there too. W stays in shared memory
        when it was there.
        """
        self.wait_rows()          # a deferred init must not write over what is restored
        snap.recover_snapshot(path)   # a writer killed mid-snapshot: move its complete sibling back, sweep the rest
        man = snap.read_manifest(path)
        want = {"num_classes": self._K, "class_offset": self._offset, "dim": self._d, "dtype": str(self._dtype)}
        for key, val in want.items():
            if man[key] != val:
                raise BadRequestError(f"snapshot {path}: manifest {key}={man[key]!r} does not match this store's {val!r}")
        restored = SGDConfig.from_dict(man["optimizer"])
        with self._cond:
            # The momentum file only when the snapshot's rule uses a buffer (an older "unrolled"
            # snapshot holds an all-zero one: not read, not kept).
            # A W in shared memory stays there (an index build in a child process maps it): read in
            # place, or into a new shared matrix when this machine still has room for one.
            into = {"W": self._W, "momentum": self._M} if in_place else {"W": self._new_rows(self.rows_shared)}
            try:
                got = snap.read_matrices(path, man, MATRICES if restored.has_buffer else ("W",), into,
                                         in_place=in_place)
            except BaseException:
                if not in_place:
                    release_shared(into["W"])   # the new matrix, never the live one
                raise
            if got["W"] is not self._W:
                release_shared(self._W)   # replaced, not overwritten: its shared pages go with the last mapping
            self._W, self._M = got["W"], got.get("momentum")
            self._step = int(man["step"])
            self._pending.clear()
            self._refused_steps.clear()
            if restored != self.opt:  # the snapshot's optimizer wins, as its momentum matches it
                logger.warning("restore %s: optimizer %s from the snapshot replaces this store's %s",
                               path, restored.to_dict(), self.opt.to_dict())
            self.opt = restored
            self._cond.notify_all()
        logger.info("restored step %d from %s", self._step, path)
        # The attached index: the one the snapshot saved (the live index and the build due, so that
        # a resumed run selects exactly as the saved one would have), else dropped and rebuilt over
        # the restored rows (in the background for a large W: restore answers at once; selection
        # falls back to a random fill until the new index is live; a build still running is retired).
        if self._index is not None:
            state = snap.read_index_state(path)
            try:
                if state is None:
                    raise ValueError("the snapshot holds no index state")
                self._index.import_state(*state, self.rows_view(), self._step)
            except (ValueError, KeyError, OSError) as e:
                logger.info("restore %s: index rebuilt over the restored rows (%s)", path, e)
                self._index.reset(self.rows_view(), self._step)
        return man

    def set_rebuild_every(self, steps: int) -> None:
        """Set the attached index's minimum rebuild period T (adaptive allocation tunes it)."""
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise BadRequestError(f"set_rebuild_every: steps must be an integer >= 1, got {steps!r}")
        if self._index is None:
            raise BadRequestError("set_rebuild_every: no rebuilding class index is attached to this store")
        self._index.rebuild_every = int(steps)

    @classmethod
    def from_snapshot(cls, path: str, num_clients: int = 1, sync_timeout: float = 60.0,
                      shared_rows: bool = False) -> "WeightStore":
        """A new store holding snapshot ``path`` (shape, dtype, step and optimizer from its manifest);
        ``shared_rows``: W read into shared memory when this machine allows (see the constructor)."""
        man = snap.read_manifest(path)
        shape = (man["num_classes"], man["dim"])
        into = alloc_shared(shape, man["dtype"]) if shared_rows else None
        try:
            W = snap.read_matrices(path, man, ("W",), {"W": into})["W"]
        except BaseException:
            if into is not None:
                release_shared(into)
            raise
        o = man["optimizer"]
        store = cls(man["num_classes"], man["dim"], dtype=man["dtype"], init="zeros",
                    momentum=float(o["momentum"]), weight_decay=float(o["weight_decay"]),
                    nesterov=bool(o["nesterov"]), exact_rounding=bool(o.get("exact_rounding", False)),
                    sparse_momentum=str(o.get("sparse_momentum", "lazy")), num_clients=num_clients, sync_timeout=sync_timeout,
                    class_offset=man["class_offset"], total_classes=man["total_classes"], _rows=W)
        if store._M is not None:
            snap.read_matrices(path, man, ("momentum",), {"momentum": store._M})
        store._step = int(man["step"])
        if isinstance(man.get("init"), dict):
            store.init_desc = man["init"]
        logger.info("loaded snapshot of step %d from %s", store._step, path)
        return store

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Counters: rows, bytes, step, pushes, pulls, pushes/s and updates/s since creation."""
        el = max(time.monotonic() - self._t0, 1e-9)
        lo, hi = self.class_range
        return {"rows": self._K, "dim": self._d, "dtype": str(self._dtype), "class_range": [lo, hi],
                "bytes": self._nbytes(), "momentum_buffer": self._M is not None, "rows_shared": self.rows_shared,
                "step": self._step,
                "num_clients": self.num_clients, "pending_clients": len(self._pending.get(self._step, {})),
                **self._counts, "pushes_per_s": self._counts["pushes"] / el,
                "updates_per_s": self._counts["updates"] / el, "uptime_s": el,
                **({"index": _finite_or_none(self._index.stats())} if self._index is not None else {})}
