"""`ssql-deploy quantize`: calibrate a trained model at a bit-width and measure the simulation."""

import time
from pathlib import Path
from typing import Any

import torch

from ssql_deploy.data import DataSource
from ssql_deploy.distributed import DistInfo
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import eval_loader, evaluate_top1, model_data
from ssql_deploy.finetune.loop import refuse_or_resume
from ssql_deploy.manifest import write_manifest
from ssql_deploy.models.registry import model_spec
from ssql_deploy.models.trained import ModelMeta, load_trained
from ssql_deploy.quant.artifact import save_quantized
from ssql_deploy.quant.calib_set import load_calibration, load_validation
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.config import QuantConfig
from ssql_deploy.quant.lsq import STAGE as LSQ_STAGE
from ssql_deploy.quant.lsq import train_lsq
from ssql_deploy.quant.placement import layer_table, prepare
from ssql_deploy.quant.recon.bias_correction import correct_biases
from ssql_deploy.quant.recon.reconstruct import ReconSettings, reconstruct
from ssql_deploy.recipe import QuantizeRecipe
from ssql_deploy.run import write_text_atomic
from ssql_deploy.run_layout import CONFIG_FILE, QUANT_FILE, RunLayout, resolve_checkpoint
from ssql_deploy.train_state import resume_recipe

STAGE = "quantize"


def _reconstruct(gm: torch.fx.GraphModule, recipe: QuantizeRecipe, source: DataSource, inputs: dict[str, Path]) -> dict[str, Any]:
    """Rounding reconstruction and/or bias correction on the calibration images of `recipe.recon_size` (no labels)."""
    images, manifest = load_calibration(source, recipe.recon_size, recipe.calib_dir)
    inputs["recon_manifest"] = manifest
    done: dict[str, Any] = {}
    start = time.time()
    if recipe.reconstruct is not None:
        assert recipe.iters is not None
        settings = ReconSettings(recipe.reconstruct, iters=recipe.iters, seed=recipe.seed)
        done["reconstruction"] = {"method": recipe.reconstruct, "iters": recipe.iters, "rounding_lr": settings.rounding_lr,
                                  "images": recipe.recon_size, "units": reconstruct(gm, images, settings)}  # fmt: skip
    if recipe.bias_correction:
        done["bias_correction"] = correct_biases(gm, images)
    done["adjust_seconds"] = round(time.time() - start, 1)
    return done


def _solve_widths(recipe: QuantizeRecipe, run_dir: Path) -> tuple[QuantizeRecipe, dict[str, Any]]:
    """`--bits auto`: the recipe with the widths the budget allows, and the plan's figures."""
    from ssql_deploy.analyze.allocate import Budget
    from ssql_deploy.analyze.auto_bits import plan

    assert recipe.budget is not None
    model_file = resolve_checkpoint(recipe.source, RunLayout.trained_candidates)
    config, planned = plan(run_dir, model_file, Budget.parse(recipe.budget))
    widths = {"bits": str(config.default), "layer_bits": config.override_specs(), "budget": None}
    return QuantizeRecipe.model_validate(recipe.model_dump() | widths), planned | {"budget": recipe.budget}


def _control(recipe: QuantizeRecipe, config: QuantConfig, model: torch.nn.Module, meta: ModelMeta, source: DataSource,
             batches: list[torch.Tensor], inputs: dict[str, Path]) -> tuple[QuantizeRecipe, QuantConfig, torch.fx.GraphModule, dict[str, Any]]:  # fmt: skip
    """`--max-drop`: the config whose ONNX Runtime artifact meets the drop on validation images, and its calibrated model."""
    from ssql_deploy.analyze.accuracy_control import Context, control
    from ssql_deploy.analyze.sensitivity import Validation

    assert recipe.max_drop is not None
    images, labels, inputs["val_manifest"] = load_validation(source, recipe.val_size, recipe.calib_size, recipe.calib_dir)
    ctx = Context(
        model, meta, model_spec(meta.arch), batches, recipe.calib, recipe.percentile, Validation(images, labels, recipe.batch_size)
    )
    config, gm, report = control(config, recipe.max_drop, ctx)
    widths = {"bits": str(config.default), "layer_bits": config.override_specs()}
    return QuantizeRecipe.model_validate(recipe.model_dump() | widths), config, gm, report


