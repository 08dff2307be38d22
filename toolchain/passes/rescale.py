"""The function-preserving rescalings applied before quantization, and their FP32 check.

Two of recovery's fixes change no function, only where each channel's scale sits:
cross-layer equalization (:mod:`toolchain.passes.equalize`, between two layers with weights) and
SmoothQuant's activation-to-weight migration (:mod:`toolchain.passes.smooth`, from a LayerNorm's output
into the Linear layers that read it). Either or both are applied to a copy of the float model,
which is then run beside the original on calibration inputs: an outputs' difference above
:data:`toolchain.passes.equalize.MAX_RELATIVE_ERROR` is a StageError (the artifact would be wrong), so
what the quantizer sees is the user's function. One form per graph: the fused FX module (torch
and ExecuTorch backends) and the ONNX file (ONNX Runtime, TensorRT's Q/DQ).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np

from toolchain.core.errors import StageError
from toolchain.core.runner import torch_runner
from toolchain.passes.equalize import MAX_RELATIVE_ERROR, check_same, equalize_fx, equalize_onnx
from toolchain.passes.smooth import Bits, rows, smooth_fx, smooth_onnx

Runner = Callable[[np.ndarray], list[np.ndarray]]


def what(equalize: bool, smooth: bool) -> str:
    return " and ".join(w for w, on in (("equalization", equalize), ("smoothing", smooth)) if on)


def rescaled_copy(
    gm, x: np.ndarray, stage: str, equalize: bool = True, smooth: bool = False, bits: Bits = Bits()
):
    """A copy of a fused FX GraphModule rescaled as asked (smoothing measured on ``x``, for ``bits``),
    checked to compute the same function in FP32 on ``x[:32]``; returns it with the facts."""
    model = copy.deepcopy(gm).eval()
    pairs = equalize_fx(model) if equalize else None
    groups = smooth_fx(model, x, bits) if smooth else None
    error = check_same(torch_runner(gm), torch_runner(model), x[:32])
    return model, _facts(stage, what(equalize, smooth), error, pairs, groups)


def rescale_onnx_into(
    path: Path,
    out: Path,
    runner: Callable[[object], Runner],
    x: np.ndarray,
    stage: str,
    equalize: bool = True,
    smooth: bool = False,
    bits: Bits = Bits(),
) -> dict:
    """The same for the ONNX model at ``path``, written to ``out`` once the check passed (never when
    it fails). ``runner(model)`` runs a ModelProto or a path with ONNX Runtime."""
    import onnx

    from toolchain.passes.bias_correction import exposing

    def values(m, tensors: list[str]) -> list[np.ndarray]:
        """The tensors on ``x``, batch by batch, as (rows, channels): an exposed tensor can be
        tokens-first (L, N, C), which batches of other sizes cannot be stacked as."""
        run = runner(exposing(m, tensors))
        parts = [run(x[i : i + 32]) for i in range(0, len(x), 32)]
        return [np.concatenate([rows(p[k]) for p in parts]) for k in range(len(tensors))]

    model = onnx.load(str(path))
    pairs = equalize_onnx(model) if equalize else None
    groups = smooth_onnx(model, values, bits) if smooth else None
    pending = out.with_name(f"unchecked-{out.name}")  # `out` exists only once checked: callers reuse it
    onnx.save(model, str(pending))
    try:
        facts = _facts(
            stage, what(equalize, smooth), check_same(runner(path), runner(pending), x[:32]), pairs, groups
        )
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    pending.replace(out)
    return facts


def onnx_finds(path: Path, fix: str) -> bool:
    """Whether ``fix`` ("equalize", "smooth") has anything to act on in the ONNX model at ``path``:
    recovery skips a fix that would rebuild the same artifact."""
    import onnx

    from toolchain.passes.equalize import onnx_pairs
    from toolchain.passes.smooth import onnx_groups

    model = onnx.load(str(path), load_external_data=False)
    return bool(onnx_pairs(model) if fix == "equalize" else onnx_groups(model))


def fx_finds(gm, fix: str, x: np.ndarray) -> bool:
    """The same for a fused FX GraphModule (``x``: inputs it can run, for the ranks smoothing needs)."""

    from toolchain.passes.equalize import fx_pairs
    from toolchain.passes.smooth import fx_groups

    if fix == "equalize":
        return bool(fx_pairs(gm))
    from toolchain.core.feed import torch_args

    return bool(fx_groups(copy.deepcopy(gm), torch_args(x[:1])))


def _facts(stage: str, done: str, error: float, pairs, groups) -> dict:
    if not error <= MAX_RELATIVE_ERROR:
        raise StageError(
            f"{stage}: {done} changed the FP32 model's outputs (relative error {error:.2g}); not used"
        )
    error = float(f"{error:.3g}")
    facts = {}
    if pairs is not None:
        facts["equalization"] = {
            "pairs": len(pairs),
            "fp32_relative_error": error,
            "layers": [f"{p.first} -> {p.second}" for p in pairs],
        }
    if groups is not None:
        facts["smoothing"] = {
            "groups": len(groups),
            "fp32_relative_error": error,
            "layers": [str(g) for g in groups],
        }
    return facts
