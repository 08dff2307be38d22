"""Replace ONNX operators a runtime's parser lacks by the primitive operators that define them.

TensorRT 8.5 (JetPack 5.1, Jetson Xavier) parses ONNX up to opset 17 but has no
LayerNormalization, which opset 17 added (onnx-tensorrt's operator table: "N" until 8.6).
Expanded into ReduceMean / Sub / Mul / Add / Sqrt / Div (the same arithmetic, in the input's
type: LayerNormalization's `stash_type`, FP32 statistics for an FP16 input, has no counterpart,
so an FP16 model's expanded statistics are FP16 and its parity check is what says whether that
holds), the same network parses, and TensorRT's builder fuses the pattern again on the device.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def decompose(proto, op_types: tuple[str, ...]) -> dict[str, int]:
    """Rewrite ``proto``'s graph in place; return how many nodes of each type were replaced."""
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    graph, counts = proto.graph, {}
    for op in op_types:
        rewrite = REWRITES[op]
        nodes = []
        for node in graph.node:
            if node.op_type == op and node.domain in ("", "ai.onnx"):
                nodes.extend(rewrite(node, graph, opset))
                counts[op] = counts.get(op, 0) + 1
            else:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    return counts


def _layer_norm(node, graph, opset: int) -> list:
    """Y = (X - mean) / sqrt(var + epsilon) * scale + B over the axes from `axis` to the last."""
    from onnx import helper, numpy_helper

    if len([o for o in node.output if o]) > 1:
        raise ValueError(
            f"LayerNormalization `{node.name}` uses its Mean / InvStdDev outputs, "
            "which have no expansion here"
        )
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis, eps = attrs.get("axis", -1), attrs.get("epsilon", 1e-5)
    rank = _rank(graph, node.input[0])
    if rank is None and axis >= 0:
        raise ValueError(f"LayerNormalization `{node.name}`: input rank unknown, cannot expand axis {axis}")
    axes = list(range(axis, 0)) if axis < 0 else list(range(axis - rank, 0))
    name = node.name or node.output[0]
    t = lambda s: f"{name}/{s}"
    graph.initializer.append(numpy_helper.from_array(np.array(eps, dtype=np.float32), t("epsilon")))

    def mean(x, out):
        if opset >= 18:
            graph.initializer.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), out + "_axes"))
            return helper.make_node("ReduceMean", [x, out + "_axes"], [out], keepdims=1, name=out)
        return helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=1, name=out)

    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    scaled = node.output[0] if bias is None else t("scaled")
    nodes = [
        mean(x, t("mean")),
        helper.make_node("Sub", [x, t("mean")], [t("centred")], name=t("centred")),
        helper.make_node("Mul", [t("centred"), t("centred")], [t("squared")], name=t("squared")),
        mean(t("squared"), t("variance")),
        helper.make_node("Add", [t("variance"), t("epsilon")], [t("variance_eps")], name=t("variance_eps")),
        helper.make_node("Sqrt", [t("variance_eps")], [t("std")], name=t("std")),
        helper.make_node("Div", [t("centred"), t("std")], [t("normalized")], name=t("normalized")),
        helper.make_node("Mul", [t("normalized"), scale], [scaled], name=t("scaled")),
    ]
    if bias is not None:
        nodes.append(helper.make_node("Add", [scaled, bias], [node.output[0]], name=t("shifted")))
    return nodes


def _rank(graph, name: str) -> int | None:
    for v in (*graph.input, *graph.value_info, *graph.output):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


REWRITES: dict[str, Callable] = {"LayerNormalization": _layer_norm}
