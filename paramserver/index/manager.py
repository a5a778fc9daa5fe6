"""IndexManager: the live index of one store shard, rebuilt in the background and swapped atomically."""
from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .base import BuildCancelled, ClassIndex

logger = logging.getLogger(__name__)


# head.deterministic / paramserver.py --deterministic -> IndexManager(deterministic=...)
DETERMINISTIC_MODES = {"auto": None, "on": True, "off": False}

# A background build uses one library thread and a raised nice value (Linux; per thread, and for a
# build child), so that on a busy machine it takes only CPU the trainer leaves idle.
BACKGROUND_THREADS = 1
BACKGROUND_NICE = 10
_REPLAY_ROWS = 65536     # changed rows re-read per index.update call at a swap

# A background build that outlasts its deadline (a hung build child, a stopped process) is stopped and
# counted as an index error, and the live index keeps serving. The deadline is relative to the
# expected build time: BUILD_DEADLINE_FACTOR x the last build's duration, at least
# BUILD_DEADLINE_MIN_S; with no build done yet, the expected time is W's size over
# FIRST_BUILD_BYTES_PER_S (a conservative rate: a graph build read ~20 MB/s of W on one core,
# docs/benchmarks.md). Each timeout in a row doubles the next deadline (up to 8x), so a machine too
# loaded for the estimate still gets an index eventually.
BUILD_DEADLINE_MIN_S = 60.0
BUILD_DEADLINE_FACTOR = 10.0
FIRST_BUILD_BYTES_PER_S = 10e6
_DEADLINE_GROWTH_MAX = 8.0


class BuildTimedOut(RuntimeError):
    """A background build passed its deadline (IndexManager stopped it; the live index stays)."""


class BuildState(enum.Enum):
    """Where a :class:`Build` is. BUILDING -> READY -> LIVE is the normal path; READY lasts until the
    build's live step (deterministic mode) or only until the swap (free mode)."""
    BUILDING = "building"   # index.build runs (in a thread, or in the caller when synchronous)
    READY = "ready"         # built; not live yet
    LIVE = "live"           # swapped in: the index queries go to
    FAILED = "failed"       # the build raised; the next maybe_rebuild reports it
    RETIRED = "retired"     # replaced (restore, build_now) or stopped by close: never goes live


@dataclass(eq=False)
class Build:
    """One build of the shard's index, from its start to going live (the live index is a LIVE Build).

    ``rows`` is what the build reads: the store's live rows (a view, read while they change) or, in
    deterministic mode, a copy taken at ``step`` under the store's lock; dropped once built.
    ``changed`` logs the global ids the store updated since ``step`` (incremental indexes built in
    the background; ids only, 8 bytes a row): the swap re-reads them from the live rows, so no
    update is lost. None: no log kept."""
    index: ClassIndex
    step: int                                  # the step it started at (the W it reads)
    rows: Optional[np.ndarray]
    live_at: Optional[int] = None              # goes live at this step (deterministic); None: when built
    changed: Optional[List[np.ndarray]] = None
    changed_step: int = -1                     # latest step in `changed`
    source_step: int = -1                      # step of the W the index reflects (stats: staleness)
    started: float = field(default_factory=time.monotonic)
    deadline: float = math.inf                 # monotonic time by which it must be built (background)
    state: BuildState = BuildState.BUILDING
    thread: Optional[threading.Thread] = None  # None: synchronous
    error: Optional[BaseException] = None      # FAILED: what the build raised

    def __post_init__(self) -> None:
        self.source_step = self.step


