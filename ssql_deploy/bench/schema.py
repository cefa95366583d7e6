"""The bench report as typed data: what `bench` writes to report.json and what `gate` reads back.

A gate job that points at a report from elsewhere (hand-edited, another tool, an older version)
gets the missing or malformed field named, instead of a KeyError deep in a comparison.
"""

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ssql_deploy.errors import UserError
from ssql_deploy.runtimes import RUNTIMES

OK = "ok"


class Latency(BaseModel):
    p50_ms: float
    p90_ms: float
    images_per_s: float
    rounds: int = 1


class Speedup(BaseModel):
    """Against `baseline`, from paired rounds: each round times both, the ratio is taken per round."""

    baseline: str
    ratio: float  # median over rounds of baseline time / this row's time
    low: float  # smallest and largest per-round ratio: the spread a gate should expect
    high: float


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    runtime: str  # a row of runtimes.RUNTIMES
    bits: str  # fp32 | fp16 | the quantized model's name (its config label, -lsq after QAT)
    engine: str | None = None  # the export target whose graph this is (runtimes.ENGINES)
    status: str  # ok | skipped: ... | unverified: ... | check failed: ... | export failed: ...
    top1: float | None
    n_images: int = 0
    agreement: float | None = None  # % of test images predicted as by the PyTorch model of the same layout
    agreement_with: str | None = None
    layout_agreement: float | None = None  # that PyTorch model against the SSQL-layout simulation
    latency: dict[str, Latency]
    speedup: dict[str, Speedup] = {}
    size_bytes: int | None = None
    runtime_detail: str | None = None
    notes: list[str] = []

    @property
    def skipped(self) -> bool:
        return self.status.startswith("skipped")


class Env(BaseModel):
    cpu: str
    threads: int
    data: str
    runs: int
    warmup: int
    rounds: int = 1
    cores: int | None = None
    platform: str = ""
    onnxruntime_providers: list[str] = []
    cuda: bool = False
    versions: dict[str, str] = {}


class Report(BaseModel):
    env: Env
    rows: list[Row] = Field(min_length=1)
    notes: list[str] = []

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise UserError(f"the report has no row {name!r}", f"rows: {', '.join(r.name for r in self.rows)}")


def baseline_name(row: Row) -> str | None:
    """The row a speed-up is measured against; None for a baseline itself."""
    runtime = RUNTIMES.get(row.runtime)  # type: ignore[call-overload]
    base = runtime.baseline if runtime is not None else None
    return None if base == row.name else base


def load_report(path: Path) -> Report:
    if not path.is_file():
        raise UserError(f"report {path} does not exist", "pass the report.json written by `ssql-deploy bench`")
    try:
        data: Any = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not JSON", "pass the report.json written by `ssql-deploy bench`") from None
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "the top level"
        raise UserError(
            f"{path} is not a bench report of this version: {where}: {err['msg'].lower()}",
            "pass the report.json written by `ssql-deploy bench` (re-run bench to refresh an old one)",
        ) from None
