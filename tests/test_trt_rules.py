"""TensorRT explicit-quantization rules: real `trt` exports pass, each hand-broken rule is caught,
an ORT-layout export is rejected, and (on a GPU with TensorRT) a plan builds and runs."""

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import without_zero_init
from onnx import TensorProto, helper, numpy_helper

from ssql_deploy.analyze.engine_layers import parse_layers, summarize
from ssql_deploy.errors import UserError
from ssql_deploy.export.onnx_graph import build_onnx
from ssql_deploy.export.tensorrt_engine import (
    TensorRTRunner,
    build_engine,
    sidecar_path,
    tensorrt_status,
    trtexec_command,
)
from ssql_deploy.export.trt_rules import RULES, RuleViolation, check_trt_qdq
from ssql_deploy.models import create_model
from ssql_deploy.quant.bits import BitSpec
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.placement import prepare

HW = {"cifar": 32, "imagenet": 64}


@functools.cache
def _export(stem: str, bits: str, engine: str = "trt") -> onnx.ModelProto:
    torch.manual_seed(0)
    model = without_zero_init(create_model("test_resnet", 10, stem)).eval()
    gm = prepare(model, engine, BitSpec.parse(bits))
    calibrate(gm, [torch.randn(32, 3, HW[stem], HW[stem])], "minmax")
    return build_onnx(gm, (3, HW[stem], HW[stem]), engine)


def _fresh(stem: str = "cifar", bits: str = "w4a4") -> onnx.ModelProto:
    """A private copy of a cached export, to break one rule in."""
    model = onnx.ModelProto()
    model.CopyFrom(_export(stem, bits))
    return model


def _rules(model: onnx.ModelProto) -> set[str]:
    return {v.rule for v in check_trt_qdq(model)}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray | onnx.TensorProto) -> None:
    tensor = value if isinstance(value, onnx.TensorProto) else numpy_helper.from_array(value, name)
    tensor.name = name
    inits = model.graph.initializer
    for i, t in enumerate(inits):
        if t.name == name:
            inits[i].CopyFrom(tensor)
            return
    inits.append(tensor)


def _get_init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _set_attr(node: onnx.NodeProto, key: str, value: int) -> None:
    for a in [a for a in node.attribute if a.name == key]:
        node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(key, value))


def _insert_before(model: onnx.ModelProto, consumer: str, new: onnx.NodeProto) -> None:
    index = next(i for i, n in enumerate(model.graph.node) if n.name == consumer)
    model.graph.node.insert(index, new)


def _to_int4(model: onnx.ModelProto, name: str) -> None:
    """Store an integer initializer as INT4 (values must already fit in [-8, 7])."""
    ints = np.clip(_get_init(model, name).astype(np.int64), -8, 7)
    _set_init(model, name, helper.make_tensor(name, TensorProto.INT4, ints.shape, ints.flatten().tolist()))


def _set_opset(model: onnx.ModelProto, version: int) -> None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version


# -- real exports --------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("bits", ["w8a8", "w4a4"])
def test_trt_export_has_no_violations(stem: str, bits: str) -> None:
    assert check_trt_qdq(_export(stem, bits)) == []


@pytest.mark.parametrize("bits", ["w8a8", "w4a4"])
def test_ort_export_is_rejected_for_zero_points_and_uint8(bits: str) -> None:
    found = check_trt_qdq(_export("imagenet", bits, "ort"))
    rules = {v.rule for v in found}
    assert {"zero-point", "signed-int8", "residual-add"} <= rules
    assert any(v.rule == "signed-int8" and "UINT8" in v.message for v in found)
    assert any(v.rule == "signed-int8" and "INT32" in v.message for v in found)  # int32 bias DQ


def test_rule_table_is_complete_and_one_line() -> None:
    assert set(RULES) == set(BREAKERS) | {"input-quantized"}
    assert all(desc and "\n" not in desc for desc in RULES.values())
    v = RuleViolation("zero-point", "conv1", "zero-point holds [3.0], not 0")
    assert str(v) == "[zero-point] conv1: zero-point holds [3.0], not 0"
    with pytest.raises(AttributeError):
        v.rule = "opset"  # type: ignore[misc]


