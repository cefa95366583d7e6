"""Every runtime an artifact can be exported for and measured on, as one table (ultralytics' `export_formats`).

Two tables, because a runtime and an export target are not the same thing: TensorRT's export
writes a QDQ ONNX in its own layout (which bench also runs in ONNX Runtime, as the check that the
graph computes what was simulated) and then the engine plan TensorRT runs.

- `RUNTIMES`: what executes an artifact in bench: its runner (bench/runners.RUNNERS has one per
  row), whether it needs a GPU, and the row every speed-up on it is measured against.
- `ENGINES`: what `export --engine` accepts: the layout rule set (quant/layouts.py), the file it
  ships, the runtime that file runs on, and the export options only that engine reads. The
  `openvino` engine ships the `ort` layout's graph with weight zero-point 0 (OpenVINO fuses only
  those into int8 convolutions) converted to OpenVINO IR, which it reads faster than the ONNX.

Export, bench, report, gate and the CLI help read these; adding a runtime means a row here, its
layout rules and its runner. No torch here: the CLI and pipeline planning import it cheaply.
"""

from dataclasses import dataclass
from typing import Literal, get_args

from ssql_deploy.quant.layouts import Layout

Engine = Literal["ort", "trt", "openvino"]
RuntimeName = Literal["torch", "onnxruntime", "openvino", "tensorrt"]
QDQ_FILE = "model.qdq.onnx"  # every engine's export writes this graph; ort ships it as is
INPUT_NAME = "input"  # the graph input of every exported model


@dataclass(frozen=True)
class Runtime:
    name: RuntimeName
    title: str
    needs_gpu: bool
    baseline: str  # the row of this runtime a speed-up is measured against (same network, float)
    baseline_bits: str  # the precision of that row
    prefix: str = ""  # before the row name of an ONNX file this runtime runs besides ONNX Runtime (`ov-qdq-ort-w8a8`)


@dataclass(frozen=True)
class EngineSpec:
    name: Engine
    title: str
    layout: Layout
    file: str  # what ships: the QDQ ONNX itself, or a file built from it
    runtime: RuntimeName  # what runs `file`
    options: tuple[str, ...]  # export recipe fields only this engine reads

    @property
    def builds_from_onnx(self) -> bool:
        """The shipped file is built from the QDQ ONNX (a TensorRT plan), not the ONNX itself."""
        return self.file != QDQ_FILE

    def row(self, variant: str) -> str:
        """The bench row of the shipped file of a quantized model named `variant`."""
        return f"qdq-{self.name}-{variant}" if not self.builds_from_onnx else f"{self.name}-{variant}"

    def onnx_row(self, variant: str) -> str:
        """The bench row of this engine's QDQ ONNX run in ONNX Runtime."""
        return f"qdq-{self.name}-{variant}"


RUNTIMES: dict[RuntimeName, Runtime] = {
    "torch": Runtime("torch", "PyTorch (fake-quant simulation)", needs_gpu=False, baseline="torch-fp32", baseline_bits="fp32"),
    "onnxruntime": Runtime("onnxruntime", "ONNX Runtime", needs_gpu=False, baseline="onnx-fp32", baseline_bits="fp32"),
    "openvino": Runtime("openvino", "OpenVINO", needs_gpu=False, baseline="ov-fp32", baseline_bits="fp32", prefix="ov-"),
    "tensorrt": Runtime("tensorrt", "TensorRT", needs_gpu=True, baseline="trt-fp16", baseline_bits="fp16"),
}
# Runtimes `bench --runtime` runs every ONNX file on (each ONNX artifact gets one row per runtime asked for).
ONNX_RUNTIMES: dict[str, RuntimeName] = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "openvino": "openvino", "ov": "openvino"}
ENGINES: dict[Engine, EngineSpec] = {
    "ort": EngineSpec("ort", "ONNX Runtime integer kernels", "ort", QDQ_FILE, "onnxruntime", options=("ort_kernel",)),
    "trt": EngineSpec("trt", "TensorRT explicit quantization", "trt", "model.plan", "tensorrt", options=("trt_batches", "build_engine")),
    "openvino": EngineSpec("openvino", "OpenVINO INT8 IR", "ort", "model.xml", "openvino", options=()),
}
assert set(ENGINES) == set(get_args(Engine)) and set(RUNTIMES) == set(get_args(RuntimeName))


def engine_help() -> str:
    """The --engine help text, from the table."""
    rows = [f"{e.name} ({e.title}; ships {e.file}, runs on {RUNTIMES[e.runtime].title}"
            + (", needs a GPU" if RUNTIMES[e.runtime].needs_gpu else "") + ")" for e in ENGINES.values()]  # fmt: skip
    return "Target: " + "; ".join(rows) + "."


def row_names(variants: list[str], engines: list[Engine]) -> set[str]:
    """Every bench row a run with these quantized models and exports can have (what a pipeline's gates may name)."""
    names = {"torch-fp32", RUNTIMES["onnxruntime"].baseline, *(f"torch-{v}" for v in variants)}
    for engine in map(ENGINES.__getitem__, engines):
        names |= {engine.onnx_row(v) for v in variants}
        if engine.builds_from_onnx:
            names |= {RUNTIMES[engine.runtime].baseline, *(engine.row(v) for v in variants)}
    return names
