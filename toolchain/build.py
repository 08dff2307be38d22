"""`toolchain.build(...)`: the one function the CLI and Python users call."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .artifact import Artifact, Kind
from .export import as_module
from .constants import bind, fed_from_data, parse_constants, resolve as resolve_constants
from .context import BuildContext
from .cpu import isa_facts
from .data import Dataset, check_signature, load_dataset, synthetic_dataset
from .feed import Batch, InputSpec, Signature, torch_args
from .errors import DataError, NotApplicable, StageError, ToolchainError, reason
from .folder import check_output, staged_folder
from .bench import bench, busy_cores, time_runs
from .load import LoadedModel, load_model, parse_shape, settle_random_batchnorm
from .manifest import write_manifest
from .parity import OutputRole, Parity, accuracy_of, check_reference, compare, resolve_roles, run_batched
from .recovery import Outcome, recover, recoverable_stage, summary_line, write_sensitivity
from .pipeline import Pipeline, Plan, Skipped, plan
from .profiling import profile_torch, write_profile
from . import runtimes
from .report import ArtifactReport, Report, mark_primary, write
from .runtime import keeps_torch_settings, load_runner, output_names, reference_runner
from .stage import reported_facts
from .target import ParityThresholds, Target, load_target

log = logging.getLogger("toolchain")


@dataclasses.dataclass(frozen=True)
class Inputs:
    shape: tuple[int, ...]  # batch 1
    calibration: Dataset
    validation: Dataset
    warnings: tuple[str, ...]
    overlap: int = 0  # validation samples that are also calibration samples
    signature: Signature | None = None  # every input's name, shape, dtype (shape: the first one's, batch 1)


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
    inputs = prepare_inputs(loaded, profile, calib, val, input_shape)
    loaded = bind_constants(loaded, inputs.calibration.x)
    names = check_model_accepts(loaded, inputs.signature)
    loaded = settle_random_batchnorm(loaded, inputs.calibration.x)
    reference = reference_runner(loaded.artifact, profile.runtime.threads)
    thresholds = applied_thresholds(loaded, profile)
    plans, skipped = plan(profile, loaded.artifact.kind)
    if not plans:
        raise ToolchainError(f"target `{profile.name}` has no artifact that can be built from a {loaded.artifact.kind} model ({_reasons(skipped)})")

    with staged_folder(folder) as tmp:
        work = tmp / "work"
        work.mkdir()
        ctx = BuildContext(work, inputs.calibration, inputs.shape, loaded.dynamic_batch is not False,
                           profile.runtime.threads, progress or (lambda *a: None), profile.runtime.isa, signature=inputs.signature)
        expected = expected_outputs(loaded, inputs, profile, {**(profile.parity.outputs or {}), **(outputs or {})}, names, scorer)
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
            refused = parser_refuses(profile, artifact)
            if refused:
                log.warning("skipped %s: %s", chain.name, refused)
                skipped.append(Skipped(chain.name, refused))
                continue
            shipped = ship(artifact, chain.spec.runtime, chain.name, tmp)
            checked_on, against = parity_subset(inputs, expected, chain.spec.parity_samples)
            try:
                checked = check_artifact(chain.name, shipped, chain.spec.runtime, profile, thresholds, checked_on, against, tmp)
            except Exception as e:  # built, but its own runtime refuses it (any library's error type): not shipped
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
                    chain, checked, shipped, records[chain.name], pipeline, loaded.artifact, profile, thresholds, checked_on, against, tmp)
            reports.append(dataclasses.replace(checked, eligible=chain.spec.primary, stage_facts=reported_facts(records[chain.name]),
                                               recovery=recovery and recovery.to_report()))
            files[chain.name] = {"file": reports[-1].path, "sha256": reports[-1].sha256, "lineage": list(shipped.lineage),
                                 "recovery_attempts": recovery and [a.to_json() for a in recovery.outcome.attempts]}
        shutil.rmtree(work)
        if not reports:
            raise ToolchainError(f"no artifact of target `{profile.name}` could be built ({_reasons(skipped + not_applicable)})")
        engine = plan_engine(profile, reports, tmp, inputs.signature)
        if engine and engine["status"] == "pending on device":
            from .tensorrt.device import save_parity_inputs

            save_parity_inputs(tmp, inputs.validation.x, ref_out, roles, inputs.validation.y, profile.tensorrt.parity_samples)
        report = Report(
            target=profile.name, target_file=profile.source, model=model_facts(loaded, inputs, roles),
            reference=reference_facts(loaded, reference, inputs, profile, expected.accuracy, tmp),
            data=data_facts(inputs), artifacts=tuple(mark_primary(reports)), cpu=isa_facts(profile.runtime.isa),
            skipped=tuple({"name": s.name, "reason": s.reason} for s in skipped),
            not_applicable=tuple({"name": s.name, "reason": s.reason} for s in not_applicable),
            thresholds=thresholds, engine=engine,
            warnings=inputs.warnings + tuple(f"{a.name}: {a.latency_warning}" for a in reports if a.latency_warning), build_seconds=round(time.perf_counter() - started, 2),
            metric=expected.metric and expected.metric.to_json(),
        )
        write(report, tmp)
        write_manifest(tmp, target_file=profile.source, model=report.model, data=report.data,
                       artifacts=files, stages={n: records[n] for n in files})
    return report, folder


@dataclasses.dataclass(frozen=True)
class Recovered:
    """Recovery's outcome for one artifact, with what the report says of it."""

    outcome: Outcome
    line: str
    before: Parity
    sensitivity: str | None

    def to_report(self) -> dict:
        return {"status": self.outcome.status, "summary": self.line, "reason": self.outcome.reason,
                "before": {"sqnr_db": self.before.sqnr_db, "top1_agreement": self.before.top1_agreement,
                           "accuracy": self.before.accuracy, "failures": list(self.before.failures)},
                "attempts": [a.to_json() for a in self.outcome.attempts], "sensitivity": self.sensitivity}


