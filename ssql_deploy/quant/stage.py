"""`ssql-deploy quantize`: calibrate a trained model at a bit-width and measure the simulation."""

from typing import Any

import torch

from ssql_deploy.distributed import DistInfo
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import check_classes, eval_loader, evaluate_top1
from ssql_deploy.models.trained import load_trained
from ssql_deploy.quant.artifact import QUANT_FILE, quant_dir, save_quantized
from ssql_deploy.quant.bits import BitSpec
from ssql_deploy.quant.calib_set import load_calibration
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.lsq import train_lsq
from ssql_deploy.quant.placement import prepare
from ssql_deploy.recipe import QuantizeRecipe
from ssql_deploy.run import write_manifest

STAGE = "quantize"


def run_quantize(recipe: QuantizeRecipe, resume: bool = False) -> dict[str, Any]:
    bits = BitSpec.parse(recipe.bits)
    model, meta, source = load_trained(recipe.source, recipe.arch, recipe.data, recipe.input_size)
    if recipe.out is None and not recipe.source.is_dir():
        raise UserError("--out is needed when quantizing a checkpoint file", "pass --out RUN_DIR")
    run_dir = recipe.out or recipe.source
    data = recipe.data or meta.data
    check_classes(meta, data, recipe.data_root)
    batches, calib_manifest = load_calibration(data, recipe.data_root, recipe.calib_size, meta.input_size, recipe.calib_dir)

    model.eval()
    gm = prepare(model, "ssql", bits)
    calibrate(gm, batches, recipe.calib, recipe.percentile)
    loader = eval_loader(data, recipe.data_root, meta.input_size, recipe.subset, recipe.batch_size, recipe.workers, recipe.download)
    cpu, one = torch.device("cpu"), DistInfo()
    fp_top1, n = evaluate_top1(model, loader, cpu, one, "float top-1")
    q_top1, _ = evaluate_top1(gm, loader, cpu, one, f"{bits} simulated top-1")

    out_dir = quant_dir(run_dir, bits, recipe.lsq)
    calibration = {"calibrator": recipe.calib, "percentile": recipe.percentile, "calib_size": recipe.calib_size,
                   "calib_manifest": str(calib_manifest), "data": data}  # fmt: skip
    info = {"calibration": calibration, "source": str(source)}
    metrics: dict[str, Any] = {"bits": str(bits), "calibrator": recipe.calib, "fp32_top1": fp_top1, "simulated_top1": q_top1,
                               "n_test_images": n}  # fmt: skip
    if recipe.lsq:
        metrics["ptq_top1"] = q_top1
        metrics["lsq"] = train_lsq(gm, meta, recipe, batches[0], data, info, out_dir, resume)
        metrics["simulated_top1"] = metrics["lsq"]["best_top1"]
    metrics["drop_points"] = fp_top1 - metrics["simulated_top1"]
    save_quantized(out_dir / QUANT_FILE, gm, meta, info)
    write_manifest(out_dir, STAGE, {"model": source, "calib_manifest": calib_manifest},
                   recipe.model_dump(mode="json") | {"resolved_model": meta.as_dict(), "layout": "ssql"}, metrics,
                   {"quantized": out_dir / QUANT_FILE})  # fmt: skip
    return metrics | {"out_dir": str(out_dir)}
