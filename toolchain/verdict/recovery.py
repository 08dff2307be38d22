"""When an INT8 artifact misses parity: find the layers that break it, and fix it, cheapest first.

1. Per-layer sensitivity, on the artifact's own backend and runtime: for each layer the
   quantization stage can keep in floating point, the artifact is rebuilt with that one layer
   in float (the rest INT8, with the same activation ranges: the stages reuse their
   calibration), loaded back in its runtime and compared with FP32 on the validation inputs.
   Keeping one layer in float, rather than quantizing one layer alone, measures what recovery
   can act on: the gain of each possible single move from the artifact that failed.
2. Recovery (profile `[recovery]`, on by default, within `max_float_layers` and `max_seconds`):
   a. the backend's other calibration methods;
   b. the stage's fixes, one at a time, each kept if it helps: cross-layer equalization and
      SmoothQuant's LayerNorm -> Linear scale migration (both the same function in FP32, checked),
      bias correction, 16-bit activations (QNN HTP);
   c. the most sensitive layers kept in float, one more at a time in sensitivity order, until
      parity holds or the budget is spent, on top of the best of a and b.
   Every attempt is recorded (what, its parity, latency and size). The thresholds never move:
   an artifact that no attempt brings within them still fails, with the best attempt's numbers.

Everything runs through the pipeline: a variant is the same chain of stages with other options
for its quantization stage, so the stages before it run once and every file is what would ship.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from toolchain.core.errors import StageError
from toolchain.core.stage import Recoverable, Stage
from toolchain.target import RecoveryOptions

if TYPE_CHECKING:  # parity imports the target profile, which imports RecoveryOptions from here
    from toolchain.verdict.parity import Parity

log = logging.getLogger("toolchain")


FIX_WORDS = {
    "float_masks": "attention masks kept in float",
    "equalize": "cross-layer equalization",
    "smooth": "SmoothQuant scale migration",
    "per_channel": "per-channel weight scales",
    "bias_correction": "bias correction",
    "a16w8": "16-bit activations (A16W8)",
    "fbgemm_kernels": "fbgemm kernels (run it with quantized engine fbgemm)",
}


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One variant tried: its settings and how it measured."""

    calibration: str | None
    float_layers: tuple[str, ...]
    parity: Parity
    latency_ms: float | None
    size_bytes: int | None
    seconds: float
    fixes: tuple[str, ...] = ()  # the stage's boolean options turned on (e.g. "equalize")
    kept_as: str = "in float"  # what the stage does with a layer it keeps (4-bit stages: "at 8 bits")

    @property
    def what(self) -> str:
        parts = [f"{self.calibration} calibration"] if self.calibration else []
        parts += [FIX_WORDS.get(f, f) for f in self.fixes]
        if self.float_layers:
            parts.append(
                f"{len(self.float_layers)} layer{'s' * (len(self.float_layers) != 1)} {self.kept_as} "
                f"({', '.join(self.float_layers)})"
            )
        return " + ".join(parts) or "default settings"

    def changes(self) -> dict[str, Any]:
        """The quantization stage's options that make this attempt's artifact."""
        out: dict[str, Any] = {"float_layers": self.float_layers, **{f: True for f in self.fixes}}
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out

    def to_json(self) -> dict[str, Any]:
        p = self.parity
        return {
            "what": self.what,
            "calibration": self.calibration,
            "fixes": list(self.fixes),
            "float_layers": list(self.float_layers),
            "passed": p.passed,
            "failures": list(p.failures),
            "sqnr_db": p.sqnr_db,
            "cosine": p.cosine,
            "top1_agreement": p.top1_agreement,
            "accuracy": p.accuracy,
            "metric": None if p.metric is None else p.metric.get("value"),
            "latency_ms": self.latency_ms,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 2),
        }


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What recovery did for one artifact."""

    status: str  # "recovered", "failed" (budget spent, best attempt kept) or "not possible"
    stages: tuple[Stage, ...] | None  # the chain of the artifact to ship (None: keep the original)
    attempts: tuple[Attempt, ...]
    sensitivity: tuple[dict[str, Any], ...]
    reason: str = ""

    @property
    def final(self) -> Attempt | None:
        return self.attempts[-1] if self.status == "recovered" else None


def score(p: Parity) -> tuple:
    """Higher is closer to passing: fewer failed checks, then top-1 agreement, then SQNR."""
    top1 = p.top1_agreement if p.top1_agreement is not None else 1.0
    sqnr = p.sqnr_db if p.sqnr_db == p.sqnr_db else float("-inf")  # NaN ranks last
    return (p.passed is not False, -len(p.failures), top1, sqnr)


def better(a: Parity, b: Parity, margin_db: float = 0.5) -> bool:
    """``a`` is closer to passing than ``b``: fewer failures or a higher top-1 agreement, or the
    same with an SQNR at least ``margin_db`` higher (smaller differences are noise)."""
    sa, sb = score(a), score(b)
    if sa[:3] != sb[:3]:
        return sa[:3] > sb[:3]
    return sa[3] > sb[3] + margin_db


Trial = Callable[[tuple], tuple]  # stages -> (Parity, latency ms or None, size in bytes or None)


def recoverable_stage(stages: tuple[Stage, ...]) -> int | None:
    """Index of the chain's quantization stage that recovery can adjust (the last one)."""
    found = [i for i, s in enumerate(stages) if isinstance(s, Recoverable)]
    return found[-1] if found else None


