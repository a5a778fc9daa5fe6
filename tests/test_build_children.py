"""Build children that hang or outlive their parent (issue 23, items 8 and 9).

A build that passes its deadline is stopped -- its child killed -- and counted as an index error while
the live index keeps answering; a deterministic go-live never waits past that deadline. A build child
dies with its parent, even one killed by SIGKILL (PR_SET_PDEATHSIG on Linux, and a pipe from the
parent as the portable fallback), and the temp directory it leaves is swept by the next process that
builds."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

import numpy as np
import pytest

from paramserver.index import ExactIndex, IndexManager
from paramserver.index import spawn
from paramserver.index.spawn import WORKDIR_PREFIX, ChildBuild
from paramserver.store import WeightStore
from test_index_spawn import _hf_dirs as _workdirs, _Store, tmpdir_only  # noqa: F401 (a fixture)

WAIT_S = 60.0   # generous: a spawned child imports numpy and the package on a loaded 2-core machine
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


# ------------------------------------------------------------------ child bodies (module level: pickled by name)
def _blocking_child(W: np.ndarray, workdir: str) -> None:
    """Says it runs, then blocks: far longer than any test waits, but bounded, so a broken test leaves
    no process for long."""
    with open(os.path.join(workdir, "started.part"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(workdir, "started.part"), os.path.join(workdir, "started"))
    for _ in range(int(3 * WAIT_S * 10)):
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    """The process has exited (no /proc entry, or a zombie waiting for whoever reaps orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_until(cond, timeout: float = WAIT_S, poll: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(poll)
    return True


# ------------------------------------------------------------------ item 8: a hung build child
class HangingChild(ExactIndex):
    """An exact index whose build, while ``hang`` is set, first runs a child that blocks (a hung
    forest/graph build child)."""

    hang = False
    children: List[ChildBuild] = []
    running = threading.Event()     # the child runs

    @classmethod
    def reset(cls) -> None:
        cls.hang, cls.children, cls.running = False, [], threading.Event()

    def build(self, W: np.ndarray) -> None:
        if HangingChild.hang:
            with ChildBuild("graph", _blocking_child, W, cancel=self._cancel) as child:
                HangingChild.children.append(child)
                child.start()
                child.wait_file("started")
                HangingChild.running.set()
                child.join()
        super().build(W)


def _assert_children_gone(build_thread: threading.Thread) -> None:
    """The timed-out build's thread ended (so it killed its child, if it had started one by then)."""
    build_thread.join(WAIT_S)
    assert not build_thread.is_alive(), "the timed-out build never ended"
    for child in HangingChild.children:
        if child.proc is not None:       # None: stopped before its child started
            assert not child.proc.is_alive() and _gone(child.proc.pid)
    assert not any(os.path.exists(c.workdir) for c in HangingChild.children)


def test_a_stopped_build_child_times_out_and_later_builds_still_run(tmpdir_only):
    """Free mode (the store never waits): the hung build used to end every later rebuild, silently."""
    HangingChild.reset()
    W = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    F = W[:5] + 0.01
    store = _Store(W)
    mgr = IndexManager(lambda: HangingChild(8, "dot"), rebuild_every=2, deterministic=False)
    try:
        assert mgr.maybe_rebuild(store, 0)                 # the first build: synchronous, no child
        old = mgr.query(F, 3)[0]
        HangingChild.hang = True
        mgr.build_deadline_min_s = 0.5                     # (settable) short: the build below never ends
        assert mgr.maybe_rebuild(store, 2)                 # a background build; its child hangs
        build_thread = mgr._build.thread
        assert HangingChild.running.wait(WAIT_S), "the build's child never started"
        (child,) = HangingChild.children
        os.kill(child.proc.pid, signal.SIGSTOP)            # hung for good
        assert mgr.stats()["build_deadline_s"] == 0.5
        step, error = 3, None
        end = time.monotonic() + WAIT_S
        while error is None and time.monotonic() < end:    # each call returns at once; one reports the timeout
            try:
                assert mgr.maybe_rebuild(store, step) is False
            except RuntimeError as exc:
                error = exc
            step += 1
            time.sleep(0.05)
        assert error is not None and "deadline" in str(error), error
        _assert_children_gone(build_thread)
        assert child.proc.exitcode == -signal.SIGKILL
        np.testing.assert_array_equal(mgr.query(F, 3)[0], old)   # the old index answers on
        st = mgr.stats()
        assert st["build_timeouts"] == 1 and st["builds"] == 1 and st["live"] and not st["building"]
        HangingChild.hang = False                          # later builds run again
        mgr.build_deadline_min_s = WAIT_S
        assert mgr.maybe_rebuild(store, step + 2)
        assert _wait_until(lambda: mgr.stats()["builds"] == 2), "no build after the timeout"
        assert mgr.stats()["build_timeouts"] == 1
    finally:
        HangingChild.hang = False
        mgr.close(timeout=WAIT_S)
    assert _workdirs(tmpdir_only) == []


def test_a_hung_build_never_hangs_a_deterministic_store(tmpdir_only):
    """Deterministic mode: the store's update waits for a late build at its live step, under the
    store's lock -- at most until the build's deadline; then the error is counted and it serves on."""
    HangingChild.reset()
    K, d = 40, 8
    store = WeightStore(K, d, init_std=0.1, num_clients=1)
    mgr = IndexManager(lambda: HangingChild(d, "dot"), rebuild_every=1, deterministic=True)
    store.attach_index(mgr)
    g = np.ones((2, d), np.float32)
    F = np.random.default_rng(1).standard_normal((4, d)).astype(np.float32)

    def push(step: int) -> Optional[BaseException]:
        """store.push in a thread: a hang fails the test instead of hanging it."""
        errors: List[BaseException] = []

        def body() -> None:
            try:
                store.push([1, 2], g, step, 0.1)
            except BaseException as exc:     # noqa: BLE001 -- handed to the test thread
                errors.append(exc)

        t = threading.Thread(target=body, daemon=True)
        t.start()
        t.join(WAIT_S)
        assert not t.is_alive(), f"push of step {step} hung"
        return errors[0] if errors else None

    try:
        assert push(0) is None                             # step 1: the first build, synchronous
        assert mgr.stats()["live"] and mgr.stats()["deterministic"]
        def answers_exactly() -> bool:                     # the live (incremental, exact) index follows W
            full = F @ store.pull(np.arange(K)).T
            return bool((store.query(F, 3)[0][:, 0] == full.argmax(1)).all())

        assert answers_exactly()
        HangingChild.hang = True
        mgr.build_deadline_min_s = 2.0
        assert push(1) is None                             # step 2: a build starts, live at step 3
        assert mgr.stats()["building"]
        build_thread = mgr._build.thread
        assert push(2) is None                             # step 3: waits for it until its deadline
        st = mgr.stats()
        assert st["build_timeouts"] == 1 and store.stats()["index_errors"] == 1
        _assert_children_gone(build_thread)
        assert answers_exactly()                           # the old index answers on
        HangingChild.hang = False                          # and the next builds go live again
        mgr.build_deadline_min_s = WAIT_S
        assert push(3) is None and push(4) is None         # built from step 4, live at step 5 (and the
        st = mgr.stats()                                   # build started at step 5 may be done too)
        assert st["builds"] >= 2 and st["build_timeouts"] == 1 and store.stats()["index_errors"] == 1
    finally:
        HangingChild.hang = False
        store.close()
        mgr.close(timeout=WAIT_S)
    assert _workdirs(tmpdir_only) == []


def test_deadline_is_relative_to_the_expected_build_time():
    mgr = IndexManager(lambda: ExactIndex(4), rebuild_every=1, build_deadline_min_s=60.0, build_deadline_factor=10.0)
    W = np.zeros((1000, 256), np.float32)              # 1 MB: the first build's estimate is small
    assert mgr._deadline_s(W) == 60.0
    mgr._build_times.append(30.0)
    assert mgr._deadline_s(W) == 300.0                 # 10 x the last build
    mgr._timeouts_in_a_row = 1
    assert mgr._deadline_s(W) == 600.0                 # a timeout in a row doubles it
    big = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (1 << 20, 1024), (0, 0))   # 4 GB, no memory
    fresh = IndexManager(lambda: ExactIndex(4), rebuild_every=1)
    assert fresh._deadline_s(big) == pytest.approx(10.0 * big.nbytes / 10e6)
    with pytest.raises(ValueError, match="build_deadline"):
        IndexManager(lambda: ExactIndex(4), rebuild_every=1, build_deadline_min_s=0.0)


# ------------------------------------------------------------------ item 9: children die with their parent
_PARENT = r"""
import sys, time
sys.path.insert(0, {tests!r})
import numpy as np
from paramserver.index import spawn
from test_build_children import _blocking_child
spawn.USE_PDEATHSIG = {pdeathsig!r}
child = spawn.ChildBuild("graph", _blocking_child, np.ones((4, 4), np.float32)).start()
child.wait_file("started")
print(child.proc.pid, child.workdir, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("pdeathsig", [True, False], ids=["pdeathsig", "pipe-only"])
def test_a_sigkilled_parent_takes_its_build_child_along_and_its_temp_dir_is_swept(monkeypatch, tmpdir_only,
                                                                                    pdeathsig):
    env = dict(os.environ, TMPDIR=str(tmpdir_only))
    parent = subprocess.Popen([sys.executable, "-c", _PARENT.format(tests=TESTS_DIR, pdeathsig=pdeathsig)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        ready, _, _ = select.select([parent.stdout], [], [], WAIT_S)
        assert ready, "the parent never reported its build child"
        line = parent.stdout.readline().split()
        assert len(line) == 2, f"parent exited early: {line}"
        child_pid, workdir = int(line[0]), line[1]
        assert os.path.dirname(workdir) == str(tmpdir_only)
        assert os.path.basename(workdir).startswith(f"{WORKDIR_PREFIX}{parent.pid}-graph-")
        assert not _gone(child_pid)
        parent.kill()                                      # SIGKILL: no atexit, no cleanup
        parent.wait(WAIT_S)
        assert _wait_until(lambda: _gone(child_pid)), "the build child outlived its SIGKILLed parent"
        assert os.path.isdir(workdir)                      # left behind: nobody could remove it
        # the next process to build sweeps it (here: this one, as if spawn.py were first used now)
        alive_dir = tmpdir_only / f"{WORKDIR_PREFIX}{os.getppid()}-graph-x"   # a live parent's: kept
        alive_dir.mkdir()
        monkeypatch.setattr(spawn, "_SWEPT", False)
        with ChildBuild("forest", _blocking_child, np.ones((2, 2), np.float32)) as fresh:
            assert not os.path.exists(workdir)
            assert sorted(_workdirs(tmpdir_only)) == sorted([alive_dir.name, os.path.basename(fresh.workdir)])
        assert _workdirs(tmpdir_only) == [alive_dir.name]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child_pid is not None and not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)
