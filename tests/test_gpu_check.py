"""The GPU check script: everything that can be checked without a GPU (its syntax, its refusal, the engine code paths)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from ssql_deploy.bench.onnx_runners import OrtRunner
from ssql_deploy.export.tensorrt_engine import tensorrt_status, trtexec_command

ROOT = Path(__file__).resolve().parents[1]


def test_the_script_parses_and_refuses_without_a_gpu_before_installing_anything(tmp_path: Path) -> None:
    script = ROOT / "benchmarks/gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}  # no nvidia-smi on this PATH, as on a machine without a GPU
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "no NVIDIA GPU here" in result.stderr and "Traceback" not in result.stderr
    python_half = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert python_half.returncode != 0 and "gpu_check: error:" in python_half.stderr


def test_engine_paths_say_why_no_engine_is_built_here_and_how_to_build_it(tmp_path: Path) -> None:
    available, reason = tensorrt_status()
    assert not available and ("tensorrt" in reason.lower() or "GPU" in reason)
    command = trtexec_command(tmp_path / "m.qdq.onnx", tmp_path / "m.plan", "input", (3, 32, 32), 1, 8, 32)
    assert command.startswith("trtexec --onnx=") and "--minShapes=input:1x3x32x32" in command and "--maxShapes=input:32x3x32x32" in command


def test_a_trt_export_records_the_trtexec_line_for_tensorrt_10_and_11(
    deployed: Path, tmp_path: Path, cli, fmnist_batch: torch.Tensor
) -> None:
    """Both TensorRT versions get their lines; TensorRT 11's FP16 baseline is built from a float16 graph that computes
    what the FP32 ONNX computes, to float16 precision (a strongly typed build of the FP32 ONNX would be an FP32 engine)."""
    out = tmp_path / "run"
    result = cli("export", deployed, "--bits", "w4a4", "--engine", "trt", "--out", out)
    assert result.returncode == 0, result.stderr
    build = json.loads((out / "export/w4a4-trt/manifest.json").read_text())["metrics"]["engine_build"]
    assert not build["built"] and "--int8 --fp16" in build["build_with"] and "--profilingVerbosity=detailed" in build["build_with"]
    assert "--stronglyTyped" in build["build_with_strongly_typed"] and "--int8" not in build["build_with_strongly_typed"]
    assert "TensorRT 11" in result.stdout
    fp32 = out / "export/fp32"
    typed_fp16 = build["fp16_baseline_build_with_strongly_typed"]
    assert f"--onnx={fp32 / 'model.fp16.onnx'}" in typed_fp16 and "--stronglyTyped" in typed_fp16 and "--fp16" not in typed_fp16
    assert "fp16_onnx" in json.loads((fp32 / "manifest.json").read_text())["outputs"]
    half = onnx.load(str(fp32 / "model.fp16.onnx"))
    assert {t.data_type for t in half.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in (*half.graph.input, *half.graph.output)] == [onnx.TensorProto.FLOAT] * 2
    images = fmnist_batch.numpy()
    full, reduced = (OrtRunner(fp32 / name, 1).predict(images) for name in ("model.onnx", "model.fp16.onnx"))
    assert np.abs(full - reduced).max() < 0.02 * np.abs(full).max() and (full.argmax(1) == reduced.argmax(1)).mean() >= 0.98


def test_debug_of_a_trt_export_says_why_it_reads_no_layer_precisions_here(deployed: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    assert cli("export", deployed, "--bits", "w4a4", "--engine", "trt", "--out", out).returncode == 0
    export = out / "export/w4a4-trt"
    result = cli("debug", export, "--images", "64")
    assert result.returncode == 0, result.stderr
    engine = json.loads((export / "debug/debug.json").read_text())["tensorrt"]
    assert engine["plan"] is None and not engine["inspected"] and "no plan was built" in engine["why"] and "trtexec" in engine["why"]
    assert "TensorRT layer precisions not read" in result.stdout
    # a plan from elsewhere, named directly: its Q/DQ graph beside it is still debugged, and the engine needs a GPU
    (export / "model.plan").write_bytes(b"a plan built on another machine")
    result = cli("debug", export / "model.plan", "--images", "64", "--out", tmp_path / "from-plan")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "from-plan/debug.json").read_text())
    assert report["artifact"] == str(export / "model.qdq.onnx") and report["top1_agreement"] >= 99
    assert not report["tensorrt"]["inspected"] and "GPU" in report["tensorrt"]["why"]
