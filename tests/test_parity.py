"""Parity metrics against known values."""

import dataclasses

import numpy as np
import pytest

from toolchain.target import ParityThresholds
from toolchain.verdict.parity import OutputRole, accuracy_of, compare

T = ParityThresholds(min_sqnr_db=20.0, min_cosine=0.99, min_top1_agreement=0.99, max_accuracy_drop=0.01)
CLASSIFIER = (OutputRole(0, "0", "classification", inferred=False),)


def classify(ref, out, labels, t, **kwargs):
    """Scores compared as a declared classifier's: without labels nothing says they are one."""
    return compare(ref, out, labels, t, roles=CLASSIFIER, **kwargs)


def test_sqnr_of_known_noise():
    ref = np.ones((10, 4))
    p = compare(ref, ref + 0.1, None, T)  # signal power 1, noise power 0.01 -> 20 dB
    assert p.sqnr_db == pytest.approx(20.0, abs=1e-3)
    assert p.max_abs == pytest.approx(0.1) and p.mean_abs == pytest.approx(0.1)


def test_identical_outputs():
    ref = np.random.default_rng(0).standard_normal((8, 5))
    labels = np.zeros(8, int)  # no evidence of a classifier (its arg-max does not score them): declared
    assert accuracy_of(ref, labels, CLASSIFIER) == np.mean(ref.argmax(1) == 0)
    p = classify(ref, ref.copy(), labels, T)
    assert (
        p.sqnr_db == float("inf") and p.cosine == pytest.approx(1.0) and p.top1_agreement == 1.0 and p.passed
    )


def test_top1_and_accuracy_failures():
    ref = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]] * 5
    out = ref.copy()
    out[0] = np.eye(4)[1] * 5  # one of eight flips
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    p = compare(ref, out, labels, T)  # FP32's own accuracy on these labels is 100 %
    assert p.top1_agreement == pytest.approx(7 / 8) and p.accuracy == pytest.approx(7 / 8)
    assert not p.passed
    assert any("top-1 agreement 87.50% < 99.00%" in f for f in p.failures)
    assert any("accuracy 87.50% is 12.50% below FP32's 100.00%" in f for f in p.failures)


def test_regression_outputs_have_no_top1():
    ref = np.random.default_rng(1).standard_normal((6, 1))
    p = compare(ref, ref * 1.001, None, T)
    assert p.top1_agreement is None and p.accuracy is None and p.passed
    assert p.outputs[0].role == "regression" and p.outputs[0].role_inferred
    assert p.outputs[0].rel_max_error == pytest.approx(0.001, rel=1e-3)


def test_shape_mismatch_fails_parity():
    p = compare(np.zeros((2, 3)), np.zeros((2, 4)), None, T)
    assert p.passed is False and "shape 2x4 differs from FP32's 2x3" in p.failures[0]


