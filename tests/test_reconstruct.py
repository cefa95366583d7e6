"""Rounding reconstruction (AdaRound, BRECQ, QDrop) and bias correction: the maths, units of every family, the
integers the export writes, bit-identical reruns, and the CLI with its refusals."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CliRun, assert_user_error
from onnx import numpy_helper

from ssql_deploy.models import create_model, list_models, model_spec
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.config import QuantConfig
from ssql_deploy.quant.placement import RUNTIME_BITS, RUNTIME_KINDS, ActPoint, act_quantizers, prepare, weight_quantizers
from ssql_deploy.quant.quantizer import ActQuantizer, QuantConv2d, WeightQuantizer, random_mask
from ssql_deploy.quant.recon.bias_correction import correct_biases
from ssql_deploy.quant.recon.reconstruct import ReconSettings, node_values, reconstruct
from ssql_deploy.quant.recon.units import find_units, unit_module
from ssql_deploy.quant.rounding import AdaRound, mse_weight_scale


def test_adaround_starts_at_the_float_weight_and_hardens_to_floor_or_ceil() -> None:
    torch.manual_seed(0)
    w, scale = torch.randn(4, 3, 3, 3), torch.full((4,), 0.1)
    r = AdaRound(w, scale, (-7, 7))
    soft = r()
    assert torch.allclose(soft * 0.1, w.clamp(-0.7, 0.7), atol=1e-4)  # h(alpha) = the fractional part at the start
    hard = r(hard=True)
    assert torch.equal(hard, torch.clamp(torch.round(w / 0.1), -7, 7))  # alpha >= 0 exactly where the rest is >= 1/2
    assert float(r.regularizer(2.0).detach()) > 0
    with torch.no_grad():
        r.alpha.copy_(torch.where(r.alpha >= 0, 10.0, -10.0))  # h pushed past 0 and 1: the rectified sigmoid clips to exactly 0/1
    assert float(r.regularizer(2.0).detach()) == 0.0 and torch.equal(r(), hard)


def test_the_mse_scale_never_rounds_worse_than_the_ssql_scale() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3) * torch.rand(8, 1, 1, 1)
    w[0, 0, 0, 0] = 6.0  # one outlier channel
    for bits in (2, 3, 4, 8):
        q = WeightQuantizer(bits)
        ssql = q.minmax_scale(w)
        mse = mse_weight_scale(w, q)

        def err(s: torch.Tensor, q: WeightQuantizer = q) -> torch.Tensor:
            per_channel = s.view(-1, 1, 1, 1)
            return ((torch.clamp(torch.round(w / per_channel), *q.qrange) * per_channel - w) ** 2).flatten(1).sum(1)

        assert bool((err(mse) <= err(ssql) + 1e-7).all()) and bool((mse <= ssql).all())


@pytest.mark.parametrize("name", sorted(s.name for s in list_models() if s.name.startswith("test_")))
def test_units_cover_every_quantized_conv_once_and_run_alone(name: str, fmnist_batch: torch.Tensor) -> None:
    gm = prepare(create_model(name, 10, "cifar").eval(), "ssql", QuantConfig.from_bits("w4a4"), model_spec(name))
    convs = [n for n, m in gm.named_modules() if isinstance(m, QuantConv2d)]
    for granularity in ("layer", "block"):
        units = find_units(gm, granularity)
        assert sorted(p for u in units for p in u.layers) == sorted(convs), granularity
    blocks = find_units(gm, "block")
    assert len(blocks) < len(convs)  # blocks, not layers
    # Block after block, each alone computes what the network computes at its output: what lets the
    # reconstruction get a block's inputs by running the block before it, not the network up to it.
    with torch.no_grad():
        x = node_values(gm, blocks[0].entry, fmnist_batch[:8], quantized=True)
        for before, block in zip([None, *blocks], blocks, strict=False):
            assert before is None or block.entry is before.exit, f"{block.name} does not start where {before.name} ends"
            x = unit_module(gm, block).eval()(x)
            assert torch.allclose(x, node_values(gm, block.exit, fmnist_batch[:8], quantized=True), atol=1e-5), block.name


def _calibrated(name: str, images: torch.Tensor, bits: str = "w3a4") -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = prepare(create_model(name, 10, "cifar").eval(), "ssql", QuantConfig.from_bits(bits), model_spec(name))
    calibrate(gm, [images], "mse")
    return gm


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_reconstruction_lowers_each_units_error_and_fixes_integers(method: str, fmnist_batch: torch.Tensor) -> None:
    gm = _calibrated("test_resnet", fmnist_batch)
    report = reconstruct(gm, [fmnist_batch], ReconSettings(method, iters=60))  # type: ignore[arg-type]
    assert all(u["kept"] == (u["error_learned"] <= u["error_nearest"]) for u in report)  # a worse rounding is undone
    assert any(u["kept"] and u["error_learned"] < 0.95 * u["error_nearest"] for u in report), report
    quantizers = weight_quantizers(gm)
    for u in report:
        for layer in u["layers"]:
            wq = quantizers[layer]
            assert wq.rounding is None and (wq.fixed is not None) == u["kept"] and (wq.fixed is None or wq.fixed.dtype == torch.int8)


def test_the_default_step_size_lets_the_rounding_leave_the_nearest_integers(fmnist_batch: torch.Tensor) -> None:
    """The papers' 1e-3 assumes 20,000 steps: over a few hundred, the rounding variables cannot move far enough to flip
    a weight, and the reconstruction is rounding to nearest with extra steps (what it was until this rate followed
    the steps)."""
    assert ReconSettings("brecq", iters=20_000).rounding_lr == 1e-3 and ReconSettings("brecq", iters=500).rounding_lr == 0.02

    def flipped(settings: ReconSettings) -> tuple[int, int]:
        gm = _calibrated("test_resnet", fmnist_batch, "w2a4")
        report = reconstruct(gm, [fmnist_batch], settings)
        moved = 0
        for layer, wq in weight_quantizers(gm).items():
            if wq.fixed is not None:
                weight = gm.get_submodule(layer).weight
                nearest = torch.clamp(torch.round(weight / wq.fixed_scale.view(-1, 1, 1, 1)), *wq.qrange)
                moved += int((nearest != wq.fixed.float()).sum())
        return moved, sum(u["kept"] for u in report)

    (moved, kept), (moved_paper, kept_paper) = flipped(ReconSettings("brecq", iters=60)), flipped(ReconSettings("brecq", iters=60, lr=1e-3))
    assert moved > 20 * max(moved_paper, 1) and kept > kept_paper, (moved, moved_paper, kept, kept_paper)


@pytest.mark.parametrize("prob", [0.5, 0.25, 0.125, 0.9])  # 1, 2, 4 and 8 random bits a position
def test_the_qdrop_mask_keeps_its_share_at_random_and_repeats_under_a_seed(prob: float) -> None:
    shape = (32, 24, 9, 7)  # an element count that is not a multiple of the positions a random word gives
    masks = [random_mask(shape, prob, torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert masks[0].shape == shape and masks[0].dtype == torch.float32
    assert set(masks[0].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert abs(float(masks[0].mean()) - prob) < 0.01
    by_channel = masks[0].mean(dim=(0, 2, 3))  # no channel or position left out: every byte is random
    assert float(by_channel.min()) > prob - 0.06 and float(by_channel.max()) < prob + 0.06
    flat = masks[0].flatten()  # neighbours, whose bits share a random byte, are independent
    assert abs(float((flat[1:] == flat[:-1]).float().mean()) - (prob**2 + (1 - prob) ** 2)) < 0.01
    assert float(random_mask(shape, 0.0, None).sum()) == 0 and float(random_mask(shape, 1.0, None).min()) == 1


def test_same_seed_images_and_settings_give_bit_identical_integers(fmnist_batch: torch.Tensor) -> None:
    runs = []
    for _ in range(2):
        gm = _calibrated("test_resnet", fmnist_batch)
        reconstruct(gm, [fmnist_batch], ReconSettings("qdrop", iters=25, seed=3))
        runs.append({k: (wq.fixed.clone() if wq.fixed is not None else None) for k, wq in weight_quantizers(gm).items()})
    assert runs[0].keys() == runs[1].keys()
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(runs[0].values(), runs[1].values(), strict=True))


def test_bias_correction_removes_the_mean_output_shift(fmnist_batch: torch.Tensor) -> None:
    gm = _calibrated("test_resnet", fmnist_batch, "w2a8")
    conv_node = next(n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == "layer1.0.conv2")
    conv = gm.get_submodule("layer1.0.conv2")

    def shift() -> torch.Tensor:
        x = node_values(gm, conv_node.args[0], fmnist_batch, quantized=True)
        with torch.no_grad():
            error = torch.nn.functional.conv2d(x, conv.weight_quantizer(conv.weight) - conv.weight, None, conv.stride, conv.padding)
        return error.mean(dim=(0, 2, 3)) + (conv.bias_correction if conv.bias_correction is not None else 0)

    before = shift().abs().max()
    correct_biases(gm, [fmnist_batch])
    assert before > 1e-3 and shift().abs().max() < 1e-5 * max(1.0, float(before))


def _onnx_weights(path: Path, conv: str) -> np.ndarray:
    """A conv's integer weights as the ONNX file stores them, less their zero-point (-1 where the QGEMM kernel is chosen)."""
    init = {i.name: numpy_helper.to_array(i).astype(np.int16) for i in onnx.load(str(path)).graph.initializer}
    base = conv.replace(".", "_")
    return init[f"{base}_weight_int"] - init[f"{base}_weight_zero_point"].reshape(-1, 1, 1, 1)


