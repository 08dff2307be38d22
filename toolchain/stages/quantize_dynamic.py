"""Dynamic INT8: weights quantized ahead of time, activations at run time, per batch.

For models whose weights sit in recurrent layers and matrix products (LSTM, GRU, attention
blocks): an LSTM's gates and a transformer's token projections see activation ranges that
change with every input, and static INT8 quantizes neither LSTM nor GRU at all (ONNX Runtime
and FX both leave them in float). Convolutional models are better served by static INT8;
for them these stages skip with the reason.

- ONNX Runtime `quantize_dynamic` writes DynamicQuantizeLSTM / DynamicQuantizeMatMul
  (MatMulInteger) nodes: an ONNX Runtime artifact, not a portable Q/DQ file.
- torch: ``torch.ao.quantization.quantize_dynamic`` swaps nn.Linear / nn.LSTM / nn.GRU for
  their dynamically quantized modules, saved as TorchScript that runs fbgemm/x86 or qnnpack
  kernels with no compiler. (torchao's successor flow targets torch.compile and LLM weight
  layouts, and yields no TorchScript file, which the x86 and mobile artifacts are.)
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import warnings
from typing import Literal

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import NotApplicable, StageError, reason
from toolchain.core.options import option
from toolchain.core.stage import Recoverable, Stage, StageResult, register_stage
from toolchain.stages.quantize_onnx import (
    float_weight_share,
    preprocessed,
    quiet_onnxruntime,
    reduce_range_for,
    rescaled,
)
from toolchain.stages.quantize_torch import counted_int8_share

DYNAMIC_ONNX_LAYERS = ("MatMul", "Gemm", "LSTM", "GRU", "Attention")


@dataclasses.dataclass(frozen=True)
class QuantizeOnnxDynamicOptions:
    per_channel: bool = option(
        False,
        "per-output-channel weight scales (off: ONNX Runtime's default per-tensor scales, whose "
        "integer MatMul ran 7 % faster on the tests' ViT at the same SQNR); recovery turns it on after "
        "SmoothQuant's migration",
    )
    weights: Literal["int8", "uint8"] = option("int8", "weight type")
    reduce_range: bool | None = option(
        None, "7-bit weights for CPUs without VNNI (unset: follow `runtime.isa`)"
    )
    op_types: tuple[str, ...] = option(DYNAMIC_ONNX_LAYERS, "ONNX op types quantized")
    preprocess: bool = option(
        True,
        "ONNX Runtime's pre-processing first: it folds the weight reshapes a multi-layer LSTM's export "
        "computes in the graph, without which those weights are not constants and stay FP32",
    )
    smooth: bool = option(
        False,
        "SmoothQuant: move LayerNorm outputs' outlier channel scales into the Linear weights that read "
        "them (same function in FP32; activations are still quantized per tensor); recovery tries it",
    )
    float_layers: tuple[str, ...] = option((), "node names kept in floating point; recovery sets it")


@register_stage
class QuantizeOnnxDynamic(Stage, Recoverable):
    name = "quantize_onnx_dynamic"
    requires = ("onnx", "onnxruntime")
    transitions = {Kind.ONNX: Kind.ONNX}
    Options = QuantizeOnnxDynamicOptions
    report_facts = ("reduce_range",)

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        o = self.options
        graph = onnx.load(str(artifact.path), load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        fits = [
            n
            for n in graph.node
            if n.op_type in ("LSTM", "GRU") or (n.op_type == "MatMul" and set(n.input) & weights)
        ]
        if not fits:
            raise NotApplicable(
                "quantize_onnx_dynamic: the model has no LSTM, GRU or weighted MatMul "
                "(dynamic INT8 is for sequence models; static INT8 covers convolutions and Gemm)"
            )
        reduce_range = reduce_range_for(o.reduce_range, "uint8", o.weights, ctx.isa)
        path = self.output_path(artifact, ctx, ".onnx")
        source = self._source(artifact, ctx, reduce_range)
        with quiet_onnxruntime():
            try:
                quantize_dynamic(
                    str(source),
                    str(path),
                    op_types_to_quantize=list(o.op_types),
                    per_channel=o.per_channel,
                    nodes_to_exclude=list(o.float_layers) or None,
                    reduce_range=reduce_range,
                    weight_type={"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[o.weights],
                    use_external_data_format=artifact.has_external_data,
                )
            except Exception as e:
                raise StageError(
                    f"quantize_onnx_dynamic: ONNX Runtime cannot quantize this model: {reason(e)}"
                ) from None
        quantized = onnx.load(str(path), load_external_data=False).graph
        ops = collections.Counter(n.op_type for n in quantized.node)
        dynamic = {
            op: n
            for op, n in sorted(ops.items())
            if op.startswith("DynamicQuantize") or op.endswith("Integer")
        }
        facts = {
            "ranges": "dynamic",
            "reduce_range": reduce_range,
            "quantized_ops": dynamic,
            "nodes": sum(ops.values()),
            "float_weight_share": float_weight_share(quantized),
            "float_ops": sorted({"LSTM", "GRU"} & set(ops)),
            "float_layers": list(o.float_layers),
            **ctx.cache.get(("rescale_onnx", source.name), {}),
        }
        return StageResult(dataclasses.replace(artifact, path=path, precision="int8"), facts)

    def _source(self, artifact: Artifact, ctx: BuildContext, reduce_range: bool):
        o = self.options
        return rescaled(
            preprocessed(artifact, ctx) if o.preprocess else artifact.path,
            ctx,
            self.name,
            False,
            o.smooth,
            reduce_range,
            o.per_channel,
        )

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        import onnx

        o = self.options
        source = self._source(artifact, ctx, reduce_range_for(o.reduce_range, "uint8", o.weights, ctx.isa))
        graph = onnx.load(str(source), load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        return [
            n.name
            for n in graph.node
            if n.name
            and n.op_type in o.op_types
            and n.op_type in DYNAMIC_ONNX_LAYERS
            and (n.op_type in ("LSTM", "GRU") or set(n.input[1:]) & weights)
        ]

    def fixes(self) -> tuple[str, ...]:
        # the migration first: the same function at no cost at run time, where per-channel scales cost
        # ONNX Runtime's faster per-tensor kernel (recovery keeps every fix that helps)
        return ("smooth", "per_channel")


@dataclasses.dataclass(frozen=True)
class QuantizeTorchDynamicOptions:
    engine: Literal["x86", "fbgemm", "qnnpack"] = option(
        "x86", "PyTorch quantized engine the INT8 kernels are packed for"
    )
    modules: tuple[Literal["Linear", "LSTM", "GRU"], ...] = option(
        ("Linear", "LSTM", "GRU"), "module types quantized"
    )
    smooth: bool = option(
        False,
        "SmoothQuant: move LayerNorm outputs' outlier channel scales into the Linear weights that read "
        "them (FX models; same function in FP32); recovery tries it",
    )
    float_layers: tuple[str, ...] = option((), "module names kept in floating point; recovery sets it")


@register_stage
class QuantizeTorchDynamic(Stage, Recoverable):
    name = "quantize_torch_dynamic"
    requires = ("torch",)
    transitions = {Kind.EAGER: Kind.EAGER, Kind.FX: Kind.FX}
    Options = QuantizeTorchDynamicOptions

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import torch
        from torch import nn
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        o = self.options
        types = {getattr(nn, m) for m in o.modules}
        counts = collections.Counter(type(m).__name__ for m in artifact.model.modules() if type(m) in types)
        if not counts or (not counts.keys() & {"LSTM", "GRU"} and not _attention(artifact.model)):
            raise NotApplicable(
                "quantize_torch_dynamic: the model has no LSTM, GRU or attention "
                "(dynamic INT8 is for sequence models; static INT8 covers convolutions and linear heads)"
            )
        torch.backends.quantized.engine = o.engine
        model, facts = copy.deepcopy(artifact.model), {}
        if o.smooth and artifact.kind is Kind.FX:
            from toolchain.passes.rescale import rescaled_copy
            from toolchain.passes.smooth import Bits

            # default_dynamic_qconfig: per-tensor weights, so the migration is measured for those
            model, facts = rescaled_copy(
                artifact.model,
                ctx.calibration.x[:128],
                self.name,
                equalize=False,
                smooth=True,
                bits=Bits(per_channel=False),
            )
        # names override types
        spec = {t: default_dynamic_qconfig for t in types} | {name: None for name in o.float_layers}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = quantize_dynamic(model, spec, dtype=torch.qint8)
            except (RuntimeError, NotImplementedError, AssertionError) as e:
                raise StageError(
                    f"quantize_torch_dynamic: {o.engine} cannot quantize this model: {reason(e)}"
                ) from None
        return StageResult(
            dataclasses.replace(artifact, model=model, precision="int8", quantized_engine=o.engine),
            {
                "ranges": "dynamic",
                "engine": o.engine,
                "quantized_modules": dict(sorted(counts.items())),
                "float_layers": list(o.float_layers),
                "int8_share": counted_int8_share(model, ctx),
                **facts,
            },
        )

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        from torch import nn

        types = tuple(getattr(nn, m) for m in self.options.modules)
        return [name for name, m in artifact.model.named_modules() if name and isinstance(m, types)]

    def fixes(self) -> tuple[str, ...]:
        return ("smooth",)

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        from toolchain.passes.rescale import fx_finds

        return artifact.kind is Kind.FX and fx_finds(artifact.model, fix, ctx.calibration.x)


def _attention(model) -> bool:
    """Whether the model computes attention: an nn.MultiheadAttention, or (lifted from torch.export) an
    attention call in the graph."""
    import torch
    from torch import nn

    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return True
    if isinstance(model, torch.fx.GraphModule):
        return any("attention" in str(n.target) for n in model.graph.nodes if n.op == "call_function")
    return False
