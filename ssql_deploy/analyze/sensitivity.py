"""Per-layer sensitivity: what quantizing one layer alone, at one width, costs the task.

Each quantizer of the model's fake-quant twin (the `ssql` layout `quantize` simulates) is switched
on alone, every other one off, at each width, and the model is scored on labelled validation
images drawn from the training split apart from the calibration images (calib_set.py), so a plan
chosen from these numbers is not fitted to the test split it is later judged on. A layer's weights
and the activation after it are measured separately, because a `QuantConfig` sets their widths
separately. Each score yields both the change of the mean cross-entropy (`loss`) and the top-1
drop in points (`top1`); `--metric` picks which one ranks the layers. `hessian` replaces the
weight evaluations by HAWQ-v2's estimate, mean Hessian trace x squared quantization error, with
the trace from Hutchinson's estimator; activations have no weights to perturb and are still
measured by loss.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ssql_deploy.progress import progress_bar
from ssql_deploy.quant.calibrate import calibrate
from ssql_deploy.quant.calibrators import CalibratorName
from ssql_deploy.quant.placement import act_quantizers, conv_input_points, weight_quantizers
from ssql_deploy.quant.quantizer import ActQuantizer, WeightQuantizer
from ssql_deploy.recipe import Metric

HESSIAN_BATCH = 128  # images in the one batch whose loss Hutchinson's estimator differentiates twice


@dataclass(frozen=True)
class Validation:
    """Labelled images the sensitivity is scored on, in batches of `batch`."""

    images: torch.Tensor
    labels: torch.Tensor
    batch: int = 256

    @torch.no_grad()
    def score(self, model: nn.Module) -> tuple[float, float]:
        """Mean cross-entropy and top-1 (%) of `model` on these images."""
        loss, correct = 0.0, 0
        for x, y in zip(self.images.split(self.batch), self.labels.split(self.batch), strict=True):
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        n = len(self.labels)
        return loss / n, 100.0 * correct / n


@dataclass
class Settings:
    bits: tuple[int, ...]
    metric: Metric
    calibrator: CalibratorName
    percentile: float
    hutchinson_samples: int = 32
    seed: int = 0


def _all_off(gm: fx.GraphModule) -> None:
    for q in act_quantizers(gm).values():
        q.enabled = False
    for w in weight_quantizers(gm).values():
        w.enabled = False


def _ranges_per_width(gm: fx.GraphModule, calib: list[torch.Tensor], settings: Settings) -> dict[int, dict[str, tuple[float, float]]]:
    """Each activation quantizer's calibrated range at each width, collected on the float model (weights unquantized)."""
    acts = act_quantizers(gm)
    ranges = {}
    for bits in settings.bits:
        for w in weight_quantizers(gm).values():
            w.enabled = False
        for q in acts.values():
            q.bits = bits
        ranges[bits] = calibrate(gm, calib, settings.calibrator, settings.percentile)
    return ranges


