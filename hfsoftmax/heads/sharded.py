"""W sharded by rows across the training ranks (``store.kind=sharded``): model-parallel HF-softmax.

Partial FC's layout with HF's selection. Rank r of R holds the rows [lo_r, hi_r) of W (and the
momentum buffer when the SGD rule keeps one) on its own device, as :class:`ShardedRows`. Per step:

1. The ranks all-gather their features ([R*b, d], rank-major; the backward reduce-scatters the
   feature gradient back to its rank) and their labels (host, gloo).
2. ONE active set per global batch, identical on every rank without a broadcast: every label of
   every rank, then the index's strongest classes, then the random fill seeded by (seed, step), by
   the same :func:`paramserver.index.select_active` as the parameter-server path, fed the labels in
   the same global order. Indexes: ``random`` (Partial FC's own sampling: no query), ``graph``
   (:class:`RanksGraph`: each class's nearest classes, built by the ranks from their shards in the
   background, live at steps fixed in advance) and ``exact`` (each rank scores the global features
   against its own rows, the per-rank top-n are all-gathered and merged: every rank sees the same
   candidates). M = K is the model-parallel full softmax.
3. Each rank computes the logits of the global batch against its own active rows only, in fp32,
   with the margin applied where the target lives; the softmax is distributed
   (:class:`DistCrossEntropy`: all-reduce of the row max, of the sum of exponentials and of the
   target logit from its owner). Every rank holds the same loss, the mean over the global batch.
4. The gradient of a rank's active rows stays on that rank: ``end_step`` applies the row-sparse
   SGD of :mod:`paramserver.optim` (unrolled, lazy, nesterov, weight decay, the step's lr) on the
   device, exactly when the backbone's optimizer stepped and every rank's gradient was finite.

So R ranks with batch b train like one process with batch R*b and a local store (tested). Snapshots
are the store's format (``paramserver/snapshot.py``: one ``W.npy`` of all K rows, each rank writing
its range into it, a manifest with checksums), so a sharded run resumes on another number of ranks,
in one process with ``store.kind=local`` or behind ``paramserver.py``, and a store snapshot resumes
sharded.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import threading
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from paramserver import snapshot as snap
from paramserver.api import BadRequestError
from paramserver.optim import SGDConfig
from paramserver.store import init_rows, shard_ranges

from .base import ClassifierHead
from .collective import HeadComm
from .cpk import AdaptiveAllocation, CPKProbe
from .margin import Margin, fp32_logits

logger = logging.getLogger(__name__)

SHARDED_INDEXES = ("random", "exact", "graph")


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank ``rank``: the parameter server's shard ranges (sizes differ by at most one)."""
    return shard_ranges(num_classes, world_size)[rank]


# --------------------------------------------------------------------------------------------- #
# Collectives with a gradient.

