"""The pretraining loop: one process or torchrun, resumable after kill -9, monitored by kNN and z-std.

Shape follows the fine-tune stage: a pure-function lr schedule, `pretrain/last.pt` written
atomically each epoch (and every K steps if asked) with everything a resume needs (method state
incl. EMA target and queue, optimizer, position, bit sampler, RNG), metrics.jsonl truncated to
the resume point, a manifest at the end. `pretrain/backbone.pt` is the plain torchvision-style
backbone state dict the later stages import.
"""

import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from ssql_deploy.data import TwoViews, eval_transform, get_spec, load_split, num_classes, ssl_view_transform
from ssql_deploy.data.loaders import make_loader, set_epoch
from ssql_deploy.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import shard
from ssql_deploy.manifest import write_manifest
from ssql_deploy.models import create_model, pick_stem
from ssql_deploy.models.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_atomic
from ssql_deploy.pretrain.collectives import replicas_agree
from ssql_deploy.pretrain.config import method_info
from ssql_deploy.pretrain.knn import knn_top1
from ssql_deploy.pretrain.methods import SSLMethod, build_method
from ssql_deploy.progress import console, progress_bar
from ssql_deploy.recipe import PretrainRecipe
from ssql_deploy.run_layout import BACKBONE, LAST, RunLayout
from ssql_deploy.train_state import (
    MetricsLog,
    announce_resume,
    capture_rng,
    check_batchnorm_batch,
    diverged,
    lr_at,
    restore_rng,
    resume_recipe,
    set_lr,
    settings_record,
)

STAGE = "pretrain"
EVAL_BATCH = 256
STATUS_EVERY = 10  # steps between progress-bar status refreshes
COLLAPSE_RATIO = 0.1  # warn when z-std falls below this fraction of a healthy 1/sqrt(d)
_SUMS = ("loss", "loss_fp", "loss_q", "z_std")  # per-step values summed over an epoch, then averaged


@dataclass
class _Data:
    train: DataLoader[Any]
    bank: DataLoader[Any] | None  # eval-transformed train split, for the kNN monitor
    test: DataLoader[Any] | None
    num_classes: int
    input_size: int


@dataclass
class _Position:
    """Where training stands: finished epochs, steps into the current one, and its running sums."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    sums: list[float] | None = None
    bits: dict[str, dict[str, int]] | None = None


class _SkipBatches(Sampler[list[int]]):
    """The rest of an epoch interrupted after `skip` steps: skipped batches are never loaded."""

    def __init__(self, batches: Iterable[list[int]], skip: int, total: int) -> None:
        self.batches, self.skip, self.total = batches, skip, total

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return self.total - self.skip


def _data(recipe: PretrainRecipe, dist: DistInfo) -> _Data:
    spec = get_spec(recipe.data)
    size = recipe.input_size or spec.input_size
    views = TwoViews(ssl_view_transform(size, spec.mean, spec.std))
    plain = eval_transform(size, spec.mean, spec.std)
    train_set = load_split(recipe.data, "train", recipe.data_root, views, recipe.download, recipe.subset)
    if len(train_set) < recipe.batch_size:
        raise UserError(f"the training split has {len(train_set)} images, fewer than one batch of {recipe.batch_size}",
                        "lower --batch-size or raise --subset")  # fmt: skip
    train = make_loader(train_set, recipe.batch_size, True, dist, recipe.workers, recipe.seed)
    if not recipe.knn_every:  # no monitor: do not even open the test split
        return _Data(train, None, None, 0, size)
    bank_set = load_split(recipe.data, "train", recipe.data_root, plain, recipe.download, recipe.subset)
    test_set = load_split(recipe.data, "test", recipe.data_root, plain, recipe.download, recipe.subset)
    bank = make_loader(shard(bank_set, dist), EVAL_BATCH, False, DistInfo(), recipe.workers, recipe.seed)
    test = make_loader(shard(test_set, dist), EVAL_BATCH, False, DistInfo(), recipe.workers, recipe.seed)
    return _Data(train, bank, test, num_classes(recipe.data, recipe.data_root), size)


def _check_batch(recipe: PretrainRecipe, dist: DistInfo) -> None:
    if recipe.batch_size // dist.world_size < 2:
        raise UserError(
            f"batch size {recipe.batch_size} over {dist.world_size} processes leaves fewer than 2 images per process, "
            f"so {recipe.method} has no pairs to compare (and BatchNorm no statistics)",
            f"use --batch-size {2 * dist.world_size} or more",
        )


def _check_sync_bn(recipe: PretrainRecipe, dist: DistInfo) -> None:
    """PyTorch's SyncBatchNorm (and DDP around it) only runs on GPUs; refuse it on CPU up front."""
    if recipe.sync_bn and dist.world_size > 1 and dist.device.type == "cpu":
        raise UserError(
            "--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU processes",
            "drop --sync-bn on CPU (each process then normalizes its own share of the batch; MoCo still shuffles keys across processes)",
        )