def recover(
    stages: tuple[Stage, ...],
    failed: Parity,
    trial: Trial,
    layers: Callable[[Stage], list[str]],
    options: RecoveryOptions,
    applies: Callable[[Stage, str], bool] = lambda stage, fix: True,
    continuous: bool = False,
    calibrates: Callable[[Stage], bool] = lambda stage: True,
) -> Outcome:
    """Try the ladder on ``stages`` (whose artifact measured ``failed``); see the module's docstring.
    ``applies(stage, fix)`` says whether a fix has anything to act on in this model (skipped if not);
    ``calibrates(stage)`` whether its ranges come from calibration at all (a QAT model's do not: no other
    calibration method is tried).
    ``continuous``: FP32's outputs hold non-integer values, so an attempt that reproduces them bit for
    bit ran no INT8 arithmetic that reached them (discrete outputs, arg-max indices, can match exactly
    with INT8 inside)."""
    index = recoverable_stage(stages)
    if index is None:
        return Outcome("not possible", None, (), (), "no quantization stage in the chain to adjust")
    deadline = time.perf_counter() + options.max_seconds
    stage = stages[index]
    base_calibration = getattr(stage.options, "calibration", None)
    attempts: list[Attempt] = []

    def attempt(calibration, fixes, float_layers) -> Attempt:
        a = Attempt(
            calibration,
            tuple(float_layers),
            None,
            None,
            None,
            0.0,
            tuple(fixes),
            getattr(stage, "kept_as", "in float"),
        )
        variant = stages[:index] + (stage.variant(**a.changes()),) + stages[index + 1 :]
        start = time.perf_counter()
        try:
            parity, latency, size = trial(variant)
        except StageError as e:
            parity, latency, size = _failed_parity(f"could not build: {e}"), None, None
        a = dataclasses.replace(
            a, parity=parity, latency_ms=latency, size_bytes=size, seconds=time.perf_counter() - start
        )
        log.info("recovery: %s -> %s", a.what, "pass" if parity.passed else "; ".join(parity.failures)[:160])
        return a

    def done(status: str, sensitivity=(), why: str = "") -> Outcome:
        final = attempts[-1] if status == "recovered" else None
        chain = (
            None
            if final is None
            else stages[:index] + (stage.variant(**final.changes()),) + stages[index + 1 :]
        )
        return Outcome(status, chain, tuple(attempts), tuple(sensitivity), why)

    best_calibration, best_fixes, best = base_calibration, (), failed
    if options.calibrations and calibrates(stage):
        for method in stage.calibrations():
            if method == base_calibration or time.perf_counter() > deadline:
                continue
            attempts.append(attempt(method, (), ()))
            if attempts[-1].parity.passed:
                return done("recovered")
            if better(attempts[-1].parity, best):
                best_calibration, best = method, attempts[-1].parity
    if options.fixes:
        for fix in stage.fixes():
            if (
                getattr(stage.options, fix)
                or time.perf_counter() > deadline
                or not _applies(applies, stage, fix)
            ):
                continue
            attempts.append(attempt(best_calibration, (*best_fixes, fix), ()))
            if attempts[-1].parity.passed:
                return done("recovered")
            if better(attempts[-1].parity, best):
                best_fixes, best = (*best_fixes, fix), attempts[-1].parity

    candidates = layers(
        stage.variant(**Attempt(best_calibration, (), None, None, None, 0, best_fixes).changes())
    )
    if not candidates or options.max_float_layers < 1:
        return done(
            "failed",
            why="the backend has no layer to keep in float for this model"
            if not candidates
            else "max_float_layers is 0",
        )
    # Greedy forward selection: each round tries every remaining layer on top of those already kept in
    # float and keeps the one that helps most. The first round is the per-layer sensitivity. Rounds after
    # it re-measure, because layers act in pairs (a layer and the one that writes its input).
    keep: list[str] = []
    sensitivity: list[dict[str, Any]] = []
    # At least one layer stays INT8: an all-float "INT8" artifact is the FP32 fallback under another name.
    while len(keep) < min(options.max_float_layers, len(candidates) - 1) or (
        not keep and len(candidates) == 1
    ):
        rows = []
        for layer in (c for c in candidates if c not in keep):
            if time.perf_counter() > deadline:
                return done(
                    "failed",
                    sensitivity or _ranked(rows),
                    f"time budget of {options.max_seconds:.0f} s spent",
                )
            attempts.append(attempt(best_calibration, best_fixes, (*keep, layer)))
            rows.append(_sensitivity_row(layer, attempts[-1], best))
            all_float = not set(candidates) - {*keep, layer} or (continuous and exact(attempts[-1].parity))
            if attempts[-1].parity.passed and all_float:
                # every layer it could quantize in float: measured for the sensitivity, never shipped
                return done("failed", sensitivity or _ranked(rows), NO_INT8_LEFT)
            if attempts[-1].parity.passed:
                return done("recovered", sensitivity or _ranked(rows))
        ranked = _ranked(rows)
        sensitivity = sensitivity or ranked
        keep.append(ranked[0]["layer"])
    why = (
        f"{len(keep)} layer{'s' * (len(keep) != 1)} in float "
        f"(max_float_layers = {options.max_float_layers}) did not reach the thresholds"
    )
    return done("failed", sensitivity, why)


