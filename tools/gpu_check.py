#!/usr/bin/env python
"""One-minute acceptance checks of hfsoftmax on one NVIDIA GPU (and, degraded, on a CPU).

Run from a fresh clone, after ``make setup`` and installing a CUDA build of torch 2.13 into ``.venv``::

    .venv/bin/python tools/gpu_check.py                        # every check, on the GPU (~1 minute)
    .venv/bin/python tools/gpu_check.py --only syncs,fp16_resume
    .venv/bin/python tools/gpu_check.py --device cpu --quick   # degraded mode (what the test suite runs)

Each check prints one line, ``OK <name>: <detail>``, ``FAIL <name>: <detail>`` or ``SKIP <name>: <why>``,
and the run ends with ``RESULT ok=N fail=N skip=N device=<cuda name or cpu>``; the exit status is 1 if
any check failed, else 0. A check that raises is a FAIL line carrying the exception's one-line
message, and the next check runs. Without CUDA the CUDA-only checks print ``SKIP <name>: needs CUDA``
and everything else runs on the CPU.

Checks (in this order):

  heads_amp        every head (full with margins none/cosface/arcface/combined, hf, random, mach, rp)
                   under train.amp off/bf16/fp16 for a few steps of the real train loop on synthetic
                   data; every logged loss finite (fp16 is left out on a CPU whose autocast lacks it)
  logits_dtype     under autocast bf16/fp16 the logits of FullSoftmax (each margin), RPSoftmax, MachHead
                   and heads.full.margin_logits are fp32, equal to the fp32 computation
  arcface_fp16     ArcFace logits of fp16 inputs with a target row equal to its feature (cos = 1):
                   the gradient is finite
  cpk_probe        SelectiveSoftmax.exact_mass under autocast equals fp32 (atol 1e-6); masses <= 1
  resume_rng       (CUDA) an older checkpoint's 9 CUDA RNG states load on the visible device(s) through
                   hfsoftmax.train.set_rng_state(state, device); rng_state(device) holds one device state
  fp16_resume      6 fp16 steps straight == 3 steps, then train.resume=auto to 6: backbone bitwise and the
                   checkpoint's GradScaler state ("scaler") equal (CUDA: train.deterministic=true)
  syncs            (CUDA) host syncs per steady-state step of heads full, random, hf, mach
                   (torch.cuda.set_sync_debug_mode("warn")); full and random must make at most 1
  multirank_nccl   (CUDA) a one-rank NCCL group: the selective head's collectives (HeadComm
                   gather_batch, broadcast_ids, gather_rows, async reduce_scatter_rows) equal the
                   one-process results
  train_hf_sh      sh scripts/train_hf.sh with its own parameter server (store.pipeline=true): exit 0,
                   a "done" record in metrics.jsonl, no server left behind
  eval_rp_recover  python -m hfsoftmax.eval verify and tools/rp_recover.py on a fresh rp checkpoint
                   (--device cuda, or cpu)
  uint8_workers    a JPEG image list through hfsoftmax.data.sampler.batches_from with 2 workers (pinned on CUDA):
                   uint8 batches equal to 0 workers', and a resumed loader continues them exactly

``--quick`` shrinks the runs (the CPU test); ``--verbose`` shows the project's logs and warnings.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

HEADS = [("full", "none"), ("full", "cosface"), ("full", "arcface"), ("full", "combined"),
         ("hf", "none"), ("random", "none"), ("mach", "none"), ("rp", "none")]
K, D = 200, 32          # the tiny runs' classes and feature dim (rp projects to D // 2)


class CheckFailed(Exception):
    """A check's verdict: its message is the FAIL line's detail."""


class Skip(Exception):
    """A check that cannot run here: its message is the SKIP line's reason."""


@dataclass
class Ctx:
    device: torch.device
    quick: bool
    tmp: str                  # the run's scratch folder (removed at the end)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def workdir(self, name: str) -> str:
        return tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp)


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[Ctx], str]   # returns the OK detail; raises CheckFailed / Skip / anything
    cuda_only: bool = False


@dataclass(frozen=True)
class Outcome:
    status: str               # OK | FAIL | SKIP
    detail: str


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(e, (CheckFailed, Skip)):
        text = f"{type(e).__name__}: {text}"
    return text[:600]


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


def run_check(check: Check, ctx: Ctx, verbose: bool = False) -> Outcome:
    """Run one check; an exception becomes a FAIL (its one-line message), never the end of the run."""
    if check.cuda_only and not ctx.cuda:
        why = "this machine has none" if not torch.cuda.is_available() else "running with --device cpu"
        return Outcome("SKIP", f"needs CUDA ({why})")
    t0 = time.time()
    # stray prints of the project would break the one-line-per-check output
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet:
            detail = check.fn(ctx)
    except Skip as e:
        return Outcome("SKIP", one_line(e))
    except Exception as e:
        return Outcome("FAIL", f"{one_line(e)} [{time.time() - t0:.1f} s]")
    return Outcome("OK", f"{detail} [{time.time() - t0:.1f} s]")


