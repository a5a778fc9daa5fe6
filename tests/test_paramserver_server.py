"""Live parameter servers (subprocesses on free ports, always stopped): parity, sync, shards,
snapshot + SIGKILL + restore, malformed input and fuzzing, tokens, timeouts."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional

import numpy as np
import pytest
import zmq

from paramserver.client import AuthError, RemoteStore
from paramserver.protocol import PROTOCOL_VERSION, encode
from paramserver.server import ParamServer
from paramserver.store import BadRequestError, StaleStepError, SyncTimeoutError, WeightStore, shard_ranges
from test_paramserver_store import FakeIndex, make_pushes, torch_reference

from servers import REPO, free_port, launch_server


@contextlib.contextmanager
def launch(tmp_path, *args: str, bind: str = "tcp://127.0.0.1:0", name: str = "ps") -> Iterator[tuple]:
    """A server that logs its throughput often (the log lines are part of what some tests read)."""
    with launch_server(tmp_path, "--log-every", "0.5", *args, bind=bind, name=name) as pa:
        yield pa


@contextlib.contextmanager
def inthread(store: WeightStore, **kw) -> Iterator[tuple]:
    """A ParamServer in a thread of this process (for tests that attach Python objects)."""
    server = ParamServer(store, bind="tcp://127.0.0.1:*", log_every=0, **kw)
    addr = server.bind()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server, addr
    finally:
        server.stop()
        t.join(timeout=10)


def test_help_runs_from_repo_root() -> None:
    out = subprocess.run([sys.executable, "paramserver/paramserver.py", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--snapshot-every" in out.stdout and "--shard" in out.stdout


def test_parity_with_torch_through_live_server(tmp_path) -> None:
    K, d, R = 20, 8, 2
    with launch(tmp_path, "--num-classes", str(K), "--dim", str(d), "--num-clients", str(R), "--nesterov",
                "--exact-rounding", "--momentum", "0.8", "--weight-decay", "0.01", "--init-std", "0.1",
                "--sparse-momentum", "lazy") as (_, addr):
        clients = [RemoteStore([addr], K, d, timeout=10, client_id=c) for c in range(R)]
        W0 = clients[0].pull(np.arange(K))
        pushes = make_pushes(K, d, steps=8, clients=R, n=7, seed=11)
        for s, (lr, per_client) in enumerate(pushes):
            for c, (ids, grads) in enumerate(per_client):
                clients[c].push(ids, grads, s, lr)
        W_ref, B_ref = torch_reference(W0, pushes, 0.8, 0.01, True)
        np.testing.assert_array_equal(clients[1].pull(np.arange(K), step=len(pushes)), W_ref)
        np.testing.assert_array_equal(clients[0].pull(np.arange(K), matrix="momentum"), B_ref)
        for c in clients:
            c.close()


def _run_clients(addresses: list, K: int, d: int, R: int, steps: int) -> None:
    """R clients in threads: pull(step) then push, as trainers do."""
    errors: list = []

    def client(c: int) -> None:
        try:
            with RemoteStore(addresses, K, d, timeout=20, client_id=c) as rs:
                rng = np.random.default_rng(c)
                for s in range(steps):
                    ids = rng.choice(K, 6, replace=False)
                    rs.pull(ids, step=s)
                    rs.push(ids, rng.standard_normal((6, d)).astype(np.float32), s, 0.05)
        except Exception as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(R)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def test_three_clients_sync_and_two_shards_equal_one(tmp_path) -> None:
    K, d, R, steps = 30, 4, 3, 5
    common = ["--num-classes", str(K), "--dim", str(d), "--num-clients", str(R), "--seed", "4"]
    with launch(tmp_path, *common, name="one") as (_, one), \
            launch(tmp_path, *common, "--shard", "0/2", name="s0") as (_, s0), \
            launch(tmp_path, *common, "--shard", "1/2", name="s1") as (_, s1):
        _run_clients([one], K, d, R, steps)
        _run_clients([s0, s1], K, d, R, steps)
        with RemoteStore([one], K, d) as a, RemoteStore([s0, s1], K, d) as b:
            assert a.step == b.step == steps
            ids = np.random.default_rng(0).permutation(K)
            np.testing.assert_array_equal(a.pull(ids), b.pull(ids))
            with pytest.raises(BadRequestError, match="no momentum buffer"):   # "unrolled": none kept
                b.pull(ids, matrix="momentum")
            # in-process reference of the same pushes
            ref = WeightStore(K, d, seed=4, num_clients=R, sparse_momentum="unrolled")  # the CLI default
            for s in range(steps):
                for c in range(R):
                    rng = np.random.default_rng(c)
                    for _ in range(s):  # replay client c's random stream up to step s
                        rng.choice(K, 6, replace=False)
                        rng.standard_normal((6, d))
                    ids_c = rng.choice(K, 6, replace=False)
                    ref.push(ids_c, rng.standard_normal((6, d)).astype(np.float32), s, 0.05, client_id=c)
            np.testing.assert_array_equal(a.pull(np.arange(K)), ref.pull(np.arange(K)))
            assert b.stats()["rows"] == K and [i["class_range"] for i in b.info()] == [list(r) for r in shard_ranges(K, 2)]
        with pytest.raises(ValueError, match="class_range"):  # shards given in the wrong order
            RemoteStore([s1, s0], K, d)


def test_pull_timeout_names_missing_client(tmp_path) -> None:
    with launch(tmp_path, "--num-classes", "10", "--dim", "2", "--num-clients", "3") as (_, addr):
        with RemoteStore([addr], 10, 2, timeout=1.5, client_id=0) as rs:
            rs.push([1], np.ones((1, 2), np.float32), 0, 0.1, client_id=0)
            rs.push([1], np.ones((1, 2), np.float32), 0, 0.1, client_id=2)
            t0 = time.monotonic()
            with pytest.raises(SyncTimeoutError, match=r"client ids \[1\]"):
                rs.pull([0], step=1)
            assert time.monotonic() - t0 < 3.0
            assert rs.pull([0]).shape == (1, 2)  # the server still answers


def test_snapshot_sigkill_restore(tmp_path) -> None:
    K, d = 40, 6
    snaps = tmp_path / "snaps"
    port = free_port()
    bind = f"tcp://127.0.0.1:{port}"
    with launch(tmp_path, "--num-classes", str(K), "--dim", str(d), "--snapshot-dir", str(snaps),
                "--snapshot-every", "2", "--sparse-momentum", "lazy", bind=bind, name="a") as (proc, addr):
        rs = RemoteStore([addr], K, d, timeout=3)
        for s in range(3):
            rs.push([s, 5], np.full((2, d), 0.5, np.float32), s, 0.1)
        rs.snapshot(str(tmp_path / "manual"))
        want_w, want_m = rs.pull(np.arange(K)), rs.pull(np.arange(K), matrix="momentum")
        rs.push([7], np.ones((1, d), np.float32), 3, 0.1)  # after the snapshot: must be lost
        assert rs.step == 4  # any later request is served after the update (and its snapshot)
        assert (snaps / "latest").read_text().strip() == "step-000000004"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        with pytest.raises(TimeoutError, match=str(port)):
            rs.pull([0])
    with launch(tmp_path, "--restore", str(tmp_path / "manual"), bind=bind, name="b") as (_, addr):
        assert addr == bind
        # the same client object reconnects by itself
        np.testing.assert_array_equal(rs.pull(np.arange(K)), want_w)
        np.testing.assert_array_equal(rs.pull(np.arange(K), matrix="momentum"), want_m)
        assert rs.step == 3
        rs.close()
    with launch(tmp_path, "--restore", str(snaps), name="c") as (_, addr):  # newest periodic snapshot
        with RemoteStore([addr], K, d) as r2:
            assert r2.step == 4


def test_sigterm_clean_shutdown_with_final_snapshot(tmp_path) -> None:
    snaps = tmp_path / "snaps"
    with launch(tmp_path, "--num-classes", "10", "--dim", "2", "--snapshot-dir", str(snaps)) as (proc, addr):
        with RemoteStore([addr], 10, 2) as rs:
            rs.push([1], np.ones((1, 2), np.float32), 0, 0.1)
            rows = rs.pull(np.arange(10))
        deadline = time.monotonic() + 5  # the disconnect is logged asynchronously
        while "client disconnected" not in (tmp_path / "ps.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    snap = snaps / (snaps / "latest").read_text().strip()
    np.testing.assert_array_equal(WeightStore.from_snapshot(str(snap)).pull(np.arange(10)), rows)
    log = (tmp_path / "ps.log").read_text()
    assert "paramserver listening on tcp://127.0.0.1:" in log and "client connected" in log
    assert "client disconnected" in log and "stopped at step 1" in log


class RawClient:
    """A DEALER socket sending arbitrary frames; every message must get exactly one reply."""

    def __init__(self, addr: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)

    def ask(self, frames: list, timeout: float = 5.0) -> dict:
        self.sock.send_multipart(frames, copy=True)
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no reply")
        reply = self.sock.recv_multipart()
        while reply and reply[0] == b"":  # a REQ-style envelope comes back as an empty frame
            reply = reply[1:]
        return json.loads(reply[0])

    def close(self) -> None:
        self.sock.close(linger=0)


def _hdr(**kw) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, **kw}).encode()


def bad_messages(K: int, d: int) -> list:
    ids = np.array([1, 2], np.int64)
    g = np.ones((2, d), np.float32)
    nan = g.copy()
    nan[0, 1] = np.nan
    return [
        ("malformed json", [b"{not json"]),
        ("not an object", [b"[1, 2]"]),
        ("bad version", [json.dumps({"v": 99, "op": "info"}).encode()]),
        ("wrong frame count", [_hdr(op="pull", arrays=[{"dtype": "<i8", "shape": [2]}])]),
        ("frame size", [_hdr(op="pull", arrays=[{"dtype": "<i8", "shape": [3]}]), ids.tobytes()]),
        ("unknown op", encode({"op": "explode"})),
        ("unknown matrix", encode({"op": "pull", "matrix": "bias"}, [ids])),
        ("unknown matrix set", encode({"op": "set_rows", "matrix": "bias"}, [ids, g])),
        ("ids out of range", encode({"op": "push", "step": 1, "lr": 0.1}, [np.array([1, K]), g])),
        ("negative id", encode({"op": "pull"}, [np.array([-1])])),
        ("ids not integers", encode({"op": "push", "step": 1, "lr": 0.1}, [np.array([1.0, 2.0]), g])),
        ("grad shape", encode({"op": "push", "step": 1, "lr": 0.1}, [ids, np.ones((2, d + 1), np.float32)])),
        ("grad rows", encode({"op": "push", "step": 1, "lr": 0.1}, [ids, np.ones((3, d), np.float32)])),
        ("grad dtype", encode({"op": "push", "step": 1, "lr": 0.1}, [ids, np.ones((2, d), np.float64)])),
        ("nan grad", encode({"op": "push", "step": 1, "lr": 0.1}, [ids, nan])),
        ("stale step", encode({"op": "push", "step": 0, "lr": 0.1}, [ids, g])),
        ("far step", encode({"op": "push", "step": 9, "lr": 0.1}, [ids, g])),
        ("missing lr", encode({"op": "push", "step": 1}, [ids, g])),
        ("lr string", encode({"op": "push", "step": 1, "lr": "fast"}, [ids, g])),
        ("bad client", encode({"op": "push", "step": 1, "lr": 0.1, "client_id": 5}, [ids, g])),
        ("NaN json", [b'{"v": 2, "op": "push", "step": 1, "lr": NaN}', ids.tobytes(), g.tobytes()]),
        ("bad dtype code", [_hdr(op="pull", arrays=[{"dtype": "object", "shape": [1]}]), b"x"]),
        ("empty frame", [b""]),
        ("query no index", encode({"op": "query", "n": 2}, [np.ones((1, d), np.float32)])),
        ("restore nowhere", encode({"op": "restore", "path": "/nonexistent/snap"})),
    ]


def _state(rs: RemoteStore, K: int) -> tuple:
    momentum = rs.pull(np.arange(K), matrix="momentum") if rs.stats()["shards"][0]["momentum_buffer"] else None
    return rs.pull(np.arange(K)), momentum, rs.step


def test_each_bad_request_gets_an_error_and_changes_nothing(tmp_path) -> None:
    K, d = 16, 4
    with launch(tmp_path, "--num-classes", str(K), "--dim", str(d)) as (proc, addr):
        rs = RemoteStore([addr], K, d, timeout=5)
        rs.push([3, 4], np.ones((2, d), np.float32), 0, 0.1)  # momentum non-zero, step 1
        before = _state(rs, K)
        raw = RawClient(addr)
        for name, frames in bad_messages(K, d):
            reply = raw.ask(frames)
            assert reply["ok"] is False and reply["error"], name
            after = _state(rs, K)
            np.testing.assert_array_equal(after[0], before[0], err_msg=name)
            np.testing.assert_array_equal(after[1], before[1], err_msg=name)
            assert after[2] == before[2], name
        assert "frame count" in raw.ask(bad_messages(K, d)[3][1])["error"]
        assert "unknown op" in raw.ask(encode({"op": "explode"}))["error"]
        with pytest.raises(StaleStepError, match="already applied"):
            rs.push([1], np.ones((1, d), np.float32), 0, 0.1)
        with pytest.raises(BadRequestError, match="NaN or Inf"):
            rs.push([1], np.full((1, d), np.inf, np.float32), 1, 0.1)
        raw.close()
        assert proc.poll() is None
        rs.push([1], np.ones((1, d), np.float32), 1, 0.1)  # still serves correctly
        assert rs.step == 2
        rs.close()


def test_fuzzed_messages_leave_server_up_and_correct(tmp_path) -> None:
    K, d = 16, 4
    rng = np.random.default_rng(1234)
    # set_rows is left out (a random valid one would legitimately change rows); pushes are made stale below
    ops = ["pull", "push", "query", "info", "stats", "register", "ping", "restore", "nope", 7, None]
    with launch(tmp_path, "--num-classes", str(K), "--dim", str(d)) as (proc, addr):
        rs = RemoteStore([addr], K, d, timeout=5)
        rs.push([3], np.ones((1, d), np.float32), 0, 0.1)  # store at step 1: steps 1 and 2 would be accepted
        before = _state(rs, K)
        raw = RawClient(addr)
        n_ok = 0
        for i in range(300):
            kind = rng.integers(5)
            if kind == 0:  # random bytes frames
                frames = [rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(1, 4)))]
            else:  # plausible headers with wrong fields/frames
                h = {"v": int(rng.choice([2, 2, 2, 1])), "op": ops[int(rng.integers(len(ops)))]}
                for field, vals in (("step", [-1, 0, 1, 2, 10 ** 12, "x", None]), ("lr", [0.1, -1.0, "a", None]),
                                    ("matrix", ["W", "momentum", "x", 3]), ("client_id", [0, 1, -3, "a"]),
                                    ("n", [0, 1, 5, -2]), ("timeout", [0.0, 0.01, -5]), ("path", [3, "/no/such"])):
                    if rng.random() < 0.4:
                        h[field] = vals[int(rng.integers(len(vals)))]
                arrays = []
                for _ in range(int(rng.integers(0, 3))):
                    dt = [np.int64, np.int32, np.float32, np.float64][int(rng.integers(4))]
                    shape = [int(rng.integers(0, 4))] + ([d] if rng.random() < 0.5 else [])
                    arrays.append((rng.standard_normal(shape) * 20).astype(dt))
                frames = encode(h, arrays)
                if kind == 2 and len(frames) > 1:
                    frames = frames[:-1]  # wrong frame count
                elif kind == 3:
                    frames = [frames[0][: int(rng.integers(1, len(frames[0])))]] + frames[1:]  # truncated JSON
                if h.get("op") == "push" and h.get("step") in (1, 2):
                    h["step"] = 0  # never let a valid push through: the state must not change
                    frames = encode(h, arrays)
            reply = raw.ask([bytes(f) if not isinstance(f, bytes) else f for f in frames])
            assert "ok" in reply, (i, frames[:1])
            n_ok += bool(reply["ok"])
        assert 0 < n_ok < 150  # mostly refused, a few harmless reads answered
        after = _state(rs, K)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
        assert after[2] == before[2]
        assert proc.poll() is None
        rs.push([2], np.ones((1, d), np.float32), before[2], 0.1)
        assert rs.step == before[2] + 1
        raw.close()
        rs.close()


def test_token_required(tmp_path) -> None:
    with launch(tmp_path, "--num-classes", "10", "--dim", "2", "--token", "s3cret") as (proc, addr):
        with pytest.raises(AuthError, match="unauthorized"):
            RemoteStore([addr], 10, 2, timeout=5)
        raw = RawClient(addr)
        assert "unauthorized" in raw.ask(encode({"op": "shutdown"}))["error"]
        assert "unauthorized" in raw.ask(encode({"op": "shutdown", "token": "wrong"}))["error"]
        raw.close()
        rs = RemoteStore([addr], 10, 2, timeout=5, token="s3cret")
        assert rs.pull([1]).shape == (1, 2)
        rs.shutdown()
        assert proc.wait(timeout=20) == 0
        rs.close()
    with pytest.raises(ValueError, match="token"):
        ParamServer(WeightStore(4, 2), bind="tcp://0.0.0.0:*")
    ParamServer(WeightStore(4, 2), bind="tcp://0.0.0.0:*", token="t")  # allowed (not bound here)


def test_client_times_out_when_server_is_down() -> None:
    addr = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=addr):
        RemoteStore([addr], 10, 2, timeout=0.5)
    rs = RemoteStore([addr], 10, 2, timeout=0.5, check=False)
    with pytest.raises(TimeoutError, match=addr):
        rs.push([1], np.ones((1, 2), np.float32), 0, 0.1)
    with pytest.raises(TimeoutError, match=addr):
        rs.pull([1], step=3)
    assert time.monotonic() - t0 < 5.0
    rs.close()


def test_query_merges_shards_by_score() -> None:
    K, d = 40, 4
    stores = [WeightStore(hi - lo, d, seed=2, class_offset=lo, total_classes=K) for lo, hi in shard_ranges(K, 2)]
    for st in stores:
        st.attach_index(FakeIndex(st))
    whole = WeightStore(K, d, seed=2)
    with inthread(stores[0]) as (_, a0), inthread(stores[1]) as (_, a1):
        with RemoteStore([a0, a1], K, d, timeout=10) as rs:
            feats = np.random.default_rng(0).standard_normal((5, d)).astype(np.float32)
            ids, scores = rs.query(feats, 6)
            full = feats @ whole.pull(np.arange(K)).T
            np.testing.assert_array_equal(ids, np.argsort(-full, axis=1, kind="stable")[:, :6])
            np.testing.assert_allclose(scores, np.take_along_axis(full, ids, axis=1), rtol=1e-5)
            assert rs.info()[0]["index"] is True


def test_query_sends_labels_to_a_graph_index_on_every_shard() -> None:
    """The graph index enters at each sample's label: over the wire (2 shards) the answer equals the
    in-process shards' answers merged by score, and a bad labels array is refused by name."""
    from paramserver.index import IndexManager, make_index

    K, d = 400, 8
    rng = np.random.default_rng(0)
    stores = [WeightStore(hi - lo, d, seed=3, class_offset=lo, total_classes=K) for lo, hi in shard_ranges(K, 2)]
    for st in stores:
        lo = st.class_range[0]
        mgr = IndexManager(lambda lo=lo: make_index("graph", d, class_offset=lo, degree=8), rebuild_every=10**9)
        mgr.build_now(st.rows_view(), step=0)
        st.attach_index(mgr)
    labels = rng.choice(K, 6, replace=False)
    feats = rng.standard_normal((6, d)).astype(np.float32)
    local = [st.query(feats, 5, labels=labels) for st in stores]
    ids_l = np.concatenate([i for i, _ in local], axis=1)
    sc_l = np.concatenate([s for _, s in local], axis=1)
    top = np.argsort(-sc_l, axis=1, kind="stable")[:, :5]
    with inthread(stores[0]) as (_, a0), inthread(stores[1]) as (_, a1):
        with RemoteStore([a0, a1], K, d, timeout=10) as rs:
            ids, scores = rs.query(feats, 5, labels=labels)
            np.testing.assert_array_equal(ids, np.take_along_axis(ids_l, top, axis=1))
            np.testing.assert_allclose(scores, np.take_along_axis(sc_l, top, axis=1), rtol=1e-6)
            with pytest.raises(BadRequestError, match="labels must be integer"):
                rs.query(feats, 5, labels=labels[:2])


