"""The `ssql-deploy` command line: parse, build the stage's recipe, call one stage function, print.

Every user mistake surfaces as a `UserError` and is printed as one line with its fix, exit code 2.
"""

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from ssql_deploy import __version__
from ssql_deploy.errors import UserError
from ssql_deploy.progress import console, results

app = typer.Typer(
    name="ssql-deploy",
    help="Fine-tune, quantize, export and measure SSQL-pretrained vision backbones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a UserError into one red line and its exit code (no traceback); Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]; finished epochs are saved, resume with --resume")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def is_main_process() -> bool:
    """Under torchrun only rank 0 prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def _version(value: bool) -> None:
    if value:
        print(f"ssql-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Fine-tune, quantize, export and measure SSQL-pretrained vision backbones."""


RecipeOpt = Annotated[Path | None, typer.Option("--recipe", help="YAML recipe; flags given on the command line override its values.")]
DataOpt = Annotated[str | None, typer.Option("--data", help="Dataset name (see `ssql-deploy datasets`). [default: fashion-mnist]")]
DataRootOpt = Annotated[Path | None, typer.Option("--data-root", help="Directory holding the dataset files (see `ssql-deploy datasets`).")]
DownloadOpt = Annotated[
    bool | None, typer.Option("--download/--no-download", help="Let torchvision download the dataset into --data-root. [default: no]")
]
SubsetOpt = Annotated[int | None, typer.Option("--subset", help="Use a fixed random subset of N images per split (fast runs).")]
InputSizeOpt = Annotated[
    int | None, typer.Option("--input-size", help="Input resolution. [default: 32 for small-image sets, 224 otherwise]")
]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="DataLoader worker processes. [default: 2]")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Backbone (see `ssql-deploy models`). [default: resnet18]")]
StemOpt = Annotated[
    str | None, typer.Option("--stem", help="auto, cifar (3x3, no max-pool) or imagenet (7x7 + max-pool). [default: auto by input size]")
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run directory; each stage writes a sub-directory with a manifest.")]


@app.command("datasets")
@user_errors
def datasets_cmd() -> None:
    """List the datasets and where each expects its files."""
    from ssql_deploy.data import list_datasets

    table = Table(title="datasets")
    for col in ("name", "classes", "input", "default --data-root", "expects under --data-root"):
        table.add_column(col)
    for spec in list_datasets():
        names = spec.name + (f" ({', '.join(spec.aliases)})" if spec.aliases else "")
        table.add_row(names, str(spec.num_classes or "from folders"), str(spec.input_size), str(spec.default_root or "-"), spec.expects)
    results.print(table)


@app.command("models")
@user_errors
def models_cmd() -> None:
    """List the backbones."""
    from ssql_deploy.models import list_models

    table = Table(title="backbones (torchvision parameter names; stem picked by input size)")
    for col in ("name", "blocks", "base width", "description"):
        table.add_column(col)
    for spec in list_models():
        table.add_row(spec.name, "-".join(map(str, spec.layers)), str(spec.base_width), spec.description)
    results.print(table)


@app.command("pretrain")
@user_errors
def pretrain_cmd(
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="simsiam, ssql (SSQL on SimSiam), byol, byol-ssql, moco (MoCo v2), ssql-nce (MoCo v2 + SSQL) or simclr. [default: ssql]",
        ),
    ] = None,
    arch: ArchOpt = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs. [default: 400]")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Global batch size (split over processes). [default: 512]")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Base learning rate (SGD, cosine). [default: 0.05]")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="Weight decay. [default: 5e-4]")] = None,
    warmup_epochs: Annotated[int | None, typer.Option("--warmup-epochs", help="Linear warm-up epochs. [default: 0]")] = None,
    w_bits: Annotated[
        str | None, typer.Option("--w-bits", help="SSQL: weight widths drawn each step, inclusive LOW-HIGH within 2..8. [default: 2-8]")
    ] = None,
    a_bits: Annotated[
        str | None, typer.Option("--a-bits", help="SSQL: activation widths drawn each step, inclusive LOW-HIGH within 2..8. [default: 4-8]")
    ] = None,
    fixed_bits: Annotated[
        str | None, typer.Option("--fixed-bits", help="SSQL ablation: one width pair every step, e.g. w4a4 (instead of random bits).")
    ] = None,
    quantize_target: Annotated[
        bool | None,
        typer.Option(
            "--quantize-target/--float-target", help="SSQL ablation (ssql only): targets from the quantized branch. [default: float target]"
        ),
    ] = None,
    aux_loss: Annotated[
        bool | None, typer.Option("--aux-loss/--no-aux-loss", help="SSQL: keep the full-precision auxiliary loss term. [default: yes]")
    ] = None,
    proj_dim: Annotated[
        int | None, typer.Option("--proj-dim", help="Projector output width. [default: 2048 SimSiam, 512 BYOL, 256 MoCo/SimCLR]")
    ] = None,
    proj_hidden_dim: Annotated[int | None, typer.Option("--proj-hidden-dim", help="Projector hidden width. [default: 2048]")] = None,
    pred_hidden_dim: Annotated[
        int | None, typer.Option("--pred-hidden-dim", help="Predictor hidden width (SimSiam/BYOL). [default: 512 SimSiam, 2048 BYOL]")
    ] = None,
    ema_momentum: Annotated[
        float | None, typer.Option("--ema-momentum", help="BYOL/MoCo target EMA momentum. [default: 0.99 BYOL, 0.999 MoCo]")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="Contrastive temperature. [default: 0.2 MoCo, 0.5 SimCLR]")
    ] = None,
    queue_size: Annotated[int | None, typer.Option("--queue-size", help="MoCo negative queue length. [default: 4096]")] = None,
    knn_every: Annotated[
        int | None, typer.Option("--knn-every", help="kNN top-1 monitor every N epochs and at the last one; 0 turns it off. [default: 10]")
    ] = None,
    knn_k: Annotated[int | None, typer.Option("--knn-k", help="Neighbours the kNN monitor weighs. [default: 200]")] = None,
    save_every_steps: Annotated[
        int | None, typer.Option("--save-every-steps", help="Also checkpoint every K steps (besides every epoch).")
    ] = None,
    stem: StemOpt = None,
    input_size: InputSizeOpt = None,
    subset: SubsetOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    sync_bn: Annotated[bool | None, typer.Option("--sync-bn/--no-sync-bn", help="SyncBatchNorm under torchrun. [default: no]")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed. [default: 0]")] = None,
    out: OutOpt = None,
    recipe: RecipeOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
) -> None:
    """Self-supervised pretraining (SSQL or a baseline); writes RUN_DIR/pretrain/backbone.pt for finetune."""
    from ssql_deploy.pretrain import run_pretrain
    from ssql_deploy.recipe import PretrainRecipe

    settings = PretrainRecipe.build(
        recipe, method=method, arch=arch, data=data, data_root=data_root, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, w_bits=w_bits, a_bits=a_bits, fixed_bits=fixed_bits,
        quantize_target=quantize_target, aux_loss=aux_loss, proj_dim=proj_dim, proj_hidden_dim=proj_hidden_dim,
        pred_hidden_dim=pred_hidden_dim, ema_momentum=ema_momentum, temperature=temperature,
        queue_size=queue_size, knn_every=knn_every, knn_k=knn_k, save_every_steps=save_every_steps, stem=stem,
        input_size=input_size, subset=subset, download=download, workers=workers, sync_bn=sync_bn, seed=seed, out=out,
    )  # fmt: skip
    metrics = run_pretrain(settings, resume=resume)
    if not is_main_process():
        return
    table = Table(title=f"pretraining ({settings.method}) finished")
    for col in ("arch", "data", "epochs", "loss", "kNN top-1", "z-std x sqrt(d)", "processes"):
        table.add_column(col)
    knn = "-" if metrics["knn_top1"] is None else f"{metrics['knn_top1']:.2f}%"
    ratio = "-" if metrics["z_std"] is None else f"{metrics['z_std'] * settings.proj_dim**0.5:.2f}"
    loss = "-" if metrics["loss"] is None else f"{metrics['loss']:.4f}"
    table.add_row(settings.arch, settings.data, str(metrics["epochs"]), loss, knn, ratio, str(metrics["world_size"]))
    results.print(table)
    results.print(f"run directory: {settings.out} (backbone: {settings.out / 'pretrain' / 'backbone.pt'})")


