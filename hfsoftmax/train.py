"""The training loop: one process or torchrun (DDP), any head, checkpoint/resume, metrics.

Usage::

    python -m hfsoftmax.train --config configs/synthetic.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m hfsoftmax.train --config ... train.out_dir=runs/x

The loop is step-based (``train.steps``), the lr is a pure function of the step, and the data order is
a pure function of (seed, epoch, rank) (``data/sampler.py``), so stopping and resuming from a checkpoint
(``checkpoint.py``) continues exactly where an uninterrupted run would be. Rank 0 alone writes the
config, logs (``metrics.py``), progress bar and checkpoints; every rank runs the same code otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from . import dist as hdist
from .backbones import get_backbone
from .checkpoint import (CheckpointError, find_latest_checkpoint, git_sha, load_checkpoint, load_pretrained,
                         rng_state, save_checkpoint, set_rng_state, write_sharded_snapshot)
from .config import Config, ConfigError, OptimConfig, load_config, save_config
from .data.sampler import batches_from
from .data.transforms import normalize_images
from .heads import ClassifierHead, build_head
from .heads.margin import normalize_margin
from .metrics import LineProgress, LossWatch, MetricsLogger, require_tensorboard

logger = logging.getLogger("hfsoftmax.train")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, lost parameter server...); the message says why."""


def check_run_dir(cfg: Config) -> None:
    """A run directory holds one run: starting afresh (no train.resume) where a run already wrote its
    checkpoint or metrics is refused, unless train.overwrite=true, which removes that run's files."""
    run_dir = cfg.train.out_dir
    if cfg.train.resume or not os.path.isdir(run_dir):
        return
    ours = [p for p in glob.glob(os.path.join(run_dir, "ckpt_*.pt")) + glob.glob(os.path.join(run_dir, "store_*"))
            + [os.path.join(run_dir, "metrics.jsonl")] if os.path.exists(p)]
    if not ours:
        return
    if not cfg.train.overwrite:
        raise TrainingError(f"train.out_dir={run_dir} already holds a run ({', '.join(sorted(os.path.basename(p) for p in ours)[:3])}"
                            f"{', ...' if len(ours) > 3 else ''}): continue it with train.resume=auto, start afresh "
                            f"with train.overwrite=true (its files are removed), or choose another train.out_dir")
    import shutil
    ours += [p for p in (os.path.join(run_dir, "tensorboard"),) if os.path.isdir(p)]   # its event files too
    for p in ours:
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    logger.warning("train.overwrite=true: removed %d files of the previous run in %s", len(ours), run_dir)


# --------------------------------------------------------------------------------------------- #
# Schedules: pure functions of the step.

def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for ``step`` (0-based): linear warmup, then constant / step / cosine decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(step >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))
    raise ConfigError(f"config key 'optim.schedule': unknown schedule '{cfg.schedule}'")


# --------------------------------------------------------------------------------------------- #
# Mixed precision.

AMP_MODES = ("off", "bf16", "fp16")


class Precision:
    """``train.amp``: autocast for the backbone (bf16 or fp16), a GradScaler for fp16.

    Heads compute their logits, margins and softmax in fp32 whatever the autocast (heads/full.py, as
    arcface_torch does); the selective head divides its pushed gradient by the loss scale
    (``grad_scale``), and the store's update of a step is applied exactly when the scaler lets the
    backbone's optimizer step (:meth:`step` says whether it did; ``head.end_step(applied=...)``).
    The scaler's state travels in checkpoints, so an fp16 resume is the uninterrupted run.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in AMP_MODES:
            raise ConfigError(f"config key 'train.amp': unknown value '{mode}' (choose {', '.join(AMP_MODES)})")
        self.mode, self.device = mode, device
        self.dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        if self.scaler is not None:
            # the scale tensor exists from here on (GradScaler creates it at its first scale() call),
            # so grad_scale() can hand the step-0 scale to the head before the first backward
            self.scaler.scale(torch.ones((), device=device))
        if (self.dtype == torch.bfloat16 and device.type == "cuda"
                and not torch.cuda.is_bf16_supported(including_emulation=False)):
            logger.warning("train.amp=bf16 on %s, which has no native bf16 (emulated: slower than fp32); use "
                           "train.amp=fp16 on this GPU", torch.cuda.get_device_name(device))

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def grad_scale(self) -> torch.Tensor | float | None:
        """The loss scale the next backward applies (fp16), else None: the scaler's device tensor
        when torch exposes it (reading it as a float would wait for the GPU every step)."""
        if self.scaler is None:
            return None
        get = getattr(self.scaler, "_get_scale_async", None)
        scale = get() if get is not None else None
        return scale if scale is not None else float(self.scaler.get_scale())

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step (through the scaler for fp16); returns whether it ran: False when the
        scaler skipped it for inf/NaN gradients (the heads skip their store update then too)."""
        if self.scaler is None:
            optimizer.step()
            return True
        ran: list[bool] = []
        hook = optimizer.register_step_post_hook(lambda *_: ran.append(True))
        try:
            self.scaler.step(optimizer)     # its own found-inf decision (one host sync, the scaler's)
        finally:
            hook.remove()
        self.scaler.update()
        return bool(ran)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


