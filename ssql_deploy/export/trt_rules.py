"""Check a QDQ ONNX graph against TensorRT's explicit-quantization rules (DEPLOY.md), without a GPU.

Why: TensorRT rejects an asymmetric Q/DQ only at parse time on the GPU machine, and a misplaced Q/DQ quietly runs
in FP16/FP32. Each rule is a cheap graph query, so export fails fast anywhere, naming the node; no rule assumes a
QDQ graph, so a float or ORT-layout graph yields violations, not exceptions."""

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RULES: dict[str, str] = {
    "zero-point": "Q/DQ zero-points are all 0: TensorRT runs symmetric quantization only",
    "signed-int8": "Q/DQ integers are signed INT8 (INT4 for weights only): no UINT8, INT32 or other types",
    "weight-per-channel": "Conv weights (and Gemm with transB=1) are dequantized per output channel: axis 0",
    "activation-per-tensor": "activation Q/DQ use a single scalar scale (per tensor)",
    "qdq-pair": "every QuantizeLinear feeds only DequantizeLinear nodes with the same scale and zero-point",
    "conv-input-dq": "every Conv data input comes from a DequantizeLinear (a MaxPool in between commutes)",
    "residual-add": "each residual Add has one quantized input (the skip) and one unquantized Conv/BN output",
    "input-quantized": "the network input goes through QuantizeLinear before the first Conv",
    "opset": "default-domain opset >= 13 (per-axis INT8), >= 21 when an INT4/UINT4 tensor appears",
    "int4-conv": "no INT4/UINT4 Conv weights: TensorRT has INT4 weight-only GEMM, no INT4 convolution",
}

Q, DQ = "QuantizeLinear", "DequantizeLinear"
_INT4 = {TensorProto.INT4, TensorProto.UINT4}


@dataclass(frozen=True)
class RuleViolation:
    """One broken rule: its id (a key of RULES), the offending node ("" for the whole graph), one line."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node or '<graph>'}: {self.message}"


def _name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _inp(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _attr(node: onnx.NodeProto, key: str, default: int) -> int:
    values = [helper.get_attribute_value(a) for a in node.attribute if a.name == key]
    return values[0] if values and isinstance(values[0], int) else default


class _Graph:
    """Producer/consumer/constant lookups, built once so each rule stays a few lines."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model, self.nodes = model, list(model.graph.node)
        self.consts: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.consts[node.output[0]] = attr.t
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.inputs = [v.name for v in model.graph.input if v.name not in self.consts]
        self.outputs = {v.name for v in model.graph.output}

    def of(self, *ops: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type in ops]

    def array(self, name: str) -> np.ndarray | None:
        try:
            return numpy_helper.to_array(self.consts[name]) if name in self.consts else None
        except Exception:  # an unreadable tensor counts as "not a constant" for the rules
            return None

    def dims(self, name: str) -> tuple[int, ...] | None:
        return tuple(int(d) for d in self.consts[name].dims) if name in self.consts else None

    def int_type(self, node: onnx.NodeProto) -> int | None:
        """The integer type a Q produces or a DQ reads: the zero-point's type, else ONNX's defaults."""
        if zp := _inp(node, 2):
            return self.consts[zp].data_type if zp in self.consts else None
        if node.op_type == Q:  # without a zero-point QuantizeLinear outputs UINT8 (or its output_dtype)
            return _attr(node, "output_dtype", 0) or TensorProto.UINT8
        prev = self.producer.get(src := _inp(node, 0))  # a DQ without zero-point: its Q's or constant's type
        if prev is not None and prev.op_type == Q:
            return self.int_type(prev)
        return self.consts[src].data_type if src in self.consts else None

    def quantized(self, name: str, depth: int = 0) -> bool:
        """Whether a tensor comes from a DQ, through MaxPools (max commutes with DQ); bounded for cyclic graphs."""
        src = self.producer.get(name)
        if src is not None and src.op_type == "MaxPool" and depth < 64:
            return self.quantized(_inp(src, 0), depth + 1)
        return src is not None and src.op_type == DQ

    def same(self, a: str, b: str) -> bool:
        x, y = self.array(a), self.array(b)
        return a == b or (x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y))

    def is_param_dq(self, node: onnx.NodeProto) -> bool:
        return node.op_type == DQ and _inp(node, 0) in self.consts


