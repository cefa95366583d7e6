"""Test-split evaluation: loaders, the class-count check, and top-1 exact under DDP."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ssql_deploy.data import eval_transform, get_spec, load_split, num_classes
from ssql_deploy.distributed import DistInfo, all_reduce_sum
from ssql_deploy.errors import UserError
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.progress import progress_bar


def check_classes(meta: ModelMeta, data: str, root: Path | None) -> None:
    classes = num_classes(data, root)
    if classes != meta.num_classes:
        raise UserError(
            f"the model classifies {meta.num_classes} classes but {data} has {classes}",
            f"pass the dataset it was fine-tuned on ({meta.data}), or fine-tune it on {data} first",
        )


def eval_loader(
    data: str, root: Path | None, size: int, subset: int | None, batch_size: int, workers: int, download: bool = False
) -> DataLoader[Any]:
    spec = get_spec(data)
    dataset = load_split(data, "test", root, eval_transform(size, spec.mean, spec.std), download, subset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def shard(dataset: Dataset[Any], dist: DistInfo) -> Dataset[Any]:
    """Every rank-th item: unlike DistributedSampler, nothing is repeated to even out the shards."""
    if dist.world_size == 1:
        return dataset
    return Subset(dataset, range(dist.rank, len(dataset), dist.world_size))  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_top1(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader[Any],
    device: torch.device,
    dist: DistInfo,
    description: str = "evaluating",
) -> tuple[float, int]:
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(loader), visible=dist.is_main)
        for images, labels in loader:
            logits = model(images.to(device, non_blocking=True))
            correct[0] += (logits.argmax(1) == labels.to(device)).sum()
            correct[1] += len(labels)
            bar.advance(task)
    all_reduce_sum(correct, dist)
    total = int(correct[1])
    return (100.0 * float(correct[0]) / total if total else 0.0), total
