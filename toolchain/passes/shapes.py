"""Every value's dimensions and element type in an ONNX graph, from ONNX shape inference: what the
opset conversion (Split's axis length) and the INT8 and FP16 shares (multiply-accumulates per node,
and which run in FP16) read."""

from __future__ import annotations


def value_types(model) -> dict[str, int]:
    """{value name: its ONNX element type (onnx.TensorProto.FLOAT16, ...)} where inference knows it."""
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(model).graph
    types = {i.name: i.data_type for i in graph.initializer}
    for v in (*graph.input, *graph.value_info, *graph.output):
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def value_dims(model, data_prop: bool = False) -> dict[str, list[int | str | None]]:
    """{value name: its dimensions}: an int where inference knows it, the symbol's name where the
    graph names one (the batch), None where neither; initializers included. ``data_prop``: also
    follow sizes computed in the graph (Shape -> Gather -> Reshape), as a sequence's length is."""
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(model, data_prop=data_prop).graph
    dims: dict[str, list[int | str | None]] = {i.name: list(i.dims) for i in graph.initializer}
    for v in (*graph.input, *graph.value_info, *graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            dims[v.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            ]
    return dims
