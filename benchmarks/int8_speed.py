"""INT8 vs FP32 latency of every family's `ort` artifact as `export` writes it today (issue 10, item 8's speed goal).

benchmarks/families_int8.py timed five artifacts of each network in one rotation (10 rounds), before SiLU and
Hardswish ran on integers; its MobileNetV2 batch-1 figure (1.31x) missed the 1.6x goal. Here each network is
timed against its own w8a8 artifact only, in 20 rounds, at 2 threads (the goal's setting) and at 1 thread (how
much of the gap is ONNX Runtime's thread pool rather than its kernels).

Latency depends on the graph's shapes and ops, not on how well the weights are trained, so each network (at its
small-input variant, 32x32) is fine-tuned briefly from random init, only so that calibration sees real activation
ranges: 8,192 Fashion-MNIST training images, 1 epoch, batch 64, SGD lr 0.01 cosine. Then w8a8 PTQ (percentile
calibrator, 1,000 images) and `export --engine ort --ort-kernel symmetric` (parity status and the count of
convolutions ONNX Runtime runs as integer kernels are recorded). Timing: ssql_deploy.bench.timing as `bench`
times it; batch 1 (600 runs) and batch 32 (120 runs) after 10 warm-up runs, in 20 rounds alternating FP32 and
INT8; a speed-up is the median of per-round ratios, with the lowest and highest round.

    .venv/bin/python benchmarks/int8_speed.py

Writes benchmarks/results/int8_speed.json and .log. Nothing else may run on the machine meanwhile.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from evidence import cpu, export_ort, run_logged, stamp  # noqa: E402

from ssql_deploy.bench.runners import OrtRunner  # noqa: E402
from ssql_deploy.bench.timing import interleaved, paired_speedup  # noqa: E402
from ssql_deploy.export.ort_session import integer_conv_report  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
RUNS = ROOT / "runs/speed"
LOG = RESULTS / "int8_speed.log"
ARCHS = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "resnet18_quarter"]
FINETUNE = ["--subset", "8192", "--epochs", "1", "--batch-size", "64", "--lr", "0.01", "--schedule", "cosine", "--workers", "1"]
ROUNDS = 20
RUNS_PER_BATCH = {1: 600, 32: 120}


def artifacts(arch: str) -> tuple[dict, dict[str, Path]]:
    """Fine-tune, quantize and export (each reused when an earlier run of this script got that far)."""
    run = RUNS / arch
    if not (run / "finetune/manifest.json").is_file():
        run_logged(LOG, "finetune", "--arch", arch, *FINETUNE, "--out", run)
    if not (run / "quant/w8a8/manifest.json").is_file():
        run_logged(LOG, "quantize", run, "--bits", "w8a8", "--calib", "percentile", "--subset", "1000", "--workers", "1")
    path, metrics = export_ort(LOG, run, "w8a8", "symmetric")
    kernels = integer_conv_report(onnx.load(str(path)))
    info = {"export_status": metrics["status"], "integer_convs": kernels["integer_convs"], "convs": kernels["convs"]}
    return info, {"fp32": run / "export/fp32/model.onnx", "w8a8": path}


def timing(paths: dict[str, Path], threads: int) -> dict:
    runners = {name: OrtRunner(path, threads) for name, path in paths.items()}
    result: dict = {}
    for batch, runs in RUNS_PER_BATCH.items():
        m = interleaved({n: r.timer(batch, 32) for n, r in runners.items()}, 10, runs, ROUNDS, f"{threads} threads, batch {batch}")
        result[str(batch)] = {"fp32_p50_ms": m["fp32"].latency(batch).p50_ms, "w8a8_p50_ms": m["w8a8"].latency(batch).p50_ms,
                              "speedup": paired_speedup("fp32", m["fp32"], m["w8a8"]).model_dump()}  # fmt: skip
    return result


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp(LOG, "measurement run")
    models, paths = {}, {}
    for arch in ARCHS:  # every artifact first, then every timing, so the timings run in one quiet stretch
        models[arch], paths[arch] = artifacts(arch)
    stamp(LOG, "timing")
    for arch in ARCHS:
        models[arch]["latency"] = {f"{threads} threads": timing(paths[arch], threads) for threads in (2, 1)}
        for threads, batches in models[arch]["latency"].items():
            with LOG.open("a") as f:
                for batch, r in batches.items():
                    s = r["speedup"]
                    f.write(f"{arch} {threads} batch {batch}: fp32 {r['fp32_p50_ms']:.3f} ms, w8a8 {r['w8a8_p50_ms']:.3f} ms, "
                            f"{s['ratio']:.2f}x (rounds {s['low']:.2f}-{s['high']:.2f})\n")  # fmt: skip
    result = {"benchmark": "int8_speed", "measured_on": "exported ONNX in ONNX Runtime (CPU), FP32 and w8a8 interleaved",
              "finetune": " ".join(FINETUNE), "rounds": ROUNDS, "cpu": cpu(), "models": models}  # fmt: skip
    (RESULTS / "int8_speed.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
