"""Train, eval and two-view SSL transforms, per dataset normalization, grayscale made RGB.

The SSL views follow the SSQL reference (SSQL.md): RandomResizedCrop(scale 0.2-1), ColorJitter
(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale(0.2), horizontal flip; large inputs also get
SimSiam's Gaussian blur. Eval is Resize(36) + CenterCrop(32) for small inputs, 256/224 otherwise.
"""

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

SMALL_INPUT = 64


def _to_rgb(image: Any) -> Any:
    if isinstance(image, torch.Tensor):
        return image.expand(3, -1, -1) if image.shape[-3] == 1 else image
    return image.convert("RGB")


def _finish(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Callable[[Any], Any]]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    scale = (0.8, 1.0) if size <= SMALL_INPUT else (0.08, 1.0)
    return v2.Compose([
        v2.Lambda(_to_rgb), v2.ToImage(),
        v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
        *_finish(mean, std),
    ])  # fmt: skip


def eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    resize = round(size * 36 / 32) if size <= SMALL_INPUT else round(size * 256 / 224)
    return v2.Compose([
        v2.Lambda(_to_rgb), v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size),
        *_finish(mean, std),
    ])  # fmt: skip


def ssl_view_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    blur: list[Callable[[Any], Any]] = []
    if size > SMALL_INPUT:
        blur = [v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5)]
    return v2.Compose([
        v2.Lambda(_to_rgb), v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2), *blur, v2.RandomHorizontalFlip(),
        *_finish(mean, std),
    ])  # fmt: skip


class TwoViews:
    """Two independent augmentations of one image, as every Siamese SSL method wants."""

    def __init__(self, view: Callable[[Any], torch.Tensor]) -> None:
        self.view = view

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(image), self.view(image)
