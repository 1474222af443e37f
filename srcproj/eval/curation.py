"""Curation checked by retraining: a curated training set against the same fraction dropped otherwise.

:func:`compare_curation` takes one or more *drop orders* of the training set (the
example to drop first comes first: srcproj's lowest influence on a validation set, the
highest final training loss, ...), drops the first ``round(f·N)`` of each for every
fraction ``f``, retrains once per seed with :func:`srcproj.eval.retrain` (cached and
resumable), and compares the mean test measurement (the accuracy when ``train_fn``
returns per-example correctness) with the same number of examples dropped at random.
Random drops are drawn afresh for every seed and fraction, so the seed-to-seed spread of
the random baseline includes the luck of the draw.

Intervals are Student-t intervals over the seeds: for a method, the seed means of its
measurement; for a comparison, the per-seed *paired* differences (the two models of one
seed share their initialisation and batch-order seed), which removes the part of the
seed noise the two have in common. With R seeds the interval is
``mean ± t_{(1+c)/2, R-1} · sd / √R`` (``sd`` with ``R - 1`` in the denominator).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from ..errors import ConfigurationError, DataError
from .retraining import TrainFunction, retrain

__all__ = [
    "CurationComparison",
    "Interval",
    "compare_curation",
    "drop_count",
    "drop_order",
    "random_drop_masks",
]

#: The name of the random baseline in a :class:`CurationComparison`.
RANDOM = "random"
#: The name of the models trained on the whole training set.
FULL = "full"


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its Student-t confidence interval.

    Attributes
    ----------
    mean : float
        The mean over the seeds.
    low, high : float
        The interval's ends.
    confidence : float
        Its confidence level, e.g. 0.95.
    seeds : int
        How many seeds it is over.
    """

    mean: float
    low: float
    high: float
    confidence: float
    seeds: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (the ``±`` of ``mean ± half_width``)."""
        return (self.high - self.low) / 2.0

    def excludes_zero(self) -> bool:
        """Whether the whole interval lies on one side of 0."""
        return self.low > 0.0 or self.high < 0.0

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.half_width:.4f}"


def t_interval(values: np.ndarray, confidence: float = 0.95) -> Interval:
    """The Student-t interval of the mean of ``values`` (one value per seed, at least 2)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) < 2:
        raise ConfigurationError(f"an interval over seeds needs at least 2 values, got {len(values)}; "
                                 "give at least 2 seeds")
    mean = float(values.mean())
    half = float(student_t.ppf((1.0 + confidence) / 2.0, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return Interval(mean, mean - half, mean + half, float(confidence), len(values))


def drop_count(num_examples: int, fraction: float) -> int:
    """How many examples a drop fraction removes: ``floor(fraction · N + 0.5)``, at most ``N - 1``.

    The same rounding as :func:`srcproj.curate`, so a drop order built with
    :func:`drop_order` from a :class:`~srcproj.Curation`'s influence reproduces its keep mask.
    """
    return min(int(math.floor(float(fraction) * num_examples + 0.5)), num_examples - 1)


def drop_order(values: np.ndarray, *, drop: str = "lowest") -> np.ndarray:
    """A drop order (the example to drop first comes first) from one value per training example.

    Parameters
    ----------
    values : numpy.ndarray
        ``(N,)`` finite values, e.g. :attr:`srcproj.Curation.influence` (``drop="lowest"``)
        or each example's final training loss (``drop="highest"``).
    drop : {"lowest", "highest"}
        Which end is dropped first. Ties keep data-set order.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` int64, a permutation of ``0..N-1``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2 or not np.isfinite(values).all():
        raise DataError(f"values must be a finite 1-D array with one value per training example (at least 2); "
                        f"got shape {values.shape}" + ("" if np.isfinite(values).all() else " holding NaN or inf"))
    if drop == "lowest":
        return np.argsort(values, kind="stable").astype(np.int64)
    if drop == "highest":
        return np.argsort(-values, kind="stable").astype(np.int64)
    raise ConfigurationError(f"drop={drop!r}; choose 'lowest' (e.g. influence) or 'highest' (e.g. training loss)")


def random_drop_masks(num_examples: int, fraction: float, seed: int, draws: int = 1,
                      random_seed: int = 0) -> np.ndarray:
    """The keep masks of the random baseline for one retraining seed and one fraction.

    Each mask drops :func:`drop_count` examples drawn uniformly without replacement; the
    draws depend only on ``(random_seed, seed, round(fraction · 10⁶))``, so they are the
    same in every run and differ between seeds and fractions.

    Returns
    -------
    numpy.ndarray
        ``(draws, N)`` bool keep masks.
    """
    count = drop_count(num_examples, fraction)
    rng = np.random.default_rng([int(random_seed), int(seed), int(round(float(fraction) * 1_000_000))])
    masks = np.ones((draws, num_examples), dtype=bool)
    for row in masks:
        row[rng.choice(num_examples, size=count, replace=False)] = False
    return masks


@dataclass(frozen=True)
class _Measured:
    """Wraps ``train_fn`` so that one number per model becomes a ``(1,)`` measurement (picklable)."""

    train_fn: Any
    batched: bool

    def __call__(self, masks: np.ndarray, seeds: Any) -> np.ndarray:
        out = np.asarray(self.train_fn(masks, seeds), dtype=np.float64)
        if self.batched and out.ndim == 1:
            return out[:, None]
        if not self.batched:
            return out.reshape(-1)
        return out


@dataclass(frozen=True)
class CurationComparison:
    """The outcome of :func:`compare_curation`.

    Attributes
    ----------
    methods : tuple of str
        The drop orders' names in the order given, then ``"random"``.
    fractions : tuple of float
        The fractions dropped.
    seeds : tuple of int
        The retraining seeds.
    counts : tuple of int
        Examples dropped at each fraction.
    values : numpy.ndarray
        ``(methods, fractions, seeds)``: the mean test measurement (accuracy) of each
        retrained model; for ``"random"`` the mean over that seed's ``random_draws`` draws.
    full : numpy.ndarray
        ``(seeds,)``: the same for the models trained on the whole training set.
    confidence : float
        The intervals' confidence level.
    random_draws : int
        Random drops per seed and fraction.
    num_examples : int
        N, the size of the training set.
    """

    methods: tuple[str, ...]
    fractions: tuple[float, ...]
    seeds: tuple[int, ...]
    counts: tuple[int, ...]
    values: np.ndarray
    full: np.ndarray
    confidence: float
    random_draws: int
    num_examples: int

    def _index(self, method: str, fraction: float) -> tuple[int, int]:
        if method not in self.methods:
            raise ConfigurationError(f"method={method!r}; choose one of {list(self.methods)}")
        for j, f in enumerate(self.fractions):
            if math.isclose(f, float(fraction), rel_tol=0, abs_tol=1e-12):
                return self.methods.index(method), j
        raise ConfigurationError(f"fraction={fraction!r}; choose one of {list(self.fractions)}")

    def per_seed(self, method: str, fraction: float) -> np.ndarray:
        """``(seeds,)``: the method's test measurement at that fraction, one per seed."""
        i, j = self._index(method, fraction)
        return self.values[i, j].copy()

    def summary(self, method: str, fraction: float) -> Interval:
        """The method's mean test measurement over seeds at that fraction, with its t-interval."""
        return t_interval(self.per_seed(method, fraction), self.confidence)

    def full_summary(self) -> Interval:
        """The mean test measurement of the models trained on every example, with its t-interval."""
        return t_interval(self.full, self.confidence)

    def difference(self, method: str, against: str, fraction: float) -> Interval:
        """``method`` minus ``against`` at that fraction: the mean of the per-seed paired
        differences and its t-interval (positive: ``method`` measured higher)."""
        return t_interval(self.per_seed(method, fraction) - self.per_seed(against, fraction), self.confidence)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (method, fraction): the mean, the interval and, for every other
        method, the paired difference (``minus <other>``, ``minus <other> low/high``)."""
        out = []
        for j, fraction in enumerate(self.fractions):
            for method in self.methods:
                s = self.summary(method, fraction)
                row: dict[str, Any] = {"method": method, "fraction": fraction, "dropped": self.counts[j],
                                       "mean": s.mean, "low": s.low, "high": s.high, "seeds": s.seeds}
                for other in self.methods:
                    if other != method:
                        d = self.difference(method, other, fraction)
                        row[f"minus {other}"] = d.mean
                        row[f"minus {other} low"] = d.low
                        row[f"minus {other} high"] = d.high
                out.append(row)
        return out

    def table(self, against: Sequence[str] | None = None) -> str:
        """A plain-text table: per fraction and method, the mean ± t half-width, and the
        paired difference (with its interval) against each method of ``against``
        (default: ``"random"`` and every other drop order)."""
        against = list(self.methods[::-1] if against is None else against)
        for name in against:
            self._index(name, self.fractions[0])
        pct = round(100 * self.confidence)
        full = self.full_summary()
        lines = [f"test measurement over {len(self.seeds)} seeds, {pct}% t-intervals (paired over seeds for "
                 f"differences); N = {self.num_examples:,}; trained on every example: {full}"]
        header = f"{'drop':>6} {'dropped':>7}  {'method':<16} {'mean ± half':>17}"
        for name in against:
            header += f"  {'minus ' + name:>30}"
        lines.append(header)
        for j, fraction in enumerate(self.fractions):
            for method in self.methods:
                s = self.summary(method, fraction)
                line = f"{fraction:>6.0%} {self.counts[j]:>7,}  {method:<16} {str(s):>17}"
                for name in against:
                    if name == method:
                        line += f"  {'':>30}"
                        continue
                    d = self.difference(method, name, fraction)
                    line += f"  {f'{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]':>30}"
                lines.append(line)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_fractions(fractions: Sequence[float], num_examples: int) -> tuple[float, ...]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ConfigurationError(f"fractions={fractions!r}; give a sequence of numbers in (0, 1), "
                                 "e.g. (0.1, 0.2, 0.3)") from None
    if not values:
        raise ConfigurationError("fractions is empty; give at least one fraction to drop, e.g. (0.1, 0.2, 0.3)")
    for f in values:
        if not (math.isfinite(f) and 0.0 < f < 1.0):
            raise ConfigurationError(f"fraction {f!r} must lie strictly between 0 and 1 (0.1 drops 10%)")
        if drop_count(num_examples, f) < 1:
            raise ConfigurationError(f"fraction {f!r} of {num_examples} examples drops none; choose a larger "
                                     "fraction")
    if len(set(values)) != len(values):
        raise ConfigurationError(f"fractions={list(values)} repeats a value; give each fraction once")
    return values


def _check_rankings(rankings: Mapping[str, Any]) -> tuple[list[str], list[np.ndarray], int]:
    if not isinstance(rankings, Mapping) or not rankings:
        raise ConfigurationError("rankings must be a non-empty dict {name: drop order}, e.g. "
                                 "{'srcproj': drop_order(curation.influence)}")
    names, orders, size = [], [], None
    for name, order in rankings.items():
        if not isinstance(name, str) or not name or name in (RANDOM, FULL):
            raise ConfigurationError(f"ranking name {name!r}: use a non-empty string other than {RANDOM!r} and "
                                     f"{FULL!r} (those name the random baseline and the full training set)")
        array = np.asarray(order)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"ranking {name!r} must be a 1-D integer drop order (the index of the example to drop "
                            f"first comes first), got dtype {array.dtype} and shape {array.shape}; build it "
                            "with drop_order(values)")
        if size is None:
            size = len(array)
        if len(array) != size:
            raise DataError(f"ranking {name!r} orders {len(array)} examples and {names[0]!r} orders {size}; every "
                            "ranking must order the same training set")
        if size < 2 or not np.array_equal(np.sort(array), np.arange(size)):
            raise DataError(f"ranking {name!r} is not a permutation of 0..{size - 1}: each training example must "
                            "appear exactly once; build it with drop_order(values)")
        names.append(name)
        orders.append(array.astype(np.int64))
    return names, orders, int(size)


def compare_curation(
    train_fn: TrainFunction,
    rankings: Mapping[str, np.ndarray],
    fractions: Sequence[float],
    seeds: Sequence[int],
    *,
    random_draws: int = 1,
    random_seed: int = 0,
    confidence: float = 0.95,
    cache_dir: str | os.PathLike | None = None,
    processes: int = 1,
    models_per_call: int = 1,
    progress: bool = False,
) -> CurationComparison:
    """Retrain on curated training sets and compare them with random drops, over seeds.

    For every fraction ``f`` and every seed, one model is trained per drop order with
    its first ``round(f·N)`` examples left out, ``random_draws`` models with that many
    examples left out at random (drawn for that seed and fraction), and, once per seed,
    one model on every example.

    Parameters
    ----------
    train_fn : callable
        ``train_fn(keep_mask, seed)`` returns the trained model's test measurement: one
        number (e.g. the test accuracy) or a ``(Q,)`` array (e.g. each test example's
        correctness, 0 or 1), whose mean is used. With ``models_per_call > 1`` it is
        called as ``train_fn(masks, seeds)`` with ``(M, N)`` masks that all drop the same
        number of examples, and returns ``(M,)`` or ``(M, Q)``. Measure on a test split
        that the rankings did not see. With ``processes > 1`` it must be picklable.
    rankings : dict of str to numpy.ndarray
        Drop orders by name: permutations of ``0..N-1``, the example to drop first
        first (:func:`drop_order`). The names ``"random"`` and ``"full"`` are reserved.
    fractions : sequence of float
        Fractions of the training set to drop, each in (0, 1).
    seeds : sequence of int
        Retraining seeds, at least 2 (the intervals are over them).
    random_draws : int
        Random drops per seed and fraction; their mean is that seed's random value.
    random_seed : int
        Decides the random drops (with the seed and the fraction).
    confidence : float
        The intervals' level, in (0, 1).
    cache_dir : path, optional
        Where every model's measurement is kept (:func:`srcproj.eval.retrain`): a rerun
        skips the models already trained. One folder per ``train_fn`` and test split.
    processes, models_per_call, progress
        As in :func:`srcproj.eval.retrain`.

    Returns
    -------
    CurationComparison
        Per method and fraction the per-seed measurements, with t-intervals and paired
        differences.
    """
    names, orders, num_examples = _check_rankings(rankings)
    fractions = _check_fractions(fractions, num_examples)
    try:
        seeds = tuple(int(s) for s in seeds)
    except (TypeError, ValueError):
        raise ConfigurationError(f"seeds={seeds!r}; give a sequence of integers, e.g. range(10)") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ConfigurationError(f"seeds={list(seeds)}; give at least 2 distinct seeds (the intervals are over "
                                 "seeds)")
    for name, value in (("random_draws", random_draws), ("processes", processes),
                        ("models_per_call", models_per_call)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigurationError(f"{name}={value!r}; it must be a positive integer")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ConfigurationError(f"confidence={confidence!r}; it must lie strictly between 0 and 1, e.g. 0.95")
    if not callable(train_fn):
        raise ConfigurationError("train_fn must be callable: train_fn(keep_mask, seed) -> test measurement")
    batched = models_per_call > 1
    measured = _Measured(train_fn, batched)
    options = {"cache_dir": cache_dir, "processes": processes, "progress": progress,
               "models_per_call": models_per_call}

    def run(masks: np.ndarray, run_seeds: Sequence[int]) -> np.ndarray:
        out = retrain(measured, masks, run_seeds, **options)  # (S, R, Q)
        return out.mean(axis=2)

    values = np.empty((len(names) + 1, len(fractions), len(seeds)))
    counts = []
    for j, fraction in enumerate(fractions):
        count = drop_count(num_examples, fraction)
        counts.append(count)
        masks = np.ones((len(names), num_examples), dtype=bool)
        for i, order in enumerate(orders):
            masks[i, order[:count]] = False
        values[:len(names), j] = run(masks, seeds)
        for r, seed in enumerate(seeds):
            random_masks = random_drop_masks(num_examples, fraction, seed, random_draws, random_seed)
            values[len(names), j, r] = run(random_masks, [seed])[:, 0].mean()
    full = run(np.ones((1, num_examples), dtype=bool), seeds)[0]
    return CurationComparison(tuple(names) + (RANDOM,), fractions, seeds, tuple(counts), values, full,
                              float(confidence), int(random_draws), num_examples)