def _payload(
    recipe: PretrainRecipe, method: SSLMethod, optimizer: torch.optim.Optimizer, stem: str, size: int, pos: _Position
) -> dict[str, Any]:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "pretrain-state",
        "method": recipe.method, "arch": recipe.arch, "stem": stem, "input_size": size, "data": recipe.data,
        "model": method.state_dict(), "optimizer": optimizer.state_dict(), "extra": method.extra_state(),
        "epoch": pos.epoch, "step": pos.step, "global_step": pos.global_step,
        "epoch_sums": pos.sums or [], "bits_seen": pos.bits or {}, "rng": capture_rng(), **settings_record(recipe),
    }  # fmt: skip


def _restore(state: dict[str, Any], path: Path, recipe: PretrainRecipe, method: SSLMethod, optimizer: torch.optim.Optimizer) -> _Position:
    for key in ("method", "arch"):  # checkpoints from before settings were recorded are checked this far only
        if state.get(key) != getattr(recipe, key):
            raise UserError(f"{path} was pretrained with {key} {state.get(key)!r}, not {getattr(recipe, key)!r}",
                            f"pass --{key} {state.get(key)} to resume it, or choose another --out")  # fmt: skip
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    method.load_extra_state(state["extra"])
    restore_rng(state["rng"])
    return _Position(int(state["epoch"]), int(state["step"]), int(state["global_step"]),
                     list(state["epoch_sums"]) or None, dict(state["bits_seen"]) or None)  # fmt: skip


def _write_backbone(method: SSLMethod, stage_dir: Path) -> None:
    """A plain torchvision-compatible state dict (no fc): what `finetune --ckpt RUN_DIR` imports."""
    save_atomic({k: v.detach().cpu() for k, v in method.backbone.state_dict().items()}, stage_dir / BACKBONE)


def _epoch_metrics(sums: torch.Tensor, bits: dict[str, dict[str, int]], recipe: PretrainRecipe, dist: DistInfo) -> dict[str, Any]:
    """Epoch means over every process (one all-reduce per epoch, none per step)."""
    totals = all_reduce_sum(sums.clone().double(), dist).tolist()
    steps = max(totals[-1], 1.0)
    info = method_info(recipe.method)
    metrics: dict[str, Any] = {"loss": totals[0] / steps}
    if not info.ssql or recipe.aux_loss:
        metrics["loss_fp"] = totals[1] / steps
    if info.ssql:
        metrics["loss_q"] = totals[2] / steps
        metrics["bits_seen"] = bits
    z_std = totals[3] / steps
    ratio = z_std * math.sqrt(recipe.proj_dim or 1)
    metrics |= {"z_std": z_std, "z_std_x_sqrt_d": ratio, "collapse_warning": ratio < COLLAPSE_RATIO}
    return metrics


