"""Every model family through the chain: placement by operator, export for each runtime, and the CLI end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliRun, write_image_tree
from torch import nn

from ssql_deploy.errors import UserError
from ssql_deploy.export.onnx_graph import build_onnx
from ssql_deploy.export.ort_session import HEAD_WHY, integer_conv_report, optimized_op_counts
from ssql_deploy.export.parity import check_parity, first_departure
from ssql_deploy.export.trt_rules import check_trt_qdq
from ssql_deploy.models import create_model, list_models, model_spec
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.config import QuantConfig
from ssql_deploy.quant.gates import GatedActivation, saturation_bound
from ssql_deploy.quant.placement import prepare
from ssql_deploy.quant.quantizer import fake_quant

TINY = sorted(s.name for s in list_models() if s.name.startswith("test_"))


def _prepared(name: str, layout: str, bits: str, images: torch.Tensor) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = create_model(name, 10, "cifar").eval()
    gm = prepare(model, layout, QuantConfig.from_bits(bits), model_spec(name))  # type: ignore[arg-type]
    calibrate(gm, [images], "minmax")
    return gm


@pytest.mark.parametrize("bits", ["w8a8", "w4a4"])
@pytest.mark.parametrize("name", TINY)
def test_ort_runs_every_conv_as_an_integer_kernel_and_matches_pytorch(name: str, bits: str, fmnist_batch: torch.Tensor) -> None:
    gm = _prepared(name, "ort", bits, fmnist_batch)
    model = build_onnx(gm, (3, 32, 32), "ort")
    report = integer_conv_report(model)
    assert report["convs"] > 0 and report["integer_convs"] == report["convs"] and report["float_convs"] == 0, report
    # SiLU, Hardswish and the squeeze-excite gates run on integers (quant/gates.py): only the float head stays float
    assert all(info["why"] == HEAD_WHY for info in report["float_ops"].values()), report["float_ops"]
    parity = check_parity(gm, model, [fmnist_batch])
    assert parity["passed"], parity["problems"]


@pytest.mark.parametrize("activation", [nn.SiLU(), nn.Hardswish()])
def test_a_gated_activation_costs_at_most_half_a_gate_step_of_x(activation: nn.Module) -> None:
    x = torch.linspace(-8, 8, 20001)
    gated = GatedActivation(activation)(x)
    error = (gated - activation(x)).abs()
    assert bool((error <= x.abs() / 510 + 1e-6).all()) and float(error.max()) > 0  # rounded, within |x| / 510


@pytest.mark.parametrize("gate, bits", [(nn.Sigmoid(), 8), (nn.Sigmoid(), 4), (nn.Hardsigmoid(), 8)])
def test_a_gate_input_range_stops_where_the_gate_saturates_on_its_own_grid(gate: nn.Module, bits: int) -> None:
    qmax = 2**bits - 1
    on_grid = lambda v: fake_quant(gate(v), torch.tensor(1.0 / qmax), None, 0, qmax)  # noqa: E731
    x = torch.linspace(-60, 60, 120001)
    end = saturation_bound(gate, bits) * (1 - 1 / 255)  # an 8-bit input grid with a zero-point ends up to half a step short
    assert torch.equal(on_grid(x), on_grid(x.clamp(-end, end)))  # nothing the gate tells apart is lost
    assert not torch.equal(on_grid(x), on_grid(x.clamp(-0.9 * end, 0.9 * end)))  # and the bound is tight


def test_a_squeeze_excite_gate_input_is_calibrated_only_as_far_as_the_gate_saturates(fmnist_batch: torch.Tensor) -> None:
    for name, gate in (("test_efficientnet", nn.Sigmoid()), ("test_mobilenet_v3", nn.Hardsigmoid())):
        gm = _prepared(name, "ort", "w8a8", fmnist_batch)
        modules = dict(gm.named_modules())
        bounded = {n: q for n, q in modules.items() if getattr(q, "saturation", None) is not None}
        assert bounded and all(q.saturation == saturation_bound(gate, 8) for q in bounded.values()), name
        for q in bounded.values():
            q.set_range(-1e3, 1e3)  # what a calibrator finds before a saturating gate: far past where it saturates
            assert (float(q.lo), float(q.hi)) == pytest.approx((-q.saturation, q.saturation)), name


def test_parity_judges_each_layer_given_the_same_inputs_not_the_drift_it_inherits() -> None:
    row = lambda free, local: {"max_steps": 1.0, "mismatch_fraction": free, "local_mismatch_fraction": local}  # noqa: E731
    # a squeeze-excite's pooled vector and the layers after a flipped value drift far past ties; alone, they do not
    layers = {"conv": row(1e-5, 1e-5), "se_fc1": row(0.3, 0.0), "se_fc2": row(0.2, 1e-3), "layer3": row(0.0178, 0.0)}
    assert first_departure(layers) is None
    assert first_departure({**layers, "project": row(0.02, 0.02)}) == "project"


@pytest.mark.parametrize("name", TINY)
def test_trt_layout_passes_tensorrts_rules_and_matches_pytorch(name: str, fmnist_batch: torch.Tensor) -> None:
    gm = _prepared(name, "trt", "w4a8", fmnist_batch)
    model = build_onnx(gm, (3, 32, 32), "trt")
    assert [str(v) for v in check_trt_qdq(model)] == []
    assert check_parity(gm, model, [fmnist_batch])["passed"]


def test_placement_by_operator_on_inverted_residuals_and_squeeze_excite(fmnist_batch: torch.Tensor) -> None:
    # MobileNetV2: the residual Add has no ReLU after it, so its sum is signed: quantized with a zero-point before the next conv.
    gm = _prepared("test_mobilenet_v2", "ort", "w4a4", fmnist_batch)
    adds = [p for p in gm.quant_points.values() if p.node.startswith("add")]
    assert adds and all(not p.nonnegative and p.kind == "conv_input" for p in adds)
    assert optimized_op_counts(build_onnx(gm, (3, 32, 32), "ort"))["QLinearAdd"] == len(adds)  # ORT: every Add on the integer grid
    trt = {p.kind for p in _prepared("test_mobilenet_v2", "trt", "w4a4", fmnist_batch).quant_points.values()}
    assert "branch" not in trt  # TensorRT: the conv branch of an Add stays unquantized, so the conv fuses with the Add
    # MobileNetV3: Hardswish after a conv gets an 8-bit quantizer on the conv output (ORT cannot fuse it into the conv),
    # the squeeze-excite gate (Hardsigmoid) is quantized unsigned, and every ReLU6/ReLU/Hardswish output is quantized.
    v3 = _prepared("test_mobilenet_v3", "ort", "w4a4", fmnist_batch)
    kinds = {p.kind for p in v3.quant_points.values()}
    modules = dict(v3.named_modules())
    gates = [p for p in v3.quant_points.values() if isinstance(modules.get(p.layer), nn.Hardsigmoid)]
    assert "preactivation" in kinds and gates and all(p.nonnegative and p.bits == 4 for p in gates)


class _Unplaceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm([8, 30, 30])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.max(self.norm(self.conv(x)), dim=1).values.mean((1, 2))


def test_an_operator_nobody_can_place_is_named_with_its_node() -> None:
    with pytest.raises(UserError, match=r"does not know operator LayerNorm \(node norm"):
        prepare(_Unplaceable(), "ort", QuantConfig.from_bits("w8a8"))


FAMILY_PIPELINE = """
kind: pipeline
out: {out}
finetune: {{arch: {arch}, subset: 512, epochs: 1, batch_size: 64, lr: 0.05, workers: 0}}
quantize: [{{bits: w4a4, calib_size: 64, subset: 256}}, {{bits: w4a4, calib_size: 64, subset: 128, lsq: true, epochs: 1, batch_size: 64}}]
export: {{engines: [ort, trt]}}
bench: {{subset: 128, batch_sizes: [1]}}
"""


@pytest.mark.parametrize("name", TINY)
def test_each_family_end_to_end_from_the_cli(name: str, tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    """finetune -> quantize (PTQ and LSQ) -> export for ort and trt -> bench, in one `ssql-deploy run`: one process start
    per family, not seven (each pays torch's imports); every stage's own command is run one by one in test_export."""
    run = tmp_path / "run"
    (tmp_path / "family.yaml").write_text(FAMILY_PIPELINE.format(out=run, arch=name))
    result = cli("run", tmp_path / "family.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for variant in ("w4a4", "w4a4-lsq"):
        ort = json.loads((run / f"export/{variant}-ort/manifest.json").read_text())["metrics"]["check"]
        assert ort["integer_convs"] == ort["convs"] > 0, variant
        trt = json.loads((run / f"export/{variant}-trt/manifest.json").read_text())["metrics"]["check"]
        assert trt["trt_rule_violations"] == [], variant
        assert json.loads((run / f"export/{variant}-ort/parity.json").read_text())["passed"], variant
    rows = {r["name"]: r for r in json.loads((run / "bench/report.json").read_text())["rows"]}
    for row in ("torch-fp32", "onnx-fp32", "torch-w4a4", "qdq-ort-w4a4", "qdq-trt-w4a4", "qdq-ort-w4a4-lsq"):
        assert rows[row]["status"] == "ok" and rows[row]["n_images"] == 128, (row, rows[row])
    assert rows["onnx-fp32"]["agreement"] == 100.0 and rows["qdq-ort-w4a4"]["agreement"] >= 99
    assert rows["trt-w4a4"]["status"].startswith("skipped")  # no GPU here
    assert np.isfinite(rows["qdq-ort-w4a4"]["latency"]["1"]["p50_ms"])
    # signed activations on a zero-point grid (linear bottlenecks) keep their calibrated ranges under LSQ
    kept = json.loads((run / "quant/w4a4-lsq/manifest.json").read_text())["metrics"]["lsq"]["calibrated_ranges_kept"]
    assert (len(kept) > 0) == (name in ("test_efficientnet", "test_mobilenet_v2", "test_mobilenet_v3")), kept


def test_a_mobile_family_on_full_size_images_as_users_write_it(tmp_path: Path, fmnist_root: Path, cli: CliRun) -> None:
    """`finetune --arch ... --data imagefolder --data-root DIR` with no size flags: 224 px, the full-size variant, as for
    Flowers-102 or any ImageFolder tree a user points at (Flowers' own files are checksummed, so none can be made here)."""
    tree = tmp_path / "tree"
    write_image_tree(tree, fmnist_root, 3, 8)
    run = tmp_path / "run"
    ft = cli("finetune", "--arch", "test_mobilenet_v3", "--data", "imagefolder", "--data-root", tree, "--epochs", "1", "--batch-size", "8",
             "--workers", "0", "--out", run)  # fmt: skip
    assert ft.returncode == 0, ft.stderr
    meta = json.loads((run / "finetune/manifest.json").read_text())["settings"]["resolved_model"]
    assert (meta["input_size"], meta["stem"], meta["num_classes"]) == (224, "imagenet", 3)
