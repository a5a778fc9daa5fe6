"""Accuracy of HF-softmax (Zhang et al., AAAI 2018) beside full softmax, random sampling, MACH and
RP-softmax, on a feature-level synthetic identity task with families (hard negatives), same data,
same backbone init, same steps and seeds for every method.

    .venv/bin/python benchmarks/bench_accuracy.py             # default: K = 100K (see below)
    .venv/bin/python benchmarks/bench_accuracy.py --quick     # K = 5K, 150 steps
    .venv/bin/python benchmarks/bench_accuracy.py --data data/shapes data.flip=false   # your own data

``--data PATH [key=value ...]``: the same comparison on a user's dataset (an image list, a rec2img
or class folder, a features file), through ``hfsoftmax.train`` with ``--config`` (default
configs/small_data_hf.yaml) and the overrides given: full softmax with the selective heads'
classifier rule (``head.name=full store.kind=sharded``: the fair baseline, README "Comparing heads
fairly"), HF-softmax and random sampling at the same M (``--m``, default max(1 % of K, 2 x batch)), each trained for
``--steps`` from the same seed, then top-1 / top-5 over all K on the held-out list (``data.val_path``,
or the ``val_list.txt`` beside ``data.path``), wall time and samples/s. ``tools/make_shapes.py``
renders a real-like dataset of up to 2496 classes to try it on.

The task. K identities in families (default 1000 families x 100 members): identity code
z_k = normalize(u_f + spread * v_k) in R^c (u_f the family centre, v_k the member's own direction,
both unit Gaussian directions), so the members of a family are each other's hard negatives. A
sample of identity k is z_k plus nuisance (Gaussian, norm ~ ``nuisance``), passed through a fixed
random nonlinear "renderer" x = tanh(gain * A z) + pixel noise (A [D, c] fixed). Every step draws a
fresh batch of B samples of uniformly random identities from one seeded generator, so all methods
see the same stream. Backbone: a small MLP (D -> 256 -> d, BN + ReLU), same init for all methods,
SGD with momentum; the classifier of each head is trained with the same SGD settings (for HF and
random sampling inside the parameter store, row-sparse).

Heads (CosFace logits s = 30, m = 0.2 for full/HF/random; the HF index metric is angular):
full softmax; HF-softmax with the forest (Annoy), with IVF and with the class-neighbour graph
(background rebuilds every ``rebuild_every`` steps; IVF and graph also take the pushed rows each
step); random sampling at the same M = 1% of K; MACH (R = 16, default B) and RP-softmax (m = 32 of
d), whose heads carry no margin. The store's rows use ``--sparse-momentum`` (default "unrolled", the
training default; "lazy" = torch.optim.SGD on the touched rows, see paramserver/optim.py).

Reported, per method: top-1 over all K on held-out samples of training identities; 10-fold
verification accuracy (hfsoftmax.eval.verification.evaluate) on pairs of held-out identities (new
members of the training families: half of the negative pairs from the same family, half from
different families); ms/step (backbone + head, training only); classifier memory (K x d for the
full-matrix heads, whether it lives in the trainer or in the store; MACH R*B*d; RP K*m); the
trainer's peak RSS; for HF the index build time, achieved rebuild period and staleness, and CPK
(mass of the selected set) at the end.

Default: K = 100000, d = 64, B = 256, 600 steps (each identity is seen ~1.5 times: a short
schedule, chosen so that full softmax, by far the slowest method on CPU, fits), M = 1000 (= 1% of
K; at small K, M = max(K / 100, 2 B) so that a batch's labels fit). Every method runs in its own
subprocess, one after another; full softmax takes the largest share of the run time (run times
measured so far: docs/benchmarks.md). Ends with exactly one ``RESULT key=value ...`` line.
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
from common import cpk_exact, emit, peak_rss_mib, print_result, run_worker  # noqa: E402

SCRIPT = os.path.abspath(__file__)
logger = logging.getLogger("bench_accuracy")


# --------------------------------------------------------------------------------------------- #
# The synthetic task.

class IdentityTask:
    """Identity codes with families and a fixed nonlinear renderer (see the module docstring).

    Args:
        num_families, family_size: K = num_families * family_size training identities.
        holdout_per_family: extra members per family, never trained on (verification identities).
        code_dim, input_dim: c and D.
    """

    def __init__(self, num_families: int, family_size: int, holdout_per_family: int = 4, code_dim: int = 32,
                 input_dim: int = 64, spread: float = 0.7, nuisance: float = 0.35, gain: float = 1.5,
                 pixel_noise: float = 0.05, seed: int = 0) -> None:
        rng = np.random.default_rng([seed, 7])
        self.F, self.S, self.H = num_families, family_size, holdout_per_family
        self.K = num_families * family_size
        self.c, self.D = code_dim, input_dim
        self.nuisance, self.gain, self.pixel_noise = nuisance, gain, pixel_noise
        u = _unit(rng.standard_normal((num_families, code_dim), dtype=np.float32))
        members = family_size + holdout_per_family
        v = _unit(rng.standard_normal((num_families, members, code_dim), dtype=np.float32))
        z = _unit(u[:, None, :] + spread * v)                                     # [F, S + H, c]
        self.codes = np.ascontiguousarray(z[:, :family_size].reshape(-1, code_dim))   # [K, c], id = f*S + j
        self.held = np.ascontiguousarray(z[:, family_size:])                      # [F, H, c]
        self.A = rng.standard_normal((code_dim, input_dim), dtype=np.float32)     # renderer

    def render(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Samples [n, D] of codes z [n, c] with fresh nuisance."""
        zn = z + self.nuisance / np.sqrt(self.c) * rng.standard_normal(z.shape, dtype=np.float32)
        x = np.tanh(self.gain * zn @ self.A)
        return (x + self.pixel_noise * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)

    def batch(self, rng: np.random.Generator, B: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, self.K, B).astype(np.int64)
        return self.render(self.codes[y], rng), y

    def verification_pairs(self, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [2N, D], issame [N]) over held-out identities: N/2 positive pairs (two samples of
        one identity), N/4 negatives from the same family, N/4 from different families."""
        rng = np.random.default_rng([seed, 11])
        F, H = self.F, self.H
        n_pos, n_same = n_pairs // 2, n_pairs // 4
        n_diff = n_pairs - n_pos - n_same
        f = rng.integers(0, F, n_pos)
        h = rng.integers(0, H, n_pos)
        pa, pb = self.held[f, h], self.held[f, h]
        f2 = rng.integers(0, F, n_same)
        h1 = rng.integers(0, H, n_same)
        h2 = (h1 + rng.integers(1, H, n_same)) % H
        sa, sb = self.held[f2, h1], self.held[f2, h2]
        f3 = rng.integers(0, F, n_diff)
        f4 = (f3 + rng.integers(1, F, n_diff)) % F
        da, db = self.held[f3, rng.integers(0, H, n_diff)], self.held[f4, rng.integers(0, H, n_diff)]
        a = np.concatenate([pa, sa, da])
        b = np.concatenate([pb, sb, db])
        xa, xb = self.render(a, rng), self.render(b, rng)
        x = np.empty((2 * n_pairs, self.D), dtype=np.float32)
        x[0::2], x[1::2] = xa, xb
        issame = np.concatenate([np.ones(n_pos, bool), np.zeros(n_same + n_diff, bool)])
        return x, issame


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_backbone(D: int, d: int, hidden: int = 256) -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(D, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, d), nn.BatchNorm1d(d))


# --------------------------------------------------------------------------------------------- #
# One method, in its own process.

def train_eval(spec: dict[str, Any]) -> dict[str, Any]:
    """Train backbone + head ``spec['method']`` and evaluate; returns the row of the table."""
    import torch

    from hfsoftmax.eval.verification import evaluate
    from hfsoftmax.heads import FullSoftmax

    method, seed = spec["method"], spec["seed"]
    task = IdentityTask(spec["families"], spec["family_size"], seed=seed)
    K, d, B, M = task.K, spec["d"], spec["batch"], spec["m"]
    torch.manual_seed(seed)
    backbone = make_backbone(task.D, d)
    torch.manual_seed(seed + 1)
    store = manager = None
    extra: dict[str, Any] = {}
    if method == "full":
        head = FullSoftmax(K, d, margin="cosface", scale=spec["scale"], margin_m=spec["margin_m"])
        cls_mib = K * d * 4 / 2**20
    elif method in ("hf-forest", "hf-ivf", "hf-graph", "hf-exact", "random"):
        from paramserver.index import IndexManager, make_index
        from paramserver.store import WeightStore
        from hfsoftmax.heads.selective import SelectiveSoftmax

        index = "random" if method == "random" else method.split("-")[1]
        store = WeightStore(K, d, init="normal", init_std=0.01, seed=seed, momentum=0.9,
                            weight_decay=spec["weight_decay"], sparse_momentum=spec["sparse_momentum"])
        if index != "random":
            manager = IndexManager(lambda: make_index(index, d, "angular", seed=seed), rebuild_every=spec["rebuild_every"])
            t0 = time.perf_counter()
            manager.build_now(store.rows_view(), step=0)
            extra["first_build_s"] = time.perf_counter() - t0
            store.attach_index(manager)
        head = SelectiveSoftmax(store, K, d, M, margin="cosface", scale=spec["scale"], margin_m=spec["margin_m"],
                                index=index, candidates=spec["candidates"], rebuild_every=spec["rebuild_every"],
                                seed=seed, rank=0, world_size=1)
        cls_mib = K * d * 4 / 2**20
    elif method == "mach":
        from hfsoftmax.heads.mach import MachHead, default_num_buckets

        R = 16
        head = MachHead(K, d, R, default_num_buckets(K, R), seed=seed)
        cls_mib = sum(p.numel() * 4 for p in head.parameters()) / 2**20
        extra["desc"] = f"R={R},B={default_num_buckets(K, R)}"
    elif method == "rp":
        from hfsoftmax.heads.rp import RPSoftmax

        head = RPSoftmax(K, d, spec["rp_m"], seed=seed)
        cls_mib = sum(p.numel() * 4 for p in head.parameters() if p.requires_grad) / 2**20
        extra["desc"] = f"m={spec['rp_m']}"
    else:
        raise ValueError(f"unknown method {method}")
    params = list(backbone.parameters()) + [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=spec["lr"], momentum=0.9, weight_decay=spec["weight_decay"])
    steps = spec["steps"]

    def lr_at(s: int) -> float:  # linear warm-up over 5%, then cosine to 0
        w = max(1, steps // 20)
        if s < w:
            return spec["lr"] * (s + 1) / w
        return spec["lr"] * 0.5 * (1 + np.cos(np.pi * (s - w) / max(1, steps - w)))

    rng = np.random.default_rng([seed, 3])  # the data stream: the same for every method
    backbone.train()
    head.train()
    train_s = 0.0
    losses = []
    for s in range(steps):
        x, y = task.batch(rng, B)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        lr = lr_at(s)
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr
        if store is not None:
            head.begin_step(s, lr)
        feats = backbone(xt)
        loss = head(feats, yt)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}: non-finite loss at step {s}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if store is not None:
            head.end_step(s)
        train_s += time.perf_counter() - t0
        losses.append(float(loss.detach()))
    out: dict[str, Any] = {"ms_per_step": 1e3 * train_s / steps, "final_loss": float(np.mean(losses[-50:])),
                           "classifier_mib": cls_mib, **extra}
    if manager is not None:
        st = manager.stats()
        out.update(builds=st["builds"], mean_build_s=st["mean_build_s"], period_steps=st["achieved_period_steps"],
                   period_s=st["achieved_period_s"], staleness=st["staleness_steps"], since_build=st["steps_since_build"])
        live = manager.index
        if getattr(live, "queries", 0):  # graph: share of samples searched from the feature (cold label rows)
            out["cold_frac"] = live.cold_queries / live.queries
    backbone.eval()
    head.eval()
    erng = np.random.default_rng([seed, 5])
    with torch.no_grad():
        # CPK of the selection at the end of training, on a probe batch (HF and random).
        if store is not None:
            x, y = task.batch(erng, B)
            f = backbone(torch.from_numpy(x))
            active, _ = head.select(f.numpy(), y, M)
            rows = store.rows_view()
            out.update(cpk_exact(lambda lo, hi: rows[lo:hi], K, f.numpy()[:64], active, M, spec["scale"],
                                 labels=y[:64]))
        # top-1 on held-out samples of training identities
        n_eval = spec["eval_samples"]
        y = erng.choice(K, n_eval, replace=n_eval > K)
        hits = 0
        for lo in range(0, n_eval, 1024):
            xs = task.render(task.codes[y[lo:lo + 1024]], erng)
            _, top = head.topk(backbone(torch.from_numpy(xs)), 1, block_size=16384)
            hits += int((top[:, 0].numpy() == y[lo:lo + 1024]).sum())
        out["top1"] = hits / n_eval
        xv, issame = task.verification_pairs(spec["pairs"], seed)
        emb = torch.cat([backbone(torch.from_numpy(xv[lo:lo + 4096])) for lo in range(0, len(xv), 4096)]).numpy()
        ver = evaluate(emb, issame)
        out["verif"] = float(ver["accuracy"])
        out["verif_std"] = float(ver["accuracy_std"])
    if manager is not None:
        manager.close()
    out["peak_rss_mib"] = peak_rss_mib()
    return out


METHODS = ("full", "hf-forest", "hf-ivf", "hf-graph", "random", "mach", "rp")


def sweep_m(args: Any, spec: dict[str, Any], K: int, fractions: list[float], t_start: float) -> int:
    """Top-1 and verification against M/K for HF and random sampling, full softmax as the ceiling."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from plot_metrics import line_plot

    full = run_worker(SCRIPT, dict(spec, method="full"), timeout=7200, threads=args.threads)
    curves: dict[str, list[tuple[float, float, float]]] = {"hf-graph": [], "random": []}
    for frac in fractions:
        M = max(int(round(frac * K)), spec["batch"])          # every label of a batch must fit
        for method in curves:
            r = run_worker(SCRIPT, dict(spec, method=method, m=M), timeout=7200, threads=args.threads)
            if "error" in r:
                logger.error("%s at M=%d failed: %s", method, M, r["error"])
                continue
            curves[method].append((M / K, r["top1"], r["verif"]))
            logger.info("M/K=%.4f %s: top1 %.4f verif %.4f", M / K, method, r["top1"], r["verif"])
    kv = [f"K={K}", f"steps={args.steps}"]
    series = {0: [], 1: []}
    for method, pts in curves.items():
        for i in (0, 1):
            series[i].append((method, [100 * p[0] for p in pts], [100 * p[1 + i] for p in pts]))
        kv += [f"{method.replace('-', '_')}_top1_at_{100 * p[0]:g}pct={p[1]:.4f}" for p in pts]
    if "error" not in full:
        xs = [100 * min(fractions), 100 * max(fractions)]
        series[0].append(("full softmax", xs, [100 * full["top1"]] * 2))
        series[1].append(("full softmax", xs, [100 * full["verif"]] * 2))
        kv += [f"full_top1={full['top1']:.4f}", f"full_verif={full['verif']:.4f}"]
    stem, ext = os.path.splitext(args.sweep_out)
    line_plot(f"{stem}_top1{ext or '.png'}", f"top-1 (%) vs M/K, K={K}, {args.steps} steps", series[0],
              xlabel="M / K (%)")
    line_plot(f"{stem}_verif{ext or '.png'}", f"10-fold verification (%) vs M/K, K={K}, {args.steps} steps", series[1],
              xlabel="M / K (%)")
    print(f"wrote {stem}_top1{ext or '.png'} and {stem}_verif{ext or '.png'} (x: M/K in %)")
    print_result(kv, t_start)
    return 0


