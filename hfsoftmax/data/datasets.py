"""Training datasets read from disk: InsightFace RecordIO folders, image list files, image folders
and precomputed features.

* ``RecordDataset``: ``train.rec`` + ``train.idx`` (see :mod:`hfsoftmax.data.recordio`), JPEG
  payloads decoded with Pillow. Works with DataLoader workers: each worker opens its own handle.
* ``ImageListDataset``: a text file with ``relative/path label`` per line, paths relative to the
  list file's folder (``tools/rec2img.py`` writes ``train_list.txt`` / ``val_list.txt`` this way).
* ``ImageFolderDataset``: ``root/<class name>/**/*.jpg|png|...`` (torchvision's ImageFolder layout);
  class ids by sorted folder name, the map in ``classes`` (training writes it as ``classes.json``).
* ``FeatureDataset`` (:mod:`hfsoftmax.data.features`): ``feats.npy`` / ``.npz`` of [n, d_in] features,
  whose items are ``(features float32 [d_in], label)`` instead of images.

``dataset_from_path`` picks one from a path; every dataset returns ``(image [3, H, W] float32 in
[-1, 1], label: int)`` and has ``num_classes``; with ``uint8=True`` the image is the uint8 tensor
[3, H, W] instead (a quarter of the bytes through the DataLoader's worker queues), which
``transforms.normalize_images`` turns into the same float32 image on the device.

Bad records raise a ``ValueError`` naming the file and record. With ``skip_bad=True`` a bad record
is instead counted (``dataset.skipped`` in the process that met it, and a warning) and the next good
record is returned *with its own label*; a record is never given another record's label.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from hfsoftmax.data.features import FeatureDataset, is_features_path
from hfsoftmax.data.recordio import (RecordIOReader, class_of, read_insightface_layout,
                                     read_property, unpack)
from hfsoftmax.data.transforms import decode_image, hflip, keyed_coin, random_hflip, to_tensor_normalized, to_tensor_uint8

logger = logging.getLogger(__name__)


class _SkippingDataset(Dataset):
    """Shared ``__getitem__``: load one item, or with skip_bad move on to the next good one."""

    skip_bad: bool
    skipped: int
    # (seed, epoch) of the training run: the flip of item i is then a pure function of
    # (seed, epoch, i), so a resumed run (or another worker count) flips exactly as an
    # uninterrupted one; None: the torch RNG of the worker decides.
    flip_key: Optional[tuple[int, int]] = None
    uint8: bool = False   # return uint8 [3, H, W] (normalised later, on the device) instead of float32
    flip: bool = True     # random horizontal flips when training (data.flip)
    train: bool = False   # a training set: flips apply

    def __init__(self, image_size: int, train: bool, skip_bad: bool, uint8: bool, flip: bool) -> None:
        self.image_size, self.train, self.skip_bad = image_size, train, skip_bad
        self.uint8, self.flip = uint8, flip
        self.skipped = 0

    def _to_tensor(self, img, image_size: int) -> torch.Tensor:
        return to_tensor_uint8(img, image_size) if self.uint8 else to_tensor_normalized(img, image_size)

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Key the random flips of the coming epoch (called by the train loop before each epoch)."""
        self.flip_key = (int(seed), int(epoch))

    def _maybe_flip(self, img: torch.Tensor, index: int) -> torch.Tensor:
        if self.flip_key is None:
            return random_hflip(img)
        return hflip(img) if keyed_coin(self.flip_key[0], self.flip_key[1], index) else img

    def _image_file(self, path: str, where: str, index: int, image_size: int) -> torch.Tensor:
        """Item ``index``'s image from the file ``path``: decoded, sized, flipped when training with
        flips; an unreadable or undecodable file is an error naming ``where``."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise OSError(f"{where}: cannot read image ({exc.strerror})") from None
        img = self._to_tensor(decode_image(data, where), image_size)
        return self._maybe_flip(img, index) if self.train and self.flip else img

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _load(self, index: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        if not self.skip_bad:
            return self._load(index)
        for step in range(n):
            j = (index + step) % n
            try:
                return self._load(j)
            except (ValueError, OSError) as exc:
                self.skipped += 1
                logger.warning("skipping bad item (%d skipped so far in pid %d): %s", self.skipped,
                               os.getpid(), exc)
        raise ValueError("every item of the dataset failed to load")


class RecordDataset(_SkippingDataset):
    """Images and labels from an InsightFace ``train.rec`` / ``train.idx`` pair.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its ``.idx`` (must exist when given); by default the same name with ``.idx``, and
            when that is absent the records are numbered in file order by a sequential scan.
        image_size: output side; images of another size are resized.
        train: augment (random horizontal flip, when ``flip``) when True.
        skip_bad: skip undecodable records (counted) instead of raising.
        uint8: return uint8 images (see the module docstring).
        flip: random horizontal flips when training (``data.flip``); False where a mirror image is
            another class (glyphs, text, logos, product labels).
    """

    def __init__(self, rec_path: str, image_size: int, idx_path: Optional[str] = None, train: bool = True,
                 skip_bad: bool = False, uint8: bool = False, flip: bool = True) -> None:
        if idx_path and not os.path.isfile(idx_path):  # asked for by name: never fall back silently
            raise FileNotFoundError(f"RecordIO index not found: {idx_path}")
        idx_path = idx_path or os.path.splitext(rec_path)[0] + ".idx"
        if os.path.isfile(idx_path):
            self.reader = RecordIOReader(rec_path, idx_path)
        else:  # no .idx: number the records in file order by one sequential pass
            logger.warning("%s not found: indexing %s by a sequential scan", idx_path, rec_path)
            self.reader = RecordIOReader(rec_path, "")
            self.reader.scan_index()
        self.rec_path = rec_path
        super().__init__(image_size, train, skip_bad, uint8, flip)
        layout = read_insightface_layout(self.reader)
        self.layout = layout
        self.keys: list[int] = layout.image_keys
        self.identity_ranges = layout.identity_ranges
        prop = read_property(os.path.dirname(os.path.abspath(rec_path)))
        if layout.identity_ranges is not None:
            num = len(layout.identity_ranges)
        elif prop is not None:
            num = prop[0]
        else:
            num = 1 + max(self._label_of_key(k) for k in self.keys) if self.keys else 0
        if prop is not None and prop[0] != num:
            logger.warning("%s: property says %d classes, record 0 says %d; using %d", rec_path, prop[0], num,
                           max(num, prop[0]))
            num = max(num, prop[0])
        self.num_classes = int(num)
        logger.info("%s: %d images, %d classes", rec_path, len(self.keys), self.num_classes)

    def _label_of_key(self, key: int) -> int:
        header, _ = unpack(self.reader.read_idx(key), f"{self.rec_path}: record {key}")
        return class_of(header.label, f"{self.rec_path}: record {key}")

    def __len__(self) -> int:
        return len(self.keys)

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        key = self.keys[index]
        where = f"{self.rec_path}: record {key}"
        header, payload = unpack(self.reader.read_idx(key), where)
        label = self.layout.check_label(key, class_of(header.label, where), where, self.num_classes)
        img = self._to_tensor(decode_image(payload, where), self.image_size)
        if self.train and self.flip:
            img = self._maybe_flip(img, index)
        return img, label


class ImageListDataset(_SkippingDataset):
    """Images listed as ``relative/path label`` per line (paths relative to the list's folder).

    Args:
        list_path: the list file.
        image_size: output side; images of another size are resized.
        train: augment (random horizontal flip, when ``flip``) when True.
        skip_bad: skip unreadable images (counted) instead of raising.
        num_classes: override (default: max label + 1).
        uint8: return uint8 images (see the module docstring).
        flip: as for :class:`RecordDataset`.
    """

    def __init__(self, list_path: str, image_size: int, train: bool = True, skip_bad: bool = False,
                 num_classes: Optional[int] = None, uint8: bool = False, flip: bool = True) -> None:
        if not os.path.isfile(list_path):
            raise FileNotFoundError(f"image list not found: {list_path}")
        self.list_path = list_path
        self.root = os.path.dirname(os.path.abspath(list_path))
        super().__init__(image_size, train, skip_bad, uint8, flip)
        paths: list[str] = []
        labels: list[int] = []
        self.line_numbers: list[int] = []
        with open(list_path, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(None, 1)
                try:
                    if len(parts) != 2:
                        raise ValueError
                    label = int(parts[1])
                    if label < 0:
                        raise ValueError
                except ValueError:
                    raise ValueError(f"{list_path}: line {lineno} is not 'relative/path label': {line[:80]!r}") from None
                paths.append(parts[0])
                labels.append(label)
                self.line_numbers.append(lineno)
        if not paths:
            raise ValueError(f"{list_path}: no images listed")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(num_classes if num_classes is not None else self.labels.max() + 1)
        if self.labels.max() >= self.num_classes:
            raise ValueError(f"{list_path}: label {int(self.labels.max())} >= num_classes {self.num_classes}")
        logger.info("%s: %d images, %d classes", list_path, len(paths), self.num_classes)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        path = os.path.join(self.root, self.paths[index])
        where = f"{self.list_path}: line {self.line_numbers[index]} ({path})"
        return self._image_file(path, where, index, self.image_size), int(self.labels[index])


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


class ImageFolderDataset(_SkippingDataset):
    """Images in one subfolder per class: ``root/<class name>/**/<image>`` (any depth below the class).

    Class ids follow the sorted class-folder names (Python string order: "10" < "2"), so the same
    folders always give the same map, whatever their names; ``classes`` is that map (name -> id).
    Hidden folders and files are ignored; a class folder without images keeps its id (a warning).

    Args:
        root: the folder of class folders.
        image_size, train, skip_bad, uint8, flip: as for :class:`ImageListDataset`.
    """

    def __init__(self, root: str, image_size: int, train: bool = True, skip_bad: bool = False,
                 uint8: bool = False, flip: bool = True) -> None:
        self.root = root
        super().__init__(image_size, train, skip_bad, uint8, flip)
        names = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
        if not names:
            raise FileNotFoundError(f"dataset folder {root} has no class folders (nor train.rec / train_list.txt)")
        self.classes: dict[str, int] = {name: i for i, name in enumerate(names)}
        paths: list[str] = []
        labels: list[int] = []
        empty = []
        for name, label in self.classes.items():
            found = []
            for dirpath, dirnames, files in os.walk(os.path.join(root, name)):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(files) if _is_image(f)]
            if not found:
                empty.append(name)
            paths += found
            labels += [label] * len(found)
        if not paths:
            raise FileNotFoundError(f"dataset folder {root}: no images ({', '.join(IMAGE_EXTS)}) in its "
                                    f"{len(names)} class folders")
        if empty:
            logger.warning("%s: %d class folders hold no images (their ids stay reserved): %s", root, len(empty),
                           ", ".join(empty[:5]))
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(names)
        logger.info("%s: %d images, %d class folders", root, len(paths), self.num_classes)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        path = os.path.join(self.root, self.paths[index])
        return self._image_file(path, path, index, self.image_size), int(self.labels[index])


def _has_class_folders(path: str) -> bool:
    """A folder with at least one non-hidden subfolder holding an image (at its top level or below)."""
    for d in sorted(os.listdir(path)):
        sub = os.path.join(path, d)
        if d.startswith(".") or not os.path.isdir(sub):
            continue
        for _, _, files in os.walk(sub):
            if any(_is_image(f) for f in files):
                return True
    return False


def write_class_map(classes: dict[str, int], path: str) -> None:
    """``{"class name": id, ...}`` as JSON (atomic), in id order."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(classes.items(), key=lambda kv: kv[1])), f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def dataset_from_path(path: str, image_size: int, train: bool = True, skip_bad: bool = False,
                      uint8: bool = False, labels: str = "", flip: bool = True) -> Dataset:
    """The dataset a path points at (``train`` only switches augmentation on, ``flip`` its random horizontal
    flips; ``uint8``: see the module).

    * a folder with ``train.rec`` (and ``train.idx``) -> :class:`RecordDataset`
    * a folder with ``train_list.txt`` -> :class:`ImageListDataset` over that list
    * a folder of class folders -> :class:`ImageFolderDataset`
    * a ``.rec`` file -> :class:`RecordDataset` (its ``.idx`` beside it)
    * a ``.npy`` / ``.npz`` file -> :class:`FeatureDataset` (``labels``: its labels file, data.labels)
    * any other file -> :class:`ImageListDataset` (``relative/path label`` per line)

    Raises:
        FileNotFoundError: naming the path when it, or what it should contain, is missing.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path not found: {path}")
    if os.path.isdir(path):
        rec = os.path.join(path, "train.rec")
        lst = os.path.join(path, "train_list.txt")
        if os.path.isfile(rec):
            return RecordDataset(rec, image_size, train=train, skip_bad=skip_bad, uint8=uint8, flip=flip)
        if os.path.isfile(lst):
            return ImageListDataset(lst, image_size, train=train, skip_bad=skip_bad, uint8=uint8, flip=flip)
        if _has_class_folders(path):
            return ImageFolderDataset(path, image_size, train=train, skip_bad=skip_bad, uint8=uint8, flip=flip)
        raise FileNotFoundError(f"dataset folder {path} has neither train.rec nor train_list.txt nor class "
                                f"folders of images")
    if path.endswith(".rec"):
        return RecordDataset(path, image_size, train=train, skip_bad=skip_bad, uint8=uint8, flip=flip)
    if is_features_path(path):
        return FeatureDataset(path, labels)
    if labels:
        raise ValueError(f"data.labels={labels} is for features files (.npy / .npz); {path} is not one")
    return ImageListDataset(path, image_size, train=train, skip_bad=skip_bad, uint8=uint8, flip=flip)
