"""The analysis driver: model + checkpoints + data → store → cached features → scores."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .curvature import (
    ESTIMATORS,
    HessianAccumulator,
    exact_hessian_batch,
    fisher_hessian_batch,
)
from .data import ExampleSource
from .distributed import Collective
from .errors import ConfigurationError, DataError, NonFiniteGradientError, StoreError
from .gradients import GradientComputer
from .projection import Projector, RademacherProjector
from .scoring import (
    DEFAULT_MEMORY_BYTES,
    Cache,
    Queries,
    TopK,
    check_memory_bytes,
    check_score_target,
    read_only,
    score_matrix,
    score_to_array,
    self_scores,
    store_cache,
    top_k,
)
from .source import SegmentSpectrum, eigendecompose, unrolling_operators
from .store import AttributionStore, metadata_differences
from .tasks import Task
from .trajectory import Trajectory

__all__ = ["Attributor", "FeaturizeReport"]

_FEATURE_DTYPES = ("float16", "float32", "float64")
_FLOAT16_MAX = 65504.0
_QUERY_MODES = ("final", "last_segment")


@dataclass
class FeaturizeReport:
    """What one :meth:`Attributor.featurize` call computed and what it found done.

    In a distributed job each rank gets its own report: the chunk counts and lists are
    this rank's share (the chunks ``c`` with ``c % world_size == rank``), while the
    Hessians, to which every rank contributes a partial sum, are counted on every rank.
    ``dataclasses.asdict(report)`` is JSON-able.
    """

    feature_chunks_computed: int = 0
    feature_chunks_skipped: int = 0
    hessians_computed: int = 0
    hessians_skipped: int = 0
    cache_chunks_computed: int = 0
    cache_chunks_skipped: int = 0
    examples_featurized: int = 0
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    #: ``(checkpoint, chunk)`` of every feature chunk this rank computed.
    computed_feature_chunks: list[tuple[int, int]] = field(default_factory=list)
    #: ``(segment, chunk)`` of every cache chunk this rank computed.
    computed_cache_chunks: list[tuple[int, int]] = field(default_factory=list)


class Attributor:
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
        inputs resumes it; one made for other inputs is refused.
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
    feature_dtype : {"float16", "float32", "float64"}
        Storage precision of per-checkpoint features (caches are float32, or float64
        with float64 features).
    chunk_size : int
        Training examples per stored chunk: the unit of resumption.
    device : str or torch.device, optional
        Where gradients are computed (default: the model's device).
    query : {"last_segment", "final"}
        Where query gradients ψ are taken: averaged over the last segment's checkpoints
        (the default), or at the final checkpoint only (docs/math.md §3). The average
        smooths the noise of one SGD iterate; it won on every scenario of the LDS
        benchmark (docs/benchmarks.md). It changes only scoring, not the store.
    distributed : bool, optional
        ``None`` (default): if a ``torch.distributed`` process group is initialized with
        more than one process (a script started by ``torchrun``), the Attributor is
        collective: every rank builds it with the same inputs and calls
        :meth:`featurize`, which shards the work over the ranks (docs/scaling.md).
        ``False``: act as one process anyway. ``True``: require a process group.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        trajectory: Trajectory,
        store: Any,
        proj_dim: int = 2048,
        seed: int = 0,
        *,
        projector: Projector | None = None,
        modules: Sequence[str] | None = None,
        hessian: str = "auto",
        fisher_samples: int = 1,
        feature_dtype: str = "float16",
        chunk_size: int = 1024,
        device: str | torch.device | None = None,
        query: str = "last_segment",
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(trajectory, Trajectory):
            raise ConfigurationError(f"trajectory must be a srcproj.Trajectory, got {type(trajectory).__name__}")
        if feature_dtype not in _FEATURE_DTYPES:
            raise ConfigurationError(f"feature_dtype={feature_dtype!r}; choose one of {_FEATURE_DTYPES}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigurationError(f"chunk_size={chunk_size!r}; it must be a positive integer")
        if isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise ConfigurationError(f"fisher_samples={fisher_samples!r}; it must be a positive integer")
        if projector is None:
            projector = RademacherProjector(proj_dim, seed)
        elif not isinstance(projector, Projector):
            raise ConfigurationError(f"projector must be a srcproj Projector, got {type(projector).__name__}")
        self.projector = projector
        self.proj_dim = projector.proj_dim
        self.trajectory = trajectory
        self.task = task
        self.computer = GradientComputer(model, task, modules)
        self.device = torch.device(device) if device is not None else self._model_device(model)
        self.feature_dtype = feature_dtype
        self.cache_dtype = "float64" if feature_dtype == "float64" else "float32"
        self.chunk_size = chunk_size
        self.fisher_samples = fisher_samples
        if query not in _QUERY_MODES:
            raise ConfigurationError(f"query={query!r}; choose one of {_QUERY_MODES}")
        self.query = query
        self._loaded: dict[int, tuple[dict, dict]] = {}

        self.sources = [
            ExampleSource(seg.data, f"segment {i}'s data") for i, seg in enumerate(trajectory.segments)
        ]
        self.checkpoints = trajectory.checkpoint_index  # (segment, position) per global index
        digests = []
        for index, (seg, pos) in enumerate(self.checkpoints):
            state = self._load(index)
            digests.append(self.computer.checkpoint_digest(state))
        self.num_outputs = self._probe_outputs()
        for seg, source in enumerate(self.sources):
            if trajectory.data_groups[seg] == seg:
                task.validate_targets(source.all_targets(), self.num_outputs, source.what)
        self.hessian = self._choose_estimator(hessian)
        self._bind_projector()

        segments_meta = []
        for seg_index, segment in enumerate(trajectory.segments):
            segments_meta.append({
                "steps": segment.steps,
                "total_lr": segment.total_lr,
                "time": trajectory.segment_time(seg_index),
                "data_group": trajectory.data_groups[seg_index],
                "num_examples": len(self.sources[seg_index]),
                "data_fingerprint": self.sources[seg_index].fingerprint(),
                "checkpoints": [digests[c] for c, (s, _) in enumerate(self.checkpoints) if s == seg_index],
            })
        metadata = {
            "library_version": __version__,
            "projector": projector.describe(),
            "proj_dim": self.proj_dim,
            "num_params": self.computer.num_params,
            "model_fingerprint": self.computer.fingerprint(),
            "param_names": self.computer.param_names,
            "task": task.describe(),
            "num_outputs": self.num_outputs,
            "hessian": self.hessian,
            "fisher_samples": fisher_samples,
            "feature_dtype": feature_dtype,
            "chunk_size": chunk_size,
            "momentum": float(trajectory.momentum),
            "weight_decay": float(trajectory.weight_decay),
            "segments": segments_meta,
        }
        self._collective = Collective(distributed)
        self.store = self._open_store(store, metadata)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _model_device(model: nn.Module) -> torch.device:
        for tensor in model.parameters():
            return tensor.device
        return torch.device("cpu")

    def _load(self, index: int) -> dict:
        seg, pos = self.checkpoints[index]
        checkpoint = self.trajectory.segments[seg].checkpoints[pos]
        return self.computer.load_checkpoint(checkpoint, f"checkpoint {index} (segment {seg}, position {pos})")

    def _bind_projector(self) -> None:
        """Show the projector the model, the attributed parameters, the final checkpoint and
        two examples (the factored projector lays out its layers and checks them)."""
        if type(self.projector).bind is Projector.bind:
            return
        trainable, fixed = self.computer.split(self._load(len(self.checkpoints) - 1), self.device)
        x, _ = self.sources[0].rows(0, min(2, len(self.sources[0])))
        x, _ = self.computer.prepare(trainable, x, torch.zeros(0))
        with self.computer.evaluating():
            self.projector.bind(self.computer.model, self.computer.param_names,
                                params={**trainable, **fixed}, example=x)

    def _probe_outputs(self) -> int:
        trainable, fixed = self.computer.split(self._load(len(self.checkpoints) - 1), self.device)
        for source in self.sources:
            x, _ = source.rows(0, 1)
            dtype = next(iter(trainable.values())).dtype
            x = x.to(self.device, dtype) if x.is_floating_point() else x.to(self.device)
            with torch.no_grad(), self.computer.evaluating():
                try:
                    outputs = self.computer.forward(trainable, fixed, x)
                except DataError as exc:
                    raise DataError(f"{source.what}: {exc}") from None
            if outputs.ndim < 2 or outputs.shape[0] != 1:
                raise DataError(
                    f"{source.what}: the model returned shape {tuple(outputs.shape)} for one "
                    "example; it must return (batch, outputs)"
                )
            num_outputs = int(outputs[0].numel())
        return num_outputs

    def _choose_estimator(self, hessian: str) -> str:
        if hessian not in ("auto",) + ESTIMATORS:
            raise ConfigurationError(f"hessian={hessian!r}; choose 'auto' or one of {ESTIMATORS}")
        if hessian != "auto":
            return hessian
        has_exact = type(self.task).output_hessian is not Task.output_hessian
        has_fisher = type(self.task).sample_targets is not Task.sample_targets
        if has_exact and self.num_outputs <= 20:
            return "exact"
        if has_fisher:
            return "fisher"
        return "exact" if has_exact else "empirical"

    def _segment_of(self, checkpoint: int) -> int:
        return self.checkpoints[checkpoint][0]

    def _chunks(self, num_rows: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.chunk_size, num_rows)) for s in range(0, num_rows, self.chunk_size)]

    def _features(self, computer_fn, trainable, fixed, source, start, stop, batch_size, label) -> torch.Tensor:
        """Projected per-example gradients for rows ``start..stop-1``, checked finite.

        ``computer_fn``: "loss" or "measurement" (or the computer's ``loss_grads`` /
        ``measurement_grads``): the projector computes the features itself
        (:meth:`Projector.features`), so a factored projector never forms a gradient.
        Any other function of ``(trainable, fixed, x, y)`` gives flat rows to project.
        """
        if isinstance(computer_fn, str):
            kind = computer_fn
        else:
            kinds = {"loss": self.computer.loss_grads, "measurement": self.computer.measurement_grads}
            kind = next((name for name, fn in kinds.items() if computer_fn == fn), None)
        parts = []
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            x, y = source.rows(lo, hi)
            try:
                if kind is None:
                    features = self.projector.project(computer_fn(trainable, fixed, x, y))
                else:
                    features = self.projector.features(self.computer, trainable, fixed, x, y, kind)
            except DataError as exc:  # name the data set, as _probe_outputs does
                raise DataError(f"{source.what}, examples {lo}..{hi - 1}: {exc}") from None
            finite = torch.isfinite(features).all(dim=1)
            if not bool(finite.all()):
                first = lo + int(torch.nonzero(~finite)[0, 0])
                raise NonFiniteGradientError(
                    f"{label}: the gradient of example {first} of {source.what} is NaN or inf; "
                    "check that checkpoint for NaN weights and that example for NaN inputs"
                )
            parts.append(features.detach())
        return torch.cat(parts)

    # ------------------------------------------------------------------ featurize
    def _open_store(self, location: Any, metadata: dict) -> AttributionStore:
        """Open the store; in a distributed job rank 0 creates or checks it before the others open it."""
        col = self._collective
        if not col.active:
            return AttributionStore.open(location, metadata)
        # Every rank must describe the same inputs; checked before anything touches the store.
        everyone = col.all_gather_object(metadata)
        for rank, theirs in enumerate(everyone):
            shown = metadata_differences(everyone[0], theirs, ("on rank 0", f"on rank {rank}"))
            if shown:
                raise ConfigurationError(
                    f"rank {rank} was given other inputs than rank 0 ({shown}); every rank must build the "
                    "Attributor from the same model, checkpoints, data and arguments"
                )
        opened, error = None, None
        if col.rank == 0:
            try:
                opened = AttributionStore.open(location, metadata)
            except Exception as exc:  # noqa: BLE001 - agreed on below, so that no rank waits for rank 0
                error = exc
        col.agree(error)
        if col.rank != 0:
            try:
                opened = AttributionStore.open(location, metadata, create=False)
            except StoreError as exc:
                error = StoreError(
                    f"{exc}; rank {col.rank} cannot open the store that rank 0 opened: every rank must reach "
                    "the same storage (a shared file system or an object store URL; a memory:// store "
                    "exists in one process only)"
                )
            except Exception as exc:  # noqa: BLE001 - raised on every rank by col.agree
                error = exc
        col.agree(error)
        return opened

    def featurize(self, batch_size: int = 64, progress: bool = True) -> FeaturizeReport:
        """Compute and store features, Hessians, spectra and caches; resume what is done.

        In a distributed job (see :mod:`srcproj.distributed`) every rank must call it.
        Rank ``r`` of ``W`` computes the row chunks ``c`` with ``c % W == r`` of every
        checkpoint's features and of every segment's caches; the Hessians' float64
        partial sums are summed over the ranks; rank 0 writes the Hessians and the
        spectra. It returns on every rank once the whole store is complete, so any
        rank (or a later single process) can score from it. The result equals a
        one-process run up to the order of floating-point sums.

        Parameters
        ----------
        batch_size : int
            Examples per vmap'ed gradient batch (memory ~ batch_size × parameters).
        progress : bool
            Show a progress bar (on rank 0 only).

        Returns
        -------
        FeaturizeReport
            What this rank computed and what it found done.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size={batch_size!r}; it must be a positive integer")
        col = self._collective
        report = FeaturizeReport(rank=col.rank, world_size=col.world_size)
        began = time.perf_counter()
        num_checkpoints = len(self.checkpoints)
        failure: Exception | None = None

        def attempt(work, *args):
            """``work(*args)`` unless an error is pending. In a distributed job an error is kept
            until the next point where the ranks meet (``col.agree``), so that no rank is
            left waiting there for this one; in one process it propagates at once."""
            nonlocal failure
            if failure is not None:
                return None
            if not col.active:
                return work(*args)
            try:
                return work(*args)
            except Exception as exc:  # noqa: BLE001 - raised on every rank by col.agree
                failure = exc
                return None

        def prepare() -> np.ndarray:
            self._create_arrays()
            return ~np.asarray(self.store.flags("hessians/done", num_checkpoints)[:], dtype=bool)

        # Rank 0 creates every array and decides which Hessians are missing; then the others start.
        wanted = np.zeros(num_checkpoints + 1)
        if col.rank == 0:
            missing = attempt(prepare)
            if missing is not None:
                wanted[:num_checkpoints] = missing
        wanted[-1] = failure is not None
        wanted = col.all_reduce(wanted)
        col.agree(failure, wanted[-1])
        need_hessian = wanted[:num_checkpoints] > 0.5

        mine = {}
        for seg, source in enumerate(self.sources):
            mine[seg] = [c for c in range(len(self._chunks(len(source)))) if col.owns(c)]
        total = sum(len(mine[self._segment_of(c)]) for c in range(num_checkpoints))
        total += num_checkpoints + sum(len(chunks) for chunks in mine.values())
        bar = tqdm(total=total, desc="srcproj featurize", unit="unit", disable=not progress or col.rank != 0)
        k = self.proj_dim
        try:
            with self.computer.evaluating():
                for index in range(num_checkpoints):
                    partial = attempt(self._featurize_checkpoint, index, mine[self._segment_of(index)],
                                      bool(need_hessian[index]), batch_size, report, bar)
                    if need_hessian[index]:
                        packed = np.zeros(k * k + 2)
                        if partial is not None:
                            packed[:k * k] = partial.total.numpy().ravel()
                            packed[k * k] = partial.count
                        packed[-1] = failure is not None
                        packed = col.all_reduce(packed)
                        col.agree(failure, packed[-1])
                        if col.rank == 0:
                            mean = packed[:k * k].reshape(k, k) / max(packed[k * k], 1.0)
                            attempt(self._write_hessian, index, mean)
                        report.hessians_computed += 1
                    else:
                        report.hessians_skipped += 1
                    bar.update(1)
            # Rank 0 wrote every Hessian: it computes the spectra; the others read them after.
            spectra = attempt(self._spectra) if col.rank == 0 else None
            col.agree(failure)
            if col.rank != 0:
                spectra = attempt(self._spectra, False)
            attempt(self._write_caches, spectra, report, bar)
            col.agree(failure)  # every rank's caches are written: the store is complete
        finally:
            bar.close()
        report.seconds = time.perf_counter() - began
        return report

    def _create_arrays(self) -> None:
        """Create every array featurize writes (rank 0 does, before the other ranks open them)."""
        k = self.proj_dim
        for index in range(len(self.checkpoints)):
            rows = len(self.sources[self._segment_of(index)])
            self.store.array(f"features/ckpt_{index}", (rows, k), self.feature_dtype, chunks=(self.chunk_size, k))
            self.store.flags(f"features/ckpt_{index}_done", len(self._chunks(rows)))
            self.store.array(f"hessians/ckpt_{index}", (k, k), "float64")
        self.store.flags("hessians/done", len(self.checkpoints))
        for seg, source in enumerate(self.sources):
            self.store.array(f"segments/seg_{seg}/eigenvalues", (k,), "float64")
            self.store.array(f"segments/seg_{seg}/eigenvectors", (k, k), "float64")
            self.store.array(f"caches/seg_{seg}", (len(source), k), self.cache_dtype, chunks=(self.chunk_size, k))
            self.store.flags(f"caches/seg_{seg}_done", len(self._chunks(len(source))))
        self.store.flags("segments/done", len(self.sources))

    def _featurize_checkpoint(self, index: int, mine: list[int], need_hessian: bool, batch_size: int,
                              report: FeaturizeReport, bar: tqdm) -> HessianAccumulator | None:
        """This rank's feature chunks ``mine`` of one checkpoint; then, if needed, its partial Hessian sum."""
        seg = self._segment_of(index)
        source = self.sources[seg]
        label = f"checkpoint {index} (segment {seg})"
        chunks = self._chunks(len(source))
        array = self.store.array(f"features/ckpt_{index}", (len(source), self.proj_dim),
                                 self.feature_dtype, chunks=(self.chunk_size, self.proj_dim))
        flags = self.store.flags(f"features/ckpt_{index}_done", len(chunks))
        done = flags[:]
        todo = [c for c in mine if not done[c]]
        report.feature_chunks_skipped += len(mine) - len(todo)
        bar.update(len(mine) - len(todo))
        if not todo and not need_hessian:
            return None
        trainable, fixed = self.computer.split(self._load(index), self.device)
        for chunk in todo:
            start, stop = chunks[chunk]
            rows = self._features(self.computer.loss_grads, trainable, fixed, source,
                                  start, stop, batch_size, label)
            values = rows.to("cpu", torch.float64).numpy()
            if self.feature_dtype == "float16" and np.abs(values).max() > _FLOAT16_MAX:
                raise ConfigurationError(
                    f"{label}: features of examples {start}..{stop - 1} exceed float16's "
                    "range; create the store with feature_dtype='float32'"
                )
            self.store.write_durably(array, slice(start, stop), values.astype(self.feature_dtype))
            flags[chunk] = True
            report.feature_chunks_computed += 1
            report.computed_feature_chunks.append((index, chunk))
            report.examples_featurized += stop - start
            bar.update(1)
        if not need_hessian:
            return None
        return self._checkpoint_hessian(index, trainable, fixed, source, batch_size, mine)

    def _write_hessian(self, index: int, hessian: np.ndarray) -> None:
        target = self.store.array(f"hessians/ckpt_{index}", (self.proj_dim, self.proj_dim), "float64")
        self.store.write_durably(target, slice(0, self.proj_dim), hessian)
        self.store.flags("hessians/done", len(self.checkpoints))[index] = True

    def _fisher_generator(self, index: int, chunk: int) -> torch.Generator:
        """The label sampler of one checkpoint's row chunk: the same whichever rank computes it."""
        seed = int(self.store.metadata["projector"].get("seed", 0))
        words = np.random.SeedSequence([seed % (1 << 64), index, chunk]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def _checkpoint_hessian(self, index: int, trainable: dict, fixed: dict, source: ExampleSource,
                            batch_size: int, chunks: Sequence[int] | None = None) -> HessianAccumulator:
        """The float64 sum of Gauss-Newton outer products over the row chunks ``chunks`` (default: all)."""
        bounds = self._chunks(len(source))
        chosen = range(len(bounds)) if chunks is None else chunks
        accumulator = HessianAccumulator(self.proj_dim)
        if self.hessian == "empirical":
            name = f"features/ckpt_{index}"
            for chunk in chosen:
                block = self.store.read_rows(name, *bounds[chunk]).astype(np.float64)
                accumulator.add(torch.from_numpy(block), block.shape[0])
            return accumulator
        step = batch_size
        if self.hessian == "exact":
            # The exact estimator holds C Jacobian rows per example: cap that at ~256 MiB.
            row_bytes = self.num_outputs * self.computer.num_params * 8
            step = max(1, min(batch_size, (256 << 20) // row_bytes))
        for chunk in chosen:
            start, stop = bounds[chunk]
            # Sampled labels are seeded per chunk, so they do not depend on the number of ranks.
            generator = self._fisher_generator(index, chunk) if self.hessian == "fisher" else None
            for lo in range(start, stop, step):
                hi = min(lo + step, stop)
                x, y = source.rows(lo, hi)
                if self.hessian == "exact":
                    rows = exact_hessian_batch(self.computer, self.projector, trainable, fixed, x, y)
                else:
                    rows = fisher_hessian_batch(self.computer, self.projector, trainable, fixed, x,
                                                self.fisher_samples, generator)
                if not bool(torch.isfinite(rows).all()):
                    raise NonFiniteGradientError(
                        f"checkpoint {index}: the Gauss-Newton vectors of examples {lo}..{hi - 1} are NaN or inf"
                    )
                accumulator.add(rows, hi - lo)
        return accumulator

    def _spectra(self, compute: bool = True) -> list[SegmentSpectrum]:
        """Per segment: eigendecomposition of the mean Hessian + wd·I, stored once.

        With ``compute=False`` a missing spectrum is an error (the ranks other than 0
        only read what rank 0 computed).
        """
        segments = self.trajectory.segments
        flags = self.store.flags("segments/done", len(segments))
        done = flags[:]
        spectra = []
        for seg in range(len(segments)):
            values_name, vectors_name = f"segments/seg_{seg}/eigenvalues", f"segments/seg_{seg}/eigenvectors"
            if not done[seg]:
                if not compute:
                    raise StoreError(f"the spectrum of segment {seg} is not in the store: run featurize() first")
                members = [c for c, (s, _) in enumerate(self.checkpoints) if s == seg]
                mean = sum(self.store.read_all(f"hessians/ckpt_{c}") for c in members) / len(members)
                spectrum = eigendecompose(mean, damping=self.trajectory.weight_decay)
                k = self.proj_dim
                values = self.store.array(values_name, (k,), "float64")
                self.store.write_durably(values, slice(0, k), spectrum.eigenvalues)
                vectors = self.store.array(vectors_name, (k, k), "float64")
                self.store.write_durably(vectors, slice(0, k), spectrum.eigenvectors)
                flags[seg] = True
            spectra.append(SegmentSpectrum(self.store.read_all(values_name), self.store.read_all(vectors_name)))
        return spectra

    def _operators(self, spectra: list[SegmentSpectrum]) -> list[np.ndarray]:
        times = [self.trajectory.segment_time(s) for s in range(len(spectra))]
        sizes = [len(src) for src in self.sources]
        return unrolling_operators(spectra, times, sizes)

    def _write_caches(self, spectra: list[SegmentSpectrum], report: FeaturizeReport, bar: tqdm) -> None:
        operators = self._operators(spectra)
        for seg, operator in enumerate(operators):
            source = self.sources[seg]
            chunks = self._chunks(len(source))
            array = self.store.array(f"caches/seg_{seg}", (len(source), self.proj_dim), self.cache_dtype,
                                     chunks=(self.chunk_size, self.proj_dim))
            flags = self.store.flags(f"caches/seg_{seg}_done", len(chunks))
            done = flags[:]
            members = [c for c, (s, _) in enumerate(self.checkpoints) if s == seg]
            op_t = torch.from_numpy(operator.T.copy())
            for chunk, (start, stop) in enumerate(chunks):
                if not self._collective.owns(chunk):
                    continue  # another rank's; it reads the feature chunks that it wrote itself
                if done[chunk]:
                    report.cache_chunks_skipped += 1
                    bar.update(1)
                    continue
                mean = sum(self.store.read_rows(f"features/ckpt_{c}", start, stop).astype(np.float64)
                           for c in members) / len(members)
                cache = (torch.from_numpy(mean) @ op_t).numpy().astype(self.cache_dtype)
                self.store.write_durably(array, slice(start, stop), cache)
                flags[chunk] = True
                report.cache_chunks_computed += 1
                report.computed_cache_chunks.append((seg, chunk))
                bar.update(1)

    # ------------------------------------------------------------------ stored quantities
    def _checkpoint_number(self, checkpoint: int) -> int:
        count = len(self.checkpoints)
        if isinstance(checkpoint, bool) or not isinstance(checkpoint, (int, np.integer)) or not -count <= checkpoint < count:
            raise ConfigurationError(f"checkpoint {checkpoint!r} does not exist; the trajectory has checkpoints "
                                     f"0..{count - 1} (negative indices count from the end)")
        return int(checkpoint) % count

    def _data_segment(self, segment: int) -> int:
        return self._selection([segment])[0]

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
        index = self._checkpoint_number(checkpoint)
        seg = self._data_segment(data_segment)
        if kind not in ("loss", "measurement"):
            raise ConfigurationError(f"kind={kind!r}; choose 'loss' or 'measurement'")
        source = self.sources[seg]
        same_data = self.trajectory.data_groups[self._segment_of(index)] == self.trajectory.data_groups[seg]
        flags = f"features/ckpt_{index}_done"
        if kind == "loss" and same_data and self.store.has(flags) and bool(np.all(self.store.group[flags][:])):
            return self.store.read_all(f"features/ckpt_{index}").astype(self.cache_dtype)
        trainable, fixed = self.computer.split(self._load(index), self.device)
        fn = self.computer.loss_grads if kind == "loss" else self.computer.measurement_grads
        with self.computer.evaluating():
            rows = self._features(fn, trainable, fixed, source, 0, len(source), batch_size,
                                  f"checkpoint {index}")
        return rows.to("cpu").numpy().astype(self.cache_dtype)

    def query_features_at(self, queries: Any, checkpoint: int = -1, batch_size: int = 64) -> np.ndarray:
        """ψ = P ∇f(z_q, θ_c) at checkpoint ``c`` (``-1``: the final one, as in :meth:`score`)."""
        index = self._checkpoint_number(checkpoint)
        source = ExampleSource(queries, "the query set")
        self.task.validate_targets(source.all_targets(), self.num_outputs, source.what)
        trainable, fixed = self.computer.split(self._load(index), self.device)
        with self.computer.evaluating():
            rows = self._features(self.computer.measurement_grads, trainable, fixed, source, 0, len(source),
                                  batch_size, f"checkpoint {index}")
        return rows.to("cpu").numpy().astype(self.cache_dtype)

    def checkpoint_hessian(self, checkpoint: int = -1) -> np.ndarray:
        """The stored k×k projected Gauss-Newton Hessian of one checkpoint (on its segment's data)."""
        index = self._checkpoint_number(checkpoint)
        flags = self.store.flags("hessians/done", len(self.checkpoints))
        if not bool(flags[index]):
            raise StoreError(f"the Hessian of checkpoint {index} is not in the store: run featurize() first")
        return self.store.read_all(f"hessians/ckpt_{index}")

    def segment_spectra(self) -> list[SegmentSpectrum]:
        """Per segment, the eigendecomposition of its mean Hessian + wd·I, from the store."""
        self._require_featurized()
        return self._spectra()

    # ------------------------------------------------------------------ scoring
    def is_featurized(self) -> bool:
        """Whether every cache chunk is in the store."""
        for seg, source in enumerate(self.sources):
            name = f"caches/seg_{seg}_done"
            if not self.store.has(name) or not bool(np.all(self.store.group[name][:])):
                return False
        return True

    def _selection(self, segments: Sequence[int] | None) -> list[int]:
        if segments is None:
            return self.trajectory.segments_sharing_data(0)
        selected = list(segments)
        if not selected:
            raise ConfigurationError("segments=[] selects nothing; give at least one segment index")
        count = len(self.trajectory.segments)
        for s in selected:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < count:
                raise ConfigurationError(f"segment {s!r} does not exist; the trajectory has segments 0..{count - 1}")
        groups = {self.trajectory.data_groups[s] for s in selected}
        if len(groups) > 1:
            raise ConfigurationError(
                f"segments {selected} hold different data objects, so their training examples are "
                "different; score the segments of one data set at a time"
            )
        return sorted({int(s) for s in selected})

    def _require_featurized(self) -> None:
        if not self.is_featurized():
            raise StoreError("the store is not complete: run featurize() first (it resumes where it stopped)")

    def _cache_reader(self, selected: list[int]) -> Cache:
        """The summed caches of the selected segments, read through a read-only view of the store."""
        return store_cache(read_only(self.store), [f"caches/seg_{s}" for s in selected], self.cache_dtype)

    def _query_stream(self, queries: Any, batch_size: int) -> Queries:
        """The queries' ψ, computed one query batch at a time as scoring asks for it."""
        source = ExampleSource(queries, "the query set")
        self.task.validate_targets(source.all_targets(), self.num_outputs, source.what)
        return Queries(lambda start, stop: self._measurement_features(source, start, stop, batch_size), len(source))

    def query_features(self, queries: Any, batch_size: int = 64) -> np.ndarray:
        """ψ_q, shape ``(Q, k)``: the measurement's projected gradient at the query checkpoints.

        With ``query="final"`` that is ``P ∇f(z_q, θ_T)`` at the final checkpoint; with
        ``query="last_segment"`` its mean over the last segment's checkpoints.
        """
        source = ExampleSource(queries, "the query set")
        self.task.validate_targets(source.all_targets(), self.num_outputs, source.what)
        return self._measurement_features(source, 0, len(source), batch_size)

    def _parameters(self, index: int) -> tuple[dict, dict]:
        if index not in self._loaded:
            self._loaded[index] = self.computer.split(self._load(index), self.device)
        return self._loaded[index]

    def _final_parameters(self) -> tuple[dict, dict]:
        return self._parameters(len(self.checkpoints) - 1)

    def _query_checkpoints(self) -> list[int]:
        final = len(self.checkpoints) - 1
        if self.query == "final":
            return [final]
        last = self._segment_of(final)
        return [c for c, (s, _) in enumerate(self.checkpoints) if s == last]

    def _checkpoint_label(self, index: int) -> str:
        final = len(self.checkpoints) - 1
        return f"final checkpoint {index}" if index == final else f"checkpoint {index} (segment {self._segment_of(index)})"

    def _measurement_features(self, source: ExampleSource, start: int, stop: int, batch_size: int) -> np.ndarray:
        indices = self._query_checkpoints()
        total = None
        with self.computer.evaluating():
            for index in indices:
                trainable, fixed = self._parameters(index)
                rows = self._features(self.computer.measurement_grads, trainable, fixed, source, start, stop,
                                      batch_size, self._checkpoint_label(index)).to("cpu", torch.float64)
                total = rows if total is None else total + rows
        return (total / len(indices)).numpy().astype(self.cache_dtype)

    def score(self, queries: Any, segments: Sequence[int] | None = None, batch_size: int = 64, *,
              score_memory_bytes: int = DEFAULT_MEMORY_BYTES, out: Any = None, overwrite: bool = False):
        """Scores ``(Q, N)``: positive = including the training example helps the query.

        Parameters
        ----------
        queries : Dataset or tuple (X, y)
            Query examples, scored with the task's measurement at the query checkpoints
            (the final one, or the last segment's with ``query="last_segment"``).
        segments : sequence of int, optional
            0-based segments whose terms are summed (they must share one data object);
            default: the segments that share segment 0's data.
        batch_size : int
            Examples per query-gradient batch.
        score_memory_bytes : int, optional
            Bound on the transient memory of scoring (default 1 GiB): the cache rows
            read per block, the query batch and, with ``out``, the score block. The ``(Q, N)`` result itself is extra when
            ``out`` is None.
        out : str or path or zarr store URL or zarr Store, optional
            Write the scores into a new float32 (float64 with float64 features) zarr v3
            array there instead of returning them in memory.
        overwrite : bool
            Replace a zarr array or group already at ``out`` (default: refuse it).

        Returns
        -------
        numpy.ndarray or zarr.Array
            The ``(Q, N)`` scores; with ``out``, the zarr array, opened read-only. Its
            ``attrs["srcproj_scores"]["complete"]`` is True once every chunk is durably
            written; an interrupted call leaves it False (unwritten chunks read as NaN).
        """
        selected = self._selection(segments)
        memory = check_memory_bytes(score_memory_bytes)
        local = check_score_target(out, overwrite, self.store._local_root) if out is not None else None
        self._require_featurized()
        psi = self._query_stream(queries, batch_size)
        cache = self._cache_reader(selected)
        if out is None:
            return score_matrix(psi, cache, memory)
        about = {"store": str(self.store.location), "segments": selected,
                 "sign": "positive: including the training example helps the query"}
        return score_to_array(psi, cache, out, memory, overwrite=overwrite, local_root=local, attributes=about)

    def top_k(self, queries: Any, k: int = 10, segments: Sequence[int] | None = None,
              batch_size: int = 64, *, score_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> TopK:
        """The ``k`` most helpful and most harmful training examples per query, streamed.

        ``score_memory_bytes`` bounds the transient memory (default 1 GiB): score blocks,
        cache blocks and query batches are sized to fit it, so neither ``Q`` nor ``N``
        changes the peak beyond the ``(Q, k)`` result. Other parameters as in :meth:`score`.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigurationError(f"k={k!r}; it must be a positive integer")
        selected = self._selection(segments)
        memory = check_memory_bytes(score_memory_bytes)
        self._require_featurized()
        psi = self._query_stream(queries, batch_size)
        return top_k(psi, self._cache_reader(selected), int(k), memory)

    def self_influence(self, segments: Sequence[int] | None = None, batch_size: int = 64, *,
                       score_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> np.ndarray:
        """``score(m, m)`` for every training example of the selected segments' data.

        ``score_memory_bytes`` bounds the rows scored per block (default 1 GiB); the
        training examples' own gradients are computed ``batch_size`` at a time.
        """
        selected = self._selection(segments)
        memory = check_memory_bytes(score_memory_bytes)
        self._require_featurized()
        source = self.sources[selected[0]]

        def query_rows(start: int, stop: int) -> np.ndarray:
            return self._measurement_features(source, start, stop, batch_size)

        return self_scores(query_rows, self._cache_reader(selected), memory)
