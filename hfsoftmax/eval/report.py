"""Evaluate a model on verification ``.bin`` sets and write results.md, results.json and ROC PNGs.

``evaluate_bins`` is what ``python -m hfsoftmax.eval verify`` and the end of training call.
Output folder layout::

    results.md          one markdown table row per set
    results.json        {name: result dict from hfsoftmax.eval.verification.evaluate}
    roc_<name>.png      ROC curve (mean over the 10 held-out folds)
    features_<name>.npy L2-normalised embeddings [2N, d] (flip-sum when enabled)
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence, Union

import torch
from torch import nn

from hfsoftmax.data.binset import load_bin
from hfsoftmax.eval.extract import extract_features, save_features
from hfsoftmax.eval.plots import save_roc_png
from hfsoftmax.eval.verification import evaluate

logger = logging.getLogger(__name__)


def bin_name(path: str) -> str:
    """``/data/lfw.bin`` -> ``lfw``."""
    return os.path.splitext(os.path.basename(path))[0]


def format_markdown(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table: accuracy and VAL@FAR (percent, mean +- std over folds)."""
    lines = ["| set | pairs | accuracy (%) | VAL@FAR (%) | FAR (%) | threshold | AUC |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['num_pairs']} | {100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} "
            + (f"| {100 * r['val']:.2f} +- {100 * r['val_std']:.2f} @ {r['far_target']:g} | {100 * r['far']:.3f} "
               if r.get("val") is not None else f"| n/a @ {r['far_target']:g} (too few negatives) | - ")
            + f"| {r['threshold']:.2f} | {r['auc']:.4f} |")
    notes = [f"- {name}: {r['val_note']}" for name, r in results.items() if r.get("val_note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(results: dict[str, dict[str, Any]], out_dir: str, header: str = "") -> None:
    """results.md (``header`` then the table) and results.json in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write_text(os.path.join(out_dir, "results.md"), (header + "\n\n" if header else "") + format_markdown(results))
    _atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1) + "\n")


def evaluate_bins(model: nn.Module, bin_paths: Sequence[str], image_size: int, out_dir: str,
                  device: Union[str, torch.device] = "cpu", batch_size: int = 64, flip: bool = True,
                  nfolds: int = 10, far_target: float = 1e-3, header: str = "",
                  title: str = "") -> dict[str, dict[str, Any]]:
    """Run 10-fold verification on each ``.bin`` and write the report files into ``out_dir``.

    Args:
        model: backbone mapping [B, 3, H, W] -> [B, d]; run in eval mode, its train/eval mode
            restored afterwards (see :func:`~hfsoftmax.eval.extract.extract_features`).
        bin_paths: ``.bin`` files; each result is keyed by the file's base name.
        image_size: side the images are decoded/resized to (the model's input size).
        out_dir: where results.md / results.json / roc_<name>.png / features_<name>.npy go.
        device, batch_size, flip: feature extraction settings.
        nfolds, far_target: protocol settings (10 and 1e-3 by default).
        header: text put above the table in results.md.
        title: model / checkpoint step for the ROC plots' titles (the set's name is added).
    Returns:
        {name: result dict} (see :func:`hfsoftmax.eval.verification.evaluate`).
    """
    if not bin_paths:
        raise ValueError("evaluate_bins: no .bin files given")
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for path in bin_paths:
        name = bin_name(path)
        images, issame = load_bin(path, image_size)
        feats = extract_features(model, images, batch_size=batch_size, flip=flip, device=device)
        save_features(os.path.join(out_dir, f"features_{name}.npy"), feats)
        r = evaluate(feats, issame, nfolds=nfolds, far_target=far_target)
        r["path"] = os.path.abspath(path)
        r["flip"] = flip
        save_roc_png(os.path.join(out_dir, f"roc_{name}.png"), r["fpr"], r["tpr"],
                     f"{title + ' | ' if title else ''}{name}: acc {100 * r['accuracy']:.2f}%  AUC {r['auc']:.4f}")
        logger.info("%s: accuracy %.2f%% +- %.2f, VAL %s @ FAR %g", name, 100 * r["accuracy"],
                    100 * r["accuracy_std"], f"{100 * r['val']:.2f}%" if r["val"] is not None else "n/a", far_target)
        results[name] = r
    write_results(results, out_dir, header)
    return results