def recover_artifact(chain: Plan, checked: ArtifactReport, shipped: Artifact, records, pipeline: Pipeline, source: Artifact,
                     profile: Target, thresholds: ParityThresholds, inputs: Inputs, expected: "Expected", folder: Path):
    """Run recovery on an artifact that failed parity; ship the recovered one in its place when
    an attempt passes. Returns the (new or kept) report, artifact, stage records and outcome."""
    runtime = chain.spec.runtime
    trial = make_trial(pipeline, chain, source, profile, thresholds, inputs, expected)
    log.info("recovering %s: %s", chain.name, "; ".join(checked.parity.failures)[:200])
    outcome = recover(chain.stages, checked.parity, trial, lambda stage: quantizable_layers(pipeline, chain, source, stage),
                      profile.recovery, lambda stage, fix: stage.applies(fix, stage_input(pipeline, chain, source), pipeline.ctx))
    sensitivity = write_sensitivity(folder, chain.name, outcome, checked.parity)
    if outcome.stages is None:
        line = summary_line(chain.name, outcome, checked.parity, checked.latency_ms, None)
        log.warning(line)
        return checked, shipped, records, Recovered(outcome, line, checked.parity, sensitivity)
    artifact, new_records = pipeline.run(Plan(chain.name, chain.spec, outcome.stages), source)
    if outcome.final.float_layers:
        artifact = dataclasses.replace(artifact, precision="mixed")
    for f in shipped.files():
        f.unlink()
    shipped = ship(artifact, runtime, chain.name, folder)
    report = check_artifact(chain.name, shipped, runtime, profile, thresholds, inputs, expected, folder)
    report = dataclasses.replace(report, float_layers=outcome.final.float_layers)
    line = summary_line(chain.name, outcome, checked.parity, checked.latency_ms, report.latency_ms)
    log.info(line)
    return report, shipped, new_records, Recovered(outcome, line, checked.parity, sensitivity)


