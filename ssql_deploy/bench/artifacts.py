"""What `bench` can measure, found from the paths a user gives (run directories or files), and how far to trust it.

A run directory expands to every artifact its stages wrote, in pipeline order: the PyTorch float
model, each PyTorch fake-quant model, the FP32 ONNX (and its FP16 TensorRT plan), each QDQ ONNX and
each INT8 plan. Every file must be a committed output of its stage (manifest.py): one that is not
is measured but marked `unverified`; an export that failed or a plan that was not built still gets
a row, with the reason.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
from pydantic import ValidationError

from ssql_deploy.errors import UserError
from ssql_deploy.export.stage import META_KEY, ExportMetrics
from ssql_deploy.manifest import read_manifest, unverified_reason
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.quant.artifact import saved_variant
from ssql_deploy.run_layout import FP32_FILE, TWIN_FILE, ExportKey, RunLayout
from ssql_deploy.runtimes import ENGINES, QDQ_FILE, RUNTIMES, RuntimeName


@dataclass
class Artifact:
    name: str
    runtime: RuntimeName
    bits: str  # fp32 | fp16 | the quantized model's label (wXaY, wXaY-<hash>, with -lsq after QAT)
    kind: str  # torch-float | torch-fakequant | onnx | engine (a file an engine built from a QDQ ONNX)
    path: Path | None
    meta: ModelMeta | None = None
    engine: str | None = None  # the export target whose graph this is (runtimes.ENGINES)
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


def _unverified(path: Path) -> str | None:
    """Why a file is not a committed output; an OpenVINO IR is two files, and both must be."""
    halves = (path, path.with_suffix(".bin")) if path.suffix == ".xml" else (path,)
    return next((f"{half.name}: {reason}" if half != path else reason for half in halves if (reason := unverified_reason(half))), None)


def _trust(artifact: Artifact) -> Artifact:
    """Mark an artifact whose file its stage did not commit; one already marked (a failed check) keeps its status."""
    if artifact.path is not None and artifact.status == "ok" and (reason := _unverified(artifact.path)) is not None:
        artifact.status = f"unverified: {reason}"
    if artifact.twin is not None and unverified_reason(artifact.twin) is not None:
        artifact.notes.append(f"no agreement: its PyTorch twin {artifact.twin.name} is not a committed output of the export")
        artifact.twin = None
    return artifact


def _engine_file(path: Path) -> Artifact:
    """A file an engine built from a QDQ ONNX (a TensorRT plan, an OpenVINO IR): described by the ONNX beside it."""
    engine = next(e for e in ENGINES.values() if e.builds_from_onnx and path.name == e.file)
    onnx_file = path.with_name(QDQ_FILE if path.with_name(QDQ_FILE).is_file() else FP32_FILE)
    props = onnx_props(onnx_file) if onnx_file.is_file() else {}
    sidecar = path.with_name(path.name + ".json")
    notes = [f"flags {json.loads(sidecar.read_text()).get('flags', [])}"] if sidecar.is_file() else []
    meta, bits = _meta_from(props, path), props.get("bits", "unknown")
    if bits == "fp32":  # built from the FP32 ONNX (TensorRT's FP16 plan, OpenVINO's FP32 IR): this runtime's baseline
        runtime = RUNTIMES[engine.runtime]
        return _trust(
            Artifact(runtime.baseline, engine.runtime, runtime.baseline_bits, "engine", path, meta, reference="torch-fp32", notes=notes)
        )
    label = props.get("variant", bits)
    twin = path.with_name(TWIN_FILE) if path.with_name(TWIN_FILE).is_file() else None
    return _trust(Artifact(engine.row(label), engine.runtime, label, "engine", path, meta, engine=engine.name, twin=twin,
                           simulation=f"torch-{label}", notes=notes))  # fmt: skip


def from_file(path: Path) -> Artifact:
    suffix = path.suffix.lower()
    twin = path.with_name(TWIN_FILE) if path.with_name(TWIN_FILE).is_file() else None
    if suffix == ".onnx":
        props = onnx_props(path)
        bits, engine = props.get("bits", "fp32"), props.get("engine", "ort")
        label = props.get("variant", bits)
        if bits == "fp32":
            return _trust(Artifact(RUNTIMES["onnxruntime"].baseline, "onnxruntime", bits, "onnx", path, _meta_from(props, path),
                                   reference="torch-fp32"))  # fmt: skip
        return _trust(Artifact(ENGINES[engine].onnx_row(label), "onnxruntime", label, "onnx", path, _meta_from(props, path),  # type: ignore[index]
                               engine=engine, twin=twin, simulation=f"torch-{label}"))  # fmt: skip
    if any(e.builds_from_onnx and path.name == e.file for e in ENGINES.values()):
        return _engine_file(path)
    obj = load_checkpoint(path)
    if obj.get("format") != "ssql-deploy" or "arch" not in obj:
        raise UserError(
            f"{path} is not a model written by ssql-deploy", "bench run directories, .onnx, engine plans or ssql-deploy .pt files"
        )
    meta = ModelMeta.from_checkpoint(obj)
    if obj.get("kind") == "quantized":
        label = saved_variant(obj)
        return _trust(Artifact(f"torch-{label}", "torch", label, "torch-fakequant", path, meta))
    return _trust(Artifact(RUNTIMES["torch"].baseline, "torch", "fp32", "torch-float", path, meta))


def _export_rows(key: ExportKey, export_dir: Path) -> list[Artifact]:
    """The QDQ ONNX of an export and, for an engine that builds from it, the engine file: each with its status."""
    engine = ENGINES[key.engine]
    try:
        manifest = read_manifest(export_dir)
        metrics = ExportMetrics.of(manifest) if manifest is not None else None
    except (UserError, ValidationError):
        metrics = None
    status = metrics.status if metrics is not None else "ok"  # no manifest: the file's own check marks it unverified
    rows = []
    onnx_path = export_dir / QDQ_FILE
    if onnx_path.is_file():
        row = from_file(onnx_path)
        if status != "ok":
            row.status = "check failed: " + status.removeprefix("failed: ")
        row.notes += metrics.notes if metrics is not None else []
        rows.append(row)
    else:
        rows.append(Artifact(engine.onnx_row(key.variant), "onnxruntime", key.variant, "onnx", None, engine=engine.name,
                             status="export failed: no ONNX written"))  # fmt: skip
    if engine.builds_from_onnx:
        built = export_dir / engine.file
        if built.is_file():
            rows.append(from_file(built))
        else:
            build = metrics.engine_build if metrics is not None else None
            reason = (build.reason if build is not None else "engine not built") if status == "ok" else "export failed"
            rows.append(Artifact(engine.row(key.variant), engine.runtime, key.variant, "engine", None, engine=engine.name, status=f"skipped: {reason}",
                                 notes=[f"build with: {build.build_with}"] if build is not None else []))  # fmt: skip
    return rows


def discover(paths: list[Path]) -> list[Artifact]:
    rows: list[Artifact] = []
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist", "pass run directories, .onnx, engine plans or .pt files")
        if path.is_file():
            rows.append(from_file(path))
            continue
        found = len(rows)
        run = RunLayout(path)
        fp32_engines = [run.fp32 / e.file for e in ENGINES.values() if e.builds_from_onnx]
        for candidate in (run.best, run.fp32 / FP32_FILE, *fp32_engines):
            if candidate.is_file():
                rows.append(from_file(candidate))
        rows += [from_file(p) for p in run.quantized_models()]
        for key, export_dir in run.exports():
            rows += _export_rows(key, export_dir)
        if len(rows) == found:
            raise UserError(f"{path} holds no artifacts", "pass the --out of `ssql-deploy finetune/quantize/export`")
    names = [r.name for r in rows]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise UserError(f"two artifacts would both be called {sorted(duplicates)[0]}", "bench one run directory at a time")
    return rows


def on_runtimes(artifacts: list[Artifact], runtimes: list[RuntimeName]) -> list[Artifact]:
    """Each ONNX artifact once per runtime asked for (`bench --runtime ort,openvino`): the same file, its own row.
    A runtime's baseline built by an export (OpenVINO's FP32 IR) stands in for the FP32 ONNX run on that runtime."""
    built = {a.name for a in artifacts}
    rows: list[Artifact] = []
    for artifact in artifacts:
        if artifact.kind != "onnx":
            rows.append(artifact)
            continue
        for runtime in runtimes:
            if runtime == artifact.runtime:
                rows.append(artifact)
            elif artifact.bits == "fp32":
                if RUNTIMES[runtime].baseline not in built:
                    rows.append(replace(artifact, name=RUNTIMES[runtime].baseline, runtime=runtime, notes=list(artifact.notes)))
            else:
                rows.append(replace(artifact, name=RUNTIMES[runtime].prefix + artifact.name, runtime=runtime, notes=list(artifact.notes)))
    return rows
