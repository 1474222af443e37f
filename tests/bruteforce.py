"""Full-parameter-space SOURCE, computed the slow, explicit way, for the exactness tests.

Nothing here uses srcproj: per-example gradients come from plain autograd one example
at a time, Gauss-Newton matrices from explicit Jacobians, matrix functions from
``scipy.linalg.expm`` and a linear solve.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch.func import functional_call


def flat_params(state: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1) for n in names]).to(torch.float64)


def _unflatten(vector: torch.Tensor, state: dict, names: list[str]) -> dict:
    out, offset = dict(state), 0
    for n in names:
        size = state[n].numel()
        out[n] = vector[offset : offset + size].reshape(state[n].shape)
        offset += size
    return out


def per_example_gradients(model, state, names, fn, X, y) -> np.ndarray:
    """Rows ∇θ fn(model(x_i), y_i), one autograd call per example."""
    rows = []
    for i in range(X.shape[0]):
        theta = flat_params(state, names).clone().requires_grad_(True)
        out = functional_call(model, _unflatten(theta, state, names), (X[i : i + 1],))
        value = fn(out, y[i : i + 1]).sum()
        (g,) = torch.autograd.grad(value, theta)
        rows.append(g.detach().numpy())
    return np.stack(rows)


def gauss_newton(model, state, names, task, X, y) -> np.ndarray:
    """(1/n) Σ_i J_iᵀ Λ_i J_i with explicit per-example Jacobians."""
    theta0 = flat_params(state, names)
    total = np.zeros((theta0.numel(), theta0.numel()))
    for i in range(X.shape[0]):
        def outputs(theta, i=i):
            return functional_call(model, _unflatten(theta, state, names), (X[i : i + 1],)).reshape(-1)

        jac = torch.autograd.functional.jacobian(outputs, theta0).numpy()  # (C, p)
        with torch.no_grad():
            out = outputs(theta0).reshape(1, -1)
        lam = task.output_hessian(out, y[i : i + 1])[0].numpy()
        total += jac.T @ lam @ jac
    return total / X.shape[0]


def segment_matrices(hessian: np.ndarray, time: float) -> tuple[np.ndarray, np.ndarray]:
    """S = expm(-aH), F = (I - S) H⁻¹ (H must be invertible: weight decay > 0)."""
    forget = scipy.linalg.expm(-time * hessian)
    accumulate = np.linalg.solve(hessian.T, (np.eye(len(hessian)) - forget).T).T
    return forget, accumulate


def source_scores(model, task, segments, weight_decay, momentum, query, selected) -> np.ndarray:
    """-ψᵀ Σ_ℓ S_L⋯S_{ℓ+1} F_ℓ ḡ_ℓ / N_ℓ in full parameter space.

    ``segments``: list of dicts with ``states`` (checkpoints), ``time_lr`` (Σ lr),
    ``X``, ``y``; ``selected``: the segments whose terms are summed.
    """
    names = [n for n, _ in model.named_parameters()]
    final = segments[-1]["states"][-1]
    Xq, yq = query
    psi = per_example_gradients(model, final, names, task.measurement, Xq, yq)
    return -psi @ source_displacement(model, task, segments, weight_decay, momentum, selected)


def source_displacement(model, task, segments, weight_decay, momentum, selected) -> np.ndarray:
    """Δθ_T(m) of every training example as columns ``(p, N)``: Σ_ℓ S_L⋯S_{ℓ+1} F_ℓ ḡ_ℓ / N_ℓ."""
    names = [n for n, _ in model.named_parameters()]
    forgets, terms = [], []
    for seg in segments:
        hessian = np.mean([gauss_newton(model, s, names, task, seg["X"], seg["y"]) for s in seg["states"]], axis=0)
        hessian = hessian + weight_decay * np.eye(len(hessian))
        forget, accumulate = segment_matrices(hessian, seg["time_lr"] / (1 - momentum))
        gbar = np.mean([per_example_gradients(model, s, names, task.loss, seg["X"], seg["y"]) for s in seg["states"]], axis=0)
        forgets.append(forget)
        terms.append(accumulate @ gbar.T / seg["X"].shape[0])  # (p, N)
    return chained(forgets, terms, selected)


def chained(forgets: list[np.ndarray], terms: list[np.ndarray], selected) -> np.ndarray:
    """Σ_{ℓ ∈ selected} S_L ⋯ S_{ℓ+1} terms[ℓ]: each segment's term carried through the later ones."""
    delta = 0.0
    for index in selected:
        later = np.eye(forgets[0].shape[0])
        for j in range(len(forgets) - 1, index, -1):
            later = later @ forgets[j]
        delta = delta + later @ terms[index]
    return delta


def damped_influence(model, state, names, task, data, query, damping) -> np.ndarray:
    """-ψᵀ (H + δI)⁻¹ g / N over the parameters ``names`` (Koh & Liang, with damping δ)."""
    X, y = data
    hessian = gauss_newton(model, state, names, task, X, y)
    hessian = hessian + damping * np.eye(len(hessian))
    grads = per_example_gradients(model, state, names, task.loss, X, y)
    psi = per_example_gradients(model, state, names, task.measurement, *query)
    return -psi @ np.linalg.solve(hessian, grads.T) / len(y)


