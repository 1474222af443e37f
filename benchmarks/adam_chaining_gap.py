"""The gap of srcproj's two Adam chainings to the exact chain, in full parameter space.

    python benchmarks/adam_chaining_gap.py

Between segments, Adam's SOURCE carries the difference through the diagonal factor
R_ℓ = M_{ℓ+1}^{-1/2} M_ℓ^{1/2}, which has no form in the projected space (docs/math.md
§6). srcproj approximates it: "segment" (each segment's own M, R taken as I) or
"shared" (one M for the run, R = I exactly). Here every quantity is an explicit p×p
matrix (a digits MLP small enough for that), so the exact chain

    Δθ(m) = Σ_ℓ M_L^{1/2} E_L R_{L-1} E_{L-1} ⋯ R_ℓ F_ℓ M_ℓ^{1/2} ḡ_ℓ(m) / N

can be computed and compared with both approximations: correlation of the scores of
every (query, training example) pair, and the relative error. A measured gap, not a
test (tests/test_adam.py checks the pipeline against each approximation exactly).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys

import numpy as np
import scipy.linalg
import scipy.stats
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenarios import load_standardised_digits  # noqa: E402


def flat_grads(model, names, state, X, y, fn):
    params = {n: state[n].double() for n in names}

    def one(p, x, t):
        return fn(functional_call(model, p, (x[None],)), t[None]).sum()

    grads = vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([grads[n].reshape(len(X), -1) for n in names], 1).numpy()


def gauss_newton(model, names, state, X):
    params = {n: state[n].double() for n in names}

    def outputs(p, x):
        return functional_call(model, p, (x[None],))[0]

    jac = vmap(jacrev(outputs), in_dims=(None, 0))(params, X)
    J = torch.cat([jac[n].reshape(len(X), 10, -1) for n in names], 2).numpy()  # (N, C, p)
    with torch.no_grad():
        probs = torch.softmax(functional_call(model, params, (X,)), 1).numpy()
    lam = np.einsum("nc,cd->ncd", probs, np.eye(10)) - np.einsum("nc,nd->ncd", probs, probs)
    return np.einsum("ncp,ncd,ndq->pq", J, lam, J) / len(X)


def moments(state, count, betas):
    """Bias-corrected v and m² of a one-group optimizer state (built over model.parameters())."""
    v, m2 = [], []
    for i in range(count):
        entry = state["state"][i]
        step = float(entry["step"])
        v.append(entry["exp_avg_sq"].double().reshape(-1).numpy() / (1 - betas[1] ** step))
        m2.append((entry["exp_avg"].double().reshape(-1).numpy() / (1 - betas[0] ** step)) ** 2)
    return np.concatenate(v), np.concatenate(m2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=12)
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=60, help="per segment (3 segments)")
    args = parser.parse_args()
    torch.manual_seed(0)
    X, y, Xq, yq = load_standardised_digits(args.examples)[:4]
    X, Xq = X.double(), Xq[:40].double()
    yq = yq[:40]
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10)).double()
    names = [n for n, _ in model.named_parameters()]
    betas, eps, decay, lr = (0.9, 0.999), 1e-8, 0.01, 3e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=decay)
    generator = torch.Generator().manual_seed(0)
    checkpoints: list[list[tuple[dict, dict]]] = [[], [], []]
    loss = nn.CrossEntropyLoss()
    for step in range(3 * args.steps):
        pick = torch.randperm(len(y), generator=generator)[:32]
        optimizer.zero_grad()
        loss(model(X[pick]), y[pick]).backward()
        optimizer.step()
        if (step + 1) % (args.steps // 2) == 0:
            checkpoints[step // args.steps].append((copy.deepcopy(model.state_dict()),
                                                   copy.deepcopy(optimizer.state_dict())))
    p = sum(v.numel() for v in model.parameters())
    time = lr * args.steps

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out, t, reduction="none")

    def margin(out, t):
        mask = (torch.arange(10) == t[:, None])
        correct = (out * mask).sum(1)
        others = torch.where(mask, torch.full_like(out, -1e30), out)
        return correct - torch.logsumexp(others, 1)

    hessians = [np.mean([gauss_newton(model, names, s, X) for s, _ in seg], 0) for seg in checkpoints]
    grads = [np.mean([flat_grads(model, names, s, X, y, loss_fn) for s, _ in seg], 0) for seg in checkpoints]
    psi = flat_grads(model, names, checkpoints[-1][-1][0], Xq, yq, margin)
    per_segment = []
    for seg in checkpoints:
        pairs = [moments(o, len(names), betas) for _, o in seg]
        per_segment.append((np.mean([v for v, _ in pairs], 0), np.mean([m for _, m in pairs], 0)))
    shared = (np.mean([v for v, _ in per_segment], 0), np.mean([m for _, m in per_segment], 0))

    def metric(v, m2, response):
        root = np.sqrt(v)
        out = 1.0 / (root + eps)
        if response == "linearized":
            denominator = root * (root + eps)
            signal = np.divide(m2, denominator, out=np.zeros_like(m2), where=denominator > 0)
            out = out * np.clip(1 - signal, 0, 1)
        return out

    def displacement(metrics, exact_chain):
        """Δθ of every training example (p, N) with per-segment M (metrics)."""
        total = np.zeros((p, len(y)))
        later = None  # the propagation in θ coordinates from the end of segment ℓ to the end
        for index in range(2, -1, -1):
            # In θ itself: Δθ ← (I - ηA)Δθ + η M g/N with A = M H + λI (AdamW), so over the
            # segment Δθ_end = exp(-aA) Δθ_start + A⁻¹(I - exp(-aA)) M ḡ / N.
            m = metrics[index]
            generator_matrix = m[:, None] * hessians[index] + decay * np.eye(p)
            step = scipy.linalg.expm(-time * generator_matrix)
            term = np.linalg.solve(generator_matrix, (np.eye(p) - step) @ (m[:, None] * grads[index].T)) / len(y)
            total += term if later is None else later @ term
            later = step if later is None else later @ step
        if exact_chain:
            return total
        raise AssertionError

    def approximate(metrics):
        """srcproj's form: u-space chain with R = I, read out with M_L^{1/2}."""
        total = np.zeros((p, len(y)))
        later = None
        s_last = np.sqrt(metrics[-1])
        for index in range(2, -1, -1):
            s = np.sqrt(metrics[index])
            precond = s[:, None] * hessians[index] * s[None, :] + decay * np.eye(p)
            forget = scipy.linalg.expm(-time * precond)
            accumulate = np.linalg.solve(precond, np.eye(p) - forget)
            term = accumulate @ (s[:, None] * grads[index].T) / len(y)
            total += term if later is None else later @ term
            later = forget if later is None else later @ forget
        return s_last[:, None] * total

    print(f"machine: {platform.machine()}, torch {torch.__version__}; MLP 64-{args.hidden}-10 ({p} parameters), "
          f"{len(y)} digits, AdamW lr {lr}, 3 segments of {args.steps} steps, 2 checkpoints each")
    print("| second moment | chaining | Pearson r with the exact chain | Spearman | relative error |")
    print("|---|---|---:|---:|---:|")
    for response in ("linearized", "fixed"):
        metrics = [metric(v, m2, response) for v, m2 in per_segment]
        exact = -psi @ displacement(metrics, True)
        for label, chosen in (("segment", metrics), ("shared", [metric(*shared, response)] * 3)):
            scores = -psi @ approximate(chosen)
            r = np.corrcoef(scores.ravel(), exact.ravel())[0, 1]
            rho = scipy.stats.spearmanr(scores.ravel(), exact.ravel())[0]
            error = np.linalg.norm(scores - exact) / np.linalg.norm(exact)
            print(f"| {response} | {label} | {r:.4f} | {rho:.4f} | {error:.3f} |")


if __name__ == "__main__":
    main()
