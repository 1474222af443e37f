"""Quick start: which training digits helped or hurt a model's test predictions?

Trains a small MLP on scikit-learn's bundled digits (nothing is downloaded) with a
plain ``torch.optim.SGD`` loop that a ``TrajectoryRecorder`` records as it runs (two
segments of two checkpoints each, every step's learning rate, the data's fingerprint),
loads the recorded trajectory, computes SOURCE features in a store, and prints the most
helpful and harmful training examples of a few test digits. About 10 s on two CPU cores.

    python examples/quickstart.py [--store PATH] [--run DIR] [--proj-dim K]

Without ``--store`` the store and the recorded run live in a temporary directory; give a
path to keep them (the run defaults to ``quickstart-run`` beside the store): rerunning on
the same store then resumes instead of recomputing.
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


def main(store: str, run: str, proj_dim: int) -> None:
    X_train, y_train, X_test, y_test = load_digits_split(seed=0)
    model = make_mlp(hidden=64, seed=0)
    train = (X_train, y_train)

    # 1. Train with a plain SGD loop, recorded as it runs: 200 steps on one data set, cut
    #    into two segments with two checkpoints each (after steps 50, 100, 150 and 200).
    #    rec.step() after optimizer.step() is all the loop needs.
    lr, momentum, weight_decay, batch = 0.02, 0.9, 1e-3, 64
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    recorder = TrajectoryRecorder(model, optimizer, run, batch_size=batch, overwrite=True)
    recorder.stage("train", train, steps=200, segments=2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(200):
        index = torch.randperm(len(y_train), generator=generator)[:batch]  # a fresh uniform draw per step
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(X_train[index]), y_train[index]).backward()
        optimizer.step()
        recorder.step()
    recorder.close()

    # 2. Load the run from its manifest: segments, checkpoints, per-step rates and the
    #    optimizer come from the recording; the data is given by its recorded name and
    #    checked against the recorded fingerprint.
    trajectory = Trajectory.from_manifest(run, data={"train": train})
    print(f"recorded {len(trajectory.segments)} segments of {trajectory.segments[0].steps} steps in {run}")

    # 3. Featurize once into a resumable store, then score any queries against it.
    attr = Attributor(model, ClassificationTask(), trajectory, store=store, proj_dim=proj_dim)
    report = attr.featurize()
    print(f"featurized {report.examples_featurized} example x checkpoint pairs in {report.seconds:.1f} s "
          f"(k = {attr.proj_dim}, {attr.hessian} Gauss-Newton Hessian)")

    queries = (X_test[:3], y_test[:3])
    top = attr.top_k(queries, k=5)  # streamed: never builds the full score matrix
    for q in range(3):
        print(f"\ntest digit {q} (label {int(y_test[q])})")
        helpful = ", ".join(f"#{i} ({int(y_train[i])}) {s:+.3f}"
                            for i, s in zip(top.helpful_indices[q], top.helpful_scores[q], strict=False))
        harmful = ", ".join(f"#{i} ({int(y_train[i])}) {s:+.3f}"
                            for i, s in zip(top.harmful_indices[q], top.harmful_scores[q], strict=False))
        print(f"  helpful: {helpful}")
        print(f"  harmful: {harmful}")

    # The whole (queries x training examples) matrix, positive = helpful.
    scores = attr.score((X_test, y_test))
    best = np.argsort(-scores, axis=1)[:, :10]
    same = (y_train.numpy()[best] == y_test.numpy()[:, None]).mean()
    print(f"\nscores {scores.shape}: {same:.0%} of each test digit's 10 most helpful training "
          "digits share its label (chance: about 10%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="store directory (default: a temporary one)")
    parser.add_argument("--run", help="where the run is recorded (default: quickstart-run beside the store)")
    parser.add_argument("--proj-dim", type=int, default=128, help="projected dimension k (default: 128)")
    args = parser.parse_args()
    if args.store:
        main(args.store, args.run or os.path.join(os.path.dirname(os.path.abspath(args.store)), "quickstart-run"),
             args.proj_dim)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"{tmp}/quickstart.zarr", args.run or f"{tmp}/quickstart-run", args.proj_dim)
