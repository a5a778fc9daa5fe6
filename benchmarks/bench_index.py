"""Class-index benchmark for HF-softmax's active-class selection (Zhang et al., AAAI 2018).

Part 1, per index (exact, forest = Annoy 50 trees, hnsw, ivf, random) on clustered rows W [K, d]:
build time, query time for a batch (B = 256, n = 50), recall@n against Exact, CPK (the softmax
probability mass of the M = 1000 selected classes, the paper's quality measure), negCPK (the share
of the non-label classes' mass kept, since labels are always selected) and, for IVF, the
per-step update cost of 1000 changed rows. Exact's CPK is the ceiling for a given M, random's the
Partial-FC style floor.

Part 2, rebuild cost: a simulated training loop (~20 ms of numpy work per step on the main thread,
plus the store's side of a step: update M rows, forward them to the index, query + select_active)
runs with background rebuilds off, then on (rebuild_every = 1: a new build starts as soon as the
previous one is swapped in -- the worst case), then off again (the 'on' phase lasts until a background build has been swapped in); cost =
1 - steps/s(on) / mean
steps/s(off), per index, all in one run. The trainer's BLAS runs on one thread so that on this
2-core machine the build has the other core (as when the trainer's work is on a GPU).

Default: K = 100000, d = 512.  `python benchmarks/bench_index.py --k 1000000` for the 1M case
(`--indexes forest,ivf --skip-rebuild` keeps that to the build-time comparison).
Ends with one line: RESULT key=value ...
"""
from __future__ import annotations

import os

# The simulated trainer uses one BLAS thread (set before numpy loads its BLAS).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Tuple  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from paramserver.index import IndexManager, make_index, select_active  # noqa: E402

logger = logging.getLogger(__name__)


def clustered_rows(K: int, d: int, seed: int) -> np.ndarray:
    """W [K, d]: K / 20 cluster centres, each row = centre + noise of the same norm (related
    identities share a direction, but the within-cluster spread is as large as the centre)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, K // 20), d), dtype=np.float32)
    W = rng.standard_normal((K, d), dtype=np.float32)
    W += centres[rng.integers(0, centres.shape[0], K)]
    return W


def batch_near(W: np.ndarray, B: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Features near their class rows (labels = those rows), like a partly trained model."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, W.shape[0], B)
    F = W[labels] + 0.7 * rng.standard_normal((B, W.shape[1]), dtype=np.float32)
    return F.astype(np.float32), labels.astype(np.int64)


def exact_probs(W: np.ndarray, F: np.ndarray, scale: float, block: int = 65536) -> np.ndarray:
    """Softmax over all K classes of s * cos(f, w) (a normalized head), [B, K] float32."""
    Fn = F / np.linalg.norm(F, axis=1, keepdims=True)
    logits = np.empty((F.shape[0], W.shape[0]), dtype=np.float32)
    for i in range(0, W.shape[0], block):
        Wb = W[i:i + block]
        logits[:, i:i + block] = scale * (Fn @ (Wb / np.linalg.norm(Wb, axis=1, keepdims=True)).T)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def recall(ids: np.ndarray, ref: np.ndarray) -> float:
    hits = [np.intersect1d(a[a >= 0], b).size for a, b in zip(ids, ref)]
    return float(np.mean(hits)) / ref.shape[1]


def timed(fn, reps: int) -> float:
    """Median wall time of fn() over reps calls, in seconds."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def part1(W: np.ndarray, names: List[str], args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    K, d = W.shape
    F, labels = batch_near(W, args.batch, seed=1)
    P = exact_probs(W, F, args.scale)  # [B, K]
    rng = np.random.default_rng(0)
    out: Dict[str, Dict[str, float]] = {}
    ref_ids = None
    for name in ["exact"] + [n for n in names if n != "exact"]:
        index = make_index(name, d, "angular", seed=0)
        t0 = time.perf_counter()
        index.build(W)
        build_s = time.perf_counter() - t0
        ids, scores = index.query(F, args.n)
        query_s = timed(lambda: index.query(F, args.n), reps=3)
        if name == "exact":
            ref_ids = ids
        active, _ = select_active(ids, scores, labels, args.m, K, rng)
        select_s = timed(lambda: select_active(ids, scores, labels, args.m, K, rng), reps=5)
        mass = P[:, active].sum(axis=1)  # [B] softmax mass of the batch's shared active set
        p_lab = P[np.arange(len(labels)), labels]
        cpk = float(mass.mean())
        # The labels are always active, so CPK alone is dominated by p(label); the share of the
        # negative classes' mass that the selection keeps is what separates the indexes.
        neg = float(np.mean((mass - p_lab) / np.maximum(1.0 - p_lab, 1e-12)))
        row = {"build_s": build_s, "query_ms": 1e3 * query_s, "recall": recall(ids, ref_ids),
               "cpk": cpk, "neg_cpk": neg, "select_ms": 1e3 * select_s}
        if index.incremental:
            upd_rng = np.random.default_rng(2)
            upd_ids = upd_rng.choice(K, args.m, replace=False)
            upd_rows = W[upd_ids] + 0.01 * upd_rng.standard_normal((args.m, d), dtype=np.float32)
            row["update_ms"] = 1e3 * timed(lambda: index.update(upd_ids, upd_rows), reps=5)
        out[name] = row
        extra = f" update({args.m} rows)={row['update_ms']:.2f}ms" if "update_ms" in row else ""
        print(f"{name:7s} build={build_s:7.2f}s query(B={args.batch},n={args.n})={row['query_ms']:8.2f}ms "
              f"recall@{args.n}={row['recall']:.3f} CPK(M={args.m})={cpk:.4f} negCPK={neg:.4f} "
              f"select={row['select_ms']:.2f}ms{extra}", flush=True)
        del index
    return out


