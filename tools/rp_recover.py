"""Recover the full K x d classifier of a random-projection-softmax run (dual random projection).

    python tools/rp_recover.py --checkpoint runs/rp/ckpt_last.pt --out runs/rp/W_recovered.npy \
        [--data PATH] [--batches N] [--batch-size 256] [--device cpu] [--class-block 65536]

One pass over the training set with the backbone fixed (eval mode, no augmentation) computes
``W_hat = -(1/(lambda n)) sum_i (p_i - y_i) x_i^T`` with the slim model's probabilities p_i, the full
backbone features x_i and lambda = the checkpoint's ``optim.weight_decay``; see
:mod:`hfsoftmax.heads.rp` for the method (ours, after Zhang et al., COLT 2013) and the recovery
function itself. ``--batches N`` stops after N batches (n is then the number of samples seen, so
W_hat is the same average over a subset). The result is written atomically as float32 .npy.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hfsoftmax.backbones import get_backbone  # noqa: E402
from hfsoftmax.checkpoint import read_checkpoint  # noqa: E402
from hfsoftmax.heads.rp import RPSoftmax, recover_classifier  # noqa: E402

logger = logging.getLogger("rp_recover")


def load_rp_checkpoint(path: str) -> dict[str, Any]:
    """Load a training checkpoint and check that it holds an RP-softmax head."""
    ckpt = read_checkpoint(path, need=("model", "head", "config"))     # CheckpointError: a ValueError
    name = ckpt["config"].get("head", {}).get("name")
    if name != "rp":
        raise ValueError(f"checkpoint {path} was trained with head.name={name!r}; recovery needs an RP-softmax "
                         f"checkpoint (head.name='rp')")
    return ckpt


def build_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> tuple[nn.Module, RPSoftmax]:
    """Backbone (eval mode) and RP head with the checkpoint's weights; shapes come from the weights."""
    cfg = ckpt["config"]
    mcfg, hcfg = cfg["model"], cfg["head"]
    backbone = get_backbone(mcfg["backbone"], mcfg["feature_dim"], cfg["data"]["image_size"],
                            dropout=mcfg.get("dropout", 0.0), **{k: mcfg[k] for k in ("norm", "width", "input_dim",
                                                                                     "hidden_dim") if k in mcfg})
    backbone.load_state_dict(ckpt["model"])
    K, m = ckpt["head"]["weight"].shape
    d = ckpt["head"]["proj"].shape[0]
    if d != mcfg["feature_dim"]:
        raise ValueError(f"checkpoint head projects d = {d} features but model.feature_dim = {mcfg['feature_dim']}")
    head = RPSoftmax(K, d, m, margin=hcfg.get("margin", "none"), scale=hcfg.get("scale", 64.0),
                     margin_m=hcfg.get("margin_m", 0.35))
    head.load_state_dict(ckpt["head"])
    return backbone.to(device).eval(), head.to(device).eval()


def training_dataset(cfg: dict[str, Any], data_path: str | None) -> Dataset:
    """The training set the checkpoint saw, without augmentation: --data, else config data.path,
    else the built-in synthetic identities of the checkpoint's data config."""
    path = data_path if data_path else cfg["data"].get("path", "")
    if path:
        from hfsoftmax.data.datasets import dataset_from_path
        # a features file's labels: --data's own (an .npz, x.labels.npy beside it), else data.labels
        labels = "" if data_path else cfg["data"].get("labels", "")
        return dataset_from_path(path, cfg["data"]["image_size"], train=False, labels=labels)
    from hfsoftmax.data import synthetic
    return synthetic.SyntheticIdentities(synthetic.spec_from_config(SimpleNamespace(**cfg["data"])))


@torch.no_grad()
def feature_batches(backbone: nn.Module, images_labels: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device | str, max_batches: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images [b, 3, S, S], labels [b]) -> (features [b, d], labels [b]) through the fixed backbone."""
    for i, (images, labels) in enumerate(images_labels):
        if max_batches is not None and i >= max_batches:
            return
        yield backbone(images.to(device)), torch.as_tensor(labels).to(device)


def recover_from_checkpoint(checkpoint: str, out: str | None, data: str | None = None, batches: int | None = None,
                            batch_size: int = 256, device: str = "cpu", class_block: int = 65536,
                            num_workers: int = 0, images_labels: Iterable | None = None) -> torch.Tensor:
    """Run the recovery; write W_hat [K, d] as float32 .npy to ``out`` (if given) and return it.

    ``images_labels`` replaces the training-set loader (tests pass a list of batches).
    """
    ckpt = load_rp_checkpoint(checkpoint)
    lam = float(ckpt["config"]["optim"]["weight_decay"])
    if not lam > 0:
        raise ValueError(f"checkpoint {checkpoint} has optim.weight_decay = {lam}; recovery needs lambda > 0")
    backbone, head = build_from_checkpoint(ckpt, device)
    if images_labels is None:
        dataset = training_dataset(ckpt["config"], data)
        images_labels = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logger.info("recovering K=%d d=%d from m=%d with lambda=%g", head.num_classes, head.feature_dim,
                head.proj_dim, lam)
    w_hat = recover_classifier(head, feature_batches(backbone, images_labels, device, batches), lam,
                               class_block=class_block)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = f"{out}.tmp.{os.getpid()}.npy"
        np.save(tmp, w_hat.float().cpu().numpy())
        os.replace(tmp, out)
        logger.info("wrote %s [%d, %d]", out, *w_hat.shape)
    return w_hat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training checkpoint of an rp head (ckpt_last.pt)")
    ap.add_argument("--out", required=True, help="where to write the recovered [K, d] float32 .npy")
    ap.add_argument("--data", default="", help="training data path (default: the checkpoint's data.path; "
                                               "empty -> its synthetic identities)")
    ap.add_argument("--batches", type=int, default=None, help="stop after this many batches (default: all)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--class-block", type=int, default=65536, help="classes scored at once")
    ap.add_argument("--num-workers", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        recover_from_checkpoint(args.checkpoint, args.out, data=args.data or None, batches=args.batches,
                                batch_size=args.batch_size, device=args.device, class_block=args.class_block,
                                num_workers=args.num_workers)
    except (FileNotFoundError, ValueError) as exc:  # user errors: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
