"""`ssql-deploy export`: a quantized model -> QDQ ONNX in the layout an engine needs, checked and verified.

Every check runs on the graph in memory before anything is written; the files follow, and the
manifest comes last and commits them. An export killed halfway leaves files without a matching
manifest, which bench reports as `unverified`, never as a shipped model. The export fails (exit 1,
manifest status "failed") when the graph breaks the engine's rules or when ONNX Runtime departs
from the PyTorch simulation (see parity.py): an artifact that does not compute what was measured
must not ship.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from pydantic import BaseModel, ConfigDict

from ssql_deploy.bench.evalset import EVALSET_FILE, write_evalset
from ssql_deploy.data import DataSource
from ssql_deploy.errors import CheckFailed, UserError
from ssql_deploy.export.engine_checks import CHECKS
from ssql_deploy.export.fp16_cast import cast_to_fp16
from ssql_deploy.export.kernel_choice import ZERO_POINTS, KernelChoice, choose_kernel
from ssql_deploy.export.onnx_graph import INPUT_NAME, build_onnx
from ssql_deploy.export.openvino_ir import ovc_command, require_openvino, save_ir
from ssql_deploy.export.parity import check_parity
from ssql_deploy.export.storage import weight_storage
from ssql_deploy.export.tensorrt_engine import build_engine, tensorrt_status, trtexec_command
from ssql_deploy.manifest import Manifest, read_manifest, unverified_reason, write_manifest
from ssql_deploy.models.checkpoint import save_atomic
from ssql_deploy.models.trained import ModelMeta, load_trained
from ssql_deploy.quant.artifact import LoadedQuantized, find_quantized, load_quantized, saved_variant, twin_payload
from ssql_deploy.quant.calib_set import load_calibration
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.layouts import LAYOUTS
from ssql_deploy.quant.placement import RUNTIME_KINDS, ActPoint, trace
from ssql_deploy.recipe import ExportRecipe
from ssql_deploy.run import atomic_open, write_text_atomic
from ssql_deploy.run_layout import FP16_FILE, FP32_FILE, PARITY_FILE, TWIN_FILE, ExportKey, RunLayout
from ssql_deploy.runtimes import ENGINES, QDQ_FILE, Engine

STAGE = "export"
META_KEY = "ssql_deploy_model"  # ONNX metadata entry holding the ModelMeta as JSON


class EngineBuild(BaseModel):
    """The engine file built from the QDQ ONNX (a TensorRT plan), or why it was not, with the command that builds it."""

    built: bool
    reason: str | None = None
    build_with: str  # TensorRT 10
    build_with_strongly_typed: str | None = None  # TensorRT 11, which has no precision flags
    fp16_baseline_build_with: str | None = None
    fp16_baseline_build_with_strongly_typed: str | None = None  # from the float16 copy of the FP32 ONNX (fp16_cast.py)
    sidecar: dict[str, Any] | None = None
    fp16_baseline: dict[str, Any] | None = None


class ExportMetrics(BaseModel):
    """What an export's manifest records, read back by bench as this type (an older manifest is refused, not guessed)."""

    model_config = ConfigDict(extra="forbid")
    variant: str
    engine: Engine
    status: str  # ok | failed: <the first problem>
    notes: list[str]
    newly_calibrated_points: list[str]
    weight_zero_point: int
    kernel_choice: KernelChoice | None = None  # what `--ort-kernel auto` measured; None when the kernel was given or the layout has one
    check: dict[str, Any]  # the engine's own check (engine_checks.py)
    parity: dict[str, Any]
    engine_build: EngineBuild | None = None
    weight_storage: dict[str, Any] | None = None  # export/storage.py; None in manifests written before it existed

    @classmethod
    def of(cls, manifest: Manifest) -> "ExportMetrics":
        return cls.model_validate(manifest.metrics)


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        f.write(model.SerializeToString())  # weights embedded: no external-data paths to resolve


def model_props(meta: ModelMeta, **extra: str) -> dict[str, str]:
    return {META_KEY: json.dumps(meta.as_dict()), **{k: str(v) for k, v in meta.as_dict().items()}, **extra}


