"""Static INT8 post-training quantization of a PyTorch model, calibrated on real inputs.

Why ``torch.ao.quantization`` (deprecated) and not torchao's pt2e flow here: the artifact
this stage feeds is a self-contained TorchScript file that runs fbgemm/x86 (or qnnpack)
INT8 kernels with no compiler on the target. pt2e's ``convert_pt2e`` yields a reference
graph of quantize/dequantize ops that is only fast after ``torch.compile`` (inductor), so
it cannot produce that artifact in torch 2.14.1. FX graph mode is used for eager and
exported models, ``quantize_jit`` for TorchScript ones.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
import warnings
from typing import Literal

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.feed import torch_args
from toolchain.core.options import option
from toolchain.core.qat import load_into
from toolchain.core.stage import QuantizationAware, Recoverable, Stage, StageResult, register_stage
from toolchain.measure.cpu import has_vnni, torch_kernels


@dataclasses.dataclass(frozen=True)
class QuantizeTorchOptions:
    engine: Literal["x86", "fbgemm", "qnnpack"] = option(
        "x86", "PyTorch quantized engine the INT8 kernels are packed for"
    )
    calibration: Literal["minmax", "entropy", "percentile"] = option(
        "entropy",
        "activation range: running min/max, histogram search for the least quantization "
        "error, or a percentile",
    )
    percentile: float = option(99.99, "with calibration = percentile: the percentile kept")
    per_channel: bool = option(True, "per-output-channel symmetric weight scales (per-tensor when false)")
    reduce_range: bool | None = option(
        None,
        "7-bit activations, avoiding accumulator overflow on CPUs without VNNI (unset: follow `runtime.isa`)",
    )
    batch_size: int = option(32, "calibration batch size")
    float_layers: tuple[str, ...] = option(
        (), "module names kept in floating point (FX models); recovery sets it"
    )
    equalize: bool = option(
        False,
        "cross-layer equalization of Conv/Linear pairs first (FX models; "
        "same function in FP32); recovery tries it",
    )
    smooth: bool = option(
        False,
        "SmoothQuant: move LayerNorm outputs' outlier channel scales into the Linear weights that read "
        "them (FX models; same function in FP32); recovery tries it",
    )
    bias_correction: bool = option(
        False,
        "shift each quantized Conv/Linear bias by the mean error quantization adds on calibration "
        "inputs (FX models); recovery tries it",
    )
    float_masks: bool = option(
        False,
        "keep additive attention masks in float: the add that pushes a Softmax's input below -1e3 "
        "on calibration inputs (a padding mask; FX models); recovery tries it",
    )
    fbgemm_kernels: bool = option(
        False,
        "with engine x86: pack for fbgemm's kernels, "
        "not the oneDNN ones the x86 engine picks on VNNI / AMX CPUs (torch 2.14.1's oneDNN AMX INT8 "
        "Conv1d is wrong for some shapes); the artifact then runs under "
        "torch.backends.quantized.engine = 'fbgemm'; recovery tries it for `amx` targets",
    )


@register_stage
class QuantizeTorch(Stage, QuantizationAware, Recoverable):
    name = "quantize_torch"
    requires = ("torch",)
    transitions = {Kind.FX: Kind.FX, Kind.TORCHSCRIPT: Kind.TORCHSCRIPT}
    Options = QuantizeTorchOptions
    report_facts = ("reduce_range", "kernels", "ranges", "qat_state")
    qat_matching = ("engine", "per_channel", "reduce_range")  # what decides the INT8 modules and kernels

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import torch

        from toolchain.passes.observers import (
            make_qconfig,  # imports torch: not at module import (`toolchain targets` stays light)
        )

        o = self.options
        reduce_range = self._reduce_range(ctx)
        qconfig = make_qconfig(o.calibration, o.percentile, o.per_channel, reduce_range, o.engine)
        qat = self.uses_qat(artifact, ctx)
        # each: the model's arguments (a QAT model calibrates nothing)
        batches = [] if qat else [torch_args(b) for b in ctx.calibration.batches(o.batch_size)]
        # what the device must run it under
        engine = "fbgemm" if o.fbgemm_kernels and o.engine == "x86" else o.engine
        kernels = torch_kernels(engine, ctx.isa)  # packed for the kernels the deployment CPU runs
        torch.backends.quantized.engine = kernels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                if qat:
                    model = self._convert_qat(artifact, ctx)
                elif artifact.kind is Kind.FX:
                    model = self._quantize_fx(artifact, qconfig, batches, ctx, reduce_range)
                else:
                    model = _quantize_jit(artifact.model, qconfig, batches, ctx)
            except (RuntimeError, NotImplementedError, AssertionError) as e:
                raise StageError(
                    f"quantize_torch: {o.engine} cannot quantize this model: {reason(e)}"
                ) from None
        check_kernels(model, kernels)
        facts = {
            "calibration_samples": len(ctx.calibration.x),
            "engine": engine,
            "kernels": kernels,
            "reduce_range": reduce_range,
            "float_layers": list(o.float_layers),
            **self.qat_facts(artifact, ctx),
        }
        if (o.equalize or o.smooth) and artifact.kind is Kind.FX:
            facts.update(
                ctx.cache.get(
                    ("rescale_fx", artifact.sha256, o.equalize, o.smooth, reduce_range, o.per_channel), {}
                )
            )
        if o.float_masks and artifact.kind is Kind.FX:
            facts["float_masks"] = len(ctx.cache.get(self._key(artifact, reduce_range) + ("masks",), []))
        if o.engine == "qnnpack" and artifact.kind is Kind.FX:
            facts["contiguous_before_clamp"] = contiguous_before_clamp(model)
        if artifact.kind is Kind.FX:
            facts["int8_share"] = counted_int8_share(model, ctx)
        if o.bias_correction and artifact.kind is Kind.FX:
            from toolchain.passes.bias_correction import correct_module_biases

            facts["bias_correction"] = correct_module_biases(
                self._prepared(artifact, ctx, reduce_range), model, ctx.calibration.x[:128]
            )
        return StageResult(
            dataclasses.replace(
                artifact,
                model=model,
                precision="int8",
                quantized_engine=engine,
                kernels=kernels if kernels != engine else None,
            ),
            facts,
        )

    def _reduce_range(self, ctx: BuildContext) -> bool:
        """7-bit activations only without VNNI: fbgemm's kernels use VNNI where the CPU has it too (full
        range measured exact on AMX: the pitch tracker's fbgemm_kernels artifact 37.3 dB, 31.7 dB with
        7-bit activations)."""
        o = self.options
        if o.reduce_range is not None:
            return o.reduce_range
        return o.engine != "qnnpack" and not has_vnni(ctx.isa)

    # -- quantization-aware training (toolchain.qat) --

    def qat_settings(self, ctx: BuildContext) -> dict:
        """What decides the INT8 modules and kernels: a QAT model prepared with these converts to
        exactly what this stage builds."""
        o = self.options
        return {
            "engine": o.engine,
            "per_channel": o.per_channel,
            "reduce_range": self._reduce_range(ctx),
            "calibration": o.calibration,
            "percentile": o.percentile,
        }

    def prepare_qat(self, artifact: Artifact, ctx: BuildContext):
        """``artifact``'s model with the fake-quantization of this stage's quantizer (the same
        observers, dtypes and ranges), calibrated once on ``ctx.calibration`` as this stage would
        calibrate it; activation ranges then stay fixed and weight scales follow the weights as
        they train. Returned in training mode, for the user's own loop."""
        from toolchain.passes.observers import start_ranges

        if artifact.kind is not Kind.FX:
            raise StageError(f"{self.name}: quantization-aware training needs an eager or exported model")
        self.refuse_rewrites()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            model, _ = self._qat_model(artifact, ctx, self.qat_settings(ctx))
            batches = [torch_args(b) for b in ctx.calibration.batches(self.options.batch_size)]
            return start_ranges(model, lambda m: _calibrate(m, batches, ctx))

    def _qat_model(self, artifact: Artifact, ctx: BuildContext, s: dict):
        """A train-mode copy of ``artifact``'s fused model, prepared with the QAT qconfig of settings ``s``
        (:meth:`qat_settings`)."""
        from torch.ao.quantization import QConfigMapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        from toolchain.passes.observers import make_qat_qconfig

        qconfig = make_qat_qconfig(
            s["calibration"], s["percentile"], s["per_channel"], s["reduce_range"], s["engine"]
        )
        mapping = QConfigMapping().set_global(qconfig)
        return prepare_qat_fx(copy.deepcopy(artifact.model).train(), mapping, ctx.example()), mapping

    def qat_mismatch(self, artifact: Artifact, ctx: BuildContext) -> str | None:
        if artifact.kind is not Kind.FX:
            return "a TorchScript input is quantized as it is"
        return super().qat_mismatch(artifact, ctx)

    def _convert_qat(self, artifact: Artifact, ctx: BuildContext):
        """The INT8 model from the QAT state's weights and ranges, no calibration; layers in
        `float_layers` converted back to float modules with those weights."""
        from torch.ao.quantization.quantize_fx import convert_fx

        o = self.options
        self.refuse_rewrites(float_layers=False)  # recovery may keep layers in float, converted back
        key = ("quantize_torch_qat", artifact.sha256, ctx.qat.source)
        if key not in ctx.cache:
            model, mapping = self._qat_model(artifact, ctx, ctx.qat.settings)  # as it was prepared
            load_into(model, ctx.qat, self.name)
            ctx.cache[key] = model.eval(), mapping
        model, mapping = ctx.cache[key]
        mapping = copy.deepcopy(mapping)
        for name in o.float_layers:
            mapping.set_module_name(name, None)
        converted = convert_fx(copy.deepcopy(model), qconfig_mapping=mapping)
        return float_outputs(converted, o.float_layers) if o.float_layers else converted

    def _quantize_fx(self, artifact: Artifact, qconfig, batches, ctx: BuildContext, reduce_range: bool):
        """Prepare and calibrate once per (input, observers); each set of float layers is a
        conversion of a copy of that calibrated model, so recovery's variants share its ranges."""
        import torch
        from torch.ao.quantization import QConfigMapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        o = self.options
        key = self._key(artifact, reduce_range)
        if key not in ctx.cache:
            model = (
                _rescaled(artifact, ctx, o, reduce_range)
                if o.equalize or o.smooth
                else copy.deepcopy(artifact.model)
            )
            mapping = QConfigMapping().set_global(qconfig)
            masks = []
            # at prepare: no observer on the mask's add, so nothing downstream takes its range
            if o.float_masks:
                from toolchain.passes.masks import fx_call_orders

                masks = fx_call_orders(model, _mask_nodes(model, ctx))
            for target, index in masks:
                mapping.set_module_name_object_type_order("", target, index, None)
            prepared = prepare_fx(model, mapping, tuple(t[:1] if t.dim() else t for t in batches[0]))
            with torch.inference_mode():
                _calibrate(prepared, batches, ctx)
            ctx.cache[key] = prepared
            ctx.cache[key + ("masks",)] = masks
        mapping = QConfigMapping().set_global(qconfig)
        for name in o.float_layers:
            mapping.set_module_name(name, None)
        for target, index in ctx.cache[key + ("masks",)]:
            mapping.set_module_name_object_type_order("", target, index, None)
        converted = convert_fx(copy.deepcopy(ctx.cache[key]), qconfig_mapping=mapping)
        return float_outputs(converted, o.float_layers) if o.float_layers else converted

    def _key(self, artifact: Artifact, reduce_range: bool) -> tuple:
        o = self.options
        return (
            "quantize_torch",
            artifact.sha256,
            o.calibration,
            o.percentile,
            o.per_channel,
            reduce_range,
            o.engine,
            o.equalize,
            o.smooth,
            o.float_masks,
        )

    def _prepared(self, artifact: Artifact, ctx: BuildContext, reduce_range: bool):
        """The calibrated model the INT8 one was converted from (float, the same fused modules)."""
        return ctx.cache[self._key(artifact, reduce_range)]

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        """Modules with weights or normalizations (fused ones count once): what
        `float_layers` can name. FX models only."""
        if artifact.kind is not Kind.FX:
            return []
        from torch import nn
        from torch.ao.nn.intrinsic import _FusedModule
        from torch.nn.modules.batchnorm import _BatchNorm

        weighted = (
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.Linear,
            _FusedModule,
            _BatchNorm,
            nn.LayerNorm,
            nn.GroupNorm,
            nn.InstanceNorm1d,
            nn.InstanceNorm2d,
            nn.InstanceNorm3d,
        )
        names = [n for n, m in artifact.model.named_modules() if n and isinstance(m, weighted)]
        # not the parts of a fused module
        return [n for n in names if not any(n.startswith(p + ".") for p in names)]

    def calibrations(self) -> tuple[str, ...]:
        return typing.get_args(typing.get_type_hints(QuantizeTorchOptions)["calibration"])

    def fixes(self) -> tuple[str, ...]:
        return (*self.qat_rewrites, "fbgemm_kernels")

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        """`fbgemm_kernels` where the x86 engine would run oneDNN's AMX kernels (an `amx` target);
        the other four on FX models only (a TorchScript input is quantized as it is)."""
        from toolchain.passes.rescale import fx_finds

        # a QAT model's ranges and weights are learned: no other calibration, no rescaling
        if self.uses_qat(artifact, ctx) and fix != "fbgemm_kernels":
            return False
        # the defect is AMX's: a VNNI device runs oneDNN's VNNI kernels, which are right
        if fix == "fbgemm_kernels":
            return self.options.engine == "x86" and ctx.isa == "amx"
        if artifact.kind is not Kind.FX:
            return False
        if fix == "float_masks":
            return bool(_mask_nodes(artifact.model, ctx))
        return fix == "bias_correction" or fx_finds(artifact.model, fix, ctx.calibration.x)


