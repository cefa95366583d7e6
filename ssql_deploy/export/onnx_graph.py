"""Write an FX-traced (fake-quant) model as an ONNX graph, Q/DQ placed exactly where its quantizers are.

Why our own emitter rather than `torch.onnx.export`: the dynamo exporter cannot export
fake-quant ops with a dynamic batch, neither exporter accepts quant ranges other than 7/8 bits,
and the TorchScript exporter is on its way out (DEPLOY.md). Emitting from the FX graph gives a
deterministic graph whose every Q/DQ pair maps to one named quantizer, which is what the parity
check and the per-layer debugging need.

How the graph is written for a layout (BatchNorm folded or not, int8 or uint8 containers, where a
low-bit Clip goes, int32 biases, integer pooling) is read from its `LayoutRules` (quant/layouts.py).
Weights may carry zero-point -1 where the layout allows it (integers shifted by one, exact thanks to
the narrow weight range): ONNX Runtime then runs QLinearConv through its QGEMM path, which uses AMX
where the CPU has it, instead of the VNNI symmetric-conv kernel that a zero-point of 0 selects.
A conv whose 16-bit pair sums could saturate on a CPU without VNNI gets uint8 weights (`weight_container`).
"""

import operator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn
from torchvision.ops import StochasticDepth

from ssql_deploy.errors import UserError
from ssql_deploy.quant.fold import bn_affine
from ssql_deploy.quant.gates import HARD_SHIFT, HARD_SPAN, GatedActivation
from ssql_deploy.quant.layouts import LAYOUTS, Layout
from ssql_deploy.quant.quantizer import ActQuantizer, QuantConv2d, QuantLinear
from ssql_deploy.runtimes import INPUT_NAME

OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
_ADD_OPS = (operator.add, operator.iadd, torch.add)
_MUL_OPS = (operator.mul, operator.imul, torch.mul)


@dataclass(frozen=True)
class _QInfo:
    """The integer tensor behind a DequantizeLinear, so integer-domain ops can reuse it."""

    name: str
    scale: str
    zero_point: str
    scale_value: float
    top: int  # the largest uint8 it holds, 0 in an int8 container (see `weight_container`)


@dataclass(frozen=True)
class _Value:
    name: str
    q: _QInfo | None = None
    prescale: float = 1.0  # the tensor holds prescale times the value: its QuantizeLinear divides by prescale x scale


