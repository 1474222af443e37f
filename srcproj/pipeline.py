"""Featurization as a pipeline of stages that each write to the store and resume.

0. :class:`PreconditionerStage`: per segment, the optimizer's preconditioner ``M^{1/2}``
   (Adam's ``1/(√v̄ + ε)``, group learning-rate ratios), for runs that have one (rank 0).
1. :class:`GradientStage`: per checkpoint, this rank's row chunks of training features
   ``φ_c = P ∇L`` (float16 rows with a power-of-two scale each, by default) and of the
   Hessian's parts: each chunk's float64 sum of the Gauss-Newton rows of the chosen
   :class:`~srcproj.curvature.HessianEstimator`, stored and flagged per chunk. With the
   ``exact`` estimator one pass gives both: the projected output Jacobians ``P J_iᵀ``
   make the Gauss-Newton rows, and the feature is their combination ``P J_iᵀ ∂L/∂f``.
   Once every chunk's part is in, rank 0 writes the mean and drops the parts.
2. :class:`SpectrumStage`: per segment, the eigendecomposition of its mean Hessian + δ·I,
   δ the weight decay in the small space (rank 0).
3. :class:`CacheStage`: per segment, this rank's row chunks of ``Ḡ_ℓ W_ℓᵀ``.

A killed job loses at most the chunk in progress. Each stage reports what it computed
and what it found done in the :class:`FeaturizeReport`, with the seconds each kind of
work took. :func:`featurize` runs them on every rank of a distributed job
(:mod:`srcproj.distributed`): row chunks are dealt round-robin, and an error on one rank
is raised on all of them at the next point where they meet.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .context import AttributionContext, check_finite_rows
from .curvature import HessianAccumulator
from .distributed import Collective, DeferredErrors
from .errors import StoreError
from .layout import StoreLayout
from .source import SegmentSpectrum, eigendecompose, unrolling_operators

__all__ = ["CacheStage", "FeaturizeReport", "GradientStage", "PreconditionerStage", "SpectrumStage", "featurize"]

#: The kinds of work whose seconds :attr:`FeaturizeReport.stage_seconds` reports.
STAGE_TIMES = ("preconditioner", "gradients", "hessians", "spectra", "caches")


@dataclass
class FeaturizeReport:
    """What one featurize call computed and what it found done.

    In a distributed job each rank gets its own report: the chunk counts and lists are
    this rank's share (the chunks ``c`` with ``c % world_size == rank``), while the
    Hessians, to which every rank contributes its chunks' parts, and the spectra are
    counted on every rank. ``dataclasses.asdict(report)`` is JSON-able.
    """

    feature_chunks_computed: int = 0
    feature_chunks_skipped: int = 0
    hessians_computed: int = 0
    hessians_skipped: int = 0
    hessian_chunks_computed: int = 0
    hessian_chunks_skipped: int = 0
    spectra_computed: int = 0
    spectra_skipped: int = 0
    cache_chunks_computed: int = 0
    cache_chunks_skipped: int = 0
    examples_featurized: int = 0
    #: The Gauss-Newton estimator ("exact", "fisher", "empirical") and the examples whose
    #: rows entered the Hessian parts this call computed (all checkpoints together).
    hessian_estimator: str = ""
    hessian_examples: int = 0
    #: The optimizer's preconditioner: "none" (SGD), or where Adam's second moment came
    #: from ("optimizer state", "estimated from per-example gradients, batch size B").
    preconditioner: str = "none"
    #: Per segment, the weight decay added to its Hessian in the small space, and how it
    #: was obtained ("uniform": exact; otherwise the mean that was taken).
    weight_decays: list[float] = field(default_factory=list)
    weight_decay_rule: str = "uniform"
    seconds: float = 0.0
    #: Seconds per kind of work: "preconditioner" (Adam's second moment), "gradients"
    #: (per-example gradients and their projection:
    #: features, and the projected Jacobians that also give the exact Hessian's rows),
    #: "hessians" (Gauss-Newton rows, their k×k sums and the means), "spectra"
    #: (eigendecompositions) and "caches".
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGE_TIMES, 0.0))
    rank: int = 0
    world_size: int = 1
    #: Stages whose stored results were made with other inputs (e.g. another momentum)
    #: and were recomputed by this call.
    recomputed_stages: list[str] = field(default_factory=list)
    #: ``(checkpoint, chunk)`` of every feature chunk this rank computed.
    computed_feature_chunks: list[tuple[int, int]] = field(default_factory=list)
    #: ``(segment, chunk)`` of every cache chunk this rank computed.
    computed_cache_chunks: list[tuple[int, int]] = field(default_factory=list)

    @contextmanager
    def timing(self, kind: str):
        """Add the seconds of the ``with`` block to ``stage_seconds[kind]``."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[kind] += time.perf_counter() - began