def run_quantize(recipe: QuantizeRecipe, resume: bool = False) -> dict[str, Any]:
    if not recipe.source.exists():
        raise UserError(f"{recipe.source} does not exist", "pass a run directory (the --out of `ssql-deploy finetune`) or a checkpoint")
    if recipe.out is None and not recipe.source.is_dir():
        raise UserError("--out is needed when quantizing a checkpoint file", "pass --out RUN_DIR")
    run_dir = recipe.out or recipe.source
    recipe, planned = _solve_widths(recipe, run_dir) if recipe.bits == "auto" else (recipe, None)
    config = QuantConfig.from_bits(recipe.bits, recipe.layer_bits)
    out_dir = RunLayout(run_dir).quant(recipe.variant())
    state = refuse_or_resume(out_dir, LSQ_STAGE, resume) if recipe.lsq else None
    if resume and not recipe.lsq:
        raise UserError("--resume continues an interrupted LSQ training; post-training quantization has nothing to resume", "add --lsq")
    if state is not None:
        recipe = resume_recipe(recipe, state, out_dir)
    model, meta, source_file = load_trained(recipe.source, recipe.arch, recipe.data, recipe.input_size)
    model.eval()
    gm = prepare(model, "ssql", config, model_spec(meta.arch))  # before any data: a config naming no module is refused at once
    source = model_data(meta, recipe.data, recipe.data_root, recipe.input_size, recipe.download)
    batches, calib_manifest = load_calibration(source, recipe.calib_size, recipe.calib_dir)
    inputs: dict[str, Path] = {"model": source_file, "calib_manifest": calib_manifest}
    if recipe.max_drop is not None:
        recipe, config, gm, controlled = _control(recipe, config, model, meta, source, batches, inputs)
        out_dir = RunLayout(run_dir).quant(recipe.variant())
    else:
        calibrate(gm, batches, recipe.calib, recipe.percentile)
        controlled = None
    name = recipe.variant()
    adjusted = _reconstruct(gm, recipe, source, inputs) if recipe.reconstruct or recipe.bias_correction else {}
    loader = eval_loader(source, recipe.subset, recipe.batch_size, recipe.workers)
    cpu, one = torch.device("cpu"), DistInfo()
    fp_top1, n = evaluate_top1(model, loader, cpu, one, "float top-1")
    q_top1, _ = evaluate_top1(gm, loader, cpu, one, f"{name} simulated top-1")

    root = None if source.root is None else str(source.root.resolve())
    calibration = {"calibrator": recipe.calib, "percentile": recipe.percentile, "calib_size": recipe.calib_size,
                   "calib_manifest": str(calib_manifest), "data": source.data, "data_root": root}  # fmt: skip
    info = {"calibration": calibration, "source": str(source_file)}
    metrics: dict[str, Any] = {"bits": name, "config": config.describe(), "default_bits": str(config.default), "calibrator": recipe.calib, "fp32_top1": fp_top1,
                               "simulated_top1": q_top1, "n_test_images": n, "data": source.describe(), **adjusted}  # fmt: skip
    if recipe.lsq:
        metrics["ptq_top1"] = q_top1
        metrics["lsq"] = train_lsq(gm, meta, recipe, source, batches[0], info, out_dir, state)
        metrics["simulated_top1"] = metrics["lsq"]["best_top1"]
    metrics["drop_points"] = fp_top1 - metrics["simulated_top1"]
    metrics["layers"] = layer_table(gm)
    if planned is not None:
        metrics["auto_bits"] = planned
    if controlled is not None:
        metrics["accuracy_control"] = controlled
    save_quantized(out_dir / QUANT_FILE, gm, meta, name, recipe.lsq, info)
    write_text_atomic(out_dir / CONFIG_FILE, config.model_dump_json(indent=1) + "\n")
    write_manifest(out_dir, STAGE, inputs,
                   recipe.model_dump(mode="json") | {"resolved_model": meta.as_dict(), "layout": "ssql"}, metrics,
                   {"quantized": out_dir / QUANT_FILE, "config": out_dir / CONFIG_FILE})  # fmt: skip
    return metrics | {"out_dir": str(out_dir)}
