"""Foundation benchmark: fine-tune from random init on Fashion-MNIST, 1 process vs 2 under torchrun.

Claims checked (issue 2): a width-reduced ResNet-18 fully fine-tuned from random init reaches
>= 90% top-1 on the 10k test set in under 15 minutes on 2 cores, and DDP on 2 processes gives
the same accuracy as 1 process within noise. Run from the repo root:

    .venv/bin/python benchmarks/finetune_fashion_mnist.py [--skip-ddp]

Writes benchmarks/results/finetune_fashion_mnist.json (raw numbers) and .log (raw output).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/finetune/fashion-mnist.yaml"
RESULTS = ROOT / "benchmarks/results"


def run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-ddp", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "finetune_fashion_mnist.log"
    log.write_text("")
    work = Path(tempfile.mkdtemp(prefix="bench-ft-"))
    py = sys.executable
    rows = []
    configs = [("1 process", [py, "-m", "ssql_deploy"])]
    if not args.skip_ddp:
        configs.append(
            (
                "2 processes (torchrun, gloo)",
                [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ssql_deploy"],
            )
        )
    for name, launcher in configs:
        out = work / name.split()[0]
        wall = run([*launcher, "finetune", "--recipe", str(RECIPE), "--out", str(out)], log)
        manifest = json.loads((out / "finetune/manifest.json").read_text())
        epochs = [json.loads(line) for line in (out / "finetune/metrics.jsonl").read_text().splitlines()]
        rows.append({
            "config": name, "wall_seconds": round(wall, 1), "top1": manifest["metrics"]["top1"],
            "best_top1": manifest["metrics"]["best_top1"], "n_test_images": manifest["metrics"]["n_test_images"],
            "per_epoch_test_top1": [round(e["test_top1"], 2) for e in epochs],
        })  # fmt: skip
    settings = json.loads((work / "1/finetune/manifest.json").read_text())["settings"]
    result = {
        "benchmark": "finetune_fashion_mnist",
        "recipe": str(RECIPE.relative_to(ROOT)),
        "arch": settings["arch"], "epochs": settings["epochs"], "batch_size": settings["batch_size"],
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "rows": rows,
    }  # fmt: skip
    (RESULTS / "finetune_fashion_mnist.json").write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"{row['config']:32s} top-1 {row['top1']:.2f}%  wall {row['wall_seconds'] / 60:.1f} min")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