@dataclass
class Shard:
    """This rank's share of the row chunks of every segment."""

    collective: Collective
    chunks: dict[int, list[int]]

    @classmethod
    def of(cls, collective: Collective, layout: StoreLayout) -> Shard:
        return cls(collective, {seg: [c for c in range(len(layout.chunks(seg))) if collective.owns(c)]
                                for seg in range(layout.num_segments)})


class GradientStage:
    """One checkpoint's training features and Hessian parts, this rank's chunks.

    A chunk is one unit of work: its features and its Hessian part are written and
    flagged separately, so whatever a killed job finished is kept.
    """

    def __init__(self, context: AttributionContext, layout: StoreLayout, shard: Shard, batch_size: int,
                 report: FeaturizeReport) -> None:
        self.context, self.layout, self.shard, self.batch_size = context, layout, shard, batch_size
        self.report = report

    def todo(self, checkpoint: int, need_hessian: bool) -> tuple[list[int], list[int]]:
        """This rank's chunks still lacking ``(features, Hessian parts)``."""
        mine = self.shard.chunks[self.layout.segment_of(checkpoint)]
        features = self.layout.features_done(checkpoint)
        parts = self.layout.hessian_parts_done(checkpoint) if need_hessian else np.ones(len(features), bool)
        return [c for c in mine if not features[c]], [c for c in mine if not parts[c]]

    def run(self, checkpoint: int, params: tuple[dict, dict], feature_chunks: list[int], hessian_chunks: list[int],
            bar: tqdm) -> None:
        ctx, layout, report = self.context, self.layout, self.report
        seg = layout.segment_of(checkpoint)
        mine = self.shard.chunks[seg]
        report.feature_chunks_skipped += len(mine) - len(feature_chunks)
        todo = sorted(set(feature_chunks) | set(hessian_chunks))
        bar.update(len(mine) - len(todo))
        if not todo:
            return
        with ctx.preconditioned_at(checkpoint):
            self._run(checkpoint, params, feature_chunks, hessian_chunks, todo, bar)

    def _run(self, checkpoint: int, params: tuple[dict, dict], feature_chunks: list[int], hessian_chunks: list[int],
             todo: list[int], bar: tqdm) -> None:
        ctx, layout, report = self.context, self.layout, self.report
        seg = layout.segment_of(checkpoint)
        source, label = ctx.source(seg), f"checkpoint {checkpoint} (segment {seg})"
        bounds = layout.chunks(seg)
        feature_flags = layout.feature_flags(checkpoint)
        for chunk in todo:
            start, stop = bounds[chunk]
            want_features, want_part = chunk in feature_chunks, chunk in hessian_chunks
            sampled = ctx.hessian_rows(checkpoint, chunk, start, stop) if want_part else None
            # The exact estimator's Jacobians give the features too, when they cover every row.
            fused = want_part and ctx.estimator.needs == "output_jacobians" and sampled is None
            part = None
            if fused:
                features, part = self._jacobian_pass(checkpoint, params, source, start, stop, want_features)
            elif want_features:
                with report.timing("gradients"):
                    features = ctx.projected(params, source, start, stop, self.batch_size, "loss", label)
            if want_features:
                layout.write_features(checkpoint, start, features.to("cpu", torch.float64).numpy())
                feature_flags[chunk] = True
                report.feature_chunks_computed += 1
                report.computed_feature_chunks.append((checkpoint, chunk))
                report.examples_featurized += stop - start
            if want_part and not fused:
                if sampled is not None and ctx.estimator.needs == "output_jacobians":
                    _, part = self._jacobian_pass(checkpoint, params, source, start, stop, False, sampled)
                else:
                    part = self._part(checkpoint, chunk, params, source, start, stop, sampled)
            if want_part:
                with report.timing("hessians"):
                    layout.write_hessian_part(checkpoint, chunk, part.total.numpy(), part.count)
                report.hessian_chunks_computed += 1
                report.hessian_examples += part.count
            bar.update(1)

    def _jacobian_pass(self, checkpoint: int, params: tuple[dict, dict], source, start: int, stop: int,
                       want_features: bool, rows: np.ndarray | None = None,
                       ) -> tuple[torch.Tensor | None, HessianAccumulator]:
        """Features and the exact Gauss-Newton part of rows ``start..stop-1`` from one pass:
        the projected output Jacobians give both. ``rows``: only these (no features)."""
        ctx, report = self.context, self.report
        trainable, fixed = params
        seg = self.layout.segment_of(checkpoint)
        x, y = source.rows(start, stop) if rows is None else source.take(rows)
        with report.timing("gradients"):
            projected, outputs = ctx.gradients.output_features(trainable, fixed, x)
            projected = projected.to(torch.float64)  # once, for the features and the Gauss-Newton rows
        what = f"checkpoint {checkpoint}: the Gauss-Newton vectors of examples {start}..{stop - 1}"
        features = None
        if want_features:
            with report.timing("gradients"):
                features = ctx.loss_features(projected, outputs, y)
            check_finite_rows(features, start, f"checkpoint {checkpoint} (segment {seg}): the gradient of example "
                              f"{{row}} of {source.what}",
                              "check that checkpoint for NaN weights and that example for NaN inputs")
        with report.timing("hessians"):
            accumulator = HessianAccumulator(self.layout.proj_dim)
            weighted = ctx.estimator.rows(projected, outputs, y)
            check_finite_rows(weighted, 0, what, "check that checkpoint for NaN weights")
            accumulator.add(weighted, y.shape[0])
        return features, accumulator

    def _part(self, checkpoint: int, chunk: int, params: tuple[dict, dict], source, start: int,
              stop: int, sampled: np.ndarray | None = None) -> HessianAccumulator:
        """The Hessian part of one chunk for the ``fisher`` and ``empirical`` estimators
        (of the rows ``sampled`` only, when given)."""
        ctx, layout, report = self.context, self.layout, self.report
        estimator = ctx.estimator
        accumulator = HessianAccumulator(layout.proj_dim)
        if estimator.needs == "features":
            with report.timing("hessians"):
                # The stored (rounded) features, written before: the same rows whenever computed.
                block = layout.read_features(checkpoint, start, stop).astype(np.float64)
                if sampled is not None:
                    block = block[sampled - start]
                accumulator.add(estimator.rows(torch.from_numpy(block)), block.shape[0])
            return accumulator
        trainable, fixed = params
        # Sampled labels are seeded per chunk, so they do not depend on the number of ranks.
        generator = ctx.fisher_generator(checkpoint, chunk)
        picked = np.arange(start, stop) if sampled is None else sampled
        for lo in range(0, picked.size, self.batch_size):
            batch = picked[lo:lo + self.batch_size]
            x, y = source.rows(int(batch[0]), int(batch[-1]) + 1) if sampled is None else source.take(batch)
            with report.timing("gradients"):
                xs, ys = ctx.computer.prepare(trainable, x, y)
                with torch.no_grad():
                    outputs = ctx.computer.forward(trainable, fixed, xs)
                pseudo = [ctx.gradients.features(trainable, fixed, x, targets, "sampled_loss")
                          for targets in estimator.sample_targets(outputs, generator, ys)]
            with report.timing("hessians"):
                rows = estimator.rows(pseudo)
                check_finite_rows(rows, 0, f"checkpoint {checkpoint}: the Gauss-Newton vectors of examples "
                                  f"{int(batch[0])}..{int(batch[-1])}", "check that checkpoint for NaN weights")
                accumulator.add(rows, batch.size)
        return accumulator

    def finish(self, checkpoint: int) -> None:
        """Write the mean of the chunks' parts as the checkpoint's Hessian, then drop the parts (rank 0)."""
        layout = self.layout
        with self.report.timing("hessians"):
            total, count = layout.sum_hessian_parts(checkpoint)
            layout.store.write_durably(layout.hessian(checkpoint), slice(0, layout.proj_dim), total / max(count, 1.0))
            layout.hessian_flags()[checkpoint] = True
            layout.drop_hessian_parts(checkpoint)


