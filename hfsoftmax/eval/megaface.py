"""MegaFace-style evaluation (Challenge 1 protocol) from precomputed feature files.

* Identification: probe set with identity labels (FaceScrub in MegaFace) and N distractors.
  For every ordered pair (p, g) of different images of one identity, g is put in a gallery with
  the N distractors; the pair counts as a rank-1 hit when ``s(p, g)`` beats every distractor
  score ``s(p, d)``. Rank-1 rate = hits / pairs. Scores are cosine similarities.
* Verification: genuine scores are those same-identity probe pairs (unordered); impostor scores
  are every probe against every distractor. The threshold is the impostor score exceeded by a
  fraction ``far`` of the impostors (1e-6 by default); TAR is the fraction of genuine scores above
  it. With fewer than 1 / far impostor pairs (probes x distractors) no threshold realises that FAR,
  so TAR is not reported: ``tar`` and ``threshold`` are None and ``tar_note`` says how many
  impostor pairs were needed and how many there were (``far_resolution`` = 1 / impostors).

Feature files: ``.npy`` [n, d]; or a text list with one per-image feature file per line (optional
label after the path), each either ``.npy`` or the MegaFace devkit / OpenCV matrix ``.bin`` layout
(int32 rows, cols, element size, type code 5 = float32; then rows * cols float32).
"""
from __future__ import annotations

import logging
import math
import os
import struct
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)


def read_matio_feature(path: str) -> np.ndarray:
    """One feature vector from a MegaFace devkit ``.bin`` (OpenCV matrix) file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 16:
        raise ValueError(f"{path}: {len(data)} bytes, too short for a 16-byte matrix header")
    rows, cols, elem, typ = struct.unpack_from("<4i", data, 0)
    if typ != 5 or elem != 4:
        raise ValueError(f"{path}: matrix type {typ} / element size {elem}; only float32 (5 / 4) is supported")
    if rows < 0 or cols < 0 or len(data) != 16 + 4 * rows * cols:
        raise ValueError(f"{path}: header says {rows}x{cols} floats but file has {len(data) - 16} data bytes")
    return np.frombuffer(data, dtype="<f4", offset=16).astype(np.float32).reshape(-1)


def load_features(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(features [n, d] float32, labels [n] int64 or None) from a ``.npy`` or a feature list file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature file not found: {path}")
    if path.endswith(".npy"):
        x = np.load(path)
        if x.ndim != 2:
            raise ValueError(f"{path}: expected a [n, d] array, got shape {x.shape}")
        return x.astype(np.float32), None
    root = os.path.dirname(os.path.abspath(path))
    feats, labels = [], []
    with open(path) as f:
        lines = [(i, ln.strip()) for i, ln in enumerate(f, 1) if ln.strip()]
    for lineno, line in tqdm(lines, desc=f"read {os.path.basename(path)}", leave=False, disable=True if len(lines) < 5000 else None):
        parts = line.split()
        fp = parts[0] if os.path.isabs(parts[0]) else os.path.join(root, parts[0])
        try:
            v = np.load(fp).reshape(-1) if fp.endswith(".npy") else read_matio_feature(fp)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: line {lineno}: {exc}") from None
        feats.append(v)
        if len(parts) > 1:
            try:
                labels.append(int(parts[1]))
            except ValueError:
                raise ValueError(f"{path}: line {lineno}: label {parts[1]!r} is not an integer") from None
    if not feats:
        raise ValueError(f"{path}: no features listed")
    dims = {v.size for v in feats}
    if len(dims) != 1:
        raise ValueError(f"{path}: features have different sizes {sorted(dims)}")
    if labels and len(labels) != len(feats):
        raise ValueError(f"{path}: some lines have a label and some do not")
    return np.stack(feats).astype(np.float32), (np.asarray(labels, np.int64) if labels else None)


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def megaface_evaluate(probe: np.ndarray, probe_labels: np.ndarray, distractors: np.ndarray,
                      far: float = 1e-6, chunk: Optional[int] = None) -> dict[str, Any]:
    """Rank-1 identification and TAR@FAR of probes against N distractors (module docstring).

    Args:
        probe: [P, d] probe features (normalised here).
        probe_labels: [P] identity per probe.
        distractors: [N, d] distractor features (normalised here).
        far: false-accept rate for TAR.
        chunk: distractors scored at a time (bounds memory to P * chunk floats); None -> about
            16M scores per chunk.
    """
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")
    probe = _normalize(probe)
    dis = _normalize(distractors)
    labels = np.asarray(probe_labels).reshape(-1)
    if probe.shape[0] != labels.shape[0]:
        raise ValueError(f"{probe.shape[0]} probes but {labels.shape[0]} labels")
    if probe.shape[1] != dis.shape[1]:
        raise ValueError(f"probe dim {probe.shape[1]} != distractor dim {dis.shape[1]}")
    p, n = probe.shape[0], dis.shape[0]
    if n == 0:
        raise ValueError("need at least one distractor")
    num_imp = p * n
    chunk = chunk or max(1, (1 << 24) // max(p, 1))
    # impostors allowed above the threshold (the tiny slack keeps 1e-6 * 1e6 from flooring to 0)
    k = int(math.floor(far * num_imp * (1.0 + 1e-9)))
    max_dis = np.full(p, -np.inf, dtype=np.float32)
    top = np.empty(0, dtype=np.float32)  # the k + 1 largest impostor scores so far
    for s in tqdm(range(0, n, chunk), desc="distractors", leave=False, disable=True if n <= chunk else None):
        sc = probe @ dis[s:s + chunk].T  # [P, c]
        max_dis = np.maximum(max_dis, sc.max(axis=1))
        flat = np.concatenate([top, sc.reshape(-1)])
        top = flat if flat.size <= k + 1 else np.partition(flat, flat.size - (k + 1))[-(k + 1):]
    if k >= 1:
        threshold: Optional[float] = float(np.sort(top)[-(k + 1)])
        note = ""
    else:  # the largest impostor score would give FAR = 0, not far: a TAR there means nothing
        threshold = None
        note = (f"TAR@FAR={far:g} needs at least {math.ceil(1.0 / far - 1e-6):,} impostor pairs "
                f"(probes x distractors); there are {num_imp:,} ({p} x {n}): not reported")
        logger.warning(note)

    sim = probe @ probe.T  # [P, P]
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    pairs = int(same.sum())
    if pairs == 0:
        raise ValueError("no identity has two probe images: rank-1 and TAR are undefined")
    hits = int(((sim > max_dis[:, None]) & same).sum())  # g beats every distractor for probe p
    genuine = sim[np.triu(same, 1)]
    tar = float(np.mean(genuine > threshold)) if threshold is not None else None
    return {
        "rank1": hits / pairs,
        "num_pairs": pairs,
        "num_probes": int(p),
        "num_distractors": int(n),
        "tar": tar,
        "tar_note": note,
        "far_target": far,
        "far_achieved": (k / num_imp) if threshold is not None else None,
        "far_resolution": 1.0 / num_imp,
        "threshold": threshold,
        "num_genuine": int(genuine.size),
        "num_impostor": int(num_imp),
        "max_impostor": float(max_dis.max()),
    }
