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

With `--pretrained`, the same calibrators and reconstructions (no LSQ) from a SimSiam- and an SSQL-pretrained
backbone of each arch, fully fine-tuned (benchmarks/evidence.py: the recipes' budget for both methods, then 2 epochs
on all of Fashion-MNIST): the quarter-width ResNet-18 of benchmarks/ssql_vs_simsiam.py and a MobileNetV2 at width
0.5, pretrained here if it is not already. The question is whether SSQL's advantage at low widths appears on a
fine-tuned model, and whether it survives reconstruction.

    .venv/bin/python benchmarks/recon_evidence.py [--archs resnet18_quarter mobilenet_v2] [--bits w4a4 ...] [--iters 250]
    .venv/bin/python benchmarks/recon_evidence.py --pretrained [--archs resnet18_quarter mobilenet_v2_050] [--bits ...]
    .venv/bin/python benchmarks/recon_evidence.py [--pretrained] --summarize   # only recompute the differences

Writes benchmarks/results/recon_evidence.{json,log} (recon_pretraining.{json,log} with --pretrained). Each method's
result is written as soon as it is measured, into what the JSON holds already, so the benchmark can be run a model or
a bit pair at a time and a run stopped part-way keeps what it measured; a bit pair measured in full is kept, not
measured again. Each model records the --iters its reconstructions ran (all its bit pairs share it), and each
reconstruction the learning rate its manifest reports.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evidence import finetuned_evidence, ort_top1, pretrained_evidence, resummarize, revision, run_logged  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
RUNS = ROOT / "runs/families"
OUT = ROOT / "runs/recon"
CALIBRATORS = ["minmax", "percentile", "mse", "entropy"]
METHODS = ["adaround", "brecq", "qdrop"]
PRETRAININGS = ["simsiam", "ssql"]


def quantized(log: Path, run: Path, out: Path, bits: str, name: str, *extra: str) -> dict:
    """PTQ and reconstruction score their simulation on 1,000 test images; LSQ trains on the whole training split and picks
    its best epoch on the whole test split, as the tool does."""
    subset = [] if "--lsq" in extra else ["--subset", "1000"]
    seconds = run_logged(log, "quantize", run, "--bits", bits, *subset, "--workers", "1", "--out", out, *extra)
    run_logged(log, "export", out, "--bits", name, "--engine", "ort", "--ort-kernel", "symmetric")
    row = {"top1": ort_top1(out / f"export/{name}-ort/model.qdq.onnx"), "seconds": seconds}
    recon = json.loads((out / f"quant/{name}/manifest.json").read_text())["metrics"].get("reconstruction")
    return row | ({"rounding_lr": recon["rounding_lr"]} if recon else {})


def _measured(row: dict) -> dict:
    """The best calibrator's row and each reconstruction's measured so far, by name."""
    return {"best_calibrator": row["calibrators"][row["best_calibrator"]], **{m: row[m] for m in METHODS if m in row}}


def differences(result: dict) -> dict:
    """Per model and bit pair, what the goals are judged on: FP32 minus each method measured (the best calibrator
    too) and, once LSQ is measured, LSQ's top-1 minus each method's and each method's wall time over LSQ's."""
    out: dict = {}
    for key, model in result["models"].items():
        for bits, row in model["bits"].items():
            methods = _measured(row)
            entry = out.setdefault(key, {})[bits] = {"fp32_minus": {m: round(model["fp32_onnx_top1"] - r["top1"], 2)
                                                                     for m, r in (methods | {"lsq": row.get("lsq")}).items() if r}}  # fmt: skip
            if "lsq" in row:
                entry["lsq_minus"] = {m: round(row["lsq"]["top1"] - r["top1"], 2) for m, r in methods.items()}
                entry["seconds_over_lsq"] = {m: round(r["seconds"] / row["lsq"]["seconds"], 3) for m, r in methods.items()}
    return out


def pretraining_differences(result: dict) -> dict:
    """Per arch, SSQL's FP32 top-1 minus SimSiam's and, per bit pair, the same for each method both were measured with
    (the advantage, and whether it survives reconstruction); and each method's gain over its own best calibrator."""
    out: dict = {"ssql_minus_simsiam": {}, "over_best_calibrator": {}}
    for key, model in result["models"].items():
        arch, method = key.rsplit("-", 1)
        simsiam = result["models"].get(f"{arch}-simsiam")
        for bits, row in model["bits"].items():
            best = row["calibrators"][row["best_calibrator"]]["top1"]
            out["over_best_calibrator"].setdefault(key, {})[bits] = {m: round(row[m]["top1"] - best, 2) for m in METHODS if m in row}
            if method == "ssql" and simsiam and bits in simsiam["bits"]:
                fp32 = round(model["fp32_onnx_top1"] - simsiam["fp32_onnx_top1"], 2)
                mine, theirs = _measured(row), _measured(simsiam["bits"][bits])
                gaps = out["ssql_minus_simsiam"].setdefault(arch, {"fp32": fp32})
                gaps[bits] = {m: round(mine[m]["top1"] - theirs[m]["top1"], 2) for m in mine if m in theirs}
    return out