DATA_METHODS = {"full": ["head.name=full", "store.kind=sharded"],        # the store's rule at M = K
                "full-torch": ["head.name=full", "store.kind=local"],     # W a torch parameter (dense SGD)
                "hf": ["head.name=hf", "store.kind=local"],
                "random": ["head.name=random", "store.kind=local"]}


def data_compare(args: argparse.Namespace, overrides: list[str], t_start: float) -> int:
    """--data: full / HF / random through hfsoftmax.train on a user's dataset; top-k on its held-out list."""
    import subprocess
    import tempfile

    root = os.path.dirname(os.path.dirname(SCRIPT))
    sys.path.insert(0, root)
    from hfsoftmax.config import load_config
    from hfsoftmax.launch import num_classes_of

    base = [f"data.path={os.path.abspath(args.data)}", f"train.steps={args.data_steps}", "train.eval_every=0",
            "train.progress=false", f"train.seed={args.seed}", *overrides]
    cfg = load_config(args.config, base)
    K = num_classes_of(cfg)
    M = min(K, args.m or max(K // 100, 2 * cfg.train.batch_size))   # a batch's labels fit, with room
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_accuracy_data_") as tmp:
        for method in [m for m in args.data_methods.split(",") if m]:
            if method not in DATA_METHODS:
                print(f"error: --data-methods: unknown '{method}' (choose from {', '.join(DATA_METHODS)})",
                      file=sys.stderr)
                return 2
            out = os.path.join(tmp, method)
            cmd = [sys.executable, "-m", "hfsoftmax.train", "--config", args.config, *base, *DATA_METHODS[method],
                   f"head.num_active={M}", f"train.out_dir={out}"]
            logger.info("%s: %s", method, " ".join(cmd[3:]))
            r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"error: {method} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}",
                      file=sys.stderr)
                return 1
            recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
            ev = [x for x in recs if x.get("event") == "eval" and "val_top1" in x]
            done = [x for x in recs if x.get("event") == "done"][-1]
            if not ev:
                print(f"error: {method}: no held-out list was evaluated (give data.val_path=...)", file=sys.stderr)
                return 1
            rows[method] = {"top1": ev[-1]["val_top1"], "top5": ev[-1]["val_top5"], "sps": done["samples_per_s"],
                            "wall": done["wall_s"]}
            logger.info("%s: top-1 %.4f top-5 %.4f, %.0f samples/s", method, rows[method]["top1"],
                        rows[method]["top5"], rows[method]["sps"])
    print(f"\n{args.data}: K={K}, M={M} ({100 * M / K:.1f} %), {args.data_steps} steps, config {args.config}")
    print(f"{'method':<12}{'top-1':>8}{'top-5':>8}{'samples/s':>11}{'wall s':>8}")
    kv = [f"K={K}", f"M={M}", f"steps={args.data_steps}"]
    for name, r in rows.items():
        print(f"{name:<12}{r['top1']:>8.4f}{r['top5']:>8.4f}{r['sps']:>11.0f}{r['wall']:>8.0f}")
        tag = name.replace("-", "_")
        kv += [f"{tag}_top1={r['top1']:.4f}", f"{tag}_top5={r['top5']:.4f}", f"{tag}_sps={r['sps']:.0f}"]
    if "hf" in rows and "random" in rows:
        kv.append(f"hf_minus_random_top1={100 * (rows['hf']['top1'] - rows['random']['top1']):+.2f}pt")
    print_result(kv, t_start)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="accuracy: full softmax vs HF-softmax vs random sampling vs MACH vs RP")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--families", type=int, default=1000)
    ap.add_argument("--family-size", type=int, default=100)
    ap.add_argument("--d", type=int, default=64, help="feature dim")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--m", type=int, default=0, help="active classes M (0: max(1%% of K, 2 B))")
    ap.add_argument("--candidates", type=int, default=16, help="index candidates per feature (HF)")
    ap.add_argument("--rebuild-every", type=int, default=50, help="index rebuild period T (HF)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--sparse-momentum", default="unrolled", choices=["lazy", "unrolled"],
                    help="momentum of the store rows (HF, random; paramserver/optim.py)")
    ap.add_argument("--scale", type=float, default=30.0)
    ap.add_argument("--margin-m", type=float, default=0.2)
    ap.add_argument("--rp-m", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=10000)
    ap.add_argument("--pairs", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP/BLAS threads per worker")
    ap.add_argument("--quick", action="store_true", help="K = 5K (50 x 100), 150 steps")
    ap.add_argument("--sweep-m", default="", metavar="FRACTIONS",
                    help="e.g. 0.005,0.01,0.02,0.05: HF (graph) and random sampling at each M = fraction x K, "
                         "full softmax once; writes --sweep-out (the paper's accuracy-vs-M figure)")
    ap.add_argument("--sweep-out", default="accuracy_vs_m.png", help="the PNG of --sweep-m (top-1 and verification)")
    ap.add_argument("--data", default="", help="a dataset (list, folder, features): full / HF / random through "
                                               "hfsoftmax.train; key=value overrides may follow")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(SCRIPT)), "configs",
                                                     "small_data_hf.yaml"), help="--data: the training config")
    ap.add_argument("--data-steps", type=int, default=2000, help="--data: steps per method")
    ap.add_argument("--data-methods", default="full,hf,random", help=f"--data: of {', '.join(DATA_METHODS)}")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad or (overrides and not args.data):
        ap.error(f"unrecognized arguments: {' '.join(bad or overrides)} (key=value overrides go with --data)")
    if args.worker:
        logging.basicConfig(level=logging.WARNING)
        emit(train_eval(json.loads(args.worker)))
        return 0
    if args.quick:
        args.families, args.steps, args.eval_samples, args.pairs = 50, 150, 2000, 2000
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    K = args.families * args.family_size
    M = args.m or max(K // 100, 2 * args.batch)
    spec = {"families": args.families, "family_size": args.family_size, "d": args.d, "batch": args.batch,
            "steps": args.steps, "m": M, "candidates": args.candidates, "rebuild_every": args.rebuild_every,
            "lr": args.lr, "weight_decay": args.weight_decay, "sparse_momentum": args.sparse_momentum,
            "scale": args.scale, "margin_m": args.margin_m,
            "rp_m": args.rp_m, "eval_samples": args.eval_samples, "pairs": args.pairs, "seed": args.seed}
    t_start = time.perf_counter()
    if args.data:
        return data_compare(args, overrides, t_start)
    if args.sweep_m:
        return sweep_m(args, spec, K, [float(x) for x in args.sweep_m.split(",") if x], t_start)
    rows: dict[str, dict[str, Any]] = {}
    for method in [m for m in args.methods.split(",") if m]:
        logger.info("%s ...", method)
        r = run_worker(SCRIPT, dict(spec, method=method), timeout=7200, threads=args.threads)
        rows[method] = r
        if "error" in r:
            logger.error("%s failed: %s", method, r["error"])
        else:
            logger.info("%s: top1 %.4f verif %.4f %.1f ms/step (%.0f s)", method, r["top1"], r["verif"],
                        r["ms_per_step"], r["wall_s"])
    full = rows.get("full", {})
    print(f"\nK={K} ({args.families} families x {args.family_size}), d={args.d}, B={args.batch}, {args.steps} steps, "
          f"M={M}, CosFace s={args.scale} m={args.margin_m}, seed {args.seed}")
    print(f"{'method':<11}{'top-1':>8}{'verif':>8}{'+-':>7}{'ms/step':>9}{'cls MiB':>9}{'RSS MiB':>9}"
          f"{'CPK':>8}{'negCPK':>8}{'builds':>7}{'period':>8}{'stale':>6}  loss")
    kv = [f"K={K}", f"d={args.d}", f"steps={args.steps}", f"M={M}"]
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<11} FAILED: {r['error'][:300]}")
            continue

        def g(k: str, nd: int = 4) -> str:
            v = r.get(k)
            return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else (
                f"{v:.{nd}f}" if isinstance(v, float) else str(v))

        print(f"{name:<11}{r['top1']:>8.4f}{r['verif']:>8.4f}{r['verif_std']:>7.3f}{r['ms_per_step']:>9.1f}"
              f"{r['classifier_mib']:>9.1f}{r['peak_rss_mib']:>9.0f}{g('cpk'):>8}{g('neg_cpk'):>8}{g('builds'):>7}"
              f"{g('period_steps', 0):>8}{g('staleness'):>6}  {r['final_loss']:.3f} {r.get('desc', '')}"
              + (f" (cold {r['cold_frac']:.2f} since the last build)" if "cold_frac" in r else ""))
        tag = name.replace("-", "_")
        kv += [f"{tag}_top1={r['top1']:.4f}", f"{tag}_verif={r['verif']:.4f}", f"{tag}_ms={r['ms_per_step']:.1f}",
               f"{tag}_cls_mib={r['classifier_mib']:.1f}"]
        if "cpk" in r:
            kv += [f"{tag}_cpk={r['cpk']:.4f}", f"{tag}_negcpk={r['neg_cpk']:.4f}"]
        if "top1" in full and name != "full":
            kv += [f"{tag}_top1_minus_full={100 * (r['top1'] - full['top1']):+.2f}pt",
                   f"{tag}_verif_minus_full={100 * (r['verif'] - full['verif']):+.2f}pt"]
    print_result(kv, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
