"""Where quantizers go: rules by operator, applied to an FX trace of any CNN, with one rule set per layout (layouts.py).

Operator rules (every layout): every conv's weights (per output channel, so depthwise and grouped
convs too) at the config's weight bits; an activation quantizer after every ReLU, ReLU6, Hardswish,
Hardsigmoid, SiLU and Sigmoid (unsigned after the non-negative ones, with a zero-point or signed
after the others), and on every conv input not quantized yet (a linear bottleneck, a residual sum,
a squeeze-excite product or pooled vector); pooling, dropout and flatten pass values through on
their grid. Nothing in the model's classification head is quantized. What a layout adds for its
runtime (the network input, residual Add inputs, conv outputs before unfusable activations, SiLU and
Hardswish with an 8-bit gate) comes from its `LayoutRules`.
"""

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import StochasticDepth

from ssql_deploy.errors import UserError
from ssql_deploy.models.registry import ModelSpec
from ssql_deploy.quant.bits import BitSpec
from ssql_deploy.quant.config import QuantConfig, Resolved, resolve
from ssql_deploy.quant.fold import Folded, fold_batchnorm
from ssql_deploy.quant.gates import GATED, SATURATING, GatedActivation, saturation_bound
from ssql_deploy.quant.layouts import LAYOUTS, Layout
from ssql_deploy.quant.quantizer import ActQuantizer, QuantConv2d, WeightQuantizer

PointKind = Literal["activation", "conv_input", "input", "branch", "skip", "preactivation"]
RUNTIME_KINDS: tuple[PointKind, ...] = ("input", "branch", "skip", "preactivation")  # what a layout adds to the SSQL placement
RUNTIME_BITS = 8  # quantizers a runtime needs beyond the SSQL placement are 8-bit


@dataclass(frozen=True)
class ActivationRule:
    nonnegative: bool
    fuses_into_conv: bool  # integer conv kernels apply it themselves (Relu; ReLU6 clamped by its quantizer)


ACTIVATIONS: dict[type[nn.Module], ActivationRule] = {
    nn.ReLU: ActivationRule(True, True), nn.ReLU6: ActivationRule(True, True),
    nn.Hardsigmoid: ActivationRule(True, False), nn.Sigmoid: ActivationRule(True, False),
    nn.Hardswish: ActivationRule(False, False), nn.SiLU: ActivationRule(False, False),
}  # fmt: skip
PASS_THROUGH = (nn.Identity, nn.MaxPool2d, nn.Dropout, StochasticDepth, nn.Flatten)  # on-grid in, on-grid out
ADD_OPS = (operator.add, operator.iadd, torch.add)
MUL_OPS = (operator.mul, operator.imul, torch.mul)
SUPPORTED_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d, nn.Linear, *ACTIVATIONS, *PASS_THROUGH)
SUPPORTED_FUNCTIONS = (*ADD_OPS, *MUL_OPS, torch.flatten, F.adaptive_avg_pool2d, torch.cat)
SUPPORTED_METHODS = ("flatten",)


@dataclass(frozen=True)
class ActPoint:
    """An activation quantizer after graph node `node`; `layer` is what config patterns match (module path or node)."""

    node: str
    layer: str
    bits: int
    signed: bool
    nonnegative: bool  # the values are >= 0 (after ReLU, ReLU6, sigmoids), whatever grid holds them
    kind: PointKind


