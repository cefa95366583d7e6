"""Mixed precision against uniform widths at the same average, and accuracy control (issue 12, item 6).

For each fine-tuned model of `benchmarks/families_int8.py` (MobileNetV2 and the quarter-width
ResNet-18, 32x32, trained from random init on all 60,000 Fashion-MNIST training images):
- `analyze` (loss metric, widths 2,3,4,6,8, 512 validation images apart from the calibration ones);
- uniform w4a8, w4a4 and w3a3, and `--bits auto` at the same averages (avg-wbits=4 with activations
  free; avg-wbits=4,avg-abits=4; avg-wbits=3,avg-abits=3), all with the mse calibrator, exported for
  ONNX Runtime; top-1 of each exported QDQ ONNX model on all 10,000 test images;
- `--max-drop 0.5` from w4a4: reached or not, layers given back, each step's latency;
- analysis and planning cost in seconds.

With `--pretrained`, the same for the SimSiam- and the SSQL-pretrained quarter-width ResNet-18 of
benchmarks/ssql_vs_simsiam.py (each fully fine-tuned as benchmarks/lsq_evidence.py does), or with
`--arch mobilenet_v2_050` the MobileNetV2s of `recon_evidence.py --pretrained` (pretrained here, at
the same recipes, where runs/ lacks them; an interrupted pretraining resumes), and then each model's
plans applied to the other (`quantize --config`): the two pretrainings under one plan.

    .venv/bin/python benchmarks/mixed_precision.py     # needs runs/families/<arch> (families_int8.py --train-only)
    .venv/bin/python benchmarks/mixed_precision.py --pretrained [--arch A]   # the ResNet needs those pretrained backbones
    .venv/bin/python benchmarks/mixed_precision.py --pretrained --summarize   # only recompute the differences from the JSON

Writes benchmarks/results/mixed_precision.{json,log} (mixed_pretraining.{json,log} with --pretrained,
mixed_pretraining_<arch>.{json,log} with another --arch). Nothing else may run on the machine meanwhile.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evidence import EVIDENCE_ARCH, finetuned_evidence, ort_top1, pretrained_evidence, resummarize, run_logged  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
RUNS = ROOT / "runs/mixed"
ARCHS = ["mobilenet_v2", "resnet18_quarter"]
PRETRAININGS = ["simsiam", "ssql"]
CALIB = ["--calib", "mse", "--subset", "1000", "--workers", "1"]
PAIRS = [  # (uniform, the mixed budget at the same averages)
    ("w4a8", "avg-wbits=4"),
    ("w4a4", "avg-wbits=4,avg-abits=4"),
    ("w3a3", "avg-wbits=3,avg-abits=3"),
]


def exported_top1(run: Path, variant: str, log: Path) -> float:
    run_logged(log, "export", run, "--bits", variant, "--engine", "ort", "--ort-kernel", "symmetric")
    return ort_top1(run / "export" / f"{variant}-ort" / "model.qdq.onnx")


def newest_variant(run: Path, before: set[str]) -> str:
    (made,) = {p.name for p in (run / "quant").iterdir() if p.is_dir()} - before
    return made


def measure(run: Path, log: Path) -> dict:
    cli = lambda *args: run_logged(log, *args)  # noqa: E731
    if not (run / "analyze/sensitivity.json").is_file():  # an analysis done by an earlier run is reused, with its own timing
        cli("analyze", run, "--bits", "2,3,4,6,8", "--metric", "loss", "--calib", "mse", "--workers", "1")
    sensitivity = json.loads((run / "analyze/sensitivity.json").read_text())
    rows = []
    for uniform, budget in PAIRS:
        cli("quantize", run, "--bits", uniform, *CALIB)
        before = {p.name for p in (run / "quant").iterdir()}
        seconds = cli("quantize", run, "--bits", "auto", "--budget", budget, *CALIB)
        mixed = newest_variant(run, before)
        plan = json.loads((run / "quant" / mixed / "manifest.json").read_text())["metrics"]["auto_bits"]
        rows.append({"uniform": uniform, "uniform_top1": exported_top1(run, uniform, log), "budget": budget, "mixed": mixed,
                     "mixed_top1": exported_top1(run, mixed, log), "plan": plan, "quantize_s": seconds})  # fmt: skip
        rows[-1]["mixed_minus_uniform"] = round(rows[-1]["mixed_top1"] - rows[-1]["uniform_top1"], 2)
    before = {p.name for p in (run / "quant").iterdir()}
    control_s = cli("quantize", run, "--bits", "w4a4", "--max-drop", "0.5", *CALIB)
    controlled = newest_variant(run, before) if {p.name for p in (run / "quant").iterdir()} - before else "w4a4"
    report = json.loads((run / "quant" / controlled / "manifest.json").read_text())["metrics"]["accuracy_control"]
    return {"analysis_s": sensitivity["seconds"], "evaluations": sensitivity["evaluations"], "pairs": rows,
            "max_drop": report | {"variant": controlled, "seconds": control_s, "test_top1": exported_top1(run, controlled, log)}}  # fmt: skip


def fine_tuned_copy(source: Path, name: str) -> Path:
    """A run of its own under runs/mixed holding only `source`'s fine-tuned model, so analyses and plans stay apart."""
    run = RUNS / name
    if not run.exists():
        shutil.copytree(source / "finetune", run / "finetune")
    return run


