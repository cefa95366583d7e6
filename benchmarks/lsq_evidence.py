"""Evidence for LSQ (issue 5, item 3): LSQ against the best PTQ calibrator, SSQL- vs SimSiam-seeded.

Starts from the pretraining runs of benchmarks/ssql_vs_simsiam.py (runs/evidence/{simsiam,ssql}),
fine-tunes each fully on Fashion-MNIST (2 epochs, all 60k images), then at w4a4, w3a3 and w2a4:
- PTQ with each calibrator (minmax, percentile, mse, entropy), exported for ONNX Runtime;
- LSQ seeded from the best of those calibrators (1 epoch over a fixed 20,000-image subset of the
  training split, lr 0.01 cosine; sized for 2 CPU cores), exported the same way.
Every number is top-1 of the exported QDQ ONNX model in an ONNX Runtime session on all 10,000
test images (the FP32 row is the FP32 ONNX export of the same fine-tuned model).

    .venv/bin/python benchmarks/lsq_evidence.py
    .venv/bin/python benchmarks/lsq_evidence.py --summarize   # only recompute the differences from the JSON

Writes benchmarks/results/lsq_evidence.json and .log.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evidence import EVIDENCE as RUNS  # noqa: E402
from evidence import finetuned_evidence, ort_top1, resummarize, run_logged  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
LOG = RESULTS / "lsq_evidence.log"
BITS = ["w4a4", "w3a3", "w2a4"]
CALIBRATORS = ["minmax", "percentile", "mse", "entropy"]


def cli(*args: str | Path) -> float:
    return run_logged(LOG, *args)


def differences(methods: dict) -> dict:
    """The gaps the README quotes, computed from the measured top-1s: LSQ over the best PTQ calibrator, LSQ under
    FP32, and SSQL minus SimSiam for the best PTQ and for LSQ."""
    out: dict = {"lsq_minus_best_ptq": {}, "fp32_minus_lsq": {}, "ssql_minus_simsiam": {}}
    for method, data in methods.items():
        out["lsq_minus_best_ptq"][method] = {b: round(r["lsq"] - r["best_ptq"], 2) for b, r in data["bits"].items()}
        out["fp32_minus_lsq"][method] = {b: round(data["fp32_onnx_top1"] - r["lsq"], 2) for b, r in data["bits"].items()}
    sim, ssql = methods["simsiam"]["bits"], methods["ssql"]["bits"]
    out["ssql_minus_simsiam"] = {k: {b: round(ssql[b][k] - sim[b][k], 2) for b in BITS} for k in ("best_ptq", "lsq")}
    return out


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    if "--summarize" in sys.argv:
        return resummarize(RESULTS / "lsq_evidence.json", "differences", lambda result: differences(result["methods"]))
    LOG.write_text("")
    result: dict = {
        "benchmark": "lsq_evidence",
        "measured_on": "exported QDQ ONNX in ONNX Runtime (CPU), 10k test images",
        "methods": {},
    }
    for method in ("simsiam", "ssql"):
        run = finetuned_evidence(method, LOG)
        rows: dict = {}
        for bits in BITS:
            ptq = {}
            for calib in CALIBRATORS:
                out = RUNS / f"{method}-{calib}"
                cli("quantize", run, "--bits", bits, "--calib", calib, "--workers", "1", "--out", out)
                cli("export", out, "--bits", bits, "--engine", "ort")
                ptq[calib] = ort_top1(out / f"export/{bits}-ort/model.qdq.onnx")
            best = max(ptq, key=ptq.__getitem__)
            out = RUNS / f"{method}-lsq"
            cli("quantize", run, "--bits", bits, "--calib", best, "--lsq", "--epochs", "1", "--lr", "0.01", "--subset", "20000", "--workers", "1",
                "--out", out)  # fmt: skip
            cli("export", out, "--bits", bits, "--lsq", "--engine", "ort")
            rows[bits] = {"ptq": ptq, "best_ptq_calibrator": best, "best_ptq": ptq[best],
                          "lsq": ort_top1(out / f"export/{bits}-lsq-ort/model.qdq.onnx")}  # fmt: skip
            with LOG.open("a") as f:
                f.write(f"{method} {bits}: {json.dumps(rows[bits])}\n")
        fp32 = ort_top1(RUNS / f"{method}-minmax/export/fp32/model.onnx")  # the fine-tuned model (LSQ moves the weights)
        result["methods"][method] = {"fp32_onnx_top1": fp32, "bits": rows}
    result["differences"] = differences(result["methods"])
    (RESULTS / "lsq_evidence.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'method':8s} {'bits':5s} {'best PTQ (calibrator)':>24s} {'LSQ':>7s}")
    for method, data in result["methods"].items():
        print(f"{method:8s} {'fp32':5s} {data['fp32_onnx_top1']:>24.2f}")
        for bits, row in data["bits"].items():
            print(f"{method:8s} {bits:5s} {row['best_ptq']:>14.2f} ({row['best_ptq_calibrator']:>8s}) {row['lsq']:7.2f}")


if __name__ == "__main__":
    main()
