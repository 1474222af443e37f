"""Attributing an AdamW run: which training digits helped a model trained with AdamW?

Trains a small MLP on scikit-learn's bundled digits (nothing is downloaded) with
``torch.optim.AdamW``: two parameter groups (weight decay on the weights, none on the
biases) and a warm-up + cosine learning-rate schedule. Checkpoints are saved as
``{"model": ..., "optimizer": ...}`` dicts, two in each of two segments: the optimizer
state carries Adam's second moment, which gives SOURCE its preconditioner
(docs/math.md §6). The run is described to srcproj with the live optimizer
(``Trajectory(segments, optimizer=optimizer)``), featurized into a store, and the most
helpful training examples of a few test digits are printed. About 10 s on two CPU cores.

    python examples/adam_run.py [--store PATH] [--proj-dim K]

Without ``--store`` the store lives in a temporary directory; give a path to keep it:
rerunning on the same store then resumes instead of recomputing.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from srcproj import Attributor, ClassificationTask, Segment, Trajectory
from srcproj.demo import load_digits_split, make_mlp

STEPS_PER_SEGMENT, SEGMENTS, BATCH = 120, 2, 64
PEAK_LR, WARMUP, WEIGHT_DECAY = 3e-3, 20, 0.05


def warmup_cosine(step: int) -> float:
    """The learning rate of step ``step`` (0-based) over the peak: a linear warm-up, then
    a cosine decay to a tenth of the peak at the end of the run."""
    total = STEPS_PER_SEGMENT * SEGMENTS
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, total - WARMUP)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_adamw(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, seed: int = 0):
    """Train ``model`` in place; return the optimizer, the checkpoints of each segment
    and the learning rate of every step (what the segments are described with)."""
    params = dict(model.named_parameters())
    weights = [p for name, p in params.items() if name.endswith("weight")]
    biases = [p for name, p in params.items() if name.endswith("bias")]
    optimizer = torch.optim.AdamW([{"params": weights, "weight_decay": WEIGHT_DECAY},
                                   {"params": biases, "weight_decay": 0.0}], lr=PEAK_LR, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    checkpoints: list[list[dict]] = [[] for _ in range(SEGMENTS)]
    rates: list[float] = []
    generator = torch.Generator().manual_seed(seed)
    save_every = STEPS_PER_SEGMENT // 2  # two checkpoints per segment: mid-way and at its end
    model.train()
    for step in range(STEPS_PER_SEGMENT * SEGMENTS):
        index = torch.randperm(len(y), generator=generator)[:BATCH]  # a fresh uniform draw per step
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this step uses
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(X[index]), y[index]).backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % save_every == 0:
            checkpoints[step // STEPS_PER_SEGMENT].append(
                {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())})
    return optimizer, checkpoints, rates


def main(store: str, proj_dim: int) -> None:
    X_train, y_train, X_test, y_test = load_digits_split(seed=0)
    model = make_mlp(hidden=64, seed=0)

    # 1. Train with AdamW, saving {"model", "optimizer"} checkpoints inside each segment.
    optimizer, checkpoints, rates = train_adamw(model, X_train, y_train)
    with torch.no_grad():
        accuracy = float((model(X_test).argmax(1) == y_test).float().mean())
    print(f"trained with AdamW: test accuracy {accuracy:.1%}")

    # 2. Describe the run: per-step learning rates of group 0 (the schedule), and the live
    #    optimizer, which gives the betas, eps, the groups' weight decays and (through the
    #    checkpoints' optimizer state) Adam's second moment.
    train = (X_train, y_train)
    segments = [Segment(checkpoints[s], steps=STEPS_PER_SEGMENT,
                        lr=rates[s * STEPS_PER_SEGMENT:(s + 1) * STEPS_PER_SEGMENT], data=train)
                for s in range(SEGMENTS)]
    trajectory = Trajectory(segments, optimizer=optimizer)
    times = ", ".join(f"{trajectory.segment_time(s):.3f}" for s in range(SEGMENTS))
    print(f"segment times (sum of the rates, no momentum gain for Adam): {times}")

    # 3. Featurize once into a resumable store, then score queries against it.
    attr = Attributor(model, ClassificationTask(), trajectory, store=store, proj_dim=proj_dim)
    report = attr.featurize(progress=False)
    print(f"featurized {report.examples_featurized} example x checkpoint pairs in {report.seconds:.1f} s "
          f"(k = {attr.proj_dim}, {attr.hessian} Gauss-Newton Hessian)")
    print(f"preconditioner: {report.preconditioner}")
    decays = ", ".join(f"{d:.4f}" for d in report.weight_decays)
    print(f"weight decay in the small space: {decays} per segment ({report.weight_decay_rule})")

    queries = (X_test[:3], y_test[:3])
    top = attr.top_k(queries, k=5)
    for q in range(3):
        proponents = ", ".join(f"#{i} ({int(y_train[i])}) {s:+.3f}"
                               for i, s in zip(top.helpful_indices[q], top.helpful_scores[q], strict=False))
        print(f"test digit {q} (label {int(y_test[q])}): top proponents {proponents}")

    scores = attr.score((X_test, y_test))
    best = np.argsort(-scores, axis=1)[:, :10]
    same = (y_train.numpy()[best] == y_test.numpy()[:, None]).mean()
    print(f"scores {scores.shape}: {same:.0%} of each test digit's 10 most helpful training digits share its "
          "label (chance: about 10%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="store directory (default: a temporary one)")
    parser.add_argument("--proj-dim", type=int, default=128, help="projected dimension k (default: 128)")
    args = parser.parse_args()
    if args.store:
        main(args.store, args.proj_dim)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"{tmp}/adam_run.zarr", args.proj_dim)