@app.command("finetune")
@user_errors
def finetune_cmd(
    ckpt: Annotated[
        Path | None,
        typer.Option(
            "--ckpt", help="Checkpoint or run directory to start from (SSQL reference, torchvision or ours); omit for random init."
        ),
    ] = None,
    arch: ArchOpt = None,
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="linear (frozen backbone, new fc) or full fine-tuning. [default: full]")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs. [default: 100 linear, 50 full]")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Global batch size (split over processes). [default: 256]")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Base learning rate. [default: 30 linear, 0.01 full]")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="Weight decay. [default: 0 linear, 1e-4 full]")] = None,
    schedule: Annotated[str | None, typer.Option("--schedule", help="step (10x drops at 60% and 80%) or cosine. [default: step]")] = None,
    warmup_epochs: Annotated[int | None, typer.Option("--warmup-epochs", help="Linear warm-up epochs. [default: 0]")] = None,
    stem: StemOpt = None,
    input_size: InputSizeOpt = None,
    subset: SubsetOpt = None,
    download: DownloadOpt = None,
    workers: WorkersOpt = None,
    sync_bn: Annotated[
        bool | None, typer.Option("--sync-bn/--no-sync-bn", help="SyncBatchNorm under torchrun (full mode). [default: no]")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed. [default: 0]")] = None,
    out: OutOpt = None,
    recipe: RecipeOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last finished epoch.")] = False,
) -> None:
    """Fine-tune a backbone on a dataset (linear probe or full), single process or under torchrun."""
    from ssql_deploy.finetune import run_finetune
    from ssql_deploy.recipe import FinetuneRecipe

    settings = FinetuneRecipe.build(
        recipe, ckpt=ckpt, arch=arch, data=data, data_root=data_root, mode=mode, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs,
        stem=stem, input_size=input_size, subset=subset, download=download, workers=workers, sync_bn=sync_bn,
        seed=seed, out=out,
    )  # fmt: skip
    metrics = run_finetune(settings, resume=resume)
    if not is_main_process():
        return
    table = Table(title=f"fine-tuning ({settings.mode}) finished")
    for col in ("arch", "data", "epochs", "test top-1 (last)", "best", "images", "processes"):
        table.add_column(col)
    table.add_row(settings.arch, settings.data, str(metrics["epochs"]), f"{metrics['top1']:.2f}%",
                  f"{metrics['best_top1']:.2f}%", str(metrics["n_test_images"]), str(metrics["world_size"]))  # fmt: skip
    results.print(table)
    results.print(f"run directory: {settings.out}")


