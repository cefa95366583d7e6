"""Bench on the board: exported ONNX files and an `evalset.npz`, with nothing installed but a runtime.

An engineer evaluating on a Jetson or a Raspberry Pi copies the model and the evaluation images
to the board and measures there. `export --evalset` writes the test images already preprocessed
(the model's size and normalisation) with their labels; `bench MODEL.onnx --evalset evalset.npz`
scores and times each file on each runtime asked for (an OpenVINO IR on OpenVINO), importing
neither torch, torchvision nor onnx (`pip install "ssql-deploy[runtime]"`, or `[openvino]`). Rows
are named as a full bench names them (`onnx-fp32`, `qdq-ort-w4a4`, `ov-qdq-trt-w4a4`,
`openvino-w4a4`), from the export directory's name.
"""

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ssql_deploy.bench.onnx_runners import OpenVinoRunner, OrtRunner
from ssql_deploy.bench.schema import Env, Report, Row, baseline_name
from ssql_deploy.bench.timing import time_rows
from ssql_deploy.errors import UserError
from ssql_deploy.progress import progress_bar
from ssql_deploy.recipe import BenchRecipe
from ssql_deploy.run import atomic_open, versions
from ssql_deploy.run_layout import FP32_FILE, ExportKey
from ssql_deploy.runtimes import ENGINES, QDQ_FILE, RUNTIMES, RuntimeName

EVALSET_FILE = "evalset.npz"
IR_SUFFIX = Path(ENGINES["openvino"].file).suffix  # an OpenVINO export's IR, benched on OpenVINO alone


def write_evalset(path: Path, images: np.ndarray, labels: np.ndarray, about: dict[str, Any]) -> None:
    """Preprocessed NCHW float32 images, int64 labels and what they are (dataset, size, normalisation), compressed."""
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, images=images.astype(np.float32), labels=labels.astype(np.int64), about=json.dumps(about))


def load_evalset(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels, about = data["images"], data["labels"], json.loads(str(data["about"]))
    except FileNotFoundError:
        raise UserError(f"evalset {path} does not exist", "write one with `ssql-deploy export RUN --evalset` and copy it here") from None
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path} is not an evalset ({type(exc).__name__})", "write one with `ssql-deploy export RUN --evalset`") from None
    if images.ndim != 4 or len(images) != len(labels) or len(labels) == 0:
        raise UserError(
            f"{path} holds {images.shape} images and {labels.shape} labels", "write it again with `ssql-deploy export --evalset`"
        )
    return images, labels, about


def _model_files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        found = [path] if path.is_file() else [p for p in (path / QDQ_FILE, path / FP32_FILE) if p.is_file()]
        if not found or found[0].suffix not in (".onnx", IR_SUFFIX):
            raise UserError(f"{path} is not an ONNX model or an export directory holding one",
                            "with --evalset, pass .onnx files (or the .xml of an OpenVINO export)")  # fmt: skip
        files += found
    return files


def _row_name(path: Path, runtime: RuntimeName) -> tuple[str, str, str | None]:
    """(row name, bits, engine) of an exported file, from its directory's name (no onnx package to read metadata with)."""
    key = ExportKey.parse(path.parent.name)
    if key is None and path.name != QDQ_FILE:
        return RUNTIMES[runtime].baseline, "fp32", None
    if key is not None and path.suffix == IR_SUFFIX:
        return ENGINES[key.engine].row(key.variant), key.variant, key.engine
    row = ENGINES[key.engine].onnx_row(key.variant) if key is not None else f"qdq-{path.parent.name}"
    return RUNTIMES[runtime].prefix + row, key.variant if key else path.parent.name, key.engine if key else None


def run_evalset_bench(recipe: BenchRecipe) -> dict[str, Any]:
    assert recipe.evalset is not None
    images, labels, about = load_evalset(recipe.evalset)
    if recipe.subset is not None:
        images, labels = images[: recipe.subset], labels[: recipe.subset]
    threads = recipe.threads or os.cpu_count() or 1
    rows: dict[str, Row] = {}
    runners: dict[str, Any] = {}
    for path in _model_files(recipe.artifacts):
        for runtime in ["openvino"] if path.suffix == IR_SUFFIX else recipe.runtimes:  # an IR runs on OpenVINO only
            name, bits, engine = _row_name(path, runtime)  # type: ignore[arg-type]
            if name in rows:
                raise UserError(f"two of the files given would both be the row {name}", "pass the FP32 model once, as .onnx or as .xml")
            rows[name] = Row(name=name, runtime=runtime, bits=bits, engine=engine, status="ok", top1=None, latency={},
                             size_bytes=path.stat().st_size)  # fmt: skip
            try:
                runners[name] = OrtRunner(path, threads) if runtime == "onnxruntime" else OpenVinoRunner(path, threads, recipe.device)
            except ImportError as exc:
                rows[name].status = f"skipped: {exc}"
                continue
            rows[name].runtime_detail = runners[name].detail
    predictions = {}
    for name, runner in runners.items():
        with progress_bar() as bar:
            task = bar.add_task(f"{name}: top-1", total=-(-len(labels) // recipe.eval_batch))
            parts = []
            for start in range(0, len(labels), recipe.eval_batch):
                parts.append(_predict(runner, images[start : start + recipe.eval_batch], name).argmax(1))
                bar.advance(task)
        predictions[name] = np.concatenate(parts)
        rows[name].top1, rows[name].n_images = round(100.0 * float(np.mean(predictions[name] == labels)), 3), int(len(labels))
    for name in runners:  # quantized rows against their runtime's FP32 row, other runtimes' FP32 rows against ONNX Runtime's
        base = baseline_name(rows[name]) or RUNTIMES["onnxruntime"].baseline
        if base in predictions and base != name:
            rows[name].agreement = round(100.0 * float(np.mean(predictions[name] == predictions[base])), 3)
            rows[name].agreement_with = base
    size = images.shape[-1]
    time_rows({n: lambda batch, r=r: r.timer(batch, size) for n, r in runners.items()}, rows, recipe)
    env = Env(cpu=platform.processor() or platform.machine(), threads=threads, data=f"{recipe.evalset} ({about.get('data', '?')})",
              runs=recipe.runs, warmup=recipe.warmup, rounds=recipe.rounds, cores=os.cpu_count(), platform=platform.platform(),
              versions=versions())  # fmt: skip
    report = Report(env=env, rows=list(rows.values()))
    from ssql_deploy.bench.report import write_reports

    return {"report": report, "paths": write_reports(report, recipe.out)}


def _predict(runner: Any, x: np.ndarray, name: str) -> np.ndarray:
    try:
        return np.asarray(runner.predict(np.ascontiguousarray(x)))
    except UserError:
        raise
    except Exception as exc:  # the runtime's own error types: a model for another input size, say
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise UserError(f"{name} cannot run the evalset's {x.shape[2]}x{x.shape[3]} images: {said}",
                        "write the evalset from the run this model was exported from") from None  # fmt: skip
