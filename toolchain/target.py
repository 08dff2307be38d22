"""Target profiles: per-hardware TOML files in `targets/` mapped onto typed options.

A profile names the artifacts to build, each as a chain of registered stages, and gives
options per stage under `[stages.<name>]`, data and runtime settings, and the parity
thresholds every artifact must meet against the FP32 model.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from toolchain import runtimes
from toolchain.core.artifact import Kind
from toolchain.core.errors import ConfigError
from toolchain.core.options import option, parse_options
from toolchain.core.pipeline import ArtifactSpec, Plan, Skipped, check_chain
from toolchain.core.stage import STAGES, Stage
from toolchain.inputs.data import DataOptions
from toolchain.tensorrt.plan import TensorRTOptions


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    threads: int = option(2, "intra-op threads for every runtime, latency included")
    layout: Literal["NCHW", "NHWC"] = option("NCHW", "input memory layout the artifacts expect")
    isa: Literal["avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"] | None = option(
        None, "x86 instruction set of the deployment CPU (INT8 settings follow it; unset for non-x86 targets)"
    )
    batch_sizes: tuple[int, ...] = option(
        (1,), "batch sizes the deployment runs: throughput is measured at each"
    )
    warmup_runs: int = option(5, "runs discarded before timing, at each batch size")
    race_within: float = option(
        1.5,
        "passing artifacts whose build latency is within this factor of the fastest's are timed again "
        "alternating to choose the primary (toolchain.primary); 1: never",
    )
    latency_runs: int = option(30, "timed runs at batch 1; p50 / p95 / p99 are reported")
    race_runs: int = option(
        100,
        "timed runs of each artifact in the primary race (turns of 5): with 100 each, a steady 5 % edge "
        "is measurable; with 30 it was not always",
    )
    race_threads: tuple[int, ...] = option(
        (),
        "fewer intra-op threads the primary is also timed at, in turn with `threads` (ONNX Runtime, "
        "OpenVINO and TorchScript artifacts): it ships with the fastest count, fewer threads when tied. "
        "A sub-millisecond model can run faster on one thread than on two (the tests' ViT and LSTM: "
        "17-34 % less time in ONNX Runtime here); [] times `threads` only",
    )
    sweep_runs: int = option(10, "timed runs at each batch size above 1 (after at most 2 warm-up runs)")
    latency_budget_ms: float | None = option(
        None, "largest p95 latency a batch may take; the best batch size is chosen under it"
    )
    profile_runs: int = option(10, "runs recorded by each per-operator profiler (batch 1)")


@dataclasses.dataclass(frozen=True)
class ParityThresholds:
    min_sqnr_db: float = option(20.0, "signal-to-quantization-noise ratio of the outputs against FP32, in dB")
    min_cosine: float = option(0.99, "mean per-sample cosine similarity with FP32 outputs")
    min_top1_agreement: float = option(0.99, "share of samples whose arg-max equals FP32's (classifiers)")
    max_accuracy_drop: float = option(
        0.01, "largest accuracy loss against FP32 when labels are given (absolute)"
    )
    max_probability_error: float = option(
        0.05, "largest absolute error of an output whose role is probabilities"
    )
    batch_size: int = option(32, "batch size for running the validation inputs")
    metric: str | None = option(
        None,
        "FILE.py:function scoring outputs against the --val labels; when set, it decides the "
        "verdict with the sanity checks (path relative to the profile)",
    )
    max_metric_drop: float = option(0.01, "largest loss of the metric against FP32")
    metric_drop: Literal["absolute", "relative"] = option(
        "absolute", "max_metric_drop in the metric's units, or a fraction of FP32's score"
    )
    outputs: dict[str, Any] = option(
        None, "output index or name -> its role (`[parity.outputs.<key>] role = ...`); others are inferred"
    )
    precisions: dict[str, Any] = option(
        None,
        "precision (fp16, bf16, int8) -> thresholds replacing these for its artifacts "
        "(`[parity.precisions.fp16] min_sqnr_db = 40`)",
    )

    def for_precision(self, precision: str) -> "ParityThresholds":
        """The thresholds an artifact of ``precision`` is judged by (recovery's "mixed" INT8 artifact
        and the 4-bit-weight ones by int8's: 4-bit weights are judged as INT8 is)."""
        key = "int8" if precision in ("mixed", "int4") else precision
        return dataclasses.replace(self, **(self.precisions or {}).get(key, {}))


@dataclasses.dataclass(frozen=True)
class PrecisionThresholds:
    min_sqnr_db: float | None = option(None, "replaces parity.min_sqnr_db")
    min_cosine: float | None = option(None, "replaces parity.min_cosine")
    min_top1_agreement: float | None = option(None, "replaces parity.min_top1_agreement")
    max_accuracy_drop: float | None = option(None, "replaces parity.max_accuracy_drop")
    max_probability_error: float | None = option(None, "replaces parity.max_probability_error")
    max_metric_drop: float | None = option(None, "replaces parity.max_metric_drop")


PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    role: Literal["classification", "probabilities", "regression", "embedding"] = dataclasses.field(
        metadata={"help": "which metrics judge this output (see the README's Parity section)"}
    )


@dataclasses.dataclass(frozen=True)
class RecoveryOptions:
    enabled: bool = option(True, "try to bring an INT8 artifact that misses parity within the thresholds")
    calibrations: bool = option(True, "first try the backend's other calibration methods")
    fixes: bool = option(
        True,
        "then the stage's fixes: cross-layer equalization, SmoothQuant migration, bias correction, "
        "16-bit activations (HTP)",
    )
    max_float_layers: int = option(8, "most layers kept in floating point (one layer always stays INT8)")
    max_seconds: float = option(600.0, "time budget per artifact, sensitivity included")


@dataclasses.dataclass(frozen=True)
class _ProfileFile:
    name: str = option("", "target name")
    description: str = option("", "what hardware this target is for")
    data: DataOptions = option(DataOptions(), "calibration and validation data")
    runtime: RuntimeOptions = option(RuntimeOptions(), "how artifacts are run and timed")
    parity: ParityThresholds = option(ParityThresholds(), "pass/fail thresholds against FP32")
    artifacts: dict[str, Any] = option(None, "artifact name -> ArtifactSpec")
    stages: dict[str, Any] = option(None, "stage name -> that stage's options")
    tensorrt: TensorRTOptions | None = option(
        None, "TensorRT engine plan and calibration cache (NVIDIA targets)"
    )
    recovery: RecoveryOptions = option(RecoveryOptions(), "what to try when an INT8 artifact misses parity")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    source: str
    data: DataOptions
    runtime: RuntimeOptions
    parity: ParityThresholds
    artifacts: Mapping[str, ArtifactSpec]
    stage_options: Mapping[str, Any]
    tensorrt: TensorRTOptions | None = None
    recovery: RecoveryOptions = RecoveryOptions()

    def stage(self, name: str):
        """An instance of stage ``name`` with this target's options for it."""
        return STAGES.get(name)(self.stage_options.get(name))


def target_toml(t: Target) -> str:
    """The profile as TOML with every setting that applies, defaults filled in (unset options
    are left out: TOML has no null; they mean "follow another setting", as each option's help says)."""
    import tomli_w

    stages = dict.fromkeys(s for spec in t.artifacts.values() for s in spec.stages)
    table = {
        "name": t.name,
        "description": t.description,
        "data": dataclasses.asdict(t.data),
        "runtime": dataclasses.asdict(t.runtime),
        "parity": {
            **dataclasses.asdict(t.parity),
            "outputs": {k: {"role": v} for k, v in (t.parity.outputs or {}).items()} or None,
            "precisions": t.parity.precisions or None,
        },
        "recovery": dataclasses.asdict(t.recovery),
        "artifacts": {n: dataclasses.asdict(a) for n, a in t.artifacts.items()},
        "stages": {n: dataclasses.asdict(t.stage(n).options) for n in stages},
    }
    if t.tensorrt is not None:
        table["tensorrt"] = dataclasses.asdict(t.tensorrt)
    return tomli_w.dumps(_without_none(table))


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(v) for v in value]
    return value