SourceArg = Annotated[Path | None, typer.Argument(help="Run directory (or checkpoint file) to start from.", show_default=False)]


@app.command("quantize")
@user_errors
def quantize_cmd(
    source: SourceArg = None,
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="A checkpoint file instead of a run directory (needs --out).")] = None,
    bits: Annotated[
        str | None, typer.Option("--bits", help="Bit spec wXaY with X, Y in 2..8, or one width (8 = w8a8). [default: w8a8]")
    ] = None,
    calib: Annotated[
        str | None, typer.Option("--calib", help="Activation calibrator: minmax, percentile, mse or entropy. [default: percentile]")
    ] = None,
    percentile: Annotated[float | None, typer.Option("--percentile", help="Percentile for --calib percentile. [default: 99.99]")] = None,
    calib_size: Annotated[
        int | None, typer.Option("--calib-size", help="Calibration images from the training split. [default: 512]")
    ] = None,
    calib_dir: Annotated[
        Path | None, typer.Option("--calib-dir", help="Where calibration manifests live (created on first use). [default: calib]")
    ] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="Architecture, only for plain state dicts that do not record it.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Dataset. [default: the one the model was fine-tuned on]")] = None,
    data_root: DataRootOpt = None,
    subset: SubsetOpt = None,
    workers: WorkersOpt = None,
    lsq: Annotated[
        bool | None, typer.Option("--lsq/--no-lsq", help="Then train LSQ step sizes (quantization-aware training) from that calibration.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="LSQ training epochs (with --lsq).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="LSQ learning rate (cosine schedule). [default: 0.01]")] = None,
    lsq_init: Annotated[
        str | None,
        typer.Option("--lsq-init", help="Step-size init: calibrated (the PTQ ranges) or lsq (2*mean|x|/sqrt(Qp)). [default: calibrated]"),
    ] = None,
    freeze_bn_after: Annotated[
        int | None, typer.Option("--freeze-bn-after", help="Freeze BatchNorm statistics after K LSQ epochs.")
    ] = None,
    train_steps_only: Annotated[
        bool | None, typer.Option("--train-steps-only/--train-all", help="Train only the step sizes, not the weights. [default: train all]")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Batch size for evaluation and LSQ training. [default: 256]")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for LSQ training. [default: 0]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted LSQ run in --out.")] = False,
    out: OutOpt = None,
    recipe: RecipeOpt = None,
) -> None:
    """Quantize at a bit-width: calibrate (PTQ), optionally train LSQ step sizes, evaluate the simulated model, save it."""
    from ssql_deploy.quant.stage import run_quantize
    from ssql_deploy.recipe import QuantizeRecipe

    if source is not None and ckpt is not None:
        raise UserError("give a run directory or --ckpt, not both")
    settings = QuantizeRecipe.build(
        recipe, source=source or ckpt, bits=bits, calib=calib, percentile=percentile, calib_size=calib_size,
        calib_dir=calib_dir, arch=arch, data=data, data_root=data_root, subset=subset, workers=workers, out=out, lsq=lsq,
        epochs=epochs, lr=lr, lsq_init=lsq_init, freeze_bn_after=freeze_bn_after, train_steps_only=train_steps_only,
        batch_size=batch_size, seed=seed,
    )  # fmt: skip
    metrics = run_quantize(settings, resume=resume)
    how = f"{metrics['calibrator']} calibration" + (f" + LSQ {settings.epochs} epochs" if settings.lsq else "")
    table = Table(title=f"quantized {metrics['bits']} ({how})")
    for col in ("bits", "float top-1", *(["PTQ top-1"] if settings.lsq else []), "simulated top-1", "drop", "images", "saved in"):
        table.add_column(col)
    ptq = [f"{metrics['ptq_top1']:.2f}%"] if settings.lsq else []
    table.add_row(metrics["bits"], f"{metrics['fp32_top1']:.2f}%", *ptq, f"{metrics['simulated_top1']:.2f}%",
                  f"{metrics['drop_points']:.2f}", str(metrics["n_test_images"]), metrics["out_dir"])  # fmt: skip
    results.print(table)


