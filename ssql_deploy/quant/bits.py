"""Bit-width specs such as `w4a4`, `w2a8` or plain `8` (meaning w8a8)."""

import re
from dataclasses import dataclass

from ssql_deploy.errors import UserError

MIN_BITS = 2
MAX_BITS = 8
_SPEC = re.compile(r"^(?:w(?P<w>\d+)a(?P<a>\d+)|(?P<both>\d+))$")


@dataclass(frozen=True)
class BitSpec:
    w: int
    a: int

    def __post_init__(self) -> None:
        for role, bits in (("weight", self.w), ("activation", self.a)):
            if not MIN_BITS <= bits <= MAX_BITS:
                raise UserError(
                    f"{role} bits {bits} are outside {MIN_BITS}..{MAX_BITS}",
                    f"use a spec like w4a4, w2a8 or 8 with each width in {MIN_BITS}..{MAX_BITS}",
                )

    @classmethod
    def parse(cls, text: str | int) -> "BitSpec":
        match = _SPEC.match(str(text).strip().lower())
        if match is None:
            raise UserError(f"malformed bit spec {text!r}", "write wXaY (for example w4a4) or a single width such as 8")
        if match["both"] is not None:
            return cls(int(match["both"]), int(match["both"]))
        return cls(int(match["w"]), int(match["a"]))

    def __str__(self) -> str:
        return f"w{self.w}a{self.a}"
