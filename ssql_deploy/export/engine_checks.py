"""What each engine's graph must pass before it is written, keyed like `runtimes.ENGINES`.

`ort`: ONNX Runtime's optimized graph is read back: how many convolutions became integer kernels,
and which ops stay float and why (a float conv is noted, never silent). `trt`: TensorRT's
explicit-quantization rules, checked statically (trt_rules.py), since the GPU that would reject
the graph is not here; a broken rule fails the export. `openvino`: OpenVINO compiles the graph for
the CPU and its runtime information says how many convolutions execute in int8.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx

from ssql_deploy.bench.onnx_runners import OpenVinoRunner
from ssql_deploy.export.ort_session import integer_conv_report
from ssql_deploy.export.trt_rules import check_trt_qdq
from ssql_deploy.runtimes import ENGINES, Engine


@dataclass
class EngineCheck:
    report: dict[str, Any]  # recorded in the export's manifest
    problems: list[str] = field(default_factory=list)  # any one fails the export
    notes: list[str] = field(default_factory=list)


def _ort(model: onnx.ModelProto, _threads: int) -> EngineCheck:
    report = integer_conv_report(model)
    notes = []
    if report["float_convs"]:
        notes.append(f"{report['float_convs']} of {report['convs']} convolutions stay float in ONNX Runtime")
    return EngineCheck(report, notes=notes)


def _trt(model: onnx.ModelProto, _threads: int) -> EngineCheck:
    violations = [str(v) for v in check_trt_qdq(model)]
    return EngineCheck({"trt_rule_violations": violations}, problems=[f"TensorRT rule {v}" for v in violations[:1]])


def _openvino(model: onnx.ModelProto, threads: int) -> EngineCheck:
    runner = OpenVinoRunner(model.SerializeToString(), threads)
    notes = []
    if runner.int8_convs < runner.convs:
        notes.append(f"{runner.convs - runner.int8_convs} of {runner.convs} convolutions stay float in OpenVINO")
    wide = [t.name.removesuffix("_weight_int") for t in model.graph.initializer
            if t.name.endswith("_weight_int") and t.data_type == onnx.TensorProto.UINT8]  # fmt: skip
    if wide:  # OpenVINO fuses only int8 weights; these are uint8 so that no CPU saturates on them (onnx_graph.py)
        notes.append(f"{len(wide)} convolutions ({', '.join(wide[:4])}{', ...' if len(wide) > 4 else ''}) read 8-bit activations with "
                     "weights beyond +-64, whose int8 products saturate on CPUs without VNNI; their weights are uint8, which "
                     "OpenVINO runs in float: 7-bit weights for them (--layer-bits 'MODULE=w7') keep them int8 and exact")  # fmt: skip
    return EngineCheck({"openvino_int8_convs": runner.int8_convs, "convs": runner.convs, "openvino": runner.detail}, notes=notes)


CHECKS: dict[Engine, Callable[[onnx.ModelProto, int], EngineCheck]] = {"ort": _ort, "trt": _trt, "openvino": _openvino}
assert set(CHECKS) == set(ENGINES)
