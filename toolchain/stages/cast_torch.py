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
from toolchain.core.stage import Recoverable, Stage, StageResult, register_stage
from toolchain.passes.fp16_range import (
    RANGE_SAMPLES,
    fx_compute_nodes,
    fx_keep_float32,
    fx_overflowing,
    fx_ranges,
)


@dataclasses.dataclass(frozen=True)
class CastTorchOptions:
    dtype: Literal["bfloat16", "float16"] = option("bfloat16", "parameter and arithmetic type")
    float_layers: tuple[str, ...] = option(
        (), "graph nodes kept in FP32 (names as `toolchain sensitivity` lists them; set by recovery)"
    )
    keep_overflow: bool = option(
        False,
        "keep in FP32 every node whose FP32 value on the calibration inputs exceeds FP16's range "
        "(65504), from the first such value to the last; recovery turns it on when an FP16 artifact fails",
    )


@register_stage
class CastTorch(Stage, Recoverable):
    name = "cast_torch"
    requires = ("torch",)
    transitions = {Kind.EAGER: Kind.EAGER, Kind.FX: Kind.EAGER, Kind.EXPORTED: Kind.EAGER}
    Options = CastTorchOptions
    report_facts = ("fp32_nodes", "fp16_share")

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import copy

        import torch

        from toolchain.measure import cpu

        if self.options.dtype == "bfloat16" and ctx.isa is not None and not cpu.has_bf16(ctx.isa):
            raise NotApplicable(
                f'cast_torch: the deployment CPU (runtime.isa = "{ctx.isa}") is not known to have BF16 '
                f'instructions; BF16 is for runtime.isa = "avx512_bf16" (Cooper Lake, AMD Zen 4) or "amx" '
                f"(Sapphire Rapids and later)"
            )
        dtype = getattr(torch, self.options.dtype)
        source = _graph(artifact)
        graph = isinstance(source, torch.fx.GraphModule)
        keep, facts = list(self.options.float_layers), {"dtype": self.options.dtype, "io": "fp32"}
        precision = {"bfloat16": "bf16", "float16": "fp16"}[self.options.dtype]
        if keep or self.options.keep_overflow:
            if not graph:
                raise StageError(
                    "cast_torch: keeping layers in FP32 needs the model as a graph (a torch.export .pt2)"
                )
            largest, macs = _ranges(artifact, source, ctx)
            if self.options.keep_overflow:
                keep += [n for n in fx_overflowing(source, largest) if n not in keep]
            total = sum(macs.values())
            facts["fp32_nodes"] = keep
            facts[f"{precision}_share"] = (
                round(1 - sum(macs.get(n, 0) for n in keep) / total, 4) if total else None
            )
        module = copy.deepcopy(source).to(dtype)
        model = _cast_graph(module, dtype) if graph else _cast_io()(module, dtype).eval()
        if keep:
            model = fx_keep_float32(model, dtype, keep)
        try:
            with torch.no_grad():
                model(*ctx.example())
        except Exception as e:
            raise StageError(
                f"cast_torch: the model does not run in {self.options.dtype}: {reason(e)}"
            ) from None
        if self.options.dtype == "bfloat16":
            facts["host_has_bf16"] = cpu.host_has_bf16()
            if not facts["host_has_bf16"]:
                facts["latency_note"] = (
                    "this host has no AVX512-BF16 / AMX: BF16 is emulated, its latency is not representative"
                )
        return StageResult(
            dataclasses.replace(artifact, kind=Kind.EAGER, model=model, precision=precision), facts
        )

    # recovery: the nodes to keep in FP32, and the range rule as the first fix (FP16 only: BF16 has FP32's)
    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        import torch

        source = _graph(artifact)
        return fx_compute_nodes(source) if isinstance(source, torch.fx.GraphModule) else []

    def fixes(self) -> tuple[str, ...]:
        return ("keep_overflow",) if self.options.dtype == "float16" else ()

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        import torch

        source = _graph(artifact)
        if fix != "keep_overflow" or not isinstance(source, torch.fx.GraphModule):
            return False
        return bool(fx_overflowing(source, _ranges(artifact, source, ctx)[0]))


def _graph(artifact: Artifact):
    """The FP32 model the cast starts from: an exported program lifted to module form (so an LSTM's
    initial state follows the cast), else the module as it is."""
    from toolchain.passes.lift import lift_exported

    return lift_exported(artifact.model)[0] if artifact.kind is Kind.EXPORTED else artifact.model


def _ranges(artifact: Artifact, source, ctx: BuildContext):
    """:func:`fx_ranges` of the FP32 graph on the calibration inputs, once per input artifact:
    recovery asks whether the range rule applies, then builds with it (node names are the same in
    every lift of one program)."""
    from toolchain.core.feed import torch_args

    key = ("fp16_ranges", artifact.sha256)
    if key not in ctx.cache:
        x = ctx.calibration.x[:RANGE_SAMPLES]
        ctx.cache[key] = fx_ranges(source, [torch_args(x[i : i + 32]) for i in range(0, len(x), 32)])
    return ctx.cache[key]


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