class _GatherFeatures(torch.autograd.Function):
    """[b, d] on every rank -> [R*b, d] rank-major; backward: the sum over ranks of the gradient of
    this rank's rows, times R (DDP averages the backbone's gradients over the ranks, while every
    rank's loss is already the global mean)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: HeadComm) -> torch.Tensor:
        ctx.comm = comm
        R = comm.world_size
        src = x.contiguous()
        out = torch.empty((R * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
        dist.all_gather_into_tensor(out, src, group=comm.group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        comm = ctx.comm
        g = grad.contiguous()
        out = torch.empty((g.shape[0] // comm.world_size,) + tuple(g.shape[1:]), dtype=g.dtype, device=g.device)
        dist.reduce_scatter_tensor(out, g, group=comm.group)
        return out * comm.world_size, None


class DistCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of N samples whose class logits are split by columns across the ranks.

    ``logits`` [N, n_r]: this rank's columns; ``target`` [N]: the column of each sample's class on
    this rank, -1 where another rank holds it. Forward: all-reduce of the row max, of the sum of
    exp(logit - max) and of the target logit; every rank returns the same loss. Backward: this
    rank's columns of (softmax - onehot) / N (no communication)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, comm: HeadComm) -> torch.Tensor:
        N, n = logits.shape
        group = comm.group if comm.distributed else None
        if n:
            row_max = logits.detach().max(dim=1).values
        else:
            row_max = torch.full((N,), -math.inf, dtype=logits.dtype, device=logits.device)
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(logits.detach() - row_max[:, None])                      # [N, n]
        denom = e.sum(dim=1)
        here = target >= 0
        t = target.clamp_min(0)
        z = torch.where(here, logits.detach().gather(1, t[:, None])[:, 0] if n else torch.zeros_like(row_max),
                        torch.zeros_like(row_max))
        if group is not None:
            both = torch.stack([denom, z])                                      # one collective for two
            dist.all_reduce(both, group=group)
            denom, z = both[0], both[1]
        ctx.save_for_backward(e / denom[:, None], here, t)
        return (torch.log(denom) + row_max - z).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        prob, here, t = ctx.saved_tensors
        g = prob.clone()
        if g.shape[1]:          # minus the one-hot where the target is here (no host sync on a GPU)
            g.scatter_add_(1, t[:, None], -here.to(g.dtype)[:, None])
        return g * (grad / g.shape[0]), None, None


# --------------------------------------------------------------------------------------------- #
# This rank's rows.

def sgd_rows_(w: torch.Tensor, buf: Optional[torch.Tensor], grad: torch.Tensor, lr: float, cfg: SGDConfig) -> None:
    """:func:`paramserver.optim.sgd_update_rows` on device tensors, in place: w, buf [n, d] gathered rows."""
    g = grad.add(w, alpha=cfg.weight_decay) if cfg.weight_decay else grad
    if cfg.momentum and cfg.sparse_momentum == "unrolled":
        w.add_(g, alpha=-lr / (1.0 - cfg.momentum))          # the whole momentum series at once
        return
    if cfg.momentum:
        assert buf is not None
        buf.mul_(cfg.momentum).add_(g)
        g = g.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
    w.add_(g, alpha=-lr)


class ShardedRows:
    """Rows [lo, hi) of W [K, d] (and their momentum) on ``device``: the rank's shard of a sharded store.

    The initial rows are :func:`paramserver.store.init_rows`' (the same numbers as a store with the
    same seed, whatever R). ``step`` counts applied SGD steps (the snapshot's step)."""

    def __init__(self, num_classes: int, dim: int, comm: HeadComm, device: torch.device, opt: SGDConfig, *,
                 init: str = "normal", init_std: float = 0.01, seed: int = 0, dtype: str = "float32") -> None:
        if dtype != "float32":
            raise ValueError(f"store.kind=sharded holds W in float32, got dtype {dtype}")
        self.num_classes, self.dim, self.comm, self.opt = int(num_classes), int(dim), comm, opt
        self.lo, self.hi = shard_range(self.num_classes, comm.world_size, comm.rank)
        self.init_desc = {"init": init, "init_std": float(init_std), "seed": int(seed)}
        self.W = torch.from_numpy(init_rows(self.lo, self.hi, self.dim, dtype, init, init_std, seed)).to(device)
        self.M = torch.zeros_like(self.W) if opt.has_buffer else None
        self.step = 0

    @property
    def device(self) -> torch.device:
        return self.W.device

    def update(self, local: torch.Tensor, grad: torch.Tensor, lr: float, keep: Optional[torch.Tensor] = None) -> None:
        """One SGD step of rows ``local`` (indices into this shard, unique) with their gradient.
        ``keep``: a bool scalar tensor; where False the rows stay as they are (decided on the device:
        no host sync)."""
        if local.numel():
            w0 = self.W.index_select(0, local)
            b0 = self.M.index_select(0, local) if self.M is not None else None
            w = w0.clone() if keep is not None else w0
            buf = b0.clone() if keep is not None and b0 is not None else b0
            sgd_rows_(w, buf, grad.to(w.dtype), lr, self.opt)
            if keep is not None:
                w = torch.where(keep, w, w0)
                buf = torch.where(keep, buf, b0) if buf is not None and b0 is not None else buf
            self.W.index_copy_(0, local, w)
            if self.M is not None and buf is not None:
                self.M.index_copy_(0, local, buf)

    def _matrices(self) -> dict[str, torch.Tensor]:
        return {"W": self.W} if self.M is None else {"W": self.W, "momentum": self.M}

    # -- snapshots in the store's format -------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {"format": snap.FORMAT, "version": snap.VERSION, "num_classes": self.num_classes,
                "class_offset": 0, "total_classes": self.num_classes, "dim": self.dim, "dtype": "float32",
                "step": self.step, "optimizer": self.opt.to_dict(), "init": self.init_desc,
                "files": snap.matrix_files(self._matrices()), "created_unix": time.time()}

    def snapshot(self, path: str, extra: Optional[dict[str, Any]] = None) -> None:
        """Every rank: write the snapshot directory ``path`` (atomic, as a store writes it); rank 0
        creates each file at its full size, every rank writes its rows into it, rank 0 checksums them
        and writes the manifest last. ``extra`` (rank 0): more files inside it, ``name: array`` as
        ``name.npy``, ``name: dict`` as ``name.json`` (a store reads only its manifest's files)."""
        comm = self.comm
        if comm.rank != 0:
            tmp = self._bcast(None)
            if tmp:
                self._write_rows(tmp)
                self._barrier()
            return
        man = self.manifest()
        shape = (self.num_classes, self.dim)
        with snap.writing(path) as tmp:
            for name in man["files"].values():
                np.lib.format.open_memmap(os.path.join(tmp, name), mode="w+", dtype=np.float32, shape=shape).flush()
            self._bcast(tmp)
            self._write_rows(tmp)
            self._barrier()                   # every rank's rows are in
            for name, value in (extra or {}).items():
                if isinstance(value, np.ndarray):
                    np.save(os.path.join(tmp, f"{name}.npy"), value)
                else:
                    with open(os.path.join(tmp, f"{name}.json"), "w", encoding="utf-8") as f:
                        json.dump(value, f)
            man["crc32"] = {m: snap.file_crc32(os.path.join(tmp, f)) for m, f in man["files"].items()}
            snap.write_manifest(tmp, man)
        logger.info("sharded snapshot of step %d written to %s (%.1f MB)", self.step, path,
                    4.0 * len(man["files"]) * self.num_classes * self.dim / 1e6)

    def _write_rows(self, tmp: str) -> None:
        for m, t in self._matrices().items():
            arr = np.load(os.path.join(tmp, snap.matrix_files(self._matrices())[m]), mmap_mode="r+")
            arr[self.lo:self.hi] = t.detach().cpu().numpy()
            arr.flush()
            del arr

    def _barrier(self) -> None:
        if self.comm.distributed:
            dist.barrier(group=self.comm.host_group)

    def _bcast(self, value: Optional[str]) -> Optional[str]:
        """Rank 0's string to every rank (a barrier as well); one process: the value itself."""
        if not self.comm.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.comm.host_group)
        return box[0]

    def restore(self, path: str) -> dict[str, Any]:
        """Every rank: load its rows of snapshot ``path``: a store's, a sharded run's, or a parameter
        server's with one shard or several (``shard-III-of-SSS`` directories, rows by class range).
        Checks K, d and the steps (every rank) and the checksums (rank 0) before a row is replaced.
        Returns the (first) manifest."""
        parts = self._parts(path)
        err = ""
        if self.comm.rank == 0:
            try:
                for d, man in parts:
                    for m, name in man["files"].items():
                        f = os.path.join(d, name)
                        snap.check_array_file(f, (int(man["num_classes"]), self.dim), np.dtype(np.float32))
                        want = (man.get("crc32") or {}).get(m)
                        if want is not None and snap.file_crc32(f) != want:
                            raise BadRequestError(f"snapshot {d}: {name} does not match its checksum")
            except (BadRequestError, OSError, ValueError) as e:
                err = str(e) or type(e).__name__
        err = self._bcast(err) or ""
        if err:
            raise BadRequestError(err)
        man = parts[0][1]
        saved = SGDConfig.from_dict(man["optimizer"])
        if saved.sparse_momentum != self.opt.sparse_momentum or saved.momentum != self.opt.momentum:
            logger.warning("snapshot %s was trained with %s; this run continues with %s", path, saved.to_dict(),
                           self.opt.to_dict())
        W = np.empty((self.hi - self.lo, self.dim), dtype=np.float32)
        M = np.zeros_like(W) if self.M is not None else None
        for d, pm in parts:                      # the parts overlapping this rank's rows [lo, hi)
            off, n = int(pm["class_offset"]), int(pm["num_classes"])
            a, b = max(self.lo, off), min(self.hi, off + n)
            if a >= b:
                continue
            W[a - self.lo:b - self.lo] = np.load(os.path.join(d, pm["files"]["W"]), mmap_mode="r")[a - off:b - off]
            if M is not None and "momentum" in pm["files"]:
                M[a - self.lo:b - self.lo] = np.load(os.path.join(d, pm["files"]["momentum"]),
                                                     mmap_mode="r")[a - off:b - off]
        self.W.copy_(torch.from_numpy(W))
        if self.M is not None and M is not None:
            self.M.copy_(torch.from_numpy(M))
        self.step = int(man["step"])
        return man

    def _parts(self, path: str) -> list[tuple[str, dict[str, Any]]]:
        """(directory, manifest) of each part of snapshot ``path``, by class range; checked to tile
        [0, K) with rows of this d in float32, all at one step."""
        shards = sorted(glob.glob(os.path.join(path, "shard-[0-9][0-9][0-9]-of-[0-9][0-9][0-9]")))
        if not snap.is_snapshot(path) and shards:
            parts = [(d, snap.read_manifest(d)) for d in shards]
        else:
            path = snap.resolve_snapshot(path) if os.path.isdir(path) and not snap.is_snapshot(path) else path
            parts = [(path, snap.read_manifest(path))]
        parts.sort(key=lambda p: int(p[1]["class_offset"]))
        at = 0
        for d, man in parts:
            if (int(man["total_classes"]) != self.num_classes or int(man["class_offset"]) != at
                    or int(man["dim"]) != self.dim or man["dtype"] != "float32"
                    or int(man["step"]) != int(parts[0][1]["step"])):
                raise BadRequestError(f"snapshot {d}: holds rows [{man['class_offset']}, +{man['num_classes']}) of "
                                      f"{man['total_classes']} x {man['dim']} ({man['dtype']}) at step {man['step']}; "
                                      f"the sharded store needs all {self.num_classes} rows x {self.dim} in float32, "
                                      f"its parts at one step")
            at += int(man["num_classes"])
        if at != self.num_classes:
            raise BadRequestError(f"snapshot {path}: its parts hold {at} of {self.num_classes} rows")
        return parts


