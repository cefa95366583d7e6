"""SSQL's quantized online branch: a fake-quant twin of the encoder and the per-step bit draw.

The twin is `quant.placement.prepare(backbone, "ssql", ...)`: an FX copy whose convs and BatchNorms
*are* the backbone's (same Parameter and module objects), with a weight quantizer on every conv and
an activation quantizer after every ReLU. One step runs the twin twice per view:

1. float pass (`float_pass`): every quantizer off, activation quantizers *observing*; this is the
   full-precision forward the loss needs anyway, and it records each activation's min/max;
2. quantized pass (`quantized_pass(bits)`): the drawn widths set, weights fake-quantized from the
   current weights (per channel, PSQ), activations from the ranges just observed, STE backward.

So the ranges come from the same step's float forward at no extra pass, and switching between the
two costs one flag sweep over ~40 quantizers per pass, no tensor work and no host sync. Each
weight is fake-quantized once per pass, not once per view (`_OncePerPass`), and each ReLU is
merged into the quantizer after it (`_ReLUThenQuantize`).
"""

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ssql_deploy.models.registry import ModelSpec
from ssql_deploy.pretrain.heads import quantized_projector
from ssql_deploy.quant.bits import BitSpec
from ssql_deploy.quant.config import STEM_BITS
from ssql_deploy.quant.placement import act_quantizers, prepare, weight_quantizers
from ssql_deploy.quant.quantizer import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer, fake_quant

# Any width but STEM_BITS: after `prepare`, the quantizers still at this width are the ones the
# per-step draw controls, those at STEM_BITS belong to the stem (kept at 8 bits, SSQL.md).
_PLACEHOLDER = BitSpec(2, 2)


@dataclass(frozen=True)
class BitRanges:
    """Inclusive ranges the weight and activation widths are drawn from (SSQL: w 2-8, a 4-8)."""

    w: tuple[int, int] = (2, 8)
    a: tuple[int, int] = (4, 8)


class BitSampler:
    """One (w, a) pair per step, uniform and independent, from its own seeded generator.

    Its own generator (not the global one) makes the draw identical on every DDP process and
    unaffected by how many random numbers data augmentation consumed; its state is checkpointed.
    """

    def __init__(self, ranges: BitRanges, seed: int) -> None:
        self.ranges = ranges
        self._rng = random.Random(seed)

    def draw(self) -> BitSpec:
        return BitSpec(self._rng.randint(*self.ranges.w), self._rng.randint(*self.ranges.a))

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


class _OncePerPass(nn.Module):
    """A layer's `WeightQuantizer`, evaluated once per pass however many views go through the layer.

    Both views of a step see the same weights, so their fake-quantized weights are identical, and
    PyTorch's per-channel fake-quant kernel costs per element about what a conv costs per output:
    reusing the first view's result (it stays in the autograd graph, both views' gradients
    accumulate through it) halves the branch's weight-quantization work and changes nothing else.
    """

    def __init__(self, inner: WeightQuantizer) -> None:
        super().__init__()
        self.inner = inner
        self.cached: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.inner.enabled:
            return w
        if self.cached is None:
            self.cached = self.inner(w)
        return self.cached


class _ReLUThenQuantize(nn.Module):
    """A ReLU and the post-ReLU activation quantizer after it, as one graph step.

    Float pass: the ReLU, then the quantizer observing its range, as before. Quantized pass: the
    quantizer's clamp at 0 already is the ReLU and its gradient window starting at 0 is the ReLU's
    gradient, so the ReLU's own forward and backward passes over the tensor (two of the eight
    elementwise passes a quantized activation took) are skipped; the result is identical.
    """

    def __init__(self, relu: nn.Module, quantizer: ActQuantizer) -> None:
        super().__init__()
        self.relu = relu
        self._quantizer = [quantizer]  # a list: the quantizer stays registered (and found) where it was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantizer = self._quantizer[0]
        if not quantizer.enabled:
            return quantizer(self.relu(x))
        p = quantizer.qparams()
        return fake_quant(x, p.scale, None, p.qmin, p.qmax, relu=True)


def _merge_relus(gm: fx.GraphModule) -> None:
    """Replace every `relu -> post-ReLU quantizer` pair of the twin's graph by one `_ReLUThenQuantize`."""
    for node in list(gm.graph.nodes):
        quantizer = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not (isinstance(quantizer, ActQuantizer) and quantizer.nonnegative and not quantizer.signed):
            continue
        relu = node.args[0]
        relu_module = gm.get_submodule(str(relu.target)) if isinstance(relu, fx.Node) and relu.op == "call_module" else None
        if not isinstance(relu_module, nn.ReLU) or len(relu.users) != 1:
            continue
        name = f"relu_{node.target}"
        gm.add_submodule(name, _ReLUThenQuantize(relu_module, quantizer))
        node.target, node.args = name, relu.args
        gm.graph.erase_node(relu)
    gm.graph.lint()
    gm.recompile()


class QuantizedBranch:
    """The fake-quant twin of (backbone, projector), sharing every parameter and BN with them.

    Deliberately not an `nn.Module`: registering the twin would put each shared tensor twice into
    state dicts and DDP's bucket list, and its own buffers (activation ranges) are per-step scratch.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Sequential, device: torch.device, spec: ModelSpec | None = None) -> None:
        self.backbone: fx.GraphModule = prepare(backbone, "ssql", _PLACEHOLDER, spec).to(device)
        _merge_relus(self.backbone)
        self.float_projector = projector
        self.quant_projector = quantized_projector(projector)
        self._acts: list[ActQuantizer] = list(act_quantizers(self.backbone).values())
        self._weights: list[WeightQuantizer] = list(weight_quantizers(self.backbone).values())
        self._drawn_acts = [q for q in self._acts if q.bits != STEM_BITS]
        self._drawn_weights = [q for q in self._weights if q.bits != STEM_BITS]
        self._memos: list[_OncePerPass] = []
        for layer in [*self.backbone.modules(), *self.quant_projector]:
            if isinstance(layer, (QuantConv2d, QuantLinear)):
                memo = _OncePerPass(layer.weight_quantizer)
                layer.weight_quantizer = memo  # type: ignore[assignment]
                self._memos.append(memo)
        self._quantized = False
        self.bits: BitSpec | None = None

    def float_pass(self) -> None:
        """Quantizers off, activation ranges reset and observing: the next forwards are full precision."""
        for q in self._acts:
            q.enabled = False
            q.observing = True
            q.reset_range()
        for w in self._weights:
            w.enabled = False
        for memo in self._memos:
            memo.cached = None  # the optimizer has moved the weights since the last pass
        self._quantized = False

    def quantized_pass(self, bits: BitSpec) -> None:
        """Freeze the observed ranges and quantize at `bits` (the stem stays at 8 bits)."""
        for q in self._acts:
            q.observing = False
            q.enabled = True
        for q in self._drawn_acts:
            q.bits = bits.a
        for w in self._weights:
            w.enabled = True
        for w in self._drawn_weights:
            w.bits = bits.w
        for memo in self._memos:
            memo.cached = None
        self._quantized = True
        self.bits = bits

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Projector output of the twin in the current pass (8-bit projector weights when quantized)."""
        head = self.quant_projector if self._quantized else self.float_projector
        return head(self.backbone(x))

    def quantizers(self) -> tuple[list[ActQuantizer], list[WeightQuantizer]]:
        return self._acts, self._weights
