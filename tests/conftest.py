"""Shared fixtures: real Fashion-MNIST images, the CLI as a user runs it, and one tiny trained run."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssql_deploy.data.fashion_mnist import DEBIAN_ROOT, FashionMNIST

CliRun = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    if not (DEBIAN_ROOT / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist (make test does this)")
    return DEBIAN_ROOT


# Tiny test networks run faster on one thread: two OpenMP threads on a shared 2-core machine spend
# their time spin-waiting on each other. Tests check behaviour, not speed. `make test` runs one pytest
# worker per core (pytest-xdist), so each worker's in-process tests take one thread too.
_ENV = {"OMP_NUM_THREADS": "1"}
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ssql_deploy", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env={**os.environ, **_ENV, **(env or {})},
    )  # fmt: skip


def kill_9_once_written(args: list[str], checkpoint: Path, timeout: float = 120) -> None:
    """Start `ssql-deploy ARGS` and SIGKILL it the moment `checkpoint` first exists (mid-run, no clean-up)."""
    proc = subprocess.Popen([sys.executable, "-m", "ssql_deploy", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **_ENV})  # fmt: skip
    deadline = time.time() + timeout
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run exited (code {proc.returncode}) before it could be killed"
    assert checkpoint.exists(), f"no {checkpoint.name} within {timeout:.0f} s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def fmnist_batch(fmnist_root: Path) -> torch.Tensor:
    """64 real Fashion-MNIST test images at 32 px, normalised as training does: what calibration and parity checks get."""
    from ssql_deploy.data import DataSource

    split = DataSource.of("fashion-mnist", fmnist_root, 32).split("test")
    return torch.stack([split[i][0] for i in range(64)])


@pytest.fixture(scope="session")
def cli() -> CliRun:
    """Run `ssql-deploy ARGS...` in a fresh process, exactly as a user would."""
    return _run


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """One clear error line, exit code 2, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle.lower() in result.stderr.lower(), result.stderr


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path, cli: CliRun) -> Path:
    """One epoch of test_resnet on 1,024 Fashion-MNIST images: a real run directory to build on."""
    out = tmp_path_factory.mktemp("tiny_run")
    result = cli("finetune", "--arch", "test_resnet", "--subset", "1024", "--epochs", "2", "--batch-size", "64",
                 "--lr", "0.05", "--schedule", "cosine", "--workers", "0", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def deployed(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, cli: CliRun) -> Path:
    """A copy of the tiny run, quantized at w4a4 and exported for ONNX Runtime: every later stage has input."""
    run = tmp_path_factory.mktemp("deployed") / "run"
    shutil.copytree(tiny_run, run)
    q = cli(
        "quantize", run, "--bits", "w4a4", "--calib-size", "64", "--calib-dir", run.parent / "calib", "--subset", "256", "--workers", "0"
    )
    assert q.returncode == 0, q.stderr
    e = cli("export", run, "--bits", "w4a4")
    assert e.returncode == 0, e.stderr
    return run


def without_zero_init(model: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm scale back to 1: ResNet blocks start as the identity (zero-init residual), which hides their convs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    return model


def write_image_tree(root: Path, fmnist_root: Path, classes: int, per_class: int) -> None:
    """An ImageFolder tree (train/ and val/, a folder per class) of real Fashion-MNIST test images as PNG files."""
    images = FashionMNIST(fmnist_root, "test")
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            picks = [i for i in range(len(images)) if int(images.targets[i]) == c][:per_class]
            for i in picks:
                Image.fromarray(images.images[i, 0].numpy()).save(folder / f"{i}.png")
