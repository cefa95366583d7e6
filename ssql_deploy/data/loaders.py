"""DataLoaders that behave the same in one process and under torchrun.

`batch_size` is always the global batch: each of N processes loads batch_size / N, so a run on
2 processes optimizes exactly what a run on 1 does (same learning rate, same steps per epoch).
"""

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from ssql_deploy.distributed import DistInfo
from ssql_deploy.errors import UserError


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    train: bool,
    dist: DistInfo,
    workers: int,
    seed: int,
    drop_last: bool | None = None,
) -> DataLoader[Any]:
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if batch_size % dist.world_size:
        raise UserError(
            f"batch size {batch_size} does not split evenly over {dist.world_size} processes",
            f"use a multiple of {dist.world_size}",
        )
    per_rank = batch_size // dist.world_size
    if dist.world_size > 1:
        sampler: Any = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=train, seed=seed, drop_last=train)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=workers,
        drop_last=train if drop_last is None else drop_last,
        # Only training loaders keep their workers: an evaluation loader is first iterated after training has grown
        # the process (an SSQL step on MobileNetV2-0.5 holds about 13 GB), and workers forked then keep every page
        # the parent had mapped alive while it trains on; two persistent kNN loaders ran a 24 GB machine out of memory.
        persistent_workers=workers > 0 and train,
        pin_memory=torch.cuda.is_available(),
    )


def set_epoch(loader: DataLoader[Any], epoch: int, seed: int) -> None:
    """Reshuffle deterministically per epoch, so a resumed run sees the order it would have seen."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(seed + epoch)
