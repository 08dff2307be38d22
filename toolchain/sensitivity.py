"""`toolchain sensitivity BUILD_DIR [ARTIFACT]`: per-layer sensitivity of a build's INT8
artifacts, measured again from the build's own model, data and target profile.

The same measurement recovery starts with (see :mod:`toolchain.verdict.recovery`): each layer the
artifact's quantization stage can keep in float is kept in float alone, the rest INT8 with the
same activation ranges, and the variant is checked in the artifact's runtime against FP32.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from toolchain.check import make_trial, quantizable_layers
from toolchain.core.errors import ToolchainError
from toolchain.core.heap import keeps_heap_frozen
from toolchain.core.native import keeps_torch_settings
from toolchain.core.pipeline import Pipeline
from toolchain.core.qat import QatError, QatState, read_qat_state
from toolchain.inputs.prepare import build_context, prepare_model, recorded_model
from toolchain.target import load_target, plan
from toolchain.verdict.expected import expected_outputs
from toolchain.verdict.recovery import measure, recoverable_stage, write_sensitivity

log = logging.getLogger("toolchain")


@keeps_torch_settings
@keeps_heap_frozen
def measure_build(folder: Path, names: tuple[str, ...] = (), progress=None) -> dict[str, str]:
    """Write `sensitivity/<artifact>.json` for ``names`` (default: every artifact with a
    quantization stage); returns artifact -> file, relative to ``folder``."""
    report = _read_report(folder)
    _check_unchanged(folder, report["target_file"])
    profile = load_target(report["target_file"])
    data = report["data"]
    calib = None if data["calibration"]["synthetic"] else data["calibration"]["origin"]
    val = (
        None
        if data["validation"]["synthetic"] or data["validation"].get("held_out")
        else data["validation"]["origin"]
    )
    given = (
        None
        if report["model"].get("inputs") and len(report["model"]["inputs"]) > 1
        else tuple(report["model"]["input_shape"])
    )
    loaded = recorded_model(report["model"], calib, val)
    loaded, inputs, outputs = prepare_model(loaded, profile.data, profile.runtime.isa, calib, val, given)
    declared = {
        str(o["index"]): o["role"] for o in report["model"].get("outputs", []) if not o["role_inferred"]
    }
    plans, _ = plan(profile, loaded.artifact.kind)
    built = {a["name"] for a in report["artifacts"]}  # not those the build skipped or found not applicable
    chains = {p.name: p for p in plans if p.name in built and recoverable_stage(p.stages) is not None}
    unknown = [n for n in names if n not in chains]
    if unknown:
        raise ToolchainError(
            f"`{unknown[0]}` is not an artifact of {folder} with a quantization stage; valid: "
            f"{', '.join(chains) or '(none)'}"
        )
    written = {}
    qat = _recorded_qat(folder, report.get("qat"))
    with tempfile.TemporaryDirectory(prefix="sensitivity-") as work:
        ctx = build_context(
            Path(work), loaded, inputs, profile.runtime.threads, profile.runtime.isa, progress, qat
        )
        expected = expected_outputs(loaded, inputs, profile, declared, outputs)
        pipeline = Pipeline(ctx)
        for name in names or tuple(chains):
            chain = chains[name]
            log.info("sensitivity of %s", name)
            trial = make_trial(pipeline, chain, loaded.artifact, profile, profile.parity, inputs, expected)
            outcome, baseline = measure(
                chain.stages, trial, lambda stage: quantizable_layers(pipeline, chain, loaded.artifact, stage)
            )
            written[name] = write_sensitivity(folder, name, outcome, baseline)
    return written


def _recorded_qat(folder: Path, recorded: dict | None) -> QatState | None:
    """The QAT state the build was given, read again (its artifact's sensitivity is of the learned model,
    never a re-calibrated one); refused if the file has changed or gone since."""
    if not recorded:
        return None
    try:
        state = read_qat_state(recorded["file"])
    except QatError as e:
        raise QatError(f"{folder} was built with a QAT state that cannot be read now: {e}") from None
    if state.sha256 != recorded["sha256"]:
        raise QatError(
            f"the QAT state `{recorded['file']}` of {folder} has changed since the build; build again"
        )
    return state


def _check_unchanged(folder: Path, target_file: str) -> None:
    """The measurement must use the profile the build used: refuse one edited since."""
    from toolchain.core.artifact import sha256_files

    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    path = Path(target_file)
    if not path.is_file() or sha256_files([path]) != manifest["target"]["sha256"]:
        raise ToolchainError(
            f"the target profile `{target_file}` of {folder} has changed or gone since the build; build again"
        )


def _read_report(folder: Path) -> dict:
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise ToolchainError(f"`{folder}` is not a build folder (no report.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ToolchainError(f"{path}: not a report this toolchain wrote ({e})") from None
