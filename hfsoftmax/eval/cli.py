"""Command line for evaluation: ``python -m hfsoftmax.eval {verify,megaface,ijb,classify} ...``.

verify:   every ``.bin`` in a folder (or the files given) -> results.md, results.json, ROC PNGs.
megaface: rank-1 identification and TAR@FAR=1e-6 from probe and distractor feature files.
ijb:      IJB-B / IJB-C 1:1 template verification.
classify: top-1 / top-5 of a held-out image list over all K classes with the trained head
          -> classify.md, classify.json.

Errors a user can cause (missing file, bad checkpoint, malformed data) end with a one-line
``error: ...`` on stderr and exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np
from torch import nn

logger = logging.getLogger(__name__)

#: the sets eval.sh reports first, in this order; any other .bin in the folder follows
KNOWN_SETS = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")


class EvalError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def load_model(model_path: str, arch: str = "auto", feature_dim: Optional[int] = None,
               image_size: Optional[int] = None) -> tuple[nn.Module, int, dict[str, Any]]:
    """Rebuild the backbone a training checkpoint holds.

    Args:
        model_path: checkpoint written by hfsoftmax/train.py (dict with "model" and "config"), or a
            bare backbone state_dict (then arch, feature_dim and image_size must be given).
        arch: backbone name, or "auto" to take ``config.model.backbone`` from the checkpoint.
        feature_dim, image_size: override the checkpoint's config.
    Returns:
        (model in eval mode on CPU, image_size, the checkpoint config or {}).
    """
    from hfsoftmax.checkpoint import CheckpointError, read_checkpoint
    try:
        ckpt = read_checkpoint(model_path, need=())      # a bare state dict is a checkpoint here too
    except CheckpointError as exc:
        raise EvalError(str(exc)) from None
    cfg: dict[str, Any] = dict(ckpt.get("config") or {})
    if isinstance(ckpt.get("step"), int):
        cfg["_step"] = ckpt["step"]          # for titles (not a config key)
    from hfsoftmax.backbones.convert import backbone_state
    try:
        state, arcface = backbone_state(ckpt)
    except ValueError as exc:
        raise EvalError(f"{model_path}: {exc}") from None
    if arcface is not None:   # an arcface_torch backbone.pth: its IResNet / MobileFaceNet is ours renamed
        cfg = {"model": arcface, "data": {"image_size": 112}}
    model_cfg = cfg.get("model", {}) if isinstance(cfg, dict) else {}
    data_cfg = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    name = model_cfg.get("backbone") if arch == "auto" else arch
    if arch != "auto" and model_cfg.get("backbone") not in (None, arch):
        logger.warning("arch %s overrides the checkpoint's backbone %s", arch, model_cfg.get("backbone"))
    dim = feature_dim or model_cfg.get("feature_dim")
    size = image_size or data_cfg.get("image_size")
    missing = [n for n, v in (("arch", name), ("feature_dim", dim), ("image_size", size)) if not v]
    if missing:
        raise EvalError(f"{model_path}: checkpoint has no config for {', '.join(missing)}; pass them explicitly")
    from hfsoftmax.backbones import get_backbone  # the one factory training uses
    # model.norm and model.width change the layers of tiny, so they must come from the checkpoint
    extra = {k: model_cfg[k] for k in ("norm", "width") if str(name) == "tiny" and model_cfg.get(k)}
    # identity / mlp read features of width input_dim (resolved from the data file at training time)
    extra.update({k: model_cfg[k] for k in ("input_dim", "hidden_dim") if str(name) in ("identity", "mlp")
                  and model_cfg.get(k)})
    try:
        model = get_backbone(str(name), int(dim), int(size), **extra)
    except ValueError as exc:
        raise EvalError(f"{model_path}: {exc}") from None
    try:
        model.load_state_dict(state)   # prefixes stripped by backbone_state
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise EvalError(f"{model_path}: weights do not fit backbone {name} (d={dim}): {first}") from None
    model.eval()
    return model, int(size), cfg


def find_bins(dataset_path: str) -> list[str]:
    """The ``.bin`` files of a folder (known sets first), or the path itself if it is a ``.bin``."""
    if os.path.isfile(dataset_path):
        return [dataset_path]
    if not os.path.isdir(dataset_path):
        raise EvalError(f"dataset path not found: {dataset_path}")
    found = sorted(glob.glob(os.path.join(dataset_path, "*.bin")))
    if not found:
        raise EvalError(f"no .bin verification sets in {dataset_path}")
    rank = {n: i for i, n in enumerate(KNOWN_SETS)}
    return sorted(found, key=lambda p: (rank.get(os.path.splitext(os.path.basename(p))[0], len(rank)), p))


def _verify(args: argparse.Namespace) -> int:
    from hfsoftmax.eval.report import evaluate_bins
    model, size, cfg = load_model(args.model, args.arch, args.feature_dim, args.image_size)
    bins = find_bins(args.data)
    arch = cfg.get("model", {}).get("backbone", args.arch) if args.arch == "auto" else args.arch
    header = (f"# Verification\n\nmodel: `{args.model}` (backbone {arch}, input {size}x{size}, "
              f"flip {'on' if not args.no_flip else 'off'}); 10-fold protocol, squared L2 thresholds 0..4")
    results = evaluate_bins(model, bins, size, args.out, device=args.device, batch_size=args.batch_size,
                            flip=not args.no_flip, nfolds=args.nfolds, far_target=args.far, header=header,
                            title=f"{arch} {os.path.basename(args.model)}"
                                  + (f" step {cfg['_step']}" if cfg.get("_step") is not None else ""))
    with open(os.path.join(args.out, "results.md"), encoding="utf-8") as f:
        print(f.read())
    return 0 if results else 1


def _megaface(args: argparse.Namespace) -> int:
    from hfsoftmax.eval.megaface import load_features, megaface_evaluate
    probe, labels = load_features(args.probe)
    if args.probe_labels:
        if not os.path.isfile(args.probe_labels):
            raise EvalError(f"probe labels not found: {args.probe_labels}")
        labels = (np.load(args.probe_labels) if args.probe_labels.endswith(".npy")
                  else np.loadtxt(args.probe_labels, dtype=np.int64, ndmin=1))
    if labels is None:
        raise EvalError(f"{args.probe}: no labels; give --probe-labels or 'path label' lines")
    dis, _ = load_features(args.distractors)
    if args.num_distractors:
        if args.num_distractors > dis.shape[0]:
            raise EvalError(f"{args.distractors}: asked for {args.num_distractors} distractors, file has {dis.shape[0]}")
        dis = dis[: args.num_distractors]
    r = megaface_evaluate(probe, labels, dis, far=args.far)
    os.makedirs(args.out, exist_ok=True)
    tar = f"{100 * r['tar']:.2f}" if r["tar"] is not None else "n/a"
    thr = f"{r['threshold']:.4f}" if r["threshold"] is not None else "n/a"
    md = ("| distractors | probes | rank-1 (%) | TAR (%) @ FAR | threshold |\n|---:|---:|---:|---:|---:|\n"
          f"| {r['num_distractors']} | {r['num_probes']} | {100 * r['rank1']:.2f} | "
          f"{tar} @ {r['far_target']:g} | {thr} |\n")
    if r["tar_note"]:
        md += f"\n{r['tar_note']}\n"
    from hfsoftmax.eval.report import _atomic_write_text
    _atomic_write_text(os.path.join(args.out, "megaface.md"), md)
    _atomic_write_text(os.path.join(args.out, "megaface.json"), json.dumps(r, indent=1) + "\n")
    print(md)
    return 0


def _ijb(args: argparse.Namespace) -> int:
    from hfsoftmax.eval import ijb
    from hfsoftmax.eval.plots import save_roc_png
    from hfsoftmax.eval.report import _atomic_write_text
    model, size, cfg = load_model(args.model, args.arch)
    meta = ijb.load_meta(args.data, args.prefix)
    feats = ijb.embed_images(model, args.data, meta, size, batch_size=args.batch_size, device=args.device,
                             flip=not args.no_flip)
    r = ijb.evaluate_ijb(feats, meta, norm_score=not args.no_norm_score, detector_score=not args.no_detector_score)
    os.makedirs(args.out, exist_ok=True)
    name = meta["prefix"].upper()
    md = ijb.format_markdown(name, r)
    _atomic_write_text(os.path.join(args.out, f"{meta['prefix']}.md"), md)
    keep = {k: v for k, v in r.items() if k not in ("fpr", "tpr")}
    keep["tar_at_far"] = {f"{k:g}": v for k, v in r["tar_at_far"].items()}
    _atomic_write_text(os.path.join(args.out, f"{meta['prefix']}.json"), json.dumps(keep, indent=1) + "\n")
    step = f" step {cfg['_step']}" if cfg.get("_step") is not None else ""
    save_roc_png(os.path.join(args.out, f"roc_{meta['prefix']}.png"), r["fpr"], r["tpr"],
                 f"{cfg.get('model', {}).get('backbone', args.arch)} {os.path.basename(args.model)}{step} | {name} 1:1")
    print(md)
    return 0


def _classify(args: argparse.Namespace) -> int:
    from paramserver.api import StoreError

    from hfsoftmax.checkpoint import CheckpointError, read_checkpoint
    from hfsoftmax.eval.classify import classify_dataset, open_head, open_val_set
    from hfsoftmax.eval.report import _atomic_write_text
    from hfsoftmax.heads.selective import resolve_token

    model, size, _ = load_model(args.model)
    try:
        ckpt = read_checkpoint(args.model, need=("config", "head"), mmap=True)
    except CheckpointError as exc:
        raise EvalError(str(exc)) from None
    dataset = open_val_set(args.data, size, labels=args.labels)
    try:
        head = open_head(ckpt, args.model, server=args.server, token=resolve_token(args.token, args.token_file),
                         timeout=args.timeout, device=args.device)
    except (StoreError, ConnectionError, TimeoutError) as exc:
        raise EvalError(f"parameter server {args.server}: {exc}") from None
    try:
        if int(getattr(dataset, "num_classes", 0)) > head.num_classes:
            raise EvalError(f"{args.data}: labels up to {dataset.num_classes - 1}, but {args.model} has "
                            f"K={head.num_classes} classes: the list must hold training identities")
        from hfsoftmax.data.features import FeatureDataset, classify_features
        if isinstance(dataset, FeatureDataset):        # [n, d_in] rows: through the backbone, no flip
            r = classify_features(model, head, dataset, args.device, batch_size=args.batch_size)
        else:
            r = classify_dataset(model, head, dataset, device=args.device, batch_size=args.batch_size,
                                 num_workers=args.num_workers, progress=True)
    except (StoreError, ConnectionError, TimeoutError) as exc:
        raise EvalError(f"parameter server {args.server}: {exc}") from None
    finally:
        head.close()
    step = ckpt.get("step")
    r.update(num_classes=head.num_classes, head=ckpt["config"].get("head", {}).get("name"), step=step,
             model=args.model, data=args.data, w_from=args.server or "checkpoint")
    os.makedirs(args.out, exist_ok=True)
    md = (f"# Classification over all K={head.num_classes} classes\n\nmodel: `{args.model}`"
          + (f" (step {step})" if step is not None else "") + f", {r['head']} head; data: `{args.data}`\n\n"
          "| samples | top-1 (%) | top-5 (%) |\n|---:|---:|---:|\n"
          f"| {r['samples']} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} |\n")
    _atomic_write_text(os.path.join(args.out, "classify.md"), md)
    _atomic_write_text(os.path.join(args.out, "classify.json"), json.dumps(r, indent=1) + "\n")
    print(md)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hfsoftmax.eval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="10-fold verification on .bin sets")
    v.add_argument("--model", required=True, help="checkpoint written by training")
    v.add_argument("--data", required=True, help="folder of .bin files, or one .bin")
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--arch", default="auto", help="backbone name, or auto (from the checkpoint)")
    v.add_argument("--feature-dim", type=int, default=None, help="override the checkpoint's feature_dim")
    v.add_argument("--image-size", type=int, default=None, help="override the checkpoint's image_size")
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    v.add_argument("--no-flip", action="store_true", help="disable flip-sum features")
    v.add_argument("--nfolds", type=int, default=10)
    v.add_argument("--far", type=float, default=1e-3, help="FAR at which VAL is reported")
    m = sub.add_parser("megaface", help="rank-1 identification and TAR@FAR from feature files")
    m.add_argument("--probe", required=True, help="probe features: .npy or a list of per-image feature files")
    m.add_argument("--probe-labels", default=None, help=".npy or text, one identity per probe")
    m.add_argument("--distractors", required=True, help="distractor features: .npy or a list file")
    m.add_argument("--num-distractors", type=int, default=None, help="use the first N distractors")
    m.add_argument("--far", type=float, default=1e-6)
    m.add_argument("--out", required=True, help="output folder")
    j = sub.add_parser("ijb", help="IJB-B / IJB-C 1:1 template verification (TAR at FAR 1e-6 .. 1e-1)")
    j.add_argument("--model", required=True, help="checkpoint written by training")
    j.add_argument("--data", required=True, help="IJB root: loose_crop/ and meta/ (ijbc_* or ijbb_* files)")
    j.add_argument("--out", required=True, help="output folder")
    j.add_argument("--prefix", default=None, choices=["ijbc", "ijbb"], help="meta file prefix (default: found)")
    j.add_argument("--arch", default="auto")
    j.add_argument("--batch-size", type=int, default=64)
    j.add_argument("--device", default="cpu")
    j.add_argument("--no-flip", action="store_true")
    j.add_argument("--no-norm-score", action="store_true", help="L2-normalise image features before pooling")
    j.add_argument("--no-detector-score", action="store_true", help="do not weight images by detector score")
    c = sub.add_parser("classify", help="top-1 / top-5 of a held-out image list over all K classes")
    c.add_argument("--model", required=True, help="checkpoint written by training (its head and store snapshot)")
    c.add_argument("--data", required=True, help="'relative/path label' list (val_list.txt), a .rec, a rec2img "
                   "folder, or held-out features (.npz with labels, or .npy: --labels or x.labels.npy beside it)")
    c.add_argument("--labels", default="", help="labels of a .npy features file (.npy or text, one per line)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--server", default=None, help="score on the running parameter server, tcp://host:port[,...] "
                   "(token: $PARAMSERVER_TOKEN or --token-file), instead of the checkpoint's store snapshot")
    c.add_argument("--token", default="", help="the server's token (prefer $PARAMSERVER_TOKEN: ps shows arguments)")
    c.add_argument("--token-file", default="", help="a file (mode 0600) holding the server's token")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding the images")
    c.add_argument("--device", default="cpu")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return {"verify": _verify, "megaface": _megaface, "ijb": _ijb, "classify": _classify}[args.cmd](args)
    except (EvalError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