class _Tracer(fx.Tracer):
    """Stochastic depth stays one node: traced through, its training-mode branch would be frozen into the graph."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, StochasticDepth) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, _Tracer().trace(model))


def quantizer_name(point: str) -> str:
    return f"aq_{point}"


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is(gm: fx.GraphModule, node: object, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(node, fx.Node) and isinstance(_module(gm, node), kinds)


def _layer(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _check_supported(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        known = {"call_module": lambda n: isinstance(_module(gm, n), SUPPORTED_MODULES),
                 "call_function": lambda n: n.target in SUPPORTED_FUNCTIONS,
                 "call_method": lambda n: n.target in SUPPORTED_METHODS}.get(node.op)  # fmt: skip
        if known is not None and not known(node):
            what = type(_module(gm, node)).__name__ if node.op == "call_module" else str(getattr(node.target, "__name__", node.target))
            raise UserError(
                f"the quantizer placement does not know operator {what} (node {node.name}, {node.op} {node.target})",
                "supported: Conv2d (grouped and depthwise too), BatchNorm2d, ReLU, ReLU6, Hardswish, Hardsigmoid, SiLU, Sigmoid, "
                "add, mul, cat, pooling, dropout, flatten, Linear in the head",
            )


def _generic_spec(gm: fx.GraphModule) -> tuple[tuple[str, ...], str]:
    """Stem and head of a model the registry does not describe: its first conv and activation, its last Linear."""
    modules = [(str(n.target), _module(gm, n)) for n in gm.graph.nodes if n.op == "call_module"]
    stem = [next(p for p, m in modules if isinstance(m, nn.Conv2d))]
    stem += [p for p, m in modules if isinstance(m, tuple(ACTIVATIONS))][:1]
    linears = [p for p, m in modules if isinstance(m, nn.Linear)]
    return tuple(stem), linears[-1] if linears else "\0"


def _in_head(path: str, head: str) -> bool:
    return path == head or path.startswith(head + ".")


def _source(gm: fx.GraphModule, node: object) -> object:
    while _is(gm, node, PASS_THROUGH) or (isinstance(node, fx.Node) and (node.target is torch.flatten or node.target == "flatten")):
        node = node.args[0]  # type: ignore[union-attr]
    return node


def _from_conv(gm: fx.GraphModule, node: object) -> fx.Node | None:
    """The conv whose output (through its BatchNorm) `node` is, if any."""
    node = _source(gm, node)
    if _is(gm, node, nn.BatchNorm2d):
        node = node.args[0]  # type: ignore[union-attr]
    return node if _is(gm, node, nn.Conv2d) else None  # type: ignore[return-value]


def plan_points(gm: fx.GraphModule, layout: Layout, widths: Resolved, head: str) -> list[ActPoint]:
    rules = LAYOUTS[layout]
    in_head = lambda n: n.op == "call_module" and _in_head(str(n.target), head)  # noqa: E731
    points: dict[str, ActPoint] = {}
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")

    def add_point(node: fx.Node, kind: PointKind, bits: int | None, nonnegative: bool) -> None:
        if bits is None or node.name in points:
            return
        signed = rules.signed and (not nonnegative or bits == 8)  # TensorRT: an unsigned grid below 8 bits fits int8 exactly
        points[node.name] = ActPoint(node.name, _layer(node), bits, signed, nonnegative, kind)

    def quantized(node: object) -> bool:
        node = _source(gm, node)
        return isinstance(node, fx.Node) and (node.name in points or (node is placeholder and rules.quantize_input))

    nodes = [n for n in gm.graph.nodes if not in_head(n)]
    for node in nodes:
        module = _module(gm, node)
        if module is not None and type(module) in ACTIVATIONS:
            add_point(node, "activation", widths.act_bits(_layer(node)), ACTIVATIONS[type(module)].nonnegative)
    if rules.quantize_input:
        add_point(placeholder, "input", RUNTIME_BITS, False)
    for node in nodes:
        module = _module(gm, node)
        if isinstance(module, nn.Conv2d) and widths.weight_bits(str(node.target)) is not None and not quantized(node.args[0]):
            producer = _source(gm, node.args[0])
            if isinstance(producer, fx.Node) and producer is not placeholder:
                nonneg = _is(gm, producer, tuple(t for t, r in ACTIVATIONS.items() if r.nonnegative))
                add_point(producer, "conv_input", widths.act_bits(_layer(producer)), nonneg)
        if rules.preactivation and module is not None and type(module) in ACTIVATIONS and not ACTIVATIONS[type(module)].fuses_into_conv:
            if _from_conv(gm, node.args[0]) is not None:  # Q right after the conv, so it runs as QLinearConv
                add_point(_source(gm, node.args[0]), "preactivation", RUNTIME_BITS, False)  # type: ignore[arg-type]
        if node.op == "call_function" and node.target in ADD_OPS and rules.add_inputs != "none":
            branch, skip = _branch_and_skip(gm, node)
            if rules.add_inputs == "both" and isinstance(branch, fx.Node) and not quantized(branch):
                add_point(_source(gm, branch), "branch", RUNTIME_BITS, False)  # type: ignore[arg-type]
            if isinstance(skip, fx.Node) and not quantized(skip):
                add_point(_source(gm, skip), "skip", RUNTIME_BITS, False)  # type: ignore[arg-type]
    return list(points.values())


def _branch_and_skip(gm: fx.GraphModule, add: fx.Node) -> tuple[object, object]:
    """The residual Add's conv branch and its skip: the conv computed last is the branch (the shortcut's projection,
    if any, and the block input come first), whichever side of the `+` it is written on."""
    a, b = add.args[0], add.args[1]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    ca, cb = _from_conv(gm, a), _from_conv(gm, b)
    if ca is not None and (cb is None or order[ca] > order[cb]):
        return a, b
    return b, a


def prepare(model: nn.Module, layout: Layout, config: QuantConfig | BitSpec, spec: ModelSpec | None = None) -> fx.GraphModule:
    """Trace `model` and return a fake-quant twin, activation quantizers disabled (they need a range first).

    The twin shares `model`'s parameters, except in the `ort` layout, whose convs are new folded
    ones (an inference-only layout). `spec` (the registry's description) names the stem and the head;
    without it the first conv and activation are the stem and the last Linear the head.
    """
    config = config if isinstance(config, QuantConfig) else QuantConfig.from_bits(config)
    gm = trace(model)
    _check_supported(gm)
    stem, head = (spec.stem, spec.head) if spec is not None else _generic_spec(gm)
    names = [name for name, _ in model.named_modules() if name] + [n.name for n in gm.graph.nodes if n.op == "call_function"]
    widths = resolve(config, stem, names)
    # Planned before folding: a point after a conv's BatchNorm is then named, and its width configured, after that
    # BatchNorm in every layout, so a layout that folds finds the ranges, learned steps and per-layer widths saved
    # under that name by the unfolded `ssql` model. Planned after, such a point took the conv's name, its saved
    # range and learned step went unused, and ONNX Runtime ran a 3-bit MobileNetV2 on ranges calibrated afresh.
    points = plan_points(gm, layout, widths, head)
    folded = fold_batchnorm(gm) if LAYOUTS[layout].fold_bn else Folded({}, {})
    gm.fold_gains = folded.gains  # type: ignore[assignment]
    weights: dict[str, int | None] = {}
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, nn.Conv2d) and not isinstance(module, QuantConv2d):
            path = str(node.target)
            weights[path] = bits = None if _in_head(path, head) else widths.weight_bits(path)
            if bits is not None:
                _set_submodule(gm, path, QuantConv2d.from_float(module, bits))
    by_name = {n.name: n for n in gm.graph.nodes} | folded.producers
    for point in points:
        node = by_name[point.node]
        name = quantizer_name(point.node)
        gm.add_submodule(name, ActQuantizer(point.bits, point.signed, nonnegative=point.nonnegative and not point.signed))
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    if layout == "ort":
        _link_bias_quantization(gm)
    _bound_gate_inputs(gm, {p.node: p for p in points})
    if LAYOUTS[layout].integer_gates:
        for node in gm.graph.nodes:
            if _is(gm, node, GATED) and not _in_head(str(node.target), head):
                _set_submodule(gm, str(node.target), GatedActivation(_module(gm, node)))  # type: ignore[arg-type]
    gm.graph.lint()
    gm.recompile()
    gm.quant_layout = layout  # type: ignore[assignment]
    gm.quant_config = config  # type: ignore[assignment]
    gm.quant_label = config.label  # type: ignore[assignment]
    gm.quant_points = {p.node: p for p in points}  # type: ignore[assignment]
    gm.quant_weights = weights  # type: ignore[assignment]
    return gm


def _bound_gate_inputs(gm: fx.GraphModule, points: dict[str, ActPoint]) -> None:
    """Stop the range of a quantizer read only by a quantized Sigmoid or Hardsigmoid where that gate saturates."""
    for node in gm.graph.nodes:
        quantizer = _module(gm, node)
        if not isinstance(quantizer, ActQuantizer) or not node.users:
            continue
        gates = [user for user in node.users if _is(gm, user, SATURATING) and user.name in points]
        if len(gates) == len(node.users):
            quantizer.saturation = max(saturation_bound(_module(gm, g), points[g.name].bits) for g in gates)  # type: ignore[arg-type]


def _link_bias_quantization(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        conv = _module(gm, node)
        if not isinstance(conv, QuantConv2d):
            continue
        quantizer = _module(gm, _source(gm, node.args[0])) if isinstance(_source(gm, node.args[0]), fx.Node) else None  # type: ignore[arg-type]
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


def conv_input_points(gm: fx.GraphModule) -> dict[str, str | None]:
    """For each quantized conv, the activation point whose grid its input is on (None: a float input)."""
    found: dict[str, str | None] = {}
    for node in gm.graph.nodes:
        if isinstance(_module(gm, node), QuantConv2d):
            source = _source(gm, node.args[0])
            found[str(node.target)] = str(source.target).removeprefix("aq_") if _is(gm, source, ActQuantizer) else None  # type: ignore[attr-defined]
    return found


def layer_table(gm: fx.GraphModule) -> dict[str, list[dict[str, object]]]:
    """The resolved per-layer table: every conv with its weight bits and scheme, every activation point with its
    bits, grid and (once calibrated) range. What the artifact stores and the CLI prints."""
    acts = act_quantizers(gm)
    weights = []
    for layer, bits in gm.quant_weights.items():  # type: ignore[attr-defined]
        conv = gm.get_submodule(layer)
        row = {"layer": layer, "w": bits, "scheme": "per output channel, symmetric" if bits else "float", "groups": int(conv.groups)}
        if isinstance(conv, QuantConv2d):
            row |= {"rounding": "learned" if conv.weight_quantizer.fixed is not None else "nearest",
                    "bias_corrected": conv.bias_correction is not None}  # fmt: skip
        weights.append(row)
    points = []
    for p in gm.quant_points.values():  # type: ignore[attr-defined]
        q = acts[p.node]
        grid = "signed symmetric" if p.signed else ("unsigned from 0" if p.nonnegative else "unsigned with zero-point")
        points.append({"point": p.node, "after": p.layer, "a": p.bits, "kind": p.kind, "grid": grid,
                       "range": [round(float(q.lo), 6), round(float(q.hi), 6)]})  # fmt: skip
    return {"weights": weights, "activations": points}
