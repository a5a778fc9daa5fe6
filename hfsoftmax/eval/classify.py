"""Closed-set top-k classification of a held-out image list over all K training classes.

The held-out images (a ``relative/path label`` list such as ``tools/rec2img.py``'s ``val_list.txt``,
or an InsightFace ``.rec``) are embedded in batches from a Dataset (never all held at once), and each
batch's features are scored by the trained head's :meth:`~hfsoftmax.heads.base.ClassifierHead.topk`:
the full head walks its rows in blocks, a selective head asks its store's ``score`` op, so neither a
B x K logit matrix nor W ever reaches this process. Training calls :func:`classify_dataset` every
``train.eval_every`` steps and at the end; ``python -m hfsoftmax.eval classify`` (see
:func:`open_head`) does the same on a finished run's checkpoint.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hfsoftmax.heads.base import ClassifierHead

logger = logging.getLogger(__name__)

#: features scored per head.topk call (the selective head's score op sends B x k numbers back)
SCORE_BATCH = 1024


def val_list_path(data_path: str, val_path: str) -> str:
    """The held-out list training evaluates: ``data.val_path``, or, when it is "" and ``data.path`` is a
    ``tools/rec2img.py`` folder (its ``train_list.txt``, or that file itself) with ``val_list.txt``
    beside it, that list; "" when there is none (``val_path="none"`` switches the default off)."""
    if val_path == "none":
        return ""
    if val_path:
        return val_path
    if not data_path:
        return ""
    folder = data_path if os.path.isdir(data_path) else (
        os.path.dirname(data_path) if os.path.basename(data_path) == "train_list.txt" else None)
    if folder is None or not os.path.isfile(os.path.join(folder, "train_list.txt")):
        return ""
    found = os.path.join(folder, "val_list.txt")
    return found if os.path.isfile(found) else ""


def open_val_set(path: str, image_size: int, skip_bad: bool = False, labels: str = "") -> Dataset:
    """The Dataset of a held-out list or ``.rec`` (no augmentation; float images, normalised); a
    ``tools/rec2img.py`` folder means its ``val_list.txt``. Missing: FileNotFoundError naming it."""
    from hfsoftmax.data.datasets import dataset_from_path

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "val_list.txt")):
        path = os.path.join(path, "val_list.txt")
    return dataset_from_path(path, image_size, train=False, skip_bad=skip_bad, labels=labels)


@torch.no_grad()
def topk_hits(head: ClassifierHead, features: torch.Tensor, labels: torch.Tensor,
              device: Union[str, torch.device], k: int = 5) -> torch.Tensor:
    """Per sample, whether its label is the head's top-1 .. top-k class over all K: bool [N, k].

    Args:
        head: a trained head in any mode (scored in eval mode, its mode restored).
        features: [N, d] embeddings (unit-norm flip-sum, as :func:`extract_features` gives).
        labels: [N] int class ids in [0, K).
        device: where the head's rows (full head) live.
        k: the largest rank reported (capped at K: then the extra columns are False).
    """
    labels = torch.as_tensor(labels).view(-1, 1).cpu()
    bad = (labels < 0) | (labels >= head.num_classes)
    if bool(bad.any()):
        raise ValueError(f"held-out label {int(labels[bad][0])} is outside the K={head.num_classes} training "
                         f"classes: top-k needs images of training identities, labelled as in training")
    was_training = head.training
    head.eval()
    try:
        top = torch.cat([head.topk(f.to(device), k)[1].cpu()                     # [b, min(k, K)]
                         for f in torch.as_tensor(features).split(SCORE_BATCH)])
    finally:
        head.train(was_training)
    hits = top == labels                                                       # [N, min(k, K)]
    if hits.shape[1] < k:
        hits = torch.cat([hits, hits.new_zeros(hits.shape[0], k - hits.shape[1])], 1)
    return hits


def summarize(hits: torch.Tensor) -> dict[str, Any]:
    """top1 / top5 fractions and the sample count of a [N, 5] :func:`topk_hits` matrix."""
    n = int(hits.shape[0])
    return {"top1": float(hits[:, 0].float().mean()) if n else 0.0,
            "top5": float(hits.any(dim=1).float().mean()) if n else 0.0, "samples": n}


def classify_dataset(backbone: nn.Module, head: ClassifierHead, dataset: Dataset,
                     device: Union[str, torch.device] = "cpu", batch_size: int = 256, flip: bool = True,
                     num_workers: int = 0, progress: bool = False) -> dict[str, Any]:
    """Top-1 / top-5 over all K of a held-out Dataset, embedded ``batch_size`` images at a time.

    Args:
        backbone: the trained backbone (run in eval mode; its mode is restored).
        head: the trained head; its pending pushes are flushed first.
        dataset: yields (float image [3, S, S], label), e.g. :func:`open_val_set`.
        device: where the forward passes run.
        batch_size: images per forward pass (and per scoring call).
        flip: flip-sum embeddings (as verification and ``identify`` use).
        num_workers: DataLoader workers decoding the images.
        progress: a tqdm bar (on a terminal only).
    Returns:
        {"top1", "top5", "samples"}.
    """
    from tqdm import tqdm

    from hfsoftmax.eval.extract import extract_features

    if len(dataset) == 0:   # type: ignore[arg-type]
        raise ValueError("the held-out set has no images")
    head.flush()                     # every push has landed
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    hits = []
    for images, labels in tqdm(loader, desc="classify", leave=False, disable=None if progress else True):
        feats = extract_features(backbone, images.float(), batch_size=batch_size, flip=flip, device=device,
                                 progress=False)                               # [b, d] unit norm
        hits.append(topk_hits(head, torch.from_numpy(feats), labels, device))
    return summarize(torch.cat(hits))


def open_head(ckpt: dict[str, Any], ckpt_path: str, server: Optional[str] = None, token: Optional[str] = None,
              timeout: float = 60.0, device: Union[str, torch.device] = "cpu") -> ClassifierHead:
    """The trained head of a checkpoint, ready for ``topk``.

    Selective heads (hf, random, and any head of a ``store.kind=sharded`` run) score on a store: the run's store snapshot (``ckpt["store_snapshot"]``,
    relative to the checkpoint's folder) opened in this process, or, with ``server``, the running
    parameter server (comma-separated shard addresses) holding W. Other heads (full, mach, rp) hold
    their rows in ``ckpt["head"]``. The margin and scale come from the checkpoint's ``head`` config.

    Raises:
        ValueError: a one-line message (no config, no snapshot, a server of other K or d).
    """
    from hfsoftmax.config import ConfigError, config_from_dict
    from hfsoftmax.heads import build_head

    try:
        cfg = config_from_dict(dict(ckpt.get("config") or {}))
    except ConfigError as exc:
        raise ValueError(f"{ckpt_path}: its config does not load ({exc})") from None
    K = int(ckpt.get("num_classes") or cfg.data.num_classes)
    d = int(cfg.model.feature_dim)
    sharded_full = cfg.head.name == "full" and cfg.store.kind == "sharded"   # W in the run's store snapshot
    if sharded_full:
        cfg.head.name = "hf"              # scored like a selective head: topk over all K on the rows
    if cfg.head.name not in ("hf", "random"):
        if server:
            logger.warning("--server ignored: a %s head holds W in the checkpoint", cfg.head.name)
        head = build_head(cfg.head, K, d, device="cpu", seed=cfg.train.seed)
        try:
            head.load_state_dict(ckpt["head"])
        except (KeyError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"{ckpt_path}: the {cfg.head.name} head's weights do not load: {first}") from None
        return head.to(device).eval()
    from hfsoftmax.heads.selective import SelectiveSoftmax

    if server:
        from paramserver.client import RemoteStore
        try:
            store: Any = RemoteStore([a.strip() for a in server.split(",") if a.strip()], K, d,
                                     timeout=timeout, token=token)
        except (ConnectionError, TimeoutError) as exc:
            raise ValueError(f"parameter server {server}: {exc}") from None
        logger.info("scoring on the parameter server %s (K=%d, d=%d, step %d)", server, K, d, int(store.step))
    else:
        snap = ckpt.get("store_snapshot")
        if not snap:
            raise ValueError(f"{ckpt_path}: a {cfg.head.name} head's checkpoint without a store snapshot; "
                             f"pass --server tcp://host:port of the run's parameter server")
        path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), snap)
        if not os.path.isdir(path):
            raise ValueError(f"store snapshot not found: {path} (named by {ckpt_path}); "
                             f"or pass --server tcp://host:port")
        from paramserver.store import WeightStore
        store = WeightStore.from_snapshot(path)
        logger.info("W from the store snapshot %s (K=%d, d=%d)", path, int(store.num_classes), int(store.dim))
    try:
        return SelectiveSoftmax.from_config(cfg.head, store, K, d, seed=cfg.train.seed).eval()
    except BaseException:
        store.close()
        raise