# --------------------------------------------------------------------------------------------- #
# The class-neighbour graph of the ranks' rows.

def _top_merge(best_i: np.ndarray, best_s: np.ndarray, rows: np.ndarray, cand_i: np.ndarray,
               cand_s: np.ndarray) -> None:
    """Merge candidates [q, c] into the running top-deg (best_i / best_s [n, deg]) of rows ``rows``."""
    deg = best_i.shape[1]
    ci = np.concatenate([best_i[rows], cand_i], axis=1)
    cs = np.concatenate([best_s[rows], cand_s], axis=1)
    keep = np.argpartition(-cs, deg - 1, axis=1)[:, :deg] if cs.shape[1] > deg else \
        np.broadcast_to(np.arange(cs.shape[1]), cs.shape)
    best_i[rows] = np.take_along_axis(ci, keep, axis=1)
    best_s[rows] = np.take_along_axis(cs, keep, axis=1)


def ring_neighbours(X: np.ndarray, lo: int, num_classes: int, C: np.ndarray, probe: int, degree: int,
                    group: Any = None, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The class-neighbour graph rows of this rank's rows X [n, d] (global ids lo .. lo + n - 1), built
    with the other ranks and never more than two shards in memory: each row's ``probe`` nearest lists
    among the unit centroids C [nlist, d] (the parameter server's graph build, first step); then the
    shards travel once around the ring and each rank scores its rows against the visiting rows of
    the lists they probe, keeping a running top-``degree`` by cosine (not its own row). The cost is
    the server's build divided by R, plus R - 1 transfers of a shard. Returns int64 [n, degree],
    best first, -1 where fewer were found."""
    from paramserver.index.graph import _nearest_lists, _unit

    n, d = X.shape
    nlist = C.shape[0]
    p = min(probe, nlist)
    Xu = _unit(X)
    top, _ = _nearest_lists(X, C, p)                                                # [n, p]
    assign = top[:, 0].astype(np.int32)
    by_list = np.argsort(top.reshape(-1), kind="stable")                          # (row, slot) by list
    qb = np.concatenate(([0], np.cumsum(np.bincount(top.reshape(-1), minlength=nlist))))
    deg = max(1, min(degree, num_classes - 1))
    best_i = np.full((n, deg), -1, dtype=np.int64)
    best_s = np.full((n, deg), -np.inf, dtype=np.float32)
    ranges = shard_ranges(num_classes, world_size)
    V, vid, vas = Xu, np.arange(lo, lo + n, dtype=np.int64), assign
    for hop in range(world_size):
        order = np.argsort(vas, kind="stable")
        vb = np.concatenate(([0], np.cumsum(np.bincount(vas, minlength=nlist))))
        for j in np.flatnonzero((np.diff(qb) > 0) & (np.diff(vb) > 0)):
            rq = by_list[qb[j]:qb[j + 1]] // p                                     # my rows probing list j
            mem = order[vb[j]:vb[j + 1]]                                          # visiting members of j
            for a in range(0, rq.size, 4096):
                r = rq[a:a + 4096]
                S = Xu[r] @ V[mem].T                                              # [q, members]
                S[vid[mem][None, :] == (r + lo)[:, None]] = -np.inf              # not its own neighbour
                k = min(deg, mem.size)
                t = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < mem.size else \
                    np.broadcast_to(np.arange(mem.size), S.shape)
                _top_merge(best_i, best_s, r, vid[mem][t], np.take_along_axis(S, t, axis=1))
        if hop == world_size - 1:
            break
        # pass the visiting shard on: to rank + 1, from rank - 1 (its size is known from the ranges)
        src_lo, src_hi = ranges[(rank - hop - 1) % world_size]
        m = src_hi - src_lo
        out = torch.from_numpy(np.concatenate([V.view(np.int32), vas[:, None]], axis=1).copy())
        inc = torch.empty((m, d + 1), dtype=torch.int32)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, out, (rank + 1) % world_size, group),
                                       dist.P2POp(dist.irecv, inc, (rank - 1) % world_size, group)])
        for q in reqs:
            q.wait()
        arr = inc.numpy()
        V, vas = np.ascontiguousarray(arr[:, :d]).view(np.float32), np.ascontiguousarray(arr[:, d])
        vid = np.arange(src_lo, src_hi, dtype=np.int64)
    srt = np.argsort(-best_s, axis=1, kind="stable")
    out_i = np.take_along_axis(best_i, srt, axis=1)
    out_i[~np.isfinite(np.take_along_axis(best_s, srt, axis=1))] = -1
    if deg < degree:
        out_i = np.concatenate([out_i, np.full((n, degree - deg), -1, dtype=np.int64)], axis=1)
    return out_i


class RanksGraph:
    """Each class's ``degree`` nearest classes by cosine over W, for a sharded W, built by the ranks.

    Every ``every`` steps (T) each rank copies its rows and starts a background thread that, on a
    gloo group of its own (never interleaved with training collectives): samples its rows for the
    k-means of the coarse lists (rank 0 clusters the sample and broadcasts the centroids), then
    builds the graph rows of its own classes with :func:`ring_neighbours` (the server's algorithm:
    coarse lists, then a search within each row's nearest lists; the shards go once around the
    ring). At the next multiple of T, fixed in advance, every rank waits for its build if it is not
    done (logged: the price of reproducibility) and the new graph goes live everywhere at once. So
    the graph live during steps [s + T, s + 2T) is built from W as it was at step s, whatever the
    machine's speed. Until the first graph is live (step T), selection fills at random. Each rank
    keeps its own classes' rows of the graph; a step looks up the neighbours of the batch's labels
    on their owners (one all-reduce of B x degree ids)."""

    def __init__(self, rows: ShardedRows, metric: str, degree: int, nlist: int, every: int, seed: int, *,
                 probe: int = 3, niter: int = 10, tppc: int = 64) -> None:
        if degree < 1 or every < 1:
            raise ValueError(f"the graph needs head.degree >= 1 and head.rebuild_every >= 1, got {degree}, {every}")
        self.rows, self.comm, self.metric = rows, rows.comm, metric
        self.degree, self.nlist, self.every, self.seed = int(degree), int(nlist), int(every), int(seed)
        self.probe, self.niter, self.tppc = int(probe), int(niter), int(tppc)
        self.part: Optional[np.ndarray] = None           # [hi - lo, degree] this rank's classes' neighbours
        self.live_since: Optional[int] = None
        self.builds = self.waits = 0
        self.wait_s = 0.0
        self._box: dict[str, Any] = {}                   # the background build's result or error
        self._thread: Optional[threading.Thread] = None
        self._started: Optional[int] = None              # the step the pending build's rows are from
        # the builds' own gloo group (created by every rank, in the same order, with the head)
        self._group = dist.new_group(backend="gloo") if self.comm.distributed else None

    @property
    def live(self) -> bool:
        return self.part is not None

    def on_step(self, step: int) -> None:
        """Before step ``step``'s selection, on every rank: at a multiple of T, the build started T
        steps ago goes live, and the next one starts from the current rows."""
        if step % self.every:
            return
        if self._started is not None and self._started < step:     # the same decision on every rank
            self._swap(step)
        self._start(step)

    def _start(self, step: int) -> None:
        X = self.rows.W.detach().cpu().numpy().copy()                # this rank's rows at this step
        self._started = step
        self._box = {}

        def build() -> None:
            try:
                self._box["part"] = self._build(X)
            except Exception as e:     # reported at the swap; the old graph serves on
                self._box["error"] = e

        self._thread = threading.Thread(target=build, name=f"hfsoftmax-graph-{step}", daemon=True)
        self._thread.start()

    def _centroids(self, X: np.ndarray) -> np.ndarray:
        """The coarse lists' unit centroids [nlist, d], the same on every rank and for any R: the
        parameter server's k-means sample (the same seeded class ids), gathered from the ranks that
        hold them and clustered by rank 0 (spherical k-means), then broadcast."""
        from paramserver.index.base import MAX_TRAIN_ROWS, _default_nlist, _normalize_rows, kmeans_centroids
        from paramserver.index.graph import _unit

        K, lo, hi = self.rows.num_classes, self.rows.lo, self.rows.hi
        nlist = min(self.nlist or _default_nlist(K), K)
        n_train = min(K, nlist * self.tppc, max(MAX_TRAIN_ROWS, nlist))
        ids = np.arange(K) if n_train == K else np.sort(np.random.default_rng(self.seed).choice(K, n_train,
                                                                                                replace=False))
        sample = X[ids[(ids >= lo) & (ids < hi)] - lo]
        if self.comm.distributed:
            box: list = [None] * self.comm.world_size if self.comm.rank == 0 else None
            dist.gather_object(sample, box, dst=0, group=self._group)
            sample = np.concatenate(box) if self.comm.rank == 0 else None
        C = None
        if sample is not None:
            C = _normalize_rows(kmeans_centroids(sample, min(nlist, len(sample)), self.niter, self.tppc, self.seed,
                                                 None, True, _unit)).astype(np.float32)
        if self.comm.distributed:
            box = [C]
            dist.broadcast_object_list(box, src=0, group=self._group)
            C = box[0]
        return C

    def _build(self, X: np.ndarray) -> np.ndarray:
        C = self._centroids(X)
        return ring_neighbours(X, self.rows.lo, self.rows.num_classes, C, self.probe, self.degree, self._group,
                               self.comm.rank, self.comm.world_size)

    def _swap(self, step: int) -> None:
        t0 = time.perf_counter()
        if self._thread is not None:
            if self._thread.is_alive():
                self.waits += 1
            self._thread.join()
            self._thread = None
        waited = time.perf_counter() - t0
        self.wait_s += waited
        if waited > 0.05 and self.comm.rank == 0:
            logger.info("step %d: waited %.2f s for the class graph built from step %d (it goes live at a fixed "
                        "step, so that a seed reproduces the run)", step, waited, step - self.every)
        ok = torch.tensor([1 if "part" in self._box else 0], dtype=torch.int64)
        if self.comm.distributed:                # live only if every rank's part is there
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.comm.host_group)
        if not int(ok[0]):
            if self.comm.rank == 0:
                logger.warning("step %d: the class graph build failed (%s); the previous graph serves on", step,
                               self._box.get("error", "on another rank"))
            return
        self.part = self._box.pop("part")
        self.live_since = step
        self.builds += 1

    def neighbours(self, labels: np.ndarray) -> np.ndarray:
        """The neighbours [N, degree] of global labels [N], -1 = none: each from its owner rank."""
        assert self.part is not None
        lo, hi = self.rows.lo, self.rows.hi
        mine = (labels >= lo) & (labels < hi)
        nb = np.full((labels.size, self.degree), -1, dtype=np.int64)
        nb[mine] = self.part[labels[mine] - lo]
        if self.comm.distributed:
            t = torch.from_numpy(nb)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.comm.host_group)
            nb = t.numpy()
        return nb

    def state(self) -> dict[str, Any]:
        """Every rank (a collective): what a resumed run needs to select exactly as this one, the live
        graph and the pending build's result (waited for here: it depends only on the rows of its
        start step, which a snapshot of a later step no longer holds), gathered on rank 0 as [K,
        degree] arrays (rank 0 gets them; {} elsewhere)."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if time.perf_counter() - t0 > 0.05 and self.comm.rank == 0:
            logger.info("checkpoint: waited %.2f s for the class graph being built (saved with the snapshot, so "
                        "that a resumed run selects as this one)", time.perf_counter() - t0)
        parts = {"graph_live": self.part, "graph_pending": self._box.get("part")}
        have = {k: v is not None for k, v in parts.items()}
        if self.comm.distributed:
            flags = torch.tensor([int(have["graph_live"]), int(have["graph_pending"])], dtype=torch.int64)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.comm.host_group)
            have = {"graph_live": bool(flags[0]), "graph_pending": bool(flags[1])}
        out: dict[str, Any] = {"graph": {"degree": self.degree, "live_since": self.live_since, "builds": self.builds,
                                         "started": self._started, "pending": have["graph_pending"]}}
        for name, part in parts.items():
            if not have[name]:
                continue
            full = self._gather_part(np.asarray(part, dtype=np.int32))
            if full is not None:
                out[name] = full
        return out if self.comm.rank == 0 else {}

    def _gather_part(self, part: np.ndarray) -> Optional[np.ndarray]:
        """Every rank's part [hi - lo, degree] -> [K, degree] on rank 0 (None elsewhere)."""
        if not self.comm.distributed:
            return part
        box: Optional[list] = [None] * self.comm.world_size if self.comm.rank == 0 else None
        dist.gather_object(part, box, dst=0, group=self.comm.host_group)
        return np.concatenate(box) if box is not None else None

    def load_state(self, path: str) -> None:
        """Every rank: its rows of the graph state a sharded snapshot holds (none in a server's: the
        graph then starts afresh, random fill until its first build goes live)."""
        meta_path = os.path.join(path, "graph.json")
        if not os.path.isfile(meta_path):
            logger.info("snapshot %s holds no class graph: random fill until the first build goes live", path)
            return
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if int(meta["degree"]) != self.degree:
            logger.warning("snapshot %s holds a class graph of degree %s, this run asks for %d: rebuilt afresh",
                           path, meta["degree"], self.degree)
            return
        lo, hi = self.rows.lo, self.rows.hi

        def rows_of(name: str) -> np.ndarray:
            return np.asarray(np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r")[lo:hi], dtype=np.int64)

        self.part = rows_of("graph_live") if meta["live_since"] is not None else None
        self.live_since, self.builds, self._started = meta["live_since"], int(meta["builds"]), meta["started"]
        self._thread = None
        self._box = {"part": rows_of("graph_pending")} if meta["pending"] else {}

    def candidates(self, feats: torch.Tensor, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The neighbours of each sample's label [N, degree] and their scores against the sample's
        feature (the same on every rank: each scores the rows it holds, then an all-reduce max)."""
        nb = self.neighbours(labels)                                                  # [N, deg]
        lo, hi = self.rows.lo, self.rows.hi
        mine = (nb >= lo) & (nb < hi)
        W = self.rows.W
        with torch.no_grad(), fp32_logits(W.device):
            n_i, k_i = np.nonzero(mine)                     # only the (sample, neighbour) pairs held here
            Wc = W[torch.from_numpy(nb[n_i, k_i] - lo).to(W.device)]                  # [pairs, d]
            Q = feats.to(device=W.device, dtype=torch.float32)
            if self.metric == "angular":
                Q = F.normalize(Q, dim=1)
            s = (Q[torch.from_numpy(n_i).to(W.device)] * Wc).sum(dim=1)
            if self.metric == "angular":        # cosines: the gathered rows' norms
                s = s / torch.linalg.vector_norm(Wc, dim=1).clamp_min(1e-12)
            S = torch.full(nb.shape, -math.inf, dtype=torch.float32, device=W.device)
            S[torch.from_numpy(n_i).to(W.device), torch.from_numpy(k_i).to(W.device)] = s
            if self.comm.distributed:
                dist.all_reduce(S, op=dist.ReduceOp.MAX, group=self.comm.group)
        return nb, S.cpu().numpy()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


# --------------------------------------------------------------------------------------------- #
# The head.

class ShardedSoftmax(ClassifierHead):
    """Softmax over M active classes (M = K: the full softmax) with W sharded by rows across the ranks.

    Args:
        rows: this rank's :class:`ShardedRows`.
        num_active: M (K: every class, the model-parallel full softmax).
        margin, scale, margin_m: the logit rule (:class:`~hfsoftmax.heads.margin.Margin`).
        index: ``random`` (Partial FC's sampling) or ``exact`` (the distributed exact top-n).
        candidates: classes asked of the index per sample.
        seed: seed of the per-step selection Generator (keyed by (seed, step), as the store path).
    """

    store = None
    sharded = True

    def __init__(self, rows: ShardedRows, num_active: int, *, margin: str = "none", scale: float = 64.0,
                 margin_m: Any = 0.35, index: str = "random", candidates: int = 64, seed: int = 0,
                 degree: int = 32, nlist: int = 0, rebuild_every: int = 100, cpk_every: int = 0,
                 cpk_probe: int = 64, cpk_sample: int = 200_000, block_size: int = 65536,
                 adapt: Optional[AdaptiveAllocation] = None) -> None:
        super().__init__(rows.num_classes, rows.dim)
        if index not in SHARDED_INDEXES:
            raise ValueError(f"store.kind=sharded: head.index must be one of {', '.join(SHARDED_INDEXES)} "
                             f"(or auto: graph), got '{index}'")
        if not 1 <= num_active <= rows.num_classes:
            raise ValueError(f"head.num_active M={num_active} must lie in [1, num_classes={rows.num_classes}]")
        self.rows, self.comm = rows, rows.comm
        self.rule = Margin(margin, scale, margin_m)
        self.num_active, self.index_name = int(num_active), index
        self.candidates, self.seed = int(candidates), int(seed)
        self.graph = (RanksGraph(rows, self.rule.metric, degree, nlist, rebuild_every, seed)
                      if index == "graph" and num_active < rows.num_classes else None)
        self._train_step: Optional[int] = None
        self._lr = 0.0
        self._scale: Any = None
        self._host_labels: Optional[torch.Tensor] = None
        self._owed: Optional[tuple[torch.Tensor, list]] = None   # this step's active rows and their grad box
        self.last_active: Optional[np.ndarray] = None
        self._grown = 0
        self._skipped: Optional[torch.Tensor] = None    # device count of steps whose gradient was not finite
        self._skipped_said = 0
        self.cpk = CPKProbe(rows.num_classes, cpk_every, cpk_probe, cpk_sample, seed)
        if adapt is not None and not cpk_every:
            raise ValueError("head.adaptive=true needs head.cpk_every > 0 (CPK drives the allocation)")
        self.adapt = adapt           # M, and the graph's T, follow the CPK probe
        self.block_size = int(block_size)
        self._cpk: dict[str, float] = {}
        self._probe_lse: Optional[torch.Tensor] = None

    # -- step protocol ------------------------------------------------------------------------
    def begin_step(self, step: int, lr: float, grad_scale: Any = None, labels: Optional[torch.Tensor] = None) -> None:
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"begin_step: lr must be finite and >= 0, got {lr}")
        self._train_step, self._lr, self._scale = int(step), float(lr), grad_scale
        self._host_labels = labels if labels is not None and labels.device.type == "cpu" else None
        self._owed = None

    def end_step(self, step: int, applied: bool = True) -> None:
        """The row-sparse SGD of this step's active rows, on the device: when the backbone's optimizer
        stepped (``applied``) and every rank's gradient is finite (else W stays, as the store does)."""
        owed, self._owed = self._owed, None
        if owed is None:
            return
        local, box = owed
        if not box:
            if local.numel():
                logger.warning("step %d: no gradient reached the active rows; W is not updated", step)
            grad = torch.zeros((local.numel(), self.feature_dim), device=self.rows.device)
        else:
            grad = box[0]
        bad = (~torch.isfinite(grad)).any().to(torch.float32).reshape(1)
        if self.comm.distributed:
            dist.all_reduce(bad, group=self.comm.group)      # any rank's: every rank skips together
        if self._scale is not None:
            grad = grad / self._scale
        if applied:         # decided on the device (no host sync); counted, and said at the next stats()
            ok = bad[0] == 0
            self.rows.update(local, grad, self._lr, keep=ok)
            self._skipped = self._skipped + (~ok).to(torch.int64) if self._skipped is not None else \
                (~ok).to(torch.int64)
        self.rows.step += 1

    @property
    def store_step(self) -> int:
        return self.rows.step

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._train_step or 0])

    # -- selection ----------------------------------------------------------------------------
    def _candidates(self, feats: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-n classes of each feature [N, d] over all K (ids and scores [N, n]): each rank
        scores its rows, the ranks' top-n are all-gathered and merged (the same on every rank)."""
        W = self.rows.W
        with torch.no_grad(), fp32_logits(W.device):
            Q, Wn = feats.float(), W
            if self.rule.metric == "angular":
                Q, Wn = F.normalize(Q, dim=1), F.normalize(W, dim=1)
            S = Q @ Wn.t()                                                             # [N, n_r]
            s, i = S.topk(min(n, S.shape[1]), dim=1)
            s, i = self._merge_ranks_topk(s, i + self.rows.lo, n)
        return i.cpu().numpy(), s.cpu().numpy()

    def _merge_ranks_topk(self, v: torch.Tensor, i: Optional[torch.Tensor], k: int
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Each rank's best values v [P, <= k] (and their global ids i, or None) -> the best k over all
        ranks, the same on every rank; padded with -inf (ids -1) where fewer exist."""
        P, pad = v.shape[0], k - v.shape[1]
        if pad > 0:
            v = torch.cat([v, torch.full((P, pad), -math.inf, dtype=v.dtype, device=v.device)], 1)
            if i is not None:
                i = torch.cat([i, torch.full((P, pad), -1, dtype=i.dtype, device=i.device)], 1)
        if not self.comm.distributed:
            return v, i
        R = self.comm.world_size

        def gathered(x: torch.Tensor) -> torch.Tensor:               # [P, k] per rank -> [P, R*k]
            out = torch.empty((R * P, k), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x.contiguous(), group=self.comm.group)
            return out.view(R, P, k).permute(1, 0, 2).reshape(P, R * k)

        v, sel = gathered(v).topk(k, dim=1)
        return v, (gathered(i).gather(1, sel) if i is not None else None)

    def select(self, feats: Optional[torch.Tensor], labels: np.ndarray, num_active: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Active ids [M] (labels first) and labels remapped into 0..M-1, for the global batch's
        features and labels (both in global order); the same on every rank."""
        from paramserver.index import select_active

        K = self.num_classes
        if num_active == K:
            return np.arange(K, dtype=np.int64), labels.astype(np.int64)
        none = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if self.index_name == "random" or feats is None:
            ids, scores = none
        elif self.index_name == "graph":
            ids, scores = self.graph.candidates(feats, labels) if self.graph and self.graph.live else none
        else:
            ids, scores = self._candidates(feats, min(self.candidates, K))
        return select_active(ids, scores, labels, num_active, K, self._rng())

    # -- forward ------------------------------------------------------------------------------
    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the GLOBAL batch over its M active classes (the same value on
        every rank); the gradient of this rank's active rows waits for ``end_step``."""
        self.check_features(features)
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be [B={features.shape[0]}], got {tuple(labels.shape)}")
        training = torch.is_grad_enabled()
        if training and self._train_step is None:
            raise RuntimeError("ShardedSoftmax: call head.begin_step(step, lr) before a training forward")
        if training and self.comm.distributed and self.comm.device != features.device:
            raise RuntimeError(f"ShardedSoftmax: features on {features.device}, but the head's collectives "
                               f"run on {self.comm.device}")
        host = self._host_labels if (training and self._host_labels is not None
                                     and self._host_labels.shape == labels.shape) else labels.detach().to("cpu")
        self._host_labels = None
        lab = host.to(torch.int64)
        R, b = self.comm.world_size, features.shape[0]
        glab = self.comm.gather_batch(lab).numpy() if self.comm.distributed else lab.numpy()   # [R*b] i*R + r
        if glab.size and (glab.min() < 0 or glab.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes}), "
                             f"got range [{glab.min()}, {glab.max()}]")
        feats = _GatherFeatures.apply(features, self.comm) if self.comm.distributed else features   # [R*b, d] r*b + i
        n_unique = int(np.unique(glab).size)
        if training and self.graph is not None:
            self.graph.on_step(self._train_step)
        probe_step = training and self.cpk.due(self._train_step)
        gfeats = None
        if self.index_name != "random" or probe_step:     # global order i*R + r from rank-major r*b + i
            pos = np.arange(R * b)
            gfeats = feats.detach()[torch.from_numpy((pos % R) * b + pos // R).to(feats.device)]
        query = gfeats if self.index_name != "random" else None
        M = self.num_active
        probe = None
        if probe_step:      # CPK of the exact top-M (sampled around the active set at large K), as the store path
            probe = gfeats[: self.cpk.probe_size]
            pre = self.select(query, glab, max(M, n_unique))[0] if self.cpk.sampled else None
            k = max(M, min(self.adapt.m_max, self.num_classes)) if self.adapt is not None else M
            self._probe_lse, curve = self.cpk.curve(probe, self._score, k, pre, self._train_step or 0)
            if self.adapt is not None:          # adaptive allocation: the smallest M reaching tau_cp
                new_m = self.adapt.choose_m(curve, self.num_classes)
                if new_m != M:
                    logger.info("adaptive allocation at step %d: M %d -> %d (tau_cp %.3f)", self._train_step, M,
                                new_m, self.adapt.tau_cp)
                self.num_active = M = new_m
            self._cpk = {"cpk_exact": float(curve[M - 1]), "cpk_step": float(self._train_step or 0),
                         "cpk_sampled": 1.0 if self.cpk.sampled else 0.0}
        if M < n_unique:            # every label stays active: M grows for this step (counted)
            self._grown += int(training)
            M = n_unique
        active, remap_g = self.select(query, glab, M)
        if probe is not None:
            self._cpk["cpk_active"] = self.cpk.active_mass(probe, self._score, active, self._probe_lse)
            if self.adapt is not None and self.graph is not None:   # the T rule, as the server path's
                self.graph.every = self.adapt.observe(self._cpk["cpk_active"], self.graph.builds, self.graph.every)
        # rank-major targets: sample i of rank r sits at i*R + r in the global order, r*b + i in feats
        target = remap_g.reshape(b, R).T.reshape(-1) if R > 1 else remap_g                        # [R*b] in 0..M-1
        lo, hi = self.rows.lo, self.rows.hi
        cols = np.flatnonzero((active >= lo) & (active < hi))            # positions of my rows in active
        colmap = np.full(len(active), -1, dtype=np.int64)
        colmap[cols] = np.arange(cols.size)
        dev = self.rows.device
        local = torch.from_numpy(active[cols] - lo).to(dev)
        t_local = torch.from_numpy(colmap[target]).to(features.device)
        Wa = self.rows.W.index_select(0, local)                                                   # [n_r, d]
        if training:
            self.last_active = active
            box: list = []
            Wa.requires_grad_(True)
            Wa.register_hook(box.append)
            self._owed = (local, box)
        with fp32_logits(features.device):
            logits = self.rule.logits(feats, Wa.to(features.device), t_local, partial=True)       # [R*b, n_r]
            return DistCrossEntropy.apply(logits, t_local, self.comm)

    def _score(self, features: np.ndarray, ids: Optional[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The store's ``score`` op over the sharded rows (a :class:`~hfsoftmax.heads.cpk.CPKProbe`
        score): per feature, the log-sum-exp (float64) of its eval logits over the classes ``ids``
        (None: all K) and its top-``k`` logits, each rank over the ids it holds, combined across the
        ranks. Every rank calls it with the same arguments."""
        W, lo, hi = self.rows.W, self.rows.lo, self.rows.hi
        F = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(W.device)
        P = F.shape[0]
        if ids is None:
            local = None
        else:
            ids = np.asarray(ids, dtype=np.int64)
            local = torch.from_numpy(ids[(ids >= lo) & (ids < hi)] - lo).to(W.device)
        n = (hi - lo) if local is None else int(local.numel())
        lse = torch.full((P,), -math.inf, dtype=torch.float64, device=W.device)
        best = torch.full((P, 0), -math.inf, dtype=torch.float64, device=W.device)
        with torch.no_grad(), fp32_logits(W.device):
            for s in range(0, n, self.block_size):
                rows = W[s:s + self.block_size] if local is None else W[local[s:s + self.block_size]]
                logits = self.rule.logits(F, rows).double()                                # [P, blk]
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
                best = torch.cat([best, logits.topk(min(k, logits.shape[1]), dim=1).values], 1)
                best = best.topk(min(k, best.shape[1]), dim=1).values
            best, _ = self._merge_ranks_topk(best, None, k)
            if self.comm.distributed:       # the ranks' partitions: log-sum-exp of their log-sum-exps
                parts = torch.empty(self.comm.world_size * P, dtype=lse.dtype, device=lse.device)
                dist.all_gather_into_tensor(parts, lse.contiguous(), group=self.comm.group)
                lse = torch.logsumexp(parts.view(self.comm.world_size, P), dim=0)
        return lse.cpu().numpy(), best.cpu().numpy()

    # -- evaluation ---------------------------------------------------------------------------
    def scores_alone(self) -> bool:
        return not self.comm.distributed

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int = 5, block_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (eval scores, class ids) over all K: every rank scores its rows, the ranks' top-k are
        all-gathered and merged. Every rank must call it with the same features."""
        self.check_features(features)
        W = self.rows.W
        with fp32_logits(W.device):
            Fd = features.to(device=W.device, dtype=torch.float32)
            best_v = torch.full((Fd.shape[0], 0), -math.inf, device=W.device)
            best_i = torch.zeros((Fd.shape[0], 0), dtype=torch.int64, device=W.device)
            for s in range(0, W.shape[0], block_size):
                v = self.rule.logits(Fd, W[s:s + block_size])
                v, i = v.topk(min(k, v.shape[1]), dim=1)
                best_v, sel = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + v.shape[1]), dim=1)
                best_i = torch.cat([best_i, i + s + self.rows.lo], 1).gather(1, sel)
            best_v, best_i = self._merge_ranks_topk(best_v, best_i, min(k, self.num_classes))
        return best_v.to(features.device), best_i.to(features.device)

    @torch.no_grad()
    def scores_block(self, features: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Scores of classes [start, end): one process only (with R ranks use :meth:`topk`)."""
        if self.comm.distributed:
            raise RuntimeError("ShardedSoftmax.scores_block: W is sharded across the ranks; use topk")
        return self.rule.logits(features.float(), self.rows.W[start:end].to(features.device))

    # -- checkpoints ----------------------------------------------------------------------------
    def snapshot(self, path: str, prune_keep: Any = None) -> None:
        """Every rank: W (and momentum) into the store snapshot ``path``; then rank 0 removes its older
        ``store_NNNNNNNN`` siblings but ``prune_keep`` and the newest older one (as a store does)."""
        extra = None
        if self.graph is not None:
            from ..dist import wait_for_main
            extra = self.graph.state()          # rank 0 may wait for a running build ...
            wait_for_main()                     # ... the others in a barrier that outlasts it
        self.rows.snapshot(path, extra)
        if prune_keep is not None and self.comm.rank == 0:
            snap.prune_snapshots(os.path.abspath(path), set(prune_keep), keep_previous=True)

    def restore(self, path: str) -> None:
        """Every rank: this rank's rows from the store snapshot ``path`` (and the class graph's state,
        when a sharded run wrote it)."""
        self.rows.restore(path)
        if self.graph is not None:
            self.graph.load_state(path)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_active": self.num_active, **self._cpk}
        if self._grown:
            out["m_grown_steps"] = self._grown
        if self._skipped is not None:
            n = int(self._skipped)                # a host sync, at log steps only
            if n:
                out["nonfinite_skipped_steps"] = n
                if n > self._skipped_said:
                    logger.warning("%d step(s) so far with a non-finite gradient of the active rows (fp16 "
                                   "overflow?): W was not updated in them", n)
                    self._skipped_said = n
        if self.graph is not None:
            out.update(index_builds=self.graph.builds, index_waits=self.graph.waits,
                       index_wait_s=round(self.graph.wait_s, 3))
            if self.graph.live_since is not None:
                out["index_live_since"] = self.graph.live_since
        return out

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_active": self.num_active, "rebuild_every": self.graph.every if self.graph is not None else 0}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """An adaptive M continues where it was; a fixed M is the config's, also on resume."""
        if self.adapt is not None and "num_active" in state:
            self.num_active = int(state["num_active"])
            if self.graph is not None and int(state.get("rebuild_every") or 0) > 0:
                self.graph.every = int(state["rebuild_every"])

    def extra_repr(self) -> str:
        return (f"rows=[{self.rows.lo}, {self.rows.hi}) of {self.num_classes} x {self.feature_dim}, "
                f"M={self.num_active}, index={self.index_name}, margin={self.rule.kind}")


def make_sharded_head(cfg: Any, num_classes: int, device: torch.device, *, rank: Optional[int] = None,
                      world_size: Optional[int] = None, comm: Optional[HeadComm] = None) -> ShardedSoftmax:
    """The sharded head of a run from the full :class:`hfsoftmax.config.Config`: ``head.name`` hf,
    random or full (M = K), the store's init and SGD rule from ``optim.*`` / ``train.seed``
    (:func:`~hfsoftmax.heads.selective.store_spec`: the same rows and rule as a local store)."""
    from .selective import head_index_name, store_spec

    dist_on = dist.is_available() and dist.is_initialized()
    rank = int(rank if rank is not None else (dist.get_rank() if dist_on else 0))
    world_size = int(world_size if world_size is not None else (dist.get_world_size() if dist_on else 1))
    comm = comm if comm is not None else HeadComm(rank, world_size)
    if comm.distributed and comm.device.type != device.type:
        raise ValueError(f"store.kind=sharded: the ranks train on {device} but their process group moves "
                         f"{comm.device.type} tensors (NCCL for CUDA, gloo for CPU)")
    spec = store_spec(cfg, num_classes)
    opt = SGDConfig(momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.nesterov,
                    exact_rounding=spec.exact_rounding, sparse_momentum=spec.sparse_momentum)
    rows = ShardedRows(num_classes, spec.dim, comm, device, opt, init=spec.init, init_std=spec.init_std,
                       seed=spec.seed, dtype=spec.dtype)
    h = cfg.head
    adapt = None
    if h.adaptive:       # M, and the graph's rebuild period T (changed at probe steps: the same on every rank)
        if not (0.0 < h.tau_cp <= 1.0 and 1 <= h.m_min <= h.m_max):
            raise ValueError(f"adaptive allocation needs 0 < tau_cp <= 1 and 1 <= m_min <= m_max, got "
                             f"tau_cp={h.tau_cp}, m_min={h.m_min}, m_max={h.m_max}")
        adapt = AdaptiveAllocation(float(h.tau_cp), int(h.m_min), int(h.m_max), int(h.rebuild_every))
    M = num_classes if h.name == "full" else min(int(h.num_active), num_classes)
    index = "random" if h.name == "full" else ("graph" if h.index == "auto" else head_index_name(h, num_classes))
    rule = Margin.from_config(h)
    return ShardedSoftmax(rows, M, margin=rule.kind, scale=rule.scale, margin_m=rule.m, index=index,
                          candidates=int(h.candidates), seed=int(cfg.train.seed), degree=int(h.degree),
                          nlist=int(h.nlist), rebuild_every=int(h.rebuild_every), cpk_every=int(h.cpk_every),
                          cpk_sample=int(h.cpk_sample), adapt=adapt)


# --------------------------------------------------------------------------------------------- #
# store.kind=auto: which home of W.

SHARDED_MEMORY_SHARE = 0.4   # W and its state may take this share of a GPU; the backbone needs the rest


def choose_store_kind(address: str, device_type: str, gpu_bytes: int, num_classes: int, dim: int,
                      has_buffer: bool, world_size: int) -> tuple[str, str]:
    """``store.kind=auto``: (kind, why). Sharded when the ranks train on CUDA and each rank's rows of W
    (with the momentum buffer, if the SGD rule keeps one) take at most SHARDED_MEMORY_SHARE of its
    GPU; otherwise the parameter server (remote, or in-process with one rank), which also serves
    CPU training and several jobs sharing one W (a ``store.address`` given)."""
    per_rank = 4 * num_classes * dim * (2 if has_buffer else 1) / max(1, world_size)
    server = "local" if world_size == 1 else "remote"
    if address:
        return "remote", f"store.address is given ({address}): W lives in that parameter server"
    if device_type != "cuda":
        return server, f"the ranks train on {device_type}: W stays on the hosts (parameter server)"
    if per_rank > SHARDED_MEMORY_SHARE * gpu_bytes:
        return server, (f"W and its state need {per_rank / 2**30:.1f} GiB per rank over {world_size} rank(s), more "
                        f"than {SHARDED_MEMORY_SHARE:.0%} of a GPU's {gpu_bytes / 2**30:.0f} GiB: W stays on the "
                        f"hosts (parameter server)")
    return "sharded", (f"W and its state take {per_rank / 2**30:.2f} GiB per rank over {world_size} rank(s), at most "
                       f"{SHARDED_MEMORY_SHARE:.0%} of a GPU's {gpu_bytes / 2**30:.0f} GiB: W sharded in the GPUs' "
                       f"memory")


def resolve_store_kind(cfg: Any, num_classes: int, world_size: int, device: Optional[torch.device] = None
                       ) -> tuple[str, str]:
    """:func:`choose_store_kind` for a run's config (the device from ``train.device``, or the one given)."""
    if cfg.store.kind != "auto":
        return cfg.store.kind, "store.kind"
    if device is None:
        want = cfg.train.device
        device = torch.device("cuda" if want == "auto" and torch.cuda.is_available() else
                              ("cpu" if want == "auto" else want))
    gpu = torch.cuda.get_device_properties(device.index or 0).total_memory if device.type == "cuda" else 0
    has_buffer = cfg.optim.sparse_momentum == "lazy" and cfg.optim.momentum != 0
    return choose_store_kind(cfg.store.address, device.type, int(gpu), num_classes, int(cfg.model.feature_dim),
                             has_buffer, world_size)
