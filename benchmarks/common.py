"""Helpers shared by bench_head.py and bench_accuracy.py: per-method worker subprocesses with their
peak RSS, structured class rows in a store, and CPK measured exactly over all K in blocks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

WORKER_TAG = "WORKER_RESULT "


def peak_rss_mib(pid: Optional[int] = None) -> float:
    """Peak resident set size (VmHWM) of a process (default: this one) in MiB."""
    path = f"/proc/{pid or 'self'}/status"
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and all its descendants, in MiB (shared pages, e.g. a W in
    shared memory mapped by a build child, are counted once in total). 0 where /proc lacks it."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/smaps_rollup", encoding="ascii") as f:
                total += next((int(ln.split()[1]) for ln in f if ln.startswith("Pss:")), 0) / 1024.0
            with open(f"/proc/{p}/task/{p}/children", encoding="ascii") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


class PeakTreeMemory:
    """Samples :func:`tree_pss_mib` of ``pid`` every ``period_s`` in a thread; ``stop()`` returns the peak."""

    def __init__(self, pid: int, period_s: float = 0.5) -> None:
        import threading
        self.pid, self.period_s, self.peak = pid, period_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_mib(self.pid))
            self._stop.wait(self.period_s)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def rss_mib(pid: Optional[int] = None) -> float:
    """Current resident set size (VmRSS) in MiB."""
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def emit(result: dict[str, Any]) -> None:
    """Worker side: print the result as one tagged JSON line (the parent reads the last one)."""
    print(WORKER_TAG + json.dumps(result), flush=True)


def thread_env(threads: int) -> dict[str, str]:
    """Environment limiting OpenMP / BLAS threads (read by numpy, faiss and torch at import)."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    return env


def run_worker(script: str, spec: dict[str, Any], timeout: float = 1800.0, threads: int = 1) -> dict[str, Any]:
    """Run ``python script --worker JSON`` in a fresh process; return its tagged result dict.

    One method per process, so each peak RSS is that method's alone. A failed worker returns
    {"error": ...} instead of raising, so one method cannot sink the whole table. ``threads`` caps
    OpenMP/BLAS threads: on this shared 2-core machine two OpenMP threads spin at barriers when
    the cores are oversubscribed, and a head step then runs many times slower than on one thread
    (docs/benchmarks.md).
    """
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              env=thread_env(threads))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(WORKER_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"exit code {proc.returncode}: {tail}"}
    out = json.loads(lines[-1][len(WORKER_TAG):])
    out["wall_s"] = time.perf_counter() - t0
    return out


def family_rows(lo: int, hi: int, dim: int, family_size: int, spread: float, seed: int) -> np.ndarray:
    """Rows [lo, hi) of a K x d class matrix with families: class k belongs to family k // family_size;
    row = unit family centre + spread * own unit direction (so a family's members are each other's
    hard negatives). Rows depend on (seed, block start): fill_store always uses the same blocks."""
    fams = np.arange(lo // family_size, (hi - 1) // family_size + 1)
    centres = np.stack([np.random.default_rng([seed, 0, int(f)]).standard_normal(dim, dtype=np.float32)
                        for f in fams])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    own = np.random.default_rng([seed, 1, lo]).standard_normal((hi - lo, dim), dtype=np.float32)
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    ids = np.arange(lo, hi)
    return (centres[ids // family_size - fams[0]] + spread * own).astype(np.float32)


def fill_store(store: Any, K: int, dim: int, family_size: int = 20, spread: float = 1.0, seed: int = 0,
               block: int = 65536) -> None:
    """Overwrite W of a (local) store with :func:`family_rows`, block by block (no K x d temporary)."""
    for lo in range(0, K, block):
        hi = min(K, lo + block)
        store.set_rows(np.arange(lo, hi, dtype=np.int64), family_rows(lo, hi, dim, family_size, spread, seed))


def features_near(rows: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Features near their class rows (a partly trained model): unit row + noise / sqrt(d) per coordinate."""
    r = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return (r + noise / np.sqrt(rows.shape[1]) * rng.standard_normal(rows.shape, dtype=np.float32)).astype(np.float32)


def cpk_exact(rows_block, K: int, feats: np.ndarray, active: np.ndarray, M: int, scale: float,
              angular: bool = True, block: int = 65536, labels: Optional[np.ndarray] = None) -> dict[str, float]:
    """CPK of a selected active set, exactly over all K classes in blocks of rows.

    Args:
        rows_block: callable (lo, hi) -> rows [hi - lo, d] of W.
        feats: probe features [P, d]; active: the selected class ids [M'] (shared by the probe).
        M: size of the exact top-M set whose mass is the ceiling.
    Returns:
        cpk (mean mass of ``active``), cpk_topM (mean mass of the exact top-M, the ceiling), cpk_random
        (M / K, what a uniform set would get without labels), and, when ``labels`` are given,
        neg_cpk: the share of the non-label classes' mass that ``active`` keeps (labels are always
        selected, so CPK alone is dominated by p(label)), and p_label.
    Logits are eval logits: s * cos for angular heads, F W^T for plain ones.
    """
    F = feats.astype(np.float64)
    if angular:
        F = F / np.linalg.norm(F, axis=1, keepdims=True)
    P = F.shape[0]
    lse = np.full(P, -np.inf)
    best = np.empty((P, 0))
    act_sorted = np.sort(active)
    act_logits = []
    lab_logit = np.zeros(P)
    for lo in range(0, K, block):
        hi = min(K, lo + block)
        W = np.asarray(rows_block(lo, hi), dtype=np.float64)
        if angular:
            W = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
        s = scale * (F @ W.T)                                         # [P, blk]
        m = s.max(axis=1)
        lse = np.logaddexp(lse, m + np.log(np.exp(s - m[:, None]).sum(axis=1)))
        cat = np.concatenate([best, s], axis=1)
        k = min(M, cat.shape[1])
        best = np.partition(cat, cat.shape[1] - k, axis=1)[:, cat.shape[1] - k:]
        a = act_sorted[(act_sorted >= lo) & (act_sorted < hi)] - lo
        act_logits.append(s[:, a])
        if labels is not None:
            inb = (labels >= lo) & (labels < hi)
            lab_logit[inb] = s[np.flatnonzero(inb), labels[inb] - lo]
    A = np.concatenate(act_logits, axis=1)
    am = A.max(axis=1)
    a_lse = am + np.log(np.exp(A - am[:, None]).sum(axis=1))
    bm = best.max(axis=1)
    b_lse = bm + np.log(np.exp(best - bm[:, None]).sum(axis=1))
    out = {"cpk": float(np.exp(a_lse - lse).mean()), "cpk_topM": float(np.exp(b_lse - lse).mean()),
           "cpk_random": M / K}
    if labels is not None:
        p_lab = np.exp(lab_logit - lse)
        mass = np.exp(a_lse - lse)
        out["p_label"] = float(p_lab.mean())
        out["neg_cpk"] = float(np.mean((mass - p_lab) / np.maximum(1.0 - p_lab, 1e-12)))
        top = np.exp(b_lse - lse)
        out["neg_cpk_topM"] = float(np.mean(np.clip(top - p_lab, 0, None) / np.maximum(1.0 - p_lab, 1e-12)))
    return out


def print_result(kv: list[str], t_start: float) -> None:
    """Close a benchmark: its total run time, then the one ``RESULT key=value ...`` line."""
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    print("RESULT " + " ".join(kv + [f"total_s={total:.0f}"]))


def median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs))) if xs else float("nan")
