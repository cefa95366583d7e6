"""What the weights of an exported model take: the int8 file runtimes load, and the same weights packed at their widths.

A per-layer bit budget buys its saving only where the weights are stored packed: ONNX stores the
integers of a 4-bit conv in int8 tensors, because no runtime of runtimes.py executes convolutions
with 4-bit weights (ONNX Runtime's int4 support is MatMulNBits and DequantizeLinear for MatMul
weights; TensorRT's INT4 is weight-only GEMM), so an opset-21 int4 Conv graph would run slower in
float after dequantizing. The packed size is what a board without low-bit kernels stores (and
unpacks once at load), and the figure `--budget size-mb` plans for.
"""

from pathlib import Path
from typing import Any

from torch import fx

from ssql_deploy.quant.quantizer import QuantConv2d

INT4_NOTE = ("weights are stored as int8 in the ONNX file: no runtime here runs convolutions on int4 weights "
             "(ONNX Runtime: int4 for MatMul only; TensorRT: INT4 weight-only GEMM), so no opset-21 int4 graph is written")  # fmt: skip


def weight_storage(gm: fx.GraphModule, onnx_path: Path) -> dict[str, Any]:
    """Bytes of the ONNX file, of its quantized conv weights as int8, packed at their widths, and of the float parameters."""
    quantized = [(m.weight.numel(), m.weight_quantizer.bits, m.out_channels) for m in gm.modules() if isinstance(m, QuantConv2d)]
    quantized_ids = {id(m.weight) for m in gm.modules() if isinstance(m, QuantConv2d)}
    float_bytes = sum(4 * p.numel() for p in gm.parameters() if id(p) not in quantized_ids)
    scales = sum(4 * channels for _, _, channels in quantized)  # one float scale per output channel
    packed = sum(-(-n * bits // 8) for n, bits, _ in quantized)
    return {
        "onnx_file_bytes": onnx_path.stat().st_size,
        "quantized_weights_int8_bytes": sum(n for n, _, _ in quantized),
        "quantized_weights_packed_bytes": packed,
        "float_parameter_bytes": float_bytes,
        "packed_total_bytes": packed + scales + float_bytes,
        "note": INT4_NOTE if any(bits < 8 for _, bits, _ in quantized) else None,
    }