Finding = tuple[str, str]  # (node name, one-line message); check_trt_qdq adds the rule id


def _zero_point(g: _Graph) -> Iterator[Finding]:
    """TensorRT rejects a non-zero zero-point at parse time ("zeroPt must be all zeros")."""
    for n in g.of(Q, DQ):
        zp = _inp(n, 2)
        values = g.array(zp) if zp else None
        if zp and values is None:
            yield (_name(n), f"zero-point {zp!r} is not a constant initializer")
        elif values is not None and np.any(values.astype(np.float64) != 0):
            yield (_name(n), f"zero-point {zp!r} holds {np.unique(values.astype(np.float64))[:4].tolist()}, not 0")


def _signed_int8(g: _Graph) -> Iterator[Finding]:
    """UINT8 Q/DQ runs only on DLA; INT32 (bias) and other types are no TensorRT INT8 Q/DQ."""
    for n in g.of(Q, DQ):
        t = g.int_type(n)
        if t != TensorProto.INT8 and not (t in _INT4 and g.is_param_dq(n)):
            what = "unknown (no constant zero-point)" if t is None else TensorProto.DataType.Name(t)
            yield (_name(n), f"integer type is {what}, not INT8")


def _weight_per_channel(g: _Graph) -> Iterator[Finding]:
    """TensorRT's INT8 conv/GEMM kernels take one weight scale per output channel."""
    for n in g.of("Conv", "Gemm"):
        out_axis = 0 if n.op_type == "Conv" or _attr(n, "transB", 0) else 1
        dq = g.producer.get(_inp(n, 1))
        if dq is None or dq.op_type != DQ:
            if n.op_type == "Conv":  # a float fc is fine; a float conv never runs in INT8
                yield (_name(n), "weights are float, not dequantized integers")
            continue
        shape, scale = g.dims(_inp(dq, 0)), g.dims(_inp(dq, 1))
        if shape is None or scale is None or len(shape) < 2:
            yield (_name(dq), "weight integers or scale are not constants")
            continue
        axis = _attr(dq, "axis", 1)
        if (axis + len(shape) if axis < 0 else axis) != out_axis:
            yield (_name(dq), f"axis={axis}, expected {out_axis} (output channels)")
        if scale != (shape[out_axis],):
            yield (_name(dq), f"scale shape {list(scale)}, expected [{shape[out_axis]}]")


def _activation_per_tensor(g: _Graph) -> Iterator[Finding]:
    """TensorRT quantizes activations per tensor; weights and biases are the other rules' business."""
    for n in (n for n in g.of(Q, DQ) if not g.is_param_dq(n)):
        dims = g.dims(_inp(n, 1))
        if dims is None:
            yield (_name(n), "scale is not a constant initializer")
        elif int(np.prod(dims)) != 1:
            yield (_name(n), f"scale shape {list(dims)}, expected a scalar")


def _qdq_pair(g: _Graph) -> Iterator[Finding]:
    """TensorRT fuses Q->DQ into layers: an op in between (integer Clip/MaxPool) or another scale breaks that."""
    for q in g.of(Q):
        out = q.output[0] if q.output else ""
        users = g.consumers.get(out, [])
        if not users or out in g.outputs:
            yield (_name(q), "output is not (only) consumed by a DequantizeLinear")
        for u in users:
            if u.op_type != DQ:
                yield (_name(q), f"followed by {u.op_type} {_name(u)!r}, not DequantizeLinear")
            elif not (g.same(_inp(q, 1), _inp(u, 1)) and g.same(_inp(q, 2), _inp(u, 2))):
                yield (_name(q), f"{_name(u)!r} uses a different scale or zero-point")


