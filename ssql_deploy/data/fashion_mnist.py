"""Fashion-MNIST read straight from its idx files (the Debian package ships them gzipped).

The whole split is decoded once into a uint8 tensor; 70k 28x28 images are 55 MB, so holding them
in memory is cheaper than any file-per-image layout.
"""

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ssql_deploy.errors import UserError

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _find(root: Path, stem: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
    raise UserError(
        f"Fashion-MNIST file {stem}[.gz] not found under {root}",
        "install it with `apt-get install dataset-fashion-mnist` or pass --data-root DIR holding the four idx files",
    )


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}", "re-download or re-install the dataset files") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != expected_dims:
        raise UserError(f"{path} is not an idx file of unsigned bytes with {expected_dims} dimensions", "check the file")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_dims)]
    offset = 4 + 4 * expected_dims
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise UserError(f"{path} is truncated ({len(data) - offset} of {count} bytes)", "re-download the dataset")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


class FashionMNIST(Dataset[tuple[torch.Tensor, int]]):
    """Items are (uint8 image tensor 1x28x28, label); transforms take tensors as they take PIL images."""

    classes = CLASSES

    def __init__(self, root: Path, split: str, transform: object | None = None) -> None:
        images_stem, labels_stem = _FILES[split]
        images = _read_idx(_find(root, images_stem), 3)
        labels = _read_idx(_find(root, labels_stem), 1)
        if len(images) != len(labels):
            raise UserError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels", "re-download it")
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)  # type: ignore[operator]
        return image, int(self.targets[index])
