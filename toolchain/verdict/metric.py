"""The user's own metric: a function in a Python file that scores a model's outputs against
the labels of the validation data, run for FP32 and for each artifact on the same inputs.

    def within_40_cents(outputs, labels):       # `--metric metrics.py:within_40_cents`
        return float(np.mean(np.abs(bins_to_cents(outputs) - labels["cents"]) <= 40))

``outputs``: the model's output as it returns it (one array, or a tuple / dict of arrays for
several outputs); ``labels``: the `--val` file's arrays other than `x` (the array itself when
there is only `y`, a dict otherwise, None without labels). It returns a number, higher is
better, or a dict ``{"value": number, "higher_is_better": bool}``. An error inside it is the
user's to fix: one line with its message and where it was raised.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from toolchain.core.errors import ToolchainError
from toolchain.core.user_code import load_function, where


class MetricError(ToolchainError):
    """The user's metric could not be loaded, raised, or returned something that is not a score."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """A loaded metric with FP32's score: what each artifact's score is held to."""

    name: str  # FILE.py:function, as given
    fn: Callable = dataclasses.field(repr=False, compare=False)
    fp32: float = float("nan")
    higher_is_better: bool = True
    max_drop: float = 0.01
    relative: bool = False  # max_drop is a fraction of FP32's score, not an absolute amount

    def drop(self, value: float) -> float:
        change = self.fp32 - value if self.higher_is_better else value - self.fp32
        return change / abs(self.fp32) if self.relative and self.fp32 else change

    def judge(self, value: float) -> tuple[bool, str | None]:
        drop = self.drop(value)
        if not drop <= self.max_drop:  # NaN fails too
            unit = " (relative)" if self.relative else ""
            return (
                False,
                f"metric {self.name} {value:.6g} is {drop:.4g}{unit} worse than FP32's {self.fp32:.6g} "
                f"(tolerance {self.max_drop:g})",
            )
        return True, None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fp32": self.fp32,
            "higher_is_better": self.higher_is_better,
            "max_drop": self.max_drop,
            "drop_is": "relative" if self.relative else "absolute",
        }


def load_metric(spec: str, base: Path | None = None) -> Callable:
    """`path/to/file.py:function` (a relative path is taken from ``base``, then the working folder)."""
    return load_function(spec, "metric", MetricError, base)


def score(
    fn: Callable,
    name: str,
    outputs: Sequence[np.ndarray],
    output_names: Sequence[str],
    labels: Mapping[str, np.ndarray],
) -> tuple[float, bool]:
    """Run the user's metric on ``outputs`` (flattened, in order); returns (value, higher_is_better)."""
    try:
        result = fn(_as_returned(outputs, output_names), _labels(labels))
    except Exception as e:
        raise MetricError(f"metric {name} raised {where(e, None)}") from None
    higher = True
    if isinstance(result, Mapping):
        higher = bool(result.get("higher_is_better", True))
        result = result.get("value")
    try:
        value = float(result)
    except (TypeError, ValueError):
        raise MetricError(
            f"metric {name} returned {type(result).__name__}, not a number (or a dict with `value`)"
        ) from None
    if not math.isfinite(value):
        raise MetricError(f"metric {name} returned {value}, not a finite number")
    return value, higher


def _as_returned(outputs: Sequence[np.ndarray], names: Sequence[str]):
    if len(outputs) == 1:
        return outputs[0]
    if all(n == str(i) for i, n in enumerate(names)):
        return tuple(outputs)
    return dict(zip(names, outputs))


def _labels(labels: Mapping[str, np.ndarray]):
    if not labels:
        return None
    return labels["y"] if set(labels) == {"y"} else dict(labels)
