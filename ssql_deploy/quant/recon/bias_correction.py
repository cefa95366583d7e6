"""Bias correction (Nagel et al., 2019; Banner et al., 2019): remove the mean shift quantized weights add to a conv's output.

Rounding errors of a conv's weights rarely cancel per output channel: E[(W_q - W) x] is a constant
shift of every channel, which the BatchNorm after it amplifies. Per conv, in graph order, the
quantized model's own input x (so the earlier corrections are in it) gives that shift empirically,
padding included, and the conv adds its negative as `bias_correction`, a buffer of the quantizer
side only: the float model is untouched, and every layout and the export carry it (folded through
BatchNorm where the layout folds). Usable after plain rounding or after reconstruction.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ssql_deploy.errors import UserError
from ssql_deploy.progress import progress_bar
from ssql_deploy.quant.quantizer import QuantConv2d
from ssql_deploy.quant.recon.reconstruct import CHUNK, node_values


@torch.no_grad()
def correct_biases(gm: fx.GraphModule, images: list[torch.Tensor]) -> dict[str, Any]:
    """Set every quantized conv's bias correction in place; returns the largest correction per layer."""
    convs = [(n, gm.get_submodule(str(n.target))) for n in gm.graph.nodes if n.op == "call_module"]
    convs = [(n, m) for n, m in convs if isinstance(m, QuantConv2d) and m.weight_quantizer.enabled]
    if not convs:
        raise UserError("the model has no quantized layer to correct", "drop --bias-correction, or quantize some layers (--layer-bits)")
    data = torch.cat(images)
    shifts: dict[str, float] = {}
    with progress_bar() as bar:
        task = bar.add_task("bias correction", total=len(convs))
        for node, conv in convs:
            x = node_values(gm, node.args[0], data, quantized=True)  # type: ignore[arg-type]
            error = conv.weight_quantizer(conv.weight) - conv.weight
            shift = torch.zeros(conv.out_channels)
            for i in range(0, len(x), CHUNK):
                out = F.conv2d(x[i : i + CHUNK], error, None, conv.stride, conv.padding, conv.dilation, conv.groups)
                shift += out.sum(dim=(0, 2, 3)) / (out.shape[2] * out.shape[3])
            shift /= len(x)
            previous = conv.bias_correction if conv.bias_correction is not None else torch.zeros_like(shift)
            conv.bias_correction = previous - shift
            shifts[str(node.target)] = round(float(shift.abs().max()), 6)
            bar.advance(task)
    return {"layers": len(shifts), "largest_shift": shifts}
