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
from toolchain.core.stage import Stage, StageResult, register_stage
from toolchain.stages.export_onnx import save_onnx


@dataclasses.dataclass(frozen=True)
class Float16OnnxOptions:
    keep_io_types: bool = option(True, "inputs and outputs stay FP32 (Casts at the edges)")
    op_block_list: tuple[str, ...] = option((), "op types kept in FP32 besides the converter's defaults")


@register_stage
class Float16Onnx(Stage):
    name = "float16_onnx"
    requires = ("onnx", "onnxruntime")
    transitions = {Kind.ONNX: Kind.ONNX}
    Options = Float16OnnxOptions

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        proto = onnx.load(str(artifact.path))
        try:
            half = convert_float_to_float16(
                proto,
                keep_io_types=self.options.keep_io_types,
                op_block_list=[*DEFAULT_OP_BLOCK_LIST, *self.options.op_block_list],
            )
            OnnxModel(half).topological_sort()  # the converter appends the input Casts after their consumers
            onnx.checker.check_model(half)
        except Exception as e:
            raise StageError(f"float16_onnx: {reason(e)}") from None
        path = ctx.workdir / f"fp16-{artifact.sha256[:12]}.onnx"
        save_onnx(half, path, external=artifact.has_external_data)
        kept = sorted(
            {
                n.op_type
                for n in half.graph.node
                if n.op_type in DEFAULT_OP_BLOCK_LIST or n.op_type in self.options.op_block_list
            }
        )
        return StageResult(
            dataclasses.replace(artifact, path=path, precision="fp16"), {"fp32_ops": kept, "io": "fp32"}
        )
