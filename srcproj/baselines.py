"""Other attribution methods, computed from a featurized :class:`Attributor`'s store.

Every method implements :class:`~srcproj.method.AttributionMethod`: a training side and
a query side that the streamed, memory-budgeted scorer consumes, so each has the same
``score`` (in memory or to a zarr array), ``top_k`` and ``self_influence`` as SOURCE,
in srcproj's sign convention (positive = including the training example helps the
query). They reuse the projection, the stored features and the stored Hessians wherever
the formula allows, and compute only what the store lacks (e.g. margin gradients for
TRAK, query gradients at every checkpoint for TracIn). Formulas: ``docs/math.md`` §5.

- :class:`InfluenceFunction`: ``-ψᵀ(Ĥ_c + δI)⁻¹φ_c / N`` at one checkpoint (the final).
- :class:`SourceVariant`: SOURCE with other segment times (e.g. the same-epochs
  retraining protocol, docs/math.md §8) or query features averaged over the last
  segment, without recomputing features or Hessians.
- :class:`TracIn`: ``-Σ_c η_c ψ_cᵀ φ_c``.
- :class:`TRAK`: ``ψᵀ(ΦᵀΦ)⁻¹φ_m (1 - p_m)`` with margin features at the final checkpoint.
- :class:`RepresentationSimilarity`: cosine similarity of a layer's outputs.
- :class:`Ensemble`: the mean of several methods' scores (independently trained runs).
- :func:`average_checkpoints`: Fast-SOURCE's trajectory (one averaged checkpoint per
  segment), to featurize with a new :class:`Attributor`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .attributor import QUERY_MODES, Attributor
from .data import ExampleSource
from .errors import ConfigurationError
from .method import AttributionMethod, Source
from .optimizer import split_checkpoint
from .scoring import BlockReader, Cache, Queries
from .source import UNROLLINGS, eigendecompose
from .store import metadata_differences
from .tasks import ClassificationTask
from .trajectory import Segment, Trajectory
from .validation import check_choice

__all__ = [
    "TRAK",
    "Ensemble",
    "InfluenceFunction",
    "RepresentationSimilarity",
    "SourceVariant",
    "TracIn",
    "average_checkpoints",
]


def _require_attributor(attributor: Any) -> Attributor:
    if not isinstance(attributor, Attributor):
        raise ConfigurationError(f"expected a srcproj.Attributor, got {type(attributor).__name__}")
    attributor.require_featurized()
    return attributor


class _StoreBaseline(AttributionMethod):
    """A method computed from one attributor's store, with ψ at fixed checkpoints."""

    def __init__(self, attributor: Any, data_segment: int) -> None:
        self.attributor = _require_attributor(attributor)
        self.context = attributor.context
        self.data_segment = self.context.selection([data_segment])[0]
        self._training: Cache | None = None

    def _measurements(self, source: ExampleSource, checkpoints: Sequence[int], batch_size: int) -> BlockReader:
        return lambda start, stop: self.context.measurement_features(source, start, stop, batch_size, checkpoints)

    def _queries_at(self, queries: Any, checkpoints: Sequence[int], batch_size: int) -> Queries:
        source = self.context.query_source(queries)
        return Queries(self._measurements(source, checkpoints, batch_size), len(source))

    def _cache(self, rows: np.ndarray) -> Cache:
        return Cache.of(rows.astype(self.context.cache_dtype), self.context.chunk_size)

    def protected_location(self) -> str | None:
        return self.attributor.store.local_root


def _final_outputs(context: Any, source: ExampleSource, batch: int = 1024) -> Iterator[tuple[torch.Tensor, Any]]:
    """Yield ``(outputs, targets)`` of the model at the final checkpoint, batch by batch."""
    trainable, fixed = context.parameters(context.num_checkpoints - 1)
    with torch.no_grad(), context.computer.evaluating():
        for lo in range(0, len(source), batch):
            x, y = source.rows(lo, min(lo + batch, len(source)))
            x, _ = context.computer.prepare(trainable, x, torch.zeros(0))
            yield context.computer.forward(trainable, fixed, x), y


