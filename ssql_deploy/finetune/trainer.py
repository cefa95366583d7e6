"""Linear probe and full fine-tuning, in one process or under torchrun, resumable after kill -9.

Linear mode follows the SSQL/SimSiam linear evaluation: the backbone is frozen *and kept in eval
mode* (BatchNorm statistics do not move), only a freshly initialised fc trains.
"""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssql_deploy.data import DataSource, num_classes, train_transform
from ssql_deploy.data.loaders import make_loader
from ssql_deploy.distributed import DistInfo, init_distributed, shutdown_distributed
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import shard
from ssql_deploy.finetune.loop import Schedule, fit_classifier, refuse_or_resume
from ssql_deploy.manifest import write_manifest
from ssql_deploy.models import create_model, model_spec, pick_stem, replace_head
from ssql_deploy.models.checkpoint import import_weights, load_checkpoint
from ssql_deploy.models.trained import ModelMeta, model_payload
from ssql_deploy.progress import console
from ssql_deploy.recipe import FinetuneRecipe
from ssql_deploy.run_layout import BEST, LAST, RunLayout, resolve_checkpoint
from ssql_deploy.train_state import check_batchnorm_batch, resume_recipe, settings_record

STAGE = "finetune"
# Where a run directory's weights live, most specific first; later stages use the same list.


def _prepare_model(recipe: FinetuneRecipe, meta: ModelMeta, dist: DistInfo) -> tuple[nn.Module, dict[str, Any] | None]:
    spec = model_spec(meta.arch)
    model = create_model(meta.arch, meta.num_classes, meta.stem)  # type: ignore[arg-type]
    report = None
    if recipe.ckpt is not None:
        path = resolve_checkpoint(recipe.ckpt, RunLayout.start_candidates)
        key_report = import_weights(load_checkpoint(path), model, spec)
        if dist.is_main:
            console.print(key_report.table())
        report = key_report.as_dict() | {"path": str(path)}
    if recipe.mode == "linear":  # the whole head becomes one Linear on the frozen pooled features, as in SSQL's linear eval
        for p in model.parameters():
            p.requires_grad_(False)
        head = nn.Linear(spec.num_features(model), meta.num_classes)
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        replace_head(model, spec, head)
    return model, report


def _set_train_mode(model: nn.Module, mode: str, head: nn.Module) -> None:
    model.train()
    if mode == "linear":  # frozen backbone: BatchNorm (and dropout) keep their pretrained behaviour
        for module in model.modules():
            if not any(module is m for m in head.modules()):
                module.eval()


def run_finetune(recipe: FinetuneRecipe, resume: bool = False) -> tuple[FinetuneRecipe, dict[str, Any]]:
    """Train; returns the recipe that ran (on resume, the run's own settings) and the final metrics."""
    if recipe.mode == "linear" and recipe.ckpt is None:  # refused, not warned: a CI job would score a random backbone
        raise UserError(
            "--mode linear trains only a classifier on a frozen backbone, and without --ckpt that backbone is random",
            "pass --ckpt (a pretrained checkpoint or run directory), or use --mode full to train from scratch",
        )
    dist = init_distributed()
    stage_dir = RunLayout(recipe.out).finetune
    state = refuse_or_resume(stage_dir, STAGE, resume)
    if state is not None:
        recipe = resume_recipe(recipe, state, stage_dir)
    source = DataSource.of(recipe.data, recipe.data_root, recipe.input_size, recipe.download)
    stem = pick_stem(source.input_size) if recipe.stem == "auto" else recipe.stem
    meta = ModelMeta.for_data(
        recipe.arch, stem, num_classes(recipe.data, recipe.data_root), source, "linear" if recipe.mode == "linear" else "native"
    )
    assert recipe.epochs is not None and recipe.lr is not None and recipe.weight_decay is not None

    train_set = source.split("train", recipe.subset, train_transform(source.input_size, source.mean, source.std))
    test_set = source.split("test", recipe.subset)
    if len(train_set) < recipe.batch_size:  # type: ignore[arg-type]
        raise UserError(
            f"the training split has {len(train_set)} images, fewer than one batch of {recipe.batch_size}",  # type: ignore[arg-type]
            "lower --batch-size or raise --subset",
        )
    train_loader = make_loader(train_set, recipe.batch_size, True, dist, recipe.workers, recipe.seed)
    test_loader = make_loader(shard(test_set, dist), recipe.batch_size, False, DistInfo(), recipe.workers, recipe.seed)

    torch.manual_seed(recipe.seed)
    model, import_report = _prepare_model(recipe, meta, dist)
    if recipe.mode == "full":  # a linear probe keeps BatchNorm in eval mode: any batch works
        check_batchnorm_batch(model, source.input_size, recipe.batch_size // dist.world_size,
                              "raise --batch-size, or use a larger --input-size")  # fmt: skip
    model.to(dist.device)
    if recipe.sync_bn and dist.world_size > 1 and recipe.mode == "full":
        if dist.device.type != "cuda":
            raise UserError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on CPU processes", "drop --sync-bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[assignment]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    sched = Schedule(
        recipe.epochs, recipe.lr, recipe.schedule, recipe.milestones, recipe.warmup_epochs, recipe.seed, recipe.label_smoothing
    )
    record = settings_record(recipe)

    def payload(kind: str, extra: dict[str, Any]) -> dict[str, Any]:
        return model_payload(kind, model, meta, **record, **extra)

    head = model.get_submodule(model_spec(meta.arch).head)
    metrics = fit_classifier(model, optimizer, (train_loader, test_loader), sched, dist, stage_dir, STAGE, payload,
                             state, lambda _epoch: _set_train_mode(model, recipe.mode, head))  # fmt: skip
    if dist.is_main:
        settings = recipe.model_dump(mode="json") | {"resolved_model": meta.as_dict()}
        inputs = {"ckpt": Path(import_report["path"])} if import_report else {}
        write_manifest(stage_dir, STAGE, inputs, settings, metrics | {"import": import_report},
                       {"best": stage_dir / BEST, "last": stage_dir / LAST})  # fmt: skip
    shutdown_distributed()
    return recipe, metrics
