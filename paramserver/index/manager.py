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


# head.deterministic / paramserver.py --deterministic -> IndexManager(deterministic=...)
DETERMINISTIC_MODES = {"auto": None, "on": True, "off": False}


class IndexManager:
    """Owns the live index of one store shard; rebuilds in the background and swaps atomically.

    Scheduling (the paper rebuilds every T steps; at K = 1M an Annoy build takes ~96 s against
    ~22 ms per step, so T can only be a minimum): a build starts when at least `rebuild_every` steps
    (and `min_interval_s` seconds) have passed since the last build STARTED and no build is
    running -- builds never queue. Queries always use the current index and never wait for a build.

    Nothing blocks on a build: the first build (:meth:`start`), and the one after a restore
    (:meth:`reset`), run in the background unless W is at most ``sync_first_build_bytes`` (16 MiB:
    every index builds that in well under a second). Until an index is live, :meth:`query` answers
    "no candidates" (ids -1), so select_active fills the active set at random from the head's
    per-step generator (counted: ``fallback_queries``, logged once). A reset retires a running
    build: a graph build stops at its next list, a build subprocess is killed, others finish and are
    discarded; the new build starts once the old one has stopped (never two at once).

    The background build reads the live W without a full snapshot (a 2 GB copy at 1M x 512 would
    itself stall a step): rows pushed during the build may be read at either version, which an
    approximate index tolerates. For an incremental index (IVF, graph, exact) the ids changed
    during the build are recorded (ids only: 8 bytes a row, not the rows) and, before it goes
    live, the new index is bound to the live rows and those ids are re-read from them, so no update
    is lost.

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
            waits for a late build, logged as ``wait_s``: every client waits with it); rows changed
            meanwhile are replayed onto an incremental index before it goes live. None (default): on
            when W is at most ``copy_limit_bytes`` (64 MiB: up to 32K x 512 fp32, where builds take
            seconds), else off with a log line: a build over more rows can outlast T steps (a 1M x
            256 graph build takes ~85 s), and each period would then end with every client waiting
            for it. True: on at any size (the copy of W included); False: off. ``min_interval_s`` and ``max_duty`` apply only when off. The first
            build (and the one after a reset) started in the background goes live at the first
            multiple of T after its start step when on, as soon as it is done when off.
        sync_first_build_bytes: a first build over at most this many bytes of W runs synchronously.
    """

    def __init__(self, factory: Callable[[], ClassIndex], rebuild_every: int, background: bool = True,
                 min_interval_s: float = 0.0, *, background_threads: Optional[int] = 1,
                 background_nice: int = 10, max_duty: float = 1.0, deterministic: Optional[bool] = None,
                 copy_limit_bytes: int = 64 << 20, sync_first_build_bytes: int = 16 << 20) -> None:
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
        self.sync_first_build_bytes = int(sync_first_build_bytes)

        self._lock = threading.Lock()      # guards the fields below; never held during a build
        self._index: Optional[ClassIndex] = None
        self._live_rows: Optional[np.ndarray] = None   # the store's rows (a view) the indexes read
        self._source_step = 0              # step of the W the live index reflects
        self._built_step = 0               # step at which the live index's build started
        self._step = 0                     # latest step seen
        self._thread: Optional[threading.Thread] = None
        self._building: Optional[ClassIndex] = None   # the index being built (None: no build running)
        self._changed: Optional[List[np.ndarray]] = None  # ids changed during an incremental build
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
        self._gen = 0                      # build generation: a reset retires a running build
        self._ready: Optional[ClassIndex] = None   # built, waiting for its live step
        self._ready_step = 0               # its build (source) step
        self._live_at: Optional[int] = None  # step at which the running build goes live (None: when done)
        self._waits: List[float] = []      # deterministic: seconds the store waited for late builds
        self._fallback = 0                 # queries answered with no index live (random fill)
        self._fallback_logged = False

    # -- building ---------------------------------------------------------------------------
    def _is_deterministic(self, W: np.ndarray) -> bool:
        if self.deterministic is None:
            self.deterministic = W.nbytes <= self.copy_limit_bytes
            if not self.deterministic:
                logger.info("index builds read the live W (%.1f MB > %.1f MB): background builds go live when "
                            "done, so runs are not bitwise reproducible (head.deterministic=on / --deterministic "
                            "on: they are, and every client waits for a build that outlasts T steps)",
                            W.nbytes / 1e6, self.copy_limit_bytes / 1e6)
        return bool(self.deterministic)

    def _retire(self) -> Optional[threading.Thread]:
        """Retire the running build and any ready one (lock held); returns the thread to wait for."""
        self._gen += 1
        if self._building is not None:
            self._building.cancel()
        self._building = None
        self._ready, self._live_at, self._changed = None, None, None
        return self._thread

    def build_now(self, W: np.ndarray, step: Optional[int] = None) -> None:
        """Synchronous build from W (tests, tools); the result goes live at once. A background build
        still running is retired (stopped where it can be, its result discarded)."""
        with self._lock:
            step = self._step if step is None else int(step)
            old = self._retire()
            self._step = step
            self._live_rows = W
            self._last_start_step, self._last_start_time = step, time.monotonic()
        del old   # not awaited: a build that cannot stop finishes beside this one and is discarded
        self._run_build(self.factory(), W, step, background=False)

    def start(self, W: np.ndarray, step: int = 0) -> None:
        """The first build over the store's rows ``W`` (a view, read in place): synchronous when W is
        small (``sync_first_build_bytes``) or ``background`` is off, else in the background while
        queries fall back to a random fill. Never waits for a build."""
        with self._lock:
            self._step = max(self._step, int(step))
            self._live_rows = W
        self._start_build(W, int(step), first=True)

    def reset(self, W: np.ndarray, step: int) -> None:
        """The store's rows were replaced (restore): drop the live index (built over other rows),
        retire a running build, and build over ``W`` as :meth:`start` does."""
        with self._lock:
            old = self._retire()
            self._index = None
            self._step = int(step)
            self._live_rows = W
        self._start_build(W, int(step), first=True, after=old)

    def _start_build(self, W: np.ndarray, step: int, first: bool, after: Optional[threading.Thread] = None) -> bool:
        """Start a build (first: possibly synchronous); False when one is running or the manager is closed."""
        det = self.background and self._is_deterministic(W)
        sync = not self.background or (first and W.nbytes <= self.sync_first_build_bytes)
        with self._lock:
            if self._closed or self._building is not None:
                return False
            index = self.factory()
            if not first and self._index is not None:
                index.inherit(self._index)
            self._building = index
            self._changed = [] if index.incremental and not sync else None
            self._last_start_step, self._last_start_time = step, time.monotonic()
            gen = self._gen
            if not sync:
                # deterministic: live at the next multiple of T (a first build too); else when done
                self._live_at = (step // self.rebuild_every + 1) * self.rebuild_every if det else None
        # Deterministic: a copy taken now (the store's lock holds every update back), freed after the build.
        src = np.array(W, copy=True) if (det and not sync) else W
        if sync:
            if after is not None:
                after.join()
            self._run_build(index, src, step, background=False, gen=gen)
            return True
        if self.background_threads is not None:
            index.build_threads = self.background_threads
        index.build_nice = self.background_nice
        self._thread = threading.Thread(target=self._run_build, args=(index, src, step, True, gen, after),
                                        name=f"index-build-{index.name}", daemon=True)
        self._thread.start()
        if first:
            logger.info("index %s: first build of %d rows started in the background at step %d; random fill "
                        "until it is live", index.name, W.shape[0], step)
        return True

    def _go_live(self, step: int) -> None:
        """At the build's live step: wait for it (deterministic), replay, swap (store lock held)."""
        t0 = time.perf_counter()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join()
        waited = time.perf_counter() - t0
        if self._error is not None:
            return                          # raised by maybe_rebuild; the old index stays live
        with self._lock:
            index, ids = self._ready, self._changed
            self._ready, self._live_at, self._changed = None, None, None
            rows = self._live_rows
        if index is None:
            return
        self._bind_and_replay(index, rows, ids)
        with self._lock:
            self._index = index
            self._source_step = step if index.incremental else self._ready_step
            self._built_step = self._ready_step
            self._name = index.name
        self._waits.append(waited)
        if waited > 0.01:
            logger.info("index %s went live at step %d after waiting %.2fs for its build (deterministic swap)",
                        index.name, step, waited)

    @staticmethod
    def _bind_and_replay(index: ClassIndex, rows: Optional[np.ndarray], ids: Optional[List[np.ndarray]]) -> None:
        """Point the index at the live rows and re-read the rows changed since its build began."""
        if rows is None:
            return
        index.bind_rows(rows)
        if ids:
            u = np.unique(np.concatenate(ids))                 # global ids
            for lo in range(0, u.size, 65536):
                part = u[lo:lo + 65536]
                index.update(part, np.asarray(rows[part - index.class_offset]))

    def maybe_rebuild(self, store: Any, step: int) -> bool:
        """Called by the store after each applied update. Returns True if a build was started."""
        if self._error is not None:
            err, self._error = self._error, None
            with self._lock:
                self._ready, self._live_at, self._changed = None, None, None
            raise RuntimeError(f"background index build failed: {err!r}") from err
        step = int(step)
        W_live = store.weights() if hasattr(store, "weights") else store.rows_view()
        with self._lock:
            self._live_rows = W_live
        if self._live_at is not None and step >= self._live_at:
            self._go_live(step)
        with self._lock:
            self._step = max(self._step, step)
            if self._closed or self._building is not None or self._live_at is not None or self._ready is not None:
                return False
            first = self._index is None
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
        return self._start_build(W_live, step, first=first)

    def _run_build(self, index: ClassIndex, W: np.ndarray, step: int, background: bool,
                   gen: Optional[int] = None, after: Optional[threading.Thread] = None) -> None:
        """Build `index` from W, bind it to the live rows, replay the ids changed meanwhile, and swap
        it in (or, with a live step set, leave it ready for :meth:`_go_live`)."""
        if gen is None:
            with self._lock:
                gen = self._gen
                self._building = index
        t0 = time.perf_counter()
        try:
            if after is not None:
                after.join()                   # a retired build: never two at once
            if background and self.background_nice and hasattr(os, "setpriority"):
                with contextlib.suppress(OSError):  # per-thread on Linux: only this thread yields
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.background_nice)
            if gen != self._gen:
                return
            index.build(W)
            del W                              # a deterministic build's copy is freed here
            source_step = step
            while True:  # replay ids changed during the build, then swap with nothing pending
                with self._lock:
                    if gen != self._gen:       # retired by a reset: discard
                        logger.info("index %s build of step %d retired (the store was restored)", index.name, step)
                        return
                    ids, rows = self._changed, self._live_rows
                    if self._live_at is not None:
                        self._ready, self._ready_step = index, step
                        self._record(t0, step)
                        break                  # _go_live binds, replays the rest and swaps
                    if not ids:
                        if rows is not None:
                            index.bind_rows(rows)
                        self._index = index
                        self._changed = None
                        self._source_step = source_step
                        self._built_step = step
                        self._record(t0, step)
                        self._name = index.name
                        break
                    self._changed = []
                    source_step = self._step
                self._bind_and_replay(index, rows, ids)
            logger.info("index %s built: K=%d in %.2fs (started at step %d)", index.name,
                        index.num_classes, self._build_times[-1], step)
        except BaseException as err:  # surface it on the next maybe_rebuild, keep the old index
            if gen != self._gen:
                logger.info("index %s build of step %d stopped (retired)", index.name, step)
                return
            logger.exception("index build failed")
            if not background:
                raise
            self._error = err
        finally:
            with self._lock:
                if gen == self._gen:
                    self._building = None
                    if self._ready is None:
                        self._changed = None
                        self._live_at = None

    def _record(self, t0: float, step: int) -> None:
        self._build_times.append(time.perf_counter() - t0)
        self._start_steps.append(step)
        self._start_times.append(self._last_start_time)

    # -- per step -----------------------------------------------------------------------------
    def rows_changed(self, ids: np.ndarray, rows: Optional[np.ndarray], step: int) -> None:
        """Rows ``ids`` (global) of the store changed: forward them to an incremental live index and
        record the ids for a running incremental build. ``rows``: their new values (None: read from
        the store's rows)."""
        with self._lock:
            self._step = max(self._step, int(step))
            index = self._index
            if self._changed is not None:
                self._changed.append(np.array(ids, dtype=np.int64))   # global ids; a copy
            if index is not None and index.incremental:
                if rows is None:
                    rows = np.asarray(self._live_rows[np.asarray(ids, dtype=np.int64) - index.class_offset])
                index.update(ids, rows)
                self._source_step = max(self._source_step, int(step))

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Query the live index; never waits for a build. With none live yet: no candidates (ids -1,
        scores -inf), so the selection fills at random (counted as ``fallback_queries``)."""
        with self._lock:
            index = self._index
            if index is None:
                self._fallback += 1
                if not self._fallback_logged:
                    self._fallback_logged = True
                    logger.info("no class index live yet (first build running): active sets are filled at random")
        if index is None:
            B = np.asarray(F).shape[0]
            return np.full((B, int(n)), -1, dtype=np.int64), np.full((B, int(n)), -np.inf, dtype=np.float32)
        return index.query(F, n) if labels is None else index.query(F, n, labels)

    @property
    def index(self) -> Optional[ClassIndex]:
        """The live index (None before the first build is live)."""
        return self._index

    def stats(self) -> Dict[str, Any]:
        """builds, last_build_s, mean_build_s, staleness_steps (steps since the live index's source
        W; for an incremental index the rows are current, so this counts steps since the last
        forwarded update), steps_since_build (age of the build itself, e.g. IVF centroids),
        achieved_period_steps / achieved_period_s (mean gap between build starts), building, name,
        live (an index answers queries), fallback_queries (queries answered by the random fill)."""
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
                "building": self._building is not None,
                "deterministic": bool(self.deterministic),
                "swap_wait_s": float(np.sum(self._waits)) if self._waits else 0.0,
                "incremental": bool(self._index is not None and self._index.incremental),
                "live": self._index is not None,
                "fallback_queries": self._fallback,
            }

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop starting builds and join a running one (a graph build is stopped at its next list)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
