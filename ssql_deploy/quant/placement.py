"""Where quantizers go: one rule set per target, applied to an FX trace of the float model.

- `ssql`: the SSQL reference (SSQL.md): every conv's weights at w bits (the stem conv at 8),
  activations after every ReLU (the stem's at 8 bits, the others at a bits), input not quantized.
- `ort`: BatchNorm folded, `ssql` plus 8-bit unsigned quantizers on the network input and on both
  inputs of every residual Add that are not quantized yet, so that every Conv sits between
  DequantizeLinear and QuantizeLinear and ONNX Runtime fuses it into QLinearConv (and the Add into
  QLinearAdd); conv biases rounded to QLinearConv's int32 grid.
- `trt`: TensorRT's explicit-quantization rules (DEPLOY.md): symmetric signed int8, the network
  input and every conv input quantized, a Q/DQ pair on the skip input of each Add only. Post-ReLU
  activations below 8 bits keep their exact unsigned grid inside int8; at 8 bits they are
  re-expressed as signed int8 (127 positive levels) because TensorRT has no uint8.
"""

import operator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from ssql_deploy.quant.bits import BitSpec
from ssql_deploy.quant.fold import fold_batchnorm
from ssql_deploy.quant.quantizer import ActQuantizer, QuantConv2d, WeightQuantizer

Layout = Literal["ssql", "ort", "trt"]
STEM_BITS = 8
PointKind = Literal["relu", "input", "branch", "skip"]
_ADD_OPS = (operator.add, operator.iadd, torch.add)
_PASS_THROUGH = (nn.Identity, nn.MaxPool2d)  # on-grid in, on-grid out


@dataclass(frozen=True)
class ActPoint:
    """An activation quantizer after graph node `node`."""

    node: str
    bits: int
    signed: bool
    kind: PointKind


def quantizer_name(point: str) -> str:
    return f"aq_{point}"


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(model)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is(gm: fx.GraphModule, node: fx.Node, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(_module(gm, node), kinds)


def _stem_conv(gm: fx.GraphModule) -> fx.Node:
    for node in gm.graph.nodes:
        if _is(gm, node, nn.Conv2d):
            return node
    raise ValueError("the model has no convolution to quantize")


def _stem_relu(gm: fx.GraphModule) -> fx.Node | None:
    for node in gm.graph.nodes:
        if _is(gm, node, nn.ReLU):
            return node
    return None


def plan_points(gm: fx.GraphModule, layout: Layout, bits: BitSpec) -> list[ActPoint]:
    stem_relu = _stem_relu(gm)
    points: dict[str, ActPoint] = {}
    for node in gm.graph.nodes:
        if _is(gm, node, nn.ReLU):
            a = STEM_BITS if node is stem_relu else bits.a
            points[node.name] = ActPoint(node.name, a, layout == "trt" and a == 8, "relu")
    if layout == "ssql":
        return list(points.values())
    signed = layout == "trt"
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    extra = [ActPoint(placeholder.name, 8, signed, "input")]

    def quantized(node: fx.Node) -> bool:
        while _is(gm, node, _PASS_THROUGH):
            node = node.args[0]  # type: ignore[assignment]
        return node.name in points or node is placeholder

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ADD_OPS:
            branch, skip = node.args[0], node.args[1]
            if layout == "ort" and isinstance(branch, fx.Node) and not quantized(branch):
                extra.append(ActPoint(branch.name, 8, False, "branch"))
            if isinstance(skip, fx.Node) and not quantized(skip):
                extra.append(ActPoint(skip.name, 8, signed, "skip"))
    return extra + list(points.values())


def prepare(model: nn.Module, layout: Layout, bits: BitSpec) -> fx.GraphModule:
    """Trace `model` and return a fake-quant twin, quantizers disabled.

    The twin shares `model`'s parameters, except in the `ort` layout, whose convs are new folded
    ones (an inference-only layout). Activation quantizers start disabled (they need a range
    first); weight quantizers are live.
    """
    gm = trace(model)
    gm.fold_gains = fold_batchnorm(gm) if layout == "ort" else {}  # type: ignore[assignment]
    stem = _stem_conv(gm)
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, nn.Conv2d) and not isinstance(module, QuantConv2d):
            w_bits = STEM_BITS if node is stem else bits.w
            _set_submodule(gm, str(node.target), QuantConv2d.from_float(module, w_bits))
    by_name = {n.name: n for n in gm.graph.nodes}
    points = plan_points(gm, layout, bits)
    for point in points:
        node = by_name[point.node]
        name = quantizer_name(point.node)
        gm.add_submodule(name, ActQuantizer(point.bits, point.signed, nonnegative=point.kind == "relu"))
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    if layout == "ort":
        _link_bias_quantization(gm)
    gm.graph.lint()
    gm.recompile()
    gm.quant_layout = layout  # type: ignore[assignment]
    gm.quant_bits = str(bits)  # type: ignore[assignment]
    gm.quant_points = {p.node: p for p in points}  # type: ignore[assignment]
    return gm


def _link_bias_quantization(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        conv = _module(gm, node)
        if not isinstance(conv, QuantConv2d):
            continue
        source = node.args[0]
        while isinstance(source, fx.Node) and _is(gm, source, _PASS_THROUGH):
            source = source.args[0]
        quantizer = _module(gm, source) if isinstance(source, fx.Node) else None
        if isinstance(quantizer, ActQuantizer):
            conv.quantize_bias_with(quantizer)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def act_quantizers(gm: nn.Module) -> dict[str, ActQuantizer]:
    """Activation quantizers by point name (the graph node they follow)."""
    return {name.removeprefix("aq_"): m for name, m in gm.named_children() if isinstance(m, ActQuantizer)}


def weight_quantizers(gm: nn.Module) -> dict[str, WeightQuantizer]:
    """Weight quantizers by the path of the layer that owns them."""
    return {name.removesuffix(".weight_quantizer"): m for name, m in gm.named_modules() if isinstance(m, WeightQuantizer)}
