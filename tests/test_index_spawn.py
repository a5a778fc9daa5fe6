"""Index builds in a spawned child (paramserver/index/spawn.py): how W reaches the child (mapped from
shared memory, or a temp .npy whose directory is always removed), how a failure reads, and that a
cancelled build or a closed IndexManager leaves no child process behind."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import List

import numpy as np
import pytest

from paramserver import shm
from paramserver.index import ExactIndex, IndexManager, make_index
from paramserver.index.base import BuildCancelled
from paramserver.index.spawn import WORKDIR_PREFIX, ChildBuild, run_in_child

WAIT_S = 60.0   # generous: a spawned child imports numpy and the package on a loaded 2-core machine

needs_shm = pytest.mark.skipif(shm.alloc_shared((1, 1), "float32") is None, reason="no usable /dev/shm here")


# ------------------------------------------------------------------ child bodies (module level: pickled by name)
def _report_child(W: np.ndarray, workdir: str) -> None:
    """Writes what the child saw: its workdir's files (before writing any) and the sum of W's rows."""
    seen = sorted(os.listdir(workdir))
    with open(os.path.join(workdir, "out.json"), "w") as f:
        json.dump({"files": seen, "row_sums": np.asarray(W).sum(axis=1).tolist()}, f)


def _failing_child(W: np.ndarray, workdir: str, message: str) -> None:
    raise ValueError(message)


def _killed_child(W: np.ndarray, workdir: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)     # what the OOM killer does


def _sleeping_child(W: np.ndarray, workdir: str) -> None:
    """Says it runs, then sleeps (bounded: a broken test leaves no process for long)."""
    with open(os.path.join(workdir, "started.part"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(workdir, "started.part"), os.path.join(workdir, "started"))
    for _ in range(int(WAIT_S * 10)):
        time.sleep(0.1)


def _load_report(workdir: str) -> dict:
    with open(os.path.join(workdir, "out.json")) as f:
        return json.load(f)


def _hf_dirs(path) -> List[str]:
    """The build workdirs in ``path``, sorted."""
    return sorted(p for p in os.listdir(path) if p.startswith(WORKDIR_PREFIX))


@pytest.fixture
def tmpdir_only(monkeypatch, tmp_path):
    """tempfile's directory set to an empty one, so what a build leaves there is visible."""
    import tempfile

    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


# ------------------------------------------------------------------ how W reaches the child
@needs_shm
def test_shared_w_is_mapped_by_the_child_and_never_written(monkeypatch, tmpdir_only):
    W = shm.alloc_shared((50, 4), "float32")
    try:
        W[:] = np.arange(200, dtype=np.float32).reshape(50, 4)
        saved: List[str] = []
        real_save = np.save
        monkeypatch.setattr(np, "save", lambda path, *a, **k: (saved.append(str(path)), real_save(path, *a, **k)))
        with ChildBuild("probe", _report_child, W) as child:
            assert not child.copied
            child.start()
            child.join()
            got = _load_report(child.workdir)
        assert saved == [] and got["files"] == []          # no W.npy, nothing else written for it
        np.testing.assert_allclose(got["row_sums"], W.sum(axis=1))   # the very rows
        assert _hf_dirs(tmpdir_only) == []
    finally:
        shm.release_shared(W)


def test_private_w_goes_through_a_temp_dir_that_is_removed_also_on_failure(tmpdir_only):
    W = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = run_in_child("probe", _report_child, W, load=_load_report)
    assert got["files"] == ["W.npy"]
    np.testing.assert_allclose(got["row_sums"], W.sum(axis=1))
    assert _hf_dirs(tmpdir_only) == []
    with pytest.raises(RuntimeError, match=r"^probe build in a child process failed with exit code 1: "
                                           r"ValueError: bad rows$"):
        run_in_child("probe", _failing_child, W, ("bad rows",), load=_load_report)
    assert _hf_dirs(tmpdir_only) == []


