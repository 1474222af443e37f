"""Subset-removal counterfactual evaluation (SOURCE paper §5.4 and Appendix B.3).

For each query, remove its top-``k`` most helpful training examples according to the
attribution scores, retrain (several seeds), and check whether the query becomes
misclassified: its measurement (a margin, negative = misclassified), averaged over the
seeds, falls below zero. The same is done for a random baseline that removes ``k``
random training examples of the query's class. Sizes are tried from the smallest up,
and a query that flipped is not retrained at larger sizes, so the reported fraction at
``k`` is the fraction of queries flipped by removing *at most* ``k`` examples.

Choose the queries before calling: the evaluation is meant for queries that the models
trained on the full data classify correctly on every seed (:func:`select_correct`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigurationError, DataError
from .metrics import _finite, _numeric, _scores_2d
from .retraining import retrain

__all__ = ["RemovalResult", "removal_evaluation", "select_correct"]


@dataclass
class RemovalResult:
    """Fractions of queries flipped by removing at most ``k`` training examples.

    Attributes
    ----------
    sizes : tuple of int
        The removal sizes ``k``, increasing.
    flipped : ndarray, shape (len(sizes),)
        Fraction of queries misclassified (mean margin over seeds < 0) after removing at
        most ``sizes[i]`` of their top helpful examples (cumulative over sizes).
    random_flipped : ndarray, shape (len(sizes),)
        The same for the random same-class removal.
    per_query_size : ndarray of int, shape (Q,)
        The smallest size that flipped each query with the method's removal; 0 if none did.
    random_per_query_size : ndarray of int, shape (Q,)
        The same for the random baseline.
    """

    sizes: tuple[int, ...]
    flipped: np.ndarray
    random_flipped: np.ndarray
    per_query_size: np.ndarray
    random_per_query_size: np.ndarray

    def __str__(self) -> str:
        num_queries = self.per_query_size.size
        head = f"fraction of {num_queries} queries flipped"
        width = max(len("removed at most"), *(len(str(s)) for s in self.sizes))
        lines = [head, f"{'removed at most':>{width}} | method | random"]
        for size, ours, rand in zip(self.sizes, self.flipped, self.random_flipped, strict=False):
            lines.append(f"{size:>{width}} | {ours:6.3f} | {rand:6.3f}")
        return "\n".join(lines)


def select_correct(full_outputs: np.ndarray) -> np.ndarray:
    """The queries that models trained on the full data classify correctly on every seed.

    Parameters
    ----------
    full_outputs : ndarray, shape (R, Q) or (Q,)
        Margins (negative = misclassified) of the queries under ``R`` models trained on
        all the training data with different seeds, e.g. ``retrain(train_fn,
        np.ones((1, N), bool), seeds)[0]``.

    Returns
    -------
    ndarray of bool, shape (Q,)
        True where the margin is positive for every seed.
    """
    outputs = _numeric(full_outputs, "full_outputs")
    if outputs.ndim == 1:
        outputs = outputs[None, :]
    if outputs.ndim != 2:
        raise DataError(f"full_outputs must have shape (seeds, queries) or (queries,), got {outputs.shape}")
    _finite(outputs, "full_outputs")
    return (outputs > 0).all(axis=0)


def _check_sizes(sizes: Sequence[int], num_train: int) -> tuple[int, ...]:
    try:
        values = tuple(sizes)
    except TypeError:
        raise ConfigurationError(f"sizes={sizes!r}; give an increasing sequence of removal sizes") from None
    if not values:
        raise ConfigurationError("sizes is empty; give at least one removal size, e.g. (10, 20, 40)")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigurationError(f"sizes holds {value!r}; every removal size must be a positive integer")
    values = tuple(int(v) for v in values)
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ConfigurationError(f"sizes={values}; they must be strictly increasing (smallest first)")
    if values[-1] >= num_train:
        raise ConfigurationError(
            f"sizes={values}: removing {values[-1]} of the {num_train} training examples leaves too "
            f"few; every size must be below the number of training examples"
        )
    return values


def _labels(labels: object, length: int, name: str, what: str) -> np.ndarray:
    out = np.asarray(labels)
    if out.ndim != 1 or out.shape[0] != length:
        raise DataError(f"{name} has shape {out.shape} but scores has {length} {what}: give one label per {what[:-1]}")
    return out


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _random_removals(train_labels: np.ndarray, query_labels: np.ndarray, count: int,
                     random_seed: int) -> np.ndarray:
    """``(Q, count)``: for each query, ``count`` distinct training indices of its class.

    Query ``q``'s draw is seeded by ``(random_seed, q)``; removing the first ``k`` of them
    gives nested removals across sizes.
    """
    out = np.empty((query_labels.size, count), dtype=np.int64)
    for q, label in enumerate(query_labels):
        same = np.flatnonzero(train_labels == label)
        if same.size < count:
            raise DataError(
                f"query {q} has label {_plain(label)!r}, of which the training data holds {same.size} "
                f"examples; the random baseline removes up to {count} of them: use smaller sizes "
                f"or leave such queries out"
            )
        rng = np.random.default_rng([random_seed, q])
        out[q] = rng.choice(same, size=count, replace=False)
    return out


def removal_evaluation(
    scores: np.ndarray,
    train_labels: np.ndarray,
    query_labels: np.ndarray,
    train_fn: Callable[[np.ndarray, int], np.ndarray],
    sizes: Sequence[int] = (10, 20, 40),
    seeds: Sequence[int] = (0, 1, 2),
    cache_dir: str | os.PathLike | None = None,
    processes: int = 1,
    random_seed: int = 0,
    progress: bool = True,
    models_per_call: int = 1,
) -> RemovalResult:
    """Remove each query's top helpful examples, retrain, and count flipped predictions.

    For each size ``k`` (smallest first) and each query ``q`` not flipped yet, the model is
    retrained without ``q``'s ``k`` highest-scoring training examples, once per seed; ``q``
    flips when the mean of ``train_fn``'s output for ``q`` over the seeds is below zero.
    The random baseline removes ``k`` random training examples with ``q``'s label instead
    (seeded by ``random_seed`` and ``q``; the removal at a larger size contains the one at
    a smaller size). All retrainings of one size, method and baseline together, go to one
    :func:`~srcproj.eval.retrain` call, so ``processes`` workers share them; identical
    masks are trained once.

    Parameters
    ----------
    scores : ndarray, shape (Q, N)
        Attribution scores; positive = including the example helps the query. The top
        ``k`` by score are removed whatever their sign.
    train_labels : array, shape (N,)
        Class of every training example (for the random same-class baseline).
    query_labels : array, shape (Q,)
        Class of every query.
    train_fn : callable
        ``train_fn(keep_mask (N,) bool, seed) -> (Q,)`` margins of all queries (positive =
        correctly classified) under a model trained on the kept examples; picklable when
        ``processes > 1``.
    sizes : sequence of int, default (10, 20, 40)
        Removal sizes, strictly increasing, each below N.
    seeds : sequence of int, default (0, 1, 2)
        Retraining seeds; the margin is averaged over them.
    cache_dir : path, optional
        Passed to :func:`~srcproj.eval.retrain`: finished models are kept there, so an
        interrupted evaluation resumes. One folder per training recipe and query set.
    processes : int, default 1
        Worker processes for retraining.
    random_seed : int, default 0
        Seed of the random baseline.
    progress : bool, default True
        Show :func:`~srcproj.eval.retrain`'s progress bar.
    models_per_call : int, default 1
        Passed to :func:`~srcproj.eval.retrain` (a batched ``train_fn``).

    Returns
    -------
    RemovalResult

    Raises
    ------
    DataError
        Shapes of scores and labels that do not match, NaN scores, a query class with fewer
        training examples than the largest size, or a ``train_fn`` that returns another
        number of queries than ``scores`` has.
    ConfigurationError
        Sizes that are not positive, strictly increasing and below N, or empty seeds.

    Notes
    -----
    Select the queries before calling: the paper evaluates only queries that the models
    trained on the full data classify correctly on every seed, and a query that is already
    misclassified would count as flipped at the smallest size. :func:`select_correct` does
    this selection from the full-data margins. The retraining cost is at most
    ``2 · len(sizes) · Q · len(seeds)`` models.
    """
    scores = _scores_2d(scores)
    num_queries, num_train = scores.shape
    train_labels = _labels(train_labels, num_train, "train_labels", "training examples")
    query_labels = _labels(query_labels, num_queries, "query_labels", "queries")
    sizes = _check_sizes(sizes, num_train)
    seeds = list(seeds)
    if not seeds:
        raise ConfigurationError("seeds is empty; give at least one retraining seed, e.g. (0, 1, 2)")
    if not callable(train_fn):
        raise ConfigurationError(f"train_fn must be callable (keep_mask, seed) -> margins, got {train_fn!r}")
    if isinstance(random_seed, bool) or not isinstance(random_seed, (int, np.integer)) or random_seed < 0:
        raise ConfigurationError(f"random_seed={random_seed!r}; it must be a non-negative integer")

    largest = sizes[-1]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :largest]
    random_top = _random_removals(train_labels, query_labels, largest, int(random_seed))
    found = {"method": np.zeros(num_queries, dtype=np.int64),
             "random": np.zeros(num_queries, dtype=np.int64)}
    removals = {"method": top, "random": random_top}

    for size in sizes:
        jobs: list[tuple[str, int, int]] = []  # (which, query, row of the unique masks)
        unique: dict[bytes, int] = {}
        rows: list[np.ndarray] = []
        for which, removed in removals.items():
            for q in np.flatnonzero(found[which] == 0):
                mask = np.ones(num_train, dtype=bool)
                mask[removed[q, :size]] = False
                key = np.packbits(mask).tobytes()
                if key not in unique:
                    unique[key] = len(rows)
                    rows.append(mask)
                jobs.append((which, int(q), unique[key]))
        if not jobs:
            break
        outputs = retrain(train_fn, np.stack(rows), seeds, cache_dir=cache_dir, processes=processes,
                          progress=progress, models_per_call=models_per_call)
        if outputs.shape[2] != num_queries:
            raise DataError(
                f"train_fn returned {outputs.shape[2]} measurements per model but scores has "
                f"{num_queries} queries: it must return the margin of every query, in order"
            )
        mean = outputs.mean(axis=1)
        for which, q, row in jobs:
            if mean[row, q] < 0:
                found[which][q] = size

    sizes_arr = np.asarray(sizes)

    def cumulative(first: np.ndarray) -> np.ndarray:
        hit = (first[None, :] > 0) & (first[None, :] <= sizes_arr[:, None])
        return hit.mean(axis=1) if num_queries else np.zeros(len(sizes))

    return RemovalResult(
        sizes=sizes,
        flipped=cumulative(found["method"]),
        random_flipped=cumulative(found["random"]),
        per_query_size=found["method"],
        random_per_query_size=found["random"],
    )
