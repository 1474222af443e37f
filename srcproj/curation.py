"""Curating a training set: rank its examples by their influence on a validation set.

An example's influence on the validation set is its scores on every validation
example combined into one number (:meth:`AttributionMethod.aggregate_scores`): the
mean or the total, which predict the effect of removing it on the summed
measurement, or the worst case, its most harmful effect on any one validation
example. The examples with the lowest influence are the ones whose removal the
scores predict helps the validation set most; :func:`curate` drops them, by fraction
or below a threshold, and returns a keep mask aligned with the data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigurationError
from .scoring import DEFAULT_MEMORY_BYTES, REDUCTIONS
from .validation import check_choice, check_finite, check_probability

__all__ = ["Curation", "check_rule", "curate", "keep_mask"]


@dataclass(frozen=True)
class Curation:
    """The outcome of :func:`curate`, one entry per training example, in data-set order.

    Attributes
    ----------
    influence : numpy.ndarray
        ``(N,)`` float64: the example's aggregated score on the validation set
        (positive: including it helps).
    keep : numpy.ndarray
        ``(N,)`` bool: the examples kept.
    aggregate : str
        ``"mean"``, ``"total"`` or ``"worst"``.
    rule : str
        What was dropped, in words (``"the 72 examples (0.05 of 1,437) with the lowest mean
        influence"``).
    """

    influence: np.ndarray
    keep: np.ndarray
    aggregate: str
    rule: str

    @property
    def drop(self) -> np.ndarray:
        """``(N,)`` bool: the examples dropped (``~keep``)."""
        return ~self.keep

    @property
    def rank(self) -> np.ndarray:
        """``(N,)`` int: 1 for the lowest influence (the first to drop), ``N`` for the highest;
        ties in data-set order."""
        order = np.argsort(self.influence, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        return rank


def check_rule(drop_fraction: float | None = None, threshold: float | None = None) -> None:
    """Refuse a curation rule that is not exactly one of a fraction in ``[0, 1)`` and a
    finite threshold, before anything is scored."""
    if (drop_fraction is None) == (threshold is None):
        raise ConfigurationError("give exactly one of drop_fraction (e.g. 0.1: drop the 10% with the lowest "
                                 "influence) and threshold (drop the examples whose influence is below it)")
    if drop_fraction is not None:
        check_probability(drop_fraction, "drop_fraction", allow_one=False,
                          hint=": the fraction of the training set to drop")
    else:
        check_finite(threshold, "threshold")


def keep_mask(influence: np.ndarray, *, drop_fraction: float | None = None,
              threshold: float | None = None) -> tuple[np.ndarray, str]:
    """The keep mask of an influence vector and the rule in words.

    Give exactly one of ``drop_fraction`` (drop the ``round(fraction · N)`` examples
    with the lowest influence, ties in data-set order) or ``threshold`` (drop every
    example whose influence is below it).
    """
    influence = np.asarray(influence, dtype=np.float64)
    if influence.ndim != 1 or not np.isfinite(influence).all():
        raise ConfigurationError("influence must be a finite 1-D array, one value per training example")
    check_rule(drop_fraction, threshold)
    keep = np.ones(len(influence), dtype=bool)
    if drop_fraction is not None:
        fraction = float(drop_fraction)
        count = min(int(math.floor(fraction * len(influence) + 0.5)), len(influence) - 1)
        keep[np.argsort(influence, kind="stable")[:count]] = False
        return keep, f"the {count:,} examples ({fraction:.4g} of {len(influence):,}) with the lowest influence"
    limit = check_finite(threshold, "threshold")
    keep = influence >= limit
    if not keep.any():
        raise ConfigurationError(f"threshold={limit:g} drops every one of the {len(influence):,} examples (the highest "
                                 f"influence is {influence.max():.6g}); give a lower threshold, or a drop_fraction")
    return keep, f"the {int((~keep).sum()):,} examples with influence below {limit:.6g}"


def curate(method: Any, validation: Any, *, aggregate: str = "mean", drop_fraction: float | None = None,
           threshold: float | None = None, batch_size: int = 64,
           score_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> Curation:
    """Rank the training examples by their influence on ``validation`` and drop the lowest.

    Parameters
    ----------
    method : Attributor or AttributionMethod
        A featurized attribution (any method with ``aggregate_scores``).
    validation : Dataset or tuple (X, y)
        The examples whose measurement the curated set should serve.
    aggregate : {"mean", "total", "worst"}
        How an example's scores on the validation examples become one number: their
        mean or sum, or the lowest of them (its most harmful effect on any one).
    drop_fraction : float, optional
        Drop this fraction of the training set, lowest influence first.
    threshold : float, optional
        Drop every example whose influence is below this value (``0``: every example
        predicted to hurt). Give exactly one of ``drop_fraction`` and ``threshold``.
    batch_size, score_memory_bytes
        As in :meth:`Attributor.score`.

    Returns
    -------
    Curation
        The influence, the keep mask (aligned with the training data set) and the rule.
    """
    check_choice(aggregate, "aggregate", REDUCTIONS)
    check_rule(drop_fraction, threshold)  # before scoring
    influence = method.aggregate_scores(validation, aggregate, batch_size=batch_size,
                                        score_memory_bytes=score_memory_bytes)
    keep, rule = keep_mask(influence, drop_fraction=drop_fraction, threshold=threshold)
    return Curation(influence, keep, aggregate, rule.replace("influence", f"{aggregate} influence", 1))
