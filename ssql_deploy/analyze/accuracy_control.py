"""`quantize --max-drop PTS`: NNCF's accuracy control, judged on the exported artifact rather than the simulation.

Quantize everything at the config's widths, export for ONNX Runtime in memory and score the
artifact on validation images (training images apart from the calibration ones, calib_set.py;
never the test split). While its top-1 is more than PTS below the FP32 ONNX model's on the same
images, give the layer that costs most back to 8 bits (its weights, or the activation after it),
then, once every layer is at 8 bits, back to float, re-exporting and re-scoring after each
change. Layers are ranked once, by how much the simulated validation loss falls when that layer
alone returns to 8 bits. Each step's top-1 and its batch-1 latency against the FP32 ONNX model
(interleaved rounds, as `bench` times) are reported, so the cost of every fallback is visible.
"""

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import fx, nn

from ssql_deploy.analyze.sensitivity import Validation
from ssql_deploy.bench.timing import interleaved, paired_speedup
from ssql_deploy.errors import UserError
from ssql_deploy.export.onnx_graph import INPUT_NAME, build_onnx
from ssql_deploy.export.ort_session import make_session
from ssql_deploy.models.registry import ModelSpec
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.progress import console, progress_bar
from ssql_deploy.quant.artifact import from_payload, quantized_payload
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.calibrators import CalibratorName
from ssql_deploy.quant.config import LayerSpec, Override, QuantConfig
from ssql_deploy.quant.placement import act_quantizers, prepare, trace, weight_quantizers

THREADS = os.cpu_count() or 1  # as `bench` runs by default
HIGH_BITS = 8


@dataclass(frozen=True)
class Unit:
    """What one fallback step changes: a conv's weights (`w`) or the activation after a module (`a`)."""

    layer: str
    role: str

    def spec(self, to: str) -> LayerSpec:
        return LayerSpec(float=True) if to == "float" else LayerSpec(**{self.role: HIGH_BITS})


@dataclass
class Context:
    model: nn.Module
    meta: ModelMeta
    spec: ModelSpec
    calib: list[torch.Tensor]
    calibrator: CalibratorName
    percentile: float
    val: Validation


def _session(gm: fx.GraphModule, layout_name: str, ctx: Context) -> Any:
    chw = (3, ctx.meta.input_size, ctx.meta.input_size)
    return make_session(build_onnx(gm, chw, layout_name).SerializeToString(), THREADS)  # type: ignore[arg-type]


def _top1(session: Any, val: Validation) -> float:
    correct = 0
    for x, y in zip(val.images.split(val.batch), val.labels.split(val.batch), strict=True):
        correct += int((np.argmax(session.run(None, {INPUT_NAME: x.numpy()})[0], axis=1) == y.numpy()).sum())
    return 100.0 * correct / len(val.labels)


def quantize_with(config: QuantConfig, ctx: Context) -> fx.GraphModule:
    gm = prepare(ctx.model, "ssql", config, ctx.spec)
    calibrate(gm, ctx.calib, ctx.calibrator, ctx.percentile)
    return gm


def artifact(gm: fx.GraphModule, ctx: Context) -> Any:
    """The ONNX Runtime session of `gm`'s export (the `ort` layout, its added points calibrated), built in memory."""
    loaded = from_payload(quantized_payload("quantized", gm, ctx.meta, "candidate", False), "ort")
    if loaded.uncalibrated:
        calibrate(loaded.gm, ctx.calib, ctx.calibrator, ctx.percentile, points=sorted(loaded.uncalibrated))
    return _session(loaded.gm, "ort", ctx)


def rank(gm: fx.GraphModule, val: Validation) -> list[Unit]:
    """Units below 8 bits, the one whose return to 8 bits lowers the simulated validation loss most first."""
    base, _ = val.score(gm)
    gains: list[tuple[float, Unit]] = []
    weights, points = weight_quantizers(gm), act_quantizers(gm)
    by_layer: dict[str, list[Any]] = {}
    for point, q in points.items():
        by_layer.setdefault(gm.quant_points[point].layer, []).append(q)  # type: ignore[index,operator]
    candidates = [(Unit(n, "w"), [q]) for n, q in weights.items() if q.bits < HIGH_BITS]
    candidates += [(Unit(n, "a"), qs) for n, qs in by_layer.items() if min(q.bits for q in qs) < HIGH_BITS]
    with progress_bar() as bar:
        task = bar.add_task("ranking layers", total=len(candidates))
        for unit, quantizers in candidates:
            kept = [q.bits for q in quantizers]
            for q in quantizers:
                q.bits = HIGH_BITS  # same range on a finer grid: enough to rank
            loss, _ = val.score(gm)
            for q, bits in zip(quantizers, kept, strict=True):
                q.bits = bits
            gains.append((base - loss, unit))
            bar.advance(task)
    return [unit for _, unit in sorted(gains, key=lambda g: -g[0])]


