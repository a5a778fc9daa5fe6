"""Feature-level datasets: classify precomputed embeddings, the extreme-classification setting
(MACH, PECOS and the XMC benchmarks train over fixed features of a frozen encoder).

Format (picked by extension in :func:`hfsoftmax.data.datasets.dataset_from_path`):

* ``feats.npy``: float32 / float16 ``[n, d_in]``, memory-mapped (``np.load(mmap_mode="r")``, so a set
  larger than RAM trains; each DataLoader worker maps it itself), with labels from ``data.labels``:
  an int ``.npy`` ``[n]`` or a text file of one integer per line.
* ``data.npz`` with arrays ``features`` and ``labels`` (read whole: numpy cannot map an .npz member;
  use .npy for large sets). ``data.labels``, when given, overrides its ``labels``.

Items are ``(features float32 [d_in], label)``; K = max label + 1. Train them with
``model.backbone=identity`` (d_in must equal model.feature_dim) or ``model.backbone=mlp``.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

FEATURE_EXTS = (".npy", ".npz")


def is_features_path(path: str) -> bool:
    """True for a ``.npy`` / ``.npz`` file: a features dataset rather than images."""
    return bool(path) and os.path.splitext(path)[1].lower() in FEATURE_EXTS and not os.path.isdir(path)


def features_shape(path: str) -> tuple[int, ...]:
    """Shape of the features array of ``path`` from its header alone (no data read)."""
    if path.lower().endswith(".npz"):
        with zipfile.ZipFile(path) as z:
            if "features.npy" not in z.namelist():
                raise ValueError(f"{path}: an .npz features dataset needs arrays 'features' and 'labels'; "
                                 f"it holds {', '.join(n[:-4] for n in z.namelist()) or 'nothing'}")
            with z.open("features.npy") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, _ = read(f)
        return tuple(shape)
    return tuple(np.load(path, mmap_mode="r").shape)


def read_labels(path: str) -> np.ndarray:
    """int64 [n] from an ``.npy`` or a text file of one integer per line (error names file and line)."""
    if path.lower().endswith(".npy"):
        arr = np.load(path)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: labels must be a 1-D integer array, got {arr.dtype} {tuple(arr.shape)}")
        return arr.astype(np.int64, copy=False)
    out: list[int] = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(int(line))
            except ValueError:
                raise ValueError(f"{path}: line {lineno} is not an integer label: {line[:80]!r}") from None
    return np.asarray(out, dtype=np.int64)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Every label in [0, num_classes), else a one-line error naming ``where`` and the first bad index."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{where}: label {int(labels[i])} at index {i} is outside [0, {num_classes}) "
                         f"({bad.size} such labels)")


def beside_labels(path: str) -> Optional[str]:
    """The labels file named after features file ``path`` (``x.npy`` -> ``x.labels.npy`` or
    ``x.labels.txt`` in the same folder), or None when there is none."""
    stem = os.path.splitext(path)[0]
    for cand in (f"{stem}.labels.npy", f"{stem}.labels.txt"):
        if os.path.isfile(cand):
            return cand
    return None


class FeatureDataset(Dataset):
    """Precomputed features and their labels (see the module docstring).

    Args:
        path: ``feats.npy`` or ``data.npz``.
        labels_path: labels (``.npy`` or text); for ``.npy`` features without it, the file named
            :func:`beside_labels` (``feats.labels.npy`` or ``feats.labels.txt`` beside ``feats.npy``)
            is used when it exists (how a held-out ``data.val_path=val.npy`` finds its labels). A
            relative path that does not exist as given is looked for beside the features file.
        num_classes: K (default: max label + 1); every label must lie in [0, K).
    """

    def __init__(self, path: str, labels_path: str = "", num_classes: Optional[int] = None) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"features file not found: {path}")
        beside = os.path.join(os.path.dirname(path), labels_path)
        if labels_path and not os.path.isfile(labels_path) and not os.path.isabs(labels_path) and os.path.isfile(beside):
            labels_path = beside      # a relative data.labels is also looked for beside the features file
        if labels_path and not os.path.isfile(labels_path):
            raise FileNotFoundError(f"labels file not found (data.labels): {labels_path}")
        if not labels_path and not path.lower().endswith(".npz"):
            labels_path = beside_labels(path) or ""
        self.path = path
        self.is_npz = path.lower().endswith(".npz")
        shape = features_shape(path)
        if len(shape) != 2:
            raise ValueError(f"{path}: features must be [n, d_in], got shape {shape}")
        self.n, self.input_dim = int(shape[0]), int(shape[1])
        if labels_path:
            labels, where = read_labels(labels_path), labels_path
        elif self.is_npz:
            with np.load(path) as z:
                if "labels" not in z.files:
                    raise ValueError(f"{path}: no 'labels' array (give data.labels=labels.npy)")
                labels, where = np.asarray(z["labels"]), path
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
            labels = labels.astype(np.int64, copy=False)
        else:
            stem = os.path.splitext(os.path.basename(path))[0]
            raise ValueError(f"{path}: a .npy features file needs its labels: data.labels=labels.npy (or a text "
                             f"file, one integer per line), or {stem}.labels.npy / {stem}.labels.txt beside it "
                             f"(a held-out data.val_path), or an .npz with a 'labels' array")
        if len(labels) != self.n:
            raise ValueError(f"{where}: {len(labels)} labels for {self.n} feature rows in {path}")
        if self.n == 0:
            raise ValueError(f"{path}: no feature rows")
        self.labels = labels
        self.num_classes = int(num_classes if num_classes is not None else max(int(labels.max()) + 1, 1))
        check_labels(labels, self.num_classes, where)
        self._feats: Optional[np.ndarray] = None      # opened lazily, once per process (workers map their own)
        dtype = self._features().dtype
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"{path}: features must be float32 or float16, got {dtype}")

    def _features(self) -> np.ndarray:
        if self._feats is None:
            if self.is_npz:
                with np.load(self.path) as z:
                    self._feats = np.asarray(z["features"])
            else:
                self._feats = np.load(self.path, mmap_mode="r")
        return self._feats

    def __getstate__(self) -> dict[str, Any]:
        # a memmap would pickle as a full in-memory copy: spawned workers re-map the file instead
        state = dict(self.__dict__)
        if not self.is_npz:
            state["_feats"] = None
        return state

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        row = np.array(self._features()[index], dtype=np.float32)       # a copy: [d_in] float32
        return torch.from_numpy(row), int(self.labels[index])


def make_separable(n: int, num_classes: int, dim: int, seed: int, out_dir: str, noise: float = 0.3,
                   npz: bool = False, dtype: Any = np.float32) -> tuple[str, str]:
    """A clearly separable synthetic features set (for tests and demos).

    Class centres are random unit vectors scaled by sqrt(dim) (pairwise distance ~ sqrt(2 dim)); a
    sample is its centre plus N(0, noise^2) per coordinate (norm ~ noise sqrt(dim)), so with noise
    well below 1 nearest-centre classification is all but exact. Labels cycle 0..K-1 (each class
    has n / K samples), shuffled.

    Returns:
        (features path, labels path): ``feats.npy`` + ``labels.npy`` in ``out_dir``, or with
        ``npz=True`` ``feats.npz`` holding both (labels path then "").
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim))
    centres *= np.sqrt(dim) / np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    feats = (centres[labels] + noise * rng.standard_normal((n, dim))).astype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    if npz:
        path = os.path.join(out_dir, "feats.npz")
        np.savez(path, features=feats, labels=labels)
        return path, ""
    fpath, lpath = os.path.join(out_dir, "feats.npy"), os.path.join(out_dir, "labels.npy")
    np.save(fpath, feats)
    np.save(lpath, labels)
    return fpath, lpath


