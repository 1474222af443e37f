"""The run's context: everything about a training run that featurizing and scoring need.

An :class:`AttributionContext` is built once, from the user's model, task and
trajectory (:meth:`AttributionContext.from_trajectory`, to featurize) or from a store
that was featurized before (:meth:`AttributionContext.from_store`, to score without
rebuilding the trajectory). Either way it answers the same questions: which checkpoint
belongs to which segment, what data each segment trained on, how to load a checkpoint's
parameters, and the projected per-example gradients of any examples at any checkpoint.
It also describes the run for the store: the metadata that identifies it (a change is
refused) and the inputs of the stages that can be recomputed in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .counterfactual import Counterfactual
from .curvature import HessianEstimator, SampledFisher, choose_estimator
from .data import ExampleSource, group_by_fingerprint
from .errors import ConfigurationError, DataError, NonFiniteGradientError, StoreError, StoreMismatchError
from .gradients import GradientComputer, ProjectedGradients
from .layout import StoreLayout, setting_stage
from .optimizer import ResolvedOptimizer, resolve_optimizer
from .preconditioning import (
    CHAININGS,
    RESPONSES,
    DecayRule,
    bias_corrected_moments,
    estimated_moments,
    small_space_decay,
)
from .projection import FastJLProjector, KroneckerProjector, Projector, RademacherProjector
from .source import UNROLLINGS, stage_of_segments
from .store import AttributionStore, metadata_differences
from .tasks import Task
from .trajectory import Trajectory
from .validation import check_choice, check_device, check_positive_int

__all__ = ["AttributionContext", "FEATURE_DTYPES", "projector_from_description"]

FEATURE_DTYPES = ("float16", "float32", "float64")


def _device(device: Any, model: nn.Module) -> torch.device:
    """The checked device to compute on; by default the model's."""
    if device is not None:
        return check_device(device)
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _check_proj_dim(proj_dim: int, num_params: int) -> None:
    """Warn when k exceeds the number of attributed parameters: it adds cost, not information."""
    if proj_dim > num_params:
        warnings.warn(
            f"proj_dim={proj_dim:,} exceeds the {num_params:,} attributed parameters: projected gradients span at "
            f"most {num_params:,} dimensions, so the extra dimensions add cost (a {proj_dim:,}x{proj_dim:,} "
            f"Hessian per checkpoint, {proj_dim * proj_dim * 8 / 2**20:,.0f} MiB) and no information. Use "
            f"proj_dim <= {num_params:,}; k of a few hundred to a few thousand is typical",
            UserWarning, stacklevel=4)


def projector_from_description(description: dict) -> Projector:
    """A new projector equal to the one a store recorded (``describe()``'s output).

    An explicit :class:`~srcproj.MatrixProjector` cannot be rebuilt from its digest:
    pass it again.
    """
    kind = description.get("kind")
    if kind == "rademacher" and description.get("version") == RademacherProjector.VERSION:
        return RademacherProjector(int(description["proj_dim"]), int(description["seed"]))
    if kind == "kronecker" and description.get("version") in KroneckerProjector.VERSIONS:
        return KroneckerProjector.from_description(description)
    if kind == "fast_jl":
        return FastJLProjector(int(description["proj_dim"]), int(description["seed"]),
                               num_feature_tiles=int(description["num_feature_tiles"]))
    raise ConfigurationError(
        f"the store's projector ({kind}) cannot be rebuilt from its description; pass the same projector "
        "again with projector=..."
    )


