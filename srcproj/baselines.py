"""Other attribution methods, computed from a featurized :class:`Attributor`'s store.

Each method has the same shape as SOURCE: ``score(queries) -> (Q, N)`` in srcproj's
sign convention (positive = including the training example helps the query) and
``self_influence() -> (N,)``. They reuse the projection, the stored features and the
stored Hessians wherever the formula allows, and compute only what the store lacks
(e.g. margin gradients for TRAK, query gradients at every checkpoint for TracIn).
Formulas: ``docs/math.md`` §5.

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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .attributor import Attributor
from .data import ExampleSource
from .errors import ConfigurationError
from .source import eigendecompose, unrolling_operators
from .tasks import ClassificationTask
from .trajectory import Segment, Trajectory

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
    attributor._require_featurized()
    return attributor


def _target_segment(attributor: Attributor, data_segment: int) -> int:
    return attributor._data_segment(data_segment)


def _final_outputs(att: Attributor, source: ExampleSource, batch: int = 1024):
    """Yield ``(outputs, targets)`` of the model at the final checkpoint, batch by batch."""
    trainable, fixed = att._final_parameters()
    dtype = next(iter(trainable.values())).dtype
    with torch.no_grad(), att.computer.evaluating():
        for lo in range(0, len(source), batch):
            x, y = source.rows(lo, min(lo + batch, len(source)))
            x = x.to(att.device, dtype) if x.is_floating_point() else x.to(att.device)
            yield att.computer.forward(trainable, fixed, x), y


class InfluenceFunction:
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
        self.attributor = _require_attributor(attributor)
        if damping is None:
            damping = attributor.trajectory.weight_decay
            if damping <= 0:
                raise ConfigurationError(
                    "the run has no weight decay, so the influence function needs an explicit damping; "
                    "give damping=δ > 0 (e.g. 1e-3 times the Hessian's mean eigenvalue)"
                )
        if not np.isfinite(damping) or damping <= 0:
            raise ConfigurationError(f"damping={damping!r}; it must be a finite number > 0")
        self.damping = float(damping)
        self.checkpoint = attributor._checkpoint_number(checkpoint)
        self.data_segment = _target_segment(attributor, data_segment)
        self._cache: np.ndarray | None = None

    def _inverse(self) -> np.ndarray:
        spectrum = eigendecompose(self.attributor.checkpoint_hessian(self.checkpoint), self.damping)
        return spectrum.function(1.0 / spectrum.eigenvalues)

    def training_side(self) -> np.ndarray:
        """``T = Φ (Ĥ + δI)⁻¹ / N``, so that scores are ``-Ψ Tᵀ``."""
        if self._cache is None:
            phi = self.attributor.checkpoint_features(self.checkpoint, "loss", self.data_segment)
            n = phi.shape[0]
            self._cache = (phi.astype(np.float64) @ self._inverse() / n).astype(self.attributor.cache_dtype)
        return self._cache

    def score(self, queries: Any) -> np.ndarray:
        psi = self.attributor.query_features_at(queries, self.checkpoint)
        return -(psi.astype(self.training_side().dtype) @ self.training_side().T)

    def self_influence(self) -> np.ndarray:
        psi = self.attributor.checkpoint_features(self.checkpoint, "measurement", self.data_segment)
        return -np.einsum("nk,nk->n", psi.astype(np.float64), self.training_side().astype(np.float64))


class SourceVariant:
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
    query : {"final", "last_segment"}, optional
        Query features at the final checkpoint (docs/math.md §3) or averaged over the
        last segment's checkpoints; default: the attributor's ``query`` setting.
    segments : sequence of int, optional
        Segments whose terms are summed (as in :meth:`Attributor.score`).
    """

    name = "SOURCE"

    def __init__(self, attributor: Attributor, trajectory: Trajectory | None = None, query: str | None = None,
                 segments: Sequence[int] | None = None) -> None:
        self.attributor = _require_attributor(attributor)
        own = attributor.trajectory
        trajectory = own if trajectory is None else trajectory
        if not isinstance(trajectory, Trajectory):
            raise ConfigurationError(f"trajectory must be a srcproj.Trajectory, got {type(trajectory).__name__}")
        if len(trajectory.segments) != len(own.segments) or trajectory.data_groups != own.data_groups:
            raise ConfigurationError(
                f"the trajectory has {len(trajectory.segments)} segments with data groups "
                f"{trajectory.data_groups}; the store was made for {len(own.segments)} with "
                f"{own.data_groups}. Only steps and learning rates may change"
            )
        if (trajectory.momentum, trajectory.weight_decay) != (own.momentum, own.weight_decay):
            raise ConfigurationError(
                f"the trajectory has momentum {trajectory.momentum} and weight decay {trajectory.weight_decay}; "
                f"the store was made with {own.momentum} and {own.weight_decay}. Only steps and learning rates "
                "may change"
            )
        for i, (a, b) in enumerate(zip(trajectory.segments, own.segments)):
            if len(a.checkpoints) != len(b.checkpoints):
                raise ConfigurationError(f"segment {i} has {len(a.checkpoints)} checkpoints; the store has "
                                         f"{len(b.checkpoints)}. Only steps and learning rates may change")
            if len(ExampleSource(a.data, f"segment {i}'s data")) != len(attributor.sources[i]):
                raise ConfigurationError(f"segment {i}'s data has another number of examples than the store's; "
                                         "only steps and learning rates may change")
        query = attributor.query if query is None else query
        if query not in ("final", "last_segment"):
            raise ConfigurationError(f"query={query!r}; choose 'final' or 'last_segment'")
        self.trajectory = trajectory
        self.query = query
        self.selected = attributor._selection(segments)
        self._cache: np.ndarray | None = None

    def training_side(self) -> np.ndarray:
        """``T = Σ_ℓ Ḡ_ℓ W_ℓᵀ`` over the selected segments, in memory, ``(N, k)``."""
        if self._cache is None:
            att = self.attributor
            spectra = att.segment_spectra()
            times = [self.trajectory.segment_time(s) for s in range(len(spectra))]
            operators = unrolling_operators(spectra, times, [len(src) for src in att.sources])
            total = None
            for seg in self.selected:
                members = [c for c, (s, _) in enumerate(att.checkpoints) if s == seg]
                mean = sum(att.checkpoint_features(c, "loss", seg).astype(np.float64) for c in members) / len(members)
                part = mean @ operators[seg].T
                total = part if total is None else total + part
            self._cache = total.astype(att.cache_dtype)
        return self._cache

    def query_features(self, queries: Any) -> np.ndarray:
        att = self.attributor
        if self.query == "final":
            return att.query_features_at(queries, -1)
        last = len(self.trajectory.segments) - 1
        members = [c for c, (s, _) in enumerate(att.checkpoints) if s == last]
        return sum(att.query_features_at(queries, c).astype(np.float64) for c in members) / len(members)

    def score(self, queries: Any) -> np.ndarray:
        return -(self.query_features(queries).astype(self.training_side().dtype) @ self.training_side().T)

    def self_influence(self) -> np.ndarray:
        att = self.attributor
        seg = self.selected[0]
        if self.query == "final":
            psi = att.checkpoint_features(-1, "measurement", seg).astype(np.float64)
        else:
            last = len(self.trajectory.segments) - 1
            members = [c for c, (s, _) in enumerate(att.checkpoints) if s == last]
            psi = sum(att.checkpoint_features(c, "measurement", seg).astype(np.float64) for c in members)
            psi /= len(members)
        return -np.einsum("nk,nk->n", psi, self.training_side().astype(np.float64))


