"""Parity metrics against known values."""

import numpy as np
import pytest

from toolchain.parity import accuracy_of, compare
from toolchain.target import ParityThresholds

T = ParityThresholds(min_sqnr_db=20.0, min_cosine=0.99, min_top1_agreement=0.99, max_accuracy_drop=0.01)


def test_sqnr_of_known_noise():
    ref = np.ones((10, 4))
    p = compare(ref, ref + 0.1, None, T)  # signal power 1, noise power 0.01 -> 20 dB
    assert p.sqnr_db == pytest.approx(20.0, abs=1e-3)
    assert p.max_abs == pytest.approx(0.1) and p.mean_abs == pytest.approx(0.1)


def test_identical_outputs():
    ref = np.random.default_rng(0).standard_normal((8, 5))
    labels = np.zeros(8, int)
    assert accuracy_of(ref, labels) == np.mean(ref.argmax(1) == 0)
    p = compare(ref, ref.copy(), labels, T)
    assert p.sqnr_db == float("inf") and p.cosine == pytest.approx(1.0) and p.top1_agreement == 1.0 and p.passed


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
