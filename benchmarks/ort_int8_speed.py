"""ONNX Runtime INT8, like for like: our `ort` export against ORT's own `quantize_static` and the FP32 ONNX.

What is held equal (issue 9, item 22): the same fine-tuned model, the same FP32 ONNX as the starting
point of `quantize_static`, the same 512 calibration images (calib/fashion-mnist-train-512.json), the
same calibrator (both sides run MinMax and Percentile 99.99, each its own implementation), the same
quantized ops (Conv, Relu, Add, MaxPool; the classifier Gemm and the global average pool stay float
on both sides) and 8-bit per-channel symmetric weights with uint8 activations. Our export runs with
both weight layouts: zero-point 0 ("symmetric kernel", what `quantize_static` writes too: the like-for-
like row) and zero-point -1 ("gemm kernel", ORT's QGEMM path, our default on a CPU with AMX-INT8).
Every artifact's optimized graph is read back to count the integer kernels ORT really runs.

Models: ResNet-18 with the CIFAR stem at 32x32, fine-tuned here for 2 epochs on 8,000 Fashion-MNIST
images and scored on all 10,000 test images; ResNet-18 at 224x224 from random init, timed only (no
training on 2 cores), calibrated on the same images resized. Latency: 2 threads, 10 warm-up runs, 300
(batch 1) or 60 (batch 32) timed runs per artifact in 6 rounds that rotate over the artifacts
(ssql_deploy.bench.timing); speed-ups are medians of per-round ratios against the FP32 ONNX.

    .venv/bin/python benchmarks/ort_int8_speed.py

Writes benchmarks/results/ort_int8_speed.json and .log (every command's raw output).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
sys.path.insert(0, str(ROOT))

from ssql_deploy.bench.timing import interleaved, paired_speedup  # noqa: E402
from ssql_deploy.data import DataSource  # noqa: E402
from ssql_deploy.evaluate import eval_loader  # noqa: E402
from ssql_deploy.export.ort_session import cpu_has_amx_int8, make_session, optimized_op_counts  # noqa: E402
from ssql_deploy.models import create_model  # noqa: E402
from ssql_deploy.models.checkpoint import save_atomic  # noqa: E402
from ssql_deploy.models.trained import ModelMeta, model_payload  # noqa: E402
from ssql_deploy.quant.calib_set import load_calibration  # noqa: E402

THREADS = 2
RUNS = {1: 300, 32: 60}  # batch 1 takes milliseconds: more runs to hold its median against machine noise
ROUNDS, WARMUP = 6, 10
CALIBRATORS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
PERCENTILE = 99.99
SAME_OPS = ["Conv", "Relu", "Add", "MaxPool"]  # what our `ort` layout quantizes; the Gemm and GlobalAveragePool stay float
LOG = RESULTS / "ort_int8_speed.log"
INTEGER_OPS = ("QLinearConv", "ConvInteger", "QLinearAdd", "QLinearMatMul", "QGemm", "QLinearGlobalAveragePool", "MatMulInteger")


def sh(*args: str) -> None:
    with LOG.open("a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)


def cli(*args: str | Path) -> None:
    sh(sys.executable, "-m", "ssql_deploy", *map(str, args))


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.items = iter([{"input": b.numpy()} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def ort_quantize_static(fp32: Path, out: Path, batches: list[torch.Tensor], calibrator: str) -> Path:
    """ORT's static quantizer given what ours is given: same ops, same calibrator, same images, QDQ, per-channel int8 weights."""
    pre = out.with_name("preprocessed.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), _Reader(batches), quant_format=QuantFormat.QDQ, op_types_to_quantize=SAME_OPS,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CALIBRATORS[calibrator], extra_options={"CalibPercentile": PERCENTILE})  # fmt: skip
    return out


def kernels(path: Path) -> dict[str, int]:
    """Which ops ONNX Runtime runs on integers, and which float convs / gemms remain, after its own optimizations."""
    ops = optimized_op_counts(onnx.load(str(path)))
    return {op: n for op, n in sorted(ops.items()) if op in INTEGER_OPS or op in ("Conv", "FusedConv", "Gemm", "FusedGemm")}


def top1(path: Path, size: int) -> float:
    session = make_session(path, THREADS)
    correct = total = 0
    for images, labels in eval_loader(DataSource.of("fashion-mnist", None, size), None, 500, 1):
        correct += int((session.run(None, {"input": images.numpy()})[0].argmax(1) == labels.numpy()).sum())
        total += len(labels)
    return 100.0 * correct / total


def latencies(paths: dict[str, Path], batch: int, size: int) -> dict[str, Any]:
    sessions = {name: make_session(p, THREADS) for name, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)

    def timer(session: ort.InferenceSession) -> Any:
        return lambda: session.run(None, {"input": x})

    measured = interleaved({n: timer(s) for n, s in sessions.items()}, WARMUP, RUNS[batch], ROUNDS, f"batch {batch}")
    out: dict[str, Any] = {}
    for name, m in measured.items():
        out[name] = m.latency(batch).model_dump() | {"speedup_vs_fp32": paired_speedup("onnx-fp32", measured["onnx-fp32"], m).model_dump()}
    return out


def bench_model(label: str, run: Path, size: int, scored: bool) -> dict[str, Any]:
    sample = [] if scored else ["--subset", "500"]  # the quantize stage's own PyTorch scoring; every artifact is scored in ORT below
    source = DataSource.of("fashion-mnist", None, size)
    batches, _ = load_calibration(source, 512, ROOT / "calib")
    ours: dict[str, Path] = {}
    for calib in CALIBRATORS:
        out = run / calib
        cli("quantize", run, "--bits", "w8a8", "--calib", calib, "--percentile", str(PERCENTILE), "--workers", "1", "--out", out, *sample)
        for kernel in ("symmetric", "gemm"):
            cli(
                "export", out, "--bits", "w8a8", "--engine", "ort", "--ort-kernel", kernel, "--threads", str(THREADS), "--out", out / kernel
            )
            ours[f"ours-{calib}-{kernel}-kernel"] = out / kernel / "export/w8a8-ort/model.qdq.onnx"
    paths = {"onnx-fp32": run / "minmax/symmetric/export/fp32/model.onnx", **ours}  # every export writes the same FP32 ONNX
    for calib in CALIBRATORS:
        paths[f"quantize_static-{calib}"] = ort_quantize_static(paths["onnx-fp32"], run / f"quantize_static-{calib}.onnx", batches, calib)
    result: dict[str, Any] = {
        "model": label,
        "input": size,
        "kernels": {n: kernels(p) for n, p in paths.items()},
        "latency": {},
        "top1": {},
    }
    for batch in (1, 32):
        result["latency"][str(batch)] = latencies(paths, batch, size)
    if scored:
        result["top1"] = {name: round(top1(p, size), 2) for name, p in paths.items()}
    return result


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    LOG.write_text("")
    torch.set_num_threads(THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench-ort-"))
    small = work / "r18-cifar"
    cli("finetune", "--arch", "resnet18", "--subset", "8000", "--epochs", "2", "--batch-size", "128", "--lr", "0.1",
        "--schedule", "cosine", "--workers", "1", "--out", small)  # fmt: skip
    big = work / "r18-224"
    torch.manual_seed(0)
    model = create_model("resnet18", 10, "imagenet")
    meta = ModelMeta.for_data("resnet18", "imagenet", 10, DataSource.of("fashion-mnist", None, 224))
    save_atomic(model_payload("model", model, meta), big / "finetune/best.pt")
    rows = [bench_model("ResNet-18, CIFAR stem, 32x32 (fine-tuned)", small, 32, True),
            bench_model("ResNet-18, 224x224 (random init, timed only)", big, 224, False)]  # fmt: skip
    info = {"threads": THREADS, "onnxruntime": ort.__version__, "torch": torch.__version__, "cpu_amx_int8": cpu_has_amx_int8(),
            "runs_per_point": {str(b): n for b, n in RUNS.items()}, "rounds": ROUNDS, "warmup": WARMUP, "same_ops": SAME_OPS, "percentile": PERCENTILE}  # fmt: skip
    (RESULTS / "ort_int8_speed.json").write_text(json.dumps({"benchmark": "ort_int8_speed", "env": info, "rows": rows}, indent=2) + "\n")
    for r in rows:
        print(r["model"])
        for name, ops in r["kernels"].items():
            print(f"  {name:36s} runs {ops}")
        for batch, lat in r["latency"].items():
            for name, v in lat.items():
                s = v["speedup_vs_fp32"]
                print(f"  batch {batch:>2} {name:36s} p50 {v['p50_ms']:8.2f} ms  {s['ratio']:.2f}x [{s['low']:.2f}-{s['high']:.2f}]")
        if r["top1"]:
            print(f"  top-1: {r['top1']}")


if __name__ == "__main__":
    main()
