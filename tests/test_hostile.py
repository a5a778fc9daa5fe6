"""Hostile and careless input to the parameter server and its snapshots (issue 23): every refused
request gets exactly one reply naming the rule, carries the request's id, and changes nothing."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from paramserver import server as server_mod
from paramserver import shm
from paramserver import snapshot as snap
from paramserver.client import RemoteStore
from paramserver.protocol import encode
from paramserver.store import BadRequestError, WeightStore
from test_paramserver_server import RawClient, inthread
from test_paramserver_store import FakeIndex


def _state(store: WeightStore) -> tuple:
    return store.pull(np.arange(store.num_classes)).copy(), store.step


def _assert_unchanged(store: WeightStore, before: tuple) -> None:
    np.testing.assert_array_equal(store.pull(np.arange(store.num_classes)), before[0])
    assert store.step == before[1]


# ------------------------------------------------------------------ item 2: query input
def test_query_refuses_non_finite_features_and_labels_out_of_range() -> None:
    K, d = 12, 4
    store = WeightStore(K, d, sparse_momentum="unrolled")
    store.attach_index(FakeIndex(store))
    F = np.ones((2, d), np.float32)
    assert store.query(F, 3, labels=np.array([0, K - 1]))[0].shape == (2, 3)
    with inthread(store) as (_, addr):
        raw = RawClient(addr)
        for bad in (np.nan, np.inf, -np.inf):
            G = F.copy()
            G[1, 2] = bad
            rep = raw.ask(encode({"op": "query", "n": 3, "id": 5}, [G]))
            assert (rep["ok"], rep["kind"], rep["id"]) == (False, "bad_request", 5)
            assert "features" in rep["error"] and "NaN or Inf" in rep["error"]
            with pytest.raises(BadRequestError, match="features hold NaN or Inf"):
                store.query(G, 3)
        for lab in ([0, K], [-1, 0]):
            rep = raw.ask(encode({"op": "query", "n": 3, "id": 6}, [F, np.array(lab, np.int64)]))
            assert (rep["ok"], rep["kind"], rep["id"]) == (False, "bad_request", 6)
            assert "labels" in rep["error"] and f"out of range [0, {K})" in rep["error"]
            with pytest.raises(BadRequestError, match="labels: class id"):
                store.query(F, 3, labels=np.array(lab))
        assert raw.ask(encode({"op": "query", "n": 3}, [F, np.array([0, K - 1], np.int64)]))["ok"]
        raw.close()


# ------------------------------------------------------------------ item 3: momentum without buffer
@pytest.mark.parametrize("kw", [dict(sparse_momentum="unrolled"), dict(momentum=0.0)])
def test_pull_of_a_momentum_the_store_does_not_keep_is_refused(kw) -> None:
    store = WeightStore(10, 4, **kw)
    with pytest.raises(BadRequestError, match="pull: this store keeps no momentum buffer"):
        store.pull([1, 2], matrix="momentum")
    with inthread(store) as (_, addr), RemoteStore([addr], 10, 4, timeout=5) as rs:
        with pytest.raises(BadRequestError, match="pull: this store keeps no momentum buffer"):
            rs.pull([1, 2], matrix="momentum")
        with pytest.raises(BadRequestError, match="pull: this store keeps no momentum buffer"):
            rs.pull([1, 2], matrix="momentum", step=0)
        assert rs.pull([1, 2]).shape == (2, 4)
    lazy = WeightStore(10, 4)
    assert not lazy.pull([1], matrix="momentum").any()


# ------------------------------------------------------------------ item 4: refused update
def test_a_push_whose_update_is_refused_for_overflow_says_so() -> None:
    d = 4
    store = WeightStore(6, d, num_clients=2, sparse_momentum="unrolled", weight_decay=0.0)
    w0 = _state(store)[0]
    huge = np.full((1, d), 3e37, np.float32)       # lr / (1 - m) * g = 3e38: over the 1e30 limit
    with inthread(store) as (_, addr):
        raw = RawClient(addr)
        first = raw.ask(encode({"op": "push", "step": 0, "lr": 1.0, "client_id": 0, "id": 1},
                               [np.array([2], np.int64), huge]))
        assert first["ok"] and first["applied"] is False and "refused" not in first   # waits for client 1
        last = raw.ask(encode({"op": "push", "step": 0, "lr": 1.0, "client_id": 1, "id": 2},
                              [np.array([3], np.int64), huge]))
        assert last["ok"] and (last["applied"], last["refused"], last["step"]) == (False, "overflow", 1)
        assert raw.ask(encode({"op": "stats"}))["stats"]["refused_updates"] == 1
        np.testing.assert_array_equal(store.pull(np.arange(6)), w0)
        ok = np.full((1, d), 0.5, np.float32)
        raw.ask(encode({"op": "push", "step": 1, "lr": 0.1, "client_id": 0}, [np.array([2], np.int64), ok]))
        good = raw.ask(encode({"op": "push", "step": 1, "lr": 0.1, "client_id": 1}, [np.array([3], np.int64), ok]))
        assert (good["applied"], good["step"]) == (True, 2) and "refused" not in good
        with RemoteStore([addr], 6, d, timeout=5) as rs:
            rs.push([1], huge, 2, 1.0, client_id=0)
            assert rs.push([1], huge, 2, 1.0, client_id=1) is False and rs.step == 3
        raw.close()
    alone = WeightStore(6, d, sparse_momentum="unrolled")
    assert alone.push([1], huge, 0, 1.0) is False and alone.step == 1
    assert alone.push([1], np.ones((1, d), np.float32), 1, 0.1) is True


# ------------------------------------------------------------------ item 5: W stays shared
@pytest.mark.skipif(shm.alloc_shared((1, 1), "float32") is None, reason="no usable /dev/shm here")
@pytest.mark.parametrize("in_place", [False, True])
def test_restore_keeps_w_in_shared_memory(tmp_path, in_place: bool) -> None:
    store = WeightStore(20, 4, shared_rows=True, sparse_momentum="unrolled")
    assert store.rows_shared
    store.push([3], np.ones((1, 4), np.float32), 0, 0.1)
    store.snapshot(str(tmp_path / "s"))
    want = _state(store)
    store.push([4], np.ones((1, 4), np.float32), 1, 0.1)
    store.restore(str(tmp_path / "s"), in_place=in_place)
    assert store.rows_shared and store.stats()["rows_shared"]
    _assert_unchanged(store, want)


# ------------------------------------------------------------------ item 7: refused restores change nothing
def _corrupt_snapshot(tmp_path, how: str) -> str:
    src = WeightStore(64, 32, sparse_momentum="unrolled", seed=3)          # W: 8 KiB
    src.push([1], np.ones((1, 32), np.float32), 0, 0.1)
    path = str(tmp_path / how)
    src.snapshot(path)
    f = os.path.join(path, "W.npy")
    data = bytearray(open(f, "rb").read())
    if how == "short":
        data = data[:-4096]
    elif how == "long":
        data += b"\0" * 8
    else:                                                                  # one bit flipped in the rows
        data[len(data) // 2] ^= 1
    open(f, "wb").write(bytes(data))
    return path


@pytest.mark.parametrize("how,error", [("short", "truncated"), ("long", "bytes after the data"),
                                       ("flipped", "checksum mismatch")])
def test_a_refused_in_place_restore_changes_nothing(tmp_path, monkeypatch, how: str, error: str) -> None:
    monkeypatch.setattr(server_mod, "RESTORE_IN_PLACE_BYTES", 0)          # the server's large-W path
    path = _corrupt_snapshot(tmp_path, how)
    store = WeightStore(64, 32, sparse_momentum="unrolled", seed=7)
    for s in range(3):
        store.push([5], np.ones((1, 32), np.float32), s, 0.1)
    before = _state(store)
    with inthread(store) as (_, addr):
        raw = RawClient(addr)
        rep = raw.ask(encode({"op": "restore", "path": path, "id": 9}))
        assert (rep["ok"], rep["kind"], rep["id"]) == (False, "bad_request", 9) and error in rep["error"]
        raw.close()
    _assert_unchanged(store, before)
    for in_place in (True, False):
        with pytest.raises(BadRequestError, match=error):
            store.restore(path, in_place=in_place)
        _assert_unchanged(store, before)


def test_snapshots_record_checksums_and_old_manifests_still_load(tmp_path) -> None:
    src = WeightStore(16, 4, momentum=0.5)
    src.push([1], np.ones((1, 4), np.float32), 0, 0.1)
    man = src.snapshot(str(tmp_path / "s"))
    assert set(man["crc32"]) == {"W", "momentum"}
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["crc32"] == man["crc32"]
    for name in ("W", "momentum"):
        assert snap.file_crc32(str(tmp_path / "s" / f"{name}.npy")) == man["crc32"][name]
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "W.npy"), src.pull(np.arange(16)))
    old = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del old["crc32"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(old))
    for in_place in (True, False):
        dst = WeightStore(16, 4, seed=5)
        dst.restore(str(tmp_path / "s"), in_place=in_place)
        np.testing.assert_array_equal(dst.pull(np.arange(16)), src.pull(np.arange(16)))
    assert WeightStore.from_snapshot(str(tmp_path / "s")).step == 1
    old["crc32"] = {"W": "x"}
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(BadRequestError, match="field 'crc32'"):
        dst.restore(str(tmp_path / "s"))


# ------------------------------------------------------------------ item 10: pruning and links
def test_pruning_never_follows_a_symlink_out_of_the_run_dir(tmp_path) -> None:
    st = WeightStore(4, 2, sparse_momentum="unrolled")
    elsewhere = tmp_path / "elsewhere"
    st.snapshot(str(elsewhere / "store_00000002"))                       # someone else's run, level 0
    st.snapshot(str(elsewhere / "multi" / snap.shard_name(0, 2)))        # ... and a sharded one, level 1
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(elsewhere / "store_00000002", run / "store_00000002")
    st.snapshot(str(run / "store_00000001"))
    st.snapshot(str(run / "store_00000003"))
    assert snap.prune_snapshots(str(run / "store_00000003"), keep=set()) == 1
    assert sorted(os.listdir(run)) == ["store_00000002", "store_00000003"]
    assert snap.is_snapshot(str(elsewhere / "store_00000002"))
    # level 1: run/store_N/shard-000-of-002, with store_00000002 a link to a tree elsewhere
    run1 = tmp_path / "run1"
    run1.mkdir()
    os.symlink(elsewhere / "multi", run1 / "store_00000002")
    st.snapshot(str(run1 / "store_00000001" / snap.shard_name(0, 2)))
    mine = run1 / "store_00000003" / snap.shard_name(0, 2)
    st.snapshot(str(mine))
    assert snap.prune_snapshots(str(mine), keep=set(), level=1) == 1
    assert snap.is_snapshot(str(elsewhere / "multi" / snap.shard_name(0, 2)))
    assert sorted(os.listdir(run1)) == ["store_00000002", "store_00000003"]


# ------------------------------------------------------------------ item 11: oversized requests
def test_a_request_over_the_message_limit_gets_an_error_naming_it() -> None:
    store = WeightStore(8, 4, sparse_momentum="unrolled")
    before = _state(store)
    with inthread(store, max_message_bytes=1 << 20) as (_, addr):
        raw = RawClient(addr)
        for mib in (1.5, 2.5):                    # 2.5 MiB: over ZeroMQ's old per-frame limit (no reply at all)
            big = np.zeros((int(mib * (1 << 20)) // 16, 4), np.float32)
            rep = raw.ask(encode({"op": "push", "step": 0, "lr": 0.1, "id": "big"},
                                 [np.zeros(len(big), np.int64), big]), timeout=10)
            assert (rep["ok"], rep["kind"], rep["id"]) == (False, "bad_request", "big")
            assert "limit of 1 MiB per message" in rep["error"] and "--max-message-mb" in rep["error"]
        assert raw.ask(encode({"op": "ping", "id": 1}))["ok"]
        raw.close()
    _assert_unchanged(store, before)


# ------------------------------------------------------------------ item 6: ids on protocol errors
def test_protocol_errors_echo_the_request_id() -> None:
    store = WeightStore(8, 4, sparse_momentum="unrolled")
    with inthread(store) as (_, addr):
        raw = RawClient(addr)
        frame_count = encode({"op": "pull", "id": 17}, [np.arange(2)])[:1]       # header names an array, none sent
        version = [json.dumps({"v": 1, "op": "ping", "id": "abc"}).encode()]
        bad_dtype = [json.dumps({"v": 2, "op": "pull", "id": [1, 2], "arrays": [{"dtype": "object", "shape": [1]}]}
                                ).encode(), b"x"]
        for frames, rid in ((frame_count, 17), (version, "abc"), (bad_dtype, [1, 2])):
            rep = raw.ask(frames)
            assert (rep["ok"], rep["kind"], rep["id"]) == (False, "protocol", rid)
        unknown = raw.ask(encode({"op": "explode", "id": 3}))
        assert (unknown["kind"], unknown["id"]) == ("protocol", 3)
        assert raw.ask([b"{not json"])["id"] is None
        raw.close()
