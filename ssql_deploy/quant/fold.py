"""Fold BatchNorm into the preceding convolution, as ONNX Runtime's integer kernels need.

A QLinearConv has an int32 bias on the scale s_x * s_w and no BatchNorm after it, so the model
simulated for ORT must be the folded one with that bias: only then does PyTorch compute what the
artifact computes. Per-channel symmetric weight quantization commutes with folding (each output
channel is scaled by |gain|; its integers keep their magnitude), so the weights stay the same.
"""

from dataclasses import dataclass

import torch
from torch import fx, nn


@dataclass(frozen=True)
class Folded:
    gains: dict[str, torch.Tensor]  # each folded conv's per-channel gain, by module path
    producers: dict[str, fx.Node]  # each removed BatchNorm node's name -> the conv node now computing its value


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(y) = gain * y + shift with the running statistics."""
    assert bn.running_mean is not None and bn.running_var is not None
    gain = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return gain.float(), (bn.bias.detach() - bn.running_mean * gain).float()


def fold_batchnorm(gm: fx.GraphModule) -> Folded:
    """Fold every Conv2d -> BatchNorm2d pair of `gm` in place."""
    gains: dict[str, torch.Tensor] = {}
    producers: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv = gm.get_submodule(str(src.target))
        if type(conv) is not nn.Conv2d:
            continue
        gain, shift = bn_affine(gm.get_submodule(str(node.target)))  # type: ignore[arg-type]
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, True, conv.padding_mode)  # fmt: skip
        with torch.no_grad():
            fused.weight.copy_(conv.weight * gain.reshape(-1, 1, 1, 1))
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(gain)
            fused.bias.copy_(bias * gain + shift)
        parent, _, leaf = str(src.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gains[str(src.target)] = gain
        producers[node.name] = src
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return Folded(gains, producers)
