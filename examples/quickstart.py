"""Quick start: which training digits helped or hurt a model's test predictions?

Trains a small MLP on scikit-learn's bundled digits (nothing is downloaded) with plain
SGD, describes the run to srcproj as two segments of two checkpoints each, computes
SOURCE features in a store, and prints the most helpful and harmful training examples
of a few test digits. About 10 s on two CPU cores.

    python examples/quickstart.py [--store PATH] [--proj-dim K]

Without ``--store`` the store lives in a temporary directory; give a path to keep it:
rerunning on the same store then resumes instead of recomputing.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from srcproj import Attributor, ClassificationTask, Segment, Trajectory
from srcproj.demo import load_digits_split, make_mlp, train_sgd


def main(store: str, proj_dim: int) -> None:
    X_train, y_train, X_test, y_test = load_digits_split(seed=0)
    model = make_mlp(hidden=64, seed=0)

    # 1. Train, saving state_dicts inside each segment. train_sgd is a plain
    #    torch.optim.SGD loop; any loop works as long as the run is described to srcproj
    #    with the same learning rate, momentum and weight decay.
    lr, momentum, weight_decay = 0.02, 0.9, 1e-3
    states = train_sgd(model, X_train, y_train, steps=200, lr=lr, momentum=momentum,
                       weight_decay=weight_decay, seed=0, checkpoint_at=[50, 100, 150, 200])

    # 2. Describe the run: two segments of 100 steps with two checkpoints each. Both
    #    trained on the same examples, so each example's terms add up.
    train = (X_train, y_train)
    trajectory = Trajectory(
        [Segment(states[:2], steps=100, lr=lr, data=train),
         Segment(states[2:], steps=100, lr=lr, data=train)],
        momentum=momentum, weight_decay=weight_decay,
    )

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
    parser.add_argument("--proj-dim", type=int, default=128, help="projected dimension k (default: 128)")
    args = parser.parse_args()
    if args.store:
        main(args.store, args.proj_dim)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"{tmp}/quickstart.zarr", args.proj_dim)
