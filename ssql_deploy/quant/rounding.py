"""Learned rounding of weights (AdaRound, Nagel et al. 2020) and the weight scale it rounds against.

Rounding to nearest is the best choice per weight but not per layer: at 4 bits and below the
errors of a layer's weights add up in its output. AdaRound learns, for each weight, whether it
rounds down or up: `floor(w / s) + h(alpha)`, with `h` a rectified sigmoid stretched to
[-0.1, 1.1] and clipped to [0, 1], so it can reach 0 and 1 exactly; a regulariser
`sum(1 - |2h - 1|^beta)`, with beta annealed from 20 to 2, pushes every h to 0 or 1 by the end.
The weights and the scale stay fixed; only `alpha` learns. `alpha` starts where h equals the
fractional part of `w / s`, i.e. at the float weight itself.

The scale: SSQL's `max|w| / ((2^b - 1) / 2)` wastes most of a 2- or 3-bit grid on the few largest
weights, so reconstruction first picks, per output channel, the clipping of max|w| that minimises
the squared rounding error (BRECQ's initialisation).
"""

import torch
from torch import nn

from ssql_deploy.quant.quantizer import WeightQuantizer

ZETA, GAMMA = 1.1, -0.1  # the stretch of the rectified sigmoid
CLIP_RATIOS = torch.linspace(0.2, 1.0, 81)


def mse_weight_scale(w: torch.Tensor, quantizer: WeightQuantizer) -> torch.Tensor:
    """Per output channel, the scale (a clipped max|w|) with the least squared rounding error on the quantizer's grid."""
    qmin, qmax = quantizer.qrange
    flat = w.detach().flatten(1).float()
    base = flat.abs().amax(dim=1).clamp_min(1e-8) / ((2**quantizer.bits - 1) / 2)  # SSQL's scale
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for ratio in CLIP_RATIOS.tolist():
        scale = (base * ratio).unsqueeze(1)
        err = ((torch.clamp(torch.round(flat / scale), qmin, qmax) * scale - flat) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, base * ratio, best)
    return best


class AdaRound(nn.Module):
    """The learned rounding of one layer's weights against a fixed per-channel scale."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, qrange: tuple[int, int]) -> None:
        super().__init__()
        self.qmin, self.qmax = qrange
        scaled = w.detach().float() / scale.reshape(-1, *([1] * (w.dim() - 1)))
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)  # h(alpha) = rest at the start
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False  # once frozen, or to evaluate the rounding the regulariser has settled on

    def soft(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self, hard: bool = False) -> torch.Tensor:
        """The integers: floor + h (soft, differentiable in alpha) or floor + [h >= 1/2] (hard)."""
        up = (self.alpha >= 0).to(self.floor.dtype) if hard or self.hard else self.soft()
        return torch.clamp(self.floor + up, self.qmin, self.qmax)  # type: ignore[operator]

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()


def start_rounding(quantizer: WeightQuantizer, w: torch.Tensor) -> AdaRound:
    """Give `quantizer` a learnable rounding of `w` against its MSE-optimal scale."""
    scale = mse_weight_scale(w, quantizer)
    quantizer.fixed, quantizer.fixed_scale = None, scale
    quantizer.rounding = AdaRound(w, scale, quantizer.qrange)
    return quantizer.rounding
