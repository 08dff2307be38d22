"""An artifact's chain of stages (``Plan``, from the profile's ``ArtifactSpec``), checked to fit before
anything runs (``check_chain``), and run (``Pipeline``). Which chains a target asks for is
:func:`toolchain.target.plan`'s job.

Chains that share a prefix (FP32 ONNX and INT8 ONNX both start with export and graph
passes) run the prefix once: results are cached on (stage, options, input sha256).
"""

from __future__ import annotations

import dataclasses
import logging

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.options import option
from toolchain.core.stage import Stage, StageRecord

log = logging.getLogger("toolchain")


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    spec: ArtifactSpec
    stages: tuple[Stage, ...]


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An artifact the build could not make, and why; the report lists it."""

    name: str
    reason: str
    stage: str | None = None  # the stage that failed, when one ran and failed


def check_chain(stages: tuple[Stage, ...], kind: Kind, final: Kind, runtime: str) -> str | None:
    """None when the chain can run on ``kind`` and ends in what ``runtime`` loads, else why not."""
    for stage in stages:
        if kind not in stage.transitions:
            accepted = ", ".join(sorted(str(k) for k in stage.accepts()))
            return f"stage `{stage.name}` accepts {accepted}; here it would get {kind}"
        kind = stage.transitions[kind]
    if kind is not final:
        return f"the chain ends in {kind}, but the `{runtime}` runtime loads {final}"
    return None


class Pipeline:
    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx
        self._cache: dict[tuple, tuple[Artifact, StageRecord] | StageError] = {}

    def run(self, chain: Plan, reference: Artifact) -> tuple[Artifact, list[StageRecord]]:
        artifact, records = reference, []
        for stage in chain.stages:
            key = (stage.name, repr(stage.options), artifact.sha256)
            if key not in self._cache:
                try:
                    self._cache[key] = stage.run(artifact, self.ctx)
                except StageError as e:
                    self._cache[key] = e
                except Exception as e:
                    # a crash inside a stage costs the artifacts that need it, not the build
                    log.debug("stage %s crashed", stage.name, exc_info=True)
                    self._cache[key] = StageError(f"{stage.name} crashed: {type(e).__name__}: {reason(e)}")
            outcome = self._cache[key]
            if isinstance(outcome, StageError):
                raise outcome
            artifact, record = outcome
            records.append(record)
        return artifact, records


@dataclasses.dataclass(frozen=True)
class ArtifactSpec:
    stages: tuple[str, ...] = option((), "stages applied in order to the FP32 model")
    runtime: str = option(
        "onnxruntime", "runtime the artifact is loaded and checked in (`toolchain doctor` lists them)"
    )
    description: str = option("", "what the artifact is for")
    primary: bool = option(True, "may be chosen as the primary artifact (fastest that passes parity)")
    required: bool = option(
        True,
        "must pass for the build to pass; an optional artifact that fails is reported failed, with a "
        "warning, and the build's verdict rests on the required ones",
    )
    parity_samples: int = option(
        0,
        "validation inputs this artifact is checked on, evenly spaced over the validation set (0: all); "
        "for runtimes that run one input at a time (host HTP emulation), "
        "so that a default build stays minutes, not hours",
    )
