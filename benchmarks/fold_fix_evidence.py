"""The same quantized models exported before and after the fix of activation points behind a folded BatchNorm.

Before the fix, the `ort` layout (which folds BatchNorm) planned its activation points after folding, so a
point on a conv's BatchNorm output (a MobileNetV2 linear bottleneck feeding the next block) took the conv's
name: its saved range, its learned step (BRECQ, QDrop, LSQ) and its per-layer width were not found, and
export calibrated it afresh. For each quantized model `recon_evidence.py` left in runs/recon/<key>-*, this
exports it for ONNX Runtime with the code of a revision before the fix (in a git worktree) and with this
checkout, and scores both artifacts on all 10,000 test images, beside the PyTorch simulation's top-1.

    .venv/bin/python benchmarks/fold_fix_evidence.py --key mobilenet_v2_050 --before 6538bc9 --bits w3a3 w4a4 w8a8

Writes benchmarks/results/fold_fix_evidence.{json,log}.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evidence import export_ort, ort_top1, revision, stamp  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
RECON = ROOT / "runs/recon"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True, help="the recon_evidence.py model key, e.g. mobilenet_v2_050")
    parser.add_argument("--before", required=True, help="a revision before the fix")
    parser.add_argument("--bits", nargs="+", required=True)
    args = parser.parse_args()
    log, output = RESULTS / "fold_fix_evidence.log", RESULTS / "fold_fix_evidence.json"
    stamp(log, f"--key {args.key} --before {args.before} --bits {' '.join(args.bits)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], check=True, cwd=ROOT, capture_output=True)
        try:
            for run in sorted(RECON.glob(f"{args.key}-*")):
                for quant in sorted((run / "quant").iterdir()):
                    label = quant.name
                    if not any(label == b or label.startswith(f"{b}-") for b in args.bits):
                        continue
                    simulated = json.loads((quant / "manifest.json").read_text())["metrics"]["simulated_top1"]
                    row = {"model": run.name, "variant": label, "simulated_top1_1000": simulated}
                    for when, checkout in (("before", before), ("after", ROOT)):
                        onnx, _ = export_ort(log, run, label, "symmetric", Path(tmp) / f"out-{when}" / run.name, cwd=checkout)
                        row[when] = ort_top1(onnx)
                    row["after_minus_before"] = round(row["after"] - row["before"], 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with log.open("a") as f:
                        f.write(json.dumps(row) + "\n")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], check=True, cwd=ROOT)
    result = {"benchmark": "fold_fix_evidence", "before": args.before, "after": revision(), "key": args.key,
              "measured_on": "exported QDQ ONNX in ONNX Runtime (CPU), all 10k test images; simulated: PyTorch, 1,000 test images",
              "rows": rows}  # fmt: skip
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
