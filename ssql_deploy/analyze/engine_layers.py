"""What a TensorRT engine says each of its layers runs in: the other half of `debug` (TensorRT#3352, TensorRT#1106).

A Q/DQ graph states which convolutions should run INT8; the engine decides, and falls back to FP16
or FP32 without an error when a Q/DQ pair sits where its fusion rules do not expect it. Only the
engine itself can say what it chose: TensorRT's engine inspector reports every fused layer with the
data type and layout of each input and output (`Format/Datatype`), as `trtexec --exportLayerInfo`
and TensorRT's own engine explorer (trex) read them. A layer's precision is that of its first
input, as trex counts it: an INT8 convolution reads INT8 and may write FP16 or FP32.

The inspector reports formats only for engines built with detailed profiling verbosity, which
`export --engine trt` sets (`build_engine`) and its trtexec line asks for.
"""

import json
import re
from pathlib import Path
from typing import Any

from ssql_deploy.errors import UserError

# Data-type words in TensorRT's format strings ("Channel major INT8 format where channel % 16 == 0",
# "Row major linear FP32", "Half", "BFloat16"), matched as whole words: "UInt8" is not "Int8".
_DTYPES = [("bfloat16", "bf16"), ("uint8", "uint8"), ("int8", "int8"), ("int32", "int32"), ("int64", "int64"), ("fp16", "fp16"),
           ("half", "fp16"), ("fp32", "fp32"), ("float", "fp32"), ("fp8", "fp8"), ("bool", "bool")]  # fmt: skip
_REBUILD = "rebuild it with `ssql-deploy export --engine trt` (or trtexec --profilingVerbosity=detailed)"


def precision(format_datatype: str) -> str:
    """The data type named in one `Format/Datatype` string, "unknown" when it names none."""
    words = set(re.findall(r"[a-z0-9]+", format_datatype.lower()))
    return next((name for word, name in _DTYPES if word in words), "unknown")


def is_convolution(layer: dict[str, Any]) -> bool:
    return "convolution" in f"{layer.get('ParameterType', '')} {layer.get('LayerType', '')}".lower()


def parse_layers(info: dict[str, Any], plan: Path) -> list[dict[str, Any]]:
    """Each engine layer of the inspector's JSON as name, type, precision, the input and output data types and, for
    layers with weights, the weights' type; refuses an engine built without detailed profiling verbosity."""
    layers = info.get("Layers", [])
    if layers and not all(isinstance(layer, dict) and "Inputs" in layer for layer in layers):
        raise UserError(f"{plan} was built without detailed profiling verbosity, so TensorRT reports no layer precisions", _REBUILD)
    rows = []
    for layer in layers:
        inputs = [precision(t.get("Format/Datatype", "")) for t in layer["Inputs"]]
        rows.append({
            "name": layer.get("Name", ""), "type": layer.get("ParameterType") or layer.get("LayerType", ""),
            "convolution": is_convolution(layer), "precision": inputs[0] if inputs else None, "inputs": inputs,
            "outputs": [precision(t.get("Format/Datatype", "")) for t in layer.get("Outputs", [])],
            "weights": (layer.get("Weights") or {}).get("Type"),
        })  # fmt: skip
    return rows


def summarize(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """How many of the engine's convolutions run INT8, and the ones that do not, with what they run in."""
    convs = [layer for layer in layers if layer["convolution"]]
    return {"layers": len(layers), "convolutions": len(convs), "int8_convolutions": sum(c["precision"] == "int8" for c in convs),
            "not_int8": {c["name"]: c["precision"] for c in convs if c["precision"] != "int8"}}  # fmt: skip


def inspect_engine(plan: Path) -> dict[str, Any]:
    """Deserialize `plan` on this GPU and read its layers from TensorRT's engine inspector."""
    from ssql_deploy.export.tensorrt_engine import load_engine

    _runtime, engine = load_engine(plan)  # refuses in one line where TensorRT is not usable
    import tensorrt as trt

    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = parse_layers(info, plan)
    return {"plan": str(plan), "tensorrt_version": trt.__version__, "inspected": True, "summary": summarize(layers), "layers": layers}
