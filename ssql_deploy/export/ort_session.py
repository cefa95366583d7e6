"""ONNX Runtime sessions, and what ORT made of a graph after its own optimizations.

Users of INT8 tools keep finding that "INT8" ran slower than FP32 because the runtime never
fused the Q/DQ pairs (ONNX Runtime#17389, ModelOpt#80): we read ORT's optimized graph back and
count which convolutions really became integer kernels.
"""

import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

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


def optimized_op_counts(model: onnx.ModelProto) -> Counter[str]:
    """Operator counts of the graph ONNX Runtime actually executes on this CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    return Counter(node.op_type for node in optimized.graph.node)


def integer_conv_report(model: onnx.ModelProto) -> dict[str, int]:
    """How many of the model's convolutions ORT runs as integer kernels, and how many stay float."""
    ops = optimized_op_counts(model)
    return {
        "convs": sum(1 for n in model.graph.node if n.op_type == "Conv"),
        "integer_convs": sum(ops[o] for o in INTEGER_CONV_OPS),
        "float_convs": ops["Conv"] + ops["FusedConv"],
        "dequantize_nodes_left": ops["DequantizeLinear"],
    }
