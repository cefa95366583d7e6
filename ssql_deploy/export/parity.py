"""Does the exported graph compute what the PyTorch fake-quant model computes?

Two views: the shipped, fully optimized ONNX Runtime session against PyTorch on the calibration
images (top-1 agreement and logit deviation: what a user sees), and layer by layer, every
quantized activation of the graph (run without ORT's fusions, i.e. plain Q/DQ semantics) against
the same quantizer in PyTorch, in quantization steps (the share of values off by half a step or
more, the largest deviation, and the first layer in graph order where any value differs): the
per-layer debugging that fake-quant vs engine mismatches otherwise need by hand (TensorRT#4063).
The export fails when the first layer past rounding ties is the first that differs at all, or jumps
there from layers within ties: a fault shows where it is, drift grows downstream of the first tie;
and when top-1 agreement is below 99% and below the twin's agreement with itself run in float64.
"""

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper
from torch import fx

from ssql_deploy.export.onnx_graph import INPUT_NAME
from ssql_deploy.export.ort_session import make_session
from ssql_deploy.quant.placement import act_quantizers, quantizer_name

MIN_AGREEMENT = 99.0
# Both sides quantize x / scale with ties to even, so ONNX Runtime (plain Q/DQ) and PyTorch differ only where a
# float accumulation order puts a value on the other side of a rounding boundary: a few values in a hundred
# thousand where divergence first appears. Each flipped value moves many values of the next layer, so the share
# grows downstream (several % by the last block of a ResNet-18 is drift, not a fault, and is reported). A wrong
# scale, zero-point or grid instead shows at once, in the first layer that differs: that layer is judged.
MAX_FIRST_MISMATCH_FRACTION = 0.001
# A later layer can inherit enough flipped values to pass that share by drift alone, but drift grows a few-fold per
# layer: a layer jumping to ten times the share right after layers within it is a fault of its own (a wrong scale).
FAULT_JUMP = 10


def first_departure(layers: dict[str, dict[str, float]]) -> str | None:
    """The first layer, in graph order, where more values differ than rounding ties explain.

    Pooled vectors (a squeeze-excite's, 1x1 per channel) are not judged: every value of one feeds every value of
    the next, so a single flipped input moves a row of them and their share jumps by drift alone; a fault in
    one shows in the full-size product its gate scales, which is judged.
    """
    return next(
        (name for name, row in layers.items() if not row["pooled"] and row["mismatch_fraction"] > MAX_FIRST_MISMATCH_FRACTION), None
    )


def self_agreement_float64(gm: fx.GraphModule, images: Sequence[torch.Tensor], ref_logits: np.ndarray) -> float:
    """Top-1 agreement of the twin with itself in float64: how far rounding ties alone move this model's top-1.

    A network whose quantized output flips on rounding ties (squeeze-excite gates amplify a one-step change of
    their pooled vector; a random-init network's logits are nearly equal) cannot agree with another runtime
    better than with itself summed in another order: on its 512 calibration images a fine-tuned EfficientNet-B0 at
    w8a8 agreed with itself on 92.77% and with ONNX Runtime on 98.63% (benchmarks/results/integer_gates.json). The
    per-layer check still catches real faults.
    """
    twin = copy.deepcopy(gm).double()
    with torch.no_grad():
        logits = np.concatenate([twin(x.double()).numpy() for x in images])
    return 100.0 * float(np.mean(logits.argmax(1) == ref_logits.argmax(1)))


