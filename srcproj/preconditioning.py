"""The preconditioner each segment's steps applied, and the weight decay in the small space.

For Adam (docs/math.md §6) a segment's steps move the parameters by ``η M g`` with
``M = r / (√v̄ + ε)``: ``v̄`` is the bias-corrected second moment ``v / (1 - β₂^step)``
averaged over the segment's checkpoints and ``r`` the parameter's group learning rate
over the reference rate. For SGD, ``M = r`` (the identity when every group has the
reference rate). SOURCE then works with preconditioned gradients ``M^{1/2} g``: this
module computes the flat per-parameter vectors ``s = M^{1/2}`` (in the attributed
parameters' order) and the scalar weight decay that joins the preconditioned Hessian.

Pure numpy and torch on vectors; the pipeline reads the states and stores the results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import CheckpointMismatchError
from .optimizer import Adam, ResolvedOptimizer

__all__ = ["CHAININGS", "DecayRule", "bias_corrected_second_moment", "estimated_second_moment", "scale_vector",
           "small_space_decay", "lr_scale_vector"]

#: How a run's segments share preconditioners: "segment" holds each segment's own M
#: (the factor between consecutive segments, M_{ℓ+1}^{-1/2} M_ℓ^{1/2}, taken as I);
#: "shared" uses one M, from every checkpoint, for the whole run.
CHAININGS = ("segment", "shared")


@dataclass(frozen=True)
class DecayRule:
    """How the per-parameter decays ``λ_i`` become one number in the small space.

    ``exact``: every attributed parameter has the same decay and no preconditioner
    makes it anisotropic; otherwise ``name`` says which mean was taken.
    """

    name: str
    exact: bool


def lr_scale_vector(resolved: ResolvedOptimizer, param_names: Sequence[str], sizes: Mapping[str, int]) -> np.ndarray:
    """``r`` per entry of the flat attributed parameters."""
    return np.concatenate([np.full(sizes[n], resolved.lr_scale[n], dtype=np.float64) for n in param_names])


def decay_vector(resolved: ResolvedOptimizer, param_names: Sequence[str], sizes: Mapping[str, int]) -> np.ndarray:
    return np.concatenate([np.full(sizes[n], resolved.weight_decay[n], dtype=np.float64) for n in param_names])


def bias_corrected_second_moment(state: Mapping[str, dict], param_names: Sequence[str], sizes: Mapping[str, int],
                                 beta2: float, label: str) -> np.ndarray:
    """``v / (1 - β₂^step)`` of one checkpoint's optimizer state, flat, in float64.

    Raises :class:`CheckpointMismatchError` for an attributed parameter without state:
    the optimizer never stepped it.
    """
    parts = []
    for name in param_names:
        entry = state.get(name)
        if entry is None or "exp_avg_sq" not in entry:
            raise CheckpointMismatchError(
                f"{label}: the optimizer state has no exp_avg_sq for {name}, so Adam never stepped it; attribute "
                "only the parameters the optimizer trained (Attributor(modules=...)), or save the checkpoint after "
                "the optimizer's first step")
        step = entry.get("step", None)
        step = float(step.item() if isinstance(step, torch.Tensor) else (step if step is not None else 0))
        if step < 1:
            raise CheckpointMismatchError(f"{label}: the optimizer state of {name} is at step {step:g}; save "
                                          "checkpoints after the optimizer's first step")
        v = entry["exp_avg_sq"].detach().to("cpu", torch.float64).reshape(-1).numpy()
        if v.size != sizes[name]:
            raise CheckpointMismatchError(f"{label}: exp_avg_sq of {name} has {v.size} values, the parameter "
                                          f"{sizes[name]}")
        parts.append(v / (1.0 - beta2 ** step))
    moment = np.concatenate(parts)
    if not np.all(np.isfinite(moment)) or np.any(moment < 0):
        raise CheckpointMismatchError(f"{label}: the optimizer's exp_avg_sq has negative or non-finite values; the "
                                      "checkpoint is damaged")
    return moment


def estimated_second_moment(total: np.ndarray, total_squares: np.ndarray, count: int, batch_size: int) -> np.ndarray:
    """``E[ḡ_B²] = mean² + variance / B`` from the sums of per-example gradients and of
    their squares over ``count`` examples: the expected square of a batch-mean gradient."""
    mean = total / count
    variance = np.maximum(total_squares / count - mean * mean, 0.0)
    return mean * mean + variance / float(batch_size)


def scale_vector(spec, moment: np.ndarray | None, lr_scales: np.ndarray) -> np.ndarray:
    """``s = M^{1/2}``: ``M = r / (√v̄ + ε)`` for Adam, ``M = r`` for SGD."""
    if isinstance(spec, Adam):
        assert moment is not None
        return np.sqrt(lr_scales / (np.sqrt(moment) + spec.eps))
    return np.sqrt(lr_scales)


def small_space_decay(spec, decays: np.ndarray, scales: np.ndarray | None,
                      moment: np.ndarray | None) -> tuple[float, DecayRule]:
    """The weight decay added as ``δ·I_k`` to a segment's preconditioned Hessian.

    In preconditioned coordinates the decay is diagonal: ``λ_i`` for AdamW (decoupled)
    and ``λ_i M_i`` when the decay is added to the gradient (Adam, SGD). A diagonal is
    ``δ·I`` only when it is constant; otherwise its mean is taken, a named
    approximation: over parameters for decoupled decay and SGD's (per-group constant)
    ``M``, and weighted by the second moment for coupled Adam, whose ``M`` reaches
    ``1/ε`` on parameters that barely move (those carry no gradient, so no weight).
    """
    coupled = spec.coupled_decay
    values = decays * (scales * scales) if (coupled and scales is not None) else decays
    if values.size == 0 or float(values.max()) == float(values.min()):
        return float(values[0]) if values.size else 0.0, DecayRule("uniform", True)
    if coupled and isinstance(spec, Adam):
        weights = moment if moment is not None and float(moment.sum()) > 0 else np.ones_like(values)
        return float(np.dot(weights, values) / weights.sum()), DecayRule("second-moment-weighted mean of λ·M", False)
    if coupled and scales is not None:
        return float(values.mean()), DecayRule("parameter mean of λ·r", False)
    return float(values.mean()), DecayRule("parameter mean of the groups' λ", False)