# --------------------------------------------------------------------------------------------- #
# Shared pieces.

def fp16_autocast_works(device: torch.device) -> bool:
    """CUDA always has fp16 autocast; a CPU build may not (then fp16 modes are skipped on CPU only)."""
    if device.type == "cuda":
        return True
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            y = torch.ones(2, 2) @ torch.ones(2, 2)
        return y.dtype == torch.float16
    except Exception:
        return False


def low_dtypes(ctx: Ctx) -> list[torch.dtype]:
    return [torch.bfloat16] + ([torch.float16] if fp16_autocast_works(ctx.device) else [])


def tiny_overrides(ctx: Ctx, out_dir: str, *extra: str) -> list[str]:
    """A run of a few seconds: tiny backbone, K = 200 synthetic identities, batch 16."""
    return [f"train.device={ctx.device}", f"train.out_dir={out_dir}", "train.progress=false", "train.log_every=1",
            "train.batch_size=16", f"data.num_classes={K}", "data.samples_per_class=4", "data.image_size=32",
            "data.val_identities=10", "data.val_pairs=20", "model.backbone=tiny", "model.width=8",
            f"model.feature_dim={D}", "head.num_active=50", "head.candidates=16", f"head.rp.proj_dim={D // 2}",
            "head.mach.num_hashes=4", "store.kind=local", *extra]


def run_train(ctx: Ctx, out_dir: str, *extra: str) -> dict[str, Any]:
    from hfsoftmax.config import load_config
    from hfsoftmax.train import train
    return train(load_config(None, tiny_overrides(ctx, out_dir, *extra)))


def train_losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [float(r["loss"]) for r in recs if r.get("event") == "train"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHON=sys.executable, NPROC="1")
    env.pop("HFSOFTMAX_DEBUG", None)
    return env


