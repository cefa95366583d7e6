"""Calibration sets as committed manifests: which training images calibrate, with their hashes.

TensorRT's calibration caches are neither portable nor deterministic (TensorRT#2036). Here the
choice of images is a small JSON file (dataset, split, indices, sha256 of each decoded image)
that lives in `calib/` and can be committed: the same file gives the same ranges on any machine,
and a changed dataset is caught instead of silently giving other ranges.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ssql_deploy.data import DataSource, get_spec
from ssql_deploy.errors import UserError
from ssql_deploy.run import write_text_atomic

DEFAULT_DIR = Path("calib")
DEFAULT_SIZE = 512
SELECTION_SEED = 1234
BATCH = 64


def image_digest(image: Any) -> str:
    """sha256 over the decoded pixels and their shape, so a re-encoded file with equal pixels still matches."""
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


Role = Literal["calibration", "validation"]
_SUFFIX: dict[Role, str] = {"calibration": "train", "validation": "val"}


def manifest_path(directory: Path, data: str, size: int, role: Role = "calibration") -> Path:
    return directory / f"{get_spec(data).name}-{_SUFFIX[role]}-{size}.json"


def _pick(n: int, size: int, role: Role) -> list[int]:
    """Calibration sets take the head of one fixed permutation of the training split, validation sets its tail.

    So a validation set is disjoint from every calibration set that leaves room for it, and a
    larger calibration set extends a smaller one instead of reshuffling it.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SELECTION_SEED))
    return sorted((order[:size] if role == "calibration" else order[n - size :]).tolist())


def create_manifest(path: Path, source: DataSource, raw: Dataset[Any], size: int, role: Role = "calibration") -> dict[str, Any]:
    n = len(raw)  # type: ignore[arg-type]
    if size > n:
        option = "--calib-size" if role == "calibration" else "--val-size"
        raise UserError(f"{option} {size} exceeds the {n} training images of {source.data}", f"use at most {n}")
    indices = _pick(n, size, role)
    where = "[:size]" if role == "calibration" else "[-size:]"
    manifest = {
        "dataset": source.data,
        "split": "train",
        "role": role,
        "size": size,
        "selection": f"torch.randperm(seed={SELECTION_SEED}){where}, sorted",
        "indices": indices,
        "sha256": [image_digest(raw[i][0]) for i in indices],
    }
    write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _load(source: DataSource, size: int, directory: Path, role: Role) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """The images of a manifest (created on first use) as the model sees them, their labels, and the manifest's path."""
    if size < 1:
        option = "--calib-size" if role == "calibration" else "--val-size"
        raise UserError(f"{option} must be positive, got {size}", f"the default is {DEFAULT_SIZE}")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"calibration directory {directory} is a file", "pass --calib-dir a directory (created if missing)")
    path = manifest_path(directory, source.data, size, role)
    raw = source.split("train", transform=None)
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
            indices, hashes = manifest["indices"], manifest["sha256"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"calibration manifest {path} is unreadable", "delete it to have it re-created") from None
    else:
        manifest = create_manifest(path, source, raw, size, role)
        indices, hashes = manifest["indices"], manifest["sha256"]
    transform = source.eval_transform()
    images, labels = [], []
    for i, expected in zip(indices, hashes, strict=True):
        if i >= len(raw):  # type: ignore[arg-type]
            raise UserError(f"{path} names image {i} but {source.data} has only {len(raw)} training images", "re-create the manifest")  # type: ignore[arg-type]
        image, label = raw[i]
        if image_digest(image) != expected:
            raise UserError(
                f"training image {i} of {source.data} differs from calibration manifest {path}",
                "the dataset files changed; restore them or delete the manifest to calibrate on the new ones",
            )
        images.append(transform(image))
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels), path


def load_calibration(source: DataSource, size: int, directory: Path = DEFAULT_DIR) -> tuple[list[torch.Tensor], Path]:
    """Batches of calibration images as the model sees them, from the manifest (created on first use). No labels."""
    images, _, path = _load(source, size, directory, "calibration")
    return list(images.split(BATCH)), path


def load_validation(
    source: DataSource, size: int, calib_size: int, directory: Path = DEFAULT_DIR
) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """Labelled training images disjoint from the `calib_size` calibration images, for choices that must not see the test split."""
    n = len(source.split("train", transform=None))  # type: ignore[arg-type]
    if size + calib_size > n:
        raise UserError(f"{size} validation and {calib_size} calibration images overlap: {source.data} has {n} training images",
                        f"lower --val-size or --calib-size to at most {n} together")  # fmt: skip
    return _load(source, size, directory, "validation")
