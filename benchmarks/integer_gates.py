"""SiLU and Hardswish on integers (issue 10): the `ort` export of MobileNetV3-Large and EfficientNet-B0 with and
without `LayoutRules.integer_gates`, side by side.

Before it, ONNX Runtime ran every SiLU, Hardswish and Hardsigmoid of these networks in float between a
DequantizeLinear and a QuantizeLinear, and their INT8 artifacts were slower than FP32
(benchmarks/results/families_int8.json). Each network, at its small-input variant (32x32), is fine-tuned from
random init on all 60,000 Fashion-MNIST training images (1 epoch, batch 128, SGD lr 0.05 cosine, wd 1e-4),
quantized once at w8a8 (percentile calibrator, 1,000 images), and that one artifact is exported twice for ONNX
Runtime (symmetric kernel): "integer gates" is `export` as shipped; "float gates" is the same command with
`integer_gates` switched off in the `ort` layout's rules, which is what the `ort` layout wrote before. For each:
- the export's parity check (status, top-1 agreement with the PyTorch twin on the calibration images, and the
  twin's agreement with itself in float64 where the first is below 99%);
- top-1 of the FP32 ONNX and of both QDQ ONNX models in an ONNX Runtime session on all 10,000 test images;
- the ops ONNX Runtime's optimized graph leaves in float outside the classification head;
- latency of the three, side by side: 2 threads, batch 1 and 32, 10 warm-up runs, then 300 (batch 1) or 60
  (batch 32) timed runs each in 10 rounds rotating over them; speed-ups are medians of per-round ratios against
  FP32 and against "float gates".

    .venv/bin/python benchmarks/integer_gates.py

Writes benchmarks/results/integer_gates.json and .log. Nothing else may run on the machine meanwhile.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from evidence import ort_top1, run_logged, stamp  # noqa: E402

from ssql_deploy.bench.runners import OrtRunner  # noqa: E402
from ssql_deploy.bench.timing import interleaved, paired_speedup  # noqa: E402
from ssql_deploy.export.ort_session import HEAD_WHY, integer_conv_report  # noqa: E402

THREADS = 2
RESULTS = ROOT / "benchmarks/results"
RUNS = ROOT / "runs/gates"
LOG = RESULTS / "integer_gates.log"
ARCHS = ["mobilenet_v3_large", "efficientnet_b0"]
FINETUNE = ["--epochs", "1", "--batch-size", "128", "--lr", "0.05", "--schedule", "cosine", "--weight-decay", "1e-4", "--workers", "1"]
# `ssql-deploy` with the ort layout's integer gates off: the export as it was written before them
FLOAT_GATES = (
    "import dataclasses, sys; from ssql_deploy.quant import layouts; "
    "layouts.LAYOUTS['ort'] = dataclasses.replace(layouts.LAYOUTS['ort'], integer_gates=False); "
    "from ssql_deploy.cli import main; main()"
)


def export(quant: Path, out: Path, float_gates: bool) -> dict:
    """Export w8a8 for ONNX Runtime; a failed parity check is measured all the same, with its status recorded."""
    cmd = ["export", quant, "--bits", "w8a8", "--engine", "ort", "--ort-kernel", "symmetric", "--out", out]
    if not (out / "export/w8a8-ort/manifest.json").is_file():
        try:
            if float_gates:
                with LOG.open("a") as f:
                    f.write("$ (integer_gates off) ssql-deploy " + " ".join(map(str, cmd)) + "\n")
                    f.flush()
                    subprocess.run(
                        [sys.executable, "-c", FLOAT_GATES, *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT
                    )
            else:
                run_logged(LOG, *cmd)
        except subprocess.CalledProcessError:
            pass  # exit 1: a failed check, written down in the manifest read below
    directory = out / "export/w8a8-ort"
    metrics = json.loads((directory / "manifest.json").read_text())["metrics"]
    path = directory / "model.qdq.onnx"
    float_ops = {
        op: info["count"] for op, info in integer_conv_report(onnx.load(str(path)))["float_ops"].items() if info["why"] != HEAD_WHY
    }
    return {"onnx": str(path.relative_to(ROOT)), "export_status": metrics["status"], "parity_agreement": metrics["parity"]["top1_agreement"],
            "parity_self_agreement_float64": metrics["parity"]["self_agreement_float64"],
            "top1": ort_top1(path), "float_ops_outside_head": float_ops}  # fmt: skip


def measure(arch: str) -> tuple[dict, dict[str, Path]]:
    run = RUNS / arch
    if not (run / "finetune/manifest.json").is_file():
        run_logged(
            LOG, "finetune", "--arch", arch, *FINETUNE, "--out", run, *(["--resume"] if (run / "finetune/last.pt").is_file() else [])
        )
    quant = RUNS / f"{arch}-w8a8"
    if not (quant / "quant/w8a8/manifest.json").is_file():
        run_logged(LOG, "quantize", run, "--bits", "w8a8", "--calib", "percentile", "--subset", "1000", "--workers", "1", "--out", quant)
    rows = {"integer gates": export(quant, quant, False), "float gates": export(quant, RUNS / f"{arch}-float-gates", True)}
    fp32 = quant / "export/fp32/model.onnx"
    return {"fp32_onnx_top1": ort_top1(fp32), "exports": rows}, {"fp32": fp32} | {n: ROOT / r["onnx"] for n, r in rows.items()}


def timing(paths: dict[str, Path]) -> dict:
    """p50 latency and paired-round speed-ups against FP32 and against the float-gate export, per batch size."""
    runners = {name: OrtRunner(path, THREADS) for name, path in paths.items()}
    result: dict = {}
    for batch, runs in ((1, 300), (32, 60)):
        m = interleaved({n: r.timer(batch, 32) for n, r in runners.items()}, 10, runs, 10, f"batch {batch}")
        result[str(batch)] = {n: {"p50_ms": m[n].latency(batch).p50_ms, "vs_fp32": paired_speedup("fp32", m["fp32"], m[n]).model_dump(),
                                  "vs_float_gates": paired_speedup("float gates", m["float gates"], m[n]).model_dump()} for n in m}  # fmt: skip
    return result


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp(LOG, "measurement run")
    models, timed = {}, {}
    for arch in ARCHS:  # accuracy first, then every timing, so the timings run in one quiet stretch
        models[arch], timed[arch] = measure(arch)
    stamp(LOG, "timing")
    for arch in ARCHS:
        models[arch]["latency"] = timing(timed[arch])
        for batch, rows in models[arch]["latency"].items():
            with LOG.open("a") as f:
                f.write(
                    f"{arch} batch {batch}: "
                    + ", ".join(f"{n} {r['p50_ms']:.2f} ms ({r['vs_fp32']['ratio']:.2f}x fp32)" for n, r in rows.items())
                    + "\n"
                )
    result = {"benchmark": "integer_gates", "measured_on": "exported ONNX in ONNX Runtime (CPU, 2 threads), all 10k test images",
              "finetune": " ".join(FINETUNE), "models": models}  # fmt: skip
    (RESULTS / "integer_gates.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
