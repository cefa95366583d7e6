"""The FP32 ONNX with its float tensors in float16: the FP16 baseline a strongly typed TensorRT build needs.

TensorRT 10 builds the FP16 baseline from the FP32 ONNX with the FP16 flag, free to pick FP16 per
layer. TensorRT 11 has strongly typed networks only: each layer runs in the type the graph gives
it, so the FP32 ONNX would build an FP32 engine and every INT8 speed-up would be measured against
the wrong baseline. This graph keeps float32 at its input and outputs (a Cast after the input and
before each output, so the same float32 buffers feed it) and float16 everywhere in between.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _half(tensor: TensorProto) -> TensorProto:
    if tensor.data_type != TensorProto.FLOAT:
        return tensor
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)


def cast_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 graph with float32 input and outputs; other element types are left alone."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    for i, init in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_half(init))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(_half(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    del graph.value_info[:]  # intermediate types changed; runtimes infer them again
    casts = []
    for graph_input in (i for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT):
        inner = f"{graph_input.name}_fp16"
        for node in graph.node:
            node.input[:] = [inner if name == graph_input.name else name for name in node.input]
        casts.append(helper.make_node("Cast", [graph_input.name], [inner], name=f"{inner}_cast", to=TensorProto.FLOAT16))
    for graph_output in (o for o in graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT):
        inner = f"{graph_output.name}_fp16"
        for node in graph.node:
            node.output[:] = [inner if name == graph_output.name else name for name in node.output]
            node.input[:] = [inner if name == graph_output.name else name for name in node.input]
        graph.node.append(helper.make_node("Cast", [inner], [graph_output.name], name=f"{inner}_cast", to=TensorProto.FLOAT))
    for cast in reversed(casts):
        graph.node.insert(0, cast)
    onnx.checker.check_model(half, full_check=True)
    return half
