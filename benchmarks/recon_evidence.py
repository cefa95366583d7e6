"""Low-bit PTQ that holds (issue 11, item 5): rounding calibrators, AdaRound, BRECQ, QDrop and LSQ side by side.

Starts from the fine-tuned models of benchmarks/families_int8.py (runs/families/<arch>: 3 epochs on
all of Fashion-MNIST at 32x32). At each bit pair:
- PTQ with each rounding calibrator (minmax, percentile, mse, entropy);
- AdaRound, BRECQ and QDrop (`--reconstruct`, `--iters` steps per unit at the tool's rounding learning rate, 1,024
  unlabelled calibration images) after the mse calibrator;
- LSQ (1 epoch over all 60,000 training images, batch 128, lr 0.01 cosine) seeded from the best
  calibrator: the quantization-aware training every reconstruction is measured against, in accuracy
  and in time.
Every top-1 is the exported QDQ ONNX model (`ort` layout) in an ONNX Runtime session on all 10,000
test images; every wall time is the `ssql-deploy quantize` command that produced the model (2 cores,
nothing else running), calibration and scoring the simulation included.

    .venv/bin/python benchmarks/recon_evidence.py [--archs resnet18_quarter mobilenet_v2] [--bits w4a4 ...] [--iters 250]
    .venv/bin/python benchmarks/recon_evidence.py --summarize   # only recompute the differences from the JSON

Writes benchmarks/results/recon_evidence.json and .log. Each method's result is written as soon as it is measured,
into what the JSON holds already, so the benchmark can be run a model or a bit pair at a time and a run stopped
part-way keeps what it measured. Each model records the --iters its reconstructions ran (all its bit pairs share it),
and each reconstruction the learning rate its manifest reports.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evidence import ort_top1, resummarize, run_logged  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
RUNS = ROOT / "runs/families"
OUT = ROOT / "runs/recon"
LOG = RESULTS / "recon_evidence.log"
CALIBRATORS = ["minmax", "percentile", "mse", "entropy"]
METHODS = ["adaround", "brecq", "qdrop"]


def cli(*args: str | Path) -> float:
    return run_logged(LOG, *args)


def quantized(run: Path, out: Path, bits: str, name: str, *extra: str) -> dict:
    """PTQ and reconstruction score their simulation on 1,000 test images; LSQ trains on the whole training split and picks
    its best epoch on the whole test split, as the tool does."""
    subset = [] if "--lsq" in extra else ["--subset", "1000"]
    seconds = cli("quantize", run, "--bits", bits, *subset, "--workers", "1", "--out", out, *extra)
    cli("export", out, "--bits", name, "--engine", "ort", "--ort-kernel", "symmetric")
    row = {"top1": ort_top1(out / f"export/{name}-ort/model.qdq.onnx"), "seconds": seconds}
    recon = json.loads((out / f"quant/{name}/manifest.json").read_text())["metrics"].get("reconstruction")
    return row | ({"rounding_lr": recon["rounding_lr"]} if recon else {})


def differences(result: dict) -> dict:
    """Per model and bit pair, what the goals are judged on: FP32 minus each method measured (the best calibrator
    too) and, once LSQ is measured, LSQ's top-1 minus each method's and each method's wall time over LSQ's."""
    out: dict = {}
    for arch, model in result["models"].items():
        for bits, row in model["bits"].items():
            methods = {"best_calibrator": row["calibrators"][row["best_calibrator"]], **{m: row[m] for m in METHODS if m in row}}
            entry = out.setdefault(arch, {})[bits] = {"fp32_minus": {m: round(model["fp32_onnx_top1"] - r["top1"], 2)
                                                                      for m, r in (methods | {"lsq": row.get("lsq")}).items() if r}}  # fmt: skip
            if "lsq" in row:
                entry["lsq_minus"] = {m: round(row["lsq"]["top1"] - r["top1"], 2) for m, r in methods.items()}
                entry["seconds_over_lsq"] = {m: round(r["seconds"] / row["lsq"]["seconds"], 3) for m, r in methods.items()}
    return out


def measure(arch: str, bits_list: list[str], iters: int, result: dict) -> None:
    """Measure `arch` at each bit pair into `result`, saving the JSON after each method: a run that fails or is stopped
    part-way keeps what it measured."""
    run = RUNS / arch
    if not (run / "finetune/manifest.json").is_file():
        raise SystemExit(f"{run} is not fine-tuned: run benchmarks/families_int8.py --train-only first")
    model = result["models"].setdefault(arch, {"iters": iters, "bits": {}})
    if model["iters"] != iters:
        raise SystemExit(f"{arch} was measured with --iters {model['iters']}: pass the same, or delete its entry to start it over")

    def save() -> None:
        result["differences"] = differences(result)
        (RESULTS / "recon_evidence.json").write_text(json.dumps(result, indent=2) + "\n")

    for bits in bits_list:
        row: dict = {"calibrators": {c: quantized(run, OUT / f"{arch}-{c}", bits, bits, "--calib", c) for c in CALIBRATORS}}
        row["best_calibrator"] = best = max(CALIBRATORS, key=lambda c: row["calibrators"][c]["top1"])
        model["bits"][bits] = row
        if "fp32_onnx_top1" not in model:  # the same fine-tuned model at every bit pair: scored once
            model["fp32_onnx_top1"] = ort_top1(OUT / f"{arch}-minmax/export/fp32/model.onnx")
        save()
        for method in METHODS:
            row[method] = quantized(run, OUT / f"{arch}-{method}", bits, f"{bits}-{method}", "--calib", "mse", "--reconstruct", method,
                                    "--iters", str(iters))  # fmt: skip
            save()
        row["lsq"] = quantized(run, OUT / f"{arch}-lsq", bits, f"{bits}-lsq", "--calib", best, "--lsq", "--epochs", "1", "--lr", "0.01",
                               "--batch-size", "128")  # fmt: skip
        save()
        with LOG.open("a") as f:
            f.write(f"{arch} {bits}: {json.dumps(row)}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", nargs="*", default=["resnet18_quarter", "mobilenet_v2"])
    parser.add_argument("--bits", nargs="*", default=["w4a8", "w4a4", "w3a3", "w2a4"])
    parser.add_argument("--iters", type=int, default=250)
    parser.add_argument("--summarize", action="store_true", help="only recompute the differences in the existing JSON")
    args = parser.parse_args()
    if args.summarize:
        return resummarize(RESULTS / "recon_evidence.json", "differences", differences)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv[1:])}\n")
    path = RESULTS / "recon_evidence.json"
    result = json.loads(path.read_text()) if path.is_file() else {"benchmark": "recon_evidence", "models": {},
                                                                  "measured_on": "exported QDQ ONNX in ONNX Runtime (CPU), all 10k test images"}  # fmt: skip
    for arch in args.archs:
        measure(arch, args.bits, args.iters, result)


if __name__ == "__main__":
    main()
