"""SiLU and Hardswish as x times an 8-bit gate, so ONNX Runtime runs them on integers (the `ort` layout).

Why: ONNX Runtime has integer kernels for Sigmoid (a lookup table), Add and Mul, but none for SiLU,
Hardswish or HardSigmoid. Left whole, each of them runs in float between a DequantizeLinear and a
QuantizeLinear, once per block, and MobileNetV3 and EfficientNet ran slower in INT8 than in FP32.
Written as `x * q(gate(x))`, with the gate (sigmoid, or hardsigmoid) quantized to 8 bits on its
own range [0, 1], ORT fuses each into QLinearSigmoid (or QLinearAdd for the hard gate: hardsigmoid
is (x + 3) / 6 clamped, and the / 6 and the clamp are the gate's QuantizeLinear) and QLinearMul.
The gate's range is fixed, so nothing is calibrated; the PyTorch twin computes the same quantized
gate, so the export's parity check holds; the price is the gate's rounding, at most |x| / 510.

A squeeze-excite gate (a Sigmoid or Hardsigmoid alone) needs its input quantized in the `ort` layout
(the conv before it runs as QLinearConv). Calibrated, that range spans every pre-gate value seen, so
its steps are coarse exactly where the gate is steep. Past `saturation_bound` the gate gives its end
value on its own grid anyway, so the input range stops there at no cost and its steps get finer.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssql_deploy.quant.quantizer import fake_quant

GATE_QMAX = 255  # unsigned 8-bit: the gate's [0, 1] on 256 levels, zero-point 0
HARD_SHIFT = 3.0  # hardsigmoid(x) = clamp(x + 3, 0, 6) / 6
HARD_SPAN = 6.0
GATED = (nn.SiLU, nn.Hardswish)
SATURATING = (nn.Sigmoid, nn.Hardsigmoid)
GRID_MARGIN = 1.02


def saturation_bound(gate: nn.Module, gate_bits: int) -> float:
    """How far the range of `gate`'s input need reach when `gate` is quantized unsigned to `gate_bits` over [0, 1].

    sigmoid(x) rounds to the grid's end from |x| = ln(2 qmax - 1) on (within half a step of 0 or 1), hardsigmoid from
    |x| = 3. The bound is 2% beyond, because the end of an 8-bit input grid with a zero-point can fall up to half a
    step (1/255 of its span) short of its range, and rounding exactly at the gate's half step goes either way.
    """
    if isinstance(gate, nn.Hardsigmoid):
        return GRID_MARGIN * HARD_SHIFT
    if isinstance(gate, nn.Sigmoid):
        return GRID_MARGIN * math.log(2 * (2**gate_bits - 1) - 1)
    raise TypeError(f"{type(gate).__name__} is not a saturating gate")


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
