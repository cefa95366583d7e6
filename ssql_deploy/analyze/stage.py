"""`ssql-deploy analyze`: per-layer sensitivity of a trained model, written as JSON and a heat-map.

Nothing of the run is changed: the analysis writes RUN/analyze/ (files first, manifest last), so
an interrupted analysis leaves the previous one, if any, whole.
"""

import json
from typing import Any

import torch

from ssql_deploy.analyze.heatmap import plot_sensitivity
from ssql_deploy.analyze.sensitivity import Settings, Validation, measure
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import model_data
from ssql_deploy.manifest import write_manifest
from ssql_deploy.models.registry import model_spec
from ssql_deploy.models.trained import load_trained
from ssql_deploy.quant.calib_set import load_calibration, load_validation
from ssql_deploy.quant.config import QuantConfig
from ssql_deploy.quant.placement import prepare
from ssql_deploy.recipe import AnalyzeRecipe
from ssql_deploy.run import write_text_atomic
from ssql_deploy.run_layout import RunLayout

STAGE = "analyze"
SENSITIVITY_FILE, HEATMAP_FILE = "sensitivity.json", "sensitivity.png"


def run_analyze(recipe: AnalyzeRecipe) -> dict[str, Any]:
    if not recipe.source.exists():
        raise UserError(f"{recipe.source} does not exist", "pass a run directory (the --out of `ssql-deploy finetune`) or a checkpoint")
    if recipe.out is None and not recipe.source.is_dir():
        raise UserError("--out is needed when analysing a checkpoint file", "pass --out RUN_DIR")
    out_dir = RunLayout(recipe.out or recipe.source).analyze
    model, meta, source_file = load_trained(recipe.source, recipe.arch, recipe.data, recipe.input_size)
    model.eval()
    gm = prepare(model, "ssql", QuantConfig(w=8, a=8), model_spec(meta.arch))
    if not gm.quant_points and not any(gm.quant_weights.values()):  # type: ignore[attr-defined,operator]
        raise UserError(f"{meta.arch} has no layer to quantize", "analyze a model with convolutions outside its classifier")
    source = model_data(meta, recipe.data, recipe.data_root, recipe.input_size, recipe.download)
    calib, calib_manifest = load_calibration(source, recipe.calib_size, recipe.calib_dir)
    images, labels, val_manifest = load_validation(source, recipe.val_size, recipe.calib_size, recipe.calib_dir)
    settings = Settings(tuple(recipe.bits), recipe.metric, recipe.calib, recipe.percentile, recipe.hutchinson_samples, recipe.seed)
    torch.manual_seed(recipe.seed)
    result = measure(gm, Validation(images, labels, recipe.batch_size), calib, settings)
    result |= {"arch": meta.arch, "model": str(source_file), "validation": {"images": len(labels), "manifest": str(val_manifest)},
               "calibration": {"calibrator": recipe.calib, "images": recipe.calib_size, "manifest": str(calib_manifest)}}  # fmt: skip
    paths = {"sensitivity": out_dir / SENSITIVITY_FILE, "heatmap": out_dir / HEATMAP_FILE}
    write_text_atomic(paths["sensitivity"], json.dumps(result, indent=1) + "\n")
    plot_sensitivity(result, paths["heatmap"], f"{meta.arch}: per-layer sensitivity ({result['unit']})")
    summary = {k: result[k] for k in ("metric", "bits", "float", "evaluations", "seconds")}
    write_manifest(out_dir, STAGE, {"model": source_file, "calib_manifest": calib_manifest, "val_manifest": val_manifest},
                   recipe.model_dump(mode="json") | {"resolved_model": meta.as_dict()}, summary, paths)  # fmt: skip
    return result | {"paths": {k: str(v) for k, v in paths.items()}}


def most_sensitive(result: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """The `top` quantizers (weights and activations together) that cost most at the lowest width analysed."""
    low = str(min(result["bits"]))
    rows = [{"role": "w", "name": r["layer"], **r} for r in result["weights"]] + [
        {"role": "a", "name": r["layer"], **r} for r in result["activations"]
    ]
    return sorted(rows, key=lambda r: r["sensitivity"][low], reverse=True)[:top]
