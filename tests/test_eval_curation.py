"""compare_curation: its arithmetic against a hand computation, its cache, its input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from srcproj.errors import ConfigurationError, DataError
from srcproj.eval.curation import (
    CurationComparison,
    compare_curation,
    drop_count,
    drop_order,
    random_drop_masks,
    t_interval,
)

N = 10
WEIGHTS = np.arange(N, dtype=np.float64)  # example i is worth i: dropping low ones raises the toy "accuracy"
T_975_2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)


def toy(mask: np.ndarray, seed: int) -> np.ndarray:
    """Two 'test' measurements: the mean worth of the kept examples + seed/10, and that + 0.2."""
    value = WEIGHTS[mask].mean() + 0.1 * seed
    return np.array([value, value + 0.2])


def toy_batched(masks: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    return np.array([toy(m, s).mean() for m, s in zip(masks, seeds, strict=True)])


RANKINGS = {"low first": drop_order(WEIGHTS), "high first": drop_order(WEIGHTS, drop="highest")}


def test_drop_order_and_count():
    assert drop_order(np.array([3.0, 1.0, 2.0, 1.0])).tolist() == [1, 3, 2, 0]
    assert drop_order(np.array([3.0, 1.0, 2.0, 1.0]), drop="highest").tolist() == [0, 2, 1, 3]
    assert drop_count(10, 0.25) == 3 and drop_count(10, 0.2) == 2 and drop_count(3, 0.99) == 2


def test_random_masks_are_fixed_per_seed_and_drop_the_count():
    a = random_drop_masks(100, 0.3, seed=4, draws=3)
    assert a.shape == (3, 100) and (a.sum(1) == 70).all()
    assert np.array_equal(a, random_drop_masks(100, 0.3, seed=4, draws=3))
    assert not np.array_equal(a[0], random_drop_masks(100, 0.3, seed=5, draws=1)[0])
    assert not np.array_equal(a[0], a[1])


def test_arithmetic_against_hand_computation():
    seeds = (0, 1, 2)
    result = compare_curation(toy, RANKINGS, (0.2, 0.5), seeds, random_draws=2)
    assert result.methods == ("low first", "high first", "random") and result.counts == (2, 5)
    # Dropping 0 and 1 keeps 2..9, mean 5.5; the two measurements average to +0.1; seeds add 0, .1, .2.
    assert np.allclose(result.per_seed("low first", 0.2), [5.6, 5.7, 5.8])
    assert np.allclose(result.per_seed("high first", 0.2), [3.6, 3.7, 3.8])  # keeps 0..7
    assert np.allclose(result.per_seed("low first", 0.5), [7.1, 7.2, 7.3])  # keeps 5..9
    assert np.allclose(result.full, [4.6, 4.7, 4.8])
    for r, seed in enumerate(seeds):
        masks = random_drop_masks(N, 0.5, seed, draws=2)
        by_hand = np.mean([WEIGHTS[m].mean() for m in masks]) + 0.1 * seed + 0.1
        assert math.isclose(result.per_seed("random", 0.5)[r], by_hand)
    # Values 5.6, 5.7, 5.8: sd 0.1, half-width t(0.975, 2) · 0.1 / √3.
    s = result.summary("low first", 0.2)
    assert math.isclose(s.mean, 5.7) and math.isclose(s.half_width, T_975_2 * 0.1 / math.sqrt(3), rel_tol=1e-9)
    assert math.isclose(s.low, 5.7 - s.half_width) and s.seeds == 3
    # The seed shift is shared by both deterministic drops: the paired difference has no spread.
    d = result.difference("low first", "high first", 0.2)
    assert math.isclose(d.mean, 2.0) and math.isclose(d.low, 2.0) and math.isclose(d.high, 2.0)
    assert d.excludes_zero()
    random_diff = result.difference("low first", "random", 0.5)
    per_seed = result.per_seed("low first", 0.5) - result.per_seed("random", 0.5)
    assert math.isclose(random_diff.mean, per_seed.mean())
    assert math.isclose(random_diff.half_width, T_975_2 * per_seed.std(ddof=1) / math.sqrt(3), rel_tol=1e-9)
    rows = result.rows()
    assert len(rows) == 6 and rows[0]["method"] == "low first" and math.isclose(rows[0]["minus high first"], 2.0)
    text = str(result)
    assert "low first" in text and "minus random" in text and "+2.0000" in text


def test_batched_train_fn_gives_the_same_result():
    plain = compare_curation(toy, RANKINGS, (0.3,), (0, 1), random_draws=3)
    batched = compare_curation(toy_batched, RANKINGS, (0.3,), (0, 1), random_draws=3, models_per_call=4)
    assert np.allclose(plain.values, batched.values) and np.allclose(plain.full, batched.full)


def test_a_scalar_measurement_is_accepted():
    result = compare_curation(lambda m, s: float(WEIGHTS[m].mean()), RANKINGS, (0.2,), (0, 1))
    assert np.allclose(result.per_seed("low first", 0.2), [5.5, 5.5])


def test_cache_skips_finished_models_and_resumes(tmp_path):
    calls = []

    def counting(mask, seed):
        calls.append(seed)
        return toy(mask, seed)

    first = compare_curation(counting, RANKINGS, (0.2, 0.4), (0, 1), random_draws=2, cache_dir=tmp_path)
    # per fraction: 2 rankings × 2 seeds + 2 draws × 2 seeds; plus 2 full models
    assert len(calls) == 2 * (4 + 4) + 2
    calls.clear()
    again = compare_curation(counting, RANKINGS, (0.2, 0.4), (0, 1), random_draws=2, cache_dir=tmp_path)
    assert calls == [] and np.array_equal(first.values, again.values)
    more = compare_curation(counting, RANKINGS, (0.2, 0.4), (0, 1, 2), random_draws=2, cache_dir=tmp_path)
    assert sorted(set(calls)) == [2] and len(calls) == 2 * (2 + 2) + 1
    assert np.array_equal(more.values[:, :, :2], first.values)


def test_t_interval_needs_two_values():
    with pytest.raises(ConfigurationError, match="at least 2"):
        t_interval(np.array([1.0]))
    assert math.isclose(t_interval(np.array([1.0, 3.0]), 0.95).half_width, 12.706204736174698, rel_tol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rankings": {"random": drop_order(WEIGHTS)}}, ConfigurationError, "other than 'random'"),
    ({"rankings": {}}, ConfigurationError, "non-empty dict"),
    ({"rankings": {"a": np.zeros(N, dtype=np.int64)}}, DataError, "not a permutation"),
    ({"rankings": {"a": np.arange(N) * 1.0}}, DataError, "integer drop order"),
    ({"rankings": {"a": np.arange(N), "b": np.arange(N - 1)}}, DataError, "same training set"),
    ({"fractions": (0.0,)}, ConfigurationError, "strictly between 0 and 1"),
    ({"fractions": (1.0,)}, ConfigurationError, "strictly between 0 and 1"),
    ({"fractions": (0.01,)}, ConfigurationError, "drops none"),
    ({"fractions": (0.2, 0.2)}, ConfigurationError, "repeats"),
    ({"fractions": ()}, ConfigurationError, "empty"),
    ({"seeds": (0,)}, ConfigurationError, "at least 2 distinct seeds"),
    ({"seeds": (1, 1)}, ConfigurationError, "at least 2 distinct seeds"),
    ({"random_draws": 0}, ConfigurationError, "positive integer"),
    ({"confidence": 1.0}, ConfigurationError, "strictly between 0 and 1"),
    ({"train_fn": "toy"}, ConfigurationError, "callable"),
    ({"train_fn": lambda m, s: float("nan")}, DataError, "NaN"),
])
def test_bad_inputs_are_typed_errors(kwargs, error, match):
    arguments = {"train_fn": toy, "rankings": RANKINGS, "fractions": (0.2,), "seeds": (0, 1)} | kwargs
    with pytest.raises(error, match=match):
        compare_curation(**arguments)


def test_unknown_method_or_fraction_in_a_result():
    result = compare_curation(toy, RANKINGS, (0.2,), (0, 1))
    assert isinstance(result, CurationComparison)
    with pytest.raises(ConfigurationError, match="choose one of"):
        result.summary("loss", 0.2)
    with pytest.raises(ConfigurationError, match="choose one of"):
        result.summary("random", 0.3)
    with pytest.raises(DataError):
        drop_order(np.array([1.0, np.nan]))
    with pytest.raises(ConfigurationError, match="lowest"):
        drop_order(WEIGHTS, drop="middle")
