"""The state BYOL and MoCo carry between steps: an EMA target network and MoCo's key queue.

Both live in the method's state dict (so a checkpoint restores them) and both update from values
that are identical on every process (DDP-synchronised online weights, all-gathered keys), so every
replica keeps the same target and queue without extra communication.
"""

import copy

import torch
from torch import nn

from ssql_deploy.pretrain.collectives import gather


def frozen_copy(module: nn.Module) -> nn.Module:
    """The target starts as an exact copy of the online network and never receives gradients."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * online for every parameter (buffers keep their own statistics)."""
    t_params = list(target.parameters())
    o_params = [p.detach() for p in online.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)


class KeyQueue(nn.Module):
    """A ring buffer of L2-normalized keys, the negatives of InfoNCE (MoCo v2: 4096 x 256 on CIFAR)."""

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("queue", nn.functional.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue every process's keys, overwriting the oldest; wraps around any batch size."""
        keys = gather(keys)
        size = len(self.queue)
        if len(keys) >= size:
            self.queue.copy_(keys[-size:])
            return
        index = (self.ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue.index_copy_(0, index, keys)
        self.ptr.copy_((self.ptr + len(keys)) % size)
