"""Build and run TensorRT engines from our QDQ ONNX by explicit quantization (TensorRT 10 Python API).

Why explicit quantization: the implicit calibrator API is deprecated since TensorRT 10.1 and would
re-derive ranges we already chose. With Q/DQ in the graph TensorRT runs the integer numerics that
the simulation and `check_trt_qdq` describe; the INT8 flag plus FP16 (instead of a strongly typed
network) lets TensorRT use FP16 for the float layers around them (the stem input, BN, the fc).

`tensorrt` is imported inside functions: it exists only on GPU machines, and the rest of the package
(export, checks, the trtexec line) must import and work without it.
"""

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ssql_deploy.errors import UserError
from ssql_deploy.run import atomic_open, write_text_atomic

WORKSPACE_GIB = 2.0
_INSTALL_FIX = "install TensorRT 10 (`pip install tensorrt`) on a machine with an NVIDIA GPU and CUDA-enabled torch"


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): the tensorrt package imports AND torch sees a CUDA GPU; the reason is one sentence."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing
        first = (str(e).splitlines() or [""])[0]
        return False, f"the tensorrt Python package cannot be imported ({type(e).__name__}: {first})."
    import torch

    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but torch sees no CUDA GPU."
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}."


def require_tensorrt() -> Any:
    ok, why = tensorrt_status()
    if not ok:
        raise UserError(f"TensorRT is not usable here: {why.rstrip('.')}", _INSTALL_FIX)
    import tensorrt as trt

    return trt


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> tuple[int, int, int]:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(
            f"batch sizes min={min_batch}, opt={opt_batch}, max={max_batch} are not ordered",
            "pass batches with 1 <= min <= opt <= max, e.g. 1,8,32",
        )
    return int(min_batch), int(opt_batch), int(max_batch)


def trtexec_command(
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    chw: tuple[int, int, int],
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    int8: bool = True,
    strongly_typed: bool = False,
) -> str:
    """The trtexec line equivalent to `build_engine`, for users who build on another machine.

    TensorRT 10: `--int8 --fp16` rather than `--stronglyTyped`: INT8 comes from the Q/DQ nodes, FP16
    is the fallback for the float layers (a strongly typed build would keep those in FP32). TensorRT 11
    has no precision flags left (`strongly_typed`): the Q/DQ nodes set INT8 and the rest runs as typed.
    Detailed profiling verbosity lets `ssql-deploy debug` read each layer's precision from the plan.
    """
    batches = _check_batches(min_batch, opt_batch, max_batch)
    c, h, w = chw
    shapes = [f"--{k}Shapes={input_name}:{n}x{c}x{h}x{w}" for k, n in zip(("min", "opt", "max"), batches, strict=True)]
    precision = ["--stronglyTyped"] if strongly_typed else ["--int8", "--fp16"] if int8 else ["--fp16"]
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}", *precision, *shapes, "--profilingVerbosity=detailed"]
    return " ".join(shlex.quote(a) for a in args)


def sidecar_path(plan_path: str | Path) -> Path:
    """`model.plan` -> `model.plan.json`: build facts live next to the plan, never inside it."""
    return Path(f"{plan_path}.json")


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    chw: tuple[int, int, int],
    batches: tuple[int, int, int] = (1, 8, 32),
    workspace_gib: float = WORKSPACE_GIB,
    int8: bool = True,
) -> dict[str, Any]:
    """Parse the ONNX, build an INT8+FP16 engine (`int8=False`: FP16 only, the baseline an INT8 engine is
    compared with) with one profile over `batches` (min, opt, max), write the plain plan file and a
    `<plan>.json` sidecar; returns the sidecar's content."""
    trt = require_tensorrt()
    import torch

    min_b, opt_b, max_b = _check_batches(*batches)
    onnx_file, plan_file = Path(onnx_path), Path(plan_path)
    if not onnx_file.is_file():
        raise UserError(f"ONNX file {onnx_file} does not exist", "export the model to QDQ ONNX for the trt engine first")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: explicit batch is the default mode; TensorRT 11 has strongly typed networks only (no INT8 flag left).
    strongly_typed = not hasattr(trt.BuilderFlag, "INT8")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no error reported"
        raise UserError(
            f"TensorRT {trt.__version__} could not parse {onnx_file}: {errors}",
            "export for the trt engine and check the graph with ssql_deploy.export.trt_rules.check_trt_qdq",
        )
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if input_name not in inputs:
        raise UserError(f"{onnx_file} has no input {input_name!r} (inputs: {inputs})", "pass the ONNX input name")

    config = builder.create_builder_config()
    # TensorRT 11 drops the precision flags (strong typing only): set what this version has, and record it.
    flags = [name for name in (("INT8", "FP16") if int8 else ("FP16",)) if hasattr(trt.BuilderFlag, name)]
    for name in flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # each layer's precision, for `debug` (analyze/engine_layers.py)
    shapes = {k: [b, *chw] for k, b in (("min", min_b), ("opt", opt_b), ("max", max_b))}
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(
            f"TensorRT {trt.__version__} failed to build an engine from {onnx_file} (see its log above)",
            f"try a larger workspace than {workspace_gib} GiB, or run: "
            + trtexec_command(onnx_file, plan_file, input_name, chw, min_b, opt_b, max_b, int8, strongly_typed),
        )
    with atomic_open(plan_file, "wb") as f:
        f.write(plan)
    info: dict[str, Any] = {
        "plan": plan_file.name,
        "onnx": str(onnx_file),
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "inputs": inputs,
        "outputs": outputs,
        "profile": {input_name: shapes},
        "flags": flags,
        "strongly_typed": strongly_typed,
        "workspace_gib": workspace_gib,
        "plan_bytes": plan_file.stat().st_size,
    }
    write_text_atomic(sidecar_path(plan_file), json.dumps(info, indent=2) + "\n")
    return info


