"""How a model is quantized, as data: default widths, then ordered overrides by module-name pattern.

ModelOpt and torchao describe quantization by a config object, not by code; this is ours. A
`QuantConfig` holds the default weight and activation widths and a list of overrides, each a
module-name pattern (fnmatch: `features.0.*`, `*.conv.1.*`, `classifier.*`) with a spec (`w8a8`,
`w6`, `a8`, `float`). Patterns apply in order, later ones winning; a model's stem patterns are a
default first override at w8a8 (SSQL keeps the stem at 8 bits), so a user's override of the stem
wins over it. `w` applies to the weights of the matched conv layers, `a` to the activation
quantizer right after each matched module. The config names itself by a label: `w4a4` when it has
no user override, `w4a4-1a2b3c` (a hash of the overrides) when it has, so directories and reports
stay stable and distinct.
"""

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from ssql_deploy.errors import UserError
from ssql_deploy.quant.bits import MAX_BITS, MIN_BITS, BitSpec

STEM_BITS = 8
_SPEC = re.compile(r"^(?:w(?P<w>\d+))?(?:a(?P<a>\d+))?$")


def _check(bits: int | None, role: str, where: str) -> int | None:
    if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{where}: {role} bits {bits} are outside {MIN_BITS}..{MAX_BITS}", "use widths from 2 to 8, or `float`")
    return bits


class LayerSpec(BaseModel):
    """What an override sets: weight and/or activation bits (None: inherited), or float (no quantizer at all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    w: int | None = None
    a: int | None = None
    float: bool = False

    @classmethod
    def parse(cls, spec: "str | int | dict[str, Any] | LayerSpec", where: str) -> "LayerSpec":
        if isinstance(spec, LayerSpec):
            return spec
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"w", "a", "float"})
            if unknown:
                raise UserError(f"{where}: unknown key {unknown[0]!r} in a layer spec", "write {w: 6}, {a: 8}, {w: 8, a: 8} or float")
            return cls(
                w=_check(spec.get("w"), "weight", where), a=_check(spec.get("a"), "activation", where), float=bool(spec.get("float"))
            )
        text = str(spec).strip().lower()
        if text in ("float", "fp32", "fp"):
            return cls(float=True)
        if text.isdigit():
            bits = BitSpec.parse(text)
            return cls(w=bits.w, a=bits.a)
        match = _SPEC.match(text)
        if not text or match is None:
            raise UserError(f"{where}: malformed layer spec {spec!r}", "write w8a8, w6, a8 or float")
        w, a = (int(match[k]) if match[k] else None for k in ("w", "a"))
        return cls(w=_check(w, "weight", where), a=_check(a, "activation", where))

    def __str__(self) -> str:
        return "float" if self.float else "".join(f"{k}{v}" for k, v in (("w", self.w), ("a", self.a)) if v is not None)


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pattern: str
    spec: LayerSpec


class QuantConfig(BaseModel):
    """Default widths and the user's ordered overrides; `resolve` turns them into per-layer widths for one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    w: int
    a: int
    overrides: tuple[Override, ...] = ()

    @field_validator("w", "a")
    @classmethod
    def _in_range(cls, bits: int) -> int:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits {bits} are outside {MIN_BITS}..{MAX_BITS}")
        return bits

    @classmethod
    def from_bits(cls, bits: str | BitSpec, layer_bits: Iterable[str] | Mapping[str, Any] = ()) -> "QuantConfig":
        """`--bits w4a4` with `--layer-bits PATTERN=SPEC` overrides (in the order given), or a recipe's {PATTERN: SPEC}."""
        spec = bits if isinstance(bits, BitSpec) else BitSpec.parse(bits)
        overrides = []
        if isinstance(layer_bits, Mapping):
            for pattern, value in layer_bits.items():
                overrides.append(Override(pattern=str(pattern), spec=LayerSpec.parse(value, f"layer_bits {pattern!r}")))
        else:
            for text in layer_bits:
                pattern, sep, value = str(text).rpartition("=")
                if not sep or not pattern.strip():
                    raise UserError(
                        f"malformed --layer-bits {text!r}", "write PATTERN=SPEC, e.g. 'features.0.*=w8a8' or 'classifier.*=float'"
                    )
                overrides.append(Override(pattern=pattern.strip(), spec=LayerSpec.parse(value, f"--layer-bits {text!r}")))
        return cls(w=spec.w, a=spec.a, overrides=tuple(overrides))

    def override_specs(self) -> list[str]:
        """The overrides as `--layer-bits` values (PATTERN=SPEC), in order: how recipes and manifests record them."""
        return [f"{o.pattern}={o.spec}" for o in self.overrides]

    @property
    def default(self) -> BitSpec:
        return BitSpec(self.w, self.a)

    @property
    def label(self) -> str:
        if not self.overrides:
            return str(self.default)
        canonical = json.dumps([[o.pattern, str(o.spec)] for o in self.overrides])
        return f"{self.default}-{hashlib.sha256(canonical.encode()).hexdigest()[:6]}"

    def describe(self) -> str:
        return ", ".join([str(self.default), *(f"{o.pattern}={o.spec}" for o in self.overrides)])


@dataclass(frozen=True)
class Resolved:
    """The widths a config gives one model: a module's weight bits and the bits of the activation after it."""

    config: QuantConfig
    stem: tuple[str, ...]
    modules: tuple[str, ...]  # every module name of the model, to refuse a pattern that names none

    def _chain(self) -> list[tuple[str, LayerSpec]]:
        return [(p, LayerSpec(w=STEM_BITS, a=STEM_BITS)) for p in self.stem] + [(o.pattern, o.spec) for o in self.config.overrides]

    def _lookup(self, name: str, role: str, default: int) -> int | None:
        bits: int | None = default
        for pattern, spec in self._chain():
            if fnmatch.fnmatchcase(name, pattern):
                value = spec.w if role == "w" else spec.a
                bits = None if spec.float else (value if value is not None else bits)
        return bits

    def weight_bits(self, layer: str) -> int | None:
        return self._lookup(layer, "w", self.config.w)

    def act_bits(self, producer: str) -> int | None:
        return self._lookup(producer, "a", self.config.a)

    def check(self) -> None:
        """Every user override must name at least one module: a typo is an error, not a silent no-op."""
        for o in self.config.overrides:
            if not any(fnmatch.fnmatchcase(m, o.pattern) for m in self.modules):
                close = [m for m in self.modules if o.pattern.split(".")[0].strip("*") in m][:3]
                raise UserError(f"layer pattern {o.pattern!r} matches no module of the model",
                                f"module names look like {', '.join(close or self.modules[:3])} (see the per-layer table)")  # fmt: skip


def resolve(config: QuantConfig, stem: tuple[str, ...], modules: Iterable[str]) -> Resolved:
    resolved = Resolved(config, stem, tuple(modules))
    resolved.check()
    return resolved


def load_config(path: Path) -> QuantConfig:
    """A config.json that `quantize` wrote beside a quantized model (`--config`)."""
    try:
        return QuantConfig.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise UserError(
            f"config file {path} does not exist", "pass the config.json of a quantized model (RUN/quant/VARIANT/config.json)"
        ) from None
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path} is not a quantization config ({first})", "pass the config.json `ssql-deploy quantize` wrote") from None