def targets_dirs() -> list[Path]:
    dirs = [Path(os.environ["TOOLCHAIN_TARGETS"])] if os.environ.get("TOOLCHAIN_TARGETS") else []
    dirs += [
        Path(__file__).resolve().parent.parent / "targets",
        Path(sys.prefix) / "share" / "toolchain" / "targets",
    ]
    return [d for d in dirs if d.is_dir()]


def builtin_targets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(targets_dirs()):
        found.update({p.stem: p for p in d.glob("*.toml")})
    return dict(sorted(found.items()))


def load_target(name_or_path: str) -> Target:
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"target profile `{name_or_path}` does not exist")
    else:
        known = builtin_targets()
        if name_or_path not in known:
            raise ConfigError(f"unknown target `{name_or_path}`; valid: {', '.join(known) or '(none found)'}")
        path = known[name_or_path]
    return parse_target(path)


def parse_target(path: Path) -> Target:
    from toolchain import stages  # noqa: F401  (registers the stages)

    source = str(path)
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    raw = parse_options(_ProfileFile, table, "", source)
    if not raw.artifacts:
        raise ConfigError(f"{source}: `artifacts` must name at least one artifact")
    artifacts = {n: _artifact(n, t, source) for n, t in raw.artifacts.items()}
    stage_options = {n: _stage_options(n, t, source) for n, t in (raw.stages or {}).items()}
    _check_positive(raw, source)
    parity = dataclasses.replace(
        raw.parity,
        outputs=_output_roles(raw.parity.outputs or {}, source),
        precisions=_precision_thresholds(raw.parity.precisions or {}, source),
    )
    _check_tensorrt(raw.tensorrt, artifacts, source)
    return Target(
        name=raw.name or path.stem,
        description=raw.description,
        source=source,
        data=raw.data,
        runtime=raw.runtime,
        parity=parity,
        artifacts=artifacts,
        stage_options=stage_options,
        tensorrt=raw.tensorrt,
        recovery=raw.recovery,
    )


