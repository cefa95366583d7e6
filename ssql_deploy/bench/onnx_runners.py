"""The runners of ONNX files, with nothing but numpy and the runtime itself: what `bench --evalset` uses on a board.

Each keeps `predict(images) -> logits` and `timer(batch, size)` (bench/runners.py): fixed inputs are
prepared once, so only the inference is timed.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ssql_deploy.errors import UserError
from ssql_deploy.runtimes import INPUT_NAME


def fixed_input(batch: int, input_size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size), dtype=np.float32)


class OrtRunner:
    """An ONNX file, or a graph in memory (`export --ort-kernel auto` times its candidates before writing any)."""

    def __init__(self, model: Path | bytes, threads: int, provider: str | None = None) -> None:
        import onnxruntime as ort

        from ssql_deploy.export.ort_session import make_session, providers

        provider = provider or providers()[0]
        try:
            self.session = make_session(model, threads, provider=provider)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types, none of them ours to show as a traceback
            said = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise UserError(
                f"ONNX Runtime {ort.__version__} cannot load {model if isinstance(model, Path) else 'the graph'}: {said}",
                "re-export it with `ssql-deploy export`, or use an onnxruntime that supports its IR and opset versions",
            ) from None
        self.detail = provider

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: x})[0]

    def timer(self, batch: int, input_size: int) -> Callable[[], None]:
        feed = {INPUT_NAME: fixed_input(batch, input_size)}

        def run() -> None:
            self.session.run(None, feed)

        return run


class OpenVinoRunner:
    """An ONNX file (or OpenVINO IR, or an ONNX graph in memory: the export's check) compiled by OpenVINO for
    `device`; on the CPU with FP32 inference precision so the FP32 row is FP32 (on CPUs with AMX or AVX512-BF16
    OpenVINO would otherwise run float layers in bf16)."""

    def __init__(self, model: Path | bytes, threads: int, device: str = "CPU") -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ImportError("OpenVINO is not installed (pip install 'ssql-deploy[openvino]')") from None
        core = ov.Core()
        if device.split(":")[0] not in ("AUTO", "MULTI", "HETERO") and device not in core.available_devices:
            raise UserError(f"OpenVINO has no device {device!r} here", f"choose one it lists: {', '.join(core.available_devices)}")
        # other devices keep their own defaults (a GPU's f16, an NPU's own precision): what deploying there gets
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
        try:
            self.compiled = core.compile_model(core.read_model(model if isinstance(model, bytes) else str(model)), device, config)
        except RuntimeError as exc:
            said = (str(exc).strip().splitlines() or ["unknown error"])[0]
            what = model if isinstance(model, Path) else "the graph"
            raise UserError(f"OpenVINO {ov.__version__} cannot compile {what}: {said}", "re-export it with `ssql-deploy export`") from None
        self.request = self.compiled.create_infer_request()
        convs = openvino_conv_precisions(self.compiled)
        self.int8_convs, self.convs = convs.get("i8", 0) + convs.get("u8", 0), sum(convs.values())
        self.detail = f"OpenVINO {ov.__version__} {device}: {self.int8_convs} of {self.convs} convolutions int8"

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.request.infer({0: x})[0])

    def timer(self, batch: int, input_size: int) -> Callable[[], None]:
        x = fixed_input(batch, input_size)

        def run() -> None:
            self.request.infer({0: x})

        return run


def openvino_conv_precisions(compiled: Any) -> dict[str, int]:
    """How many convolutions of the compiled model run at each precision, from its runtime information."""
    found: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) == "Convolution":
            precision = info["runtimePrecision"].astype(str)
            found[precision] = found.get(precision, 0) + 1
    return found
