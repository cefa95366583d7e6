"""Linear evaluation of a frozen backbone quantized at several bit-widths, as the SSQL paper reports it.

The backbone is quantized with min-max PTQ (per-channel weights, calibrated on the calibration
manifest's images), its features are computed once per bit-width, and a linear classifier is
trained on those cached features. Caching drops the reference's per-epoch crop/flip
augmentation, which is what makes eight bit-widths x several methods affordable on a CPU; every
bit-width and method is evaluated the same way, so the comparison the paper draws is kept.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ssql_deploy.progress import progress_bar
from ssql_deploy.quant.bits import BitSpec
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.placement import prepare


@torch.no_grad()
def features(backbone: nn.Module, loader: DataLoader[Any], label: str) -> tuple[torch.Tensor, torch.Tensor]:
    backbone.eval()
    feats, labels = [], []
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(loader))
        for images, y in loader:
            feats.append(backbone(images))
            labels.append(y)
            bar.advance(task)
    return torch.cat(feats), torch.cat(labels)


def train_linear(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], classes: int,
    epochs: int = 100, lr: float = 0.5, batch: int = 256, seed: int = 0,
) -> float:  # fmt: skip
    """Test top-1 of a linear classifier (SGD, cosine lr) on standardized cached features."""
    (xtr, ytr), (xte, yte) = train, test
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    torch.manual_seed(seed)
    fc = nn.Linear(xtr.shape[1], classes)
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr)).split(batch):
            loss = nn.functional.cross_entropy(fc(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return 100.0 * float((fc(xte).argmax(1) == yte).float().mean())


def quantized_linear_eval(
    backbone: nn.Module,
    bit_specs: Sequence[str],
    calib: list[torch.Tensor],
    train_loader: DataLoader[Any],
    test_loader: DataLoader[Any],
    classes: int,
    epochs: int = 100,
) -> dict[str, float]:
    """Linear-probe top-1 at full precision ("fp") and at each bit spec, backbone frozen.

    `backbone` must end at the pooled features (its fc replaced by nn.Identity).
    """
    results: dict[str, float] = {}
    for spec in bit_specs:
        model: nn.Module = backbone.eval()
        if spec != "fp":
            model = prepare(backbone, "ssql", BitSpec.parse(spec))
            calibrate(model, calib, "minmax")
        train = features(model, train_loader, f"{spec}: train features")
        test = features(model, test_loader, f"{spec}: test features")
        results[spec] = round(train_linear(train, test, classes, epochs), 2)
    return results