class TracIn:
    """TracIn-CP in the projected space: ``-Σ_c η_c ψ_cᵀ φ_c(m)``.

    The sum runs over the checkpoints of the segments that trained on the attributed
    data (``data_segment``'s data object); ``η_c`` is the mean learning rate of the
    checkpoint's segment. The minus sign: ψ is the gradient of a measurement where
    higher is better, φ that of a loss.
    """

    name = "TracIn-CP"

    def __init__(self, attributor: Attributor, data_segment: int = 0) -> None:
        self.attributor = _require_attributor(attributor)
        seg = _target_segment(attributor, data_segment)
        self.data_segment = seg
        group = attributor.trajectory.data_groups[seg]
        self.terms = []
        for c, (s, _) in enumerate(attributor.checkpoints):
            if attributor.trajectory.data_groups[s] == group:
                segment = attributor.trajectory.segments[s]
                self.terms.append((c, segment.total_lr / segment.steps))
        self._features: dict[int, np.ndarray] = {}

    def _phi(self, checkpoint: int) -> np.ndarray:
        if checkpoint not in self._features:
            self._features[checkpoint] = self.attributor.checkpoint_features(checkpoint, "loss", self.data_segment)
        return self._features[checkpoint]

    def score(self, queries: Any) -> np.ndarray:
        total = None
        for c, lr in self.terms:
            psi = self.attributor.query_features_at(queries, c)
            part = -lr * (psi.astype(np.float64) @ self._phi(c).T.astype(np.float64))
            total = part if total is None else total + part
        return total

    def self_influence(self) -> np.ndarray:
        total = 0.0
        for c, lr in self.terms:
            psi = self.attributor.checkpoint_features(c, "measurement", self.data_segment).astype(np.float64)
            total = total - lr * np.einsum("nk,nk->n", psi, self._phi(c).astype(np.float64))
        return np.asarray(total)