def test_index_stats_rebuild_period_and_restore_rebuilds(tmp_path) -> None:
    """The server's stats carry its index's, set_rebuild_every reaches the index, and a restore takes
    the snapshot's saved index over (bound to the restored rows), or, from a snapshot without one,
    rebuilds it over them: either way a query right after it sees the restored matrix."""
    from paramserver.index import IndexManager, make_index

    K, d = 30, 4
    store = WeightStore(K, d, seed=1, momentum=0.0, weight_decay=0.0)
    mgr = IndexManager(lambda: make_index("exact", d, "dot"), rebuild_every=5, background=False)
    mgr.build_now(store.rows_view(), 0)
    store.attach_index(mgr)
    with inthread(store) as (_, addr), RemoteStore([addr], K, d, timeout=10) as rs:
        st = rs.stats()["shards"][0]
        assert st["index"]["builds"] == 1
        rs.set_rebuild_every(7)
        assert mgr.rebuild_every == 7
        with pytest.raises(Exception, match="steps must be an integer >= 1"):
            rs.set_rebuild_every(0)
        # snapshot a matrix whose row 17 is the only one aligned with e_0, then scramble and restore
        rows = np.zeros((K, d), np.float32)
        rows[17, 0] = 1.0
        rs.set_rows(np.arange(K), rows)
        rs.snapshot(str(tmp_path / "snap"))
        rs.set_rows(np.arange(K), np.random.default_rng(0).standard_normal((K, d)).astype(np.float32))
        rs.restore(str(tmp_path / "snap"))
        ids, _ = rs.query(np.array([[1.0, 0, 0, 0]], np.float32), 1)
        assert ids[0, 0] == 17
        assert rs.stats()["shards"][0]["index"]["builds"] == 1           # the saved index, not a rebuild
        os.remove(tmp_path / "snap" / "index.json")                         # an older snapshot: rebuilt
        rs.set_rows(np.arange(K), np.random.default_rng(0).standard_normal((K, d)).astype(np.float32))
        rs.restore(str(tmp_path / "snap"))
        ids, _ = rs.query(np.array([[1.0, 0, 0, 0]], np.float32), 1)
        assert ids[0, 0] == 17
        assert rs.stats()["shards"][0]["index"]["builds"] >= 2


