"""What every artifact is compared with: the FP32 model's outputs on the validation inputs, their
roles, FP32's accuracy and its score on the user's metric; and the thresholds that judge them."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from toolchain.core.dataset import Dataset
from toolchain.core.runner import reference_runner
from toolchain.inputs.load import LoadedModel
from toolchain.inputs.prepare import Inputs
from toolchain.target import ParityThresholds, Target
from toolchain.verdict.parity import (
    OutputRole,
    Parity,
    accuracy_of,
    check_reference,
    compare,
    resolve_roles,
    run_batched,
)

log = logging.getLogger("toolchain")


def user_metric(profile: Target, spec: str | None, max_drop: float | None):
    """(FILE.py:function, its function, max drop) from the flags or the profile, loaded now so a bad
    metric fails before the model loads; None without one."""
    from toolchain.verdict.metric import load_metric

    spec_from_profile = spec is None
    spec = spec or profile.parity.metric
    if not spec:
        return None
    fn = load_metric(spec, Path(profile.source).parent if spec_from_profile else None)
    return spec, fn, profile.parity.max_metric_drop if max_drop is None else max_drop


def expected_outputs(
    loaded: LoadedModel,
    inputs: Inputs,
    profile: Target,
    declared: Mapping[str, str],
    names: list[str],
    scorer=None,
) -> "Expected":
    """The FP32 model's outputs on the validation inputs, with their roles, checked finite, and
    FP32's score on the user's metric when there is one; ``names``: the model's output names, as
    :func:`toolchain.inputs.prepare.prepare_model` found them."""
    reference = reference_runner(loaded.artifact, profile.runtime.threads)
    log.info("running FP32 reference on %d validation inputs", len(inputs.validation.x))
    ref_out = run_batched(reference, inputs.validation.x, profile.parity.batch_size)
    roles = resolve_roles(ref_out, names, declared, inputs.validation.y)
    check_reference(ref_out, roles)
    warnings = []
    for r, out in zip(roles, ref_out):
        log.info("output %s: %s (%s)", r.name, r.role, r.evidence if r.inferred else "declared")
        scores = r.inferred and r.role == "regression" and out.ndim == 2 and out.shape[1] > 1
        if scores and inputs.validation.y is None:
            warnings.append(
                f"output {r.name} has {out.shape[1]} scores per sample and --val no labels `y`: it is "
                f"judged as a regression (SQNR, cosine), its top-1 agreement reported, not judged; "
                f"give labels, or `--outputs {r.name}=classification`, for top-1 to decide"
            )
            log.warning(warnings[-1])
    metric = None
    if scorer is not None:
        from toolchain.verdict.metric import Metric, score

        spec, fn, max_drop = scorer
        value, higher = score(fn, spec, ref_out, names, inputs.validation.labels)
        metric = Metric(spec, fn, value, higher, max_drop, profile.parity.metric_drop == "relative")
        log.info("metric %s: FP32 scores %.6g", spec, value)
    return Expected(ref_out, roles, accuracy_of(ref_out, inputs.validation.y, roles), metric, tuple(warnings))


def parity_subset(inputs: Inputs, expected: "Expected", n: int) -> tuple[Inputs, "Expected"]:
    """``n`` validation inputs (:meth:`Dataset.spread`) and FP32's outputs, accuracy and metric score
    on just those; all of them when ``n`` is 0 or at least their number."""
    if not n or n >= len(inputs.validation.x):
        return inputs, expected
    validation, idx = inputs.validation.spread(n)
    outputs = [o[idx] for o in expected.outputs]
    metric = expected.metric
    if metric is not None:
        from toolchain.verdict.metric import score

        value, _ = score(metric.fn, metric.name, outputs, [r.name for r in expected.roles], validation.labels)
        metric = dataclasses.replace(metric, fp32=value)
    return (
        dataclasses.replace(inputs, validation=validation),
        Expected(
            outputs,
            expected.roles,
            accuracy_of(outputs, validation.y, expected.roles),
            metric,
            expected.warnings,
        ),
    )


@dataclasses.dataclass(frozen=True)
class Expected:
    """What every artifact is compared with: FP32's outputs on the validation inputs,
    their roles, FP32's accuracy."""

    outputs: list
    roles: tuple[OutputRole, ...]
    accuracy: float | None
    metric: object = None  # toolchain.verdict.metric.Metric with FP32's score, when the user gives one
    warnings: tuple[str, ...] = ()  # what the roles leave unjudged, for the report

    @property
    def continuous(self) -> bool:
        """FP32's outputs hold non-integer values: an artifact reproducing them bit for bit ran no INT8
        arithmetic that reached them (arg-max indices can match exactly with INT8 inside)."""
        return any(np.any(np.asarray(o) != np.round(o)) for o in self.outputs)

    def compare(
        self, outputs: list, validation: Dataset, thresholds: ParityThresholds | None, precision: str
    ) -> Parity:
        """An artifact's ``outputs`` on ``validation`` against these, judged by the thresholds of its
        ``precision`` (None: measured, not judged)."""
        judged_by = thresholds and thresholds.for_precision(precision)
        return compare(
            self.outputs, outputs, validation.y, judged_by, self.roles, self.metric, validation.labels
        )


def applied_thresholds(loaded: LoadedModel, profile: Target) -> ParityThresholds | None:
    """The profile's thresholds, or None for random weights: measured, not judged.

    The thresholds are set for trained models. A random-weight model's logits are near
    ties (arg-max flips on noise) and its activation ranges are not a trained model's, so
    a pass or a fail would both be noise. Its build shows that every stage handles the
    architecture; the metrics are reported, the verdict is left out.
    """
    return None if loaded.random_weights else profile.parity
