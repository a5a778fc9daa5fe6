"""The selective head's collectives over R ranks: one active set per global batch, rows in, gradients out.

R ranks that each hold b samples of a global batch of R*b (rank r holds global positions r, r+R,
r+2R, ..., as :class:`hfsoftmax.train.EpochSampler` cuts them) must train exactly like one process
with the whole batch. The head therefore needs, per step:

* the global batch's labels (and features, when the index searches from them), in global order:
  :meth:`HeadComm.gather_batch` (all-gather, then interleave back to positions i*R + r);
* one active set chosen once (rank 0) and sent to all: :meth:`HeadComm.broadcast_ids`;
* the M active rows on every rank, each rank pulling a disjoint slice of ceil(M/R) rows from the
  store: :meth:`HeadComm.gather_rows` (all-gather);
* dL/dWa summed over ranks, each rank receiving (and pushing) only its slice:
  :meth:`HeadComm.reduce_scatter_rows` (reduce-scatter, asynchronous).

So the parameter server sees one query, M pulled rows and M pushed rows per step whatever R is.
The collectives run on a process group of their own (``dist.new_group``), so they never interleave
with DDP's gradient all-reduce; on NCCL they move CUDA tensors, on gloo CPU tensors. What lives on
the host (labels, active ids) travels on a gloo group beside an NCCL one: through the GPU it would
queue behind the backbone's forward on the stream and make the host wait for it. With one process
every method is the identity and no process group is needed.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist


class HeadComm:
    """Collectives of one selective head.

    Args:
        rank, world_size: this process and R.
        group: process group to use (default: a new group of all ranks when R > 1; every rank must
            construct its head in the same order, as the train loop does).
    """

    def __init__(self, rank: int, world_size: int, group: Any = None) -> None:
        self.rank, self.world_size = int(rank), int(world_size)
        self.group = self.host_group = group
        self.device = torch.device("cpu")
        if self.world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"HeadComm: world_size={world_size} needs an initialised torch.distributed "
                                   f"process group (hfsoftmax.dist.init_distributed)")
            if self.group is None:
                self.group = dist.new_group(list(range(self.world_size)))
            self.host_group = self.group
            if dist.get_backend(self.group) == "nccl":
                self.device = torch.device("cuda", torch.cuda.current_device())
                self.host_group = dist.new_group(list(range(self.world_size)), backend="gloo")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def chunk(self, m: int) -> int:
        """Rows per rank's slice of an active set of m rows: ceil(m / R)."""
        return max(1, math.ceil(m / self.world_size))

    def my_slice(self, m: int) -> slice:
        c = self.chunk(m)
        return slice(min(m, self.rank * c), min(m, (self.rank + 1) * c))

    # -- the batch -------------------------------------------------------------------------
    def gather_batch(self, x: torch.Tensor) -> torch.Tensor:
        """[b, ...] on every rank -> [R*b, ...] in global batch order (position i*R + r = rank r's i-th).
        A host tensor stays on the host (the gloo group); others go through the group's device."""
        if not self.distributed:
            return x
        on_host = x.device.type == "cpu"
        device, group = (torch.device("cpu"), self.host_group) if on_host else (self.device, self.group)
        src = x.detach().to(device).contiguous()
        out = torch.empty((self.world_size,) + tuple(src.shape), dtype=src.dtype, device=device)
        dist.all_gather_into_tensor(out.view(-1), src.view(-1), group=group)
        return out.transpose(0, 1).reshape((self.world_size * src.shape[0],) + tuple(src.shape[1:]))

    def broadcast_ids(self, ids: Optional[np.ndarray], extra: int = 0) -> tuple[np.ndarray, int]:
        """Rank 0's int64 ids [n] (and one int ``extra``) to every rank; others pass None."""
        if not self.distributed:
            return np.asarray(ids, dtype=np.int64), int(extra)
        head = torch.zeros(2, dtype=torch.int64)                # host tensors, on the gloo group
        if self.rank == 0:
            head[0], head[1] = len(ids), int(extra)
        dist.broadcast(head, 0, group=self.host_group)
        n, extra = int(head[0]), int(head[1])
        buf = (torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)) if self.rank == 0
               else torch.empty(n, dtype=torch.int64))
        dist.broadcast(buf, 0, group=self.host_group)
        return buf.numpy(), extra

    # -- rows and gradients ----------------------------------------------------------------
    def gather_rows(self, mine: torch.Tensor, m: int) -> torch.Tensor:
        """Each rank's slice [<= ceil(m/R), d] (rows of :meth:`my_slice`) -> all m rows [m, d]."""
        if not self.distributed:
            return mine
        c, d = self.chunk(m), mine.shape[1]
        buf = torch.zeros(c, d, dtype=mine.dtype, device=self.device)
        buf[: mine.shape[0]].copy_(mine, non_blocking=True)
        out = torch.empty(self.world_size * c, d, dtype=mine.dtype, device=self.device)
        dist.all_gather_into_tensor(out, buf, group=self.group)
        return out[:m]

    def reduce_scatter_rows(self, g: torch.Tensor, flag: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Sum over ranks of g [m, d] and of a per-rank scalar ``flag``, asynchronously.

        Returns (work or None, this rank's slice of the sum [len(my_slice), d], the flags' sum [1]).
        The flag rides in one extra row per slice, so it costs no second collective.
        """
        m, d = g.shape
        if not self.distributed:
            return None, g, flag.reshape(1)
        c, R = self.chunk(m), self.world_size
        padded = torch.zeros(R * c, d, dtype=g.dtype, device=self.device)
        padded[:m].copy_(g, non_blocking=True)
        flag_row = torch.zeros(1, 1, d, dtype=g.dtype, device=self.device)
        flag_row[0, 0, 0] = flag.to(device=self.device, dtype=g.dtype)
        full = torch.cat([padded.view(R, c, d), flag_row.expand(R, 1, d)], dim=1)     # [R, c + 1, d]
        out = torch.empty(c + 1, d, dtype=g.dtype, device=self.device)
        work = dist.reduce_scatter_tensor(out, full.view(-1, d), group=self.group, async_op=True)
        s = self.my_slice(m)
        return work, out[: s.stop - s.start], out[c, :1]
