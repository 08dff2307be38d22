"""Stages: one step of a build, with declared input and output kinds and its own options."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, NamedTuple

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.options import options_as_dict
from toolchain.core.registry import Registry

log = logging.getLogger("toolchain")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """This stage has no options."""


class StageResult(NamedTuple):
    artifact: Artifact
    facts: Mapping[str, Any] = {}  # what the stage found or did, for the manifest


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One manifest entry: what ran, on what, with which options, and how long it took."""

    stage: str
    options: Mapping[str, Any]
    input_kind: str
    output_kind: str
    input_sha256: str
    output_sha256: str
    seconds: float
    facts: Mapping[str, Any]


class Stage:
    """Subclasses set ``name``, ``transitions`` (input kind -> output kind) and ``Options``,
    and override :meth:`apply`. :meth:`run` does the bookkeeping."""

    name: ClassVar[str]
    transitions: ClassVar[Mapping[Kind, Kind]]
    Options: ClassVar[type] = NoOptions
    report_facts: ClassVar[tuple[str, ...]] = ()  # facts users need in report.json, not only the manifest
    # libraries (import names) the stage needs: see `toolchain doctor`
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def accepts(cls) -> frozenset[Kind]:
        return frozenset(cls.transitions)

    @classmethod
    def check_options(cls, options: Any, where: str, source: str) -> None:
        """Checks beyond the option types (e.g. names a library must know); raise ConfigError."""

    def run(self, artifact: Artifact, ctx: BuildContext) -> tuple[Artifact, StageRecord]:
        log.info("stage %s: %s", self.name, artifact.kind)
        start = time.perf_counter()
        result = self.apply(artifact, ctx)
        seconds = time.perf_counter() - start
        out = dataclasses.replace(result.artifact, lineage=artifact.lineage + (self.name,))
        expected = self.transitions[artifact.kind]
        if out.kind is not expected:
            raise AssertionError(f"stage {self.name} produced {out.kind}, declared {expected}")
        record = StageRecord(
            stage=self.name,
            options=options_as_dict(self.options),
            input_kind=str(artifact.kind),
            output_kind=str(out.kind),
            input_sha256=artifact.sha256,
            output_sha256=out.sha256,
            seconds=round(seconds, 3),
            facts=dict(result.facts),
        )
        log.debug("stage %s done in %.2f s, options %s: %s", self.name, seconds, record.options, record.facts)
        return out, record

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        raise NotImplementedError

    def output_path(self, artifact: Artifact, ctx: BuildContext, suffix: str) -> Path:
        """A file in the work folder unique to (this stage, its options, its input): variants of
        one stage on one input (recovery's attempts) never overwrite each other."""
        digest = hashlib.sha256(f"{self.name}{self.options!r}{artifact.sha256}".encode()).hexdigest()[:16]
        return ctx.workdir / f"{self.name}-{digest}{suffix}"


class Recoverable:
    """A quantization stage that recovery can re-run with other settings (a mixin beside Stage).

    ``float_layers`` (an option of the stage) names layers kept in floating point;
    :meth:`layers` lists the names it accepts for an input; ``calibrations`` are the
    calibration methods the backend offers (the option ``calibration`` when it has one);
    ``fixes`` names boolean options that recovery turns on, one at a time, before it keeps any
    layer in float (e.g. ``equalize``, ``bias_correction``).
    """

    # what keeping a layer out of the quantization does with it, in recovery's words
    kept_as = "in float"

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        raise NotImplementedError

    def calibrations(self) -> tuple[str, ...]:
        return ()

    def fixes(self) -> tuple[str, ...]:
        return ()

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        """Whether ``fix`` has anything to act on for this input (recovery skips it otherwise: an
        attempt that rebuilds the same artifact costs a build and a check for nothing)."""
        return True

    def calibrates(self, artifact: Artifact, ctx: BuildContext) -> bool:
        """Whether this input's activation ranges come from calibration (False: from a fine-tuned QAT
        model, which no other calibration method may replace)."""
        return True

    def variant(self, **changes) -> "Stage":
        return type(self)(dataclasses.replace(self.options, **changes))