class TRAK:
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
        self.attributor = _require_attributor(attributor)
        if not isinstance(attributor.task, ClassificationTask):
            raise ConfigurationError("TRAK's 1 - p weighting is defined for a ClassificationTask; "
                                     f"this attributor's task is {type(attributor.task).__name__}")
        if not np.isfinite(damping) or damping < 0:
            raise ConfigurationError(f"damping={damping!r}; it must be a finite number ≥ 0")
        self.damping = float(damping)
        self.data_segment = _target_segment(attributor, data_segment)
        self._cache: np.ndarray | None = None

    def _correct_probabilities(self) -> np.ndarray:
        att = self.attributor
        out = []
        for logits, y in _final_outputs(att, att.sources[self.data_segment]):
            out.append(torch.softmax(logits.double(), 1).gather(1, y.to(att.device).long()[:, None])[:, 0].cpu())
        return torch.cat(out).numpy()

    def training_side(self) -> np.ndarray:
        """``T = diag(1 - p) Φ (ΦᵀΦ + δI)⁻¹``, so that scores are ``Ψ Tᵀ``."""
        if self._cache is None:
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
            self._cache = ((phi @ inverse) * weights).astype(self.attributor.cache_dtype)
        return self._cache

    def score(self, queries: Any) -> np.ndarray:
        psi = self.attributor.query_features_at(queries, -1)
        return psi.astype(self.training_side().dtype) @ self.training_side().T

    def self_influence(self) -> np.ndarray:
        psi = self.attributor.checkpoint_features(-1, "measurement", self.data_segment).astype(np.float64)
        return np.einsum("nk,nk->n", psi, self.training_side().astype(np.float64))


class RepresentationSimilarity:
    """Cosine similarity of one layer's outputs at the final checkpoint (RepSim).

    Parameters
    ----------
    module : str
        Name of the submodule whose output is the representation, as in
        ``model.named_modules()`` (e.g. the last hidden activation).
    """

    name = "RepSim"

    def __init__(self, attributor: Attributor, module: str, data_segment: int = 0) -> None:
        self.attributor = _require_attributor(attributor)
        modules = dict(attributor.computer.model.named_modules())
        if module not in modules or module == "":
            names = [n for n in modules if n]
            raise ConfigurationError(f"module {module!r} is not in the model; its submodules are {names[:20]}")
        self.module = modules[module]
        self.data_segment = _target_segment(attributor, data_segment)
        self._train: np.ndarray | None = None

    def _representations(self, source: ExampleSource) -> np.ndarray:
        captured: list[torch.Tensor] = []
        handle = self.module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        try:
            for _ in _final_outputs(self.attributor, source):
                pass
        finally:
            handle.remove()
        rows = torch.cat([c.reshape(c.shape[0], -1) for c in captured]).double()
        return torch.nn.functional.normalize(rows, dim=1).cpu().numpy()

    def score(self, queries: Any) -> np.ndarray:
        if self._train is None:
            self._train = self._representations(self.attributor.sources[self.data_segment])
        return self._representations(ExampleSource(queries, "the query set")) @ self._train.T

    def self_influence(self) -> np.ndarray:
        raise ConfigurationError("RepSim's self-similarity is 1 for every example; it cannot rank them")


class Ensemble:
    """The mean score of several methods, e.g. one per independently trained run."""

    def __init__(self, members: Sequence[Any]) -> None:
        members = list(members)
        if not members:
            raise ConfigurationError("an ensemble needs at least one member")
        for m in members:
            if not callable(getattr(m, "score", None)):
                raise ConfigurationError(f"ensemble members need a score() method; got {type(m).__name__}")
        self.members = members
        self.name = f"{getattr(members[0], 'name', 'method')} ×{len(members)}"

    def score(self, queries: Any) -> np.ndarray:
        total = None
        for m in self.members:
            part = np.asarray(m.score(queries), dtype=np.float64)
            if total is not None and part.shape != total.shape:
                raise ConfigurationError(f"ensemble members disagree on the score shape: {part.shape} vs {total.shape}")
            total = part if total is None else total + part
        return total / len(self.members)

    def self_influence(self) -> np.ndarray:
        return sum(np.asarray(m.self_influence(), dtype=np.float64) for m in self.members) / len(self.members)


def _load_state(checkpoint: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return torch.load(os.fspath(checkpoint), map_location="cpu", weights_only=True)
    raise ConfigurationError(f"a checkpoint must be a state_dict or a path, got {type(checkpoint).__name__}")


def average_checkpoints(trajectory: Trajectory) -> Trajectory:
    """Fast-SOURCE (the paper's §E.2): each segment's checkpoints replaced by their mean.

    Floating-point tensors are averaged; others (e.g. BatchNorm's step counter) are
    taken from the segment's last checkpoint. Featurize the result with a new
    :class:`Attributor` and store: one checkpoint per segment costs a segment's
    gradients and Hessian once instead of once per checkpoint.
    """
    if not isinstance(trajectory, Trajectory):
        raise ConfigurationError(f"expected a srcproj.Trajectory, got {type(trajectory).__name__}")
    segments = []
    for index, segment in enumerate(trajectory.segments):
        states = [_load_state(c) for c in segment.checkpoints]
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
        segments.append(Segment([mean], segment.steps, segment.lr, segment.data))
    return Trajectory(segments, momentum=trajectory.momentum, weight_decay=trajectory.weight_decay)
