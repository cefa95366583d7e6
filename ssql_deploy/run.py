"""Run directories and stage manifests.

A run directory holds one sub-directory per stage (`pretrain/`, `finetune/`, `quant/w4a4/`,
`export/w8a8-ort/`, ...), each with a `manifest.json`: its inputs with sha256, every setting,
its metrics, package versions and the git commit. Any stage can then be re-run alone, and a
report can say exactly what produced a number.
"""

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from ssql_deploy import __version__
from ssql_deploy.errors import UserError

MANIFEST = "manifest.json"
_PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "pydantic")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path`, fsync, then rename it over `path`.

    A crash or kill -9 mid-write leaves the previous file intact, never a truncated one; every
    checkpoint, manifest, report, ONNX model and TensorRT plan is written through here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)  # mkstemp makes owner-only files; give the usual mode (0644 under umask 022)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def versions() -> dict[str, str]:
    found = {"ssql-deploy": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_commit() -> str | None:
    """The commit of the ssql-deploy source tree, with `-dirty` if it has local changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def write_manifest(
    stage_dir: Path,
    stage: str,
    inputs: dict[str, Path],
    settings: dict[str, Any],
    metrics: dict[str, Any],
    outputs: dict[str, Path] | None = None,
) -> Path:
    def describe(paths: dict[str, Path]) -> dict[str, dict[str, str]]:
        return {k: {"path": str(p), "sha256": sha256_file(p)} for k, p in paths.items() if p.is_file()}

    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": describe(inputs),
        "outputs": describe(outputs or {}),
        "settings": settings,
        "metrics": metrics,
        "versions": versions(),
        "git_commit": git_commit(),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
    }
    path = stage_dir / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def resolve_checkpoint(path: Path, candidates: tuple[str, ...]) -> Path:
    """A checkpoint file as given, or the first of `candidates` inside a run directory."""
    if not path.exists():
        raise UserError(f"{path} does not exist", "pass a checkpoint file or a run directory")
    if path.is_file():
        return path
    for rel in candidates:
        if (path / rel).is_file():
            return path / rel
    raise UserError(
        f"run directory {path} holds none of {', '.join(candidates)}",
        "run the earlier stage first or pass the checkpoint file itself",
    )
