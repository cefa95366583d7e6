"""Any CNN through the chain (issue 10, item 8): MobileNetV2, MobileNetV3-Large, EfficientNet-B0 and a ResNet.

Each network, at its small-input variant (32x32), is fine-tuned from random init on all 60,000
Fashion-MNIST training images (3 epochs, batch 128, SGD lr 0.05 cosine, wd 1e-4), then:
- PTQ at w8a8 (percentile calibrator) and at w4a8 and w4a4 with every rounding calibrator
  (minmax, percentile, mse, entropy), each exported for ONNX Runtime (`ort` layout);
- top-1 of the FP32 ONNX and of every QDQ ONNX model in an ONNX Runtime session on all 10,000
  test images, and the count of convolutions ONNX Runtime runs as integer kernels;
- `ssql-deploy bench` of the FP32 ONNX, the w8a8 and the best w4a8 / w4a4 artifacts side by side
  (2 threads, batch 1 and 32, interleaved rounds, speed-ups from paired rounds).

    .venv/bin/python benchmarks/families_int8.py               # everything (fine-tuning is reused once done)
    .venv/bin/python benchmarks/families_int8.py --train-only  # only the fine-tuning runs

Writes benchmarks/results/families_int8.json and .log. Nothing else may run on the machine meanwhile.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ort_top1 import ort_top1  # noqa: E402

from ssql_deploy.export.ort_session import integer_conv_report  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
RUNS = ROOT / "runs/families"
LOG = RESULTS / "families_int8.log"
ARCHS = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "resnet18_quarter"]
LOW_BITS = ["w4a8", "w4a4"]
CALIBRATORS = ["minmax", "percentile", "mse", "entropy"]
FINETUNE = ["--epochs", "3", "--batch-size", "128", "--lr", "0.05", "--schedule", "cosine", "--weight-decay", "1e-4", "--workers", "1"]


def cli(*args: str | Path) -> float:
    cmd = [sys.executable, "-m", "ssql_deploy", *map(str, args)]
    start = time.time()
    with LOG.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    return round(time.time() - start, 1)


def finetune(arch: str) -> Path:
    run = RUNS / arch
    if not (run / "finetune/manifest.json").is_file():
        resume = ["--resume"] if (run / "finetune/last.pt").is_file() else []
        cli("finetune", "--arch", arch, *FINETUNE, "--out", run, *resume)
    return run


def quantize_export(run: Path, arch: str, bits: str, calib: str) -> dict:
    out = RUNS / f"{arch}-{calib}"
    seconds = cli("quantize", run, "--bits", bits, "--calib", calib, "--workers", "1", "--out", out)
    cli("export", out, "--bits", bits, "--engine", "ort")
    path = out / f"export/{bits}-ort/model.qdq.onnx"
    import onnx

    kernels = integer_conv_report(onnx.load(str(path)))
    return {"top1": ort_top1(path), "quantize_s": seconds, "integer_convs": kernels["integer_convs"], "convs": kernels["convs"],
            "onnx": str(path.relative_to(ROOT))}  # fmt: skip


def measure(arch: str) -> dict:
    run = finetune(arch)
    rows: dict = {"w8a8": {"percentile": quantize_export(run, arch, "w8a8", "percentile")}}
    for bits in LOW_BITS:
        rows[bits] = {calib: quantize_export(run, arch, bits, calib) for calib in CALIBRATORS}
    fp32 = ort_top1(RUNS / f"{arch}-percentile/export/fp32/model.onnx")
    best = {bits: max(r, key=lambda c, r=r: r[c]["top1"]) for bits, r in rows.items()}
    timed = [RUNS / f"{arch}-percentile/export/fp32/model.onnx"] + [ROOT / rows[b][c]["onnx"] for b, c in best.items()]
    bench_out = RUNS / f"{arch}-bench"
    cli("bench", *timed, "--threads", "2", "--batch-sizes", "1,32", "--runs", "200", "--rounds", "10", "--workers", "1", "--out", bench_out)
    report = json.loads((bench_out / "report.json").read_text())
    speed = {r["name"]: {b: {"p50_ms": r["latency"][b]["p50_ms"], **({"speedup": r["speedup"][b]} if b in r["speedup"] else {})}
                         for b in r["latency"]} for r in report["rows"]}  # fmt: skip
    manifest = json.loads((run / "finetune/manifest.json").read_text())
    return {"fp32_onnx_top1": fp32, "bits": rows, "best_calibrator": best, "drop_w8a8": round(fp32 - rows["w8a8"]["percentile"]["top1"], 2),
            "latency": speed, "finetune_wall_s": manifest["metrics"].get("wall_seconds_this_session"), "env": report["env"]}  # fmt: skip


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
    with LOG.open("a") as f:
        f.write(f"# measurement run, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    result = {"benchmark": "families_int8", "measured_on": "exported ONNX in ONNX Runtime (CPU, 2 threads), all 10k test images",
              "finetune": " ".join(FINETUNE), "models": {arch: measure(arch) for arch in args.archs}}  # fmt: skip
    (RESULTS / "families_int8.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
