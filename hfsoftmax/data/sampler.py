"""Data order: which samples each rank trains on at each step, a pure function of (seed, epoch, rank).

So R ranks with batch b see exactly the samples one process with batch R*b sees, in the same steps, and a
resumed run continues exactly where the uninterrupted one would be: :class:`EpochSampler` (one epoch),
:class:`RunSampler` (the whole run, epoch after epoch, from any step), :class:`EpochKeyed` (an item's
flips keyed by its epoch in whichever process loads it) and :func:`batches_from` (the one DataLoader).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config, ConfigError
from ..dist import DistInfo


class EpochSampler(Sampler[int]):
    """This rank's indices for one epoch: a seeded permutation, cut to whole global batches.

    Rank r takes positions r, r + R, r + 2R, ... of each global batch, so R ranks with batch b see
    exactly the samples one process with batch R*b sees, in the same steps. ``start_batch`` skips
    the batches already trained on (resume).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 start_batch: int = 0) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.start_batch = start_batch
        self.batches = num_samples // (batch_size * world_size)
        if self.batches == 0:
            raise ConfigError(f"dataset of {num_samples} samples is smaller than one global batch "
                              f"({batch_size} x {world_size} ranks); lower train.batch_size")

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g)[: self.batches * self.batch_size * self.world_size]
        mine = perm.view(self.batches, self.batch_size * self.world_size)[:, self.rank::self.world_size]
        return iter(mine[self.start_batch:].reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size


class RunSampler(Sampler[tuple[int, int]]):
    """Every (epoch, index) key this rank trains on from ``start_step`` on, epoch after epoch, forever.

    The order is :class:`EpochSampler`'s, epoch by epoch, so one DataLoader serves the whole run:
    its workers start once and live until training ends (persistent across epochs by construction).
    The epoch travels with each index so a worker keys the item's random flip by it (see
    :class:`EpochKeyed`); nothing has to reach the workers when an epoch turns.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0) -> None:
        self.args = (num_samples, batch_size, rank, world_size, seed)
        self.start_step = start_step
        self.per_epoch = EpochSampler(*self.args, epoch=0).batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start_step, self.per_epoch)
        while True:
            for i in EpochSampler(*self.args, epoch=epoch, start_batch=offset):
                yield epoch, i
            epoch, offset = epoch + 1, 0


class EpochKeyed(Dataset):
    """``dataset[(epoch, i)]`` = ``dataset[i]`` with the flips of that epoch (``set_epoch``, in whichever
    process loads it), so an item's augmentation is a pure function of (seed, epoch, index) whatever
    the worker count, and a resumed run sees exactly what an uninterrupted one would."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self._epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.seed, epoch)
            self._epoch = epoch
        return self.dataset[index]


def batches_from(dataset: Dataset, cfg: Config, info: DistInfo, start_step: int) -> Iterator[tuple[int, Any]]:
    """Yield (step, batch) from ``start_step`` on, epoch after epoch, forever.

    One DataLoader for the whole run (workers started once; ``data.num_workers`` of them, each with
    ``data.prefetch_factor`` batches in flight). Disk datasets hand over uint8 images; the train
    loop normalises them on the device (``transforms.normalize_images``).
    """
    workers = cfg.data.num_workers
    sampler = RunSampler(len(dataset), cfg.train.batch_size, info.rank, info.world_size, cfg.train.seed, start_step)
    loader = DataLoader(EpochKeyed(dataset, cfg.train.seed), batch_size=cfg.train.batch_size, sampler=sampler,
                        drop_last=True, num_workers=workers, pin_memory=info.device.type == "cuda",
                        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
                        # its own generator: starting the loader (also on resume) must not draw from
                        # the global RNG the model's dropout uses
                        generator=torch.Generator().manual_seed(cfg.train.seed * 7919 + info.rank))
    yield from enumerate(loader, start_step)