class InfluenceFunction(_StoreBaseline):
    """The damped influence function at one checkpoint (SOURCE with one segment, a → ∞).

    Parameters
    ----------
    attributor : Attributor
        A featurized attributor; its stored Hessian of ``checkpoint`` is reused.
    damping : float, optional
        δ in ``(Ĥ + δI)⁻¹``. Default: the trajectory's weight decay; an explicit δ > 0
        is required when the weight decay is 0 (a zero eigenvalue makes the inverse
        diverge).
    checkpoint : int
        Where gradients and Hessian are taken (default the final checkpoint).
    data_segment : int
        The training examples attributed are this segment's data.
    """

    name = "influence function"

    def __init__(self, attributor: Attributor, damping: float | None = None, checkpoint: int = -1,
                 data_segment: int = 0) -> None:
        super().__init__(attributor, data_segment)
        if damping is None:  # the run's weight decay, as it enters the (preconditioned) Hessian
            ctx = attributor.context
            damping = (ctx.small_space_decay(ctx.segment_of(ctx.checkpoint_number(checkpoint)))[0]
                       if attributor.trajectory is not None else 0.0)
            if damping <= 0:
                raise ConfigurationError(
                    "the run has no weight decay, so the influence function needs an explicit damping; "
                    "give damping=δ > 0 (e.g. 1e-3 times the Hessian's mean eigenvalue)"
                )
        if not np.isfinite(damping) or damping <= 0:
            raise ConfigurationError(f"damping={damping!r}; it must be a finite number > 0")
        self.damping = float(damping)
        self.checkpoint = self.context.checkpoint_number(checkpoint)

    def training_side(self) -> Cache:
        """``T = Φ (Ĥ + δI)⁻¹ / N``."""
        if self._training is None:
            spectrum = eigendecompose(self.attributor.checkpoint_hessian(self.checkpoint), self.damping)
            inverse = spectrum.function(1.0 / spectrum.eigenvalues)
            phi = self.attributor.checkpoint_features(self.checkpoint, "loss", self.data_segment)
            self._training = self._cache(phi.astype(np.float64) @ inverse / phi.shape[0])
        return self._training

    def query_side(self, queries: Any, batch_size: int = 64) -> Queries:
        return self._queries_at(queries, [self.checkpoint], batch_size)

    def self_query_side(self, batch_size: int = 64) -> BlockReader:
        return self._measurements(self.context.source(self.data_segment), [self.checkpoint], batch_size)


class SourceVariant(Source):
    """SOURCE from the stored features and spectra, with other times or query features.

    Parameters
    ----------
    attributor : Attributor
        A featurized attributor.
    trajectory : Trajectory, optional
        The same segments and checkpoints described with other steps or learning rates,
        e.g. ``steps = α·K`` for the segments a same-epochs retraining subsampled
        (docs/math.md §8). Default: the attributor's own. Only its steps and learning
        rates are read: checkpoints and data always come from the store, and momentum,
        weight decay, segment count, checkpoint counts and data sizes must match.
    query : {"final", "last_segment", "last_stage"}, optional
        Query features at the final checkpoint or averaged over the last segment's or
        last stage's checkpoints; default: the attributor's ``query`` setting.
    segments : sequence of int, optional
        Segments whose terms are summed (as in :meth:`Attributor.score`).
    unroll : {"stages", "segments"}, optional
        How segments are unrolled (the Attributor's ``unroll``); default: the
        attributor's own setting.
    """

    def __init__(self, attributor: Attributor, trajectory: Trajectory | None = None, query: str | None = None,
                 segments: Sequence[int] | None = None, unroll: str | None = None) -> None:
        attributor = _require_attributor(attributor)
        own = attributor.trajectory
        trajectory = own if trajectory is None else trajectory
        if not isinstance(trajectory, Trajectory):
            raise ConfigurationError(f"trajectory must be a srcproj.Trajectory, got {type(trajectory).__name__}")
        if len(trajectory.segments) != len(own.segments):
            raise ConfigurationError(
                f"the trajectory has {len(trajectory.segments)} segments; the store was made for "
                f"{len(own.segments)}. Only steps and learning rates may change"
            )
        shown = metadata_differences(own.spec.describe(), trajectory.spec.describe(), ("in the store", "now"))
        if shown:
            raise ConfigurationError(f"the trajectory's optimizer differs from the store's ({shown}); only steps "
                                     "and learning rates may change")
        for i, (a, b) in enumerate(zip(trajectory.segments, own.segments, strict=True)):
            if len(a.checkpoints) != len(b.checkpoints):
                raise ConfigurationError(f"segment {i} has {len(a.checkpoints)} checkpoints; the store has "
                                         f"{len(b.checkpoints)}. Only steps and learning rates may change")
            if len(ExampleSource(a.data, f"segment {i}'s data", attributor.task)) != attributor.layout.rows(i):
                raise ConfigurationError(f"segment {i}'s data has another number of examples than the store's; "
                                         "only steps and learning rates may change")
        query = attributor.query if query is None else check_choice(query, "query", QUERY_MODES)
        if unroll is not None:
            check_choice(unroll, "unroll", UNROLLINGS)
        self.attributor = attributor
        self.trajectory = trajectory
        times = [trajectory.segment_time(s) for s in range(len(trajectory.segments))]
        super().__init__(attributor.context, attributor.layout, query, attributor.context.selection(segments), times,
                         unroll=unroll)


