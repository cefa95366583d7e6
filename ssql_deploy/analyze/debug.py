"""`ssql-deploy debug ARTIFACT`: where an exported model departs from its PyTorch twin, layer by layer.

Users of every engine ask for this (TensorRT#4063, aimet#2658): the accuracy of the artifact is
not the simulation's and nobody says where. The export already keeps the PyTorch model of the
artifact's own layout (`twin.pt`); this runs both on the same test images and reports, for every
quantized activation in graph order, the largest deviation in quantization steps, the share of
values off by half a step or more, the first layer where any value differs (a rounding tie, as a
rule) and the first where more values differ than ties explain (a fault: export/parity.py),
the top-1 agreement of the optimized ONNX Runtime session, and every node ONNX Runtime left in
float after its optimizations, with why. For a TensorRT export on a GPU machine it also reads, from
the plan, the precision each engine layer runs in (analyze/engine_layers.py). Writes debug.json and debug.png beside nothing shipped:
in DEBUG_DIR (default: the export directory's `debug/`).
"""

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import onnx
import torch

from ssql_deploy.analyze.engine_layers import inspect_engine
from ssql_deploy.bench.artifacts import onnx_props
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import check_classes
from ssql_deploy.export.ort_session import integer_conv_report
from ssql_deploy.export.parity import check_parity
from ssql_deploy.export.stage import ExportMetrics
from ssql_deploy.export.tensorrt_engine import tensorrt_status
from ssql_deploy.manifest import read_manifest
from ssql_deploy.quant.artifact import load_quantized
from ssql_deploy.run import atomic_open, write_text_atomic
from ssql_deploy.run_layout import FP32_FILE, TWIN_FILE
from ssql_deploy.runtimes import ENGINES, QDQ_FILE

BATCH = 64


def _artifact(path: Path) -> tuple[Path, Path]:
    """The QDQ ONNX file and its twin, from an export directory, the .onnx inside one or the TensorRT plan beside it."""
    onnx_path = path / QDQ_FILE if path.is_dir() else path.with_name(QDQ_FILE) if path.suffix == ".plan" else path
    if onnx_path.name == FP32_FILE or (path.is_dir() and (path / FP32_FILE).is_file()):
        raise UserError(f"{path} is the FP32 baseline: nothing in it is quantized", "debug a quantized export (RUN/export/VARIANT-ENGINE)")
    if not path.exists() or not onnx_path.is_file():
        raise UserError(f"{path} is not an exported model", f"pass an export directory (RUN/export/VARIANT-ENGINE) or its {QDQ_FILE}")
    twin = onnx_path.parent / TWIN_FILE
    if not twin.is_file():
        raise UserError(f"{onnx_path} has no {TWIN_FILE} beside it, so there is no PyTorch model to compare it with",
                        "debug a model written by `ssql-deploy export`, in its export directory")  # fmt: skip
    return onnx_path, twin


def _engine(export_dir: Path) -> dict[str, Any] | None:
    """The TensorRT plan's layer precisions, or why they were not read; None for an export that is not for TensorRT."""
    plan = export_dir / ENGINES["trt"].file
    if plan.is_file():
        usable, why = tensorrt_status()
        return inspect_engine(plan) if usable else {"plan": str(plan), "inspected": False, "why": f"{why} Run debug on a GPU machine."}
    manifest = read_manifest(export_dir)
    build = ExportMetrics.of(manifest).engine_build if manifest is not None else None
    if build is None:
        return None
    return {"plan": None, "inspected": False, "why": f"no plan was built at export ({build.reason or 'not asked'}); "
                                                    f"build it on a GPU machine with: {build.build_with}"}  # fmt: skip


def run_debug(path: Path, images: int, out: Path | None, data_root: Path | None = None) -> dict[str, Any]:
    onnx_path, twin_path = _artifact(path)
    onnx_props(onnx_path)  # a file that is not ONNX is refused in one line
    loaded = load_quantized(twin_path)
    source = loaded.meta.source(None, data_root)
    check_classes(loaded.meta, source)
    split = source.split("test", images)
    batch = torch.stack([split[i][0] for i in range(len(split))])  # type: ignore[arg-type]
    model = onnx.load(str(onnx_path))
    parity = check_parity(loaded.gm, model, list(batch.split(BATCH)))
    kernels = integer_conv_report(model)
    result = {"artifact": str(onnx_path), "twin": str(twin_path), "images": parity["images"], "data": source.describe(),
              "top1_agreement": parity["top1_agreement"], "max_abs_logit_diff": parity["max_abs_logit_diff"],
              "first_mismatch": parity["first_mismatch"], "first_departure": parity["first_departure"],
              "layers": parity["per_layer"], "problems": parity["problems"],
              "integer_convs": kernels["integer_convs"], "convs": kernels["convs"], "float_ops": kernels["float_ops"],
              "tensorrt": _engine(onnx_path.parent)}  # fmt: skip
    out_dir = out or onnx_path.parent / "debug"
    paths = {"json": out_dir / "debug.json", "png": out_dir / "debug.png"}
    write_text_atomic(paths["json"], json.dumps(result, indent=1) + "\n")
    _plot(result, paths["png"])
    return result | {"paths": {k: str(v) for k, v in paths.items()}}


def _plot(result: dict[str, Any], path: Path) -> None:
    names = list(result["layers"])
    fractions = [100 * result["layers"][n]["mismatch_fraction"] for n in names]
    local = [100 * result["layers"][n]["local_mismatch_fraction"] for n in names]
    steps = [result["layers"][n]["max_steps"] for n in names]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.22 * len(names) + 3), 7), sharex=True)
    top.bar(range(len(names)), fractions, color="tab:red", label="free running (drift included)")
    top.bar(range(len(names)), local, color="black", width=0.4, label="given the same inputs (judged)")
    top.set_ylabel("values off by >= 0.5 step (%)")
    top.legend(fontsize=8)
    top.set_title(f"{Path(result['artifact']).parent.name}: ONNX Runtime vs PyTorch twin on {result['images']} test images "
                  f"(top-1 agreement {result['top1_agreement']:.1f}%)")  # fmt: skip
    bottom.bar(range(len(names)), steps, color="tab:blue")
    bottom.set_ylabel("largest deviation (steps)")
    bottom.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
        if result["first_departure"] in names:
            ax.axvline(names.index(result["first_departure"]), color="grey", linestyle="--", linewidth=1)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