class PreconditionerStage:
    """Per segment, ``M^{1/2}`` of the run's optimizer (docs/math.md §6), written once.

    Adam: ``M = r / (√v̄ + ε)`` with ``v̄`` the bias-corrected second moment averaged
    over the segment's checkpoints (chaining "segment") or over every checkpoint of the
    run ("shared"), ``r`` the groups' learning-rate ratios; SGD with such ratios:
    ``M = r``. Nothing to do for a run without a preconditioner.
    """

    def __init__(self, context: AttributionContext, layout: StoreLayout, batch_size: int) -> None:
        self.context, self.layout, self.batch_size = context, layout, batch_size

    def run(self, report: FeaturizeReport, bar: tqdm) -> None:
        ctx, layout = self.context, self.layout
        if not ctx.preconditioned:
            return
        from .preconditioning import scale_vector  # pure numpy

        spec, record = ctx.trajectory.spec, ctx.optimizer_record
        flags = layout.preconditioner_flags()
        done = np.asarray(flags[:], dtype=bool)
        if done.all():
            return
        lr_scales = ctx.flat(ctx.optimizer.lr_scale)
        shared = None
        if spec.adaptive and record.get("chaining") == "shared":
            shared = ctx.moments(list(range(ctx.num_checkpoints)), self.batch_size, bar)
        for seg in np.flatnonzero(~done):
            seg = int(seg)
            moment = first = None
            if spec.adaptive:
                moment, first = shared if shared is not None else ctx.moments(layout.members(seg), self.batch_size,
                                                                              bar)
                if record.get("response") != "linearized":
                    first = None
            layout.write_preconditioner(seg, scale_vector(spec, moment, lr_scales, first), moment)