def tail(text: str, n: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "(no output)")[-n:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------- #
# 1. Every head under every autocast mode, through the real train loop.

def check_heads_amp(ctx: Ctx) -> str:
    modes = ["off", "bf16"] + (["fp16"] if fp16_autocast_works(ctx.device) else [])
    steps = 2 if ctx.quick else 3
    bad: list[str] = []
    losses: list[float] = []
    for name, margin in HEADS:
        for mode in modes:
            tag = f"{name}/{margin}/{mode}"
            out = ctx.workdir(tag.replace("/", "_"))
            try:
                run_train(ctx, out, f"head.name={name}", f"head.margin={margin}", f"train.amp={mode}",
                          f"train.steps={steps}")
                got = train_losses(out)
                if len(got) != steps or not all(math.isfinite(x) for x in got):
                    bad.append(f"{tag}: losses {got}")
                losses += got
            except Exception as e:
                bad.append(f"{tag}: {one_line(e)}")
            finally:
                shutil.rmtree(out, ignore_errors=True)
    n = len(HEADS) * len(modes)
    if bad:
        raise CheckFailed(f"{len(bad)}/{n} runs failed: " + "; ".join(bad))
    note = "" if "fp16" in modes else "; fp16 skipped: this CPU's autocast has no fp16"
    return (f"{n} runs ({len(HEADS)} heads x {'/'.join(modes)}), {steps} steps each, losses finite "
            f"({min(losses):.3g}..{max(losses):.3g}){note}")


# --------------------------------------------------------------------------------------------- #
# 2. Logits are fp32 under autocast.

def check_logits_dtype(ctx: Ctx) -> str:
    from hfsoftmax.config import HeadConfig
    from hfsoftmax.heads import build_head
    from hfsoftmax.heads.margin import margin_logits

    dev, B, n_cls, d = ctx.device, 8, 40, 16
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(B, d, generator=g).to(dev)
    labels = torch.randint(0, n_cls, (B,), generator=g).to(dev)

    def head(name: str, margin: str = "none") -> torch.nn.Module:
        cfg = HeadConfig(name=name, margin=margin, scale=16.0)
        cfg.rp.proj_dim, cfg.mach.num_hashes, cfg.mach.num_buckets = 8, 2, 4
        torch.manual_seed(1)
        return build_head(cfg, n_cls, d, device=dev).to(dev)

    # name -> logits of features f (what the backbone hands over: low precision under autocast)
    probes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for margin in ("none", "cosface", "arcface", "combined"):
        full = head("full", margin)
        probes[f"full/{margin}"] = lambda f, h=full: h.logits(f, labels)
        rp = head("rp", margin)
        probes[f"rp/{margin}"] = lambda f, h=rp: h.rule.logits(h.project(f), h.weight, labels)
    mach = head("mach")
    probes["mach"] = lambda f: mach.logits(f)
    w = torch.randn(n_cls, d, generator=g).to(dev)
    probes["margin_logits/arcface"] = lambda f: margin_logits(f, w, labels, "arcface", 16.0, 0.5)

    bad: list[str] = []
    for dtype in low_dtypes(ctx):
        f_low = feats.to(dtype)
        for name, fn in probes.items():
            ref = fn(f_low.float())                  # the fp32 computation on the same values
            with torch.autocast(dev.type, dtype=dtype):
                got = fn(f_low)
            if got.dtype != torch.float32:
                bad.append(f"{name} under {dtype}: {got.dtype}")
            elif not torch.allclose(got, ref, rtol=0, atol=1e-5):
                bad.append(f"{name} under {dtype}: differs from fp32 by {(got - ref).abs().max().item():.3g}")
    expect(not bad, "; ".join(bad))
    return f"{len(probes)} logits x {'/'.join(str(t).split('.')[-1] for t in low_dtypes(ctx))}: fp32, equal to fp32"


# --------------------------------------------------------------------------------------------- #
# 3. ArcFace at cos = 1 in fp16.

def check_arcface_fp16(ctx: Ctx) -> str:
    import torch.nn.functional as F

    from hfsoftmax.heads.margin import margin_logits

    dev, B, n_cls, d = ctx.device, 6, 12, 8
    g = torch.Generator().manual_seed(0)
    f = torch.randn(B, d, generator=g)
    w = torch.randn(n_cls, d, generator=g)
    w[:B] = f                                  # each sample's target row is its own feature: cos = 1
    y = torch.arange(B)
    tried = []
    for under_autocast in (False, True):
        if under_autocast and not fp16_autocast_works(dev):
            continue
        fx = f.to(dev, torch.float16).requires_grad_()
        wx = w.to(dev, torch.float16).requires_grad_()
        ctxm = torch.autocast(dev.type, dtype=torch.float16) if under_autocast else contextlib.nullcontext()
        with ctxm:
            logits = margin_logits(fx, wx, y.to(dev), "arcface", 64.0, 0.5)
            loss = F.cross_entropy(logits.float(), y.to(dev))
        loss.backward()
        where = "autocast" if under_autocast else "plain"
        expect(logits.dtype == torch.float32, f"{where}: logits are {logits.dtype}, not fp32")
        expect(bool(torch.isfinite(fx.grad).all() and torch.isfinite(wx.grad).all()),
               f"{where}: non-finite gradient at cos = 1 (features {fx.grad.abs().max().item()}, "
               f"rows {wx.grad.abs().max().item()})")
        tried.append(where)
    return f"fp16 inputs, cos = 1 targets ({', '.join(tried)}): fp32 logits, finite gradients"


# --------------------------------------------------------------------------------------------- #
# 4. The CPK probe under autocast.

def local_selective_head(num_classes: int, dim: int, num_active: int, margin: str = "cosface",
                         **kw: Any) -> Any:
    """A SelectiveSoftmax on an in-process store: lr-only SGD, an exact index built now."""
    from hfsoftmax.heads.selective import SelectiveSoftmax
    from paramserver.index import IndexManager, make_index
    from paramserver.store import WeightStore

    metric = "dot" if margin == "none" else "angular"
    store = WeightStore(num_classes, dim, momentum=0.0, weight_decay=0.0, seed=0, init_std=0.5)
    mgr = IndexManager(lambda: make_index("exact", dim, metric, seed=0), rebuild_every=1000, background=False)
    mgr.build_now(store.rows_view(), step=0)
    store.attach_index(mgr)
    return SelectiveSoftmax(store, num_classes, dim, num_active, margin=margin, scale=8.0, margin_m=0.35,
                            index="exact", **kw)


def check_cpk_probe(ctx: Ctx) -> str:
    n_cls, d, M, P = 300, 16, 30, 8
    head = local_selective_head(n_cls, d, M, cpk_every=1)
    try:
        rng = np.random.default_rng(0)
        feats = torch.from_numpy(rng.standard_normal((P, d)).astype(np.float32)).to(ctx.device)
        labels = torch.from_numpy(rng.integers(0, n_cls, P)).to(ctx.device)
        head.begin_step(0, 0.0)
        lse, probs = head.exact_mass(feats, M)
        worst, tops = 0.0, []
        for dtype in low_dtypes(ctx):
            with torch.autocast(ctx.device.type, dtype=dtype):
                lse_a, probs_a = head.exact_mass(feats, M)
            name = str(dtype).split(".")[-1]
            expect(lse_a.dtype in (torch.float32, torch.float64), f"{name}: log-partition is {lse_a.dtype}")
            err = max((lse_a - lse).abs().max().item(), (probs_a - probs).abs().max().item())
            expect(err <= 1e-6, f"{name}: probe differs from fp32 by {err:.3g} (> 1e-6)")
            mass = probs_a.sum(dim=1).max().item()
            expect(mass <= 1.0 + 1e-9, f"{name}: top-{M} mass {mass!r} > 1")
            worst = max(worst, err)
            # a training forward under autocast logs cpk_exact / cpk_active from its own probe
            head.begin_step(0, 0.0)
            with torch.autocast(ctx.device.type, dtype=dtype):
                head(feats.to(dtype), labels)
            st = head.stats()
            for key in ("cpk_exact", "cpk_active"):
                expect(0.0 < st[key] <= 1.0 + 1e-9, f"{name}: {key} = {st[key]!r} outside (0, 1]")
            tops.append(f"{name} cpk_exact {st['cpk_exact']:.3f}")
        return f"K={n_cls} M={M}: autocast == fp32 within {worst:.1g}, masses <= 1 ({', '.join(tops)})"
    finally:
        head.close()


# --------------------------------------------------------------------------------------------- #
# 5. An older checkpoint's 9 CUDA RNG states, resumed on this machine's device(s).

def check_resume_rng(ctx: Ctx) -> str:
    from hfsoftmax import train as T

    for fn in (T.rng_state, T.set_rng_state):
        if "device" not in inspect.signature(fn).parameters:
            raise CheckFailed(f"hfsoftmax.train.{fn.__name__} takes no 'device' argument (the rng_state(device) "
                              f"change is not in this tree); an older checkpoint's 9 CUDA states cannot be checked")
    n_dev = torch.cuda.device_count()
    saved = [torch.cuda.get_rng_state(i) for i in range(n_dev)]
    cpu_saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        # Nine distinct states, as rank 0 of a 9-GPU node wrote them (torch.cuda.get_rng_state_all()).
        nine = []
        for i in range(9):
            g = torch.Generator(device="cuda").manual_seed(1000 + i)
            nine.append(g.get_state())
        old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": nine}
        buf = io.BytesIO()
        torch.save({"rng": [old]}, buf)           # through a checkpoint's serialisation, like a resume
        buf.seek(0)
        state = torch.load(buf, weights_only=False)["rng"][0]
        for i in range(min(n_dev, 9)):
            dev = torch.device("cuda", i)
            T.set_rng_state(state, device=dev)
            expect(torch.equal(torch.cuda.get_rng_state(i), nine[i]),
                   f"cuda:{i}: after set_rng_state its RNG is not the checkpoint's cuda[{i}]")
        # The new format: this rank's own device only, and it restores the stream exactly.
        dev = ctx.device
        new = T.rng_state(device=dev)
        n_states = sum(1 if isinstance(v, torch.Tensor) else len(v)
                       for k, v in new.items() if k.startswith("cuda") and v is not None)
        expect(n_states == 1, f"rng_state({dev}) holds {n_states} CUDA states; the new format keeps only the "
                              f"rank's own device")
        a = torch.rand(4, device=dev)
        T.set_rng_state(new, device=dev)
        b = torch.rand(4, device=dev)
        expect(torch.equal(a, b), "rng_state / set_rng_state round trip does not restore the CUDA stream")
        return f"9 saved CUDA states loaded on {min(n_dev, 9)} visible device(s); new format: 1 state, exact round trip"
    finally:
        for i, s in enumerate(saved):
            torch.cuda.set_rng_state(s, i)
        torch.set_rng_state(cpu_saved[0])
        np.random.set_state(cpu_saved[1])
        random.setstate(cpu_saved[2])


# --------------------------------------------------------------------------------------------- #
# 6. fp16 training resumed mid-way equals the straight run.

def check_fp16_resume(ctx: Ctx) -> str:
    from hfsoftmax.config import ConfigError, load_config
    from hfsoftmax.train import train

    if not fp16_autocast_works(ctx.device):
        raise Skip("this CPU's autocast has no fp16")
    steps, half = 6, 3
    straight, resumed = ctx.workdir("straight"), ctx.workdir("resumed")
    extra = ["head.name=full", "train.amp=fp16", f"train.steps={steps}", f"train.ckpt_every={half}",
             f"train.keep_every={half}"] + (["train.deterministic=true"] if ctx.cuda else [])
    try:
        cfg = load_config(None, tiny_overrides(ctx, straight, *extra))
    except ConfigError as e:
        if "train.deterministic" in str(e):
            raise CheckFailed("config has no train.deterministic key (the in-progress change is not in this "
                              "tree); bitwise CUDA resume cannot be asked for") from None
        raise
    train(cfg)
    # "3 steps, then resume": the straight run's step-3 checkpoint alone, in a run dir of its own
    shutil.copy(os.path.join(straight, f"ckpt_{half:08d}.pt"), resumed)
    train(load_config(None, tiny_overrides(ctx, resumed, *extra, "train.resume=auto")))
    a = torch.load(os.path.join(straight, "ckpt_last.pt"), map_location="cpu", weights_only=False)
    b = torch.load(os.path.join(resumed, "ckpt_last.pt"), map_location="cpu", weights_only=False)
    expect(a["step"] == b["step"] == steps, f"final steps {a['step']} and {b['step']}, expected {steps}")
    problems = []
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    if differ:
        worst = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in differ)
        problems.append(f"backbone differs in {len(differ)}/{len(a['model'])} tensors (e.g. {differ[0]}, "
                        f"max |diff| {worst:.3g})")
    if "scaler" not in a or "scaler" not in b:
        problems.append("checkpoints have no 'scaler' entry: this tree's train loop does not save the GradScaler "
                        "state, so an fp16 resume restarts its scale and growth tracker")
    elif a["scaler"] != b["scaler"]:
        problems.append(f"GradScaler state differs: straight {a['scaler']}, resumed {b['scaler']}")
    if problems:
        raise CheckFailed("; ".join(problems))
    sc = a["scaler"] if isinstance(a["scaler"], dict) else {}
    return (f"{steps} steps straight == {half} + resume {steps - half}: backbone bitwise equal "
            f"({len(a['model'])} tensors), GradScaler state equal (scale {sc.get('scale')}, "
            f"growth tracker {sc.get('_growth_tracker')})")