def preconditioned_source_scores(model, task, segments, scales, decays, selected, query) -> np.ndarray:
    """Adam's SOURCE in full parameter space (docs/math.md §6, consecutive segments' factor
    R taken as I): with S_ℓ = diag(scales[ℓ]) = M_ℓ^{1/2},

        H̃_ℓ = mean_c S_ℓ H(θ_c) S_ℓ + δ_ℓ I,  E_ℓ = expm(-a_ℓ H̃_ℓ),  F_ℓ = (I - E_ℓ) H̃_ℓ⁻¹,
        score = -(S_L ∇f)ᵀ Σ_ℓ E_L ⋯ E_{ℓ+1} F_ℓ mean_c(S_ℓ ∇L(θ_c)) / N_ℓ.

    ``segments``: dicts with ``states``, ``time_lr`` (a_ℓ), ``X``, ``y``.
    """
    names = [n for n, _ in model.named_parameters()]
    forgets, terms = [], []
    for seg, scale, decay in zip(segments, scales, decays, strict=True):
        S = np.diag(scale)
        hessian = np.mean([S @ gauss_newton(model, s, names, task, seg["X"], seg["y"]) @ S for s in seg["states"]],
                          axis=0)
        hessian = hessian + decay * np.eye(len(hessian))
        forget, accumulate = segment_matrices(hessian, seg["time_lr"])
        gbar = np.mean([per_example_gradients(model, s, names, task.loss, seg["X"], seg["y"]) * scale
                        for s in seg["states"]], axis=0)
        forgets.append(forget)
        terms.append(accumulate @ gbar.T / seg["X"].shape[0])
    final = segments[-1]["states"][-1]
    psi = per_example_gradients(model, final, names, task.measurement, *query) * scales[-1]
    return -psi @ chained(forgets, terms, selected)


def stage_source_scores(model, task, segments, weight_decay, momentum, query, selected) -> np.ndarray:
    """SOURCE with consecutive segments of one data set unrolled as one stage (``unroll="stages"``).

    A stage's Hessian and gradients are the time-weighted means of its segments',
    H̄ = Σ a_ℓ H_ℓ / A and ḡ = Σ a_ℓ ḡ_ℓ / A with A = Σ a_ℓ, over the stage's time A;
    segment ℓ's term is the stage's, S_later F_stage, applied to a_ℓ ḡ_ℓ / (A N).
    ``segments`` as for :func:`source_scores`, each also with ``stage`` (an int).
    """
    timed = [{**seg, "time_lr": seg["time_lr"] / (1 - momentum)} for seg in segments]  # the heavy-ball gain
    p = sum(v.numel() for v in model.parameters())
    return preconditioned_stage_scores(model, task, timed, [np.ones(p)] * len(segments),
                                       [weight_decay] * len(segments), [seg["stage"] for seg in segments],
                                       selected, query)


def preconditioned_stage_scores(model, task, segments, scales, decays, stages, selected, query) -> np.ndarray:
    """Adam's SOURCE with stages (``unroll="stages"``) in full parameter space: with
    S_ℓ = diag(scales[ℓ]), a stage s unrolls over A_s = Σ a_ℓ with

        H̃_s = Σ_ℓ a_ℓ (mean_c S_ℓ H(θ_c) S_ℓ + δ_ℓ I) / A_s,   E_s = expm(-A_s H̃_s),  F_s = (I - E_s) H̃_s⁻¹,

    and segment ℓ's term is F_s a_ℓ mean_c(S_ℓ ∇L(θ_c)) / (A_s N), carried through the
    later stages' E. ψ = S_L ∇f at the final checkpoint. ``stages``: one int per segment.
    """
    names = [n for n, _ in model.named_parameters()]
    order = sorted(set(stages))
    totals = {s: sum(seg["time_lr"] for seg, t in zip(segments, stages, strict=True) if t == s) for s in order}
    hessians = {s: 0.0 for s in order}
    for seg, scale, decay, stage in zip(segments, scales, decays, stages, strict=True):
        S = np.diag(scale)
        mean = np.mean([S @ gauss_newton(model, st, names, task, seg["X"], seg["y"]) @ S for st in seg["states"]],
                       axis=0)
        hessians[stage] = hessians[stage] + seg["time_lr"] / totals[stage] * (mean + decay * np.eye(len(mean)))
    forgets, accumulates = [], []
    for s in order:
        forget, accumulate = segment_matrices(hessians[s], totals[s])
        forgets.append(forget)
        accumulates.append(accumulate)
    terms = [0.0] * len(order)
    for index in selected:
        seg, scale, stage = segments[index], scales[index], stages[index]
        gbar = np.mean([per_example_gradients(model, st, names, task.loss, seg["X"], seg["y"]) * scale
                        for st in seg["states"]], axis=0)
        position = order.index(stage)
        terms[position] = terms[position] + accumulates[position] @ (
            seg["time_lr"] / totals[stage] * gbar.T) / seg["X"].shape[0]
    final = segments[-1]["states"][-1]
    psi = per_example_gradients(model, final, names, task.measurement, *query) * scales[-1]
    used = sorted({order.index(stages[i]) for i in selected})
    return -psi @ chained(forgets, terms, used)
