"""4-bit blockwise weights for an ONNX model's MatMuls, as ONNX Runtime's ``MatMulNBits`` (issue 31, part 2).

ONNX Runtime's CPU provider runs ``MatMulNBits`` (a contrib operator: weights in 4 bits, one scale per
``group_size`` input channels, symmetric here) with its own kernels; ``accuracy_level = 4`` quantizes
the activations to int8 at run time and uses the CPU's integer dot products (AVX2 / AVX512-VNNI),
lower levels dequantize the weights and compute in FP32. ONNX Runtime's ``MatMulNBitsQuantizer`` makes
them from MatMul nodes with a constant weight; Gemm nodes (what the exporter writes for a 2-D Linear)
are first written as the MatMul (and Add) they compute, under their own names.

Offered for models whose MatMul/Gemm weights are at least ``min_linear_share`` of all weights (a
CNN's convolutions stay in its INT8 artifacts). ``float_layers`` (recovery sets it) names MatMul nodes
kept out of 4 bits: they get 8-bit blockwise weights (``MatMulNBits`` with ``bits = 8``), since one
left in float would make the file larger than the INT8 one. ``int4_share`` is the share of the
multiply-accumulates of layers with weights that have 4-bit ones (the report says ``mixed`` below 1).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import NotApplicable, StageError, reason
from toolchain.core.export import quiet_logger
from toolchain.core.options import option
from toolchain.core.stage import Recoverable, Stage, StageResult, register_stage


@dataclasses.dataclass(frozen=True)
class QuantizeOnnxInt4Options:
    group_size: Literal[16, 32, 64, 128, 256] = option(
        32, "input channels per block sharing one scale (symmetric 4-bit weights)"
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = option(
        4, "MatMulNBits' arithmetic: 4 = int8 activations on the CPU's integer units, 0/1 = FP32"
    )
    min_linear_share: float = option(
        0.5, "offered when the model's MatMul/Gemm weights are at least this share of all its weights"
    )
    float_layers: tuple[str, ...] = option(
        (), "MatMul nodes kept out of 4 bits (at 8-bit weights, MatMulNBits bits = 8); recovery sets it"
    )


@register_stage
class QuantizeOnnxInt4(Stage, Recoverable):
    name = "quantize_onnx_int4"
    requires = ("onnx", "onnxruntime")
    transitions = {Kind.ONNX: Kind.ONNX}
    Options = QuantizeOnnxInt4Options
    report_facts = (
        "group_size", "accuracy_level", "linear_weight_share", "int4_nodes", "int8_layers", "int4_share",
    )  # fmt: skip
    kept_as = "at 8 bits"

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx

        from toolchain.passes.onnx_share import onnx_int4_share
        from toolchain.stages.export_onnx import save_onnx

        o = self.options
        model = _as_matmuls(onnx.load(str(artifact.path)))
        share = matmul_weight_share(model)
        if share < o.min_linear_share:
            raise NotApplicable(
                f"{self.name}: MatMul/Gemm weights are {share:.0%} of this model's weights (4-bit weights "
                f"are offered from {o.min_linear_share:.0%}: the rest stays in its INT8 artifacts)"
            )
        # the layers recovery names first, at 8 bits (MatMulNBits with bits = 8), then the rest at 4: a
        # layer kept in float would make the file larger than the INT8 one
        weighted = _weighted_matmuls(model)
        try:
            with quiet_logger("onnxruntime.quantization"):
                if o.float_layers:
                    model = _nbits(model, 8, o, exclude=[n for n in weighted if n not in o.float_layers])
                quantized = _nbits(model, 4, o, exclude=[])
        except Exception as e:  # the quantizer's own errors are of many types
            raise StageError(
                f"{self.name}: ONNX Runtime cannot quantize these weights: {reason(e)}"
            ) from None
        path = self.output_path(artifact, ctx, ".onnx")
        save_onnx(quantized, path, artifact.has_external_data)
        try:
            int4_share = onnx_int4_share(path, ctx.sample_shapes())["int4_share"]
        except Exception:  # noqa: BLE001 - a label's measurement must never cost the artifact
            int4_share = None
        facts = {
            "ranges": "dynamic" if o.accuracy_level == 4 else None,  # level 4: int8 activations per call
            "group_size": o.group_size,
            "accuracy_level": o.accuracy_level,
            "linear_weight_share": round(share, 4),
            "int4_nodes": sum(1 for n in quantized.graph.node if _bits(n) == 4),
            "int8_layers": list(o.float_layers),
            "int4_share": int4_share,
        }
        return StageResult(dataclasses.replace(artifact, path=path, precision="int4"), facts)

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        import onnx

        return _weighted_matmuls(_as_matmuls(onnx.load(str(artifact.path))))


def _weighted_matmuls(model) -> list[str]:
    """The MatMul nodes that multiply by a constant weight: what gets 4 (or 8) bits."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _nbits(model, bits: int, o: QuantizeOnnxInt4Options, exclude: list[str]):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=o.group_size, is_symmetric=True, accuracy_level=o.accuracy_level, bits=bits
    )
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=o.group_size,
        is_symmetric=True,
        accuracy_level=o.accuracy_level,
        nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul",),
        algo_config=config,
    )
    quantizer.process()
    return quantizer.model.model


def _bits(node) -> int | None:
    if node.op_type != "MatMulNBits":
        return None
    return next((a.i for a in node.attribute if a.name == "bits"), None)


def matmul_weight_share(model) -> float:
    """The share of the model's float weights (by element count) that MatMul/Gemm nodes multiply by."""
    import math

    sizes = {i.name: math.prod(i.dims) for i in model.graph.initializer if i.data_type == 1}  # FLOAT
    used = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    total = sum(sizes.values())
    return sum(v for k, v in sizes.items() if k in used) / total if total else 0.0


def _as_matmuls(model):
    """Gemm nodes with a constant weight, no transposed input and unit alpha and beta, written as the
    MatMul (plus Add for the bias) they compute; every MatMul by a constant gets a weight of its own
    (a transposed copy where ``transB`` says so, a copy where nodes share one): ONNX Runtime's
    quantizer names its outputs after the weight, and the original may be read elsewhere (a tied
    embedding's Gather)."""
    import collections

    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    uses = collections.Counter(i for n in graph.node for i in n.input)
    nodes, added = [], []

    def own(name: str, node_name: str, transpose: bool) -> str:
        if not transpose and uses[name] == 1:
            return name
        array = numpy_helper.to_array(weights[name])
        new = f"{node_name}_weight"
        added.append(numpy_helper.from_array(np.ascontiguousarray(array.T if transpose else array), new))
        return new

    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        constant = len(node.input) > 1 and node.input[1] in weights
        if node.op_type == "MatMul" and constant:
            w = own(node.input[1], node.name, False)
            nodes.append(helper.make_node("MatMul", [node.input[0], w], list(node.output), name=node.name))
            continue
        if (
            node.op_type != "Gemm"
            or not constant
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        w = own(node.input[1], node.name, bool(attrs.get("transB", 0)))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w], [product], name=node.name))
        if has_bias:
            nodes.append(
                helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias")
            )
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model
