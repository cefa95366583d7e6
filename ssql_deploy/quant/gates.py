"""SiLU and Hardswish as x times an 8-bit gate, so ONNX Runtime runs them on integers (the `ort` layout).

Why: ONNX Runtime has integer kernels for Sigmoid (a lookup table), Add and Mul, but none for SiLU,
Hardswish or HardSigmoid. Left whole, each of them runs in float between a DequantizeLinear and a
QuantizeLinear, once per block, and MobileNetV3 and EfficientNet ran slower in INT8 than in FP32.
Written as `x * q(gate(x))`, with the gate (sigmoid, or hardsigmoid) quantized to 8 bits on its
own range [0, 1], ORT fuses each into QLinearSigmoid (or QLinearAdd for the hard gate: hardsigmoid
is (x + 3) / 6 clamped, and the / 6 and the clamp are the gate's QuantizeLinear) and QLinearMul.
The gate's range is fixed, so nothing is calibrated; the PyTorch twin computes the same quantized
gate, so the export's parity check holds; the price is the gate's rounding, at most |x| / 510.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ssql_deploy.quant.quantizer import fake_quant

GATE_QMAX = 255  # unsigned 8-bit: the gate's [0, 1] on 256 levels, zero-point 0
HARD_SHIFT = 3.0  # hardsigmoid(x) = clamp(x + 3, 0, 6) / 6
HARD_SPAN = 6.0
GATED = (nn.SiLU, nn.Hardswish)


class GatedActivation(nn.Module):
    """SiLU (gate: sigmoid) or Hardswish (gate: hardsigmoid) with the gate on an 8-bit grid."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        if not isinstance(activation, GATED):
            raise TypeError(f"no gated form of {type(activation).__name__}")
        self.hard = isinstance(activation, nn.Hardswish)
        self.register_buffer("scale", torch.tensor(1.0 / GATE_QMAX), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.hardsigmoid(x) if self.hard else torch.sigmoid(x)
        return x * fake_quant(gate, self.scale, None, 0, GATE_QMAX)

    def extra_repr(self) -> str:
        return f"{'hardswish' if self.hard else 'silu'}, gate on uint8 [0, 1]"