def _latency(fp32: Any, candidate: Any, size: int) -> dict[str, float]:
    """Batch-1 p50 and speed-up against the FP32 ONNX model, from a short interleaved measurement."""
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    timers = {n: (lambda s=s: s.run(None, {INPUT_NAME: x})) for n, s in (("fp32", fp32), ("candidate", candidate))}
    measured = interleaved(timers, 5, 60, 6, "latency")  # type: ignore[arg-type]
    return {
        "p50_ms": measured["candidate"].latency(1).p50_ms,
        "speedup": paired_speedup("fp32", measured["fp32"], measured["candidate"]).ratio,
    }


def control(config: QuantConfig, max_drop: float, ctx: Context) -> tuple[QuantConfig, fx.GraphModule, dict[str, Any]]:
    """The config whose artifact is within `max_drop` points of FP32 on the validation images, its model, and the steps."""
    fp32 = _session(trace(ctx.model), "ort", ctx)
    fp32_top1 = _top1(fp32, ctx.val)
    gm = quantize_with(config, ctx)
    session = artifact(gm, ctx)
    top1 = _top1(session, ctx.val)
    steps = [{"changed": None, "to": None, "top1": round(top1, 3), "drop": round(fp32_top1 - top1, 3),
              **_latency(fp32, session, ctx.meta.input_size)}]  # fmt: skip
    order = rank(gm, ctx.val) if fp32_top1 - top1 > max_drop else []
    plan = [(u, "8") for u in order] + [(u, "float") for u in order]
    plan += [(Unit(n, "w"), "float") for n, b in gm.quant_weights.items() if b == HIGH_BITS]  # type: ignore[attr-defined,operator]
    overrides = list(config.overrides)
    for unit, to in plan:
        if fp32_top1 - top1 <= max_drop:
            break
        overrides.append(Override(pattern=unit.layer, spec=unit.spec(to)))
        config = QuantConfig(w=config.w, a=config.a, overrides=tuple(overrides))
        gm = quantize_with(config, ctx)
        session = artifact(gm, ctx)
        top1 = _top1(session, ctx.val)
        steps.append({"changed": unit.layer, "role": unit.role, "to": to, "top1": round(top1, 3), "drop": round(fp32_top1 - top1, 3),
                      **_latency(fp32, session, ctx.meta.input_size)})  # fmt: skip
        console.print(f"accuracy control: {unit.layer} ({'weights' if unit.role == 'w' else 'activation'}) -> {to}: "
                      f"top-1 {top1:.2f}% (FP32 {fp32_top1:.2f}%)", highlight=False)  # fmt: skip
    met = fp32_top1 - top1 <= max_drop
    report = {"max_drop": max_drop, "fp32_onnx_top1": round(fp32_top1, 3), "met": met, "steps": steps,
              "validation_images": len(ctx.val.labels), "fallbacks": len(steps) - 1}  # fmt: skip
    console.print(steps_table(report))
    if not met:
        raise UserError(f"--max-drop {max_drop}: the artifact stays {fp32_top1 - top1:.2f} points below FP32 on the validation "
                        "images even with every layer given back", "allow a larger drop, or start from more bits")  # fmt: skip
    return config, gm, report


def steps_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"accuracy control (--max-drop {report['max_drop']}): ONNX Runtime artifact, {report['validation_images']} "
                        f"validation images, FP32 ONNX {report['fp32_onnx_top1']:.2f}%")  # fmt: skip
    for column in ("step", "layer given back", "to", "top-1", "drop", "p50 ms @1", "x FP32 @1"):
        table.add_column(column)
    for i, s in enumerate(report["steps"]):
        what = "-" if s["changed"] is None else f"{s['changed']} ({'weights' if s['role'] == 'w' else 'activation'})"
        table.add_row(str(i), what, s["to"] or "-", f"{s['top1']:.2f}%", f"{s['drop']:.2f}", f"{s['p50_ms']:.3f}", f"{s['speedup']:.2f}x")
    return table