# -- one broken rule at a time (cifar w4a4 export: Clip -> Q -> DQ activations) --------------------
def _nonzero_zero_point(m: onnx.ModelProto) -> None:
    _set_init(m, "aq_layer1_0_relu_zero_point", np.array(3, np.int8))


def _uint8_activation(m: onnx.ModelProto) -> None:
    _set_init(m, "aq_layer1_0_relu_zero_point", np.array(0, np.uint8))


def _per_tensor_weight(m: onnx.ModelProto) -> None:
    _set_init(m, "layer1_0_conv2_weight_scale", np.array(0.01, np.float32))
    _set_init(m, "layer1_0_conv2_weight_zero_point", np.array(0, np.int8))


def _weight_axis_1(m: onnx.ModelProto) -> None:  # 8 in, 8 out channels: only the axis is wrong
    _set_attr(_node(m, "layer1_0_conv2_weight_dq"), "axis", 1)


def _per_channel_activation(m: onnx.ModelProto) -> None:
    _set_init(m, "aq_layer1_0_relu_scale", np.full(8, 0.05, np.float32))
    for name in ("aq_layer1_0_relu_q", "aq_layer1_0_relu_dq"):
        _set_attr(_node(m, name), "axis", 1)


def _integer_clip_between_q_and_dq(m: onnx.ModelProto) -> None:  # ORT's low-bit layout
    _node(m, "aq_layer1_0_relu_dq").input[0] = "qclip"
    _insert_before(m, "aq_layer1_0_relu_dq", helper.make_node("Clip", ["aq_layer1_0_relu_q"], ["qclip"], name="qclip"))


def _dq_with_other_scale(m: onnx.ModelProto) -> None:
    _set_init(m, "other_scale", _get_init(m, "aq_layer1_0_relu_scale") * 2)
    _node(m, "aq_layer1_0_relu_dq").input[1] = "other_scale"


def _conv_on_float_input(m: onnx.ModelProto) -> None:
    _node(m, "layer1_0_conv2").input[0] = "aq_layer1_0_relu_clip"


def _conv_branch_quantized(m: onnx.ModelProto) -> None:  # Q/DQ on both Add inputs, as ORT wants
    _set_init(m, "bn2_scale_q", np.array(0.05, np.float32))
    _set_init(m, "bn2_zp_q", np.array(0, np.int8))
    _node(m, "add").input[0] = "bn2_dq"
    params = ["bn2_scale_q", "bn2_zp_q"]
    _insert_before(m, "add", helper.make_node("QuantizeLinear", ["layer1_0_bn2", *params], ["bn2_q"], name="bn2_q"))
    _insert_before(m, "add", helper.make_node("DequantizeLinear", ["bn2_q", *params], ["bn2_dq"], name="bn2_dq"))


def _skip_unquantized(m: onnx.ModelProto) -> None:
    _node(m, "add_1").input[1] = "layer2_0_downsample_1"


def _branch_not_from_conv(m: onnx.ModelProto) -> None:
    _node(m, "add").input[0] = "layer1_0_relu"


def _opset_12(m: onnx.ModelProto) -> None:
    _set_opset(m, 12)


def _int4_conv_weight(m: onnx.ModelProto) -> None:
    _to_int4(m, "layer1_0_conv2_weight_int")
    _to_int4(m, "layer1_0_conv2_weight_zero_point")
    _set_opset(m, 21)


BREAKERS: dict[str, list[Callable[[onnx.ModelProto], None]]] = {
    "zero-point": [_nonzero_zero_point],
    "signed-int8": [_uint8_activation],
    "weight-per-channel": [_per_tensor_weight, _weight_axis_1],
    "activation-per-tensor": [_per_channel_activation],
    "qdq-pair": [_integer_clip_between_q_and_dq, _dq_with_other_scale],
    "conv-input-dq": [_conv_on_float_input],
    "residual-add": [_conv_branch_quantized, _skip_unquantized, _branch_not_from_conv],
    "opset": [_opset_12],
    "int4-conv": [_int4_conv_weight],
}


