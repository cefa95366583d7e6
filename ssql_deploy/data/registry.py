"""Named datasets: where each expects its files, its classes, input size and normalization.

Everything reads from a local `--data-root`; torchvision's downloaders run only when the user
passes `--download`, because a tool that fetches data behind a user's back fails on offline
build machines and hides what was trained on.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import datasets as tvd

from ssql_deploy.data.fashion_mnist import DEBIAN_ROOT, FashionMNIST
from ssql_deploy.data.image_files import checked_image_folder
from ssql_deploy.errors import UserError

Split = Literal["train", "test"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUBSET_SEED = 0
CALTECH_TRAIN_PER_CLASS = 30


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    expects: str  # what the user must have under --data-root
    build: Callable[[Path, Split, Any, bool], Dataset[Any]]
    default_root: Path | None = None
    aliases: tuple[str, ...] = ()


def _fashion(root: Path, split: Split, transform: Any, download: bool) -> Dataset[Any]:
    del download  # shipped by Debian; nothing to download
    return FashionMNIST(root, split, transform)


def _torchvision(
    cls: type, split_arg: Callable[[Split], dict[str, Any]], splits: dict[Split, tuple[str, ...]] | None = None
) -> Callable[[Path, Split, Any, bool], Dataset[Any]]:
    """Adapter for torchvision dataset classes; `splits` joins several official splits (train+val)."""

    def build(root: Path, split: Split, transform: Any, download: bool) -> Dataset[Any]:
        parts = splits[split] if splits else (None,)
        sets = [cls(str(root), transform=transform, download=download, **split_arg(part or split)) for part in parts]  # type: ignore[arg-type]
        return sets[0] if len(sets) == 1 else ConcatDataset(sets)

    return build


def _caltech(root: Path, split: Split, transform: Any, download: bool) -> Dataset[Any]:
    """Caltech-101 has no official split: the usual 30 images per class train, the rest test."""
    full = tvd.Caltech101(str(root), transform=transform, download=download)
    seen: dict[int, int] = {}
    train, test = [], []
    for i, label in enumerate(full.y):
        seen[label] = seen.get(label, 0) + 1
        (train if seen[label] <= CALTECH_TRAIN_PER_CLASS else test).append(i)
    return Subset(full, train if split == "train" else test)


def _class_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist", "an imagefolder root needs train/<class>/* and val/<class>/*")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _imagefolder(root: Path, split: Split, transform: Any, download: bool) -> Dataset[Any]:
    """train/ and val/ must name the same classes, or label i would mean different things in each."""
    del download
    train, val = _class_dirs(root / "train"), _class_dirs(root / "val")
    if train != val:
        odd = sorted(set(train) ^ set(val))
        raise UserError(
            f"{root}: train/ has {len(train)} class folders and val/ has {len(val)} (differing: {', '.join(odd[:3])})",
            "give train/ and val/ the same class sub-folders",
        )
    if len(train) < 2:
        raise UserError(
            f"{root}/train has {len(train)} class folder{'s' if len(train) != 1 else ''} ({', '.join(train) or 'none'}); "
            "a classifier needs at least 2 (with one class every prediction is right)",
            "put each class's images in its own sub-folder of train/ and val/",
        )
    return checked_image_folder(root / ("train" if split == "train" else "val"), transform)


_SPECS = [
    DatasetSpec("fashion-mnist", 10, 32, (0.2860,) * 3, (0.3530,) * 3,
                "the four idx files (train/t10k images and labels), .gz or not", _fashion, DEBIAN_ROOT,
                ("fashion_mnist", "fmnist")),
    DatasetSpec("cifar10", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                "cifar-10-batches-py/", _torchvision(tvd.CIFAR10, lambda s: {"train": s == "train"})),
    DatasetSpec("cifar100", 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                "cifar-100-python/", _torchvision(tvd.CIFAR100, lambda s: {"train": s == "train"})),
    DatasetSpec("flowers", 102, 224, IMAGENET_MEAN, IMAGENET_STD,
                "flowers-102/ (jpg/, imagelabels.mat, setid.mat); train = train+val",
                _torchvision(tvd.Flowers102, lambda s: {"split": s}, {"train": ("train", "val"), "test": ("test",)}),
                aliases=("flowers102", "flowers-102")),
    DatasetSpec("stl10", 10, 224, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713),
                "stl10_binary/", _torchvision(tvd.STL10, lambda s: {"split": s})),
    DatasetSpec("food101", 101, 224, IMAGENET_MEAN, IMAGENET_STD,
                "food-101/ (images/, meta/)", _torchvision(tvd.Food101, lambda s: {"split": s})),
    DatasetSpec("pets", 37, 224, IMAGENET_MEAN, IMAGENET_STD,
                "oxford-iiit-pet/ (images/, annotations/)",
                _torchvision(tvd.OxfordIIITPet, lambda s: {"split": "trainval" if s == "train" else "test"}),
                aliases=("oxford-pets",)),
    DatasetSpec("dtd", 47, 224, IMAGENET_MEAN, IMAGENET_STD,
                "dtd/ (images/, labels/); train = train+val of partition 1",
                _torchvision(tvd.DTD, lambda s: {"split": s}, {"train": ("train", "val"), "test": ("test",)})),
    DatasetSpec("caltech101", 101, 224, IMAGENET_MEAN, IMAGENET_STD,
                "caltech101/101_ObjectCategories/; 30 per class train, the rest test", _caltech),
    DatasetSpec("imagefolder", 0, 224, IMAGENET_MEAN, IMAGENET_STD,
                "train/<class>/* and val/<class>/* (val is the test split)", _imagefolder),
]  # fmt: skip
_BY_NAME = {alias: spec for spec in _SPECS for alias in (spec.name, *spec.aliases)}


def list_datasets() -> list[DatasetSpec]:
    return list(_SPECS)


def get_spec(name: str) -> DatasetSpec:
    key = name.strip().lower()
    if key not in _BY_NAME:
        raise UserError(f"unknown dataset {name!r}", f"choose one of: {', '.join(s.name for s in _SPECS)}")
    return _BY_NAME[key]


def resolve_root(spec: DatasetSpec, root: Path | None) -> Path:
    if root is None:
        if spec.default_root is None:
            raise UserError(f"dataset {spec.name} needs --data-root", f"point it at a directory holding {spec.expects}")
        root = spec.default_root
    if not root.exists():
        hint = "apt-get install dataset-fashion-mnist" if spec.name == "fashion-mnist" else f"a directory holding {spec.expects}"
        raise UserError(f"data root {root} does not exist", f"pass --data-root pointing at {hint}")
    return root


def load_split(
    name: str,
    split: Split,
    root: Path | None,
    transform: Any,
    download: bool = False,
    subset: int | None = None,
) -> Dataset[Any]:
    """One split of a named dataset; `subset` keeps a fixed, seed-0 random sample of that many items."""
    spec = get_spec(name)
    path = resolve_root(spec, root)
    try:
        dataset = spec.build(path, split, transform, download)
    except (RuntimeError, FileNotFoundError) as exc:
        raise UserError(
            f"{spec.name} {split} split not found or incomplete under {path} ({str(exc).splitlines()[0]})",
            f"put {spec.expects} there, or add --download to fetch it",
        ) from None
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise UserError(f"{spec.name} {split} split under {path} has no images", f"expected {spec.expects}")
    if subset is not None:
        if subset < 1:
            raise UserError(f"--subset must be at least 1, got {subset}")
        n = len(dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SUBSET_SEED))[: min(subset, n)]
        dataset = Subset(dataset, sorted(order.tolist()))
    return dataset


def num_classes(name: str, root: Path | None) -> int:
    """Class count; image folders are counted on disk."""
    spec = get_spec(name)
    return spec.num_classes or len(_class_dirs(resolve_root(spec, root) / "train"))