# --------------------------------------------------------------------------------------------- #
# Building the pieces from the config.

@dataclass
class VerificationSet:
    name: str
    images: torch.Tensor | None   # [2N, 3, S, S], pairs interleaved; None: decode `path` when used
    issame: np.ndarray | None     # [N] bool
    path: str                     # the .bin (the final report reads it through eval.report)


def build_datasets(cfg: Config, run_dir: str | None) -> tuple[Dataset, int, list[VerificationSet]]:
    """Training set, its K, and the held-out verification sets.

    Synthetic (``data.path`` empty): held-out identities rendered as pairs (and, on rank 0, written to
    ``<run_dir>/heldout.bin`` so ``scripts/eval.sh`` can evaluate the same pairs later).
    A dataset folder: every ``*.bin`` in it (lfw.bin, cfp_fp.bin, ...) is a verification set.
    """
    from .data import synthetic

    if not cfg.data.path:
        spec = synthetic.spec_from_config(cfg.data)
        train_set = synthetic.SyntheticIdentities(spec)
        if run_dir is not None:
            # Rank 0 writes the pairs as a .bin and reads them back, so the start, final and
            # scripts/eval.sh figures all score the very same (JPEG-decoded) pixels.
            from .data.binset import load_bin
            path = synthetic.write_heldout_bin(spec, cfg.data.val_identities, cfg.data.val_pairs,
                                               os.path.join(run_dir, "heldout.bin"))
            images, issame = load_bin(path, cfg.data.image_size)
            return train_set, spec.num_classes, [VerificationSet("heldout", images, np.asarray(issame), path)]
        return train_set, spec.num_classes, []          # only rank 0 evaluates
    if not os.path.exists(cfg.data.path):
        raise FileNotFoundError(f"dataset path does not exist: {cfg.data.path}")
    from .data.datasets import dataset_from_path, write_class_map
    from .data.features import is_features_path

    # uint8 through the workers' queues (a quarter of float32's bytes), normalised on the device;
    # a features file's float32 rows pass normalize_images untouched
    try:      # a malformed list line, labels of the wrong length...: one line naming the file and line
        train_set = dataset_from_path(cfg.data.path, cfg.data.image_size, train=True, skip_bad=cfg.data.skip_bad,
                                      uint8=True, labels=cfg.data.labels, flip=cfg.data.flip)
    except ValueError as e:
        raise ConfigError(f"data.path: {e}") from None
    ver: list[VerificationSet] = []
    if run_dir is not None and getattr(train_set, "classes", None) is not None:
        # an image folder's class-name -> id map (sorted folder names): what the ids in logs mean
        write_class_map(train_set.classes, os.path.join(run_dir, "classes.json"))
    if run_dir is not None and not is_features_path(cfg.data.path):   # .bin pairs are images
        # Only rank 0 evaluates. The images are decoded at each evaluation, not held: lfw + cfp_fp +
        # agedb_30 at 112x112 would be ~5 GB of float32 kept for the whole run.
        folder = cfg.data.path if os.path.isdir(cfg.data.path) else os.path.dirname(cfg.data.path)
        for b in sorted(glob.glob(os.path.join(folder, "*.bin"))):
            ver.append(VerificationSet(os.path.splitext(os.path.basename(b))[0], None, None, b))
    return train_set, int(train_set.num_classes), ver


