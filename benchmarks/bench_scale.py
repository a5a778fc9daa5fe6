"""How the parameter server holds up from 1M to 10M classes: readiness, builds, memory, step cost.

For each K (default 1M, 4M and 10M; d = 256 float32, so W is 1.0 / 4.1 / 10.2 GB) a real
``paramserver/paramserver.py`` process is started (graph index, angular, background rebuilds every
``--rebuild-every`` steps, the lean "unrolled" store) and a trainer-side loop runs selective-head
steps against it (B = 256, M = 1000, d = 256, the HF graph head and the random-sampling head on
alternate steps, paired). Rows are the server's own random init: the graph's COST does not depend
on the rows' structure (features are drawn near their label's row, so every sample takes the warm
path of a trained model).

Reported per K:
- ``ready_s``: seconds from the server's start to its first answered request (``info``);
- ``rows_s``: ... to its W being initialised (the first answered pull);
- ``build_s``: the graph's first (background) build, from the server's stats;
- ``rss_over_w``: the server's peak memory over the bytes of W (target at 10M: <= 1.5 W + 1 GB): the
  larger of its own peak RSS and the sampled (0.5 s) peak PSS of the server and its build child
  together (the child maps W from shared memory: counted once);
- ``step_over_floor``: median HF head step over the median random head step, paired, once the
  graph is live (target at 10M: <= 1.5);
and once: ``rt_over_echo``, an M-row pull + push round trip over a raw pyzmq echo of the same
bytes (target: <= 2).

The run time grows with K and is dominated at 10M by the first graph build (``--sizes 1M`` alone
is the short run); the free memory needed is that of the 10M server (W plus what its build holds).
Run times and peak memory measured so far: docs/benchmarks.md. Ends with one RESULT line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from statistics import median
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import PeakTreeMemory, peak_rss_mib  # noqa: E402

D, B, M = 256, 256, 1000


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1_000, "M": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KM" else s) * mult)


def echo_ms(nbytes_out: int, nbytes_back: int, reps: int = 50) -> float:
    """Median round trip of a raw pyzmq DEALER -> ROUTER echo: nbytes_out there, nbytes_back back."""
    import zmq

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    back = np.zeros(nbytes_back, np.uint8)

    def serve() -> None:
        for _ in range(reps):
            ident, _msg = router.recv_multipart(copy=False)
            router.send_multipart([ident, back], copy=False)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    out = np.ones(nbytes_out, np.uint8)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dealer.send(out, copy=False)
        dealer.recv(copy=False)
        times.append(time.perf_counter() - t0)
    t.join()
    dealer.close(0)
    router.close(0)
    return 1e3 * median(times[5:])


def run_size(K: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from paramserver.client import RemoteStore
    from hfsoftmax.heads.selective import SelectiveSoftmax

    tmp = tempfile.mkdtemp(prefix="bench_scale_")
    ready_file = os.path.join(tmp, "ready")
    cmd = [sys.executable, os.path.join(ROOT, "paramserver", "paramserver.py"), "--bind", "tcp://127.0.0.1:0",
           "--num-classes", str(K), "--dim", str(D), "--num-clients", "1", "--index", "graph", "--metric",
           "angular", "--rebuild-every", str(args.rebuild_every), "--sparse-momentum", "unrolled",
           "--ready-file", ready_file, "--log-level", "warning", "--sync-timeout", "600"]
    t0 = time.monotonic()
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tree = PeakTreeMemory(srv.pid)    # the server and its build child: W in shared memory is counted once
    try:
        while not os.path.exists(ready_file):
            if srv.poll() is not None:
                raise RuntimeError(f"server exited: {srv.stderr.read()[-2000:]}")
            time.sleep(0.05)
        with open(ready_file, encoding="utf-8") as f:
            address = f.read().strip()
        store = RemoteStore(address, K, D, timeout=600.0)
        store.info()
        ready_s = time.monotonic() - t0
        store.pull(np.arange(4))
        rows_s = time.monotonic() - t0
        hf = SelectiveSoftmax(store, K, D, M, margin="cosface", scale=64.0, margin_m=0.35, index="graph",
                              candidates=64, rebuild_every=args.rebuild_every, seed=0, rank=0, world_size=1)
        rnd = SelectiveSoftmax(store, K, D, M, margin="cosface", scale=64.0, margin_m=0.35, index="random",
                               rebuild_every=args.rebuild_every, seed=0, rank=0, world_size=1)
        rng = np.random.default_rng(1)

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            labels = rng.choice(K, B, replace=False)
            rows = store.pull(np.sort(labels))[np.argsort(np.argsort(labels))]
            f = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            f = f + 0.3 * rng.standard_normal(f.shape).astype(np.float32) / np.sqrt(D)
            return torch.from_numpy(f.astype(np.float32)).requires_grad_(True), torch.from_numpy(labels)

        def step(head: Any, s: int) -> float:
            feats, labels = batch()
            t = time.perf_counter()
            head.begin_step(s, 0.1)
            head(feats, labels).backward()
            head.end_step(s)
            return 1e3 * (time.perf_counter() - t)

        s = 0
        live_at = None
        t_wait = time.monotonic()
        while True:                       # train (random fill) until the first graph is live: a step
            step(hf, s)                   # every 1 s (the build's one core is the server's, not ours)
            s += 1
            time.sleep(args.wait_step_s)
            idx = store.stats()["shards"][0].get("index") or {}
            if idx.get("live"):
                live_at = s
                break
            if time.monotonic() - t_wait > args.max_wait_s:
                raise RuntimeError(f"K={K}: no graph live after {args.max_wait_s}s")
        build_s = float(idx.get("last_build_s") or float("nan"))
        fallback = int(idx.get("fallback_queries", 0))
        hf_ms, rnd_ms = [], []
        for i in range(2 * args.steps):
            (hf_ms if i % 2 == 0 else rnd_ms).append(step(hf if i % 2 == 0 else rnd, s))
            s += 1
        # an M-row pull + push round trip, against the raw echo of the same bytes
        ids = np.sort(rng.choice(K, M, replace=False))
        g = np.full((M, D), 1e-4, np.float32)
        rt = []
        for _ in range(30):
            t = time.perf_counter()
            store.pull(ids, step=s)
            store.push(ids, g, s, 0.1)
            rt.append(time.perf_counter() - t)
            s += 1
        rt_ms = 1e3 * median(rt[5:])
        echo = echo_ms(M * 8 + 200, M * D * 4) + echo_ms(M * 8 + M * D * 4 + 200, 200)
        # the server's own peak RSS (W included), or the sampled peak of server + build child, if higher
        server_peak = max(peak_rss_mib(srv.pid), tree.stop())
        store.shutdown()
        store.close()
        srv.wait(timeout=600)
        w_mib = K * D * 4 / 2**20
        return {"K": K, "ready_s": ready_s, "rows_s": rows_s, "build_s": build_s, "live_at_step": live_at,
                "fallback_queries": fallback, "hf_ms": median(hf_ms), "random_ms": median(rnd_ms),
                "step_over_floor": median(hf_ms) / median(rnd_ms), "server_peak_mib": server_peak,
                "w_mib": w_mib, "rss_over_w": server_peak / w_mib,
                "rss_limit_mib": 1.5 * w_mib + 1024, "rt_ms": rt_ms, "echo_ms": echo, "rt_over_echo": rt_ms / echo}
    finally:
        tree.stop()
        if srv.poll() is None:
            srv.kill()
            srv.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1M,4M,10M", help="comma-separated K values (1M, 4M, 10M, 250K ...)")
    p.add_argument("--steps", type=int, default=40, help="paired steps per head once the graph is live")
    p.add_argument("--rebuild-every", type=int, default=100,
                   help="T: the server's index rebuild period (free swaps at these sizes: builds go live when done)")
    p.add_argument("--max-wait-s", type=float, default=3600.0)
    p.add_argument("--wait-step-s", type=float, default=1.0, help="pause between the steps run while the build runs")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)   # the trainer-side loop takes one core; the server and its build the other
    out: dict[str, Any] = {}
    rows = []
    t0 = time.monotonic()
    for K in [parse_size(x) for x in args.sizes.split(",") if x.strip()]:
        r = run_size(K, args)
        rows.append(r)
        tag = f"k{K // 1_000_000}m" if K % 1_000_000 == 0 else f"k{K // 1000}k"
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        out.update({f"{tag}_ready_s": round(r["ready_s"], 2), f"{tag}_rows_s": round(r["rows_s"], 2),
                    f"{tag}_build_s": round(r["build_s"], 1), f"{tag}_rss_over_w": round(r["rss_over_w"], 3),
                    f"{tag}_step_over_floor": round(r["step_over_floor"], 3)})
    out["rt_over_echo"] = round(median(r["rt_over_echo"] for r in rows), 3)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