class TracIn(_StoreBaseline):
    """TracIn-CP in the projected space: ``-Σ_c η_c ψ_cᵀ φ_c(m)``.

    The sum runs over the checkpoints of the segments that trained on the attributed
    data (``data_segment``'s data set); ``η_c`` is the mean learning rate of the
    checkpoint's segment. The minus sign: ψ is the gradient of a measurement where
    higher is better, φ that of a loss. The checkpoints' terms are one product:
    ``Ψ = [ψ_c …]`` against ``T = [η_c φ_c …]``.
    """

    name = "TracIn-CP"

    def __init__(self, attributor: Attributor, data_segment: int = 0) -> None:
        super().__init__(attributor, data_segment)
        if attributor.trajectory is None:
            raise ConfigurationError("TracIn needs every checkpoint and learning rate: build the Attributor with "
                                     "the trajectory instead of Attributor.open")
        ctx = self.context
        group = ctx.data_groups[self.data_segment]
        self.terms = []
        for c in range(ctx.num_checkpoints):
            s = ctx.segment_of(c)
            if ctx.data_groups[s] == group:
                segment = attributor.trajectory.segments[s]
                self.terms.append((c, segment.total_lr / segment.steps))

    def training_side(self) -> Cache:
        if self._training is None:
            self._training = Cache.hstack([
                self._cache(lr * self.attributor.checkpoint_features(c, "loss", self.data_segment).astype(np.float64))
                for c, lr in self.terms])
        return self._training

    def query_side(self, queries: Any, batch_size: int = 64) -> Queries:
        source = self.context.query_source(queries)
        return Queries.hstack([Queries(self._measurements(source, [c], batch_size), len(source))
                               for c, _ in self.terms])

    def self_query_side(self, batch_size: int = 64) -> BlockReader:
        source = self.context.source(self.data_segment)
        readers = [self._measurements(source, [c], batch_size) for c, _ in self.terms]
        return lambda start, stop: np.concatenate([read(start, stop) for read in readers], axis=1)


class TRAK(_StoreBaseline):
    """TRAK's estimator (Park et al. 2023) in srcproj's projected space, one model.

    ``score(q, m) = ψ_qᵀ (ΦᵀΦ + δI)⁻¹ φ_m (1 - p_m)``, with φ the margin gradients of the
    training examples and p_m the probability of their label, at the final checkpoint.
    Average the scores of independently trained runs with :class:`Ensemble`.

    Parameters
    ----------
    damping : float
        δ; TRAK uses none, so its kernel is singular when k ≥ N. Give δ > 0 then.
    """

    name = "TRAK"

    def __init__(self, attributor: Attributor, damping: float = 0.0, data_segment: int = 0) -> None:
        super().__init__(attributor, data_segment)
        if not isinstance(attributor.task, ClassificationTask):
            raise ConfigurationError("TRAK's 1 - p weighting is defined for a ClassificationTask; "
                                     f"this attributor's task is {type(attributor.task).__name__}")
        if not np.isfinite(damping) or damping < 0:
            raise ConfigurationError(f"damping={damping!r}; it must be a finite number ≥ 0")
        self.damping = float(damping)
        self.final = self.context.num_checkpoints - 1

    def _correct_probabilities(self) -> np.ndarray:
        out = []
        for logits, y in _final_outputs(self.context, self.context.source(self.data_segment)):
            out.append(torch.softmax(logits.double(), 1).gather(1, y.to(logits.device).long()[:, None])[:, 0].cpu())
        return torch.cat(out).numpy()

    def training_side(self) -> Cache:
        """``T = -diag(1 - p) Φ (ΦᵀΦ + δI)⁻¹`` (negated: TRAK's scores are ``+Ψ(…)ᵀ``)."""
        if self._training is None:
            phi = self.attributor.checkpoint_features(-1, "measurement", self.data_segment).astype(np.float64)
            kernel = phi.T @ phi
            values, vectors = np.linalg.eigh(0.5 * (kernel + kernel.T))
            values = values + self.damping
            if values.min() <= 1e-10 * max(values.max(), 1e-300):
                raise ConfigurationError(
                    f"TRAK's kernel ΦᵀΦ is singular (k = {phi.shape[1]}, N = {phi.shape[0]}): choose a "
                    "projection dimension below the number of training examples, or give damping > 0"
                )
            inverse = (vectors / values) @ vectors.T
            weights = (1.0 - self._correct_probabilities())[:, None]
            self._training = self._cache(-(phi @ inverse) * weights)
        return self._training

    def query_side(self, queries: Any, batch_size: int = 64) -> Queries:
        return self._queries_at(queries, [self.final], batch_size)

    def self_query_side(self, batch_size: int = 64) -> BlockReader:
        return self._measurements(self.context.source(self.data_segment), [self.final], batch_size)


