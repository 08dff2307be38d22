"""An ONNX model as OpenVINO IR (`.xml` graph, `.bin` weights), with the inference precision it is
meant to run at written into the file.

OpenVINO's CPU plugin runs BF16 by default on CPUs with AVX512-BF16 or AMX: an "fp32" artifact would
silently compute in BF16 there. So the precision hint is part of the artifact: written into the IR's
runtime info (``runtime_options`` / ``INFERENCE_PRECISION_HINT``, which ``compile_model`` applies)
and passed explicitly by the `openvino_ir` runtime when the build checks it, so its parity is
measured as it will run. A Q/DQ (INT8) model converts as it is: OpenVINO's low-precision
transformations run its quantized parts in INT8 (the toolchain's own calibration and recovery made
the scales). ``compress_to_fp16`` stores weights in FP16 (for GPU and NPU devices, which compute in
FP16); ``device`` names the device the IR is for, checked on this host's CPU plugin (a proxy when
it is not ``CPU``).

The IR is saved with its batch fixed at ``static_batch`` (1 by default): OpenVINO compiles a static
shape into faster kernels than a dynamic batch (NNCF's INT8 MobileNetV3-Large 12 % faster at batch 1,
EfficientNet-B0 8 %, in turns on this 2-core Zen 4, 2026-12-07), and a deployment loads the file as it
is. Another batch size is one ``model.reshape`` before ``compile_model`` away, which the `openvino_ir`
runtime does for the build's batch sweep.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import NotApplicable, StageError, reason
from toolchain.core.options import option
from toolchain.core.stage import Stage, StageResult, register_stage
from toolchain.measure import cpu

PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


@dataclasses.dataclass(frozen=True)
class ConvertOpenVinoOptions:
    inference_precision: Literal["f32", "bf16", "f16"] = option(
        "f32", "the precision OpenVINO computes floating-point layers in (INFERENCE_PRECISION_HINT)"
    )
    compress_to_fp16: bool = option(False, "weights stored in FP16 (GPU and NPU devices)")
    device: Literal["CPU", "GPU", "NPU"] = option("CPU", "the OpenVINO device the IR is for")
    static_batch: int = option(
        1,
        "batch size the IR's inputs are fixed to (OpenVINO compiles a static shape into faster kernels; "
        "another batch is a model.reshape before compile_model); 0: the batch stays dynamic",
    )


@register_stage
class ConvertOpenVino(Stage):
    name = "convert_openvino"
    requires = ("openvino",)
    transitions = {Kind.ONNX: Kind.OPENVINO}
    Options = ConvertOpenVinoOptions
    report_facts = (
        "checked_on", "inference_precision", "device", "compress_to_fp16", "host_has_bf16", "latency_note",
        "input_shapes", "static_batch_note",
    )  # fmt: skip

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        o = self.options
        if o.inference_precision == "bf16" and ctx.isa is not None:
            if not cpu.has_bf16(ctx.isa):
                raise NotApplicable(
                    f'convert_openvino: the deployment CPU (runtime.isa = "{ctx.isa}") has no BF16 '
                    'instructions; BF16 is for "avx512_bf16" or "amx"'
                )
        import openvino as ov

        try:
            model = ov.convert_model(str(artifact.path))
            static = _fix_batch(model, o.static_batch)
            model.set_rt_info(o.inference_precision, ["runtime_options", "INFERENCE_PRECISION_HINT"])
            model.set_rt_info(o.device, ["toolchain", "device"])
            path = self.output_path(artifact, ctx, ".xml")
            ov.save_model(model, str(path), compress_to_fp16=o.compress_to_fp16)
        except Exception as e:  # OpenVINO's own exception types
            raise StageError(f"convert_openvino: OpenVINO cannot convert this model: {reason(e)}") from None
        precision = (
            artifact.precision
            if artifact.precision in ("int8", "mixed")
            else PRECISIONS[o.inference_precision]
        )
        emulated_bf16 = o.inference_precision == "bf16" and not cpu.host_has_bf16()
        facts = {
            "checked_on": _checked_on(o, emulated_bf16),
            "inference_precision": o.inference_precision,
            "device": o.device,
            "compress_to_fp16": o.compress_to_fp16,
            "openvino": ov.__version__,
            **static,
        }
        if precision in ("int8", "mixed"):
            facts.update(_counted_share(artifact, ctx))
            if facts.get("int8_share") == 0:  # counted on an ONNX graph: no INT8 layer is no INT8 layer
                precision = "fp32"
        if o.inference_precision == "bf16":
            facts["host_has_bf16"] = not emulated_bf16
            if emulated_bf16:
                facts["latency_note"] = (
                    "this host has no AVX512-BF16 / AMX: OpenVINO's CPU plugin runs the BF16 IR in FP32 "
                    "here, so its parity here overstates BF16's and its latency is FP32's"
                )
        return StageResult(
            dataclasses.replace(artifact, kind=Kind.OPENVINO, path=path, precision=precision), facts
        )


def _fix_batch(model, batch: int) -> dict:
    """Fix the first dimension of each input whose batch is dynamic to ``batch`` (in place); the facts:
    the inputs' shapes as saved, and why the batch stayed dynamic where OpenVINO could not reshape."""
    import openvino as ov

    wanted = {}
    for i in model.inputs:
        shape = i.get_partial_shape()
        if batch and shape.rank.is_static and len(shape) >= 1 and shape[0].is_dynamic:
            wanted[i] = ov.PartialShape([batch, *list(shape)[1:]])
    facts: dict = {}
    if wanted:
        try:
            model.reshape(wanted)
        except Exception as e:  # noqa: BLE001 - OpenVINO's own types; a dynamic IR still works
            facts["static_batch_note"] = f"the batch stays dynamic: OpenVINO could not fix it ({reason(e)})"
    facts["input_shapes"] = {i.any_name: str(i.get_partial_shape()) for i in model.inputs}
    return facts