def _mask_nodes(gm, ctx: BuildContext) -> list:
    """The adds of additive attention masks in ``gm`` (see toolchain.passes.masks)."""
    from toolchain.passes.masks import fx_mask_nodes

    return fx_mask_nodes(gm, ctx.calibration.x)


def _rescaled(artifact: Artifact, ctx: BuildContext, o: QuantizeTorchOptions, reduce_range: bool):
    from toolchain.passes.rescale import rescaled_copy
    from toolchain.passes.smooth import Bits

    # torch's reduce_range: 7-bit activations
    bits = Bits(activations=7 if reduce_range else 8, per_channel=o.per_channel)
    model, facts = rescaled_copy(
        artifact.model, ctx.calibration.x[:128], "quantize_torch", o.equalize, o.smooth, bits
    )
    ctx.cache[("rescale_fx", artifact.sha256, o.equalize, o.smooth, reduce_range, o.per_channel)] = facts
    return model


def float_outputs(gm, float_layers):
    """A layer kept in float keeps its output in float too. FX's convert leaves a
    quantize -> dequantize round trip after it (the observer at its output also served the
    consumers), which would cost the same rounding the layer was kept in float to avoid."""
    import torch

    for node in list(gm.graph.nodes):
        source = node.args[0] if node.args else None
        if not (
            node.op == "call_function"
            and node.target is torch.quantize_per_tensor
            and getattr(source, "op", None) == "call_module"
            and source.target in float_layers
            and node.users
            and all(u.op == "call_method" and u.target == "dequantize" for u in node.users)
        ):
            continue
        for dequantize in list(node.users):
            dequantize.replace_all_uses_with(source)
            gm.graph.erase_node(dequantize)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


