"""Weighted kNN top-1, the label-free training monitor of InstDisc and SimSiam (k=200, T=0.1).

The bank is the backbone's L2-normalized features of the *eval-transformed* training images; each
test image votes with its k most similar bank images, weighted by exp(similarity / T). Cheap next
to training, it shows whether representations improve long before a linear probe could.
Under DDP each process embeds a shard of both splits; the bank is gathered, the counts summed.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ssql_deploy.distributed import DistInfo, all_reduce_sum
from ssql_deploy.pretrain.collectives import gather_varlen
from ssql_deploy.progress import progress_bar


@torch.no_grad()
def embed(
    backbone: nn.Module, loader: DataLoader[Any], device: torch.device, dist: DistInfo, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    with progress_bar() as bar:
        task = bar.add_task(f"kNN: {what}", total=len(loader), visible=dist.is_main)
        for images, targets in loader:
            features.append(F.normalize(backbone(images.to(device, non_blocking=True)).float(), dim=1))
            labels.append(targets.to(device))
            bar.advance(task)
    return torch.cat(features), torch.cat(labels)


def knn_predict(
    features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int, temperature: float
) -> torch.Tensor:
    """Class predictions for L2-normalized `features` from a labelled, L2-normalized bank."""
    similarity = features @ bank.t()
    weights, index = similarity.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(features), num_classes, device=features.device)
    votes.scatter_add_(1, bank_labels[index], (weights / temperature).exp())
    return votes.argmax(dim=1)


@torch.no_grad()
def knn_top1(
    backbone: nn.Module,
    bank_loader: DataLoader[Any],
    test_loader: DataLoader[Any],
    num_classes: int,
    device: torch.device,
    dist: DistInfo,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 % on the test split. The caller puts the backbone in eval mode (BN running statistics)."""
    bank, bank_labels = embed(backbone, bank_loader, device, dist, "train bank")
    bank, bank_labels = gather_varlen(bank), gather_varlen(bank_labels)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    with progress_bar() as bar:
        task = bar.add_task("kNN: test", total=len(test_loader), visible=dist.is_main)
        for images, labels in test_loader:
            features = F.normalize(backbone(images.to(device, non_blocking=True)).float(), dim=1)
            predictions = knn_predict(features, bank, bank_labels, num_classes, k, temperature)
            counts[0] += (predictions == labels.to(device)).sum()
            counts[1] += len(labels)
            bar.advance(task)
    all_reduce_sum(counts, dist)
    return 100.0 * float(counts[0]) / max(float(counts[1]), 1.0)