@pytest.mark.parametrize(
    ("rule", "breaker"), [(rule, b) for rule, bs in BREAKERS.items() for b in bs], ids=lambda x: getattr(x, "__name__", x)
)
def test_each_broken_rule_is_reported_alone(rule: str, breaker: Callable[[onnx.ModelProto], None]) -> None:
    model = _fresh()
    breaker(model)
    found = check_trt_qdq(model)
    assert {v.rule for v in found} == {rule}, found
    assert all(v.message and "\n" not in v.message for v in found)


def test_unquantized_network_input_is_reported() -> None:
    model = _fresh("imagenet", "w8a8")
    _node(model, "conv1").input[0] = "input"
    assert {"input-quantized", "conv-input-dq"} == _rules(model)


def test_unquantized_input_to_a_float_gemm_is_reported_alone() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], name="fc", transB=1),
        ],  # fmt: skip
        "fc_only",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.ones((10, 48), np.float32), "w"), numpy_helper.from_array(np.zeros(10, np.float32), "b")],  # fmt: skip
    )
    found = check_trt_qdq(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [(v.rule, v.node) for v in found] == [("input-quantized", "fc")]


def _int4_fc(model: onnx.ModelProto) -> None:
    """Replace the float fc weight by INT4 integers dequantized per output channel (weight-only GEMM)."""
    w = _get_init(model, "fc_weight")
    scale = (np.abs(w).max(axis=1) / 7 + 1e-8).astype(np.float32)
    _set_init(model, "fc_weight_int", np.round(w / scale[:, None]).astype(np.int8))
    _to_int4(model, "fc_weight_int")
    _set_init(model, "fc_weight_scale", scale)
    _set_init(model, "fc_weight_zp", np.zeros(len(scale), np.int8))
    _to_int4(model, "fc_weight_zp")
    inputs = ["fc_weight_int", "fc_weight_scale", "fc_weight_zp"]
    _insert_before(model, "fc", helper.make_node("DequantizeLinear", inputs, ["fc_wdq"], name="fc_wdq", axis=0))
    _node(model, "fc").input[1] = "fc_wdq"
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "fc_weight"))


def test_int4_gemm_weights_need_opset_21_and_are_otherwise_allowed() -> None:
    model = _fresh()
    _int4_fc(model)
    found = check_trt_qdq(model)
    assert [v.rule for v in found] == ["opset"] and "INT4" in found[0].message
    _set_opset(model, 21)
    assert check_trt_qdq(model) == []


def test_graphs_that_are_not_qdq_give_violations_not_exceptions() -> None:
    conv = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["y"], name="conv")],
        "float_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")],
    )
    no_opset = helper.make_model(conv, opset_imports=[])
    assert _rules(no_opset) == {"conv-input-dq", "input-quantized", "weight-per-channel", "opset"}
    assert check_trt_qdq(onnx.ModelProto()) == [RuleViolation("opset", "", "default-domain opset None < 13")]
    broken = helper.make_graph(  # Q/DQ with missing or computed inputs, a dangling Add, a cycle through MaxPool
        [
            helper.make_node("QuantizeLinear", ["x"], ["q"], name="q"),
            helper.make_node("DequantizeLinear", ["q", "s"], ["dq"], name="dq"),
            helper.make_node("DequantizeLinear", [], ["dq2"], name="dq2"),
            helper.make_node("Add", ["dq", "p"], ["a"], name="add"),
            helper.make_node("MaxPool", ["p"], ["p"], name="loop"),
            helper.make_node("Conv", ["p"], ["c"], name="conv"),
        ],  # fmt: skip
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [],
        [],
    )
    found = check_trt_qdq(helper.make_model(broken, opset_imports=[helper.make_opsetid("", 17)]))
    assert {"signed-int8", "activation-per-tensor", "conv-input-dq", "residual-add"} <= {v.rule for v in found}
    assert not any("could not be checked" in v.message for v in found)


# -- TensorRT engine -------------------------------------------------------------------------------
def test_trtexec_command_has_the_profile_and_explicit_quantization_flags() -> None:
    line = trtexec_command("out/model.onnx", "out/model.plan", "input", (3, 32, 32), 1, 8, 32)
    assert line.startswith("trtexec --onnx=out/model.onnx --saveEngine=out/model.plan --int8 --fp16 ")
    for flag in ("--minShapes=input:1x3x32x32", "--optShapes=input:8x3x32x32", "--maxShapes=input:32x3x32x32"):
        assert flag in line.split()
    assert "--stronglyTyped" not in line
    with pytest.raises(UserError, match="not ordered"):
        trtexec_command("m.onnx", "m.plan", "input", (3, 32, 32), 8, 1, 32)


