"""The three layouts as data: what each one quantizes beyond the SSQL placement, and how its ONNX graph is written.

A layout is the contract between a quantized model and the runtime that executes it. Placement
(placement.py) reads the first group of fields to decide where quantizers go; the ONNX emitter
(export/onnx_graph.py) reads the second group to decide how each Q/DQ, bias and pool is written.
Neither branches on a runtime's name, so a new runtime is a new row here (and one in runtimes.py).

- `ssql`: the SSQL reference placement; the network input stays float. What `quantize` simulates.
- `ort`: ONNX Runtime's integer kernels. BatchNorm folded, 8-bit quantizers on the network input,
  on both inputs of every residual Add and on a conv output feeding an activation ORT cannot fuse
  into the conv (Hardswish, SiLU, sigmoids), so every conv sits between DequantizeLinear and
  QuantizeLinear and runs as QLinearConv; biases on QLinearConv's int32 grid; low-bit activations
  as Q -> Clip(integers) -> DQ; max-pooling on the integers; a ReLU6 whose quantizer already
  saturates at 6 written as Relu (ORT fuses Relu into QLinearConv, and a Clip only when it spans the
  whole uint8 range); SiLU and Hardswish as x times an 8-bit gate and a Hardsigmoid before its
  quantizer as an Add of 3, so ORT runs them as QLinearSigmoid/QLinearAdd and QLinearMul (gates.py).
- `trt`: TensorRT's explicit-quantization rules (DEPLOY.md): symmetric signed int8 only, the
  network input and every conv input quantized, a Q/DQ pair on the skip input of each Add only,
  BatchNorm left for TensorRT to fuse, low-bit activations as a float Clip before Q, float biases.
  Non-negative activations below 8 bits keep their exact unsigned grid inside int8; at 8 bits they
  are re-expressed as signed int8 (127 positive levels) because TensorRT has no uint8.

No torch here: the CLI and pipeline planning read these names without loading a model.
"""

from dataclasses import dataclass
from typing import Literal

Layout = Literal["ssql", "ort", "trt"]


@dataclass(frozen=True)
class LayoutRules:
    # placement
    quantize_input: bool
    signed: bool  # symmetric signed int8 everywhere
    add_inputs: Literal["none", "both", "skip"]
    preactivation: bool  # quantize a conv output feeding an activation the runtime cannot fuse
    # graph
    fold_bn: bool
    low_bit_clip: Literal["integer", "float"]  # Clip on the integers between Q and DQ, or on the floats before Q
    int32_bias: bool  # conv biases on the integer kernel's grid (input scale x weight scale)
    integer_pool: bool  # MaxPool on the integers (it commutes with a monotone Q)
    relu6_as_relu: bool  # a ReLU6 whose quantizer clamps at 6 anyway is written as Relu
    integer_gates: bool  # SiLU and Hardswish as x * an 8-bit gate, Hardsigmoid as an integer Add (quant/gates.py)
    weight_zero_points: tuple[int, ...]  # allowed weight zero-points (-1 selects ORT's QGEMM path)


LAYOUTS: dict[Layout, LayoutRules] = {
    "ssql": LayoutRules(quantize_input=False, signed=False, add_inputs="none", preactivation=False, fold_bn=False,
                        low_bit_clip="integer", int32_bias=False, integer_pool=False, relu6_as_relu=False, integer_gates=False,
                        weight_zero_points=(0,)),
    "ort": LayoutRules(quantize_input=True, signed=False, add_inputs="both", preactivation=True, fold_bn=True,
                       low_bit_clip="integer", int32_bias=True, integer_pool=True, relu6_as_relu=True, integer_gates=True,
                       weight_zero_points=(0, -1)),
    "trt": LayoutRules(quantize_input=True, signed=True, add_inputs="skip", preactivation=False, fold_bn=False,
                       low_bit_clip="float", int32_bias=False, integer_pool=False, relu6_as_relu=False, integer_gates=False,
                       weight_zero_points=(0,)),
}  # fmt: skip
