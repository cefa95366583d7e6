"""Quantized models on disk: one file holds the float weights, the quantization config, its resolved per-layer
table and every quantizer's state.

A model quantized for simulation (the `ssql` layout) can be rebuilt in any other layout: the
quantizers both layouts share keep their calibrated ranges or learned step sizes, and only the
points a runtime adds (its input, the inputs of residual Adds) are calibrated afresh.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ssql_deploy.errors import UserError
from ssql_deploy.models.checkpoint import load_checkpoint, save_atomic
from ssql_deploy.models.registry import model_spec
from ssql_deploy.models.trained import ModelMeta, build_model, model_payload
from ssql_deploy.quant.config import QuantConfig
from ssql_deploy.quant.placement import RUNTIME_KINDS, Layout, act_quantizers, layer_table, prepare, quantizer_name, weight_quantizers
from ssql_deploy.run_layout import RunLayout, variant


def find_quantized(run_dir: Path, label: str | None, lsq: bool = False) -> Path:
    """The quantized model of a run directory, picked by its label (and --lsq) when it holds several."""
    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist", "pass the --out of an earlier `ssql-deploy quantize`")
    run = RunLayout(run_dir)
    found = run.quantized_models()
    if label is not None:
        path = run.quantized(variant(label, *(["lsq"] if lsq else [])))
        if not path.is_file():
            how = f"--bits {label}" + (" --lsq --epochs N" if lsq else "")
            have = f" (it has {', '.join(p.parent.name for p in found)})" if found else ""
            name = variant(label, *(["lsq"] if lsq else []))
            raise UserError(f"{run_dir} has no {name} model{have}", f"run `ssql-deploy quantize {run_dir} {how}` first")
        return path
    if not found:
        raise UserError(f"{run_dir} holds no quantized model", f"run `ssql-deploy quantize {run_dir} --bits w8a8` first")
    if len(found) > 1:
        names = ", ".join(p.parent.name for p in found)
        raise UserError(f"{run_dir} holds several quantized models ({names})", "pick one with --bits (and --lsq)")
    return found[0]


def quantized_payload(kind: str, gm: fx.GraphModule, meta: ModelMeta, name: str, lsq: bool, **info: Any) -> dict[str, Any]:
    """The model, its name, its config and the resolved per-layer table it produced (reloaded and checked by load_quantized)."""
    points = {point: {"bits": q.bits, "signed": q.signed} for point, q in act_quantizers(gm).items()}
    config: QuantConfig = gm.quant_config  # type: ignore[assignment]
    return model_payload(kind, gm, meta, bits=str(config.default), label=config.label, variant=name, config=config.model_dump(mode="json"),
                         table=layer_table(gm), layout=gm.quant_layout, points=points, lsq=lsq, **info)  # fmt: skip


def save_quantized(path: Path, gm: fx.GraphModule, meta: ModelMeta, name: str, lsq: bool, info: dict[str, Any]) -> None:
    save_atomic(quantized_payload("quantized", gm, meta, name, lsq, **info), path)


def saved_variant(obj: dict[str, Any]) -> str:
    """A saved quantized model's name; files from before names were stored are named from their label and LSQ flag."""
    return str(obj["variant"]) if "variant" in obj else variant(obj.get("label", obj["bits"]), *(["lsq"] if obj["lsq"] else []))


def _widths(table: dict[str, Any]) -> tuple[tuple[tuple[str, Any], ...], ...]:
    return (tuple((r["layer"], r["w"]) for r in table["weights"]), tuple((r["point"], r["a"]) for r in table["activations"]))


def saved_config(obj: dict[str, Any]) -> QuantConfig:
    """The config of a saved quantized model; files from before configs existed carry only their bit spec."""
    return QuantConfig.model_validate(obj["config"]) if "config" in obj else QuantConfig.from_bits(obj["bits"])


@dataclass
class LoadedQuantized:
    gm: fx.GraphModule  # the fake-quant model
    float_model: nn.Module  # the float network it wraps (parameters shared, plain convs)
    meta: ModelMeta
    saved: dict[str, Any]  # the checkpoint as stored
    uncalibrated: set[str]  # points the saved layout did not have: they still need a range


def load_quantized(path: Path, layout: Layout | None = None) -> LoadedQuantized:
    """Rebuild a saved quantized model, in its own layout or another one."""
    obj = load_checkpoint(path)
    if obj.get("kind") not in ("quantized", "model", "trainer-state") or "points" not in obj:
        raise UserError(f"{path} is not a quantized model (kind {obj.get('kind')!r})", "pass the output of `ssql-deploy quantize`")
    return from_payload(obj, layout, str(path))


