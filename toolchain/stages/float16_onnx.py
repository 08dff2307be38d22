"""FP16 ONNX: weights and activations stored in FP16, inputs and outputs kept FP32 (what callers
feed, and what TensorRT's I/O bindings expect), with ONNX Runtime's converter
(``onnxruntime.transformers.float16``), which keeps the operators on its block list (no FP16
support: TopK, Range, tree ensembles, ...) in FP32 behind Casts.

For nvidia_xavier it shows what FP16 rounding of weights and tensors does to the model, as
TensorRT's `--fp16` would round them. It approximates TensorRT, it does not reproduce it:
ONNX Runtime's CPU provider computes some FP16 nodes in FP32 internally, and TensorRT picks its
own FP16/FP32 kernels per layer; the engine's own parity is taken on the device.
"""

from __future__ import annotations

import dataclasses

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.options import option
from toolchain.core.stage import Recoverable, Stage, StageResult, register_stage
from toolchain.passes.fp16_range import RANGE_SAMPLES, drop_cast_round_trips, onnx_overflowing, onnx_ranges
from toolchain.stages.export_onnx import save_onnx


@dataclasses.dataclass(frozen=True)
class Float16OnnxOptions:
    keep_io_types: bool = option(True, "inputs and outputs stay FP32 (Casts at the edges)")
    op_block_list: tuple[str, ...] = option((), "op types kept in FP32 besides the converter's defaults")
    float_layers: tuple[str, ...] = option((), "ONNX node names kept in FP32 (set by recovery)")
    keep_overflow: bool = option(
        False,
        "keep in FP32 every node whose FP32 value on the calibration inputs exceeds FP16's range "
        "(65504); on for nvidia_xavier, where ONNX Runtime's CPU cannot show TensorRT's FP16 overflow",
    )


@register_stage
class Float16Onnx(Stage, Recoverable):
    name = "float16_onnx"
    requires = ("onnx", "onnxruntime")
    transitions = {Kind.ONNX: Kind.ONNX}
    Options = Float16OnnxOptions
    report_facts = ("fp32_nodes",)

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        proto = onnx.load(str(artifact.path))
        keep = list(self.options.float_layers)
        if self.options.keep_overflow:
            keep += [n for n in _overflowing(artifact, ctx) if n not in keep]
        before = {n.name for n in proto.graph.node}
        try:
            half = convert_float_to_float16(
                proto,
                keep_io_types=self.options.keep_io_types,
                op_block_list=[*DEFAULT_OP_BLOCK_LIST, *self.options.op_block_list],
                node_block_list=keep,
            )
            # the converter rounds every kept node's output to FP16 and back, even between two kept
            # nodes: the value FP16 cannot hold would be inf there
            joined = drop_cast_round_trips(half, before) if keep else 0
            OnnxModel(half).topological_sort()  # the converter appends the input Casts after their consumers
            onnx.checker.check_model(half)
        except Exception as e:
            raise StageError(f"float16_onnx: {reason(e)}") from None
        path = self.output_path(artifact, ctx, ".onnx")  # one file per variant (recovery's attempts)
        save_onnx(half, path, external=artifact.has_external_data)
        kept = sorted(
            {
                n.op_type
                for n in half.graph.node
                if n.op_type in DEFAULT_OP_BLOCK_LIST or n.op_type in self.options.op_block_list
            }
        )
        facts = {"fp32_ops": kept, "fp32_nodes": keep, "io": "fp32", "fp32_regions_joined": joined}
        return StageResult(dataclasses.replace(artifact, path=path, precision="fp16"), facts)

    # recovery: nodes to keep in FP32, and the range rule as the first fix
    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        import onnx

        graph = onnx.load(str(artifact.path), load_external_data=False).graph
        return [n.name for n in graph.node if n.op_type not in _NOT_COMPUTING]

    def fixes(self) -> tuple[str, ...]:
        return ("keep_overflow",)

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        return fix == "keep_overflow" and bool(_overflowing(artifact, ctx))


# nodes that move or reshape values: keeping one in FP32 changes nothing FP16 computes
_NOT_COMPUTING = {
    "Cast", "Constant", "Identity", "Reshape", "Shape", "Gather", "Squeeze", "Unsqueeze", "Transpose",
    "Concat", "Slice", "Split", "Flatten", "Expand",
}  # fmt: skip


def _overflowing(artifact: Artifact, ctx: BuildContext) -> list[str]:
    """The FP32 model's nodes touching a value beyond FP16's range on the calibration inputs, measured
    once per input file (recovery asks whether the range rule applies, then builds with it)."""
    key = ("fp16_overflowing", artifact.sha256)
    if key not in ctx.cache:
        ctx.cache[key] = _measure_overflowing(artifact, ctx)
    return ctx.cache[key]


def _measure_overflowing(artifact: Artifact, ctx: BuildContext) -> list[str]:
    import onnx

    from toolchain.core.feed import ort_feed, repeat_to

    model = onnx.load(str(artifact.path))
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    x = ctx.calibration.x[:RANGE_SAMPLES]
    batch = artifact.fixed_batch() or 32  # a file written for one batch size takes that one
    if len(x) < batch:
        x = repeat_to(x, batch)
    feeds = [ort_feed(x[i : i + batch], names) for i in range(0, len(x) - batch + 1, batch)]
    try:
        return onnx_overflowing(model, onnx_ranges(model, feeds))
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's words, for one line
        raise StageError(f"float16_onnx: cannot measure the FP32 model's ranges: {reason(e)}") from None
