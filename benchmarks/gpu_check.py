"""The GPU half of `benchmarks/gpu_check.sh` (run that, which installs TensorRT first): engines built, benched, gated.

For ResNet-18 and MobileNetV2 (32x32, fine-tuned on the spot on all 60,000 Fashion-MNIST training
images, 2 epochs on the GPU): w8a8 PTQ (percentile), export `--engine trt` (the INT8 plan, and the
FP16 plan of the FP32 ONNX it is compared with), bench at batch 1 and 32 (top-1 on all 10,000 test
images; TensorRT latency on device-resident buffers, interleaved rounds), then the gates: INT8 top-1
within 1 point of FP16, INT8 faster than FP16 at batch 32, and `debug` reading from the plan that every
convolution of the Q/DQ graph runs INT8 in the engine (the engine inspector's layer precisions). Each step's `trtexec` line is in the
export manifest for the TensorRT version found (10: weakly typed `--int8 --fp16`; 11: strongly typed).
Writes benchmarks/results/gpu_check.{json,log}; finished runs are reused (idempotent).
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evidence import run_logged  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
LOG = RESULTS / "gpu_check.log"
RUNS = ROOT / "runs/gpu_check"
ARCHS = ["resnet18", "mobilenet_v2"]
GATES = ["--max-drop", "w8a8=1.0", "--min-speedup", "trt-w8a8@32=1.0"]


def require_gpu() -> None:
    try:
        import tensorrt
        import torch
    except ImportError as exc:
        sys.exit(f"gpu_check: error: {exc.name} is not installed; run benchmarks/gpu_check.sh, which installs it")
    if not torch.cuda.is_available():
        sys.exit("gpu_check: error: torch sees no CUDA GPU; run this on a machine with one (benchmarks/gpu_check.sh)")
    print(f"TensorRT {tensorrt.__version__} on {torch.cuda.get_device_name(0)}")


def check(arch: str) -> dict:
    run = RUNS / arch
    cli = lambda *args: run_logged(LOG, *args)  # noqa: E731
    if not (run / "finetune/manifest.json").is_file():
        cli("finetune", "--arch", arch, "--epochs", "2", "--batch-size", "256", "--lr", "0.05", "--schedule", "cosine", "--out", run)
    cli("quantize", run, "--bits", "w8a8", "--calib", "percentile", "--subset", "1000")
    cli("export", run, "--bits", "w8a8", "--engine", "trt", "--trt-batches", "1,8,32")
    cli("bench", run, "--batch-sizes", "1,32", "--out", run / "bench")
    report = json.loads((run / "bench/report.json").read_text())
    gate = [sys.executable, "-m", "ssql_deploy", "gate", str(run / "bench/report.json"), *GATES]
    verdict = subprocess.run(gate, capture_output=True, text=True, cwd=ROOT)
    with LOG.open("a") as f:
        f.write("$ " + " ".join(gate) + "\n" + verdict.stdout + verdict.stderr)
    export = json.loads((run / "export/w8a8-trt/manifest.json").read_text())["metrics"]
    cli("debug", run / "export/w8a8-trt", "--images", "256")
    debug = json.loads((run / "export/w8a8-trt/debug/debug.json").read_text())
    engine = debug["tensorrt"]
    layers = engine["summary"] if engine and engine["inspected"] else {"not_read": engine and engine["why"]}
    # every convolution of the Q/DQ graph (all quantized at w8a8) is an INT8 engine layer; the float head may be another
    every_conv_int8 = layers.get("int8_convolutions", 0) >= debug["convs"] > 0
    return {"rows": {r["name"]: {k: r.get(k) for k in ("top1", "latency", "speedup", "status", "runtime_detail")} for r in report["rows"]},
            "engine_build": export.get("engine_build"), "engine_layers": layers, "every_conv_int8": every_conv_int8,
            "gates_passed": verdict.returncode == 0 and every_conv_int8}  # fmt: skip


def main() -> None:
    require_gpu()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "gpu_check", "models": {arch: check(arch) for arch in ARCHS}}
    (RESULTS / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    failed = [arch for arch, r in result["models"].items() if not r["gates_passed"]]
    sys.exit(f"gpu_check: gates failed for {', '.join(failed)} (see {LOG})" if failed else 0)


if __name__ == "__main__":
    main()
