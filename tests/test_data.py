"""Datasets from real files: Fashion-MNIST idx files and an ImageFolder tree made of its images."""

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssql_deploy.data import (
    TwoViews,
    eval_transform,
    get_spec,
    load_split,
    num_classes,
    ssl_view_transform,
    train_transform,
)  # fmt: skip
from ssql_deploy.data.fashion_mnist import FashionMNIST
from ssql_deploy.errors import UserError

SPEC = get_spec("fashion-mnist")


def test_fashion_mnist_full_splits(fmnist_root: Path) -> None:
    train = FashionMNIST(fmnist_root, "train")
    test = FashionMNIST(fmnist_root, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    assert sorted(torch.bincount(test.targets).tolist()) == [1000] * 10


def test_uncompressed_and_torchvision_layouts(fmnist_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in fmnist_root.glob("t10k-*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    ours = FashionMNIST(tmp_path, "test")
    reference = FashionMNIST(fmnist_root, "test")
    assert torch.equal(ours.images, reference.images)


def test_truncated_idx_file_is_a_user_error(fmnist_root: Path, tmp_path: Path) -> None:
    for gz in fmnist_root.glob("t10k-*.gz"):
        shutil.copy(gz, tmp_path / gz.name)
    data = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:5000]))
    with pytest.raises(UserError, match="truncated"):
        FashionMNIST(tmp_path, "test")


def test_transforms_make_normalized_rgb_at_the_requested_size(fmnist_root: Path) -> None:
    ds = load_split("fashion-mnist", "test", fmnist_root, eval_transform(32, SPEC.mean, SPEC.std))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x[0], x[1])  # grayscale replicated
    batch = torch.stack([ds[i][0] for i in range(256)])
    assert abs(float(batch.mean())) < 0.3 and 0.7 < float(batch.std()) < 1.3
    big = load_split("fmnist", "train", fmnist_root, train_transform(224, SPEC.mean, SPEC.std), subset=4)
    assert big[0][0].shape == (3, 224, 224)


def test_two_views_differ_and_subset_is_deterministic(fmnist_root: Path) -> None:
    torch.manual_seed(0)
    ds = load_split("fashion-mnist", "train", fmnist_root, TwoViews(ssl_view_transform(32, SPEC.mean, SPEC.std)), subset=50)
    (a, b), _ = ds[0]
    assert a.shape == b.shape == (3, 32, 32) and not torch.equal(a, b)
    again = load_split("fashion-mnist", "train", fmnist_root, None, subset=50)
    assert ds.indices == again.indices and len(again) == 50  # type: ignore[attr-defined]


def _write_imagefolder(root: Path, fmnist_root: Path, classes: list[int], per_class: int = 3) -> None:
    test = FashionMNIST(fmnist_root, "test")
    for split in ("train", "val"):
        for c in classes:
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            idx = (test.targets == c).nonzero().flatten()[:per_class]
            for i in idx.tolist():
                Image.fromarray(test.images[i, 0].numpy()).save(folder / f"{i}.png")


def test_imagefolder_tree_of_real_images(fmnist_root: Path, tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, fmnist_root, [0, 3, 7])
    assert num_classes("imagefolder", tmp_path) == 3
    ds = load_split("imagefolder", "test", tmp_path, eval_transform(224, (0.5,) * 3, (0.5,) * 3))
    x, y = ds[len(ds) - 1]
    assert len(ds) == 9 and x.shape == (3, 224, 224) and y == 2


def test_imagefolder_class_count_mismatch(fmnist_root: Path, tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, fmnist_root, [0, 1])
    (tmp_path / "val" / "class_9").mkdir()
    with pytest.raises(UserError, match="train/ has 2 class folders and val/ has 3"):
        load_split("imagefolder", "train", tmp_path, None)


def test_bad_names_and_roots(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown dataset 'cifar11'"):
        get_spec("cifar11")
    with pytest.raises(UserError, match="does not exist"):
        load_split("cifar10", "train", tmp_path / "missing", None)
    with pytest.raises(UserError, match="--download"):
        load_split("cifar10", "train", tmp_path, None)
    with pytest.raises(UserError, match="needs --data-root"):
        load_split("flowers", "train", None, None)
    assert get_spec("flowers102").name == get_spec("Flowers").name == "flowers"