@app.command("export")
@user_errors
def export_cmd(
    source: Annotated[Path, typer.Argument(help="Run directory holding a quantized model (or its quantized.pt).")],
    bits: Annotated[
        str | None, typer.Option("--bits", help="Which quantized model of the run (8 = w8a8); needed when it holds several.")
    ] = None,
    lsq: Annotated[
        bool | None, typer.Option("--lsq/--ptq", help="Export the LSQ-trained model of those bits rather than the PTQ one. [default: PTQ]")
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option("--engine", help="ort (ONNX Runtime integer kernels) or trt (TensorRT explicit quantization). [default: ort]"),
    ] = None,
    ort_kernel: Annotated[
        str | None, typer.Option("--ort-kernel", help="auto, gemm (QGEMM/AMX path) or symmetric (VNNI conv path). [default: auto]")
    ] = None,
    trt_batches: Annotated[str | None, typer.Option("--trt-batches", help="TensorRT profile min,opt,max batch. [default: 1,8,32]")] = None,
    build_engine: Annotated[
        bool | None,
        typer.Option(
            "--build-engine/--no-build-engine", help="Build the TensorRT plan when TensorRT and a GPU are present. [default: yes]"
        ),
    ] = None,
    data_root: DataRootOpt = None,
    threads: Annotated[int | None, typer.Option("--threads", help="ONNX Runtime threads for the parity check.")] = None,
    out: OutOpt = None,
    recipe: RecipeOpt = None,
) -> None:
    """Export QDQ ONNX for ONNX Runtime or TensorRT, check it, and verify it against PyTorch."""
    from ssql_deploy.export.stage import run_export
    from ssql_deploy.recipe import ExportRecipe

    batches = [int(b) for b in trt_batches.split(",")] if trt_batches else None
    settings = ExportRecipe.build(recipe, source=source, bits=bits, lsq=lsq, engine=engine, ort_kernel=ort_kernel,
                                  trt_batches=batches, build_engine=build_engine, data_root=data_root, threads=threads, out=out)  # fmt: skip
    metrics = run_export(settings)
    parity = metrics["parity"]
    table = Table(title=f"exported {metrics['variant']} for {metrics['engine']}")
    for col in ("file", "agreement", "max step dev.", "max logit diff", "status"):
        table.add_column(col)
    table.add_row(metrics["onnx"], f"{parity['top1_agreement']:.1f}%", f"{parity['max_step_deviation']:.2f}",
                  f"{parity['max_abs_logit_diff']:.4f}", metrics["status"])  # fmt: skip
    results.print(table)
    if "ort_kernels" in metrics:
        k = metrics["ort_kernels"]
        results.print(f"ONNX Runtime runs {k['integer_convs']} of {k['convs']} convolutions as integer kernels")
    engine_info = metrics.get("tensorrt")
    if engine_info and not engine_info["built"]:
        results.print(
            f"TensorRT engine not built here: {engine_info['reason']}\nbuild it on the GPU machine with:\n  {engine_info['build_with']}"
        )
    for note in metrics["notes"]:
        results.print(f"note: {note}")


