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

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.export import as_module, export_program, quiet_logger
from toolchain.core.feed import torch_args
from toolchain.core.options import option
from toolchain.core.qat import load_into
from toolchain.core.stage import QuantizationAware, Recoverable, Stage, StageResult, register_stage
from toolchain.passes.batchnorm import batchnorm1d_as_convs, module_of


@dataclasses.dataclass(frozen=True)
class QuantizePT2EOptions:
    quantizer: Literal["xnnpack"] = option("xnnpack", "the backend whose quantizer annotates the graph")
    per_channel: bool = option(True, "per-output-channel symmetric int8 weights (per-tensor when false)")
    batch_size: int = option(32, "calibration batch size (1 when the model exports only at a fixed batch)")
    float_layers: tuple[str, ...] = option(
        (), "module names kept in floating point (left out of the quantizer); recovery sets it"
    )
    equalize: bool = option(
        False,
        "fuse, then cross-layer equalization of Conv/Linear pairs first "
        "(same function in FP32); recovery tries it",
    )
    bias_correction: bool = option(
        False,
        "shift each convolution / linear's float bias by the mean error quantization adds on "
        "calibration inputs; recovery tries it",
    )
    smooth: bool = option(
        False,
        "fuse, then SmoothQuant: move LayerNorm outputs' outlier channel scales into the Linear weights that "
        "read them (same function in FP32); recovery tries it",
    )
    float_masks: bool = option(
        False,
        "leave additive attention masks unquantized: the add that pushes a Softmax's input below -1e3 "
        "on calibration inputs (a padding mask); recovery tries it",
    )


