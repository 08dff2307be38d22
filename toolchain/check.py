"""One artifact, checked: its file shipped into the build folder, loaded back in its own runtime,
compared with FP32, timed and profiled; and, when it misses parity, recovered through the
pipeline. The FP32 reference is timed and profiled the same way."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from toolchain import runtimes
from toolchain.core.artifact import Artifact
from toolchain.core.errors import NotApplicable, StageError, reason
from toolchain.core.export import as_module
from toolchain.core.feed import Signature, arrays
from toolchain.core.pipeline import Pipeline, Plan, Skipped
from toolchain.core.stage import reported_facts
from toolchain.inputs.load import LoadedModel
from toolchain.inputs.prepare import Inputs
from toolchain.measure.profiling import profile_torch, write_profile
from toolchain.measure.timing import bench, busy_cores, time_runs
from toolchain.reporting.report import FOUR_BIT_STAGES, ArtifactReport
from toolchain.runtimes import load_runner
from toolchain.target import ParityThresholds, Target
from toolchain.tensorrt.operators import parser_refuses
from toolchain.verdict.expected import Expected, parity_subset
from toolchain.verdict.parity import Parity, run_batched
from toolchain.verdict.recovery import Outcome, recover, recoverable_stage, summary_line, write_sensitivity
from toolchain.verdict.share import fp16_share_of, int8_share_of, measured_precision

log = logging.getLogger("toolchain")


@dataclasses.dataclass(frozen=True)
class Made:
    """One chain's outcome: its report row, manifest entry and stage records, or why it was not made."""

    report: ArtifactReport | None = None
    manifest: dict | None = None
    records: list | None = None
    skipped: Skipped | None = None
    not_applicable: bool = False  # the stage does not fit this model: nothing went wrong
    shipped: Artifact | None = None  # the file in the build folder, for the primary's timing race


def make_artifact(
    chain: Plan,
    pipeline: Pipeline,
    source: Artifact,
    profile: Target,
    thresholds: ParityThresholds | None,
    inputs: Inputs,
    expected: Expected,
    folder: Path,
) -> Made:
    """Produce the chain's artifact, ship it into ``folder`` and check it in its own runtime;
    recover it when it misses parity. A stage that fails or does not apply, a parser or a runtime
    that refuses the file cost this artifact (listed as skipped), never the build."""
    try:
        artifact, records = pipeline.run(chain, source)
    except NotApplicable as e:
        log.info("not applicable: %s: %s", chain.name, e)
        return Made(skipped=Skipped(chain.name, str(e)), not_applicable=True)
    except StageError as e:
        return _skipped(chain.name, str(e))
    refused = parser_refuses(profile.tensorrt, artifact)
    if refused:
        return _skipped(chain.name, refused)
    runtime = chain.spec.runtime
    shipped = ship(artifact, runtime, chain.name, folder)
    checked_on, against = parity_subset(inputs, expected, chain.spec.parity_samples)
    try:
        checked = check_artifact(
            chain.name, shipped, runtime, profile, thresholds, checked_on, against, folder
        )
    except Exception as e:  # built, but its own runtime refuses it (any library's error type): not shipped
        refused = _skipped(chain.name, f"{runtime} could not run the built file: {reason(e)}")
        log.debug("", exc_info=True)
        for f in shipped.files():
            f.unlink()
        return refused
    recovery = None
    if checked.parity.passed is False and thresholds is not None and profile.recovery.enabled:
        checked, shipped, records, recovery = recover_artifact(
            chain,
            checked,
            shipped,
            records,
            pipeline,
            source,
            profile,
            thresholds,
            checked_on,
            against,
            folder,
        )
    checked = _staged_share(checked, records)
    four = _four_bit(records)
    if four is not None:  # its INT8 count says nothing of it (0 %, its MatMuls being 4-bit ones)
        share, kept = four
        checked = dataclasses.replace(
            checked,
            int4_share=share,
            int8_share=None,
            int8_share_basis=None,
            precision="mixed" if kept or (share is not None and share < 1) else "int4",
        )
    report = dataclasses.replace(
        checked,
        eligible=chain.spec.primary,
        required=chain.spec.required,
        stage_facts=reported_facts(records),
        recovery=recovery and recovery.to_report(),
        fp16_share=checked.fp16_share if checked.fp16_share is not None else _cast_share(records),
        ranges=next((r.facts["ranges"] for r in reversed(records) if r.facts.get("ranges")), None),
    )
    entry = {
        "file": report.path,
        "sha256": report.sha256,
        "lineage": list(shipped.lineage),
        "recovery_attempts": recovery and [a.to_json() for a in recovery.outcome.attempts],
    }
    return Made(report, entry, records, shipped=shipped)


