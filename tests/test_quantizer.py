"""Quantizers, bit specs and calibrators on real activations (Fashion-MNIST through a trained tiny net)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssql_deploy.data import DataSource
from ssql_deploy.errors import UserError
from ssql_deploy.models.trained import load_trained
from ssql_deploy.quant.bits import BitSpec
from ssql_deploy.quant.calib_set import load_calibration
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.calibrators import CALIBRATORS, NonFiniteActivation, make_calibrator
from ssql_deploy.quant.placement import act_quantizers, prepare
from ssql_deploy.quant.quantizer import ActQuantizer, WeightQuantizer, fake_quant


@pytest.mark.parametrize("text, w, a", [("w4a4", 4, 4), ("W2A8", 2, 8), ("8", 8, 8), (" w3a5 ", 3, 5)])
def test_bit_spec_parses(text: str, w: int, a: int) -> None:
    assert BitSpec.parse(text) == BitSpec(w, a)
    assert str(BitSpec.parse(text)) == f"w{w}a{a}"


@pytest.mark.parametrize("text, needle", [("w9a4", "outside 2..8"), ("w1a8", "outside 2..8"), ("1", "outside"),
                                          ("w4", "malformed"), ("int8", "malformed"), ("", "malformed")])  # fmt: skip
def test_bad_bit_specs(text: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        BitSpec.parse(text)


def test_weight_quantizer_uses_the_ssql_scale_on_a_narrow_symmetric_grid() -> None:
    w = torch.randn(8, 4, 3, 3)
    for bits in range(2, 9):
        q = WeightQuantizer(bits)
        scale = w.abs().flatten(1).amax(1) / ((2**bits - 1) / 2)
        assert torch.allclose(q.scale(w), scale)
        ints = q.integers(w)
        assert ints.min() >= -(2 ** (bits - 1) - 1) and ints.max() <= 2 ** (bits - 1) - 1
        assert torch.allclose(q(w), ints * scale.view(-1, 1, 1, 1), atol=1e-6)


def test_activation_quantizer_grids_and_straight_through_gradient() -> None:
    q = ActQuantizer(4, signed=False)
    q.set_range(0.0, 3.0)
    q.enabled = True
    p = q.qparams()
    assert float(p.scale) == pytest.approx(0.2) and int(p.zero_point) == 0 and (p.qmin, p.qmax) == (0, 15)
    x = torch.tensor([-1.0, 0.29, 1.0, 2.95, 5.0], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.2, 1.0, 3.0, 3.0]))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # STE inside the range, zero outside
    s = ActQuantizer(8, signed=True)
    s.set_range(-1.0, 2.54)
    assert float(s.qparams().scale) == pytest.approx(0.02) and int(s.qparams().zero_point) == 0
    asym = ActQuantizer(8, signed=False)
    asym.set_range(-1.0, 1.55)
    assert int(asym.qparams().zero_point) == 100  # zero is exactly representable


@pytest.fixture(scope="module")
def activations(tiny_run: Path, fmnist_root: Path) -> dict[str, torch.Tensor]:
    """Real post-ReLU and residual-branch activations of a trained model on Fashion-MNIST."""
    model, meta, _ = load_trained(tiny_run)
    batches, _ = load_calibration(meta.source(), 64, tiny_run / "calib")
    gm = prepare(model.eval(), "ort", BitSpec(8, 8))
    seen: dict[str, list[torch.Tensor]] = {}
    for name, q in act_quantizers(gm).items():
        q.register_forward_hook(lambda _m, i, _o, name=name: seen.setdefault(name, []).append(i[0].detach()))
    with torch.no_grad():
        for x in batches:
            gm(x)
    return {k: torch.cat(v) for k, v in seen.items()}


def test_straight_through_window_is_the_rounding_rule(activations: dict[str, torch.Tensor]) -> None:
    """The backward's window test equals "round(x / s) + zp lands in [qmin, qmax]", per tensor and per channel,
    and the fused ReLU equals a ReLU followed by the quantizer, in value and gradient."""
    branch = activations["layer2_0_bn2"]  # a real pre-ReLU tensor: both signs, long tails
    grad_out = torch.randn_like(branch)
    scale, zero = branch.abs().max() / 40, torch.tensor(9.0)
    for zp, (qmin, qmax) in ((None, (-8, 7)), (zero, (0, 15)), (None, (0, 255))):
        x = branch.clone().requires_grad_()
        y = fake_quant(x, scale, zp, qmin, qmax)
        y.backward(grad_out)
        q = torch.round(branch * scale.reciprocal()) + (0 if zp is None else zp)
        assert torch.equal(y.detach(), (q.clamp(qmin, qmax) - (0 if zp is None else zp)) * scale)
        assert torch.equal(x.grad, torch.where((q >= qmin) & (q <= qmax), grad_out, 0.0))
        assert 0 < int((x.grad == 0).sum()) < x.numel()  # both sides of the window are exercised
    fused = branch.clone().requires_grad_()
    plain = branch.clone().requires_grad_()
    y_fused = fake_quant(fused, scale, None, 0, 15, relu=True)
    y_plain = fake_quant(torch.relu(plain), scale, None, 0, 15)
    (y_fused * grad_out).sum().backward()
    (y_plain * grad_out).sum().backward()
    assert torch.equal(y_fused, y_plain) and torch.equal(fused.grad, plain.grad)
    with pytest.raises(ValueError, match="zero-point 0"):
        fake_quant(branch, scale, zero, 0, 15, relu=True)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    wq = WeightQuantizer(3)
    wq(w).backward(torch.ones_like(w))
    ints = torch.round(w.detach() * wq.scale(w).view(-1, 1, 1, 1).reciprocal())
    assert torch.equal(w.grad, (ints.abs() <= 3).float())


@pytest.mark.parametrize("name", CALIBRATORS)
def test_calibrators_on_real_activations(name: str, activations: dict[str, torch.Tensor]) -> None:
    relu, branch = activations["layer2_0_relu"], activations["layer2_0_bn2"]  # bn2 folded into conv2; the point keeps its name
    for x, signed in ((relu, False), (branch, False), (branch, True)):
        cal = make_calibrator(name)
        for part in x.split(16):
            cal.collect(part)
        lo, hi = cal.compute_range(4, signed)
        assert float(x.min()) - 1e-6 <= lo <= 0.0 <= hi <= float(x.abs().max()) + 1e-6
        if not signed and x.min() >= 0:
            assert lo == 0.0
        if name == "minmax" and not signed:
            assert (lo, hi) == pytest.approx((min(float(x.min()), 0.0), float(x.max())))
        cal.reset()
        assert cal.count == 0


def test_clipping_calibrators_beat_minmax_where_outliers_dominate(activations: dict[str, torch.Tensor]) -> None:
    x = activations["layer3_0_relu"]
    errors = {}
    for name in CALIBRATORS:
        cal = make_calibrator(name)
        cal.collect(x)
        q = ActQuantizer(3, signed=False)
        q.set_range(*cal.compute_range(3, False))
        q.enabled = True
        errors[name] = float(((q(x) - x) ** 2).mean())
    assert errors["mse"] <= min(errors.values()) + 1e-9  # it minimises exactly this (up to binning)
    assert errors["mse"] < errors["minmax"]


def test_non_finite_activations_are_refused() -> None:
    cal = make_calibrator("entropy")
    cal.name = "layer1_0_relu"
    with pytest.raises(NonFiniteActivation, match="layer1_0_relu"):
        cal.collect(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="seen no data"):
        make_calibrator("minmax").compute_range(8, False)


def test_calibrate_rejects_small_sets_and_nan_checkpoints(tiny_run: Path) -> None:
    model, _, _ = load_trained(tiny_run)
    gm = prepare(model.eval(), "ssql", BitSpec(4, 4))
    images = torch.randn(8, 3, 32, 32)
    with pytest.raises(UserError, match="has 8 images"):
        calibrate(gm, [images], "minmax")
    with pytest.raises(UserError, match="images contain NaN"):
        calibrate(gm, [torch.full((40, 3, 32, 32), float("nan"))], "minmax")
    model.layer1[0].conv1.weight.data.fill_(float("inf"))
    with pytest.raises(UserError, match="NaN or inf activations at layer1_0_relu"):
        calibrate(prepare(model.eval(), "ssql", BitSpec(4, 4)), [torch.randn(40, 3, 32, 32)], "percentile")


def test_calibration_manifest_is_deterministic_and_guards_the_data(tiny_run: Path, tmp_path: Path) -> None:
    a, path = load_calibration(DataSource.of("fashion-mnist", None), 40, tmp_path)
    b, _ = load_calibration(DataSource.of("fashion-mnist", None), 40, tmp_path)
    assert torch.equal(torch.cat(a), torch.cat(b)) and sum(len(x) for x in a) == 40
    manifest = json.loads(path.read_text())
    assert manifest["dataset"] == "fashion-mnist" and len(np.unique(manifest["indices"])) == 40
    path.write_text(path.read_text().replace(manifest["sha256"][3], "0" * 64))
    with pytest.raises(UserError, match="differs from calibration manifest"):
        load_calibration(DataSource.of("fashion-mnist", None), 40, tmp_path)
    with pytest.raises(UserError, match="must be positive"):
        load_calibration(DataSource.of("fashion-mnist", None), 0, tmp_path)
