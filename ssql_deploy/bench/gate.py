"""`ssql-deploy gate`: pass/fail checks on a bench report, for CI (exit 0 all pass, 1 any fails).

A gate that names a row or batch the report does not have is a mistake in the CI job, not a
failed model: it is reported as bad input (exit 2) so it cannot pass or fail silently.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssql_deploy.bench.report import baseline, speedup
from ssql_deploy.errors import UserError


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool | None  # None: the row was skipped (e.g. no TensorRT here), so nothing to judge
    detail: str


def load_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"report {path} does not exist", "pass the report.json written by `ssql-deploy bench`")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not JSON", "pass the report.json written by `ssql-deploy bench`") from None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise UserError(f"{path} is not a bench report (no rows)", "pass the report.json written by `ssql-deploy bench`")
    return report


def _split(spec: str, flag: str, with_batch: bool) -> tuple[str, str | None, float]:
    try:
        left, value = spec.rsplit("=", 1)
        number = float(value)
    except ValueError:
        form = "NAME@BATCH=VALUE" if with_batch else "NAME=VALUE"
        raise UserError(f"malformed {flag} {spec!r}", f"write it as {form}") from None
    if not with_batch:
        return left, None, number
    if "@" not in left:
        raise UserError(f"malformed {flag} {spec!r}: no batch size", "write it as NAME@BATCH=VALUE, e.g. qdq-ort-w8a8@32=3.5")
    name, batch = left.rsplit("@", 1)
    return name, batch, number


def _row(report: dict[str, Any], name: str) -> dict[str, Any]:
    for row in report["rows"]:
        if row["name"] == name:
            return row
    raise UserError(f"the report has no row {name!r}", f"rows: {', '.join(r['name'] for r in report['rows'])}")


def _latency(row: dict[str, Any], batch: str) -> dict[str, float] | None:
    if row["status"] != "ok":
        return None
    if batch not in row["latency"]:
        raise UserError(f"row {row['name']!r} was not timed at batch {batch}", f"timed batches: {', '.join(row['latency'])}")
    return row["latency"][batch]


def evaluate_gates(
    report: dict[str, Any],
    min_top1: list[str] = (),  # type: ignore[assignment]
    max_drop: list[str] = (),  # type: ignore[assignment]
    max_latency_ms: list[str] = (),  # type: ignore[assignment]
    min_speedup: list[str] = (),  # type: ignore[assignment]
) -> list[GateResult]:
    if not (min_top1 or max_drop or max_latency_ms or min_speedup):
        raise UserError("no gates given", "add --min-top1, --max-drop, --max-latency-ms or --min-speedup")
    results = []
    for spec in min_top1:
        name, _, value = _split(spec, "--min-top1", False)
        row = _row(report, name)
        top1 = row["top1"]
        results.append(GateResult(f"top-1 of {name} >= {value:g}%", top1 is not None and top1 >= value, _status(row, f"{top1}%")))
    for spec in max_drop:
        bits, _, points = _split(spec, "--max-drop", False)
        rows = [r for r in report["rows"] if r["bits"] == bits]
        if not rows:
            raise UserError(
                f"the report has no {bits} rows for --max-drop", f"bit-widths: {', '.join(sorted({r['bits'] for r in report['rows']}))}"
            )
        for row in rows:
            if row["status"].startswith("skipped"):
                results.append(GateResult(f"{row['name']} drops <= {points:g} points", None, row["status"]))
                continue
            base = baseline(report["rows"], row)
            drop = None if base is None or row["top1"] is None else base["top1"] - row["top1"]
            ok = drop is not None and drop <= points
            detail = _status(row, f"{drop:.2f} points below {base['name']}" if drop is not None and base else "no FP32 baseline")
            results.append(GateResult(f"{row['name']} drops <= {points:g} points", ok, detail))
    for spec in max_latency_ms:
        name, batch, ms = _split(spec, "--max-latency-ms", True)
        row = _row(report, name)
        latency = _latency(row, str(batch))
        ok = latency is not None and latency["p50_ms"] <= ms
        results.append(
            GateResult(f"p50 of {name} @{batch} <= {ms:g} ms", ok, _status(row, f"{latency['p50_ms']:.3f} ms" if latency else ""))
        )
    for spec in min_speedup:
        name, batch, factor = _split(spec, "--min-speedup", True)
        row = _row(report, name)
        _latency(row, str(batch))
        ratio = speedup(report["rows"], row, str(batch)) if row["status"] == "ok" else None
        ok = ratio is not None and ratio >= factor
        results.append(
            GateResult(f"speed-up of {name} @{batch} >= {factor:g}x", ok, _status(row, f"{ratio:.2f}x" if ratio else "no FP32 baseline"))
        )
    return results


def _status(row: dict[str, Any], detail: str) -> str:
    return detail if row["status"] == "ok" else f"{row['status']}"