@register_stage
class QuantizePT2E(Stage, QuantizationAware, Recoverable):
    name = "quantize_pt2e"
    requires = ("torch", "executorch", "torchao")
    transitions = {Kind.EAGER: Kind.EXPORTED, Kind.FX: Kind.EXPORTED, Kind.EXPORTED: Kind.EXPORTED}
    Options = QuantizePT2EOptions
    report_facts = ("batchnorm1d_as_conv", "ranges", "qat_state")

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:

        # torchao 0.18 registers an Enum with pytree; torch notes it
        with quiet_logger("torch.utils._pytree"):
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        o = self.options
        cal = ctx.calibration.x
        if self.uses_qat(artifact, ctx):
            return self._from_qat(artifact, ctx)
        ep, batch = self._exported(artifact, ctx)
        quantizer = XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=o.per_channel)
        )
        module = ep.module()
        as_convs = batchnorm1d_as_convs(module)
        masks = set()
        # additive attention masks (see toolchain.passes.masks): their add gets no quantization
        if o.float_masks:
            from toolchain.passes.masks import fx_mask_nodes

            masks = {n.name for n in fx_mask_nodes(module, cal)}
        # XNNPACKQuantizer refuses set_module_name(name, None); a filter leaves them out
        if o.float_layers or masks:
            quantizer.set_filter_function(
                lambda node: module_of(node) not in o.float_layers and node.name not in masks
            )
        try:
            prepared = prepare_pt2e(module, quantizer)
            _calibrate(prepared, batch, ctx, "calibrating (pt2e)")
            # convert_pt2e changes its input
            reference = copy.deepcopy(prepared) if o.bias_correction else None
            converted = convert_pt2e(prepared)
        except (RuntimeError, NotImplementedError, AssertionError, ValueError) as e:
            raise StageError(f"{self.name}: cannot quantize this model for XNNPACK: {reason(e)}") from None
        corrected = None
        if o.bias_correction:
            from toolchain.passes.bias_correction import correct_graph_biases

            corrected = correct_graph_biases(reference, converted, cal[:128], batch)
        program = export_program(converted, ctx.example(), self.name)
        facts = {
            **self.qat_facts(artifact, ctx),
            "calibration_samples": len(cal),
            "calibration_batch": batch,
            "quantizer": o.quantizer,
            "quantize_nodes": _count(program, "quantize_per"),
            "per_channel": o.per_channel,
            "float_layers": list(o.float_layers),
            "int8_share": _int8_share(program),
        }
        if as_convs:
            facts["batchnorm1d_as_conv"] = as_convs
        if corrected is not None:
            facts["bias_correction"] = corrected
        if o.float_masks:
            facts["float_masks"] = sorted(masks)
        if o.equalize or o.smooth:
            facts.update(
                ctx.cache.get(("rescale_pt2e", artifact.sha256, o.equalize, o.smooth, o.per_channel), {})
            )
        return StageResult(
            dataclasses.replace(artifact, kind=Kind.EXPORTED, model=program, precision="int8"), facts
        )

    def _exported(self, artifact: Artifact, ctx: BuildContext):
        """The model exported for calibration, and the calibration batch size (cached per input)."""
        o = self.options
        key = ("quantize_pt2e", artifact.sha256, o.equalize, o.smooth, o.per_channel)
        if key not in ctx.cache:
            module = self._rescaled(artifact, ctx) if o.equalize or o.smooth else as_module(artifact)
            ctx.cache[key] = _export(module, ctx, self.name, o.batch_size)
        return ctx.cache[key]

    # -- quantization-aware training (toolchain.qat) --

    def qat_settings(self, ctx: BuildContext) -> dict:
        return {"quantizer": self.options.quantizer, "per_channel": self.options.per_channel}

    def prepare_qat(self, artifact: Artifact, ctx: BuildContext):
        """The input with XNNPACK's fake-quantization: the quantizer and observers of this stage's
        post-training quantization, each observer inside a FakeQuantize, calibrated once on
        ``ctx.calibration``; activation ranges then stay fixed, weight scales follow the weights.
        BatchNorm is folded first (as `fuse` folds it): pt2e's own QAT would simulate BatchNorm in
        training mode. Returned in training mode; ``.train()`` and ``.eval()`` work on it."""
        self.refuse_rewrites()
        model, batch = self._qat_model(artifact, ctx)
        return start_ranges(model, batch, ctx, "calibrating (pt2e QAT)")

    def _qat_model(self, artifact: Artifact, ctx: BuildContext):
        """The input fused, exported and prepared with the QAT twin of this stage's quantizer (not
        calibrated), and the calibration batch size."""
        with quiet_logger("torch.utils._pytree"):
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                get_symmetric_quantization_config,
            )

        ptq = get_symmetric_quantization_config(is_per_channel=self.options.per_channel)
        return qat_twin_model(artifact, ctx, ptq, self.name, self.options.batch_size)

    def _from_qat(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        """The INT8 program from the QAT state's weights and ranges, no calibration. Keeping layers in
        float would change which fake-quantizers exist (the state names them by position): not offered."""
        o = self.options
        self.refuse_rewrites()
        model, _ = self._qat_model(artifact, ctx)
        program = export_program(converted_qat_state(model, ctx, self.name), ctx.example(), self.name)
        facts = {
            **self.qat_facts(artifact, ctx),
            "quantizer": o.quantizer,
            "quantize_nodes": _count(program, "quantize_per"),
            "per_channel": o.per_channel,
            "int8_share": _int8_share(program),
        }
        return StageResult(
            dataclasses.replace(artifact, kind=Kind.EXPORTED, model=program, precision="int8"), facts
        )

    def _rescaled(self, artifact: Artifact, ctx: BuildContext):
        """The model fused (BatchNorm folded: equalization needs the convolutions next to each other;
        LayerNorms and Linears become modules) and rescaled; the quantizer sees the same function in FP32."""
        from toolchain.passes.rescale import rescaled_copy
        from toolchain.passes.smooth import Bits

        o = self.options
        fused = _fused(artifact, ctx)
        model, facts = rescaled_copy(
            fused, ctx.calibration.x[:128], self.name, o.equalize, o.smooth, Bits(per_channel=o.per_channel)
        )
        ctx.cache[("rescale_pt2e", artifact.sha256, o.equalize, o.smooth, o.per_channel)] = facts
        return model

    def fixes(self) -> tuple[str, ...]:
        return self.qat_rewrites  # each rewrites weights or ranges (none for a QAT model)

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        from toolchain.passes.rescale import fx_finds

        if self.uses_qat(artifact, ctx):  # learned weights and ranges: nothing to rescale or correct
            return False
        if fix == "float_masks":
            from toolchain.passes.masks import fx_mask_nodes

            return bool(fx_mask_nodes(self._exported(artifact, ctx)[0].module(), ctx.calibration.x))
        return fix == "bias_correction" or fx_finds(_fused(artifact, ctx), fix, ctx.calibration.x)

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        """Modules whose convolutions and matrix products the quantizer annotates, by the name
        `set_module_name` matches (the innermost entry of each node's module stack)."""
        if self.uses_qat(artifact, ctx):
            return []
        ep, _ = self._exported(artifact, ctx)
        names = []
        for node in ep.graph.nodes:
            if node.op == "call_function" and any(
                k in str(node.target) for k in ("conv", "linear", "addmm", "mm.")
            ):
                name = module_of(node)
                if name and name not in names:
                    names.append(name)
        return names


def _fused(artifact: Artifact, ctx: BuildContext):
    """The input fused into modules (BatchNorm folded), once per input: the fixes' checks and the
    rescaled copy all start from it (and copy it; it is never changed)."""
    from toolchain.stages.fuse import Fuse

    key = ("fused_for_pt2e", artifact.sha256)
    if key not in ctx.cache:
        ctx.cache[key] = Fuse().apply(artifact, ctx).artifact.model
    return ctx.cache[key]


def _export(module, ctx: BuildContext, stage: str, batch_size: int):
    """``module`` exported, and the calibration batch size: in batches when the model exports with a
    free batch dimension; some models (a reshape to a fixed batch) only export at batch 1."""
    cal = ctx.calibration.x
    ep, batch = None, batch_size
    if len(cal) > 1:
        with contextlib.suppress(StageError):
            ep = export_program(module, torch_args(cal[:2]), stage, dynamic_batch=True)
    if ep is None:
        ep, batch = export_program(module, ctx.example(), stage), 1
    return ep, batch


def qat_twin_model(artifact: Artifact, ctx: BuildContext, config, stage: str, batch_size: int):
    """``artifact`` fused (BatchNorm folded, as `fuse` folds it: pt2e's own QAT would simulate BatchNorm
    in training mode), exported, and prepared with the fake-quantizing twin of ``config`` (a post-training
    pt2e QuantizationConfig) where XNNPACK's quantizer annotates; not calibrated. Returns it and the
    calibration batch size. ``.train()`` and ``.eval()`` work on it."""
    with quiet_logger("torch.utils._pytree"):
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    ep, batch = _export(_fused(artifact, ctx), ctx, stage, batch_size)
    module = ep.module()
    batchnorm1d_as_convs(module)
    try:
        model = prepare_qat_pt2e(module, XNNPACKQuantizer().set_global(_qat_twin(config)))
    except (RuntimeError, NotImplementedError, AssertionError, ValueError) as e:
        raise StageError(f"{stage}: cannot prepare this model for QAT: {reason(e)}") from None
    allow_exported_model_train_eval(model)
    return model, batch


def start_ranges(model, batch: int, ctx: BuildContext, label: str):
    """A QAT twin (:func:`qat_twin_model`) calibrated once on ``ctx.calibration``
    (toolchain.passes.observers.start_ranges), in training mode."""
    from toolchain.passes.observers import start_ranges as start

    return start(model, lambda m: _calibrate(m, batch, ctx, label), _weight_quantizers(model))


def converted_qat_state(model, ctx: BuildContext, stage: str):
    """A QAT twin (:func:`qat_twin_model`, rebuilt as it was prepared) with the build's QAT state's
    weights and ranges loaded, converted: INT8 weights, fixed quantize / dequantize."""
    with quiet_logger("torch.utils._pytree"):
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    load_into(model, ctx.qat, stage)
    model.eval()  # returns None on an exported model
    return convert_pt2e(model)


def _qat_twin(config):
    """``config`` (a post-training QuantizationConfig) with each observer inside a FakeQuantize: the
    same dtypes, ranges and observers, fake-quantizing as it trains."""
    from torchao.quantization.pt2e import FakeQuantize
    from torchao.quantization.pt2e.quantizer import QuantizationConfig

    from toolchain.passes.observers import current_weights

    def twin(spec, weight: bool = False):
        if spec is None:
            return None
        observer = (
            current_weights(spec.observer_or_fake_quant_ctr) if weight else spec.observer_or_fake_quant_ctr
        )
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=observer))

    return QuantizationConfig(
        twin(config.input_activation),
        twin(config.output_activation),
        twin(config.weight, weight=True),
        config.bias,
        True,
    )


def _weight_quantizers(model) -> set[str]:
    """The fake-quantizers that read a parameter (weights), by module name."""
    return {
        n.target
        for n in model.graph.nodes
        if n.op == "call_module" and n.args and getattr(n.args[0], "op", None) == "get_attr"
    }


def _calibrate(model, batch: int, ctx: BuildContext, label: str) -> None:
    """Run ``model`` on the calibration inputs, ``batch`` at a time, so that its observers see them."""
    import torch

    cal = ctx.calibration.x
    with torch.no_grad():
        for start in range(0, len(cal), batch):
            model(*torch_args(cal[start : start + batch]))
            ctx.progress(label, min(start + batch, len(cal)), len(cal))


def _count(program, name: str) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and name in str(n.target))


def _int8_share(program) -> float | None:
    from toolchain.passes.int8_graph import exported_int8_share

    try:
        return exported_int8_share(program)
    except Exception:  # noqa: BLE001 - a measurement for the report, not a step of the build
        return None
