"""Head-only training step: HF-softmax (Zhang et al., AAAI 2018) beside full softmax, random sampling,
MACH and RP-softmax, side by side in one run.

    .venv/bin/python benchmarks/bench_head.py              # default: K = 100K and 1M (see below)
    .venv/bin/python benchmarks/bench_head.py --quick      # K = 20K, a few steps
    .venv/bin/python benchmarks/bench_head.py --ks 1000000 --methods full,hf-ivf,random

One step of each method, on d = 512, B = 256, M = 1000, CosFace logits (s = 30, m = 0.35):

- full:        W [K, d] a torch parameter; logits over all K, CE, backward, torch SGD with momentum
               (what a trainer does).
- hf-forest / hf-ivf / hf-graph: SelectiveSoftmax on an in-process WeightStore: index query +
               select_active + pull M rows + forward/backward over M + push (row-sparse SGD in the
               store with unrolled momentum, the training default, and for IVF / graph the
               incremental update of the M changed rows). The graph index scores each label's
               neighbour classes (B x 33 rows), the IVF index scans nprobe lists per feature.
- random:      the same head with M - labels rows drawn at random (no index query): the floor of any
               method that touches M rows.
- hf-graph-remote (or hf-ivf-remote): hf-graph with the store and index in a parameter server on loopback
               (paramserver.server.ParamServer in its own process, RemoteStore in the trainer): the
               deployment the design intends, where the trainer never holds W. Its trainer peak RSS is
               the HF memory figure; the server's peak RSS is reported beside it.
- mach, rp:    MachHead (R = 16, B = default) and RPSoftmax (m = 64) trained with torch SGD
               (benchmarks/bench_siblings.head_step_ms).

W of the HF store holds structured rows (families of 20 classes: unit centre + own unit direction),
and the features are drawn near their label's row, so the index has neighbours to find; CPK = mean
softmax mass (eval logits s*cos) of the selected active set, computed exactly against all K in
blocks, beside the ceiling (mass of the exact top-M) and M/K. Every method runs in its own
subprocess, one at a time, and reports its own peak RSS (VmHWM). ms/step = median over timed steps
after warm-up (full softmax: 1 warm-up + 3 timed steps, at 1M 2 timed steps). Each worker runs
with one OpenMP/BLAS thread (``--threads``): on this shared, oversubscribed 2-core machine two
threads spin at barriers and are many times slower (see benchmarks/common.run_worker).

Rebuild cost (hf-forest, hf-ivf and hf-graph workers): after the timed steps the same step loop runs with
background rebuilds off / on (rebuild_every = T, default 50: at these sizes a build lasts longer than
T steps, so builds run back to back -- the worst case; builds never queue) / off again, and the
cost is 1 - steps/s(on) / mean steps/s(off); the achieved rebuild period and the index staleness
come from IndexManager.stats().

Default run (no arguments): K = 100K (all methods, forest, IVF and graph rebuild cost) and K = 1M
(full, hf-ivf, hf-graph, random, hf-graph-remote, mach, rp; IVF and graph rebuild cost). The forest
is built at 1M only with ``--forest-1m`` (its build is slow at that size). The 1M
part takes most of the run time and sets the peak memory: full softmax at 1M holds W, its gradient
and momentum, the normalised copy for CosFace and the logits; hf-ivf in-process is as large (W +
momentum in the store, plus faiss' own copy of the normalised rows). Run times and peak memory
measured so far: docs/benchmarks.md. Ends with exactly one ``RESULT key=value ...`` line.
``--ks 1000000`` or ``--ks 100000`` runs one size (the RESULT keys are prefixed by K).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (cpk_exact, emit, print_result, features_near, fill_store, median, peak_rss_mib,  # noqa: E402
                    run_worker)

SCRIPT = os.path.abspath(__file__)
MARGIN, SCALE, MARGIN_M = "cosface", 30.0, 0.35
FAMILY, SPREAD, NOISE = 20, 1.0, 1.5
logger = logging.getLogger("bench_head")


# --------------------------------------------------------------------------------------------- #
# Workers (one method per process).

def _labels(rng: np.random.Generator, K: int, B: int) -> np.ndarray:
    return rng.integers(0, K, B).astype(np.int64)


def worker_full(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from hfsoftmax.heads import FullSoftmax

    K, d, B = spec["K"], spec["d"], spec["B"]
    torch.manual_seed(0)
    head = FullSoftmax(K, d, margin=MARGIN, scale=SCALE, margin_m=MARGIN_M)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        feats = torch.randn(B, d, generator=g).requires_grad_(True)
        labels = torch.randint(0, K, (B,), generator=g)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = head(feats, labels)
        loss.backward()
        opt.step()
        if i >= spec["warmup"]:
            times.append(1e3 * (time.perf_counter() - t))
    return {"ms": median(times), "ms_all": times, "param_mib": K * d * 4 / 2**20, "peak_rss_mib": peak_rss_mib()}


def worker_sibling(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from bench_siblings import head_step_ms, param_mib
    from hfsoftmax.heads.mach import MachHead, default_num_buckets
    from hfsoftmax.heads.rp import RPSoftmax

    K, d, B = spec["K"], spec["d"], spec["B"]
    torch.manual_seed(0)
    if spec["method"] == "mach":
        R = 16
        head = MachHead(K, d, R, default_num_buckets(K, R))
        desc = f"R={R},B={default_num_buckets(K, R)}"
    else:
        head = RPSoftmax(K, d, 64)
        desc = "m=64"
    ms = head_step_ms(head, B, steps=spec["steps"], warmup=spec["warmup"])
    return {"ms": ms, "param_mib": param_mib(head), "desc": desc, "peak_rss_mib": peak_rss_mib()}


def _make_local_store(spec: dict[str, Any], index: str) -> tuple[Any, Any, float]:
    """WeightStore with family rows and (unless random) an IndexManager: (store, manager, build_s)."""
    from paramserver.index import IndexManager, make_index
    from paramserver.store import WeightStore

    K, d = spec["K"], spec["d"]
    store = WeightStore(K, d, init="zeros", momentum=0.9, weight_decay=5e-4, sparse_momentum="unrolled")
    fill_store(store, K, d, FAMILY, SPREAD, seed=0)
    if index == "random":
        return store, None, 0.0
    opts: dict[str, Any] = {}
    if index in ("ivf", "graph") and spec.get("nlist"):
        opts["nlist"] = spec["nlist"]
    if index == "ivf":
        if spec.get("nprobe"):
            opts["nprobe"] = spec["nprobe"]
    manager = IndexManager(lambda: make_index(index, d, "angular", seed=0, **opts), rebuild_every=10**9)
    t0 = time.perf_counter()
    manager.build_now(store.rows_view(), step=0)
    build_s = time.perf_counter() - t0
    store.attach_index(manager)
    return store, manager, build_s


def _hf_step_fn(head: Any, store_rows, K: int, B: int, d: int, seed: int):
    """A closure running one timed HF step at step s; features are drawn near the labels' rows
    (outside the timed region, like the backbone's forward)."""
    import torch

    rng = np.random.default_rng(seed)

    def make_batch() -> tuple[Any, Any]:
        labels = _labels(rng, K, B)
        f = features_near(store_rows(labels), NOISE, rng)
        return torch.from_numpy(f).requires_grad_(True), torch.from_numpy(labels)

    def step(s: int, batch: tuple[Any, Any]) -> float:
        feats, labels = batch
        t = time.perf_counter()
        head.begin_step(s, 0.1)
        loss = head(feats, labels)
        loss.backward()
        head.end_step(s)
        return 1e3 * (time.perf_counter() - t)

    return make_batch, step


def _rebuild_phases(manager: Any, make_batch, step, s0: int, phase_s: float, every: int,
                    max_wait_s: float = 120.0) -> tuple[dict[str, Any], int]:
    """off / on / off phases of the HF loop; rebuild cost = 1 - sps(on) / mean sps(off)."""
    def run(seconds: float, s: int) -> tuple[float, int]:
        n, busy = 0, 0.0
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            batch = make_batch()
            busy += step(s, batch)
            s += 1
            n += 1
        return n / (busy / 1e3), s  # steps per second of step time (batch generation excluded)

    s = s0
    manager.rebuild_every = 10**9
    sps_a, s = run(phase_s, s)
    builds0 = manager.stats()["builds"]
    manager.rebuild_every = every
    sps_on, s = run(2 * phase_s, s)
    manager.rebuild_every = 10**9
    t_wait = time.perf_counter()
    # Let a running build finish, so the last phase is really "off" -- but at most max_wait_s: a
    # niced build on an oversubscribed machine may get almost no CPU for minutes (docs/benchmarks.md),
    # and then the last phase runs with it.
    while manager.stats()["building"] and time.perf_counter() - t_wait < max_wait_s:
        time.sleep(0.1)
    wait_s = time.perf_counter() - t_wait
    st = manager.stats()  # after the wait: a build started in the "on" phase counts
    sps_b, s = run(phase_s, s)
    sps_off = 0.5 * (sps_a + sps_b)
    return {"sps_off_a": sps_a, "sps_off_b": sps_b, "sps_on": sps_on, "rebuild_cost": 1.0 - sps_on / sps_off,
            "bg_builds_done": st["builds"] - builds0, "building_at_end": st["building"],
            "mean_build_s": st["mean_build_s"], "last_build_s": st["last_build_s"],
            "achieved_period_steps": st["achieved_period_steps"], "achieved_period_s": st["achieved_period_s"],
            "staleness_steps": st["staleness_steps"], "steps_since_build": st["steps_since_build"],
            "rebuild_every": every, "waited_for_build_s": wait_s}, s


def worker_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from hfsoftmax.heads.selective import SelectiveSoftmax

    torch.manual_seed(0)
    K, d, B, M = spec["K"], spec["d"], spec["B"], spec["M"]
    index = spec["index"]
    t0 = time.perf_counter()
    store, manager, build_s = _make_local_store(spec, index)
    setup_s = time.perf_counter() - t0
    rss_after_setup = peak_rss_mib()
    head = SelectiveSoftmax(store, K, d, M, margin=MARGIN, scale=SCALE, margin_m=MARGIN_M, index=index,
                            candidates=spec["candidates"], rebuild_every=10**9, seed=0)
    rows = store.rows_view()
    make_batch, step = _hf_step_fn(head, lambda ids: rows[ids], K, B, d, seed=1)
    # The random-rows floor, interleaved step by step with this head on the same store, so that the
    # ratio HF / random sees the same machine load (this machine is shared). Both heads number
    # their steps with one global counter g, so the store's synchronous step protocol holds.
    paired = None
    if index != "random":
        rnd_head = SelectiveSoftmax(store, K, d, M, margin=MARGIN, scale=SCALE, margin_m=MARGIN_M, index="random",
                                    rebuild_every=10**9, seed=0)
        paired = _hf_step_fn(rnd_head, lambda ids: rows[ids], K, B, d, seed=2)
    times, rtimes = [], []
    s = 0
    for i in range(spec["warmup"] + spec["steps"]):
        batch = make_batch()
        ms = step(s, batch)
        s += 1
        if i >= spec["warmup"]:
            times.append(ms)
        if paired is not None:
            rb = paired[0]()
            rms = paired[1](s, rb)
            s += 1
            if i >= spec["warmup"]:
                rtimes.append(rms)
        last = batch
    # CPK of the last HF step's active set on a probe of that batch (rows as they are now, a couple
    # of SGD steps later: close enough).
    probe = last[0].detach().numpy()[:64]
    cpk = cpk_exact(lambda lo, hi: rows[lo:hi], K, probe, head.last_active, M, SCALE,
                    labels=last[1].numpy()[:64])
    out = {"ms": median(times), "ms_all": times, "build_s": build_s, "setup_s": setup_s, **cpk,
           "ms_random_paired": median(rtimes) if rtimes else None,
           "param_mib": K * d * 4 / 2**20, "store_mib": 2 * K * d * 4 / 2**20,
           "rss_after_setup_mib": rss_after_setup}
    if manager is not None and spec.get("rebuild_phase_s"):
        reb, s = _rebuild_phases(manager, make_batch, step, s, spec["rebuild_phase_s"], spec["rebuild_every"])
        out.update(reb)
    if manager is not None:
        manager.close()
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def server_main(spec: dict[str, Any]) -> None:
    """Parameter server process for hf-*-remote: store + index, served on loopback until shutdown."""
    from paramserver.server import ParamServer

    store, manager, build_s = _make_local_store(spec, spec["index"])
    server = ParamServer(store, bind="tcp://127.0.0.1:*", log_every=1e9)

    def ready(address: str) -> None:
        tmp = spec["ready_file"] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"address": address, "build_s": build_s, "pid": os.getpid()}, f)
        os.replace(tmp, spec["ready_file"])

    server.serve_forever(ready=ready)
    if manager is not None:
        manager.close()