@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:*", "inproc://pull-owned-rows"])
def test_pulled_rows_are_the_callers_own(bind: str) -> None:
    """RemoteStore.pull returns the received frame without copying: writable, and writing to it
    changes nothing on the server (also over inproc, where frames share the sender's memory)."""
    K, d = 40, 8
    store = WeightStore(K, d, init_std=0.1)
    ctx = zmq.Context.instance()
    server = ParamServer(store, bind=bind, log_every=0, context=ctx)
    addr = server.bind()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        with RemoteStore(addr, K, d, timeout=10, context=ctx) as rs:
            ids = np.arange(5, 35, 3)
            rows = rs.pull(ids)
            assert rows.flags.writeable and rows.dtype == np.float32 and rows.shape == (len(ids), d)
            want = store.pull(ids)
            np.testing.assert_array_equal(rows, want)
            rows[:] = 7.0
            np.testing.assert_array_equal(rs.pull(ids), want)
            np.testing.assert_array_equal(store.pull(ids), want)
            rs.push(ids, np.ones((len(ids), d), np.float32), 0, 0.1)  # a step still applies normally
            after = rs.pull(ids, step=1)  # the server answers a push before it applies it
            np.testing.assert_array_equal(after, store.pull(ids))
            assert not np.array_equal(after, want)
    finally:
        server.stop()
        t.join(timeout=10)