def export_float(float_model: torch.nn.Module, meta: ModelMeta, run_dir: Path) -> Path:
    """The FP32 ONNX of the same network (BatchNorm folded): the baseline every speed-up is measured against.

    Rewritten only when its bytes change, so the TensorRT FP16 plan built from it stays committed.
    """
    out = RunLayout(run_dir).fp32
    path = out / FP32_FILE
    data = build_onnx(trace(float_model), (3, meta.input_size, meta.input_size), "ort", model_props(meta, bits="fp32")).SerializeToString()
    if path.is_file() and path.read_bytes() == data and unverified_reason(path) is None:
        return path
    with atomic_open(path, "wb") as f:
        f.write(data)
    write_manifest(out, STAGE, {}, {"what": "FP32 ONNX of the fine-tuned model"}, {"status": "ok"}, {"onnx": path})
    return path


def float_baseline(loaded: LoadedQuantized, qpath: Path, run_dir: Path) -> torch.nn.Module | None:
    """The network the run's FP32 ONNX is of: the model quantization started from, None to keep the baseline there is.

    A PTQ model wraps those weights unchanged. LSQ trained its own copy, so an LSQ model's float
    weights are not the fine-tuned model's that bench's torch-fp32 row scores: its baseline is
    rebuilt from the checkpoint its quantize manifest names, when that file is still the one hashed.
    """
    if not loaded.saved.get("lsq"):
        return loaded.float_model
    manifest = read_manifest(qpath.parent)
    record = manifest.inputs.get("model") if manifest is not None else None
    if record is not None and record.matches():
        meta = loaded.meta
        return load_trained(Path(record.path), meta.arch, meta.data, meta.input_size)[0]
    if (RunLayout(run_dir).fp32 / FP32_FILE).is_file():
        return None
    where = record.path if record is not None else "(not named in its manifest)"
    raise UserError(f"the FP32 baseline is of the model LSQ started from, {where}, which is gone or has changed since",
                    "restore that checkpoint, or export a PTQ model of the same run first (it writes the baseline)")  # fmt: skip


def _numerics_notes(gm: torch.fx.GraphModule) -> list[str]:
    """Where the deployed numerics differ from the `ssql` simulation, said in plain words."""
    points: dict[str, ActPoint] = gm.quant_points  # type: ignore[assignment]
    notes = []
    resigned = sum(1 for p in points.values() if p.nonnegative and p.signed and p.bits == 8)
    if resigned:
        notes.append(f"{resigned} non-negative 8-bit activations re-expressed as signed int8 (127 levels, not 255): "
                     "this layout has no uint8; accuracy measured on this artifact is of these deployed numerics")  # fmt: skip
    extra = sum(1 for p in points.values() if p.kind in RUNTIME_KINDS)
    if extra:
        notes.append(f"{extra} 8-bit quantizers added for the runtime (network input, residual Add inputs, conv outputs "
                     "before activations it cannot fuse) beyond the SSQL placement")  # fmt: skip
    return notes


def _write_evalset(out_dir: Path, source: DataSource, size: int | None) -> Path:
    """The test images as this model sees them, with labels: what `bench --evalset` needs on a board without torch."""
    split = source.split("test", size)
    pairs = [split[i] for i in range(len(split))]  # type: ignore[arg-type]
    images = torch.stack([image for image, _ in pairs]).numpy()
    labels = np.array([int(label) for _, label in pairs])
    path = out_dir / EVALSET_FILE
    write_evalset(path, images, labels, {"data": source.describe(), "split": "test", "images": len(labels)})
    return path


def _build_graph(
    gm: torch.fx.GraphModule, chw: tuple[int, int, int], recipe: ExportRecipe, props: dict[str, str]
) -> tuple[onnx.ModelProto, int, KernelChoice | None]:
    """The QDQ graph with the weight zero-point the kernel asks for; `auto` times both ONNX Runtime kernels.

    Engines without the ORT kernel option (trt, openvino) take weight zero-point 0: the only one
    TensorRT accepts and the only one OpenVINO fuses into int8 convolutions.
    """
    layout = ENGINES[recipe.engine].layout
    if "ort_kernel" not in ENGINES[recipe.engine].options:
        return build_onnx(gm, chw, layout, props, weight_zero_point=0), 0, None
    if recipe.ort_kernel == "auto":
        graphs = {zp: build_onnx(gm, chw, layout, props, weight_zero_point=zp) for zp in LAYOUTS[layout].weight_zero_points}
        choice = choose_kernel(graphs, chw[-1], recipe.threads or torch.get_num_threads())
        return graphs[choice.weight_zero_point], choice.weight_zero_point, choice
    zero_point = ZERO_POINTS[recipe.ort_kernel]
    return build_onnx(gm, chw, layout, props, weight_zero_point=zero_point), zero_point, None


