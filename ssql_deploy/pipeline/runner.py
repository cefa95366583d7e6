"""`ssql-deploy run PIPELINE.yaml`: every stage of a checked plan (plan.py) in order in one run directory, re-runnable.

A finished training stage is reused only when its manifest records the settings and inputs the
recipe asks for now, and an interrupted one resumes only then; otherwise the run refuses, naming
what differs, or with `force` redoes the stage.
"""

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssql_deploy.bench.gate import GateResult, evaluate_gates
from ssql_deploy.bench.stage import run_bench
from ssql_deploy.errors import UserError
from ssql_deploy.export.stage import run_export
from ssql_deploy.finetune import run_finetune
from ssql_deploy.manifest import read_manifest
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.pipeline.plan import PipelinePlan
from ssql_deploy.pretrain.trainer import run_pretrain
from ssql_deploy.progress import console
from ssql_deploy.quant.stage import run_quantize
from ssql_deploy.recipe import Recipe
from ssql_deploy.run import sha256_file
from ssql_deploy.run_layout import LAST, RunLayout, resolve_checkpoint
from ssql_deploy.train_state import RESUME_FREE, describe_differences, setting_differences


def _stage(title: str) -> None:
    console.rule(f"[bold]{title}")


def _differences(recorded: dict[str, Any], recipe: Recipe, recorded_hashes: dict[str, str], inputs: dict[str, Path]) -> str:
    """What a stage was made with that the recipe no longer asks for: settings, and input files by content (not path)."""
    diffs = setting_differences(recorded, recipe.model_dump(mode="json"), RESUME_FREE)
    for key, path in inputs.items():
        old, new = recorded_hashes.get(key), sha256_file(path) if path.is_file() else None
        if old is not None and new is not None and old != new:
            diffs.append((key, f"sha256 {old[:12]}", f"sha256 {new[:12]}"))
    return describe_differences(diffs)


def _train_once(stage_dir: Path, recipe: Recipe, inputs: dict[str, Path], train: Callable[[bool], object], force: bool) -> None:
    """Reuse a finished stage, resume an interrupted one, start a missing one: each only if it matches the recipe."""
    manifest = read_manifest(stage_dir)
    if manifest is not None:
        differs = _differences(manifest.settings, recipe, {k: r.sha256 for k, r in manifest.inputs.items()}, inputs)
        what = "finished"
    elif (stage_dir / LAST).is_file():
        state = load_checkpoint(stage_dir / LAST)
        differs = _differences(state.get("settings", {}), recipe, {}, {})
        what = "interrupted"
    else:
        train(False)
        return
    if not differs:
        console.print(f"reusing the {what} stage in {stage_dir}" if what == "finished" else f"resuming the stage in {stage_dir}")
        if what == "interrupted":
            train(True)
        return
    if not force:
        raise UserError(f"{stage_dir} holds a {what} stage made with other settings than the recipe's: {differs}",
                        "pass --force to redo it, or give the pipeline another out")  # fmt: skip
    console.print(f"redoing {stage_dir} (--force): {differs}")
    shutil.rmtree(stage_dir)
    train(False)


def run_pipeline(plan: PipelinePlan, force: bool = False) -> tuple[dict[str, Any], list[GateResult]]:
    if plan.pretrain is not None:
        pretrain = plan.pretrain
        _stage(f"pretrain ({pretrain.method})")
        _train_once(RunLayout(plan.out).pretrain, pretrain, {}, lambda resume: run_pretrain(pretrain, resume=resume), force)
    finetune = plan.finetune
    _stage("fine-tune")
    start = {"ckpt": resolve_checkpoint(finetune.ckpt, RunLayout.start_candidates)} if finetune.ckpt is not None else {}
    _train_once(RunLayout(plan.out).finetune, finetune, start, lambda resume: run_finetune(finetune, resume=resume), force)
    for q in plan.quantize:
        name = q.variant()
        _stage(f"quantize {name}" + (f" ({len(q.layer_bits)} layer overrides)" if q.layer_bits else ""))
        if q.lsq:  # a training stage: reused, resumed or refused like the others
            _train_once(RunLayout(plan.out).quant(name), q, {}, lambda resume, q=q: run_quantize(q, resume=resume), force)
        else:
            run_quantize(q)
        for export in (x for x in plan.exports if x.bits == name):
            _stage(f"export {name} for {export.engine}")
            run_export(export)
    _stage("bench")
    bench = run_bench(plan.bench)
    gates = evaluate_gates(bench["report"], plan.gates, plan.strict) if plan.gates else []
    return bench, gates