def resolve_store(cfg: Config, num_classes: int, info: hdist.DistInfo) -> None:
    """``store.kind=auto`` -> local, remote or sharded (:func:`hfsoftmax.heads.sharded.choose_store_kind`),
    logged with the reason. The full softmax keeps W replicated in the module (``auto``: local)."""
    from .heads.sharded import resolve_store_kind

    if cfg.head.name not in ("hf", "random"):
        cfg.store.kind = "local"
        return
    kind, why = resolve_store_kind(cfg, num_classes, info.world_size, info.device)
    if kind == "remote" and not cfg.store.address:
        raise ConfigError(f"store.kind=auto chose a parameter server ({why}); scripts/train_hf.sh starts one, "
                          f"or give store.address=tcp://host:port")
    if info.is_main:
        logger.info("store.kind=auto: %s (%s)", kind, why)
    cfg.store.kind = kind


def build_store(cfg: Config, num_classes: int, info: hdist.DistInfo) -> Any:
    """The parameter store behind a selective head (None for heads that keep W on the device)."""
    if cfg.head.name not in ("hf", "random") or cfg.store.kind == "sharded":
        return None
    from .heads.selective import make_store

    return make_store(cfg, num_classes, info)


class Model(nn.Module):
    """Backbone + head as one module, so DDP all-reduces the gradients of both."""

    def __init__(self, backbone: nn.Module, head: ClassifierHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images), labels)


# --------------------------------------------------------------------------------------------- #
# Evaluation and logging.

def verify(backbone: nn.Module, sets: list[VerificationSet], device: torch.device,
           image_size: int) -> dict[str, dict[str, float]]:
    from .eval.extract import extract_features
    from .eval.verification import evaluate

    results = {}
    for vs in sets:
        images, issame = vs.images, vs.issame
        if images is None:
            from .data.binset import load_bin
            images, issame = load_bin(vs.path, image_size)
        feats = extract_features(backbone, images, batch_size=256, flip=True, device=device, progress=False)
        r = evaluate(feats, np.asarray(issame), nfolds=10)
        results[vs.name] = {"accuracy": float(r["accuracy"]), "accuracy_std": float(r["accuracy_std"]),
                            "val": r["val"], "far": r["far"]}   # None when the negatives cannot resolve the FAR
    return results


def identify(backbone: nn.Module, head: ClassifierHead, images: torch.Tensor, labels: np.ndarray,
             device: torch.device) -> dict[str, float]:
    """Closed-set identification: top-1 / top-5 of new images of training identities over all K
    classes, scored by the trained head (its rows pulled from the store for selective heads)."""
    from .eval.extract import extract_features

    from .eval.classify import summarize, topk_hits

    head.flush()                     # every push has landed
    feats = extract_features(backbone, images, batch_size=256, flip=True, device=device, progress=False)
    return summarize(topk_hits(head, torch.from_numpy(feats), torch.as_tensor(labels), device))


def open_val_set(cfg: Config, num_classes: int) -> Dataset | None:
    """The held-out list of ``data.val_path`` (or the rec2img folder's ``val_list.txt``), checked to be
    labelled within the K training classes; None when there is none. Rank 0 only."""
    from .eval.classify import open_val_set as open_set, val_list_path

    path = val_list_path(cfg.data.path, cfg.data.val_path)
    if not path:
        return None
    if not cfg.data.val_path:
        logger.info("held-out list %s found beside data.path: top-1/top-5 over all K on it (data.val_path=none: off)",
                    path)
    try:
        val_set = open_set(path, cfg.data.image_size, skip_bad=cfg.data.skip_bad)
    except ValueError as e:
        raise ConfigError(f"data.val_path: {e}") from None
    n = int(getattr(val_set, "num_classes", 0))
    if n > num_classes:
        raise ConfigError(f"data.val_path {path}: labels up to {n - 1}, but the run trains num_classes={num_classes}: "
                          f"the held-out list must hold images of training identities, labelled as in training")
    logger.info("held-out classification set %s: %d images", path, len(val_set))
    return val_set


