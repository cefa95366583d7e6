"""What `bench` can measure, found from the paths a user gives (run directories or files).

A run directory expands to every artifact its stages wrote, in pipeline order: the PyTorch float
model, each PyTorch fake-quant model, the FP32 ONNX, each QDQ ONNX and each TensorRT plan; an
export that failed or a plan that could not be built still gets a row, with the reason.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ssql_deploy.errors import UserError
from ssql_deploy.export.stage import FP32_FILE, PLAN_FILE, QDQ_FILE
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.quant.artifact import QUANT_FILE, variant
from ssql_deploy.run import MANIFEST


@dataclass
class Artifact:
    name: str
    runtime: str  # torch | onnxruntime | tensorrt
    bits: str  # fp32 | wXaY
    kind: str  # torch-float | torch-fakequant | onnx | plan
    path: Path | None
    meta: ModelMeta | None = None
    status: str = "ok"
    reference: str | None = None  # the PyTorch row whose predictions this artifact should reproduce
    notes: list[str] = field(default_factory=list)


def _onnx_meta(path: Path) -> dict[str, str]:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for non-ONNX files
        raise UserError(
            f"{path} is not an ONNX model ({type(exc).__name__})", "pass a .onnx file written by `ssql-deploy export`"
        ) from None
    return {p.key: p.value for p in model.metadata_props}


def _meta_from(props: dict[str, Any], path: Path) -> ModelMeta:
    try:
        return ModelMeta(str(props["arch"]), str(props["stem"]), int(props["num_classes"]), int(props["input_size"]), str(props["data"]))
    except KeyError:
        raise UserError(
            f"{path} carries no ssql-deploy metadata (arch, input size, dataset)", "bench artifacts written by `ssql-deploy export`"
        ) from None


def from_file(path: Path) -> Artifact:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        props = _onnx_meta(path)
        bits, engine = props.get("bits", "fp32"), props.get("engine", "ort")
        label = props.get("variant", bits)
        name = "onnx-fp32" if bits == "fp32" else f"qdq-{engine}-{label}"
        reference = "torch-fp32" if bits == "fp32" else f"torch-{label}"
        return Artifact(name, "onnxruntime", bits, "onnx", path, _meta_from(props, path), reference=reference)
    if suffix == ".plan":
        sidecar = path.with_name(path.name + ".json")
        props = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        onnx_props = _onnx_meta(path.with_name(QDQ_FILE)) if path.with_name(QDQ_FILE).is_file() else {}
        bits = onnx_props.get("bits", "unknown")
        label = onnx_props.get("variant", bits)
        return Artifact(
            f"trt-{label}",
            "tensorrt",
            bits,
            "plan",
            path,
            _meta_from(onnx_props, path),
            reference=f"torch-{label}",
            notes=[str(props.get("flags", ""))],
        )
    obj = load_checkpoint(path)
    if obj.get("format") != "ssql-deploy" or "arch" not in obj:
        raise UserError(f"{path} is not a model written by ssql-deploy", "bench run directories, .onnx, .plan or ssql-deploy .pt files")
    meta = ModelMeta.from_checkpoint(obj)
    if obj.get("kind") == "quantized":
        return Artifact(f"torch-{variant(obj['bits'], obj['lsq'])}", "torch", obj["bits"], "torch-fakequant", path, meta)
    return Artifact("torch-fp32", "torch", "fp32", "torch-float", path, meta)


def _export_rows(export_dir: Path) -> list[Artifact]:
    manifest = json.loads((export_dir / MANIFEST).read_text()) if (export_dir / MANIFEST).is_file() else {}
    metrics = manifest.get("metrics", {})
    status = metrics.get("status", "ok")
    label, engine = export_dir.name.rsplit("-", 1)
    bits = metrics.get("bits", label.split("-")[0])
    rows = []
    onnx_path = export_dir / QDQ_FILE
    if onnx_path.is_file():
        row = from_file(onnx_path)
        if status != "ok":
            row.status = "check failed: " + status.removeprefix("failed: ")
        row.notes = metrics.get("notes", [])
        rows.append(row)
    else:
        rows.append(Artifact(f"qdq-{engine}-{label}", "onnxruntime", bits, "onnx", None, status="export failed: no ONNX written"))
    if engine == "trt":
        plan = export_dir / PLAN_FILE
        if plan.is_file():
            rows.append(from_file(plan))
        else:
            built = metrics.get("tensorrt", {})
            reason = built.get("reason", "engine not built") if status == "ok" else "export failed"
            rows.append(Artifact(f"trt-{label}", "tensorrt", bits, "plan", None, status=f"skipped: {reason}",
                                 notes=[f"build with: {built['build_with']}"] if "build_with" in built else []))  # fmt: skip
    return rows


def discover(paths: list[Path]) -> list[Artifact]:
    rows: list[Artifact] = []
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist", "pass run directories, .onnx, .plan or .pt files")
        if path.is_file():
            rows.append(from_file(path))
            continue
        found = len(rows)
        for candidate in (path / "finetune/best.pt", path / "export/fp32" / FP32_FILE):
            if candidate.is_file():
                rows.append(from_file(candidate))
        rows += [from_file(p) for p in sorted((path / "quant").glob(f"*/{QUANT_FILE}"))]
        for export_dir in sorted((path / "export").glob("*-*")):
            rows += _export_rows(export_dir)
        if len(rows) == found:
            raise UserError(f"{path} holds no artifacts", "pass the --out of `ssql-deploy finetune/quantize/export`")
    names = [r.name for r in rows]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise UserError(f"two artifacts would both be called {sorted(duplicates)[0]}", "bench one run directory at a time")
    return rows