def _staged_share(checked: ArtifactReport, records) -> ArtifactReport:
    """An INT8 artifact whose file cannot be counted (TorchScript, .pte) takes the share its
    quantization stage counted on the model it quantized, and the precision that share gives."""
    if checked.int8_share is not None:
        return checked
    share = next(
        (r.facts["int8_share"] for r in reversed(records) if r.facts.get("int8_share") is not None), None
    )
    if not share:  # 0 counted on a torch graph is likelier a layer the count missed than no INT8 at all
        return checked
    precision = measured_precision(checked.precision, share)
    return dataclasses.replace(checked, int8_share=share, int8_share_basis="macs", precision=precision)


def _cast_share(records) -> float | None:
    """A torch FP16 artifact's share of multiply-accumulates in FP16, as its cast stage counted it
    (where it kept nodes in FP32)."""
    return next((r.facts["fp16_share"] for r in records if "fp16_share" in r.facts), None)


def _four_bit(records) -> tuple[float | None, bool] | None:
    """A 4-bit artifact's share of multiply-accumulates with 4-bit weights, as its stage counted it, and
    whether layers were kept at 8 bits (then it is ``mixed``, whatever the count); None for others."""
    facts = next((r.facts for r in records if r.stage in FOUR_BIT_STAGES), None)
    if facts is None:
        return None
    return facts.get("int4_share"), bool(facts.get("int8_layers"))


def _skipped(name: str, why: str) -> Made:
    log.warning("skipped %s: %s", name, why)
    return Made(skipped=Skipped(name, why))


@dataclasses.dataclass(frozen=True)
class Recovered:
    """Recovery's outcome for one artifact, with what the report says of it."""

    outcome: Outcome
    line: str
    before: Parity
    sensitivity: str | None

    def to_report(self) -> dict:
        return {
            "status": self.outcome.status,
            "summary": self.line,
            "reason": self.outcome.reason,
            "before": {
                "sqnr_db": self.before.sqnr_db,
                "top1_agreement": self.before.top1_agreement,
                "accuracy": self.before.accuracy,
                "failures": list(self.before.failures),
            },
            "attempts": [a.to_json() for a in self.outcome.attempts],
            "sensitivity": self.sensitivity,
        }


