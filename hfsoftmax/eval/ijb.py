"""IJB-B / IJB-C 1:1 template verification (Whitelam et al. 2017, Maze et al. 2018), as InsightFace
evaluates it (arcface_torch's eval_ijbc.py), without OpenCV or scikit-learn.

Layout read (the standard release as InsightFace packs it; ``P`` is ``ijbb`` or ``ijbc``)::

    root/loose_crop/<image>.jpg
    root/meta/P_name_5pts_score.txt       <image> x1 y1 ... x5 y5 <detector score>   (one line per image)
    root/meta/P_face_tid_mid.txt          <image> <template id> <media id>
    root/meta/P_template_pair_label.txt   <template 1> <template 2> <1 same | 0 different>

Protocol:

1. Each image is aligned to the 112 x 112 ArcFace 5-point template by the least-squares similarity
   transform (Umeyama) of its landmarks (scaled to the model's input size), and embedded with
   flip-sum (embedding of the image plus of its mirror).
2. Image features are kept un-normalised (``norm_score``: their norm carries quality) and
   multiplied by the detector score (``detector_score``), the defaults InsightFace reports with.
3. Template feature: within a template, the images of one media (video frames, one photo) are
   averaged; the media means are summed; the sum is L2-normalised.
4. A pair's score is the cosine of its two template features; TAR at FAR = 1e-6 .. 1e-1 is read
   off the ROC over all pairs: the largest TPR whose FPR does not exceed the FAR. A FAR below
   1 / (number of negative pairs) cannot be resolved and is reported as None.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

# The ArcFace alignment template: eye centres, nose tip, mouth corners in a 112 x 112 crop.
ARCFACE_5PTS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class IJBError(ValueError):
    """A malformed IJB meta file or image (the message names the file and line)."""


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src [n, 2] onto
    dst [n, 2] (Umeyama 1991). Returns the 2 x 3 matrix A with dst ~ A @ [x, y, 1]."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[1, 1] = -1.0
    R = U @ D @ Vt
    var = (s0 ** 2).sum() / len(src)
    scale = float((S * np.diag(D)).sum() / var) if var > 0 else 1.0
    t = mu_d - scale * R @ mu_s
    return np.hstack([scale * R, t[:, None]])


def align(img: Any, landmarks: np.ndarray, size: int) -> Any:
    """A PIL image warped so its 5 landmarks [5, 2] land on the ArcFace template scaled to size."""
    from PIL import Image

    A = similarity_transform(landmarks, ARCFACE_5PTS * (size / 112.0))
    inv = np.linalg.inv(np.vstack([A, [0.0, 0.0, 1.0]]))[:2]     # output pixel -> input pixel
    return img.transform((size, size), Image.AFFINE, tuple(inv.reshape(-1)), resample=Image.BILINEAR)


def _read_table(path: str, min_cols: int) -> list[list[str]]:
    if not os.path.isfile(path):
        raise IJBError(f"IJB meta file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < min_cols:
                raise IJBError(f"{path}: line {n} has {len(parts)} fields, expected {min_cols}")
            rows.append(parts)
    return rows


def load_meta(root: str, prefix: Optional[str] = None) -> dict[str, Any]:
    """The three meta files of ``root/meta`` (prefix ijbc or ijbb: found from the files when None)."""
    meta = os.path.join(root, "meta")
    if prefix is None:
        found = [p for p in ("ijbc", "ijbb") if os.path.isfile(os.path.join(meta, f"{p}_face_tid_mid.txt"))]
        if not found:
            raise IJBError(f"{meta}: no ijbc_face_tid_mid.txt or ijbb_face_tid_mid.txt")
        prefix = found[0]
    lmk_rows = _read_table(os.path.join(meta, f"{prefix}_name_5pts_score.txt"), 12)
    tid_rows = _read_table(os.path.join(meta, f"{prefix}_face_tid_mid.txt"), 3)
    pair_rows = _read_table(os.path.join(meta, f"{prefix}_template_pair_label.txt"), 3)
    where = os.path.join(meta, f"{prefix}_name_5pts_score.txt")
    try:
        names = [r[0] for r in lmk_rows]
        landmarks = np.array([[float(v) for v in r[1:11]] for r in lmk_rows]).reshape(-1, 5, 2)
        scores = np.array([float(r[11]) for r in lmk_rows])
        tid_of = {r[0]: (int(r[1]), int(r[2])) for r in tid_rows}
        pairs = np.array([[int(r[0]), int(r[1])] for r in pair_rows], dtype=np.int64)
        labels = np.array([int(r[2]) for r in pair_rows], dtype=np.int64)
    except ValueError as e:
        raise IJBError(f"{meta}: a non-numeric field ({e})") from None
    missing = [n for n in names if n not in tid_of]
    if missing:
        raise IJBError(f"{where}: image {missing[0]} has no template in {prefix}_face_tid_mid.txt")
    if not set(np.unique(labels)) <= {0, 1}:
        raise IJBError(f"{prefix}_template_pair_label.txt: labels must be 0 or 1")
    templates = np.array([tid_of[n][0] for n in names], dtype=np.int64)
    medias = np.array([tid_of[n][1] for n in names], dtype=np.int64)
    return {"prefix": prefix, "names": names, "landmarks": landmarks, "scores": scores, "templates": templates,
            "medias": medias, "pairs": pairs, "labels": labels}


def template_features(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(template ids [T] sorted, unit features [T, d]): media means summed per template, normalised."""
    ids = np.unique(templates)
    out = np.zeros((len(ids), img_feats.shape[1]), dtype=np.float64)
    for i, t in enumerate(ids):
        sel = templates == t
        f, m = img_feats[sel], medias[sel]
        out[i] = sum(f[m == u].mean(axis=0) for u in np.unique(m))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return ids, out / np.maximum(norms, 1e-12)


