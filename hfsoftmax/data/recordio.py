"""MXNet RecordIO, read and written natively (no MXNet), plus InsightFace's layout on top of it.

Framing (dmlc-core RecordIO), all integers little-endian uint32:

* every part starts with the magic ``0xced7230a`` and a length word ``lrec`` whose upper 3 bits
  are the continuation flag ``cflag`` and whose lower 29 bits are the part's byte length;
  the part's bytes follow, zero-padded to a multiple of 4;
* ``cflag`` is 0 for a record stored whole, 1 / 2 / 3 for the first / middle / last part of a
  record that was split. The writer splits a record wherever the magic word occurs in the payload
  at a 4-byte aligned offset and drops those 4 bytes; the reader puts the magic back between parts.
  (This keeps the magic unique in the file so a reader can resynchronise.)

``.idx`` files are text, one ``key<TAB>byte_offset`` line per record; the offset is where the
record's first part (its magic) starts.

Image records (MXNet ``recordio.pack``): a 24-byte header ``struct IRHeader {uint32 flag; float32
label; uint64 id; uint64 id2}`` (``<IfQQ``). When ``flag > 0`` the label is instead an array of
``flag`` float32 values that follows the header. The image bytes (JPEG) follow.

InsightFace's convention for ``train.rec``: record 0's label is ``(a, b)``; images are records
``1 .. a-1``; records ``a .. b-1`` hold each identity's ``(start, end)`` image range. Some datasets
store an image's label as a float array whose first element is the class. Newer packs have a
record 0 with ``flag == 0``: then every key in the ``.idx`` is an image (record 0 too, unless its
payload is empty).
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_HEADER_FMT = "<IfQQ"
HEADER_SIZE = struct.calcsize(_HEADER_FMT)  # 24


class RecordIOError(ValueError):
    """A malformed ``.rec`` / ``.idx`` file; the message names the file and the record."""


def _encode_lrec(cflag: int, length: int) -> bytes:
    if length > _LEN_MASK:
        raise ValueError(f"RecordIO part of {length} bytes exceeds the 29-bit length field")
    return struct.pack("<II", MAGIC, (cflag << 29) | length)


def _pad(n: int) -> int:
    """Bytes of zero padding after a part of n bytes."""
    return (4 - n % 4) % 4


# ----------------------------------------------------------------------------------------------
# Framing
# ----------------------------------------------------------------------------------------------

class RecordIOWriter:
    """Write a ``.rec`` (and optionally its ``.idx``) atomically: temp files, ``os.replace`` on close.

    Args:
        rec_path: the ``.rec`` to create.
        idx_path: the ``.idx`` to create alongside, or None for a sequential-only file.
    """

    def __init__(self, rec_path: str, idx_path: Optional[str] = None) -> None:
        self.rec_path = rec_path
        self.idx_path = idx_path
        self._tmp_rec = f"{rec_path}.tmp.{os.getpid()}"
        self._tmp_idx = f"{idx_path}.tmp.{os.getpid()}" if idx_path else None
        self._f: Optional[BinaryIO] = open(self._tmp_rec, "wb")
        self._idx = open(self._tmp_idx, "w") if self._tmp_idx else None
        self._keys: set[int] = set()

    def write(self, data: bytes) -> int:
        """Append one record; returns its byte offset in the file."""
        if self._f is None:
            raise ValueError(f"{self.rec_path}: writer is closed")
        f = self._f
        offset = f.tell()
        buf = memoryview(bytes(data))
        n = len(buf)
        start = 0
        # split at every 4-byte aligned occurrence of the magic (it must stay unique in the stream)
        for i in range(0, n - n % 4, 4):
            if buf[i:i + 4] == _MAGIC_BYTES:
                f.write(_encode_lrec(1 if start == 0 else 2, i - start))
                f.write(buf[start:i])  # i - start is a multiple of 4: no padding needed
                start = i + 4
        f.write(_encode_lrec(0 if start == 0 else 3, n - start))
        f.write(buf[start:])
        f.write(b"\x00" * _pad(n - start))
        return offset

    def write_idx(self, key: int, data: bytes) -> int:
        """Append one record and list it under ``key`` in the ``.idx``."""
        if self._idx is None:
            raise ValueError(f"{self.rec_path}: write_idx needs an idx_path")
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: duplicate key {key}")
        self._keys.add(key)
        offset = self.write(data)
        self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        self._f = None
        if self._idx is not None:
            self._idx.close()
            os.replace(self._tmp_idx, self.idx_path)  # type: ignore[arg-type]
        os.replace(self._tmp_rec, self.rec_path)

    def abort(self) -> None:
        """Close and delete the temp files (nothing replaces the destination)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._idx is not None:
            self._idx.close()
        for p in (self._tmp_rec, self._tmp_idx):
            if p and os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_idx_file(idx_path: str) -> dict[int, int]:
    """Parse a ``.idx`` (``key<TAB>offset`` per line) into {key: offset}."""
    out: dict[int, int] = {}
    with open(idx_path, "r") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            try:
                key, off = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise RecordIOError(f"{idx_path}: line {lineno} is not 'key<TAB>offset': {line[:80]!r}") from None
            if off < 0:
                raise RecordIOError(f"{idx_path}: line {lineno} has a negative offset {off}")
            if out.get(key, off) != off:  # two offsets for one key: which record is it? never guess
                raise RecordIOError(f"{idx_path}: line {lineno} lists record {key} again at offset {off} "
                                    f"(first at {out[key]})")
            out[key] = off
    return out