NO_INT8_LEFT = (
    "every quantizable layer would have to stay in float: it passes only with no INT8 arithmetic of "
    "this quantizer left (the FP32 artifact is that model)"
)


def exact(p: Parity) -> bool:
    """Every output equals FP32's bit for bit (infinite SQNR)."""
    return bool(p.outputs) and all(o.sqnr_db == float("inf") for o in p.outputs)


def _applies(applies: Callable[[Stage, str], bool], stage: Stage, fix: str) -> bool:
    """Whether to try ``fix``; a model the check cannot even look at (it raised) is not tried: the
    attempt would fail the same way, one build later."""
    try:
        return applies(stage, fix)
    except Exception as e:  # noqa: BLE001 - one fix not tried, never a crashed build
        log.info("recovery: %s not tried (%s)", FIX_WORDS.get(fix, fix), f"{type(e).__name__}: {e}"[:160])
        return False


def measure(
    stages: tuple[Stage, ...], trial: Trial, layers: Callable[[Stage], list[str]]
) -> tuple[Outcome, Parity]:
    """Per-layer sensitivity alone (`toolchain sensitivity`): the artifact as configured, then
    each layer kept in float by itself. Returns the outcome (its sensitivity ranked) and the baseline."""
    index = recoverable_stage(stages)
    stage = stages[index]
    baseline = trial(stages)[0]
    attempts, rows = [], []
    for layer in layers(stage):
        start = time.perf_counter()
        try:
            parity, latency, size = trial(
                stages[:index] + (stage.variant(float_layers=(layer,)),) + stages[index + 1 :]
            )
        except StageError as e:
            parity, latency, size = _failed_parity(f"could not build: {e}"), None, None
        attempts.append(
            Attempt(
                getattr(stage.options, "calibration", None),
                (layer,),
                parity,
                latency,
                size,
                time.perf_counter() - start,
            )
        )
        rows.append(_sensitivity_row(layer, attempts[-1], baseline))
        log.info("sensitivity: %s in float -> SQNR %s dB", layer, parity.sqnr_db)
    return Outcome("measured", None, tuple(attempts), tuple(_ranked(rows))), baseline