def _counted_share(artifact: Artifact, ctx: BuildContext) -> dict:
    """The INT8 share of the Q/DQ model converted (an IR's own graph is not counted): OpenVINO runs
    in INT8 what the Q/DQ pairs mark, as ONNX Runtime does."""
    from toolchain.passes.onnx_share import onnx_int8_share

    try:
        share = onnx_int8_share(artifact.path, ctx.sample_shapes())["int8_share"]
    except Exception:  # noqa: BLE001 - a label's measurement must never cost the artifact
        return {}
    return {} if share is None else {"int8_share": share}


def _checked_on(o: ConvertOpenVinoOptions, emulated_bf16: bool) -> str:
    where = "this host's CPU plugin"
    if o.device != "CPU":
        return f"{where}: a proxy for the {o.device} the IR is for"
    if emulated_bf16:
        return f"{where} at f32 (no BF16 here): a proxy that overstates BF16's parity"
    return where


@dataclasses.dataclass(frozen=True)
class ConvertOpenVinoFp16Options(ConvertOpenVinoOptions):
    inference_precision: Literal["f32", "bf16", "f16"] = option(
        "f16", "the precision OpenVINO computes floating-point layers in (INFERENCE_PRECISION_HINT)"
    )
    compress_to_fp16: bool = option(True, "weights stored in FP16 (GPU and NPU devices)")


@register_stage
class ConvertOpenVinoFp16(ConvertOpenVino):
    """The same conversion for a GPU or NPU: FP16 weights and FP16 inference (one profile can hold
    both this artifact and the FP32 one: stage options are per profile, so this is a stage of its own)."""

    name = "convert_openvino_fp16"
    Options = ConvertOpenVinoFp16Options


@dataclasses.dataclass(frozen=True)
class ConvertOpenVinoBf16Options(ConvertOpenVinoOptions):
    inference_precision: Literal["f32", "bf16", "f16"] = option(
        "bf16", "the precision OpenVINO computes floating-point layers in (INFERENCE_PRECISION_HINT)"
    )


@register_stage
class ConvertOpenVinoBf16(ConvertOpenVino):
    """The conversion for a CPU with AVX512-BF16 or AMX (``runtime.isa`` "avx512_bf16" or "amx"; not
    applicable elsewhere): FP32 weights, BF16 inference stated in the file. OpenVINO's CPU plugin picks
    BF16 on its own on such CPUs; here the choice is the artifact's, named and judged as BF16."""

    name = "convert_openvino_bf16"
    Options = ConvertOpenVinoBf16Options
