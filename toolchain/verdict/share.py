"""How much of a model an INT8 artifact really computes in INT8: ``int8_share``.

An "int8" label says which quantizer ran, not what it quantized: ONNX Runtime's static INT8 leaves
an LSTM in float (no static LSTM kernel), so a speaker embedder labelled "int8" can run 99.8 % of
its multiply-accumulates in FP32. For an ONNX file the share is counted in multiply-accumulates
per sample (basis ``macs``), from the file's own graph and ONNX shape inference:

- Conv, Gemm, MatMul: INT8 when both their activation and weight inputs come from a
  DequantizeLinear (the Q/DQ form ONNX Runtime fuses into integer kernels), or when the node is an
  integer one (ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul);
- LSTM, GRU: FP32; DynamicQuantizeLSTM: INT8 (weights INT8, inputs quantized per call).

The inputs' dimensions are set from one batch-1 sample (a symbolic one left counts as 1). Nodes
whose shapes inference leaves unknown are not counted; ``unknown_nodes`` says how many.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from toolchain.passes.shapes import value_dims, value_types

log = logging.getLogger("toolchain")

INTEGER = {"ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM"}
WEIGHTED = {"Conv", "Gemm", "MatMul", "LSTM", "GRU", *INTEGER}


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


def int8_share_of(artifact, sample: list[tuple[int, ...]]) -> dict:
    """``int8_share`` and ``int8_share_basis`` of a shipped artifact: counted in multiply-accumulates
    for an ONNX file, None (basis None) where this runtime's file cannot be read for it yet."""
    unknown = {"int8_share": None, "int8_share_basis": None}
    if artifact.path is None or artifact.path.suffix != ".onnx":
        return unknown
    try:
        counted = onnx_int8_share(artifact.path, sample)
    except Exception as e:  # noqa: BLE001 - a label's measurement must never cost the artifact
        log.debug("int8_share not measured for %s: %s", artifact.path.name, e)
        return unknown
    if not counted["macs"] or counted.get("contexts"):  # an NPU context (in part): opaque to the count
        return unknown
    return {k: counted[k] for k in ("int8_share", "int8_share_basis")}


def measured_precision(declared: str, share: float | None) -> str:
    """The precision a quantized artifact is reported at, from what it computes: ``int8`` when every
    counted multiply-accumulate runs in INT8, ``mixed`` when some do, ``fp32`` when none do (a quantizer
    that left every layer in float: no artifact computing nothing in INT8 is called int8 or mixed).
    Other precisions, and artifacts whose share is not measured, keep the one their stages declare."""
    if declared not in ("int8", "mixed") or share is None:
        return declared
    if share == 0:
        return "fp32"
    return "int8" if share >= 1 else "mixed"


def fp16_share_of(artifact, sample: list[tuple[int, ...]]) -> float | None:
    """``fp16_share`` of a shipped FP16 ONNX file; None for other artifacts (a torch FP16 artifact's
    share is its cast stage's fact) or where it cannot be counted."""
    if artifact.precision != "fp16" or artifact.path is None or artifact.path.suffix != ".onnx":
        return None
    try:
        return onnx_fp16_share(artifact.path, sample)["fp16_share"]
    except Exception as e:  # noqa: BLE001 - a label's measurement must never cost the artifact
        log.debug("fp16_share not measured for %s: %s", artifact.path.name, e)
        return None