def test_cli_reconstructs_exports_the_learned_integers_and_refuses_bad_input(tiny_run: Path, tmp_path: Path, cli: CliRun) -> None:
    common = ["--calib-size", "64", "--calib-dir", tmp_path / "calib", "--subset", "128", "--workers", "0", "--out", tmp_path / "run"]
    q = cli(
        "quantize",
        tiny_run,
        "--bits",
        "w3a4",
        "--reconstruct",
        "brecq",
        "--iters",
        "40",
        "--recon-size",
        "96",
        "--bias-correction",
        *common,
    )
    assert q.returncode == 0, q.stderr
    assert "brecq: squared output error per unit" in q.stdout and "learned rounding" in q.stdout
    run = tmp_path / "run"
    manifest = json.loads((run / "quant/w3a4-brecq-bc/manifest.json").read_text())
    assert manifest["metrics"]["reconstruction"]["method"] == "brecq" and manifest["inputs"]["recon_manifest"]["sha256"]
    saved = torch.load(run / "quant/w3a4-brecq-bc/quantized.pt", weights_only=True)
    for engine in ("ort", "trt"):
        e = cli("export", run, "--bits", "w3a4-brecq-bc", "--engine", engine)
        assert e.returncode == 0, e.stderr
    kept = [layer for u in manifest["metrics"]["reconstruction"]["units"] if u["kept"] for layer in u["layers"]]
    assert kept, manifest["metrics"]["reconstruction"]
    for layer in kept:
        fixed = saved["model"][f"{layer}.weight_quantizer.fixed"].numpy().astype(np.int16)
        assert np.array_equal(_onnx_weights(run / "export/w3a4-brecq-bc-trt/model.qdq.onnx", layer), fixed)  # no folding in trt
        ort = _onnx_weights(run / "export/w3a4-brecq-bc-ort/model.qdq.onnx", layer)
        assert np.array_equal(np.abs(ort), np.abs(fixed))  # folded BatchNorm: a channel's integers may change sign, never magnitude

    for args, needles in (
        (["--reconstruct", "brecq", "--iters", "0"], ["--iters", "0"]),
        (["--reconstruct", "brecq", "--recon-size", "16"], ["at least 64 images", "--recon-size"]),
        (["--reconstruct", "brecq", "--layer-bits", "*=float"], ["no quantized layer"]),
        (["--reconstruct", "brecq", "--lsq", "--epochs", "1"], ["--lsq", "--reconstruct"]),
        (["--iters", "10"], ["--iters", "--reconstruct"]),
    ):
        before = sorted(p.relative_to(run) for p in run.rglob("*"))
        result = cli("quantize", tiny_run, "--bits", "w4a4", *args, "--calib-dir", tmp_path / "calib", "--workers", "0", "--out", run)
        assert_user_error(result, *needles)
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    wrong = cli("quantize", tiny_run, "--reconstruct", "gptq", "--out", run)
    assert wrong.returncode == 2 and "gptq" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_model_missing_a_saved_point_is_refused_not_calibrated_afresh(tmp_path: Path, fmnist_batch: torch.Tensor) -> None:
    """A point the quantized model should hold but does not (a file from a version that named it otherwise) would be
    calibrated afresh at export, throwing away its range or learned step: loading it in any layout refuses instead."""
    from ssql_deploy.data import DataSource
    from ssql_deploy.errors import UserError
    from ssql_deploy.models.checkpoint import load_checkpoint
    from ssql_deploy.models.trained import ModelMeta
    from ssql_deploy.quant.artifact import from_payload, save_quantized
    from ssql_deploy.quant.placement import quantizer_name

    gm = _calibrated("test_mobilenet_v2", fmnist_batch)
    meta = ModelMeta.for_data("test_mobilenet_v2", "cifar", 10, DataSource.of("fashion-mnist", None, 32))
    save_quantized(tmp_path / "q.pt", gm, meta, "w3a4", False, {"calibration": {}})
    obj = load_checkpoint(tmp_path / "q.pt")
    bottleneck = next(p for p, point in gm.quant_points.items() if point.kind == "conv_input")  # type: ignore[attr-defined]
    del obj["points"][bottleneck]
    obj["model"] = {k: v for k, v in obj["model"].items() if not k.startswith(quantizer_name(bottleneck) + ".")}
    for layout in ("ort", "trt"):
        with pytest.raises(UserError, match=bottleneck):
            from_payload(obj, layout)  # type: ignore[arg-type]


