"""Files of a run: atomic writes, content hashes, and what produced them (versions, git commit).

A run directory holds one sub-directory per stage (run_layout.py), each committed by a manifest
(manifest.py) once its files are complete.
"""

import hashlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from ssql_deploy import __version__
from ssql_deploy.errors import UserError

_PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "numpy", "pydantic")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_dir(path: Path) -> Path:
    """mkdir -p that names the file in the way instead of raising FileExistsError / NotADirectoryError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise UserError(f"cannot create directory {path}: {blocker} is a file", "move that file away or choose another --out") from None
    return path


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path`, fsync, then rename it over `path`.

    A crash or kill -9 mid-write leaves the previous file intact, never a truncated one; every
    checkpoint, manifest, report, ONNX model and TensorRT plan is written through here.
    """
    make_dir(path.parent)
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
