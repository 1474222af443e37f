"""The user's side of the digits pipeline: the model, the data sets and the training run.

``config.toml`` names these functions as entry points; ``train.py`` trains the model
with AdamW and records the run with ``srcproj.TrajectoryRecorder``. The examples are
dicts with an ``id`` field, as a Hugging Face data set yields them, so every table the
pipeline writes carries that id beside the index and the label.
"""

from __future__ import annotations

import torch

from srcproj.demo import load_digits_split, make_mlp


def build_model(hidden: int = 64) -> torch.nn.Module:
    """The architecture (srcproj takes the weights from the recorded checkpoints)."""
    return make_mlp(hidden=hidden, seed=0)


def _examples(X: torch.Tensor, y: torch.Tensor, prefix: str) -> list[dict]:
    return [{"x": X[i], "label": int(y[i]), "id": f"{prefix}-{i:04d}"} for i in range(len(y))]


def train_data(flip_fraction: float = 0.0, seed: int = 0) -> list[dict]:
    """The 1,437 training digits; ``flip_fraction`` of them get a wrong label (seeded)."""
    X, y, _, _ = load_digits_split(seed=0)
    y = y.clone()
    count = int(round(flip_fraction * len(y)))
    if count:
        generator = torch.Generator().manual_seed(seed)
        flipped = torch.randperm(len(y), generator=generator)[:count]
        y[flipped] = (y[flipped] + torch.randint(1, 10, (count,), generator=generator)) % 10
    return _examples(X, y, "train")


def validation_data() -> list[dict]:
    """The first half of the 360 held-out digits."""
    _, _, X, y = load_digits_split(seed=0)
    return _examples(X[:180], y[:180], "val")


def test_data() -> list[dict]:
    """The second half of the held-out digits."""
    _, _, X, y = load_digits_split(seed=0)
    return _examples(X[180:], y[180:], "test")
