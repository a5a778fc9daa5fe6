"""The snapshot directory of a parameter store: W (and momentum) of HF-softmax (Zhang et al., AAAI 2018) on disk.

Everything a snapshot is as files lives here; :class:`paramserver.store.WeightStore` decides what goes
in (its matrices and its manifest fields), the server and the trainer only name, find and prune.

Format: a directory holding ``manifest.json`` (``format``, ``version``, ``num_classes``,
``class_offset``, ``total_classes``, ``dim``, ``dtype``, ``step``, ``optimizer``, ``files``: matrix ->
file name, ``crc32``: matrix -> zlib.crc32 of its whole file, absent in older snapshots) and one numpy
``.npy`` file per matrix (``W.npy``; ``momentum.npy`` when the optimizer keeps a buffer),
[num_classes, dim] rows of one store. A restore checks every file's header and size, and its
checksum, before it writes any byte of a live matrix (:func:`read_matrices`).

Atomic write (:func:`writing`): the files go into a temporary sibling ``<path>.tmp.<pid>.<tid>``,
``manifest.json`` last; then ``path -> <path>.old.<pid>``, ``tmp -> path``, and the old one is
removed. A reader sees the old or the new complete snapshot; a writer killed between the renames
leaves complete siblings, which :func:`recover_snapshot` moves back (the newest) and sweeps.

Names, each a pair of functions (name <-> step) so that writers and pruners cannot drift apart:
  * run snapshots ``store_NNNNNNNN``, written beside the trainer's ``ckpt_NNNNNNNN.pt``
    (:func:`run_snapshot_name`, :func:`run_snapshot_step`);
  * periodic snapshots ``step-NNNNNNNNN`` of a server's ``--snapshot-dir``, plus a ``latest`` file
    naming the newest (:func:`periodic_name`, :func:`periodic_step`, :func:`write_periodic`);
  * shard sub-directories ``shard-III-of-SSS`` of a snapshot written by S servers (:func:`shard_dir`).
A step wider than the padding keeps all its digits; snapshots are ordered by step, not by name.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import re
import shutil
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Collection, Iterator, Optional

import numpy as np

from paramserver.api import BadRequestError
from paramserver.optim import SGDConfig

logger = logging.getLogger(__name__)

FORMAT = "hfsoftmax-paramserver-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
# The matrices and dtypes a snapshot may hold: those of a store (paramserver/store.py checks against these).
MATRICES = ("W", "momentum")
DTYPES = ("float32", "float64")

StepOf = Callable[[str], Optional[int]]


# ------------------------------------------------------------------ names
def _numbered(prefix: str, digits: int, step: int) -> str:
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"snapshot names need a step >= 0, got {step!r}")
    return f"{prefix}{int(step):0{digits}d}"


def _number_of(prefix: str, digits: int, name: str) -> Optional[int]:
    """The step of ``name`` when it is exactly ``_numbered(prefix, digits, step)``, else None."""
    m = re.fullmatch(re.escape(prefix) + r"([0-9]+)", name)
    return int(m.group(1)) if m and _numbered(prefix, digits, int(m.group(1))) == name else None


def run_snapshot_name(step: int) -> str:
    """``store_NNNNNNNN``: the store snapshot of the trainer's checkpoint of ``step``."""
    return _numbered("store_", 8, step)


def run_snapshot_step(name: str) -> Optional[int]:
    """The step of a :func:`run_snapshot_name`, or None for any other name."""
    return _number_of("store_", 8, name)


def periodic_name(step: int) -> str:
    """``step-NNNNNNNNN``: a server's periodic snapshot of ``step`` in its ``--snapshot-dir``."""
    return _numbered("step-", 9, step)


def periodic_step(name: str) -> Optional[int]:
    """The step of a :func:`periodic_name`, or None for any other name."""
    return _number_of("step-", 9, name)


def shard_name(i: int, num_shards: int) -> str:
    """``shard-III-of-SSS``: shard i's directory inside a snapshot written by ``num_shards`` servers."""
    if not 0 <= i < num_shards:
        raise ValueError(f"shard_name: need 0 <= i < num_shards, got i={i}, S={num_shards}")
    return f"shard-{i:03d}-of-{num_shards:03d}"


def shard_dir(path: str, i: int, num_shards: int) -> str:
    """Where shard i of S writes the snapshot ``path``: ``path`` itself (S = 1) or ``path/shard-III-of-SSS``."""
    return path if num_shards == 1 else os.path.join(path, shard_name(i, num_shards))