def _torch_outputs(gm: fx.GraphModule, x: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and every activation quantizer's output for one batch: batches are compared one at a time, since all
    activations of a calibration set at 224 px would not fit in memory (MobileNetV2, 512 images: over 20 GB)."""
    captured: dict[str, np.ndarray] = {}
    hooks = [
        q.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().numpy().copy()))
        for name, q in act_quantizers(gm).items()
    ]
    try:
        with torch.no_grad():
            logits = gm(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, captured


def _with_debug_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    debug = onnx.ModelProto()
    debug.CopyFrom(model)
    produced = {o for n in debug.graph.node for o in n.output}
    for name in names:
        if name in produced:
            debug.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return debug


def check_parity(gm: fx.GraphModule, model: onnx.ModelProto, images: Sequence[torch.Tensor], threads: int | None = None) -> dict[str, Any]:
    shipped = make_session(model.SerializeToString(), threads)
    quantizers = act_quantizers(gm)
    dq_names = {f"{quantizer_name(p)}_dq": p for p in quantizers}
    debug = _with_debug_outputs(model, list(dq_names))
    session = make_session(debug.SerializeToString(), threads, optimize=False)
    output_names = [o.name for o in session.get_outputs()]
    per_layer: dict[str, dict[str, float]] = {}
    gm.eval()
    ref_parts, shipped_parts = [], []
    for x in images:
        ref_logits, ref_acts = _torch_outputs(gm, x)
        ref_parts.append(ref_logits)
        shipped_parts.append(shipped.run(None, {INPUT_NAME: x.numpy()})[0])
        for name, value in zip(output_names, session.run(None, {INPUT_NAME: x.numpy()}), strict=True):
            point = dq_names.get(name)
            if point is None:
                continue
            steps = np.abs(value - ref_acts[point]) / float(quantizers[point].qparams().scale)
            row = per_layer.setdefault(point, {"max_steps": 0.0, "mismatched": 0.0, "elements": 0.0, "pooled": value[0, 0].size == 1})
            row["max_steps"] = max(row["max_steps"], float(np.round(steps.max(), 3)))
            row["mismatched"] += float((steps > 0.5).sum())
            row["elements"] += float(steps.size)
    ref_logits, logits = np.concatenate(ref_parts), np.concatenate(shipped_parts)
    agreement = 100.0 * float(np.mean(logits.argmax(1) == ref_logits.argmax(1)))
    order = [
        str(n.target).removeprefix("aq_")
        for n in gm.graph.nodes
        if n.op == "call_module" and str(n.target).removeprefix("aq_") in per_layer
    ]
    layers = {p: {"max_steps": per_layer[p]["max_steps"], "mismatch_fraction": per_layer[p]["mismatched"] / max(per_layer[p]["elements"], 1),
                  "pooled": per_layer[p]["pooled"]} for p in order}  # fmt: skip
    worst = max((r["mismatch_fraction"] for r in layers.values()), default=0.0)
    first = next((p for p, r in layers.items() if r["mismatch_fraction"] > 0), None)
    problems = []
    self_agreement = self_agreement_float64(gm, images, ref_logits) if agreement < MIN_AGREEMENT else None
    if self_agreement is not None and agreement < self_agreement:
        problems.append(f"ONNX Runtime agrees with the PyTorch simulation on only {agreement:.1f}% of calibration images "
                        f"(the simulation agrees with itself in float64 on {self_agreement:.1f}%)")  # fmt: skip
    departure = first_departure(layers)
    if departure is not None and (departure == first or layers[departure]["mismatch_fraction"] > FAULT_JUMP * MAX_FIRST_MISMATCH_FRACTION):
        problems.append(f"{100 * layers[departure]['mismatch_fraction']:.3f}% of the values of {departure} differ from the simulation while "
                        f"every layer before it stays within rounding ties ({100 * MAX_FIRST_MISMATCH_FRACTION:g}%): a systematic difference")  # fmt: skip
    return {
        "images": int(sum(len(x) for x in images)),
        "top1_agreement": agreement,
        "self_agreement_float64": self_agreement,
        "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
        "max_step_deviation": max((r["max_steps"] for r in layers.values()), default=0.0),
        "max_mismatch_fraction": worst,
        "first_mismatch": first,
        "first_departure": departure,
        "per_layer": layers,
        "problems": problems,
        "passed": not problems,
    }