class _Store:
    """The store's side of the loop: live W rows that change every step."""

    def __init__(self, W: np.ndarray) -> None:
        self.W = W
        self.num_classes, self.dim = W.shape

    def weights(self) -> np.ndarray:
        return self.W


def _calibrate_work(target_s: float) -> Tuple[np.ndarray, np.ndarray, int]:
    """Matrices and a repeat count so that `reps` matmuls take ~target_s on one thread."""
    A = np.random.default_rng(0).standard_normal((256, 512), dtype=np.float32)
    Bm = np.random.default_rng(1).standard_normal((512, 1024), dtype=np.float32)
    one = timed(lambda: A @ Bm, reps=20)
    return A, Bm, max(1, int(round(target_s / one)))


def _loop(store: _Store, mgr: IndexManager, seconds: float, step0: int, work, args) -> Tuple[float, int]:
    """Run simulated steps for `seconds`; returns (steps/s, last step)."""
    rng = np.random.default_rng(step0)
    K, d = store.W.shape
    F, labels = batch_near(store.W, args.batch, seed=step0)
    step, t0 = step0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        work()  # the trainer's ~20 ms
        ids, scores = mgr.query(F, args.n)
        active, _ = select_active(ids, scores, labels, args.m, K, rng)
        # push: the M active rows change (sorted unique ids, like the store's update)
        rows = np.sort(active)
        store.W[rows] -= 0.01 * store.W[rows]
        step += 1
        mgr.rows_changed(rows, store.W[rows], step)
        mgr.maybe_rebuild(store, step)
    return (step - step0) / (time.perf_counter() - t0), step


