"""Sibling heads side by side: full softmax, MACH and random-projection softmax.

    .venv/bin/python benchmarks/bench_siblings.py [--K 100000] [--d 512] [--batch 256] [--device cpu]
        [--acc-K 10000] [--acc-d 128] [--acc-steps 300] [--skip-speed] [--skip-accuracy]

Speed: one head-only training step (forward, backward to W and to the features, SGD update) on random
features, in ms/step, and the head's trainable parameter memory. Accuracy: every head trained for the
same number of Adam steps on fixed features of a separable synthetic problem (Gaussian class centres
plus noise, K = acc-K), then top-1 / top-5 on held-out samples; for RP also the classifier recovered
by dual random projection (hfsoftmax.heads.rp.recover_classifier). The functions are importable
(``head_step_ms``, ``full_step_ms``, ``mach_step_ms``, ``rp_step_ms``, ``accuracy_table``) so that
bench_head.py / bench_accuracy.py can reuse them. Ends with one ``RESULT`` line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hfsoftmax.heads import ClassifierHead, FullSoftmax  # noqa: E402
from hfsoftmax.heads.mach import MachHead, default_num_buckets  # noqa: E402
from hfsoftmax.heads.rp import RPSoftmax, recover_classifier  # noqa: E402

logger = logging.getLogger("bench_siblings")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def param_mib(head: ClassifierHead) -> float:
    """Trainable parameter memory of a head in MiB (fp32 weights; gradient and momentum are 2x more)."""
    return sum(p.numel() * p.element_size() for p in head.parameters() if p.requires_grad) / 2**20


def head_step_ms(head: ClassifierHead, batch: int, steps: int = 5, warmup: int = 2, seed: int = 0) -> float:
    """Median ms of one training step of ``head`` alone: loss, backward (W and features), SGD update."""
    device = next(head.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = torch.randn(batch, head.feature_dim, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, head.num_classes, (batch,), generator=g).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        feats.grad = None
        loss = head(feats, labels)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def full_step_ms(K: int, d: int, batch: int, device: str = "cpu", steps: int = 5) -> tuple[float, float]:
    """(ms/step, parameter MiB) of full softmax."""
    head = FullSoftmax(K, d, device=device)
    return head_step_ms(head, batch, steps), param_mib(head)


def mach_step_ms(K: int, d: int, batch: int, R: int = 16, B: int = 0, hidden: int = 0, device: str = "cpu",
                 steps: int = 5) -> tuple[float, float]:
    """(ms/step, parameter MiB) of MACH with R hashes of B buckets (0 -> default_num_buckets)."""
    head = MachHead(K, d, R, B or default_num_buckets(K, R), hidden=hidden, device=device)
    return head_step_ms(head, batch, steps), param_mib(head)


def rp_step_ms(K: int, d: int, batch: int, m: int = 64, device: str = "cpu", steps: int = 5) -> tuple[float, float]:
    """(ms/step, parameter MiB) of random-projection softmax with projected size m."""
    head = RPSoftmax(K, d, m, device=device)
    return head_step_ms(head, batch, steps), param_mib(head)


# --------------------------------------------------------------------------------------------- #
# Accuracy on a separable synthetic problem with fixed features.

def make_problem(K: int, d: int, per_class: int, noise: float, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit class centres in R^d plus isotropic noise (per-coordinate std noise / sqrt(d)):
    (train features [K*per_class, d], train labels, test features [2K, d], test labels)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(K, d, generator=g), dim=1)
    y_tr = torch.arange(K).repeat_interleave(per_class)
    y_te = torch.arange(K).repeat(2)
    x_tr = centres[y_tr] + noise / d**0.5 * torch.randn(len(y_tr), d, generator=g)
    x_te = centres[y_te] + noise / d**0.5 * torch.randn(len(y_te), d, generator=g)
    return x_tr, y_tr, x_te, y_te


@torch.no_grad()
def topk_accuracy(head: ClassifierHead, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> tuple[float, float]:
    """(top-1, top-5) of head.topk over all K."""
    hit1 = hit5 = 0
    for s in range(0, len(y), chunk):
        _, idx = head.topk(x[s:s + chunk], 5)
        t = y[s:s + chunk, None].to(idx.device)
        hit1 += int((idx[:, :1] == t).sum())
        hit5 += int((idx == t).any(1).sum())
    return hit1 / len(y), hit5 / len(y)


def train_head(head: ClassifierHead, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float,
               weight_decay: float, seed: int = 0) -> float:
    """Adam with L2 (coupled weight decay, so the optimum is that of the L2-regularised objective)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    t = time.perf_counter()
    for _ in range(steps):
        i = torch.randint(0, len(y), (batch,), generator=g)
        loss = head(x[i], y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) * 1e3 / steps