class AttributionContext:
    """A training run as featurizing and scoring see it; build it with a ``from_*`` method."""

    def __init__(self, *, gradients: ProjectedGradients, device: torch.device,
                 checkpoint_segments: list[int], data_groups: list[int], sources: list[ExampleSource | None],
                 loader: Callable[[int], dict], num_outputs: int, estimator: HessianEstimator,
                 feature_dtype: str, chunk_size: int, segment_sizes: list[int]) -> None:
        self.gradients = gradients
        self.computer = gradients.computer
        self.projector = gradients.projector
        self.task = self.computer.task
        self.device = device
        self.checkpoint_segments = checkpoint_segments
        self.data_groups = data_groups
        self.sources = sources
        self._loader = loader
        self.num_outputs = num_outputs
        self.estimator = estimator
        self.feature_dtype = feature_dtype
        self.cache_dtype = "float64" if feature_dtype == "float64" else "float32"
        self.chunk_size = chunk_size
        self.segment_sizes = segment_sizes
        self._parameters: dict[int, tuple[dict, dict]] = {}
        self._bound = False
        self.optimizer_record: dict = {"preconditioned": False}
        self._layout: StoreLayout | None = None
        self._scales: dict[int, torch.Tensor] = {}
        self.unroll = "segments"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_trajectory(cls, model: nn.Module, task: Task, trajectory: Trajectory, projector: Projector, *,
                        modules: Sequence[str] | None, hessian: str, fisher_samples: int, feature_dtype: str,
                        hessian_sample: int | None = None, preconditioner: str = "shared",
                        adam_response: str = "linearized", unroll: str = "stages",
                        chunk_size: int, device: Any) -> AttributionContext:
        """Validate the user's inputs and read every checkpoint once (digests, shapes)."""
        if not isinstance(trajectory, Trajectory):
            raise ConfigurationError(f"trajectory must be a srcproj.Trajectory, got {type(trajectory).__name__}")
        check_choice(feature_dtype, "feature_dtype", FEATURE_DTYPES)
        check_positive_int(chunk_size, "chunk_size")
        check_positive_int(fisher_samples, "fisher_samples")
        if hessian_sample is not None:
            check_positive_int(hessian_sample, "hessian_sample")
        if not isinstance(projector, Projector):
            raise ConfigurationError(f"projector must be a srcproj Projector, got {type(projector).__name__}")
        check_choice(preconditioner, "preconditioner", CHAININGS)
        check_choice(adam_response, "adam_response", RESPONSES)
        check_choice(unroll, "unroll", UNROLLINGS)
        computer = GradientComputer(model, task, modules)
        index = trajectory.checkpoint_index
        resolved = resolve_optimizer(trajectory.optimizer if trajectory.optimizer is not None else trajectory.spec,
                                     model, computer.param_names)

        def label(c: int) -> str:
            seg, pos = index[c]
            return f"checkpoint {c} (segment {seg}, position {pos})"

        def read(c: int) -> tuple[dict, Any]:
            seg, pos = index[c]
            return computer.read_checkpoint(trajectory.segments[seg].checkpoints[pos], label(c))

        def load(c: int) -> dict:
            return read(c)[0]

        _check_proj_dim(projector.proj_dim, computer.num_params)
        device = _device(device, model)
        # Segments whose data hold the same examples (the same fingerprint) share them.
        groups, sources = group_by_fingerprint([ExampleSource(seg.data, f"segment {i}'s data", task)
                                                for i, seg in enumerate(trajectory.segments)])
        context = cls(gradients=ProjectedGradients(computer, projector), device=device,
                      checkpoint_segments=[s for s, _ in index], data_groups=groups,
                      sources=list(sources), loader=load, num_outputs=0, estimator=None,  # type: ignore[arg-type]
                      feature_dtype=feature_dtype, chunk_size=chunk_size, segment_sizes=[len(s) for s in sources])
        context.digests, states = [], []
        for c in range(len(index)):
            state, optimizer_state = read(c)
            context.digests.append(computer.checkpoint_digest(state))
            by_name = ({} if optimizer_state is None else
                       resolved.state_by_name(optimizer_state, label(c), computer.param_shapes))
            states.append(_state_digest(by_name) if by_name else None)
        context.optimizer = resolved
        context.unroll = unroll
        context._read_optimizer_state = lambda c: resolved.state_by_name(read(c)[1], label(c), computer.param_shapes)
        context.optimizer_record = _optimizer_record(resolved, trajectory, states, preconditioner, adam_response)
        if context.optimizer_record["preconditioned"] and projector.factored:
            raise ConfigurationError(
                "the factored projection (KroneckerProjector) cannot apply the run's elementwise preconditioner ("
                f"{context.optimizer_record['kind']}, or groups with different learning rates): it would break the "
                "layers' rank-one gradients. Use the dense RademacherProjector (the default), which applies it "
                "exactly, also on the fused Gauss-Newton pass")
        context.num_outputs = context._probe_outputs()  # a forward pass: no loss is taken

        def validated() -> Iterator[torch.Tensor]:
            for seg, source in enumerate(sources):
                if groups[seg] == seg:
                    for targets, what in source.target_blocks():
                        task.validate_targets(targets, context.num_outputs, what)
                        yield targets

        # One read of every distinct training target: each block is validated, and a
        # loss that depends on the data (a language model's mean count of target tokens)
        # is calibrated from them, before any loss is taken. What calibrate() leaves
        # unread (the default reads nothing) is still validated.
        blocks = validated()
        task.calibrate(blocks)
        for _ in blocks:
            pass
        context.estimator = choose_estimator(hessian, task, context.num_outputs, fisher_samples)
        context.trajectory = trajectory
        context.hessian_sample = None if hessian_sample is None else int(hessian_sample)
        context.bind(sources[0].rows(0, min(2, len(sources[0])))[0])
        return context

    @classmethod
    def from_store(cls, store: AttributionStore, model: nn.Module, task: Task, data: Any = None, *,
                   projector: Projector | None = None, device: Any = None) -> AttributionContext:
        """The context of a featurized store, for scoring: the trajectory is not needed.

        The query checkpoints come from the store; ``data`` (segment 0's training
        data, or ``{segment: data}``) is needed only for training-example gradients
        and is checked by fingerprint.
        """
        meta = store.metadata
        computer = GradientComputer(model, task, param_names=meta.get("param_names"))
        if computer.fingerprint() != meta.get("model_fingerprint"):
            raise StoreMismatchError(
                f"the model does not match the store at {store.location!r}: its parameter names or shapes differ "
                "(or other modules are attributed); pass the architecture the store was featurized with"
            )
        task.calibrated_from(meta.get("task", {}))
        shown = metadata_differences(meta.get("task", {}), task.describe(), ("in the store", "now"))
        if shown:
            raise StoreMismatchError(f"the task does not match the store at {store.location!r} ({shown})")
        if projector is None:
            projector = projector_from_description(meta["projector"])
        elif not isinstance(projector, Projector):
            raise ConfigurationError(f"projector must be a srcproj Projector, got {type(projector).__name__}")
        layout = StoreLayout(store)
        segments = meta["segments"]
        groups = [int(info["data_group"]) for info in segments]
        sources: list[ExampleSource | None] = [None] * len(segments)
        if data is not None:
            # A data set is never a mapping, so a dict can only name segments.
            given = dict(data) if isinstance(data, Mapping) else {0: data}
            for segment in given:
                if isinstance(segment, bool) or not isinstance(segment, (int, np.integer)) \
                        or not 0 <= segment < len(segments):
                    raise ConfigurationError(f"data names segment {segment!r}; the store has segments "
                                             f"0..{len(segments) - 1}")
            for segment, item in given.items():
                owner = groups[int(segment)]
                source = ExampleSource(item, f"segment {segment}'s data", task)
                info = segments[owner]
                if len(source) != int(info["num_examples"]) or source.fingerprint() != info["data_fingerprint"]:
                    raise StoreMismatchError(
                        f"segment {segment}'s data is not the data the store was featurized with (it has "
                        f"{len(source)} examples, the store {info['num_examples']}, or other values); pass the "
                        "same training data, or none"
                    )
                for seg, group in enumerate(groups):
                    if group == owner:
                        sources[seg] = source
        digests = [d for info in segments for d in info["checkpoints"]]

        def load(c: int) -> dict:
            state, saved = layout.load_checkpoint(c)
            checked = computer.load_checkpoint(state, f"checkpoint {c} saved in the store")
            if computer.checkpoint_digest(checked) != saved or saved != digests[c]:
                raise StoreError(f"checkpoint {c} saved in the store {store.location!r} does not match its "
                                 "recorded digest: the store is damaged; featurize it again")
            return checked

        estimator = choose_estimator(meta["hessian"], task, int(meta["num_outputs"]),
                                     int(meta.get("fisher_samples", 1)))
        context = cls(gradients=ProjectedGradients(computer, projector), device=_device(device, model),
                      checkpoint_segments=list(layout.shape.checkpoint_segments), data_groups=groups,
                      sources=sources, loader=load, num_outputs=int(meta["num_outputs"]), estimator=estimator,
                      feature_dtype=str(meta["feature_dtype"]), chunk_size=int(meta["chunk_size"]),
                      segment_sizes=list(layout.shape.segment_sizes))
        context.digests = digests
        context.trajectory = None
        context.optimizer = None
        context.optimizer_record = dict(meta.get("optimizer") or {"preconditioned": False})
        # Caches of stores made before the setting existed chained every segment.
        context.unroll = str(layout.stage_inputs().get("caches", {}).get("unroll", "segments"))
        context.attach(layout)
        context.hessian_sample = meta.get("hessian_sample")
        context._expected_projector = meta["projector"]
        return context

    # ------------------------------------------------------------------ description
    def metadata(self) -> dict:
        """What identifies the store: a store made for other values is refused."""
        trajectory = self.trajectory
        segments = []
        for seg in range(len(trajectory.segments)):
            segments.append({
                "data_group": self.data_groups[seg],
                "num_examples": self.segment_sizes[seg],
                "data_fingerprint": self.sources[seg].fingerprint(),
                "checkpoints": [self.digests[c] for c in self.members(seg)],
            })
        return {
            "library_version": __version__,
            "projector": self.projector.describe(),
            "proj_dim": int(self.projector.proj_dim),
            "num_params": self.computer.num_params,
            "model_fingerprint": self.computer.fingerprint(),
            "param_names": self.computer.param_names,
            "task": self.task.describe(),
            "num_outputs": self.num_outputs,
            "hessian": self.estimator.name,
            "fisher_samples": self.estimator.samples if isinstance(self.estimator, SampledFisher) else 1,
            "hessian_sample": self.hessian_sample,
            "feature_dtype": self.feature_dtype,
            "chunk_size": self.chunk_size,
            "optimizer": self.optimizer_record,
            "segments": segments,
        }

    def stage_inputs(self, counterfactual: Counterfactual | None = None) -> dict[str, dict]:
        """The inputs of the stages that are recomputed in place when they change; with a
        counterfactual setting other than same steps, also its caches' (under its key)."""
        trajectory, spec = self.trajectory, self.trajectory.spec
        decays = self.optimizer.weight_decay
        inputs = {
            "spectra": {"weight_decay": float(spec.weight_decay),
                        "group_weight_decays": {n: v for n, v in decays.items() if v != float(spec.weight_decay)},
                        "decoupled": not spec.coupled_decay},
            "caches": {
                "momentum": float(trajectory.momentum),
                "gain": spec.gain(),
                "unroll": self.unroll,
                "segments": [{"steps": seg.steps, "total_lr": seg.total_lr, "time": trajectory.segment_time(i)}
                             for i, seg in enumerate(trajectory.segments)],
            },
        }
        if counterfactual is not None and not counterfactual.is_default:
            times = counterfactual.times(self.segment_times(), self.data_groups)
            inputs[setting_stage(counterfactual.key)] = {
                "counterfactual": counterfactual.record(),
                "momentum": float(trajectory.momentum),
                "gain": spec.gain(),
                "unroll": self.unroll,
                "attributed": counterfactual.attributed_segments(self.data_groups),
                "segments": [{"steps": seg.steps, "total_lr": seg.total_lr, "time": times[i]}
                             for i, seg in enumerate(trajectory.segments)],
            }
        return inputs

    def unrolled_stages(self, unroll: str | None = None) -> list[int] | None:
        """Per segment, the stage SOURCE unrolls it in under ``unroll`` (default: this
        run's setting): with ``"stages"`` consecutive segments of one data set share one;
        ``None``: every segment on its own."""
        return stage_of_segments(self.data_groups) if (unroll or self.unroll) == "stages" else None

    def segment_times(self) -> list[float]:
        """SOURCE's time of every segment, as the trajectory describes them (same steps)."""
        return [self.trajectory.segment_time(s) for s in range(len(self.trajectory.segments))]

    # ------------------------------------------------------------------ the optimizer's preconditioner
    @property
    def preconditioned(self) -> bool:
        """Whether gradients are scaled by ``M^{1/2}`` before projection (Adam; SGD groups
        with different learning rates)."""
        return bool(self.optimizer_record.get("preconditioned"))

    def attach(self, layout: StoreLayout) -> None:
        """Read the preconditioner's scales from ``layout`` (written by the pipeline's first stage)."""
        self._layout = layout
        self._scales.clear()

    def scale_of(self, segment: int) -> torch.Tensor:
        """``M^{1/2}`` of ``segment`` on the device, flat over the attributed parameters."""
        if self.optimizer_record.get("chaining") == "shared":
            segment = 0  # one preconditioner for the run: every segment's copy is the same, keep one
        found = self._scales.get(segment)
        if found is None:
            layout = self._layout
            if layout is None or not bool(layout.preconditioner_done()[segment]):
                raise StoreError(f"the preconditioner of segment {segment} is not in the store: run featurize() first")
            found = torch.from_numpy(layout.read_scale(segment).astype(np.float64)).to(self.device)
            self._scales[segment] = found
        return found

    @contextlib.contextmanager
    def preconditioned_at(self, checkpoint: int) -> Iterator[None]:
        """Meanwhile, gradient rows are scaled by the preconditioner of ``checkpoint``'s segment."""
        if not self.preconditioned:
            yield
            return
        gradients = self.gradients
        before = gradients.scale
        gradients.scale = self.scale_of(self.segment_of(checkpoint))
        try:
            yield
        finally:
            gradients.scale = before

    def flat(self, values: Mapping[str, float]) -> np.ndarray:
        """A per-parameter setting spread over the flat attributed parameters."""
        shapes = self.computer.param_shapes
        return np.concatenate([np.full(int(np.prod(shapes[n], dtype=np.int64)), float(values[n]))
                               for n in self.computer.param_names])

    def small_space_decay(self, segment: int) -> tuple[float, DecayRule]:
        """The weight decay added to ``segment``'s (preconditioned) Hessian as ``δ·I_k``."""
        spec = self.trajectory.spec
        scale = moment = None
        if self.preconditioned:
            scale = self._layout.read_scale(segment).astype(np.float64)
            moment = self._layout.read_moment(segment)
            moment = None if moment is None else moment.astype(np.float64)
        return small_space_decay(spec, self.flat(self.optimizer.weight_decay), scale, moment,
                                 self.flat(self.optimizer.lr_scale))

    def moments(self, checkpoints: Sequence[int], batch_size: int, bar: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Adam's ``(v̄, mean of m̂²)`` over ``checkpoints``: the bias-corrected moments from
        their optimizer state, or estimated from per-example gradients (``mean² +
        variance / B`` and ``mean²``, over each checkpoint's segment's training examples)."""
        spec, record = self.trajectory.spec, self.optimizer_record
        names, shapes = self.computer.param_names, self.computer.param_shapes
        sizes = {n: int(np.prod(shapes[n], dtype=np.int64)) for n in names}
        second = np.zeros(self.computer.num_params)
        first = np.zeros(self.computer.num_params)
        for c in checkpoints:
            if record["second_moment"] == "optimizer state":
                v, m2 = bias_corrected_moments(self.optimizer_state(c), names, sizes, spec.betas, self.label(c))
            else:
                v, m2 = self._estimated_moments(c, batch_size, int(record["batch_size"]))
            second += v
            first += m2
            if bar is not None:
                bar.update(1)
        return second / len(checkpoints), first / len(checkpoints)

    def _estimated_moments(self, checkpoint: int, batch_size: int,
                           train_batch: int) -> tuple[np.ndarray, np.ndarray]:
        source = self.source(self.segment_of(checkpoint))
        trainable, fixed = self.split(checkpoint)
        sums = torch.zeros(self.computer.num_params, dtype=torch.float64)
        squares = torch.zeros_like(sums)
        with self.computer.evaluating():
            for lo in range(0, len(source), batch_size):
                x, y = source.rows(lo, min(lo + batch_size, len(source)))
                xs, ys = self.computer.prepare(trainable, x, y)
                grads = self.computer.per_example_grads(trainable, fixed, xs, ys, "loss").to("cpu", torch.float64)
                check_finite_rows(grads, lo, f"{self.label(checkpoint)}: the gradient of example {{row}} of "
                                  f"{source.what}", "check that checkpoint for NaN weights and that example")
                sums += grads.sum(0)
                squares += (grads * grads).sum(0)
        mean_shift = None
        if self.trajectory.spec.coupled_decay:  # Adam adds λθ to the gradient before its moments
            theta = torch.cat([trainable[n].detach().reshape(-1).to("cpu", torch.float64)
                               for n in self.computer.param_names])
            mean_shift = torch.from_numpy(self.flat(self.optimizer.weight_decay)) * theta * len(source)
        if mean_shift is not None:
            squares += 2 * mean_shift * sums / len(source) + mean_shift * mean_shift / len(source)
            sums += mean_shift
        return estimated_moments(sums.numpy(), squares.numpy(), len(source), train_batch)

    def optimizer_state(self, checkpoint: int) -> dict[str, dict]:
        """The saved optimizer state of a checkpoint, by attributed parameter name."""
        return self._read_optimizer_state(checkpoint)

    # ------------------------------------------------------------------ structure
    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoint_segments)

    @property
    def num_segments(self) -> int:
        return len(self.data_groups)

    def segment_of(self, checkpoint: int) -> int:
        return self.checkpoint_segments[checkpoint]

    def members(self, segment: int) -> list[int]:
        """The checkpoints saved in ``segment``."""
        return [c for c, s in enumerate(self.checkpoint_segments) if s == segment]

    def checkpoint_number(self, checkpoint: int) -> int:
        """A checked global checkpoint index (negative indices count from the end)."""
        count = self.num_checkpoints
        if isinstance(checkpoint, bool) or not isinstance(checkpoint, (int, np.integer)) \
                or not -count <= checkpoint < count:
            raise ConfigurationError(f"checkpoint {checkpoint!r} does not exist; the trajectory has checkpoints "
                                     f"0..{count - 1} (negative indices count from the end)")
        return int(checkpoint) % count

    def selection(self, segments: Sequence[int] | None) -> list[int]:
        """Checked segment indices that share one data set (default: those sharing segment 0's)."""
        if segments is None:
            return [s for s, g in enumerate(self.data_groups) if g == self.data_groups[0]]
        selected = list(segments)
        if not selected:
            raise ConfigurationError("segments=[] selects nothing; give at least one segment index")
        count = self.num_segments
        for s in selected:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < count:
                raise ConfigurationError(f"segment {s!r} does not exist; the trajectory has segments 0..{count - 1}")
        if len({self.data_groups[s] for s in selected}) > 1:
            raise ConfigurationError(
                f"segments {selected} trained on different data sets (their examples differ), so their "
                "scores do not add up per example; score the segments of one data set at a time"
            )
        return sorted({int(s) for s in selected})

    def source(self, segment: int) -> ExampleSource:
        """The training data of ``segment``; an error when a reopened store was given none."""
        source = self.sources[segment]
        if source is None:
            raise ConfigurationError(
                f"segment {segment}'s training data is needed here (training-example gradients); reopen the store "
                "with data=... (it is checked against the store's fingerprint)"
            )
        return source

    def query_checkpoints(self, mode: str) -> list[int]:
        """The checkpoints ψ is taken at: the final one, the last segment's or the last stage's."""
        final = self.num_checkpoints - 1
        if mode == "final":
            return [final]
        if mode == "last_stage":
            stages = stage_of_segments(self.data_groups)
            return [c for c in range(self.num_checkpoints) if stages[self.segment_of(c)] == stages[-1]]
        return self.members(self.segment_of(final))

    def query_weights(self, mode: str, times: Sequence[float] | None = None) -> np.ndarray:
        """The weight of each of :meth:`query_checkpoints`' checkpoints in ψ's mean: equal, or
        for ``"last_stage"`` its segment's time share, ``a_ℓ / (A |C_ℓ|)``, as in the stage's ḡ
        (``times``: the segments' times; default: the run's own)."""
        indices = self.query_checkpoints(mode)
        if mode != "last_stage":
            return np.full(len(indices), 1.0 / len(indices))
        times = self.recorded_segment_times() if times is None else list(times)
        weights = np.array([times[self.segment_of(c)] / len(self.members(self.segment_of(c))) for c in indices])
        return weights / weights.sum()

    def recorded_segment_times(self) -> list[float]:
        """The segments' same-steps times: the trajectory's, or those a reopened store recorded."""
        if self.trajectory is not None:
            return self.segment_times()
        recorded = self._layout.stage_inputs().get("caches", {}).get("segments") if self._layout else None
        if not recorded or len(recorded) != self.num_segments:
            raise StoreError("the store records no segment times, which query='last_stage' weighs its checkpoints "
                             "with; featurize it again with this version, or reopen it with query='last_segment'")
        return [float(entry["time"]) for entry in recorded]

    def label(self, checkpoint: int) -> str:
        if checkpoint == self.num_checkpoints - 1:
            return f"final checkpoint {checkpoint}"
        return f"checkpoint {checkpoint} (segment {self.segment_of(checkpoint)})"

    # ------------------------------------------------------------------ computation
    def load(self, checkpoint: int) -> dict:
        return self._loader(checkpoint)

    def split(self, checkpoint: int) -> tuple[dict, dict]:
        """``(attributed parameters, the rest)`` of a checkpoint, on the device."""
        return self.computer.split(self.load(checkpoint), self.device)

    def parameters(self, checkpoint: int) -> tuple[dict, dict]:
        """:meth:`split`, kept in memory (query checkpoints are used for every query batch)."""
        if checkpoint not in self._parameters:
            self._parameters[checkpoint] = self.split(checkpoint)
        return self._parameters[checkpoint]

    def bind(self, example: torch.Tensor) -> None:
        """Lay out the projection on the model (once), checked on a few example inputs."""
        if self._bound:
            return
        trainable, fixed = self.parameters(self.num_checkpoints - 1)
        x, _ = self.computer.prepare(trainable, example[:2], torch.zeros(0))
        with self.computer.evaluating():
            self.gradients.bind({**trainable, **fixed}, x)
        self._bound = True
        expected = getattr(self, "_expected_projector", None)
        if expected is not None:
            shown = metadata_differences(expected, self.projector.describe(), ("in the store", "now"))
            if shown:
                raise StoreMismatchError(f"the projector does not match the store's ({shown}); pass the projector "
                                         "the store was featurized with")

    def _probe_outputs(self) -> int:
        trainable, fixed = self.parameters(self.num_checkpoints - 1)
        num_outputs = 0
        for source in self.sources:
            x, _ = source.rows(0, 1)
            x, _ = self.computer.prepare(trainable, x, torch.zeros(0))
            with torch.no_grad(), self.computer.evaluating():
                try:
                    outputs = self.computer.forward(trainable, fixed, x)
                except DataError as exc:
                    raise DataError(f"{source.what}: {exc}") from None
            if outputs.ndim < 2 or outputs.shape[0] != 1:
                raise DataError(f"{source.what}: the model returned shape {tuple(outputs.shape)} for one "
                                "example; it must return (batch, outputs)")
            num_outputs = int(outputs[0].numel())
        return num_outputs

    def projected(self, params: tuple[dict, dict], source: ExampleSource, start: int, stop: int, batch_size: int,
                  kind: str, label: str) -> torch.Tensor:
        """Projected per-example gradients of rows ``start..stop-1``, checked finite."""
        trainable, fixed = params
        parts = []
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            x, y = source.rows(lo, hi)
            if not self._bound:
                self.bind(x)
            try:
                features = self.gradients.features(trainable, fixed, x, y, kind)
            except DataError as exc:  # name the data set
                raise DataError(f"{source.what}, examples {lo}..{hi - 1}: {exc}") from None
            check_finite_rows(features, lo, f"{label}: the gradient of example {{row}} of {source.what}",
                              "check that checkpoint for NaN weights and that example for NaN inputs")
            parts.append(features.detach())
        return torch.cat(parts)

    def loss_features(self, projected: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Projected loss gradients from projected output Jacobians: ``P ∇L = (P Jᵀ) ∂L/∂f``.

        ``projected`` (B, C, k) and ``outputs`` (B, C) as :meth:`ProjectedGradients.output_features`
        gives them: the loss depends on the parameters only through the outputs, so the
        chain rule makes the feature a combination of the C projected Jacobian rows, at
        no projection's cost. Returned in float64.
        """
        # The loss is one value per example written with batched operations (the Task
        # contract the hook backends rely on too), so one backward pass of its sum gives
        # every example's own ∂L/∂f.
        batch = outputs.shape[0]
        leaf = outputs.detach().requires_grad_(True)
        try:
            with torch.enable_grad():
                values = self.task.loss(leaf, targets.to(outputs.device))
        except RuntimeError as exc:
            raise DataError(f"the task's loss failed on outputs of shape {tuple(outputs.shape)} and targets of "
                            f"shape {tuple(targets.shape)}: {exc}") from exc
        if values.shape == (batch,):
            (slopes,) = torch.autograd.grad(values.sum(), leaf)
        else:  # not one value per example: differentiate each example's own loss (as the vmap backend does)
            task = self.task

            def single(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return task.loss(output.unsqueeze(0), target.unsqueeze(0)).sum()

            slopes = torch.func.vmap(torch.func.grad(single))(outputs.detach(), targets.to(outputs.device))
        return torch.einsum("bck,bc->bk", projected.to(torch.float64), slopes.to(projected.device, torch.float64))

    def measurement_features(self, source: ExampleSource, start: int, stop: int, batch_size: int,
                             mode: str | Sequence[int], times: Sequence[float] | None = None) -> np.ndarray:
        """ψ of rows ``start..stop-1``, averaged over the query checkpoints of ``mode``
        ("final", "last_segment", "last_stage": :meth:`query_weights`, with the segment
        ``times`` given, default the run's) or, equally, over the given checkpoint indices."""
        if isinstance(mode, str):
            indices, weights = self.query_checkpoints(mode), self.query_weights(mode, times)
        else:
            indices = list(mode)
            weights = np.full(len(indices), 1.0 / len(indices))
        total = None
        with self.computer.evaluating():
            for index, weight in zip(indices, weights, strict=True):
                with self.preconditioned_at(index):
                    rows = self.projected(self.parameters(index), source, start, stop, batch_size, "measurement",
                                          self.label(index)).to("cpu", torch.float64) * float(weight)
                total = rows if total is None else total + rows
        return total.numpy().astype(self.cache_dtype)

    def query_source(self, queries: Any) -> ExampleSource:
        """The query set, validated against the task."""
        source = ExampleSource(queries, "the query set", self.task)
        for targets, what in source.target_blocks():
            self.task.validate_targets(targets, self.num_outputs, what)
        return source

    def hessian_rows(self, checkpoint: int, chunk: int, start: int, stop: int) -> np.ndarray | None:
        """The rows of a chunk whose Gauss-Newton rows enter the Hessian; ``None``: all of them.

        With ``hessian_sample = m`` each chunk gives its share of m (at least one row),
        drawn without replacement by a generator seeded with the projection's seed, the
        checkpoint and the chunk: the same rows whichever rank computes it.
        """
        rows = stop - start
        total = self.segment_sizes[self.segment_of(checkpoint)]
        if self.hessian_sample is None or self.hessian_sample >= total:
            return None
        take = min(rows, max(1, round(self.hessian_sample * rows / total)))
        generator = np.random.default_rng(self._chunk_entropy(checkpoint, chunk, 0x4853))
        return start + np.sort(generator.choice(rows, size=take, replace=False))

    def fisher_generator(self, checkpoint: int, chunk: int) -> torch.Generator:
        """The label sampler of one checkpoint's row chunk: the same whichever rank computes it."""
        words = np.random.SeedSequence(self._chunk_entropy(checkpoint, chunk)).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def _chunk_entropy(self, checkpoint: int, chunk: int, *purpose: int) -> list[int]:
        """Seed material of one checkpoint's row chunk: the projection's seed, not the rank."""
        seed = int(self.projector.describe().get("seed", 0))
        return [seed % (1 << 64), checkpoint, chunk, *purpose]


def check_finite_rows(rows: torch.Tensor, offset: int, what: str, fix: str) -> None:
    """Raise :class:`NonFiniteGradientError` naming the first row (``offset`` + index) with NaN or inf."""
    finite = torch.isfinite(rows.reshape(rows.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        first = offset + int(torch.nonzero(~finite)[0, 0])
        raise NonFiniteGradientError(f"{what.format(row=first)} is NaN or inf; {fix}")


def _state_digest(state: Mapping[str, dict]) -> str:
    """Hash of a checkpoint's Adam moments and steps (what the preconditioner reads)."""
    digest = hashlib.blake2b(digest_size=12)
    for name in sorted(state):
        entry = state[name]
        step = entry.get("step")
        digest.update(f"{name}:{float(step) if step is not None else 'none'};".encode())
        for key in ("exp_avg_sq", "exp_avg"):
            value = entry.get(key)
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _optimizer_record(resolved: ResolvedOptimizer, trajectory: Trajectory, states: list[str | None],
                      chaining: str, response: str) -> dict:
    """What of the optimizer identifies the store's features (a change is refused)."""
    spec = resolved.spec
    record: dict[str, Any] = {"kind": spec.kind, "preconditioned": bool(spec.adaptive or not resolved.uniform_lr),
                              "lr_scales": {n: v for n, v in resolved.lr_scale.items() if v != 1.0}}
    if not spec.adaptive:  # SGD's momentum buffers are not read
        return record
    carried = [s is not None for s in states]
    if all(carried):
        moment = "optimizer state"
    elif not any(carried):
        if trajectory.batch_size is None:
            raise ConfigurationError(
                f"the trajectory describes an {spec.kind} run but its checkpoints carry no optimizer state, which "
                "gives SOURCE its preconditioner: save checkpoints as {\"model\": model.state_dict(), "
                "\"optimizer\": optimizer.state_dict()}, or give Trajectory(batch_size=B) to estimate the second "
                "moment from per-example gradients")
        moment = "estimated"
    else:
        missing = [c for c, has in enumerate(carried) if not has]
        raise ConfigurationError(
            f"checkpoints {missing[:10]} carry no optimizer state while the others do; save every checkpoint with "
            "its optimizer state (or none of them, with Trajectory(batch_size=B))")
    record.update({"betas": list(spec.betas), "eps": float(spec.eps), "chaining": chaining, "response": response,
                   "second_moment": moment, "state_digests": states})
    if moment == "estimated":
        record["batch_size"] = int(trajectory.batch_size)
        if spec.coupled_decay:  # λθ joins the gradients the moments are estimated from
            record["estimated_with_decays"] = dict(sorted(resolved.weight_decay.items()))
    return record