def part2(W: np.ndarray, names: List[str], args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    try:
        import faiss
        faiss.omp_set_num_threads(1)  # the trainer's thread (IVF queries) uses one core too
    except ImportError:  # pragma: no cover
        pass
    A, Bm, reps = _calibrate_work(args.step_ms / 1e3)

    def work() -> None:
        for _ in range(reps):
            A @ Bm

    print(f"\nrebuild cost: simulated step = {reps} x (256x512 @ 512x1024) "
          f"~{1e3 * timed(work, 5):.1f} ms + query/select/update; phases off {args.phase_s:.0f}s, "
          f"on {2 * args.phase_s:.0f}s, off {args.phase_s:.0f}s", flush=True)
    out: Dict[str, Dict[str, float]] = {}
    for name in names:
        store = _Store(W.copy())
        mgr_off = IndexManager(lambda: make_index(name, W.shape[1], "angular", seed=0), rebuild_every=10**12)
        mgr_off.build_now(store.W, step=0)
        sps_a, step = _loop(store, mgr_off, args.phase_s, 0, work, args)
        mgr_on = IndexManager(lambda: make_index(name, W.shape[1], "angular", seed=0), rebuild_every=1)
        mgr_on.build_now(store.W, step=step)
        # 'on' runs at least 2 x phase_s and until one background build has been swapped in
        # (capped at --max-on-s), so the window really contains rebuild work from start to swap.
        t_on, steps_on, step_on = 0.0, 0, step
        while t_on < 2 * args.phase_s or (mgr_on.stats()["builds"] < 2 and t_on < args.max_on_s):
            t0 = time.perf_counter()
            _, s_new = _loop(store, mgr_on, 2.0, step_on, work, args)
            t_on += time.perf_counter() - t0
            steps_on += s_new - step_on
            step_on = s_new
        sps_on = steps_on / t_on
        st = mgr_on.stats()
        mgr_on.close()
        sps_b, _ = _loop(store, mgr_off, args.phase_s, step_on, work, args)
        mgr_off.close()
        sps_off = 0.5 * (sps_a + sps_b)
        cost = 1.0 - sps_on / sps_off
        out[name] = {"sps_off": sps_off, "sps_on": sps_on, "cost": cost,
                     "bg_builds": st["builds"] - 1, "bg_build_s": st["mean_build_s"],
                     "period_steps": st["achieved_period_steps"], "staleness": st["staleness_steps"]}
        print(f"{name:7s} steps/s off={sps_a:.1f}/{sps_b:.1f} on={sps_on:.1f} ({t_on:.0f}s) cost={100 * cost:+.1f}% "
              f"background builds done={st['builds'] - 1} (mean {st['mean_build_s']:.1f}s incl. first) "
              f"achieved period={st['achieved_period_steps']:.0f} steps staleness at end="
              f"{st['staleness_steps']} steps", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=100_000, help="number of classes K")
    parser.add_argument("--d", type=int, default=512, help="feature dim d")
    parser.add_argument("--batch", type=int, default=256, help="batch size B")
    parser.add_argument("--n", type=int, default=50, help="candidates per feature")
    parser.add_argument("--m", type=int, default=1000, help="active classes M")
    parser.add_argument("--scale", type=float, default=30.0, help="softmax scale s for CPK (s * cos)")
    parser.add_argument("--indexes", default="exact,forest,hnsw,ivf,random", help="comma list for part 1")
    parser.add_argument("--rebuild-indexes", default="forest,ivf", help="comma list for part 2")
    parser.add_argument("--phase-s", type=float, default=10.0, help="seconds per 'off' phase ('on' = 2x)")
    parser.add_argument("--max-on-s", type=float, default=180.0, help="cap on the 'on' phase")
    parser.add_argument("--step-ms", type=float, default=20.0, help="simulated trainer work per step")
    parser.add_argument("--skip-rebuild", action="store_true", help="skip part 2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    W = clustered_rows(args.k, args.d, seed=0)
    print(f"K={args.k} d={args.d} clustered rows generated in {time.perf_counter() - t0:.1f}s; "
          f"metric=angular, B={args.batch}, n={args.n}, M={args.m}, CPK scale s={args.scale}", flush=True)
    res = part1(W, args.indexes.split(","), args)
    reb = {} if args.skip_rebuild else part2(W, args.rebuild_indexes.split(","), args)

    kv = [f"K={args.k}", f"d={args.d}"]
    for name, row in res.items():
        kv += [f"{name}_build_s={row['build_s']:.2f}", f"{name}_query_ms={row['query_ms']:.1f}",
               f"{name}_recall={row['recall']:.3f}", f"{name}_cpk={row['cpk']:.4f}",
               f"{name}_negcpk={row['neg_cpk']:.4f}"]
        if "update_ms" in row:
            kv.append(f"{name}_update_ms={row['update_ms']:.2f}")
    kv.append(f"select_ms={res['exact']['select_ms']:.2f}")
    for name, row in reb.items():
        kv += [f"{name}_rebuild_cost={row['cost']:.3f}", f"{name}_bg_builds={row['bg_builds']}",
               f"{name}_staleness={row['staleness']}"]
    print("RESULT " + " ".join(kv))


if __name__ == "__main__":
    main()