def hutchinson_traces(gm: fx.GraphModule, convs: dict[str, nn.Conv2d], val: Validation, samples: int, seed: int) -> dict[str, float]:
    """tr(H) of the loss with respect to each conv's weights, as the mean of v^T H v over Rademacher vectors v."""
    _all_off(gm)
    params = [conv.weight for conv in convs.values()]
    x, y = val.images[:HESSIAN_BATCH], val.labels[:HESSIAN_BATCH]
    with torch.enable_grad():
        loss = F.cross_entropy(gm(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        generator = torch.Generator().manual_seed(seed)
        traces = torch.zeros(len(params), dtype=torch.float64)
        with progress_bar() as bar:
            task = bar.add_task("Hessian traces (Hutchinson)", total=samples)
            for _ in range(samples):
                vs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in params]
                hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                traces += torch.tensor([float((hv * v).sum()) for hv, v in zip(hvs, vs, strict=True)], dtype=torch.float64)
                bar.advance(task)
    return {name: float(t) / samples for name, t in zip(convs, traces, strict=True)}


@torch.no_grad()
def _quantization_error(quantizer: WeightQuantizer, weight: torch.Tensor, bits: int) -> float:
    kept = quantizer.bits, quantizer.enabled
    quantizer.bits, quantizer.enabled = bits, True
    error = float((quantizer(weight) - weight).pow(2).sum())
    quantizer.bits, quantizer.enabled = kept
    return error


def _one_at_a_time(gm: fx.GraphModule, val: Validation, rows: list[tuple[str, ActQuantizer | WeightQuantizer]], settings: Settings,
                   ranges: dict[int, dict[str, tuple[float, float]]], reference: tuple[float, float]) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Score the model with only `quantizer` on, at each width; yields one result per (name, quantizer)."""
    with progress_bar() as bar:
        task = bar.add_task("sensitivity", total=len(rows) * len(settings.bits))
        for name, quantizer in rows:
            _all_off(gm)
            loss: dict[str, float] = {}
            drop: dict[str, float] = {}
            for bits in settings.bits:
                quantizer.bits = bits
                if isinstance(quantizer, ActQuantizer):
                    quantizer.set_range(*ranges[bits][name])
                quantizer.enabled = True
                q_loss, q_top1 = val.score(gm)
                loss[str(bits)], drop[str(bits)] = round(q_loss - reference[0], 6), round(reference[1] - q_top1, 3)
                bar.update(task, advance=1, status=f"{name} @{bits}")
            yield {"loss": loss, "top1": drop}


@torch.no_grad()
def _sizes(gm: fx.GraphModule, image: torch.Tensor) -> tuple[dict[str, int], dict[str, int]]:
    """Multiply-accumulates of each quantized conv and elements of each activation point, per image."""
    macs: dict[str, int] = {}
    elements: dict[str, int] = {}
    hooks = []
    for name, q in act_quantizers(gm).items():
        hooks.append(q.register_forward_hook(lambda _m, _i, out, name=name: elements.__setitem__(name, out[0].numel())))
    for name in weight_quantizers(gm):
        conv = gm.get_submodule(name)
        per_output = conv.weight[0].numel()  # (in_channels / groups) x kernel area
        hooks.append(conv.register_forward_hook(lambda _m, _i, out, name=name, k=per_output: macs.__setitem__(name, out[0].numel() * k)))
    _all_off(gm)
    gm(image[:1])
    for hook in hooks:
        hook.remove()
    return macs, elements


def measure(gm: fx.GraphModule, val: Validation, calib: list[torch.Tensor], settings: Settings) -> dict[str, Any]:
    """Every quantized layer's weight and activation sensitivity at every width (see the module docstring).

    Leaves `gm`'s quantizers at whatever width was tried last: the twin is an instrument here, not a model to keep."""
    start = time.time()
    wqs = weight_quantizers(gm)
    acts = act_quantizers(gm)
    ranges = _ranges_per_width(gm, calib, settings)
    _all_off(gm)
    reference = val.score(gm)
    convs: dict[str, nn.Conv2d] = {name: gm.get_submodule(name) for name in wqs}  # type: ignore[misc]
    macs, elements = _sizes(gm, val.images)
    inputs = conv_input_points(gm)
    weights: list[dict[str, Any]] = [{"layer": name, "params": conv.weight.numel(), "groups": conv.groups, "macs": macs[name],
                                      "input_point": inputs[name]} for name, conv in convs.items()]  # fmt: skip
    evaluations = 0
    if settings.metric == "hessian":
        traces = hutchinson_traces(gm, convs, val, settings.hutchinson_samples, settings.seed)
        for row in weights:
            name, n = row["layer"], row["params"]
            w = convs[name].weight.detach()
            row["hessian_trace"] = round(traces[name], 6)
            # A negative estimate (curvature of a non-convex loss, or too few samples) says nothing about harm: its size is used.
            row["hessian"] = {str(b): abs(traces[name]) / n * _quantization_error(wqs[name], w, b) for b in settings.bits}
            row["sensitivity"] = row["hessian"]
    else:
        for row, result in zip(weights, _one_at_a_time(gm, val, list(wqs.items()), settings, ranges, reference), strict=True):
            row |= result | {"sensitivity": result[settings.metric]}
            evaluations += len(settings.bits)
    producers: dict[str, Any] = gm.quant_points  # type: ignore[assignment]
    activations: list[dict[str, Any]] = []
    for name, result in zip(acts, _one_at_a_time(gm, val, list(acts.items()), settings, ranges, reference), strict=True):
        activations.append({"point": name, "layer": producers[name].layer, "elements": elements[name], **result,
                            "sensitivity": result["top1" if settings.metric == "top1" else "loss"]})  # fmt: skip
        evaluations += len(settings.bits)
    unit = {"loss": "mean cross-entropy increase (nats)", "top1": "top-1 drop (points)",
            "hessian": "weights: mean Hessian trace x squared quantization error; activations: mean cross-entropy increase"}  # fmt: skip
    return {
        "metric": settings.metric,
        "unit": unit[settings.metric],
        "bits": list(settings.bits),
        "float": {"loss": round(reference[0], 6), "top1": round(reference[1], 3)},
        "weights": weights,
        "activations": activations,
        "evaluations": evaluations,
        "seconds": round(time.time() - start, 1),
    }
