"""Learn each unit's weight rounding so that its output matches the float model's: AdaRound, BRECQ, QDrop.

Units are taken in graph order (units.py): single layers for AdaRound, blocks for BRECQ and QDrop.
For each unit, its input is computed by the quantized model as reconstructed so far (so a unit
learns to undo what the earlier ones got wrong) and its target by the float model; then the
rounding variables (and, for BRECQ and QDrop, the activation step sizes inside the unit, LSQ-style)
are trained with Adam on minibatches of those cached tensors to minimise the squared output error
plus AdaRound's rounding regulariser (after a warm-up, with its exponent annealed from 20 to 2).
The loss is plain squared error on the unit's output, not BRECQ's output-Fisher weighting: that
needs a backward pass of the whole network per batch, and QDrop, which reaches BRECQ's accuracy
with plain squared error, shows the weighting is not what carries it. QDrop also replaces half of
every activation quantizer's outputs inside the unit (and of the unit's input) by the float value,
at random, on each step, which flattens the loss landscape the rounding is learned on.

Labels are never used: the calibration images are all it needs. Everything random comes from one
seeded generator, so the same seed, images and settings give bit-identical integers.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from ssql_deploy.errors import UserError
from ssql_deploy.progress import progress_bar
from ssql_deploy.quant.placement import act_quantizers, weight_quantizers
from ssql_deploy.quant.quantizer import ActQuantizer, QuantConv2d, random_mask
from ssql_deploy.quant.recon.units import Unit, find_units, unit_module, value_module
from ssql_deploy.quant.rounding import AdaRound, start_rounding
from ssql_deploy.recipe import RECON_ITERS

ReconMethod = Literal["adaround", "brecq", "qdrop"]
CHUNK = 128  # images per forward pass when caching a unit's inputs and targets
ALPHA_TRAVEL = 10.0  # how far, over all its steps, Adam must be able to move a rounding variable (see rounding_lr)
MAX_ROUNDING_LR = 0.05


@dataclass(frozen=True)
class ReconSettings:
    """How a reconstruction runs; the defaults are the papers' except `iters` (theirs: 20,000 per unit on a GPU) and the
    rounding variables' learning rate, which follows from it (`rounding_lr`)."""

    method: ReconMethod
    iters: int = RECON_ITERS  # optimisation steps per unit
    batch_size: int = 32
    seed: int = 0
    lr: float | None = None  # Adam, rounding variables; None: rounding_lr
    act_lr: float = 4e-5  # Adam, activation step sizes (BRECQ, QDrop)
    round_weight: float = 0.01  # lambda of the rounding regulariser
    beta: tuple[float, float] = (20.0, 2.0)  # its exponent, annealed from the first to the second value
    warmup: float = 0.2  # share of the steps before the regulariser starts
    drop_prob: float = 0.5  # QDrop

    def __post_init__(self) -> None:
        # the recipe refuses a bad --iters in the user's words; this guards library callers
        if self.iters < 1:
            raise ValueError(f"iters must be at least 1, got {self.iters}")

    @property
    def rounding_lr(self) -> float:
        """The papers' 1e-3, or ALPHA_TRAVEL / iters when that is larger, up to MAX_ROUNDING_LR.

        Adam moves a parameter by about its learning rate per step. A rounding variable starts
        within 2.4 of 0, where its weight flips to the other integer, and reaches the far end of
        the rectified sigmoid (rounding.py) at 2.4 past it: at 1e-3, 500 steps move it by at most
        0.5, so only weights whose fractional part lay between 0.35 and 0.65 could flip. On the
        Fashion-MNIST ResNet-18 at w2a4 (benchmarks/recon_lr_sweep.py), BRECQ's simulated top-1 went
        from 80.36% (1e-3, 500 steps) to 86.34% (0.02, 500 steps) and 86.2% (0.04, 250 steps), the
        FP32 model scoring 87.63%. Larger rates were not measured on real models; on a few dozen steps
        (0.25 at 40) one block of the CLI test's model ended worse than rounding to nearest, hence the ceiling.
        """
        return self.lr if self.lr is not None else min(max(1e-3, ALPHA_TRAVEL / self.iters), MAX_ROUNDING_LR)

    def beta_at(self, step: int) -> float | None:
        """The regulariser's exponent at `step`, None during the warm-up (no regulariser yet)."""
        start = int(self.warmup * self.iters)
        if step < start:
            return None
        progress = (step - start) / max(self.iters - start, 1)
        return self.beta[1] + (self.beta[0] - self.beta[1]) * max(0.0, 1.0 - progress)


@contextmanager
def _float(gm: fx.GraphModule) -> Iterator[None]:
    """Every quantizer off: the float model, on the same modules."""
    quantizers = [*act_quantizers(gm).values(), *weight_quantizers(gm).values()]
    before = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, enabled in zip(quantizers, before, strict=True):
            q.enabled = enabled


@torch.no_grad()
def _through(gm: fx.GraphModule, module: fx.GraphModule, values: torch.Tensor, quantized: bool) -> torch.Tensor:
    """`module` (a part of `gm`) run on `values` in chunks, with `gm`'s quantizers as they stand or all off."""
    module.eval()
    run = lambda: torch.cat([module(values[i : i + CHUNK]) for i in range(0, len(values), CHUNK)])  # noqa: E731
    if quantized:
        return run()
    with _float(gm):
        return run()


def node_values(gm: fx.GraphModule, node: fx.Node, images: torch.Tensor, quantized: bool) -> torch.Tensor:
    """The value of `node` for every image, from the quantized model as it stands or from the float one."""
    return _through(gm, value_module(gm, node), images, quantized)


