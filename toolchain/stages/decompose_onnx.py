"""Replace ONNX operators the deployment parser lacks by the primitive operators that define them.

Last in a chain, after quantization: the expanded LayerNormalization's own Add and Mul then
carry no Q/DQ (quantizing a variance to INT8 would cost accuracy TensorRT does not spend,
since it runs normalization in FP16/FP32), and every other tensor keeps its name, so the
calibration cache still names the same tensors.
"""

from __future__ import annotations

import dataclasses

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import ConfigError, StageError, reason
from toolchain.core.options import option
from toolchain.core.stage import Stage, StageResult, register_stage
from toolchain.stages.export_onnx import save_onnx


@dataclasses.dataclass(frozen=True)
class DecomposeOnnxOptions:
    op_types: tuple[str, ...] = option(("LayerNormalization",), "operators replaced by their primitive form")


@register_stage
class DecomposeOnnx(Stage):
    name = "decompose_onnx"
    requires = ("onnx",)
    transitions = {Kind.ONNX: Kind.ONNX}
    Options = DecomposeOnnxOptions

    @classmethod
    def check_options(cls, options: DecomposeOnnxOptions, where: str, source: str) -> None:
        from toolchain.passes.decompose import REWRITES

        for i, name in enumerate(options.op_types):
            if name not in REWRITES:
                raise ConfigError(
                    f"{source}: `{where}.op_types[{i}]` = {name!r} has no decomposition; valid: "
                    f"{', '.join(sorted(REWRITES))}"
                )

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx

        from toolchain.passes.decompose import decompose

        proto = onnx.load(str(artifact.path))
        try:
            counts = decompose(proto, self.options.op_types)
            onnx.checker.check_model(proto)
        except Exception as e:
            raise StageError(f"decompose_onnx: {reason(e)}") from None
        if not counts:
            return StageResult(artifact, {"decomposed": {}})
        path = ctx.workdir / f"{artifact.precision}-decomposed-{artifact.sha256[:12]}.onnx"
        save_onnx(proto, path, external=artifact.has_external_data)
        return StageResult(dataclasses.replace(artifact, path=path), {"decomposed": counts})
