"""Test-split evaluation: loaders, the class-count check, and top-1 exact under DDP."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ssql_deploy.data import DataSource, num_classes
from ssql_deploy.distributed import DistInfo, all_reduce_sum
from ssql_deploy.errors import UserError
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.progress import console, progress_bar


def model_data(meta: ModelMeta, data: str | None, root: Path | None, input_size: int | None = None, download: bool = False) -> DataSource:
    """The data a later stage feeds the model: the run's own unless flags override it; says which it used."""
    source = meta.source(data, root, input_size, download)
    given = [flag for flag, value in (("--data", data), ("--data-root", root), ("--input-size", input_size)) if value is not None]
    origin = f"{', '.join(given)} given" if given else "as the model was trained"
    console.print(f"data: {source.describe()}, normalised as in training ({origin})", highlight=False)
    check_classes(meta, source)
    return source


def check_classes(meta: ModelMeta, source: DataSource) -> None:
    classes = num_classes(source.data, source.root)
    if classes != meta.num_classes:
        raise UserError(
            f"the model classifies {meta.num_classes} classes but {source.data} has {classes}",
            f"pass the dataset it was fine-tuned on ({meta.data}), or fine-tune it on {source.data} first",
        )


def eval_loader(source: DataSource, subset: int | None, batch_size: int, workers: int) -> DataLoader[Any]:
    return DataLoader(source.split("test", subset), batch_size=batch_size, shuffle=False, num_workers=workers)


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