def _precision_thresholds(table: dict, source: str) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in table.items():
        if name not in PRECISIONS:
            raise ConfigError(
                f"{source}: `parity.precisions.{name}` is not a precision; valid: {', '.join(PRECISIONS)}"
            )
        parsed = parse_options(PrecisionThresholds, values, f"parity.precisions.{name}", source)
        out[name] = {k: v for k, v in dataclasses.asdict(parsed).items() if v is not None}
    return out


def _output_roles(table: dict[str, Any], source: str) -> dict[str, str]:
    return {
        str(k): parse_options(OutputOptions, v, f"parity.outputs.{k}", source).role for k, v in table.items()
    }


def _check_tensorrt(opts: TensorRTOptions | None, artifacts: Mapping[str, ArtifactSpec], source: str) -> None:
    if opts is None:
        return
    if not re.fullmatch(r"\d+\.\d+(\.\d+){0,2}", opts.version):
        raise ConfigError(
            f"{source}: `tensorrt.version` = {opts.version!r} must be a version number like 8.5.2"
        )
    for key in ("engine_from", "calibration_from", "fp32_onnx"):
        name = getattr(opts, key)
        if artifacts.get(name) is None or runtimes.get(artifacts[name].runtime).kind is not Kind.ONNX:
            onnx_names = [n for n, a in artifacts.items() if runtimes.get(a.runtime).kind is Kind.ONNX]
            raise ConfigError(
                f"{source}: `tensorrt.{key}` = {name!r} must name an ONNX artifact; valid: "
                f"{', '.join(onnx_names)}"
            )