class IndexManager:
    """Owns the live index of one store shard; rebuilds in the background and swaps atomically.

    Scheduling (the paper rebuilds every T steps; at K = 1M a build lasts thousands of steps, see
    docs/benchmarks.md, so T can only be a minimum): a build starts when at least `rebuild_every`
    steps have passed since the last build STARTED and no build is running -- builds never queue.
    Queries always use the live index and never wait for a build.

    Each build is a :class:`Build` record (BUILDING -> READY -> LIVE, or FAILED / RETIRED); there
    is at most one current build, and every build goes live through one path (:meth:`_swap`): bind
    the index to the store's live rows, replay the rows changed since it began, swap -- from the
    build thread when it is done (free mode), or from :meth:`maybe_rebuild` at a step fixed in
    advance (deterministic mode).

    Nothing blocks on a build: the first build (:meth:`start`), and the one after a restore
    (:meth:`reset`), run in the background unless W is at most ``sync_first_build_bytes`` (16 MiB:
    every index builds that in well under a second). Until an index is live, :meth:`query` answers
    "no candidates" (ids -1), so select_active fills the active set at random from the head's
    per-step generator (counted: ``fallback_queries``, logged once). A reset retires a running
    build: a graph build stops at its next list, a build child process is killed, others finish and
    are discarded; the new build starts once the old one has stopped (never two at once).

    The background build reads the live W without a full snapshot (a 2 GB copy at 1M x 512 would
    itself stall a step): rows pushed during the build may be read at either version, which an
    approximate index tolerates; for an incremental index (IVF, graph, exact) the rows changed
    meanwhile are re-read at the swap (see :class:`Build`).

    The build runs in a thread: Annoy's build, hnswlib's add_items and faiss all release the GIL
    (Annoy's per-row add_item loop does not, but each call is short). It uses BACKGROUND_THREADS
    library threads and a raised nice value (BACKGROUND_NICE; Linux; per thread, and for a build
    child), so that on a busy machine the build takes only CPU the trainer leaves idle. A niced
    thread that holds the GIL for long (Annoy's per-row add_item loop, the graph's per-list loop)
    would starve the trainer instead -- a priority inversion that cost a large share of the step
    rate (docs/benchmarks.md, bench_index) -- so HashingForest and GraphIndex build large W in a
    child process (spawn.py).

    Args:
        factory: returns a fresh, unbuilt ClassIndex (metric, offset, options already bound).
        rebuild_every: minimum steps between build starts (T); >= 1. Settable (adaptive T).
        background: build in a thread (True) or synchronously inside maybe_rebuild (False).
        max_duty: at most this fraction of wall time is spent building: after a build of b seconds
            the next one starts no sooner than b / max_duty seconds after it started (1 = back to
            back). On a machine whose cores the trainer needs, the step-rate cost is roughly
            max_duty times the cost of continuous rebuilds. Only when not deterministic.
        deterministic: make the index a function of the step, not of timing, so a seed reproduces
            a run: builds start at multiples of T only, read a copy of W taken at that step (under
            the store's lock: consistent), and go live at the next multiple of T (the store then
            waits for a late build, up to its deadline, logged as ``wait_s``: every client waits with it); rows changed
            meanwhile are replayed onto an incremental index before it goes live. None (default): on
            when W is at most ``copy_limit_bytes`` (64 MiB: up to 32K x 512 fp32, where builds take
            seconds), else off with a log line: a build over more rows can outlast T steps (a 1M x
            256 graph build takes over a minute; docs/benchmarks.md), and each period would then end
            with every client waiting for it. True: on at any size (the copy of W included); False:
            off. The first build (and the one after a reset) started in the background goes live at
            the first multiple of T after its start step when on, as soon as it is done when off.
        copy_limit_bytes: the W size up to which ``deterministic=None`` means on.
        sync_first_build_bytes: a first build over at most this many bytes of W runs synchronously.
        build_deadline_min_s, build_deadline_factor: a background build not done within
            max(build_deadline_min_s, build_deadline_factor x the expected build time) of its start
            (see BUILD_DEADLINE_FACTOR) is stopped -- its child process killed, a graph build stopped
            at its next list -- and reported by the next :meth:`maybe_rebuild` as a failed build
            (counted: ``build_timeouts``); the live index stays. A deterministic go-live waits for a
            late build only until its deadline, so a hung build never hangs the store. Settable.
            A synchronous build (small first build, ``background=False``) has no deadline.
    """

    def __init__(self, factory: Callable[[], ClassIndex], rebuild_every: int, background: bool = True, *,
                 max_duty: float = 1.0, deterministic: Optional[bool] = None, copy_limit_bytes: int = 64 << 20,
                 sync_first_build_bytes: int = 16 << 20, build_deadline_min_s: float = BUILD_DEADLINE_MIN_S,
                 build_deadline_factor: float = BUILD_DEADLINE_FACTOR) -> None:
        if not callable(factory):
            raise ValueError(f"factory must be callable, got {factory!r}")
        if rebuild_every < 1:
            raise ValueError(f"rebuild_every must be >= 1, got {rebuild_every}")
        if not 0.0 < max_duty <= 1.0:
            raise ValueError(f"max_duty must be in (0, 1], got {max_duty}")
        if not build_deadline_min_s > 0 or not build_deadline_factor >= 1:
            raise ValueError(f"build_deadline_min_s must be > 0 and build_deadline_factor >= 1, got "
                             f"{build_deadline_min_s} and {build_deadline_factor}")
        self.factory = factory
        self.rebuild_every = int(rebuild_every)
        self.background = bool(background)
        self.max_duty = float(max_duty)
        self.deterministic = deterministic
        self.copy_limit_bytes = int(copy_limit_bytes)
        self.sync_first_build_bytes = int(sync_first_build_bytes)
        self.build_deadline_min_s = float(build_deadline_min_s)
        self.build_deadline_factor = float(build_deadline_factor)

        self._lock = threading.Lock()      # guards the fields below and the records' state; never held during a build
        self._live: Optional[Build] = None     # the live index (state LIVE); None: random fill
        self._build: Optional[Build] = None    # the current build (BUILDING, READY or FAILED); at most one
        self._retired: List[threading.Thread] = []   # threads of retired builds that may still run
        self._live_rows: Optional[np.ndarray] = None   # the store's rows (a view) the indexes read
        self._step = 0                     # latest step seen
        self._last_start: Tuple[Optional[int], float] = (None, -math.inf)   # (step, monotonic time)
        self._build_times: List[float] = []
        self._start_steps: List[int] = []  # start step of every completed build
        self._start_times: List[float] = []
        self._waits: List[float] = []      # deterministic: seconds the store waited for late builds
        self._fallback = 0                 # queries answered with no index live (random fill)
        self._fallback_logged = False
        self._timeouts = 0                 # builds stopped at their deadline
        self._timeouts_in_a_row = 0        # since the last completed build: grows the next deadline
        self._closed = False

    # -- starting builds ----------------------------------------------------------------------
    def _is_deterministic(self, W: np.ndarray) -> bool:
        if self.deterministic is None:
            self.deterministic = W.nbytes <= self.copy_limit_bytes
            if not self.deterministic:
                logger.info("index builds read the live W (%.1f MB > %.1f MB): background builds go live when "
                            "done, so runs are not bitwise reproducible (head.deterministic=on / --deterministic "
                            "on: they are, and every client waits for a build that outlasts T steps)",
                            W.nbytes / 1e6, self.copy_limit_bytes / 1e6)
        return bool(self.deterministic)

    def _new_build(self, index: ClassIndex, rows: np.ndarray, step: int, live_at: Optional[int] = None,
                   log_changes: bool = False) -> Build:
        """(lock held) Make ``index`` the current build."""
        build = Build(index, step, rows, live_at=live_at, changed=[] if log_changes else None)
        build.deadline = build.started + self._deadline_s(rows)
        self._build = build
        self._last_start = (step, build.started)
        return build

    def _deadline_s(self, W: np.ndarray) -> float:
        """(lock held) Seconds a build over ``W`` starting now may take (see BUILD_DEADLINE_FACTOR)."""
        expected = self._build_times[-1] if self._build_times else W.nbytes / FIRST_BUILD_BYTES_PER_S
        growth = min(2.0 ** self._timeouts_in_a_row, _DEADLINE_GROWTH_MAX)
        return max(self.build_deadline_min_s, self.build_deadline_factor * expected) * growth

    def _retire(self) -> Optional[threading.Thread]:
        """(lock held) Retire the current build: it never goes live; a graph build stops at its next
        list, a child build is killed, others finish and are discarded. Returns its thread."""
        build, self._build = self._build, None
        if build is None:
            return None
        build.state = BuildState.RETIRED
        build.index.cancel()
        self._retired = [t for t in self._retired if t.is_alive()]
        if build.thread is not None:
            self._retired.append(build.thread)
        return build.thread

    def build_now(self, W: np.ndarray, step: Optional[int] = None) -> None:
        """Synchronous build from W (tests, tools); the result goes live at once. A background build
        still running is retired (stopped where it can be, its result discarded)."""
        with self._lock:
            step = self._step if step is None else int(step)
            self._retire()   # not awaited: a build that cannot stop finishes beside this one, discarded
            self._step = step
            self._live_rows = W
            build = self._new_build(self.factory(), W, step)
        self._run(build)

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
            self._live = None
            self._step = int(step)
            self._live_rows = W
        self._start_build(W, int(step), first=True, after=old)

    # -- exact resume -------------------------------------------------------------------------
    def export_state(self) -> Optional[Tuple[Dict[str, Any], Dict[str, np.ndarray]]]:
        """(meta, arrays) of what a restored store needs to select exactly as this one from here on:
        the live index, and in deterministic mode the build due to go live (waited for, up to its
        deadline: it depends only on the rows of its start step, which a later snapshot no longer
        holds) with the ids changed since it started. None when no index is live, when swaps are not
        deterministic (builds then follow timing: a resumed run could not select exactly as this one
        anyway, and a 1M-class forest would add gigabytes to every snapshot), or when an index cannot
        be written (logged): a restore then rebuilds. Call with the store's updates held back."""
        if self.background and not self.deterministic:      # (synchronous builds are deterministic)
            return None
        with self._lock:
            build = self._build
        if build is not None and build.live_at is not None and build.thread is not None \
                and build.state is BuildState.BUILDING:
            t0 = time.perf_counter()
            build.thread.join(max(0.0, build.deadline - time.monotonic()))
            if time.perf_counter() - t0 > 0.05:
                logger.info("snapshot: waited %.2fs for the index build due at step %d (saved with it, so that a "
                            "resumed run selects as this one)", time.perf_counter() - t0, build.live_at)
        with self._lock:
            live, build = self._live, self._build
            if live is None:
                return None
            try:
                lm, la = live.index.export_state()
                meta: Dict[str, Any] = {"name": live.index.name, "num_classes": int(live.index.num_classes),
                                        "last_start": self._last_start[0],
                                        "live": {"index": lm, "step": live.step, "source_step": live.source_step}}
                arrays = {f"live.{k}": v for k, v in la.items()}
                if build is not None and build.live_at is not None and build.state is BuildState.READY:
                    bm, ba = build.index.export_state()
                    meta["pending"] = {"index": bm, "step": build.step, "live_at": build.live_at,
                                       "changed_step": build.changed_step, "logs_changes": build.changed is not None}
                    arrays.update({f"pending.{k}": v for k, v in ba.items()})
                    arrays["pending_changed"] = (np.unique(np.concatenate(build.changed)) if build.changed
                                                 else np.empty(0, dtype=np.int64))
                elif build is not None and build.live_at is not None:
                    logger.warning("snapshot: the index build due at step %d is %s; a resumed run rebuilds it",
                                   build.live_at, build.state.value)
            except NotImplementedError as e:
                logger.warning("snapshot: the index is not saved (%s); a restore rebuilds it", e)
                return None
        return meta, arrays

    def import_state(self, meta: Dict[str, Any], arrays: Dict[str, np.ndarray], W: np.ndarray, step: int) -> None:
        """The store was restored to rows ``W`` at ``step`` from a snapshot that saved this manager's
        state (:meth:`export_state`): the live index and the pending build become those saved (a
        running build is retired). Raises ValueError when the state is another index's."""
        def index_of(part: str) -> ClassIndex:
            index = self.factory()
            if index.name != meta["name"]:
                raise ValueError(f"saved index is {meta['name']}, this store's is {index.name}")
            index.import_state(meta[part]["index"], {k[len(part) + 1:]: v for k, v in arrays.items()
                                                     if k.startswith(part + ".")}, W)
            return index

        if int(meta["num_classes"]) != W.shape[0]:
            raise ValueError(f"saved index covers {meta['num_classes']} rows, the store {W.shape[0]}")
        live = Build(index_of("live"), int(meta["live"]["step"]), None, state=BuildState.LIVE)
        live.source_step = int(meta["live"]["source_step"])
        pending = None
        if "pending" in meta:
            p = meta["pending"]
            pending = Build(index_of("pending"), int(p["step"]), None, live_at=int(p["live_at"]),
                            changed=[np.asarray(arrays["pending_changed"], dtype=np.int64)] if p["logs_changes"]
                            else None, state=BuildState.READY)
            pending.changed_step = int(p["changed_step"])
        with self._lock:
            self._retire()
            self._live, self._build = live, pending
            self._step = int(step)
            self._live_rows = W
            self._last_start = (meta["last_start"], time.monotonic())
        logger.info("index %s restored with the snapshot (live since the rows of step %d%s)", meta["name"],
                    live.step, f"; the build of step {pending.step} goes live at step {pending.live_at}"
                    if pending is not None else "")

    def maybe_rebuild(self, store: Any, step: int) -> bool:
        """Called by the store after each applied update (its lock held): report a failed background
        build, swap in a deterministic build whose live step has come (waiting for it if late), and
        start a build when one is due. Returns True if a build was started."""
        step = int(step)
        with self._lock:
            build = self._build
        if build is not None and build.state is BuildState.BUILDING and time.monotonic() >= build.deadline:
            self._time_out(build)
        self._raise_failed()
        rows = store.rows_view()
        with self._lock:
            self._live_rows = rows
            build = self._build
        if build is not None and build.live_at is not None and step >= build.live_at:
            self._go_live(build, step)
            self._raise_failed()
        with self._lock:
            self._step = max(self._step, step)
            if self._closed or self._build is not None:
                return False                # builds never queue
            first = self._live is None
            det = self.background and not first and self._is_deterministic(rows)
            if det and step % self.rebuild_every:
                return False                # deterministic builds start at multiples of T only
            if not first and not det:
                last_step, last_time = self._last_start
                if last_step is not None and step - last_step < self.rebuild_every:
                    return False
                if self._build_times and self.max_duty < 1.0 and \
                        time.monotonic() - last_time < self._build_times[-1] / self.max_duty:
                    return False
        return self._start_build(rows, step, first=first)

    def _raise_failed(self) -> None:
        """A failed (or timed out) background build: drop it and raise its error, once."""
        with self._lock:
            failed = self._build if self._build is not None and self._build.state is BuildState.FAILED else None
            if failed is not None:
                self._build = None
        if failed is not None:
            raise RuntimeError(f"background index build failed: {failed.error!r}") from failed.error

    def _time_out(self, build: Build) -> None:
        """``build`` passed its deadline: stop it (a child build is killed by its waiting thread, a graph
        build stops at its next list; a build that cannot stop runs on, its result discarded) and mark
        it FAILED, for the caller's :meth:`maybe_rebuild` to report. Never waits for it."""
        with self._lock:
            if self._build is not build or build.state is not BuildState.BUILDING or build.thread is None:
                return                          # done, failed or retired meanwhile; or synchronous
            seconds = time.monotonic() - build.started
            build.state = BuildState.FAILED
            build.error = BuildTimedOut(f"index {build.index.name} build of step {build.step} passed its deadline "
                                        f"of {build.deadline - build.started:.1f}s; stopped")
            build.changed = None
            self._timeouts += 1
            self._timeouts_in_a_row += 1
        build.index.cancel()
        logger.error("index %s build of step %d still running after %.1fs, past its deadline (%.1fs): stopped "
                     "(a build child is killed); the live index keeps serving", build.index.name, build.step,
                     seconds, build.deadline - build.started)

    def _start_build(self, W: np.ndarray, step: int, first: bool, after: Optional[threading.Thread] = None) -> bool:
        """Start a build over ``W`` (first: possibly synchronous); False when one is current or the
        manager is closed. ``after``: a retired build's thread to wait for first."""
        det = self.background and self._is_deterministic(W)
        sync = not self.background or (first and W.nbytes <= self.sync_first_build_bytes)
        with self._lock:
            if self._closed or self._build is not None:
                return False
            index = self.factory()
            if not first and self._live is not None:
                index.inherit(self._live.index)
            # deterministic: live at the next multiple of T (a first build too); else when done
            live_at = (step // self.rebuild_every + 1) * self.rebuild_every if det and not sync else None
            build = self._new_build(index, W, step, live_at, log_changes=index.incremental and not sync)
        if sync:
            if after is not None:
                self._join_retired(after, build)
            self._run(build)
            return True
        if live_at is not None:
            # A copy taken now (the store's lock holds every update back), freed once built.
            build.rows = np.array(W, copy=True)
        index.build_threads = BACKGROUND_THREADS
        index.build_nice = BACKGROUND_NICE
        thread = threading.Thread(target=self._run, args=(build, after), name=f"index-build-{index.name}", daemon=True)
        with self._lock:
            if self._build is not build:    # retired or closed meanwhile: never started
                return False
            build.thread = thread
            thread.start()
        if first:
            logger.info("index %s: first build of %d rows started in the background at step %d; random fill "
                        "until it is live", index.name, W.shape[0], step)
        return True

    # -- a build's life -----------------------------------------------------------------------
    def _run(self, build: Build, after: Optional[threading.Thread] = None) -> None:
        """Build ``build.index`` from ``build.rows``; then swap it in (free mode), or leave it READY
        for its live step. In the build thread, or in the caller when synchronous (errors raise there;
        from a thread they are reported by the next :meth:`maybe_rebuild`)."""
        try:
            if after is not None:
                self._join_retired(after, build)   # a retired build: never two at once
            if build.thread is not None and hasattr(os, "setpriority"):
                with contextlib.suppress(OSError):  # per-thread on Linux: only this thread yields
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
            if self._build is not build:       # retired while it waited (a lock-free read: a stale
                return                         # one only builds what the swap then discards)
            t0 = time.perf_counter()
            build.index.build(build.rows)
            seconds = time.perf_counter() - t0
            with self._lock:
                build.rows = None              # a deterministic build's copy is freed here
                if self._build is not build or build.state is not BuildState.BUILDING:
                    logger.info("index %s build of step %d %s", build.index.name, build.step,
                                "done after its deadline: discarded" if build.state is BuildState.FAILED
                                else "retired (the store was restored)")
                    return
                build.state = BuildState.READY
                self._timeouts_in_a_row = 0
                self._build_times.append(seconds)
                self._start_steps.append(build.step)
                self._start_times.append(build.started)
            logger.info("index %s built: K=%d in %.2fs (started at step %d)", build.index.name,
                        build.index.num_classes, seconds, build.step)
            if build.live_at is None:
                self._swap(build)
        except BaseException as err:
            self._failed(build, err)

    def _failed(self, build: Build, err: BaseException) -> None:
        """A build raised: a retired or cancelled one (close, interpreter exit) ends quietly; else
        FAILED (raised here when synchronous, by the next maybe_rebuild when in the background); the
        live index stays."""
        with self._lock:
            build.rows = None
            if build.state is BuildState.FAILED:    # timed out (_time_out): reported there, and
                return                              # by the next maybe_rebuild
            current = self._build is build
            quiet = not current or isinstance(err, BuildCancelled)
            if current:
                build.changed = None
                build.state = BuildState.RETIRED if quiet else BuildState.FAILED
                build.error = None if quiet else err
                if quiet or build.thread is None:
                    self._build = None
        if quiet:
            logger.info("index %s build of step %d stopped (%s)", build.index.name, build.step,
                        "cancelled" if current else "retired")
            return
        logger.error("index %s build of step %d failed", build.index.name, build.step, exc_info=err)
        if build.thread is None:
            raise err

    def _go_live(self, build: Build, step: int) -> None:
        """Deterministic mode, at the build's live step (the store's lock held): wait for the build if
        it is late (counted as ``swap_wait_s``), then swap it in."""
        t0 = time.perf_counter()
        if build.thread is not None:
            # never past the build's deadline: a hung build must not hang the store (its lock is held)
            build.thread.join(max(0.0, build.deadline - time.monotonic()))
            if build.thread.is_alive():
                self._time_out(build)
        waited = time.perf_counter() - t0
        with self._lock:
            if self._build is not build or build.state is not BuildState.READY:
                return                          # failed (the next maybe_rebuild raises it) or retired
        try:
            swapped = self._swap(build)
        except BaseException:
            with self._lock:
                if self._build is build:
                    build.state, self._build = BuildState.FAILED, None
            raise
        if swapped:
            self._waits.append(waited)
            if waited > 0.01:
                logger.info("index %s went live at step %d after waiting %.2fs for its build (deterministic swap)",
                            build.index.name, step, waited)

    @staticmethod
    def _join_retired(thread: threading.Thread, build: Build) -> None:
        """Wait for a retired build's thread before ``build`` starts, up to ``build``'s deadline (a
        retired build that cannot stop then runs on beside it, its result discarded)."""
        thread.join(max(0.0, build.deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning("index %s: a retired build still runs at the deadline of the next; not waiting for it",
                           build.index.name)

    def _swap(self, build: Build) -> bool:
        """THE go-live path of every build: point the index at the store's live rows, re-read the rows
        changed since the build began, and swap it in with nothing left to replay (rounds of replay
        run outside the lock, so queries and rows_changed go on meanwhile). False if it was retired."""
        index = build.index
        while True:
            with self._lock:
                if self._build is not build:
                    return False
                rows, ids, upto = self._live_rows, build.changed, build.changed_step
                if not ids:
                    if rows is not None:
                        index.bind_rows(rows)
                    build.changed = None
                    build.state = BuildState.LIVE
                    self._live, self._build = build, None
                    return True
                build.changed = []
            self._replay(index, rows, ids)
            build.source_step = max(build.source_step, upto)

    @staticmethod
    def _replay(index: ClassIndex, rows: Optional[np.ndarray], ids: List[np.ndarray]) -> None:
        """Point the index at the live rows and re-read the rows ``ids`` (global) from them."""
        if rows is None:
            return
        index.bind_rows(rows)
        u = np.unique(np.concatenate(ids))
        for lo in range(0, u.size, _REPLAY_ROWS):
            part = u[lo:lo + _REPLAY_ROWS]
            index.update(part, np.asarray(rows[part - index.class_offset]))

    # -- per step -----------------------------------------------------------------------------
    def rows_changed(self, ids: np.ndarray, rows: Optional[np.ndarray], step: int) -> None:
        """Rows ``ids`` (global) of the store changed: forward them to an incremental live index and
        log the ids for a running incremental build. ``rows``: their new values (None: read from
        the store's rows)."""
        step = int(step)
        with self._lock:
            self._step = max(self._step, step)
            build, live = self._build, self._live
            if build is not None and build.changed is not None:
                build.changed.append(np.array(ids, dtype=np.int64))   # global ids; a copy
                build.changed_step = max(build.changed_step, step)
            if live is not None and live.index.incremental:
                if rows is None:
                    rows = np.asarray(self._live_rows[np.asarray(ids, dtype=np.int64) - live.index.class_offset])
                live.index.update(ids, rows)
                live.source_step = max(live.source_step, step)

    def query(self, F: np.ndarray, n: int, labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Query the live index; never waits for a build. With none live yet: no candidates (ids -1,
        scores -inf), so the selection fills at random (counted as ``fallback_queries``)."""
        with self._lock:
            index = self._live.index if self._live is not None else None
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
        live = self._live
        return live.index if live is not None else None

    def stats(self) -> Dict[str, Any]:
        """name (of the live index, else of the one being built), builds, last_build_s, mean_build_s,
        staleness_steps (steps since the live index's source W; for an incremental index the rows are
        current, so this counts steps since the last forwarded update), steps_since_build (age of the
        build itself, e.g. IVF centroids), achieved_period_steps / achieved_period_s (mean gap between
        build starts), building, deterministic, swap_wait_s, incremental, live (an index answers
        queries), fallback_queries (queries answered by the random fill), build_timeouts (builds stopped
        at their deadline; each also reported as a failed build), build_deadline_s (the running
        build's deadline, seconds from its start; nan when none runs)."""
        with self._lock:
            live, build = self._live, self._build
            n = len(self._build_times)
            period = float(np.mean(np.diff(self._start_steps))) if n >= 2 else float("nan")
            period_s = float(np.mean(np.diff(self._start_times))) if n >= 2 else float("nan")
            named = live or build
            return {
                "name": named.index.name if named is not None else "?",
                "builds": n,
                "last_build_s": self._build_times[-1] if n else float("nan"),
                "mean_build_s": float(np.mean(self._build_times)) if n else float("nan"),
                "staleness_steps": self._step - live.source_step if live is not None else -1,
                "steps_since_build": self._step - live.step if live is not None else -1,
                "achieved_period_steps": period,
                "achieved_period_s": period_s,
                "building": build is not None and build.state is BuildState.BUILDING,
                "deterministic": bool(self.deterministic),
                "swap_wait_s": float(np.sum(self._waits)) if self._waits else 0.0,
                "incremental": bool(live is not None and live.index.incremental),
                "live": live is not None,
                "fallback_queries": self._fallback,
                "build_timeouts": self._timeouts,
                "build_deadline_s": build.deadline - build.started
                if build is not None and build.state is BuildState.BUILDING and math.isfinite(build.deadline)
                else float("nan"),
            }

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop starting builds and stop the running one: a child build is killed, a graph build stops
        at its next list; a build that cannot stop finishes (and goes live). Waits up to ``timeout``
        seconds in all (None: until they end) for its thread and those of retired builds."""
        with self._lock:
            self._closed = True
            build = self._build
            threads = [t for t in self._retired if t.is_alive()]
            if build is not None:
                if build.state is BuildState.BUILDING:
                    build.index.cancel()
                if build.thread is not None:
                    threads.append(build.thread)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