def _sensitivity_row(layer: str, a: Attempt, baseline: Parity) -> dict[str, Any]:
    p = a.parity
    gain = p.sqnr_db - baseline.sqnr_db if np.isfinite(p.sqnr_db) and np.isfinite(baseline.sqnr_db) else None
    return {
        "layer": layer,
        "sqnr_db": p.sqnr_db,
        "sqnr_gain_db": None if gain is None else round(gain, 3),
        "top1_agreement": p.top1_agreement,
        "accuracy": p.accuracy,
        "passed": p.passed,
        "failures": list(p.failures),
        "_score": score(p),
    }


def _ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most sensitive first: the layer whose keeping in float helps most (ties keep graph order)."""
    return [
        {k: v for k, v in r.items() if k != "_score"}
        for r in sorted(rows, key=lambda r: r["_score"], reverse=True)
    ]


def _failed_parity(why: str) -> Parity:
    from toolchain.verdict.parity import (
        Parity,  # imported here: parity imports the target profile, which imports this module
    )

    return Parity.failed(why)


def write_sensitivity(folder: Path, artifact: str, outcome: Outcome, baseline: Parity) -> str | None:
    """`sensitivity/<artifact>.json`, relative to the build folder (None when none was measured)."""
    if not outcome.sensitivity:
        return None
    path = folder / "sensitivity" / f"{artifact}.json"
    path.parent.mkdir(exist_ok=True)
    data = {
        "artifact": artifact,
        "method": "one layer kept in float, the rest INT8 with the same ranges",
        "baseline": {
            "sqnr_db": baseline.sqnr_db,
            "top1_agreement": baseline.top1_agreement,
            "accuracy": baseline.accuracy,
            "failures": list(baseline.failures),
        },
        "layers": list(outcome.sensitivity),
    }
    from toolchain.core.jsonable import finite

    path.write_text(json.dumps(finite(data), indent=2) + "\n")
    return str(path.relative_to(folder))


def summary_line(
    name: str, outcome: Outcome, before: Parity, before_latency: float, after_latency: float | None
) -> str:
    """`onnx_int8: recovered — entropy calibration + 2 layers in float (a, b):
    top-1 agreement 91.2 % -> 99.4 %, latency +6 %`."""
    final = outcome.final
    if final is None:
        best = max(outcome.attempts, key=lambda a: score(a.parity), default=None)
        tail = (
            f"; best attempt {best.what}: {'; '.join(best.parity.failures)}{_ties(best.parity)}"
            if best and best.parity.failures
            else ""
        )
        return f"{name}: not recovered ({outcome.reason or outcome.status}){tail}"
    return (
        f"{name}: recovered — {final.what}: "
        f"{_change(before, final.parity)}{_latency(before_latency, after_latency)}"
    )


def _ties(p: Parity) -> str:
    """How far a top-1 failure is from its bar in noise (see
    toolchain.verdict.parity.NearTies), when that was its failure."""
    cuts = [o.near_ties.noise_cut_db for o in p.outputs if o.near_ties is not None]
    if not cuts:
        return ""
    cut = max(cuts)
    if cut == float("inf"):
        return " (FP32's own exact ties put the top-1 bar out of reach)"
    return f" (its top-1 needs the error between FP32's top two {cut:.1f} dB lower)" if cut else ""


def _change(before: Parity, after: Parity) -> str:
    if before.top1_agreement is not None and after.top1_agreement is not None and before.top1_agreement < 1:
        return f"top-1 agreement {before.top1_agreement:.1%} -> {after.top1_agreement:.1%}"
    return f"SQNR {before.sqnr_db:.1f} dB -> {after.sqnr_db:.1f} dB"


def _latency(before: float, after: float | None) -> str:
    if after is None or not before:
        return ""
    return f", latency {100 * (after / before - 1):+.0f} %"
