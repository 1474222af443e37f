"""The front: model + checkpoints + data → store → cached features → scores.

:class:`Attributor` holds validated settings and composes the parts: the run's
:class:`~srcproj.context.AttributionContext`, the store's
:class:`~srcproj.layout.StoreLayout`, the featurize pipeline
(:func:`srcproj.pipeline.featurize`) and the SOURCE scorer
(:class:`~srcproj.method.Source`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .context import AttributionContext
from .counterfactual import Counterfactual, resolve_counterfactual
from .distributed import Collective
from .errors import ConfigurationError, StoreError
from .layout import StoreLayout
from .method import AttributionMethod, Source
from .pipeline import FeaturizeReport, featurize
from .projection import Projector, RademacherProjector
from .scoring import DEFAULT_MEMORY_BYTES, BlockReader, Cache, Queries, TopK, check_memory_bytes
from .source import SegmentSpectrum
from .store import AttributionStore
from .tasks import Task
from .trajectory import Trajectory
from .validation import check_choice, check_positive_int

__all__ = ["Attributor", "FeaturizeReport"]

QUERY_MODES = ("final", "last_segment", "last_stage")


class Attributor(AttributionMethod):
    """SOURCE attribution for a training run, backed by a resumable zarr store.

    Parameters
    ----------
    model : nn.Module
        The architecture; the weights come from the trajectory's checkpoints.
    task : Task
        Training loss and query measurement (e.g. :class:`ClassificationTask`).
    trajectory : Trajectory
        Segments with their checkpoints, steps, learning rates and data.
    store : str or path or zarr store URL
        Where features, Hessians and caches live. Reopening a store made for the same
        model, checkpoints, data and projection resumes it; one made for others is
        refused. A store made with another weight decay or other segment times
        (steps, learning rates, momentum) is reused: :meth:`featurize` recomputes only
        the spectra and caches that depend on them.
    proj_dim : int
        k, the projected dimension (default 2048).
    seed : int
        Decides the random projection.
    projector : Projector, optional
        Replaces the default ``RademacherProjector(proj_dim, seed)``, e.g.
        ``KroneckerProjector(proj_dim, seed)`` (factored; bound to the model here).
    modules : sequence of str, optional
        Submodules whose parameters are attributed (default: every trainable parameter).
    hessian : {"auto", "exact", "fisher", "empirical"}
        Gauss-Newton estimator; "auto" is "exact" for at most 20 outputs, else "fisher".
    fisher_samples : int
        Sampled labels per example for the "fisher" estimator.
    hessian_sample : int, optional
        Estimate each checkpoint's Hessian, an average over the training examples,
        from about this many of them (a seeded random subset, drawn per checkpoint and
        row chunk) instead of all (the default, ``None``). Features still cover every
        example. A visible approximation that cuts the Hessian's cost where it is one
        projection per output (layers outside docs/math.md §10: convolutions, layers
        over sequences); recorded in the store.
    feature_dtype : {"float16", "float32", "float64"}
        Storage precision of per-checkpoint features (caches are float32, or float64
        with float64 features).
    chunk_size : int
        Training examples per stored chunk: the unit of resumption.
    device : str or torch.device, optional
        Where gradients are computed (default: the model's device).
    query : {"last_stage", "last_segment", "final"}
        Where query gradients ψ are taken (docs/math.md §4): averaged over the last
        stage's checkpoints, each weighted by its segment's share of the stage's time,
        as the stage's training gradients are (the default); averaged over the last
        segment's checkpoints; or at the final checkpoint only. With one segment in the
        last stage the first two are the same. The averages smooth the noise of one SGD
        iterate and match ψ to the checkpoints that define the training side; the stage
        average scored highest on the benchmarks (docs/benchmarks.md). It changes only
        scoring, not the store.
    unroll : {"stages", "segments"}
        ``"stages"`` (the default): consecutive segments that trained on one data set
        are unrolled as one stretch, with their Hessians and gradients averaged by
        time (learning rate); only a change of data set is chained through ``exp(-aH)``.
        ``"segments"``: every segment is chained, as in the paper. On every single-stage
        benchmark run the stage form scored higher LDS at the default time, and chaining
        same-data segments is what made SOURCE dip below the influence function
        (docs/math.md §1, "Stages"; docs/benchmarks.md). It changes only the caches:
        switching recomputes them.
    distributed : bool, optional
        ``None`` (default): if a ``torch.distributed`` process group is initialized with
        more than one process (a script started by ``torchrun``), the Attributor is
        collective: every rank builds it with the same inputs and calls
        :meth:`featurize`, which shards the work over the ranks (docs/scaling.md).
        ``False``: act as one process anyway. ``True``: require a process group.
    counterfactual : "same_steps" or Counterfactual
        The retraining the scores predict (docs/concepts.md, "Which counterfactual a
        score answers"): ``"same_steps"`` (the default) keeps every segment's steps;
        ``Counterfactual.same_epochs(fraction)`` keeps the epochs of a retraining on
        that fraction of the attributed data set, whose segments then take
        ``fraction``·K steps. :meth:`featurize` computes this setting's caches only,
        and scoring reads them; several settings live in one store, and switching
        recomputes only the caches.

    See Also
    --------
    Attributor.open : reopen a featurized store for scoring, without the trajectory.
    """

    name = "SOURCE"

    def __init__(self, model: nn.Module, task: Task, trajectory: Trajectory, store: Any, proj_dim: int = 2048,
                 seed: int = 0, *, projector: Projector | None = None, modules: Sequence[str] | None = None,
                 hessian: str = "auto", fisher_samples: int = 1, hessian_sample: int | None = None,
                 feature_dtype: str = "float16",
                 chunk_size: int = 1024, device: str | torch.device | None = None, query: str = "last_stage",
                 preconditioner: str = "shared", adam_response: str = "linearized", unroll: str = "stages",
                 distributed: bool | None = None, counterfactual: str | Counterfactual = "same_steps") -> None:
        self.query = check_choice(query, "query", QUERY_MODES)
        self.counterfactual = resolve_counterfactual(counterfactual)
        projector = RademacherProjector(proj_dim, seed) if projector is None else projector
        self.context = AttributionContext.from_trajectory(
            model, task, trajectory, projector, modules=modules, hessian=hessian, fisher_samples=fisher_samples,
            hessian_sample=hessian_sample, preconditioner=preconditioner, adam_response=adam_response,
            unroll=unroll, feature_dtype=feature_dtype, chunk_size=chunk_size, device=device)
        self.trajectory = trajectory
        self.counterfactual.attributed_segments(self.context.data_groups)  # data_segment exists
        self._collective = Collective(distributed)
        self.store = AttributionStore.open_shared(store, self.context.metadata(), self._collective)
        self.layout = StoreLayout(self.store)
        self.context.attach(self.layout)
        self._stage_inputs = self.context.stage_inputs(self.counterfactual)

    @classmethod
    def open(cls, store: Any, model: nn.Module, task: Task, data: Any = None, *, projector: Projector | None = None,
             query: str = "last_stage", device: str | torch.device | None = None,
             counterfactual: str | Counterfactual = "same_steps") -> Attributor:
        """Reopen a featurized store for scoring, without rebuilding the trajectory.

        The query checkpoints were saved in the store by :meth:`featurize`; the model's
        architecture and the task must be those the store was made with (both are
        checked). The projector is rebuilt from the store's record (pass an explicit
        :class:`~srcproj.MatrixProjector` again).

        Parameters
        ----------
        store : str or path or zarr store URL
            A store that :meth:`featurize` completed.
        model : nn.Module
            The architecture (its weights are not used).
        task : Task
            The task the store was featurized with.
        data : data set, or dict of segment index to data set, optional
            The training data of segment 0 (a data set as the constructor takes it),
            or ``{segment: data}`` for the data sets of other segments: only
            :meth:`self_influence` and :meth:`checkpoint_features` need it. It is
            checked against the store's fingerprint.
        query : {"last_stage", "last_segment", "final"}
            Where ψ is taken, as in the constructor.
        counterfactual : "same_steps" or Counterfactual
            The setting whose stored caches are scored, as in the constructor; the
            store must hold them (``srcproj info`` lists the settings it has).

        Returns
        -------
        Attributor
            Ready to :meth:`score`, :meth:`top_k` and :meth:`self_influence`; it cannot
            featurize.
        """
        attributor = cls.__new__(cls)
        attributor.query = check_choice(query, "query", QUERY_MODES)
        attributor.counterfactual = resolve_counterfactual(counterfactual)
        attributor.store = AttributionStore.read(store)
        attributor.layout = StoreLayout(attributor.store)
        attributor.context = AttributionContext.from_store(attributor.store, model, task, data, projector=projector,
                                                          device=device)
        attributor.trajectory = None
        attributor._collective = Collective(False)
        attributor._stage_inputs = None
        attributor.counterfactual.attributed_segments(attributor.context.data_groups)  # data_segment exists
        setting = attributor.counterfactual
        if not setting.is_default and not attributor.layout.is_complete(setting.key):
            have = ", ".join(attributor.layout.settings_completion()) or "none"
            raise StoreError(f"the store at {attributor.store.location!r} has no complete caches for the "
                             f"counterfactual {setting.key!r} (it has: {have}): featurize it with the trajectory and "
                             f"counterfactual={setting!r} first; only the caches are computed")
        if not attributor.layout.is_complete():
            if setting.is_default and attributor.layout.settings():
                have = ", ".join(attributor.layout.settings_completion()) or "none"
                raise StoreError(f"the store at {attributor.store.location!r} has no complete same-steps caches (it "
                                 f"has: {have}): pass counterfactual=... to open one of those, or featurize with "
                                 "the trajectory and counterfactual='same_steps'")
            raise StoreError(f"the store at {attributor.store.location!r} is not complete: run featurize() with the "
                             "trajectory first (it resumes where it stopped)")
        return attributor

    # ------------------------------------------------------------------ settings
    @property
    def projector(self) -> Projector:
        return self.context.projector

    @property
    def computer(self):
        return self.context.computer

    @property
    def task(self) -> Task:
        return self.context.task

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def proj_dim(self) -> int:
        return int(self.context.projector.proj_dim)

    @property
    def hessian(self) -> str:
        """The Gauss-Newton estimator in use: "exact", "fisher" or "empirical"."""
        return self.context.estimator.name

    @property
    def num_outputs(self) -> int:
        return self.context.num_outputs

    @property
    def cache_dtype(self) -> str:
        return self.context.cache_dtype

    @property
    def checkpoints(self) -> list[tuple[int, int]]:
        """``(segment, position in segment)`` of every checkpoint, in training order."""
        segments = self.context.checkpoint_segments
        return [(s, segments[:c].count(s)) for c, s in enumerate(segments)]

    # ------------------------------------------------------------------ featurize
    def featurize(self, batch_size: int = 64, progress: bool = True) -> FeaturizeReport:
        """Compute and store features, Hessians, spectra and caches; resume what is done.

        Stages whose inputs changed since the store was made (weight decay: spectra
        and caches; steps, learning rates, momentum: caches) are recomputed; see
        :class:`~srcproj.pipeline.FeaturizeReport` for what was computed and skipped.
        In a distributed job every rank must call it: rank ``r`` of ``W`` computes the
        row chunks ``c`` with ``c % W == r`` (features and each chunk's float64 Hessian
        part, in the store); rank 0 adds the parts and writes the Hessians and the spectra. It returns on
        every rank once the whole store is complete. The result equals a one-process
        run up to the order of floating-point sums.

        Parameters
        ----------
        batch_size : int
            Examples per gradient batch (memory ~ batch_size × parameters).
        progress : bool
            Show a progress bar (on rank 0 only).
        """
        check_positive_int(batch_size, "batch_size")
        if self._stage_inputs is None:
            raise ConfigurationError("this Attributor was reopened for scoring (Attributor.open); featurize needs "
                                     "the trajectory: build it with Attributor(model, task, trajectory, store)")
        setting = self.counterfactual
        times = setting.times(self.context.segment_times(), self.context.data_groups)
        segments = None if setting.is_default else setting.attributed_segments(self.context.data_groups)
        return featurize(self.context, self.layout, self._collective, batch_size=batch_size, progress=progress,
                         times=times, stage_inputs=self._stage_inputs, setting=self._setting_key,
                         cache_segments=segments)

    @property
    def _setting_key(self) -> str | None:
        """The key of the counterfactual setting's caches; ``None`` for same steps (the store's own)."""
        return None if self.counterfactual.is_default else self.counterfactual.key

    def is_featurized(self) -> bool:
        """Whether every cache chunk of this Attributor's counterfactual setting is in the
        store, made with its inputs."""
        if self._stage_inputs is not None and self.layout.stale(self._stage_inputs):
            return False
        return self.layout.is_complete(self._setting_key)

    def require_featurized(self) -> None:
        """Raise :class:`~srcproj.errors.StoreError` unless the store is ready to score."""
        if self._stage_inputs is not None and self.layout.stale(self._stage_inputs):
            changes = self.layout.changes(self._stage_inputs)
            raise StoreError(f"the store's caches were made with other inputs ({changes}): run featurize() to "
                             "recompute what depends on them")
        if not self.layout.is_complete(self._setting_key):
            what = "" if self.counterfactual.is_default else f" for the counterfactual {self.counterfactual.key!r}"
            raise StoreError(f"the store is not complete{what}: run featurize() first (it resumes where it stopped; "
                             "with a featurized store only the caches are computed)")

    # ------------------------------------------------------------------ scoring
    def source_method(self, segments: Sequence[int] | None = None,
                      score_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> Source:
        """SOURCE over the cached training features of ``segments`` (one data set), under
        this Attributor's counterfactual setting, checked ready to score."""
        selected = self._selection(segments)
        check_memory_bytes(score_memory_bytes)
        self.require_featurized()
        return Source(self.context, self.layout, self.query, selected, setting=self._setting_key)

    def _selection(self, segments: Sequence[int] | None) -> list[int]:
        """Checked segments of one data set; under same epochs, of the attributed data set only."""
        setting = self.counterfactual
        if setting.is_default:
            return self.context.selection(segments)
        attributed = setting.attributed_segments(self.context.data_groups)
        if segments is None:
            return attributed
        selected = self.context.selection(segments)
        if not set(selected) <= set(attributed):
            raise ConfigurationError(
                f"segments {selected} trained on another data set than segment {setting.data_segment}'s, the one "
                f"the counterfactual {setting.key!r} retrains on a fraction of (segments {attributed}); score "
                "them with an Attributor whose counterfactual is Counterfactual.same_epochs(fraction, "
                "data_segment=...) of their data set, or 'same_steps'")
        return selected

    def training_side(self) -> Cache:
        return self.source_method().training_side()

    def query_side(self, queries: Any, batch_size: int = 64) -> Queries:
        return self.source_method().query_side(queries, batch_size)

    def self_query_side(self, batch_size: int = 64) -> BlockReader:
        return self.source_method().self_query_side(batch_size)

    def score(self, queries: Any, segments: Sequence[int] | None = None, batch_size: int = 64, *,
              score_memory_bytes: int = DEFAULT_MEMORY_BYTES, out: Any = None, overwrite: bool = False,
              normalize: str = "none") -> Any:
        """Scores ``(Q, N)``: positive = including the training example helps the query.

        Parameters
        ----------
        queries : Dataset or tuple (X, y)
            Query examples, scored with the task's measurement at the query checkpoints
            (the final one, or the last segment's or last stage's, by ``query``).
        segments : sequence of int, optional
            0-based segments whose terms are summed (they must share one data set);
            default: the segments that share segment 0's data. Under a same-epochs
            counterfactual, only (and by default all) the segments of its attributed
            data set.
        batch_size : int
            Examples per query-gradient batch.
        score_memory_bytes : int, optional
            Bound on the transient memory of scoring (default 1 GiB): the cache rows
            read per block, the query batch and, with ``out``, the score block. The
            ``(Q, N)`` result itself is extra when ``out`` is None.
        out : str or path or zarr store URL or zarr Store, optional
            Write the scores into a new float32 (float64 with float64 features) zarr v3
            array there instead of returning them in memory.
        overwrite : bool
            Replace a zarr array or group already at ``out`` (default: refuse it).
        normalize : {"none", "train", "both"}
            ``"none"`` (default): raw scores, the predicted effect of including each training
            example (the counterfactual question; removing it has the opposite effect).
            ``"train"``: each training example's scores divided by the norm of its cache
            row ``‖t_i‖``; ``"both"``: also each query's by the norm of its ψ, so the
            score is ``-cos(ψ_q, t_i)``. Normalised scores answer "which training examples
            are most like this query in the model's view" (docs/concepts.md, "Raw and
            normalised scores").

        Returns
        -------
        numpy.ndarray or zarr.Array
            The ``(Q, N)`` scores; with ``out``, the zarr array, opened read-only. Its
            ``attrs["srcproj_scores"]["complete"]`` is True once every chunk is durably
            written; an interrupted call leaves it False (unwritten chunks read as NaN);
            ``attrs["srcproj_scores"]["normalize"]`` records ``normalize``.
        """
        return self.source_method(segments, score_memory_bytes).score(
            queries, batch_size, score_memory_bytes=score_memory_bytes, out=out, overwrite=overwrite,
            normalize=normalize)

    def top_k(self, queries: Any, k: int = 10, segments: Sequence[int] | None = None, batch_size: int = 64, *,
              score_memory_bytes: int = DEFAULT_MEMORY_BYTES, normalize: str = "none") -> TopK:
        """The ``k`` most helpful and most harmful training examples per query, streamed.

        ``score_memory_bytes`` bounds the transient memory (default 1 GiB): score blocks,
        cache blocks and query batches are sized to fit it, so neither ``Q`` nor ``N``
        changes the peak beyond the ``(Q, k)`` result. ``normalize="train"`` or ``"both"``
        ranks by normalised scores (explanation by example; see :meth:`score`). Other
        parameters as in :meth:`score`.
        """
        check_positive_int(k, "k")
        return self.source_method(segments, score_memory_bytes).top_k(queries, k, batch_size,
                                                                score_memory_bytes=score_memory_bytes,
                                                                normalize=normalize)

    def self_influence(self, segments: Sequence[int] | None = None, batch_size: int = 64, *,
                       score_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> np.ndarray:
        """``score(m, m)`` for every training example of the selected segments' data.

        ``score_memory_bytes`` bounds the rows scored per block (default 1 GiB); the
        training examples' own gradients are computed ``batch_size`` at a time.
        """
        return self.source_method(segments, score_memory_bytes).self_influence(batch_size,
                                                                         score_memory_bytes=score_memory_bytes)

    def aggregate_scores(self, queries: Any, aggregate: str = "mean", segments: Sequence[int] | None = None,
                         batch_size: int = 64, *, score_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> np.ndarray:
        """Each training example's scores on all ``queries`` as one number, ``(N,)`` float64.

        ``aggregate``: ``"mean"`` (default) or ``"total"`` of its scores over the queries,
        or ``"worst"``, the lowest of them; streamed, without the ``(Q, N)`` matrix
        (:meth:`AttributionMethod.aggregate_scores`). Other parameters as in :meth:`score`.
        """
        return self.source_method(segments, score_memory_bytes).aggregate_scores(
            queries, aggregate, batch_size, score_memory_bytes=score_memory_bytes)

    # ------------------------------------------------------------------ stored and derived quantities
    def checkpoint_features(self, checkpoint: int = -1, kind: str = "loss", data_segment: int = 0,
                            batch_size: int = 64) -> np.ndarray:
        """Projected per-example gradients of one data set at one checkpoint, ``(N, k)``.

        Loss gradients that featurize() stored (the checkpoint trained on that data) are
        read from the store; anything else is computed, with the same projection.

        Parameters
        ----------
        checkpoint : int
            Global checkpoint index in training order; ``-1`` is the final one.
        kind : {"loss", "measurement"}
            Gradients of the training loss, or of the task's measurement (e.g. the margin
            of each training example, as TRAK and self-influence use).
        data_segment : int
            The examples are those of this segment's data.
        """
        ctx = self.context
        index = ctx.checkpoint_number(checkpoint)
        seg = ctx.selection([data_segment])[0]
        if kind not in ("loss", "measurement"):
            raise ConfigurationError(f"kind={kind!r}; choose 'loss' or 'measurement'")
        same_data = ctx.data_groups[ctx.segment_of(index)] == ctx.data_groups[seg]
        if kind == "loss" and same_data and bool(self.layout.features_done(index).all()):
            return self.layout.read_features(index, 0, self.layout.rows(seg)).astype(ctx.cache_dtype)
        source = ctx.source(seg)
        with ctx.computer.evaluating(), ctx.preconditioned_at(index):
            rows = ctx.projected(ctx.split(index), source, 0, len(source), batch_size, kind, f"checkpoint {index}")
        return rows.to("cpu").numpy().astype(ctx.cache_dtype)

    def query_features_at(self, queries: Any, checkpoint: int = -1, batch_size: int = 64) -> np.ndarray:
        """ψ = P ∇f(z_q, θ_c) at checkpoint ``c`` (``-1``: the final one)."""
        ctx = self.context
        index = ctx.checkpoint_number(checkpoint)
        source = ctx.query_source(queries)
        with ctx.computer.evaluating(), ctx.preconditioned_at(index):
            rows = ctx.projected(ctx.parameters(index), source, 0, len(source), batch_size, "measurement",
                                 f"checkpoint {index}")
        return rows.to("cpu").numpy().astype(ctx.cache_dtype)

    def query_features(self, queries: Any, batch_size: int = 64) -> np.ndarray:
        """ψ_q, shape ``(Q, k)``: the measurement's projected gradient at the query checkpoints.

        With ``query="final"`` that is ``P ∇f(z_q, θ_T)`` at the final checkpoint; with
        ``query="last_segment"`` its mean over the last segment's checkpoints; with
        ``query="last_stage"`` (the default) its time-weighted mean over the last stage's.
        """
        source = self.context.query_source(queries)
        return self.context.measurement_features(source, 0, len(source), batch_size, self.query)

    def checkpoint_hessian(self, checkpoint: int = -1) -> np.ndarray:
        """The stored k×k projected Gauss-Newton Hessian of one checkpoint (on its segment's data)."""
        index = self.context.checkpoint_number(checkpoint)
        if not bool(self.layout.hessians_done()[index]):
            raise StoreError(f"the Hessian of checkpoint {index} is not in the store: run featurize() first")
        return self.layout.read_hessian(index)

    def segment_spectra(self) -> list[SegmentSpectrum]:
        """Per segment, the eigendecomposition of its mean Hessian + wd·I, from the store."""
        self.require_featurized()
        return [SegmentSpectrum(*self.layout.read_spectrum(s)) for s in range(self.layout.num_segments)]