def resolve_input_dim(cfg: Any) -> int:
    """Check that model.backbone fits data.path and return the features' width for the backbone.

    Image backbones on a features file, or identity / mlp on images, are one-line errors; identity
    needs model.feature_dim == d_in; a set model.input_dim must match the file. Returns 0 for images.
    """
    from ..backbones import ALIASES, FEATURE_BACKBONES
    from ..config import ConfigError

    backbone = ALIASES.get(cfg.model.backbone, cfg.model.backbone)
    path = cfg.data.path
    if not is_features_path(path):
        if backbone in FEATURE_BACKBONES:
            raise ConfigError(f"model.backbone={backbone} trains over precomputed features: data.path must be a "
                              f".npy / .npz features file (got {path or 'the synthetic images'})")
        return cfg.model.input_dim
    if not os.path.isfile(path):
        raise FileNotFoundError(f"features file not found: {path}")
    try:
        shape = features_shape(path)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable features file ({e})") from None
    if len(shape) != 2:
        raise ValueError(f"{path}: features must be [n, d_in], got shape {shape}")
    d_in = int(shape[1])
    if backbone not in FEATURE_BACKBONES:
        raise ConfigError(f"data.path={path} holds features [n, {d_in}], not images: use model.backbone=identity "
                          f"or model.backbone=mlp (got {cfg.model.backbone})")
    if cfg.model.input_dim and cfg.model.input_dim != d_in:
        raise ConfigError(f"model.input_dim={cfg.model.input_dim} but {path} holds features of width {d_in} "
                          f"(0 takes it from the file)")
    if backbone == "identity" and cfg.model.feature_dim != d_in:
        raise ConfigError(f"model.backbone=identity passes the features of {path} (width {d_in}) through: "
                          f"model.feature_dim={cfg.model.feature_dim} must equal {d_in} (or use model.backbone=mlp)")
    return d_in


@torch.no_grad()
def classify_features(backbone: torch.nn.Module, head: Any, dataset: FeatureDataset, device: Any,
                      batch_size: int = 256) -> dict[str, Any]:
    """Top-1 / top-5 over all K of a held-out features set (``data.val_path=val.npz``): the same
    scoring as held-out images (:func:`hfsoftmax.eval.classify.topk_hits`), minus the flip-sum and the
    image checks of ``extract_features``; embeddings are L2-normalised as there."""
    from ..eval.classify import summarize, topk_hits

    head.flush()                     # every push has landed
    was_training = backbone.training
    backbone.eval()
    hits = []
    try:
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            x = torch.from_numpy(np.array(dataset._features()[start:stop], dtype=np.float32)).to(device)  # [b, d_in]
            f = torch.nn.functional.normalize(backbone(x).float(), dim=1)       # [b, d]
            hits.append(topk_hits(head, f.cpu(), torch.from_numpy(dataset.labels[start:stop]), device))
    finally:
        backbone.train(was_training)
    return summarize(torch.cat(hits))