def run_export(recipe: ExportRecipe) -> tuple[ExportMetrics, Path]:
    """Export, check and commit one quantized model for one engine; returns the metrics and the QDQ ONNX path."""
    engine = ENGINES[recipe.engine]
    if engine.runtime == "openvino":
        require_openvino()
    qpath = find_quantized(recipe.source, recipe.bits, recipe.lsq)
    loaded = load_quantized(qpath, layout=engine.layout)
    gm, meta, saved, missing = loaded.gm, loaded.meta, loaded.saved, loaded.uncalibrated
    cal = saved["calibration"]
    stored_root = Path(cal["data_root"]) if cal.get("data_root") else None
    source = meta.source(cal["data"], recipe.data_root or stored_root)
    batches, calib_manifest = load_calibration(source, cal["calib_size"], Path(cal["calib_manifest"]).parent)
    if missing:
        calibrate(gm, batches, cal["calibrator"], cal["percentile"], points=sorted(missing))
    run_dir = recipe.out or (recipe.source if recipe.source.is_dir() else RunLayout.of_quantized(qpath).root)
    label = saved_variant(saved)
    out_dir = RunLayout(run_dir).export(ExportKey(label, engine.name))
    chw = (3, meta.input_size, meta.input_size)

    baseline = float_baseline(loaded, qpath, run_dir)
    props = model_props(meta, bits=label, variant=label, engine=engine.name, calibrator=cal["calibrator"])
    model, zero_point, kernel_choice = _build_graph(gm, chw, recipe, props)
    check = CHECKS[engine.name](model, recipe.threads or torch.get_num_threads())
    parity = check_parity(gm, model, batches, recipe.threads)
    problems = check.problems + parity["problems"]

    # Commit: the checked files first, the manifest last (bench trusts only files their manifest hashes).
    onnx_path, twin_path = out_dir / QDQ_FILE, out_dir / TWIN_FILE
    write_text_atomic(out_dir / PARITY_FILE, json.dumps(parity, indent=1) + "\n")
    save_onnx(model, onnx_path)
    save_atomic(twin_payload(saved, gm), twin_path)
    fp32_path = export_float(baseline, meta, run_dir) if baseline is not None else RunLayout(run_dir).fp32 / FP32_FILE
    outputs = {"onnx": onnx_path, "twin": twin_path}
    if recipe.evalset:
        outputs["evalset"] = _write_evalset(out_dir, source, recipe.eval_size)
    build = BUILDERS[engine.name](onnx_path, fp32_path, out_dir, chw, recipe, outputs) if engine.builds_from_onnx and not problems else None
    metrics = ExportMetrics(variant=label, engine=engine.name, status="failed: " + problems[0] if problems else "ok",
                            notes=_numerics_notes(gm) + check.notes, newly_calibrated_points=sorted(missing),
                            weight_zero_point=zero_point, kernel_choice=kernel_choice, check=check.report, parity=parity, engine_build=build,
                            weight_storage=weight_storage(gm, onnx_path))  # fmt: skip
    write_manifest(out_dir, STAGE, {"quantized": qpath, "calib_manifest": calib_manifest, "fp32_onnx": fp32_path},
                   recipe.model_dump(mode="json"), metrics.model_dump(mode="json"), outputs)  # fmt: skip
    if problems:
        raise CheckFailed(f"export {label}-{engine.name} failed: {problems[0]}", f"see {out_dir / 'manifest.json'}")
    return metrics, onnx_path