def _near_tie_outputs(n: int = 4000, classes: int = 20, seed: int = 0) -> np.ndarray:
    """FP32 scores whose top two are 0.05 apart on average (exponential gaps: many near-ties)."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(0, 0.5, (n, classes))
    top, second = rng.choice(classes, 2, replace=False)
    ref[:, second] = 1.0
    ref[:, top] = 1.0 + rng.exponential(0.05, n)
    return ref


def test_a_missed_top1_bar_is_predicted_by_the_noise_between_fp32s_top_two_and_the_cut_it_names_holds_it():
    ref = _near_tie_outputs()
    noise = np.random.default_rng(1).standard_normal(ref.shape) * 0.02
    p = classify(ref, ref + noise, None, T)
    ties = p.outputs[0].near_ties
    assert p.top1_agreement < 0.99 and ties is not None
    assert ties.share == pytest.approx(0.01) and ties.gap == pytest.approx(
        np.quantile(ref.max(1) - 1.0, 0.01), rel=1e-3
    )
    # the difference of two independent errors
    assert ties.noise == pytest.approx(0.02 * np.sqrt(2), rel=0.05)
    assert ties.predicted == pytest.approx(p.top1_agreement, abs=0.01)
    assert ties.noise_cut_db > 3
    # the same noise, that many dB lower, holds the bar (up to sampling: 1 % of 4000 samples is 40 swaps)
    held = classify(ref, ref + noise * 10 ** (-ties.noise_cut_db / 20), None, T)
    assert held.top1_agreement >= 0.985, (held.top1_agreement, ties)
    assert classify(ref, ref + noise * 10 ** (-(ties.noise_cut_db + 6) / 20), None, T).passed
    # not an overestimate
    assert classify(ref, ref + noise * 10 ** (-(ties.noise_cut_db - 6) / 20), None, T).top1_agreement < 0.985


def test_near_ties_are_said_only_for_a_judged_top1_failure_and_exact_fp32_ties_put_the_bar_out_of_reach():
    ref = _near_tie_outputs()
    assert classify(ref, ref + 1e-6, None, T).outputs[0].near_ties is None  # the bar holds
    noisy = ref + np.random.default_rng(1).standard_normal(ref.shape) * 0.02
    assert classify(ref, noisy, None, None).outputs[0].near_ties is None  # not judged (random weights)
    tied = ref.copy()
    tied[:100] = np.eye(20)[0] + np.eye(20)[1]  # 2.5 % of the samples: FP32's top two exactly equal
    noisy = tied + np.random.default_rng(2).standard_normal(ref.shape) * 1e-3
    ties = classify(tied, noisy, None, T).outputs[0].near_ties
    assert ties is not None and ties.gap == 0 and ties.noise_cut_db == float("inf")


def test_near_ties_are_not_said_when_a_metric_decides_and_name_a_miss_the_top_two_do_not_explain():
    from toolchain.reporting.words import near_ties_line
    from toolchain.verdict.metric import Metric

    ref = _near_tie_outputs()
    noisy = ref + np.random.default_rng(1).standard_normal(ref.shape) * 0.02
    metric = Metric(
        "m.py:peak", lambda outputs, labels: float(outputs.max(1).mean()), fp32=float(ref.max(1).mean())
    )
    judged = classify(ref, noisy, None, T, metric=metric)
    # top-1 is reported, not judged: nothing to explain
    assert judged.passed and judged.outputs[0].near_ties is None
    third = ref.copy()  # a third class overtakes on 5 % of the samples; the top two themselves barely move
    third[:200, 5] = 3.0
    ties = classify(ref, third, None, T).outputs[0].near_ties
    assert ties.noise_cut_db == 0 and ties.predicted > 0.99
    assert "does not explain the miss" in near_ties_line("a", None, 0.95, dataclasses.asdict(ties))
    # as read from JSON
    assert "ties exactly" in near_ties_line(
        "a", None, 0.95, {**dataclasses.asdict(ties), "noise_cut_db": "inf"}
    )
    strict = ParityThresholds(
        min_sqnr_db=20.0, min_cosine=0.99, min_top1_agreement=1.0, max_accuracy_drop=0.01
    )
    ties = classify(ref, noisy, None, strict).outputs[0].near_ties
    assert ties.share == pytest.approx(0.5 / len(ref))  # a 100 % bar: the last half sample
    assert classify(ref, noisy, None, T).outputs[0].near_ties.noise_cut_db < ties.noise_cut_db < float("inf")
    assert "on 0.0% of the validation samples" in near_ties_line("a", None, 0.8, dataclasses.asdict(ties))
    # overflowing error: no numbers, no crash
    assert classify(ref * 1e200, noisy * 1e200, None, T).outputs[0].near_ties is None


def test_recoverys_failed_line_says_how_far_its_best_attempt_was_in_noise():
    from toolchain.verdict.recovery import Attempt, Outcome, summary_line

    ref = _near_tie_outputs()
    parity = classify(ref, ref + np.random.default_rng(1).standard_normal(ref.shape) * 0.02, None, T)
    outcome = Outcome(
        "failed", None, (Attempt("entropy", ("head",), parity, None, None, 1.0),), (), "budget spent"
    )
    line = summary_line("onnx_int8", outcome, parity, 1.0, None)
    cut = parity.outputs[0].near_ties.noise_cut_db
    assert f"its top-1 needs the error between FP32's top two {cut:.1f} dB lower" in line, line


# --- roles from evidence


def _roles(outputs, labels=None, declared=None):
    from toolchain.verdict.parity import resolve_roles

    return [
        (r.role, r.inferred, r.evidence, r.per_frame)
        for r in resolve_roles(outputs, [str(i) for i in range(len(outputs))], declared or {}, labels)
    ]


def test_each_role_is_inferred_from_its_evidence_and_says_which():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 64)
    logits = rng.normal(size=(64, 10)) + 3 * np.eye(10)[labels]  # a classifier: right on ~90 %
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    unit = np.abs(logits) / np.linalg.norm(logits, axis=1, keepdims=True)  # ReLU'd, then L2-normalised
    right = f"{np.mean(logits.argmax(1) == labels):.1%}"
    assert _roles([probs]) == [
        ("probabilities", True, "rows are probability distributions (non-negative, summing to 1)", False)
    ]
    assert _roles([unit]) == [("embedding", True, "unit-norm rows", False)]
    said = f"labels 0..9 in --val, FP32's arg-max right on {right} of them"
    assert _roles([logits], labels) == [("classification", True, said, False)]
    # a softmax classifier: its labels make it one (top-1 and accuracy judged, not max probability error)
    assert _roles([probs], labels)[0][:3] == (
        "classification",
        True,
        f"{said}; rows are probability distributions",
    )
    # the arg-max of an embedding is no class, even with labels beside it
    assert _roles([unit], labels)[0][0] == "embedding"
    assert _roles([logits])[0][:3] == ("regression", True, "no evidence: regression")
    assert _roles([logits], labels + 10)[0][0] == "regression"  # labels outside the output's classes
    assert _roles([logits], labels + 0.5)[0][0] == "regression"  # not integers
    assert _roles([logits], labels.astype(np.float32))[0][0] == "classification"  # integers stored as floats
    assert _roles([logits[:, :1]], labels)[0][0] == "regression"  # one value per sample
    # labels that merely fit are no evidence: scores whose arg-max is no better than guessing
    assert _roles([rng.normal(size=(64, 10))], labels)[0][0] == "regression"


def test_labels_go_to_the_output_they_describe_or_to_none():
    """Boxes before logits, a waveform, features before a declared classifier: only the output whose
    arg-max the labels score takes them."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    logits = rng.normal(size=(200, 2)) + 3 * np.eye(2)[labels]
    boxes, wave = rng.normal(size=(200, 4)), rng.normal(size=(200, 1600))
    assert [r[0] for r in _roles([boxes, logits], labels)] == ["regression", "classification"]
    assert _roles([wave], labels)[0][0] == "regression"
    features = rng.normal(size=(200, 256))
    declared = _roles([features, logits], labels, {"1": "classification"})
    assert [r[:2] for r in declared] == [("regression", True), ("classification", False)]
    assert accuracy_of(
        [features, logits], labels, _resolved([features, logits], labels, {"1": "classification"})
    ) == (pytest.approx(np.mean(logits.argmax(1) == labels)))
    # of two that both fit and score, the better scored
    worse = logits + rng.normal(size=logits.shape) * 3
    assert [r[0] for r in _roles([worse, logits], labels)] == ["regression", "classification"]