def measure(key: str, run: Path, bits_list: list[str], iters: int, result: dict, output: Path, log: Path, lsq: bool) -> None:
    """Measure the fine-tuned `run` at each bit pair into `result` under `key`, saving `output` after each method: a run
    that fails or is stopped part-way keeps what it measured."""
    model = result["models"].setdefault(key, {"iters": iters, "bits": {}})
    if model["iters"] != iters:
        raise SystemExit(f"{key} was measured with --iters {model['iters']}: pass the same, or delete its entry to start it over")
    summarize = differences if lsq else pretraining_differences

    def save() -> None:
        result["differences"] = summarize(result)
        output.write_text(json.dumps(result, indent=2) + "\n")

    checked = False
    for bits in bits_list:
        if set(METHODS + (["lsq"] if lsq else [])) <= set(model["bits"].get(bits, {})):
            print(f"{key} {bits}: measured already, kept (delete it from {output.name} to measure it again)")
            continue
        row: dict = {"calibrators": {c: quantized(log, run, OUT / f"{key}-{c}", bits, bits, "--calib", c) for c in CALIBRATORS}}
        row["best_calibrator"] = best = max(CALIBRATORS, key=lambda c: row["calibrators"][c]["top1"])
        model["bits"][bits] = row
        if not checked:  # once a run: rows of two fine-tunes (CPU training is not bit-identical across sessions) must not mix
            fp32 = ort_top1(OUT / f"{key}-minmax/export/fp32/model.onnx")
            if model.setdefault("fp32_onnx_top1", fp32) != fp32:
                raise SystemExit(f"{run} scores {fp32} in FP32, not the {model['fp32_onnx_top1']} its rows in {output.name} were "
                                 f"measured on: it was fine-tuned again; delete {key} from {output.name} to measure it afresh")  # fmt: skip
            checked = True
        save()
        for method in METHODS:
            row[method] = quantized(log, run, OUT / f"{key}-{method}", bits, f"{bits}-{method}", "--calib", "mse", "--reconstruct", method,
                                    "--iters", str(iters))  # fmt: skip
            save()
        if lsq:
            row["lsq"] = quantized(log, run, OUT / f"{key}-lsq", bits, f"{bits}-lsq", "--calib", best, "--lsq", "--epochs", "1", "--lr", "0.01",
                                   "--batch-size", "128")  # fmt: skip
            save()
        with log.open("a") as f:
            f.write(f"{key} {bits}: {json.dumps(row)}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", action="store_true", help="from SimSiam- and SSQL-pretrained backbones, without LSQ")
    parser.add_argument("--archs", nargs="*", help="default: resnet18_quarter mobilenet_v2 (mobilenet_v2_050 with --pretrained)")
    parser.add_argument("--bits", nargs="*", help="default: w4a8 w4a4 w3a3 w2a4 (w4a4 w3a3 w2a4 with --pretrained)")
    parser.add_argument("--iters", type=int, default=250)
    parser.add_argument("--summarize", action="store_true", help="only recompute the differences in the existing JSON")
    args = parser.parse_args()
    name = "recon_pretraining" if args.pretrained else "recon_evidence"
    output, log = RESULTS / f"{name}.json", RESULTS / f"{name}.log"
    if args.summarize:
        return resummarize(output, "differences", pretraining_differences if args.pretrained else differences)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} at {revision()}: {' '.join(sys.argv[1:])}\n")
    result = json.loads(output.read_text()) if output.is_file() else {"benchmark": name, "models": {},
                                                                      "measured_on": "exported QDQ ONNX in ONNX Runtime (CPU), all 10k test images"}  # fmt: skip
    if args.pretrained:
        for arch in args.archs or ["resnet18_quarter", "mobilenet_v2_050"]:
            for method in PRETRAININGS:
                key = f"{arch}-{method}"
                wall = pretrained_evidence(method, log, arch)
                result["models"].setdefault(key, {"iters": args.iters, "bits": {}})["pretrain_seconds"] = wall
                run = finetuned_evidence(method, log, arch)
                measure(key, run, args.bits or ["w4a4", "w3a3", "w2a4"], args.iters, result, output, log, lsq=False)
        return
    for arch in args.archs or ["resnet18_quarter", "mobilenet_v2"]:
        if not (RUNS / arch / "finetune/manifest.json").is_file():
            raise SystemExit(f"{RUNS / arch} is not fine-tuned: run benchmarks/families_int8.py --train-only first")
        measure(arch, RUNS / arch, args.bits or ["w4a8", "w4a4", "w3a3", "w2a4"], args.iters, result, output, log, lsq=True)


if __name__ == "__main__":
    main()
