"""`ssql-deploy pretrain` and `ssql-deploy finetune`: the training stages."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ssql_deploy.cli.app import TRAINING_KEPT, is_main_process, user_errors
from ssql_deploy.cli.options import DataRootOpt, DownloadOpt, InputSizeOpt, RecipeOpt, SubsetOpt, WorkersOpt, recipe_option
from ssql_deploy.progress import results
from ssql_deploy.recipe import FinetuneRecipe, Mode, PretrainRecipe, Schedule, Stem

P, T = PretrainRecipe, FinetuneRecipe
_STEM = "auto, cifar (3x3, no max-pool) or imagenet (7x7 + max-pool); auto picks by input size."
_RESUME = "Continue the run in --out: settings not given are taken from the run, settings given must agree with it."


@user_errors(TRAINING_KEPT)
def pretrain_cmd(
    method: Annotated[str | None, recipe_option(P, "method", "simsiam, ssql (SSQL on SimSiam), byol, byol-ssql, moco (MoCo v2), "
                                                "ssql-nce (MoCo v2 + SSQL) or simclr.")] = None,
    arch: Annotated[str | None, recipe_option(P, "arch", "Backbone (see `ssql-deploy models`).")] = None,
    data: Annotated[str | None, recipe_option(P, "data", "Dataset (see `ssql-deploy datasets`).")] = None,
    data_root: DataRootOpt = None,
    epochs: Annotated[int | None, recipe_option(P, "epochs", "Epochs.")] = None,
    batch_size: Annotated[int | None, recipe_option(P, "batch_size", "Global batch size (split over processes).")] = None,
    lr: Annotated[float | None, recipe_option(P, "lr", "Base learning rate (SGD).")] = None,
    weight_decay: Annotated[float | None, recipe_option(P, "weight_decay", "Weight decay.")] = None,
    warmup_epochs: Annotated[int | None, recipe_option(P, "warmup_epochs", "Linear warm-up epochs.")] = None,
    w_bits: Annotated[str | None, recipe_option(P, "w_bits", "SSQL: weight widths drawn each step, inclusive LOW-HIGH within 2..8.")] = None,
    a_bits: Annotated[str | None, recipe_option(P, "a_bits", "SSQL: activation widths drawn each step, inclusive LOW-HIGH within 2..8.")] = None,
    fixed_bits: Annotated[str | None, recipe_option(P, "fixed_bits", "SSQL ablation: one width pair every step, e.g. w4a4.", default="random bits")] = None,
    quantize_target: Annotated[bool | None, recipe_option(P, "quantize_target", "SSQL ablation (ssql only): targets from the quantized branch.",
                                                          "--quantize-target/--float-target", default="float target")] = None,
    aux_loss: Annotated[bool | None, recipe_option(P, "aux_loss", "SSQL: keep the full-precision auxiliary loss term.", "--aux-loss/--no-aux-loss")] = None,
    proj_dim: Annotated[int | None, recipe_option(P, "proj_dim", "Projector output width.", default="2048 SimSiam, 512 BYOL, 256 MoCo/SimCLR")] = None,
    proj_hidden_dim: Annotated[int | None, recipe_option(P, "proj_hidden_dim", "Projector hidden width.", default="2048")] = None,
    pred_hidden_dim: Annotated[int | None, recipe_option(P, "pred_hidden_dim", "Predictor hidden width (SimSiam/BYOL).", default="2048")] = None,
    ema_momentum: Annotated[float | None, recipe_option(P, "ema_momentum", "BYOL/MoCo target EMA momentum.", default="0.99 BYOL, 0.999 MoCo")] = None,
    temperature: Annotated[float | None, recipe_option(P, "temperature", "Contrastive temperature.", default="0.2 MoCo, 0.5 SimCLR")] = None,
    queue_size: Annotated[int | None, recipe_option(P, "queue_size", "MoCo negative queue length.")] = None,
    knn_every: Annotated[int | None, recipe_option(P, "knn_every", "kNN top-1 monitor every N epochs and at the last one; 0 turns it off.")] = None,
    knn_k: Annotated[int | None, recipe_option(P, "knn_k", "Neighbours the kNN monitor weighs.")] = None,
    save_every_steps: Annotated[int | None, recipe_option(P, "save_every_steps", "Also checkpoint every K steps (besides every epoch).",
                                                          default="every epoch only")] = None,
    stem: Annotated[Stem | None, recipe_option(P, "stem", _STEM)] = None,
    input_size: InputSizeOpt = None,
    subset: SubsetOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    sync_bn: Annotated[bool | None, recipe_option(P, "sync_bn", "SyncBatchNorm under torchrun (GPUs only).", "--sync-bn/--no-sync-bn")] = None,
    seed: Annotated[int | None, recipe_option(P, "seed", "Random seed.")] = None,
    out: Annotated[Path | None, recipe_option(P, "out", "Run directory; the stage writes RUN/pretrain/.")] = None,
    recipe: RecipeOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help=_RESUME)] = False,
) -> None:  # fmt: skip
    """Self-supervised pretraining (SSQL or a baseline); writes RUN/pretrain/backbone.pt for finetune."""
    settings = PretrainRecipe.build(
        recipe, method=method, arch=arch, data=data, data_root=data_root, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, w_bits=w_bits, a_bits=a_bits, fixed_bits=fixed_bits,
        quantize_target=quantize_target, aux_loss=aux_loss, proj_dim=proj_dim, proj_hidden_dim=proj_hidden_dim,
        pred_hidden_dim=pred_hidden_dim, ema_momentum=ema_momentum, temperature=temperature,
        queue_size=queue_size, knn_every=knn_every, knn_k=knn_k, save_every_steps=save_every_steps, stem=stem,
        input_size=input_size, subset=subset, download=download, workers=workers, sync_bn=sync_bn, seed=seed, out=out,
    )  # fmt: skip
    from ssql_deploy.pretrain import run_pretrain

    settings, metrics = run_pretrain(settings, resume=resume)
    if not is_main_process():
        return
    table = Table(title=f"pretraining ({settings.method}) finished")
    for col in ("arch", "data", "epochs", "loss", "kNN top-1", "z-std x sqrt(d)", "processes"):
        table.add_column(col)
    knn = "-" if metrics["knn_top1"] is None else f"{metrics['knn_top1']:.2f}%"
    ratio = "-" if metrics["z_std"] is None else f"{metrics['z_std'] * (settings.proj_dim or 1) ** 0.5:.2f}"
    loss = "-" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
    table.add_row(settings.arch, settings.data, str(metrics["epochs"]), loss, knn, ratio, str(metrics["world_size"]))
    results.print(table)
    results.print(f"run directory: {settings.out} (backbone: {settings.out / 'pretrain' / 'backbone.pt'})")


@user_errors(TRAINING_KEPT)
def finetune_cmd(
    ckpt: Annotated[Path | None, recipe_option(T, "ckpt", "Checkpoint or run directory to start from (SSQL reference, torchvision or ours).",
                                               default="random init (full mode only)")] = None,
    arch: Annotated[str | None, recipe_option(T, "arch", "Backbone (see `ssql-deploy models`).")] = None,
    data: Annotated[str | None, recipe_option(T, "data", "Dataset (see `ssql-deploy datasets`).")] = None,
    data_root: DataRootOpt = None,
    mode: Annotated[Mode | None, recipe_option(T, "mode", "linear (frozen backbone, new classifier; needs --ckpt) or full fine-tuning.")] = None,
    epochs: Annotated[int | None, recipe_option(T, "epochs", "Epochs.", default="100 linear, 50 full")] = None,
    batch_size: Annotated[int | None, recipe_option(T, "batch_size", "Global batch size (split over processes).")] = None,
    lr: Annotated[float | None, recipe_option(T, "lr", "Base learning rate.", default="30 linear, 0.01 full")] = None,
    weight_decay: Annotated[float | None, recipe_option(T, "weight_decay", "Weight decay.", default="0 linear, 1e-4 full")] = None,
    schedule: Annotated[Schedule | None, recipe_option(T, "schedule", "step (10x drops at 60% and 80% of the epochs) or cosine.")] = None,
    warmup_epochs: Annotated[int | None, recipe_option(T, "warmup_epochs", "Linear warm-up epochs.")] = None,
    stem: Annotated[Stem | None, recipe_option(T, "stem", _STEM)] = None,
    input_size: InputSizeOpt = None,
    subset: SubsetOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    sync_bn: Annotated[bool | None, recipe_option(T, "sync_bn", "SyncBatchNorm under torchrun (full mode, GPUs only).", "--sync-bn/--no-sync-bn")] = None,
    seed: Annotated[int | None, recipe_option(T, "seed", "Random seed.")] = None,
    out: Annotated[Path | None, recipe_option(T, "out", "Run directory; the stage writes RUN/finetune/.")] = None,
    recipe: RecipeOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help=_RESUME)] = False,
) -> None:  # fmt: skip
    """Fine-tune a backbone on a dataset (linear probe or full), single process or under torchrun."""
    settings = FinetuneRecipe.build(
        recipe, ckpt=ckpt, arch=arch, data=data, data_root=data_root, mode=mode, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
        stem=stem, input_size=input_size, subset=subset, download=download, workers=workers, sync_bn=sync_bn,
        seed=seed, out=out,
    )  # fmt: skip
    from ssql_deploy.finetune import run_finetune

    settings, metrics = run_finetune(settings, resume=resume)
    if not is_main_process():
        return
    table = Table(title=f"fine-tuning ({settings.mode}) finished")
    for col in ("arch", "data", "epochs", "test top-1 (last)", "best", "images", "processes"):
        table.add_column(col)
    table.add_row(settings.arch, settings.data, str(metrics["epochs"]), f"{metrics['top1']:.2f}%",
                  f"{metrics['best_top1']:.2f}%", str(metrics["n_test_images"]), str(metrics["world_size"]))  # fmt: skip
    results.print(table)
    results.print(f"run directory: {settings.out}")