class RepresentationSimilarity(_StoreBaseline):
    """Cosine similarity of one layer's outputs at the final checkpoint (RepSim).

    Parameters
    ----------
    module : str
        Name of the submodule whose output is the representation, as in
        ``model.named_modules()`` (e.g. the last hidden activation).
    """

    name = "RepSim"

    def __init__(self, attributor: Attributor, module: str, data_segment: int = 0) -> None:
        super().__init__(attributor, data_segment)
        modules = dict(attributor.computer.model.named_modules())
        if module not in modules or module == "":
            names = [n for n in modules if n]
            raise ConfigurationError(f"module {module!r} is not in the model; its submodules are {names[:20]}")
        self.module = modules[module]

    def _representations(self, source: ExampleSource) -> np.ndarray:
        captured: list[torch.Tensor] = []
        handle = self.module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        try:
            for _ in _final_outputs(self.context, source):
                pass
        finally:
            handle.remove()
        rows = torch.cat([c.reshape(c.shape[0], -1) for c in captured]).double()
        return torch.nn.functional.normalize(rows, dim=1).cpu().numpy()

    def training_side(self) -> Cache:
        """Minus the unit representations (so that ``-Ψ Tᵀ`` is the cosine similarity)."""
        if self._training is None:
            self._training = self._cache(-self._representations(self.context.source(self.data_segment)))
        return self._training

    def query_side(self, queries: Any, batch_size: int = 64) -> Queries:
        return Queries.of(self._representations(ExampleSource(queries, "the query set", self.context.task)))

    def self_query_side(self, batch_size: int = 64) -> BlockReader:
        raise ConfigurationError("RepSim's self-similarity is 1 for every example; it cannot rank them")


class Ensemble(AttributionMethod):
    """The mean score of several methods, e.g. one per independently trained run.

    The members' sides are concatenated (each training side divided by the number of
    members), so the ensemble is scored in one streamed product like any method.
    """

    def __init__(self, members: Sequence[Any]) -> None:
        members = list(members)
        if not members:
            raise ConfigurationError("an ensemble needs at least one member")
        for m in members:
            if not isinstance(m, AttributionMethod):
                raise ConfigurationError(f"ensemble members need a score() method; got {type(m).__name__} "
                                         "(give srcproj attribution methods: an Attributor or a baseline)")
        self.members = members
        self.name = f"{getattr(members[0], 'name', 'method')} ×{len(members)}"
        self._training: Cache | None = None

    def training_side(self) -> Cache:
        if self._training is None:
            parts = [m.training_side() for m in self.members]
            rows = {p.num_rows for p in parts}
            if len(rows) > 1:
                raise ConfigurationError(f"ensemble members disagree on the score shape: training sides of "
                                         f"{sorted(rows)} examples")
            share = 1.0 / len(parts)
            dtype = np.result_type(*[p.dtype for p in parts])
            scaled = [Cache(lambda start, stop, p=p: p.read(start, stop).astype(dtype) * share, p.num_rows, p.dim,
                            dtype, p.chunk_rows, copies=2) for p in parts]
            self._training = Cache.hstack(scaled, dtype)
        return self._training

    def query_side(self, queries: Any, batch_size: int = 64) -> Queries:
        return Queries.hstack([m.query_side(queries, batch_size) for m in self.members])

    def self_query_side(self, batch_size: int = 64) -> BlockReader:
        readers = [m.self_query_side(batch_size) for m in self.members]
        return lambda start, stop: np.concatenate([np.asarray(read(start, stop), dtype=np.float64)
                                                   for read in readers], axis=1)


