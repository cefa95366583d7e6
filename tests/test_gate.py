"""Gate logic on a report with known numbers: every gate kind, passing and failing, and bad specs."""

import pytest

from ssql_deploy.bench.gate import evaluate_gates
from ssql_deploy.errors import UserError


def _row(name: str, runtime: str, bits: str, top1: float | None, p50: dict[str, float], status: str = "ok") -> dict:
    latency = {b: {"p50_ms": ms, "p90_ms": ms, "images_per_s": 1.0} for b, ms in p50.items()}
    return {"name": name, "runtime": runtime, "bits": bits, "top1": top1, "latency": latency, "status": status}


REPORT = {"rows": [
    _row("torch-fp32", "torch", "fp32", 91.0, {"1": 8.0}),
    _row("torch-w8a8", "torch", "w8a8", 90.8, {"1": 30.0}),
    _row("onnx-fp32", "onnxruntime", "fp32", 91.0, {"1": 4.0, "32": 100.0}),
    _row("qdq-ort-w8a8", "onnxruntime", "w8a8", 90.5, {"1": 1.0, "32": 25.0}),
    _row("qdq-ort-w4a4", "onnxruntime", "w4a4", 85.0, {"1": 1.0, "32": 24.0}),
    _row("trt-w8a8", "tensorrt", "w8a8", None, {}, "skipped: no TensorRT here"),
    _row("qdq-trt-w4a4", "onnxruntime", "w4a4", None, {}, "check failed: TensorRT rule"),
]}  # fmt: skip


def verdicts(**gates: list[str]) -> list[bool | None]:
    return [g.passed for g in evaluate_gates(REPORT, **gates)]


def test_min_top1_and_max_latency() -> None:
    assert verdicts(min_top1=["qdq-ort-w8a8=90.5", "qdq-ort-w4a4=86"]) == [True, False]
    assert verdicts(max_latency_ms=["qdq-ort-w8a8@32=25", "onnx-fp32@1=3.9"]) == [True, False]
    assert verdicts(min_top1=["trt-w8a8=10"]) == [False]  # a named row that did not run fails


def test_max_drop_compares_each_row_with_the_fp32_row_of_its_runtime() -> None:
    gates = evaluate_gates(REPORT, max_drop=["w8a8=0.4"])
    assert [(g.gate.split()[0], g.passed) for g in gates] == [("torch-w8a8", True), ("qdq-ort-w8a8", False), ("trt-w8a8", None)]
    assert "0.50 points below onnx-fp32" in gates[1].detail
    assert verdicts(max_drop=["w4a4=10"]) == [True, False]  # the failed export fails the gate


def test_min_speedup_uses_the_fp32_baseline_of_the_same_runtime() -> None:
    assert verdicts(min_speedup=["qdq-ort-w8a8@32=4", "qdq-ort-w4a4@32=4.2"]) == [True, False]


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
        evaluate_gates(REPORT, **gates)
