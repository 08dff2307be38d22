"""Multiply-accumulates of an ONNX file by the precision they run in: the counts behind the
report's ``int8_share`` and ``fp16_share`` (toolchain.verdict.share), also taken by stages that
convert a quantized ONNX model into another runtime's file (which cannot be counted itself).

The inputs' dimensions are set from one batch-1 sample (a symbolic one left counts as 1). Nodes
whose shapes inference leaves unknown are not counted; ``unknown_nodes`` says how many.
"""

from __future__ import annotations

import math
from pathlib import Path

from toolchain.passes.shapes import value_dims, value_types

INTEGER = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM"}
WEIGHTED = {"Conv", "Gemm", "MatMul", "LSTM", "GRU", "MatMulNBits", *INTEGER}


def onnx_int8_share(path: Path, sample: list[tuple[int, ...]] | None = None) -> dict:
    """{"int8_share", "int8_share_basis": "macs", "macs", "unknown_nodes"} of an ONNX file;
    ``sample``: one batch-1 input's shape per graph input, which replace the file's symbolic
    dimensions (a sequence's length) before shape inference."""
    model = _at_sample(path, sample)
    graph = model.graph
    shapes = value_dims(model, data_prop=True)
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    total = int8 = 0
    unknown = 0
    for node in graph.node:
        if node.op_type not in WEIGHTED:
            continue
        macs = _macs(node, shapes)
        if macs is None:
            unknown += 1
            continue
        total += macs
        if node.op_type in INTEGER or (
            node.op_type in ("Conv", "Gemm", "MatMul")
            and all(made_by.get(i) == "DequantizeLinear" for i in node.input[:2])
        ):
            int8 += macs
    return {
        "int8_share": round(int8 / total, 4) if total else None,
        "int8_share_basis": "macs",
        "macs": total,
        "unknown_nodes": unknown,
        "contexts": sum(1 for n in graph.node if n.op_type == "EPContext"),
    }


def onnx_int4_share(path: Path, sample: list[tuple[int, ...]] | None = None) -> dict:
    """{"int4_share", "macs"} of an ONNX file: the share of the multiply-accumulates of its layers with
    weights (Conv, Gemm, LSTM/GRU, MatMul by a constant) whose weights are 4-bit: ``MatMulNBits`` nodes
    (ONNX Runtime's blockwise weights) or a weight dequantized from an INT4 initializer (Q/DQ, the NPU's);
    a MatMul of two activations (attention's) has no weights to store in 4 bits."""
    import onnx

    model = _at_sample(path, sample)
    shapes = value_dims(model, data_prop=True)
    for node in model.graph.node:  # com.microsoft's Q/DQ (16- and 4-bit types) are not shape-inferred
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])
    initializers = {i.name: i.data_type for i in model.graph.initializer}
    dequantized = {
        n.output[0]: initializers[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in initializers
    }
    total = four = 0
    for node in model.graph.node:
        weight = node.input[1] if len(node.input) > 1 else ""
        constant = weight in initializers or weight in dequantized
        if node.op_type not in WEIGHTED or (node.op_type == "MatMul" and not constant):
            continue
        macs = _macs(node, shapes)
        if macs is None:
            continue
        total += macs
        nbits = node.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 4 for a in node.attribute)
        if nbits or dequantized.get(weight) == onnx.TensorProto.INT4:
            four += macs
    return {"int4_share": round(four / total, 4) if total else None, "macs": total}


def onnx_fp16_share(path: Path, sample: list[tuple[int, ...]] | None = None) -> dict:
    """{"fp16_share", "macs"} of an FP16 ONNX file: the share of its Conv/Gemm/MatMul/LSTM/GRU
    multiply-accumulates whose input is FP16 (the rest were kept in FP32 behind Casts)."""
    import onnx

    model = _at_sample(path, sample)
    shapes, types = value_dims(model, data_prop=True), value_types(model)
    total = half = 0
    for node in model.graph.node:
        if node.op_type not in WEIGHTED - INTEGER:
            continue
        macs = _macs(node, shapes)
        if macs is None:
            continue
        total += macs
        if types.get(node.input[0]) == onnx.TensorProto.FLOAT16:
            half += macs
    return {"fp16_share": round(half / total, 4) if total else None, "macs": total}


def _at_sample(path: Path, sample: list[tuple[int, ...]] | None):
    """The file's graph (weights not loaded) with its inputs' dimensions set to one sample's."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    fed = [i for i in model.graph.input if i.name not in weights]
    for value, shape in zip(fed, sample or ()):
        dims = value.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            for d, n in zip(dims, shape):
                d.Clear()
                d.dim_value = int(n)
    return model


def _macs(node, shapes: dict) -> int | None:
    def dims(name: str) -> list[int] | None:  # a symbol left (the batch) counts as 1
        d = shapes.get(name)
        d = None if d is None else [1 if isinstance(v, str) else v for v in d]
        return d if d is not None and all(isinstance(v, int) and v > 0 for v in d) else None

    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = dims(node.input[3] if op == "QLinearConv" else node.input[1])
        y = dims(node.output[0])
        return None if w is None or y is None else math.prod(y) * math.prod(w[1:])
    if op == "Gemm":
        a, y = dims(node.input[0]), dims(node.output[0])
        trans = next((x.i for x in node.attribute if x.name == "transA"), 0)
        return None if a is None or y is None else math.prod(y) * (a[0] if trans else a[1])
    if op == "MatMulNBits":  # A (..., K) times blockwise B (N, K): the attributes K and N (a contrib
        # operator: its output's shape is not inferred, its input's is)
        a = dims(node.input[0])
        n = next((x.i for x in node.attribute if x.name == "N"), None)
        return None if a is None or n is None else math.prod(a) * n
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a, y = dims(node.input[0]), dims(node.output[0])
        return None if a is None or y is None else math.prod(y) * a[-1]
    # LSTM / GRU / DynamicQuantizeLSTM: X (T, N, I) or (N, T, I); W (D, gates * H, I); R (D, gates * H, H)
    x, w = dims(node.input[0]), dims(node.input[1])
    r = dims(node.input[2])
    if x is None or w is None or r is None:
        return None
    batch_first = next((a.i for a in node.attribute if a.name == "layout"), 0) == 1
    steps, batch = (x[1], x[0]) if batch_first else (x[0], x[1])
    if op == "DynamicQuantizeLSTM":  # its weights are stored transposed: (D, I, 4H) and (D, H, 4H)
        return steps * batch * w[0] * w[2] * (w[1] + r[1])
    return steps * batch * w[0] * w[1] * (w[2] + r[2])
