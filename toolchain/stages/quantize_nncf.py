"""Static INT8 of an OpenVINO model with NNCF, OpenVINO's own post-training quantizer.

NNCF places FakeQuantize where OpenVINO's CPU plugin fuses them best (residual additions, pooling and
the inputs of every convolution and matrix product), which made its INT8 6-11 % faster than the same
plugin on ONNX Runtime's Q/DQ placement on the CNNs of `benchmarks/x86_peers.py`; on other models it
holds less of FP32 (12-14 dB on random-weight MobileNetV3 / EfficientNet-B0, where the Q/DQ model kept
more). So it is an artifact of its own, judged like every other: the faster of the two that pass ships.

Weights follow the deployment CPU (`runtime.isa`): without VNNI every layer gets 7-bit weights (NNCF's
overflow fix), whose 16-bit intermediate sums cannot saturate; with VNNI full 8-bit weights.
Recovery tries other range estimators, NNCF's full bias correction and its transformer scheme
(SmoothQuant), then keeps the most sensitive layers in float (NNCF's ignored scope).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from typing import Literal

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.feed import Feed, contiguous
from toolchain.core.options import option
from toolchain.core.stage import Recoverable, Stage, StageResult, register_stage
from toolchain.measure.cpu import safe_reduce_range

log = logging.getLogger("toolchain")

# the OpenVINO operations with weights that NNCF quantizes: what recovery may keep in float
WEIGHTED = (
    "Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QuantizeNncfOptions:
    preset: Literal["performance", "mixed"] = option(
        "performance", "symmetric activations (performance) or asymmetric ones (mixed)"
    )
    calibration: Literal["default", "minmax", "histogram"] = option(
        "default",
        "NNCF's activation range estimator: its default (mean of per-sample min/max), the global min/max, "
        "or its histogram search",
    )
    smooth: bool = option(
        False,
        "NNCF's transformer scheme (model_type transformer): SmoothQuant of the Linears' inputs, and "
        "element-wise additions, multiplications, pooling and normalizations left float; recovery tries it "
        "on transformers",
    )
    bias_correction: bool = option(
        False, "NNCF's full bias correction instead of its fast one (slower to build); recovery tries it"
    )
    float_layers: tuple[str, ...] = option(
        (), "OpenVINO operation names kept in floating point (NNCF's ignored scope); recovery sets it"
    )
    samples: int = option(300, "calibration samples NNCF reads, at most (NNCF's subset_size)")


@register_stage
class QuantizeNncf(Stage, Recoverable):
    name = "quantize_nncf"
    requires = ("nncf", "openvino")
    transitions = {Kind.OPENVINO: Kind.OPENVINO}
    Options = QuantizeNncfOptions
    report_facts = ("quantizer", "overflow_fix", "ranges", "int8_layers", "weighted_layers", "float_parts")

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import openvino as ov

        nncf = _nncf()
        o = self.options
        core = ov.Core()
        model = core.read_model(str(artifact.path))
        hint = model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
        x = ctx.calibration.x
        # batches of the size the IR's inputs are fixed to (convert_openvino's static_batch), else of 1
        shape = model.inputs[0].get_partial_shape()
        step = shape[0].get_length() if shape.rank.is_static and len(shape) and shape[0].is_static else 1
        count = min(len(x), o.samples) // step * step
        if not count:
            raise StageError(
                f"quantize_nncf: the IR takes batches of {step} and there are {len(x)} calibration samples"
            )
        data = nncf.Dataset([_sample(x, i, step) for i in range(0, count, step)])
        seven_bit = safe_reduce_range(ctx.isa)
        advanced = nncf.AdvancedQuantizationParameters(
            overflow_fix=nncf.OverflowFix.ENABLE if seven_bit else nncf.OverflowFix.DISABLE
        )
        if o.calibration != "default":
            from nncf.quantization.range_estimator import RangeEstimatorParametersSet

            advanced.activations_range_estimator_params = getattr(
                RangeEstimatorParametersSet, o.calibration.upper()
            )
        try:
            with _quiet():
                quantized = nncf.quantize(
                    model,
                    data,
                    preset=nncf.QuantizationPreset(o.preset),
                    subset_size=count,
                    fast_bias_correction=not o.bias_correction,
                    model_type=nncf.ModelType.TRANSFORMER if o.smooth else None,
                    ignored_scope=nncf.IgnoredScope(names=list(o.float_layers)) if o.float_layers else None,
                    advanced_parameters=advanced,
                )
        except Exception as e:  # NNCF's and OpenVINO's own exception types
            raise StageError(f"quantize_nncf: NNCF cannot quantize this model: {reason(e)}") from None
        # the IR states the precision its float layers run at, as convert_openvino wrote it
        quantized.set_rt_info(hint, ["runtime_options", "INFERENCE_PRECISION_HINT"])
        path = self.output_path(artifact, ctx, ".xml")
        ov.save_model(quantized, str(path), compress_to_fp16=False)
        weighted = [op for op in quantized.get_ops() if op.get_type_name() in WEIGHTED]
        int8_layers = sum(_int8(op) for op in weighted)
        facts = {
            "ranges": "calibration",
            "quantizer": f"nncf {nncf.__version__}",
            "preset": o.preset,
            "calibration": o.calibration,
            "calibration_samples": count,
            # what the layers NNCF leaves unquantized compute in (the input IR's hint, kept)
            "float_parts": hint,
            "overflow_fix": "7-bit weights (no VNNI)" if seven_bit else "off (8-bit weights)",
            "fake_quantize_nodes": sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops()),
            "int8_layers": int8_layers,
            "weighted_layers": len(weighted),
            # counted in multiply-accumulates per sample, as an ONNX file's share is (verdict.share)
            "int8_share": _int8_share(weighted),
            "float_layers": list(o.float_layers),
        }
        # nothing quantized (every layer kept in float, or none NNCF takes): not called INT8
        precision = "int8" if int8_layers else "fp32"
        return StageResult(dataclasses.replace(artifact, path=path, precision=precision), facts)

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        import openvino as ov

        model = ov.Core().read_model(str(artifact.path))
        return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() in WEIGHTED]

    def calibrations(self) -> tuple[str, ...]:
        return ("default", "minmax", "histogram")

    def fixes(self) -> tuple[str, ...]:
        return ("smooth", "bias_correction")

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        if fix != "smooth":
            return True
        import openvino as ov

        # a transformer: a Softmax or a normalization (MVN: LayerNorm) beside its matrix products
        kinds = {op.get_type_name() for op in ov.Core().read_model(str(artifact.path)).get_ops()}
        return "MatMul" in kinds and bool(kinds & {"Softmax", "MVN"})


def _nncf():
    """NNCF, imported with its log at ERROR (it reports every step at INFO) and without torch's note
    that a host has no CUDA runtime (NNCF's import loads torch's extension builder)."""
    from toolchain.core.export import quiet_logger

    with quiet_logger("torch.utils.cpp_extension"):
        import nncf

    nncf.set_log_level(logging.ERROR)
    return nncf


def _sample(x, i: int, size: int = 1) -> list:
    """Calibration samples ``i`` to ``i + size`` as NNCF hands them to the OpenVINO model: its inputs, in
    order (as the `openvino_ir` runtime feeds them)."""
    batch = x[i : i + size]
    if isinstance(batch, Feed):
        return [contiguous(a) for a in batch.arrays]
    return [np.ascontiguousarray(batch, dtype=np.float32)]


def _int8(op) -> bool:
    """Whether a weighted operation runs in INT8: its second input is integer weights (NNCF stores them
    as i8/u8 constants that a Convert widens before their scale) or a FakeQuantize's output (a product
    of two activations)."""
    node = op.input_value(1).get_node()
    for _ in range(6):  # Convert, Subtract (zero point), Multiply (scale), Reshape, then the Constant
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant":
            return node.get_element_type().get_type_name() in ("i8", "u8")
        if node.get_input_size() == 0:
            return False
        node = node.input_value(0).get_node()
    return False


def _int8_share(weighted) -> float | None:
    """The INT8 share of ``weighted``'s multiply-accumulates per sample; None where they cannot be counted
    (a dynamic rank)."""
    try:
        macs = [(_macs(op), _int8(op)) for op in weighted]
    except Exception:  # noqa: BLE001 - a label's measurement must never cost the artifact
        return None
    total = sum(m for m, _ in macs)
    return round(sum(m for m, int8 in macs if int8) / total, 4) if total else None


def _macs(op) -> int:
    """Multiply-accumulates per sample of a convolution (weight elements x output positions) or a matrix
    product (output elements x the contracted dimension); dynamic dimensions count as 1."""

    def dims(shape) -> list[int]:
        return [d.get_length() if d.is_static else 1 for d in shape]

    out = dims(op.get_output_partial_shape(0))
    if op.get_type_name() == "MatMul":
        left = dims(op.get_input_partial_shape(0))
        k = left[-2] if op.get_attributes().get("transpose_a") and len(left) > 1 else left[-1]
        return int(np.prod(out[1:] if len(out) > 1 else out)) * k
    weight = dims(op.get_input_partial_shape(1))
    backward = op.get_type_name() == "ConvolutionBackpropData"
    spatial = dims(op.get_input_partial_shape(0))[2:] if backward else out[2:]
    return int(np.prod(weight)) * int(np.prod(spatial))


@contextlib.contextmanager
def _quiet():
    """NNCF draws progress bars on stdout: keep stdout clean for `--json`. Its quantize imports
    torch.utils.cpp_extension, whose note on a missing CUDA runtime is not the build's business."""
    from toolchain.core.export import quiet_logger

    with contextlib.redirect_stdout(io.StringIO()), quiet_logger("torch.utils.cpp_extension"):
        yield
