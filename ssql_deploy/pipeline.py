"""`ssql-deploy run PIPELINE.yaml`: every stage in order in one run directory, re-runnable.

A finished training stage (its manifest is written) is reused on the next run and an
interrupted one resumes, so `make demo` can be run again or after a crash without redoing work.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssql_deploy.bench.gate import GateResult, evaluate_gates
from ssql_deploy.bench.stage import run_bench
from ssql_deploy.export.stage import run_export
from ssql_deploy.finetune import run_finetune
from ssql_deploy.pretrain.trainer import run_pretrain
from ssql_deploy.progress import console
from ssql_deploy.quant.stage import run_quantize
from ssql_deploy.recipe import BenchRecipe, ExportRecipe, FinetuneRecipe, PipelineRecipe, PretrainRecipe, QuantizeRecipe, validate
from ssql_deploy.run import MANIFEST


def _stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def _train_once(stage_dir: Path, train: Callable[[bool], object]) -> None:
    """Reuse a finished stage, resume an interrupted one, start a missing one."""
    if (stage_dir / MANIFEST).is_file():
        console.print(f"reusing the finished stage in {stage_dir}")
    else:
        train((stage_dir / "last.pt").is_file())


def run_pipeline(recipe: PipelineRecipe, source: str) -> tuple[dict[str, Any], list[GateResult]]:
    out = recipe.out
    start = {}
    if recipe.pretrain is not None:
        pretrain = validate(PretrainRecipe, recipe.pretrain | {"out": out}, f"{source} [pretrain]")
        _stage(f"pretrain ({pretrain.method})")
        _train_once(out / "pretrain", lambda resume: run_pretrain(pretrain, resume=resume))
        start = {"ckpt": out}  # the fine-tuning picks up pretrain/backbone.pt
    finetune = validate(FinetuneRecipe, recipe.finetune | start | {"out": out}, f"{source} [finetune]")
    _stage("fine-tune")
    _train_once(out / "finetune", lambda resume: run_finetune(finetune, resume=resume))
    common = {"data": finetune.data, "data_root": finetune.data_root, "workers": finetune.workers}
    for bits in recipe.quantize.bits:
        _stage(f"quantize {bits}")
        q = recipe.quantize
        run_quantize(QuantizeRecipe(source=out, bits=bits, calib=q.calib, percentile=q.percentile, calib_size=q.calib_size, **common))
        for engine in recipe.export.engines:
            _stage(f"export {bits} for {engine}")
            run_export(
                ExportRecipe(source=out, bits=bits, engine=engine, ort_kernel=recipe.export.ort_kernel, data_root=finetune.data_root)
            )
    _stage("bench")
    b = recipe.bench
    bench = run_bench(BenchRecipe(artifacts=[out], batch_sizes=b.batch_sizes, runs=b.runs, warmup=b.warmup, threads=b.threads,
                                  subset=b.subset, out=out / "bench", **common))  # fmt: skip
    gates: list[GateResult] = []
    if recipe.gate is not None:
        g = recipe.gate
        gates = evaluate_gates(bench["report"], g.min_top1, g.max_drop, g.max_latency_ms, g.min_speedup)
    return bench, gates
