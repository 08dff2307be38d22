"""BF16 / FP16 PyTorch models: parameters and arithmetic in a 16-bit float type, inputs and
outputs kept FP32.

``bfloat16`` is for x86 CPUs with AMX (Sapphire Rapids and later: AMX-BF16 and AVX512-BF16),
through oneDNN; ``float16`` for ExecuTorch's XNNPACK FP16 kernels (Snapdragon's Arm FP16 units).
Exported models are lifted first (:mod:`toolchain.passes.lift`), so an LSTM's initial state follows
the cast. On a build host without BF16 instructions torch emulates BF16: parity holds, latency
is not representative, and the stage says so.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import NotApplicable, StageError, reason
from toolchain.core.options import option
from toolchain.core.stage import Stage, StageResult, register_stage


@dataclasses.dataclass(frozen=True)
class CastTorchOptions:
    dtype: Literal["bfloat16", "float16"] = option("bfloat16", "parameter and arithmetic type")


@register_stage
class CastTorch(Stage):
    name = "cast_torch"
    requires = ("torch",)
    transitions = {Kind.EAGER: Kind.EAGER, Kind.FX: Kind.EAGER, Kind.EXPORTED: Kind.EAGER}
    Options = CastTorchOptions

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import copy

        import torch

        from toolchain.measure import cpu
        from toolchain.passes.lift import lift_exported

        if self.options.dtype == "bfloat16" and ctx.isa is not None and ctx.isa != "amx":
            raise NotApplicable(
                f'cast_torch: the deployment CPU (runtime.isa = "{ctx.isa}") is not known to have BF16 '
                f'instructions; BF16 is for runtime.isa = "amx" (Sapphire Rapids and later)'
            )
        dtype = getattr(torch, self.options.dtype)
        source = lift_exported(artifact.model)[0] if artifact.kind is Kind.EXPORTED else artifact.model
        module = copy.deepcopy(source).to(dtype)
        model = (
            _cast_graph(module, dtype)
            if isinstance(module, torch.fx.GraphModule)
            else _cast_io()(module, dtype).eval()
        )
        try:
            with torch.no_grad():
                model(*ctx.example())
        except Exception as e:
            raise StageError(
                f"cast_torch: the model does not run in {self.options.dtype}: {reason(e)}"
            ) from None
        precision = {"bfloat16": "bf16", "float16": "fp16"}[self.options.dtype]
        facts = {"dtype": self.options.dtype, "io": "fp32"}
        if self.options.dtype == "bfloat16":
            facts["host_has_bf16"] = cpu.host_has_bf16()
            if not facts["host_has_bf16"]:
                facts["latency_note"] = (
                    "this host has no AVX512-BF16 / AMX: BF16 is emulated, its latency is not representative"
                )
        return StageResult(
            dataclasses.replace(artifact, kind=Kind.EAGER, model=model, precision=precision), facts
        )


def _cast_graph(gm, dtype):
    """Casts written into the graph (inputs to ``dtype``, outputs to FP32): the model stays one
    GraphModule, which TorchScript can script when tracing would fix the batch size."""
    import torch

    def floating(node) -> bool:  # what the graph recorded; a graph re-traced without it is taken as float
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else node
        return isinstance(node, torch.fx.Node) and (
            value is None or getattr(getattr(value, "dtype", None), "is_floating_point", False)
        )

    graph = gm.graph
    # the model's own casts to FP32 (an integer mask made float: `mask.to(x.dtype)`, recorded as float32)
    # follow the compute dtype, or FP32 values would meet FP16 ones in the next matmul
    for node in graph.nodes:
        if (
            node.op in ("call_function", "call_method")
            and "to" in str(getattr(node.target, "__name__", node.target)).split(".")[-1:]
        ):
            node.args = tuple(dtype if a is torch.float32 else a for a in node.args)
            node.kwargs = {k: dtype if v is torch.float32 else v for k, v in node.kwargs.items()}
    for node in [n for n in graph.nodes if n.op == "placeholder" and floating(n)]:
        with graph.inserting_after(node):
            cast = graph.call_method("to", (node, dtype))
        node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
    output = next(n for n in graph.nodes if n.op == "output")

    def back(value):
        if not floating(value):
            return value
        with graph.inserting_before(output):
            return graph.call_method("to", (value, torch.float32))

    output.args = (torch.fx.node.map_arg(output.args[0], back),)
    graph.lint()
    gm.recompile()
    return gm.eval()


@functools.cache
def _cast_io():
    """The wrapper class, defined on first use: importing the stages imports no torch."""
    import torch

    class CastIO(torch.nn.Module):
        """``model`` with floating inputs cast to ``dtype`` and floating outputs back to FP32."""

        def __init__(self, model, dtype):
            super().__init__()
            self.model, self.dtype = model, dtype

        def forward(self, *xs):
            out = self.model(*(x.to(self.dtype) if x.is_floating_point() else x for x in xs))
            return torch.utils._pytree.tree_map(
                lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out
            )

    return CastIO
