"""Fake-quantizers and the conv/linear layers that hold them.

One quantizer serves every stage: SSQL pretraining (ranges recomputed each step from the
full-precision forward), post-training quantization (ranges from a calibrator) and LSQ
(learned step sizes). Weight quantization is per output channel, symmetric and signed with
SSQL's scale max|w| / ((2^b - 1) / 2) on the narrow range [-(2^(b-1)-1), 2^(b-1)-1];
activations are per tensor, either unsigned with a zero-point (post-ReLU tensors, ORT's uint8)
or symmetric signed (TensorRT's int8).
"""

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssql_deploy.quant.calibrators import Calibrator

_EPS = 1e-8


def random_mask(shape: torch.Size | tuple[int, ...], share: float, generator: torch.Generator | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """1 at a `share` of the positions (rounded to 1/256), at random, 0 elsewhere: QDrop's values that stay quantized.

    Each position gets as few random bits as `share` needs (1 at QDrop's 0.5, at most 8), 64 of them drawn as one word:
    the CPU generator draws serially, and drawing was most of what a mask cost. Below 8 bits each random byte looks
    up its positions' 0/1 bytes, packed in one integer, in a table; with a whole byte per position, comparing in float
    arithmetic is faster than a lookup. The mask is 0/1 in `dtype`, not boolean: on CPU a `torch.where` on a boolean
    tensor, or a product with one, ran many times slower than the same float arithmetic (`torch.lerp` with the mask).
    """
    n = math.prod(shape)
    threshold = round(share * 256)
    bits = next(b for b in (1, 2, 4, 8) if threshold % (256 >> b) == 0)
    words = torch.empty(-(-n * bits // 64), dtype=torch.int64).random_(-(2**63), None, generator=generator)
    if bits == 8:  # >= 1 below the threshold, <= 0 from it
        return words.view(torch.uint8)[:n].to(dtype).neg_().add_(threshold).clamp_(0, 1).view(shape)
    packed = _mask_table(bits, threshold >> (8 - bits)).index_select(0, words.view(torch.uint8).int())
    return packed.view(torch.uint8)[:n].to(dtype).view(shape)


@functools.cache
def _mask_table(bits: int, threshold: int) -> torch.Tensor:
    """Entry v: one 0/1 byte per position whose random `bits` are packed in byte v, 1 where they are below `threshold`."""
    fields = torch.arange(256).unsqueeze(1).bitwise_right_shift(torch.arange(0, 8, bits)).bitwise_and(2**bits - 1)
    packed = {1: torch.int64, 2: torch.int32, 4: torch.int16}[bits]
    return fields.lt(threshold).to(torch.uint8).view(packed).view(-1)


@functools.cache
def _open_bounds(qmin: int, qmax: int, dtype: torch.dtype) -> tuple[float, float]:
    """The nearest values of `dtype` outside [qmin, qmax]: an open interval on them is the closed one on qmin and qmax."""
    lo, hi = torch.tensor([qmin, qmax], dtype=dtype), torch.tensor([-math.inf, math.inf], dtype=dtype)
    return float(torch.nextafter(lo[0], hi[0])), float(torch.nextafter(lo[1], hi[1]))


@dataclass(frozen=True)
class QParams:
    """What a deployed Q/DQ pair needs: scale, zero-point and the integer clamp range."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int


def signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_range(bits: int) -> tuple[int, int]:
    """Symmetric narrow range: SSQL's grid reaches -2^(b-1) only for a value at exactly -max|w|,
    with the same error as clamping it to -(2^(b-1)-1), so dropping that level costs nothing and
    frees one integer for the exporter's weight zero-point (see export/onnx_graph.py)."""
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


class _FakeQuant(torch.autograd.Function):
    """Quantize-dequantize with the straight-through estimator: gradient 1 where x rounds into the
    clamp range, 0 outside.

    Speed decides how this is written: in SSQL pretraining the fake quantization is all that a
    quantized pass costs on top of a float one, and it runs on every activation twice per step.
    torch.fake_quantize_per_*_affine (one kernel, but not vectorised) took several times as long
    here as the in-place chain below. The backward is one pass with no mask: with u = x / scale,
    round(u) + zp lies in [qmin, qmax] exactly when u lies in the open window
    (qmin - zp - 0.5, qmax - zp + 0.5) (ties aside), and a window test with constant bounds is one
    fused, vectorised kernel (hardtanh's backward); a saved boolean mask with torch.where took
    several times as long. With `relu` the clamp at qmin = 0 is the ReLU and the window starting
    at 0 is its gradient, so a preceding ReLU can be dropped (see pretrain/ssql_branch.py).
    Rounding is x / scale, half-to-even, exactly as ONNX Runtime's QuantizeLinear computes it:
    multiplying by 1/scale instead (as torch's own kernels do) flips values that sit at a rounding
    tie, and each flip cascades through the layers after it, so the exported graph would drift
    from its simulation layer by layer (tests/test_export.py bounds that drift). On this
    memory-bound chain the division costs no more than the multiplication.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int, relu: bool
    ) -> torch.Tensor:
        q = torch.div(x, scale).round_()
        if zero_point is None:
            q.clamp_(qmin, qmax)
        else:
            q.add_(zero_point).clamp_(qmin, qmax).sub_(zero_point)
        if x.requires_grad:
            ctx.save_for_backward(x, scale.reciprocal(), zero_point)
            ctx.window = (0.0 if relu else qmin - 0.5, qmax + 0.5)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, inverse, zero_point = ctx.saved_tensors
        low, high = ctx.window
        if zero_point is not None:  # an asymmetric grid, never after a ReLU: rare enough to read zp on the host
            low, high = low - float(zero_point), high - float(zero_point)
        u = torch.mul(x, inverse)  # recomputed, not saved: one allocation fewer in all
        return torch.ops.aten.hardtanh_backward.grad_input(grad, u, low, high, grad_input=u), None, None, None, None, None


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int, relu: bool = False
) -> torch.Tensor:
    """`scale` is a scalar (per tensor) or broadcasts to x (per channel); `zero_point` a scalar, or None for 0.

    `relu=True` quantizes relu(x) (forward and gradient) from x itself; it needs qmin = 0 and no zero-point.
    """
    if relu and (qmin != 0 or zero_point is not None):
        raise ValueError("a fused ReLU needs an unsigned grid starting at 0 with zero-point 0")
    return _FakeQuant.apply(x, scale, zero_point, qmin, qmax, relu)


class _LsqFakeQuant(torch.autograd.Function):
    """Learned step size quantization (Esser et al. 2020) as one function: STE through round, LSQ's step gradient.

    Written out rather than composed from autograd ops (divide, clamp, round-with-STE, multiply, the
    gradient-scale trick): composed, each op keeps its own copy of the tensor for backward and runs
    its own pass, and rounding reconstruction runs this on every activation of a block per step.
    d out / d x = 1 where x / s lies in [qmin, qmax], else 0; d out / d s = round(x/s) - x/s inside,
    qmin or qmax outside, times the gradient scale.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_factor: float,
                kept: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(x, step, kept)
        ctx.bounds = (qmin, qmax, grad_factor)
        out = torch.div(x, step).clamp_(qmin, qmax).round_().mul_(step)
        return out if kept is None else torch.lerp(x, out, kept)  # exactly out where 1, x where 0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Float arithmetic only: on CPU a boolean mask in a product or a torch.where costs many times as much.
        x, step, kept = ctx.saved_tensors
        qmin, qmax, factor = ctx.bounds
        u = torch.div(x, step)
        if kept is not None:  # a dropped value (kept 0) gets u = 0, inside the grid: gradient 1 to x, and
            u.mul_(kept)  # round(0) - 0 = 0 to the step, on which a value passed on as it is does not depend
        grad_x = grad_step = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.hardtanh_backward(grad, u, *_open_bounds(qmin, qmax, u.dtype))  # grad on [qmin, qmax]
        if ctx.needs_input_grad[1]:
            clamped = u.clamp(qmin, qmax)
            outside = u.sub_(clamped).abs_().sign_()
            # inside, round(u) - u; outside, clamped is qmin or qmax, an integer, so that term is 0 and clamped is added
            d_step = torch.round(clamped).sub_(clamped).addcmul_(clamped, outside)
            grad_step = (grad * d_step).sum_to_size(step.shape) * factor
        return grad_x, grad_step, None, None, None, None


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_factor: float,
                   kept: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Learned step size quantization: `step` broadcasts to x (per tensor or per channel).

    `kept` (QDrop, 0/1 from `random_mask`) marks the values that are quantized, the others being passed on as they are:
    applied inside, the backward pass needs no split of the gradient between the two branches.
    """
    return _LsqFakeQuant.apply(x, step, qmin, qmax, grad_factor, kept)


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric signed weight quantizer.

    Without a learned step the scale follows the current weights every call (SSQL's PSQ, which is
    also min-max PTQ for weights); `init_lsq` turns the scale into a learned parameter. Rounding
    reconstruction (recon/) learns the rounding of each weight against a fixed scale (`rounding`,
    an AdaRound), then `fix` keeps the chosen integers and that scale: from then on the quantizer
    returns exactly them, whatever the float weights (which the float model still shares) hold.
    """

    fixed: torch.Tensor | None  # the reconstructed integers (int8), with their scale in `fixed_scale`
    fixed_scale: torch.Tensor | None

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.enabled = True
        self.step: nn.Parameter | None = None
        self.rounding: nn.Module | None = None  # an AdaRound while its rounding is being learned
        self.register_buffer("fixed", None)
        self.register_buffer("fixed_scale", None)

    @property
    def qrange(self) -> tuple[int, int]:
        return weight_range(self.bits)

    def minmax_scale(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.detach().abs().flatten(1).amax(dim=1).clamp_min(_EPS)
        return amax / ((2**self.bits - 1) / 2)

    def _own_scale(self, w: torch.Tensor) -> torch.Tensor:
        if self.fixed_scale is not None:
            return self.fixed_scale
        return self.minmax_scale(w) if self.step is None else self.step.detach().abs().clamp_min(_EPS)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-channel scale the weights are exported with.

        A channel whose integers are all zero uses its scale only for its bias, which an integer
        kernel holds on the int32 grid s_x * s_w: it takes the median scale of the layer's other
        channels, so that bias survives. LSQ can grow such a channel's step without bound (a
        MobileNetV2 stem channel's reached 78): its 0.108 bias then rounded to 0 in QLinearConv
        and the export scored 57% where the simulation scored 90%.
        """
        scale = self._own_scale(w)
        dead = (self.integers(w) == 0).flatten(1).all(dim=1)
        if dead.any() and not dead.all():
            scale = scale.clone()
            scale[dead] = scale[~dead].median()
        return scale

    def fix(self, integers: torch.Tensor, scale: torch.Tensor) -> None:
        """Keep these integers (one output channel per row) and per-channel scale as the quantized weight."""
        self.fixed = integers.detach().round().clamp(*self.qrange).to(torch.int8)
        self.fixed_scale = scale.detach().float().reshape(-1).clone()
        self.rounding = None

    def init_lsq(self, w: torch.Tensor, rule: str = "calibrated") -> None:
        """Seed the learned step from the PTQ range (default) or LSQ's 2*mean|w|/sqrt(Qp) rule."""
        if rule == "lsq":
            init = 2 * w.detach().abs().flatten(1).mean(dim=1) / math.sqrt(self.qrange[1])
        else:
            init = self.minmax_scale(w)
        self.step = nn.Parameter(init.clamp_min(_EPS))

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed.float()
        if self.rounding is not None:
            return self.rounding(hard=True).detach()  # type: ignore[operator]
        qmin, qmax = self.qrange
        return torch.clamp(torch.round(w.detach() / self._view(self._own_scale(w), w)), qmin, qmax)

    @staticmethod
    def _view(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return scale.reshape(-1, *([1] * (w.dim() - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.fixed is not None:
            return self.fixed.to(w.dtype) * self._view(self.fixed_scale, w)  # type: ignore[arg-type]
        if self.rounding is not None:
            return self.rounding() * self._view(self._own_scale(w), w)
        qmin, qmax = self.qrange
        if self.step is not None:
            factor = 1.0 / math.sqrt(w[0].numel() * qmax)
            return lsq_fake_quant(w, self._view(self.step.abs().clamp_min(_EPS), w), qmin, qmax, factor)
        return fake_quant(w, self._view(self.minmax_scale(w), w), None, qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, lsq={self.step is not None}, fixed={self.fixed is not None}"


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer inserted at one graph edge.

    `observing` keeps a running min/max of what flows through (SSQL takes the quantized branch's
    ranges from the full-precision forward of the same step this way, with no extra pass);
    `calibrator` collects statistics for PTQ; `enabled` applies the fake quantization.
    """

    def __init__(self, bits: int, signed: bool, nonnegative: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.signed = signed
        self.nonnegative = nonnegative  # follows a ReLU
        self.enabled = False
        self.observing = False
        self.calibrator: Calibrator | None = None
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.step: nn.Parameter | None = None
        self.drop_prob = 0.0  # QDrop, during reconstruction only: the share of values passed on unquantized
        self.drop_generator: torch.Generator | None = None
        self.saturation: float | None = None  # set when a saturating gate alone reads it (gates.saturation_bound)

    def reset_range(self) -> None:
        self.lo.fill_(math.inf)
        self.hi.fill_(-math.inf)

    def set_range(self, lo: float, hi: float) -> None:
        if self.saturation is not None:  # values past it all give the gate's end value: no need to tell them apart
            lo, hi = max(lo, -self.saturation), min(hi, self.saturation)
        self.lo.fill_(lo)
        self.hi.fill_(hi)

    @property
    def qrange(self) -> tuple[int, int]:
        return signed_range(self.bits) if self.signed else (0, 2**self.bits - 1)

    def qparams(self) -> QParams:
        qmin, qmax = self.qrange
        if self.step is not None:
            scale = self.step.detach().abs().clamp_min(_EPS).reshape(())
            return QParams(scale, torch.zeros((), dtype=torch.int32), qmin, qmax)
        lo = torch.clamp(self.lo, max=0.0)  # zero must be exactly representable (padding, ReLU)
        hi = torch.clamp(self.hi, min=0.0)
        if self.signed:
            scale = (torch.maximum(-lo, hi) / qmax).clamp_min(_EPS)
            zero = torch.zeros((), dtype=torch.int32)
        else:
            scale = ((hi - lo) / qmax).clamp_min(_EPS)
            zero = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
        return QParams(scale, zero, qmin, qmax)

    @property
    def learns_step(self) -> bool:
        """LSQ's step needs a zero-point of 0: a symmetric grid, or an unsigned one whose range starts at 0. An unsigned
        grid with a zero-point (signed values, as a linear bottleneck's, on uint8) keeps its calibrated range instead."""
        return self.signed or float(self.lo) >= 0

    def init_lsq(self, rule: str = "calibrated", sample: torch.Tensor | None = None) -> None:
        """Seed the learned step from the calibrated range or LSQ's rule on a sample activation."""
        if not self.learns_step:
            raise ValueError("LSQ is only defined here for post-ReLU (zero-based) or symmetric activations")
        if rule == "lsq":
            if sample is None:
                raise ValueError("LSQ's init rule needs a sample activation")
            init = 2 * sample.detach().abs().mean() / math.sqrt(self.qrange[1])
        else:
            init = self.qparams().scale
        self.step = nn.Parameter(init.reshape(1).clamp_min(_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            lo, hi = torch.aminmax(x.detach())
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))
        if self.calibrator is not None:
            self.calibrator.collect(x.detach())
        if not self.enabled:
            return x
        if self.step is not None:
            qmin, qmax = self.qrange
            factor = 1.0 / math.sqrt(x[0].numel() * qmax)
            return lsq_fake_quant(x, self.step.abs().clamp_min(_EPS), qmin, qmax, factor, self._kept_mask(x))
        p = self.qparams()
        # A post-ReLU range starts at 0 and a signed one is symmetric: their zero-point is 0, no need to apply it.
        zero = None if self.signed or self.nonnegative else p.zero_point.to(x.dtype)
        q = fake_quant(x, p.scale, zero, p.qmin, p.qmax)
        kept = self._kept_mask(x)
        return q if kept is None else torch.lerp(x, q, kept)

    def _kept_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        return random_mask(x.shape, 1 - self.drop_prob, self.drop_generator, x.dtype) if self.drop_prob > 0 else None

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {kind}, lsq={self.step is not None}"


class QuantConv2d(nn.Conv2d):
    """A Conv2d whose weight passes through a `WeightQuantizer` (shared parameters, no copy).

    With `quantize_bias_with(input_quantizer)` the bias is rounded to the int32 grid s_x * s_w
    that ONNX Runtime's QLinearConv uses, so the simulation matches the integer kernel.
    """

    weight_quantizer: WeightQuantizer
    _input_quantizer: "list[ActQuantizer]"
    bias_correction: torch.Tensor | None  # per output channel, added to the bias (bias_correction.py)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int) -> "QuantConv2d":
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.weight_quantizer = WeightQuantizer(bits)
        q.register_buffer("bias_correction", None)
        return q

    def effective_bias(self) -> torch.Tensor | None:
        """The float bias with the bias correction (if any) applied: what the quantized layer adds."""
        if self.bias_correction is None:
            return self.bias
        return self.bias_correction if self.bias is None else self.bias + self.bias_correction

    def quantize_bias_with(self, input_quantizer: ActQuantizer) -> None:
        self._input_quantizer = [input_quantizer]  # a list, so it is not registered as a submodule

    def bias_scale(self) -> torch.Tensor | None:
        source = getattr(self, "_input_quantizer", None)
        if source is None or self.effective_bias() is None or not (source[0].enabled and self.weight_quantizer.enabled):
            return None
        return source[0].qparams().scale * self.weight_quantizer.scale(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias, scale = self.effective_bias(), self.bias_scale()
        if bias is not None and scale is not None:
            bias = bias + (torch.round(bias / scale) * scale - bias).detach()
        return self._conv_forward(x, self.weight_quantizer(self.weight), bias)


class QuantLinear(nn.Linear):
    """A Linear whose weight passes through a `WeightQuantizer` (SSQL's 8-bit projector)."""

    weight_quantizer: WeightQuantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.weight, q.bias = linear.weight, linear.bias
        q.weight_quantizer = WeightQuantizer(bits)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)