def test_a_child_killed_by_a_signal_reads_as_its_exit_code(tmpdir_only):
    W = np.ones((2, 2), np.float32)
    with pytest.raises(RuntimeError, match=r"^forest build in a child process failed with exit code -9: "
                                           r"killed by signal 9"):
        run_in_child("forest", _killed_child, W, load=_load_report)
    assert _hf_dirs(tmpdir_only) == []


def test_a_cancelled_build_kills_its_child(tmpdir_only):
    cancel = threading.Event()
    with ChildBuild("graph", _sleeping_child, np.ones((2, 2), np.float32), cancel=cancel) as child:
        child.start()
        child.wait_file("started")
        assert child.proc.is_alive()
        cancel.set()
        with pytest.raises(BuildCancelled, match="graph build cancelled"):
            child.join()
        assert not child.proc.is_alive()
    assert _hf_dirs(tmpdir_only) == []


# ------------------------------------------------------------------ the indexes and the manager use it
def test_forest_child_build_maps_shared_w_and_cleans_up_a_private_copy(monkeypatch, tmpdir_only):
    rng = np.random.default_rng(0)
    private = rng.standard_normal((300, 8)).astype(np.float32)
    ref = make_index("forest", 8, "angular", ntrees=5, subprocess=False)
    ref.build(private)
    F = private[:5]
    saved: List[str] = []
    real_save = np.save
    monkeypatch.setattr(np, "save", lambda path, *a, **k: (saved.append(os.path.basename(str(path))),
                                                             real_save(path, *a, **k)))
    forest = make_index("forest", 8, "angular", ntrees=5, subprocess=True)
    forest.build(private)                                  # through W.npy, removed afterwards
    assert saved == ["W.npy"] and _hf_dirs(tmpdir_only) == []
    np.testing.assert_array_equal(forest.query(F, 4)[0], ref.query(F, 4)[0])
    W = shm.alloc_shared((300, 8), "float32")
    if W is None:
        return
    try:
        W[:] = private
        saved.clear()
        forest = make_index("forest", 8, "angular", ntrees=5, subprocess=True)
        forest.build(W)                                    # mapped: nothing written for the rows
        assert saved == [] and _hf_dirs(tmpdir_only) == []
        np.testing.assert_array_equal(forest.query(F, 4)[0], ref.query(F, 4)[0])
    finally:
        shm.release_shared(W)


class ChildSleeper(ExactIndex):
    """An index whose build runs a child that sleeps until it is killed (a long forest/graph build)."""

    children: List[ChildBuild] = []
    running = threading.Event()

    def build(self, W: np.ndarray) -> None:
        with ChildBuild("sleeper", _sleeping_child, W, nice=self.build_nice, cancel=self._cancel) as child:
            ChildSleeper.children.append(child)
            child.start()
            child.wait_file("started")
            ChildSleeper.running.set()
            child.join()
        super().build(W)


class _Store:
    def __init__(self, W: np.ndarray) -> None:
        self.W = W

    def rows_view(self) -> np.ndarray:
        return self.W


def test_closing_the_manager_during_a_child_build_leaves_no_child(tmpdir_only):
    ChildSleeper.children, ChildSleeper.running = [], threading.Event()
    W = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    mgr = IndexManager(lambda: ChildSleeper(8, "dot"), rebuild_every=5, deterministic=False, sync_first_build_bytes=0)
    try:
        mgr.start(W, step=0)                               # in the background
        assert ChildSleeper.running.wait(WAIT_S), "the build's child never started"
        (child,) = ChildSleeper.children
        assert child.proc.is_alive() and mgr.stats()["building"]
        mgr.close(timeout=WAIT_S)
        assert not child.proc.is_alive() and child.proc.exitcode == -signal.SIGKILL
        assert not os.path.exists(f"/proc/{child.proc.pid}")        # killed and reaped: no orphan, no zombie
        st = mgr.stats()
        assert not st["building"] and not st["live"] and st["builds"] == 0
        assert mgr.maybe_rebuild(_Store(W), 5) is False    # closed: nothing starts, and no error to raise
        assert _hf_dirs(tmpdir_only) == []
    finally:
        mgr.close(timeout=WAIT_S)
