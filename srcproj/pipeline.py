"""Featurization as a pipeline of stages that each write to the store and resume.

1. :class:`FeatureStage`: per checkpoint, this rank's row chunks of training features
   ``φ_c = P ∇L`` (float16 rows with a power-of-two scale each, by default).
2. :class:`HessianStage`: per checkpoint, the projected Gauss-Newton Hessian: every rank
   sums its chunks' rows (from the chosen :class:`~srcproj.curvature.HessianEstimator`)
   in float64, the sums are added over the ranks and rank 0 writes the mean.
3. :class:`SpectrumStage`: per segment, the eigendecomposition of its mean Hessian + wd·I
   (rank 0).
4. :class:`CacheStage`: per segment, this rank's row chunks of ``Ḡ_ℓ W_ℓᵀ``.

The first two run checkpoint by checkpoint, so that a checkpoint's parameters are
loaded once for both. Each stage reports what it computed and what it found done in
the :class:`FeaturizeReport`. :func:`featurize` runs them on every rank of a
distributed job (:mod:`srcproj.distributed`): row chunks are dealt round-robin, and an
error on one rank is raised on all of them at the next point where they meet.
"""

from __future__ import annotations

import time
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

__all__ = ["CacheStage", "FeatureStage", "FeaturizeReport", "HessianStage", "SpectrumStage", "featurize"]



@dataclass
class FeaturizeReport:
    """What one featurize call computed and what it found done.

    In a distributed job each rank gets its own report: the chunk counts and lists are
    this rank's share (the chunks ``c`` with ``c % world_size == rank``), while the
    Hessians, to which every rank contributes a partial sum, and the spectra are
    counted on every rank. ``dataclasses.asdict(report)`` is JSON-able.
    """

    feature_chunks_computed: int = 0
    feature_chunks_skipped: int = 0
    hessians_computed: int = 0
    hessians_skipped: int = 0
    spectra_computed: int = 0
    spectra_skipped: int = 0
    cache_chunks_computed: int = 0
    cache_chunks_skipped: int = 0
    examples_featurized: int = 0
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    #: Stages whose stored results were made with other inputs (e.g. another momentum)
    #: and were recomputed by this call.
    recomputed_stages: list[str] = field(default_factory=list)
    #: ``(checkpoint, chunk)`` of every feature chunk this rank computed.
    computed_feature_chunks: list[tuple[int, int]] = field(default_factory=list)
    #: ``(segment, chunk)`` of every cache chunk this rank computed.
    computed_cache_chunks: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Shard:
    """This rank's share of the row chunks of every segment."""

    collective: Collective
    chunks: dict[int, list[int]]

    @classmethod
    def of(cls, collective: Collective, layout: StoreLayout) -> Shard:
        return cls(collective, {seg: [c for c in range(len(layout.chunks(seg))) if collective.owns(c)]
                                for seg in range(layout.num_segments)})


class FeatureStage:
    """Training features of one checkpoint, this rank's chunks."""

    def __init__(self, context: AttributionContext, layout: StoreLayout, shard: Shard, batch_size: int) -> None:
        self.context, self.layout, self.shard, self.batch_size = context, layout, shard, batch_size

    def todo(self, checkpoint: int) -> list[int]:
        done = self.layout.feature_flags(checkpoint)[:]
        return [c for c in self.shard.chunks[self.layout.segment_of(checkpoint)] if not done[c]]

    def run(self, checkpoint: int, params: tuple[dict, dict], todo: list[int], report: FeaturizeReport,
            bar: tqdm) -> None:
        ctx, layout = self.context, self.layout
        seg = layout.segment_of(checkpoint)
        mine = self.shard.chunks[seg]
        report.feature_chunks_skipped += len(mine) - len(todo)
        bar.update(len(mine) - len(todo))
        if not todo:
            return
        source, label = ctx.source(seg), f"checkpoint {checkpoint} (segment {seg})"
        flags, bounds = layout.feature_flags(checkpoint), layout.chunks(seg)
        for chunk in todo:
            start, stop = bounds[chunk]
            rows = ctx.projected(params, source, start, stop, self.batch_size, "loss", label)
            layout.write_features(checkpoint, start, rows.to("cpu", torch.float64).numpy())
            flags[chunk] = True
            report.feature_chunks_computed += 1
            report.computed_feature_chunks.append((checkpoint, chunk))
            report.examples_featurized += stop - start
            bar.update(1)


