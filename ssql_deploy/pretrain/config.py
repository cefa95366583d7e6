"""The seven pretraining methods' defaults and the checks a pretraining recipe must pass.

Kept free of torch so that validating a recipe (which happens on every CLI call) stays cheap.
Numbers follow SSQL.md and the SSQL reference CIFAR configs (configs/cifar/resnet18_*_cifar.yaml,
DIM and HIDDEN_DIM): SimSiam projector 3x2048 with BN and a 2048-d-hidden predictor (the reference
builds it with HIDDEN_DIM = 2048 on CIFAR, not the 512-d bottleneck of SimSiam's ImageNet recipe);
BYOL the same projector into 512-d, predictor hidden 2048, EMA 0.99; MoCo v2 a 2-layer MLP into
256-d, queue 4096, temperature 0.2, EMA 0.999; SimCLR the MoCo head with temperature 0.5.
"""

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from ssql_deploy.errors import UserError

Family = Literal["simsiam", "byol", "moco", "simclr"]
BIT_MIN, BIT_MAX = 2, 8
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


@dataclass(frozen=True)
class MethodInfo:
    """What distinguishes a method: its SSL family, whether it adds SSQL, and its head defaults."""

    family: Family
    ssql: bool
    proj_layers: int  # 3 = SimSiam's Linear-BN-ReLU x2 + Linear-BN; 2 = MoCo v2's Linear-ReLU-Linear
    proj_hidden_dim: int
    proj_dim: int
    pred_hidden_dim: int | None  # None: the method has no predictor
    ema_momentum: float | None  # None: no momentum target
    temperature: float | None  # None: not a contrastive loss


_SIMSIAM = MethodInfo("simsiam", False, 3, 2048, 2048, 2048, None, None)
_BYOL = MethodInfo("byol", False, 3, 2048, 512, 2048, 0.99, None)
_MOCO = MethodInfo("moco", False, 2, 2048, 256, None, 0.999, 0.2)
_SIMCLR = MethodInfo("simclr", False, 2, 2048, 256, None, None, 0.5)

METHODS: dict[str, MethodInfo] = {
    "simsiam": _SIMSIAM,
    "ssql": replace(_SIMSIAM, ssql=True),
    "byol": _BYOL,
    "byol-ssql": replace(_BYOL, ssql=True),
    "moco": _MOCO,
    "ssql-nce": replace(_MOCO, ssql=True),
    "simclr": _SIMCLR,
}
# Recipe keys that only mean something when a quantized branch exists.
SSQL_ONLY = ("w_bits", "a_bits", "fixed_bits", "quantize_target", "aux_loss")


def method_info(name: str) -> MethodInfo:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}", f"choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def parse_bit_range(text: str | int, role: str) -> tuple[int, int]:
    """'2-8' -> (2, 8); '4' -> (4, 4). Inclusive, so the range a user writes is the one sampled."""
    match = _RANGE.match(str(text))
    if match is None:
        raise UserError(f"malformed {role} bit range {text!r}", "write LOW-HIGH such as 2-8, or one width such as 4")
    low = int(match[1])
    high = int(match[2]) if match[2] is not None else low
    if low > high:
        raise UserError(f"{role} bit range {text!r} is empty ({low} > {high})", f"write it low-high, e.g. {high}-{low}")
    if low < BIT_MIN or high > BIT_MAX:
        raise UserError(f"{role} bit range {text!r} is outside {BIT_MIN}..{BIT_MAX}", f"keep both ends within {BIT_MIN}..{BIT_MAX}")
    return low, high


def format_range(bounds: tuple[int, int]) -> str:
    return f"{bounds[0]}-{bounds[1]}"


def resolve(recipe: Any) -> None:
    """Fill the method-dependent defaults left as None and refuse settings that cannot apply.

    Flags a user set explicitly but that the method ignores are errors, not silent no-ops: asking
    SimSiam for `--fixed-bits w4a4` would otherwise train a float model the user thinks is 4-bit.
    """
    info = method_info(recipe.method)
    explicit = set(recipe.model_fields_set)  # a copy: the setattr calls below add to the live set
    if not info.ssql:
        wrong = [key for key in SSQL_ONLY if key in explicit]
        if wrong:
            raise UserError(
                f"{wrong[0]} only applies to the SSQL methods, not {recipe.method!r}",
                "use --method ssql, byol-ssql or ssql-nce, or drop that setting",
            )
    if recipe.fixed_bits is not None:
        if {"w_bits", "a_bits"} & explicit:
            raise UserError("give fixed_bits or w_bits/a_bits ranges, not both", "--fixed-bits w4a4 fixes both widths")
        from ssql_deploy.quant.bits import BitSpec

        spec = BitSpec.parse(recipe.fixed_bits)
        recipe.fixed_bits = str(spec)
        recipe.w_bits, recipe.a_bits = f"{spec.w}-{spec.w}", f"{spec.a}-{spec.a}"
    recipe.w_bits = format_range(parse_bit_range(recipe.w_bits, "weight"))
    recipe.a_bits = format_range(parse_bit_range(recipe.a_bits, "activation"))
    if recipe.quantize_target and recipe.method != "ssql":
        raise UserError(
            f"quantize_target is the SimSiam ablation of SSQL (paper Table 8) and is not defined for {recipe.method!r}",
            "use it with --method ssql",
        )
    if recipe.batch_size < 2:
        raise UserError(
            f"batch size {recipe.batch_size} gives {recipe.method} no pairs to compare (and BatchNorm no statistics)",
            "use --batch-size 2 or more per process",
        )
    for key in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim", "ema_momentum", "temperature"):
        if getattr(recipe, key) is None:
            setattr(recipe, key, getattr(info, key))
    if "pred_hidden_dim" in explicit and info.pred_hidden_dim is None:
        raise UserError(f"{recipe.method} has no predictor, so pred_hidden_dim does not apply", "drop that setting")
    if "ema_momentum" in explicit and info.ema_momentum is None:
        raise UserError(f"{recipe.method} has no momentum target, so ema_momentum does not apply", "drop that setting")
    if "temperature" in explicit and info.temperature is None:
        raise UserError(f"{recipe.method} is not contrastive, so temperature does not apply", "drop that setting")
    if "queue_size" in explicit and info.family != "moco":
        raise UserError(f"{recipe.method} keeps no queue, so queue_size does not apply", "use it with moco or ssql-nce")