def test_protocol_version_is_a_strict_integer_and_a_mismatch_names_both() -> None:
    with inthread(WeightStore(10, 2)) as (_, addr):
        raw = RawClient(addr)
        for v in (True, 2.0, "2"):
            r = raw.ask([json.dumps({"v": v, "op": "info"}).encode()])
            assert r["ok"] is False and "must be the integer 2" in r["error"], v
        r = raw.ask([json.dumps({"v": 1, "op": "info"}).encode()])
        assert r["ok"] is False and "speaks version 1" in r["error"] and "version 2" in r["error"]
        assert raw.ask([json.dumps({"v": 2, "op": "ping"}).encode()])["ok"] is True
        raw.close()


def test_bf16_wire_halves_bytes_and_rounds_like_torch() -> None:
    """store.wire_dtype=bf16: rows come back rounded to bfloat16 (as torch rounds), gradients are
    widened on the server; the bytes on the wire are half."""
    import torch

    from paramserver.protocol import from_bf16, to_bf16

    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32) * 10
    x[0, :3] = [np.inf, -np.inf, 3.0e38]
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(from_bf16(to_bf16(x)), want)
    assert np.isnan(from_bf16(to_bf16(np.array([np.nan], np.float32)))).all()
    K, d = 32, 16
    a, b = WeightStore(K, d, seed=1), WeightStore(K, d, seed=1)
    with inthread(a) as (srv_a, addr_a), inthread(b) as (srv_b, addr_b):
        with RemoteStore([addr_a], K, d, wire_dtype="bf16") as bf, RemoteStore([addr_b], K, d) as native:
            rows = bf.pull(np.arange(K))
            np.testing.assert_array_equal(rows, from_bf16(to_bf16(native.pull(np.arange(K)))))
            g = np.random.default_rng(1).standard_normal((4, d)).astype(np.float32)
            bf.push([1, 2, 3, 4], g, 0, 0.5)
            native.push([1, 2, 3, 4], from_bf16(to_bf16(g)), 0, 0.5)
            np.testing.assert_array_equal(a.pull(np.arange(K)), b.pull(np.arange(K)))
            assert srv_a._counts["bytes_out"] < 0.6 * srv_b._counts["bytes_out"]


