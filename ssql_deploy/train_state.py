"""What every training stage shares: the lr schedule, RNG capture, metrics log, resume and batch rules.

Schedules are pure functions of the (fractional) epoch, as in moco-v3/DINO, so a resumed run
needs no scheduler state: the epoch number alone restores the learning rate.
"""

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from ssql_deploy.errors import UserError
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.progress import console
from ssql_deploy.recipe import Recipe, validate

R = TypeVar("R", bound=Recipe)


def lr_at(
    epoch: float,
    base: float,
    epochs: int,
    schedule: Literal["step", "cosine"],
    milestones: list[float] | None = None,
    warmup_epochs: int = 0,
) -> float:
    if warmup_epochs and epoch < warmup_epochs:
        return base * (epoch + 1e-3) / warmup_epochs
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1)
        return base * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / span))
    drops = sum(epoch >= m * epochs for m in (milestones or []))
    return base * 0.1**drops


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class MetricsLog:
    """metrics.jsonl (one JSON object per epoch) and, when installed, TensorBoard.

    On resume, lines of epochs at or after the resume point are dropped: they belong to the
    epoch that was interrupted or to checkpoints that were never written.
    """

    def __init__(self, stage_dir: Path, start_epoch: int, enabled: bool = True) -> None:
        self.path = stage_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer: Any = None
        if not enabled:
            return
        kept = []
        if start_epoch > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] < start_epoch]
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=start_epoch)
        except ImportError:
            self.writer = None

    def log(self, epoch: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": epoch, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def announce_resume(stage: str, epoch: int, total: int) -> None:
    console.print(f"[bold]{stage}[/]: resuming after epoch {epoch} of {total}")


# Settings a resumed run may change: where things are and how they are loaded or monitored, never what is trained.
RESUME_FREE = frozenset({"out", "ckpt", "workers", "data_root", "download", "save_every_steps", "knn_every"})


def setting_differences(saved: dict[str, Any], current: dict[str, Any], free: frozenset[str]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every setting both know that differs, `free` keys aside."""
    return [(k, saved[k], current[k]) for k in current if k in saved and k not in free and saved[k] != current[k]]


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"--{k.replace('_', '-')} was {old!r}, now {new!r}" for k, old, new in diffs)


def settings_record(recipe: Recipe) -> dict[str, Any]:
    """What a training checkpoint keeps of its recipe, so a resume can take and check the settings."""
    return {"settings": recipe.model_dump(mode="json"), "explicit": sorted(recipe.explicit)}


def resume_recipe(recipe: R, state: dict[str, Any], where: Path) -> R:
    """The recipe to resume with: the run's own settings, with the ones the user gave checked against them.

    Resuming with another architecture, mode, input size or head width would fail deep in
    load_state_dict (or, worse, train on silently); each such setting is named instead.
    """
    saved = state.get("settings")
    if not isinstance(saved, dict):  # a checkpoint from before settings were recorded: nothing to compare with
        return recipe
    given = recipe.model_dump(mode="json")
    keys = [k for k in state.get("explicit", saved) if k in saved]
    merged = validate(type(recipe), {k: saved[k] for k in keys} | {k: given[k] for k in recipe.explicit}, "command line")
    diffs = setting_differences(saved, merged.model_dump(mode="json"), RESUME_FREE)
    if diffs:
        run_values = " ".join(f"--{k.replace('_', '-')} {old}" for k, old, _ in diffs)
        raise UserError(
            f"{where} was trained with other settings: {describe_differences(diffs)}",
            f"resume with the run's values ({run_values}) or drop those flags, or choose another --out for a new run",
        )
    return merged


def check_batchnorm_batch(model: nn.Module, input_size: int, per_process: int, fix: str) -> None:
    """Refuse a batch that leaves BatchNorm one value per channel (its "Expected more than 1 value" crash).

    Training-mode BatchNorm needs two values per channel; a layer sees batch x height x width of
    them, so a tiny batch is fine at 32 px but not where the feature map has shrunk to 1x1.
    """
    seen: dict[str, int] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault(name, args[0][0].numel() // args[0].shape[1])  # values per channel per image

        return hook

    hooks = [
        m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for name, per_image in seen.items():
        if per_process * per_image < 2:
            raise UserError(
                f"a batch of {per_process} image{'s' if per_process > 1 else ''} per process at {input_size} px leaves BatchNorm "
                f"layer {name} one value per channel (its feature map is 1x1), which it cannot normalise",
                fix,
            )


def diverged(stage: str, last: Path, epoch: int, step: int, loss: float, lr: float) -> UserError:
    """The error for a loss gone NaN/inf: where it happened and which checkpoint still holds finite weights.

    Raised before the step's backward, so nothing computed from the broken loss is ever saved.
    """
    if last.is_file():
        kept = f"{last} (after epoch {load_checkpoint(last)['epoch']}) is kept"
    else:
        kept = "no checkpoint was written yet"
    return UserError(
        f"{stage} diverged: the loss became {loss} at epoch {epoch + 1}, step {step + 1} (lr {lr:.4g}); {kept}",
        "lower --lr (or add --warmup-epochs) and start again with another --out",
    )
