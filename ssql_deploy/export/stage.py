"""`ssql-deploy export`: a quantized model -> QDQ ONNX in the layout an engine needs, checked and verified.

Every check runs on the graph in memory before anything is written; the files follow, and the
manifest comes last and commits them. An export killed halfway leaves files without a matching
manifest, which bench reports as `unverified`, never as a shipped model. The export fails (exit 1,
manifest status "failed") when the graph breaks the engine's rules or when ONNX Runtime departs
from the PyTorch simulation (see parity.py): an artifact that does not compute what was measured
must not ship.
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
from ssql_deploy.manifest import read_manifest, unverified_reason, write_manifest
from ssql_deploy.models.checkpoint import save_atomic
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.quant.artifact import find_quantized, load_quantized, twin_payload, variant
from ssql_deploy.quant.calib_set import load_calibration
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.placement import ActPoint, trace
from ssql_deploy.recipe import ExportRecipe
from ssql_deploy.run import atomic_open, write_text_atomic

STAGE = "export"
QDQ_FILE, FP32_FILE, PLAN_FILE, TWIN_FILE = "model.qdq.onnx", "model.onnx", "model.plan", "twin.pt"
META_KEY = "ssql_deploy_model"  # ONNX metadata entry holding the ModelMeta as JSON


def export_dir(run_dir: Path, label: str, engine: str) -> Path:
    return run_dir / STAGE / f"{label}-{engine}"


def fp32_dir(run_dir: Path) -> Path:
    return run_dir / STAGE / "fp32"


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        f.write(model.SerializeToString())  # weights embedded: no external-data paths to resolve


def model_props(meta: ModelMeta, **extra: str) -> dict[str, str]:
    return {META_KEY: json.dumps(meta.as_dict()), **{k: str(v) for k, v in meta.as_dict().items()}, **extra}


def export_float(float_model: torch.nn.Module, meta: ModelMeta, run_dir: Path) -> Path:
    """The FP32 ONNX of the same network (BatchNorm folded): the baseline every speed-up is measured against.

    Rewritten only when its bytes change, so the TensorRT FP16 plan built from it stays committed.
    """
    out = fp32_dir(run_dir)
    path = out / FP32_FILE
    data = build_onnx(trace(float_model), (3, meta.input_size, meta.input_size), "ort", model_props(meta, bits="fp32")).SerializeToString()
    if path.is_file() and path.read_bytes() == data and unverified_reason(path) is None:
        return path
    with atomic_open(path, "wb") as f:
        f.write(data)
    write_manifest(out, STAGE, {}, {"what": "FP32 ONNX of the fine-tuned model"}, {"status": "ok"}, {"onnx": path})
    return path


def _numerics_notes(gm: torch.fx.GraphModule) -> list[str]:
    """Where the deployed numerics differ from the `ssql` simulation, said in plain words."""
    points: dict[str, ActPoint] = gm.quant_points  # type: ignore[assignment]
    notes = []
    resigned = sum(1 for p in points.values() if p.nonnegative and p.signed and p.bits == 8)
    if resigned:
        notes.append(f"{resigned} non-negative 8-bit activations re-expressed as signed int8 (127 levels, not 255): "
                     "TensorRT has no uint8; accuracy measured on this artifact is of these deployed numerics")  # fmt: skip
    extra = sum(1 for p in points.values() if p.kind in ("input", "branch", "skip", "preactivation"))
    if extra:
        notes.append(f"{extra} 8-bit quantizers added for the runtime (network input, residual Add inputs, conv outputs "
                     "before activations it cannot fuse) beyond the SSQL placement")  # fmt: skip
    return notes


def run_export(recipe: ExportRecipe) -> dict[str, Any]:
    qpath = find_quantized(recipe.source, recipe.bits, recipe.lsq)
    loaded = load_quantized(qpath, layout=recipe.engine)
    gm, meta, saved, missing = loaded.gm, loaded.meta, loaded.saved, loaded.uncalibrated
    cal = saved["calibration"]
    stored_root = Path(cal["data_root"]) if cal.get("data_root") else None
    source = meta.source(cal["data"], recipe.data_root or stored_root)
    batches, calib_manifest = load_calibration(source, cal["calib_size"], Path(cal["calib_manifest"]).parent)
    if missing:
        calibrate(gm, batches, cal["calibrator"], cal["percentile"], points=sorted(missing))
    run_dir = recipe.out or (recipe.source if recipe.source.is_dir() else qpath.parents[2])
    label = variant(saved.get("label", saved["bits"]), saved["lsq"])
    out_dir = export_dir(run_dir, label, recipe.engine)
    chw = (3, meta.input_size, meta.input_size)

    zero_point = 0
    if recipe.engine == "ort" and (recipe.ort_kernel == "gemm" or (recipe.ort_kernel == "auto" and cpu_has_amx_int8())):
        zero_point = -1
    props = model_props(meta, bits=label, variant=label, engine=recipe.engine, calibrator=cal["calibrator"])
    model = build_onnx(gm, chw, recipe.engine, props, weight_zero_point=zero_point)

    metrics: dict[str, Any] = {"bits": label, "variant": label, "engine": recipe.engine, "notes": _numerics_notes(gm),
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
    problems += parity["problems"]

    # Commit: the checked files first, the manifest last (bench trusts only files their manifest hashes).
    onnx_path, twin_path = out_dir / QDQ_FILE, out_dir / TWIN_FILE
    write_text_atomic(out_dir / "parity.json", json.dumps(parity, indent=1) + "\n")
    save_onnx(model, onnx_path)
    save_atomic(twin_payload(saved, gm), twin_path)
    fp32_path = export_float(loaded.float_model, meta, run_dir)
    outputs = {"onnx": onnx_path, "twin": twin_path}
    if recipe.engine == "trt" and not problems:
        metrics["tensorrt"] = _tensorrt(onnx_path, fp32_path, out_dir, chw, recipe, outputs)
    metrics["status"] = "failed: " + problems[0] if problems else "ok"
    write_manifest(out_dir, STAGE, {"quantized": qpath, "calib_manifest": calib_manifest, "fp32_onnx": fp32_path},
                   recipe.model_dump(mode="json"), metrics, outputs)  # fmt: skip
    if problems:
        raise CheckFailed(f"export {label}-{recipe.engine} failed: {problems[0]}", f"see {out_dir / 'manifest.json'}")
    return metrics | {"onnx": str(onnx_path), "fp32_onnx": str(fp32_path)}


def _tensorrt(
    onnx_path: Path, fp32_path: Path, out_dir: Path, chw: tuple[int, int, int], recipe: ExportRecipe, outputs: dict[str, Path]
) -> dict[str, Any]:
    """Build the INT8 plan and, beside the FP32 ONNX, the FP16 plan it is compared with (same GPU, same profile)."""
    low, opt, high = recipe.trt_batches
    command = trtexec_command(onnx_path, out_dir / PLAN_FILE, INPUT_NAME, chw, low, opt, high)
    fp16_plan = fp32_path.with_name(PLAN_FILE)
    fp16_command = trtexec_command(fp32_path, fp16_plan, INPUT_NAME, chw, low, opt, high, int8=False)
    available, reason = tensorrt_status()
    if not (available and recipe.build_engine):
        why = reason if not available else "engine build disabled (--no-build-engine)"
        return {"built": False, "reason": why, "build_with": command, "fp16_baseline_build_with": fp16_command}
    sidecar = build_engine(onnx_path, out_dir / PLAN_FILE, INPUT_NAME, chw, (low, opt, high))
    outputs["plan"] = out_dir / PLAN_FILE
    fp16 = build_engine(fp32_path, fp16_plan, INPUT_NAME, chw, (low, opt, high), int8=False)
    fp32_manifest = read_manifest(fp32_path.parent)
    write_manifest(fp32_path.parent, STAGE, {}, fp32_manifest.settings if fp32_manifest else {}, {"status": "ok", "fp16_plan": fp16},
                   {"onnx": fp32_path, "plan": fp16_plan})  # fmt: skip
    return {"built": True, "sidecar": sidecar, "trtexec_equivalent": command, "fp16_baseline": fp16}
