"""The seam between a trainer and the home of W: the typed :class:`Store` protocol, the
:class:`IndexHook` protocol a store calls on its class index, and the errors both report.

:class:`paramserver.store.WeightStore` (in-process) and :class:`paramserver.client.RemoteStore` (S
ZeroMQ shards) implement :class:`Store` with the same meaning for every method, so the selective
head and the train loop hold a ``Store`` and never ask which one they have; only the builder that
opens a store from a config does. Ids are global class ids (int64), rows and gradients are
``[n, d]`` arrays in the store's dtype, steps count applied updates (step s is the update that makes
``store.step`` s + 1; a pull or query at ``step=s`` answers once update s - 1 is applied).
"""
from __future__ import annotations

from typing import Any, Collection, Optional, Protocol, runtime_checkable

import numpy as np


class StoreError(Exception):
    """Base class of the errors a store reports to its caller (and a server to its client)."""


class BadRequestError(StoreError, ValueError):
    """Malformed arguments: ids, shapes, dtypes, non-finite values, steps. Nothing was modified."""


class StaleStepError(BadRequestError):
    """A push for a step the store has already applied (or too far ahead)."""


class SyncTimeoutError(StoreError, TimeoutError):
    """A pull waited for a step longer than its timeout; the message names the missing clients."""


@runtime_checkable
class Store(Protocol):
    """A K x d matrix W with synchronous row-sparse SGD, a class index, snapshots."""

    @property
    def num_classes(self) -> int: ...                     # K

    @property
    def dim(self) -> int: ...                             # d

    @property
    def step(self) -> int: ...                            # updates applied so far

    @property
    def name(self) -> str:                                # for messages: "in-process store" or the addresses
        ...

    def pull(self, ids: Any, step: Optional[int] = None, timeout: Optional[float] = None) -> np.ndarray:
        """Rows [n, d] of ``ids`` (after update ``step - 1`` when ``step`` is given)."""

    def push(self, ids: Any, grads: np.ndarray, step: int, lr: float, client_id: int = 0) -> Any:
        """This client's gradient rows of step ``step``; the update applies when every client pushed."""

    def query(self, features: np.ndarray, n: int, labels: Optional[np.ndarray] = None, step: Optional[int] = None,
              timeout: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
        """The class index's top-``n`` (ids [B, n] int64, scores [B, n]) per feature."""

    def score(self, features: np.ndarray, k: int, ids: Any = None, scale: Optional[float] = None,
              step: Optional[int] = None, timeout: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features scored against rows ``ids`` (None: all K) where the rows live: (log-sum-exp
        float64 [B], top-k scores float64 [B, k'], their ids int64 [B, k']); scores ``F @ W^T``, or
        ``scale * cos`` with a scale. Rows never travel for a measurement (CPK) or a top-k."""

    def set_rows(self, ids: Any, rows: np.ndarray, matrix: str = "W") -> None: ...

    def snapshot(self, path: str, prune_keep: Optional[Collection[str]] = None) -> Any:
        """Write W (and its optimizer state) atomically to ``path``. ``prune_keep``: then remove the
        older ``store_NNNNNNNN`` siblings of ``path`` except these names and the newest older one
        (a checkpoint on disk may still name it)."""

    def restore(self, path: str) -> Any:
        """Load a snapshot written by :meth:`snapshot`; the class index is rebuilt over it."""

    def set_rebuild_every(self, steps: int) -> None:
        """The class index's minimum rebuild period T (adaptive allocation tunes it)."""

    def stats(self) -> dict[str, Any]:
        """Counters; ``stats()["index"]`` is the class index's stats dict when one is attached."""

    def register(self) -> None:
        """This client (re)joins: a restarted rank's dead predecessor's pending push is dropped."""

    def clone(self) -> "Store":
        """A handle for a second thread (a background pusher); may be this very store."""

    def close(self) -> None:
        """Release what this handle holds (sockets, index build workers); idempotent."""


class IndexHook(Protocol):
    """What a store calls on its attached class index (:class:`paramserver.index.IndexManager`)."""

    rebuild_every: int

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]: ...

    def rows_changed(self, ids: np.ndarray, rows: Optional[np.ndarray], step: int) -> None: ...

    def maybe_rebuild(self, store: Any, step: int) -> bool: ...

    def reset(self, W: np.ndarray, step: int) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self, timeout: Optional[float] = None) -> None: ...
