"""The supervised epoch loop shared by fine-tuning and LSQ quantization-aware training.

It owns everything a user expects of a training stage: lr schedule per step, progress bar,
test top-1 every epoch, metrics.jsonl, best/last checkpoints written atomically, and resume
after an interrupt (kill -9 included) with only the unfinished epoch lost.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ssql_deploy.data.loaders import set_epoch
from ssql_deploy.distributed import DistInfo, barrier
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import evaluate_top1
from ssql_deploy.models.checkpoint import load_checkpoint, save_atomic
from ssql_deploy.progress import console, progress_bar
from ssql_deploy.run_layout import BEST, LAST
from ssql_deploy.train_state import MetricsLog, announce_resume, capture_rng, diverged, lr_at, restore_rng, set_lr

Payload = Callable[[str, dict[str, Any]], dict[str, Any]]  # (kind, extra fields) -> checkpoint dict


@dataclass(frozen=True)
class Schedule:
    epochs: int
    lr: float
    schedule: Literal["step", "cosine"] = "cosine"
    milestones: list[float] | None = None
    warmup_epochs: int = 0
    seed: int = 0
    label_smoothing: float = 0.0


def refuse_or_resume(stage_dir: Path, stage: str, resume: bool) -> dict[str, Any] | None:
    """The saved trainer state when resuming; an error when a run is in the way or missing."""
    last = stage_dir / LAST
    if resume:
        if not last.is_file():
            raise UserError(f"nothing to resume: {last} does not exist", "drop --resume to start a fresh run")
        return load_checkpoint(last)
    if last.exists():
        raise UserError(f"{stage_dir} already holds a {stage} run", "pass --resume to continue it or choose another --out")
    return None


def fit_classifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loaders: tuple[DataLoader[Any], DataLoader[Any]],
    sched: Schedule,
    dist: DistInfo,
    stage_dir: Path,
    stage: str,
    payload: Payload,
    state: dict[str, Any] | None,
    train_mode: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train `model` with cross-entropy from `state` (see refuse_or_resume); return the final metrics.

    `train_mode(epoch)` sets train/eval modes. A loss that turns NaN or infinite stops the run at
    that step, before anything of the broken epoch is saved.
    """
    train_loader, test_loader = loaders
    start_epoch, best_top1 = 0, -1.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_top1 = int(state["epoch"]), float(state["best_top1"])
        restore_rng(state["rng"])
        if dist.is_main:
            announce_resume(stage, start_epoch, sched.epochs)
    net: nn.Module = model
    if dist.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=sched.label_smoothing)
    if dist.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(stage_dir, start_epoch, enabled=dist.is_main)
    top1, n_test, started, steps = best_top1, 0, time.time(), len(train_loader)

    for epoch in range(start_epoch, sched.epochs):
        epoch_start = time.time()
        set_epoch(train_loader, epoch, sched.seed)
        if train_mode is not None:
            train_mode(epoch)
        else:
            model.train()
        sums = torch.zeros(3, dtype=torch.float64)
        with progress_bar() as bar:
            task = bar.add_task(f"{stage} epoch {epoch + 1}/{sched.epochs}", total=steps, visible=dist.is_main)
            for step, (images, labels) in enumerate(train_loader):
                set_lr(
                    optimizer, lr_at(epoch + step / steps, sched.lr, sched.epochs, sched.schedule, sched.milestones, sched.warmup_epochs)
                )
                images, labels = images.to(dist.device, non_blocking=True), labels.to(dist.device, non_blocking=True)
                logits = net(images)
                loss = criterion(logits, labels)
                value = loss.item()
                if not math.isfinite(value):
                    raise diverged(stage, stage_dir / LAST, epoch, step, value, optimizer.param_groups[0]["lr"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums += torch.tensor([value * len(labels), (logits.argmax(1) == labels).sum().item(), len(labels)], dtype=torch.float64)
                bar.update(task, advance=1, status=f"loss {sums[0] / sums[2]:.3f}")
        model.eval()
        top1, n_test = evaluate_top1(model, test_loader, dist.device, dist, "test top-1")
        if dist.is_main:
            train_loss = float(sums[0] / sums[2])
            log.log(epoch, {"train_loss": train_loss, "train_top1": float(100 * sums[1] / sums[2]), "test_top1": top1,
                            "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": round(time.time() - epoch_start, 2)})  # fmt: skip
            if top1 > best_top1:
                best_top1 = top1
                save_atomic(payload("model", {"epoch": epoch + 1, "top1": top1}), stage_dir / BEST)
            extra = {"optimizer": optimizer.state_dict(), "epoch": epoch + 1, "best_top1": best_top1, "rng": capture_rng()}
            save_atomic(payload("trainer-state", extra), stage_dir / LAST)
            console.print(f"{stage} epoch {epoch + 1}: train loss {train_loss:.4f}, test top-1 {top1:.2f}% ({n_test} images)")
        barrier(dist)
    if start_epoch >= sched.epochs:  # resumed a finished run: report, do not train
        model.eval()
        top1, n_test = evaluate_top1(model, test_loader, dist.device, dist, "test top-1")
    log.close()
    return {"top1": top1, "best_top1": best_top1, "n_test_images": n_test, "epochs": sched.epochs,
            "wall_seconds_this_session": round(time.time() - started, 1), "world_size": dist.world_size}  # fmt: skip
