"""Gate logic on a report with known numbers: every gate kind, passing and failing, skipped rows, bad specs and reports."""

import json
from pathlib import Path

import pytest

from ssql_deploy.bench.gate import evaluate_gates, parse_gates
from ssql_deploy.bench.schema import Report, load_report
from ssql_deploy.errors import UserError


def _row(name: str, runtime: str, bits: str, top1: float | None, p50: dict[str, float], status: str = "ok",
         speedup: dict[str, float] | None = None) -> dict:  # fmt: skip
    latency = {b: {"p50_ms": ms, "p90_ms": ms, "images_per_s": 1.0} for b, ms in p50.items()}
    base = {"torch": "torch-fp32", "onnxruntime": "onnx-fp32", "tensorrt": "trt-fp16"}[runtime]
    paired = {b: {"baseline": base, "ratio": r, "low": r - 0.2, "high": r + 0.2} for b, r in (speedup or {}).items()}
    return {"name": name, "runtime": runtime, "bits": bits, "top1": top1, "latency": latency, "status": status, "speedup": paired}


REPORT = Report.model_validate({"env": {"cpu": "test", "threads": 2, "data": "fashion-mnist", "runs": 50, "warmup": 10}, "rows": [
    _row("torch-fp32", "torch", "fp32", 91.0, {"1": 8.0}),
    _row("torch-w8a8", "torch", "w8a8", 90.8, {"1": 30.0}),
    _row("onnx-fp32", "onnxruntime", "fp32", 91.0, {"1": 4.0, "32": 100.0}),
    # The p50 ratio at 32 is 100/25 = 4.0 but the paired rounds measured 3.5: gates must judge the paired ratio.
    _row("qdq-ort-w8a8", "onnxruntime", "w8a8", 90.5, {"1": 1.0, "32": 25.0}, speedup={"1": 4.0, "32": 3.5}),
    _row("qdq-ort-w4a4", "onnxruntime", "w4a4", 85.0, {"1": 1.0, "32": 24.0}, speedup={"1": 4.0, "32": 4.1}),
    _row("trt-w8a8", "tensorrt", "w8a8", None, {}, "skipped: no TensorRT here"),
    _row("qdq-trt-w4a4", "onnxruntime", "w4a4", None, {}, "check failed: TensorRT rule"),
    _row("qdq-trt-w8a8", "onnxruntime", "w8a8", 91.0, {"1": 2.0}, "unverified: no manifest.json beside it"),
]})  # fmt: skip


def verdicts(strict: bool = False, **given: list[str]) -> list[bool | None]:
    specs = {k: given.get(k, []) for k in ("min_top1", "max_drop", "max_latency_ms", "min_speedup")}
    return [g.passed for g in evaluate_gates(REPORT, parse_gates(**specs), strict)]


def test_min_top1_and_max_latency() -> None:
    assert verdicts(min_top1=["qdq-ort-w8a8=90.5", "qdq-ort-w4a4=86"]) == [True, False]
    assert verdicts(max_latency_ms=["qdq-ort-w8a8@32=25", "onnx-fp32@1=3.9"]) == [True, False]


def test_skipped_rows_skip_every_gate_unless_strict() -> None:
    assert verdicts(min_top1=["trt-w8a8=10"]) == [None]
    assert verdicts(max_latency_ms=["trt-w8a8@1=10"], min_speedup=["trt-w8a8@1=1"]) == [None, None]
    assert verdicts(strict=True, min_top1=["trt-w8a8=10"], max_latency_ms=["trt-w8a8@1=10"]) == [False, False]


def test_rows_that_ran_but_are_not_trustworthy_fail() -> None:
    assert verdicts(min_top1=["qdq-trt-w8a8=10"]) == [False]  # unverified: measured 91%, still not a pass
    assert verdicts(min_top1=["qdq-trt-w4a4=10"]) == [False]  # failed check


def test_max_drop_compares_each_row_with_the_fp32_row_of_its_runtime() -> None:
    gates = evaluate_gates(REPORT, parse_gates([], ["w8a8=0.4"], [], []))
    assert [(g.gate.split()[0], g.passed) for g in gates] == [("torch-w8a8", True), ("qdq-ort-w8a8", False), ("trt-w8a8", None),
                                                             ("qdq-trt-w8a8", False)]  # fmt: skip
    assert "0.50 points below onnx-fp32" in gates[1].detail
    assert verdicts(max_drop=["w4a4=10"]) == [True, False]  # the failed export fails the gate


def test_min_speedup_judges_the_paired_rounds_ratio() -> None:
    assert verdicts(min_speedup=["qdq-ort-w8a8@32=3.5", "qdq-ort-w8a8@32=3.6"]) == [True, False]  # p50s alone would say 4.0x
    gate = evaluate_gates(REPORT, parse_gates([], [], [], ["qdq-ort-w4a4@32=4"]))[0]
    assert gate.passed and "vs onnx-fp32" in gate.detail and "3.90-4.30x" in gate.detail
    assert verdicts(min_speedup=["torch-w8a8@1=1"]) == [False]  # no paired measurement: fails, says so


@pytest.mark.parametrize("gates, message", [
    ({}, "no gates given"),
    ({"min_top1": ["qdq-ort-w2a2=50"]}, "no row 'qdq-ort-w2a2'"),
    ({"min_top1": ["qdq-ort-w8a8"]}, "malformed --min-top1"),
    ({"max_latency_ms": ["qdq-ort-w8a8=3"]}, "no batch size"),
    ({"max_latency_ms": ["qdq-ort-w8a8@8=3"]}, "not timed at batch 8"),
    ({"max_drop": ["w3a3=1"]}, "no w3a3 rows"),
    ({"min_speedup": ["qdq-ort-w8a8@32=fast"]}, "malformed --min-speedup"),
])  # fmt: skip
def test_bad_gate_specs_are_user_errors(gates: dict[str, list[str]], message: str) -> None:
    with pytest.raises(UserError, match=message):
        verdicts(**gates)


@pytest.mark.parametrize("drop, needle", [("top1", "rows[0].top1: field required"), ("status", "rows[0].status: field required"),
                                          ("latency", "rows[0].latency: field required")])  # fmt: skip
def test_a_report_missing_a_field_names_it(tmp_path: Path, drop: str, needle: str) -> None:
    data = REPORT.model_dump(mode="json")
    del data["rows"][0][drop]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_report(path)
