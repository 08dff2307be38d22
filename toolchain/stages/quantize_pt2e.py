"""Static INT8 quantization through torchao's PT2E flow, for ExecuTorch backends.

Why pt2e here (and ``torch.ao`` FX for TorchScript artifacts, see ``quantize_torch``): an
ExecuTorch delegate does not run quantized PyTorch modules; it lowers the quantize /
dequantize patterns that ``convert_pt2e`` leaves in the exported graph into its own INT8
kernels. The quantizer is the backend's own (ExecuTorch's ``XNNPACKQuantizer``), so what
is annotated is exactly what XNNPACK can run in INT8: per-channel symmetric int8 weights,
int8 activations with ranges from a histogram of the calibration inputs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Literal

from ..artifact import Artifact, Kind
from ..context import BuildContext
from ..errors import StageError, reason
from ..feed import torch_args
from ..export import as_module, export_program, quiet_logger
from ..options import option
from ..stage import Recoverable, Stage, StageResult, register_stage


@dataclasses.dataclass(frozen=True)
class QuantizePT2EOptions:
    quantizer: Literal["xnnpack"] = option("xnnpack", "the backend whose quantizer annotates the graph")
    per_channel: bool = option(True, "per-output-channel symmetric int8 weights (per-tensor when false)")
    batch_size: int = option(32, "calibration batch size (1 when the model exports only at a fixed batch)")
    float_layers: tuple[str, ...] = option((), "module names kept in floating point (left out of the quantizer); recovery sets it")
    equalize: bool = option(False, "fuse, then cross-layer equalization of Conv/Linear pairs first (same function in FP32); recovery tries it")
    bias_correction: bool = option(False, "shift each convolution / linear's float bias by the mean error quantization adds on "
                                          "calibration inputs; recovery tries it")
    smooth: bool = option(False, "fuse, then SmoothQuant: move LayerNorm outputs' outlier channel scales into the Linear weights that read "
                                 "them (same function in FP32); recovery tries it")
    float_masks: bool = option(False, "leave additive attention masks unquantized: the add that pushes a Softmax's input below -1e3 "
                                      "on calibration inputs (a padding mask); recovery tries it")


@register_stage
class QuantizePT2E(Stage, Recoverable):
    name = "quantize_pt2e"
    requires = ("torch", "executorch", "torchao")
    transitions = {Kind.EAGER: Kind.EXPORTED, Kind.FX: Kind.EXPORTED, Kind.EXPORTED: Kind.EXPORTED}
    Options = QuantizePT2EOptions
    report_facts = ("batchnorm1d_as_conv",)

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import torch

        with quiet_logger("torch.utils._pytree"):  # torchao 0.18 registers an Enum with pytree; torch notes it
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        o = self.options
        cal = ctx.calibration.x
        ep, batch = self._exported(artifact, ctx)
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=o.per_channel))
        module = ep.module()
        as_convs = _batchnorm1d_as_convs(module)
        masks = set()
        if o.float_masks:  # additive attention masks (see toolchain.masks): their add gets no quantization
            from ..masks import fx_mask_nodes

            masks = {n.name for n in fx_mask_nodes(module, cal)}
        if o.float_layers or masks:  # XNNPACKQuantizer refuses set_module_name(name, None); a filter leaves them out
            quantizer.set_filter_function(lambda node: _module_of(node) not in o.float_layers and node.name not in masks)
        try:
            prepared = prepare_pt2e(module, quantizer)
            with torch.no_grad():
                for start in range(0, len(cal), batch):
                    prepared(*torch_args(cal[start:start + batch]))
                    ctx.progress("calibrating (pt2e)", min(start + batch, len(cal)), len(cal))
            reference = copy.deepcopy(prepared) if o.bias_correction else None  # convert_pt2e changes its input
            converted = convert_pt2e(prepared)
        except (RuntimeError, NotImplementedError, AssertionError, ValueError) as e:
            raise StageError(f"{self.name}: cannot quantize this model for XNNPACK: {reason(e)}") from None
        corrected = None
        if o.bias_correction:
            from ..bias_correction import correct_graph_biases

            corrected = correct_graph_biases(reference, converted, cal[:128], batch)
        program = export_program(converted, ctx.example(), self.name)
        facts = {"calibration_samples": len(cal), "calibration_batch": batch, "quantizer": o.quantizer,
                 "quantize_nodes": _count(program, "quantize_per"), "per_channel": o.per_channel,
                 "float_layers": list(o.float_layers)}
        if as_convs:
            facts["batchnorm1d_as_conv"] = as_convs
        if corrected is not None:
            facts["bias_correction"] = corrected
        if o.float_masks:
            facts["float_masks"] = sorted(masks)
        if o.equalize or o.smooth:
            facts.update(ctx.cache.get(("rescale_pt2e", artifact.sha256, o.equalize, o.smooth, o.per_channel), {}))
        return StageResult(dataclasses.replace(artifact, kind=Kind.EXPORTED, model=program, precision="int8"), facts)


    def _exported(self, artifact: Artifact, ctx: BuildContext):
        """The model exported for calibration, and the calibration batch size (cached per input).

        Calibrate in batches when the model exports with a free batch dimension; some models
        (a reshape to a fixed batch) only export at batch 1."""
        import torch

        o = self.options
        key = ("quantize_pt2e", artifact.sha256, o.equalize, o.smooth, o.per_channel)
        if key not in ctx.cache:
            module, cal = self._rescaled(artifact, ctx) if o.equalize or o.smooth else as_module(artifact), ctx.calibration.x
            ep, batch = None, self.options.batch_size
            if len(cal) > 1:
                with contextlib.suppress(StageError):
                    ep = export_program(module, torch_args(cal[:2]), self.name, dynamic_batch=True)
            if ep is None:
                ep, batch = export_program(module, ctx.example(), self.name), 1
            ctx.cache[key] = ep, batch
        return ctx.cache[key]

    def _rescaled(self, artifact: Artifact, ctx: BuildContext):
        """The model fused (BatchNorm folded: equalization needs the convolutions next to each other;
        LayerNorms and Linears become modules) and rescaled; the quantizer sees the same function in FP32."""
        from ..rescale import rescaled_copy
        from ..smooth import Bits

        o = self.options
        fused = _fused(artifact, ctx)
        model, facts = rescaled_copy(fused, ctx.calibration.x[:128], self.name, o.equalize, o.smooth, Bits(per_channel=o.per_channel))
        ctx.cache[("rescale_pt2e", artifact.sha256, o.equalize, o.smooth, o.per_channel)] = facts
        return model

    def fixes(self) -> tuple[str, ...]:
        return ("float_masks", "equalize", "smooth", "bias_correction")

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        from ..rescale import fx_finds

        if fix == "float_masks":
            from ..masks import fx_mask_nodes

            return bool(fx_mask_nodes(self._exported(artifact, ctx)[0].module(), ctx.calibration.x))
        return fix == "bias_correction" or fx_finds(_fused(artifact, ctx), fix, ctx.calibration.x)

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        """Modules whose convolutions and matrix products the quantizer annotates, by the name
        `set_module_name` matches (the innermost entry of each node's module stack)."""
        ep, _ = self._exported(artifact, ctx)
        names = []
        for node in ep.graph.nodes:
            if node.op == "call_function" and any(k in str(node.target) for k in ("conv", "linear", "addmm", "mm.")):
                name = _module_of(node)
                if name and name not in names:
                    names.append(name)
        return names


def _fused(artifact: Artifact, ctx: BuildContext):
    """The input fused into modules (BatchNorm folded), once per input: the fixes' checks and the
    rescaled copy all start from it (and copy it; it is never changed)."""
    from .fuse import Fuse

    key = ("fused_for_pt2e", artifact.sha256)
    if key not in ctx.cache:
        ctx.cache[key] = Fuse().apply(artifact, ctx).artifact.model
    return ctx.cache[key]


def _batchnorm1d_as_convs(gm) -> list[str]:
    """Each BatchNorm1d that does not follow a convolution (so the quantizer cannot fold it: one
    after a ReLU, a pooling, an add) as the 1x1 depthwise Conv1d it computes (weight
    gamma/sqrt(var+eps), bias beta - mean*weight), in place; returns their module names.

    ExecuTorch's XNNPACK lowering turns such a BatchNorm into that convolution itself, after
    quantization: with its input quantized and its new weights not, lowering stops ("Weight and
    Input should both be quantized"; a 1-D Conv -> ReLU -> BatchNorm, measured with ExecuTorch
    1.x here; the 2-D case lowers). Made a convolution before quantization, its weights are
    quantized with the rest. The new node keeps the BatchNorm's module name, so `float_layers`
    and sensitivity still name it."""
    import torch

    convs = {torch.ops.aten.conv1d.default, getattr(torch.ops.aten.conv1d, "padding", None)}
    params, buffers = dict(gm.named_parameters()), dict(gm.named_buffers())
    replaced = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        x, weight, bias, mean, var, training = node.args[:6]
        eps = node.args[7] if len(node.args) > 7 else 1e-5
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if training or val is None or val.dim() != 3 or not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in (mean, var)):
            continue
        if x.op == "call_function" and x.target in convs:
            continue  # Conv -> BatchNorm: the quantizer folds it
        tensor = lambda a: None if a is None else params.get(a.target, buffers.get(a.target))
        gamma, beta, mu, sigma2 = (tensor(a) for a in (weight, bias, mean, var))
        scale = (gamma if gamma is not None else torch.ones_like(mu)) / torch.sqrt(sigma2 + eps)
        shift = (beta if beta is not None else torch.zeros_like(mu)) - mu * scale
        name = f"_bn_as_conv_{len(replaced)}"
        gm.register_buffer(f"{name}_weight", scale.detach().reshape(-1, 1, 1).clone())
        gm.register_buffer(f"{name}_bias", shift.detach().clone())
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{name}_weight")
            b = gm.graph.get_attr(f"{name}_bias")
            conv = gm.graph.call_function(torch.ops.aten.conv1d.default, (x, w, b, [1], [0], [1], int(mu.numel())))
        conv.meta = dict(node.meta)
        w.meta["val"], b.meta["val"] = gm.get_buffer(f"{name}_weight"), gm.get_buffer(f"{name}_bias")
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        replaced.append(_module_of(conv) or node.name)
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


def _module_of(node) -> str | None:
    """The innermost module a graph node was traced in (its fully qualified name)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[-1][0].removeprefix("L['self'].") if stack else None


def _count(program, name: str) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and name in str(n.target))
