"""Find mislabeled training digits, before and after a model memorises them.

Flips 10% of the digits' training labels (``--noise``), trains the 64-64-10 MLP in three
ways, featurizes each run with SOURCE and ranks the training examples with
:func:`srcproj.detection.detect_mislabeled`:

- ``unconverged``: 20 epochs (lr 0.02, weight decay 1e-3); the noisy labels are not fitted;
- ``midway``: 60 epochs at lr 0.1 (weight decay 1e-5); partly fitted, and the final
  iterate of a large learning rate is noisy;
- ``memorised``: 300 epochs (lr 0.1, weight decay 1e-5); the training accuracy on the
  noisy labels reaches about 1, so the final loss no longer tells them apart.

It prints every detector's ROC-AUC and precision at k = #flipped (the default is
``"mean_loss"``, the loss averaged over the run's checkpoints) and saves
precision-recall and ROC curves of every detector, one PNG per regime, in ``--out``.
About half a minute on two CPU cores (k = 256).

    python examples/mislabeled.py [--out DIR] [--noise 0.1] [--proj-dim 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from srcproj import Attributor, ClassificationTask, Segment, Trajectory
from srcproj.demo import load_digits_split, make_mlp, train_sgd
from srcproj.detection import detect_mislabeled
from srcproj.eval import detection

REGIMES = {
    "unconverged": {"epochs": 20, "lr": 0.02, "weight_decay": 1e-3},
    "midway": {"epochs": 60, "lr": 0.1, "weight_decay": 1e-5},
    "memorised": {"epochs": 300, "lr": 0.1, "weight_decay": 1e-5},
}
SEGMENTS, PER_SEGMENT, BATCH, MOMENTUM = 3, 2, 64, 0.9


def flip_labels(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Move ``round(fraction·N)`` labels to another class, uniformly; ``(noisy labels, flipped mask)``."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(y), dtype=bool)
    flipped[rng.choice(len(y), round(fraction * len(y)), replace=False)] = True
    noisy = y.clone()
    index = torch.from_numpy(flipped)
    noisy[index] = (y[index] + torch.from_numpy(rng.integers(1, 10, size=int(flipped.sum())))) % 10
    return noisy, flipped


def featurized_run(regime: str, X: torch.Tensor, y: torch.Tensor, seed: int, proj_dim: int, store: str) -> Attributor:
    """Train the MLP on ``(X, y)`` in the given regime and featurize the run (3 segments x 2 checkpoints)."""
    settings = REGIMES[regime]
    per_segment_steps = round(settings["epochs"] * len(y) / BATCH / SEGMENTS)
    marks = [s * per_segment_steps + (c + 1) * per_segment_steps // PER_SEGMENT
             for s in range(SEGMENTS) for c in range(PER_SEGMENT)]
    model = make_mlp(64, seed)
    states = train_sgd(model, X, y, SEGMENTS * per_segment_steps, settings["lr"], BATCH, MOMENTUM,
                       settings["weight_decay"], seed=seed, checkpoint_at=marks)
    trajectory = Trajectory([Segment(states[s * PER_SEGMENT:(s + 1) * PER_SEGMENT], per_segment_steps,
                                     settings["lr"], (X, y)) for s in range(SEGMENTS)],
                            momentum=MOMENTUM, weight_decay=settings["weight_decay"])
    attributor = Attributor(model, ClassificationTask(), trajectory, store, proj_dim=proj_dim, seed=seed)
    attributor.featurize(progress=False)
    return attributor


def plot_curves(path: str, title: str, curves: dict[str, np.ndarray], flipped: np.ndarray, default: str) -> None:
    """Precision-recall and ROC curves of every detector, side by side, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, (pr, roc) = plt.subplots(1, 2, figsize=(11, 4.6))
    for name, scores in curves.items():
        # The default is drawn dashed on top of the detector it is, which it equals.
        style = {"linewidth": 2.0, "color": "black", "linestyle": "--"} if name == default else {"linewidth": 1.4}
        precision, recall, _ = precision_recall_curve(flipped, scores)
        fpr, tpr, _ = roc_curve(flipped, scores)
        pr.plot(recall, precision, label=name, **style)
        roc.plot(fpr, tpr, label=name, **style)
    pr.axvline(1.0, color="grey", linewidth=0.5)
    pr.set(xlabel="recall (share of the flipped labels found)", ylabel="precision", ylim=(0, 1.02),
           title="precision-recall")
    roc.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle=":")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    roc.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(out: str, noise: float, proj_dim: int, seed: int) -> None:
    """Flip ``noise`` of the labels, run every regime, print each detector's metrics, save the curves in ``out``."""
    os.makedirs(out, exist_ok=True)
    X, y, _, _ = load_digits_split(seed)
    noisy, flipped = flip_labels(y, noise, seed + 7919)
    k = int(flipped.sum())
    print(f"{k} of {len(y)} training labels flipped ({noise:.0%}); k = {proj_dim}")
    with tempfile.TemporaryDirectory() as tmp:
        for regime in REGIMES:
            began = time.perf_counter()
            attributor = featurized_run(regime, X, noisy, seed, proj_dim, os.path.join(tmp, f"{regime}.zarr"))
            # The default detector ("mean_loss"); components="all" also computes every
            # individual detector, for comparison.
            result = detect_mislabeled(attributor, components="all")
            print(f"\n{regime}: training accuracy on the given labels {result.training_accuracy:.3f}; "
                  f"default detector {result.detector!r} over checkpoints {list(result.checkpoints)}")
            print(f"  {'detector':<26} {'ROC-AUC':>8} {'precision@' + str(k):>14}")
            curves = dict(result.components)
            label = f"default ({result.detector})"
            curves[label] = result.scores
            for name, scores in curves.items():
                found = detection(scores, flipped, (k / len(y),))
                print(f"  {name:<26} {found.auc:>8.3f} {found.found[k / len(y)]:>14.3f}")
            suspects = result.flag(count=10)
            print(f"  the 10 most suspicious examples: {suspects.tolist()} "
                  f"({int(flipped[suspects].sum())} of them flipped)")
            path = os.path.join(out, f"mislabeled_{regime}.png")
            title = (f"{regime} run ({REGIMES[regime]['epochs']} epochs, training accuracy "
                     f"{result.training_accuracy:.3f}), {noise:.0%} of the digits' labels flipped, k = {proj_dim}")
            plot_curves(path, title, curves, flipped, label)
            print(f"  curves: {path} ({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="mislabeled-figures", help="folder of the PNG figures")
    parser.add_argument("--noise", type=float, default=0.1, help="share of flipped training labels")
    parser.add_argument("--proj-dim", type=int, default=256, help="k, the projected dimension")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(args.out, args.noise, args.proj_dim, args.seed)