def _grid(q: ActQuantizer) -> tuple[float, int, int, int]:
    p = q.qparams()
    return float(p.scale), int(p.zero_point), p.qmin, p.qmax


@pytest.mark.parametrize("name", sorted(s.name for s in list_models() if s.name.startswith("test_")))
def test_every_family_reconstructs_and_exports_its_integers_in_every_layout(name: str, tmp_path: Path, fmnist_batch: torch.Tensor) -> None:
    """Reconstructed and bias-corrected in the SSQL layout, saved, reloaded in the ort and trt layouts (BatchNorm folded or
    not), exported: ONNX Runtime computes what the PyTorch model of that layout computes. Every saved point keeps its
    width and range in every layout (a point after a folded BatchNorm too); only the runtime's 8-bit additions are new."""
    from ssql_deploy.data import DataSource
    from ssql_deploy.export.onnx_graph import build_onnx
    from ssql_deploy.export.parity import check_parity
    from ssql_deploy.models.trained import ModelMeta
    from ssql_deploy.quant.artifact import load_quantized, save_quantized

    gm = _calibrated(name, fmnist_batch)
    reconstruct(gm, [fmnist_batch], ReconSettings("brecq", iters=8))
    correct_biases(gm, [fmnist_batch])
    meta = ModelMeta.for_data(name, "cifar", 10, DataSource.of("fashion-mnist", None, 32))
    save_quantized(tmp_path / "q.pt", gm, meta, "w3a4-brecq-bc", False, {"calibration": {}})
    saved = act_quantizers(gm)
    for layout in ("ssql", "ort", "trt"):
        loaded = load_quantized(tmp_path / "q.pt", layout=layout)  # type: ignore[arg-type]
        points: dict[str, ActPoint] = loaded.gm.quant_points  # type: ignore[assignment]
        assert set(saved) <= set(points), (layout, sorted(set(saved) - set(points)))
        assert all(points[p].kind in RUNTIME_KINDS and points[p].bits == RUNTIME_BITS for p in loaded.uncalibrated), layout
        restored = act_quantizers(loaded.gm)
        for point, q in saved.items():  # the same grid, unless TensorRT re-expresses an 8-bit unsigned one as int8
            assert restored[point].bits == q.bits, (layout, point)
            if restored[point].signed == q.signed:
                assert _grid(restored[point]) == _grid(q), (layout, point)
        calibrate(loaded.gm, [fmnist_batch], "mse", points=sorted(loaded.uncalibrated))
        with torch.no_grad():
            if layout == "ssql":
                assert torch.equal(loaded.gm(fmnist_batch[:8]), gm(fmnist_batch[:8]))
                continue
        parity = check_parity(loaded.gm, build_onnx(loaded.gm, (3, 32, 32), layout), [fmnist_batch])  # type: ignore[arg-type]
        assert parity["passed"], (layout, parity["problems"])