class SpectrumStage:
    """Per segment, the eigendecomposition of its mean Hessian + δ·I, computed once
    (δ: :meth:`AttributionContext.small_space_decay`)."""

    def __init__(self, context: AttributionContext, layout: StoreLayout) -> None:
        self.context, self.layout = context, layout

    def run(self, report: FeaturizeReport | None, compute: bool = True) -> list[SegmentSpectrum]:
        """The spectra; with ``compute=False`` a missing one is an error (ranks other than 0 only read)."""
        layout = self.layout
        flags = layout.spectrum_flags()
        done = flags[:]
        spectra = []
        for seg in range(layout.num_segments):
            if not done[seg]:
                if not compute:
                    raise StoreError(f"the spectrum of segment {seg} is not in the store: run featurize() first")
                members = layout.members(seg)
                mean = sum(layout.read_hessian(c) for c in members) / len(members)
                decay, _ = self.context.small_space_decay(seg)
                spectrum = eigendecompose(mean, damping=decay)
                values, vectors = layout.spectrum(seg)
                layout.store.write_durably(values, slice(0, layout.proj_dim), spectrum.eigenvalues)
                layout.store.write_durably(vectors, slice(0, layout.proj_dim), spectrum.eigenvectors)
                flags[seg] = True
                if report is not None:
                    report.spectra_computed += 1
            elif report is not None:
                report.spectra_skipped += 1
            spectra.append(SegmentSpectrum(*layout.read_spectrum(seg)))
        return spectra


class CacheStage:
    """Per segment, this rank's chunks of ``Ḡ_ℓ W_ℓᵀ`` (the mean feature of the segment's checkpoints).

    ``times`` are the segment times of the counterfactual setting ``setting`` (its key;
    ``None``: same steps, the store's own caches), whose caches of ``segments`` (default:
    all) are computed.
    """

    def __init__(self, context: AttributionContext, layout: StoreLayout, shard: Shard, times: list[float],
                 setting: str | None = None, segments: list[int] | None = None) -> None:
        self.context, self.layout, self.shard, self.times = context, layout, shard, times
        self.setting = setting
        self.segments = list(range(layout.num_segments)) if segments is None else list(segments)

    def run(self, spectra: list[SegmentSpectrum], report: FeaturizeReport, bar: tqdm) -> None:
        layout = self.layout
        operators = unrolling_operators(spectra, self.times, [layout.rows(s) for s in range(layout.num_segments)],
                                        self.context.unrolled_stages())
        for seg in self.segments:
            operator = operators[seg]
            array, flags = layout.cache(seg, self.setting), layout.cache_flags(seg, self.setting)
            done = flags[:]
            members = layout.members(seg)
            op_t = torch.from_numpy(operator.T.copy())
            bounds = layout.chunks(seg)
            for chunk in self.shard.chunks[seg]:  # each rank reads the feature chunks it wrote itself
                if done[chunk]:
                    report.cache_chunks_skipped += 1
                    bar.update(1)
                    continue
                start, stop = bounds[chunk]
                mean = sum(layout.read_features(c, start, stop).astype(np.float64) for c in members) / len(members)
                cache = (torch.from_numpy(mean) @ op_t).numpy().astype(layout.cache_dtype)
                layout.store.write_durably(array, slice(start, stop), cache)
                flags[chunk] = True
                report.cache_chunks_computed += 1
                report.computed_cache_chunks.append((seg, chunk))
                bar.update(1)


