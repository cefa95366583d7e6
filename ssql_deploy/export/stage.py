"""`ssql-deploy export`: a quantized model -> QDQ ONNX in the layout an engine needs, checked and verified.

The export fails (exit 1, manifest status "failed") when the graph breaks the engine's rules or
when ONNX Runtime disagrees with the PyTorch simulation on more than 1% of the calibration
images: an artifact that does not compute what was measured must not ship.
"""

import json
from pathlib import Path
from typing import Any

import onnx
import torch

from ssql_deploy.errors import CheckFailed
from ssql_deploy.export.onnx_graph import INPUT_NAME, build_onnx
from ssql_deploy.export.ort_session import cpu_has_amx_int8, integer_conv_report
from ssql_deploy.export.parity import check_parity
from ssql_deploy.export.tensorrt_engine import build_engine, tensorrt_status, trtexec_command
from ssql_deploy.export.trt_rules import check_trt_qdq
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.quant.artifact import find_quantized, load_quantized, variant
from ssql_deploy.quant.bits import BitSpec
from ssql_deploy.quant.calib_set import load_calibration
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.placement import ActPoint, trace
from ssql_deploy.recipe import ExportRecipe
from ssql_deploy.run import atomic_open, write_manifest, write_text_atomic

STAGE = "export"
QDQ_FILE, FP32_FILE, PLAN_FILE = "model.qdq.onnx", "model.onnx", "model.plan"


def export_dir(run_dir: Path, label: str, engine: str) -> Path:
    return run_dir / STAGE / f"{label}-{engine}"


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        f.write(model.SerializeToString())  # weights embedded: no external-data paths to resolve


def export_float(float_model: torch.nn.Module, meta: ModelMeta, run_dir: Path) -> Path:
    """The FP32 ONNX of the same network (BatchNorm folded): the baseline every speed-up is measured against."""
    path = run_dir / STAGE / "fp32" / FP32_FILE
    model = build_onnx(trace(float_model), (3, meta.input_size, meta.input_size), "ort", {"bits": "fp32", **_meta_props(meta)})
    save_onnx(model, path)
    return path


def _meta_props(meta: ModelMeta) -> dict[str, str]:
    return {k: str(v) for k, v in meta.as_dict().items()}


def _numerics_notes(gm: torch.fx.GraphModule) -> list[str]:
    """Where the deployed numerics differ from the `ssql` simulation, said in plain words."""
    points: dict[str, ActPoint] = gm.quant_points  # type: ignore[assignment]
    notes = []
    resigned = sum(1 for p in points.values() if p.kind == "relu" and p.signed)
    if resigned:
        notes.append(f"{resigned} post-ReLU 8-bit activations re-expressed as signed int8 (127 levels, not 255): "
                     "TensorRT has no uint8; accuracy measured on this artifact is of these deployed numerics")  # fmt: skip
    extra = sum(1 for p in points.values() if p.kind != "relu")
    if extra:
        notes.append(f"{extra} 8-bit quantizers added for the runtime (network input, residual Add inputs) beyond the SSQL placement")
    return notes


def run_export(recipe: ExportRecipe) -> dict[str, Any]:
    bits = BitSpec.parse(recipe.bits) if recipe.bits else None
    qpath = find_quantized(recipe.source, bits, recipe.lsq)
    loaded = load_quantized(qpath, layout=recipe.engine)
    gm, meta, saved, missing = loaded.gm, loaded.meta, loaded.saved, loaded.uncalibrated
    cal = saved["calibration"]
    manifest_file = Path(cal["calib_manifest"])
    batches, calib_manifest = load_calibration(cal["data"], recipe.data_root, cal["calib_size"], meta.input_size, manifest_file.parent)
    if missing:
        calibrate(gm, batches, cal["calibrator"], cal["percentile"], points=sorted(missing))
    run_dir = recipe.out or (recipe.source if recipe.source.is_dir() else qpath.parents[2])
    label = variant(saved["bits"], saved["lsq"])
    out_dir = export_dir(run_dir, label, recipe.engine)
    chw = (3, meta.input_size, meta.input_size)

    zero_point = 0
    if recipe.engine == "ort" and (recipe.ort_kernel == "gemm" or (recipe.ort_kernel == "auto" and cpu_has_amx_int8())):
        zero_point = -1
    props = {"bits": saved["bits"], "variant": label, "engine": recipe.engine, "calibrator": cal["calibrator"], **_meta_props(meta)}
    model = build_onnx(gm, chw, recipe.engine, props, weight_zero_point=zero_point)
    onnx_path = out_dir / QDQ_FILE
    save_onnx(model, onnx_path)
    fp32_path = export_float(loaded.float_model, meta, run_dir)

    metrics: dict[str, Any] = {"bits": saved["bits"], "variant": label, "engine": recipe.engine, "notes": _numerics_notes(gm),
                               "newly_calibrated_points": sorted(missing), "weight_zero_point": zero_point}  # fmt: skip
    problems: list[str] = []
    if recipe.engine == "trt":
        violations = check_trt_qdq(model)
        metrics["trt_rule_violations"] = [str(v) for v in violations]
        problems += [f"TensorRT rule {v}" for v in violations[:1]]
    else:
        metrics["ort_kernels"] = report = integer_conv_report(model)
        if report["float_convs"]:
            metrics["notes"].append(f"{report['float_convs']} of {report['convs']} convolutions stay float in ONNX Runtime")
    metrics["parity"] = parity = check_parity(gm, model, batches, recipe.threads)
    if not parity["passed"]:
        problems.append(f"ONNX Runtime agrees with the PyTorch simulation on only {parity['top1_agreement']:.1f}% of calibration images")

    outputs = {"onnx": onnx_path, "fp32_onnx": fp32_path}
    if recipe.engine == "trt" and not problems:
        metrics["tensorrt"] = _tensorrt(onnx_path, out_dir, chw, recipe, outputs)
    metrics["status"] = "failed: " + problems[0] if problems else "ok"
    write_manifest(out_dir, STAGE, {"quantized": qpath, "calib_manifest": calib_manifest}, recipe.model_dump(mode="json"), metrics, outputs)
    write_text_atomic(out_dir / "parity.json", json.dumps(parity, indent=1) + "\n")
    if problems:
        raise CheckFailed(f"export {label}-{recipe.engine} failed: {problems[0]}", f"see {out_dir / 'manifest.json'}")
    return metrics | {"onnx": str(onnx_path), "fp32_onnx": str(fp32_path)}


def _tensorrt(onnx_path: Path, out_dir: Path, chw: tuple[int, int, int], recipe: ExportRecipe, outputs: dict[str, Path]) -> dict[str, Any]:
    low, opt, high = recipe.trt_batches
    command = trtexec_command(onnx_path, out_dir / PLAN_FILE, INPUT_NAME, chw, low, opt, high)
    available, reason = tensorrt_status()
    if not (available and recipe.build_engine):
        why = reason if not available else "engine build disabled (--no-build-engine)"
        return {"built": False, "reason": why, "build_with": command}
    sidecar = build_engine(onnx_path, out_dir / PLAN_FILE, INPUT_NAME, chw, (low, opt, high))
    outputs["plan"] = out_dir / PLAN_FILE
    return {"built": True, "sidecar": sidecar, "trtexec_equivalent": command}
