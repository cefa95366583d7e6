"""The INT8 tools a deployment engineer would otherwise use, side by side with ours (issue 13, item 2).

Per model, every tool gets the same fine-tuned network (the FP32 ONNX our export writes; ORT's
`quantize_static`, ModelOpt and NNCF start from that file), the same calibration images
(calib/fashion-mnist-train-512.json, preprocessed once and handed to each), and the classifier left
float. What each tool then does is its own, and recorded per row:
- ours: `quantize --bits w8a8` with the minmax and the percentile (99.99) calibrator, exported for
  ONNX Runtime with each weight layout (`--ort-kernel symmetric`: zero-point 0, `gemm`: -1), and
  for TensorRT (`--engine trt`: Q/DQ on conv inputs only, as ModelOpt places them; run in OpenVINO);
- ORT `quantize_static`: QDQ, per-channel int8 weights, uint8 activations, MinMax and Percentile
  99.99, quantizing the op types ours quantizes (every op of the FP32 graph outside the head);
- NVIDIA ModelOpt ONNX PTQ: int8, its default calibrator (entropy), float parts kept fp32 (its
  default, fp16, would make every float op fp16), Gemm/MatMul excluded;
- NNCF `nncf.quantize` on the OpenVINO model: its defaults (performance preset, fast bias
  correction), the classifier MatMul ignored; it writes OpenVINO IR, so it runs in OpenVINO only;
- ours once more as OpenVINO IR (`openvino.convert_model` of our QDQ ONNX), to see whether OpenVINO
  loads or runs it faster than the ONNX file itself.
Every ONNX artifact runs in ONNX Runtime and in OpenVINO (CPU, FP32 inference precision so float
stays float), 2 threads each. Per artifact and runtime: top-1 on all 10,000 Fashion-MNIST test images,
convolutions the runtime runs in integers (ORT's optimized graph; OpenVINO's runtime model), the
seconds to read and compile the file, and
latency at batch 1 and 32 in interleaved rounds (ssql_deploy.bench.timing, as `bench` times), speed-up
= median of per-round ratios to the FP32 model on the same runtime.

Models: ResNet-18 (CIFAR stem) and MobileNetV2 at 32x32, fine-tuned (ResNet-18 here, 2 epochs on 8,000
images; MobileNetV2 is `benchmarks/families_int8.py`'s, 3 epochs on all 60,000) and scored; both at
224x224 from random init, timed only (fine-tuning at 224 px does not fit 2 cores), calibrated on the
same images resized; a random-init network's logits are nearly equal, so our export's top-1
agreement check may fail there without a fault in the graph: the files are timed all the same and
each export's status is recorded (`export_status`).

    .venv/bin/python benchmarks/peers.py --size 32    # then --size 224; creates .venv-peers on first use

Writes benchmarks/results/peers_<size>.{json,log}. Nothing else may run on the machine meanwhile.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evidence import run_logged, top1  # noqa: E402

from ssql_deploy.bench.onnx_runners import OpenVinoRunner, OrtRunner  # noqa: E402
from ssql_deploy.bench.timing import interleaved, paired_speedup  # noqa: E402
from ssql_deploy.data import DataSource  # noqa: E402
from ssql_deploy.export.ort_session import cpu_has_amx_int8, integer_conv_report  # noqa: E402
from ssql_deploy.models import create_model  # noqa: E402
from ssql_deploy.models.checkpoint import save_atomic  # noqa: E402
from ssql_deploy.models.trained import ModelMeta, model_payload  # noqa: E402
from ssql_deploy.quant.calib_set import load_calibration  # noqa: E402

THREADS = 2
CALIB_IMAGES = 512
# ORT's Percentile calibrator keeps every activation of every calibration image in memory: for MobileNetV2 at 224 px,
# 512 images exceeded this machine's 24 GB (OOM-killed), so there every tool gets the first 128 of them (timed only).
FEWER_CALIB_IMAGES = {("mobilenet_v2", 224): 128}
PERCENTILE = 99.99
ROUNDS, WARMUP = 6, 10
RUNS = {32: {1: 300, 32: 60}, 224: {1: 100, 32: 18}}  # timed runs per artifact and batch, by input size
RESULTS = ROOT / "benchmarks/results"
WORK = ROOT / "runs/peers"
PEERS_VENV = ROOT / ".venv-peers"
RUNNERS = {"onnxruntime": OrtRunner, "openvino": OpenVinoRunner}
MODELS = {"resnet18": "ResNet-18", "mobilenet_v2": "MobileNetV2"}


def prepare(arch: str, size: int, log: Path) -> Path:
    """The fine-tuned run directory of `arch` (32 px), or a random-init one to time (224 px)."""
    run = WORK / f"{arch}-{size}"
    if (run / "finetune/best.pt").is_file():
        return run
    if size == 224:
        torch.manual_seed(0)
        meta = ModelMeta.for_data(arch, "imagenet", 10, DataSource.of("fashion-mnist", None, 224))
        save_atomic(model_payload("model", create_model(arch, 10, "imagenet"), meta), run / "finetune/best.pt")
    elif arch == "mobilenet_v2":
        shutil.copytree(ROOT / "runs/families/mobilenet_v2/finetune", run / "finetune")  # benchmarks/families_int8.py --train-only
    else:
        run_logged(log, "finetune", "--arch", arch, "--subset", "8000", "--epochs", "2", "--batch-size", "128", "--lr", "0.1",
                   "--schedule", "cosine", "--workers", "1", "--out", run)  # fmt: skip
    return run


def ours(run: Path, log: Path, scored: bool, calib_images: int) -> tuple[dict[str, Path], dict[str, str]]:
    """Our artifacts and each export's status."""
    made, status = {}, {}
    for calib in ("minmax", "percentile"):
        out = run / calib  # --subset: the quantize stage's own PyTorch scoring, on 500 images; every artifact is scored below
        run_logged(log, "quantize", run, "--bits", "w8a8", "--calib", calib, "--percentile", str(PERCENTILE),
                   "--calib-size", str(calib_images), "--subset", "500", "--workers", "1", "--out", out)  # fmt: skip
        for kernel in ("symmetric", "gemm"):
            name = f"ours, {calib}, {kernel} kernel"
            made[name], status[name] = export(log, out, out / kernel, "ort", scored, "--ort-kernel", kernel)
        name = f"ours, {calib}, trt layout"  # TensorRT's Q/DQ rules: OpenVINO only
        made[name], status[name] = export(log, out, out / "trt", "trt", scored)
    return made, status


