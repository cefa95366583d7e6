"""SSQL pretraining end to end: the CLI stage, its outputs, resume after kill -9, torchrun, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CliRun, assert_user_error, kill_9_once_written

from ssql_deploy.distributed import DistInfo
from ssql_deploy.errors import UserError
from ssql_deploy.models import create_model
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.pretrain.trainer import _check_sync_bn
from ssql_deploy.recipe import PretrainRecipe

# Small heads keep a CLI run to a few seconds: the 2048-d reference heads dwarf test_resnet.
HEADS = ["--proj-dim", "32", "--proj-hidden-dim", "64"]
FAST = ["--arch", "test_resnet", "--batch-size", "32", "--workers", "0", *HEADS]


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path, cli: CliRun) -> Path:
    out = tmp_path_factory.mktemp("pretrain_run")
    result = cli("pretrain", "--method", "ssql", *FAST, "--subset", "128", "--epochs", "2", "--knn-every", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "pretraining (ssql) finished" in result.stdout
    return out


def test_run_writes_metrics_backbone_checkpoint_and_manifest(pretrain_run: Path) -> None:
    stage = pretrain_run / "pretrain"
    epochs = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    for e in epochs:
        assert 0 <= e["knn_top1"] <= 100 and e["z_std"] > 0 and "collapse_warning" in e
        assert math.isfinite(e["loss"]) and math.isfinite(e["loss_q"]) and math.isfinite(e["loss_fp"])
        assert sum(e["bits_seen"]["w"].values()) == 4  # 128 images / 32 per step, one draw per step
    backbone = torch.load(stage / "backbone.pt", weights_only=True)
    reference = create_model("test_resnet", 10, "cifar").state_dict()
    assert set(backbone) == {k for k in reference if not k.startswith("fc.")}
    assert "layer1.0.bn1.running_mean" in backbone
    state = load_checkpoint(stage / "last.pt")
    assert state["epoch"] == 2 and state["step"] == 0 and "bit_sampler" in state["extra"]
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["settings"]["method"] == "ssql"
    assert manifest["settings"]["w_bits"] == "2-8" and manifest["settings"]["a_bits"] == "4-8"
    assert len(manifest["outputs"]["backbone"]["sha256"]) == 64


def test_finetune_accepts_the_pretrain_run_directory(pretrain_run: Path, tmp_path: Path, cli: CliRun) -> None:
    result = cli("finetune", "--ckpt", pretrain_run, "--mode", "linear", "--arch", "test_resnet", "--epochs", "1",
                 "--subset", "128", "--batch-size", "64", "--lr", "1.0", "--workers", "0", "--out", tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert "plain state dict" in log and "pretrain/backbone.pt" in json.dumps(json.loads((tmp_path / "finetune/manifest.json").read_text()))
    tuned = load_checkpoint(tmp_path / "finetune/last.pt")["model"]
    pretrained = torch.load(pretrain_run / "pretrain/backbone.pt", weights_only=True)
    assert torch.equal(tuned["layer1.0.conv1.weight"], pretrained["layer1.0.conv1.weight"])  # frozen, imported


def test_resume_after_kill_9(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    args = ["pretrain", "--method", "byol-ssql", *FAST, "--pred-hidden-dim", "16", "--subset", "192", "--epochs", "3",
            "--knn-every", "0", "--save-every-steps", "1"]  # fmt: skip
    out = tmp_path / "killed"
    last = out / "pretrain/last.pt"
    kill_9_once_written([*args, "--out", out], last)
    state = load_checkpoint(last)
    done = (state["epoch"], state["step"])
    assert done < (3, 0), "the kill should land mid-run"

    assert_user_error(cli(*args, "--out", out), "--resume")
    resumed = cli(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done[0]}" in resumed.stderr
    epochs = [json.loads(line) for line in (out / "pretrain/metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert all(sum(e["bits_seen"]["w"].values()) == 6 for e in epochs)  # every step of every epoch counted once
    final = load_checkpoint(last)
    assert (final["epoch"], final["step"], final["global_step"]) == (3, 0, 18)


def test_sync_bn_on_cpu_processes_is_refused_clearly() -> None:
    recipe = PretrainRecipe(method="ssql", arch="test_resnet", batch_size=8, sync_bn=True)
    _check_sync_bn(recipe, DistInfo())  # one process: nothing to synchronise, nothing to refuse
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--sync-bn needs GPUs"):
            _check_sync_bn(recipe, DistInfo(rank=0, world_size=2))


def test_resume_without_a_previous_run(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    assert_user_error(cli("pretrain", *FAST, "--out", tmp_path, "--resume"), "nothing to resume")


def test_two_process_torchrun(tmp_path: Path, fmnist_root: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ssql_deploy",
           "pretrain", "--method", "ssql-nce", *FAST, "--queue-size", "96", "--subset", "128", "--epochs", "1",
           "--knn-every", "1", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "pretrain/manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2
    assert manifest["metrics"]["replicas_in_sync"] is True  # weights, EMA target and queue identical on both ranks
    assert 0 <= manifest["metrics"]["knn_top1"] <= 100
    assert result.stdout.count("pretraining (ssql-nce) finished") == 1  # only rank 0 reports
    state = load_checkpoint(tmp_path / "pretrain/last.pt")
    assert int(state["model"]["queue.ptr"]) == (4 * 32 * 2) % 96  # 4 steps x 32 global images x 2 views of keys


@pytest.mark.parametrize("args, needles", [
    (["--method", "dino"], ["unknown method", "ssql"]),
    (["--w-bits", "1-8"], ["outside 2..8"]),
    (["--a-bits", "6-4"], ["empty"]),
    (["--fixed-bits", "w9a4"], ["outside 2..8"]),
    (["--batch-size", "1"], ["no pairs"]),
    (["--method", "simsiam", "--fixed-bits", "w4a4"], ["only applies to the SSQL methods"]),
    (["--method", "byol-ssql", "--quantize-target"], ["quantize_target"]),
])  # fmt: skip
def test_bad_input_is_one_line_with_exit_2(args: list[str], needles: list[str], tmp_path: Path, cli: CliRun) -> None:
    assert_user_error(cli("pretrain", *FAST, *args, "--out", tmp_path), *needles)
    assert not (tmp_path / "pretrain").exists()


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes/pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate(recipe: Path) -> None:
    settings = PretrainRecipe.build(recipe)
    assert settings.method in recipe.stem  # the file name says which method it runs
    assert settings.proj_dim and settings.proj_hidden_dim
    if recipe.stem.startswith("cifar10"):
        assert settings.arch == "resnet18" and settings.epochs == 400 and settings.data == "cifar10"
