"""ONNX graph passes from onnxoptimizer, run in the order the profile lists them."""

from __future__ import annotations

import collections
import dataclasses

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import ConfigError, StageError, reason
from toolchain.core.options import option
from toolchain.core.stage import Stage, StageResult, register_stage
from toolchain.stages.export_onnx import save_onnx

DEFAULT_PASSES = (
    "eliminate_deadend",
    "eliminate_identity",
    "eliminate_nop_dropout",
    "eliminate_nop_transpose",
    "eliminate_nop_pad",
    "fuse_bn_into_conv",
    "fuse_consecutive_transposes",
    "fuse_pad_into_conv",
    "eliminate_unused_initializer",
)


@dataclasses.dataclass(frozen=True)
class OnnxPassesOptions:
    passes: tuple[str, ...] = option(DEFAULT_PASSES, "onnxoptimizer passes, applied in this order")


@register_stage
class OnnxPasses(Stage):
    name = "onnx_passes"
    requires = ("onnx", "onnxoptimizer")
    transitions = {Kind.ONNX: Kind.ONNX}
    Options = OnnxPassesOptions

    @classmethod
    def check_options(cls, options: OnnxPassesOptions, where: str, source: str) -> None:
        import onnxoptimizer

        valid = set(onnxoptimizer.get_available_passes())
        for i, name in enumerate(options.passes):
            if name not in valid:
                raise ConfigError(
                    f"{source}: `{where}.passes[{i}]` = {name!r} is not an onnxoptimizer pass; valid: "
                    f"{', '.join(sorted(valid))}"
                )

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx
        import onnxoptimizer

        proto = onnx.load(str(artifact.path))
        before = collections.Counter(n.op_type for n in proto.graph.node)
        try:
            optimized = onnxoptimizer.optimize(proto, list(self.options.passes))
            onnx.checker.check_model(optimized)
        except Exception as e:
            raise StageError(f"onnx_passes: {reason(e)}") from None
        after = collections.Counter(n.op_type for n in optimized.graph.node)
        path = ctx.workdir / f"{artifact.precision}-passes-{artifact.sha256[:12]}.onnx"
        save_onnx(optimized, path, external=artifact.has_external_data)
        facts = {
            "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()),
            "removed_by_op": {op: before[op] - after[op] for op in sorted(before) if before[op] > after[op]},
        }
        return StageResult(dataclasses.replace(artifact, path=path), facts)
