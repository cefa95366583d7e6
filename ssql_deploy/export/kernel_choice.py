"""`--ort-kernel auto`: ONNX Runtime's two integer convolution paths, timed on this artifact, the faster one kept.

A weight zero-point of 0 sends `QLinearConv` to ORT's symmetric (VNNI) convolution kernel; -1 (exact:
the narrow weight range leaves that integer free) to its general QGEMM path, which uses AMX where the
CPU has it. Which is faster depends on the network, not on a CPU flag alone: on one AMX machine
QGEMM ran a full ResNet-18 4.14x as fast as FP32 at batch 32 against the symmetric kernel's 3.37x,
while for MobileNetV2 it gained nothing at all (`benchmarks/results/peers_32.json`), and it was
slower for all four networks of `benchmarks/results/families_int8.json`. So `auto` builds both
graphs, times them side by side on the exporting machine (interleaved rounds, batch 1 and 32) and
ships the one with the lower geometric mean of the two medians; the manifest records both timings.
Export on the machine you deploy to, or pass `--ort-kernel symmetric|gemm` to fix the choice.
"""

import math

import onnx
from pydantic import BaseModel, ConfigDict

from ssql_deploy.bench.onnx_runners import OrtRunner
from ssql_deploy.bench.timing import interleaved

KERNELS = {0: "symmetric", -1: "gemm"}  # weight zero-point -> ORT's kernel path
ZERO_POINTS = {name: zp for zp, name in KERNELS.items()}
BATCHES = (1, 32)
WARMUP, RUNS, ROUNDS = 3, 15, 5


class KernelChoice(BaseModel):
    """What `auto` measured and chose, as the export manifest records it."""

    model_config = ConfigDict(extra="forbid")
    chosen: str
    weight_zero_point: int
    p50_ms: dict[str, dict[str, float]]  # kernel -> batch -> median latency
    threads: int


def choose_kernel(graphs: dict[int, onnx.ModelProto], input_size: int, threads: int) -> KernelChoice:
    """Time each candidate graph (keyed by weight zero-point) and pick the faster over both batch sizes."""
    runners = {KERNELS[zp]: OrtRunner(model.SerializeToString(), threads, "CPUExecutionProvider") for zp, model in graphs.items()}
    p50: dict[str, dict[str, float]] = {name: {} for name in runners}
    for batch in BATCHES:
        timers = {name: runner.timer(batch, input_size) for name, runner in runners.items()}
        for name, measured in interleaved(timers, WARMUP, RUNS, ROUNDS, f"ort kernels at batch {batch}").items():
            p50[name][str(batch)] = measured.latency(batch).p50_ms
    score = {name: math.prod(times.values()) for name, times in p50.items()}  # same batches for each: the geometric mean's order
    chosen = min(score, key=score.__getitem__)
    return KernelChoice(chosen=chosen, weight_zero_point=ZERO_POINTS[chosen], p50_ms=p50, threads=threads)
