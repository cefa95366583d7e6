"""Cross-process gathers the contrastive methods need, each a no-op without a process group.

MoCo's queue must receive every process's keys (else each rank keeps a different queue) and
SimCLR's negatives must span the global batch (else two processes optimize a weaker loss than one
process with the same global batch). The gradient-carrying gather sums the incoming gradients in
backward, so the DDP-averaged gradient equals the single-process gradient of the global loss.
"""

from typing import Any

import torch
import torch.distributed as tdist


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if world_size() > 1 else 0


@torch.no_grad()
def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of every process along dim 0 (no gradient)."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        ctx.n = len(t)
        return gather(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        tdist.all_reduce(grad)  # every process's loss contributes to this process's rows
        start = rank() * ctx.n
        return grad[start : start + ctx.n]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Like `gather`, but gradients flow back to this process's rows from every process's loss."""
    return t if world_size() == 1 else _GatherWithGrad.apply(t)


@torch.no_grad()
def gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between processes (kNN feature banks)."""
    if world_size() == 1:
        return t
    sizes = gather(torch.tensor([len(t)], device=t.device))
    longest = int(sizes.max())
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = gather(padded).split(longest)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])


@torch.no_grad()
def shuffled_across_processes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffling BN: this process's share of a globally permuted batch, and the inverse order.

    Keys computed from a batch mixed across processes cannot use per-process BN statistics to
    recognize their positive (MoCo sec. 3.3). Rank 0 draws the permutation and broadcasts it.
    """
    everyone = gather(x)
    order = torch.randperm(len(everyone), device=x.device)
    tdist.broadcast(order, src=0)
    mine = order.view(world_size(), -1)[rank()]
    return everyone[mine], torch.argsort(order)


@torch.no_grad()
def unshuffled(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    everyone = gather(x)
    return everyone[inverse.view(world_size(), -1)[rank()]]


@torch.no_grad()
def replicas_agree(tensors: list[torch.Tensor]) -> bool:
    """True when every process holds the same values (checksum compare): DDP and EMA kept in step."""
    if world_size() == 1:
        return True
    total = torch.stack([t.detach().double().sum() for t in tensors] + [torch.zeros((), dtype=torch.float64, device=tensors[0].device)])
    everyone = gather(total.unsqueeze(0))
    return bool(torch.allclose(everyone, everyone[0].expand_as(everyone), rtol=1e-9, atol=1e-9))
