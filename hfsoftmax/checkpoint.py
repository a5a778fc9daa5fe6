"""Checkpoints: the one reader and writer for training, evaluation and tools.

A checkpoint is a dict written atomically (temp file + ``os.replace``) by :func:`save_checkpoint`:
``step``, ``num_classes``, ``config`` (the resolved Config), ``model`` (the unwrapped backbone's
state dict), ``head``, ``optimizer``, ``scaler`` (fp16 GradScaler state), ``rng`` (one state per rank,
each with its own CUDA device's), ``store_snapshot`` (the parameter store's snapshot directory beside
it, relative), ``global_batch``, ``world_size``, ``git_sha``. :func:`read_checkpoint` is the one
``torch.load`` (a one-line error naming the file); :func:`load_checkpoint` also checks it against
the run (K, d, head, dataset, global batch). A run directory holds one run (:func:`check_run_dir`).
"""
from __future__ import annotations

import glob
import logging
import os
import random
import re
import subprocess
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from paramserver.snapshot import run_snapshot_name

from . import dist as hdist
from .config import Config

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint does not fit the run (other K or d, other head) or cannot be read."""


def read_checkpoint(path: str, need: Iterable[str] = ("model", "step", "config"), mmap: bool = False
                    ) -> dict[str, Any]:
    """``torch.load`` a checkpoint on the CPU; a file that does not load, or lacks a ``need``ed entry,
    is a one-line :class:`CheckpointError` naming it. ``mmap``: map the tensors instead of reading them."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:   # torch raises several types for a file that is not a checkpoint
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    for key in need:
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry (not written by hfsoftmax.train?)")
    return ckpt


def checkpoint_path(run_dir: str, step: int | None = None) -> str:
    return os.path.join(run_dir, "ckpt_last.pt" if step is None else f"ckpt_{step:08d}.pt")


def checkpoint_step(path: str) -> int | None:
    """The step of a kept checkpoint ``ckpt_<step>.pt`` (:func:`checkpoint_path`), None for any other file."""
    m = re.fullmatch(r"ckpt_(\d+)\.pt", os.path.basename(path))
    return int(m.group(1)) if m else None


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_latest_checkpoint(run_dir: str) -> str | None:
    """Newest complete checkpoint in the run dir: ckpt_last.pt, else the highest ckpt_<step>.pt.

    Writes are atomic, so a file with the final name is complete; one that still fails to open
    (a damaged disk, a copy cut short) is skipped with a warning rather than blocking the resume.
    """
    last = os.path.join(run_dir, "ckpt_last.pt")
    numbered = sorted((p for p in glob.glob(os.path.join(run_dir, "ckpt_*.pt")) if checkpoint_step(p) is not None),
                      key=checkpoint_step, reverse=True)
    for p in ([last] if os.path.exists(last) else []) + numbered:
        try:
            read_checkpoint(p, need=(), mmap=True)
            return p
        except CheckpointError as e:
            logger.warning("skipping unreadable checkpoint %s: %s", p, e)
    return None


def load_pretrained(backbone: nn.Module, path: str) -> None:
    """Backbone weights for fine-tuning: an hfsoftmax checkpoint ('model') or a bare state dict,
    arcface_torch IResNet and MobileFaceNet names mapped (hfsoftmax.backbones.convert); a mismatch is one line."""
    from .backbones.convert import backbone_state
    try:
        obj = read_checkpoint(path, need=())
    except CheckpointError as e:
        raise CheckpointError(f"model.pretrained={path}: {e}") from None
    try:
        backbone.load_state_dict(backbone_state(obj)[0])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"model.pretrained={path} does not fit model.backbone: "
                              f"{str(e).strip().splitlines()[0][:300]}") from None
    logger.info("backbone initialised from %s", path)