def _unit_quantizers(gm: fx.GraphModule, unit: Unit) -> list[ActQuantizer]:
    modules = [gm.get_submodule(str(n.target)) for n in unit.nodes if n.op == "call_module"]
    return [m for m in modules if isinstance(m, ActQuantizer)]


def _error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).flatten(1).sum(1).mean()


def _fit(gm: fx.GraphModule, unit: Unit, inputs: torch.Tensor, float_inputs: torch.Tensor | None, targets: torch.Tensor,
         settings: ReconSettings, generator: torch.Generator, advance: Any) -> dict[str, Any]:  # fmt: skip
    sub = unit_module(gm, unit).eval()
    probe = slice(0, min(len(inputs), 256))
    with torch.no_grad():
        nearest = float(_error(sub(inputs[probe]), targets[probe]))
    convs = [gm.get_submodule(path) for path in unit.layers]
    acts = _unit_quantizers(gm, unit)
    before = [(q.step, q.lo.clone(), q.hi.clone()) for q in acts]
    roundings: list[AdaRound] = [start_rounding(c.weight_quantizer, c.weight) for c in convs if isinstance(c, QuantConv2d)]
    groups: list[dict[str, Any]] = [{"params": [r.alpha for r in roundings], "lr": settings.rounding_lr}]
    if settings.method != "adaround":
        learned = [q for q in acts if q.learns_step]
        for q in learned:
            q.init_lsq("calibrated")
        groups.append({"params": [q.step for q in learned], "lr": settings.act_lr})
    if settings.method == "qdrop":
        for q in acts:
            q.drop_prob, q.drop_generator = settings.drop_prob, generator
    optimizer = torch.optim.Adam(groups)
    for step in range(settings.iters):
        idx = torch.randint(len(inputs), (settings.batch_size,), generator=generator)
        x = inputs[idx]
        if float_inputs is not None:
            x = torch.lerp(float_inputs[idx], x, random_mask(x.shape, 1 - settings.drop_prob, generator, x.dtype))
        loss = _error(sub(x), targets[idx])
        beta = settings.beta_at(step)
        if beta is not None:
            loss = loss + settings.round_weight * sum((r.regularizer(beta) for r in roundings), torch.zeros(()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        advance(float(loss.detach()))
    for q in acts:
        q.drop_prob, q.drop_generator = 0.0, None
        if q.step is not None:
            q.step.requires_grad_(False)
    for conv in convs:
        wq = conv.weight_quantizer
        assert wq.rounding is not None and wq.fixed_scale is not None
        wq.fix(wq.rounding(hard=True), wq.fixed_scale)
    with torch.no_grad():
        learned = float(_error(sub(inputs[probe]), targets[probe]))
    kept = learned <= nearest
    if not kept:  # a reconstruction that ends worse than rounding to nearest (too few steps for the annealing) is undone
        for conv in convs:
            conv.weight_quantizer.fixed = conv.weight_quantizer.fixed_scale = None
        for q, (step, lo, hi) in zip(acts, before, strict=True):
            q.step = step
            q.set_range(float(lo), float(hi))
    return {"unit": unit.name, "layers": list(unit.layers), "error_nearest": round(nearest, 6), "error_learned": round(learned, 6),
            "kept": kept}  # fmt: skip


def reconstruct(gm: fx.GraphModule, images: list[torch.Tensor], settings: ReconSettings) -> list[dict[str, Any]]:
    """Reconstruct every unit of a calibrated `gm` in place; returns, per unit, its output error before and after."""
    units = find_units(gm, "layer" if settings.method == "adaround" else "block")
    if not units:
        raise UserError("the model has no quantized layer to reconstruct", "drop --reconstruct, or quantize some layers (--layer-bits)")
    data = torch.cat(images)
    if len(data) < 2 * settings.batch_size:
        raise UserError(f"reconstruction needs at least {2 * settings.batch_size} images (two batches of {settings.batch_size}), "
                        f"got {len(data)}", "raise --recon-size")  # fmt: skip
    generator = torch.Generator().manual_seed(settings.seed)
    trainable = {p: p.requires_grad for p in gm.parameters()}
    for p in trainable:
        p.requires_grad_(False)  # only the rounding variables (and activation steps) learn
    report = []
    # The unit before, its quantized inputs and its float outputs. A unit that starts where it ends gets its
    # inputs by running that unit alone, not the whole network up to it: on a deep MobileNet, running every
    # prefix again cost more than the optimisation itself.
    previous: tuple[Unit, torch.Tensor, torch.Tensor] | None = None
    try:
        with progress_bar() as bar:
            for unit in units:
                task = bar.add_task(f"{settings.method} {unit.name}", total=settings.iters)

                def advance(loss: float, task: Any = task, name: str = unit.name) -> None:
                    bar.update(task, advance=1, description=f"{settings.method} {name} (loss {loss:.4g})")

                if previous is not None and unit.entry is previous[0].exit:
                    inputs, float_inputs = _through(gm, unit_module(gm, previous[0]), previous[1], quantized=True), previous[2]
                else:
                    inputs, float_inputs = (node_values(gm, unit.entry, data, quantized=q) for q in (True, False))
                targets = _through(gm, unit_module(gm, unit), float_inputs, quantized=False)
                report.append(
                    _fit(gm, unit, inputs, float_inputs if settings.method == "qdrop" else None, targets, settings, generator, advance)
                )
                previous = (unit, inputs, targets)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return report