def _resolved(outputs, labels, declared):
    from toolchain.verdict.parity import resolve_roles

    return resolve_roles(outputs, [str(i) for i in range(len(outputs))], declared, labels)


def test_a_declared_role_overrides_the_evidence():
    unit = np.eye(8)[np.arange(16) % 8] * 0.6 + 0.1
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    assert _roles([unit], declared={"0": "regression"}) == [("regression", False, "declared", False)]


def test_a_sequence_output_is_judged_frame_by_frame():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(32, 12, 5))  # (N, T, C)
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    frames = scores.argmax(-1)
    assert _roles([probs])[0][:2] + _roles([probs])[0][3:] == ("probabilities", True, True)
    assert _roles([probs])[0][2].startswith("per frame: ")
    assert _roles([scores], frames) == [
        (
            "classification",
            True,
            "per frame: labels 0..4 in --val, FP32's arg-max right on 100.0% of them",
            True,
        )
    ]
    assert (
        _roles([scores], frames[:, 0])[0][0] == "regression"
    )  # one label per sequence: not per-frame labels
    out = scores.copy()
    out[:, 0] = -out[:, 0]  # the first frame of every sequence moves its arg-max, the rest hold
    p = compare(scores, out, frames, T)
    moved = np.mean(out[:, 0].argmax(-1) != frames[:, 0])
    assert p.top1_agreement == pytest.approx(1 - moved / 12)  # over N x T frames, not N sequences
    assert p.accuracy == pytest.approx(1 - moved / 12)
    assert p.passed is False and any("top-1 agreement" in f for f in p.failures)


def test_a_regressions_top1_is_reported_not_judged():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(200, 6))
    out = ref + rng.normal(size=ref.shape) * 0.05  # 26 dB: the arg-max moves on a few rows
    p = compare(ref, out, None, T)
    assert p.outputs[0].role == "regression" and p.outputs[0].top1_agreement < 0.99
    assert p.passed is True and p.top1_agreement is None  # the aggregate's top-1: classification outputs only
