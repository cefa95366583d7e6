"""A pipeline recipe checked whole before any work: every stage's recipe, every gate, and the rows the gates name.

A typo in the gate section must not cost the training before it, so this module imports no stage
(no torch): `ssql-deploy run` refuses a bad recipe in well under a second.
"""

from dataclasses import dataclass
from pathlib import Path

from ssql_deploy.bench.gate import GateSpec, parse_gates
from ssql_deploy.bench.schema import row_names
from ssql_deploy.errors import UserError
from ssql_deploy.quant.config import QuantConfig
from ssql_deploy.recipe import BenchRecipe, ExportRecipe, FinetuneRecipe, PipelineRecipe, PretrainRecipe, QuantizeRecipe, validate

PRETRAIN_BACKBONE = Path("pretrain/backbone.pt")  # what the fine-tuning of a pipeline with a pretrain stage starts from


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


def plan_pipeline(recipe: PipelineRecipe, source: str) -> PipelinePlan:
    out = recipe.out
    pretrain = validate(PretrainRecipe, recipe.pretrain | {"out": out}, f"{source} [pretrain]") if recipe.pretrain is not None else None
    start = {"ckpt": out / PRETRAIN_BACKBONE} if pretrain is not None else {}
    finetune = validate(FinetuneRecipe, recipe.finetune | start | {"out": out}, f"{source} [finetune]")
    q, e, b = recipe.quantize, recipe.export, recipe.bench
    workers = {"workers": finetune.workers}
    quantize = [validate(QuantizeRecipe, {"source": out, "bits": bits, "layer_bits": q.layer_bits, "calib": q.calib, "percentile": q.percentile,
                                          "calib_size": q.calib_size, **workers}, f"{source} [quantize]") for bits in q.bits]  # fmt: skip
    labels = [QuantConfig.from_bits(qr.bits, qr.layer_bits).label for qr in quantize]
    exports = [validate(ExportRecipe, {"source": out, "bits": label, "engine": engine, "ort_kernel": e.ort_kernel}, f"{source} [export]")
               for label in labels for engine in e.engines]  # fmt: skip
    bench = validate(BenchRecipe, {"artifacts": [out], "batch_sizes": b.batch_sizes, "runs": b.runs, "rounds": b.rounds,
                                   "warmup": b.warmup, "threads": b.threads, "subset": b.subset, "out": out / "bench", **workers},
                     f"{source} [bench]")  # fmt: skip
    gates: list[GateSpec] = []
    if recipe.gate is not None:
        g = recipe.gate
        try:
            gates = parse_gates(g.min_top1, g.max_drop, g.max_latency_ms, g.min_speedup)
        except UserError as exc:
            raise UserError(f"{source} [gate]: {exc.problem}", exc.fix) from None
        _check_gate_targets(gates, labels, list(e.engines), source)
    return PipelinePlan(out, pretrain, finetune, quantize, exports, bench, gates, recipe.gate.strict if recipe.gate else False)


def _check_gate_targets(gates: list[GateSpec], labels: list[str], engines: list[str], source: str) -> None:
    names = row_names(labels, engines)
    for g in gates:
        if g.kind == "max_drop" and g.target not in labels:
            raise UserError(f"{source} [gate]: --max-drop names {g.target}, which the pipeline does not quantize",
                            f"bit-widths: {', '.join(labels)}")  # fmt: skip
        if g.kind != "max_drop" and g.target not in names:
            raise UserError(f"{source} [gate]: no row {g.target!r} will exist", f"rows: {', '.join(sorted(names))}")
