"""`ssql-deploy analyze`: per-layer sensitivity on held-out training images, on a real trained run."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import CliRun, assert_user_error
from onnx import numpy_helper

from ssql_deploy.analyze.allocate import Budget, monotone_costs, solve, totals
from ssql_deploy.analyze.sensitivity import Settings, Validation, hutchinson_traces, measure
from ssql_deploy.data import DataSource
from ssql_deploy.export.onnx_graph import INPUT_NAME
from ssql_deploy.export.ort_session import make_session
from ssql_deploy.models import model_spec
from ssql_deploy.models.trained import load_trained
from ssql_deploy.quant.calib_set import load_calibration, load_validation
from ssql_deploy.quant.config import QuantConfig
from ssql_deploy.quant.placement import act_quantizers, prepare, weight_quantizers


def test_validation_images_are_labelled_and_apart_from_every_calibration_set(tmp_path: Path, fmnist_root: Path) -> None:
    source = DataSource.of("fashion-mnist", fmnist_root, 32)
    _, calib_path = load_calibration(source, 300, tmp_path)
    images, labels, val_path = load_validation(source, 200, 300, tmp_path)
    calib_idx = set(json.loads(calib_path.read_text())["indices"])
    val_idx = json.loads(val_path.read_text())["indices"]
    assert len(val_idx) == 200 and not calib_idx & set(val_idx)
    raw = source.split("train", transform=None)
    assert labels.tolist() == [raw[i][1] for i in val_idx] and images.shape == (200, 3, 32, 32)


@pytest.fixture(scope="module")
def twin(tiny_run: Path, fmnist_root: Path) -> tuple[torch.fx.GraphModule, Validation, list[torch.Tensor]]:
    model, meta, _ = load_trained(tiny_run)
    gm = prepare(model.eval(), "ssql", QuantConfig(w=8, a=8), model_spec(meta.arch))
    source = meta.source(None, fmnist_root)
    calib, _ = load_calibration(source, 64, tiny_run.parent / "calib-analyze")
    images, labels, _ = load_validation(source, 128, 64, tiny_run.parent / "calib-analyze")
    return gm, Validation(images, labels), calib


def test_each_quantizer_is_measured_alone_and_low_widths_cost_more(twin: tuple) -> None:
    gm, val, calib = twin
    result = measure(gm, val, calib, Settings((2, 8), "loss", "percentile", 99.99))
    assert [r["layer"] for r in result["weights"]] == list(weight_quantizers(gm))
    assert [r["point"] for r in result["activations"]] == list(act_quantizers(gm))
    rows = result["weights"] + result["activations"]
    assert sum(r["loss"]["2"] for r in rows) > 10 * sum(abs(r["loss"]["8"]) for r in rows)
    assert all(r["sensitivity"] == r["loss"] for r in rows)
    # one row recomputed by hand: only that conv's weights quantized at 2 bits, everything else float
    layer = result["weights"][1]["layer"]
    for q in act_quantizers(gm).values():
        q.enabled = False
    for name, w in weight_quantizers(gm).items():
        w.enabled, w.bits = name == layer, 2
    with torch.no_grad():
        loss = float(F.cross_entropy(gm(val.images), val.labels))
    assert loss - result["float"]["loss"] == pytest.approx(result["weights"][1]["loss"]["2"], abs=1e-4)


def test_hutchinson_trace_matches_the_exact_hessian_trace(twin: tuple) -> None:
    gm, val, _ = twin
    name = min(weight_quantizers(gm), key=lambda n: gm.get_submodule(n).weight.numel())
    conv = gm.get_submodule(name)
    x, y = val.images[:16], val.labels[:16]
    estimate = hutchinson_traces(gm, {name: conv}, Validation(x, y), samples=300, seed=0)[name]
    (grad,) = torch.autograd.grad(F.cross_entropy(gm(x), y), conv.weight, create_graph=True)
    flat = grad.reshape(-1)
    exact = sum(float(torch.autograd.grad(flat[i], conv.weight, retain_graph=True)[0].reshape(-1)[i]) for i in range(flat.numel()))
    assert estimate == pytest.approx(exact, rel=0.15)


def test_analyze_from_the_cli_writes_json_heatmap_and_manifest(tiny_run: Path, tmp_path: Path, cli: CliRun) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    calib = ["--calib-size", "64", "--val-size", "128", "--calib-dir", tmp_path / "calib", "--workers", "0"]
    result = cli("analyze", run, "--bits", "3,8", "--metric", "hessian", "--hutchinson-samples", "4", *calib)
    assert result.returncode == 0, result.stderr
    assert "most sensitive" in result.stdout and "evaluations" in result.stdout
    found = json.loads((run / "analyze/sensitivity.json").read_text())
    assert found["metric"] == "hessian" and found["bits"] == [3, 8]
    assert all(r["hessian"]["3"] > r["hessian"]["8"] >= 0 for r in found["weights"])
    assert (run / "analyze/sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "analyze/manifest.json").read_text())["stage"] == "analyze"
    before = {p: p.read_bytes() for p in (run / "analyze").iterdir()}
    for bad, needle in ((["--bits", "1,8"], "outside 2..8"), (["--val-size", "59990"], "overlap")):
        assert_user_error(cli("analyze", run, *calib[:2], *bad, *calib[4:]), needle)
    assert before == {p: p.read_bytes() for p in (run / "analyze").iterdir()}


@pytest.fixture(scope="module")
def analysed(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, cli: CliRun) -> Path:
    run = tmp_path_factory.mktemp("analysed") / "run"
    shutil.copytree(tiny_run, run)
    result = cli("analyze", run, "--bits", "2,4,8", "--calib-size", "64", "--val-size", "128", "--calib-dir", run.parent / "calib",
                 "--workers", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return run


def _cost(rows: list[dict], bits: list[int], analysed: list[int]) -> float:
    """What the planner minimises: each quantizer's monotone cost at its width, activation points of one module
    (one width in a config) summed before the envelope is taken, as the planner groups them."""
    groups: dict[str, tuple[dict[str, float], int]] = {}
    for r, b in zip(rows, bits, strict=True):
        summed, _ = groups.get(r["layer"], ({}, b))
        groups[r["layer"]] = ({k: summed.get(k, 0.0) + v for k, v in r["sensitivity"].items()}, b)
    return sum(monotone_costs(sensitivity, [b], analysed)[0] for sensitivity, b in groups.values())


@pytest.mark.parametrize("budget", ["avg-wbits=5", "avg-wbits=4,avg-abits=6", "size-mb=0.03", "bops=0.1"])
def test_the_plan_meets_its_budget_and_beats_every_uniform_plan_that_does(analysed: Path, budget: str) -> None:
    sensitivity = json.loads((analysed / "analyze/sensitivity.json").read_text())
    found = solve(sensitivity, Budget.parse(budget), model_spec("test_resnet").stem)
    weights, acts = sensitivity["weights"], sensitivity["activations"]
    resolved = prepare(load_trained(analysed)[0].eval(), "ssql", found["config"], model_spec("test_resnet"))
    w_bits = [resolved.quant_weights[r["layer"]] for r in weights]
    a_bits = [resolved.quant_points[r["point"]].bits for r in acts]
    reached = totals(weights, acts, w_bits, a_bits)  # what the config actually gives the model, not what the solver says
    by_name = {a["point"]: b for a, b in zip(acts, a_bits, strict=True)}
    bops = sum(r["macs"] * w * (by_name[r["input_point"]] if r["input_point"] else 8) / 1e9 for r, w in zip(weights, w_bits, strict=True))
    limits = Budget.parse(budget).limits
    assert reached["avg_wbits"] <= limits.get("avg-wbits", 8) + 1e-9 and reached["size_mb"] <= limits.get("size-mb", 1e9) + 1e-9
    assert reached["avg_abits"] <= limits.get("avg-abits", 8) + 1e-9 and bops <= limits.get("bops", 1e9) + 1e-9
    analysed = sensitivity["bits"]
    objective = _cost(weights, w_bits, analysed) + _cost(acts, a_bits, analysed)
    assert objective == pytest.approx(found["objective"], abs=1e-6)
    for w in (2, 4, 8):
        for a in (2, 4, 8):
            uniform = totals(weights, acts, [w] * len(weights), [a] * len(acts))
            fits = uniform["avg_wbits"] <= limits.get("avg-wbits", 8) and uniform["avg_abits"] <= limits.get("avg-abits", 8)
            fits &= uniform["size_mb"] <= limits.get("size-mb", 1e9) and "bops" not in limits
            if fits:
                assert objective <= _cost(weights, [w] * len(weights), analysed) + _cost(acts, [a] * len(acts), analysed) + 1e-9


def test_noise_that_scores_a_narrower_width_better_buys_nothing() -> None:
    """A free width is the widest even where the measurement put a narrower one slightly ahead (noise, not signal)."""
    weights = [{"layer": f"conv{i}", "params": 100, "sensitivity": {"2": 1.0, "4": 0.1, "8": 0.0}} for i in range(2)]
    acts = [{"point": f"relu{i}", "layer": f"relu{i}", "elements": 10, "sensitivity": {"2": 0.5, "4": -0.02, "8": 0.01}} for i in range(2)]
    found = solve({"bits": [2, 4, 8], "weights": weights, "activations": acts}, Budget.parse("avg-wbits=4"))
    assert found["avg_abits"] == 8 and found["config"].a == 8 and found["avg_wbits"] == 4
    assert found["objective"] == pytest.approx(2 * 0.1 + 2 * 0.01)
    assert monotone_costs({"2": 0.5, "4": -0.02, "8": 0.01}, [2, 4, 8], [2, 4, 8]) == [0.5, 0.01, 0.01]


def test_bits_auto_quantizes_exports_and_its_config_is_reusable(analysed: Path, tmp_path: Path, cli: CliRun) -> None:
    calib = ["--calib-size", "64", "--calib-dir", analysed.parent / "calib", "--subset", "256", "--workers", "0"]
    result = cli("quantize", analysed, "--bits", "auto", "--budget", "avg-wbits=4", *calib)
    assert result.returncode == 0, result.stderr
    (quant,) = [p for p in (analysed / "quant").iterdir() if p.is_dir()]
    manifest = json.loads((quant / "manifest.json").read_text())
    assert manifest["metrics"]["auto_bits"]["avg_wbits"] <= 4 and quant.name.startswith("w")
    again = cli("quantize", analysed, "--config", quant / "config.json", "--out", tmp_path / "again", *calib)
    assert again.returncode == 0, again.stderr
    redone = json.loads((tmp_path / "again/quant" / quant.name / "manifest.json").read_text())
    assert redone["metrics"]["layers"]["weights"] == manifest["metrics"]["layers"]["weights"]
    exported = cli("export", analysed, "--bits", quant.name)
    assert exported.returncode == 0, exported.stderr
    assert (analysed / "export" / f"{quant.name}-ort" / "model.qdq.onnx").is_file()


def test_bits_auto_refuses_what_it_cannot_plan(tiny_run: Path, analysed: Path, tmp_path: Path, cli: CliRun) -> None:
    unanalysed = tmp_path / "run"
    shutil.copytree(tiny_run, unanalysed)
    for run, extra, needle in ((unanalysed, ["--budget", "avg-wbits=4"], "ssql-deploy analyze"),
                               (analysed, ["--budget", "avg-wbits=1"], "loosen the budget"),
                               (analysed, ["--budget", "wbits=4"], "malformed --budget"),
                               (analysed, [], "takes a budget")):  # fmt: skip
        assert_user_error(cli("quantize", run, "--bits", "auto", *extra), needle)
    assert_user_error(cli("quantize", analysed, "--bits", "w4a4", "--budget", "avg-wbits=4"), "only to --bits auto")
    assert_user_error(cli("quantize", analysed, "--config", tmp_path / "none.json"), "does not exist")


def test_max_drop_gives_layers_back_until_the_exported_artifact_meets_it(tiny_run: Path, tmp_path: Path, cli: CliRun) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    calib = ["--calib-size", "64", "--val-size", "256", "--calib-dir", tmp_path / "calib", "--subset", "256", "--workers", "0"]
    result = cli("quantize", run, "--bits", "w2a2", "--max-drop", "1", *calib)
    assert result.returncode == 0, result.stderr
    assert "accuracy control" in result.stderr + result.stdout
    (quant,) = [p for p in (run / "quant").iterdir() if p.is_dir()]
    report = json.loads((quant / "manifest.json").read_text())["metrics"]["accuracy_control"]
    assert report["met"] and report["fallbacks"] >= 1 and report["steps"][0]["drop"] > 1 >= report["steps"][-1]["drop"]
    # what accuracy control measured in memory is what the exported file scores on the same validation images
    assert cli("export", run, "--bits", quant.name).returncode == 0
    session = make_session(run / "export" / f"{quant.name}-ort" / "model.qdq.onnx", 2)
    images, labels, _ = load_validation(load_trained(run)[1].source(), 256, 64, tmp_path / "calib")
    predicted = np.concatenate([session.run(None, {INPUT_NAME: x.numpy()})[0].argmax(1) for x in images.split(64)])
    assert 100.0 * float((predicted == labels.numpy()).mean()) == pytest.approx(report["steps"][-1]["top1"], abs=1e-3)
    assert_user_error(cli("quantize", run, "--bits", "w2a2", "--max-drop", "1", "--lsq", "--epochs", "1"), "--max-drop")


def test_debug_finds_the_layer_where_a_planted_fault_makes_the_artifact_depart(deployed: Path, tmp_path: Path, cli: CliRun) -> None:
    clean = cli("debug", deployed / "export/w4a4-ort", "--images", "128", "--out", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    report = json.loads((tmp_path / "clean/debug.json").read_text())
    assert report["top1_agreement"] >= 99 and report["integer_convs"] == report["convs"] and not report["problems"]
    assert set(report["float_ops"]) == {"GlobalAveragePool", "Gemm"} and (tmp_path / "clean/debug.png").is_file()
    assert report["tensorrt"] is None  # an ONNX Runtime export has no engine to read
    # the same artifact with one activation scale 1.5x too large: the debugger names that layer as where divergence starts
    faulty = tmp_path / "faulty"
    shutil.copytree(deployed / "export/w4a4-ort", faulty)
    model = onnx.load(str(faulty / "model.qdq.onnx"))
    (scale,) = [t for t in model.graph.initializer if t.name == "aq_layer2_0_relu_scale"]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
    onnx.save(model, str(faulty / "model.qdq.onnx"))
    broken = cli("debug", faulty / "model.qdq.onnx", "--images", "128")
    assert broken.returncode == 0, broken.stderr
    found = json.loads((faulty / "debug/debug.json").read_text())
    assert found["first_departure"] == "layer2_0_relu" and found["problems"] and report["first_departure"] is None
    # downstream, the fault's values drift far past ties, but each layer given the graph's own inputs computes alike
    after = list(found["layers"])[list(found["layers"]).index("layer2_0_relu") + 1 :]
    assert max(found["layers"][k]["mismatch_fraction"] for k in after) > 0.01
    assert all(found["layers"][k]["local_mismatch_fraction"] <= 0.001 for k in after), found["layers"]
    assert_user_error(cli("debug", deployed / "export/fp32"), "FP32 baseline")
    assert_user_error(cli("debug", tmp_path / "nothing"), "not an exported model")


def test_export_reports_the_weights_packed_at_their_widths(deployed: Path) -> None:
    export = json.loads((deployed / "export/w4a4-ort/manifest.json").read_text())["metrics"]["weight_storage"]
    table = json.loads((deployed / "quant/w4a4/manifest.json").read_text())["metrics"]["layers"]["weights"]
    state = load_trained(deployed)[0].state_dict()
    params = {row["layer"]: state[f"{row['layer']}.weight"].numel() for row in table if row["w"]}
    assert export["quantized_weights_int8_bytes"] == sum(params.values())
    assert export["quantized_weights_packed_bytes"] == sum(-(-params[r["layer"]] * r["w"] // 8) for r in table if r["w"])
    assert export["quantized_weights_packed_bytes"] < 0.6 * export["quantized_weights_int8_bytes"] and "int4" in export["note"]
    assert export["onnx_file_bytes"] == (deployed / "export/w4a4-ort/model.qdq.onnx").stat().st_size
