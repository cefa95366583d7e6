"""What each engine's graph must pass before it is written, keyed like `runtimes.ENGINES`.

`ort`: ONNX Runtime's optimized graph is read back: how many convolutions became integer kernels,
and which ops stay float and why (a float conv is noted, never silent). `trt`: TensorRT's
explicit-quantization rules, checked statically (trt_rules.py), since the GPU that would reject
the graph is not here; a broken rule fails the export.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx

from ssql_deploy.export.ort_session import integer_conv_report
from ssql_deploy.export.trt_rules import check_trt_qdq
from ssql_deploy.runtimes import ENGINES, Engine


@dataclass
class EngineCheck:
    report: dict[str, Any]  # recorded in the export's manifest
    problems: list[str] = field(default_factory=list)  # any one fails the export
    notes: list[str] = field(default_factory=list)


def _ort(model: onnx.ModelProto) -> EngineCheck:
    report = integer_conv_report(model)
    notes = []
    if report["float_convs"]:
        notes.append(f"{report['float_convs']} of {report['convs']} convolutions stay float in ONNX Runtime")
    return EngineCheck(report, notes=notes)


def _trt(model: onnx.ModelProto) -> EngineCheck:
    violations = [str(v) for v in check_trt_qdq(model)]
    return EngineCheck({"trt_rule_violations": violations}, problems=[f"TensorRT rule {v}" for v in violations[:1]])


CHECKS: dict[Engine, Callable[[onnx.ModelProto], EngineCheck]] = {"ort": _ort, "trt": _trt}
assert set(CHECKS) == set(ENGINES)
