"""`ssql-deploy bench`: top-1 on the full test split and latency, measured on each artifact itself."""

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ssql_deploy.bench.artifacts import Artifact, discover
from ssql_deploy.bench.report import write_reports
from ssql_deploy.bench.runners import Predict, load_runner, measure_latency
from ssql_deploy.errors import UserError
from ssql_deploy.evaluate import check_classes, eval_loader
from ssql_deploy.progress import progress_bar
from ssql_deploy.recipe import BenchRecipe
from ssql_deploy.run import versions


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict[str, Any]:
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "onnxruntime_providers": ort.get_available_providers(), "cuda": torch.cuda.is_available(),
            "versions": versions()}  # fmt: skip


def _predictions(predict: Predict, loader: Any, label: str) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = [], []
    with progress_bar() as bar:
        task = bar.add_task(label, total=len(loader))
        for images, y in loader:
            preds.append(predict(images.numpy()).argmax(1))
            labels.append(y.numpy())
            bar.advance(task)
    return np.concatenate(preds), np.concatenate(labels)


def _row(artifact: Artifact) -> dict[str, Any]:
    size = artifact.path.stat().st_size if artifact.path is not None and artifact.path.is_file() else None
    return {"name": artifact.name, "runtime": artifact.runtime, "bits": artifact.bits, "top1": None, "n_images": 0,
            "latency": {}, "agreement_with_torch": None, "size_bytes": size, "status": artifact.status,
            "notes": artifact.notes}  # fmt: skip


def run_bench(recipe: BenchRecipe) -> dict[str, Any]:
    artifacts = discover(recipe.artifacts)
    metas = [a.meta for a in artifacts if a.meta is not None]
    if not metas:
        raise UserError("none of the artifacts can be measured", "pass a run directory with a fine-tuned or exported model")
    data = recipe.data or metas[0].data
    for meta in metas:
        check_classes(meta, data, recipe.data_root)
    threads = recipe.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    loaders: dict[int, Any] = {}
    rows, predictions = [], {}
    labels = None
    for artifact in artifacts:
        row = _row(artifact)
        rows.append(row)
        if artifact.status != "ok" or artifact.meta is None:
            continue
        try:
            predict, detail = load_runner(artifact, threads)
        except (UserError, ImportError, RuntimeError) as exc:
            row["status"] = f"skipped: {str(exc).splitlines()[0]}"
            continue
        row["runtime_detail"] = detail
        size = artifact.meta.input_size
        if size not in loaders:
            loaders[size] = eval_loader(data, recipe.data_root, size, recipe.subset, recipe.eval_batch, recipe.workers, recipe.download)
        predictions[artifact.name], labels = _predictions(predict, loaders[size], f"{artifact.name}: top-1")
        row["top1"] = round(100.0 * float(np.mean(predictions[artifact.name] == labels)), 3)
        row["n_images"] = int(len(labels))
        for batch in recipe.batch_sizes:
            row["latency"][str(batch)] = measure_latency(predict, batch, size, recipe.warmup, recipe.runs).__dict__
    for artifact, row in zip(artifacts, rows, strict=True):
        ref = predictions.get(artifact.reference or "")
        if ref is not None and artifact.name in predictions:
            row["agreement_with_torch"] = round(100.0 * float(np.mean(predictions[artifact.name] == ref)), 3)
    report = {"env": environment(threads) | {"data": data, "runs": recipe.runs, "warmup": recipe.warmup}, "rows": rows}
    paths = write_reports(report, recipe.out)
    return {"report": report, "paths": paths}
