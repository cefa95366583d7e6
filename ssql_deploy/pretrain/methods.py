"""The seven pretraining methods as modules with one interface: `forward(x1, x2) -> (loss, stats)`.

Each holds `backbone` (the registry's network with its head replaced by Identity, what pretraining
exports), `projector`, and whatever the method needs besides (predictor, EMA target, key queue,
quantized branch). `after_step()` runs after the optimizer step (EMA updates). `stats` values are
tensors or ints, never synced to the host here, so the training loop decides when to read them.

The SSQL variants subclass their base method: the float forward goes through the quantized
branch's twin with quantizers off (observing ranges), then the quantized forward at the drawn
bits; loss = 1/2 quantized term + 1/2 float term (SSQL.md), each term the base method's loss.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssql_deploy.models import feature_extractor, model_spec
from ssql_deploy.pretrain.collectives import (
    gather_with_grad,
    rank,
    shuffled_across_processes,
    unshuffled,
    world_size,
)
from ssql_deploy.pretrain.config import method_info, parse_bit_range
from ssql_deploy.pretrain.heads import normalized_std, predictor, projector
from ssql_deploy.pretrain.losses import byol_loss, info_nce, negative_cosine, nt_xent, ssql_combine, symmetric
from ssql_deploy.pretrain.momentum import KeyQueue, ema_update, frozen_copy
from ssql_deploy.pretrain.ssql_branch import BitRanges, BitSampler, QuantizedBranch
from ssql_deploy.recipe import PretrainRecipe

Stats = dict[str, Any]
Views = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SSQLSettings:
    ranges: BitRanges = BitRanges()
    seed: int = 0
    aux_loss: bool = True  # the 1/2 float term (paper Table 8 (h) vs (i))
    quantize_target: bool = False  # ablation: targets from the quantized branch too (SimSiam only)
    arch: str | None = None  # the registry's name of the backbone: its stem stays at 8 bits


class SSLMethod(nn.Module):
    """Backbone + projector; subclasses add their heads, state and loss."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = head

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def after_step(self) -> None:
        """Called once after every optimizer step."""

    def replicated_tensors(self) -> list[torch.Tensor]:
        """What must be identical on every DDP process: all weights (online and target) and the queue."""
        return [*self.parameters(), *(b for name, b in self.named_buffers() if name.startswith("queue."))]

    def extra_state(self) -> dict[str, Any]:
        """Checkpointed state outside the state dict (the SSQL bit sampler)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        del state


class _Quantizing:
    """What every SSQL variant adds: the quantized twin and the per-step bit draw."""

    branch: QuantizedBranch
    sampler: BitSampler
    ssql: SSQLSettings

    def _init_ssql(self, backbone: nn.Module, head: nn.Sequential, settings: SSQLSettings) -> None:
        device = next(backbone.parameters()).device
        self.branch = QuantizedBranch(backbone, head, device, model_spec(settings.arch) if settings.arch else None)
        self.sampler = BitSampler(settings.ranges, settings.seed)
        self.ssql = settings

    def _float_views(self, x1: torch.Tensor, x2: torch.Tensor) -> Views:
        """Full-precision projections; also records every activation range for the quantized pass.

        Without the auxiliary loss these serve only as targets and ranges, so no graph is kept.
        """
        self.branch.float_pass()
        with torch.set_grad_enabled(self.ssql.aux_loss and torch.is_grad_enabled()):
            return self.branch.encode(x1), self.branch.encode(x2)

    def _quantized_views(self, x1: torch.Tensor, x2: torch.Tensor, stats: Stats) -> Views:
        bits = self.sampler.draw()
        self.branch.quantized_pass(bits)
        stats.update(w_bits=bits.w, a_bits=bits.a)
        return self.branch.encode(x1), self.branch.encode(x2)

    def extra_state(self) -> dict[str, Any]:
        return {"bit_sampler": self.sampler.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["bit_sampler"])


class SimSiam(SSLMethod):
    def __init__(self, backbone: nn.Module, head: nn.Sequential, pred: nn.Module) -> None:
        super().__init__(backbone, head)
        self.predictor = pred

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        z1, z2 = self.encode(x1), self.encode(x2)
        loss = symmetric(negative_cosine, self.predictor(z1), self.predictor(z2), z1, z2)
        return loss, {"loss_fp": loss.detach(), "z_std": normalized_std(z1)}


class SSQL(_Quantizing, SimSiam):
    """SSQL on SimSiam (SSQL.md): 1/2 [D(p1q, sg z2) + D(p2q, sg z1)]/2 + 1/2 [D(p1, sg z2) + D(p2, sg z1)]/2."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, pred: nn.Module, settings: SSQLSettings) -> None:
        SimSiam.__init__(self, backbone, head, pred)
        self._init_ssql(backbone, head, settings)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        z1, z2 = self._float_views(x1, x2)
        stats: Stats = {"z_std": normalized_std(z1)}
        loss_fp = None
        if self.ssql.aux_loss:
            loss_fp = symmetric(negative_cosine, self.predictor(z1), self.predictor(z2), z1, z2)
            stats["loss_fp"] = loss_fp.detach()
        q1, q2 = self._quantized_views(x1, x2, stats)
        t1, t2 = (q1, q2) if self.ssql.quantize_target else (z1, z2)
        loss_q = symmetric(negative_cosine, self.predictor(q1), self.predictor(q2), t1, t2)
        stats["loss_q"] = loss_q.detach()
        return ssql_combine(loss_q, loss_fp), stats