class QuantizationAware:
    """A quantization stage whose quantizer `toolchain qat` can prepare for fine-tuning (a mixin listed
    before Recoverable, whose :meth:`calibrates` it answers): :meth:`prepare_qat` returns the input model
    with this stage's fake-quantization, calibrated once; a build given the fine-tuned state
    (``ctx.qat``) converts it with its learned weights and ranges instead of calibrating.
    :meth:`qat_settings` are what it was prepared with; ``qat_matching`` names those a state must share
    with the stage (None: all of them)."""

    qat_matching: ClassVar[tuple[str, ...] | None] = None
    # the options that rewrite weights or ranges (recovery's fixes): a QAT model learned its own
    qat_rewrites: ClassVar[tuple[str, ...]] = ("float_masks", "equalize", "smooth", "bias_correction")

    def qat_settings(self, ctx: BuildContext) -> dict[str, Any]:
        raise NotImplementedError

    def qat_prepares(self, kind: Kind) -> bool:
        """Whether :meth:`prepare_qat` can prepare a model of this kind (the build's input)."""
        return True

    def prepare_qat(self, artifact: Artifact, ctx: BuildContext):
        raise NotImplementedError

    def qat_mismatch(self, artifact: Artifact, ctx: BuildContext) -> str | None:
        """Why the build's QAT state does not fit this stage (None: it does)."""
        if ctx.qat.stage != self.name:
            return f"prepared for stage {ctx.qat.stage}"
        mine = self.qat_settings(ctx)
        for key in self.qat_matching or tuple(mine):
            if ctx.qat.settings.get(key) != mine[key]:
                return f"prepared with {key} = {ctx.qat.settings.get(key)}, this stage has {mine[key]}"
        return None

    def uses_qat(self, artifact: Artifact, ctx: BuildContext) -> bool:
        return ctx.qat is not None and self.qat_mismatch(artifact, ctx) is None

    def calibrates(self, artifact: Artifact, ctx: BuildContext) -> bool:
        return not self.uses_qat(artifact, ctx)

    def qat_facts(self, artifact: Artifact, ctx: BuildContext) -> dict[str, Any]:
        """`ranges`, and `qat_state` when the build was given one: the file, or why it was not used."""
        if ctx.qat is None:
            return {"ranges": "calibration"}
        if self.uses_qat(artifact, ctx):
            return {"ranges": "qat", "qat_state": ctx.qat.source}
        return {"ranges": "calibration", "qat_state": f"not used: {self.qat_mismatch(artifact, ctx)}"}

    def refuse_rewrites(self, float_layers: bool = True) -> None:
        """A StageError when the options set a rewrite of weights or ranges (or, with ``float_layers``,
        layers kept in float): QAT learns what they fix."""
        from toolchain.core.errors import StageError

        set_ = [f for f in self.qat_rewrites if getattr(self.options, f)]
        if float_layers and self.options.float_layers:
            set_.append("float_layers")
        if set_:
            raise StageError(
                f"{self.name}: {', '.join(set_)} would change a QAT model's learned weights or ranges "
                "(QAT learns what they fix): prepare and build with a profile without them"
            )


STAGES: Registry[type[Stage]] = Registry("stage")


def reported_facts(records: list[StageRecord]) -> dict[str, dict[str, Any]]:
    """The facts each stage marks for the report, by stage name."""
    out = {}
    for r in records:
        keys = STAGES.get(r.stage).report_facts
        if keys:
            out[r.stage] = {k: r.facts[k] for k in keys if k in r.facts}
    return out


def register_stage(cls: type[Stage]) -> type[Stage]:
    STAGES.register(cls.name, cls)
    return cls