CLAMPS = ("hardtanh", "relu6", "clamp")


def contiguous_before_clamp(gm) -> int:
    """Work around a qnnpack bug: its quantized clamp (hardtanh, ReLU6, clamp) writes a
    channels-last input's values into a contiguous output without reordering them, so every
    ReLU6 after a qnnpack convolution (which outputs channels-last) scrambles the activations
    (MobileNetV2: SQNR -0.1 dB against FP32). Making the input contiguous first gives the
    kernel the layout it assumes; this is a no-op when it already is. Returns how many
    clamps were guarded."""
    guarded = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            name = type(gm.get_submodule(node.target)).__name__.lower()
        elif node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target)).lower()
        else:
            continue
        if name.strip("_") not in CLAMPS or not node.args:
            continue
        with gm.graph.inserting_before(node):
            made = gm.graph.call_method("contiguous", (node.args[0],))
        node.replace_input_with(node.args[0], made)
        guarded += 1
    if guarded:
        gm.graph.lint()
        gm.recompile()
    return guarded


def check_kernels(model, engine: str) -> None:
    """Unpack every quantized module's weights once on ``engine``: a module the engine has no
    kernel for (qnnpack and Conv3d, say) fails here, named, instead of deep inside a save."""
    import torch

    for name, module in model.named_modules():
        if not hasattr(module, "_weight_bias") or isinstance(module, torch.jit.ScriptModule):
            continue
        try:
            module._weight_bias()
        except RuntimeError as e:
            raise StageError(
                f"quantize_torch: {engine} cannot run operator {type(module).__name__} (module `{name}`): "
                f"{reason(e, last=True, limit=200)}"
            ) from None


def _quantize_jit(model, qconfig, batches, ctx: BuildContext):
    from torch.ao.quantization import quantize_jit

    return quantize_jit(model, {"": qconfig}, lambda m, bs: _calibrate(m, bs, ctx), [batches], inplace=False)


def _calibrate(model, batches, ctx: BuildContext) -> None:
    import torch

    size = lambda batch: next(len(t) for t in batch if t.dim())
    done, total = 0, sum(map(size, batches))
    with torch.no_grad():
        for batch in batches:
            model(*batch)
            done += size(batch)
            ctx.progress("calibrating (torch)", done, total)


def counted_int8_share(model, ctx: BuildContext) -> float | None:
    """The model's share of multiply-accumulates in INT8 modules (toolchain.passes.int8_graph); None
    where it cannot be counted (the label never costs the artifact)."""
    from toolchain.passes.int8_graph import module_int8_share

    try:
        return module_int8_share(model, ctx.example())
    except Exception:  # noqa: BLE001 - a measurement for the report, not a step of the build
        return None