def worker_hf_remote(spec: dict[str, Any]) -> dict[str, Any]:
    import subprocess
    import tempfile

    import torch
    from paramserver.client import RemoteStore
    from hfsoftmax.heads.selective import SelectiveSoftmax

    torch.manual_seed(0)
    K, d, B, M = spec["K"], spec["d"], spec["B"], spec["M"]
    tmpdir = tempfile.mkdtemp(prefix="bench_head_")
    sspec = dict(spec, ready_file=os.path.join(tmpdir, "ready.json"))
    srv = subprocess.Popen([sys.executable, SCRIPT, "--server", json.dumps(sspec)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.time() + 1200
        while not os.path.exists(sspec["ready_file"]):
            if srv.poll() is not None:
                raise RuntimeError(f"server exited: {srv.stderr.read()[-2000:]}")
            if time.time() > t_end:
                raise RuntimeError("server did not get ready")
            time.sleep(0.2)
        with open(sspec["ready_file"], encoding="utf-8") as f:
            info = json.load(f)
        store = RemoteStore(info["address"], K, d, timeout=120.0)
        head = SelectiveSoftmax(store, K, d, M, margin=MARGIN, scale=SCALE, margin_m=MARGIN_M, index=spec["index"],
                                candidates=spec["candidates"], rebuild_every=10**9, seed=0, rank=0, world_size=1)
        make_batch, step = _hf_step_fn(head, lambda ids: store.pull(np.unique(ids))[np.searchsorted(np.unique(ids), ids)],
                                       K, B, d, seed=1)
        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            batch = make_batch()
            ms = step(i, batch)
            if i >= spec["warmup"]:
                times.append(ms)
        server_peak = peak_rss_mib(info["pid"])
        trainer_peak = peak_rss_mib()
        store.shutdown()
        store.close()
        srv.wait(timeout=60)
        return {"ms": median(times), "ms_all": times, "peak_rss_mib": trainer_peak, "server_peak_rss_mib": server_peak,
                "build_s": info["build_s"], "param_mib": K * d * 4 / 2**20}
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()


WORKERS = {"full": worker_full, "mach": worker_sibling, "rp": worker_sibling, "hf-forest": worker_hf,
           "hf-ivf": worker_hf, "hf-graph": worker_hf, "random": worker_hf, "hf-ivf-remote": worker_hf_remote,
           "hf-forest-remote": worker_hf_remote, "hf-graph-remote": worker_hf_remote}


def run_method(method: str, K: int, args: argparse.Namespace) -> dict[str, Any]:
    big = K >= 500_000
    # IVF's own default nprobe grows like sqrt(K) (31 lists of ~1000 rows at 1M: 31K rows scanned per
    # query, seconds per batch on one core; docs/benchmarks.md); at large K the benchmark keeps the
    # scan budget at 8 lists instead (the index docstring's advice: a fixed scan budget as K grows).
    nprobe = args.nprobe or (8 if big else 0)
    spec: dict[str, Any] = {"method": method, "K": K, "d": args.d, "B": args.batch, "M": args.m,
                            "candidates": args.candidates, "nprobe": nprobe, "nlist": args.nlist}
    if method == "full":
        spec.update(steps=2 if big else args.full_steps, warmup=1 if big else 1)
    elif method in ("mach", "rp"):
        spec.update(steps=args.steps, warmup=args.warmup)
    else:
        spec.update(steps=args.steps, warmup=args.warmup, index=method.split("-")[1] if "-" in method else "random")
        if method in ("hf-forest", "hf-ivf", "hf-graph") and args.rebuild_phase_s > 0 and (not big or method != "hf-forest"):
            spec.update(rebuild_phase_s=args.rebuild_phase_s, rebuild_every=args.rebuild_every)
    logger.info("K=%d %s ...", K, method)
    res = run_worker(SCRIPT, spec, threads=args.threads)
    if "error" in res:
        logger.error("K=%d %s failed: %s", K, method, res["error"])
    else:
        logger.info("K=%d %s: %.1f ms/step, peak RSS %.0f MiB (%.0f s)", K, method, res["ms"], res["peak_rss_mib"],
                    res["wall_s"])
    return res


def fmt(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="head-only step: HF-softmax vs full softmax vs random / MACH / RP")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--ks", default="100000,1000000", help="comma list of K")
    ap.add_argument("--methods", default="full,hf-forest,hf-ivf,hf-graph,random,hf-graph-remote,mach,rp")
    ap.add_argument("--forest-1m", action="store_true", help="also build the forest at K >= 500K (slow)")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--m", type=int, default=1000, help="active classes M")
    ap.add_argument("--candidates", type=int, default=16, help="index candidates per feature")
    ap.add_argument("--nprobe", type=int, default=0, help="IVF lists probed (0: index default below 500K, 8 above)")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: index default, sqrt(K))")
    ap.add_argument("--steps", type=int, default=30, help="timed steps (HF, random, MACH, RP)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--full-steps", type=int, default=3, help="timed full-softmax steps below 500K (2 at >= 500K)")
    ap.add_argument("--rebuild-phase-s", type=float, default=15.0, help="off-phase seconds (on = 2x; 0 = skip)")
    ap.add_argument("--rebuild-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP/BLAS threads per worker (see common.run_worker)")
    ap.add_argument("--quick", action="store_true", help="K = 20K, few steps, short rebuild phases")
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        logging.basicConfig(level=logging.WARNING)
        emit(WORKERS[spec["method"]](spec))
        return 0
    if args.server:
        logging.basicConfig(level=logging.WARNING)
        server_main(json.loads(args.server))
        return 0
    if args.quick:
        args.ks, args.steps, args.warmup, args.full_steps, args.rebuild_phase_s = "20000", 8, 2, 3, 3.0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_start = time.perf_counter()
    methods = [m for m in args.methods.split(",") if m]
    table: dict[int, dict[str, dict[str, Any]]] = {}
    for K in [int(k) for k in args.ks.split(",")]:
        table[K] = {}
        for method in methods:
            if method == "hf-forest" and K >= 500_000 and not args.forest_1m:
                continue
            table[K][method] = run_method(method, K, args)

    kv: list[str] = [f"d={args.d}", f"B={args.batch}", f"M={args.m}"]
    for K, rows in table.items():
        full = rows.get("full", {})
        rnd = rows.get("random", {})
        print(f"\nK={K} d={args.d} B={args.batch} M={args.m} (CosFace s={SCALE}); ratios vs full softmax "
              f"and vs the random-rows floor measured in this run")
        print(f"{'method':<16}{'ms/step':>10}{'full/x':>9}{'x/random':>10}{'x/rnd pair':>11}{'peakRSS MiB':>13}"
              f"{'full/x RSS':>11}{'param MiB':>11}{'CPK':>8}{'negCPK':>8}{'neg top-M':>10}{'build s':>9}")
        for name, r in rows.items():
            if "error" in r:
                print(f"{name:<16} FAILED: {r['error'][:200]}")
                continue
            sp = full.get("ms", float("nan")) / r["ms"]
            fl = r["ms"] / rnd["ms"] if "ms" in rnd else float("nan")
            mem = full.get("peak_rss_mib", float("nan")) / r["peak_rss_mib"]
            pair = r["ms"] / r["ms_random_paired"] if r.get("ms_random_paired") else None
            print(f"{name:<16}{r['ms']:>10.1f}{sp:>9.1f}{fl:>10.2f}{fmt(pair, 2):>11}{r['peak_rss_mib']:>13.0f}{mem:>11.1f}"
                  f"{r.get('param_mib', float('nan')):>11.1f}{fmt(r.get('cpk'), 4):>8}{fmt(r.get('neg_cpk'), 4):>8}"
                  f"{fmt(r.get('neg_cpk_topM'), 4):>10}{fmt(r.get('build_s')):>9}")
            if pair is not None:
                kv += [f"K{K // 1000}k_{name.replace('-', '_')}_random_paired_ms={r['ms_random_paired']:.1f}",
                       f"K{K // 1000}k_{name.replace('-', '_')}_over_random_paired={pair:.2f}"]
            tag = f"K{K // 1000}k_{name.replace('-', '_')}"
            kv += [f"{tag}_ms={r['ms']:.1f}", f"{tag}_rss_mib={r['peak_rss_mib']:.0f}"]
            if name != "full" and "ms" in full:
                kv += [f"{tag}_speedup_vs_full={sp:.1f}", f"{tag}_mem_ratio_full_over={mem:.1f}"]
            if name not in ("full", "random") and "ms" in rnd:
                kv.append(f"{tag}_over_random={fl:.2f}")
            if "cpk" in r:
                kv += [f"{tag}_cpk={r['cpk']:.4f}", f"{tag}_negcpk={r.get('neg_cpk', float('nan')):.4f}",
                       f"{tag}_negcpk_topM={r.get('neg_cpk_topM', float('nan')):.4f}"]
            if r.get("build_s"):
                kv.append(f"{tag}_build_s={r['build_s']:.1f}")
            if "server_peak_rss_mib" in r:
                print(f"{'':<16}(server process peak RSS {r['server_peak_rss_mib']:.0f} MiB: W + momentum + index)")
                kv.append(f"{tag}_server_rss_mib={r['server_peak_rss_mib']:.0f}")
            if "desc" in r:
                print(f"{'':<16}({r['desc']})")
        for name, r in rows.items():
            if "rebuild_cost" in r:
                print(f"rebuild cost {name} (T={r['rebuild_every']}): steps/s off {r['sps_off_a']:.1f}/{r['sps_off_b']:.1f}"
                      f" on {r['sps_on']:.1f} -> cost {100 * r['rebuild_cost']:+.1f}%; background builds done "
                      f"{r['bg_builds_done']} (build {fmt(r['last_build_s'])} s), achieved period "
                      f"{fmt(r['achieved_period_steps'], 0)} steps / {fmt(r['achieved_period_s'])} s, staleness "
                      f"{r['staleness_steps']} steps, steps since build {r['steps_since_build']}")
                tag = f"K{K // 1000}k_{name.replace('-', '_')}"
                kv += [f"{tag}_rebuild_cost={r['rebuild_cost']:.3f}", f"{tag}_bg_builds={r['bg_builds_done']}",
                       f"{tag}_period_steps={fmt(r['achieved_period_steps'], 0)}",
                       f"{tag}_staleness={r['staleness_steps']}", f"{tag}_since_build={r['steps_since_build']}"]
    print_result(kv, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