@pytest.mark.parametrize("index", ["ivf", "graph", "exact"])
def test_overflowing_pushes_are_refused_and_the_server_lives(tmp_path, index) -> None:
    """Duplicated ids whose finite gradients sum to inf, and an lr that is inf as float32: W stays
    bit-identical, the step still completes (nobody waits forever), the server answers on."""
    K, d = 64, 8
    args = ["--num-classes", str(K), "--dim", str(d), "--index", index, "--metric", "dot", "--rebuild-every", "1"]
    if index != "exact":
        args += ["--nlist", "4"]
    with launch(tmp_path, *args) as (proc, addr), RemoteStore([addr], K, d, timeout=10) as rs:
        before = rs.pull(np.arange(K))
        big = np.full((2, d), 3e38, np.float32)
        with pytest.raises(BadRequestError, match="lr must be finite"):
            rs.push([1], np.ones((1, d), np.float32), 0, 1e300)
        rs.push([7, 7], big, 0, 0.1)                            # sum over the duplicates: inf
        np.testing.assert_array_equal(rs.pull(np.arange(K), step=1), before)
        rs.push([7], np.full((1, d), 1e30, np.float32), 1, 1e9)  # finite, but lr * g overflows
        np.testing.assert_array_equal(rs.pull(np.arange(K), step=2), before)
        st = rs.stats()["shards"][0]
        assert st["refused_updates"] == 2 and st["step"] == 2
        for step in range(2, 6):                                 # index rebuilds keep working
            rs.push([3, 9], np.ones((2, d), np.float32), step, 0.1)
        assert rs.query(np.ones((2, d), np.float32), 4)[0].shape == (2, 4)
        assert np.isfinite(rs.pull(np.arange(K), step=6)).all() and proc.poll() is None