def make_trial(pipeline: Pipeline, chain: Plan, source: Artifact, profile: Target, thresholds: ParityThresholds | None,
               inputs: Inputs, expected: "Expected"):
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
            raise StageError(f"{chain.spec.runtime} could not run it: {type(e).__name__}: {reason(e)}") from None
        parity = compare(expected.outputs, outputs, inputs.validation.y, thresholds and thresholds.for_precision(artifact.precision),
                         expected.roles, expected.metric, inputs.validation.labels)
        return parity, round(latency, 4), artifact.size_bytes()

    return trial


def quantizable_layers(pipeline: Pipeline, chain: Plan, source: Artifact, stage) -> list[str]:
    """What ``stage`` (the chain's quantization stage, or a variant of it) can keep in float."""
    return stage.layers(stage_input(pipeline, chain, source), pipeline.ctx)


def stage_input(pipeline: Pipeline, chain: Plan, source: Artifact) -> Artifact:
    """What the chain's quantization stage takes (the stages before it run once: the pipeline caches them)."""
    index = recoverable_stage(chain.stages)
    return pipeline.run(Plan(chain.name, chain.spec, chain.stages[:index]), source)[0] if index else source


def user_metric(profile: Target, spec: str | None, max_drop: float | None):
    """(FILE.py:function, its function, max drop) from the flags or the profile, loaded now so a bad
    metric fails before the model loads; None without one."""
    from .metric import load_metric

    spec_from_profile = spec is None
    spec = spec or profile.parity.metric
    if not spec:
        return None
    fn = load_metric(spec, Path(profile.source).parent if spec_from_profile else None)
    return spec, fn, profile.parity.max_metric_drop if max_drop is None else max_drop


def expected_outputs(loaded: LoadedModel, inputs: Inputs, profile: Target, declared: Mapping[str, str],
                     names: list[str] | None = None, scorer=None) -> "Expected":
    """The FP32 model's outputs on the validation inputs, with their roles, checked finite, and
    FP32's score on the user's metric when there is one."""
    names = names or check_model_accepts(loaded, inputs.signature)
    reference = reference_runner(loaded.artifact, profile.runtime.threads)
    log.info("running FP32 reference on %d validation inputs", len(inputs.validation.x))
    ref_out = run_batched(reference, inputs.validation.x, profile.parity.batch_size)
    roles = resolve_roles(ref_out, names, declared)
    check_reference(ref_out, roles)
    metric = None
    if scorer is not None:
        from .metric import Metric, score

        spec, fn, max_drop = scorer
        value, higher = score(fn, spec, ref_out, names, inputs.validation.labels)
        metric = Metric(spec, fn, value, higher, max_drop, profile.parity.metric_drop == "relative")
        log.info("metric %s: FP32 scores %.6g", spec, value)
    return Expected(ref_out, roles, accuracy_of(ref_out, inputs.validation.y, roles), metric)


def parity_subset(inputs: Inputs, expected: "Expected", n: int) -> tuple[Inputs, "Expected"]:
    """``n`` validation inputs (:meth:`Dataset.spread`) and FP32's outputs, accuracy and metric score
    on just those; all of them when ``n`` is 0 or at least their number."""
    if not n or n >= len(inputs.validation.x):
        return inputs, expected
    validation, idx = inputs.validation.spread(n)
    outputs = [o[idx] for o in expected.outputs]
    metric = expected.metric
    if metric is not None:
        from .metric import score

        value, _ = score(metric.fn, metric.name, outputs, [r.name for r in expected.roles], validation.labels)
        metric = dataclasses.replace(metric, fp32=value)
    return (dataclasses.replace(inputs, validation=validation),
            Expected(outputs, expected.roles, accuracy_of(outputs, validation.y, expected.roles), metric))


