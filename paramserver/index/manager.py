"""IndexManager: the live index of one store shard, rebuilt in the background and swapped atomically."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .base import ClassIndex

logger = logging.getLogger(__name__)


class IndexManager:
    """Owns the live index of one store shard; rebuilds in the background and swaps atomically.

    Scheduling (the paper rebuilds every T steps; at K = 1M an Annoy build takes ~96 s against
    ~22 ms per step, so T can only be a minimum): a build starts when at least `rebuild_every` steps
    (and `min_interval_s` seconds) have passed since the last build STARTED and no build is
    running -- builds never queue. Queries always use the current index and never wait for a build.

    The background build reads the live W without a full snapshot (a 2 GB copy at 1M x 512 would
    itself stall a step): rows pushed during the build may be read at either version, which an
    approximate index tolerates. For an incremental index (IVF), the rows changed during the build
    are recorded and replayed onto the new index before it goes live, so no update is lost.

    The build runs in a thread: Annoy's build, hnswlib's add_items and faiss all release the GIL
    (Annoy's per-row add_item loop does not, but each call is short). It uses `background_threads`
    threads and a raised nice value (Linux; per thread, and for a build subprocess), so that on a
    busy machine the build takes only CPU the trainer leaves idle. A niced thread that holds the
    GIL for long (Annoy's per-row add_item loop) would starve the trainer instead -- a priority
    inversion measured at a ~50% step-rate cost -- so HashingForest builds in a subprocess.

    Args:
        factory: returns a fresh, unbuilt ClassIndex (metric, offset, options already bound).
        rebuild_every: minimum steps between build starts (T); >= 1.
        background: build in a thread (True) or synchronously inside maybe_rebuild (False).
        min_interval_s: minimum seconds between build starts.
        background_threads: library threads for background builds (None = library default).
        background_nice: nice increment of the build thread (Linux; 0 disables).
        max_duty: at most this fraction of wall time is spent building: after a build of b seconds
            the next one starts no sooner than b / max_duty seconds after it started (1 = back to
            back). On a machine whose cores the trainer needs, the step-rate cost is roughly
            max_duty times the cost of continuous rebuilds.
        deterministic: make the index a function of the step, not of timing, so a seed reproduces
            a run: builds start at multiples of T only, read a copy of W taken at that step (under
            the store's lock: consistent), and go live at the next multiple of T (the store then
            waits for a late build, logged as ``wait_s``); rows changed meanwhile are replayed onto
            an incremental index before it goes live. None (default): on when the copy of W is at
            most ``copy_limit_bytes`` (1 GiB: up to 500K x 512 fp32), else off with a log line (a
            2 GB+ copy per build and waits on a minutes-long build cost more than reproducibility
            is worth there). ``min_interval_s`` and ``max_duty`` apply only when off.
    """

    def __init__(self, factory: Callable[[], ClassIndex], rebuild_every: int, background: bool = True,
                 min_interval_s: float = 0.0, *, background_threads: Optional[int] = 1,
                 background_nice: int = 10, max_duty: float = 1.0, deterministic: Optional[bool] = None,
                 copy_limit_bytes: int = 1 << 30) -> None:
        if not callable(factory):
            raise ValueError(f"factory must be callable, got {factory!r}")
        if rebuild_every < 1:
            raise ValueError(f"rebuild_every must be >= 1, got {rebuild_every}")
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        if not 0.0 < max_duty <= 1.0:
            raise ValueError(f"max_duty must be in (0, 1], got {max_duty}")
        self.max_duty = float(max_duty)
        self.factory = factory
        self.rebuild_every = int(rebuild_every)
        self.background = bool(background)
        self.min_interval_s = float(min_interval_s)
        self.background_threads = background_threads
        self.background_nice = int(background_nice)

        self._lock = threading.Lock()      # guards the fields below; never held during a build
        self._index: Optional[ClassIndex] = None
        self._source_step = 0              # step of the W the live index reflects
        self._built_step = 0               # step at which the live index's build started
        self._step = 0                     # latest step seen
        self._thread: Optional[threading.Thread] = None
        self._building = False
        self._pending: Optional[List[Tuple[np.ndarray, np.ndarray, int]]] = None  # updates during an incremental build
        self._last_start_step: Optional[int] = None
        self._last_start_time = -math.inf
        self._build_times: List[float] = []
        self._start_steps: List[int] = []  # start step of every completed build
        self._start_times: List[float] = []
        self._error: Optional[BaseException] = None
        self._closed = False
        self._name = "?"
        self.deterministic = deterministic
        self.copy_limit_bytes = int(copy_limit_bytes)
        self._gen = 0                      # build generation: a restore retires a running build
        self._ready: Optional[ClassIndex] = None   # deterministic: built, waiting for its live step
        self._ready_step = 0               # its build (source) step
        self._live_at: Optional[int] = None  # deterministic: step at which the running build goes live
        self._waits: List[float] = []      # deterministic: seconds the store waited for late builds

    # -- building ---------------------------------------------------------------------------
    def _is_deterministic(self, W: np.ndarray) -> bool:
        if self.deterministic is None:
            self.deterministic = W.nbytes <= self.copy_limit_bytes
            if not self.deterministic:
                logger.info("index builds read the live W (%.1f GB > the %.1f GB copy limit): background builds go "
                            "live when done, so runs are not bitwise reproducible", W.nbytes / 1e9,
                            self.copy_limit_bytes / 1e9)
        return bool(self.deterministic)

    def build_now(self, W: np.ndarray, step: Optional[int] = None) -> None:
        """Synchronous build from W (first build, restore, tests); the result goes live at once.
        A background build still running is retired: its result is discarded."""
        step = self._step if step is None else int(step)
        with self._lock:
            self._gen += 1
            self._building = False
            self._ready, self._live_at = None, None
            self._step = step
        index = self.factory()
        self._run_build(index, W, step, background=False)

    def _go_live(self, step: int) -> None:
        """Deterministic mode, at the build's live step: wait for it, replay, swap (store lock held)."""
        t0 = time.perf_counter()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join()
        waited = time.perf_counter() - t0
        if self._error is not None:
            return                          # raised by maybe_rebuild; the old index stays live
        with self._lock:
            index, batch = self._ready, self._pending or []
            self._ready, self._live_at, self._pending = None, None, None
        if index is None:
            return
        for ids, rows, _ in batch:          # rows changed since the build's last replay
            index.update(ids, rows)
        with self._lock:
            self._index = index
            self._source_step = step if index.incremental else self._ready_step
            self._built_step = self._ready_step
            self._name = index.name
        self._waits.append(waited)
        if waited > 0.01:
            logger.info("index %s went live at step %d after waiting %.2fs for its build (deterministic swap)",
                        index.name, step, waited)

    def maybe_rebuild(self, store: Any, step: int) -> bool:
        """Called by the store after each applied update. Returns True if a build was started."""
        if self._error is not None:
            err, self._error = self._error, None
            with self._lock:
                self._ready, self._live_at, self._pending = None, None, None
            raise RuntimeError(f"background index build failed: {err!r}") from err
        step = int(step)
        if self._live_at is not None and step >= self._live_at:
            self._go_live(step)
        with self._lock:
            self._step = max(self._step, step)
            if self._closed or self._building or self._live_at is not None:
                return False
            first = self._index is None
            W_live = store.weights() if hasattr(store, "weights") else store.rows_view()
            det = self.background and not first and self._is_deterministic(W_live)
            if det and step % self.rebuild_every:
                return False                # deterministic builds start at multiples of T only
            if not first and not det:
                if self._last_start_step is not None and step - self._last_start_step < self.rebuild_every:
                    return False
                wait_s = self.min_interval_s
                if self._build_times and self.max_duty < 1.0:
                    wait_s = max(wait_s, self._build_times[-1] / self.max_duty)
                if time.monotonic() - self._last_start_time < wait_s:
                    return False
            index = self.factory()
            self._building = True
            self._pending = [] if index.incremental and not first else None
            self._last_start_step, self._last_start_time = step, time.monotonic()
            if det:
                self._live_at = step + self.rebuild_every
        # The live [K_shard, d] rows: `weights()` per the agreed interface; WeightStore names it
        # `rows_view()` (a read-only view), so accept either. Deterministic: a copy taken now, while
        # the store's lock holds every update back.
        W = np.array(W_live, copy=True) if det else W_live
        if first or not self.background:
            # No index yet: nothing could answer a query, so the first build is synchronous.
            self._run_build(index, W, step, background=False, claimed=True)
        else:
            if self.background_threads is not None:
                index.build_threads = self.background_threads
            index.build_nice = self.background_nice
            self._thread = threading.Thread(target=self._run_build, args=(index, W, step, True, True, det),
                                            name=f"index-build-{index.name}", daemon=True)
            self._thread.start()
        return True

    def _run_build(self, index: ClassIndex, W: np.ndarray, step: int, background: bool,
                   claimed: bool = False, deferred: bool = False) -> None:
        """Build `index` from W, replay pending incremental updates, swap it in atomically
        (``deferred``: leave it ready for :meth:`_go_live` at its live step instead)."""
        gen = self._gen
        if not claimed:
            with self._lock:
                if self._building:
                    raise RuntimeError("a build is already running; builds never queue")
                self._building = True
                self._pending = None
                self._last_start_step, self._last_start_time = step, time.monotonic()
        t0 = time.perf_counter()
        try:
            if background and self.background_nice and hasattr(os, "setpriority"):
                with contextlib.suppress(OSError):  # per-thread on Linux: only this thread yields
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.background_nice)
            index.build(W)
            source_step = step
            while True:  # replay rows changed during the build, then swap with nothing pending
                with self._lock:
                    if gen != self._gen:       # retired by a restore: discard
                        logger.info("index %s build of step %d retired (the store was restored)", index.name, step)
                        return
                    batch = self._pending or []
                    if not batch and deferred:
                        self._ready, self._ready_step = index, step
                        self._build_times.append(time.perf_counter() - t0)
                        self._start_steps.append(step)
                        self._start_times.append(self._last_start_time)
                        self._pending = [] if index.incremental else None
                        break
                    if not batch:
                        self._index = index
                        self._pending = None
                        self._source_step = max(source_step, step)
                        self._built_step = step
                        self._build_times.append(time.perf_counter() - t0)
                        self._start_steps.append(step)
                        self._start_times.append(self._last_start_time)
                        self._name = index.name
                        break
                    self._pending = []
                for ids, rows, s in batch:
                    index.update(ids, rows)
                    source_step = max(source_step, s)
            logger.info("index %s built: K=%d in %.2fs (started at step %d)", index.name,
                        index.num_classes, self._build_times[-1], step)
        except BaseException as err:  # surface it on the next maybe_rebuild, keep the old index
            logger.exception("index build failed")
            if not background:
                raise
            self._error = err
        finally:
            with self._lock:
                if gen == self._gen:
                    self._building = False
                    if self._ready is None:
                        self._pending = None

    # -- per step -----------------------------------------------------------------------------
    def rows_changed(self, ids: np.ndarray, rows: np.ndarray, step: int) -> None:
        """Forward changed rows to an incremental live index (and record them for a running
        incremental build); a no-op for the other indexes."""
        with self._lock:
            self._step = max(self._step, int(step))
            index = self._index
            if self._pending is not None:
                self._pending.append((np.array(ids, dtype=np.int64, copy=True), np.array(rows, copy=True), int(step)))
            if index is not None and index.incremental:
                index.update(ids, rows)
                self._source_step = max(self._source_step, int(step))

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Query the live index; never waits for a running build."""
        with self._lock:
            index = self._index
        if index is None:
            raise RuntimeError("no index yet: call build_now(W) or maybe_rebuild(store, step) first")
        return index.query(F, n) if labels is None else index.query(F, n, labels)

    @property
    def index(self) -> Optional[ClassIndex]:
        """The live index (None before the first build)."""
        return self._index

    def stats(self) -> Dict[str, Any]:
        """builds, last_build_s, mean_build_s, staleness_steps (steps since the live index's source
        W; for an incremental index the rows are current, so this counts steps since the last
        forwarded update), steps_since_build (age of the build itself, e.g. IVF centroids),
        achieved_period_steps / achieved_period_s (mean gap between build starts), building, name."""
        with self._lock:
            n = len(self._build_times)
            period = float(np.mean(np.diff(self._start_steps))) if n >= 2 else float("nan")
            period_s = float(np.mean(np.diff(self._start_times))) if n >= 2 else float("nan")
            return {
                "name": self._name,
                "builds": n,
                "last_build_s": self._build_times[-1] if n else float("nan"),
                "mean_build_s": float(np.mean(self._build_times)) if n else float("nan"),
                "staleness_steps": self._step - self._source_step if self._index is not None else -1,
                "steps_since_build": self._step - self._built_step if self._index is not None else -1,
                "achieved_period_steps": period,
                "achieved_period_s": period_s,
                "building": self._building,
                "deterministic": bool(self.deterministic),
                "swap_wait_s": float(np.sum(self._waits)) if self._waits else 0.0,
                "incremental": bool(self._index is not None and self._index.incremental),
            }

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop starting builds and join a running one (builds cannot be interrupted)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
