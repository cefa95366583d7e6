"""`ssql-deploy quantize` and `ssql-deploy export`: from a trained model to a checked artifact."""

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ssql_deploy.cli.app import user_errors
from ssql_deploy.cli.options import RecipeOpt, SubsetOpt, WorkersOpt, int_list, recipe_option, stage_data_option, stage_root_option
from ssql_deploy.errors import UserError
from ssql_deploy.progress import results
from ssql_deploy.quant.bits import BitSpec
from ssql_deploy.recipe import RECON_ITERS, Calibrator, ExportRecipe, LsqInit, OrtKernel, QuantizeRecipe, Reconstruction
from ssql_deploy.runtimes import ENGINES, RUNTIMES, Engine, engine_help

Q, E = QuantizeRecipe, ExportRecipe
SourceArg = Annotated[Path | None, typer.Argument(help="Run directory (or checkpoint file) to start from.", show_default=False)]


@user_errors("nothing was saved for these bits, except finished LSQ epochs (continue those with --resume)")
def quantize_cmd(
    source: SourceArg = None,
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="A checkpoint file instead of a run directory (needs --out).")] = None,
    bits: Annotated[str | None, recipe_option(Q, "bits", "Bit spec wXaY with X, Y in 2..8, one width (8 = w8a8), or "
                                        "auto (per-layer widths within --budget).")] = None,
    budget: Annotated[str | None, recipe_option(Q, "budget", "With --bits auto: what the per-layer widths may cost, as KIND=NUMBER "
                      "joined by commas; KIND: avg-wbits (parameter-weighted mean weight width), size-mb (packed weights), avg-abits "
                      "(element-weighted mean activation width), bops (GBOPs per image). Widths are solved from `ssql-deploy analyze`.",
                      default="none")] = None,
    config: Annotated[Path | None, recipe_option(Q, "config", "The config.json of an earlier quantize (say, a --bits auto plan): "
                      "quantize with exactly its widths.", default="none")] = None,
    layer_bits: Annotated[list[str] | None, typer.Option("--layer-bits", help="PATTERN=SPEC: override the widths of the modules whose "
                          "name matches PATTERN (fnmatch; later overrides win), e.g. 'features.0.*=w8a8', 'classifier.*=float', "
                          "'*.conv.1.*=w6'. Repeatable. [default: none; the stem stays at w8a8]")] = None,
    calib: Annotated[Calibrator | None, recipe_option(Q, "calib", "Activation range calibrator.")] = None,
    percentile: Annotated[float | None, recipe_option(Q, "percentile", "Percentile for --calib percentile.")] = None,
    max_drop: Annotated[float | None, recipe_option(Q, "max_drop", "Accuracy control: while the ONNX Runtime artifact's top-1 on "
                        "validation images is more than this many points below FP32, give the costliest layer back to 8 bits (then "
                        "float), re-exporting and re-scoring after each step.", default="none")] = None,
    val_size: Annotated[int | None, recipe_option(Q, "val_size", "Validation images for --max-drop: training images apart from "
                        "the calibration ones (never the test split).")] = None,
    calib_size: Annotated[int | None, recipe_option(Q, "calib_size", "Calibration images from the training split.")] = None,
    calib_dir: Annotated[Path | None, recipe_option(Q, "calib_dir", "Where calibration manifests live (created on first use).")] = None,
    arch: Annotated[str | None, recipe_option(Q, "arch", "Architecture, only for plain state dicts that do not record it.",
                                              default="the one the checkpoint records")] = None,
    data: Annotated[str | None, stage_data_option(Q)] = None,
    data_root: Annotated[Path | None, stage_root_option(Q)] = None,
    input_size: Annotated[int | None, recipe_option(Q, "input_size", "Input resolution.", default="the model's")] = None,
    subset: SubsetOpt = None,
    workers: WorkersOpt = None,
    reconstruct: Annotated[Reconstruction | None, recipe_option(Q, "reconstruct", "Then learn the weights' rounding on unlabelled "
                           "calibration images: adaround (per layer), brecq or qdrop (per block, activation steps too).", default="none")] = None,
    iters: Annotated[int | None, recipe_option(Q, "iters", "Reconstruction steps per layer or block (with --reconstruct).",
                                               default=f"{RECON_ITERS} with --reconstruct")] = None,
    recon_size: Annotated[int | None, recipe_option(Q, "recon_size", "Calibration images the reconstruction and the bias correction learn from.")] = None,
    bias_correction: Annotated[bool | None, recipe_option(Q, "bias_correction", "Remove the mean output shift quantized weights add to each "
                               "conv (after --reconstruct, if given).", "--bias-correction/--no-bias-correction")] = None,
    lsq: Annotated[bool | None, recipe_option(Q, "lsq", "Then train LSQ step sizes (quantization-aware training) from that calibration.",
                                              "--lsq/--no-lsq")] = None,
    epochs: Annotated[int | None, recipe_option(Q, "epochs", "LSQ training epochs (with --lsq).", default="none: required with --lsq")] = None,
    lr: Annotated[float | None, recipe_option(Q, "lr", "LSQ learning rate (cosine schedule).")] = None,
    lsq_init: Annotated[LsqInit | None, recipe_option(Q, "lsq_init", "Step-size init: calibrated (the PTQ ranges) or lsq (2 mean|x| / sqrt(Qp)).")] = None,
    freeze_bn_after: Annotated[int | None, recipe_option(Q, "freeze_bn_after", "Freeze BatchNorm statistics after K LSQ epochs.",
                                                         default="never")] = None,
    train_steps_only: Annotated[bool | None, recipe_option(Q, "train_steps_only", "Train only the step sizes, not the weights.",
                                                           "--train-steps-only/--train-all", default="train all")] = None,
    batch_size: Annotated[int | None, recipe_option(Q, "batch_size", "Batch size for evaluation and LSQ training.")] = None,
    seed: Annotated[int | None, recipe_option(Q, "seed", "Random seed for LSQ training.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted LSQ run in --out.")] = False,
    out: Annotated[Path | None, recipe_option(Q, "out", "Run directory to write RUN/quant/BITS/ into.", default="the source run directory")] = None,
    recipe: RecipeOpt = None,
) -> None:  # fmt: skip
    """Quantize at a bit-width: calibrate (PTQ), optionally train LSQ step sizes, evaluate the simulated model, save it."""
    if source is not None and ckpt is not None:
        raise UserError("give a run directory or --ckpt, not both")
    settings = QuantizeRecipe.build(
        recipe, source=source or ckpt, bits=bits, layer_bits=layer_bits, budget=budget, config=config, max_drop=max_drop, val_size=val_size, calib=calib, percentile=percentile, calib_size=calib_size,
        calib_dir=calib_dir, arch=arch, data=data, data_root=data_root, input_size=input_size, subset=subset, workers=workers,
        out=out, reconstruct=reconstruct, iters=iters, recon_size=recon_size, bias_correction=bias_correction, lsq=lsq, epochs=epochs,
        lr=lr, lsq_init=lsq_init, freeze_bn_after=freeze_bn_after, train_steps_only=train_steps_only, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    from ssql_deploy.quant.stage import run_quantize

    metrics = run_quantize(settings, resume=resume)
    how = f"{metrics['calibrator']} calibration" + (
        f" + {settings.reconstruct}, {settings.iters} steps per unit" if settings.reconstruct else ""
    )
    how += (" + bias correction" if settings.bias_correction else "") + (f" + LSQ {settings.epochs} epochs" if settings.lsq else "")
    table = Table(title=f"quantized {metrics['bits']} ({how})")
    for col in ("bits", "float top-1", *(["PTQ top-1"] if settings.lsq else []), "simulated top-1", "drop", "images", "saved in"):
        table.add_column(col)
    ptq = [f"{metrics['ptq_top1']:.2f}%"] if settings.lsq else []
    table.add_row(metrics["bits"], f"{metrics['fp32_top1']:.2f}%", *ptq, f"{metrics['simulated_top1']:.2f}%",
                  f"{metrics['drop_points']:.2f}", str(metrics["n_test_images"]), metrics["out_dir"])  # fmt: skip
    results.print(table)
    results.print(layer_table(metrics["layers"], metrics["bits"], BitSpec.parse(metrics["default_bits"])))
    if "reconstruction" in metrics:
        units = Table(title=f"{settings.reconstruct}: squared output error per unit on calibration images ({metrics['adjust_seconds']} s)")
        for col in ("unit", "convs", "rounded to nearest", "learned rounding"):
            units.add_column(col, justify="left" if col == "unit" else "right")
        for u in metrics["reconstruction"]["units"]:
            learned = f"{u['error_learned']:.4g}" + ("" if u["kept"] else " (worse: nearest kept)")
            units.add_row(u["unit"], str(len(u["layers"])), f"{u['error_nearest']:.4g}", learned)
        results.print(units)


def layer_table(layers: dict[str, list[dict[str, Any]]], label: str, default: BitSpec, limit: int = 40) -> Table:
    """The resolved per-layer widths; for a large model the layers at the default widths are counted, not listed
    (the manifest holds them all)."""
    rows = []
    for w in layers["weights"]:
        what = ("conv" if w["groups"] == 1 else f"conv, {w['groups']} groups") + (
            ", learned rounding" if w.get("rounding") == "learned" else ""
        )
        what += ", bias corrected" if w.get("bias_corrected") else ""
        rows.append((w["layer"], what, "float" if w["w"] is None else f"w{w['w']}", w["w"] == default.w, ""))
    for a in layers["activations"]:
        lo, hi = a["range"]
        rows.append((a["after"], a["kind"], f"a{a['a']}", a["a"] == default.a, f"{a['grid']} [{lo:.3g}, {hi:.3g}]"))
    shown = rows if len(rows) <= limit else [r for r in rows if not r[3]]
    hidden = len(rows) - len(shown)
    table = Table(title=f"per-layer widths of {label} ({len(layers['weights'])} convs, {len(layers['activations'])} activation quantizers)",
                  caption=f"{hidden} more at the default {default}; the manifest lists every layer" if hidden else None)  # fmt: skip
    for col in ("module", "what", "bits", "activation grid and range"):
        table.add_column(col)
    for module, what, bits, _, grid in shown:
        table.add_row(module, what, bits, grid)
    return table


@user_errors("the export was not committed: a model left behind has no manifest, so bench marks it unverified; export again")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="Run directory holding a quantized model (or its quantized.pt).")],
    bits: Annotated[str | None, recipe_option(E, "bits", "Which quantized model of the run (8 = w8a8).", default="the only one")] = None,
    lsq: Annotated[bool | None, recipe_option(E, "lsq", "Export the LSQ-trained model of those bits rather than the PTQ one.",
                                              "--lsq/--ptq", default="ptq")] = None,
    engine: Annotated[Engine | None, recipe_option(E, "engine", engine_help())] = None,
    ort_kernel: Annotated[OrtKernel | None, recipe_option(E, "ort_kernel", "auto (time both here, keep the faster), gemm (QGEMM/AMX path) or symmetric (VNNI conv path).")] = None,
    trt_batches: Annotated[str | None, recipe_option(E, "trt_batches", "TensorRT profile batches MIN,OPT,MAX.")] = None,
    build_engine: Annotated[bool | None, recipe_option(E, "build_engine", "Build the TensorRT plans when TensorRT and a GPU are present.",
                                                       "--build-engine/--no-build-engine")] = None,
    evalset: Annotated[bool | None, recipe_option(E, "evalset", "Also write evalset.npz beside the model: the preprocessed test images "
                       "and labels, for `bench MODEL.onnx --evalset evalset.npz` on a board without torch.", "--evalset/--no-evalset")] = None,
    eval_size: Annotated[int | None, recipe_option(E, "eval_size", "Test images in evalset.npz (a fixed subset).", default="all")] = None,
    data_root: Annotated[Path | None, stage_root_option(E)] = None,
    threads: Annotated[int | None, recipe_option(E, "threads", "ONNX Runtime threads for the parity check.", default="all cores")] = None,
    out: Annotated[Path | None, recipe_option(E, "out", "Run directory to write RUN/export/ into.", default="the source run directory")] = None,
    recipe: RecipeOpt = None,
) -> None:  # fmt: skip
    """Export QDQ ONNX for ONNX Runtime, TensorRT or OpenVINO, check it, and verify it against PyTorch."""
    settings = ExportRecipe.build(recipe, source=source, bits=bits, lsq=lsq, engine=engine, ort_kernel=ort_kernel,
                                  trt_batches=int_list(trt_batches, "--trt-batches", "1,8,32"), build_engine=build_engine, evalset=evalset, eval_size=eval_size,
                                  data_root=data_root, threads=threads, out=out)  # fmt: skip
    from ssql_deploy.export.stage import run_export

    metrics, onnx_path = run_export(settings)
    parity = metrics.parity
    table = Table(title=f"exported {metrics.variant} for {metrics.engine}")
    for col in ("file", "top-1 agreement", "values off by >= 1 step (worst layer)", "first differing layer", "max logit diff", "status"):
        table.add_column(col)
    first = parity["first_mismatch"]
    first = f"{first} ({100 * parity['per_layer'][first]['mismatch_fraction']:.4f}% of its values)" if first else "none"
    table.add_row(str(onnx_path), f"{parity['top1_agreement']:.1f}%", f"{100 * parity['max_mismatch_fraction']:.3f}%", first,
                  f"{parity['max_abs_logit_diff']:.4f}", metrics.status)  # fmt: skip
    results.print(table)
    if "integer_convs" in metrics.check:
        k = metrics.check
        results.print(f"ONNX Runtime runs {k['integer_convs']} of {k['convs']} convolutions as integer kernels")
        for op, info in k["float_ops"].items():
            results.print(f"  float in ONNX Runtime: {info['count']} {op}: {info['why']}", highlight=False)
    if "openvino_int8_convs" in metrics.check:
        results.print(f"OpenVINO runs {metrics.check['openvino_int8_convs']} of {metrics.check['convs']} convolutions in int8")
    size = metrics.weight_storage
    if size is not None:
        results.print(f"weights: ONNX file {size['onnx_file_bytes'] / 1e6:.3f} MB (quantized conv weights as int8: "
                      f"{size['quantized_weights_int8_bytes'] / 1e6:.3f} MB); packed at their widths: "
                      f"{size['quantized_weights_packed_bytes'] / 1e6:.3f} MB, whole model {size['packed_total_bytes'] / 1e6:.3f} MB")  # fmt: skip
        if size["note"]:
            results.print(f"note: {size['note']}")
    build = metrics.engine_build
    if build and not build.built:
        runtime = RUNTIMES[ENGINES[metrics.engine].runtime].title
        results.print(
            f"{runtime} engine not built here: {build.reason}\nbuild it on the GPU machine with (TensorRT 10):\n  {build.build_with}"
            f"\nor (TensorRT 11, strongly typed):\n  {build.build_with_strongly_typed}"
            f"\nand the FP16 engine it is compared with:\n  {build.fp16_baseline_build_with}\nor (TensorRT 11):\n  "
            f"{build.fp16_baseline_build_with_strongly_typed}"
        )
    for note in metrics.notes:
        results.print(f"note: {note}")
