"""Metrics that compare attribution scores with what retraining actually did.

- :func:`lds`: the linear datamodeling score (Park et al. 2023; SOURCE paper §2.3 and
  Appendix B.2) with percentile bootstrap intervals over queries and over subsets;
- :func:`group_predictions`: the group attribution prediction ``Σ_{m∈S} score(q, m)``;
- :func:`roc_auc` and :func:`detection`: how well a ranking finds planted examples
  (e.g. mislabeled ones) among the training data.

Scores follow srcproj's sign convention (docs/math.md §2): ``scores[q, m] > 0`` means
that including training example ``m`` helps query ``q``'s measurement, and measurements
are "higher is better". The LDS of a good method is therefore positive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

from ..errors import ConfigurationError, DataError

__all__ = [
    "DetectionResult",
    "LDSResult",
    "detection",
    "group_predictions",
    "lds",
    "roc_auc",
]

#: A column (one query) whose spread is at most this fraction of its magnitude is
#: treated as constant: such a spread is floating-point round-off (e.g. sums of equal
#: scores added in different orders), not a ranking.
_CONSTANT_RTOL = 1e-10

#: Elements (resamples × subsets × queries) handled at once by the subset bootstrap.
_BOOTSTRAP_BLOCK = 500_000


# --------------------------------------------------------------------------- inputs


def _numeric(array: object, name: str) -> np.ndarray:
    out = np.asarray(array)
    if out.dtype == bool or not np.issubdtype(out.dtype, np.number) or np.iscomplexobj(out):
        raise DataError(f"{name} must hold real numbers, got dtype {out.dtype}")
    return out.astype(np.float64, copy=False)


def _finite(array: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{name} holds {int(bad.sum())} NaN or infinite values (the first at index {first}); "
            f"remove or recompute those entries before evaluating"
        )


def _scores_2d(scores: object) -> np.ndarray:
    out = _numeric(scores, "scores")
    if out.ndim != 2:
        raise DataError(
            f"scores must be a (queries, training examples) matrix, got shape {out.shape}; "
            f"for one query pass scores[None, :]"
        )
    _finite(out, "scores")
    return out


def _masks_2d(masks: object, num_train: int, name: str = "subset_masks") -> np.ndarray:
    out = np.asarray(masks)
    if out.dtype != bool:
        raise DataError(
            f"{name} must be boolean (True = the training example was kept), got dtype "
            f"{out.dtype}; convert 0/1 masks with masks.astype(bool) (index arrays are not masks)"
        )
    if out.ndim != 2:
        raise DataError(f"{name} must be a (subsets, training examples) matrix, got shape {out.shape}")
    if out.shape[1] != num_train:
        raise DataError(
            f"scores has {num_train} training columns but {name} has {out.shape[1]}: both must "
            f"index the same training set (scores[q, m] and {name}[s, m] refer to example m)"
        )
    return out


def _constant_columns(values: np.ndarray) -> np.ndarray:
    """``(S, Q) -> (Q,)``: True where a column is constant up to round-off."""
    spread = np.ptp(values, axis=0)
    scale = np.abs(values).max(axis=0)
    return spread <= _CONSTANT_RTOL * scale


def _check_confidence(confidence: float) -> float:
    if not isinstance(confidence, (int, float, np.floating)) or not 0.0 < float(confidence) < 1.0:
        raise ConfigurationError(
            f"confidence={confidence!r}; it must be a number strictly between 0 and 1 "
            f"(e.g. 0.95 for a 95% interval)"
        )
    return float(confidence)


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigurationError(f"{name}={value!r}; it must be a positive integer")
    return int(value)


# --------------------------------------------------------------------------- LDS


def group_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The group attribution prediction of every subset and query.

    Parameters
    ----------
    scores : ndarray, shape (Q, N)
        Attribution scores; ``scores[q, m] > 0`` means example ``m`` helps query ``q``.
    masks : ndarray of bool, shape (S, N)
        ``masks[s, m]`` is True when subset ``s`` keeps training example ``m``.

    Returns
    -------
    ndarray, shape (S, Q), float64
        ``out[s, q] = Σ_{m kept by s} scores[q, m]``.

    Raises
    ------
    DataError
        If the shapes do not match, the masks are not boolean, or scores hold NaN.
    """
    scores = _scores_2d(scores)
    masks = _masks_2d(masks, scores.shape[1], name="masks")
    return masks.astype(np.float64) @ scores.T