def shard_level(num_shards: int) -> int:
    """How many directories :func:`shard_dir` adds below a snapshot's path (``prune_snapshots``' level)."""
    return int(num_shards > 1)


# ------------------------------------------------------------------ files
def is_snapshot(path: str) -> bool:
    """``path`` is a complete snapshot (its manifest, written last, exists)."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def matrix_files(names: Collection[str]) -> dict[str, str]:
    """The file of each matrix inside a snapshot: {"W": "W.npy", ...}."""
    return {m: f"{m}.npy" for m in names}


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_manifest(path: str, man: dict) -> None:
    """Write ``path/manifest.json`` atomically; a snapshot is complete once it exists."""
    _write_atomic(os.path.join(path, MANIFEST), json.dumps(man, indent=1, sort_keys=True) + "\n")


def read_manifest(path: str) -> dict:
    """Read and check ``path/manifest.json``; errors name the file and the field at fault."""
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
    except FileNotFoundError:
        raise BadRequestError(f"snapshot {path}: no manifest.json (not a snapshot directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BadRequestError(f"snapshot manifest {mpath}: unreadable ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise BadRequestError(f"snapshot manifest {mpath}: field 'format' is not {FORMAT!r}")
    if man.get("version") != VERSION:
        raise BadRequestError(f"snapshot manifest {mpath}: unsupported version {man.get('version')!r}")
    for key in ("num_classes", "class_offset", "total_classes", "dim", "step"):
        if not isinstance(man.get(key), int) or man[key] < 0:
            raise BadRequestError(f"snapshot manifest {mpath}: field {key!r} must be a non-negative integer")
    if man.get("dtype") not in DTYPES:
        raise BadRequestError(f"snapshot manifest {mpath}: field 'dtype' must be one of {DTYPES}")
    files = man.get("files")
    opt = man.get("optimizer")
    if not isinstance(opt, dict):
        raise BadRequestError(f"snapshot manifest {mpath}: field 'optimizer' missing")
    try:
        cfg = SGDConfig.from_dict(opt)
    except (KeyError, TypeError, ValueError) as e:
        raise BadRequestError(f"snapshot manifest {mpath}: field 'optimizer' invalid ({e})") from None
    need = MATRICES if cfg.has_buffer else ("W",)
    if (not isinstance(files, dict) or any(not isinstance(files.get(k), str) or not files[k]
                                           or os.path.basename(files[k]) != files[k] for k in need)):
        raise BadRequestError(f"snapshot manifest {mpath}: field 'files' must map {' and '.join(need)} to file names")
    crcs = man.get("crc32")   # absent in snapshots written before checksums
    if crcs is not None and (not isinstance(crcs, dict) or any(
            m not in MATRICES or type(c) is not int or not 0 <= c < 1 << 32 for m, c in crcs.items())):
        raise BadRequestError(f"snapshot manifest {mpath}: field 'crc32' must map matrix names to 32-bit checksums")
    return man


# Bytes written or read (and checksummed) at once: large enough for full-speed I/O, small enough
# that a chunk is still in cache when zlib.crc32 (which releases the GIL) reads it.
CHUNK_BYTES = 64 << 20


def write_array(path: str, arr: np.ndarray, fsync: bool = False) -> int:
    """``arr`` as a .npy file; returns the zlib.crc32 of the whole file (header and data).
    ``fsync``: forced to disk (survives power loss, not only a killed process)."""
    arr = np.ascontiguousarray(arr)
    head = io.BytesIO()
    hdr = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(head, hdr)
    except ValueError:   # a header over 64 KiB (never for a 2-D matrix)
        head = io.BytesIO()
        np.lib.format.write_array_header_2_0(head, hdr)
    crc = zlib.crc32(head.getvalue())
    data = memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b"")
    with open(path, "wb") as f:
        f.write(head.getvalue())
        for i in range(0, data.nbytes, CHUNK_BYTES):
            chunk = data[i:i + CHUNK_BYTES]
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return crc


def check_array_file(path: str, shape: tuple, dtype: np.dtype) -> int:
    """Check that ``path`` is a .npy file of exactly ``shape`` and ``dtype`` (C order) whose size is
    its header plus the data, to the byte; returns the header's length. Reads the header only."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BadRequestError(f"snapshot file {path}: unreadable ({e.strerror})") from None
    with f:
        try:
            major, _ = np.lib.format.read_magic(f)
            if major == 1:
                fshape, fortran, fdtype = np.lib.format.read_array_header_1_0(f)
            else:
                fshape, fortran, fdtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as e:
            raise BadRequestError(f"snapshot file {path}: not a valid .npy file ({e})") from None
        if tuple(fshape) != tuple(shape) or np.dtype(fdtype) != dtype or fortran:
            raise BadRequestError(f"snapshot file {path}: holds {np.dtype(fdtype)}{list(fshape)}"
                                  f"{' (Fortran order)' if fortran else ''}, manifest says {dtype}{list(shape)}")
        head = f.tell()
        size = os.fstat(f.fileno()).st_size
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < head + want:
        raise BadRequestError(f"snapshot file {path}: truncated ({size - head} of {want} data bytes)")
    if size > head + want:
        raise BadRequestError(f"snapshot file {path}: {size - head - want} bytes after the data of {dtype}{list(shape)}")
    return head