@app.command("bench")
@user_errors
def bench_cmd(
    artifacts: Annotated[list[Path], typer.Argument(help="Run directories, .onnx, .plan or .pt files to measure.")],
    data: Annotated[str | None, typer.Option("--data", help="Dataset. [default: the one the artifacts were trained on]")] = None,
    data_root: DataRootOpt = None,
    batch_sizes: Annotated[str | None, typer.Option("--batch-sizes", help="Comma-separated batch sizes to time. [default: 1,32]")] = None,
    runs: Annotated[int | None, typer.Option("--runs", help="Timed runs per batch size (>= 50). [default: 50]")] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="Untimed warm-up runs. [default: 10]")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Threads for every runtime. [default: all cores]")] = None,
    subset: SubsetOpt = None,
    workers: WorkersOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Directory for report.json/.md/.png. [default: runs/bench]")] = None,
    recipe: RecipeOpt = None,
) -> None:
    """Measure top-1 on the test split and latency of each artifact; write report.json/.md/.png."""
    from ssql_deploy.bench.stage import run_bench
    from ssql_deploy.recipe import BenchRecipe

    sizes = _int_list(batch_sizes, "--batch-sizes")
    settings = BenchRecipe.build(recipe, artifacts=artifacts, data=data, data_root=data_root, batch_sizes=sizes, runs=runs,
                                 warmup=warmup, threads=threads, subset=subset, workers=workers, out=out)  # fmt: skip
    bench = run_bench(settings)
    _print_report(bench)


def _print_report(bench: dict[str, Any], title: str = "bench", gates: list[Any] | None = None) -> bool:
    """The table, its notes, the gates if any, then where the report and plot are; False if a gate failed."""
    from ssql_deploy.bench.report import notes, rich_table

    results.print(rich_table(bench["report"], title=title))
    for note in notes(bench["report"]):
        results.print(f"note: {note}", highlight=False)
    passed = _print_gates(gates) if gates else True
    results.print(f"report: {bench['paths']['md']}\nplot:   {bench['paths']['png']}")
    return passed


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}", f"for example {flag} 1,32") from None


def _print_gates(gates: list[Any]) -> bool:
    table = Table(title="gates")
    for col in ("gate", "result", "measured"):
        table.add_column(col)
    for g in gates:
        verdict = "[yellow]skip[/]" if g.passed is None else "[green]pass[/]" if g.passed else "[red]FAIL[/]"
        table.add_row(g.gate, verdict, g.detail)
    results.print(table)
    return all(g.passed is not False for g in gates)


@app.command("gate")
@user_errors
def gate_cmd(
    report: Annotated[Path, typer.Argument(help="report.json written by `ssql-deploy bench`.")],
    min_top1: Annotated[
        list[str] | None, typer.Option("--min-top1", help="NAME=PERCENT: that row's top-1 is at least PERCENT. Repeatable.")
    ] = None,
    max_drop: Annotated[
        list[str] | None,
        typer.Option("--max-drop", help="BITS=POINTS: every BITS row loses at most POINTS against its FP32 baseline. Repeatable."),
    ] = None,
    max_latency_ms: Annotated[
        list[str] | None, typer.Option("--max-latency-ms", help="NAME@BATCH=MS: p50 latency at most MS. Repeatable.")
    ] = None,
    min_speedup: Annotated[
        list[str] | None,
        typer.Option("--min-speedup", help="NAME@BATCH=X: at least X times faster than FP32 on the same runtime. Repeatable."),
    ] = None,
) -> None:
    """Check a bench report against thresholds: exit 0 when every gate passes, 1 otherwise."""
    from ssql_deploy.bench.gate import evaluate_gates, load_report

    gates = evaluate_gates(load_report(report), min_top1 or [], max_drop or [], max_latency_ms or [], min_speedup or [])
    if not _print_gates(gates):
        raise typer.Exit(1)


@app.command("run")
@user_errors
def run_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline recipe, e.g. recipes/pipelines/quickstart.yaml.")],
    out: Annotated[Path | None, typer.Option("--out", help="Run directory. [default: the recipe's out]")] = None,
) -> None:
    """Run a pipeline recipe end to end: [pretrain,] finetune, quantize, export, bench, gate."""
    from ssql_deploy.pipeline import run_pipeline
    from ssql_deploy.recipe import PipelineRecipe

    settings = PipelineRecipe.build(pipeline, out=out)
    bench, gates = run_pipeline(settings, str(pipeline))
    if not _print_report(bench, f"pipeline {pipeline.name}", gates):
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="ssql-deploy")


if __name__ == "__main__":
    sys.exit(main())
