"""How much of a model an INT8 artifact really computes in INT8: ``int8_share``.

An "int8" label says which quantizer ran, not what it quantized: ONNX Runtime's static INT8 leaves
an LSTM in float (no static LSTM kernel), so a speaker embedder labelled "int8" can run 99.8 % of
its multiply-accumulates in FP32. For an ONNX file the share is counted in multiply-accumulates
per sample (basis ``macs``), from the file's own graph and ONNX shape inference:

- Conv, Gemm, MatMul: INT8 when both their activation and weight inputs come from a
  DequantizeLinear (the Q/DQ form ONNX Runtime fuses into integer kernels), or when the node is an
  integer one (ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul);
- LSTM, GRU: FP32; DynamicQuantizeLSTM: INT8 (weights INT8, inputs quantized per call).

The counting is toolchain.passes.onnx_share's.
"""

from __future__ import annotations

import logging

from toolchain.passes.onnx_share import onnx_fp16_share, onnx_int8_share

log = logging.getLogger("toolchain")


def int8_share_of(artifact, sample: list[tuple[int, ...]]) -> dict:
    """``int8_share`` and ``int8_share_basis`` of a shipped artifact: counted in multiply-accumulates
    for an ONNX file, None (basis None) where this runtime's file cannot be read for it yet."""
    unknown = {"int8_share": None, "int8_share_basis": None}
    if artifact.path is None or artifact.path.suffix != ".onnx":
        return unknown
    try:
        counted = onnx_int8_share(artifact.path, sample)
    except Exception as e:  # noqa: BLE001 - a label's measurement must never cost the artifact
        log.debug("int8_share not measured for %s: %s", artifact.path.name, e)
        return unknown
    if not counted["macs"] or counted.get("contexts"):  # an NPU context (in part): opaque to the count
        return unknown
    return {k: counted[k] for k in ("int8_share", "int8_share_basis")}


def measured_precision(declared: str, share: float | None) -> str:
    """The precision a quantized artifact is reported at, from what it computes: ``int8`` when every
    counted multiply-accumulate runs in INT8, ``mixed`` when some do, ``fp32`` when none do (a quantizer
    that left every layer in float: no artifact computing nothing in INT8 is called int8 or mixed).
    Other precisions, and artifacts whose share is not measured, keep the one their stages declare."""
    if declared not in ("int8", "mixed") or share is None:
        return declared
    if share == 0:
        return "fp32"
    return "int8" if share >= 1 else "mixed"


def fp16_share_of(artifact, sample: list[tuple[int, ...]]) -> float | None:
    """``fp16_share`` of a shipped FP16 ONNX file; None for other artifacts (a torch FP16 artifact's
    share is its cast stage's fact) or where it cannot be counted."""
    if artifact.precision != "fp16" or artifact.path is None or artifact.path.suffix != ".onnx":
        return None
    try:
        return onnx_fp16_share(artifact.path, sample)["fp16_share"]
    except Exception as e:  # noqa: BLE001 - a label's measurement must never cost the artifact
        log.debug("fp16_share not measured for %s: %s", artifact.path.name, e)
        return None
