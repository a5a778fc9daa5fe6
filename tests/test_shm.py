"""W in shared memory (paramserver/shm.py): a child process maps the store's very rows, no copy."""
from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from paramserver import shm
from paramserver.index.graph import GraphIndex
from paramserver.store import WeightStore

pytestmark = pytest.mark.skipif(shm.alloc_shared((1, 1), "float32") is None, reason="no usable /dev/shm here")


def _child_reads(spec, q) -> None:
    X = shm.open_shared(*spec)
    q.put(np.array(X[:3]))


def test_a_child_maps_the_very_rows():
    W = shm.alloc_shared((100, 8), "float32")
    assert type(W) is np.ndarray and W.flags.writeable and not W.any()
    W[:] = np.arange(800, dtype=np.float32).reshape(100, 8)
    spec = shm.shared_source(W.view())                      # a whole view is the same matrix
    assert spec is not None and spec[1:] == ((100, 8), "float32")
    assert shm.shared_source(W[1:]) is None and shm.shared_source(W.copy()) is None
    W[0] = -1.0                                             # written after the child was told where
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_reads, args=(spec, q))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    np.testing.assert_array_equal(got, W[:3])
    shm.release_shared(W)
    assert shm.shared_source(W) is None


def test_no_room_in_dev_shm_falls_back_to_private_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path / "missing"))
    assert shm.alloc_shared((10, 4), "float32") is None
    s = WeightStore(10, 4, shared_rows=True)
    assert not s.rows_shared and s.stats()["rows_shared"] is False
    np.testing.assert_array_equal(s.pull(np.arange(10)), WeightStore(10, 4).pull(np.arange(10)))  # same init
    monkeypatch.setattr(shm, "SHM_DIR", "/dev/shm")
    monkeypatch.setattr(shm.shutil, "disk_usage", lambda _: type("U", (), {"free": 100})())
    assert shm.alloc_shared((10, 4), "float32") is None


def test_store_rows_shared_from_init_deferred_init_and_snapshot(tmp_path):
    plain = WeightStore(50, 8, seed=3)
    for kw in ({}, {"defer_init": True}):
        s = WeightStore(50, 8, seed=3, shared_rows=True, **kw)
        s.wait_rows()
        assert s.rows_shared and s.stats()["rows_shared"]
        np.testing.assert_array_equal(s.pull(np.arange(50)), plain.pull(np.arange(50)))
    s.snapshot(str(tmp_path / "snap"))
    r = WeightStore.from_snapshot(str(tmp_path / "snap"), shared_rows=True)
    assert r.rows_shared
    np.testing.assert_array_equal(r.pull(np.arange(50)), plain.pull(np.arange(50)))


def test_graph_build_maps_shared_rows_instead_of_writing_them(monkeypatch):
    """The child builds from the store's shared W (no temp W.npy) the same graph as from a copy."""
    s = WeightStore(3000, 16, seed=1, shared_rows=True)
    W = s.rows_view()
    saved = []
    real_save = np.save
    monkeypatch.setattr(np, "save", lambda path, arr, *a, **k: (saved.append(str(path)), real_save(path, arr, *a, **k)))
    g = GraphIndex(16, "angular", degree=8, subprocess=True)
    g.build(W)
    assert [p.rsplit("/", 1)[-1] for p in saved] == ["C.npy"]          # the rows were not written
    ref = GraphIndex(16, "angular", degree=8, subprocess=True)
    ref.build(np.array(W))                                             # a private copy: through W.npy
    assert "W.npy" in [p.rsplit("/", 1)[-1] for p in saved]
    np.testing.assert_array_equal(g._graph, ref._graph)
