"""One runner per runtime behind the same two calls, so accuracy and latency are measured alike.

`predict(images) -> logits` scores the test split; `timer(batch, size)` prepares fixed inputs once
and returns a call that runs one inference on them, so only the inference is timed (device-resident
buffers for TensorRT).
"""

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ssql_deploy.bench.artifacts import Artifact
from ssql_deploy.bench.onnx_runners import OpenVinoRunner, OrtRunner, fixed_input
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.models.trained import ModelMeta, build_model
from ssql_deploy.quant.artifact import load_quantized
from ssql_deploy.runtimes import RUNTIMES, RuntimeName


class Runner(Protocol):
    detail: str

    def predict(self, x: np.ndarray) -> np.ndarray: ...

    def timer(self, batch: int, input_size: int) -> Callable[[], None]: ...


class TorchRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.detail = f"torch {torch.__version__} cpu"

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()

    def timer(self, batch: int, input_size: int) -> Callable[[], None]:
        x = fixed_input(batch, input_size)

        def run() -> None:
            self.predict(x)

        return run


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


# One runner per row of runtimes.RUNTIMES: (artifact file, kind, threads, OpenVINO device) -> Runner.
RUNNERS: dict[RuntimeName, Callable[[Path, str, int, str], Runner]] = {
    "torch": lambda path, kind, _threads, _device: TorchRunner(torch_model(path, kind)),
    "onnxruntime": lambda path, _kind, threads, _device: OrtRunner(path, threads),
    "openvino": lambda path, _kind, threads, device: OpenVinoRunner(path, threads, device),
    "tensorrt": lambda path, _kind, threads, _device: _tensorrt(path, threads),
}
assert set(RUNNERS) == set(RUNTIMES)


def load_runner(artifact: Artifact, threads: int, device: str = "CPU") -> Runner:
    assert artifact.path is not None
    return RUNNERS[artifact.runtime](artifact.path, artifact.kind, threads, device)
