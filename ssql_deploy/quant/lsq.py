"""LSQ quantization-aware training (Esser et al., ICLR 2020), seeded from post-training calibration.

Step sizes are learned per output channel for weights and per tensor for activations, with
LSQ's gradient scale 1/sqrt(N * Qp) and the straight-through estimator (quantizer.py). They
start from the PTQ calibrator's ranges (default: training starts where PTQ ends, so it can
only improve on it) or from LSQ's own 2*mean|x|/sqrt(Qp). The result is saved like a PTQ model
and exported through the same `ort`/`trt` paths, its learned steps frozen into the graph.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ssql_deploy.data import DataSource, train_transform
from ssql_deploy.data.loaders import make_loader
from ssql_deploy.distributed import DistInfo
from ssql_deploy.errors import UserError
from ssql_deploy.finetune.loop import Schedule, fit_classifier
from ssql_deploy.models.checkpoint import load_checkpoint
from ssql_deploy.models.trained import ModelMeta
from ssql_deploy.quant.artifact import init_lsq, quantized_payload
from ssql_deploy.quant.placement import act_quantizers
from ssql_deploy.recipe import QuantizeRecipe
from ssql_deploy.run_layout import BEST, LAST
from ssql_deploy.train_state import check_batchnorm_batch, settings_record

STAGE = "lsq"


def _activation_samples(gm: fx.GraphModule, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What flows into each activation quantizer on one calibration batch (for LSQ's own init rule)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [q.register_forward_hook(lambda _m, i, _o, p=p: seen.__setitem__(p, i[0].detach())) for p, q in act_quantizers(gm).items()]
    with torch.no_grad():
        gm.eval()(images)
    for h in hooks:
        h.remove()
    return seen


def _train_mode(gm: fx.GraphModule, freeze_bn_after: int | None) -> Callable[[int], None]:
    def apply(epoch: int) -> None:
        gm.train()
        if freeze_bn_after is not None and epoch >= freeze_bn_after:  # BN statistics stop moving
            for m in gm.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()

    return apply


def train_lsq(
    gm: fx.GraphModule,
    meta: ModelMeta,
    recipe: QuantizeRecipe,
    source: DataSource,
    calib_batch: torch.Tensor,
    info: dict[str, Any],
    out_dir: Path,
    state: dict[str, Any] | None,
) -> dict[str, Any]:
    """Learn the step sizes (and, unless `train_steps_only`, the weights) of a calibrated model in place.

    `state` is the interrupted run's last.pt when resuming (see finetune.loop.refuse_or_resume).
    """
    assert recipe.epochs is not None
    train_set = source.split("train", recipe.subset, train_transform(source.input_size, source.mean, source.std))
    if len(train_set) < recipe.batch_size:  # type: ignore[arg-type]
        raise UserError(
            f"LSQ needs a training set: {source.data} train has {len(train_set)} images, fewer than one batch of {recipe.batch_size}",  # type: ignore[arg-type]
            "lower --batch-size, raise --subset or point --data at a dataset with a training split",
        )
    check_batchnorm_batch(gm, source.input_size, recipe.batch_size, "raise --batch-size, or use a larger --input-size")
    test_set = source.split("test", recipe.subset)
    one = DistInfo()
    loaders = (make_loader(train_set, recipe.batch_size, True, one, recipe.workers, recipe.seed),
               make_loader(test_set, recipe.batch_size, False, one, recipe.workers, recipe.seed))  # fmt: skip

    calibrated = init_lsq(gm, recipe.lsq_init, _activation_samples(gm, calib_batch) if recipe.lsq_init == "lsq" else None)
    if calibrated:
        print(f"note: {len(calibrated)} activation quantizers hold signed values on an unsigned grid with a zero-point (linear "
              "bottlenecks, residual sums); LSQ keeps their calibrated ranges and learns every other step")  # fmt: skip
    steps = [p for name, p in gm.named_parameters() if name.endswith(".step")]
    params = steps if recipe.train_steps_only else [p for p in gm.parameters()]
    for p in gm.parameters():
        p.requires_grad_(any(p is q for q in params))
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=0.0 if recipe.train_steps_only else recipe.weight_decay)
    sched = Schedule(recipe.epochs, recipe.lr, "cosine", seed=recipe.seed)

    record = settings_record(recipe)

    def payload(kind: str, extra: dict[str, Any]) -> dict[str, Any]:
        return quantized_payload(kind, gm, meta, recipe.variant(), True, **info, **record, **extra)

    metrics = fit_classifier(gm, optimizer, loaders, sched, one, out_dir, STAGE, payload, state, _train_mode(gm, recipe.freeze_bn_after))
    best = load_checkpoint(out_dir / BEST)
    gm.load_state_dict(best["model"])
    return metrics | {"best_epoch": best["epoch"], "trained": "step sizes" if recipe.train_steps_only else "weights and step sizes",
                      "calibrated_ranges_kept": calibrated, "checkpoints": [str(out_dir / BEST), str(out_dir / LAST)]}  # fmt: skip