def same_plans(runs: dict[str, Path], models: dict[str, dict], log: Path) -> list[dict]:
    """Every model's plan at every budget applied to every other model too: the pretrainings compared under one plan."""
    rows = []
    for i, (_, budget) in enumerate(PAIRS):
        for owner in runs:
            plan = models[owner]["pairs"][i]["mixed"]
            row = {"budget": budget, "plan_of": owner, "plan": plan, owner: models[owner]["pairs"][i]["mixed_top1"]}
            for name, run in runs.items():
                if name != owner:
                    run_logged(log, "quantize", run, "--config", runs[owner] / "quant" / plan / "config.json", *CALIB)
                    row[name] = exported_top1(run, plan, log)
            rows.append(row)
    return rows


def differences(result: dict) -> dict:
    """SSQL minus SimSiam, the gaps the README quotes: at FP32, at each uniform width, and under each shared plan."""
    sim, ssql = result["models"]["simsiam"], result["models"]["ssql"]
    return {
        "fp32": round(ssql["fp32_onnx_top1"] - sim["fp32_onnx_top1"], 2),
        "uniform": {a["uniform"]: round(b["uniform_top1"] - a["uniform_top1"], 2) for a, b in zip(sim["pairs"], ssql["pairs"], strict=True)},
        "same_plan": [{"budget": r["budget"], "plan_of": r["plan_of"], "ssql_minus_simsiam": round(r["ssql"] - r["simsiam"], 2)}
                      for r in result["same_plan"]],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", action="store_true", help="SSQL against SimSiam backbones, not the families' models")
    parser.add_argument("--arch", default=EVIDENCE_ARCH, help=f"the pretrained backbone (with --pretrained; default {EVIDENCE_ARCH})")
    parser.add_argument("--summarize", action="store_true", help="only recompute the differences in the existing JSON")
    args = parser.parse_args()
    if args.arch != EVIDENCE_ARCH and not args.pretrained:
        parser.error("--arch chooses a pretrained backbone: pass it with --pretrained")
    name = "mixed_precision" if not args.pretrained else "mixed_pretraining" + ("" if args.arch == EVIDENCE_ARCH else f"_{args.arch}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        if not args.pretrained:
            parser.error("--summarize recomputes the SSQL-against-SimSiam differences: pass it with --pretrained")
        return resummarize(RESULTS / f"{name}.json", "ssql_minus_simsiam", differences)
    log = RESULTS / f"{name}.log"
    pretrain_seconds: dict[str, float] = {}
    if args.pretrained:
        if args.arch != EVIDENCE_ARCH:  # pretrained here as recon_evidence.py --pretrained does, resuming across sessions
            pretrain_seconds = {m: pretrained_evidence(m, log, args.arch) for m in PRETRAININGS}
        runs = {m: fine_tuned_copy(finetuned_evidence(m, log, args.arch), f"{args.arch}-{m}") for m in PRETRAININGS}
    else:
        runs = {arch: fine_tuned_copy(ROOT / "runs/families" / arch, arch) for arch in ARCHS}
    result: dict = {"benchmark": name, "measured_on": "exported ONNX in ONNX Runtime (CPU, 2 threads), all 10k test images",
                    "models": {key: measure(run, log) for key, run in runs.items()}}  # fmt: skip
    if args.pretrained:
        for key, run in runs.items():
            result["models"][key]["fp32_onnx_top1"] = ort_top1(run / "export/fp32/model.onnx")
            if key in pretrain_seconds:
                result["models"][key]["pretrain_seconds"] = pretrain_seconds[key]
        result["same_plan"] = same_plans(runs, result["models"], log)
        result["ssql_minus_simsiam"] = differences(result)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
