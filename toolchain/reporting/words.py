"""The words the terminal, report.md and report.html share: a parity verdict, an output's label,
a stage's facts. One place, so the three renderings never disagree (and report.html's module
does not import the report's)."""

from __future__ import annotations

from typing import Any


def output_label(o) -> str:
    """`1 landmarks (regression, inferred)`: index, name where the model gives one, role."""
    name = "" if o.name == str(o.index) else f" {o.name}"
    return f"{o.index}{name} ({o.role}{', inferred' if o.role_inferred else ''})"


def parity_verdict(passed: bool | None, failures) -> str:
    return {True: "pass", None: "not judged"}.get(passed) or "FAIL: " + "; ".join(failures)


def facts_line(facts: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, dict):
            return (
                "; ".join(f"{k} ({w})" if isinstance(w, str) else f"{k} ×{w}" for k, w in v.items()) or "none"
            )
        if isinstance(v, (list, tuple)):
            return ", ".join(map(str, v)) or "none"
        return str(v)

    return "; ".join(f"{k.replace('_', ' ')}: {one(v)}" for k, v in facts.items())


def subset_line(name: str, samples: int, total: int) -> str | None:
    """Said of an artifact checked on part of the validation inputs; None when it saw them all."""
    if not 0 < samples < total:
        return None
    return (
        f"{name}: parity on {samples} of the {total} validation inputs, evenly spaced "
        f"(`artifacts.{name}.parity_samples`: its runtime runs one input at a time)"
    )


def near_ties_line(name: str, output: str | None, top1: float, ties: dict[str, Any]) -> str:
    """Why an output's top-1 agreement missed its bar, in numbers (``toolchain.verdict.parity.NearTies``)."""
    bar = 1 - ties["share"]
    where = f"{name}{f' output {output}' if output else ''}"
    head = (
        f"{where}: top-1 agreement {top1:.1%} < {bar:.1%}: on {ties['share']:.1%} of the validation samples "
        f"FP32's top two scores are within {ties['gap']:.3g}, and the artifact's error between them is "
        f"{ties['noise']:.3g} RMS, which predicts {ties['predicted']:.1%}"
    )
    cut = ties["noise_cut_db"]
    if cut in ("inf", float("inf")):
        return head + (
            f"; FP32 itself ties exactly on too many samples for {bar:.1%}: "
            "judge this output with a metric (--metric)"
        )
    if not cut:
        return (
            head
            + ": the error between FP32's top two does not explain the miss (other classes overtake them)"
        )
    return (
        head
        + f"; {bar:.1%} needs that error {cut:.1f} dB lower (where arg-max swaps between near-equal classes "
        "are harmless, as between neighbouring bins, judge the output with your metric: --metric)"
    )


def metric_line(metric: dict[str, Any], scores: list[tuple[str, dict[str, Any]]]) -> str:
    """`metric m.py:f (higher is better, tolerance 0.01 absolute): FP32 0.955; onnx_int8 0.953 (drop
    0.002) pass`: ``metric`` is report.json's `metric`, ``scores`` each artifact's name and its
    `parity.metric`."""
    better = "higher" if metric["higher_is_better"] else "lower"
    head = (
        f"metric {metric['name']} ({better} is better, tolerance {metric['max_drop']:g} "
        f"{metric['drop_is']}): "
    )
    parts = []
    for name, m in scores:
        if m.get("value") is None:
            parts.append(f"{name} not scored (its outputs failed the sanity checks)")
        else:
            verdict = {True: "pass", False: "FAIL", None: "not judged"}[m["passed"]]
            parts.append(f"{name} {m['value']:.6g} (drop {m['drop']:.4g}) {verdict}")
    return head + f"FP32 {metric['fp32']:.6g}; " + "; ".join(parts)
