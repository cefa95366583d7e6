"""The peers' quantizers, run in their own environment (`.venv-peers`) on the inputs `benchmarks/peers.py` prepares.

NVIDIA ModelOpt's ONNX extra replaces `onnxruntime` with `onnxruntime-gpu` 1.24 and pins an older
`onnx`, so the peers cannot share the tool's environment: this script only writes artifacts, and
`peers.py` scores and times every artifact, ours and theirs, with the same runtimes in one process.

    .venv-peers/bin/python benchmarks/peer_quantize.py FP32.onnx CALIB.npz OUT_DIR

CALIB.npz holds `images` (N, 3, H, W float32, preprocessed as for the model). Writes OUT_DIR/modelopt.onnx
(ModelOpt ONNX PTQ, int8, its default calibrator), OUT_DIR/nncf.xml (NNCF PTQ on the OpenVINO model,
its defaults) and OUT_DIR/peers.json (versions, settings, seconds each took).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

CLASSIFIER_TYPES = ["Gemm", "MatMul"]  # the classifier stays float, as in ours and in SSQL


def modelopt_int8(fp32: Path, images: np.ndarray, out: Path) -> dict[str, object]:
    from modelopt.onnx.quantization import quantize

    # high_precision_dtype fp32: its default (fp16) would turn every float op into fp16, which CPUs run slower and
    # which no other row does; calibration on the CPU execution provider (no GPU here)
    settings = {"quantize_mode": "int8", "calibration_method": "default (entropy)", "high_precision_dtype": "fp32",
                "op_types_to_exclude": CLASSIFIER_TYPES, "calibration_eps": ["cpu"]}  # fmt: skip
    # 64 images per calibration step: its default (the graph's dynamic batch read as 1) would take 512 steps
    shapes = "input:" + "x".join(map(str, (64, *images.shape[1:])))
    quantize(str(fp32), quantize_mode="int8", calibration_data={"input": images}, calibration_shapes=shapes, calibration_eps=["cpu"],
             high_precision_dtype="fp32", op_types_to_exclude=CLASSIFIER_TYPES, output_path=str(out), log_level="WARNING")  # fmt: skip
    return settings


def nncf_int8(fp32: Path, images: np.ndarray, out: Path) -> dict[str, object]:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    data = nncf.Dataset([images[i : i + 1] for i in range(len(images))])
    quantized = nncf.quantize(model, data, subset_size=len(images), ignored_scope=nncf.IgnoredScope(types=["MatMul"]))
    ov.save_model(quantized, str(out))
    return {"preset": "default (performance: symmetric activations)", "subset_size": len(images),
            "ignored_scope": "types=[MatMul] (the classifier)", "fast_bias_correction": "default (on)"}  # fmt: skip


def main() -> None:
    fp32, calib, out = (Path(a) for a in sys.argv[1:4])
    images = np.load(calib)["images"].astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    import modelopt
    import nncf

    versions = {"nvidia-modelopt": modelopt.__version__, "nncf": nncf.__version__}
    made: dict[str, object] = {"calibration_images": len(images), "versions": versions}
    for name, quantizer, path in (("modelopt", modelopt_int8, out / "modelopt.onnx"), ("nncf", nncf_int8, out / "nncf.xml")):
        start = time.time()
        settings = quantizer(fp32, images, path)
        made[name] = {"file": path.name, "settings": settings, "seconds": round(time.time() - start, 1)}
    (out / "peers.json").write_text(json.dumps(made, indent=2) + "\n")


if __name__ == "__main__":
    main()
