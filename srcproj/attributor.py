"""The analysis driver: model + checkpoints + data → store → cached features → scores."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .curvature import (
    ESTIMATORS,
    HessianAccumulator,
    empirical_hessian,
    exact_hessian_batch,
    fisher_hessian_batch,
)
from .data import ExampleSource
from .errors import ConfigurationError, DataError, NonFiniteGradientError, StoreError
from .gradients import GradientComputer
from .projection import Projector, RademacherProjector
from .scoring import TopK, score_matrix, self_scores, top_k
from .source import SegmentSpectrum, eigendecompose, unrolling_operators
from .store import AttributionStore
from .tasks import Task
from .trajectory import Trajectory

__all__ = ["Attributor", "FeaturizeReport"]

_FEATURE_DTYPES = ("float16", "float32", "float64")
_FLOAT16_MAX = 65504.0
_QUERY_MODES = ("final", "last_segment")


@dataclass
class FeaturizeReport:
    """What one :meth:`Attributor.featurize` call computed and what it found done."""

    feature_chunks_computed: int = 0
    feature_chunks_skipped: int = 0
    hessians_computed: int = 0
    hessians_skipped: int = 0
    cache_chunks_computed: int = 0
    cache_chunks_skipped: int = 0
    examples_featurized: int = 0
    seconds: float = 0.0


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
        Replaces the default ``RademacherProjector(proj_dim, seed)``.
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
    query : {"final", "last_segment"}
        Where query gradients ψ are taken: at the final checkpoint (source-math.md §3),
        or averaged over the last segment's checkpoints, which smooths the noise of one
        SGD iterate. It changes only scoring, not the store.
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
        query: str = "final",
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
        self.store = AttributionStore.open(store, metadata)

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
        """Projected per-example gradients for rows ``start..stop-1``, checked finite."""
        parts = []
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            x, y = source.rows(lo, hi)
            try:
                grads = computer_fn(trainable, fixed, x, y)
            except DataError as exc:  # name the data set, as _probe_outputs does
                raise DataError(f"{source.what}, examples {lo}..{hi - 1}: {exc}") from None
            features = self.projector.project(grads)
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
    def featurize(self, batch_size: int = 64, progress: bool = True) -> FeaturizeReport:
        """Compute and store features, Hessians, spectra and caches; resume what is done.

        Parameters
        ----------
        batch_size : int
            Examples per vmap'ed gradient batch (memory ~ batch_size × parameters).
        progress : bool
            Show a progress bar.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size={batch_size!r}; it must be a positive integer")
        report = FeaturizeReport()
        began = time.perf_counter()
        hessian_flags = self.store.flags("hessians/done", len(self.checkpoints))
        hessians_done = hessian_flags[:]
        total = sum(len(self._chunks(len(self.sources[s]))) for s, _ in self.checkpoints)
        total += len(self.checkpoints)
        total += sum(len(self._chunks(len(src))) for src in self.sources)
        bar = tqdm(total=total, desc="srcproj featurize", unit="unit", disable=not progress)
        try:
            with self.computer.evaluating():
                for index in range(len(self.checkpoints)):
                    seg = self._segment_of(index)
                    source = self.sources[seg]
                    label = f"checkpoint {index} (segment {seg})"
                    chunks = self._chunks(len(source))
                    array = self.store.array(f"features/ckpt_{index}", (len(source), self.proj_dim),
                                             self.feature_dtype, chunks=(self.chunk_size, self.proj_dim))
                    flags = self.store.flags(f"features/ckpt_{index}_done", len(chunks))
                    done = flags[:]
                    todo = [i for i in range(len(chunks)) if not done[i]]
                    report.feature_chunks_skipped += len(chunks) - len(todo)
                    bar.update(len(chunks) - len(todo))
                    need_hessian = not hessians_done[index]
                    if todo or need_hessian:
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
                        report.examples_featurized += stop - start
                        bar.update(1)
                    if need_hessian:
                        hessian = self._checkpoint_hessian(index, trainable, fixed, source, batch_size)
                        target = self.store.array(f"hessians/ckpt_{index}", (self.proj_dim, self.proj_dim), "float64")
                        self.store.write_durably(target, slice(0, self.proj_dim), hessian)
                        hessian_flags[index] = True
                        report.hessians_computed += 1
                    else:
                        report.hessians_skipped += 1
                    bar.update(1)
            spectra = self._spectra()
            self._write_caches(spectra, report, bar)
        finally:
            bar.close()
        report.seconds = time.perf_counter() - began
        return report

    def _checkpoint_hessian(self, index: int, trainable: dict, fixed: dict, source: ExampleSource,
                            batch_size: int) -> np.ndarray:
        if self.hessian == "empirical":
            name = f"features/ckpt_{index}"
            blocks = (self.store.read_rows(name, s, e).astype(np.float64) for s, e in self._chunks(len(source)))
            return empirical_hessian(blocks, self.proj_dim)
        accumulator = HessianAccumulator(self.proj_dim)
        generator = torch.Generator().manual_seed(int(self.store.metadata["projector"].get("seed", 0)) * 7919 + index)
        step = batch_size
        if self.hessian == "exact":
            # The exact estimator holds C Jacobian rows per example: cap that at ~256 MiB.
            row_bytes = self.num_outputs * self.computer.num_params * 8
            step = max(1, min(batch_size, (256 << 20) // row_bytes))
        for lo in range(0, len(source), step):
            hi = min(lo + step, len(source))
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
        return accumulator.mean()

    def _spectra(self) -> list[SegmentSpectrum]:
        """Per segment: eigendecomposition of the mean Hessian + wd·I, stored once."""
        segments = self.trajectory.segments
        flags = self.store.flags("segments/done", len(segments))
        done = flags[:]
        spectra = []
        for seg in range(len(segments)):
            values_name, vectors_name = f"segments/seg_{seg}/eigenvalues", f"segments/seg_{seg}/eigenvectors"
            if not done[seg]:
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

    def _cache_reader(self, selected: list[int]):
        names = [f"caches/seg_{s}" for s in selected]

        def read(start: int, stop: int) -> np.ndarray:
            total = self.store.read_rows(names[0], start, stop).astype(self.cache_dtype)
            for name in names[1:]:
                total += self.store.read_rows(name, start, stop)
            return total

        return read

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

    def _measurement_features(self, source: ExampleSource, start: int, stop: int, batch_size: int) -> np.ndarray:
        indices = self._query_checkpoints()
        total = None
        with self.computer.evaluating():
            for index in indices:
                trainable, fixed = self._parameters(index)
                rows = self._features(self.computer.measurement_grads, trainable, fixed, source, start, stop,
                                      batch_size, f"query checkpoint {index}").to("cpu", torch.float64)
                total = rows if total is None else total + rows
        return (total / len(indices)).numpy().astype(self.cache_dtype)

    def score(self, queries: Any, segments: Sequence[int] | None = None, batch_size: int = 64) -> np.ndarray:
        """Scores ``(Q, N)``: positive = including the training example helps the query.

        Parameters
        ----------
        queries : Dataset or tuple (X, y)
            Query examples, scored with the task's measurement at the query checkpoints
            (the final one, or the last segment's with ``query="last_segment"``).
        segments : sequence of int, optional
            0-based segments whose terms are summed (they must share one data object);
            default: the segments that share segment 0's data.
        """
        selected = self._selection(segments)
        self._require_featurized()
        psi = self.query_features(queries, batch_size)
        num_rows = len(self.sources[selected[0]])
        return score_matrix(psi, self._cache_reader(selected), num_rows, self.chunk_size)

    def top_k(self, queries: Any, k: int = 10, segments: Sequence[int] | None = None,
              batch_size: int = 64) -> TopK:
        """The ``k`` most helpful and most harmful training examples per query, streamed."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"k={k!r}; it must be a positive integer")
        selected = self._selection(segments)
        self._require_featurized()
        psi = self.query_features(queries, batch_size)
        num_rows = len(self.sources[selected[0]])
        return top_k(psi, self._cache_reader(selected), num_rows, self.chunk_size, k)

    def self_influence(self, segments: Sequence[int] | None = None, batch_size: int = 64) -> np.ndarray:
        """``score(m, m)`` for every training example of the selected segments' data."""
        selected = self._selection(segments)
        self._require_featurized()
        source = self.sources[selected[0]]

        def query_rows(start: int, stop: int) -> np.ndarray:
            return self._measurement_features(source, start, stop, batch_size)

        return self_scores(query_rows, self._cache_reader(selected), len(source), self.chunk_size)