class BYOL(SSLMethod):
    def __init__(self, backbone: nn.Module, head: nn.Sequential, pred: nn.Module, momentum: float) -> None:
        super().__init__(backbone, head)
        self.predictor = pred
        self.momentum = momentum
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(head)

    @torch.no_grad()
    def targets(self, x1: torch.Tensor, x2: torch.Tensor) -> Views:
        return self.target_projector(self.target_backbone(x1)), self.target_projector(self.target_backbone(x2))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        z1, z2 = self.encode(x1), self.encode(x2)
        t1, t2 = self.targets(x1, x2)
        loss = symmetric(byol_loss, self.predictor(z1), self.predictor(z2), t1, t2)
        return loss, {"loss_fp": loss.detach(), "z_std": normalized_std(z1)}

    def after_step(self) -> None:
        ema_update(self.target_backbone, self.backbone, self.momentum)
        ema_update(self.target_projector, self.projector, self.momentum)


class BYOLSSQL(_Quantizing, BYOL):
    """BYOL + SSQL: the quantized online branch predicts the float EMA target; float term as auxiliary."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, pred: nn.Module, momentum: float, settings: SSQLSettings) -> None:
        BYOL.__init__(self, backbone, head, pred, momentum)
        self._init_ssql(backbone, head, settings)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        z1, z2 = self._float_views(x1, x2)
        stats: Stats = {"z_std": normalized_std(z1)}
        t1, t2 = self.targets(x1, x2)
        loss_fp = None
        if self.ssql.aux_loss:
            loss_fp = symmetric(byol_loss, self.predictor(z1), self.predictor(z2), t1, t2)
            stats["loss_fp"] = loss_fp.detach()
        q1, q2 = self._quantized_views(x1, x2, stats)
        loss_q = symmetric(byol_loss, self.predictor(q1), self.predictor(q2), t1, t2)
        stats["loss_q"] = loss_q.detach()
        return ssql_combine(loss_q, loss_fp), stats


class MoCo(SSLMethod):
    """MoCo v2, symmetrized: each view's query against the other view's key and the shared queue."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, momentum: float, temperature: float, queue_size: int, dim: int) -> None:
        super().__init__(backbone, head)
        self.momentum = momentum
        self.temperature = temperature
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(head)
        self.queue = KeyQueue(queue_size, dim).to(next(backbone.parameters()).device)

    @torch.no_grad()
    def keys(self, x1: torch.Tensor, x2: torch.Tensor) -> Views:
        return self._key(x1), self._key(x2)

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        if world_size() == 1:
            return F.normalize(self.target_projector(self.target_backbone(x)), dim=1)
        mixed, inverse = shuffled_across_processes(x)
        return unshuffled(F.normalize(self.target_projector(self.target_backbone(mixed)), dim=1), inverse)

    def _nce(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        return 0.5 * (info_nce(q1, k2, negatives, self.temperature) + info_nce(q2, k1, negatives, self.temperature))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        z1, z2 = self.encode(x1), self.encode(x2)
        k1, k2 = self.keys(x1, x2)
        negatives = self.queue.queue.clone()  # a snapshot: push() below rewrites the buffer in place
        loss = self._nce(F.normalize(z1, dim=1), F.normalize(z2, dim=1), k1, k2, negatives)
        self.queue.push(torch.cat([k1, k2]))
        return loss, {"loss_fp": loss.detach(), "z_std": normalized_std(z1)}

    def after_step(self) -> None:
        ema_update(self.target_backbone, self.backbone, self.momentum)
        ema_update(self.target_projector, self.projector, self.momentum)


class SSQLNCE(_Quantizing, MoCo):
    """SSQL-NCE: MoCo v2 whose query encoder also runs quantized; 1/2 quantized + 1/2 float InfoNCE."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, momentum: float, temperature: float, queue_size: int, dim: int,
                 settings: SSQLSettings) -> None:  # fmt: skip
        MoCo.__init__(self, backbone, head, momentum, temperature, queue_size, dim)
        self._init_ssql(backbone, head, settings)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        z1, z2 = self._float_views(x1, x2)
        stats: Stats = {"z_std": normalized_std(z1)}
        k1, k2 = self.keys(x1, x2)
        negatives = self.queue.queue.clone()
        loss_fp = None
        if self.ssql.aux_loss:
            loss_fp = self._nce(F.normalize(z1, dim=1), F.normalize(z2, dim=1), k1, k2, negatives)
            stats["loss_fp"] = loss_fp.detach()
        q1, q2 = self._quantized_views(x1, x2, stats)
        loss_q = self._nce(F.normalize(q1, dim=1), F.normalize(q2, dim=1), k1, k2, negatives)
        stats["loss_q"] = loss_q.detach()
        self.queue.push(torch.cat([k1, k2]))
        return ssql_combine(loss_q, loss_fp), stats


class SimCLR(SSLMethod):
    """SimCLR's NT-Xent with the negatives of every process (gathered with gradient)."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential, temperature: float) -> None:
        super().__init__(backbone, head)
        self.temperature = temperature

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        z1 = F.normalize(self.encode(x1), dim=1)
        z2 = F.normalize(self.encode(x2), dim=1)
        loss = nt_xent(z1, z2, self.temperature, gather_with_grad(z1), gather_with_grad(z2), rank() * len(z1))
        return loss, {"loss_fp": loss.detach(), "z_std": normalized_std(z1)}


def ssql_settings(recipe: PretrainRecipe) -> SSQLSettings:
    ranges = BitRanges(parse_bit_range(recipe.w_bits, "weight"), parse_bit_range(recipe.a_bits, "activation"))
    return SSQLSettings(ranges, recipe.seed, recipe.aux_loss, recipe.quantize_target, recipe.arch)


def build_method(recipe: PretrainRecipe, backbone: nn.Module, device: torch.device, sync_bn: bool = False) -> SSLMethod:
    """The recipe's method around `backbone` (its head is replaced by Identity), on `device`.

    SyncBatchNorm conversion happens here, before the quantized twin and the EMA target are made,
    because both hold references to (or copies of) the BatchNorm modules.
    """
    info = method_info(recipe.method)
    assert recipe.proj_hidden_dim is not None and recipe.proj_dim is not None
    spec = model_spec(recipe.arch)
    width = spec.num_features(backbone)
    modules: list[nn.Module] = [
        feature_extractor(backbone, spec),
        projector(width, recipe.proj_hidden_dim, recipe.proj_dim, info.proj_layers),
    ]
    if info.pred_hidden_dim is not None:
        assert recipe.pred_hidden_dim is not None
        modules.append(predictor(recipe.proj_dim, recipe.pred_hidden_dim))
    if sync_bn:
        modules = [nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in modules]
    modules = [m.to(device) for m in modules]
    net, head = modules[0], modules[1]
    assert isinstance(head, nn.Sequential)
    settings = ssql_settings(recipe)
    momentum, temperature = recipe.ema_momentum, recipe.temperature
    if info.family == "simsiam":
        return SSQL(net, head, modules[2], settings) if info.ssql else SimSiam(net, head, modules[2])
    if info.family == "byol":
        assert momentum is not None
        return BYOLSSQL(net, head, modules[2], momentum, settings) if info.ssql else BYOL(net, head, modules[2], momentum)
    if info.family == "moco":
        assert momentum is not None and temperature is not None
        if info.ssql:
            return SSQLNCE(net, head, momentum, temperature, recipe.queue_size, recipe.proj_dim, settings)
        return MoCo(net, head, momentum, temperature, recipe.queue_size, recipe.proj_dim)
    assert temperature is not None
    return SimCLR(net, head, temperature)
