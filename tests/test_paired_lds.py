"""benchmarks/paired_lds.py: the paired difference of per-query values and its bootstrap interval."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from paired_lds import paired_difference  # noqa: E402


def test_identical_inputs_give_zero_with_a_zero_interval():
    values = np.random.default_rng(0).uniform(-0.2, 0.8, size=50)
    result = paired_difference(values, values.copy())
    assert result.mean == 0.0 and result.ci == (0.0, 0.0)
    assert result.num_queries == 50 and result.not_worse


def test_a_shift_gives_the_shift():
    reference = np.random.default_rng(1).uniform(0.0, 0.6, size=40)
    up = paired_difference(reference + 0.05, reference)
    assert up.mean == pytest.approx(0.05) and up.ci == pytest.approx((0.05, 0.05))
    assert up.not_worse
    down = paired_difference(reference - 0.05, reference)
    assert down.mean == pytest.approx(-0.05) and down.ci == pytest.approx((-0.05, -0.05))
    assert not down.not_worse


def test_noisy_differences_interval_brackets_the_mean_and_is_seeded():
    rng = np.random.default_rng(2)
    reference = rng.uniform(0.0, 0.6, size=100)
    candidate = reference + rng.normal(0.0, 0.02, size=100)
    first = paired_difference(candidate, reference, seed=3)
    again = paired_difference(candidate, reference, seed=3)
    assert first == again
    lo, hi = first.ci
    assert lo < first.mean < hi
    assert lo <= 0.0 <= hi  # no real shift: the interval holds 0
    # the interval is about 2 × 1.96 standard errors wide
    assert hi - lo == pytest.approx(2 * 1.96 * np.std(candidate - reference) / 10, rel=0.2)


def test_queries_undefined_in_either_variant_are_left_out():
    reference = np.array([0.1, np.nan, 0.3, 0.4])
    candidate = np.array([0.2, 0.5, np.nan, 0.5])
    result = paired_difference(candidate, reference)
    assert result.num_queries == 2 and result.mean == pytest.approx(0.1)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="1-D"):
        paired_difference(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="no query"):
        paired_difference(np.array([np.nan]), np.array([0.0]))
    with pytest.raises(ValueError, match="confidence"):
        paired_difference(np.zeros(3), np.zeros(3), confidence=1.0)
