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
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import NotApplicable, StageError, reason
from toolchain.core.options import option
from toolchain.core.stage import Stage, StageResult, register_stage

PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


@dataclasses.dataclass(frozen=True)
class ConvertOpenVinoOptions:
    inference_precision: Literal["f32", "bf16", "f16"] = option(
        "f32", "the precision OpenVINO computes floating-point layers in (INFERENCE_PRECISION_HINT)"
    )
    compress_to_fp16: bool = option(False, "weights stored in FP16 (GPU and NPU devices)")
    device: Literal["CPU", "GPU", "NPU"] = option("CPU", "the OpenVINO device the IR is for")


@register_stage
class ConvertOpenVino(Stage):
    name = "convert_openvino"
    requires = ("openvino",)
    transitions = {Kind.ONNX: Kind.OPENVINO}
    Options = ConvertOpenVinoOptions
    report_facts = ("checked_on", "inference_precision", "device", "compress_to_fp16")

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        o = self.options
        if o.inference_precision == "bf16" and ctx.isa is not None:
            from toolchain.measure.cpu import has_bf16

            if not has_bf16(ctx.isa):
                raise NotApplicable(
                    f'convert_openvino: the deployment CPU (runtime.isa = "{ctx.isa}") has no BF16 '
                    'instructions; BF16 is for "avx512_bf16" or "amx"'
                )
        import openvino as ov

        try:
            model = ov.convert_model(str(artifact.path))
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
        facts = {
            "checked_on": "this host's CPU plugin"
            + ("" if o.device == "CPU" else f": a proxy for the {o.device} the IR is for"),
            "inference_precision": o.inference_precision,
            "device": o.device,
            "compress_to_fp16": o.compress_to_fp16,
            "openvino": ov.__version__,
        }
        return StageResult(
            dataclasses.replace(artifact, kind=Kind.OPENVINO, path=path, precision=precision), facts
        )


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