def _load_state(checkpoint: Any) -> tuple[Mapping[str, torch.Tensor], Mapping | None]:
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(os.fspath(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping):
        return split_checkpoint(checkpoint)
    raise ConfigurationError(f"a checkpoint must be a state_dict or a path, got {type(checkpoint).__name__}")


def _mean_optimizer_state(states: Sequence[Mapping], betas: tuple[float, float], segment: int) -> dict:
    """One Adam state whose moments are the means of the checkpoints' bias-corrected ones,
    ``mean v̂`` and ``mean m̂²`` (as ``exp_avg = √mean m̂²``), with a ``step`` that makes the
    bias corrections 1: the preconditioner SOURCE takes for the segment, whichever
    ``adam_response``."""
    beta1, beta2 = betas
    last = states[-1]
    mean_state = {}
    for index, entry in last["state"].items():
        entry = dict(entry)
        if "exp_avg_sq" in entry:
            second, first = [], []
            for position, state in enumerate(states):
                other = state["state"].get(index)
                if other is None or "exp_avg_sq" not in other:
                    raise ConfigurationError(f"segment {segment}: checkpoint {position} has no Adam state for the "
                                             f"parameter at index {index}; its checkpoints cannot be averaged")
                step = float(torch.as_tensor(other["step"]).item())
                second.append(other["exp_avg_sq"].to(torch.float64) / (1.0 - beta2 ** step))
                m = other.get("exp_avg")
                m = torch.zeros_like(second[-1]) if m is None else m.to(torch.float64) / (1.0 - beta1 ** step)
                first.append(m * m)
            entry["exp_avg_sq"] = (sum(second) / len(second)).to(entry["exp_avg_sq"].dtype)
            entry["exp_avg"] = (sum(first) / len(first)).sqrt().to(entry["exp_avg_sq"].dtype)
            entry["step"] = torch.tensor(1e12)
        mean_state[index] = entry
    return {"state": mean_state, "param_groups": last["param_groups"]}


def average_checkpoints(trajectory: Trajectory) -> Trajectory:
    """Fast-SOURCE (the paper's §E.2): each segment's checkpoints replaced by their mean.

    Floating-point tensors are averaged; others (e.g. BatchNorm's step counter) are
    taken from the segment's last checkpoint. Featurize the result with a new
    :class:`Attributor` and store: one checkpoint per segment costs a segment's
    gradients and Hessian once instead of once per checkpoint. Adam checkpoints
    (``{"model", "optimizer"}``) keep the segment's preconditioner: the averaged state holds
    the means of the bias-corrected moments (``preconditioner="segment"`` gets the same M;
    ``"shared"`` too when every segment has as many checkpoints).
    """
    if not isinstance(trajectory, Trajectory):
        raise ConfigurationError(f"expected a srcproj.Trajectory, got {type(trajectory).__name__}")
    segments = []
    betas = getattr(trajectory.spec, "betas", (0.0, 0.0))
    for index, segment in enumerate(trajectory.segments):
        loaded = [_load_state(c) for c in segment.checkpoints]
        states = [state for state, _ in loaded]
        optimizer_states = [opt for _, opt in loaded]
        keys = list(states[-1].keys())
        for j, state in enumerate(states):
            if list(state.keys()) != keys:
                raise ConfigurationError(f"segment {index}: checkpoint {j} has other tensors than the last one; "
                                         "they cannot be averaged")
        mean = {}
        for key in keys:
            last = states[-1][key]
            if torch.is_floating_point(last):
                mean[key] = sum(s[key].to(torch.float64) for s in states).div(len(states)).to(last.dtype)
            else:
                mean[key] = last.clone()
        checkpoint: Any = mean
        if trajectory.spec.adaptive and all(opt is not None for opt in optimizer_states):
            checkpoint = {"model": mean, "optimizer": _mean_optimizer_state(optimizer_states, betas, index)}
        segments.append(Segment([checkpoint], segment.steps, segment.lr, segment.data))
    if trajectory.optimizer is not None:
        return Trajectory(segments, optimizer=trajectory.optimizer, batch_size=trajectory.batch_size)
    return Trajectory(segments, momentum=trajectory.momentum, weight_decay=trajectory.weight_decay,
                      nesterov=trajectory.nesterov, dampening=trajectory.dampening, batch_size=trajectory.batch_size)