def test_a_failing_index_never_kills_the_server() -> None:
    """A background build that failed (its process killed) re-raises in maybe_rebuild: counted and
    logged, the update applied, the parked pulls answered, the server alive."""
    K, d = 16, 4

    class Broken(FakeIndex):
        def maybe_rebuild(self, store, step):
            raise RuntimeError("background index build failed: process killed (SIGKILL)")

    store = WeightStore(K, d, seed=1, num_clients=1)
    store.attach_index(Broken(store))
    with inthread(store) as (server, addr), RemoteStore([addr], K, d, timeout=5) as rs:
        for step in range(3):
            rs.push([1, 2], np.ones((2, d), np.float32), step, 0.1)
            assert rs.pull([1], step=step + 1).shape == (1, d)
        st = rs.stats()["shards"][0]
        assert st["step"] == 3 and st["index_errors"] == 3


def test_huge_requests_are_refused_by_name_and_others_are_served() -> None:
    """A pull whose reply would exceed the per-message limit is refused at once (not after
    gathering gigabytes), naming the limit; the server answers the next request as usual."""
    K, d = 1000, 256
    store = WeightStore(K, d, seed=1)
    with inthread(store, max_message_bytes=1 << 20) as (_, addr), RemoteStore([addr], K, d, timeout=5) as rs:
        t0 = time.monotonic()
        with pytest.raises(BadRequestError, match=r"pull: the reply \(2000 rows, 2 MiB\) exceeds.*limit of 1 MiB"):
            rs.pull(np.zeros(2000, np.int64))
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(BadRequestError, match="query: the reply"):
            rs.query(np.ones((1, d), np.float32), 100000)   # 1.2 MB of candidates
        assert rs.pull(np.arange(500)).shape == (500, d)          # 0.5 MiB: fine


