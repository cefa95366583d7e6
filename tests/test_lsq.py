"""LSQ quantization-aware training: the step-size gradient, training, export parity, bad input."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import CliRun, assert_user_error

from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.models.trained import load_trained
from ssql_deploy.quant.quantizer import ActQuantizer, WeightQuantizer, lsq_fake_quant


def test_step_size_gradient_matches_the_lsq_paper() -> None:
    """d out / d s = round(x/s) - x/s inside the range, qmin or qmax outside, times g."""
    x = torch.tensor([0.26, 1.7, -5.0, 9.0, 2.49])
    step = torch.tensor(0.5, requires_grad=True)
    qmin, qmax, g = -4, 3, 0.125
    out = lsq_fake_quant(x, step, qmin, qmax, g)
    assert out.tolist() == [0.5, 1.5, -2.0, 1.5, 1.5]
    out.sum().backward()
    v = x / 0.5
    by_hand = [(round(float(e)) - float(e)) if qmin <= e <= qmax else (qmin if e < qmin else qmax) for e in v]
    assert step.grad is not None and step.grad.item() == pytest.approx(g * sum(by_hand))


def test_the_lsq_function_gives_the_gradients_of_its_definition_with_and_without_qdrop() -> None:
    """Against the same maths composed from autograd ops (STE inside [qmin, qmax] inclusive, the paper's step gradient,
    and QDrop's `torch.where` after it): forward and both gradients, on values at and beyond both ends of the grid."""
    torch.manual_seed(0)
    qmin, qmax, g = -4, 3, 0.1
    x = torch.cat([torch.randn(500) * 2, torch.tensor([-2.0, 1.5, -2.0001, 1.5001, 0.0, -7.0, 7.0])]).requires_grad_()
    kept = (torch.rand(x.shape) < 0.5).float()
    weights = torch.randn(x.shape)

    def composed(step: torch.Tensor, quantized: torch.Tensor | None) -> torch.Tensor:
        u = x / step.detach()
        inside = (u >= qmin) & (u <= qmax)  # LSQ's straight-through estimator, ends included
        clamped = u.clamp(qmin, qmax)
        ste = u * inside + (clamped.round() - u * inside).detach()
        by_step = torch.where(inside, clamped.round() - clamped, clamped).detach()
        out = ste * step.detach() + (step * g - (step * g).detach()) * by_step  # the value of ste * step, d/d step = g * by_step
        return out if quantized is None else torch.where(quantized.bool(), out, x)

    for mask in (None, kept):
        results = []
        for fused in (True, False):
            step = torch.tensor(0.5, requires_grad=True)
            out = lsq_fake_quant(x, step, qmin, qmax, g, mask) if fused else composed(step, mask)
            (out * weights).sum().backward()
            assert x.grad is not None and step.grad is not None
            results.append((out.detach(), x.grad.clone(), step.grad.clone()))
            x.grad = None
        for mine, reference in zip(*results, strict=True):
            assert torch.allclose(mine, reference, atol=1e-5), (mine - reference).abs().max()
        if mask is not None:  # passed on exactly as they are, with the gradient 1 and none to the step
            passed = ~mask.bool()
            assert torch.equal(results[0][0][passed], x.detach()[passed]) and torch.equal(results[0][1][passed], weights[passed])


def test_quantizers_apply_lsq_gradient_scale() -> None:
    w = torch.randn(4, 3, 3, 3)
    wq = WeightQuantizer(4)
    wq.init_lsq(w, "lsq")
    assert torch.allclose(wq.step.detach(), 2 * w.abs().flatten(1).mean(1) / math.sqrt(7))
    wq(w).sum().backward()
    assert wq.step.grad is not None and wq.step.grad.shape == (4,)
    aq = ActQuantizer(4, signed=False)
    aq.set_range(0.0, 1.5)
    aq.init_lsq("calibrated")
    aq.enabled = True
    assert aq.step.item() == pytest.approx(0.1)
    aq(torch.rand(2, 8) * 2).sum().backward()
    assert aq.step.grad is not None and aq.step.grad.abs().item() > 0


def test_lsq_trains_steps_and_exports_with_parity(tiny_run: Path, tmp_path: Path, cli: CliRun, fmnist_batch: torch.Tensor) -> None:
    common = ["--bits", "w3a3", "--calib-size", "64", "--calib-dir", tmp_path / "calib", "--subset", "256",
              "--batch-size", "64", "--workers", "0", "--out", tmp_path / "run"]  # fmt: skip
    ptq = cli("quantize", tiny_run, *common)
    assert ptq.returncode == 0, ptq.stderr
    lsq = cli("quantize", tiny_run, *common, "--lsq", "--epochs", "2", "--freeze-bn-after", "1", "--lr", "0.05")
    assert lsq.returncode == 0, lsq.stderr
    before = load_checkpoint(tmp_path / "run/quant/w3a3/quantized.pt")
    after = load_checkpoint(tmp_path / "run/quant/w3a3-lsq/quantized.pt")
    assert after["lsq"] and not before["lsq"]
    point = "layer2_0_relu"
    calibrated = float(before["model"][f"aq_{point}.hi"]) / (2**3 - 1)
    learned = after["model"][f"aq_{point}.step"].item()
    assert abs(learned / calibrated - 1) > 1e-5  # moved far beyond float noise (~1e-7) from its PTQ init
    assert after["model"]["layer2.0.conv1.weight_quantizer.step"].shape == (16,)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run/quant/w3a3-lsq/metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]
    manifest = json.loads((tmp_path / "run/quant/w3a3-lsq/manifest.json").read_text())
    assert {"ptq_top1", "lsq"} <= set(manifest["metrics"])
    for engine in ("ort", "trt"):
        exported = cli("export", tmp_path / "run", "--bits", "w3a3", "--lsq", "--engine", engine)
        assert exported.returncode == 0, exported.stderr
        parity = json.loads((tmp_path / f"run/export/w3a3-lsq-{engine}/parity.json").read_text())
        assert parity["passed"] and parity["top1_agreement"] >= 99
    # LSQ moved the weights of its own copy; the run's FP32 baseline is still the fine-tuned model that torch-fp32 scores
    session = ort.InferenceSession(str(tmp_path / "run/export/fp32/model.onnx"), providers=["CPUExecutionProvider"])
    fine_tuned = load_trained(tiny_run)[0].eval()
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": fmnist_batch.numpy()})[0], fine_tuned(fmnist_batch).numpy(), atol=1e-4)


