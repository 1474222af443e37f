"""Counterfactual check by retraining on digits (seeded): SOURCE's top helpful examples matter.

For each of 10 queries and 3 retraining seeds, removing the query's top-50 helpful
training examples must lower its margin at least twice as much (averaged) as removing 50
random training examples of the query's class. Retraining uses the same number of steps
as the original run: the counterfactual SOURCE predicts (docs/math.md §8).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srcproj import Attributor, ClassificationTask, Segment, Trajectory
from srcproj.demo import load_digits_split, make_mlp, train_sgd

STEPS, LR, HIDDEN = 300, 0.05, 32
REMOVE, QUERIES, SEEDS = 50, 10, (0, 1, 2)


def _margins(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return ClassificationTask().measurement(model(X), y).numpy()


def _retrain(X: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
    model = make_mlp(HIDDEN, seed=100 + seed)
    train_sgd(model, X, y, steps=STEPS, lr=LR, seed=seed)
    return model


@pytest.mark.slow
def test_removing_top_helpful_examples_hurts_more_than_random_same_class(tmp_path, single_thread):
    X, y, Xq_all, yq_all = load_digits_split(seed=0)
    model = make_mlp(HIDDEN, seed=100)
    states = train_sgd(model, X, y, steps=STEPS, lr=LR, seed=0, checkpoint_at=(75, 150, 225, 300))
    data = (X, y)
    traj = Trajectory([Segment(states[:2], steps=150, lr=LR, data=data),
                       Segment(states[2:], steps=150, lr=LR, data=data)],
                      momentum=0.9, weight_decay=1e-3)
    attr = Attributor(make_mlp(HIDDEN), ClassificationTask(), traj, tmp_path / "digits.zarr",
                      proj_dim=512, seed=0, chunk_size=512)
    attr.featurize(progress=False)

    # Queries the trained model gets right, spread over classes.
    correct = np.nonzero(_margins(model, Xq_all, yq_all) > 0)[0]
    chosen = correct[np.linspace(0, len(correct) - 1, QUERIES).astype(int)]
    Xq, yq = Xq_all[chosen], yq_all[chosen]
    top = attr.top_k((Xq, yq), k=REMOVE)

    rng = np.random.default_rng(0)
    keep_all = np.ones(len(y), dtype=bool)
    drops_top, drops_random = [], []
    for seed in SEEDS:
        base = _margins(_retrain(X, y, seed), Xq, yq)
        for q in range(QUERIES):
            keep = keep_all.copy()
            keep[top.helpful_indices[q]] = False
            after_top = _margins(_retrain(X[keep], y[keep], seed), Xq[q:q + 1], yq[q:q + 1])[0]
            same_class = np.nonzero(y.numpy() == int(yq[q]))[0]
            keep = keep_all.copy()
            keep[rng.choice(same_class, REMOVE, replace=False)] = False
            after_random = _margins(_retrain(X[keep], y[keep], seed), Xq[q:q + 1], yq[q:q + 1])[0]
            drops_top.append(base[q] - after_top)
            drops_random.append(base[q] - after_random)
    mean_top, mean_random = float(np.mean(drops_top)), float(np.mean(drops_random))
    print(f"mean margin drop: top-{REMOVE} helpful {mean_top:.3f}, random same-class {mean_random:.3f}")
    assert mean_top > 0
    assert mean_top >= 2 * max(mean_random, 0.0), (mean_top, mean_random)