def load_checkpoint(path: str, cfg: Config, num_classes: int, world_size: int = 1,
                    auto: bool = False) -> dict[str, Any]:
    """Load and check a checkpoint against the run: same K, d and head (and, for ``resume=auto``,
    the same dataset), the same global batch unless allowed, or a one-line refusal naming both."""
    ckpt = read_checkpoint(path)
    k_ck, d_ck = ckpt.get("num_classes"), ckpt["config"]["model"]["feature_dim"]
    if k_ck != num_classes:
        raise CheckpointError(f"checkpoint {path} was trained with num_classes={k_ck}, "
                              f"but this run has num_classes={num_classes}")
    if d_ck != cfg.model.feature_dim:
        raise CheckpointError(f"checkpoint {path} was trained with feature_dim={d_ck}, "
                              f"but this run has model.feature_dim={cfg.model.feature_dim}")
    h_ck = ckpt["config"]["head"]["name"]
    if h_ck != cfg.head.name:
        raise CheckpointError(f"checkpoint {path} was trained with head.name={h_ck}, "
                              f"but this run has head.name={cfg.head.name}")
    data_ck = ckpt["config"].get("data", {}).get("path", "")
    same_data = (os.path.abspath(data_ck) == os.path.abspath(cfg.data.path)) if (data_ck and cfg.data.path) \
        else data_ck == cfg.data.path
    if auto and not same_data:
        raise CheckpointError(f"train.resume=auto: the run in {os.path.dirname(path)} was trained on data.path="
                              f"{data_ck or '(synthetic)'}, this run has data.path={cfg.data.path or '(synthetic)'}; "
                              f"choose another train.out_dir, or name the checkpoint (train.resume={path}) to start "
                              f"from it on purpose")
    gb_ck = ckpt.get("global_batch")
    gb = cfg.train.batch_size * world_size
    if gb_ck is not None and gb_ck != gb:
        if not cfg.train.allow_batch_change:
            raise CheckpointError(f"checkpoint {path} was trained with a global batch of {gb_ck} "
                                  f"({ckpt.get('world_size', '?')} ranks), this run has {gb} "
                                  f"({cfg.train.batch_size} x {world_size} ranks): pass train.allow_batch_change=true "
                                  f"to resume anyway (the lr is not rescaled), or use the checkpoint's layout")
        logger.warning("resuming a global batch of %d with %d (train.allow_batch_change=true): optim.lr=%g is kept; "
                       "the linear scaling rule would use %g", gb_ck, gb, cfg.optim.lr, cfg.optim.lr * gb / gb_ck)
    return ckpt


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This rank's RNG states: torch (CPU), numpy, python, and its own CUDA device's (``cuda_device``),
    not every visible GPU's: a resume may see fewer GPUs than the run that wrote the checkpoint."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s states; the CUDA one on ``device``. Older checkpoints hold every
    visible GPU's state (``cuda``, a list): the one at this device's index is used, when it exists."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device is None or device.type != "cuda":
        return
    cuda = state.get("cuda_device")
    if cuda is None and state.get("cuda") is not None:
        every, index = state["cuda"], device.index or 0
        cuda = every[index] if index < len(every) else None
        if cuda is None:
            logger.warning("the checkpoint holds CUDA RNG states of %d GPU(s), none for %s: its CUDA RNG is not "
                           "restored (dropout draws differ from the uninterrupted run)", len(every), device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def save_checkpoint(run_dir: str, step: int, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer,
                    num_classes: int, keep: bool, rng: list[dict[str, Any]] | None = None,
                    scaler: dict[str, Any] | None = None, sharded_snapshot: str | None = None) -> str:
    """Write ckpt_last.pt (and ckpt_<step>.pt when ``keep``); store snapshot beside it if any.
    ``sharded_snapshot``: the snapshot the ranks of a sharded head have just written (its name in
    the run dir, :func:`write_sharded_snapshot`)."""
    store_snapshot = sharded_snapshot
    head = model.head
    if head.store is not None:
        store_snapshot = run_snapshot_name(step)
        # absolute: a server started by hand elsewhere would resolve a relative path against its own cwd.
        # The store prunes the older snapshots where it wrote them (a server: on its own machine, the run
        # dir may not be shared), keeping those of kept checkpoints and the newest older one, which
        # ckpt_last.pt still names until it is replaced below (a crash in between loses nothing).
        snap_path = os.path.abspath(os.path.join(run_dir, store_snapshot))
        head.store.snapshot(snap_path, prune_keep=sorted(_kept_store_snapshots(run_dir) | {store_snapshot}))
    state = {
        "step": step,
        "num_classes": num_classes,
        "config": cfg.to_dict(),
        "model": model.backbone.state_dict(),          # unwrapped: no 'module.' prefixes
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler or {},                          # fp16 GradScaler: scale, growth tracker
        "rng": rng if rng is not None else [rng_state()],   # one state per rank
        "store_snapshot": store_snapshot,               # relative to the run dir
        "global_batch": cfg.train.batch_size * hdist.world_size(),
        "world_size": hdist.world_size(),
        "git_sha": git_sha(),
    }
    path = checkpoint_path(run_dir)
    atomic_torch_save(state, path)
    if keep:
        atomic_torch_save(state, checkpoint_path(run_dir, step))
    return path


def write_sharded_snapshot(run_dir: str, step: int, head: nn.Module) -> str:
    """Every rank of a sharded head: its rows into the run's store snapshot of ``step`` (older ones
    pruned as a store prunes them); returns the snapshot's name for :func:`save_checkpoint`."""
    name = run_snapshot_name(step)
    head.snapshot(os.path.abspath(os.path.join(run_dir, name)),
                  prune_keep=sorted(_kept_store_snapshots(run_dir) | {name}))
    return name


def _kept_store_snapshots(run_dir: str) -> set[str]:
    """The store snapshots the kept checkpoints ``ckpt_<step>.pt`` of ``run_dir`` name."""
    steps = (checkpoint_step(p) for p in glob.glob(os.path.join(run_dir, "ckpt_[0-9]*.pt")))
    return {run_snapshot_name(s) for s in steps if s is not None}


def git_sha() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"
