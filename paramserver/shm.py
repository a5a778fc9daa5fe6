"""Row matrices another process can map without a copy: W in shared memory.

Why: a graph build over a 4-10 GB W is a minutes-long numpy loop; in a thread of the server it holds
the GIL between its calls, and every pull and push the trainers send waits behind it (at 10M x 256
a round trip during such a build took several times as long as without one; docs/benchmarks.md,
bench_scale). In a child process it would not, but the child needs the rows: a temporary copy of
W costs another W of memory and disk. Allocating W itself in shared memory lets the child map the
very same pages read-only.

How: :func:`alloc_shared` creates a file in ``/dev/shm`` (tmpfs), unlinks it at once (nothing is
left behind whatever ends the process: the pages live while a descriptor or a mapping does) and
maps it; the parent keeps the descriptor open, so a child opens the file as
``/proc/<parent pid>/fd/<fd>``. :func:`shared_source` says whether an array is such a matrix (the
very array, by its data pointer and shape) and how a child maps it. Linux only; where ``/dev/shm``
is missing or too small (Docker's default is 64 MB) the caller gets ``None`` and allocates plainly,
and builds read W in a thread as before.
"""
from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
import threading
from typing import Dict, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_LOCK = threading.Lock()
# data pointer -> (path a child opens, shape, dtype str, the descriptor kept open)
_SHARED: Dict[int, Tuple[str, Tuple[int, ...], str, int]] = {}


def alloc_shared(shape: Tuple[int, ...], dtype: str, headroom: float = 0.1) -> Optional[np.ndarray]:
    """A zero-filled array of ``shape`` in shared memory, or None when that is not possible here
    (not Linux, no /dev/shm, or less free than the array plus ``headroom`` of it)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0 or not os.path.isdir(SHM_DIR) or not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        return None
    try:
        free = shutil.disk_usage(SHM_DIR).free
    except OSError:
        return None
    if free < nbytes * (1.0 + headroom):
        logger.info("W (%.2f GB) stays in private memory: %s has %.2f GB free (index builds run in a thread)",
                    nbytes / 1e9, SHM_DIR, free / 1e9)
        return None
    try:
        fd, path = tempfile.mkstemp(prefix="hfsoftmax_rows_", dir=SHM_DIR)
    except OSError:
        return None
    try:
        os.unlink(path)
        os.ftruncate(fd, nbytes)
        proc_path = f"/proc/{os.getpid()}/fd/{fd}"
        # a plain ndarray over the mapping (np.memmap would make every result of an operation on W
        # a memmap-typed array too); the mapping lives as long as the array (its base)
        arr = np.frombuffer(mmap.mmap(fd, nbytes), dtype=dtype).reshape(tuple(shape))
    except (OSError, ValueError) as exc:
        os.close(fd)
        logger.info("W stays in private memory: shared allocation failed (%s)", exc)
        return None
    with _LOCK:
        _SHARED[arr.__array_interface__["data"][0]] = (proc_path, tuple(shape), str(np.dtype(dtype)), fd)
    return arr


def shared_source(arr: np.ndarray) -> Optional[Tuple[str, Tuple[int, ...], str]]:
    """(path, shape, dtype) a child process maps ``arr`` from, when ``arr`` is (a whole view of) a
    matrix from :func:`alloc_shared` in this process; else None."""
    with _LOCK:
        hit = _SHARED.get(arr.__array_interface__["data"][0])
    if hit is None or tuple(arr.shape) != hit[1] or str(arr.dtype) != hit[2] or not arr.flags.c_contiguous:
        return None
    return hit[0], hit[1], hit[2]


def open_shared(path: str, shape: Tuple[int, ...], dtype: str) -> np.ndarray:
    """In the child: the parent's shared matrix, mapped read-only (no copy)."""
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape))


def release_shared(arr: np.ndarray) -> None:
    """Close the descriptor behind ``arr`` (its pages go once the last mapping does)."""
    with _LOCK:
        hit = _SHARED.pop(arr.__array_interface__["data"][0], None)
    if hit is not None:
        os.close(hit[3])
