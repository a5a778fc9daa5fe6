"""Process-group set-up from the torchrun environment; a plain process is a world of one.

Nothing happens at import time: ``init_distributed()`` is called by the entry point, reads RANK /
LOCAL_RANK / WORLD_SIZE (set by torchrun), picks NCCL on CUDA and gloo on CPU, and returns a
:class:`DistInfo`. Without those variables it returns rank 0 of 1 and creates no process group.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:<local_rank> when CUDA is available, else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    from .config import ConfigError

    try:
        dev = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} requested but CUDA is not available to this torch "
                          f"({torch.__version__}); use train.device=cpu or auto")
    return dev


def check_devices(name: str, dev: torch.device, local_rank: int, local_world: int) -> None:
    """Refuse, in one line, a device layout that NCCL or ``set_device`` would turn into a traceback:
    one named GPU for several ranks of a node ("Duplicate GPU detected"), or more ranks per node
    than visible GPUs ("invalid device ordinal")."""
    if dev.type != "cuda":
        return
    from .config import ConfigError

    visible = torch.cuda.device_count()
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{visible} visible GPU(s)" + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
    if local_world > 1 and name not in ("auto", "cuda"):
        raise ConfigError(f"train.device={name} with NPROC={local_world} ranks on this node puts every rank on the "
                          f"same GPU: use train.device=auto (or cuda), which gives rank i cuda:<LOCAL_RANK>")
    if dev.index is not None and dev.index >= visible:
        what = (f"NPROC={local_world} ranks on this node" if name in ("auto", "cuda")
                else f"train.device={name}")
        raise ConfigError(f"{what} need GPU index {dev.index}, but this node has {seen}: lower NPROC (or use "
                          f"another train.device)")


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group if there is one (idempotent)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = resolve_device(device, local_rank)
    check_devices(device, dev, local_rank, local_world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        logger.info("joined process group: rank %d/%d backend %s device %s", rank, world, backend, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


# The ranks wait for rank 0's evaluations (verification .bins, identification) in a barrier of their
# own: a gloo group whose timeout outlasts any evaluation, where the default group's 600 s (NCCL's
# watchdog, bounding every training collective) would kill every rank during a long one.
EVAL_WAIT_S = 6 * 3600.0
_eval_groups: dict[int, Any] = {}     # id of the default group -> its long-timeout gloo group


def wait_for_main() -> None:
    """Every rank blocks here until rank 0 arrives (after its evaluation); a no-op in one process.
    Call it on every rank, in the same places (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    key = id(dist.group.WORLD)
    if key not in _eval_groups:
        _eval_groups.clear()          # groups of a destroyed default group are gone with it
        _eval_groups[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=EVAL_WAIT_S))
    dist.barrier(group=_eval_groups[key])


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    """Max over ranks (identity in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order ([obj] in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _eval_groups.clear()