def recover_artifact(
    chain: Plan,
    checked: ArtifactReport,
    shipped: Artifact,
    records,
    pipeline: Pipeline,
    source: Artifact,
    profile: Target,
    thresholds: ParityThresholds,
    inputs: Inputs,
    expected: "Expected",
    folder: Path,
):
    """Run recovery on an artifact that failed parity; ship the recovered one in its place when
    an attempt passes. Returns the (new or kept) report, artifact, stage records and outcome."""
    runtime = chain.spec.runtime
    trial = make_trial(pipeline, chain, source, profile, thresholds, inputs, expected)
    log.info("recovering %s: %s", chain.name, "; ".join(checked.parity.failures)[:200])
    outcome = recover(
        chain.stages,
        checked.parity,
        trial,
        lambda stage: quantizable_layers(pipeline, chain, source, stage),
        profile.recovery,
        lambda stage, fix: stage.applies(fix, stage_input(pipeline, chain, source), pipeline.ctx),
        continuous=expected.continuous,
        calibrates=lambda stage: stage.calibrates(stage_input(pipeline, chain, source), pipeline.ctx),
    )
    sensitivity = write_sensitivity(folder, chain.name, outcome, checked.parity)
    if outcome.stages is None:
        line = summary_line(chain.name, outcome, checked.parity, checked.latency_ms, None)
        log.warning(line)
        return checked, shipped, records, Recovered(outcome, line, checked.parity, sensitivity)
    artifact, new_records = pipeline.run(Plan(chain.name, chain.spec, outcome.stages), source)
    if outcome.final.float_layers and artifact.precision == "int8":  # FP16 keeps its own thresholds
        artifact = dataclasses.replace(artifact, precision="mixed")
    for f in shipped.files():
        f.unlink()
    shipped = ship(artifact, runtime, chain.name, folder)
    report = check_artifact(chain.name, shipped, runtime, profile, thresholds, inputs, expected, folder)
    report = dataclasses.replace(report, float_layers=outcome.final.float_layers)
    line = summary_line(chain.name, outcome, checked.parity, checked.latency_ms, report.latency_ms)
    log.info(line)
    return report, shipped, new_records, Recovered(outcome, line, checked.parity, sensitivity)


def make_trial(
    pipeline: Pipeline,
    chain: Plan,
    source: Artifact,
    profile: Target,
    thresholds: ParityThresholds | None,
    inputs: Inputs,
    expected: "Expected",
):
    """stages -> (parity, p50 latency at batch 1 over 10 runs, size): a variant of ``chain`` built
    through the pipeline and checked in its runtime. A variant that its runtime cannot load or
    run raises StageError: a failed attempt, not a crashed build."""

    def trial(stages):
        artifact, _ = pipeline.run(Plan(chain.name, chain.spec, stages), source)
        try:
            runner = load_runner(artifact, chain.spec.runtime, profile.runtime.threads)
            outputs = run_batched(runner, inputs.validation.x, profile.parity.batch_size)
            latency = float(np.median(time_runs(runner, inputs.validation.x[:1], 2, 10)))
        except Exception as e:
            raise StageError(
                f"{chain.spec.runtime} could not run it: {type(e).__name__}: {reason(e)}"
            ) from None
        parity = expected.compare(outputs, inputs.validation, thresholds, artifact.precision)
        return parity, round(latency, 4), artifact.size_bytes()

    return trial


def quantizable_layers(pipeline: Pipeline, chain: Plan, source: Artifact, stage) -> list[str]:
    """What ``stage`` (the chain's quantization stage, or a variant of it) can keep in float."""
    return stage.layers(stage_input(pipeline, chain, source), pipeline.ctx)


def stage_input(pipeline: Pipeline, chain: Plan, source: Artifact) -> Artifact:
    """What the chain's quantization stage takes (the stages before it run once: the pipeline caches them)."""
    index = recoverable_stage(chain.stages)
    return pipeline.run(Plan(chain.name, chain.spec, chain.stages[:index]), source)[0] if index else source


def ship(artifact: Artifact, runtime: str, name: str, folder: Path) -> Artifact:
    """Copy the artifact's files into the build folder under the artifact's name."""
    dest = folder / f"{name}{runtimes.get(runtime).suffix}"
    # ONNX external data: the model names its data file, so re-save under the new name
    if artifact.has_external_data:
        import onnx

        from toolchain.stages.export_onnx import save_onnx

        save_onnx(onnx.load(str(artifact.path)), dest, external=True)
    elif artifact.path.suffix == ".xml":  # OpenVINO reads the .bin of the same stem
        shutil.copyfile(artifact.path, dest)
        shutil.copyfile(artifact.path.with_suffix(".bin"), dest.with_suffix(".bin"))
    else:
        shutil.copyfile(artifact.path, dest)
    return dataclasses.replace(artifact, path=dest, model=None)