def from_payload(obj: dict[str, Any], layout: Layout | None = None, where: str = "the quantized model") -> LoadedQuantized:
    """A quantized model's payload (as saved, or `quantized_payload` in memory) rebuilt in `layout`."""
    meta = ModelMeta.from_checkpoint(obj)
    model = build_model(meta)
    wanted = set(model.state_dict())
    model.load_state_dict({k: v for k, v in obj["model"].items() if k in wanted})
    gm = prepare(model, layout or obj["layout"], saved_config(obj), model_spec(meta.arch))
    if (layout is None or layout == obj["layout"]) and "table" in obj:
        if _widths(layer_table(gm)) != _widths(obj["table"]):
            raise UserError(f"{where} resolves to other per-layer widths with this version of ssql-deploy", "quantize the model again")
    missing = restore_quant_state(gm, obj["model"], obj["points"])
    # Only what the layout adds for its runtime may be calibrated afresh: any other point's saved range or learned
    # step would be silently replaced, and the artifact would no longer be the model that was quantized.
    lost = sorted(p for p in missing if gm.quant_points[p].kind not in RUNTIME_KINDS)  # type: ignore[index]
    if lost:
        raise UserError(f"{where} holds no quantizer state for {len(lost)} activation point(s) of the {gm.quant_layout} layout "
                        f"(first: {lost[0]}); exporting it would replace what was calibrated or learned there",
                        "quantize the model again with this version of ssql-deploy")  # fmt: skip
    return LoadedQuantized(gm, model.eval(), meta, obj, missing)


def init_lsq(gm: fx.GraphModule, rule: str | None, samples: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Turn every scale into a learned step, from the calibrated ranges or LSQ's own rule; returns the activation points
    that keep their calibrated range because their grid has a zero-point (see ActQuantizer.learns_step)."""
    for layer, wq in weight_quantizers(gm).items():
        wq.init_lsq(gm.get_submodule(layer).weight, rule or "calibrated")
    kept = []
    for point, q in act_quantizers(gm).items():
        if q.learns_step:
            q.init_lsq(rule or "calibrated", (samples or {}).get(point))
        else:
            kept.append(point)
    return kept


def restore_quant_state(gm: fx.GraphModule, sd: dict[str, torch.Tensor], saved: dict[str, dict[str, Any]]) -> set[str]:
    """Copy ranges and learned steps into `gm`'s quantizers; return the points left uncalibrated."""
    gains: dict[str, torch.Tensor] = getattr(gm, "fold_gains", {})
    for layer, wq in weight_quantizers(gm).items():
        # A folded conv's channels are scaled by gain: steps and scales by |gain|, integers by its sign, biases by gain.
        gain = gains.get(layer, torch.ones(gm.get_submodule(layer).out_channels))
        step = sd.get(f"{layer}.weight_quantizer.step")
        if step is not None:
            wq.step = nn.Parameter(step.clone() * gain.abs().clamp_min(1e-12))
        fixed, fixed_scale = sd.get(f"{layer}.weight_quantizer.fixed"), sd.get(f"{layer}.weight_quantizer.fixed_scale")
        if fixed is not None and fixed_scale is not None:
            wq.fix(fixed.float() * torch.sign(gain).reshape(-1, *([1] * (fixed.dim() - 1))), fixed_scale * gain.abs().clamp_min(1e-12))
        correction = sd.get(f"{layer}.bias_correction")
        if correction is not None:
            gm.get_submodule(layer).bias_correction = correction.clone() * gain
    missing = set()
    for point, q in act_quantizers(gm).items():
        key = quantizer_name(point)
        if point not in saved:
            missing.add(point)
            continue
        step = sd.get(f"{key}.step")
        if step is None:
            q.set_range(float(sd[f"{key}.lo"]), float(sd[f"{key}.hi"]))
        elif (saved[point]["bits"], saved[point]["signed"]) == (q.bits, q.signed):
            q.step = nn.Parameter(step.clone())
        else:  # same clip range on another grid (8-bit unsigned re-expressed as signed int8)
            qmax = 2 ** saved[point]["bits"] - 1 if not saved[point]["signed"] else 2 ** (saved[point]["bits"] - 1) - 1
            hi = float(step.abs().reshape(())) * qmax
            q.set_range(-hi if saved[point]["signed"] else 0.0, hi)
        q.enabled = True
    return missing


def twin_payload(saved: dict[str, Any], gm: fx.GraphModule) -> dict[str, Any]:
    """The PyTorch model an export computes: `saved` rebuilt in `gm`'s layout, with the ranges that layout added.

    Reloading it (load_quantized) gives the same fake-quant graph the export verified, so bench can
    score the artifact's agreement against the model of its own layout rather than the SSQL one.
    """
    points, state = dict(saved["points"]), dict(saved["model"])
    for point, q in act_quantizers(gm).items():
        if point not in points:
            points[point] = {"bits": q.bits, "signed": q.signed}
            state[f"{quantizer_name(point)}.lo"] = q.lo.detach().clone()
            state[f"{quantizer_name(point)}.hi"] = q.hi.detach().clone()
    return saved | {"kind": "quantized", "layout": gm.quant_layout, "points": points, "model": state, "table": layer_table(gm)}