def test_steps_only_keeps_the_weights_and_their_baseline_needs_the_source(tiny_run: Path, tmp_path: Path, cli: CliRun) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_run, src)
    result = cli("quantize", src, "--bits", "w4a4", "--lsq", "--epochs", "1", "--train-steps-only", "--subset", "128",
                 "--batch-size", "64", "--calib-size", "64", "--calib-dir", tmp_path, "--workers", "0", "--out", tmp_path / "run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    source = load_checkpoint(src / "finetune/best.pt")["model"]
    trained = load_checkpoint(tmp_path / "run/quant/w4a4-lsq/quantized.pt")["model"]
    assert torch.equal(source["layer3.0.conv2.weight"], trained["layer3.0.conv2.weight"])
    # the FP32 baseline is of the model LSQ started from: once that file has changed, there is nothing true to export it from
    (src / "finetune/best.pt").unlink()
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert_user_error(cli("export", tmp_path / "run", "--lsq"), "the FP32 baseline is of the model LSQ started from", "gone or has changed")
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "run").rglob("*") if p.is_file()) == before


@pytest.mark.parametrize("args, needles", [
    (["--lsq"], ["LSQ needs --epochs"]),
    (["--lsq", "--epochs", "0"], ["at least 1"]),
    (["--epochs", "3"], ["apply only to LSQ", "--lsq"]),
    (["--lsq", "--epochs", "1", "--subset", "10", "--batch-size", "64", "--calib-size", "64"], ["needs a training set"]),
])  # fmt: skip
def test_lsq_bad_input(args: list[str], needles: list[str], tiny_run: Path, tmp_path: Path, cli: CliRun) -> None:
    result = cli("quantize", tiny_run, "--calib-dir", tmp_path, "--workers", "0", "--out", tmp_path / "o", *args)
    assert_user_error(result, *needles)