class HessianStage:
    """This rank's partial float64 sum of one checkpoint's Gauss-Newton rows, over its chunks."""

    def __init__(self, context: AttributionContext, layout: StoreLayout, shard: Shard, batch_size: int) -> None:
        self.context, self.layout, self.shard, self.batch_size = context, layout, shard, batch_size

    def partial_sum(self, checkpoint: int, params: tuple[dict, dict]) -> HessianAccumulator:
        ctx, layout = self.context, self.layout
        estimator = ctx.estimator
        seg = layout.segment_of(checkpoint)
        bounds = layout.chunks(seg)
        accumulator = HessianAccumulator(layout.proj_dim)
        chunks = self.shard.chunks[seg]
        if estimator.needs == "features":
            for chunk in chunks:
                block = layout.read_features(checkpoint, *bounds[chunk]).astype(np.float64)
                accumulator.add(estimator.rows(torch.from_numpy(block)), block.shape[0])
            return accumulator
        source = ctx.source(seg)
        trainable, fixed = params
        step = estimator.batch_limit(ctx.num_outputs, ctx.computer.num_params, self.batch_size)
        for chunk in chunks:
            start, stop = bounds[chunk]
            # Sampled labels are seeded per chunk, so they do not depend on the number of ranks.
            generator = ctx.fisher_generator(checkpoint, chunk) if estimator.needs == "sampled_gradients" else None
            for lo in range(start, stop, step):
                hi = min(lo + step, stop)
                x, y = source.rows(lo, hi)
                if estimator.needs == "output_jacobians":
                    projected, outputs = ctx.gradients.output_features(trainable, fixed, x)
                    rows = estimator.rows(projected, outputs, y)
                else:
                    xs, _ = ctx.computer.prepare(trainable, x, torch.zeros(0))
                    with torch.no_grad():
                        outputs = ctx.computer.forward(trainable, fixed, xs)
                    rows = estimator.rows([ctx.gradients.features(trainable, fixed, x, sampled, "loss")
                                           for sampled in estimator.sample_targets(outputs, generator)])
                check_finite_rows(rows, 0, f"checkpoint {checkpoint}: the Gauss-Newton vectors of examples "
                                  f"{lo}..{hi - 1}", "check that checkpoint for NaN weights")
                accumulator.add(rows, hi - lo)
        return accumulator

    def write(self, checkpoint: int, mean: np.ndarray) -> None:
        layout = self.layout
        layout.store.write_durably(layout.hessian(checkpoint), slice(0, layout.proj_dim), mean)
        layout.hessian_flags()[checkpoint] = True


class SpectrumStage:
    """Per segment, the eigendecomposition of its mean Hessian + wd·I, computed once."""

    def __init__(self, context: AttributionContext, layout: StoreLayout, weight_decay: float) -> None:
        self.context, self.layout, self.weight_decay = context, layout, weight_decay

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
                spectrum = eigendecompose(mean, damping=self.weight_decay)
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
    """Per segment, this rank's chunks of ``Ḡ_ℓ W_ℓᵀ`` (the mean feature of the segment's checkpoints)."""

    def __init__(self, context: AttributionContext, layout: StoreLayout, shard: Shard, times: list[float]) -> None:
        self.context, self.layout, self.shard, self.times = context, layout, shard, times

    def run(self, spectra: list[SegmentSpectrum], report: FeaturizeReport, bar: tqdm) -> None:
        layout = self.layout
        operators = unrolling_operators(spectra, self.times, [layout.rows(s) for s in range(layout.num_segments)])
        for seg, operator in enumerate(operators):
            array, flags = layout.cache(seg), layout.cache_flags(seg)
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
              progress: bool, weight_decay: float, times: list[float], stage_inputs: dict) -> FeaturizeReport:
    """Run every stage on this rank; return once the whole store is complete (on every rank)."""
    report = FeaturizeReport(rank=collective.rank, world_size=collective.world_size)
    began = time.perf_counter()
    errors = DeferredErrors(collective)
    count = layout.num_checkpoints

    def prepare() -> np.ndarray:
        report.recomputed_stages = layout.reconcile(stage_inputs)
        layout.create()
        for c in context.query_checkpoints("last_segment"):
            if not layout.has_checkpoint(c):
                layout.save_checkpoint(c, context.load(c), context.digests[c])
        return ~np.asarray(layout.hessian_flags()[:], dtype=bool)

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
    features = FeatureStage(context, layout, shard, batch_size)
    hessians = HessianStage(context, layout, shard, batch_size)
    total = sum(len(shard.chunks[layout.segment_of(c)]) for c in range(count))
    total += count + sum(len(chunks) for chunks in shard.chunks.values())
    bar = tqdm(total=total, desc="srcproj featurize", unit="unit", disable=not progress or collective.rank != 0)
    k = layout.proj_dim
    try:
        with context.computer.evaluating():
            for index in range(count):
                todo = errors.attempt(features.todo, index) or []
                params = None
                if (todo or need_hessian[index]) and not errors.pending:
                    params = errors.attempt(context.split, index)
                errors.attempt(features.run, index, params, todo, report, bar)
                if need_hessian[index]:
                    partial = errors.attempt(hessians.partial_sum, index, params)
                    packed = np.zeros(k * k + 2)
                    if partial is not None:
                        packed[:k * k] = partial.total.numpy().ravel()
                        packed[k * k] = partial.count
                    packed[-1] = errors.pending
                    packed = collective.all_reduce(packed)
                    errors.agree(packed[-1])
                    if collective.rank == 0:
                        errors.attempt(hessians.write, index, packed[:k * k].reshape(k, k) / max(packed[k * k], 1.0))
                    report.hessians_computed += 1
                else:
                    report.hessians_skipped += 1
                bar.update(1)
        # Rank 0 wrote every Hessian: it computes the spectra; the others read them after.
        spectra_stage = SpectrumStage(context, layout, weight_decay)
        spectra = errors.attempt(spectra_stage.run, report) if collective.rank == 0 else None
        errors.agree()
        if collective.rank != 0:
            spectra = errors.attempt(spectra_stage.run, report, False)
        errors.attempt(CacheStage(context, layout, shard, times).run, spectra, report, bar)
        errors.agree()  # every rank's caches are written: the store is complete
    finally:
        bar.close()
    report.seconds = time.perf_counter() - began
    return report
