"""Pretraining cost: step time of SSQL against SimSiam, and images/s of every method, in one run.

Claim checked (issue, cost): SSQL's quantized branch takes its activation ranges from the float
forward the loss needs anyway, so an SSQL step (forward + backward + optimizer step) costs at most
2.1x a SimSiam step: SSQL runs 2 float + 2 quantized passes where SimSiam runs 2 float passes,
and the fake quantization itself must stay a small fraction on top of that doubling.

Setup: CIFAR-stem ResNet-18 at full width, global batch 64, CPU, 2 threads, fixed synthetic inputs,
the reference heads (SimSiam/SSQL: projector 2048-2048-2048, predictor hidden 2048, as in the
reference CIFAR configs; recorded per method in the JSON) and optimizer. Every method is warmed up, then timed steps are interleaved
(one step of each method per round, the order rotating every round) so drifting machine load hits
all methods alike. Run from the repo root on a quiet machine:

    .venv/bin/python benchmarks/pretrain_step_time.py            # full measurement (20 rounds)
    .venv/bin/python benchmarks/pretrain_step_time.py --steps 2  # smoke run: checks the script, not the claim

Writes benchmarks/results/pretrain_step_time.json and prints the rounds and a table (the committed
pretrain_step_time.log is that console output, `> benchmarks/results/pretrain_step_time.log 2>&1`);
exits 1 when a full run measures a ratio above the limit.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ssql_deploy.models import create_model
from ssql_deploy.pretrain.config import METHODS
from ssql_deploy.pretrain.methods import SSLMethod, build_method
from ssql_deploy.recipe import PretrainRecipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
MAX_RATIO = 2.1
SMOKE_BELOW = 5  # fewer timed rounds than this is a smoke run: reported, never judged


class Runner:
    """One method with its own optimizer, stepping on the same fixed inputs every time."""

    def __init__(self, name: str, arch: str, batch: int) -> None:
        recipe = PretrainRecipe(method=name, arch=arch, batch_size=batch)
        torch.manual_seed(0)
        self.method: SSLMethod = build_method(recipe, create_model(arch, 1, "cifar"), torch.device("cpu"))
        self.method.train()
        params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
        self.times: list[float] = []

    def step(self, x1: torch.Tensor, x2: torch.Tensor) -> float:
        start = time.perf_counter()
        loss, _ = self.method(x1, x2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.after_step()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every method each); < 5 is a smoke run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="resnet18", help="resnet18 for the claim; test_resnet to try the script quickly")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; must include ssql and simsiam")
    args = parser.parse_args()
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if not {"ssql", "simsiam"} <= set(names) or not set(names) <= set(METHODS):
        parser.error(f"--methods must include ssql and simsiam and name only: {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)

    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(args.batch_size, 3, 32, 32, generator=generator)
    x2 = torch.randn(args.batch_size, 3, 32, 32, generator=generator)
    runners = {name: Runner(name, args.arch, args.batch_size) for name in names}
    for name, runner in runners.items():
        console.print(f"warming up {name} ({args.warmup} steps)")
        for _ in range(args.warmup):
            runner.step(x1, x2)
    for round_ in range(args.steps):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            runners[name].times.append(runners[name].step(x1, x2))
        console.print(f"round {round_ + 1}/{args.steps}: " + ", ".join(f"{n} {runners[n].times[-1]:.2f}s" for n in names))

    rows = {}
    for name, runner in runners.items():
        median = statistics.median(runner.times)
        rows[name] = {"median_s": round(median, 4), "mean_s": round(statistics.fmean(runner.times), 4),
                      "min_s": round(min(runner.times), 4), "images_per_second": round(args.batch_size / median, 2),
                      "steps": len(runner.times)}  # fmt: skip
    ratio = rows["ssql"]["median_s"] / rows["simsiam"]["median_s"]
    paired = statistics.median(s / f for s, f in zip(runners["ssql"].times, runners["simsiam"].times, strict=True))
    smoke = args.steps < SMOKE_BELOW or args.arch != "resnet18" or args.batch_size != 64 or args.threads != 2
    passed = ratio <= MAX_RATIO
    result = {
        "benchmark": "pretrain_step_time",
        "claim": f"SSQL step time <= {MAX_RATIO} x SimSiam step time (ResNet-18 CIFAR stem, batch 64, CPU, 2 threads)",
        "smoke_run": smoke, "ratio_ssql_over_simsiam": round(ratio, 4), "median_of_paired_ratios": round(paired, 4),
        "max_ratio": MAX_RATIO, "passed": None if smoke else passed,
        "settings": {"arch": args.arch, "batch_size": args.batch_size, "threads": args.threads, "warmup": args.warmup,
                     "rounds": args.steps, "inputs": "fixed synthetic N(0,1), 2 views", "step": "forward + backward + SGD step (+ EMA)",
                     "heads": {n: {k: getattr(PretrainRecipe(method=n), k) for k in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim")}
                               for n in names}},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "methods": rows,
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pretrain_step_time.json").write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"pretraining step time, {args.arch}, batch {args.batch_size}, {args.threads} threads, {args.steps} rounds")
    for col in ("method", "median step (s)", "min (s)", "images/s", "x SimSiam"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for name, row in rows.items():
        table.add_row(name, f"{row['median_s']:.3f}", f"{row['min_s']:.3f}", f"{row['images_per_second']:.1f}",
                      f"{row['median_s'] / rows['simsiam']['median_s']:.2f}")  # fmt: skip
    out = Console()
    out.print(table)
    verdict = "smoke run, not judged" if smoke else ("PASS" if passed else "FAIL")
    out.print(f"SSQL / SimSiam = {ratio:.3f} (median of paired rounds {paired:.3f}), limit {MAX_RATIO}: {verdict}")
    out.print(f"wrote {RESULTS / 'pretrain_step_time.json'}")
    if not smoke and not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