def _artifact(name: str, table: Any, source: str) -> ArtifactSpec:
    spec = parse_options(ArtifactSpec, table, f"artifacts.{name}", source)
    if not spec.stages:
        raise ConfigError(f"{source}: `artifacts.{name}.stages` must list at least one stage")
    for i, stage in enumerate(spec.stages):
        if stage not in STAGES:
            raise ConfigError(
                f"{source}: `artifacts.{name}.stages[{i}]` = {stage!r} is not a stage; "
                f"valid: {', '.join(STAGES)}"
            )
    hosted = [n for n in runtimes.names() if runtimes.get(n).where == "host"]
    if spec.runtime not in hosted:
        raise ConfigError(
            f"{source}: `artifacts.{name}.runtime` must be one of {', '.join(hosted)} (got {spec.runtime!r})"
        )
    if spec.parity_samples < 0:
        raise ConfigError(
            f"{source}: `artifacts.{name}.parity_samples` must be 0 (all) or more (got {spec.parity_samples})"
        )
    return spec


def _stage_options(name: str, table: Any, source: str) -> Any:
    if name not in STAGES:
        raise ConfigError(f"{source}: `stages.{name}` is not a stage; valid: {', '.join(STAGES)}")
    cls = STAGES.get(name)
    options = parse_options(cls.Options, table, f"stages.{name}", source)
    cls.check_options(options, f"stages.{name}", source)
    return options


def _check_positive(raw: _ProfileFile, source: str) -> None:
    checks = {
        "data.calibration_samples": raw.data.calibration_samples,
        "data.validation_samples": raw.data.validation_samples,
        "data.synthetic_samples": raw.data.synthetic_samples,
        "runtime.threads": raw.runtime.threads,
        "runtime.latency_runs": raw.runtime.latency_runs,
        "runtime.race_runs": raw.runtime.race_runs,
        "runtime.profile_runs": raw.runtime.profile_runs,
        "runtime.sweep_runs": raw.runtime.sweep_runs,
        "parity.batch_size": raw.parity.batch_size,
    }
    checks.update({f"runtime.batch_sizes[{i}]": b for i, b in enumerate(raw.runtime.batch_sizes)})
    low_high = raw.data.integer_range
    if len(low_high) != 2 or low_high[0] >= low_high[1]:
        raise ConfigError(
            f"{source}: `data.integer_range` must be [low, high] with low < high (got {list(low_high)})"
        )
    if raw.runtime.latency_budget_ms is not None and raw.runtime.latency_budget_ms <= 0:
        raise ConfigError(
            f"{source}: `runtime.latency_budget_ms` must be positive (got {raw.runtime.latency_budget_ms})"
        )
    for key, value in checks.items():
        if value < 1:
            raise ConfigError(f"{source}: `{key}` must be at least 1 (got {value})")
    if any(not 1 <= t <= raw.runtime.threads for t in raw.runtime.race_threads):
        raise ConfigError(
            f"{source}: `runtime.race_threads` must be thread counts from 1 to `runtime.threads` "
            f"({raw.runtime.threads}) (got {list(raw.runtime.race_threads)})"
        )


def plan(target: Target, input_kind: Kind) -> tuple[list[Plan], list[Skipped]]:
    plans, skipped = [], []
    for name, spec in target.artifacts.items():
        stages = tuple(target.stage(s) for s in spec.stages)
        reason = check_chain(
            stages, input_kind, runtimes.get(spec.runtime).kind, spec.runtime
        ) or unavailable(stages, spec.runtime)
        if reason:
            skipped.append(Skipped(name, reason))
        else:
            plans.append(Plan(name, spec, stages))
    return plans, skipped


def unavailable(stages: tuple[Stage, ...], runtime: str) -> str | None:
    """Why this machine cannot make or check the artifact (a library missing), else None."""
    from toolchain.core.libraries import missing

    for stage in stages:
        why = missing(stage.requires)
        if why:
            return f"stage `{stage.name}` is unavailable here: {why}"
    why = missing(runtimes.get(runtime).requires)
    return f"runtime `{runtime}` is unavailable here: {why}" if why else None