def accuracy_table(K: int = 10000, d: int = 128, m: int = 32, R: int = 16, hidden: int = 64, steps: int = 300,
                   batch: int = 256, per_class: int = 8, noise: float = 1.0, lr: float = 0.01,
                   weight_decay: float = 1e-5, seed: int = 0) -> dict[str, dict[str, float]]:
    """Train every head for the same steps on the same fixed features; top-1/top-5 on held-out samples."""
    x_tr, y_tr, x_te, y_te = make_problem(K, d, per_class, noise, seed)
    B = default_num_buckets(K, R)
    heads: dict[str, ClassifierHead] = {
        "full": FullSoftmax(K, d),
        f"mach(R={R},B={B})": MachHead(K, d, R, B, seed=seed),
        f"mach(R={R},B={B},h={hidden})": MachHead(K, d, R, B, hidden=hidden, seed=seed),
        f"rp(m={m})": RPSoftmax(K, d, m, seed=seed),
    }
    out: dict[str, dict[str, float]] = {}
    for name, head in heads.items():
        torch.manual_seed(seed)
        ms = train_head(head, x_tr, y_tr, steps, batch, lr, weight_decay, seed)
        top1, top5 = topk_accuracy(head, x_te, y_te)
        out[name] = {"top1": top1, "top5": top5, "ms_per_step": ms, "param_ratio": param_mib(head) / (K * d * 4 / 2**20)}
        logger.info("%s: top1 %.4f top5 %.4f (%.1f ms/step)", name, top1, top5, ms)
        if isinstance(head, RPSoftmax):
            t = time.perf_counter()
            w_hat = recover_classifier(head, [(x_tr[s:s + 4096], y_tr[s:s + 4096]) for s in range(0, len(y_tr), 4096)],
                                       weight_decay)
            rec = FullSoftmax(K, d)
            with torch.no_grad():
                rec.weight.copy_(w_hat)
            top1, top5 = topk_accuracy(rec, x_te, y_te)
            out[name + "+recover"] = {"top1": top1, "top5": top5, "recover_s": time.perf_counter() - t,
                                      "param_ratio": 1.0}
            logger.info("%s+recover: top1 %.4f top5 %.4f", name, top1, top5)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="full softmax vs MACH vs RP softmax: ms/step, memory, accuracy")
    ap.add_argument("--K", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per head (median reported)")
    ap.add_argument("--R", type=int, default=16)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--acc-K", type=int, default=10_000)
    ap.add_argument("--acc-d", type=int, default=128)
    ap.add_argument("--acc-m", type=int, default=32)
    ap.add_argument("--acc-steps", type=int, default=300)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    result: dict[str, object] = {"K": args.K, "d": args.d, "batch": args.batch, "device": args.device}
    if not args.skip_speed:
        B = default_num_buckets(args.K, args.R)
        speed = {}
        for name, fn in (("full", lambda: full_step_ms(args.K, args.d, args.batch, args.device, args.steps)),
                         (f"mach(R={args.R},B={B})", lambda: mach_step_ms(args.K, args.d, args.batch, args.R, B,
                                                                         device=args.device, steps=args.steps)),
                         (f"rp(m={args.m})", lambda: rp_step_ms(args.K, args.d, args.batch, args.m, args.device,
                                                               args.steps))):
            ms, mib = fn()
            speed[name] = {"ms_per_step": round(ms, 3), "param_MiB": round(mib, 2)}
        full_mib = speed["full"]["param_MiB"]
        print(f"\nhead step at K={args.K}, d={args.d}, batch={args.batch}, device={args.device}")
        print(f"{'head':<22}{'ms/step':>10}{'param MiB':>12}{'params/full':>13}")
        for name, r in speed.items():
            print(f"{name:<22}{r['ms_per_step']:>10.2f}{r['param_MiB']:>12.2f}{r['param_MiB'] / full_mib:>13.4f}")
        result["speed"] = speed
    if not args.skip_accuracy:
        acc = accuracy_table(K=args.acc_K, d=args.acc_d, m=args.acc_m, R=args.R, steps=args.acc_steps)
        print(f"\naccuracy at K={args.acc_K}, d={args.acc_d}, {args.acc_steps} Adam steps (held-out samples)")
        print(f"{'head':<28}{'top1':>8}{'top5':>8}{'params/full':>13}")
        for name, r in acc.items():
            print(f"{name:<28}{r['top1']:>8.4f}{r['top5']:>8.4f}{r['param_ratio']:>13.4f}")
        result["accuracy"] = {n: {k: round(v, 4) for k, v in r.items()} for n, r in acc.items()}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
