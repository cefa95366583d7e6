"""`ssql-deploy bench`: top-1 on the full test split and latency, measured on each artifact itself.

Everything that can refuse the job is checked before the first measurement: each artifact's
data, class count and input size, and that its runtime loads it. Accuracy is then scored on the
test split, with each artifact's agreement against the PyTorch model of its own layout; latency
is measured side by side for the artifacts of each runtime (timing.py) and speed-ups come from
paired rounds.
"""

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ssql_deploy.bench.artifacts import Artifact, discover, on_runtimes, onnx_input_size
from ssql_deploy.bench.report import write_reports
from ssql_deploy.bench.runners import Runner, TorchRunner, load_runner, torch_model
from ssql_deploy.bench.schema import OK, Env, Report, Row
from ssql_deploy.bench.timing import time_rows
from ssql_deploy.data import DataSource
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import eval_loader, model_data
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.progress import progress_bar
from ssql_deploy.recipe import BenchRecipe
from ssql_deploy.run import versions

OPENVINO_FLOAT_NOTE = ("OpenVINO ran none of this graph's convolutions in int8: it fuses weights with zero-point 0 into int8 "
                       "convolutions, not the weight zero-point -1 of ONNX Runtime's QGEMM path; export with --engine openvino "
                       "(or --ort-kernel symmetric) for OpenVINO")  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _env(recipe: BenchRecipe, threads: int, data: str) -> Env:
    return Env(cpu=_cpu_name(), threads=threads, data=data, runs=recipe.runs, warmup=recipe.warmup, rounds=recipe.rounds,
               cores=os.cpu_count(), platform=platform.platform(), onnxruntime_providers=ort.get_available_providers(),
               cuda=torch.cuda.is_available(), versions=versions())  # fmt: skip


def _predictions(predict: Any, loader: Any, label: str) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(loader))
        for images, y in loader:
            preds.append(predict(images.numpy()).argmax(1))
            labels.append(y.numpy())
            bar.advance(task)
    return np.concatenate(preds), np.concatenate(labels)


def _check_input_size(artifact: Artifact, size: int) -> None:
    """A graph with a fixed input size must get that size: ORT's InvalidArgument would say so mid-run."""
    if artifact.kind != "onnx" or artifact.path is None or artifact.meta is None:
        return
    height, width = onnx_input_size(artifact.path)
    fixed = [d for d in (height, width) if d is not None]
    if fixed and fixed != [artifact.meta.input_size] * len(fixed):
        raise UserError(
            f"{artifact.path} takes {height}x{width} inputs but its metadata says {artifact.meta.input_size} px",
            "re-export it with `ssql-deploy export`; its metadata does not describe this graph",
        )
    if fixed and fixed != [size] * len(fixed):
        raise UserError(
            f"{artifact.path} takes {height}x{width} inputs but the data would be prepared at {size}x{size}",
            f"drop --input-size (or pass --input-size {fixed[0]}), or export the model at {size} px",
        )


def _agreement(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    return None if a is None or b is None else round(100.0 * float(np.mean(a == b)), 3)


def _sources(measurable: list[Artifact], recipe: BenchRecipe) -> dict[str, DataSource]:
    """Each artifact's data, said (and class-checked) once per model, not once per artifact; input sizes checked."""
    sources: dict[str, DataSource] = {}
    by_model: dict[ModelMeta, DataSource] = {}
    for artifact in measurable:
        assert artifact.meta is not None
        if artifact.meta not in by_model:
            by_model[artifact.meta] = model_data(artifact.meta, recipe.data, recipe.data_root, recipe.input_size, recipe.download)
        sources[artifact.name] = by_model[artifact.meta]
        _check_input_size(artifact, sources[artifact.name].input_size)
    return sources


def _score(measurable: list[Artifact], runners: dict[str, Runner], sources: dict[str, DataSource], rows: dict[str, Row],
           recipe: BenchRecipe) -> None:  # fmt: skip
    """Top-1 on the test split, and agreement with the PyTorch twin of the same layout (or the FP32 reference)."""
    loaders: dict[DataSource, Any] = {}
    predictions: dict[str, np.ndarray] = {}
    for name, runner in runners.items():
        source = sources[name]
        if source not in loaders:
            loaders[source] = eval_loader(source, recipe.subset, recipe.eval_batch, recipe.workers)
        predictions[name], labels = _predictions(runner.predict, loaders[source], f"{name}: top-1")
        rows[name].top1, rows[name].n_images = round(100.0 * float(np.mean(predictions[name] == labels)), 3), int(len(labels))
    twins: dict[Path, np.ndarray] = {}
    for artifact in (a for a in measurable if a.name in predictions):
        row = rows[artifact.name]
        if artifact.twin is not None:
            if artifact.twin not in twins:
                twin = TorchRunner(torch_model(artifact.twin, "torch-fakequant"))
                twins[artifact.twin], _ = _predictions(twin.predict, loaders[sources[artifact.name]], f"{artifact.name}: PyTorch twin")
            row.agreement, row.agreement_with = _agreement(predictions[artifact.name], twins[artifact.twin]), "PyTorch twin (same layout)"
            row.layout_agreement = _agreement(twins[artifact.twin], predictions.get(artifact.simulation or ""))
        elif artifact.reference in predictions:
            row.agreement, row.agreement_with = _agreement(predictions[artifact.name], predictions[artifact.reference]), artifact.reference


def run_bench(recipe: BenchRecipe) -> dict[str, Any]:
    artifacts = on_runtimes(discover(recipe.artifacts), recipe.runtimes)  # type: ignore[arg-type]
    measurable = [a for a in artifacts if a.meta is not None and (a.status == OK or a.status.startswith("unverified"))]
    if not measurable:
        raise UserError("none of the artifacts can be measured", "pass a run directory with a fine-tuned or exported model")
    sources = _sources(measurable, recipe)
    threads = recipe.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = {a.name: Row(name=a.name, runtime=a.runtime, bits=a.bits, engine=a.engine, status=a.status, top1=None, latency={},
                        size_bytes=a.path.stat().st_size if a.path is not None and a.path.is_file() else None, notes=a.notes)
            for a in artifacts}  # fmt: skip
    runners: dict[str, Runner] = {}
    for artifact in measurable:
        try:
            runners[artifact.name] = load_runner(artifact, threads, recipe.device)
        except (ImportError, RuntimeError) as exc:  # TensorRT absent or no GPU: the row is skipped, the rest measured
            rows[artifact.name].status = f"skipped: {str(exc).splitlines()[0]}"
            continue
        rows[artifact.name].runtime_detail = runners[artifact.name].detail
        if getattr(runners[artifact.name], "int8_convs", None) == 0 and artifact.bits != "fp32":
            rows[artifact.name].notes.append(OPENVINO_FLOAT_NOTE)
    _score(measurable, runners, sources, rows, recipe)
    time_rows({n: lambda batch, r=r, n=n: r.timer(batch, sources[n].input_size) for n, r in runners.items()}, rows, recipe)
    data = recipe.data or next(iter(sources.values())).data
    report = Report(env=_env(recipe, threads, data), rows=list(rows.values()))
    return {"report": report, "paths": write_reports(report, recipe.out)}