def test_server_answers_at_once_while_its_rows_are_drawn(monkeypatch):
    """paramserver.py draws W in the background: info/ping are answered before the rows exist, a
    pull sent meanwhile is parked and answered with the rows the seed gives once they exist, and
    the index's first build starts after them."""
    import threading

    import paramserver.store as store_mod
    from paramserver.client import RemoteStore
    from tests.servers import thread_server

    gate = threading.Event()
    real = store_mod.init_rows

    def slow_init(*a, **kw):
        assert gate.wait(20)
        return real(*a, **kw)

    monkeypatch.setattr(store_mod, "init_rows", slow_init)
    with thread_server("--num-classes", "500", "--dim", "8", "--seed", "3", "--index", "exact") as address:
        rs = RemoteStore(address, 500, 8, timeout=20.0)
        try:
            assert rs.info()[0]["rows_ready"] is False          # answered with the rows not drawn yet
            got: list = []
            t = threading.Thread(target=lambda: got.append(rs.clone().pull(np.arange(5))))
            t.start()
            time.sleep(0.3)
            assert not got                                        # parked, not answered with garbage
            gate.set()
            t.join(20)
            want = real(0, 500, 8, "float32", "normal", 0.01, 3)
            np.testing.assert_array_equal(got[0], want[:5])
            ids, _ = rs.query(want[:3].copy(), 2)
            deadline = time.monotonic() + 10
            while (ids < 0).any() and time.monotonic() < deadline:   # first build after the rows
                time.sleep(0.05)
                ids, _ = rs.query(want[:3].copy(), 2)
            assert ids[:, 0].tolist() == [0, 1, 2]
        finally:
            rs.close()


