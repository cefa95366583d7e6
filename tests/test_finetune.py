"""Fine-tuning end to end on real Fashion-MNIST images: outputs, linear mode, resume, torchrun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CliRun, assert_user_error, kill_9_once_written

from ssql_deploy.models.checkpoint import load_checkpoint

FAST = ["--arch", "test_resnet", "--batch-size", "64", "--lr", "0.05", "--workers", "0"]


def test_run_writes_metrics_checkpoints_and_manifest(tiny_run: Path) -> None:
    stage = tiny_run / "finetune"
    epochs = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[-1]["test_top1"] > 30  # 10 classes: well above chance after 2 short epochs
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["metrics"]["n_test_images"] == 1024
    assert manifest["settings"]["arch"] == "test_resnet" and manifest["versions"]["torch"]
    assert len(manifest["outputs"]["best"]["sha256"]) == 64
    best = load_checkpoint(stage / "best.pt")
    assert best["format"] == "ssql-deploy" and best["num_classes"] == 10 and best["stem"] == "cifar"


def test_linear_mode_freezes_the_backbone_and_its_batchnorm(tiny_run: Path, tmp_path: Path, cli: CliRun) -> None:
    result = cli("finetune", "--ckpt", tiny_run, "--mode", "linear", "--epochs", "1", "--subset", "256",
                 "--lr", "1.0", *FAST[:4], *FAST[6:], "--out", tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    before = load_checkpoint(tiny_run / "finetune/best.pt")["model"]
    after = load_checkpoint(tmp_path / "finetune/last.pt")["model"]
    for key in before:
        if not key.startswith("fc."):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert "loaded" in result.stdout + result.stderr  # the import table


def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    args = ["finetune", *FAST, "--subset", "1500", "--epochs", "4"]
    straight = cli(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    last = out / "finetune/last.pt"
    kill_9_once_written([*args, "--out", out], last)
    done = load_checkpoint(last)["epoch"]
    assert 1 <= done < 4, "the kill should land mid-run"

    refused = cli(*args, "--out", out)
    assert_user_error(refused, "--resume")
    resumed = cli(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done}" in resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (out / "finetune/metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]
    a = load_checkpoint(tmp_path / "straight/finetune/last.pt")["model"]
    b = load_checkpoint(last)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_resume_without_a_previous_run(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    assert_user_error(cli("finetune", *FAST, "--out", tmp_path, "--resume"), "nothing to resume")


def test_two_process_torchrun(tmp_path: Path, fmnist_root: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ssql_deploy", "finetune", *FAST, "--subset", "512", "--epochs", "1", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "finetune/manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2
    assert manifest["metrics"]["n_test_images"] == 512  # every test image counted once across ranks
    assert result.stdout.count("fine-tuning (full) finished") == 1  # only rank 0 reports


@pytest.mark.parametrize("args, needles", [
    (["--data", "imagenet1k"], ["unknown dataset", "fashion-mnist"]),
    (["--data", "cifar10", "--data-root", "/nonexistent/dir"], ["does not exist", "--data-root"]),
    (["--arch", "vgg16"], ["unknown architecture", "resnet18"]),
    (["--ckpt", "/nonexistent/ckpt.pt"], ["does not exist"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--subset", "10", "--batch-size", "64"], ["fewer than one batch"]),
])  # fmt: skip
def test_bad_input_is_one_line_with_exit_2(args: list[str], needles: list[str], tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    assert_user_error(cli("finetune", "--arch", "test_resnet", "--workers", "0", *args, "--out", tmp_path), *needles)
    assert not (tmp_path / "finetune" / "last.pt").exists()


def test_foreign_checkpoint_via_cli(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00" * 100)
    assert_user_error(cli("finetune", *FAST, "--ckpt", bad, "--out", tmp_path / "o"), "not a")