# --------------------------------------------------------------------------------------------- #
# 7. Host syncs per training step.

class SyncCounter:
    """showwarning replacement counting CUDA sync-debug warnings raised on the training thread only:
    the selective heads' push worker copies gradients to the host on its own thread, off the step."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.count = self.elsewhere = 0

    def __call__(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                 line: Any = None) -> None:
        if "synchroniz" not in str(message):
            return
        if threading.get_ident() == self.thread:
            self.count += 1
        else:
            self.elsewhere += 1


def syncs_per_step(ctx: Ctx, head: str, steps: int, warm: int) -> tuple[list[int], int]:
    """Sync warnings of each step after ``warm`` (batch fetch included), and those of other threads."""
    import hfsoftmax.train as T

    counter = SyncCounter()
    marks: list[int] = []
    real = T.batches_from

    def marked(*args: Any, **kw: Any) -> Iterator[Any]:
        for item in real(*args, **kw):
            marks.append(counter.count)       # a step begins
            yield item

    out = ctx.workdir(f"syncs_{head}")
    T.batches_from = marked
    try:
        # record=True keeps the warnings off stderr; showwarning is replaced so each one is
        # attributed to its thread
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            warnings.showwarning = counter
            torch.cuda.set_sync_debug_mode("warn")
            try:
                # log_every beyond the run: no logging syncs inside the measured steps
                run_train(ctx, out, f"head.name={head}", f"train.steps={steps}", "train.log_every=1000")
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        T.batches_from = real
        shutil.rmtree(out, ignore_errors=True)
    # step s spans marks[s] .. marks[s + 1]; the last step (checkpoint, final log) is left out
    return [marks[s + 1] - marks[s] for s in range(warm, len(marks) - 1)], counter.elsewhere


def check_syncs(ctx: Ctx) -> str:
    steps, warm = 8, 3
    per: dict[str, list[int]] = {}
    other: dict[str, int] = {}
    for head in ("full", "random", "hf", "mach"):
        per[head], other[head] = syncs_per_step(ctx, head, steps, warm)
        expect(len(per[head]) > 0, f"{head}: no steady-state steps measured")
    detail = ", ".join(f"{h} {max(c)}/step" + (f" (+{other[h]} on worker threads)" if other[h] else "")
                       for h, c in per.items())
    over = [h for h in ("full", "random") if max(per[h]) > 1]
    expect(not over, f"more than 1 host sync per step for {', '.join(over)}: {detail}")
    return f"syncs per steady-state step: {detail}"


# --------------------------------------------------------------------------------------------- #
# 8. The selective head's collectives on a one-rank NCCL group.

def head_comm_roundtrip(backend: str, device: torch.device) -> str:
    """HeadComm's collective path on a one-rank group of ``backend``, against its one-process results."""
    import torch.distributed as dist
    from datetime import timedelta

    from hfsoftmax.heads.collective import HeadComm

    class OneRankComm(HeadComm):
        """HeadComm short-cuts a world of one to the identity; forcing ``distributed`` runs the real
        collectives (all-gather, broadcast, async reduce-scatter) on the one-rank group."""

        @property
        def distributed(self) -> bool:
            return True

    if dist.is_initialized():
        raise CheckFailed("a torch.distributed process group is already initialised in this process")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        comm = OneRankComm(0, 1, group=dist.group.WORLD)
        comm.device = device
        plain = HeadComm(0, 1)
        g = torch.Generator().manual_seed(0)
        feats = torch.randn(8, 16, generator=g).to(device)
        labels = torch.randint(0, 100, (8,), generator=g).to(device)
        for x in (feats, labels):
            got = comm.gather_batch(x)
            expect(torch.equal(got.to(x.device), plain.gather_batch(x)), f"gather_batch of {x.dtype} differs")
        ids = np.array([5, 3, 99, 0, 42], dtype=np.int64)
        (got_ids, extra), (ref_ids, ref_extra) = comm.broadcast_ids(ids, 7), plain.broadcast_ids(ids, 7)
        expect(np.array_equal(got_ids, ref_ids) and extra == ref_extra == 7, "broadcast_ids differs")
        m = 5
        rows = torch.randn(m, 16, generator=g).to(device)
        expect(comm.my_slice(m) == slice(0, m), f"my_slice({m}) is {comm.my_slice(m)}")
        expect(torch.equal(comm.gather_rows(rows, m), plain.gather_rows(rows, m)), "gather_rows differs")
        grad = torch.randn(m, 16, generator=g).to(device)
        flag = torch.tensor(1.0, device=device)
        work, mine, flags = comm.reduce_scatter_rows(grad, flag)
        expect(work is not None, "reduce_scatter_rows returned no async work")
        work.wait()
        _, ref_mine, ref_flags = plain.reduce_scatter_rows(grad, flag)
        expect(torch.equal(mine, ref_mine), f"reduce_scatter_rows slice differs by "
                                            f"{(mine - ref_mine).abs().max().item():.3g}")
        expect(torch.equal(flags.reshape(-1), ref_flags.reshape(-1)), "reduce_scatter_rows flag differs")
        return f"{backend}: gather_batch, broadcast_ids, gather_rows, async reduce_scatter_rows == one-process"
    finally:
        dist.destroy_process_group()


