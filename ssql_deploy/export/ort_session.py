"""ONNX Runtime sessions, and what ORT made of a graph after its own optimizations.

Users of INT8 tools keep finding that "INT8" ran slower than FP32 because the runtime never
fused the Q/DQ pairs (ONNX Runtime#17389, ModelOpt#80): we read ORT's optimized graph back and
count which convolutions really became integer kernels.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

if TYPE_CHECKING:  # onnx itself is needed only to read optimized graphs back, not to run a model (bench on a board)
    import onnx

INTEGER_CONV_OPS = ("QLinearConv", "ConvInteger")


def cpu_has_amx_int8() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def make_session(
    model: Path | bytes, threads: int | None = None, optimize: bool = True, provider: str = "CPUExecutionProvider"
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=[provider])


def optimized_graph(model: onnx.ModelProto) -> onnx.GraphProto:
    """The graph ONNX Runtime actually executes on this CPU, after its own fusions."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath).graph


def optimized_op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in optimized_graph(model).node)


_INTEGER_PRODUCERS = ("QuantizeLinear", "DynamicQuantizeLinear")
_PASS_ON = ("Clip", "MaxPool", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")  # keep their input's type
_NO_COMPUTE = ("DequantizeLinear", "Flatten", "Reshape", "Transpose", "Identity")
HEAD_WHY = "in the classification head, which stays float (as in SSQL: the classifier is not quantized)"
NO_KERNEL_WHY = "ONNX Runtime has no integer kernel for it here: it runs in float between DequantizeLinear and QuantizeLinear"


def float_ops(graph: onnx.GraphProto) -> dict[str, dict[str, Any]]:
    """Compute ops of an optimized graph that run on floats, by op type, with why.

    A tensor is integer when a QuantizeLinear or a QLinear* kernel made it, or a shape/selection op
    (Clip, MaxPool, ...) passed an integer tensor on. A float op from which no QuantizeLinear can be
    reached is in the float head; any other one is a float island the runtime could not fuse.
    """
    produced = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def is_integer(tensor: str) -> bool:
        node = produced.get(tensor)
        if node is None:
            return False
        if node.op_type in _INTEGER_PRODUCERS or node.op_type.startswith("QLinear"):
            return True
        return node.op_type in _PASS_ON and bool(node.input) and is_integer(node.input[0])

    def reaches_quantize(node: onnx.NodeProto, seen: set[str]) -> bool:
        for out in node.output:
            for user in consumers.get(out, []):
                if user.name in seen:
                    continue
                seen.add(user.name)
                if user.op_type in _INTEGER_PRODUCERS or user.op_type.startswith("QLinear") or reaches_quantize(user, seen):
                    return True
        return False

    found: dict[str, dict[str, Any]] = {}
    for node in graph.node:
        if node.op_type in _NO_COMPUTE or node.op_type in _INTEGER_PRODUCERS or node.op_type.startswith("QLinear"):
            continue
        if node.output and is_integer(node.output[0]):
            continue
        why = NO_KERNEL_WHY if reaches_quantize(node, set()) else HEAD_WHY
        entry = found.setdefault(node.op_type, {"count": 0, "why": why, "nodes": []})
        entry["count"] = int(entry["count"]) + 1
        entry["nodes"].append(node.name)  # type: ignore[union-attr]
        if why == NO_KERNEL_WHY:
            entry["why"] = why
    return found


def integer_conv_report(model: onnx.ModelProto) -> dict[str, Any]:
    """How many of the model's convolutions ORT runs as integer kernels, and which ops stay float, and why."""
    graph = optimized_graph(model)
    ops = Counter(node.op_type for node in graph.node)
    return {
        "convs": sum(1 for n in model.graph.node if n.op_type == "Conv"),
        "integer_convs": sum(ops[o] for o in INTEGER_CONV_OPS),
        "float_convs": ops["Conv"] + ops["FusedConv"],
        "dequantize_nodes_left": ops["DequantizeLinear"],
        "float_ops": float_ops(graph),
    }
