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
from .optimizer import Adam

__all__ = ["CHAININGS", "RESPONSES", "DecayRule", "bias_corrected_moments", "estimated_moments", "scale_vector",
           "small_space_decay"]

#: How a run's segments share preconditioners: "shared" (the default) uses one M, from
#: every checkpoint, for the whole run, so the factor between consecutive segments,
#: M_{ℓ+1}^{-1/2} M_ℓ^{1/2}, is exactly I; "segment" holds each segment's own M and
#: takes that factor as I. "shared" scored higher LDS on the tuning scenario
#: (docs/benchmarks.md, "AdamW runs").
CHAININGS = ("shared", "segment")


@dataclass(frozen=True)
class DecayRule:
    """How the per-parameter decays ``λ_i`` become one number in the small space.

    ``exact``: every attributed parameter has the same decay and no preconditioner
    makes it anisotropic; otherwise ``name`` says which mean was taken.
    """

    name: str
    exact: bool


#: How Adam's step responds to a small persistent change of the gradient (removing an
#: example): "linearized" differentiates the whole step m̂/(√v̂ + ε), so the second
#: moment's own response enters, M·(1 - m̂²/(√v̂(√v̂ + ε))); "fixed" holds v̂ fixed,
#: M = 1/(√v̂ + ε) (the paper's Appendix C).
RESPONSES = ("linearized", "fixed")


def bias_corrected_moments(state: Mapping[str, dict], param_names: Sequence[str], sizes: Mapping[str, int],
                           betas: tuple[float, float], label: str) -> tuple[np.ndarray, np.ndarray]:
    """``(v / (1 - β₂^step), (m / (1 - β₁^step))²)`` of one checkpoint's optimizer state,
    flat, in float64.

    Raises :class:`CheckpointMismatchError` for an attributed parameter without state:
    the optimizer never stepped it.
    """
    beta1, beta2 = betas
    parts, firsts = [], []
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
        m = entry.get("exp_avg")
        m = (np.zeros(v.size) if not isinstance(m, torch.Tensor) else
             m.detach().to("cpu", torch.float64).reshape(-1).numpy() / (1.0 - beta1 ** step))
        if m.size != v.size:
            raise CheckpointMismatchError(f"{label}: exp_avg of {name} has {m.size} values, the parameter {v.size}")
        firsts.append(m * m)
    moment, first = np.concatenate(parts), np.concatenate(firsts)
    if not np.all(np.isfinite(moment)) or np.any(moment < 0) or not np.all(np.isfinite(first)):
        raise CheckpointMismatchError(f"{label}: the optimizer's exp_avg_sq or exp_avg has negative or non-finite "
                                      "values; the checkpoint is damaged")
    return moment, first


def estimated_moments(total: np.ndarray, total_squares: np.ndarray, count: int,
                      batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(E[ḡ_B²], ḡ²) = (mean² + variance / B, mean²)`` from the sums of per-example
    gradients and of their squares over ``count`` examples: the expected square of a
    batch-mean gradient, and the square of the mean gradient."""
    mean = total / count
    variance = np.maximum(total_squares / count - mean * mean, 0.0)
    return mean * mean + variance / float(batch_size), mean * mean


def scale_vector(spec, moment: np.ndarray | None, lr_scales: np.ndarray,
                 first: np.ndarray | None = None) -> np.ndarray:
    """``s = M^{1/2}``: ``M = r / (√v̄ + ε)`` for Adam, ``M = r`` for SGD.

    With ``first`` (the mean of ``m̂²``) the response of v̂ to the change enters: the
    derivative of ``m/(√v + ε)`` along a persistent shift δ of the gradient, which moves
    m by δ and v by ``2 m δ``, is ``δ/(√v + ε) · (1 - m²/(√v (√v + ε)))``. Where the
    gradient is mostly signal (m² ≈ v) Adam's step barely moves: it is close to a sign.
    """
    if isinstance(spec, Adam):
        assert moment is not None
        root = np.sqrt(moment)
        metric = lr_scales / (root + spec.eps)
        if first is not None:
            denominator = root * (root + spec.eps)
            signal = np.divide(first, denominator, out=np.zeros_like(first), where=denominator > 0)
            metric = metric * np.clip(1.0 - signal, 0.0, 1.0)
        return np.sqrt(metric)
    return np.sqrt(lr_scales)


def small_space_decay(spec, decays: np.ndarray, scales: np.ndarray | None, moment: np.ndarray | None,
                      lr_scales: np.ndarray | None = None) -> tuple[float, DecayRule]:
    """The weight decay added as ``δ·I_k`` to a segment's preconditioned Hessian.

    In preconditioned coordinates the decay is diagonal: ``r_i λ_i`` for AdamW
    (decoupled: each group decays at its own rate ``r_i η``) and ``λ_i M_i`` when the
    decay is added to the gradient (Adam, SGD). A diagonal is ``δ·I`` only when it is
    constant; otherwise its mean is taken, a named approximation: over parameters for
    decoupled decay and SGD's (per-group constant) ``M``, and weighted by the second
    moment for coupled Adam, whose ``M`` reaches ``1/ε`` on parameters that barely move
    (those carry no gradient, so no weight).
    """
    coupled = spec.coupled_decay
    if coupled:
        values = decays * (scales * scales) if scales is not None else decays
    else:
        values = decays * lr_scales if lr_scales is not None else decays
    if values.size == 0 or float(values.max()) == float(values.min()):
        return float(values[0]) if values.size else 0.0, DecayRule("uniform", True)
    if coupled and isinstance(spec, Adam):
        weights = moment if moment is not None and float(moment.sum()) > 0 else np.ones_like(values)
        return float(np.dot(weights, values) / weights.sum()), DecayRule("second-moment-weighted mean of λ·M", False)
    if coupled and scales is not None:
        return float(values.mean()), DecayRule("parameter mean of λ·r", False)
    return float(values.mean()), DecayRule("parameter mean of the groups' λ" if lr_scales is None or
                                           np.all(lr_scales == 1) else "parameter mean of the groups' r·λ", False)
