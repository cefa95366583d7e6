"""`ssql-deploy bench`, `gate` and `run`: measure artifacts, judge the measurements, or do the whole chain."""

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ssql_deploy.cli.app import user_errors
from ssql_deploy.cli.options import RecipeOpt, SubsetOpt, WorkersOpt, int_list, recipe_option, stage_data_option, stage_root_option
from ssql_deploy.progress import results
from ssql_deploy.recipe import BenchRecipe

B = BenchRecipe
Repeatable = list[str] | None


@user_errors("no report was written (an earlier report in --out, if any, is unchanged)")
def bench_cmd(
    artifacts: Annotated[list[Path], typer.Argument(help="Run directories, .onnx, .plan or .pt files to measure.")],
    data: Annotated[str | None, stage_data_option(B)] = None,
    data_root: Annotated[Path | None, stage_root_option(B)] = None,
    input_size: Annotated[int | None, recipe_option(B, "input_size", "Prepare the data at this size.", default="each model's")] = None,
    batch_sizes: Annotated[str | None, recipe_option(B, "batch_sizes", "Comma-separated batch sizes to time.")] = None,
    runs: Annotated[int | None, recipe_option(B, "runs", "Timed runs per artifact and batch size (at least 50).")] = None,
    rounds: Annotated[int | None, recipe_option(B, "rounds", "Interleaved rounds the timed runs are split into (speed-ups are paired per round).")] = None,
    warmup: Annotated[int | None, recipe_option(B, "warmup", "Untimed warm-up runs.")] = None,
    threads: Annotated[int | None, recipe_option(B, "threads", "Threads for every runtime.", default="all cores")] = None,
    evalset: Annotated[Path | None, recipe_option(B, "evalset", "An evalset.npz written by `export --evalset`: score and time "
                       "ONNX files on it with nothing but the runtime installed (no torch).", default="none")] = None,
    runtime: Annotated[str | None, recipe_option(B, "runtimes", "Comma-separated runtimes every ONNX file runs on: ort (ONNX Runtime), "
                       "openvino (needs the openvino extra).", flag="--runtime")] = None,
    device: Annotated[str | None, recipe_option(B, "device", "OpenVINO device for the openvino rows (CPU, GPU, NPU, AUTO: "
                      "any OpenVINO lists).")] = None,
    subset: SubsetOpt = None,
    workers: WorkersOpt = None,
    out: Annotated[Path | None, recipe_option(B, "out", "Directory for report.json/.md/.png.")] = None,
    recipe: RecipeOpt = None,
) -> None:  # fmt: skip
    """Measure top-1 on the test split and latency of each artifact; write report.json/.md/.png."""
    settings = BenchRecipe.build(recipe, artifacts=artifacts, data=data, data_root=data_root, input_size=input_size,
                                 batch_sizes=int_list(batch_sizes, "--batch-sizes", "1,32"), runs=runs, rounds=rounds,
                                 warmup=warmup, threads=threads, subset=subset, workers=workers, out=out,
                                 runtimes=runtime.split(",") if runtime else None, evalset=evalset, device=device)  # fmt: skip
    if settings.evalset is not None:  # on a board: nothing but the runtime and numpy
        from ssql_deploy.bench.evalset import run_evalset_bench

        print_report(run_evalset_bench(settings))
        return
    from ssql_deploy.bench.stage import run_bench

    print_report(run_bench(settings))


def print_report(bench: dict[str, Any], title: str = "bench", gates: list[Any] | None = None) -> bool:
    """The table, its notes, the gates if any, then where the report and plot are; False if a gate failed."""
    from ssql_deploy.bench.report import notes, rich_table

    results.print(rich_table(bench["report"], title=title))
    for note in notes(bench["report"]):
        results.print(f"note: {note}", highlight=False)
    passed = print_gates(gates) if gates else True
    results.print(f"report: {bench['paths']['md']}" + (f"\nplot:   {bench['paths']['png']}" if "png" in bench["paths"] else ""))
    return passed


def print_gates(gates: list[Any]) -> bool:
    table = Table(title="gates")
    for col in ("gate", "result", "measured"):
        table.add_column(col)
    for g in gates:
        verdict = "[yellow]skip[/]" if g.passed is None else "[green]pass[/]" if g.passed else "[red]FAIL[/]"
        table.add_row(g.gate, verdict, g.detail)
    results.print(table)
    return all(g.passed is not False for g in gates)


@user_errors("no verdict")
def gate_cmd(
    report: Annotated[Path, typer.Argument(help="report.json written by `ssql-deploy bench`.")],
    min_top1: Annotated[Repeatable, typer.Option("--min-top1", help="NAME=PERCENT: that row's top-1 is at least PERCENT. Repeatable.")] = None,
    max_drop: Annotated[Repeatable, typer.Option("--max-drop", help="BITS=POINTS: every BITS row loses at most POINTS against "
                                                 "the FP32 row of its runtime. Repeatable.")] = None,
    max_latency_ms: Annotated[Repeatable, typer.Option("--max-latency-ms", help="NAME@BATCH=MS: p50 latency at most MS. Repeatable.")] = None,
    min_speedup: Annotated[Repeatable, typer.Option("--min-speedup", help="NAME@BATCH=X: at least X times as fast as the FP32 row of its "
                                                    "runtime, from paired rounds (TensorRT: the FP16 engine). Repeatable.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Rows that could not run here (skipped) fail their gates instead of skipping.")] = False,
) -> None:  # fmt: skip
    """Check a bench report against thresholds: exit 0 when every gate passes, 1 otherwise."""
    from ssql_deploy.bench.gate import evaluate_gates, parse_gates
    from ssql_deploy.bench.schema import load_report

    gates = parse_gates(min_top1 or [], max_drop or [], max_latency_ms or [], min_speedup or [])
    if not print_gates(evaluate_gates(load_report(report), gates, strict)):
        raise typer.Exit(1)


@user_errors("finished stages are kept and an interrupted training resumes: run the same command again")
def run_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline recipe, e.g. recipes/pipelines/quickstart.yaml.")],
    out: Annotated[Path | None, typer.Option("--out", help="Run directory. [default: the recipe's out]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo a finished or interrupted training stage whose settings "
                                        "differ from the recipe (instead of refusing).")] = False,
) -> None:  # fmt: skip
    """Run a pipeline recipe end to end: [pretrain,] finetune, quantize, export, bench, gate."""
    from ssql_deploy.pipeline.plan import plan_pipeline
    from ssql_deploy.recipe import PipelineRecipe

    plan = plan_pipeline(PipelineRecipe.build(pipeline, out=out), str(pipeline))
    from ssql_deploy.pipeline.runner import run_pipeline

    bench, gates = run_pipeline(plan, force)
    if not print_report(bench, f"pipeline {pipeline.name}", gates):
        raise typer.Exit(1)
