"""`ssql-deploy analyze` and `debug`: which layers a low width hurts, and where an artifact departs from PyTorch."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ssql_deploy.cli.app import user_errors
from ssql_deploy.cli.options import RecipeOpt, WorkersOpt, int_list, recipe_option, stage_data_option, stage_root_option
from ssql_deploy.progress import results
from ssql_deploy.recipe import AnalyzeRecipe, Calibrator, Metric

A = AnalyzeRecipe
TOP = 15


@user_errors("nothing was written (an earlier analysis in RUN/analyze/, if any, is unchanged)")
def analyze_cmd(
    source: Annotated[Path, typer.Argument(help="Run directory (or checkpoint file, with --out) of a trained model.")],
    bits: Annotated[str | None, recipe_option(A, "bits", "Comma-separated widths to try each layer at.")] = None,
    metric: Annotated[Metric | None, recipe_option(A, "metric", "What ranks the layers: loss (cross-entropy increase), top1 "
                      "(drop in points), or hessian (HAWQ-v2: Hessian trace x weight quantization error; activations by loss).")] = None,
    val_size: Annotated[int | None, recipe_option(A, "val_size", "Labelled training images the layers are scored on "
                        "(apart from the calibration images; never the test split).")] = None,
    calib: Annotated[Calibrator | None, recipe_option(A, "calib", "Activation range calibrator.")] = None,
    calib_size: Annotated[int | None, recipe_option(A, "calib_size", "Calibration images from the training split.")] = None,
    calib_dir: Annotated[Path | None, recipe_option(A, "calib_dir", "Where calibration and validation manifests live.")] = None,
    hutchinson_samples: Annotated[int | None, recipe_option(A, "hutchinson_samples", "Random vectors for the Hessian traces "
                                  "(with --metric hessian).")] = None,
    arch: Annotated[str | None, recipe_option(A, "arch", "Architecture, only for plain state dicts.", default="the one the checkpoint records")] = None,
    data: Annotated[str | None, stage_data_option(A)] = None,
    data_root: Annotated[Path | None, stage_root_option(A)] = None,
    input_size: Annotated[int | None, recipe_option(A, "input_size", "Input resolution.", default="the model's")] = None,
    workers: WorkersOpt = None,
    out: Annotated[Path | None, recipe_option(A, "out", "Run directory to write RUN/analyze/ into.", default="the source run directory")] = None,
    recipe: RecipeOpt = None,
) -> None:  # fmt: skip
    """Per-layer sensitivity: quantize one layer at a time at each width; write sensitivity.json and a heat-map."""
    settings = AnalyzeRecipe.build(recipe, source=source, bits=int_list(bits, "--bits", "2,3,4,6,8"), metric=metric, val_size=val_size,
                                   calib=calib, calib_size=calib_size, calib_dir=calib_dir, hutchinson_samples=hutchinson_samples,
                                   arch=arch, data=data, data_root=data_root, input_size=input_size, workers=workers, out=out)  # fmt: skip
    from ssql_deploy.analyze.stage import most_sensitive, run_analyze

    result = run_analyze(settings)
    table = Table(title=f"{result['arch']}: the {TOP} most sensitive quantizers ({result['unit']}; float top-1 "
                        f"{result['float']['top1']:.2f}% on {result['validation']['images']} validation images)")  # fmt: skip
    table.add_column("quantizer")
    table.add_column("layer")
    for b in result["bits"]:
        table.add_column(f"{b}-bit", justify="right")
    for row in most_sensitive(result, TOP):
        table.add_row("weights" if row["role"] == "w" else "activation after", row["name"],
                      *(f"{row['sensitivity'][str(b)]:.4g}" for b in result["bits"]))  # fmt: skip
    results.print(table)
    results.print(f"cost: {result['evaluations']} evaluations of {result['validation']['images']} images, {result['seconds']:.1f} s")
    results.print(f"sensitivity: {result['paths']['sensitivity']}\nheat-map:    {result['paths']['heatmap']}")


@user_errors("nothing was written (an earlier debug report, if any, is unchanged)")
def debug_cmd(
    artifact: Annotated[Path, typer.Argument(help="An export directory (RUN/export/VARIANT-ENGINE), its model.qdq.onnx or its model.plan.")],
    images: Annotated[int, typer.Option("--images", min=1, help="Test images both models run on.")] = 256,
    data_root: Annotated[Path | None, typer.Option("--data-root", help="Directory holding the dataset files. "
                                                   "[default: the one the model was trained with]")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Directory for debug.json and debug.png. [default: ARTIFACT's debug/]")] = None,
) -> None:  # fmt: skip
    """Run an exported model in ONNX Runtime and its PyTorch twin on the same images: per-layer deviation, float nodes
    (and, on a GPU machine, the precision of each layer of a TensorRT plan)."""
    from ssql_deploy.analyze.debug import run_debug

    result = run_debug(artifact, images, out, data_root)
    table = Table(title=f"{result['artifact']} vs its PyTorch twin, {result['images']} test images: top-1 agreement "
                        f"{result['top1_agreement']:.2f}%, first layer beyond rounding ties: {result['first_departure'] or 'none'}")  # fmt: skip
    for column in ("layer (activation, graph order)", "values off >= 0.5 step", "given the same inputs", "largest deviation (steps)"):
        table.add_column(column, justify="left" if column.startswith("layer") else "right")
    for name, row in result["layers"].items():
        mark = " <- departs here" if name == result["first_departure"] else " <- first tie" if name == result["first_mismatch"] else ""
        table.add_row(
            name + mark, f"{100 * row['mismatch_fraction']:.4f}%", f"{100 * row['local_mismatch_fraction']:.4f}%", f"{row['max_steps']:g}"
        )
    results.print(table)
    results.print(f"integer convolutions: {result['integer_convs']} of {result['convs']}")
    for op, info in result["float_ops"].items():
        results.print(f"float after ONNX Runtime's optimizations: {info['count']} {op} ({', '.join(info['nodes'][:4])}"
                      f"{', ...' if info['count'] > 4 else ''}): {info['why']}", highlight=False)  # fmt: skip
    engine = result["tensorrt"]
    if engine and engine["inspected"]:
        summary = engine["summary"]
        results.print(f"TensorRT {engine['tensorrt_version']} engine: {summary['int8_convolutions']} of {summary['convolutions']} "
                      f"convolutions run INT8", highlight=False)  # fmt: skip
        for name, precision in summary["not_int8"].items():
            results.print(f"[red]not INT8 in the engine:[/] {name} runs {precision}", highlight=False)
    elif engine:
        results.print(f"TensorRT layer precisions not read: {engine['why']}", highlight=False)
    for problem in result["problems"]:
        results.print(f"[red]problem:[/] {problem}")
    results.print(f"json: {result['paths']['json']}\nplot: {result['paths']['png']}")
