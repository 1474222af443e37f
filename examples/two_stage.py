"""Continual learning: how much do first-stage examples still matter after stage two?

Stage 1 trains an MLP on half of the digits; stage 2 continues on the other half,
rotated by 90 degrees (a new domain). The two stages are two SOURCE segments with
different data sets, so their training examples are different rows and are scored
one stage at a time. Queries come from the second domain (rotated test digits) and
are attributed to the FIRST stage's examples with ``attr.score(queries, segments=[0])``:
SOURCE carries stage-1 gradients through stage 2's forgetting factor exp(-a H).
A ``TrajectoryRecorder`` records both stages as they train (one segment each, two
checkpoints per segment) and the trajectory is loaded from its manifest, each stage's
data given by name. About 10 s on two CPU cores.

    python examples/two_stage.py [--store PATH] [--run DIR] [--proj-dim K] [--steps STEPS]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from srcproj import Attributor, ClassificationTask, Trajectory, TrajectoryRecorder
from srcproj.demo import load_digits_split, make_mlp


def rotate(X: torch.Tensor) -> torch.Tensor:
    """Each 8x8 digit turned by 90 degrees, flattened back to 64 pixels."""
    return X.reshape(-1, 8, 8).rot90(1, dims=(1, 2)).reshape(-1, 64).contiguous()


def accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def same_label_share(scores: np.ndarray, train_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Mean fraction of each query's k most helpful examples that share its label."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((train_labels[best] == query_labels[:, None]).mean())


def train_stage(model: torch.nn.Module, optimizer: torch.optim.Optimizer, recorder: TrajectoryRecorder,
                data: tuple[torch.Tensor, torch.Tensor], steps: int, seed: int, batch: int = 64) -> None:
    """A plain SGD loop: a fresh uniform draw of ``batch`` examples per step, recorded."""
    X, y = data
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randperm(len(y), generator=generator)[:batch]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(X[index]), y[index]).backward()
        optimizer.step()
        recorder.step()


def main(store: str, run: str, proj_dim: int, steps: int) -> None:
    X_train, y_train, X_test, y_test = load_digits_split(seed=0)
    half = len(X_train) // 2
    # Two different data sets: segments share examples only when their data hold the same ones.
    stage1 = (X_train[:half], y_train[:half])
    stage2 = (rotate(X_train[half:]), y_train[half:])
    lr, momentum, weight_decay = 0.02, 0.9, 1e-3

    model = make_mlp(hidden=64, seed=0)

    def sgd() -> torch.optim.SGD:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    # Each stage is one segment with two checkpoints (half-way and at its end). A new
    # optimizer per stage, as stage-wise training usually does: the recorder follows it
    # (same settings, so one trajectory); the momentum buffer restarting is a transient
    # SOURCE's segment model does not describe.
    optimizer = sgd()
    recorder = TrajectoryRecorder(model, optimizer, run, batch_size=64, overwrite=True)
    recorder.stage("upright", stage1, steps=steps)
    train_stage(model, optimizer, recorder, stage1, steps, seed=1)
    before = accuracy(model, X_test, y_test)
    optimizer = sgd()
    recorder.stage("rotated", stage2, steps=steps, optimizer=optimizer)
    train_stage(model, optimizer, recorder, stage2, steps, seed=2)
    recorder.close()
    print(f"stage 1: {len(stage1[0])} upright digits, {steps} steps -> upright test accuracy {before:.1%}")
    print(f"stage 2: {len(stage2[0])} rotated digits, {steps} steps -> rotated test accuracy "
          f"{accuracy(model, rotate(X_test), y_test):.1%}, upright {accuracy(model, X_test, y_test):.1%}")

    # The recorded run: segment 0 trained on "upright", segment 1 on "rotated".
    trajectory = Trajectory.from_manifest(run, data={"upright": stage1, "rotated": stage2})
    attr = Attributor(model, ClassificationTask(), trajectory, store=store, proj_dim=proj_dim)
    attr.featurize(progress=False)

    queries = (rotate(X_test), y_test)  # the second domain
    first = attr.score(queries, segments=[0])   # (Q, N_1): stage-1 examples only
    second = attr.score(queries, segments=[1])  # (Q, N_2): stage-2 examples
    labels1, labels2, qlabels = stage1[1].numpy(), stage2[1].numpy(), y_test.numpy()

    print(f"\nrotated test digits attributed to stage-1 (upright) training digits, k = {attr.proj_dim}")
    for q in range(3):
        best = np.argsort(-first[q], kind="stable")[:5]
        shown = ", ".join(f"#{i} ({labels1[i]}) {first[q, i]:+.2e}" for i in best)
        shared = int((labels1[best] == qlabels[q]).sum())
        print(f"  query {q} (label {qlabels[q]}): {shared}/5 share its label: {shown}")

    print("\nover all rotated test digits (chance: about 10%)")
    print(f"  top-10 helpful stage-1 digits sharing the query's label: "
          f"{same_label_share(first, labels1, qlabels, 10):.0%}")
    print(f"  top-10 helpful stage-2 digits sharing the query's label: "
          f"{same_label_share(second, labels2, qlabels, 10):.0%}")
    print(f"  mean |score| per example: stage 1 {np.abs(first).mean():.2e}, "
          f"stage 2 {np.abs(second).mean():.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="store directory (default: a temporary one)")
    parser.add_argument("--run", help="where the run is recorded (default: two-stage-run beside the store)")
    parser.add_argument("--proj-dim", type=int, default=128, help="projected dimension k (default: 128)")
    parser.add_argument("--steps", type=int, default=200, help="SGD steps per stage (default: 200)")
    args = parser.parse_args()
    if args.store:
        main(args.store, args.run or os.path.join(os.path.dirname(os.path.abspath(args.store)), "two-stage-run"),
             args.proj_dim, args.steps)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"{tmp}/two_stage.zarr", args.run or f"{tmp}/two-stage-run", args.proj_dim, args.steps)
