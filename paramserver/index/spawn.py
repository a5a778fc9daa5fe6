"""Index builds in a spawned child process: one way to hand W over, wait, fail, cancel and clean up,
used by every index that builds out of process (HashingForest, GraphIndex).

Why a child at all: Annoy's per-row add_item loop and the graph build's per-list loop hold the GIL
between short calls; in a background thread of the trainer or the server they stall every other
thread at each hand-off (measurements in forest.py and graph.py). A child process holds its own GIL.

How W gets there: when W is the store's shared-memory matrix (paramserver/shm.py) the child maps
those very pages read-only, no copy at any size; else W goes through a temp ``W.npy`` that the child
memory-maps. Either way the child's inputs and outputs live in one temp directory (``workdir``),
removed when the build ends -- done, failed or cancelled -- and, for a build still in flight when
the interpreter exits, at exit (the child is killed first).

A child dies with its parent, also when the parent is SIGKILLed (no atexit then): on Linux the child
asks the kernel for SIGKILL at its parent's death (prctl PR_SET_PDEATHSIG), and everywhere a thread
of the child watches a pipe whose only write end the parent holds (EOF: the parent is gone) and
exits. Otherwise an orphaned build would run on for minutes, holding W's shared pages. The temp
directories are named after the parent's pid (``<tempdir>/hfsoftmax-build-<pid>-...``); those of
parents no longer alive are removed at the first ChildBuild of a later process.

Why "spawn", not fork: the parent has threads (trainer, ZeroMQ, OpenMP pools, the build thread
itself); fork would copy their locks in whatever state they are and can deadlock the child.

Usage::

    with ChildBuild("graph", _worker, W, args, nice=index.build_nice, cancel=index._cancel) as child:
        np.save(child.path("C.npy"), C)            # more inputs, before start()
        child.start()
        assign = np.load(child.wait_file("assign.npy"))   # an early output, while the child runs
        child.join()                               # raises RuntimeError / BuildCancelled
        out = np.load(child.path("graph.npz"))

The child calls ``target(W, workdir, *args)`` with W mapped read-only (after ``os.nice(nice)``).
"""
from __future__ import annotations

import atexit
import ctypes
import errno
import glob
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any, Callable, Optional, Sequence, Set, Tuple, TypeVar, Union

import numpy as np

from ..shm import open_shared, shared_source
from .base import BuildCancelled

T = TypeVar("T")
logger = logging.getLogger(__name__)

ERROR_FILE = "child_error.txt"   # the child's exception, "Type: message", for the parent's RuntimeError
POLL_S = 0.1                     # how often a waiting parent looks at the cancel flag
WORKDIR_PREFIX = "hfsoftmax-build-"   # + "<parent pid>-<index name>-": a workdir under tempfile.gettempdir()
USE_PDEATHSIG = True             # Linux: the kernel kills the child when its parent dies (tests turn it
                                 # off to check the pipe alone)
PARENT_GONE_EXIT = 3             # the child's exit code when its parent's pipe closed

_PR_SET_PDEATHSIG = 1            # <linux/prctl.h>
_LOCK = threading.Lock()
_OPEN: Set["ChildBuild"] = set()   # builds whose child or workdir may still exist (closed at exit)
_EXITING = False
_SWEPT = False                   # the temp dirs of dead parents were swept in this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:       # EPERM: alive, another user's
        return exc.errno == errno.EPERM
    return True


def sweep_stale_workdirs() -> int:
    """Remove the build temp directories whose parent process is no longer alive (a parent killed
    by SIGKILL or the OOM killer could not remove them). Returns how many were removed."""
    pattern = re.compile(re.escape(WORKDIR_PREFIX) + r"(\d+)-")
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), WORKDIR_PREFIX + "*")):
        m = pattern.match(os.path.basename(path))
        if m is None or not os.path.isdir(path) or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed += 1
            logger.info("removed %s: the temp directory of a build whose process (pid %s) is gone", path, m.group(1))
    return removed


