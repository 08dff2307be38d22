"""`toolchain qat` and ``toolchain.qat``: quantization-aware training for a target's own quantizer.

When post-training INT8 cannot hold parity, even after recovery, the model can learn to live with
INT8: fine-tune it with the quantization simulated (fake-quantization) and ship what it learned.

    qat_model = toolchain.qat.prepare("model.pt2", target="x86_fbgemm", calib="calib.npz")
    ...  # your training loop on qat_model (a torch.fx.GraphModule in training mode)
    toolchain.qat.save(qat_model, "qat.pt")
    # toolchain build model.pt2 --target x86_fbgemm --qat qat.pt

:func:`prepare` runs the target artifact's own chain up to its quantization stage (fusion included)
and asks that stage for its fake-quantized twin (:class:`toolchain.core.stage.QuantizationAware`):
the same observers, dtypes and ranges the stage's post-training quantization uses, calibrated once
on the calibration data. A build given the saved state converts it with the learned weights and
ranges, and calibrates nothing for that artifact (report.json: `ranges: "qat"`). Every artifact is
still judged against the FP32 model the build reads: the model before fine-tuning.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable

from toolchain.core.errors import reason
from toolchain.core.heap import keeps_heap_frozen
from toolchain.core.native import keeps_torch_settings
from toolchain.core.pipeline import Plan
from toolchain.core.qat import QatError, QatState, write_qat_state
from toolchain.core.stage import QuantizationAware
from toolchain.core.user_code import load_function, where
from toolchain.inputs.load import load_model
from toolchain.inputs.prepare import build_context, check_data_paths, fix_constants, prepare_model
from toolchain.target import Target, load_target, plan

log = logging.getLogger("toolchain")

META = "toolchain_qat"  # the key of a prepared model's `meta` that save() reads


@keeps_torch_settings
@keeps_heap_frozen
def prepare(
    model: str | Path,
    target: str = "x86_fbgemm",
    calib: str | Path | None = None,
    artifact: str | None = None,
    input_shape: str | tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    constants=None,
):
    """``model`` (the file the build will read) with the fake-quantization of ``target``'s
    ``artifact`` (default: its first artifact whose quantization QAT can prepare), calibrated once
    on ``calib``. Returns a ``torch.fx.GraphModule`` in training mode: fine-tune it, then
    :func:`save` it. Raises ToolchainError on bad input."""
    from toolchain.core.errors import StageError
    from toolchain.core.pipeline import Pipeline

    if calib is None:
        raise QatError("QAT calibrates its starting ranges on real inputs: give the calibration data (calib)")
    profile = load_target(target)
    check_data_paths(calib, None)
    loaded = fix_constants(load_model(str(model), trust_pickle), constants, calib, None)
    r = profile.runtime  # calibrated on every sample (nothing held out: QAT checks no parity)
    loaded, inputs, _ = prepare_model(loaded, profile.data, r.isa, calib, None, input_shape, hold_out=False)
    chain, index = _chain(profile, loaded.artifact.kind, artifact)
    stage = chain.stages[index]
    with tempfile.TemporaryDirectory(prefix="toolchain-qat-") as tmp:
        ctx = build_context(Path(tmp), loaded, inputs, r.threads, r.isa)
        try:
            before, _ = Pipeline(ctx).run(Plan(chain.name, chain.spec, chain.stages[:index]), loaded.artifact)
            qat_model = stage.prepare_qat(before, ctx)
        except StageError as e:
            raise QatError(f"cannot prepare {chain.name} of {profile.name} for QAT: {e}") from None
        except Exception as e:  # the model itself failing on the calibration inputs, in torch's words
            log.debug("preparing %s for QAT", chain.name, exc_info=True)
            raise QatError(
                f"cannot prepare {chain.name} of {profile.name} for QAT: the model raised {reason(e)}"
            ) from None
        settings = stage.qat_settings(ctx)
    qat_model.meta[META] = {
        "target": profile.name,
        "artifact": chain.name,
        "stage": stage.name,
        "settings": settings,
        "model_sha256": loaded.artifact.sha256,
    }
    log.info(
        "prepared %s of %s for QAT (%s, ranges calibrated on %d inputs)",
        chain.name,
        profile.name,
        stage.name,
        len(inputs.calibration.x),
    )
    return qat_model


def save(qat_model, path: str | Path) -> Path:
    """Write the fine-tuned ``qat_model`` (from :func:`prepare`) for `toolchain build --qat`: its
    weights and fake-quantization ranges, and what it was prepared for."""
    meta = getattr(qat_model, "meta", {}).get(META)
    if meta is None:
        raise QatError("save() takes the model toolchain.qat.prepare returned (its copy keeps `meta`)")
    return write_qat_state(QatState(**meta, state_dict=qat_model.state_dict()), path)


def finetune(
    model: str | Path,
    train: str | Callable,
    out: str | Path,
    target: str = "x86_fbgemm",
    calib: str | Path | None = None,
    artifact: str | None = None,
    input_shape: str | tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    constants=None,
) -> Path:
    """`toolchain qat`: :func:`prepare`, call ``train`` (a function, or `FILE.py:function`) with the
    prepared model, :func:`save` what it trained (the model it returns, if it returns one) to ``out``."""
    import torch

    fn = load_function(train, "training function", QatError) if isinstance(train, str) else train
    name = train if isinstance(train, str) else getattr(fn, "__name__", "train")
    qat_model = prepare(model, target, calib, artifact, input_shape, trust_pickle, constants)
    meta = qat_model.meta[META]
    try:
        returned = fn(qat_model)
    except Exception as e:
        path = Path(train.rpartition(":")[0]) if isinstance(train, str) else None
        raise QatError(f"training function {name} raised {where(e, path)}") from None
    if returned is not None and not isinstance(returned, torch.fx.GraphModule):
        raise QatError(
            f"training function {name} returned {type(returned).__name__}: return nothing (it trains the "
            "model in place) or the model it was given"
        )
    trained = returned if returned is not None else qat_model
    trained.meta.setdefault(META, meta)
    return save(trained, out)


def _chain(profile: Target, kind, name: str | None) -> tuple[Plan, int]:
    plans, _ = plan(profile, kind)
    found = [
        (p, i)
        for p in plans
        for i, s in enumerate(p.stages)
        if isinstance(s, QuantizationAware) and s.qat_prepares(kind)
    ]
    if not found:
        raise QatError(
            f"target `{profile.name}` has no artifact whose quantization QAT can prepare for a {kind} model"
        )
    if name is None:
        return found[0]
    for p, i in found:
        if p.name == name:
            return p, i
    valid = ", ".join(p.name for p, _ in found)
    raise QatError(f"`{name}` is not an artifact of `{profile.name}` that QAT can prepare; valid: {valid}")