def featurize(context: AttributionContext, layout: StoreLayout, collective: Collective, *, batch_size: int,
              progress: bool, times: list[float], stage_inputs: dict, setting: str | None = None,
              cache_segments: list[int] | None = None) -> FeaturizeReport:
    """Run every stage on this rank; return once the whole store is complete (on every rank).

    ``times`` are the segment times of the counterfactual setting ``setting`` (its key;
    ``None``: same steps), whose caches of ``cache_segments`` (default: all) are computed.
    """
    report = FeaturizeReport(rank=collective.rank, world_size=collective.world_size)
    began = time.perf_counter()
    errors = DeferredErrors(collective)
    count = layout.num_checkpoints

    def prepare() -> np.ndarray:
        report.recomputed_stages = layout.reconcile(stage_inputs)
        layout.create(setting, cache_segments)
        for c in context.query_checkpoints("last_stage"):  # a superset of the last segment's
            if not layout.has_checkpoint(c):
                layout.save_checkpoint(c, context.load(c), context.digests[c])
        done = np.asarray(layout.hessian_flags()[:], dtype=bool)
        for c in np.flatnonzero(done):  # a job killed after writing a Hessian, before dropping its parts
            layout.drop_hessian_parts(int(c))
        return ~done

    # Rank 0 reconciles the stage inputs, creates every array and decides which Hessians
    # are missing; then the others start.
    wanted = np.zeros(count + 1)
    if collective.rank == 0:
        missing = errors.attempt(prepare)
        if missing is not None:
            wanted[:count] = missing
    wanted[-1] = errors.pending
    wanted = collective.all_reduce(wanted)
    errors.agree(wanted[-1])
    need_hessian = wanted[:count] > 0.5
    if collective.rank != 0:
        report.recomputed_stages = layout.stale(stage_inputs)

    shard = Shard.of(collective, layout)
    report.hessian_estimator = context.estimator.name
    record = context.optimizer_record
    if record.get("second_moment") == "estimated":
        report.preconditioner = f"estimated from per-example gradients, batch size {record['batch_size']}"
    elif record.get("second_moment"):
        report.preconditioner = str(record["second_moment"])
    elif context.preconditioned:
        report.preconditioner = "group learning-rate ratios"
    gradients = GradientStage(context, layout, shard, batch_size, report)
    total = sum(len(shard.chunks[layout.segment_of(c)]) for c in range(count))
    cached = range(layout.num_segments) if cache_segments is None else cache_segments
    total += count + sum(len(shard.chunks[seg]) for seg in cached)
    bar = tqdm(total=total, desc="srcproj featurize", unit="unit", disable=not progress or collective.rank != 0)
    try:
        if context.preconditioned:
            bar.set_description("srcproj featurize: preconditioner")
            with report.timing("preconditioner"):
                if collective.rank == 0:
                    errors.attempt(PreconditionerStage(context, layout, batch_size).run, report, None)
            errors.agree()  # rank 0 wrote every segment's preconditioner
        with context.computer.evaluating():
            for index in range(count):
                bar.set_description(f"srcproj featurize: checkpoint {index + 1}/{count}, features and "
                                    f"{context.estimator.name} Hessian")
                feature_chunks, hessian_chunks = errors.attempt(gradients.todo, index, need_hessian[index]) \
                    or ([], [])
                params = None
                if (feature_chunks or hessian_chunks) and not errors.pending:
                    params = errors.attempt(context.split, index)
                errors.attempt(gradients.run, index, params, feature_chunks, hessian_chunks, bar)
                if need_hessian[index]:
                    errors.agree()  # every rank's parts are in the store
                    if collective.rank == 0:
                        errors.attempt(gradients.finish, index)
                    report.hessians_computed += 1
                else:
                    report.hessians_skipped += 1
                bar.update(1)
        errors.agree()  # rank 0 wrote every Hessian
        bar.set_description("srcproj featurize: eigendecompositions")
        # Rank 0 computes the spectra; the others read them after.
        spectra_stage = SpectrumStage(context, layout)
        rules = []
        for seg in range(layout.num_segments):
            decay, rule = errors.attempt(context.small_space_decay, seg) or (0.0, None)
            report.weight_decays.append(decay)
            rules.append(rule)
        named = {rule.name for rule in rules if rule is not None and not rule.exact}
        report.weight_decay_rule = "; ".join(sorted(named)) if named else "uniform"
        with report.timing("spectra"):
            spectra = errors.attempt(spectra_stage.run, report) if collective.rank == 0 else None
        errors.agree()
        if collective.rank != 0:
            spectra = errors.attempt(spectra_stage.run, report, False)
        bar.set_description("srcproj featurize: caches")
        with report.timing("caches"):
            errors.attempt(CacheStage(context, layout, shard, times, setting, cache_segments).run, spectra, report, bar)
        errors.agree()  # every rank's caches are written: the store is complete
        bar.set_description("srcproj featurize")
        shown = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in report.stage_seconds.items())
        bar.set_postfix_str(f"{context.estimator.name} Hessian; {shown}", refresh=True)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - began
    return report
