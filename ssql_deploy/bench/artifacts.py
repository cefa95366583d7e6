"""What `bench` can measure, found from the paths a user gives (run directories or files), and how far to trust it.

A run directory expands to every artifact its stages wrote, in pipeline order: the PyTorch float
model, each PyTorch fake-quant model, the FP32 ONNX (and its FP16 TensorRT plan), each QDQ ONNX and
each INT8 plan. Every file must be a committed output of its stage (manifest.py): one that is not
is measured but marked `unverified`; an export that failed or a plan that was not built still gets
a row, with the reason.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ssql_deploy.errors import UserError
from ssql_deploy.export.stage import FP32_FILE, META_KEY, PLAN_FILE, QDQ_FILE, TWIN_FILE
from ssql_deploy.manifest import read_manifest, unverified_reason
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.quant.artifact import QUANT_FILE, variant


@dataclass
class Artifact:
    name: str
    runtime: str  # torch | onnxruntime | tensorrt
    bits: str  # fp32 | fp16 | the quantized model's label (wXaY, wXaY-<hash>, with -lsq after QAT)
    kind: str  # torch-float | torch-fakequant | onnx | plan
    path: Path | None
    meta: ModelMeta | None = None
    status: str = "ok"
    reference: str | None = None  # the row whose predictions this artifact should reproduce (FP32 rows)
    twin: Path | None = None  # the PyTorch model of this artifact's own layout (quantized exports)
    simulation: str | None = None  # the SSQL-layout simulation row of the same quantized model
    notes: list[str] = field(default_factory=list)


def _onnx_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for non-ONNX files
        raise UserError(
            f"{path} is not an ONNX model ({type(exc).__name__})", "pass a .onnx file written by `ssql-deploy export`"
        ) from None


def onnx_props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in _onnx_model(path).metadata_props}


def onnx_input_size(path: Path) -> tuple[int | None, int | None]:
    """The height and width the graph's input declares (None where they are symbolic)."""
    graph = _onnx_model(path).graph
    dims = graph.input[0].type.tensor_type.shape.dim if graph.input else []
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return (values[2], values[3]) if len(values) == 4 else (None, None)


def _meta_from(props: dict[str, str], path: Path) -> ModelMeta:
    if META_KEY in props:
        return ModelMeta.from_checkpoint(json.loads(props[META_KEY]))
    try:  # exports written before the model description was stored whole
        return ModelMeta.from_checkpoint({k: props[k] for k in ("arch", "stem", "num_classes", "input_size", "data")})
    except (KeyError, UserError):
        raise UserError(
            f"{path} carries no ssql-deploy metadata (arch, input size, dataset)", "bench artifacts written by `ssql-deploy export`"
        ) from None


def _trust(artifact: Artifact) -> Artifact:
    """Mark an artifact whose file its stage did not commit; one already marked (a failed check) keeps its status."""
    if artifact.path is not None and artifact.status == "ok" and (reason := unverified_reason(artifact.path)) is not None:
        artifact.status = f"unverified: {reason}"
    if artifact.twin is not None and unverified_reason(artifact.twin) is not None:
        artifact.notes.append(f"no agreement: its PyTorch twin {artifact.twin.name} is not a committed output of the export")
        artifact.twin = None
    return artifact


def from_file(path: Path) -> Artifact:
    suffix = path.suffix.lower()
    twin = path.with_name(TWIN_FILE) if path.with_name(TWIN_FILE).is_file() else None
    if suffix == ".onnx":
        props = onnx_props(path)
        bits, engine = props.get("bits", "fp32"), props.get("engine", "ort")
        label = props.get("variant", bits)
        if bits == "fp32":
            return _trust(Artifact("onnx-fp32", "onnxruntime", bits, "onnx", path, _meta_from(props, path), reference="torch-fp32"))
        return _trust(Artifact(f"qdq-{engine}-{label}", "onnxruntime", bits, "onnx", path, _meta_from(props, path),
                               twin=twin, simulation=f"torch-{label}"))  # fmt: skip
    if suffix == ".plan":
        onnx_file = path.with_name(QDQ_FILE if path.with_name(QDQ_FILE).is_file() else FP32_FILE)
        props = onnx_props(onnx_file) if onnx_file.is_file() else {}
        sidecar = path.with_name(path.name + ".json")
        flags = json.loads(sidecar.read_text()).get("flags", []) if sidecar.is_file() else []
        bits = props.get("bits", "unknown")
        label = props.get("variant", bits)
        meta = _meta_from(props, path)
        if bits == "fp32":
            return _trust(Artifact("trt-fp16", "tensorrt", "fp16", "plan", path, meta, reference="torch-fp32", notes=[f"flags {flags}"]))
        return _trust(Artifact(f"trt-{label}", "tensorrt", bits, "plan", path, meta, twin=twin, simulation=f"torch-{label}",
                               notes=[f"flags {flags}"]))  # fmt: skip
    obj = load_checkpoint(path)
    if obj.get("format") != "ssql-deploy" or "arch" not in obj:
        raise UserError(f"{path} is not a model written by ssql-deploy", "bench run directories, .onnx, .plan or ssql-deploy .pt files")
    meta = ModelMeta.from_checkpoint(obj)
    if obj.get("kind") == "quantized":
        label = variant(obj.get("label", obj["bits"]), obj["lsq"])
        return _trust(Artifact(f"torch-{label}", "torch", label, "torch-fakequant", path, meta))
    return _trust(Artifact("torch-fp32", "torch", "fp32", "torch-float", path, meta))


def _export_rows(export_dir: Path) -> list[Artifact]:
    try:
        manifest = read_manifest(export_dir)
    except UserError:
        manifest = None
    metrics = manifest.metrics if manifest is not None else {}
    status = str(metrics.get("status", "ok"))
    label, engine = export_dir.name.rsplit("-", 1)
    label, engine = str(metrics.get("variant", label)), str(metrics.get("engine", engine))
    bits = str(metrics.get("bits", label.split("-")[0]))
    rows = []
    onnx_path = export_dir / QDQ_FILE
    if onnx_path.is_file():
        row = from_file(onnx_path)
        if status != "ok":
            row.status = "check failed: " + status.removeprefix("failed: ")
        row.notes += metrics.get("notes", [])
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
        for candidate in (path / "finetune/best.pt", path / "export/fp32" / FP32_FILE, path / "export/fp32" / PLAN_FILE):
            if candidate.is_file():
                rows.append(from_file(candidate))
        rows += [from_file(p) for p in sorted((path / "quant").glob(f"*/{QUANT_FILE}"))]
        for export_dir in sorted(p for p in (path / "export").glob("*-*") if p.is_dir()):
            rows += _export_rows(export_dir)
        if len(rows) == found:
            raise UserError(f"{path} holds no artifacts", "pass the --out of `ssql-deploy finetune/quantize/export`")
    names = [r.name for r in rows]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise UserError(f"two artifacts would both be called {sorted(duplicates)[0]}", "bench one run directory at a time")
    return rows