def file_crc32(path: str) -> int:
    """zlib.crc32 of a whole file, read in chunks into one reused buffer."""
    buf = bytearray(min(CHUNK_BYTES, max(os.path.getsize(path), 1)))
    view, crc = memoryview(buf), 0
    with open(path, "rb") as f:
        while True:
            n = f.readinto(view)
            if not n:
                return crc
            crc = zlib.crc32(view[:n], crc)


def _crc_mismatch(path: str, got: int, want: int) -> BadRequestError:
    return BadRequestError(f"snapshot file {path}: checksum mismatch (crc32 {got:08x}, the manifest records "
                           f"{want:08x}): the file is corrupt")


def read_array(path: str, shape: tuple, dtype: np.dtype, out: Optional[np.ndarray] = None,
               crc32: Optional[int] = None) -> np.ndarray:
    """Read a .npy file of ``shape`` and ``dtype`` into ``out`` (or a new array) without an
    intermediate copy; the header and the file's size are checked first. ``crc32``: the whole
    file's checksum, verified as it is read (a mismatch raises after ``out`` was written: give a
    fresh ``out``, or verify with :func:`file_crc32` first)."""
    head = check_array_file(path, shape, dtype)
    if out is None:
        out = np.empty(shape, dtype=dtype)
    view = memoryview(out.reshape(-1)).cast("B") if out.size else memoryview(bytearray())
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(head))   # also moves to the data
        got = 0
        while got < view.nbytes:
            n = f.readinto(view[got:got + CHUNK_BYTES])
            if not n:
                raise BadRequestError(f"snapshot file {path}: truncated ({got} of {view.nbytes} data bytes)")
            if crc32 is not None:
                crc = zlib.crc32(view[got:got + n], crc)
            got += n
    if crc32 is not None and crc != crc32:
        raise _crc_mismatch(path, crc, crc32)
    return out


def _each(fn: Callable[[Any], Any], items: list) -> list:
    """``fn`` over ``items``, one thread each: file reads and writes release the GIL, and one writer
    alone is bound by the memcpy into the page cache on one core. The first error is raised."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def write_matrices(path: str, man: dict, matrices: dict[str, np.ndarray], fsync: bool = False) -> None:
    """Each matrix into its file of ``man["files"]`` inside ``path``, all at once; records each
    file's checksum in ``man["crc32"]`` (write the manifest after this)."""
    names = list(matrices)
    crcs = _each(lambda m: write_array(os.path.join(path, man["files"][m]), matrices[m], fsync), names)
    man["crc32"] = dict(zip(names, crcs))


def read_matrices(path: str, man: dict, names: Collection[str],
                  into: Optional[dict[str, Optional[np.ndarray]]] = None, in_place: bool = False) -> dict[str, np.ndarray]:
    """The matrices ``names`` of snapshot ``path`` (shape and dtype from its manifest ``man``), each
    read into ``into[name]`` when given there, else into a new array; all at once.

    Every file's header and size are checked before the first byte is read. ``in_place``: ``into``
    holds live arrays that a refused read must leave untouched, so the checksums the manifest
    records (``crc32``; older manifests have none) are verified by a first pass over the files
    before any of them is read into place; otherwise they are verified as the files are read.
    """
    shape, dtype, into = (man["num_classes"], man["dim"]), np.dtype(man["dtype"]), into or {}
    names = list(names)
    crcs = man.get("crc32") or {}
    files = {m: os.path.join(path, man["files"][m]) for m in names}
    _each(lambda m: check_array_file(files[m], shape, dtype), names)

    def verify(m: str) -> None:
        if m in crcs:
            got = file_crc32(files[m])
            if got != crcs[m]:
                raise _crc_mismatch(files[m], got, crcs[m])

    if in_place:
        _each(verify, names)
    got = _each(lambda m: read_array(files[m], shape, dtype, into.get(m), None if in_place else crcs.get(m)), names)
    return dict(zip(names, got))


