"""Multi-rank HF-softmax against one parameter server: does the server's work grow with R?

Default size (run time: docs/benchmarks.md): R = 1, 2, 4, 8 gloo rank processes on this machine, one
``paramserver.py`` with K = 1M classes x d = 512 (fp32, 2 GB), B = 128 samples per rank, M = 10000
and M = 1000 active classes, the pipelined client (pushes from a background worker). The ranks feed
synthetic features (no backbone) through the selective head exactly as training does: one active
set per global batch, each rank pulling a disjoint ~M/R slice and all-gathering the rest, the
gradient reduce-scattered and pushed in R disjoint slices. Selection is the random fill
(Partial-FC style: no index query), so the figures isolate what R changes: pulls, pushes and the
update. Per (R, M): server busy ms per step (CPU time of its thread handling requests and
applying the SGD update, from its ``stats``: on 2 shared cores its wall time mostly measures the
ranks competing for them; the wall figure is printed too), rows moved per step (pulled + pushed), each rank's exposed store wait (``ps_wait_ms``)
and the step time.

Then, end to end: ``hfsoftmax.train`` with the tiny backbone on the synthetic identities through a
parameter server, HF (forest and graph indexes) and random sampling, pushes in ``end_step`` (sync), from the
worker (pipelined) and, for random sampling, with the next step planned and its early rows pulled
during this one (prefetch; HF's plan reads the step's features, so it cannot start earlier),
reporting the exposed wait as a fraction of the step (median of interleaved repeats).

    .venv/bin/python benchmarks/bench_multirank.py [--num-classes 1000000] [--ranks 1,2,4,8] ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from common import ROOT, print_result

sys.path.insert(0, os.path.join(ROOT, "tests"))


def _rank_main(rank: int, world: int, address: str, init: str, spec: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from hfsoftmax.heads.selective import SelectiveSoftmax
    from paramserver.client import RemoteStore

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    K, d, b = spec["K"], spec["d"], spec["B"]
    results = []
    step = 0
    for M in spec["actives"]:
        store = RemoteStore([address], K, d, timeout=600.0, client_id=rank)
        head = SelectiveSoftmax(store, K, d, M, margin="cosface", scale=64.0, margin_m=0.35, index="random",
                                rank=rank, world_size=world, pipeline=spec.get("pipeline", True))
        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            if i == spec["warmup"]:
                head.flush()
                dist.barrier()
                head.stats()                       # reset the wait counters
                before = store.stats() if rank == 0 else None
                busy0 = store._all({"op": "stats"})[0]["server"] if rank == 0 else None
            g = np.random.default_rng([7, step])
            labels = torch.from_numpy(g.integers(0, K, world * b)[rank::world])
            feats = torch.from_numpy(g.standard_normal((world * b, d), dtype=np.float32)[rank::world].copy())
            feats.requires_grad_(True)
            t0 = time.perf_counter()
            head.begin_step(step, 0.1)
            loss = head(feats, labels)
            loss.backward()
            head.end_step(step)
            times.append(time.perf_counter() - t0)
            step += 1
        head.flush()
        dist.barrier()
        wait = head.stats().get("ps_wait_ms", 0.0)
        waits = [None] * world
        dist.all_gather_object(waits, wait)
        step_ms = [None] * world
        dist.all_gather_object(step_ms, 1000.0 * float(np.median(times[spec["warmup"]:])))
        if rank == 0:
            after = store.stats()
            busy1 = store._all({"op": "stats"})[0]["server"]
            n = spec["steps"]
            rows = (after["rows_pulled"] - before["rows_pulled"] + after["rows_pushed"] - before["rows_pushed"]) / n
            results.append({"R": world, "M": M, "server_ms": 1000.0 * (busy1["cpu_s"] - busy0["cpu_s"]) / n,
                            "server_wall_ms": 1000.0 * (busy1["busy_s"] - busy0["busy_s"]) / n, "rows": rows,
                            "wait_ms": waits, "step_ms": step_ms})
        head.close()                               # its worker, and the store's sockets
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(R: int, spec: dict, tmp: str) -> list[dict]:
    import torch.multiprocessing as mp

    from servers import free_port, launch_server

    class _Tmp:  # launch_server wants a pathlib-like folder
        def __init__(self, p: str) -> None:
            self.p = p

        def __truediv__(self, name: str) -> Any:
            import pathlib
            return pathlib.Path(self.p) / name

    out = os.path.join(tmp, f"r{R}.json")
    args = ["--num-classes", str(spec["K"]), "--dim", str(spec["d"]), "--num-clients", str(R), "--log-every", "0",
            "--sync-timeout", "600"]
    with launch_server(_Tmp(tmp), *args, name=f"ps{R}", ready_timeout=600.0) as (_, addr):
        mp.spawn(_rank_main, args=(R, addr, f"tcp://127.0.0.1:{free_port()}", spec, out), nprocs=R, join=True)
    with open(out, encoding="utf-8") as f:
        return json.load(f)


E2E_MODES = {"sync": ("false", "false"), "pipelined": ("true", "false"), "prefetch": ("true", "true")}


def end_to_end(steps: int, head: str, mode: str, tmp: str) -> dict[str, float]:
    """hfsoftmax.train, tiny backbone, synthetic identities, through a parameter server thread; ``head``
    hf (forest index), hf-graph (class-neighbour graph) or random; ``mode`` sync (pushes in end_step),
    pipelined (pushes from the worker) or prefetch (pipelined, and a label-only plan with its early
    rows a step ahead)."""
    from hfsoftmax.config import load_config
    from hfsoftmax.train import train
    from servers import thread_server

    K, d = 1000, 64
    out = os.path.join(tmp, f"e2e_{head}_{mode}")
    args = ["--num-classes", str(K), "--dim", str(d), "--rebuild-every", "100"]
    index = {"hf": "forest", "hf-graph": "graph", "random": "random"}[head]
    if index != "random":
        args += ["--index", index, "--metric", "angular"]
    pipeline, prefetch = E2E_MODES[mode]
    with thread_server(*args) as addr:
        cfg = load_config(os.path.join(ROOT, "configs", "synthetic_hf.yaml"), [
            f"data.num_classes={K}", "data.samples_per_class=8", f"model.feature_dim={d}", "train.batch_size=64",
            f"train.steps={steps}", f"train.log_every={steps}", "train.progress=false", "data.val_identities=20",
            "data.val_pairs=40", "head.num_active=100", "head.cpk_every=0",
            f"head.name={'random' if index == 'random' else 'hf'}", f"head.index={index}", "store.kind=remote",
            f"store.address={addr}", f"store.pipeline={pipeline}", f"store.prefetch={prefetch}",
            f"train.out_dir={out}"])
        train(cfg)
    recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    last = [r for r in recs if r.get("event") == "train"][-1]
    step_ms = 1000.0 * cfg.train.batch_size / last["samples_per_s"]
    return {"wait_ms": last["ps_wait_ms"], "step_ms": step_ms, "frac": last["ps_wait_ms"] / step_ms,
            "ahead": last.get("planned_ahead_steps", 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="per rank")
    p.add_argument("--ranks", default="1,2,4,8")
    p.add_argument("--actives", default="10000,1000")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--e2e-steps", type=int, default=200, help="0: skip the end-to-end training part")
    p.add_argument("--e2e-heads", default="hf,hf-graph,random",
                   help="heads of the end-to-end part (hf: forest index, hf-graph: graph index, random)")
    p.add_argument("--e2e-repeats", type=int, default=2, help="end-to-end runs per (head, mode), interleaved")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    ranks = [int(x) for x in a.ranks.split(",")]
    spec = {"K": a.num_classes, "d": a.dim, "B": a.batch, "actives": [int(x) for x in a.actives.split(",")],
            "steps": a.steps, "warmup": a.warmup}
    table: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_multirank_") as tmp:
        for R in ranks:
            table += run_ranks(R, spec, tmp)
            for r in table[-len(spec["actives"]):]:
                print(f"R={r['R']} M={r['M']:6d}  server {r['server_ms']:8.2f} ms/step CPU "
                      f"({r['server_wall_ms']:8.2f} wall)  rows {r['rows']:8.0f}/step  "
                      f"exposed wait max {max(r['wait_ms']):8.2f} ms  step {max(r['step_ms']):8.2f} ms", flush=True)
        e2e: dict[tuple[str, str], list[dict[str, float]]] = {}
        heads = [h for h in a.e2e_heads.split(",") if h] if a.e2e_steps else []
        for rep in range(a.e2e_repeats if heads else 0):
            for head in heads:
                modes = list(E2E_MODES) if head == "random" else ["sync", "pipelined"]   # HF's plan needs features
                for mode in (modes if rep % 2 == 0 else modes[::-1]):      # interleaved: drift hits all alike
                    r = end_to_end(a.e2e_steps, head, mode, os.path.join(tmp, f"r{rep}"))
                    e2e.setdefault((head, mode), []).append(r)
                    print(f"end to end, tiny backbone, head={head} {mode}: exposed wait {r['wait_ms']:.2f} ms of a "
                          f"{r['step_ms']:.1f} ms step ({100 * r['frac']:.1f} %), planned ahead {r['ahead']} of the "
                          f"last {a.e2e_steps} steps", flush=True)
    M0 = spec["actives"][0]
    by = {(r["R"], r["M"]): r for r in table}
    lo, hi = min(ranks), max(ranks)
    kv = [f"K={a.num_classes}", f"M={M0}"]
    for R in ranks:
        kv += [f"server_ms_r{R}={by[(R, M0)]['server_ms']:.2f}", f"rows_r{R}={by[(R, M0)]['rows']:.0f}"]
    kv += [f"server_ratio_r{hi}_r{lo}={by[(hi, M0)]['server_ms'] / max(by[(lo, M0)]['server_ms'], 1e-9):.2f}",
           f"exposed_ms_r{hi}={max(by[(hi, M0)]['wait_ms']):.2f}", f"step_ms_r{hi}={max(by[(hi, M0)]['step_ms']):.1f}"]
    for M in spec["actives"][1:]:
        kv += [f"server_ratio_r{hi}_r{lo}_m{M}={by[(hi, M)]['server_ms'] / max(by[(lo, M)]['server_ms'], 1e-9):.2f}",
               f"rows_r{hi}_m{M}={by[(hi, M)]['rows']:.0f}"]
    for (head, mode), rs in e2e.items():      # medians over the repeats
        kv += [f"e2e_{head.replace('-', '_')}_{mode}_wait_frac={float(np.median([r['frac'] for r in rs])):.3f}",
               f"e2e_{head.replace('-', '_')}_{mode}_step_ms={float(np.median([r['step_ms'] for r in rs])):.1f}"]
    print_result(kv, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