def _die_with_parent(parent_pid: int, alive: Any, pdeathsig: bool) -> None:
    """In the child, first thing: exit when the parent dies, however it dies. PR_SET_PDEATHSIG
    (Linux) fires when the parent THREAD that started the child exits: the build thread, which
    never leaves before the child has ended or been killed. The pipe ``alive`` (a Connection whose
    write end only the parent holds) reads EOF once the parent is gone, on any platform."""
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:       # the parent died before the above took effect
        os._exit(PARENT_GONE_EXIT)

    def watch() -> None:
        try:
            alive.recv()                 # the parent never sends: returns only by EOF or an error
        except (EOFError, OSError):
            pass
        os._exit(PARENT_GONE_EXIT)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _child_main(target: Callable[..., None], source: Union[str, Tuple[Any, ...]], workdir: str, nice: int,
                args: Tuple[Any, ...], parent_pid: int, alive: Any, pdeathsig: bool) -> None:
    """The child's body: die with the parent, lower its priority, map W, run ``target``; an exception
    is written to ERROR_FILE for the parent (and re-raised: the exit code is then 1)."""
    _die_with_parent(parent_pid, alive, pdeathsig)
    try:
        if nice and hasattr(os, "nice"):
            os.nice(nice)
        W = np.load(source, mmap_mode="r") if isinstance(source, str) else open_shared(*source)
        target(W, workdir, *args)
    except BaseException as exc:
        with open(os.path.join(workdir, ERROR_FILE), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise


class ChildBuild:
    """One build of index ``index_name`` in a spawned child process (a context manager: leaving it
    kills a child still running and removes the temp directory).

    Args:
        index_name: names the index in errors, the temp directory and the process name.
        target: a module-level function (it is pickled by reference), called in the child as
            ``target(W, workdir, *args)``; it writes its results under ``workdir``.
        W: the rows [K, d]: mapped by the child when they are in shared memory (paramserver/shm.py),
            else written to ``workdir/W.npy`` here.
        args: further picklable arguments of ``target``.
        nice: the child's nice increment (0: none).
        cancel: when set (e.g. the index's cancel flag), a waiting parent kills the child and raises
            BuildCancelled.
    """

    def __init__(self, index_name: str, target: Callable[..., None], W: np.ndarray, args: Sequence[Any] = (), *,
                 nice: int = 0, cancel: Optional[threading.Event] = None) -> None:
        self.index_name = index_name
        self._target, self._args, self._nice = target, tuple(args), int(nice)
        self._cancel = cancel if cancel is not None else threading.Event()
        self.proc: Optional[Any] = None       # the multiprocessing.Process once started
        self._alive_w: Optional[Any] = None    # the write end of the child's parent-alive pipe
        global _SWEPT
        with _LOCK:
            sweep, _SWEPT = not _SWEPT, True
        if sweep:
            sweep_stale_workdirs()
        self.workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-{index_name}-")
        with _LOCK:
            _OPEN.add(self)
        try:
            shared = shared_source(W)
            self._source: Union[str, Tuple[Any, ...]] = shared if shared is not None else self.path("W.npy")
            if shared is None:
                np.save(self.path("W.npy"), W)
        except BaseException:
            self.close()
            raise

    @property
    def copied(self) -> bool:
        """W went to the child through a temp .npy (it was not in shared memory)."""
        return isinstance(self._source, str)

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def start(self) -> "ChildBuild":
        """Start the child (a daemon: an exiting parent does not wait for it)."""
        self._check_cancel()
        ctx = multiprocessing.get_context("spawn")
        alive_r, self._alive_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child_main, name=f"hf-{self.index_name}-build", daemon=True,
                                args=(self._target, self._source, self.workdir, self._nice, self._args,
                                      os.getpid(), alive_r, USE_PDEATHSIG))
        try:
            self.proc.start()
        finally:
            alive_r.close()           # the child's copy is its own: the parent keeps only the write end
        return self

    def _check_cancel(self) -> None:
        if self._cancel.is_set() or _EXITING:
            self._kill()
            raise BuildCancelled(f"{self.index_name} build cancelled"
                                 + (" (the interpreter is exiting)" if _EXITING else ""))

    def _wait(self) -> bool:
        """Wait up to POLL_S for the child; True while it runs. Raises BuildCancelled (child killed)."""
        assert self.proc is not None, "start() first"
        self.proc.join(POLL_S)        # releases the GIL
        self._check_cancel()
        return self.proc.is_alive()

    def wait_file(self, name: str) -> str:
        """The path of ``name`` once the child has written it (it must write it whole: to a temp name,
        then os.replace). Raises as :meth:`join` when the child ends without it."""
        path = self.path(name)
        while not os.path.exists(path) and self._wait():
            pass
        if os.path.exists(path):
            return path
        self.join()
        raise RuntimeError(f"{self.index_name} build in a child process exited without writing {name}")

    def join(self) -> None:
        """Wait for the child to end. Raises BuildCancelled when cancelled (the child is killed), and
        RuntimeError naming the index, the exit code and the child's exception when it failed."""
        while self._wait():
            pass
        assert self.proc is not None
        code = self.proc.exitcode
        if code == 0:
            return
        why = ""
        try:
            with open(self.path(ERROR_FILE)) as f:
                why = f.read().strip()
        except OSError:
            pass
        if not why and code is not None and code < 0:
            why = f"killed by signal {-code}" + (" (SIGKILL: the OOM killer?)" if code == -9 else "")
        raise RuntimeError(f"{self.index_name} build in a child process failed with exit code {code}"
                           + (f": {why}" if why else ""))

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join()

    def close(self) -> None:
        """Kill the child if it still runs and remove the temp directory (idempotent)."""
        self._kill()
        if self._alive_w is not None:
            self._alive_w.close()
            self._alive_w = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        with _LOCK:
            _OPEN.discard(self)

    def __enter__(self) -> "ChildBuild":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_in_child(index_name: str, target: Callable[..., None], W: np.ndarray, args: Sequence[Any] = (), *,
                 load: Callable[[str], T], nice: int = 0, cancel: Optional[threading.Event] = None) -> T:
    """Build in a child (see :class:`ChildBuild`) and return ``load(workdir)``, called before the
    temp directory is removed (an mmap of a file there outlives the file's removal)."""
    with ChildBuild(index_name, target, W, args, nice=nice, cancel=cancel) as child:
        child.start()
        child.join()
        return load(child.workdir)


@atexit.register
def _close_all() -> None:
    """At interpreter exit: kill children still building and remove their temp directories (a build
    thread is a daemon: it may be mid-build); a thread still waiting on one then stops as cancelled."""
    global _EXITING
    _EXITING = True
    with _LOCK:
        open_builds = list(_OPEN)
    for child in open_builds:
        child.close()