def classify(backbone: nn.Module, head: ClassifierHead, val_set: Dataset, cfg: Config,
             device: torch.device) -> dict[str, Any]:
    """Top-1 / top-5 of the held-out set over all K (:func:`hfsoftmax.eval.classify.classify_dataset`)."""
    from .data.features import FeatureDataset, classify_features
    from .eval.classify import classify_dataset

    if isinstance(val_set, FeatureDataset):    # [d_in] rows: no flip, no image extraction
        return classify_features(backbone, head, val_set, device, batch_size=256)
    return classify_dataset(backbone, head, val_set, device, batch_size=256, num_workers=cfg.data.num_workers)


def score_over_k(cfg: Config, backbone: nn.Module, head: ClassifierHead, val_set: Dataset | None,
                 device: torch.device) -> dict[str, Any]:
    """The end of a run's top-k over all K: ``classification`` of the held-out list (when there is
    one) and ``identification`` of new images of the synthetic identities (when they train)."""
    out: dict[str, Any] = {}
    if val_set is not None:
        out["classification"] = classify(backbone, head, val_set, cfg, device)
    if not cfg.data.path and cfg.data.val_samples > 0:
        from .data.synthetic import heldout_samples, spec_from_config
        images, labels = heldout_samples(spec_from_config(cfg.data), cfg.data.val_samples)
        out["identification"] = identify(backbone, head, images, labels, device)
    return out


def val_record(r: dict[str, Any]) -> dict[str, Any]:
    """The metrics.jsonl fields of a :func:`classify` result."""
    return {"val_top1": r["top1"], "val_top5": r["top5"], "val_samples": r["samples"]}


# --------------------------------------------------------------------------------------------- #
# The loop.

@contextlib.contextmanager
def backend_flags(deterministic: bool, tf32: bool) -> Iterator[None]:
    """``train.deterministic`` / ``train.tf32`` for the run, the previous global settings restored after.

    deterministic: ``torch.use_deterministic_algorithms`` (an op without a deterministic kernel raises,
    naming itself), cuDNN's deterministic algorithms without autotuning, and the cuBLAS workspace
    setting its reproducibility needs (``CUBLAS_WORKSPACE_CONFIG``, when not set already; it takes
    effect if no cuBLAS handle exists yet). Costs speed on CUDA (slower atomics-free kernels, no
    autotuning: typically 10-30 %); CPU runs are bitwise reproducible without it. Otherwise cuDNN
    autotunes (``cudnn.benchmark``: the input size is fixed). tf32: fp32 matmuls on tensor cores
    (~10 bits of mantissa), off by default.
    """
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
        torch.set_float32_matmul_precision(before[3])