def check_artifact(
    name,
    artifact: Artifact,
    runtime: str,
    profile: Target,
    thresholds: ParityThresholds | None,
    inputs: Inputs,
    expected: Expected,
    folder: Path,
) -> ArtifactReport:
    """Load the shipped file in its own runtime, compare with FP32 and time it."""
    log.info("checking %s in %s", name, runtime)
    runner = None

    def load():  # timed by the bench, so its memory counts; the parity run reuses it
        nonlocal runner
        runner = load_runner(artifact, runtime, profile.runtime.threads)
        return runner

    sizes = artifact.timed_batches(profile.runtime.batch_sizes)
    log.info("timing %s (batch sizes %s)", name, ", ".join(map(str, sorted({1, *sizes}))))
    timed = run_bench(load, profile, inputs.signature, sizes)
    log.info("comparing %s with FP32 on %d inputs", name, len(inputs.validation.x))
    outputs = run_batched(runner, inputs.validation.x, profile.parity.batch_size)
    parity = expected.compare(outputs, inputs.validation, thresholds, artifact.precision)
    r = profile.runtime
    log.info("profiling %s's operators", name)
    profiler = runtimes.get(runtime).profile  # None: the runtime has no operator profiler
    measured = profiler and _profiled(
        name, lambda: profiler(artifact, inputs.validation.x[:1], r.profile_runs, r.threads)
    )
    note = measured and busy_cores(timed.batch1.p50_ms, measured.total_ms)
    sample = [a.shape for a in arrays(inputs.validation.x[:1])]
    if note:
        log.warning("%s: %s", name, note)
    share = int8_share_of(artifact, sample)
    return ArtifactReport(
        latency_warning=note or None,
        name=name,
        path=artifact.path.name,
        format=runtimes.get(runtime).format,
        runtime=runtime,
        precision=measured_precision(artifact.precision, share["int8_share"]),
        quantized_engine=artifact.quantized_engine,
        size_bytes=artifact.size_bytes(),
        sha256=artifact.sha256,
        bench=timed,
        parity=parity,
        profile=measured and write_profile(measured, folder, name),
        **share,
        fp16_share=fp16_share_of(artifact, sample),
    )


def _profiled(name: str, run):
    """A profiler that fails says so and costs the artifact its profile, not its place in the build."""
    try:
        return run()
    except Exception as e:  # profilers are diagnostics: their failure must not hide a checked artifact
        log.warning("no per-operator profile for %s: %s", name, reason(e, limit=200))
        return None


def run_bench(load, profile: Target, signature: Signature, batch_sizes: tuple[int, ...] | None = None):
    r = profile.runtime
    return bench(
        load,
        signature,
        batch_sizes or r.batch_sizes,
        r.warmup_runs,
        r.latency_runs,
        r.threads,
        r.latency_budget_ms,
        r.sweep_runs,
    )


def reference_facts(
    loaded: LoadedModel, reference, inputs: Inputs, profile: Target, accuracy, folder: Path
) -> dict:
    """The FP32 model in eager PyTorch: what every artifact is compared with,
    timed and profiled the same way."""
    r = profile.runtime
    log.info("timing and profiling the FP32 reference")
    timed = run_bench(lambda: reference, profile, inputs.signature)
    module = as_module(loaded.artifact)
    measured = _profiled(
        "fp32_reference", lambda: profile_torch(module, inputs.validation.x[:1], r.profile_runs, r.threads)
    )
    path = Path(loaded.source)
    size = path.stat().st_size if path.is_file() else _state_bytes(loaded.artifact)
    b1 = timed.batch1
    return {
        "format": str(loaded.artifact.kind),
        "precision": "fp32",
        "size_bytes": size,
        "latency_ms": b1.p50_ms,
        "latency_p95_ms": b1.p95_ms,
        "latency_p99_ms": b1.p99_ms,
        "accuracy": accuracy,
        "bench": timed.to_json(),
        "profile": measured and write_profile(measured, folder, "fp32_reference"),
    }


def _state_bytes(artifact: Artifact) -> int:
    return sum(t.numel() * t.element_size() for t in artifact.model.state_dict().values())