def test_tensorrt_status_is_one_sentence() -> None:
    ok, why = tensorrt_status()
    assert isinstance(ok, bool) and why.endswith(".") and "\n" not in why


@pytest.mark.skipif(tensorrt_status()[0], reason="TensorRT is usable here")
def test_build_engine_without_tensorrt_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="TensorRT"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", "input", (3, 32, 32))
    with pytest.raises(UserError, match="TensorRT"):
        TensorRTRunner(tmp_path / "m.plan")


@pytest.mark.skipif(not tensorrt_status()[0], reason=tensorrt_status()[1])
def test_build_engine(tmp_path: Path) -> None:
    import onnxruntime as ort

    onnx_path, plan_path = tmp_path / "model.onnx", tmp_path / "model.plan"
    onnx.save(_export("cifar", "w8a8"), onnx_path)
    info = build_engine(onnx_path, plan_path, "input", (3, 32, 32), batches=(1, 2, 4), workspace_gib=1)
    assert plan_path.read_bytes()[:1] != b"{"  # a plain plan, no JSON header glued on
    assert json.loads(sidecar_path(plan_path).read_text()) == info
    assert info["profile"]["input"] == {"min": [1, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [4, 3, 32, 32]}
    assert info["inputs"] == ["input"] and info["outputs"] == ["logits"]

    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    logits = TensorRTRunner(plan_path).predict(x)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert logits.shape == (3, 10) and np.isfinite(logits).all()
    assert np.abs(logits - ref).max() <= 0.25 * np.abs(ref).max() + 1e-2  # INT8 kernels + FP16 fallback
    with pytest.raises(UserError, match="profile"):
        TensorRTRunner(plan_path).predict(np.zeros((8, 3, 32, 32), np.float32))


def test_engine_layer_precisions_are_read_from_the_inspectors_formats() -> None:
    """The engine inspector's JSON as TensorRT 10 writes it with detailed verbosity (the format strings are TensorRT's): a
    layer runs in its first input's type, a UInt8 reformat is not INT8, and a convolution left in FP16 is named."""
    region = lambda fmt: {"Name": "t", "Location": "Device", "Dimensions": [1, 16, 32, 32], "Format/Datatype": fmt}  # noqa: E731
    info = {"Layers": [
        {"Name": "input_q reformat", "LayerType": "Reformat", "Inputs": [region("Row major linear UInt8 format")],
         "Outputs": [region("Row major linear FP32")]},
        {"Name": "/conv1/Conv + /relu/Relu", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [region("Four wide channel vectorized row major Int8 format")],
         "Outputs": [region("Thirty-two wide channel vectorized row major Int8 format")], "Weights": {"Type": "Int8", "Count": 432}},
        {"Name": "/layer1/conv/Conv", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [region("Channel major FP16 format where channel % 8 == 0")], "Outputs": [region("Half")],
         "Weights": {"Type": "Half", "Count": 2304}},
        {"Name": "/fc/Gemm", "LayerType": "CaskGemmMatrixMultiply", "ParameterType": "MatrixMultiply",
         "Inputs": [region("Row major linear FP32"), region("Row major linear FP32")], "Outputs": [region("Row major linear FP32")]},
    ]}  # fmt: skip
    layers = parse_layers(info, Path("m.plan"))
    assert [layer["precision"] for layer in layers] == ["uint8", "int8", "fp16", "fp32"]
    assert layers[1]["outputs"] == ["int8"] and layers[1]["weights"] == "Int8" and layers[3]["inputs"] == ["fp32", "fp32"]
    summary = summarize(layers)
    assert summary == {"layers": 4, "convolutions": 2, "int8_convolutions": 1, "not_int8": {"/layer1/conv/Conv": "fp16"}}
    # an engine built without detailed profiling verbosity lists only names
    with pytest.raises(UserError, match="detailed profiling verbosity"):
        parse_layers({"Layers": ["/conv1/Conv + /relu/Relu", "/fc/Gemm"]}, Path("m.plan"))
