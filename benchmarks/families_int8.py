"""Any CNN through the chain (issue 10, item 8): MobileNetV2, MobileNetV3-Large, EfficientNet-B0 and a ResNet.

Each network, at its small-input variant (32x32), is fine-tuned from random init on all 60,000
Fashion-MNIST training images (3 epochs, batch 128, SGD lr 0.05 cosine, wd 1e-4), then:
- PTQ at w8a8 (percentile calibrator) and at w4a8 and w4a4 with every rounding calibrator
  (minmax, percentile, mse, entropy), each exported for ONNX Runtime (`ort` layout, symmetric kernel);
- top-1 of the FP32 ONNX and of every QDQ ONNX model in an ONNX Runtime session on all 10,000
  test images, and the count of convolutions ONNX Runtime runs as integer kernels; an export whose
  parity check fails (ONNX Runtime agreeing with the PyTorch twin on < 99% of the calibration images)
  is measured all the same, with its status and agreement recorded;
- latency of the FP32 ONNX, the w8a8 artifact with each of ORT's two kernels (weight zero-point 0:
  the symmetric conv kernel; -1: ORT's QGEMM path, which uses AMX where the CPU has it)
  and the best w4a8 and w4a4 artifacts, side by side: 2 threads, batch 1 and 32, 10 warm-up runs,
  then 300 (batch 1) or 60 (batch 32) timed runs per artifact in 10 rounds rotating over the
  artifacts (ssql_deploy.bench.timing, as `bench` times); speed-ups are medians of per-round ratios.

    .venv/bin/python benchmarks/families_int8.py               # everything (fine-tuning is reused once done)
    .venv/bin/python benchmarks/families_int8.py --train-only  # only the fine-tuning runs

Writes benchmarks/results/families_int8.json and .log. Nothing else may run on the machine meanwhile.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from evidence import cpu, export_ort, ort_top1, run_logged, stamp  # noqa: E402

from ssql_deploy.bench.runners import OrtRunner  # noqa: E402
from ssql_deploy.bench.timing import interleaved, paired_speedup  # noqa: E402
from ssql_deploy.export.ort_session import integer_conv_report  # noqa: E402

THREADS = 2
RESULTS = ROOT / "benchmarks/results"
RUNS = ROOT / "runs/families"
LOG = RESULTS / "families_int8.log"
ARCHS = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "resnet18_quarter"]
LOW_BITS = ["w4a8", "w4a4"]
CALIBRATORS = ["minmax", "percentile", "mse", "entropy"]
FINETUNE = ["--epochs", "3", "--batch-size", "128", "--lr", "0.05", "--schedule", "cosine", "--weight-decay", "1e-4", "--workers", "1"]


def cli(*args: str | Path) -> float:
    return run_logged(LOG, *args)


def finetune(arch: str) -> Path:
    run = RUNS / arch
    if not (run / "finetune/manifest.json").is_file():
        resume = ["--resume"] if (run / "finetune/last.pt").is_file() else []
        cli("finetune", "--arch", arch, *FINETUNE, "--out", run, *resume)
    return run


def quantize_export(run: Path, arch: str, bits: str, calib: str, kernel: str = "symmetric") -> dict:
    out = RUNS / f"{arch}-{calib}"
    # the simulated top-1 quantize prints is not reported here (every figure is the ONNX artifact's): 1,000 images suffice
    seconds = None  # wall time of quantize; None when reused from an earlier run of this script
    if not (out / f"quant/{bits}/manifest.json").is_file():
        seconds = cli("quantize", run, "--bits", bits, "--calib", calib, "--subset", "1000", "--workers", "1", "--out", out)
    path, metrics = export_ort(LOG, out, bits, kernel)
    kernels = integer_conv_report(onnx.load(str(path)))
    return {"top1": ort_top1(path), "quantize_s": seconds, "integer_convs": kernels["integer_convs"], "convs": kernels["convs"],
            "float_ops": {op: {k: v for k, v in info.items() if k != "nodes"} for op, info in kernels["float_ops"].items()},
            "export_status": metrics["status"], "parity_agreement": metrics["parity"]["top1_agreement"], "onnx": str(path.relative_to(ROOT))}  # fmt: skip


def timing(paths: dict[str, Path]) -> dict:
    """p50 latency and the paired-round speed-up against the FP32 ONNX, per batch size."""
    runners = {name: OrtRunner(path, THREADS) for name, path in paths.items()}
    result: dict = {}
    for batch, runs in ((1, 300), (32, 60)):
        measured = interleaved({n: r.timer(batch, 32) for n, r in runners.items()}, 10, runs, 10, f"batch {batch}")
        result[str(batch)] = {n: {"p50_ms": m.latency(batch).p50_ms, "speedup": paired_speedup("fp32", measured["fp32"], m).model_dump()}
                              for n, m in measured.items()}  # fmt: skip
    return result


def measure(arch: str) -> tuple[dict, dict[str, Path]]:
    """Every artifact's top-1 and integer-kernel count, and the artifacts to time."""
    run = finetune(arch)
    rows: dict = {"w8a8": {"percentile": quantize_export(run, arch, "w8a8", "percentile")}}
    for bits in LOW_BITS:
        rows[bits] = {calib: quantize_export(run, arch, bits, calib) for calib in CALIBRATORS}
    fp32_path = RUNS / f"{arch}-percentile/export/fp32/model.onnx"
    gemm = RUNS / f"{arch}-percentile-gemm"
    export_ort(LOG, RUNS / f"{arch}-percentile", "w8a8", "gemm", gemm)
    best = {bits: max(r, key=lambda c, r=r: r[c]["top1"]) for bits, r in rows.items()}
    timed = {"fp32": fp32_path, "w8a8": ROOT / rows["w8a8"]["percentile"]["onnx"], "w8a8-gemm": gemm / "export/w8a8-ort/model.qdq.onnx"}
    timed |= {bits: ROOT / rows[bits][best[bits]]["onnx"] for bits in LOW_BITS}
    fp32 = ort_top1(fp32_path)
    manifest = json.loads((run / "finetune/manifest.json").read_text())
    return {"fp32_onnx_top1": fp32, "bits": rows, "best_calibrator": best, "drop_w8a8": round(fp32 - rows["w8a8"]["percentile"]["top1"], 2),
            "finetune_wall_s": manifest["metrics"].get("wall_seconds_this_session")}, timed  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--archs", nargs="*", default=ARCHS)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.train_only:
        for arch in args.archs:
            finetune(arch)
        return
    stamp(LOG, "measurement run")
    models, timed = {}, {}
    for arch in args.archs:  # accuracy first, then every timing, so the timings run in one quiet stretch
        models[arch], timed[arch] = measure(arch)
    stamp(LOG, "timing")
    for arch in args.archs:
        models[arch]["latency"] = timing(timed[arch])
    result = {"benchmark": "families_int8", "measured_on": "exported ONNX in ONNX Runtime (CPU, 2 threads), all 10k test images",
              "finetune": " ".join(FINETUNE), "cpu": cpu(), "models": models}  # fmt: skip
    (RESULTS / "families_int8.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
