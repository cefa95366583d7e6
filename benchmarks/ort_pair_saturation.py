"""Why the `ort` export stores uint8 weights for convs reading 8-bit unsigned activations (onnx_graph.weight_container).

One ONNX Runtime `QLinearConv` (64 -> 64 channels, 3x3, 8 images of 16x16, per-channel weight scales) is run on
random integers of four kinds and compared with the exact integer result (float64 convolution of the integers,
requantized with round-half-even): the share of outputs off by more than one step, and the largest error. On x86
CPUs without VNNI, ORT's uint8 x int8 kernels add products in pairs on 16 bits (VPMADDUBSW), which saturate once a
uint8 input above 127 meets int8 weights above 64; its uint8 x uint8 kernels widen first. The CPU's flags are
recorded (VNNI sums on 32 bits: there every row should be exact).

    .venv/bin/python benchmarks/ort_pair_saturation.py

Writes benchmarks/results/ort_pair_saturation.json and .log.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evidence import cpu  # noqa: E402

RESULTS = ROOT / "benchmarks/results"
CASES = {  # name -> (largest input integer, largest |weight integer|, weights stored as uint8 around 128)
    "uint8 input to 255, int8 weights to 127 (w8a8 before)": (255, 127, False),
    "uint8 input to 255, uint8 weights around 128 (w8a8 now)": (255, 127, True),
    "uint8 input to 255, int8 weights to 64": (255, 64, False),
    "uint8 input to 127, int8 weights to 127": (127, 127, False),
}
X_SCALE, Y_SCALE, Y_ZERO = 0.02, 0.05, 128


def measure(top: int, widest: int, as_uint8: bool, rng: np.random.Generator) -> dict[str, float]:
    x = rng.integers(0, top + 1, (8, 64, 16, 16)).astype(np.uint8)
    w = rng.integers(-widest, widest + 1, (64, 64, 3, 3))
    w_scale = (rng.random(64) * 0.002 + 0.0005).astype(np.float32)
    zp, dtype = (128, np.uint8) if as_uint8 else (0, np.int8)
    inits = [numpy_helper.from_array(np.asarray(v, t), n) for n, v, t in (
        ("xs", X_SCALE, np.float32), ("xz", 0, np.uint8), ("w", w + zp, dtype), ("ws", w_scale, np.float32),
        ("wz", np.full(64, zp), dtype), ("ys", Y_SCALE, np.float32), ("yz", Y_ZERO, np.uint8))]  # fmt: skip
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1])
    io = [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph([node], "conv", io[:1], io[1:], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    got = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    acc = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)), padding=1)
    multiplier = (np.float64(X_SCALE) * w_scale.astype(np.float64) / np.float64(Y_SCALE)).reshape(-1, 1, 1)
    exact = np.clip(np.round(acc.numpy() * multiplier) + Y_ZERO, 0, 255)
    error = np.abs(exact - got.astype(np.float64))
    return {"share_off_by_more_than_1_step": float((error > 1).mean()), "max_error_steps": float(error.max())}


def main() -> None:
    rng = np.random.default_rng(0)
    rows = {name: measure(*case, rng) for name, case in CASES.items()}
    result = {"cpu": cpu(), "onnxruntime": ort.__version__, "rows": rows}
    lines = [f"CPU: {result['cpu']}; onnxruntime {ort.__version__}"]
    lines += [f"{name}: {100 * r['share_off_by_more_than_1_step']:.2f}% of outputs off by more than 1 step, "
              f"largest error {r['max_error_steps']:g} steps" for name, r in rows.items()]  # fmt: skip
    print("\n".join(lines))
    (RESULTS / "ort_pair_saturation.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "ort_pair_saturation.log").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
