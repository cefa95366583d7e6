#!/usr/bin/env bash
# TensorRT on a GPU machine, in one command: ./benchmarks/gpu_check.sh
#
# Installs what it needs from the package registry (the TensorRT wheel matching the driver's CUDA major
# version, onnxruntime-gpu), fine-tunes ResNet-18 and MobileNetV2 on Fashion-MNIST on the spot, builds
# FP16 and INT8 engines, benches them (top-1 on the full test split; latency at batch 1 and 32 on
# device-resident buffers) against the FP16 engine, runs the gates and writes
# benchmarks/results/gpu_check.{json,log}. Idempotent: finished runs are reused. Refuses on a machine
# without an NVIDIA GPU before installing anything.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: error: no NVIDIA GPU here (nvidia-smi finds none); run this on a machine with one and its driver" >&2
    exit 2
fi
cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\).*/\1/p' | head -n 1)
if [ -z "$cuda_major" ]; then
    echo "gpu_check: error: nvidia-smi does not report the driver's CUDA version; update the NVIDIA driver" >&2
    exit 2
fi

make setup data
.venv/bin/python -m pip install --quiet "tensorrt-cu${cuda_major}" onnxruntime-gpu
exec .venv/bin/python benchmarks/gpu_check.py "$@"
