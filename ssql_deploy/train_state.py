"""What every training stage shares: the lr schedule, RNG capture, metrics log and resume rules.

Schedules are pure functions of the (fractional) epoch, as in moco-v3/DINO, so a resumed run
needs no scheduler state: the epoch number alone restores the learning rate.
"""

import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import torch

from ssql_deploy.progress import console


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
