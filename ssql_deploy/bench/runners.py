"""One `predict(images) -> logits` for every runtime, so accuracy and latency are measured alike."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ssql_deploy.bench.artifacts import Artifact
from ssql_deploy.export.onnx_graph import INPUT_NAME
from ssql_deploy.export.ort_session import make_session, providers
from ssql_deploy.models import create_model
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.quant.artifact import load_quantized

Predict = Callable[[np.ndarray], np.ndarray]


def _torch_predict(model: torch.nn.Module) -> Predict:
    model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return predict


def load_runner(artifact: Artifact, threads: int) -> tuple[Predict, str]:
    """The artifact's predict function and the runtime detail it ran on (provider, device)."""
    assert artifact.path is not None
    if artifact.kind == "torch-float":
        assert artifact.meta is not None
        meta = artifact.meta
        model = create_model(meta.arch, meta.num_classes, meta.stem)  # type: ignore[arg-type]
        model.load_state_dict(load_checkpoint(artifact.path)["model"])
        return _torch_predict(model), f"torch {torch.__version__} cpu"
    if artifact.kind == "torch-fakequant":
        return _torch_predict(load_quantized(artifact.path).gm), f"torch {torch.__version__} cpu"
    if artifact.kind == "onnx":
        provider = providers()[0]
        session = make_session(artifact.path, threads, provider=provider)
        return (lambda x: session.run(None, {INPUT_NAME: x})[0]), provider
    from ssql_deploy.export.tensorrt_engine import TensorRTRunner

    return TensorRTRunner(artifact.path).predict, "tensorrt"


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    images_per_s: float


def measure_latency(predict: Predict, batch: int, input_size: int, warmup: int, runs: int) -> Latency:
    """Wall time of `runs` calls on one fixed batch after `warmup` untimed calls."""
    x = np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size), dtype=np.float32)
    for _ in range(warmup):
        predict(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - start)
    p50, p90 = np.percentile(times, [50, 90])
    return Latency(round(1000 * p50, 4), round(1000 * p90, 4), round(batch / p50, 2))
