"""The four SSL objectives and how each method combines them over two views and two branches.

Every loss here stops the gradient at its target argument itself, so a caller cannot forget it.
All symmetric losses are the mean of both directions, which keeps the scale of a method's loss the
same with and without SSQL (SSQL.md: 1/2 quantized term + 1/2 full-precision term).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

PairLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, sg z), averaged over the batch: -1 is perfect agreement."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalized squared error ||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, sg z), batch mean."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def symmetric(loss: PairLoss, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """1/2 loss(p1, z2) + 1/2 loss(p2, z1): each view predicts the other."""
    return 0.5 * (loss(p1, z2) + loss(p2, z1))


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: the positive key k against the queued negatives (rows of `queue`).

    `q`, `k` and the queue rows must be L2-normalized; the positive sits at logit index 0.
    """
    positive = (q * k.detach()).sum(dim=1, keepdim=True)
    negatives = q @ queue.detach().t()
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    all_z1: torch.Tensor | None = None,
    all_z2: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views: each view's positive is its twin, every other view a negative.

    Under DDP pass the views of every process as `all_z1`/`all_z2` (this process's rows starting at
    `offset`): the local 2B views are the queries, all 2N views the candidates, so negatives come
    from the global batch. Inputs must be L2-normalized.
    """
    all_z1 = z1 if all_z1 is None else all_z1
    all_z2 = z2 if all_z2 is None else all_z2
    n_local, n_all = len(z1), len(all_z1)
    queries = torch.cat([z1, z2])
    candidates = torch.cat([all_z1, all_z2])
    logits = queries @ candidates.t() / temperature
    local = torch.arange(n_local, device=z1.device) + offset
    self_index = torch.cat([local, local + n_all])
    logits = logits.masked_fill(F.one_hot(self_index, 2 * n_all).bool(), float("-inf"))
    positive = torch.cat([local + n_all, local])
    return F.cross_entropy(logits, positive)


def ssql_combine(quantized: torch.Tensor, full_precision: torch.Tensor | None) -> torch.Tensor:
    """SSQL.md: 1/2 quantized-branch loss + 1/2 full-precision (auxiliary) loss; without it, the first alone."""
    return quantized if full_precision is None else 0.5 * (quantized + full_precision)
