"""Calibration sets as committed manifests: which training images calibrate, with their hashes.

TensorRT's calibration caches are neither portable nor deterministic (TensorRT#2036). Here the
choice of images is a small JSON file (dataset, split, indices, sha256 of each decoded image)
that lives in `calib/` and can be committed: the same file gives the same ranges on any machine,
and a changed dataset is caught instead of silently giving other ranges.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

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


def manifest_path(directory: Path, data: str, size: int) -> Path:
    return directory / f"{get_spec(data).name}-train-{size}.json"


def create_manifest(path: Path, source: DataSource, raw: Dataset[Any], size: int) -> dict[str, Any]:
    n = len(raw)  # type: ignore[arg-type]
    if size > n:
        raise UserError(f"--calib-size {size} exceeds the {n} training images of {source.data}", f"use at most {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SELECTION_SEED))[:size]
    indices = sorted(order.tolist())
    manifest = {
        "dataset": source.data,
        "split": "train",
        "size": size,
        "selection": f"torch.randperm(seed={SELECTION_SEED})[:size], sorted",
        "indices": indices,
        "sha256": [image_digest(raw[i][0]) for i in indices],
    }
    write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_calibration(source: DataSource, size: int, directory: Path = DEFAULT_DIR) -> tuple[list[torch.Tensor], Path]:
    """Batches of calibration images as the model sees them, from the manifest (created on first use)."""
    if size < 1:
        raise UserError(f"--calib-size must be positive, got {size}", f"the default is {DEFAULT_SIZE}")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"calibration directory {directory} is a file", "pass --calib-dir a directory (created if missing)")
    path = manifest_path(directory, source.data, size)
    raw = source.split("train", transform=None)
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
            indices, hashes = manifest["indices"], manifest["sha256"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"calibration manifest {path} is unreadable", "delete it to have it re-created") from None
    else:
        manifest = create_manifest(path, source, raw, size)
        indices, hashes = manifest["indices"], manifest["sha256"]
    transform = source.eval_transform()
    images = []
    for i, expected in zip(indices, hashes, strict=True):
        if i >= len(raw):  # type: ignore[arg-type]
            raise UserError(f"{path} names image {i} but {source.data} has only {len(raw)} training images", "re-create the manifest")  # type: ignore[arg-type]
        image = raw[i][0]
        if image_digest(image) != expected:
            raise UserError(
                f"training image {i} of {source.data} differs from calibration manifest {path}",
                "the dataset files changed; restore them or delete the manifest to calibrate on the new ones",
            )
        images.append(transform(image))
    stacked = torch.stack(images)
    return list(stacked.split(BATCH)), path