def export(log: Path, source: Path, out: Path, engine: str, scored: bool, *args: str) -> tuple[Path, str]:
    """The QDQ ONNX of one export and its manifest's status. A random-init network (224 px, timed only) has near-equal
    logits, so the export's top-1 agreement check can fail there with no fault in the graph: it is timed all the same."""
    try:
        run_logged(log, "export", source, "--bits", "w8a8", "--engine", engine, *args, "--out", out)
    except subprocess.CalledProcessError:
        if scored:
            raise
    export_dir = out / f"export/w8a8-{engine}"
    return export_dir / "model.qdq.onnx", json.loads((export_dir / "manifest.json").read_text())["metrics"]["status"]


def runs_on(runtime: str, name: str, path: Path) -> bool:
    """ONNX Runtime runs the ONNX files of the `ort` layout and the peers'; OpenVINO runs every file."""
    return runtime == "openvino" or (path.suffix == ".onnx" and "trt layout" not in name)


def ops_to_quantize(fp32: Path) -> list[str]:
    """Every op type of the FP32 graph outside the head: what ours quantizes (the head's pooling, flatten and classifier
    stay float on every side). Read from the FP32 graph, where a ReLU6 is still a Clip."""
    head = {"GlobalAveragePool", "Flatten", "Gemm", "MatMul", "Identity"}
    return sorted({node.op_type for node in onnx.load(str(fp32)).graph.node} - head)