def resolve_threads(threads: int, world_size: int = 1) -> int:
    """``train.threads``: > 0 as given; 0 -> the cores this process may run on divided among the ranks
    on this machine (torchrun's ``LOCAL_WORLD_SIZE``, else the world size), at least 1."""
    if threads < 0:
        raise ConfigError(f"config key 'train.threads' must be >= 0 (0: cores / local ranks), got {threads}")
    if threads:
        return threads
    try:
        cores = len(os.sched_getaffinity(0))   # what taskset / a container's cpuset leaves us
    except AttributeError:                     # macOS, Windows
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)) or 1)
    return max(1, cores // max(1, local))


@contextlib.contextmanager
def torch_threads(threads: int, world_size: int = 1) -> Iterator[None]:
    """``torch.set_num_threads`` for the run (:func:`resolve_threads`), the previous value restored after.

    Torch's default (all cores per process) oversubscribes a machine shared by several ranks, a
    parameter server and loader workers: on 2 cores a tiny-CNN step ran 5x slower than with one thread.
    """
    before = torch.get_num_threads()
    n = resolve_threads(threads, world_size)
    torch.set_num_threads(n)
    logger.info("torch threads: %d (train.threads=%d%s)", n, threads, ": cores / local ranks" if not threads else "")
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_labels(labels: torch.Tensor, num_classes: int, step: int) -> None:
    """A batch's host labels lie in [0, K), or a one-line error (checked before the device sees them:
    on CUDA an out-of-range label is a device-side assert, or, hashed by MACH, a wrong class)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise TrainingError(f"batch of step {step}: labels must lie in [0, num_classes={num_classes}), got "
                            f"[{int(labels.min())}, {int(labels.max())}]; check the dataset's labels")


def check_finite(first_bad: torch.Tensor, lr: float, run_dir: str) -> None:
    """Stop if any rank saw a non-finite loss since the start (``first_bad``: its first step, else -1).
    A collective: every rank calls it at the same steps."""
    bad = int(hdist.all_reduce_max(first_bad))
    if bad >= 0:
        raise TrainingError(f"non-finite loss at step {bad} (lr now {lr:.4g}); lower optim.lr or check the data. "
                            f"Last checkpoint: {find_latest_checkpoint(run_dir) or 'none'}")

def train(cfg: Config) -> dict[str, Any]:
    """Run training as configured; returns the final metrics (on every rank)."""
    normalize_margin(cfg.head)        # before the config is saved: the run dir says what it trains
    from .data.features import resolve_input_dim
    cfg.model.input_dim = resolve_input_dim(cfg)   # features' d_in (0 for images), saved for eval to rebuild
    if cfg.train.tensorboard:
        require_tensorboard()
    info = hdist.init_distributed(cfg.train.device)
    with backend_flags(cfg.train.deterministic, cfg.train.tf32), torch_threads(cfg.train.threads, info.world_size):
        return _train(cfg, info)


def _train(cfg: Config, info: hdist.DistInfo) -> dict[str, Any]:
    if info.is_main:
        check_run_dir(cfg)
    hdist.barrier()
    torch.manual_seed(cfg.train.seed + info.rank)
    np.random.seed(cfg.train.seed + info.rank)
    random.seed(cfg.train.seed + info.rank)
    run_dir = cfg.train.out_dir
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        logger.info("git %s | config %s", git_sha(), json.dumps(cfg.to_dict()))
    hdist.barrier()

    device = info.device
    # the backbone first: a bad name or image size fails before the data is prepared
    backbone = get_backbone(cfg.model.backbone, cfg.model.feature_dim, cfg.data.image_size,
                            dropout=cfg.model.dropout, norm=cfg.model.norm, width=cfg.model.width,
                            input_dim=cfg.model.input_dim, hidden_dim=cfg.model.hidden_dim).to(device)
    train_set, num_classes, ver_sets = build_datasets(cfg, run_dir if info.is_main else None)
    val_set = open_val_set(cfg, num_classes) if info.is_main else None
    if cfg.model.pretrained and not cfg.train.resume:
        load_pretrained(backbone, cfg.model.pretrained)
    if info.distributed and cfg.model.sync_bn and device.type == "cuda":
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    if cfg.store.kind == "auto":
        resolve_store(cfg, num_classes, info)
    store = build_store(cfg, num_classes, info)
    if cfg.store.kind == "sharded":            # W split by rows across the ranks' devices
        from .heads.sharded import make_sharded_head
        head: ClassifierHead = make_sharded_head(cfg, num_classes, device)
    else:
        head = build_head(cfg.head, num_classes, cfg.model.feature_dim, device=device, store=store,
                          seed=cfg.train.seed, pipeline=cfg.store.pipeline, prefetch=cfg.store.prefetch).to(device)
    if val_set is None and not head.scores_alone():
        val_set = open_val_set(cfg, num_classes)      # W split across the ranks: every rank scores it
    model = Model(backbone, head)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                                nesterov=cfg.optim.nesterov)
    precision = Precision(cfg.train.amp, device)

    start_step = 0
    resume = cfg.train.resume
    if resume == "auto":
        resume = find_latest_checkpoint(run_dir) or ""
    if resume:
        ckpt = load_checkpoint(resume, cfg, num_classes, info.world_size, auto=cfg.train.resume == "auto")
        try:
            model.backbone.load_state_dict(ckpt["model"])
        except RuntimeError as e:   # other layers (e.g. model.norm, model.backbone) than this run's
            first = str(e).strip().splitlines()
            raise CheckpointError(f"checkpoint {resume} does not fit this run's backbone ({cfg.model.backbone}, "
                                  f"norm {cfg.model.norm}): {' '.join(first[:2])[:300]}") from None
        model.head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        precision.load_state_dict(ckpt.get("scaler") or {})
        start_step = int(ckpt["step"])
        if ckpt.get("store_snapshot") and head.store is not None and info.is_main:
            head.store.restore(os.path.join(os.path.dirname(resume), ckpt["store_snapshot"]))
        elif ckpt.get("store_snapshot") and head.sharded:              # every rank reads its rows
            head.restore(os.path.join(os.path.dirname(resume), ckpt["store_snapshot"]))
        states = ckpt.get("rng")
        states = [states] if isinstance(states, dict) else states     # older checkpoints: rank 0's only
        if states and len(states) == info.world_size:
            set_rng_state(states[info.rank], device)
        elif states:
            logger.warning("checkpoint %s holds the RNG states of %d rank(s), this run has %d: RNG not restored "
                           "(dropout draws differ from the uninterrupted run)", resume, len(states), info.world_size)
        hdist.barrier()
        if info.is_main:
            logger.info("resumed from %s at step %d", resume, start_step)

    if store is not None and start_step == 0 and not cfg.store.allow_step_offset:
        at = int(store.step)
        if at != 0:
            raise TrainingError(f"parameter server {cfg.store.address or 'in-process'} is at step {at}, but this run "
                                f"starts at step 0 (no checkpoint in {run_dir}): another run already moved its W. "
                                f"Restart the server (or --restore a snapshot), or pass store.allow_step_offset=true")

    ddp_model: nn.Module = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    total = cfg.train.steps
    metrics = MetricsLogger(os.path.join(run_dir, "metrics.jsonl"),
                            os.path.join(run_dir, "tensorboard") if cfg.train.tensorboard else None) \
        if info.is_main else None
    bar = None
    if info.is_main and cfg.train.progress:
        if sys.stdout.isatty():
            from tqdm import tqdm
            bar = tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stdout)
        else:   # a log file: one plain line per log_every steps, not a carriage-return record per step
            bar = LineProgress(total, start_step)
    n_params = sum(p.numel() for p in backbone.parameters())
    if info.is_main:
        logger.info("K=%d d=%d backbone=%s (%.2fM params) head=%s world=%d device=%s global_batch=%d",
                    num_classes, cfg.model.feature_dim, cfg.model.backbone, n_params / 1e6, cfg.head.name,
                    info.world_size, device, cfg.train.batch_size * info.world_size)

    result: dict[str, Any] = {"num_classes": num_classes, "start_step": start_step}
    if start_step == 0:
        if ver_sets and info.is_main:
            start = verify(backbone, ver_sets, device, cfg.data.image_size)
            result["start_verification"] = start
            metrics.log(event="eval", step=0, **{f"{n}_acc": r["accuracy"] for n, r in start.items()})
        hdist.wait_for_main()

    model.train()
    t_start = time.time()
    try:
        _run_steps(cfg, info, train_set, model, ddp_model, head, optimizer, precision, ver_sets, metrics,
                          bar, start_step, num_classes, val_set=val_set)
    except (ConnectionError, TimeoutError) as e:
        # The parameter server is gone or silent: say so, and where to resume from.
        raise TrainingError(f"{e}. Last checkpoint: {find_latest_checkpoint(run_dir) or 'none'}; "
                            f"rerun with train.resume=auto to continue from it") from e
    if bar is not None:
        bar.close()

    wall = time.time() - t_start
    result.update({"steps": total, "wall_s": wall,
                   "samples_per_s": (total - start_step) * cfg.train.batch_size * info.world_size / max(wall, 1e-9)})
    # top-k over all K: rank 0 alone, or every rank when W is split across them (each scores its rows)
    scored = score_over_k(cfg, backbone, head, val_set, device) if info.is_main or not head.scores_alone() else {}
    if (ver_sets or scored) and info.is_main:
        rec = {}
        if ver_sets:
            # The same report scripts/eval.sh writes (results.md, results.json, roc_<set>.png), on the .bins.
            from .eval.report import evaluate_bins, format_markdown
            eval_dir = os.path.join(run_dir, "eval")
            final = evaluate_bins(backbone, [vs.path for vs in ver_sets], cfg.data.image_size, eval_dir,
                                  device=device, header=f"{cfg.head.name} head, step {total}",
                                  title=f"{cfg.model.backbone}, {cfg.head.name} head, step {total}")
            result["verification"] = final
            result["report"] = format_markdown(final)
            result["report_dir"] = eval_dir
            rec.update({f"{n}_acc": r["accuracy"] for n, r in final.items()})
        if "classification" in scored:
            result["classification"] = scored["classification"]
            rec.update(val_record(result["classification"]))
        if "identification" in scored:
            result["identification"] = scored["identification"]
            rec.update(heldout_top1=result["identification"]["top1"], heldout_top5=result["identification"]["top5"])
        metrics.log(event="eval", step=total, **rec)
    if info.is_main:
        metrics.log(event="done", **{k: v for k, v in result.items() if isinstance(v, (int, float))})
        metrics.close()
    head.close()
    hdist.wait_for_main()          # rank 0's final evaluation may outlast the process group's timeout
    return result



def _run_steps(cfg: Config, info: hdist.DistInfo, train_set: Dataset, model: Model, ddp_model: nn.Module,
               head: ClassifierHead, optimizer: torch.optim.Optimizer, precision: Precision,
               ver_sets: list[VerificationSet], metrics: MetricsLogger | None, bar: Any, start_step: int,
               num_classes: int, val_set: Dataset | None = None) -> int:
    """Steps start_step .. train.steps - 1: forward, backward, update, logs, evals, checkpoints.

    No host sync of its own per step: the loss's finiteness accumulates on the device (the first bad
    step) and is checked, over all ranks, at log steps and before every checkpoint."""
    device, run_dir, total = info.device, cfg.train.out_dir, cfg.train.steps
    backbone = model.backbone
    t_start = t_last = time.time()
    data_time, seen, n_since = 0.0, 0, 0
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)   # first step with a non-finite loss
    watch = LossWatch(num_classes, cfg.optim.warmup_steps)             # a diverging or flat loss, said once
    step = start_step
    if start_step >= total:
        return step
    it = batches_from(train_set, cfg, info, start_step)
    t_data = time.time()
    nxt = next(it)
    data_time += time.time() - t_data
    while nxt is not None:
        step, (images, labels) = nxt
        lr = lr_at(step, cfg.optim, total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        check_labels(labels, num_classes, step)        # on the host: no sync, no device-side assert
        # the host labels: the selective head plans from them without waiting for the forward
        head.begin_step(step, lr, grad_scale=precision.grad_scale(), labels=labels)
        images = normalize_images(images.to(device, non_blocking=True))   # uint8 from disk datasets
        with precision.autocast():
            loss = ddp_model(images, labels.to(device, non_blocking=True))
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                torch.full_like(first_bad, step), first_bad)
        # the next batch now (the loader has it ready), so the head can plan its step meanwhile
        t_data = time.time()
        nxt = next(it) if step + 1 < total else None
        data_time += time.time() - t_data
        if nxt is not None:
            head.prefetch(nxt[0], nxt[1][1])
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        if cfg.train.grad_clip > 0:
            precision.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        stepped = precision.step(optimizer)
        head.end_step(step, applied=stepped)           # W moves exactly when the backbone does
        loss_sum += loss.detach()
        n_since += 1
        seen += images.shape[0] * info.world_size
        done = step + 1

        is_ckpt = (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0) or done == total
        if done % cfg.train.log_every == 0 or done == total or is_ckpt:
            check_finite(first_bad, lr, run_dir)
        if done % cfg.train.log_every == 0 or done == total:
            mean_loss = float(hdist.all_reduce_mean(loss_sum / n_since))
            now = time.time()
            rate = seen / max(now - t_last, 1e-9)
            if info.is_main:
                rec = {"event": "train", "step": done, "loss": mean_loss, "lr": lr, "samples_per_s": rate,
                       "data_time_s": data_time, "elapsed_s": now - t_start}
                rec.update(head.stats())
                metrics.log(**rec)
                warning = watch.observe(done, mean_loss)
                if warning is not None:          # once per sign, one line; the run goes on
                    logger.warning(warning)
                    metrics.log(event="warning", step=done, message=warning)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.3g}", sps=f"{rate:.0f}")
            loss_sum.zero_()
            n_since, seen, data_time, t_last = 0, 0, 0.0, now
        if bar is not None:
            bar.update(1)
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < total:
            rec = {}
            if val_set is not None and (info.is_main or not head.scores_alone()):   # W split: every rank
                rec.update(val_record(classify(backbone, head, val_set, cfg, device)))
            if info.is_main and (ver_sets or val_set is not None):
                if ver_sets:
                    r = verify(backbone, ver_sets, device, cfg.data.image_size)
                    rec.update({f"{n}_acc": v["accuracy"] for n, v in r.items()})
                metrics.log(event="eval", step=done, **rec)
            hdist.wait_for_main()     # every rank; a long evaluation must not trip the 600 s collectives
        if is_ckpt:
            head.flush()              # the snapshot must hold this step's update
            rngs = hdist.all_gather_object(rng_state(device))
            hdist.barrier()
            sharded = write_sharded_snapshot(run_dir, done, head) if head.sharded else None   # every rank
            if info.is_main:
                keep = bool(cfg.train.keep_every) and done % cfg.train.keep_every == 0
                save_checkpoint(run_dir, done, cfg, model, optimizer, num_classes, keep=keep, rng=rngs,
                                scaler=precision.state_dict(), sharded_snapshot=sharded)
            hdist.wait_for_main()     # a large store snapshot may take minutes
        if done >= total:
            break
    return step


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    p = argparse.ArgumentParser(description="Train a backbone with a massive-classification head.")
    p.add_argument("--config", default=None, help="YAML config (layered on its _base_)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 head.name=hf")
    a = p.parse_args(argv)
    return a.config, a.overrides


# Errors that are the user's input, reported on one line without a traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from paramserver.api import StoreError

    from .data.recordio import RecordIOError
    return (ConfigError, CheckpointError, TrainingError, FileNotFoundError, NotADirectoryError, TimeoutError,
            ConnectionError, RecordIOError, StoreError)


def interrupted_message(run_dir: str | None) -> str:
    """What Ctrl-C prints: the checkpoint ``train.resume=auto`` would continue from, or that there is none
    (with ``train.ckpt_every=0`` the only checkpoint is the final one)."""
    ckpt = find_latest_checkpoint(run_dir) if run_dir and os.path.isdir(run_dir) else None
    if ckpt is None:
        where = f" in {run_dir}" if run_dir else ""
        return (f"interrupted (Ctrl-C); no checkpoint{where} to continue from (train.ckpt_every=0 writes one only "
                f"at the end; train.ckpt_every=N every N steps): start afresh with train.overwrite=true")
    return f"interrupted (Ctrl-C); continue from {ckpt} with train.resume=auto"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    run_dir: str | None = None
    try:
        path, overrides = parse_args(argv)
        cfg = load_config(path, overrides)
        run_dir = cfg.train.out_dir
        result = train(cfg)
        if hdist.is_main_process():
            if "report" in result:
                print(f"\nVerification, 10-fold (report in {result['report_dir']}):")
                print(result["report"])
            if "start_verification" in result:
                s = result["start_verification"]
                print("untrained start: " + ", ".join(f"{n} {100 * r['accuracy']:.2f}%" for n, r in s.items()))
            if "classification" in result:
                r = result["classification"]
                print(f"classification over the K={result['num_classes']} training classes ({r['samples']} held-out "
                      f"images): top-1 {100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}%")
            if "identification" in result:
                r = result["identification"]
                print(f"identification over the K={result['num_classes']} training identities ({r['samples']} new "
                      f"images): top-1 {100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}%")
            print(f"steps {result['steps']}  wall {result['wall_s']:.1f}s  samples/s {result['samples_per_s']:.1f}")
        return 0
    except _user_errors() as e:
        if os.environ.get("HFSOFTMAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        _note_error(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        print(interrupted_message(run_dir), file=sys.stderr, flush=True)
        # no interpreter teardown: a socket a worker thread still holds would make ZeroMQ's context
        # wait for it at exit (checkpoints are atomic, nothing is lost)
        os._exit(130)
    finally:
        hdist.cleanup()


def _note_error(line: str) -> None:
    """Under torchrun a rank's one-line error drowns in the launcher's traceback: the first rank to
    fail also writes it to $HFSOFTMAX_ERROR_FILE, which the launch scripts print last."""
    path = os.environ.get("HFSOFTMAX_ERROR_FILE")
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)   # the first writer wins
    except OSError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        rank = os.environ.get("RANK")
        f.write((f"[rank {rank}] " if rank is not None else "") + line.splitlines()[0] + "\n")


if __name__ == "__main__":
    sys.exit(main())
