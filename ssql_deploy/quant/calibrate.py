"""Post-training calibration: one float pass over the calibration images fills every calibrator."""

from collections.abc import Iterable

import torch
from torch import fx

from ssql_deploy.errors import UserError
from ssql_deploy.progress import progress_bar
from ssql_deploy.quant.calibrators import CalibratorName, NonFiniteActivation, make_calibrator
from ssql_deploy.quant.placement import act_quantizers

MIN_CALIB_IMAGES = 32


@torch.no_grad()
def calibrate(
    gm: fx.GraphModule,
    batches: Iterable[torch.Tensor],
    method: CalibratorName,
    percentile: float = 99.99,
    points: Iterable[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Set the range of the activation quantizers named in `points` (all by default) and enable them.

    Activations are collected with weights quantized and activations in float, in one pass, as
    ModelOpt and ONNX Runtime do; the ranges are then computed for each quantizer's own grid.
    """
    quantizers = act_quantizers(gm)
    chosen = {name: quantizers[name] for name in (points if points is not None else quantizers)}
    if not chosen:
        return {}
    for q in quantizers.values():
        q.enabled = False
    for name, q in chosen.items():
        q.calibrator = make_calibrator(method, percentile)
        q.calibrator.name = name
    gm.eval()
    seen = 0
    try:
        batches = list(batches) if not isinstance(batches, list) else batches
        with progress_bar() as bar:
            task = bar.add_task(f"calibrating ({method})", total=len(batches))
            for x in batches:
                if not torch.isfinite(x).all():
                    raise UserError("calibration images contain NaN or inf", "check the dataset files and transforms")
                try:
                    gm(x)
                except NonFiniteActivation as exc:
                    raise UserError(
                        f"calibration produced NaN or inf activations at {exc}",
                        "the checkpoint has probably diverged; re-train it or pick an earlier checkpoint",
                    ) from None
                seen += x.shape[0]
                bar.advance(task)
        if seen < MIN_CALIB_IMAGES:
            raise UserError(
                f"calibration set has {seen} images, fewer than the {MIN_CALIB_IMAGES} needed for stable ranges",
                f"pass --calib-size {MIN_CALIB_IMAGES} or more and a dataset split with that many images",
            )
        ranges: dict[str, tuple[float, float]] = {}
        for name, q in chosen.items():
            assert q.calibrator is not None
            lo, hi = q.calibrator.compute_range(q.bits, q.signed)
            q.set_range(lo, hi)
            ranges[name] = (lo, hi)
    finally:
        for q in chosen.values():
            q.calibrator = None
    for q in quantizers.values():
        q.enabled = True
    return ranges
