"""4-bit groupwise weights for a model's Linear layers, for ExecuTorch's XNNPACK (issue 31, part 2).

Phones hold transformer-sized models by their weights: a Linear-heavy model's `.pte` shrinks by about
half again from INT8 when its Linear weights are stored in 4 bits. torchao's
``Int8DynamicActivationIntxWeightConfig`` (int4 weights, symmetric, one scale per ``group_size`` input
channels; activations quantized to int8 per token at run time: "8da4w") is the form XNNPACK lowers to
its 4-bit kernels, as ExecuTorch's own LLM recipes use it. Why torchao's ``quantize_`` here and not the
pt2e flow of ``quantize_pt2e``: 4-bit groupwise weights are a weight format, calibrated by nothing
(dynamic activations), and torchao's tensor subclasses export to exactly the dequantize patterns the
XNNPACK partitioner matches.

Offered for models whose Linear weights are at least ``min_linear_share`` of all weights (a CNN's
convolutions stay INT8 elsewhere: not applicable). Layers whose input width is not a multiple of the
group, and those recovery names (``float_layers``: kept out of 4 bits), get 8-bit weights per output
channel with the same dynamic int8 activations; the stage facts name them (``int8_layers``) and
``int4_share`` is the share of the multiply-accumulates of layers with weights (Linear, Conv, LSTM)
that have 4-bit ones (the report calls the artifact ``mixed`` below 1).
"""

from __future__ import annotations

import copy
import dataclasses

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import NotApplicable, StageError, reason
from toolchain.core.export import as_module, quiet_logger
from toolchain.core.options import option
from toolchain.core.stage import Recoverable, Stage, StageResult, register_stage


@dataclasses.dataclass(frozen=True)
class QuantizeInt4Options:
    group_size: int = option(32, "input channels per group sharing one scale (symmetric 4-bit weights)")
    min_linear_share: float = option(
        0.5, "offered when the model's Linear weights are at least this share of all its weights"
    )
    float_layers: tuple[str, ...] = option(
        (), "Linear layers kept out of 4 bits (at 8-bit weights, stage fact int8_layers); recovery sets it"
    )


@register_stage
class QuantizeInt4(Stage, Recoverable):
    name = "quantize_int4"
    requires = ("torch", "torchao")
    transitions = {Kind.EAGER: Kind.EAGER, Kind.FX: Kind.EAGER, Kind.EXPORTED: Kind.EAGER}
    Options = QuantizeInt4Options
    report_facts = ("group_size", "linear_weight_share", "int4_layers", "int8_layers", "int4_share")
    kept_as = "at 8 bits"

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import torch

        with quiet_logger("torch.utils._pytree"):
            from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
            from torchao.quantization.granularity import PerAxis, PerGroup

        o = self.options
        model = copy.deepcopy(_modules(artifact, ctx))
        share = linear_weight_share(model)
        if share < o.min_linear_share:
            raise NotApplicable(
                f"{self.name}: Linear weights are {share:.0%} of this model's weights (4-bit weights are "
                f"offered from {o.min_linear_share:.0%}: the rest stays in its INT8 artifacts)"
            )
        linears = _linears(model)
        groupable = _groupable(linears, o.group_size)
        if not groupable:
            raise NotApplicable(
                f"{self.name}: no Linear layer's input width is a multiple of group_size = {o.group_size}"
            )
        four = [n for n in groupable if n not in o.float_layers]
        eight = [n for n in linears if n not in four]
        macs = _macs(model, ctx)
        try:
            quantize_(
                model,
                Int8DynamicActivationIntxWeightConfig(
                    weight_dtype=torch.int4,
                    weight_granularity=PerGroup(o.group_size),
                    weight_scale_dtype=torch.bfloat16,  # what XNNPACK's 4-bit kernels keep per group
                ),
                filter_fn=lambda m, fqn: fqn in four,
            )
            if eight:
                quantize_(
                    model,
                    Int8DynamicActivationIntxWeightConfig(
                        weight_dtype=torch.int8, weight_granularity=PerAxis(0)
                    ),
                    filter_fn=lambda m, fqn: fqn in eight,
                )
            with torch.no_grad():
                model(*ctx.example())
        except Exception as e:  # torchao's own errors are of many types
            raise StageError(
                f"{self.name}: torchao cannot quantize this model to 4-bit weights: {reason(e)}"
            ) from None
        macs.pop("", None)  # matmuls of two activations (attention's): no weights to store in 4 bits
        total = sum(macs.values())
        int4_share = round(sum(macs.get(n, 0) for n in four) / total, 4) if total else None
        facts = {
            "ranges": "dynamic",  # activations quantized per batch (8da4w)
            "group_size": o.group_size,
            "linear_weight_share": round(share, 4),
            "int4_layers": len(four),
            "int8_layers": eight,
            "int4_share": int4_share,
        }
        return StageResult(
            dataclasses.replace(artifact, kind=Kind.EAGER, model=model, precision="int4"), facts
        )

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        """The Linear layers that get 4-bit weights (those whose input width the group divides)."""
        return _groupable(_linears(_modules(artifact, ctx)), self.options.group_size)


def _modules(artifact: Artifact, ctx: BuildContext):
    """The model with its Linear layers as modules: an exported program's aten calls lifted back to
    them (once per input); an eager module as it is (no tracing: models FX cannot trace still get 4 bits)."""
    if artifact.kind is not Kind.EXPORTED:
        return as_module(artifact)
    key = ("quantize_int4 lifted", artifact.sha256)
    if key not in ctx.cache:
        from toolchain.passes.lift import lift_exported

        ctx.cache[key] = lift_exported(artifact.model)[0]
    return ctx.cache[key]


def linear_weight_share(model) -> float:
    """The Linear layers' share of a module's weights (parameters), by element count."""
    linear = sum(m.weight.numel() for m in _linears(model).values())
    total = sum(p.numel() for p in model.parameters())
    return linear / total if total else 0.0


def _groupable(linears: dict, group_size: int) -> list[str]:
    """The Linear layers whose input width the group divides: those 4-bit groups can cover."""
    return [n for n, m in linears.items() if m.in_features % group_size == 0]


def _linears(model) -> dict:
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _macs(model, ctx: BuildContext) -> dict[str, int]:
    from toolchain.passes.int8_graph import module_macs_by_name

    try:
        return module_macs_by_name(model, ctx.example())
    except Exception:  # noqa: BLE001 - a label's measurement must never cost the artifact
        return {}