def load_engine(plan: Path) -> tuple[Any, Any]:
    """(runtime, engine) deserialized from `plan` on this GPU; the caller keeps the runtime as long as the engine."""
    trt = require_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise UserError(
            f"{plan} is not an engine TensorRT {trt.__version__} can load on this GPU",
            "rebuild the plan on this machine: plans are tied to the TensorRT version and the GPU",
        )
    return runtime, engine


class TensorRTRunner:
    """Run a plan on float32 NCHW numpy batches; device buffers are torch CUDA tensors (no pycuda)."""

    def __init__(self, plan_path: str | Path) -> None:
        trt = require_tensorrt()
        import torch

        path = Path(plan_path)
        if not path.is_file():
            raise UserError(f"TensorRT plan {path} does not exist", "build it first with build_engine")
        self._runtime, self.engine = load_engine(path)  # the runtime kept alive: the engine must not outlive it
        self.context = self.engine.create_execution_context()
        self.detail = f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        if len(self.inputs) != 1 or not self.outputs:
            raise UserError(f"{path} has inputs {self.inputs} and outputs {self.outputs}", "use a plan from build_engine")
        to_torch = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT8: torch.int8,
        }
        self.dtypes = {n: to_torch.get(self.engine.get_tensor_dtype(n), torch.float32) for n in names}
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inputs[0], 0)[2][0])
        self.stream = torch.cuda.Stream()

    def timer(self, batch: int, input_size: int) -> Callable[[], None]:
        """One timed inference on device-resident buffers allocated once: no host copies in the timed region.

        Timing with host copies measures PCIe, not the engine (and hides an INT8 speed-up behind them).
        """
        import torch

        name = self.inputs[0]
        shape = (batch, 3, input_size, input_size)
        if not self.context.set_input_shape(name, shape):
            raise UserError(f"batch {batch} lies outside the engine's profile", "bench batch sizes within the --trt-batches range")
        device_in = torch.randn(shape, device="cuda").to(self.dtypes[name])
        buffers = [device_in] + [torch.empty(tuple(self.context.get_tensor_shape(o)), dtype=self.dtypes[o], device="cuda")
                                 for o in self.outputs]  # fmt: skip
        for tensor_name, buffer in zip([name, *self.outputs], buffers, strict=True):
            self.context.set_tensor_address(tensor_name, buffer.data_ptr())
        stream = self.stream

        def run() -> None:
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed for input shape {shape}")
            stream.synchronize()

        run.buffers = buffers  # type: ignore[attr-defined]  # kept alive while the timer exists
        return run

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits (the first output) for an NCHW batch; batches beyond the profile run in chunks."""
        if len(x) > self.max_batch:
            return np.concatenate([self._run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)])
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        x = np.ascontiguousarray(x, dtype=np.float32)
        name = self.inputs[0]
        if x.ndim != 4 or not self.context.set_input_shape(name, tuple(x.shape)):
            raise UserError(
                f"input of shape {tuple(x.shape)} does not fit the engine's profile for {name!r}",
                "pass an NCHW batch whose size lies within the batches given to build_engine",
            )
        with torch.cuda.stream(self.stream):
            device_in = torch.from_numpy(x).to("cuda").to(self.dtypes[name])
            self.context.set_tensor_address(name, device_in.data_ptr())
            results = {}
            for out in self.outputs:
                shape = tuple(self.context.get_tensor_shape(out))
                results[out] = torch.empty(shape, dtype=self.dtypes[out], device="cuda")
                self.context.set_tensor_address(out, results[out].data_ptr())
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        if not ok:
            raise RuntimeError(f"TensorRT execution failed for input shape {tuple(x.shape)}")
        return results[self.outputs[0]].float().cpu().numpy()