def _pearson_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns of two ``(S, Q)`` arrays; NaN if one is constant."""
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    num = np.einsum("sq,sq->q", xc, yc)
    den = np.sqrt(np.einsum("sq,sq->q", xc, xc) * np.einsum("sq,sq->q", yc, yc))
    out = np.full(x.shape[1], np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation (average ranks for ties) of matching columns of ``(S, Q)`` arrays."""
    out = _pearson_columns(rankdata(x, axis=0), rankdata(y, axis=0))
    out[_constant_columns(x) | _constant_columns(y)] = np.nan
    return out


class _ResampledRanks:
    """Ranks of one ``(S, Q)`` array in bootstrap resamples of its rows, without sorting them.

    A resample is described by counts ``c[s]`` (how often row ``s`` was drawn; they sum to
    ``S``). Sorting each column once, the average rank of row ``j`` in the resample is
    ``(#drawn rows strictly below j) + (#drawn rows tied with j + 1) / 2``, i.e. a cumulative
    sum of the counts in sorted order read at the start and end of ``j``'s tie group.
    :meth:`twice_ranks` returns twice that rank (an integer), in sorted order.
    """

    def __init__(self, values: np.ndarray) -> None:
        num_rows, num_cols = values.shape
        self.shape = values.shape
        self.order = np.argsort(values, axis=0, kind="stable")
        ordered = np.take_along_axis(values, self.order, axis=0)
        differs = ordered[1:] != ordered[:-1]
        self.ties = not bool(differs.all())
        rows = np.arange(num_rows)[:, None]
        first = np.concatenate([np.ones((1, num_cols), bool), differs])
        last = np.concatenate([differs, np.ones((1, num_cols), bool)])
        start = np.maximum.accumulate(np.where(first, rows, 0), axis=0)
        end = np.minimum.accumulate(np.where(last, rows, num_rows - 1)[::-1], axis=0)[::-1]
        cols = np.arange(num_cols)
        # Flat indices into a (S + 1, Q) cumulative-count array.
        self.order_flat = self.order.ravel()
        self.start_flat = (start * num_cols + cols).ravel()
        self.stop_flat = ((end + 1) * num_cols + cols).ravel()

    def twice_ranks(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``counts (B, S) -> (counts in sorted order, 2 × ranks in sorted order)``, both (B, S, Q)."""
        num_rows, num_cols = self.shape
        batch = counts.shape[0]
        sorted_counts = np.take(counts, self.order_flat, axis=1).reshape(batch, num_rows, num_cols)
        cumulative = np.zeros((batch, num_rows + 1, num_cols), dtype=np.int32)
        np.cumsum(sorted_counts, axis=1, out=cumulative[:, 1:])
        if self.ties:
            flat = cumulative.reshape(batch, -1)
            twice = np.take(flat, self.start_flat, axis=1) + np.take(flat, self.stop_flat, axis=1)
            twice = twice.reshape(batch, num_rows, num_cols)
        else:
            twice = cumulative[:, :-1] + cumulative[:, 1:]
        twice += 1
        return sorted_counts, twice


def _subset_bootstrap(predictions: np.ndarray, outputs: np.ndarray, defined: np.ndarray,
                      num_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """Mean Spearman correlation over the defined queries in each subset resample, (B,)."""
    num_subsets, num_queries = predictions.shape
    pred_ranks = _ResampledRanks(predictions)
    out_ranks = _ResampledRanks(outputs)
    # Position, in the outputs' sorted order, of the row at each position of the predictions'
    # sorted order: reorders the outputs' ranks to pair with the predictions' ranks.
    inverse = np.argsort(out_ranks.order, axis=0)
    pairing = np.take_along_axis(inverse, pred_ranks.order, axis=0)
    pairing_flat = (pairing * num_queries + np.arange(num_queries)).ravel()
    centre = num_subsets + 1  # the weighted mean of 2 × rank in every resample
    block = max(1, _BOOTSTRAP_BLOCK // (num_subsets * num_queries))
    means = np.empty(num_bootstrap)
    for lo in range(0, num_bootstrap, block):
        batch = min(block, num_bootstrap - lo)
        draws = rng.integers(0, num_subsets, size=(batch, num_subsets))
        counts = np.zeros((batch, num_subsets), dtype=np.int32)
        np.add.at(counts, (np.arange(batch)[:, None], draws), 1)
        weights, rank_p = pred_ranks.twice_ranks(counts)
        _, rank_o = out_ranks.twice_ranks(counts)
        rank_o = np.take(rank_o.reshape(batch, -1), pairing_flat, axis=1)
        rank_o = rank_o.reshape(batch, num_subsets, num_queries)
        rank_p -= centre  # exact integers: 2 × rank minus its weighted mean
        rank_o -= centre
        weighted_p = weights * rank_p
        num = np.einsum("bsq,bsq->bq", weighted_p, rank_o, dtype=np.float64)
        den = np.einsum("bsq,bsq->bq", weighted_p, rank_p, dtype=np.float64)
        den *= np.einsum("bsq,bsq->bq", weights * rank_o, rank_o, dtype=np.float64)
        ok = (den > 0) & defined
        rho = np.divide(num, np.sqrt(den, where=ok, out=np.ones_like(den)), where=ok,
                        out=np.zeros_like(num))
        count = ok.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[lo:lo + batch] = np.where(count > 0, rho.sum(axis=1) / count, np.nan)
    return means


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return (float("nan"), float("nan"))
    alpha = 1.0 - confidence
    lo, hi = np.percentile(samples, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return (float(lo), float(hi))


@dataclass
class LDSResult:
    """The linear datamodeling score and its bootstrap intervals.

    Attributes
    ----------
    mean : float
        Mean Spearman correlation over the queries where it is defined.
    per_query : ndarray, shape (Q,)
        Each query's Spearman correlation; NaN where it is undefined (constant
        predictions or constant measurements over the subsets).
    ci_queries : tuple of float
        Percentile bootstrap interval of ``mean`` when resampling the queries.
    ci_subsets : tuple of float
        Percentile bootstrap interval of ``mean`` when resampling the subsets (the
        interval the SOURCE paper reports, Appendix B.2); ``str()`` shows this one.
    confidence : float
        The intervals' confidence level, e.g. 0.95.
    """

    mean: float
    per_query: np.ndarray = field(repr=False)
    ci_queries: tuple[float, float]
    ci_subsets: tuple[float, float]
    confidence: float

    def __str__(self) -> str:
        lo, hi = self.ci_subsets
        return f"{self.mean:.3f} [{lo:.3f}, {hi:.3f}]"


def lds(scores: np.ndarray, subset_masks: np.ndarray, subset_outputs: np.ndarray, *,
        num_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> LDSResult:
    """The linear datamodeling score of attribution scores against retrained models.

    For each query ``q``, the Spearman rank correlation over the subsets ``s`` between the
    group prediction ``Σ_{m kept by s} scores[q, m]`` and the measurement of the models
    retrained on subset ``s``; the LDS is the mean over queries (Park et al. 2023; SOURCE
    paper §2.3 and Appendix B.2). Ties get average ranks.

    Parameters
    ----------
    scores : ndarray, shape (Q, N)
        Attribution scores, positive = including the example helps the query.
    subset_masks : ndarray of bool, shape (S, N)
        The kept training examples of each subset (e.g. from :func:`draw_subsets`).
    subset_outputs : ndarray, shape (S, Q) or (S, R, Q)
        Measurements (higher is better, e.g. margins) of the query under models retrained
        on each subset; with ``R`` seeds per subset they are averaged over seeds first.
    num_bootstrap : int, default 1000
        Bootstrap resamples for each interval.
    confidence : float, default 0.95
        Confidence level of the percentile intervals, in (0, 1).
    seed : int, default 0
        Seed of the bootstrap resampling.

    Returns
    -------
    LDSResult
        ``mean``, ``per_query``, the interval over queries (queries resampled with
        replacement, mean of their correlations) and the interval over subsets (subsets
        resampled with replacement, every query's correlation recomputed on the resample,
        then averaged).

    Raises
    ------
    DataError
        Mismatched shapes, non-boolean masks, NaN or infinite scores or outputs, fewer than
        3 subsets, or no query with a defined correlation.
    ConfigurationError
        ``confidence`` outside (0, 1) or ``num_bootstrap`` not a positive integer.

    Notes
    -----
    A query's correlation is undefined when its group predictions are constant over the
    subsets (e.g. an all-zero score row) or its measurements are; values whose spread is
    below ``1e-10`` times their magnitude count as constant (round-off). Such queries get
    NaN in ``per_query`` and are left out of ``mean`` and of both bootstrap means (a
    nan-mean); ``np.isnan(result.per_query).sum()`` counts them. A subset resample in which
    a query's values happen to be all tied leaves that query out of that resample's mean.

    A subset resample repeats some subsets, and repeated subsets tie in both rankings;
    this lowers each resampled correlation by roughly ``0.6 / S`` on average (about 0.006
    at S = 100), as the sample Spearman correlation itself underestimates the population
    one. With many queries the subset interval can become narrower than this shift, and
    the percentile interval ``ci_subsets`` may then lie slightly below ``mean``.
    """
    confidence = _check_confidence(confidence)
    num_bootstrap = _check_positive_int(num_bootstrap, "num_bootstrap")
    scores = _scores_2d(scores)
    masks = _masks_2d(subset_masks, scores.shape[1])
    num_subsets, num_queries = masks.shape[0], scores.shape[0]
    if num_subsets < 3:
        raise DataError(
            f"subset_masks has {num_subsets} subsets; a rank correlation over subsets needs at "
            f"least 3 (the SOURCE paper uses 100; draw more with draw_subsets)"
        )
    outputs = _numeric(subset_outputs, "subset_outputs")
    if outputs.ndim not in (2, 3):
        raise DataError(
            f"subset_outputs must have shape (subsets, queries) or (subsets, seeds, queries), "
            f"got {outputs.shape}"
        )
    if outputs.shape[0] != num_subsets:
        raise DataError(
            f"subset_outputs has {outputs.shape[0]} subsets but subset_masks has {num_subsets}: "
            f"row s of both must describe the same subset"
        )
    if outputs.shape[-1] != num_queries:
        raise DataError(
            f"scores has {num_queries} queries but subset_outputs has {outputs.shape[-1]} "
            f"(its last axis): both must list the same queries in the same order"
        )
    _finite(outputs, "subset_outputs")
    if outputs.ndim == 3:
        outputs = outputs.mean(axis=1)

    predictions = masks.astype(np.float64) @ scores.T
    per_query = _spearman_columns(predictions, outputs)
    defined = ~np.isnan(per_query)
    if not defined.any():
        raise DataError(
            f"the Spearman correlation is undefined for all {num_queries} queries: their group "
            f"predictions or their retrained outputs are constant over the subsets (all-zero "
            f"scores? identical models?); check the scores and the retraining outputs"
        )
    mean = float(per_query[defined].mean())

    query_rng, subset_rng = (np.random.Generator(np.random.PCG64(s))
                             for s in np.random.SeedSequence(seed).spawn(2))
    valid = per_query[defined]
    draws = query_rng.integers(0, valid.size, size=(num_bootstrap, valid.size))
    query_means = valid[draws].mean(axis=1)
    subset_means = _subset_bootstrap(predictions, outputs, defined, num_bootstrap, subset_rng)
    return LDSResult(
        mean=mean,
        per_query=per_query,
        ci_queries=_percentile_interval(query_means, confidence),
        ci_subsets=_percentile_interval(subset_means, confidence),
        confidence=confidence,
    )


# --------------------------------------------------------------------------- detection


def _ranking_inputs(scores: object, positives: object) -> tuple[np.ndarray, np.ndarray]:
    values = _numeric(scores, "scores")
    if values.ndim != 1:
        raise DataError(f"scores must be one score per training example (1-D), got shape {values.shape}")
    _finite(values, "scores")
    labels = np.asarray(positives)
    if labels.dtype != bool:
        raise DataError(
            f"positives must be a boolean mask (True = a planted example), got dtype {labels.dtype}; "
            f"convert 0/1 labels with .astype(bool)"
        )
    if labels.shape != values.shape:
        raise DataError(
            f"scores has shape {values.shape} but positives has shape {labels.shape}: give one "
            f"flag per scored training example"
        )
    num_pos = int(labels.sum())
    if num_pos == 0 or num_pos == labels.size:
        kind = "positives" if num_pos == 0 else "negatives"
        raise DataError(
            f"positives has no {kind} ({num_pos} of {labels.size} are True): a ranking can only "
            f"be judged when both kinds are present"
        )
    return values, labels


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """ROC-AUC of ranking the positive examples above the others by ``scores``.

    Parameters
    ----------
    scores : ndarray, shape (N,)
        Higher = more suspicious (e.g. self-influence when looking for mislabeled data).
    positives : ndarray of bool, shape (N,)
        True for the planted examples to find.

    Returns
    -------
    float
        The probability that a random positive outranks a random negative, ties counted
        as one half (the Mann-Whitney U statistic divided by ``n_pos * n_neg``).

    Raises
    ------
    DataError
        Mismatched shapes, non-boolean ``positives``, NaN scores, or no positives or no
        negatives.
    """
    values, labels = _ranking_inputs(scores, positives)
    ranks = rankdata(values)
    num_pos = int(labels.sum())
    num_neg = labels.size - num_pos
    u_stat = ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u_stat / (num_pos * num_neg))


@dataclass
class DetectionResult:
    """How well a ranking finds planted examples.

    Attributes
    ----------
    auc : float
        ROC-AUC of the ranking (:func:`roc_auc`).
    found : dict of float to float
        ``found[f]`` is the fraction of all positives among the top ``f`` fraction of the
        ranking (e.g. ``found[0.1] = 0.8``: inspecting 10% of the data finds 80% of them).
    """

    auc: float
    found: dict[float, float]

    def __str__(self) -> str:
        parts = ", ".join(f"{100 * f:g}%: {v:.3f}" for f, v in self.found.items())
        return f"AUC {self.auc:.3f}; found when inspecting {parts}"


def detection(scores: np.ndarray, positives: np.ndarray,
              fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3)) -> DetectionResult:
    """ROC-AUC and the fraction of positives found when inspecting the top of a ranking.

    Parameters
    ----------
    scores : ndarray, shape (N,)
        Higher = inspected first.
    positives : ndarray of bool, shape (N,)
        True for the planted examples to find.
    fractions : sequence of float, default (0.05, 0.1, 0.2, 0.3)
        Fractions of the data inspected, each in (0, 1]; ``round(f * N)`` examples (at
        least one) are inspected for fraction ``f``.

    Returns
    -------
    DetectionResult

    Notes
    -----
    When the cut falls inside a group of tied scores, the positives of that group count
    in proportion to the places left (the expected count under random tie-breaking), so
    the result does not depend on the order of the examples.

    Raises
    ------
    DataError
        As for :func:`roc_auc`.
    ConfigurationError
        A fraction outside (0, 1] or no fractions.
    """
    values, labels = _ranking_inputs(scores, positives)
    fractions = tuple(fractions)
    if not fractions:
        raise ConfigurationError("fractions is empty; give fractions of the data to inspect, e.g. (0.1,)")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float, np.floating)) or not 0.0 < f <= 1.0:
            raise ConfigurationError(f"fractions holds {f!r}; every fraction must be in (0, 1]")
    num = values.size
    num_pos = int(labels.sum())
    descending = np.sort(values)[::-1]
    found: dict[float, float] = {}
    for f in fractions:
        k = max(1, round(float(f) * num))
        threshold = descending[k - 1]
        above = values > threshold
        tied = values == threshold
        places = k - int(above.sum())
        hits = labels[above].sum() + places * labels[tied].sum() / tied.sum()
        found[float(f)] = float(hits / num_pos)
    return DetectionResult(auc=roc_auc(values, labels), found=found)
