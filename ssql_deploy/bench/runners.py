"""One runner per runtime behind the same two calls, so accuracy and latency are measured alike.

`predict(images) -> logits` scores the test split; `timer(batch, size)` prepares fixed inputs once
and returns a call that runs one inference on them, so only the inference is timed (device-resident
buffers for TensorRT).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
import torch

from ssql_deploy.bench.artifacts import Artifact
from ssql_deploy.errors import UserError
from ssql_deploy.export.onnx_graph import INPUT_NAME
from ssql_deploy.export.ort_session import make_session, providers
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.models.trained import ModelMeta, build_model
from ssql_deploy.quant.artifact import load_quantized
from ssql_deploy.runtimes import RUNTIMES, RuntimeName


class Runner(Protocol):
    detail: str

    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def timer(self, batch: int, input_size: int) -> Callable[[], None]: ...


def _fixed_input(batch: int, input_size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size), dtype=np.float32)


class TorchRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.detail = f"torch {torch.__version__} cpu"

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()

    def timer(self, batch: int, input_size: int) -> Callable[[], None]:
        x = _fixed_input(batch, input_size)

        def run() -> None:
            self.predict(x)

        return run


class OrtRunner:
    def __init__(self, path: Path, threads: int) -> None:
        provider = providers()[0]
        try:
            self.session = make_session(path, threads, provider=provider)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types, none of them ours to show as a traceback
            said = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise UserError(
                f"ONNX Runtime {ort.__version__} cannot load {path}: {said}",
                "re-export it with `ssql-deploy export`, or use an onnxruntime that supports its IR and opset versions",
            ) from None
        self.detail = provider

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: x})[0]

    def timer(self, batch: int, input_size: int) -> Callable[[], None]:
        feed = {INPUT_NAME: _fixed_input(batch, input_size)}

        def run() -> None:
            self.session.run(None, feed)

        return run


class OpenVinoRunner:
    """An ONNX file compiled by OpenVINO for `device`, with FP32 inference precision so the FP32 row is FP32
    (on CPUs with AMX or AVX512-BF16 OpenVINO would otherwise run float layers in bf16)."""

    def __init__(self, path: Path, threads: int, device: str = "CPU") -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ImportError("OpenVINO is not installed (pip install 'ssql-deploy[openvino]')") from None
        core = ov.Core()
        if device not in core.available_devices:
            raise UserError(f"OpenVINO has no device {device} here", f"pick one of {', '.join(core.available_devices)}")
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), device, config)
        except RuntimeError as exc:
            said = (str(exc).strip().splitlines() or ["unknown error"])[0]
            raise UserError(f"OpenVINO {ov.__version__} cannot compile {path}: {said}", "re-export it with `ssql-deploy export`") from None
        self.request = self.compiled.create_infer_request()
        convs = openvino_conv_precisions(self.compiled)
        self.int8_convs, self.convs = convs.get("i8", 0) + convs.get("u8", 0), sum(convs.values())
        self.detail = f"OpenVINO {ov.__version__} {device}: {self.int8_convs} of {self.convs} convolutions int8"

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.request.infer({0: x})[0])

    def timer(self, batch: int, input_size: int) -> Callable[[], None]:
        x = _fixed_input(batch, input_size)

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


def torch_model(path: Path, kind: str) -> torch.nn.Module:
    """The PyTorch model of a checkpoint: the float network, or the fake-quant graph of its saved layout."""
    if kind == "torch-fakequant":
        return load_quantized(path).gm
    obj = load_checkpoint(path)
    model = build_model(ModelMeta.from_checkpoint(obj))
    model.load_state_dict({k: v for k, v in obj["model"].items() if k in model.state_dict()})
    return model


def _tensorrt(path: Path, _threads: int) -> Runner:
    from ssql_deploy.export.tensorrt_engine import TensorRTRunner  # only on GPU machines

    return TensorRTRunner(path)


# One runner per row of runtimes.RUNTIMES: (artifact file, kind, threads) -> Runner.
RUNNERS: dict[RuntimeName, Callable[[Path, str, int], Runner]] = {
    "torch": lambda path, kind, _threads: TorchRunner(torch_model(path, kind)),
    "onnxruntime": lambda path, _kind, threads: OrtRunner(path, threads),
    "openvino": lambda path, _kind, threads: OpenVinoRunner(path, threads),
    "tensorrt": lambda path, _kind, threads: _tensorrt(path, threads),
}
assert set(RUNNERS) == set(RUNTIMES)


def load_runner(artifact: Artifact, threads: int) -> Runner:
    assert artifact.path is not None
    return RUNNERS[artifact.runtime](artifact.path, artifact.kind, threads)