class _Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self.items = iter([{"input": images[i : i + 64]} for i in range(0, len(images), 64)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def ort_quantize_static(fp32: Path, images: np.ndarray, calibrator: str, op_types: list[str], out: Path) -> Path:
    pre = out.with_name("preprocessed.onnx")
    quant_pre_process(str(fp32), str(pre))
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[calibrator]
    quantize_static(str(pre), str(out), _Reader(images), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=method, extra_options={"CalibPercentile": PERCENTILE})  # fmt: skip
    return out


def peer_artifacts(fp32: Path, images: np.ndarray, out: Path, log: Path) -> dict[str, Any]:
    """ModelOpt's and NNCF's artifacts, made in the peers' own environment (created on first use)."""
    python = PEERS_VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        same_openvino = f"openvino=={ov.get_version().split('-')[0]}"  # NNCF's IR is read back by this process's OpenVINO
        subprocess.run([str(python), "-m", "pip", "install", "-q", same_openvino, f"{ROOT}[peers]"], check=True)
    np.savez(out / "calib.npz", images=images)
    with log.open("a") as f:
        subprocess.run([str(python), str(ROOT / "benchmarks/peer_quantize.py"), str(fp32), str(out / "calib.npz"), str(out)],
                       stdout=f, stderr=subprocess.STDOUT, check=True)  # fmt: skip
    return json.loads((out / "peers.json").read_text())


def convs_run_int8(runtime: str, path: Path, runner: Any) -> str:
    if runtime == "openvino":
        return f"{runner.int8_convs}/{runner.convs}"
    report = integer_conv_report(onnx.load(str(path)))
    return f"{report['integer_convs']}/{report['convs']}"


def bench_model(arch: str, size: int, log: Path) -> dict[str, Any]:
    """One model's rows; kept in its run directory, so a run cut short resumes at the next model."""
    done = WORK / f"{arch}-{size}/result.json"
    if done.is_file():
        return json.loads(done.read_text())
    result = measure_model(arch, size, log)
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def measure_model(arch: str, size: int, log: Path) -> dict[str, Any]:
    scored = size == 32
    run = prepare(arch, size, log)
    calib_images = FEWER_CALIB_IMAGES.get((arch, size), CALIB_IMAGES)
    artifacts, export_status = ours(run, log, scored, calib_images)
    fp32 = run / "minmax/symmetric/export/fp32/model.onnx"  # every export writes the same FP32 ONNX
    batches, _ = load_calibration(DataSource.of("fashion-mnist", None, size), calib_images, ROOT / "calib")
    images = torch.cat(batches).numpy()
    op_types = ops_to_quantize(fp32)
    for calib in ("minmax", "percentile"):
        artifacts[f"quantize_static, {calib}"] = ort_quantize_static(fp32, images, calib, op_types, run / f"quantize_static-{calib}.onnx")
    peers = peer_artifacts(fp32, images, run, log)
    artifacts |= {"ModelOpt, entropy": run / "modelopt.onnx", "NNCF, defaults": run / "nncf.xml"}
    ir = run / "ours-ir.xml"  # issue 13: does OpenVINO run our QDQ ONNX faster converted to its IR first?
    ov.save_model(ov.convert_model(str(artifacts["ours, percentile, symmetric kernel"])), str(ir), compress_to_fp16=False)
    artifacts["ours, percentile, symmetric kernel, as OpenVINO IR"] = ir
    rows: list[dict[str, Any]] = []
    for runtime, make in RUNNERS.items():
        files = {"FP32": fp32} | {n: p for n, p in artifacts.items() if runs_on(runtime, n, p)}
        runners, load_s = {}, {}
        for name, path in files.items():
            start = time.perf_counter()
            runners[name] = make(path, THREADS)
            load_s[name] = round(time.perf_counter() - start, 3)  # read and compile: what a service pays at start-up
        group = [{"artifact": name, "runtime": runtime, "int8_convs": convs_run_int8(runtime, files[name], r), "load_s": load_s[name],
                  "latency": {}, "speedup": {}} for name, r in runners.items()]  # fmt: skip
        for batch, runs in RUNS[size].items():
            timers = {name: r.timer(batch, size) for name, r in runners.items()}
            measured = interleaved(timers, WARMUP, runs, ROUNDS, f"{arch} {size}px {runtime} batch {batch}")
            for row in group:
                m = measured[row["artifact"]]
                row["latency"][str(batch)] = m.latency(batch).model_dump()
                row["speedup"][str(batch)] = paired_speedup("FP32", measured["FP32"], m).model_dump()
        if scored:
            for row in group:
                row["top1"] = top1(runners[row["artifact"]], size)
        rows += group
    return {"model": MODELS[arch], "arch": arch, "input": size, "scored": scored, "ops_quantized_by_quantize_static": op_types,
            "calibration_images": calib_images, "peers": peers, "export_status": export_status, "rows": rows, "verdict": verdict(rows) if scored else None}  # fmt: skip


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The goal, per runtime: ours the fastest INT8 artifact at each batch, its top-1 within 0.1 pt of the best peer's."""
    out = {}
    for runtime in RUNNERS:
        int8 = [r for r in rows if r["runtime"] == runtime and r["artifact"] != "FP32"]
        mine = [r for r in int8 if r["artifact"].startswith("ours")]
        theirs = [r for r in int8 if not r["artifact"].startswith("ours")]
        fastest = {b: min(int8, key=lambda r: r["latency"][b]["p50_ms"])["artifact"] for b in ("1", "32")}
        best_peer, best_ours = max(r["top1"] for r in theirs), max(r["top1"] for r in mine)
        out[runtime] = {"fastest": fastest, "ours_fastest": all(a.startswith("ours") for a in fastest.values()),
                        "best_ours_top1": best_ours, "best_peer_top1": best_peer, "top1_within_0.1": best_ours >= best_peer - 0.1}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, choices=sorted(RUNS), required=True)
    size = parser.parse_args().size
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"peers_{size}.log"  # appended to: a resumed run keeps the output of the models it reuses
    torch.set_num_threads(THREADS)
    models = [bench_model(arch, size, log) for arch in MODELS]
    env = {"threads": THREADS, "onnxruntime": ort.__version__, "openvino": ov.get_version(), "torch": torch.__version__,
           "cpu_amx_int8": cpu_has_amx_int8(), "runs_per_point": RUNS[size], "rounds": ROUNDS, "warmup": WARMUP,
           "calibration_images": CALIB_IMAGES, "percentile": PERCENTILE}  # fmt: skip
    (RESULTS / f"peers_{size}.json").write_text(json.dumps({"benchmark": "peers", "env": env, "models": models}, indent=2) + "\n")
    for m in models:
        print(f"{m['model']} {m['input']}px")
        for r in m["rows"]:
            lat = "  ".join(f"@{b} {v['p50_ms']:8.2f} ms {r['speedup'][b]['ratio']:.2f}x" for b, v in r["latency"].items())
            print(f"  {r['runtime']:11s} {r['artifact']:34s} int8 convs {r['int8_convs']:>6s}  top-1 {r.get('top1', '-')!s:>6s}  {lat}")
        if m["verdict"]:
            print(f"  verdict: {m['verdict']}")


if __name__ == "__main__":
    main()