@dataclass
class _Session:
    """Everything one training session threads through its epochs."""

    recipe: PretrainRecipe
    dist: DistInfo
    data: _Data
    method: SSLMethod
    net: torch.nn.Module  # the method, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    stem: str
    last_path: Path

    def save(self, pos: _Position) -> None:
        save_atomic(_payload(self.recipe, self.method, self.optimizer, self.stem, self.data.input_size, pos), self.last_path)

    def loader(self, skip: int) -> DataLoader[Any]:
        """The epoch's batches; after a mid-epoch resume, only those not yet trained on."""
        train = self.data.train
        if not skip:
            return train
        batches = _SkipBatches(train.batch_sampler, skip, len(train))  # type: ignore[arg-type]
        return DataLoader(train.dataset, batch_sampler=batches, num_workers=train.num_workers, pin_memory=train.pin_memory)

    def train_epoch(self, epoch: int, pos: _Position) -> tuple[torch.Tensor, dict[str, dict[str, int]]]:
        """One epoch from step `pos.step`; returns the summed per-step values and the bits drawn."""
        recipe, dist, method, optimizer = self.recipe, self.dist, self.method, self.optimizer
        steps, skip = len(self.data.train), pos.step
        sums = torch.tensor(pos.sums if skip and pos.sums else [0.0] * (len(_SUMS) + 1), dtype=torch.float64, device=dist.device)
        bits: dict[str, dict[str, int]] = (pos.bits if skip and pos.bits else None) or {"w": {}, "a": {}}
        method.train()
        with progress_bar() as bar:
            task = bar.add_task(f"epoch {epoch + 1}/{recipe.epochs}", total=steps, completed=skip, visible=dist.is_main)
            for step, ((x1, x2), _) in enumerate(self.loader(skip), start=skip):
                set_lr(
                    optimizer,
                    lr_at(epoch + step / steps, recipe.lr, recipe.epochs, recipe.schedule, recipe.milestones, recipe.warmup_epochs),
                )
                loss, stats = self.net(x1.to(dist.device, non_blocking=True), x2.to(dist.device, non_blocking=True))
                if not bool(torch.isfinite(loss.detach())):
                    raise diverged(STAGE, self.last_path, epoch, step, float(loss), optimizer.param_groups[0]["lr"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                method.after_step()
                zero = loss.new_zeros(())
                sums += torch.stack(
                    [loss.detach(), stats.get("loss_fp", zero), stats.get("loss_q", zero), stats["z_std"], zero + 1]
                ).double()
                if "w_bits" in stats:
                    for role in ("w", "a"):
                        key = str(stats[f"{role}_bits"])
                        bits[role][key] = bits[role].get(key, 0) + 1
                pos.global_step += 1
                status = None
                if (step + 1) % STATUS_EVERY == 0 or step + 1 == steps:  # the only host reads of the sums
                    mean = (sums / sums[-1]).tolist()
                    status = f"loss {mean[0]:.4f}  z-std {mean[3]:.4f}" + (
                        f"  w{stats['w_bits']}a{stats['a_bits']}" if "w_bits" in stats else ""
                    )
                bar.update(task, advance=1, **({"status": status} if status else {}))
                if recipe.save_every_steps and pos.global_step % recipe.save_every_steps == 0 and step + 1 < steps:
                    if dist.is_main:
                        self.save(_Position(epoch, step + 1, pos.global_step, sums.tolist(), bits))
                    barrier(dist)
        return sums, bits


def run_pretrain(recipe: PretrainRecipe, resume: bool = False) -> tuple[PretrainRecipe, dict[str, Any]]:
    """Train; returns the recipe that ran (on resume, the run's own settings) and the final metrics."""
    dist = init_distributed()
    run = RunLayout(recipe.out)
    stage_dir, last_path = run.pretrain, run.pretrain / LAST
    if not resume and last_path.exists():
        raise UserError(f"{stage_dir} already holds a pretraining run", "pass --resume to continue it or choose another --out")
    if resume and not last_path.is_file():
        raise UserError(f"nothing to resume: {last_path} does not exist", "drop --resume to start a fresh run")
    state = load_checkpoint(last_path) if resume else None
    if state is not None:
        recipe = resume_recipe(recipe, state, stage_dir)
    _check_batch(recipe, dist)
    _check_sync_bn(recipe, dist)
    data = _data(recipe, dist)
    stem = pick_stem(data.input_size) if recipe.stem == "auto" else recipe.stem

    torch.manual_seed(recipe.seed)  # same initial weights, queue and target on every process
    backbone = create_model(recipe.arch, 1, stem)
    check_batchnorm_batch(
        backbone, data.input_size, recipe.batch_size // dist.world_size, "raise --batch-size, or use a larger --input-size"
    )
    method = build_method(recipe, backbone, dist.device, recipe.sync_bn and dist.world_size > 1)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    pos = _Position()
    if state is not None:
        pos = _restore(state, last_path, recipe, method, optimizer)
        if dist.is_main:
            announce_resume(STAGE, pos.epoch, recipe.epochs)
            if pos.step:
                console.print(f"  and {pos.step} steps into epoch {pos.epoch + 1}")
    net: torch.nn.Module = method
    if dist.world_size > 1:
        net = DistributedDataParallel(method, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    if dist.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(stage_dir, pos.epoch, enabled=dist.is_main)
    session = _Session(recipe, dist, data, method, net, optimizer, stem, last_path)
    started = time.time()

    for epoch in range(pos.epoch, recipe.epochs):
        epoch_start = time.time()
        set_epoch(data.train, epoch, recipe.seed)
        skipped = pos.step
        sums, bits = session.train_epoch(epoch, pos)
        pos = _Position(epoch + 1, 0, pos.global_step)
        metrics = _epoch_metrics(sums, bits, recipe, dist)
        if data.bank is not None and data.test is not None and ((epoch + 1) % recipe.knn_every == 0 or epoch + 1 == recipe.epochs):
            method.eval()
            metrics["knn_top1"] = knn_top1(method.backbone, data.bank, data.test, data.num_classes, dist.device, dist,
                                           recipe.knn_k, recipe.knn_temperature)  # fmt: skip
        seconds = time.time() - epoch_start
        metrics |= {"lr": optimizer.param_groups[0]["lr"], "epoch_seconds": round(seconds, 2),
                    "images_per_second": round((len(data.train) - skipped) * recipe.batch_size / max(seconds, 1e-9), 1)}  # fmt: skip
        if dist.is_main:
            log.log(epoch, metrics)
            session.save(pos)
            _write_backbone(method, stage_dir)
            _report_epoch(epoch, metrics)
        barrier(dist)

    in_sync = replicas_agree(method.replicated_tensors())
    if dist.is_main and not (stage_dir / BACKBONE).exists():  # a resumed run that had already finished
        _write_backbone(method, stage_dir)
    result = _final_metrics(recipe, stage_dir, dist) | {
        "wall_seconds_this_session": round(time.time() - started, 1),
        "replicas_in_sync": in_sync,
    }
    log.close()
    if dist.is_main:
        settings = recipe.model_dump(mode="json") | {"resolved": {"stem": stem, "input_size": data.input_size}}
        write_manifest(stage_dir, STAGE, {}, settings, result, {"backbone": stage_dir / BACKBONE, "last": last_path})
    shutdown_distributed()
    return recipe, result


def _report_epoch(epoch: int, metrics: dict[str, Any]) -> None:
    line = f"epoch {epoch + 1}: loss {metrics['loss']:.4f}, z-std {metrics['z_std']:.4f} (x sqrt(d) = {metrics['z_std_x_sqrt_d']:.2f})"
    if "knn_top1" in metrics:
        line += f", kNN top-1 {metrics['knn_top1']:.2f}%"
    console.print(line)
    if metrics["collapse_warning"]:
        console.print(f"[bold yellow]warning:[/] z-std is far below 1/sqrt(d) (x sqrt(d) = {metrics['z_std_x_sqrt_d']:.3f} "
                      f"< {COLLAPSE_RATIO}): the representation may be collapsing; lower --lr or check the augmentations")  # fmt: skip


def _final_metrics(recipe: PretrainRecipe, stage_dir: Path, dist: DistInfo) -> dict[str, Any]:
    """The last epoch's loss and z-std and the latest kNN top-1, read back from metrics.jsonl.

    Reading the log (not this session's variables) gives the same answer for a resumed run,
    including one resumed after it had already finished.
    """
    path = stage_dir / "metrics.jsonl"
    epochs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if dist.is_main and path.exists() else []
    last = epochs[-1] if epochs else {}
    return {
        "method": recipe.method, "epochs": recipe.epochs, "world_size": dist.world_size,
        "loss": last.get("loss"), "z_std": last.get("z_std"), "collapse_warning": last.get("collapse_warning"),
        "knn_top1": next((e["knn_top1"] for e in reversed(epochs) if "knn_top1" in e), None),
    }  # fmt: skip
