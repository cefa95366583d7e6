"""`ssql-deploy gate`: pass/fail checks on a bench report, for CI (exit 0 all pass, 1 any fails).

Gates are parsed before anything is measured (a pipeline refuses a malformed gate up front). A
gate that names a row or batch the report does not have is a mistake in the CI job, not a failed
model: it is reported as bad input (exit 2) so it cannot pass or fail silently. A row that could
not run here (TensorRT without a GPU) skips its gates unless `strict`; a row that ran but is not
trustworthy (unverified, failed check) fails them. Speed gates judge the paired-round speed-up
bench measured, never a ratio of two separately taken medians.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ssql_deploy.bench.schema import OK, Report, Row, baseline_name
from ssql_deploy.errors import UserError

GateKind = Literal["min_top1", "max_drop", "max_latency_ms", "min_speedup"]
_FLAGS: dict[GateKind, str] = {"min_top1": "--min-top1", "max_drop": "--max-drop", "max_latency_ms": "--max-latency-ms",
                               "min_speedup": "--min-speedup"}  # fmt: skip


@dataclass(frozen=True)
class GateSpec:
    kind: GateKind
    target: str  # a row name; for max_drop a bit spec that selects rows
    batch: str | None
    value: float


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool | None  # None: the row was skipped (e.g. no TensorRT here), so nothing to judge
    detail: str


def _parse(kind: GateKind, spec: str) -> GateSpec:
    flag, with_batch = _FLAGS[kind], kind in ("max_latency_ms", "min_speedup")
    try:
        left, value = spec.rsplit("=", 1)
        number = float(value)
    except ValueError:
        form = "NAME@BATCH=VALUE" if with_batch else ("BITS=POINTS" if kind == "max_drop" else "NAME=VALUE")
        raise UserError(f"malformed {flag} {spec!r}", f"write it as {form}") from None
    if not with_batch:
        return GateSpec(kind, left, None, number)
    if "@" not in left:
        raise UserError(f"malformed {flag} {spec!r}: no batch size", "write it as NAME@BATCH=VALUE, e.g. qdq-ort-w8a8@32=3.5")
    name, batch = left.rsplit("@", 1)
    return GateSpec(kind, name, batch, number)


def parse_gates(min_top1: list[str], max_drop: list[str], max_latency_ms: list[str], min_speedup: list[str]) -> list[GateSpec]:
    given: dict[GateKind, list[str]] = {
        "min_top1": min_top1,
        "max_drop": max_drop,
        "max_latency_ms": max_latency_ms,
        "min_speedup": min_speedup,
    }
    if not any(given.values()):
        raise UserError("no gates given", "add --min-top1, --max-drop, --max-latency-ms or --min-speedup")
    return [_parse(kind, spec) for kind, specs in given.items() for spec in specs]


def _judge(row: Row, strict: bool, check: Callable[[], tuple[bool, str]]) -> tuple[bool | None, str]:
    if row.skipped:
        return (False if strict else None), row.status + (" (--strict)" if strict else "")
    if row.status != OK:
        return False, row.status
    return check()


def _timed(row: Row, batch: str) -> None:
    if row.status == OK and batch not in row.latency:
        raise UserError(f"row {row.name!r} was not timed at batch {batch}", f"timed batches: {', '.join(row.latency) or 'none'}")


def _evaluate(report: Report, g: GateSpec, strict: bool) -> list[GateResult]:
    if g.kind == "max_drop":
        rows = [r for r in report.rows if r.bits == g.target]
        if not rows:
            raise UserError(f"the report has no {g.target} rows for --max-drop",
                            f"bit-widths: {', '.join(sorted({r.bits for r in report.rows}))}")  # fmt: skip
        results = []
        for row in rows:
            base = next((r for r in report.rows if r.name == baseline_name(row) and r.top1 is not None), None)

            def drop(row: Row = row, base: Row | None = base) -> tuple[bool, str]:
                if base is None or row.top1 is None:
                    return False, "no FP32 baseline measured"
                points = base.top1 - row.top1  # type: ignore[operator]
                return points <= g.value, f"{points:.2f} points below {base.name}"

            results.append(GateResult(f"{row.name} drops <= {g.value:g} points", *_judge(row, strict, drop)))
        return results
    row = report.row(g.target)
    if g.kind == "min_top1":
        return [GateResult(f"top-1 of {row.name} >= {g.value:g}%",
                           *_judge(row, strict, lambda: (row.top1 is not None and row.top1 >= g.value, f"{row.top1}%")))]  # fmt: skip
    assert g.batch is not None
    batch = g.batch
    _timed(row, batch)
    if g.kind == "max_latency_ms":
        return [GateResult(f"p50 of {row.name} @{batch} <= {g.value:g} ms",
                           *_judge(row, strict, lambda: (row.latency[batch].p50_ms <= g.value, f"{row.latency[batch].p50_ms:.3f} ms")))]  # fmt: skip

    def speed() -> tuple[bool, str]:
        s = row.speedup.get(batch)
        if s is None:
            return False, f"no paired speed-up against {baseline_name(row) or 'a baseline'} at batch {batch}"
        return s.ratio >= g.value, f"{s.ratio:.2f}x vs {s.baseline} (rounds {s.low:.2f}-{s.high:.2f}x)"

    return [GateResult(f"speed-up of {row.name} @{batch} >= {g.value:g}x", *_judge(row, strict, speed))]


def evaluate_gates(report: Report, gates: list[GateSpec], strict: bool = False) -> list[GateResult]:
    return [result for g in gates for result in _evaluate(report, g, strict)]