def pair_scores(ids: np.ndarray, feats: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine of each pair's two template features [P]; a template with no image is an error."""
    pos = {int(t): i for i, t in enumerate(ids)}
    bad = [int(t) for t in pairs.reshape(-1) if int(t) not in pos]
    if bad:
        raise IJBError(f"template {bad[0]} of the pair list has no image")
    a = feats[[pos[int(t)] for t in pairs[:, 0]]]
    b = feats[[pos[int(t)] for t in pairs[:, 1]]]
    return np.sum(a * b, axis=1)


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score, thresholds descending ("same" when >=)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]          # the last index of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    P, N = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / N], np.r_[0.0, tp / P], np.r_[np.inf, s[last]]


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FARS) -> dict[float, Optional[float]]:
    """TAR at each FAR: the largest TPR whose FPR <= FAR; None when FAR < 1 / negatives."""
    fpr, tpr, _ = roc(scores, labels)
    n_neg = int((labels == 0).sum())
    out: dict[float, Optional[float]] = {}
    for far in fars:
        out[far] = None if n_neg == 0 or far * n_neg < 1.0 else float(tpr[fpr <= far + 1e-12].max())
    return out


def embed_images(model: torch.nn.Module, root: str, meta: dict[str, Any], size: int, batch_size: int = 64,
                 device: str = "cpu", flip: bool = True) -> np.ndarray:
    """Aligned flip-sum embeddings [n, d] (not normalised) of every image of the meta files."""
    from PIL import Image

    from ..data.transforms import to_tensor_normalized

    model = model.to(device).eval()
    feats = []
    names = meta["names"]
    with torch.no_grad():
        for s in range(0, len(names), batch_size):
            batch = []
            for name, lmk in zip(names[s:s + batch_size], meta["landmarks"][s:s + batch_size]):
                path = os.path.join(root, "loose_crop", name)
                try:
                    with Image.open(path) as im:
                        img = align(im.convert("RGB"), lmk, size)
                except OSError as e:
                    raise IJBError(f"{path}: cannot read image ({e})") from None
                batch.append(to_tensor_normalized(img, size))
            x = torch.stack(batch).to(device)
            f = model(x)
            if flip:
                f = f + model(torch.flip(x, dims=[3]))
            feats.append(f.float().cpu().numpy())
    return np.concatenate(feats).astype(np.float64)


def evaluate_ijb(img_feats: np.ndarray, meta: dict[str, Any], norm_score: bool = True,
                 detector_score: bool = True) -> dict[str, Any]:
    """Steps 2-4 of the protocol on image features [n, d]."""
    f = np.asarray(img_feats, np.float64)
    if not norm_score:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    if detector_score:
        f = f * meta["scores"][:, None]
    ids, tf = template_features(f, meta["templates"], meta["medias"])
    scores = pair_scores(ids, tf, meta["pairs"])
    fpr, tpr, _ = roc(scores, meta["labels"])
    return {"tar_at_far": tar_at_far(scores, meta["labels"]), "num_pairs": int(len(scores)),
            "num_templates": int(len(ids)), "num_images": int(len(f)), "fpr": fpr.tolist(), "tpr": tpr.tolist(),
            "auc": float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))}


def format_markdown(name: str, r: dict[str, Any]) -> str:
    fars = list(r["tar_at_far"])
    head = "| set | templates | pairs | " + " | ".join(f"TAR@FAR={far:g} (%)" for far in fars) + " |"
    rule = "|---|---:|---:|" + "---:|" * len(fars)
    vals = " | ".join("n/a" if v is None else f"{100 * v:.2f}" for v in r["tar_at_far"].values())
    return f"{head}\n{rule}\n| {name} | {r['num_templates']} | {r['num_pairs']} | {vals} |\n"
