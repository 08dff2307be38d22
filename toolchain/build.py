"""`toolchain.build(...)`: the one function the CLI and Python users call."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from toolchain.check import check_artifact, recover_artifact, reference_facts, ship
from toolchain.core.context import BuildContext
from toolchain.core.errors import NotApplicable, StageError, ToolchainError, reason
from toolchain.core.native import keeps_torch_settings
from toolchain.core.pipeline import Pipeline, Skipped
from toolchain.core.runner import reference_runner
from toolchain.core.stage import reported_facts
from toolchain.folder import check_output, staged_folder
from toolchain.inputs.load import load_model, settle_random_batchnorm
from toolchain.inputs.prepare import (
    bind_constants,
    check_data_paths,
    check_model_accepts,
    fix_constants,
    prepare_inputs,
)
from toolchain.measure.cpu import isa_facts
from toolchain.reporting.facts import data_facts, model_facts
from toolchain.reporting.manifest import write_manifest
from toolchain.reporting.report import Report, mark_primary, write
from toolchain.target import load_target, plan
from toolchain.tensorrt.operators import parser_refuses
from toolchain.tensorrt.plan import plan_engine
from toolchain.verdict.expected import applied_thresholds, expected_outputs, parity_subset, user_metric

log = logging.getLogger("toolchain")


@keeps_torch_settings
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
) -> tuple[Report, Path]:
    """Build every artifact of ``target`` from ``model``, check each against FP32, and write
    the build folder. ``outputs`` declares output roles (index or name -> role) over the
    profile's; ``metric`` (FILE.py:function) and ``max_metric_drop`` override the profile's
    user metric; ``constants`` fixes forward arguments that are Python numbers ({"sr": 16000} or
    "sr=16000"; default: the data's 0-d arrays, else the arguments' defaults). Returns the report
    and the folder. Raises ToolchainError on bad input."""
    started = time.perf_counter()
    profile = load_target(target)
    check_data_paths(calib, val)  # before the model loads: a typo costs no waiting
    scorer = user_metric(profile, metric, max_metric_drop)
    log.info("loading %s", model)
    loaded = load_model(model, trust_pickle)
    folder = Path(out) if out else Path("build") / f"{loaded.name}-{profile.name}"
    check_output(folder)
    loaded = fix_constants(loaded, constants, calib, val)
    log.info("reading calibration and validation data")
    inputs = prepare_inputs(loaded, profile.data, profile.runtime.isa, calib, val, input_shape)
    loaded = bind_constants(loaded, inputs.calibration.x)
    names = check_model_accepts(loaded, inputs.signature)
    loaded = settle_random_batchnorm(loaded, inputs.calibration.x)
    reference = reference_runner(loaded.artifact, profile.runtime.threads)
    thresholds = applied_thresholds(loaded, profile)
    plans, skipped = plan(profile, loaded.artifact.kind)
    if not plans:
        raise ToolchainError(
            f"target `{profile.name}` has no artifact that can be built from a {loaded.artifact.kind} model "
            f"({_reasons(skipped)})"
        )

    with staged_folder(folder) as tmp:
        work = tmp / "work"
        work.mkdir()
        ctx = BuildContext(
            work,
            inputs.calibration,
            inputs.shape,
            loaded.dynamic_batch is not False,
            profile.runtime.threads,
            progress or (lambda *a: None),
            profile.runtime.isa,
            signature=inputs.signature,
        )
        expected = expected_outputs(
            loaded, inputs, profile, {**(profile.parity.outputs or {}), **(outputs or {})}, names, scorer
        )
        ref_out, roles = expected.outputs, expected.roles
        pipeline = Pipeline(ctx)
        reports, records, files, not_applicable = [], {}, {}, []
        for chain in plans:
            try:
                artifact, records[chain.name] = pipeline.run(chain, loaded.artifact)
            except NotApplicable as e:
                log.info("not applicable: %s: %s", chain.name, e)
                not_applicable.append(Skipped(chain.name, str(e)))
                continue
            except StageError as e:
                log.warning("skipped %s: %s", chain.name, e)
                skipped.append(Skipped(chain.name, str(e)))
                continue
            refused = parser_refuses(profile.tensorrt, artifact)
            if refused:
                log.warning("skipped %s: %s", chain.name, refused)
                skipped.append(Skipped(chain.name, refused))
                continue
            shipped = ship(artifact, chain.spec.runtime, chain.name, tmp)
            checked_on, against = parity_subset(inputs, expected, chain.spec.parity_samples)
            try:
                checked = check_artifact(
                    chain.name, shipped, chain.spec.runtime, profile, thresholds, checked_on, against, tmp
                )
            except (
                Exception
            ) as e:  # built, but its own runtime refuses it (any library's error type): not shipped
                why = f"{chain.spec.runtime} could not run the built file: {reason(e)}"
                log.warning("skipped %s: %s", chain.name, why)
                log.debug("", exc_info=True)
                skipped.append(Skipped(chain.name, why))
                for f in shipped.files():
                    f.unlink()
                continue
            recovery = None
            if checked.parity.passed is False and thresholds is not None and profile.recovery.enabled:
                checked, shipped, records[chain.name], recovery = recover_artifact(
                    chain,
                    checked,
                    shipped,
                    records[chain.name],
                    pipeline,
                    loaded.artifact,
                    profile,
                    thresholds,
                    checked_on,
                    against,
                    tmp,
                )
            reports.append(
                dataclasses.replace(
                    checked,
                    eligible=chain.spec.primary,
                    stage_facts=reported_facts(records[chain.name]),
                    recovery=recovery and recovery.to_report(),
                )
            )
            files[chain.name] = {
                "file": reports[-1].path,
                "sha256": reports[-1].sha256,
                "lineage": list(shipped.lineage),
                "recovery_attempts": recovery and [a.to_json() for a in recovery.outcome.attempts],
            }
        shutil.rmtree(work)
        if not reports:
            raise ToolchainError(
                f"no artifact of target `{profile.name}` could be built "
                f"({_reasons(skipped + not_applicable)})"
            )
        engine = plan_engine(profile.tensorrt, reports, tmp, inputs.signature)
        if engine and engine["status"] == "pending on device":
            from toolchain.on_device import save_parity_inputs

            save_parity_inputs(
                tmp, inputs.validation.x, ref_out, roles, inputs.validation.y, profile.tensorrt.parity_samples
            )
        report = Report(
            target=profile.name,
            target_file=profile.source,
            model=model_facts(loaded, inputs, roles),
            reference=reference_facts(loaded, reference, inputs, profile, expected.accuracy, tmp),
            data=data_facts(inputs),
            artifacts=tuple(mark_primary(reports)),
            cpu=isa_facts(profile.runtime.isa),
            skipped=tuple({"name": s.name, "reason": s.reason} for s in skipped),
            not_applicable=tuple({"name": s.name, "reason": s.reason} for s in not_applicable),
            thresholds=thresholds,
            engine=engine,
            warnings=inputs.warnings
            + tuple(f"{a.name}: {a.latency_warning}" for a in reports if a.latency_warning),
            build_seconds=round(time.perf_counter() - started, 2),
            metric=expected.metric and expected.metric.to_json(),
        )
        write(report, tmp)
        write_manifest(
            tmp,
            target_file=profile.source,
            model=report.model,
            data=report.data,
            artifacts=files,
            stages={n: records[n] for n in files},
        )
    return report, folder


def _reasons(skipped: list[Skipped]) -> str:
    return "; ".join(f"{s.name}: {s.reason}" for s in skipped)
