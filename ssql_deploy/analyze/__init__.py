"""Where quantization hurts and what to do about it: per-layer sensitivity, mixed-precision plans, accuracy control, and the artifact-vs-PyTorch debugger."""