def _build_tensorrt(
    onnx_path: Path, fp32_path: Path, out_dir: Path, chw: tuple[int, int, int], recipe: ExportRecipe, outputs: dict[str, Path]
) -> EngineBuild:
    """Build the INT8 plan and, beside the FP32 ONNX, the FP16 plan it is compared with (same GPU, same profile).

    The FP32 ONNX's float16 copy is written beside it for TensorRT 11, whose strongly typed FP16
    baseline must come from a float16 graph (fp16_cast.py); TensorRT 10 builds it from the FP32 ONNX.
    """
    plan_file = ENGINES["trt"].file
    low, opt, high = recipe.trt_batches
    command = trtexec_command(onnx_path, out_dir / plan_file, INPUT_NAME, chw, low, opt, high)
    typed = trtexec_command(onnx_path, out_dir / plan_file, INPUT_NAME, chw, low, opt, high, strongly_typed=True)
    fp16_plan, fp16_onnx = fp32_path.with_name(plan_file), fp32_path.with_name(FP16_FILE)
    if unverified_reason(fp16_onnx) is not None:
        save_onnx(cast_to_fp16(onnx.load(str(fp32_path))), fp16_onnx)
        _commit_beside_fp32(fp32_path, {"fp16_onnx": fp16_onnx}, {})
    fp16_command = trtexec_command(fp32_path, fp16_plan, INPUT_NAME, chw, low, opt, high, int8=False)
    fp16_typed = trtexec_command(fp16_onnx, fp16_plan, INPUT_NAME, chw, low, opt, high, int8=False, strongly_typed=True)
    lines = {"build_with": command, "build_with_strongly_typed": typed, "fp16_baseline_build_with": fp16_command,
             "fp16_baseline_build_with_strongly_typed": fp16_typed}  # fmt: skip
    available, reason = tensorrt_status()
    if not (available and recipe.build_engine):
        why = reason if not available else "engine build disabled (--no-build-engine)"
        return EngineBuild(built=False, reason=why, **lines)
    sidecar = build_engine(onnx_path, out_dir / plan_file, INPUT_NAME, chw, (low, opt, high))
    outputs["plan"] = out_dir / plan_file
    fp16 = build_engine(fp16_onnx if sidecar["strongly_typed"] else fp32_path, fp16_plan, INPUT_NAME, chw, (low, opt, high), int8=False)
    _commit_beside_fp32(fp32_path, {"plan": fp16_plan}, {"fp16_plan": fp16})
    return EngineBuild(built=True, sidecar=sidecar, fp16_baseline=fp16, **lines)


def _build_openvino(
    onnx_path: Path, fp32_path: Path, out_dir: Path, _chw: tuple[int, int, int], _recipe: ExportRecipe, outputs: dict[str, Path]
) -> EngineBuild:
    """The OpenVINO IR of the QDQ ONNX and, beside the FP32 ONNX, of its baseline: the same graphs, which OpenVINO
    runs as fast as the ONNX but reads and compiles in about two thirds of the time (`benchmarks/results/peers_32.json`)."""
    ir = out_dir / ENGINES["openvino"].file
    outputs |= save_ir(onnx_path, ir)
    fp32_ir = fp32_path.with_name(ir.name)
    if unverified_reason(fp32_ir) is not None:
        _commit_beside_fp32(fp32_path, save_ir(fp32_path, fp32_ir), {})
    return EngineBuild(built=True, build_with=ovc_command(onnx_path, ir))


BUILDERS: dict[Engine, Callable[[Path, Path, Path, tuple[int, int, int], ExportRecipe, dict[str, Path]], EngineBuild]] = {
    "trt": _build_tensorrt,
    "openvino": _build_openvino,
}
assert set(BUILDERS) == {e.name for e in ENGINES.values() if e.builds_from_onnx}


def _commit_beside_fp32(fp32_path: Path, outputs: dict[str, Path], metrics: dict[str, Any]) -> None:
    """Commit an engine's baseline built from the FP32 ONNX, keeping what other engines committed beside it."""
    manifest = read_manifest(fp32_path.parent)
    kept = {} if manifest is None else {k: fp32_path.with_name(Path(r.path).name) for k, r in manifest.outputs.items()}
    kept = {k: path for k, path in kept.items() if unverified_reason(path) is None}
    write_manifest(fp32_path.parent, STAGE, {}, manifest.settings if manifest else {},
                   {**(manifest.metrics if manifest else {}), "status": "ok", **metrics}, {**kept, "onnx": fp32_path, **outputs})  # fmt: skip
