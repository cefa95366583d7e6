"""`ssql-deploy quantize`: calibrate a trained model at a bit-width and measure the simulation."""

from typing import Any

import torch

from ssql_deploy.distributed import DistInfo
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import eval_loader, evaluate_top1, model_data
from ssql_deploy.finetune.loop import refuse_or_resume
from ssql_deploy.manifest import write_manifest
from ssql_deploy.models.registry import model_spec
from ssql_deploy.models.trained import load_trained
from ssql_deploy.quant.artifact import save_quantized
from ssql_deploy.quant.calib_set import load_calibration
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.config import QuantConfig
from ssql_deploy.quant.lsq import STAGE as LSQ_STAGE
from ssql_deploy.quant.lsq import train_lsq
from ssql_deploy.quant.placement import layer_table, prepare
from ssql_deploy.recipe import QuantizeRecipe
from ssql_deploy.run_layout import QUANT_FILE, RunLayout, variant
from ssql_deploy.train_state import resume_recipe

STAGE = "quantize"


def run_quantize(recipe: QuantizeRecipe, resume: bool = False) -> dict[str, Any]:
    config = QuantConfig.from_bits(recipe.bits, recipe.layer_bits)
    if not recipe.source.exists():
        raise UserError(f"{recipe.source} does not exist", "pass a run directory (the --out of `ssql-deploy finetune`) or a checkpoint")
    if recipe.out is None and not recipe.source.is_dir():
        raise UserError("--out is needed when quantizing a checkpoint file", "pass --out RUN_DIR")
    run_dir = recipe.out or recipe.source
    out_dir = RunLayout(run_dir).quant(variant(config.label, recipe.lsq))
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
    calibrate(gm, batches, recipe.calib, recipe.percentile)
    loader = eval_loader(source, recipe.subset, recipe.batch_size, recipe.workers)
    cpu, one = torch.device("cpu"), DistInfo()
    fp_top1, n = evaluate_top1(model, loader, cpu, one, "float top-1")
    q_top1, _ = evaluate_top1(gm, loader, cpu, one, f"{config.label} simulated top-1")

    root = None if source.root is None else str(source.root.resolve())
    calibration = {"calibrator": recipe.calib, "percentile": recipe.percentile, "calib_size": recipe.calib_size,
                   "calib_manifest": str(calib_manifest), "data": source.data, "data_root": root}  # fmt: skip
    info = {"calibration": calibration, "source": str(source_file)}
    metrics: dict[str, Any] = {"bits": config.label, "config": config.describe(), "calibrator": recipe.calib, "fp32_top1": fp_top1,
                               "simulated_top1": q_top1, "n_test_images": n, "data": source.describe()}  # fmt: skip
    if recipe.lsq:
        metrics["ptq_top1"] = q_top1
        metrics["lsq"] = train_lsq(gm, meta, recipe, source, batches[0], info, out_dir, state)
        metrics["simulated_top1"] = metrics["lsq"]["best_top1"]
    metrics["drop_points"] = fp_top1 - metrics["simulated_top1"]
    metrics["layers"] = layer_table(gm)
    save_quantized(out_dir / QUANT_FILE, gm, meta, info)
    write_manifest(out_dir, STAGE, {"model": source_file, "calib_manifest": calib_manifest},
                   recipe.model_dump(mode="json") | {"resolved_model": meta.as_dict(), "layout": "ssql"}, metrics,
                   {"quantized": out_dir / QUANT_FILE})  # fmt: skip
    return metrics | {"out_dir": str(out_dir)}