class RecordIOReader:
    """Read a ``.rec`` sequentially (iteration) or by key through its ``.idx`` (``read_idx``).

    The file handle is opened lazily and re-opened after a fork, so one reader object can be
    handed to DataLoader workers and each worker reads through its own handle (a shared handle
    would share one file offset between processes).

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its ``.idx``; None means ``rec_path`` with ``.idx`` if that exists, else
            sequential access only. Pass ``""`` to force sequential-only.
    """

    def __init__(self, rec_path: str, idx_path: Optional[str] = None) -> None:
        if not os.path.isfile(rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {rec_path}")
        if idx_path is None:
            guess = os.path.splitext(rec_path)[0] + ".idx"
            idx_path = guess if os.path.isfile(guess) else ""
        if idx_path and not os.path.isfile(idx_path):
            raise FileNotFoundError(f"RecordIO index not found: {idx_path}")
        self.rec_path = rec_path
        self.idx_path = idx_path or None
        self.file_size = os.path.getsize(rec_path)
        self.index: dict[int, int] = read_idx_file(idx_path) if idx_path else {}
        for key, off in self.index.items():
            if off + 8 > self.file_size:
                raise RecordIOError(f"{self.idx_path}: record {key} points to offset {off}, past the end of "
                                    f"{rec_path} ({self.file_size} bytes)")
        self._f: Optional[BinaryIO] = None
        self._pid = -1

    @property
    def keys(self) -> list[int]:
        """Keys listed in the ``.idx`` (sorted)."""
        return sorted(self.index)

    def _handle(self) -> BinaryIO:
        if self._f is None or self._pid != os.getpid():
            self._f = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._f

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_f"], state["_pid"] = None, -1  # never pickle a file handle
        return state

    def close(self) -> None:
        if self._f is not None and self._pid == os.getpid():
            self._f.close()
        self._f = None

    def _read_record(self, f: BinaryIO, what: str) -> Optional[bytes]:
        """Read one (possibly multi-part) record at the current position; None at a clean EOF."""
        chunks: list[bytes] = []
        first = True
        while True:
            pos = f.tell()
            head = f.read(8)
            if not head and first:
                return None
            if len(head) < 8:
                raise RecordIOError(f"{self.rec_path}: {what} is truncated (part header at byte {pos} "
                                    f"has {len(head)} of 8 bytes)")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(f"{self.rec_path}: {what} has wrong magic 0x{magic:08x} at byte {pos} "
                                    f"(expected 0x{MAGIC:08x})")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if cflag > 3 or (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
                raise RecordIOError(f"{self.rec_path}: {what} has an out-of-order continuation flag "
                                    f"{cflag} at byte {pos}")
            body = f.read(length + _pad(length))
            if len(body) < length + _pad(length):
                raise RecordIOError(f"{self.rec_path}: {what} is truncated (part at byte {pos} declares "
                                    f"{length} bytes, {len(body)} remain)")
            chunks.append(body[:length])
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(chunks)
            first = False

    def read_idx(self, key: int) -> bytes:
        """The record listed under ``key`` in the ``.idx``."""
        if not self.index:
            raise RecordIOError(f"{self.rec_path}: random access needs a .idx file")
        try:
            off = self.index[key]
        except KeyError:
            raise KeyError(f"{self.idx_path}: no record {key}") from None
        f = self._handle()
        f.seek(off)
        rec = self._read_record(f, f"record {key}")
        if rec is None:
            raise RecordIOError(f"{self.rec_path}: record {key} at offset {off} is past the end of the file")
        return rec

    def scan_index(self) -> dict[int, int]:
        """Build the index by one sequential pass when there is no ``.idx``: record n (in file
        order, the numbering InsightFace's packer uses) -> its offset. Returns and keeps it."""
        index: dict[int, int] = {}
        with open(self.rec_path, "rb") as f:
            n = 0
            while True:
                off = f.tell()
                if self._read_record(f, f"record #{n} (sequential)") is None:
                    break
                index[n] = off
                n += 1
        self.index = index
        logger.info("%s: indexed %d records by a sequential scan", self.rec_path, n)
        return index

    def __iter__(self) -> Iterator[bytes]:
        """Every record in file order (no ``.idx`` needed). Uses its own handle."""
        with open(self.rec_path, "rb") as f:
            n = 0
            while True:
                rec = self._read_record(f, f"record #{n} (sequential)")
                if rec is None:
                    return
                yield rec
                n += 1


# ----------------------------------------------------------------------------------------------
# Image record header
# ----------------------------------------------------------------------------------------------

@dataclass
class IRHeader:
    """MXNet image-record header. ``label`` is a float, or a float32 array when ``flag > 0``."""
    flag: int
    label: Union[float, np.ndarray]
    id: int
    id2: int


def _exact_f4(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as float32, refusing any value float32 would change (e.g. a class id above 2^24)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    f4 = arr.astype("<f4")
    bad = np.nonzero((f4.astype(np.float64) != arr) & ~(np.isnan(arr) & np.isnan(f4)))[0]
    if bad.size:
        v = float(arr[bad[0]])
        raise ValueError(f"{what}: label {v:.17g} is not exactly representable as float32 (stored as "
                         f"{float(f4[bad[0]])!r}); it would be read back as another value")
    return f4


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Header + optional label array + payload, as MXNet's ``recordio.pack`` lays them out.

    Labels are float32 in the format; a value float32 cannot hold exactly (a class id or record
    range above 2^24) raises ValueError rather than being written as a neighbouring value.
    """
    label = header.label
    what = f"record id {header.id}"
    if isinstance(label, (int, float, np.integer, np.floating)):
        f4 = _exact_f4(np.array([label]), what)
        return struct.pack(_HEADER_FMT, 0, float(f4[0]), header.id, header.id2) + bytes(payload)
    arr = _exact_f4(label, what)
    return (struct.pack(_HEADER_FMT, arr.size, 0.0, header.id, header.id2) + arr.tobytes()
            + bytes(payload))


def unpack(record: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record into its header and payload; ``where`` names the record in errors."""
    if len(record) < HEADER_SIZE:
        raise RecordIOError(f"{where}: {len(record)} bytes, shorter than the {HEADER_SIZE}-byte image header")
    flag, label, id1, id2 = struct.unpack_from(_HEADER_FMT, record, 0)
    off = HEADER_SIZE
    if flag > 0:
        end = off + 4 * flag
        if end > len(record):
            raise RecordIOError(f"{where}: header declares {flag} labels but the record has only "
                                f"{len(record)} bytes")
        label = np.frombuffer(record, dtype="<f4", count=flag, offset=off).copy()
        off = end
    return IRHeader(int(flag), label, int(id1), int(id2)), bytes(record[off:])


def class_of(label: Union[float, np.ndarray], where: str) -> int:
    """The integer class of an image label (a float, or an array whose first element is the class).

    Raises RecordIOError when the value is not a non-negative integer: never round silently.
    """
    if isinstance(label, np.ndarray) and label.size == 0:
        raise RecordIOError(f"{where}: empty label array")
    value = float(label.reshape(-1)[0]) if isinstance(label, np.ndarray) else float(label)
    if not np.isfinite(value) or value < 0 or value != int(value):
        raise RecordIOError(f"{where}: label {value!r} is not a non-negative integer class")
    return int(value)


# ----------------------------------------------------------------------------------------------
# InsightFace layout
# ----------------------------------------------------------------------------------------------

@dataclass
class InsightFaceLayout:
    """Which keys are images and, when present, each identity's (start, end) key range."""
    image_keys: list[int]
    identity_ranges: Optional[list[tuple[int, int]]]

    def check_label(self, key: int, label: int, where: str, num_classes: Optional[int] = None) -> int:
        """``label`` of image record ``key``, refused when it lies outside [0, num_classes) or
        contradicts record 0's identity ranges (identity i holds keys [start_i, end_i)): a flipped
        bit in a label float must never silently become another class."""
        if num_classes is None and self.identity_ranges is not None:
            num_classes = len(self.identity_ranges)
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise RecordIOError(f"{where}: label {label} outside 0..{(num_classes or 1) - 1}")
        if self.identity_ranges:
            if getattr(self, "_starts", None) is None:
                self._starts = np.array([s for s, _ in self.identity_ranges], dtype=np.int64)
                self._ends = np.array([e for _, e in self.identity_ranges], dtype=np.int64)
            i = int(np.searchsorted(self._starts, key, side="right")) - 1
            expected = i if i >= 0 and key < self._ends[i] else None
            if expected != label:
                told = f"class {expected}" if expected is not None else "no identity"
                raise RecordIOError(f"{where}: label {label}, but record 0's identity ranges put record {key} in "
                                    f"{told} (a corrupt label or index)")
        return label


def read_insightface_layout(reader: RecordIOReader) -> InsightFaceLayout:
    """Interpret record 0 of an InsightFace ``train.rec`` (see the module docstring)."""
    if not reader.index:
        raise RecordIOError(f"{reader.rec_path}: InsightFace layout needs the .idx file")
    if 0 not in reader.index:
        return InsightFaceLayout(reader.keys, None)
    header, payload0 = unpack(reader.read_idx(0), f"{reader.rec_path}: record 0")
    if header.flag <= 0:
        # no (a, b) header: every record is an image (as arcface_torch reads such packs), record 0
        # included when it carries an image; an empty record 0 is a bare header and is left out
        return InsightFaceLayout([k for k in reader.keys if k != 0 or payload0], None)
    lab = np.asarray(header.label)
    if lab.size < 2:
        raise RecordIOError(f"{reader.rec_path}: record 0 label {lab.tolist()} should be (a, b)")
    if not all(np.isfinite(lab[:2])) or any(v != int(v) for v in lab[:2]):
        raise RecordIOError(f"{reader.rec_path}: record 0 label {lab[:2].tolist()} is not an integer (a, b)")
    a, b = int(lab[0]), int(lab[1])
    if not (1 <= a <= b):
        raise RecordIOError(f"{reader.rec_path}: record 0 label ({a}, {b}) is not an ordered range")
    missing = [k for k in range(1, a) if k not in reader.index]
    if missing:
        raise RecordIOError(f"{reader.rec_path}: record 0 says images are 1..{a - 1} but the .idx lacks "
                            f"record {missing[0]} ({len(missing)} missing)")
    ranges: list[tuple[int, int]] = []
    for key in range(a, b):
        if key not in reader.index:
            raise RecordIOError(f"{reader.rec_path}: identity record {key} is missing from the .idx")
        h, _ = unpack(reader.read_idx(key), f"{reader.rec_path}: record {key}")
        rl = np.asarray(h.label).reshape(-1)
        if rl.size < 2:
            raise RecordIOError(f"{reader.rec_path}: identity record {key} has no (start, end) label")
        start, end = float(rl[0]), float(rl[1])
        if not (start == int(start) and end == int(end) and 1 <= start <= end <= a):
            raise RecordIOError(f"{reader.rec_path}: identity record {key} range ({start:g}, {end:g}) is not "
                                f"inside the image records 1..{a - 1}")
        ranges.append((int(start), int(end)))
    return InsightFaceLayout(list(range(1, a)), ranges)


def write_insightface_rec(folder: str, images: Sequence[tuple[bytes, int]], image_size: int = 112,
                          label_as_array: bool = False) -> None:
    """Write ``train.rec``, ``train.idx`` and ``property`` in InsightFace's layout.

    Args:
        folder: output folder (created).
        images: (JPEG bytes, class) pairs, grouped by class in ascending order (as InsightFace packs).
        image_size: recorded in ``property`` as ``num_classes,H,W``.
        label_as_array: store each image label as a 2-float array (class first), like some packs.
    """
    os.makedirs(folder, exist_ok=True)
    labels = [int(lbl) for _, lbl in images]
    if any(b < a for a, b in zip(labels, labels[1:])):
        raise ValueError("write_insightface_rec: images must be sorted by class")
    classes = sorted(set(labels))
    n = len(images)
    a = n + 1
    b = a + len(classes)
    with RecordIOWriter(os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx")) as w:
        w.write_idx(0, pack(IRHeader(2, np.array([a, b], np.float32), 0, 0), b""))
        for i, (jpeg, lbl) in enumerate(images):
            lab: Union[float, np.ndarray] = (np.array([lbl, 0.0], np.float32) if label_as_array else float(lbl))
            w.write_idx(i + 1, pack(IRHeader(0, lab, i + 1, 0), jpeg))
        for j, c in enumerate(classes):
            start = 1 + labels.index(c)
            end = start + labels.count(c)
            w.write_idx(a + j, pack(IRHeader(2, np.array([start, end], np.float32), a + j, 0), b""))
    num_classes = (max(classes) + 1) if classes else 0
    tmp = os.path.join(folder, f"property.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{num_classes},{image_size},{image_size}\n")
    os.replace(tmp, os.path.join(folder, "property"))


def read_property(folder: str) -> Optional[tuple[int, int, int]]:
    """InsightFace's ``property`` file: ``num_classes,H,W``; None when absent."""
    path = os.path.join(folder, "property")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        k, h, w = (int(x) for x in text.split(","))
    except ValueError:
        raise RecordIOError(f"{path}: expected 'num_classes,H,W', got {text[:80]!r}") from None
    return k, h, w
