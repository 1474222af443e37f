"""One interface for every attribution method: a training side and a query side.

Every method srcproj ships (SOURCE and the baselines of :mod:`srcproj.baselines`)
reduces to two matrices over the same columns: the training side ``T`` (one row per
training example) and the query side ``Ψ`` (one row per query), with scores
``-Ψ Tᵀ`` (positive: including the training example helps the query). A method says
how to read them; :class:`AttributionMethod` scores them through the streamed,
memory-budgeted scorer of :mod:`srcproj.scoring`, so every method gets the same
``score`` (in memory or to a zarr array), ``top_k`` and ``self_influence``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .errors import ConfigurationError
from .scoring import (
    DEFAULT_MEMORY_BYTES,
    REDUCTIONS,
    BlockReader,
    Cache,
    Queries,
    TopK,
    check_memory_bytes,
    check_score_target,
    read_only,
    reduce_over_queries,
    score_matrix,
    score_to_array,
    self_scores,
    store_cache,
    top_k,
)
from .source import SegmentSpectrum, unrolling_operators
from .validation import check_choice, check_positive_int

__all__ = ["AttributionMethod", "Source"]


class AttributionMethod(ABC):
    """An attribution method as two sides of one matrix product.

    Subclasses implement :meth:`training_side` and :meth:`query_side`, and
    :meth:`self_query_side` when training examples can be their own queries.
    """

    #: How tables and reports name the method.
    name: str = "method"

    @abstractmethod
    def training_side(self) -> Cache:
        """``T``, one row per training example (read block by block)."""

    @abstractmethod
    def query_side(self, queries: Any, batch_size: int = 64) -> Queries:
        """``Ψ`` of ``queries``, one row per query (computed as scoring asks for it)."""

    def self_query_side(self, batch_size: int = 64) -> BlockReader:
        """Rows ``start..stop-1`` of ``Ψ`` for the training examples themselves."""
        raise ConfigurationError(f"{self.name} has no self-influence")

    def protected_location(self) -> str | None:
        """A local directory that a score array must never overwrite (the store)."""
        return None

    def describe_scores(self) -> dict:
        """Attributes recorded with a score array written by :meth:`score`."""
        return {"method": self.name, "sign": "positive: including the training example helps the query"}

    def score(self, queries: Any, batch_size: int = 64, *, score_memory_bytes: int = DEFAULT_MEMORY_BYTES,
              out: Any = None, overwrite: bool = False, normalize: str = "none") -> Any:
        """Scores ``(Q, N)``: positive = including the training example helps the query.

        Parameters
        ----------
        queries : Dataset or tuple (X, y)
            The query examples.
        batch_size : int
            Examples per query-gradient batch.
        score_memory_bytes : int
            Bound on the transient memory of scoring (default 1 GiB).
        out : str or path or zarr store URL or zarr Store, optional
            Write the scores into a new zarr v3 array there instead of returning them.
        overwrite : bool
            Replace a zarr array or group already at ``out`` (default: refuse it).
        normalize : {"none", "train", "both"}
            ``"none"`` (default): raw scores, the predicted effect of including the example.
            ``"train"``: each training example's scores divided by the norm of its
            training-side row; ``"both"``: also each query's by the norm of its query-side
            row (a cosine). See :mod:`srcproj.normalization`; recorded in the array's attrs.

        Returns
        -------
        numpy.ndarray or zarr.Array
            The ``(Q, N)`` scores; with ``out``, the zarr array, opened read-only.
        """
        from .normalization import check_normalize, normalize_sides

        normalize = check_normalize(normalize)
        check_positive_int(batch_size, "batch_size")
        memory = check_memory_bytes(score_memory_bytes)
        local = check_score_target(out, overwrite, self.protected_location()) if out is not None else None
        training = self.training_side()
        psi = self.query_side(queries, batch_size)
        training, psi = normalize_sides(training, psi, normalize, memory)
        if out is None:
            return score_matrix(psi, training, memory)
        attributes = self.describe_scores()
        if normalize != "none" or "normalize" not in attributes:
            attributes["normalize"] = normalize
        return score_to_array(psi, training, out, memory, overwrite=overwrite, local_root=local,
                              attributes=attributes)

    def top_k(self, queries: Any, k: int = 10, batch_size: int = 64, *,
              score_memory_bytes: int = DEFAULT_MEMORY_BYTES, normalize: str = "none") -> TopK:
        """The ``k`` most helpful and most harmful training examples per query, streamed.

        ``score_memory_bytes`` bounds the transient memory (default 1 GiB): neither the
        number of queries nor of training examples changes the peak beyond the result.
        ``normalize`` ranks (and returns) the normalised scores of :meth:`score`:
        ``"train"`` or ``"both"`` for explanation by example, ``"none"`` (default) for
        the predicted effect of removal.
        """
        from .normalization import check_normalize, normalize_sides

        normalize = check_normalize(normalize)
        k = check_positive_int(k, "k")
        check_positive_int(batch_size, "batch_size")
        memory = check_memory_bytes(score_memory_bytes)
        training, psi = normalize_sides(self.training_side(), self.query_side(queries, batch_size), normalize, memory)
        return top_k(psi, training, k, memory)

    def aggregate_scores(self, queries: Any, aggregate: str = "mean", batch_size: int = 64, *,
                         score_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> np.ndarray:
        """Each training example's scores on all ``queries`` combined into one number.

        Parameters
        ----------
        queries : Dataset or tuple (X, y)
            The query examples, e.g. a validation set.
        aggregate : {"mean", "total", "worst"}
            ``"total"``: the sum of the example's scores over the queries (its predicted
            effect on the summed measurement); ``"mean"``: that over the number of
            queries; ``"worst"``: the lowest of its scores (its most harmful effect on
            any one query).
        batch_size : int
            Examples per query-gradient batch.
        score_memory_bytes : int
            Bound on the transient memory (default 1 GiB); the ``(Q, N)`` scores are
            never held whole.

        Returns
        -------
        numpy.ndarray
            ``(N,)`` in float64; positive: including the example helps.
        """
        check_choice(aggregate, "aggregate", REDUCTIONS)
        check_positive_int(batch_size, "batch_size")
        memory = check_memory_bytes(score_memory_bytes)
        training = self.training_side()
        return reduce_over_queries(self.query_side(queries, batch_size), training, aggregate, memory)

    def self_influence(self, batch_size: int = 64, *, score_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> np.ndarray:
        """``score(m, m)`` for every training example, ``(N,)`` in float64."""
        check_positive_int(batch_size, "batch_size")
        memory = check_memory_bytes(score_memory_bytes)
        training = self.training_side()
        return self_scores(self.self_query_side(batch_size), training, memory)


class Source(AttributionMethod):
    """SOURCE from a featurized store: ``T = Σ_ℓ Ḡ_ℓ W_ℓᵀ`` over the selected segments.

    Parameters
    ----------
    context : AttributionContext
        The run.
    layout : StoreLayout
        The featurized store.
    query : {"last_stage", "last_segment", "final"}
        Where ψ is taken (docs/math.md §4).
    segments : list of int
        Checked segment indices of one data set.
    times : list of float, optional
        Other segment times than the stored caches were made with: the training side
        is then computed in memory from the stored features and spectra.
    setting : str, optional
        The key of the counterfactual setting whose stored caches are read
        (:attr:`srcproj.Counterfactual.key`; default: same steps).
    unroll : {"stages", "segments"}, optional
        With ``times``: how segments are unrolled (default: the context's setting).
    """

    name = "SOURCE"

    def __init__(self, context: Any, layout: Any, query: str, segments: list[int],
                 times: list[float] | None = None, setting: str | None = None, unroll: str | None = None) -> None:
        self.context, self.layout, self.query, self.segments, self.times = context, layout, query, segments, times
        self.setting = setting
        self.unroll = context.unroll if unroll is None else unroll
        self._training: Cache | None = None

    def protected_location(self) -> str | None:
        return self.layout.store.local_root

    def describe_scores(self) -> dict:
        described = {**super().describe_scores(), "store": str(self.layout.store.location),
                     "segments": self.segments, "query": self.query, "unroll": self.unroll}
        if self.times is None and self.setting is not None:
            described["counterfactual"] = self.setting
        return described

    def training_side(self) -> Cache:
        if self._training is not None:
            return self._training
        layout, ctx = self.layout, self.context
        if self.times is None:
            self._training = store_cache(read_only(layout.store), layout.cache_names(self.segments, self.setting),
                                         layout.cache_dtype)
            return self._training
        spectra = [SegmentSpectrum(*layout.read_spectrum(s)) for s in range(layout.num_segments)]
        operators = unrolling_operators(spectra, self.times, [layout.rows(s) for s in range(layout.num_segments)],
                                        ctx.unrolled_stages(self.unroll))
        total = None
        for seg in self.segments:
            members = layout.members(seg)
            rows = layout.rows(seg)
            mean = sum(layout.read_features(c, 0, rows).astype(np.float64) for c in members) / len(members)
            part = mean @ operators[seg].T
            total = part if total is None else total + part
        self._training = Cache.of(total.astype(ctx.cache_dtype), ctx.chunk_size)
        return self._training

    def query_side(self, queries: Any, batch_size: int = 64) -> Queries:
        ctx = self.context
        source = ctx.query_source(queries)
        return Queries(lambda start, stop: ctx.measurement_features(source, start, stop, batch_size, self.query,
                                                                    self.times), len(source))

    def self_query_side(self, batch_size: int = 64) -> BlockReader:
        ctx = self.context
        source = ctx.source(self.segments[0])
        return lambda start, stop: ctx.measurement_features(source, start, stop, batch_size, self.query, self.times)
