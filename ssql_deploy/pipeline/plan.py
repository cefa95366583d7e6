"""A pipeline recipe checked whole before any work: every stage's recipe, every gate, and the rows the gates name.

A typo in the gate section must not cost the training before it, so this module imports no stage
(no torch): `ssql-deploy run` refuses a bad recipe in well under a second.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssql_deploy.bench.gate import GateSpec, parse_gates
from ssql_deploy.errors import UserError
from ssql_deploy.recipe import BenchRecipe, ExportRecipe, FinetuneRecipe, PipelineRecipe, PretrainRecipe, QuantizeRecipe, validate
from ssql_deploy.run_layout import RunLayout
from ssql_deploy.runtimes import ENGINES, Engine, row_names


@dataclass(frozen=True)
class PipelinePlan:
    """Every stage's recipe, validated, and the parsed gates: what `run_pipeline` executes."""

    out: Path
    pretrain: PretrainRecipe | None
    finetune: FinetuneRecipe
    quantize: list[QuantizeRecipe]
    exports: list[ExportRecipe]
    bench: BenchRecipe
    gates: list[GateSpec]
    strict: bool


def _section(name: str, section: dict[str, Any], set_here: tuple[str, ...], source: str) -> dict[str, Any]:
    given = sorted(set(section) & set(set_here))
    if given:
        raise UserError(f"{source} [{name}]: {given[0]!r} is set by the pipeline", f"drop it from the {name} section")
    return dict(section)


def _quantize(recipe: PipelineRecipe, out: Path, workers: int, source: str) -> list[QuantizeRecipe]:
    """One quantize recipe per (section, bits): a section is a quantize recipe whose `bits` may be a list."""
    sections = recipe.quantize if isinstance(recipe.quantize, list) else [recipe.quantize]
    found = []
    for section in sections:
        data = {"workers": workers} | _section("quantize", section, ("source", "out", "ckpt"), source)
        bits = data.pop("bits", ["w8a8"])
        for b in bits if isinstance(bits, list) else [bits]:
            found.append(validate(QuantizeRecipe, data | {"source": out, "bits": b}, f"{source} [quantize]"))
    return found


def _exports(recipe: PipelineRecipe, quantize: list[QuantizeRecipe], out: Path, source: str) -> list[ExportRecipe]:
    """Each quantized model for each engine; options of one engine (ort_kernel, trt_batches) go to that engine only."""
    data = _section("export", recipe.export, ("source", "out", "bits", "lsq", "engine"), source)
    engines = data.pop("engines", ["ort"])
    others = {o for e in ENGINES.values() for o in e.options}
    exports = []
    for q in quantize:
        for engine in engines if isinstance(engines, list) else [engines]:
            own = {k: v for k, v in data.items() if k not in others or k in ENGINES.get(engine, ENGINES["ort"]).options}
            exports.append(validate(ExportRecipe, own | {"source": out, "bits": q.variant(), "engine": engine}, f"{source} [export]"))
    return exports


def plan_pipeline(recipe: PipelineRecipe, source: str) -> PipelinePlan:
    out = recipe.out
    run = RunLayout(out)
    pretrain = validate(PretrainRecipe, recipe.pretrain | {"out": out}, f"{source} [pretrain]") if recipe.pretrain is not None else None
    start = {"ckpt": run.backbone} if pretrain is not None else {}  # fine-tuning starts from the pretraining
    finetune = validate(FinetuneRecipe, recipe.finetune | start | {"out": out}, f"{source} [finetune]")
    quantize = _quantize(recipe, out, finetune.workers, source)
    exports = _exports(recipe, quantize, out, source)
    bench_section = {"workers": finetune.workers} | _section("bench", recipe.bench, ("artifacts", "out"), source)
    bench = validate(BenchRecipe, bench_section | {"artifacts": [out], "out": run.bench}, f"{source} [bench]")
    gates: list[GateSpec] = []
    if recipe.gate is not None:
        g = recipe.gate
        try:
            gates = parse_gates(g.min_top1, g.max_drop, g.max_latency_ms, g.min_speedup)
        except UserError as exc:
            raise UserError(f"{source} [gate]: {exc.problem}", exc.fix) from None
        variants = list(dict.fromkeys(q.variant() for q in quantize))
        _check_gate_targets(gates, variants, [e.engine for e in exports], source)
    return PipelinePlan(out, pretrain, finetune, quantize, exports, bench, gates, recipe.gate.strict if recipe.gate else False)


def _check_gate_targets(gates: list[GateSpec], variants: list[str], engines: list[Engine], source: str) -> None:
    names = row_names(variants, list(dict.fromkeys(engines)))
    for g in gates:
        if g.kind == "max_drop" and g.target not in variants:
            raise UserError(f"{source} [gate]: --max-drop names {g.target}, which the pipeline does not quantize",
                            f"quantized models: {', '.join(variants)}")  # fmt: skip
        if g.kind != "max_drop" and g.target not in names:
            raise UserError(f"{source} [gate]: no row {g.target!r} will exist", f"rows: {', '.join(sorted(names))}")