class _Emitter:
    def __init__(self, gm: fx.GraphModule, layout: Layout, weight_zero_point: int) -> None:
        self.gm = gm
        self.rules = LAYOUTS[layout]
        self.weight_zero_point = weight_zero_point
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.env: dict[fx.Node, _Value] = {}
        self.names: set[str] = set()

    # -- helpers -------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: object) -> str:
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    # -- graph walk ----------------------------------------------------------------------------
    def run(self, input_shape: tuple[int, int, int]) -> onnx.GraphProto:
        graph_input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *input_shape])
        self.names.add(INPUT_NAME)
        outputs: list[onnx.ValueInfoProto] = []
        for node in self.gm.graph.nodes:
            if node in self.env:  # already produced (a BatchNorm folded into its conv)
                continue
            if node.op == "placeholder":
                self.env[node] = _Value(INPUT_NAME)
            elif node.op == "output":
                (result,) = node.args
                final = self.op("Identity", [self.env[result].name], OUTPUT_NAME)
                outputs.append(helper.make_tensor_value_info(final, TensorProto.FLOAT, ["batch", None]))
            elif node.op == "call_module":
                self.env[node] = self.emit_module(node, self.module(node))
            elif node.op == "call_function":
                self.env[node] = self.emit_function(node)
            elif node.op == "call_method":
                self.env[node] = self.emit_method(node)
            else:
                raise _unsupported(node)
        self.prune({o.name for o in outputs})
        return helper.make_graph(self.nodes, "ssql_deploy", [graph_input], outputs, self.inits)

    def prune(self, outputs: set[str]) -> None:
        """Drop nodes nothing consumes (a DQ bypassed by an integer MaxPool) and their constants."""
        needed = set(outputs)
        kept: list[onnx.NodeProto] = []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output):
                kept.append(node)
                needed.update(node.input)
        self.nodes = kept[::-1]
        self.inits = [i for i in self.inits if i.name in needed]

    def arg(self, node: fx.Node, i: int = 0) -> _Value:
        return self.env[node.args[i]]  # type: ignore[index]

    def emit_module(self, node: fx.Node, m: nn.Module) -> _Value:
        x = self.arg(node)
        base = node.name
        if isinstance(m, ActQuantizer):
            return self.quantize(x, m, base)
        if isinstance(m, nn.Conv2d):
            return self.conv(node, m, x)
        if isinstance(m, nn.BatchNorm2d):
            return _Value(self.batch_norm(m, x.name, base))
        if isinstance(m, (nn.Identity, nn.Dropout, StochasticDepth)):  # inference: the identity
            return x
        if isinstance(m, nn.MaxPool2d):
            return self.max_pool(m, x, base)
        if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
            return _Value(self.op("GlobalAveragePool", [x.name], base))
        if isinstance(m, nn.Linear):
            return _Value(self.linear(m, x, base))
        if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1):
            return _Value(self.op("Flatten", [x.name], base, axis=1))
        if isinstance(m, nn.ReLU6) and self.rules.relu6_as_relu and self.saturates_at_6(node):
            return _Value(self.op("Relu", [x.name], base))  # the same integers, and ORT folds a Relu into the QLinearConv
        if isinstance(m, GatedActivation):
            return _Value(self.gated(m, x, base))
        if isinstance(m, nn.Hardsigmoid) and self.rules.integer_gates and self.quantizer_clamps_hard_gate(node):
            return _Value(self.shifted(x, base), prescale=HARD_SPAN)
        activation = self.activation(m, x.name, base)
        if activation is not None:
            return _Value(activation)
        raise _unsupported(node)

    def saturates_at_6(self, node: fx.Node) -> bool:
        """Whether the quantizer after this ReLU6 already maps 6 to its top integer: then its clamp is the ReLU6's upper
        bound, and a Relu gives the same integers. ORT removes a Clip only when the whole uint8 range lies inside it,
        which a low-bit grid (its top far below 255) never does, and the conv before it would stay float."""
        users = list(node.users)
        q = self.module(users[0]) if len(users) == 1 and users[0].op == "call_module" else None
        if not isinstance(q, ActQuantizer) or q.signed:
            return False
        p = q.qparams()
        return int(torch.clamp(torch.round(torch.tensor(6.0) / p.scale) + p.zero_point, p.qmin, p.qmax)) == p.qmax

    def quantizer_clamps_hard_gate(self, node: fx.Node) -> bool:
        """Whether this Hardsigmoid's own quantizer (zero-point 0, its top integer at or below 1) already clamps
        (x + 3) / 6 to [0, 1]: then the Hardsigmoid is an Add of 3, its / 6 goes into the quantizer's scale, and ORT
        runs it as QLinearAdd."""
        users = list(node.users)
        q = self.module(users[0]) if len(users) == 1 and users[0].op == "call_module" else None
        if not isinstance(q, ActQuantizer) or q.signed or self.arg(node).q is None:
            return False
        p = q.qparams()
        return int(p.zero_point) == 0 and round(1.0 / float(p.scale)) >= p.qmax

    def shifted(self, x: _Value, base: str) -> str:
        """x + 3, the constant as a DequantizeLinear of exact integers (96 / 32) so ORT fuses the Add into QLinearAdd."""
        steps = 32
        shift = [self.const(f"{base}_shift{k}", np.array(v, t)) for k, v, t in
                 (("_int", HARD_SHIFT * steps, np.uint8), ("_scale", 1.0 / steps, np.float32), ("_zero_point", 0, np.uint8))]  # fmt: skip
        return self.op("Add", [x.name, self.op("DequantizeLinear", shift, f"{base}_shift")], f"{base}_shifted")

    def gated(self, m: GatedActivation, x: _Value, base: str) -> str:
        """x * q(gate(x)) (quant/gates.py): Sigmoid, or the hard gate as x + 3 whose / 6 is in the gate's Q scale."""
        gate = self.shifted(x, base) if m.hard else self.op("Sigmoid", [x.name], f"{base}_gate")
        scale = float(m.scale)
        zp = self.const(f"{base}_gate_zero_point", np.array(0, np.uint8))
        q_scale = self.const(f"{base}_gate_q_scale", np.array(scale * (HARD_SPAN if m.hard else 1.0), np.float32))
        q = self.op("QuantizeLinear", [gate, q_scale, zp], f"{base}_gate_q")
        dq = self.op("DequantizeLinear", [q, self.const(f"{base}_gate_scale", np.array(scale, np.float32)), zp], f"{base}_gate_dq")
        return self.op("Mul", [x.name, dq], base)

    def activation(self, m: nn.Module, x: str, base: str) -> str | None:
        """ONNX for torch's activations: Relu, Clip for ReLU6, HardSwish, HardSigmoid (torch's 1/6 and 1/2), Sigmoid,
        and Sigmoid * x for SiLU (no SiLU op in opset 17)."""
        if isinstance(m, nn.ReLU):
            return self.op("Relu", [x], base)
        if isinstance(m, nn.ReLU6):
            bounds = [self.const(f"{base}_{k}", np.array(v, np.float32)) for k, v in (("min", 0.0), ("max", 6.0))]
            return self.op("Clip", [x, *bounds], base)
        if isinstance(m, nn.Hardswish):
            return self.op("HardSwish", [x], base)
        if isinstance(m, nn.Hardsigmoid):
            return self.op("HardSigmoid", [x], base, alpha=1.0 / 6.0, beta=0.5)
        if isinstance(m, nn.Sigmoid):
            return self.op("Sigmoid", [x], base)
        if isinstance(m, nn.SiLU):
            return self.op("Mul", [x, self.op("Sigmoid", [x], f"{base}_sigmoid")], base)
        return None

    def emit_function(self, node: fx.Node) -> _Value:
        if node.target in _ADD_OPS:
            return _Value(self.op("Add", [self.arg(node, 0).name, self.arg(node, 1).name], node.name))
        if node.target in _MUL_OPS:
            return _Value(self.op("Mul", [self.arg(node, 0).name, self.arg(node, 1).name], node.name))
        if node.target is F.adaptive_avg_pool2d and _pair(node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]) == (1, 1):
            return _Value(self.op("GlobalAveragePool", [self.arg(node).name], node.name))
        if node.target is torch.cat:
            tensors = node.args[0]
            axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return _Value(self.op("Concat", [self.env[t].name for t in tensors], node.name, axis=int(axis)))  # type: ignore[union-attr]
        if node.target is torch.flatten and _flatten_from_1(node):
            return _Value(self.op("Flatten", [self.arg(node).name], node.name, axis=1))
        raise _unsupported(node)

    def emit_method(self, node: fx.Node) -> _Value:
        if node.target == "flatten" and _flatten_from_1(node):
            return _Value(self.op("Flatten", [self.arg(node).name], node.name, axis=1))
        raise _unsupported(node)

    # -- ops -----------------------------------------------------------------------------------
    def quantize(self, x: _Value, q: ActQuantizer, base: str) -> _Value:
        p = q.qparams()
        scale, zp = float(p.scale), int(p.zero_point)
        if self.rules.signed and zp != 0:
            raise ValueError(f"quantizer {base} has zero-point {zp}; this layout needs symmetric quantization")
        dtype, lo, hi = (np.int8, -128, 127) if self.rules.signed or q.signed else (np.uint8, 0, 255)
        scale_name = self.const(f"{base}_scale", np.array(scale, np.float32))
        zp_name = self.const(f"{base}_zero_point", np.array(zp, dtype))
        q_scale = scale_name if x.prescale == 1.0 else self.const(f"{base}_q_scale", np.array(scale * x.prescale, np.float32))
        narrow = (p.qmin, p.qmax) != (lo, hi)
        src = x.name
        if narrow and self.rules.low_bit_clip == "float":  # TensorRT wants float Clip -> Q (DEPLOY.md)
            bounds = [self.const(f"{base}_clip_{k}", np.array((v - zp) * scale, np.float32)) for k, v in (("min", p.qmin), ("max", p.qmax))]
            src = self.op("Clip", [src, *bounds], f"{base}_clip")
        qname = self.op("QuantizeLinear", [src, q_scale, zp_name], f"{base}_q")
        if narrow and self.rules.low_bit_clip == "integer":  # integer Clip between Q and DQ keeps ORT's fusion
            bounds = [self.const(f"{base}_int_{k}", np.array(v, dtype)) for k, v in (("min", p.qmin), ("max", p.qmax))]
            qname = self.op("Clip", [qname, *bounds], f"{base}_qclip")
        dq = self.op("DequantizeLinear", [qname, scale_name, zp_name], f"{base}_dq")
        return _Value(dq, _QInfo(qname, scale_name, zp_name, scale, p.qmax if dtype == np.uint8 else 0))

    def conv(self, node: fx.Node, m: nn.Conv2d, x: _Value) -> _Value:
        weight = m.weight.detach().float()
        own_bias = m.effective_bias() if isinstance(m, QuantConv2d) else m.bias
        bias = own_bias.detach().float() if own_bias is not None else torch.zeros(m.out_channels)
        users = list(node.users)
        bn = self.module(users[0]) if len(users) == 1 and users[0].op == "call_module" else None
        fold = self.rules.fold_bn and isinstance(bn, nn.BatchNorm2d)
        gain = torch.ones(m.out_channels)
        if fold:
            assert isinstance(bn, nn.BatchNorm2d)
            gain, shift = bn_affine(bn)
            bias = bias * gain + shift
        base = node.name
        inputs = [x.name]
        if isinstance(m, QuantConv2d) and m.weight_quantizer.enabled:
            ints = m.weight_quantizer.integers(weight)
            scale = m.weight_quantizer.scale(weight).float().clone()
            # Folding BN scales each output channel: per-channel integers survive up to the sign.
            live = gain.abs() > 1e-12
            scale[live] = scale[live] * gain[live].abs()
            ints = ints * torch.where(live, gain.sign(), torch.zeros_like(gain)).reshape(-1, 1, 1, 1)
            inputs.append(self.dequantized_weight(ints, scale, base, self.weight_container(ints, x.q)))
            if self.rules.int32_bias and x.q is not None:
                inputs.append(self.int32_bias(bias, scale * x.q.scale_value, base))
            else:
                inputs.append(self.const(f"{base}_bias", bias.numpy()))
        else:
            inputs.append(self.const(f"{base}_weight", (weight * gain.reshape(-1, 1, 1, 1)).numpy()))
            inputs.append(self.const(f"{base}_bias", bias.numpy()))
        out = self.op(
            "Conv", inputs, base,
            kernel_shape=list(m.kernel_size), strides=list(m.stride), dilations=list(m.dilation),
            pads=[*_pair(m.padding), *_pair(m.padding)], group=m.groups,
        )  # fmt: skip
        if fold:
            self.env[users[0]] = _Value(out)
        return _Value(out)

    def weight_container(self, ints: torch.Tensor, x: _QInfo | None) -> tuple[int, type[np.integer]]:
        """The weight zero-point and integer type for a conv reading `x`.

        ONNX Runtime's (and OpenVINO's) uint8 x int8 kernels on x86 CPUs without VNNI (AVX2, AVX-512
        without VNNI: many AMD EPYC and older Xeons) add products in pairs on 16 bits (VPMADDUBSW), which
        saturate past 32767: uint8 inputs up to 255 and int8 weights up to 127 put 61% of a conv's
        outputs off (benchmarks/results/ort_pair_saturation.log). A conv whose pair sums could pass 16
        bits stores its weights as uint8 around zero-point 128 instead (the same integers, exact): ORT's
        uint8 x uint8 kernels widen to 16 bits first, on every CPU; OpenVINO runs such a conv in float.
        """
        zp = self.weight_zero_point
        widest = int(ints.abs().max()) + abs(zp) if ints.numel() else 0
        if x is not None and 2 * x.top * widest > np.iinfo(np.int16).max:
            return 128, np.uint8
        return zp, np.int8

    def dequantized_weight(self, ints: torch.Tensor, scale: torch.Tensor, base: str,
                           container: tuple[int, type[np.integer]] | None = None) -> str:  # fmt: skip
        zp, dtype = container or (self.weight_zero_point, np.int8)
        w = self.const(f"{base}_weight_int", (ints.numpy() + zp).astype(dtype))
        s = self.const(f"{base}_weight_scale", scale.numpy().astype(np.float32))
        z = self.const(f"{base}_weight_zero_point", np.full(len(scale), zp, dtype))
        return self.op("DequantizeLinear", [w, s, z], f"{base}_weight_dq", axis=0)

    def int32_bias(self, bias: torch.Tensor, scale: torch.Tensor, base: str) -> str:
        scale = scale.clamp_min(1e-30)
        ints = torch.round(bias / scale).clamp(-(2**31), 2**31 - 1).numpy().astype(np.int32)
        b = self.const(f"{base}_bias_int", ints)
        s = self.const(f"{base}_bias_scale", scale.numpy().astype(np.float32))
        z = self.const(f"{base}_bias_zero_point", np.zeros(len(scale), np.int32))
        return self.op("DequantizeLinear", [b, s, z], f"{base}_bias_dq", axis=0)

    def batch_norm(self, m: nn.BatchNorm2d, x: str, base: str) -> str:
        assert m.running_mean is not None and m.running_var is not None
        params = [
            self.const(f"{base}_{k}", t.detach().float().numpy())
            for k, t in (("scale", m.weight), ("bias", m.bias), ("mean", m.running_mean), ("var", m.running_var))
        ]
        return self.op("BatchNormalization", [x, *params], base, epsilon=float(m.eps))

    def max_pool(self, m: nn.MaxPool2d, x: _Value, base: str) -> _Value:
        attrs = dict(
            kernel_shape=list(_pair(m.kernel_size)), strides=list(_pair(m.stride)),
            pads=[*_pair(m.padding), *_pair(m.padding)], ceil_mode=int(m.ceil_mode),
        )  # fmt: skip
        if self.rules.integer_pool and x.q is not None:  # max commutes with the monotone Q: stay integer
            pooled = self.op("MaxPool", [x.q.name], f"{base}_int", **attrs)
            dq = self.op("DequantizeLinear", [pooled, x.q.scale, x.q.zero_point], f"{base}_dq")
            return _Value(dq, _QInfo(pooled, x.q.scale, x.q.zero_point, x.q.scale_value, x.q.top))
        return _Value(self.op("MaxPool", [x.name], base, **attrs))

    def linear(self, m: nn.Linear, x: _Value, base: str) -> str:
        weight = m.weight.detach().float()
        if isinstance(m, QuantLinear) and m.weight_quantizer.enabled:
            scale = m.weight_quantizer.scale(weight).float()
            w = self.dequantized_weight(m.weight_quantizer.integers(weight), scale, base)
        else:
            w = self.const(f"{base}_weight", weight.numpy())
        b = m.bias.detach().float().numpy() if m.bias is not None else np.zeros(m.out_features, np.float32)
        return self.op("Gemm", [x.name, w, self.const(f"{base}_bias", b)], base, transB=1)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _flatten_from_1(node: fx.Node) -> bool:
    """torch.flatten(x, 1) / x.flatten(1) / x.flatten(start_dim=1): what ONNX Flatten(axis=1) does on NCHW."""
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _unsupported(node: fx.Node) -> UserError:
    what = str(getattr(node.target, "__name__", node.target))
    return UserError(
        f"the ONNX exporter does not support {node.op} {what} (node {node.name})",
        "export covers the registry's families (see `ssql-deploy models`): convs, BatchNorm, the usual activations, add, mul, "
        "cat, pooling, flatten and the Linear head",
    )


def build_onnx(
    gm: fx.GraphModule,
    input_shape: tuple[int, int, int],
    layout: Layout,
    metadata: dict[str, str] | None = None,
    opset: int = DEFAULT_OPSET,
    weight_zero_point: int = 0,
) -> onnx.ModelProto:
    """An ONNX model with a dynamic batch dimension and all weights embedded."""
    if weight_zero_point not in LAYOUTS[layout].weight_zero_points:
        raise ValueError(f"the {layout} layout takes weight zero-points {LAYOUTS[layout].weight_zero_points}, not {weight_zero_point}")
    graph = _Emitter(gm, layout, weight_zero_point).run(input_shape)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ssql-deploy")
    model.ir_version = min(model.ir_version, 10)
    for key, value in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model, full_check=True)
    return model