def _conv_input_dq(g: _Graph) -> Iterator[Finding]:
    """A Conv whose input is not dequantized runs in float: no INT8 kernel for that layer."""
    for n in g.of("Conv"):
        if not g.quantized(_inp(n, 0)):
            yield (_name(n), f"data input {_inp(n, 0)!r} does not come from a DequantizeLinear")


def _residual_add(g: _Graph) -> Iterator[Finding]:
    """TensorRT fuses Conv(+BN)+Add only when the skip input alone carries Q/DQ (ORT's layout quantizes both)."""
    for n in g.of("Add"):
        ins = [i for i in n.input if i]
        if len(ins) != 2 or any(i in g.consts for i in ins):
            continue  # a bias or constant add, not a residual join
        q = [g.quantized(i) for i in ins]
        src = g.producer.get(ins[q.index(False)]) if sum(q) == 1 else None
        if sum(q) != 1:
            yield (_name(n), f"{'both inputs' if all(q) else 'no input'} quantized; expected the skip input only")
        elif src is None or src.op_type not in ("Conv", "BatchNormalization"):
            yield (_name(n), f"unquantized input comes from {getattr(src, 'op_type', 'a graph input')}, not Conv/BN")


def _input_quantized(g: _Graph) -> Iterator[Finding]:
    """Without a Q on the network input, the first conv (and what TensorRT fuses with it) runs in float."""
    seen: set[str] = set()
    stack = list(g.inputs)
    while stack:
        t = stack.pop()
        users = [] if t in seen else [u for u in g.consumers.get(t, []) if u.op_type != Q]
        seen.add(t)
        for u in users:
            if u.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                yield (_name(u), "the network input reaches it without a QuantizeLinear")
            else:
                stack.extend(o for o in u.output if o)


def _opset(g: _Graph) -> Iterator[Finding]:
    """Per-axis Q/DQ needs opset 13; the INT4 (and FP8) Q/DQ types exist only from opset 21."""
    version = next((int(o.version) for o in g.model.opset_import if o.domain in ("", "ai.onnx")), None)
    infos = [*g.model.graph.input, *g.model.graph.output, *g.model.graph.value_info]
    types = [t.data_type for t in g.consts.values()] + [v.type.tensor_type.elem_type for v in infos]
    int4 = bool(_INT4 & {*types, *(_attr(n, key, 0) for n in g.nodes for key in ("output_dtype", "to"))})
    need = 21 if int4 else 13
    if version is None or version < need:
        why = " (the graph has INT4/UINT4 tensors)" if int4 else ""
        yield ("", f"default-domain opset {version} < {need}{why}")


def _int4_conv(g: _Graph) -> Iterator[Finding]:
    """TensorRT's INT4 is weight-only for GEMM: an INT4 conv weight fails to build."""
    for n in g.of("Conv"):
        w, src = _inp(n, 1), g.producer.get(_inp(n, 1))
        t = g.int_type(src) if src is not None and src.op_type == DQ else (g.consts[w].data_type if w in g.consts else None)
        if t in _INT4:
            yield (_name(n), f"weight is {TensorProto.DataType.Name(t)}; TensorRT needs INT8")


# Rule "zero-point" is checked by _zero_point and so on; a rule without its function fails at import.
_CHECKS: dict[str, Callable[[_Graph], Iterator[Finding]]] = {r: globals()["_" + r.replace("-", "_")] for r in RULES}


def check_trt_qdq(model: onnx.ModelProto) -> list[RuleViolation]:
    """All violations of the TensorRT explicit-quantization rules, in RULES order; [] means clean. A rule that
    trips over a malformed graph reports that as a violation of its own: a crash would hide the verdict."""
    g = _Graph(model)
    found: list[RuleViolation] = []
    for rule, check in _CHECKS.items():
        try:
            found.extend(RuleViolation(rule, node, message) for node, message in check(g))
        except Exception as e:  # a graph malformed enough to break a rule is a finding, not a crash
            found.append(RuleViolation(rule, "", f"could not be checked: {type(e).__name__}: {e}"))
    return found
