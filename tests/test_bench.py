"""Bench on real artifacts: only committed files count as shipped, timing is interleaved, baselines are like for like."""

import importlib.util
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from conftest import CliRun, assert_user_error

from ssql_deploy.bench.artifacts import from_file
from ssql_deploy.bench.schema import Row, baseline_name
from ssql_deploy.bench.timing import ROUND_WARMUP, interleaved, paired_speedup
from ssql_deploy.export.ort_session import optimized_op_counts
from ssql_deploy.manifest import read_manifest, write_manifest
from ssql_deploy.quant.artifact import load_quantized
from ssql_deploy.quant.calib_set import load_calibration


def _bench(cli: CliRun, target: Path, out: Path) -> dict[str, dict]:
    result = cli("bench", target, "--subset", "64", "--workers", "0", "--batch-sizes", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    return {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}


def test_only_files_their_manifest_commits_are_ok(deployed: Path, tmp_path: Path, cli: CliRun) -> None:
    """An export killed before its manifest, or a re-export killed after rewriting the model, must not bench as `ok`."""
    run = tmp_path / "run"
    shutil.copytree(deployed, run)
    assert _bench(cli, run, tmp_path / "b0")["qdq-ort-w4a4"]["status"] == "ok"

    export = run / "export/w4a4-ort"
    model = onnx.load(str(export / "model.qdq.onnx"))
    model.doc_string = "rewritten by an export that was killed before its manifest"
    onnx.save(model, str(export / "model.qdq.onnx"))  # the old manifest's sha256 no longer matches
    row = _bench(cli, run, tmp_path / "b1")["qdq-ort-w4a4"]
    assert row["status"].startswith("unverified: it changed after its manifest.json was written"), row["status"]
    assert row["top1"] is not None  # still measured, for the user to see, but not called ok

    (export / "manifest.json").unlink()  # killed between writing the model and committing it
    rows = _bench(cli, run, tmp_path / "b2")
    assert rows["qdq-ort-w4a4"]["status"].startswith("unverified: no manifest.json beside it")
    assert rows["onnx-fp32"]["status"] == "ok" and rows["torch-w4a4"]["status"] == "ok"
    gate = cli("gate", tmp_path / "b2/report.json", "--min-top1", "qdq-ort-w4a4=1")
    assert gate.returncode == 1 and "unverified" in gate.stdout


def test_a_record_written_from_a_relative_path_is_found_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage/model.pt").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path / "stage")
    written = write_manifest(Path("."), "quantize", {"model": Path("model.pt")}, {}, {})
    monkeypatch.chdir(tmp_path)
    assert written.inputs["model"].matches() and read_manifest(tmp_path / "stage") == written
    (tmp_path / "stage/model.pt").write_bytes(b"retrained")
    assert not written.inputs["model"].matches()


def test_rounds_rotate_the_order_and_speedups_pair_rounds() -> None:
    calls: list[str] = []
    timers = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    measured = interleaved(timers, warmup=0, runs=3, rounds=3)
    block = 1 + ROUND_WARMUP  # one timed run per round, after the block's untimed ones
    assert calls == [n for n in ["a", "b", "c", "b", "c", "a", "c", "a", "b"] for _ in range(block)]  # each round starts one later
    assert all(len(m.round_medians) == 3 and len(m.samples) == 3 for m in measured.values())
    fast = type(measured["a"])(samples=[1.0] * 3, round_medians=[1.0, 2.0, 4.0])
    slow = type(measured["a"])(samples=[1.0] * 3, round_medians=[3.0, 4.0, 12.0])
    s = paired_speedup("slow", slow, fast)
    assert (s.ratio, s.low, s.high) == (3.0, 2.0, 3.0)  # per-round ratios 3, 2, 3 (the medians alone would say 2.0)


@pytest.mark.parametrize("name, runtime, expected", [("qdq-ort-w8a8", "onnxruntime", "onnx-fp32"), ("trt-w8a8", "tensorrt", "trt-fp16"),
                                                     ("torch-w4a4", "torch", "torch-fp32"), ("trt-fp16", "tensorrt", None)])  # fmt: skip
def test_speedups_compare_with_the_fp32_row_of_the_same_runtime_and_tensorrt_with_fp16(
    name: str, runtime: str, expected: str | None
) -> None:
    assert baseline_name(Row(name=name, runtime=runtime, bits="w8a8", status="ok", top1=None, latency={})) == expected


def _kernels(path: Path) -> dict[str, int]:
    """The integer kernels ONNX Runtime runs for a graph, and the float convs and gemms left, after its own fusions."""
    integer = ("QLinearConv", "ConvInteger", "QLinearAdd", "QLinearMatMul", "QGemm", "QLinearGlobalAveragePool", "MatMulInteger")
    ops = optimized_op_counts(onnx.load(str(path)))
    return {op: n for op, n in ops.items() if op in integer or op in ("Conv", "FusedConv", "Gemm", "FusedGemm")}


def test_the_peer_benchmark_gives_quantize_static_the_ops_and_calibration_ours_gets(
    deployed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/peers.py, like for like: ORT's quantize_static on the same FP32 ONNX and images, told the op types our
    graph quantizes (all but the head), ends up with the same integer kernels as our export (every conv and residual add), the classifier
    left in float on both sides."""
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location("peers", benchmarks / "peers.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    meta = load_quantized(deployed / "quant/w4a4/quantized.pt").meta
    batches, _ = load_calibration(meta.source(), 64, deployed.parent / "calib")
    op_types = bench.ops_to_quantize(deployed / "export/fp32/model.onnx")
    assert {"Add", "Conv", "Relu"} <= set(op_types) and not {"Gemm", "GlobalAveragePool", "Flatten"} & set(op_types)
    ours = _kernels(deployed / "export/w4a4-ort/model.qdq.onnx")
    for calibrator in ("minmax", "percentile"):
        out = tmp_path / f"{calibrator}.onnx"
        theirs = _kernels(
            bench.ort_quantize_static(deployed / "export/fp32/model.onnx", torch.cat(batches).numpy(), calibrator, op_types, out)
        )
        assert theirs == ours, (calibrator, theirs, ours)
    assert ours["QLinearConv"] == 12 and ours.get("QLinearAdd", 0) == 4 and "QGemm" not in ours


def test_openvino_runs_every_onnx_file_beside_onnx_runtime_and_reports_its_int8_convolutions(
    deployed: Path, tmp_path: Path, cli: CliRun
) -> None:
    """`bench --runtime ort,openvino` runs each ONNX file in both; `export --engine openvino` ships an IR whose every
    convolution OpenVINO runs in int8, benched against the FP32 IR it writes beside the FP32 ONNX."""
    run = tmp_path / "run"
    shutil.copytree(deployed, run)
    assert cli("export", run, "--bits", "w4a4", "--engine", "trt", "--no-build-engine").returncode == 0
    assert cli("export", run, "--bits", "w4a4", "--ort-kernel", "gemm").returncode == 0  # weight zero-point -1
    convs = sum(1 for n in onnx.load(str(run / "export/w4a4-trt/model.qdq.onnx")).graph.node if n.op_type == "Conv")
    exported = cli("export", run, "--bits", "w4a4", "--engine", "openvino")
    assert exported.returncode == 0, exported.stderr
    # the stem reads the 8-bit image with 8-bit weights: uint8 weights keep it exact on CPUs without VNNI, in float
    assert f"OpenVINO runs {convs - 1} of {convs} convolutions in int8" in exported.stdout and "(conv1) read 8-bit" in exported.stdout
    # the remedy the note names: 7-bit stem weights never saturate, stay int8, and OpenVINO runs every conv in int8
    q = cli("quantize", run, "--bits", "w4a4", "--layer-bits", "conv1=w7", "--calib-size", "64", "--calib-dir", tmp_path / "calib",
            "--subset", "256", "--workers", "0")  # fmt: skip
    assert q.returncode == 0, q.stderr
    (w7,) = [d.name for d in (run / "quant").iterdir() if d.name.startswith("w4a4-")]
    seven = cli("export", run, "--bits", w7, "--engine", "openvino")
    assert seven.returncode == 0 and f"OpenVINO runs {convs} of {convs} convolutions in int8" in seven.stdout, seven.stdout + seven.stderr
    shutil.rmtree(run / "quant" / w7), shutil.rmtree(run / "export" / f"{w7}-openvino")  # the rows below are of w4a4
    manifest = json.loads((run / "export/w4a4-openvino/manifest.json").read_text())
    assert {"onnx", "ir", "ir_weights"} <= set(manifest["outputs"]) and manifest["metrics"]["weight_zero_point"] == 0
    assert {"onnx", "ir"} <= set(json.loads((run / "export/fp32/manifest.json").read_text())["outputs"])
    out = tmp_path / "bench"
    result = cli("bench", run, "--runtime", "ort,openvino", "--subset", "256", "--workers", "0", "--batch-sizes", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["ov-fp32"]["top1"] == rows["onnx-fp32"]["top1"] and rows["ov-fp32"]["agreement"] == 100.0  # the FP32 IR
    # the same file in both runtimes computes the same model: exactly where OpenVINO runs it in float (the gemm-kernel
    # graph), up to OpenVINO's int8 arithmetic where it runs it in int8 (on this AVX2 CPU 96-98% of 256 images of a
    # model of 37% top-1, whose near-equal logits flip; 99% or more on the VNNI machine before)
    for layout, least in (("ort", 99), ("openvino", 90)):
        ov = rows[f"ov-qdq-{layout}-w4a4"]
        assert ov["agreement"] >= least and ov["speedup"]["1"]["baseline"] == "ov-fp32", ov
    # (the trt graph's stem, int8 weights on a signed 8-bit input, is what TensorRT takes; OpenVINO on a CPU without
    # VNNI saturates on it, and its row's agreement says so)
    ir = rows["openvino-w4a4"]
    assert ir["status"] == "ok" and ir["agreement"] >= 90 and ir["speedup"]["1"]["baseline"] == "ov-fp32"
    assert rows["ov-qdq-trt-w4a4"]["runtime_detail"].endswith(f"{convs} of {convs} convolutions int8")
    for name in ("ov-qdq-openvino-w4a4", "openvino-w4a4"):
        assert rows[name]["runtime_detail"].endswith(f"{convs - 1} of {convs} convolutions int8"), name
    assert rows["ov-qdq-ort-w4a4"]["runtime_detail"].endswith(f"0 of {convs} convolutions int8")
    assert any("--ort-kernel symmetric" in note for note in rows["ov-qdq-ort-w4a4"]["notes"])
    kernel = cli("export", run, "--bits", "w4a4", "--engine", "openvino", "--ort-kernel", "gemm")
    assert_user_error(kernel, "--ort-kernel applies only to --engine ort")
    weights = run / "export/w4a4-openvino/model.bin"  # the IR's other half, changed after its manifest
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert from_file(weights.with_suffix(".xml")).status.startswith("unverified: model.bin: it changed after")
    bad = cli("bench", run, "--runtime", "tvm", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "unknown runtime 'tvm'" in bad.stderr
    assert_user_error(cli("bench", run, "--runtime", "openvino", "--device", "TPU", "--out", tmp_path / "bad"), "no device 'TPU'", "CPU")
    assert not (tmp_path / "bad").exists()