def test_init_rows_threads_and_out_do_not_change_the_rows():
    from paramserver.store import INIT_BLOCK_ROWS, init_rows

    lo, hi = 1000, 3 * INIT_BLOCK_ROWS + 17
    one = init_rows(lo, hi, 6, "float32", "normal", 0.02, 9)
    out = np.empty((hi - lo, 6), np.float32)
    assert init_rows(lo, hi, 6, "float32", "normal", 0.02, 9, out=out, threads=3) is out
    np.testing.assert_array_equal(out, one)
    np.testing.assert_array_equal(init_rows(lo, hi, 6, "float32", "uniform", 0.02, 9, threads=2),
                                  init_rows(lo, hi, 6, "float32", "uniform", 0.02, 9))


def test_server_prunes_the_trainers_old_store_snapshots_on_its_own_machine(tmp_path):
    """snapshot(prune_keep=...) makes the server remove, where it wrote them, the run's older
    store_NNNNNNNN snapshots except those kept (and never a directory that is not a snapshot)."""
    from paramserver.client import RemoteStore
    from paramserver.snapshot import prune_snapshots
    from paramserver.store import WeightStore
    from tests.servers import thread_server

    run = tmp_path / "run"
    run.mkdir()
    with thread_server("--num-classes", "40", "--dim", "4", "--index", "none") as address:
        rs = RemoteStore(address, 40, 4, timeout=20.0)
        try:
            for step in (5, 7):
                rs.snapshot(str(run / f"store_{step:08d}"))
            (run / "store_00000003").mkdir()                  # not a snapshot: never removed
            (run / "notes").mkdir()
            rs.snapshot(str(run / "store_00000010"), prune_keep=["store_00000007"])
            # the newest older one stays: the checkpoint on disk names it until the trainer replaces it
            assert sorted(os.listdir(run)) == ["notes", "store_00000003", "store_00000005", "store_00000007",
                                               "store_00000010"]
            rs.snapshot(str(run / "store_00000012"), prune_keep=["store_00000007"])
        finally:
            rs.close()
    assert sorted(os.listdir(run)) == ["notes", "store_00000003", "store_00000007", "store_00000010",
                                       "store_00000012"]
    # several shards: run/store_N/shard-i-of-S, the same shard's directory pruned in each
    for step in (1, 2):
        WeightStore(4, 2).snapshot(str(run / f"store_{step:08d}" / "shard-000-of-002"))
    WeightStore(4, 2).snapshot(str(run / "store_00000002" / "shard-001-of-002"))
    assert prune_snapshots(str(run / "store_00000002" / "shard-000-of-002"), {"store_00000007"}, level=1) == 1
    assert not (run / "store_00000001").exists()                   # its only shard removed, then the empty dir
    assert (run / "store_00000012" / "manifest.json").exists()      # not a shard directory: untouched
    assert sorted(os.listdir(run / "store_00000002")) == ["shard-000-of-002", "shard-001-of-002"]
