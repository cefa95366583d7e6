"""Projector and predictor MLPs, and the 8-bit-weight twin of a projector for SSQL's quantized branch.

Head layouts follow the SSQL reference: the SimSiam/BYOL projector is Linear-BN-ReLU, Linear-BN-ReLU,
Linear-BN (the last BN without affine, so the output scale is fixed and the Linear before it needs
no bias); MoCo v2/SimCLR use Linear-ReLU-Linear; the predictor is Linear-BN-ReLU-Linear.
"""

import torch
from torch import nn

from ssql_deploy.quant.quantizer import QuantLinear

PROJECTOR_WEIGHT_BITS = 8  # SSQL.md: projector weights 8-bit, outputs full precision


def projector(in_dim: int, hidden_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    if layers == 3:
        return nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
        )  # fmt: skip
    if layers == 2:
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    raise ValueError(f"projectors have 2 or 3 layers, not {layers}")


def predictor(dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )  # fmt: skip


def quantized_projector(head: nn.Sequential) -> nn.Sequential:
    """The same head with every Linear's weight fake-quantized to 8 bits.

    Parameters, BatchNorm modules and their running statistics are shared with `head` (no copy),
    so a gradient through either path lands on the same tensors.
    """
    layers = [QuantLinear.from_float(m, PROJECTOR_WEIGHT_BITS) if isinstance(m, nn.Linear) else m for m in head]
    return nn.Sequential(*layers)


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-channel std of the L2-normalized output: about 1/sqrt(d) when healthy, 0 at collapse.

    SimSiam's collapse monitor; returned as a tensor so the training loop never waits on it.
    """
    return nn.functional.normalize(z.detach().float(), dim=1).std(dim=0).mean()