@dataclasses.dataclass(frozen=True)
class Expected:
    """What every artifact is compared with: FP32's outputs on the validation inputs, their roles, FP32's accuracy."""

    outputs: list
    roles: tuple[OutputRole, ...]
    accuracy: float | None
    metric: object = None  # toolchain.metric.Metric with FP32's score, when the user gives one


def _reasons(skipped: list[Skipped]) -> str:
    return "; ".join(f"{s.name}: {s.reason}" for s in skipped)


def check_data_paths(calib, val) -> None:
    for role, path in (("calibration", calib), ("validation", val)):
        if path is not None and not Path(path).exists():
            raise DataError(f"{role} data `{path}` does not exist")


def prepare_inputs(loaded: LoadedModel, profile: Target, calib, val, input_shape) -> Inputs:
    """Calibration and validation data, disjoint unless the user's files overlap (then counted and said)."""
    warnings = []
    n_cal, n_val = profile.data.calibration_samples, profile.data.validation_samples
    pre = profile.data.preprocess
    several = _feed_names(loaded, input_shape)  # names of several (or non-float) inputs: data as one array per name
    fixed = tuple(c.name for c in loaded.constants)  # the data's 0-d arrays of constants are not labels
    calibration = load_dataset(Path(calib), "calibration", pre, n_cal, inputs=several, constants=fixed) if calib else None
    validation = load_dataset(Path(val), "validation", pre, n_val, inputs=several, constants=fixed) if val else None
    signature = _resolve_signature(loaded, input_shape, calibration or validation, several)
    integers = profile.data.integer_range

    def synthetic(seed: int) -> Dataset:
        if signature.plain:
            return synthetic_dataset(signature.inputs[0].shape, profile.data.synthetic_samples, seed=seed)
        return Dataset(signature.synthetic(profile.data.synthetic_samples, seed, integers), None, "synthetic")

    if calibration is None:
        ints = f"; integer inputs uniform in [{integers[0]}, {integers[1]})" if any(s.integer for s in signature.inputs) else ""
        warnings.append(f"no --calib data: calibrating on {profile.data.synthetic_samples} synthetic (random normal{ints}) "
                        f"inputs; INT8 ranges will not match real data")
        calibration = synthetic(0)
    calibration = check_signature(calibration, signature, "calibration")
    if validation is None:
        if calibration.synthetic:
            warnings.append("no --val data: parity is measured on synthetic inputs and says little about accuracy")
            validation = synthetic(1)
        elif len(calibration.x) > 1:
            calibration, validation = calibration.hold_out(max(1, min(n_val, len(calibration.x) // 4)), seed=0)
            warnings.append(f"no --val data: parity runs on {len(validation.x)} samples held out from --calib, which "
                            f"calibrates on the other {len(calibration.x)}; give --val for a held-out set of your own")
        else:
            warnings.append("no --val data and one calibration sample: parity runs on the calibration input itself")
            validation = calibration
    validation = check_signature(validation, signature, "validation")
    overlap = 0 if validation is calibration else calibration.overlap(validation)
    if overlap:
        warnings.append(f"{overlap} of the {len(validation.x)} validation samples are also calibration samples: "
                        f"parity on them flatters INT8; use disjoint --calib and --val")
    cpu = isa_facts(profile.runtime.isa)
    if cpu["proxy"] and cpu["target_isa"]:  # device targets say so in their own reports; an x86 mismatch is a surprise
        warnings.append(f"parity measured here is a proxy: {cpu['proxy_reason']}")
    if loaded.random_weights:
        warnings.append(f"{loaded.source} has random weights: parity is measured but not judged (says nothing about accuracy)")
    for w in warnings:
        log.warning(w)
    return Inputs(signature.first_shape, calibration, validation, tuple(warnings), overlap, signature)


def fix_constants(loaded: LoadedModel, constants, calib, val, inputs: tuple[str, ...] = ()) -> LoadedModel:
    """The values of the model's non-tensor arguments for this build (constants.py): ``constants``
    ({name: value}, "NAME=VALUE,..." or a sequence of those), else the data's, else the defaults.
    An optional tensor argument the data gives (or ``inputs`` names: a build's recorded inputs)
    becomes an input."""
    given = dict(constants) if isinstance(constants, Mapping) else parse_constants(constants)
    if not loaded.constants:
        if given:
            raise DataError(f"--constant {', '.join(given)}: `{loaded.source}` has no non-tensor forward argument to fix")
        return loaded
    files = [Path(p) for p in (calib, val) if p]
    fed = set(fed_from_data(loaded.constants, files)) | {c.name for c in loaded.constants if c.type == "Tensor?" and c.name in inputs}
    if fed:
        tensors = set(loaded.input_names or ()) | set(fed)
        loaded = dataclasses.replace(loaded, input_names=tuple(n for n in loaded.arguments if n in tensors),
                                     constants=tuple(c for c in loaded.constants if c.name not in fed))
    return dataclasses.replace(loaded, bound=resolve_constants(loaded.constants, given, files))


def bind_constants(loaded: LoadedModel, example: Batch) -> LoadedModel:
    """The model with its constants fixed: every stage then sees its tensor inputs alone (a
    TorchScript model stays TorchScript; an eager or exported one becomes a torch.export program)."""
    if loaded.arguments is None:  # no argument to fix (an optional tensor the data gives is wrapped too: it folds its branch)
        return loaded
    for b in loaded.bound:
        log.info("%s = %s in every artifact (%s)", b.name, b.value, {"default": "its default", "export": "as exported"}.get(b.source, f"from {b.source}"))
    model = bind(as_module(loaded.artifact), loaded.arguments, loaded.input_names or (), loaded.bound, torch_args(example[:2]),
                 loaded.dynamic_batch is not False)
    kind = Kind.TORCHSCRIPT if loaded.artifact.kind is Kind.TORCHSCRIPT else Kind.EXPORTED
    return dataclasses.replace(loaded, artifact=dataclasses.replace(loaded.artifact, kind=kind, model=model))


def _feed_names(loaded: LoadedModel, given) -> tuple[str, ...] | None:
    """The model's input names when its data comes as one array per input (several inputs, or a non-float one)."""
    if loaded.signature is not None:
        return None if loaded.signature.plain else loaded.signature.names
    if isinstance(given, str) and "=" in given:
        return tuple(name for name, _, _ in parse_input_shapes(given))
    names = loaded.input_names
    return names if names and len(names) > 1 else None


def parse_input_shapes(text: str) -> list[tuple[str, tuple[int, ...], str | None]]:
    """`ids=1x16:int64,mask=1x16:int64` -> [(name, batch-1 shape, dtype or None)]; `len=:int64`: a scalar."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, rest = item.partition("=")
        shape, _, dtype = rest.partition(":")
        if not sep or not name.strip():
            raise DataError(f"--input-shape `{item}` must be NAME=SHAPE[:DTYPE] (e.g. ids=1x16:int64)")
        if dtype:
            try:
                dtype = str(np.dtype(dtype.strip()))
            except TypeError:
                raise DataError(f"--input-shape `{item}`: `{dtype}` is not a dtype (float32, int64, int32, bool, ...)") from None
        out.append((name.strip(), parse_shape(shape) if shape.strip() else (), dtype or None))
    return out


def _resolve_signature(loaded: LoadedModel, given, data: Dataset | None, several) -> Signature:
    """Every input's name, shape and dtype: from the model file (.pt2), else --input-shape, else the data."""
    if several is None:  # one float input, as before
        shape = _resolve_shape(loaded, given, data)
        name = (loaded.signature or Signature((InputSpec("input", ()),))).inputs[0].name
        dynamic = loaded.signature.inputs[0].dynamic if loaded.signature else ()
        return Signature((InputSpec(name, tuple(shape[1:]), dynamic=dynamic),))
    if given and not (isinstance(given, str) and "=" in given) and not isinstance(given, tuple):
        known = loaded.signature.inputs if loaded.signature is not None else ()
        example = ",".join(f"{s.name}={'x'.join(map(str, s.batch1()))}:{s.dtype}" for s in known) or ",".join(f"{n}=SHAPE:DTYPE" for n in several)
        raise DataError(f"--input-shape {given}: the model takes several inputs ({', '.join(several)}); give each by name, "
                        f"e.g. --input-shape {example}")
    if loaded.signature is not None and not (isinstance(given, str) and "=" in given):
        return loaded.signature
    if isinstance(given, str) and "=" in given:
        told = {name: (shape, dtype) for name, shape, dtype in parse_input_shapes(given)}
        known = dict(zip(several, data.x.arrays)) if data is not None else {}
        unknown = sorted(set(told) - set(several))
        if unknown:
            raise DataError(f"--input-shape names {', '.join(unknown)}, but the model's inputs are {', '.join(several)}")
        specs = []
        for name in several:
            if name not in told and name not in known:
                raise DataError(f"--input-shape does not give input `{name}` (the model takes {', '.join(several)})")
            shape, dtype = told.get(name, (None, None))
            a = known.get(name)
            dtype = dtype or (str(a.dtype) if a is not None else "float32")
            scalar = shape == () if shape is not None else a.ndim == 0
            sample = (shape[1:] if not scalar else ()) if shape is not None else (a.shape if scalar else a.shape[1:])
            specs.append(InputSpec(name, tuple(sample), dtype, scalar=scalar))
        return Signature(tuple(specs))
    if data is None:
        raise DataError(f"cannot tell the shapes of `{loaded.source}`'s inputs ({', '.join(several)}); pass --calib data "
                        f"(an .npz with one array per input) or --input-shape NAME=SHAPE[:DTYPE],...")
    return Signature(tuple(InputSpec(n, () if a.ndim == 0 else tuple(a.shape[1:]), str(a.dtype), scalar=a.ndim == 0)
                           for n, a in zip(several, data.x.arrays)))


def _resolve_shape(loaded: LoadedModel, given, data: Dataset | None) -> tuple[int, ...]:
    if given:
        shape = parse_shape(given) if isinstance(given, str) else tuple(given)
        known = loaded.input_shape or (None if data is None else (1, *data.x.shape[1:]))
        if known and len(shape) != len(known):
            raise DataError(f"--input-shape {'x'.join(map(str, shape))} has {len(shape)} dimensions, but the "
                            f"{'model' if loaded.input_shape else 'data'} has {len(known)} ({'x'.join(map(str, known))}): "
                            f"give the batch dimension first, e.g. 1x{'x'.join(map(str, known[1:]))}")
        return (1, *shape[1:])
    if loaded.input_shape:
        return loaded.input_shape
    if data is not None:
        return (1, *data.x.shape[1:])
    raise DataError(f"cannot tell the input shape of `{loaded.source}`; pass --input-shape (e.g. 1x3x224x224) or --calib data")


def check_model_accepts(loaded: LoadedModel, signature: Signature) -> list[str]:
    """Run the FP32 model once on zeros of every input before anything else does; returns its output names."""
    import torch

    try:
        with torch.inference_mode():
            if signature.plain:
                out = as_module(loaded.artifact)(torch.zeros(signature.first_shape))
            else:
                out = as_module(loaded.artifact)(*torch_args(signature.synthetic(1, integer_range=(0, 1))))
    except Exception as e:
        what = ", ".join(f"{s.name} {'x'.join(map(str, s.batch1())) or 'scalar'} {s.dtype}" for s in signature.inputs)
        shown = "x".join(map(str, signature.first_shape)) if signature.plain else what
        raise DataError(f"the model rejects {'an input of shape' if signature.plain else 'inputs'} {shown}: {reason(e)}") from None
    return output_names(out)


def ship(artifact: Artifact, runtime: str, name: str, folder: Path) -> Artifact:
    """Copy the artifact's files into the build folder under the artifact's name."""
    dest = folder / f"{name}{runtimes.get(runtime).suffix}"
    if artifact.has_external_data:  # ONNX external data: the model names its data file, so re-save under the new name
        import onnx

        from .stages.export_onnx import save_onnx

        save_onnx(onnx.load(str(artifact.path)), dest, external=True)
    else:
        shutil.copyfile(artifact.path, dest)
    return dataclasses.replace(artifact, path=dest, model=None)


def parser_refuses(profile: Target, artifact: Artifact) -> str | None:
    """NVIDIA targets: why the device's TensorRT could not parse an ONNX artifact (host parity
    says nothing about that), or None."""
    opts = profile.tensorrt
    if opts is None or artifact.kind is not Kind.ONNX:
        return None
    import onnx

    from .tensorrt.operators import describe, parser_gaps

    gaps = parser_gaps(onnx.load(str(artifact.path), load_external_data=False), opts.version)
    if not gaps:
        return None
    return describe(gaps, opts.version) + (" (add `decompose_onnx` to the chain)" if "LayerNormalization" in gaps else "")


def plan_engine(profile: Target, reports: list[ArtifactReport], folder: Path, signature: Signature) -> dict | None:
    """NVIDIA targets: the calibration cache and engine plan; the engine itself is built on the device."""
    opts = profile.tensorrt
    if opts is None:
        return None
    from .tensorrt.plan import write_plan

    missing = {opts.engine_from, opts.calibration_from, opts.fp32_onnx} - {r.name for r in reports}
    if missing:
        return {"status": "not planned", "verified": False, "reason": f"artifacts not built: {', '.join(sorted(missing))}"}
    float_layers = next(r.float_layers for r in reports if r.name == opts.engine_from)
    calibration = next(r for r in reports if r.name == opts.calibration_from)
    rescaled = sorted({k for facts in calibration.stage_facts.values() for k in ("equalization", "smoothing") if facts.get(k)})
    if opts.dla_core >= 0 and rescaled:  # DLA calibrates onnx_fp32 with the Q/DQ model's activation scales
        return {"status": "not planned", "verified": False,
                "reason": f"recovery rescaled {opts.calibration_from}'s weights ({' and '.join(rescaled)}: the same function, other "
                          f"activation ranges), so its activation scales do not fit {opts.fp32_onnx}, which a DLA build calibrates; "
                          f"build on the GPU (tensorrt.dla_core = -1) from the Q/DQ model"}
    engine = write_plan(folder, opts, signature, float_layers)
    log.info("TensorRT engine: %s (%s)", engine["status"], engine["reason"])
    return engine


def applied_thresholds(loaded: LoadedModel, profile: Target) -> ParityThresholds | None:
    """The profile's thresholds, or None for random weights: measured, not judged.

    The thresholds are set for trained models. A random-weight model's logits are near
    ties (arg-max flips on noise) and its activation ranges are not a trained model's, so
    a pass or a fail would both be noise. Its build shows that every stage handles the
    architecture; the metrics are reported, the verdict is left out.
    """
    return None if loaded.random_weights else profile.parity


def check_artifact(name, artifact: Artifact, runtime: str, profile: Target, thresholds: ParityThresholds | None,
                   inputs: Inputs, expected: Expected, folder: Path) -> ArtifactReport:
    """Load the shipped file in its own runtime, compare with FP32 and time it."""
    log.info("checking %s in %s", name, runtime)
    runner = None

    def load():  # timed by the bench, so its memory counts; the parity run reuses it
        nonlocal runner
        runner = load_runner(artifact, runtime, profile.runtime.threads)
        return runner

    log.info("timing %s (batch sizes %s)", name, ", ".join(map(str, sorted({1, *profile.runtime.batch_sizes}))))
    timed = run_bench(load, profile, inputs.signature)
    log.info("comparing %s with FP32 on %d inputs", name, len(inputs.validation.x))
    outputs = run_batched(runner, inputs.validation.x, profile.parity.batch_size)
    parity = compare(expected.outputs, outputs, inputs.validation.y, thresholds and thresholds.for_precision(artifact.precision),
                     expected.roles, expected.metric, inputs.validation.labels)
    r = profile.runtime
    log.info("profiling %s's operators", name)
    profiler = runtimes.get(runtime).profile  # None: the runtime has no operator profiler
    measured = profiler and _profiled(name, lambda: profiler(artifact, inputs.validation.x[:1], r.profile_runs, r.threads))
    note = measured and busy_cores(timed.batch1.p50_ms, measured.total_ms)
    if note:
        log.warning("%s: %s", name, note)
    return ArtifactReport(
        latency_warning=note or None,
        name=name, path=artifact.path.name, format=runtimes.get(runtime).format, runtime=runtime,
        precision=artifact.precision, quantized_engine=artifact.quantized_engine, size_bytes=artifact.size_bytes(),
        sha256=artifact.sha256, bench=timed, parity=parity, profile=measured and write_profile(measured, folder, name),
    )


def _profiled(name: str, run):
    """A profiler that fails says so and costs the artifact its profile, not its place in the build."""
    try:
        return run()
    except Exception as e:  # profilers are diagnostics: their failure must not hide a checked artifact
        log.warning("no per-operator profile for %s: %s", name, reason(e, limit=200))
        return None


def run_bench(load, profile: Target, signature: Signature):
    r = profile.runtime
    return bench(load, signature, r.batch_sizes, r.warmup_runs, r.latency_runs, r.threads, r.latency_budget_ms,
                 r.sweep_runs)


def model_facts(loaded: LoadedModel, inputs: Inputs, roles: tuple[OutputRole, ...]) -> dict:
    return {
        "source": loaded.source, "name": loaded.name, "kind": str(loaded.artifact.kind),
        "weights": loaded.weights, "input_shape": list(inputs.shape), "inputs": inputs.signature.to_json(),
        "constants": [b.to_json() for b in loaded.bound],
        "dynamic_batch": loaded.dynamic_batch,
        "sha256": loaded.artifact.sha256,
        "outputs": [{"index": r.index, "name": r.name, "role": r.role, "role_inferred": r.inferred} for r in roles],
    }


def reference_facts(loaded: LoadedModel, reference, inputs: Inputs, profile: Target, accuracy, folder: Path) -> dict:
    """The FP32 model in eager PyTorch: what every artifact is compared with, timed and profiled the same way."""
    r = profile.runtime
    log.info("timing and profiling the FP32 reference")
    timed = run_bench(lambda: reference, profile, inputs.signature)
    module = as_module(loaded.artifact)
    measured = _profiled("fp32_reference", lambda: profile_torch(module, inputs.validation.x[:1], r.profile_runs, r.threads))
    path = Path(loaded.source)
    size = path.stat().st_size if path.is_file() else _state_bytes(loaded.artifact)
    b1 = timed.batch1
    return {"format": str(loaded.artifact.kind), "precision": "fp32", "size_bytes": size,
            "latency_ms": b1.p50_ms, "latency_p95_ms": b1.p95_ms, "latency_p99_ms": b1.p99_ms, "accuracy": accuracy,
            "bench": timed.to_json(), "profile": measured and write_profile(measured, folder, "fp32_reference")}


def _state_bytes(artifact: Artifact) -> int:
    return sum(t.numel() * t.element_size() for t in artifact.model.state_dict().values())


def data_facts(inputs: Inputs) -> dict:
    def one(d: Dataset) -> dict:
        return {"origin": d.origin, "samples": len(d.x), "synthetic": d.synthetic, "labels": d.y is not None,
                "held_out": d.held_out, "label_arrays": sorted(d.labels)}

    same = inputs.validation is inputs.calibration
    return {"calibration": one(inputs.calibration), "validation": one(inputs.validation),
            "overlap_samples": len(inputs.validation.x) if same else inputs.overlap}
