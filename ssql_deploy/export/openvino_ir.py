"""OpenVINO IR (`model.xml` + `model.bin`) of an exported ONNX graph: what `export --engine openvino` ships.

The IR is the ONNX graph as OpenVINO's own converter reads it, weights kept in float32 (the
converter's default would halve the float scales and biases to fp16), so it computes what the
QDQ ONNX computes. It is written into a scratch directory and moved into place; the manifest
lists both halves with their hashes, and bench trusts an IR only when both match.
"""

import os
import shutil
import tempfile
from pathlib import Path

from ssql_deploy.errors import UserError


def require_openvino() -> None:
    """Refuse before any work when OpenVINO is missing, naming the extra that brings it."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise UserError("--engine openvino needs OpenVINO, which is not installed", "pip install 'ssql-deploy[openvino]'") from None


def save_ir(onnx_path: Path, xml: Path) -> dict[str, Path]:
    """Convert `onnx_path` to IR at `xml`; returns the two files as manifest outputs."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    scratch = Path(tempfile.mkdtemp(prefix=".ir-", dir=xml.parent))
    try:
        ov.save_model(model, str(scratch / xml.name), compress_to_fp16=False)
        for suffix in (".bin", ".xml"):
            os.replace(scratch / xml.with_suffix(suffix).name, xml.with_suffix(suffix))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"ir": xml, "ir_weights": xml.with_suffix(".bin")}


def ovc_command(onnx_path: Path, xml: Path) -> str:
    """The command line that makes the same IR with OpenVINO's converter."""
    return f"ovc {onnx_path} --output_model {xml} --compress_to_fp16=False"
