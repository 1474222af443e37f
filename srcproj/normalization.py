"""Normalised scores for explanation by example: the two sides of ``-Ψ Tᵀ`` rescaled.

A raw score ``s(q, i) = -ψ_qᵀ t_i`` is the predicted effect on query ``q`` of including training
example ``i`` (removing it has the opposite effect): examples with large training-side rows ``t_i`` (large, often
unusual gradients) dominate every query's ranking. Normalising asks another question,
"which training examples does the model treat most like this query", and divides
(docs/concepts.md, "Raw and normalised scores: which question each answers"):

- ``"none"``: ``s(q, i)``, the raw score;
- ``"train"``: ``s(q, i) / ‖t_i‖``, each training example's column divided by the
  Euclidean norm of its training-side row (for SOURCE, the row of the cache: the
  example's projected gradients through the trajectory's unrolling operators);
- ``"both"``: ``s(q, i) / (‖t_i‖ ‖ψ_q‖)``, also each query's row divided by the norm of
  its query-side row; the score is then ``-cos(ψ_q, t_i)``, in ``[-1, 1]``.

Both norms are of the method's own two sides, so every
:class:`~srcproj.method.AttributionMethod` gets the option, and it streams: the
training norms take one extra pass over the training side (``N × k`` reads, no
gradients), the query norms are taken batch by batch, and no ``(Q, N)`` matrix is
held. The norm of ``t_i`` is used rather than RelatIF's ``√(self-influence)``: it is
always defined (SOURCE's self-influence can be zero or negative), needs no gradients
of the training examples, and gave the highest top-5 label agreement on every digits
scenario of ``benchmarks/normalized.py`` (RelatIF keeps more of the raw score's LDS;
docs/concepts.md has the table). A row of norm zero scores 0 against everything.
Rankings and LDS are the same under ``"train"`` and ``"both"`` (a query's scores are
divided by one positive number); ``"both"`` makes scores comparable across queries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigurationError, NonFiniteGradientError
from .method import AttributionMethod
from .scoring import DEFAULT_MEMORY_BYTES, BlockReader, Cache, Queries, check_memory_bytes, plan_blocks

__all__ = [
    "NORMALIZATIONS",
    "Normalized",
    "check_normalize",
    "normalize_sides",
    "normalized_queries",
    "normalized_training",
    "training_norms",
]

#: The normalisations of :func:`normalize_sides` (and of ``score``/``top_k``'s ``normalize``).
NORMALIZATIONS = ("none", "train", "both")


def check_normalize(value: Any, name: str = "normalize") -> str:
    """``value`` as one of :data:`NORMALIZATIONS`, or :class:`ConfigurationError` naming them."""
    if not isinstance(value, str) or value not in NORMALIZATIONS:
        raise ConfigurationError(
            f"{name}={value!r}; choose 'none' (raw scores: the predicted effect of including the training "
            "example), 'train' (each training example's scores divided by the norm of its training-side row) or "
            "'both' (also each query's scores divided by its norm: a cosine)"
        )
    return value


def _safe(norms: np.ndarray, what: str) -> np.ndarray:
    """``norms`` with zeros replaced by 1 (those rows are zero: they stay 0); non-finite refused."""
    bad = np.flatnonzero(~np.isfinite(norms))
    if bad.size:
        raise NonFiniteGradientError(
            f"{bad.size} {what} rows hold NaN or inf (first: row {int(bad[0])}), so their norms cannot normalise "
            "the scores; recompute the features (e.g. featurize with feature_dtype='float32'), or score with "
            "normalize='none'"
        )
    return np.where(norms > 0, norms, 1.0)


def training_norms(cache: Cache, memory_bytes: int = DEFAULT_MEMORY_BYTES, *,
                   name: str = "score_memory_bytes") -> np.ndarray:
    """``‖t_i‖`` of every training-side row, ``(N,)`` in float64, read block by block.

    ``memory_bytes`` bounds the rows read at once (the block and its float64 copy).
    """
    item = np.dtype(cache.dtype).itemsize
    plan = plan_blocks(1, cache, memory_bytes, cell_bytes=0.0, query_row_bytes=0.0,
                       row_bytes=cache.dim * (cache.copies * item + 8), name=name)
    out = np.empty(cache.num_rows, dtype=np.float64)
    for start, stop in plan.row_blocks():
        block = np.asarray(cache.read(start, stop), dtype=np.float64)
        out[start:stop] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


def normalized_training(cache: Cache, norms: np.ndarray) -> Cache:
    """The training side with row ``i`` divided by ``norms[i]`` (a zero norm leaves the row zero)."""
    norms = np.asarray(norms, dtype=np.float64)
    if norms.shape != (cache.num_rows,):
        raise ConfigurationError(f"norms has shape {norms.shape}; it must be ({cache.num_rows},), one per training row")
    # Divided in the cache's precision: the quotient's rounding (one ulp) is all it adds.
    divisors = _safe(norms, "training-side").astype(cache.dtype)

    def read(start: int, stop: int) -> np.ndarray:
        return np.asarray(cache.read(start, stop)) / divisors[start:stop, None]

    read_into = None
    if cache.read_into is not None:
        source = cache.read_into

        def read_into(start: int, stop: int, out: np.ndarray) -> np.ndarray:
            rows = source(start, stop, out)
            rows /= divisors[start:stop, None]
            return rows

    # Without read_into, a read holds the raw block and the quotient.
    copies = cache.copies if read_into is not None else cache.copies + 1
    return Cache(read, cache.num_rows, cache.dim, np.dtype(cache.dtype), cache.chunk_rows, copies=copies,
                 read_into=read_into)


def normalized_queries(queries: Queries) -> Queries:
    """The query side with each row divided by its own norm (a zero row stays zero)."""
    def read(start: int, stop: int) -> np.ndarray:
        rows = np.asarray(queries.read(start, stop))
        wide = rows.astype(np.float64)
        norms = _safe(np.sqrt(np.einsum("ij,ij->i", wide, wide)), "query-side")
        return (wide / norms[:, None]).astype(rows.dtype if rows.dtype.kind == "f" else np.float64)

    return Queries(read, queries.count)


def normalize_sides(training: Cache, queries: Queries, normalize: str,
                    memory_bytes: int = DEFAULT_MEMORY_BYTES, *,
                    name: str = "score_memory_bytes") -> tuple[Cache, Queries]:
    """The two sides whose product ``-Ψ Tᵀ`` is the ``normalize`` score (see the module docstring).

    Parameters
    ----------
    training : Cache
        ``T``, one row per training example.
    queries : Queries
        ``Ψ``, one row per query.
    normalize : {"none", "train", "both"}
        What the scores are divided by.
    memory_bytes : int
        Bound on the rows read at once while the training norms are taken.

    Returns
    -------
    (Cache, Queries)
        The rescaled sides (the same objects for ``"none"``).
    """
    normalize = check_normalize(normalize)
    if normalize == "none":
        return training, queries
    training = normalized_training(training, training_norms(training, memory_bytes, name=name))
    if normalize == "both":
        queries = normalized_queries(queries)
    return training, queries


class Normalized(AttributionMethod):
    """Another method's scores, normalised: ``-Ψ Tᵀ`` with rescaled sides.

    ``Normalized(method, "train").score(q)`` equals ``method.score(q, normalize="train")``;
    the wrapper lets a normalised method go wherever a method goes (an
    :class:`~srcproj.baselines.Ensemble`, :meth:`aggregate_scores`).

    Parameters
    ----------
    method : AttributionMethod
        The method whose sides are rescaled (SOURCE, an Attributor, a baseline).
    normalize : {"train", "both"}
        What the scores are divided by (module docstring); ``"none"`` is ``method`` itself.
    score_memory_bytes : int
        Bound on the rows read at once while the training norms are taken (default 1 GiB).
    """

    def __init__(self, method: AttributionMethod, normalize: str = "train", *,
                 score_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        if not isinstance(method, AttributionMethod):
            raise ConfigurationError(f"Normalized needs a srcproj attribution method (an Attributor or a baseline); "
                                     f"got {type(method).__name__}")
        self.method = method
        self.normalize = check_normalize(normalize)
        self.memory = check_memory_bytes(score_memory_bytes)
        self.name = method.name if self.normalize == "none" else f"{method.name}, normalize={self.normalize}"
        self._training: Cache | None = None

    def training_side(self) -> Cache:
        if self._training is None:
            training = self.method.training_side()
            if self.normalize != "none":
                training = normalized_training(training, training_norms(training, self.memory))
            self._training = training
        return self._training

    def query_side(self, queries: Any, batch_size: int = 64) -> Queries:
        psi = self.method.query_side(queries, batch_size)
        return normalized_queries(psi) if self.normalize == "both" else psi

    def self_query_side(self, batch_size: int = 64) -> BlockReader:
        raise ConfigurationError(
            f"self-influence is not defined for normalised scores (normalize={self.normalize!r}: "
            "with 'both' it is -1 or 1 for every example); take the self-influence of the raw method"
        )

    def protected_location(self) -> str | None:
        return self.method.protected_location()

    def describe_scores(self) -> dict:
        return {**self.method.describe_scores(), "method": self.name, "normalize": self.normalize}
