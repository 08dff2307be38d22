"""`toolchain.build(...)`: the one function the CLI and Python users call."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from toolchain.check import make_artifact, reference_facts
from toolchain.core.errors import ToolchainError
from toolchain.core.heap import keeps_heap_frozen
from toolchain.core.native import keeps_torch_settings
from toolchain.core.pipeline import Pipeline, Skipped
from toolchain.core.qat import QatError, QatState, read_qat_state
from toolchain.core.runner import reference_runner
from toolchain.folder import build_log, check_output, staged_folder
from toolchain.inputs.load import load_model
from toolchain.inputs.prepare import build_context, check_data_paths, fix_constants, prepare_model
from toolchain.measure.cpu import isa_facts
from toolchain.on_device import save_parity_inputs
from toolchain.primary import choose_primary
from toolchain.reporting.facts import data_facts, model_facts
from toolchain.reporting.manifest import write_manifest
from toolchain.reporting.report import Report, beside_int8, write
from toolchain.target import load_target, plan
from toolchain.tensorrt.plan import plan_engine
from toolchain.verdict.expected import applied_thresholds, expected_outputs, user_metric

log = logging.getLogger("toolchain")


@keeps_torch_settings
@keeps_heap_frozen
def build(
    model: str,
    target: str = "x86_fbgemm",
    out: str | Path | None = None,
    calib: str | Path | None = None,
    val: str | Path | None = None,
    input_shape: str | tuple[int, ...] | None = None,
    trust_pickle: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    outputs: Mapping[str, str] | None = None,
    metric: str | None = None,
    max_metric_drop: float | None = None,
    constants: Mapping[str, object] | Sequence[str] | str | None = None,
    qat: str | Path | None = None,
) -> tuple[Report, Path]:
    """Build every artifact of ``target`` from ``model``, check each against FP32, and write
    the build folder. ``outputs`` declares output roles (index or name -> role) over the
    profile's; ``metric`` (FILE.py:function) and ``max_metric_drop`` override the profile's
    user metric; ``constants`` fixes forward arguments that are Python numbers ({"sr": 16000} or
    "sr=16000"; default: the data's 0-d arrays, else the arguments' defaults); ``qat``: a fine-tuned
    QAT state (`toolchain qat`) whose weights and ranges its artifact takes instead of calibrating.
    Returns the report and the folder; the folder's `build.log` holds everything the build logged. Raises
    ToolchainError on bad input."""
    with build_log() as lines:
        started = time.perf_counter()
        profile = load_target(target)
        check_data_paths(calib, val)  # before the model loads: a typo costs no waiting
        qat_state = qat_for(profile, qat)
        scorer = user_metric(profile, metric, max_metric_drop)
        log.info("loading %s", model)
        loaded = load_model(model, trust_pickle)
        folder = Path(out) if out else Path("build") / f"{loaded.name}-{profile.name}"
        check_output(folder)
        loaded = fix_constants(loaded, constants, calib, val)
        loaded, inputs, names = prepare_model(
            loaded, profile.data, profile.runtime.isa, calib, val, input_shape
        )
        if qat_state and qat_state.model_sha256 != loaded.artifact.sha256:
            raise QatError(
                f"QAT state `{qat}` was prepared from another model (graph or weights differ from "
                f"{model}'s): prepare it from the model file this build reads"
            )
        reference = reference_runner(loaded.artifact, profile.runtime.threads)
        thresholds = applied_thresholds(loaded, profile)
        plans, skipped = plan(profile, loaded.artifact.kind)
        if not plans:
            kind = loaded.artifact.kind
            raise ToolchainError(
                f"target `{profile.name}` has no artifact that can be built from a {kind} model:"
                + _reasons(skipped)
            )
        with staged_folder(folder) as tmp:
            r = profile.runtime
            ctx = build_context(tmp / "work", loaded, inputs, r.threads, r.isa, progress, qat_state)
            declared = {**(profile.parity.outputs or {}), **(outputs or {})}
            expected = expected_outputs(loaded, inputs, profile, declared, names, scorer)
            pipeline = Pipeline(ctx)
            made = {
                chain.name: make_artifact(
                    chain, pipeline, loaded.artifact, profile, thresholds, inputs, expected, tmp
                )
                for chain in plans
            }
            check_qat_used(qat_state, made)
            shutil.rmtree(ctx.workdir)
            reports = [m.report for m in made.values() if m.report is not None]
            skipped += [m.skipped for m in made.values() if m.skipped and not m.not_applicable]
            not_applicable = [m.skipped for m in made.values() if m.not_applicable]
            if not reports:
                why = _reasons(skipped + not_applicable)
                raise ToolchainError(f"no artifact of target `{profile.name}` could be built:{why}")
            engine = plan_engine(profile.tensorrt, reports, tmp, inputs.signature)
            if engine and engine["status"] == "pending on device":
                v = inputs.validation
                save_parity_inputs(
                    tmp, v.x, expected.outputs, expected.roles, v.y, profile.tensorrt.parity_samples
                )
            ranked, choice = choose_primary(
                reports,
                {
                    m.report.name: m.shipped
                    for m in made.values()
                    if m.report is not None and m.shipped is not None
                },
                inputs.validation.x[:1],
                r.threads,
                r.race_runs,
                r.race_within,
                r.race_threads,
            )
            report = Report(
                target=profile.name,
                target_file=profile.source,
                model=model_facts(loaded, inputs, expected.roles),
                reference=reference_facts(loaded, reference, inputs, profile, expected.accuracy, tmp),
                data=data_facts(inputs),
                artifacts=tuple(beside_int8(ranked)),
                cpu=isa_facts(r.isa),
                skipped=tuple({"name": s.name, "reason": s.reason} for s in skipped),
                not_applicable=tuple({"name": s.name, "reason": s.reason} for s in not_applicable),
                thresholds=thresholds,
                engine=engine,
                warnings=inputs.warnings
                + expected.warnings
                + tuple(f"{a.name}: {a.latency_warning}" for a in reports if a.latency_warning),
                build_seconds=round(time.perf_counter() - started, 2),
                metric=expected.metric and expected.metric.to_json(),
                primary_choice=choice,
                qat=qat_state and qat_state.to_json(),
            )
            optional = tuple(report.optional_failures)
            for line in optional:
                log.warning(line)
            report = dataclasses.replace(report, warnings=report.warnings + optional)
            write(report, tmp)
            built = {n: m for n, m in made.items() if m.report is not None}
            write_manifest(
                tmp,
                target_file=profile.source,
                model=report.model,
                data=report.data,
                artifacts={n: m.manifest for n, m in built.items()},
                stages={n: m.records for n, m in built.items()},
            )
            lines.save(tmp / "build.log")
        return report, folder


def qat_for(profile, path: str | Path | None) -> QatState | None:
    """The QAT state at ``path``, checked to be for this target and one of its artifacts."""
    if path is None:
        return None
    state = read_qat_state(path)
    if state.target != profile.name:
        raise QatError(
            f"QAT state `{path}` was prepared for target `{state.target}`, not `{profile.name}`: "
            f"prepare one with --target {profile.name}"
        )
    if state.artifact not in profile.artifacts:
        raise QatError(f"QAT state `{path}` is for artifact `{state.artifact}`; `{profile.source}` lacks it")
    return state


def check_qat_used(state: QatState | None, made: dict) -> None:
    """The artifact a QAT state was prepared for must have taken its weights and ranges: a build that
    quietly calibrated (or skipped) it instead is not what the user asked for (no folder is written)."""
    if state is None:
        return
    m = made.get(state.artifact)
    if m is None:
        why = "it cannot be built here (see `toolchain doctor`)"
    elif m.report is None:
        why = m.skipped.reason
    elif m.report.ranges == "qat":
        return
    else:
        why = m.report.stage_facts.get(state.stage, {}).get("qat_state") or "it was calibrated"
    raise QatError(f"QAT state `{state.source}` was not used by {state.artifact}: {why}")


def _reasons(skipped: list[Skipped]) -> str:
    """One line per artifact, each under the message's first line."""
    return "".join(f"\n  {s.name}: {s.reason}" for s in skipped)
