"""Does the exported graph compute what the PyTorch fake-quant model computes?

Two views: the shipped, fully optimized ONNX Runtime session against PyTorch on the calibration
images (top-1 agreement and logit deviation: what a user sees), and layer by layer, every
quantized activation of the graph (run without ORT's fusions, i.e. plain Q/DQ semantics) against
the same quantizer in PyTorch, in quantization steps: the per-layer debugging that fake-quant vs
engine mismatches otherwise need by hand (TensorRT#4063). Each layer is compared twice. Free
running (both sides from the image) shows how far the two drift apart; given the same inputs (the
twin fed ORT's own upstream activations) shows what each layer does differently by itself. Only the
second is judged: a flipped rounding tie moves many values of the next layers, so by the third
block of a 4-bit network drift alone can pass any share, while a wrong scale, zero-point or grid
shows in its own layer whatever its inputs. The export fails when a layer, given the same inputs,
differs on more values than rounding ties explain, or when top-1 agreement is below 99% (beyond
chance on the images checked) and below the twin's agreement with itself run in float64.
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
# Both sides quantize x / scale with ties to even, so given the same inputs ONNX Runtime (plain Q/DQ) and PyTorch
# differ only where a float accumulation order puts a value on the other side of a rounding boundary: a few values
# in a hundred thousand. A wrong scale, zero-point or grid moves far more than this share of its layer.
MAX_LOCAL_MISMATCH_FRACTION = 0.001
# Top-1 agreement is judged by the upper end of its 95% (Wilson) interval: on 64 images one flipped near-tie is
# 1.6 points, and a model whose logits are nearly equal flips a few by chance (a fault flips many).
_Z95 = 1.96


def first_departure(layers: dict[str, dict[str, Any]]) -> str | None:
    """The first layer, in graph order, that given the same inputs differs on more values than rounding ties explain."""
    return next((name for name, row in layers.items() if row["local_mismatch_fraction"] > MAX_LOCAL_MISMATCH_FRACTION), None)


def agreement_upper_bound(agreeing: int, images: int) -> float:
    """The upper end of the 95% Wilson interval of top-1 agreement, in percent."""
    p, z2 = agreeing / images, _Z95**2
    centre = (p + z2 / (2 * images)) / (1 + z2 / images)
    half = _Z95 * np.sqrt(p * (1 - p) / images + z2 / (4 * images**2)) / (1 + z2 / images)
    return 100.0 * float(min(1.0, centre + half))


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


def _torch_outputs(
    gm: fx.GraphModule, x: torch.Tensor, forced: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and every activation quantizer's output for one batch: batches are compared one at a time, since all
    activations of a calibration set at 224 px would not fit in memory (MobileNetV2, 512 images: over 20 GB).

    With `forced`, each quantizer's output is recorded and then replaced by ONNX Runtime's value at that point, so
    every layer downstream computes from the same inputs as the exported graph.
    """
    captured: dict[str, np.ndarray] = {}

    def hook(name: str, out: torch.Tensor) -> torch.Tensor | None:
        captured[name] = out.detach().numpy().copy()
        return None if forced is None or name not in forced else torch.from_numpy(forced[name])

    hooks = [q.register_forward_hook(lambda _m, _i, out, name=name: hook(name, out)) for name, q in act_quantizers(gm).items()]
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
    counts: dict[str, dict[str, float]] = {}
    gm.eval()
    ref_parts, shipped_parts = [], []
    for x in images:
        ref_logits, free = _torch_outputs(gm, x)
        ref_parts.append(ref_logits)
        shipped_parts.append(shipped.run(None, {INPUT_NAME: x.numpy()})[0])
        ort = {dq_names[n]: v for n, v in zip(output_names, session.run(None, {INPUT_NAME: x.numpy()}), strict=True) if n in dq_names}
        _, local = _torch_outputs(gm, x, forced=ort)
        for point, value in ort.items():
            scale = float(quantizers[point].qparams().scale)
            steps, local_steps = np.abs(value - free[point]) / scale, np.abs(value - local[point]) / scale
            row = counts.setdefault(point, {"max_steps": 0.0, "mismatched": 0.0, "local": 0.0, "elements": 0.0})
            row["max_steps"] = max(row["max_steps"], float(np.round(steps.max(), 3)))
            row["mismatched"] += float((steps > 0.5).sum())
            row["local"] += float((local_steps > 0.5).sum())
            row["elements"] += float(steps.size)
    ref_logits, logits = np.concatenate(ref_parts), np.concatenate(shipped_parts)
    agreeing = int(np.sum(logits.argmax(1) == ref_logits.argmax(1)))
    agreement, upper = 100.0 * agreeing / len(logits), agreement_upper_bound(agreeing, len(logits))
    order = [
        str(n.target).removeprefix("aq_") for n in gm.graph.nodes if n.op == "call_module" and str(n.target).removeprefix("aq_") in counts
    ]
    layers = {p: {"max_steps": counts[p]["max_steps"], "mismatch_fraction": counts[p]["mismatched"] / max(counts[p]["elements"], 1),
                  "local_mismatch_fraction": counts[p]["local"] / max(counts[p]["elements"], 1)} for p in order}  # fmt: skip
    worst = max((r["mismatch_fraction"] for r in layers.values()), default=0.0)
    first = next((p for p, r in layers.items() if r["mismatch_fraction"] > 0), None)
    problems = []
    self_agreement = self_agreement_float64(gm, images, ref_logits) if upper < MIN_AGREEMENT else None
    if self_agreement is not None and upper < self_agreement:
        problems.append(f"ONNX Runtime agrees with the PyTorch simulation on only {agreement:.1f}% of {len(logits)} calibration images "
                        f"(at most {upper:.1f}% at 95% confidence; the simulation agrees with itself in float64 on {self_agreement:.1f}%)")  # fmt: skip
    departure = first_departure(layers)
    if departure is not None:
        problems.append(f"given the same inputs, {100 * layers[departure]['local_mismatch_fraction']:.3f}% of the values of {departure} "
                        f"differ from the simulation (rounding ties explain {100 * MAX_LOCAL_MISMATCH_FRACTION:g}%): a systematic difference")  # fmt: skip
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