# ------------------------------------------------------------------ the class index's state
INDEX_META, INDEX_ARRAYS = "index.json", "index.npz"


def write_index_state(path: str, meta: dict, arrays: dict) -> None:
    """The class index's state (IndexManager.export_state) beside a snapshot's matrices: JSON and an
    .npz of plain arrays (no pickle)."""
    np.savez(os.path.join(path, INDEX_ARRAYS), **arrays)
    _write_atomic(os.path.join(path, INDEX_META), json.dumps(meta))


def read_index_state(path: str) -> Optional[tuple]:
    """(meta, arrays) of a snapshot's class index state, or None when it holds none."""
    mpath, apath = os.path.join(path, INDEX_META), os.path.join(path, INDEX_ARRAYS)
    if not (os.path.isfile(mpath) and os.path.isfile(apath)):
        return None
    with open(mpath, encoding="utf-8") as f:
        meta = json.load(f)
    with np.load(apath, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


# ------------------------------------------------------------------ atomic directory write, recovery
@contextlib.contextmanager
def writing(path: str) -> Iterator[str]:
    """Write the snapshot ``path`` atomically: yields an empty temporary sibling to fill (its manifest
    last, :func:`write_manifest`), then swaps it in; on an error it is removed and ``path`` is left
    as it was. Refuses to replace anything that is not a snapshot (a server's client names any path).
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    recover_snapshot(path)
    if os.path.lexists(path) and not (os.path.isdir(path) and is_snapshot(path)):
        what = "directory" if os.path.isdir(path) else "file"
        raise BadRequestError(f"snapshot: {path} exists and is a {what} that is not a snapshot (no manifest.json); "
                              f"refusing to replace it: choose another path")
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if not is_snapshot(tmp):
            raise RuntimeError(f"snapshot {path}: written without a manifest (write_manifest last)")
        # Swap directories: path -> old, tmp -> path. A reader sees either the old or the new
        # complete snapshot; a writer killed between the renames leaves both complete siblings,
        # and restore / the next snapshot move the newest back (recover_snapshot).
        old = f"{path}.old.{os.getpid()}"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Siblings a snapshot write leaves for an instant: <path>.tmp.<pid>.<tid> (being written, complete once
# its manifest.json exists) and <path>.old.<pid> (the replaced snapshot, between the two renames).
_PARTIAL = re.compile(r"\.(tmp|old)\.(\d+)(?:\.\d+)?$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _manifest_step(path: str) -> int:
    try:
        return int(read_manifest(path)["step"])
    except (BadRequestError, KeyError, TypeError, ValueError):
        return -1


def recover_snapshot(path: str) -> bool:
    """Repair ``path`` after a writer died between its renames, then remove dead writers' leftovers.

    If ``path`` holds no complete snapshot, the best complete sibling left by a dead writer (the
    highest step; at a tie the newer ``.tmp``, whose manifest is written last) is moved back to
    ``path``; every other ``.tmp``/``.old`` sibling of a dead process is removed (a killed 1M x 128
    writer used to leave 0.5 GB each time). Returns whether ``path`` now holds a snapshot.
    """
    path = os.path.abspath(path)
    dead = []
    for p in glob.glob(glob.escape(path) + ".tmp.*") + glob.glob(glob.escape(path) + ".old.*"):
        m = _PARTIAL.search(p)
        if m and p[: m.start()] == path and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            dead.append((p, m.group(1)))
    if not is_snapshot(path) and not os.path.lexists(path):
        complete = [(_manifest_step(p), kind == "tmp", p) for p, kind in dead if is_snapshot(p)]
        complete = [c for c in complete if c[0] >= 0]
        if complete:
            step, _, best = max(complete)
            os.replace(best, path)
            logger.warning("snapshot %s: recovered step %d from %s (its writer died between renames)", path, step, best)
            dead = [(p, k) for p, k in dead if p != best]
    for p, _ in dead:
        shutil.rmtree(p, ignore_errors=True)
    return is_snapshot(path)


def recover_dir(parent: str, step_of: StepOf = periodic_step) -> None:
    """:func:`recover_snapshot` for every snapshot of ``parent`` (named as ``step_of`` reads) that a
    killed writer left ``.tmp``/``.old`` siblings of."""
    bases = {name.split(".")[0] for name in os.listdir(parent) if "." in name}
    for base in sorted(b for b in bases if step_of(b) is not None):
        recover_snapshot(os.path.join(parent, base))


# ------------------------------------------------------------------ finding, pruning
def list_snapshots(parent: str, step_of: StepOf = run_snapshot_step, leaf: str = "") -> list[tuple[int, str]]:
    """(step, name) of the complete snapshots in ``parent`` named as ``step_of`` reads, oldest first;
    ``leaf``: the snapshot is ``parent/name/leaf`` (a shard directory)."""
    if not os.path.isdir(parent):
        return []
    found = ((step_of(n), n) for n in os.listdir(parent))
    return sorted((s, n) for s, n in found if s is not None and is_snapshot(os.path.join(parent, n, leaf)))


def prune_snapshots(path: str, keep: Collection[str], level: int = 0, keep_previous: bool = False,
                    step_of: StepOf = run_snapshot_step) -> int:
    """Remove the other snapshots beside ``path`` except the names in ``keep``; returns how many.

    The siblings named as ``step_of`` reads (default: the trainer's ``store_NNNNNNNN``) of ``path``
    (level 0) or of its parent (level 1: ``.../store_N/shard-i-of-S``, the same shard's directory in
    each, then the run-level directory once empty). ``keep_previous`` also keeps the newest one
    before ``path`` (the checkpoint on disk still names it until the trainer replaces it: a server
    prunes before that). Only directories holding a snapshot (a manifest.json) are removed, never
    through a symbolic link (those are skipped and logged), never outside ``path``'s run directory.
    """
    path = os.path.abspath(path)
    unit = path if level == 0 else os.path.dirname(path)
    leaf = os.path.relpath(path, unit)
    parent, own = os.path.dirname(unit), os.path.basename(unit)
    found = [(s, n) for s, n in list_snapshots(parent, step_of, leaf) if n != own and n not in keep]
    own_step = step_of(own)
    older = [f for f in found if own_step is None or f[0] < own_step]
    if keep_previous and older:
        found.remove(older[-1])
    removed = 0
    for _, name in found:
        target = os.path.normpath(os.path.join(parent, name, leaf))
        # Never follow a link out of the run directory (a store_N linked to a snapshot elsewhere is
        # someone else's): a link anywhere on the way, or a path resolving outside, is left alone.
        steps = [os.path.join(parent, name)] + ([target] if level else [])
        if any(os.path.islink(p) for p in steps) or os.path.dirname(
                os.path.realpath(os.path.join(parent, name))) != os.path.realpath(parent):
            logger.warning("prune: %s is a symbolic link (or leads out of %s): not followed, not removed",
                           os.path.join(parent, name), parent)
            continue
        shutil.rmtree(target, ignore_errors=True)
        removed += 1
        if level:
            with contextlib.suppress(OSError):   # the run-level directory of several shards, once empty
                os.rmdir(os.path.join(parent, name))
    return removed


def write_periodic(snapshot_dir: str, step: int, write: Callable[[str], Any], keep: int) -> str:
    """A periodic snapshot: ``write(path)`` (a store's ``snapshot``) into ``snapshot_dir/step-NNNNNNNNN``,
    point ``latest`` at it, sweep what killed writers left, keep the newest ``keep``; returns the path."""
    name = periodic_name(step)
    path = os.path.join(snapshot_dir, name)
    write(path)
    _write_atomic(os.path.join(snapshot_dir, LATEST), name + "\n")
    recover_dir(snapshot_dir, periodic_step)
    newest = [n for _, n in list_snapshots(snapshot_dir, periodic_step)[-keep:]]
    prune_snapshots(path, newest, step_of=periodic_step)
    return path


def latest_snapshot(snapshot_dir: str) -> Optional[str]:
    """Newest complete ``step-NNNNNNNNN`` snapshot under ``snapshot_dir`` (or None): the one ``latest``
    names when it is complete, else the highest step."""
    pointer = os.path.join(snapshot_dir, LATEST)
    if os.path.exists(pointer):
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        if periodic_step(name) is not None and is_snapshot(os.path.join(snapshot_dir, name)):
            return os.path.join(snapshot_dir, name)
    found = list_snapshots(snapshot_dir, periodic_step)
    return os.path.join(snapshot_dir, found[-1][1]) if found else None


def resolve_snapshot(path: str) -> str:
    """A snapshot directory itself, or a ``--snapshot-dir`` holding step-* snapshots (take the newest)."""
    if is_snapshot(path) or recover_snapshot(path):
        return path
    if os.path.isdir(path):
        recover_dir(path, periodic_step)
    found = latest_snapshot(path) if os.path.isdir(path) else None
    if found is None:
        raise FileNotFoundError(f"restore: {path} is neither a snapshot (no manifest.json) nor a directory of step-* snapshots")
    return found