def check_multirank_nccl(ctx: Ctx) -> str:
    return head_comm_roundtrip("nccl", torch.device("cuda", torch.cuda.current_device()))


# --------------------------------------------------------------------------------------------- #
# 9. scripts/train_hf.sh with its own parameter server.

def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"      # a zombie is gone for our purposes
    except (FileNotFoundError, IndexError):
        return False


def run_script(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a launch script in a process group of its own, so a timeout can stop it and everything it
    started (TERM first: train_hf.sh then stops its trainer and server itself)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        raise CheckFailed(f"{' '.join(cmd[:2])} did not finish within {timeout:.0f} s (stopped)") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def check_train_hf_sh(ctx: Ctx) -> str:
    steps = 6 if ctx.quick else 20
    out = ctx.workdir("train_hf")
    args = [f"train.device={ctx.device}", f"train.out_dir={out}", f"train.steps={steps}", "train.progress=false",
            "train.log_every=2", "train.batch_size=16", "data.num_classes=500", "data.samples_per_class=2",
            "data.image_size=16", "data.val_identities=10", "data.val_pairs=20", "model.width=8",
            "model.feature_dim=16", "head.num_active=50", "head.candidates=8", "head.rebuild_every=5",
            "head.cpk_every=5", "store.pipeline=true"]
    r = run_script(["sh", "scripts/train_hf.sh", *args], timeout=120 if ctx.quick else 300)
    m = re.search(r"parameter server started at (\S+) \(pid (\d+)", r.stdout)
    if m and pid_alive(int(m.group(2))):
        os.kill(int(m.group(2)), signal.SIGTERM)    # ours (the script started it): do not leave it running
        raise CheckFailed(f"train_hf.sh left its parameter server (pid {m.group(2)}) running (stopped now)")
    expect(r.returncode == 0, f"train_hf.sh exited {r.returncode}: {tail(r.stderr or r.stdout)}")
    expect(m is not None, "train_hf.sh did not start a parameter server")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    done = [x for x in recs if x.get("event") == "done"]
    expect(len(done) == 1 and done[0].get("steps") == steps, f"metrics.jsonl 'done' record: {done}")
    losses = [x["loss"] for x in recs if x.get("event") == "train"]
    expect(all(math.isfinite(x) for x in losses), f"non-finite losses {losses}")
    return (f"{steps} steps against {m.group(1)}: exit 0, done record, server stopped, "
            f"{done[0].get('samples_per_s', 0):.0f} samples/s")


# --------------------------------------------------------------------------------------------- #
# 10. Evaluation CLI and RP recovery on a fresh checkpoint.

def check_eval_rp_recover(ctx: Ctx) -> str:
    run = ctx.workdir("rp")
    run_train(ctx, run, "head.name=rp", "train.steps=2")
    ckpt = os.path.join(run, "ckpt_last.pt")
    dev = "cuda" if ctx.cuda else "cpu"
    eval_out, w_out = os.path.join(run, "eval"), os.path.join(run, "W.npy")
    cmds = {
        "eval": [sys.executable, "-m", "hfsoftmax.eval", "verify", "--model", ckpt, "--data",
                 os.path.join(run, "heldout.bin"), "--out", eval_out, "--device", dev, "--batch-size", "32"],
        "rp_recover": [sys.executable, "tools/rp_recover.py", "--checkpoint", ckpt, "--out", w_out,
                       "--batches", "2", "--batch-size", "32", "--device", dev],
    }
    # both at once: each is mostly interpreter and torch start-up
    procs = {n: subprocess.Popen(c, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n, c in cmds.items()}
    results = {}
    for n, p in procs.items():
        try:
            out, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise CheckFailed(f"{n} did not finish within 180 s (killed)") from None
        results[n] = (p.returncode, out, err)
    for n, (rc, out, err) in results.items():
        expect(rc == 0, f"{n} --device {dev} exited {rc}: {tail(err or out)}")
    with open(os.path.join(eval_out, "results.json"), encoding="utf-8") as f:
        acc = json.load(f)["heldout"]["accuracy"]
    expect(0.0 <= acc <= 1.0, f"verification accuracy {acc}")
    w = np.load(w_out)
    expect(w.shape == (K, D) and bool(np.isfinite(w).all()), f"recovered W: shape {w.shape}, finite "
                                                             f"{bool(np.isfinite(w).all())}")
    return f"--device {dev}: verify heldout accuracy {100 * acc:.1f} %, rp_recover W {w.shape[0]}x{w.shape[1]} finite"


# --------------------------------------------------------------------------------------------- #
# 11. uint8 batches through worker processes.

def write_image_list(folder: str, n: int, size: int) -> None:
    """n random JPEGs and a train_list.txt over them (4 classes)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"))
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, "images", f"{i}.jpg"), quality=90)
        lines.append(f"images/{i}.jpg {i % 4}\n")
    with open(os.path.join(folder, "train_list.txt"), "w", encoding="utf-8") as f:
        f.writelines(lines)


def loader_batches(ctx: Ctx, folder: str, workers: int, start: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from hfsoftmax.config import load_config
    from hfsoftmax.data.datasets import dataset_from_path
    from hfsoftmax.dist import DistInfo
    from hfsoftmax.data.sampler import batches_from

    cfg = load_config(None, [f"data.path={folder}", "data.image_size=16", f"data.num_workers={workers}",
                             "train.batch_size=8", "train.seed=3"])
    ds = dataset_from_path(folder, cfg.data.image_size, train=True, uint8=True)   # as build_datasets does
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=ctx.device)
    gen = batches_from(ds, cfg, info, start)
    got = []
    try:
        for step, (images, labels) in gen:
            if step >= stop:
                break
            expect(images.dtype == torch.uint8, f"{workers} workers: batch of {images.dtype}, not uint8")
            if ctx.cuda:
                expect(images.is_pinned(), f"{workers} workers: batch not in pinned memory on CUDA")
            got.append((images.clone(), labels.clone()))
    finally:
        gen.close()                      # the DataLoader's workers stop with their iterator
    return got


def check_uint8_workers(ctx: Ctx) -> str:
    folder = ctx.workdir("images")
    write_image_list(folder, 24, 20)     # stored at 20, read at 16: the resize runs in the workers
    steps = 7                            # 3 batches of 8 per epoch: crosses two epoch boundaries
    ref = loader_batches(ctx, folder, 0, 0, steps)
    two = loader_batches(ctx, folder, 2, 0, steps)
    later = loader_batches(ctx, folder, 2, 4, steps)
    expect(len(ref) == len(two) == steps, f"got {len(ref)} and {len(two)} batches, expected {steps}")
    for s, ((a, la), (b, lb)) in enumerate(zip(ref, two)):
        expect(torch.equal(a, b) and torch.equal(la, lb), f"step {s}: 2 workers' batch differs from 0 workers'")
    for s, ((a, la), (b, lb)) in enumerate(zip(ref[4:], later), 4):
        expect(torch.equal(a, b) and torch.equal(la, lb), f"step {s}: a loader started at step 4 differs")
    pinned = ", pinned" if ctx.cuda else ""
    return f"{steps} batches uint8 {tuple(ref[0][0].shape)}{pinned}: 2 workers == 0 workers, resume at step 4 exact"


# --------------------------------------------------------------------------------------------- #

# --------------------------------------------------------------------------------------------- #
# 12. W sharded on this device (store.kind=sharded, one rank): the same steps as on the CPU.

def check_sharded(ctx: Ctx) -> str:
    """Sharded HF (exact index, CosFace) on this device equals the CPU run step by step; its logits
    and loss stay fp32 under low-precision autocast; the snapshot written from the device restores."""
    from hfsoftmax.heads.collective import HeadComm
    from hfsoftmax.heads.sharded import ShardedRows, ShardedSoftmax
    from paramserver.optim import SGDConfig

    n_cls, d, M, B = 300, 16, 40, 32

    def run(device: torch.device, dtype: torch.dtype | None = None) -> tuple[ShardedSoftmax, list[float]]:
        rows = ShardedRows(n_cls, d, HeadComm(0, 1), device, SGDConfig(sparse_momentum="lazy"), seed=3,
                           init_std=0.5)
        head = ShardedSoftmax(rows, M, margin="cosface", scale=8.0, margin_m=0.2, index="exact", candidates=8)
        losses = []
        for step in range(3):
            g = np.random.default_rng(step)
            feats = torch.from_numpy(g.standard_normal((B, d)).astype(np.float32)).to(device).requires_grad_(True)
            labels = torch.from_numpy(g.integers(0, n_cls, B))
            head.begin_step(step, 0.5, labels=labels)
            if dtype is not None:
                with torch.autocast(device.type, dtype=dtype):
                    loss = head(feats.to(dtype), labels.to(device))
                expect(loss.dtype == torch.float32, f"{dtype}: the sharded loss is {loss.dtype}")
            else:
                loss = head(feats, labels.to(device))
            loss.backward()
            head.end_step(step)
            losses.append(float(loss))
        return head, losses

    ref, ref_losses = run(torch.device("cpu"))
    dev, dev_losses = run(ctx.device)
    err = float((dev.rows.W.cpu() - ref.rows.W).abs().max())
    scale = max(1.0, float(ref.rows.W.abs().max()))
    expect(err <= 1e-4 * scale, f"W on {ctx.device} differs from the CPU's by {err:.3g}")
    expect(max(abs(a - b) for a, b in zip(dev_losses, ref_losses)) <= 1e-4, f"losses {dev_losses} vs {ref_losses}")
    for dtype in low_dtypes(ctx):
        run(ctx.device, dtype)
    path = os.path.join(ctx.workdir("sharded"), "store_00000003")
    dev.snapshot(path)
    back = ShardedRows(n_cls, d, HeadComm(0, 1), ctx.device, SGDConfig(sparse_momentum="lazy"), seed=9)
    back.restore(path)
    expect(torch.equal(back.W, dev.rows.W) and back.M is not None and torch.equal(back.M, dev.rows.M),
           "the snapshot did not restore W and momentum bitwise")
    return f"K={n_cls} M={M}: 3 steps == CPU within {err:.1g}; fp32 loss under autocast; snapshot round trip bitwise"


CHECKS = [
    Check("heads_amp", check_heads_amp),
    Check("logits_dtype", check_logits_dtype),
    Check("arcface_fp16", check_arcface_fp16),
    Check("cpk_probe", check_cpk_probe),
    Check("resume_rng", check_resume_rng, cuda_only=True),
    Check("fp16_resume", check_fp16_resume),
    Check("syncs", check_syncs, cuda_only=True),
    Check("multirank_nccl", check_multirank_nccl, cuda_only=True),
    Check("train_hf_sh", check_train_hf_sh),
    Check("eval_rp_recover", check_eval_rp_recover),
    Check("uint8_workers", check_uint8_workers),
    Check("sharded", check_sharded),
]


def pick_device(name: str) -> torch.device | None:
    """auto: cuda when available; None when cuda is asked for and absent."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def main(argv: list[str] | None = None, checks: list[Check] | None = None) -> int:
    checks = CHECKS if checks is None else checks
    names = [c.name for c in checks]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda when available (default)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(names)}")
    ap.add_argument("--quick", action="store_true", help="smaller runs (the CPU test)")
    ap.add_argument("--verbose", action="store_true", help="show the project's logs and warnings")
    args = ap.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        ap.error(f"--only: unknown check(s) {', '.join(unknown)} (choose from {', '.join(names)})")
    selected = [c for c in checks if not only or c.name in only]
    device = pick_device(args.device)
    if device is None:
        print(f"error: --device cuda, but this torch ({torch.__version__}) sees no CUDA device", file=sys.stderr)
        return 2
    if not args.verbose:
        logging.basicConfig(level=logging.ERROR)
        warnings.filterwarnings("ignore")
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if device.type == "cuda":
        # cuBLAS reads this when its first handle is made: set before any CUDA work, so that
        # fp16_resume's train.deterministic gets deterministic GEMMs after earlier checks made handles
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    counts = {"OK": 0, "FAIL": 0, "SKIP": 0}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = Ctx(device=device, quick=args.quick, tmp=tmp)
        for check in selected:
            res = run_check(check, ctx, verbose=args.verbose)
            counts[res.status] += 1
            print(f"{res.status} {check.name}: {res.detail}", flush=True)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"RESULT ok={counts['OK']} fail={counts['FAIL']} skip={counts['SKIP']} device={label}", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
