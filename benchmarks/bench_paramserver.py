"""Benchmark of the parameter server: pull+push round trips and snapshot/restore throughput.

    .venv/bin/python benchmarks/bench_paramserver.py            # default sizes (run time: docs/benchmarks.md)

Round trip (HF-softmax's per-step traffic: pull M active rows, push M row gradients), M in
{1000, 10000}, d = 512, float32, over tcp loopback, with 1 and 4 concurrent clients, measured in
the same run beside
  * the in-process WeightStore (no network), and
  * a raw pyzmq echo (ROUTER in another process, bytes sent back untouched) of the same bytes: the
    push message (ids + M x d gradients) out and back, i.e. what pull+push moves in each direction.
Client threads live in this process; the servers are separate processes. With 4 clients the server
runs synchronous SGD over R = 4 (each client pulls for its step, then pushes).

Snapshot: a 1M x 512 float32 store with momentum (4 GB) written to a temporary directory
($BENCH_TMP, else $TMPDIR or /tmp) and restored in place; MB/s counts both matrices. Beside it, a
plain sequential write of the same number of bytes before and after (the ceiling any format has on
this machine; the first write into page-cache memory the VM never used is much slower, so the
"before" write also warms that memory up for the snapshot, and "after" is the fair comparison). Prints one ``RESULT`` line at the end.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from paramserver.client import RemoteStore  # noqa: E402
from paramserver.store import WeightStore  # noqa: E402

logger = logging.getLogger(__name__)
D = 512
K = 100_000


def echo_server(ready_file: str) -> None:
    """A ROUTER that sends every message straight back (zero-copy), until killed."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    os.replace(tmp, ready_file)
    while True:
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def start(cmd: list, ready_file: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists(ready_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd} did not start")
        time.sleep(0.02)
    return proc, open(ready_file).read().strip()


def cpu_seconds(pid: int) -> float:
    """CPU time of all threads of process ``pid`` (ns-resolution /proc schedstat; 0.0 if unavailable)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return total / 1e9


def timed(fn: Callable[[int], None], iters: int) -> float:
    """Seconds per iteration of fn(i), after one warm-up call."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(1, iters + 1):
        fn(i)
    return (time.perf_counter() - t0) / iters


def concurrent(fns: list, iters: int) -> float:
    """Wall seconds per iteration with one thread per fn (each runs iters iterations)."""
    barrier = threading.Barrier(len(fns) + 1)
    errors: list = []

    def run(fn: Callable[[int], None]) -> None:
        try:
            fn(0)
            barrier.wait()
            for i in range(1, iters + 1):
                fn(i)
        except Exception as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return (time.perf_counter() - t0) / iters


def echo_fn(addr: str, ids: np.ndarray, grads: np.ndarray) -> Callable[[int], None]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    header = b'{"v":1,"op":"echo"}'

    def fn(i: int) -> None:
        sock.send_multipart([header, ids, grads], copy=False)
        frames = sock.recv_multipart(copy=False)
        np.frombuffer(frames[2].buffer, dtype=np.float32)  # as a client would read the rows

    return fn


def roundtrip_section(M: int, clients: int, ps_addr: str, echo_addr: str, iters: int,
                      ps_pid: int, echo_pid: int, rounds: int = 16) -> dict:
    rng = np.random.default_rng(M)
    ids = [np.sort(rng.choice(K, M, replace=False)).astype(np.int64) for _ in range(clients)]
    grads = [np.full((M, D), 1e-3, np.float32) for _ in range(clients)]
    stores = [RemoteStore([ps_addr], K, D, timeout=60, client_id=c) for c in range(clients)]
    next_step = [stores[0].step] * clients  # each client's next step, kept across rounds

    def ps_fn(c: int) -> Callable[[int], None]:
        st, my_ids, g = stores[c], ids[c], grads[c]

        def fn(i: int) -> None:
            s = next_step[c]
            st.pull(my_ids, step=s)  # waits for the other clients' pushes of step s-1
            st.push(my_ids, g, s, 0.01)
            next_step[c] = s + 1
        return fn

    echoes = [echo_fn(echo_addr, ids[c], grads[c]) for c in range(clients)]
    fns = [ps_fn(c) for c in range(clients)]
    # The machine is shared and its load drifts within seconds: alternate short blocks of the two
    # measurements and take medians, so both see the same conditions.
    ps_t, echo_t, ps_cpu, echo_cpu = [], [], [], []
    block = max(2, iters // rounds)
    for _ in range(rounds):
        c0 = cpu_seconds(ps_pid)
        ps_t.append(timed(fns[0], block) if clients == 1 else concurrent(fns, block))
        ps_cpu.append((cpu_seconds(ps_pid) - c0) / (block + 1))
        c0 = cpu_seconds(echo_pid)
        echo_t.append(timed(echoes[0], block) if clients == 1 else concurrent(echoes, block))
        echo_cpu.append((cpu_seconds(echo_pid) - c0) / (block + 1))
    res = {"ps": float(np.median(ps_t)), "echo": float(np.median(echo_t)),
           "ratio": float(np.median(np.array(ps_t) / np.array(echo_t))),
           # server-side CPU per round trip (all threads of the server process)
           "ps_cpu": float(np.median(ps_cpu)), "echo_cpu": float(np.median(echo_cpu))}
    for st in stores:
        st.close()
    return res


def inprocess_section(M: int, iters: int) -> float:
    store = WeightStore(K, D, init="zeros")
    rng = np.random.default_rng(M)
    ids = np.sort(rng.choice(K, M, replace=False))
    g = np.full((M, D), 1e-3, np.float32)

    def fn(i: int) -> None:
        store.pull(ids, step=store.step)
        store.push(ids, g, store.step, 0.01)

    return timed(fn, iters)


def raw_write(path: str, nbytes: int, fsync: bool) -> float:
    """Seconds to write nbytes with plain sequential writes of a reused 64 MB buffer (like dd):
    the disk/page-cache ceiling any snapshot format is bound by on this machine."""
    chunk = np.ones(64 << 20, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, chunk.nbytes)
            f.write(memoryview(chunk)[:n])
            left -= n
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    os.remove(path)
    return dt


def snapshot_section(rows: int, fsync: bool) -> dict:
    """Seconds for: a raw write of the same bytes (first: it also pays for the memory the page cache
    has never used on this VM), the snapshot, the in-place restore, and a second raw write."""
    store = WeightStore(rows, D, init="zeros")
    # Touch every page (np.zeros maps them lazily) so the snapshot writes real memory.
    store._W.fill(0.01)
    store._M.fill(0.001)
    nbytes = store._W.nbytes + store._M.nbytes
    out = {"bytes": nbytes}
    tmp = tempfile.mkdtemp(prefix="bench_ps_", dir=os.environ.get("BENCH_TMP"))  # default: $TMPDIR or /tmp
    try:
        out["raw_first"] = raw_write(os.path.join(tmp, "raw.bin"), nbytes, fsync)
        path = os.path.join(tmp, "snap")
        t0 = time.perf_counter()
        store.snapshot(path, fsync=fsync)
        out["snapshot"] = time.perf_counter() - t0
        store._W.fill(0)
        t0 = time.perf_counter()
        store.restore(path, in_place=True)  # in place: no second 4 GB in memory
        out["restore"] = time.perf_counter() - t0
        assert float(store._W[-1, -1]) == np.float32(0.01), "restore did not bring the rows back"
        shutil.rmtree(path)
        out["raw"] = raw_write(os.path.join(tmp, "raw.bin"), nbytes, fsync)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=112,
                    help="round trips per measurement, in 16 interleaved blocks (M=1000; /5 for M=10000)")
    ap.add_argument("--snapshot-rows", type=int, default=1_000_000, help="rows of the snapshot test (0: skip)")
    ap.add_argument("--fsync", action="store_true", help="snapshot with fsync (durable across power loss)")
    ap.add_argument("--_echo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._echo:
        echo_server(args._echo)
        return
    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="bench_ps_ready_")
    procs = []
    out: dict = {}
    try:
        echo_proc, echo_addr = start([sys.executable, os.path.abspath(__file__), "--_echo", f"{tmp}/echo"], f"{tmp}/echo")
        procs.append(echo_proc)
        for clients in (1, 4):
            ps_proc, ps_addr = start([sys.executable, "paramserver/paramserver.py", "--bind", "tcp://127.0.0.1:0",
                                      "--num-classes", str(K), "--dim", str(D), "--num-clients", str(clients),
                                      "--init", "zeros", "--log-every", "0", "--ready-file", f"{tmp}/ps{clients}"],
                                     f"{tmp}/ps{clients}")
            procs.append(ps_proc)
            for M in (1000, 10000):
                iters = args.iters if M == 1000 else max(3, args.iters // 5)
                r = roundtrip_section(M, clients, ps_addr, echo_addr, iters, ps_proc.pid, echo_proc.pid)
                moved = 2 * M * D * 4 * clients  # rows out + grads in, per round trip, all clients
                print(f"M={M:5d} d={D} clients={clients}: paramserver {r['ps'] * 1e3:7.2f} ms/rt "
                      f"{M * clients / r['ps'] / 1e6:6.2f} Mrows/s {moved / r['ps'] / 1e9:5.2f} GB/s | raw echo "
                      f"{r['echo'] * 1e3:7.2f} ms {moved / r['echo'] / 1e9:5.2f} GB/s | ratio ps/echo {r['ratio']:.2f} "
                      f"| server CPU/rt: paramserver {r['ps_cpu'] * 1e3:.2f} ms, echo {r['echo_cpu'] * 1e3:.2f} ms",
                      flush=True)
                out[f"c{clients}_m{M}_ratio"] = r["ratio"]
                out[f"c{clients}_m{M}_ps_ms"] = r["ps"] * 1e3
                out[f"c{clients}_m{M}_GBps"] = moved / r["ps"] / 1e9
                out[f"c{clients}_m{M}_srv_cpu_ms"] = r["ps_cpu"] * 1e3
                out[f"c{clients}_m{M}_echo_cpu_ms"] = r["echo_cpu"] * 1e3
            ps_proc.kill()
            ps_proc.wait()
        for M in (1000, 10000):
            t = inprocess_section(M, args.iters)
            print(f"M={M:5d} d={D} in-process WeightStore: {t * 1e3:7.2f} ms/rt {M / t / 1e6:6.2f} Mrows/s "
                  f"(remote/in-process {out[f'c1_m{M}_ps_ms'] / 1e3 / t:.2f})", flush=True)
            out[f"inproc_m{M}_ms"] = t * 1e3
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.snapshot_rows:
        r = snapshot_section(args.snapshot_rows, args.fsync)
        mbps = {k: r["bytes"] / r[k] / 1e6 for k in ("raw_first", "snapshot", "restore", "raw")}
        print(f"snapshot {args.snapshot_rows} x {D} (W + momentum, {r['bytes'] / 1e9:.1f} GB, fsync={args.fsync}): "
              f"write {mbps['snapshot']:.0f} MB/s ({r['snapshot']:.2f} s), restore {mbps['restore']:.0f} MB/s "
              f"({r['restore']:.2f} s, page cache warm) | raw sequential write of the same bytes: "
              f"{mbps['raw_first']:.0f} MB/s before, {mbps['raw']:.0f} MB/s after | "
              f"snapshot/raw-after time ratio {r['snapshot'] / r['raw']:.2f}")
        out["snapshot_MBps"] = mbps["snapshot"]
        out["restore_MBps"] = mbps["restore"]
        out["raw_write_MBps"] = mbps["raw"]
        out["snapshot_vs_raw"] = r["snapshot"] / r["raw"]
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in out.items()))


if __name__ == "__main__":
    main()
