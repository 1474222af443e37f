"""Shared fixtures: a tiny deterministic MLP classifier, its training run, and helpers.

``TinyRun`` holds a model (8 -> hidden -> 3), 100 generated training examples, a few
queries and checkpoints saved during a short full-batch SGD run. Everything is seeded,
so two runs built with the same arguments are identical (also across processes).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from srcproj import Attributor, ClassificationTask, Segment, Trajectory

IN_FEATURES = 8
NUM_CLASSES = 3


def tiny_mlp(hidden: int = 6, seed: int = 0) -> nn.Module:
    """An 8 -> hidden -> 3 tanh MLP with seeded initial weights."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Linear(IN_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, NUM_CLASSES))
    finally:
        torch.random.set_rng_state(generator_state)


def tiny_data(n: int = 100, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples ``(X (n, 8) float32, y (n,) int64 in 0..2)`` from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, IN_FEATURES, generator=generator)
    w = torch.randn(IN_FEATURES, NUM_CLASSES, generator=generator)
    logits = X @ w + 0.5 * torch.randn(n, NUM_CLASSES, generator=generator)
    return X, logits.argmax(1)


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
          save_at: tuple[int, ...]) -> list[dict]:
    """Full-batch SGD on a copy of ``model``; state_dicts (cloned) after the steps in ``save_at``."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    saved = []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
        if step in save_at:
            saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return saved


@dataclass
class TinyRun:
    """A tiny training run and shortcuts to build trajectories and attributors from it."""

    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    Xq: torch.Tensor
    yq: torch.Tensor
    checkpoints: list[dict]
    steps: int = 10
    lr: float = 0.1
    data: tuple = field(init=False)

    def __post_init__(self) -> None:
        # One tuple object, so that segments built from it share their training examples.
        self.data = (self.X, self.y)

    @property
    def queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.Xq, self.yq

    def trajectory(self, checkpoints=None, steps=None, lr=None, data=None, **kwargs) -> Trajectory:
        """A one-segment trajectory; any argument overrides the run's own."""
        segment = Segment(
            checkpoints=self.checkpoints if checkpoints is None else checkpoints,
            steps=self.steps if steps is None else steps,
            lr=self.lr if lr is None else lr,
            data=self.data if data is None else data,
        )
        return Trajectory([segment], **kwargs)

    def attributor(self, store, trajectory: Trajectory | None = None, model: nn.Module | None = None,
                   proj_dim: int = 16, seed: int = 0, **kwargs) -> Attributor:
        kwargs.setdefault("feature_dtype", "float32")
        kwargs.setdefault("chunk_size", 16)
        return Attributor(
            self.model if model is None else model,
            ClassificationTask(),
            self.trajectory() if trajectory is None else trajectory,
            store,
            proj_dim=proj_dim,
            seed=seed,
            **kwargs,
        )


def build_tiny_run(hidden: int = 6, n: int = 100, seed: int = 0) -> TinyRun:
    """The deterministic tiny run: 10 SGD steps at lr 0.1, checkpoints after steps 5 and 10."""
    model = tiny_mlp(hidden, seed)
    X, y = tiny_data(n, seed + 1)
    Xq, yq = tiny_data(6, seed + 2)
    checkpoints = train(model, X, y, steps=10, lr=0.1, save_at=(5, 10))
    return TinyRun(model, X, y, Xq, yq, checkpoints)


def adam_trajectory(run: TinyRun) -> Trajectory:
    """The tiny run's data trained by AdamW instead (10 steps, lr 0.01, decay 0.01),
    checkpoints after steps 5 and 10 saved as ``{"model", "optimizer"}``; the live
    optimizer is built over a copy of the model (matched to it by order)."""
    model = copy.deepcopy(run.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    checkpoints = []
    for step in range(1, 11):
        pick = torch.randperm(len(run.y), generator=generator)[:20]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(run.X[pick]), run.y[pick]).backward()
        optimizer.step()
        if step in (5, 10):
            checkpoints.append({"model": copy.deepcopy(model.state_dict()),
                                "optimizer": copy.deepcopy(optimizer.state_dict())})
    return Trajectory([Segment(checkpoints, 10, 0.01, (run.X, run.y))], optimizer=optimizer)


@pytest.fixture(scope="session")
def tiny_run() -> TinyRun:
    """The default tiny run (hidden size 6, 100 examples). Do not modify it in place."""
    return build_tiny_run()


@pytest.fixture(scope="session")
def make_tiny_run():
    """A factory for tiny runs with other hidden sizes / sizes / seeds."""
    return build_tiny_run


@pytest.fixture
def single_thread():
    """Run torch on one thread: tiny models are several times faster that way on few cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_scores_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    """``rtol`` closeness, plus an absolute floor of ``0.1 * rtol`` times the largest score.

    Float32 features round at ~1e-7 of the scores' scale, so a score close to zero can
    differ by more than ``rtol`` of itself; the floor covers that and nothing more.
    """
    expected = np.asarray(expected)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0.1 * rtol * scale)


# ---------------------------------------------------------------------------- the digits pipeline example
DIGITS_PIPELINE = Path(__file__).resolve().parents[1] / "examples" / "digits_pipeline"


@pytest.fixture(scope="session")
def recorded_digits(tmp_path_factory) -> Path:
    """examples/digits_pipeline with its run trained and recorded once (``python train.py
    config.toml``, as a user runs it). Never changed: tests copy it (:func:`copy_recorded`)."""
    root = tmp_path_factory.mktemp("recorded") / "digits_pipeline"
    shutil.copytree(DIGITS_PIPELINE, root, ignore=shutil.ignore_patterns("run", "*.zarr", "__pycache__"))
    done = subprocess.run([sys.executable, "train.py", "config.toml"], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def copy_recorded(recorded: Path, destination: Path) -> Path:
    """A private copy of the recorded example (its run, no store) at ``destination``."""
    shutil.copytree(recorded, destination, ignore=shutil.ignore_patterns("*.zarr", "__pycache__"))
    return destination


# ---------------------------------------------------------------------------- a 3-4-3 double-precision model
def small_model() -> nn.Module:
    """A 3 → 4 → 3 tanh classifier in float64, seeded (31 parameters)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def small_data(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` float64 inputs of 3 features (offset by ``shift``) and labels in 0..2, seeded."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=generator, dtype=torch.float64) + shift
    return X, torch.randint(0, 3, (n,), generator=generator)


def perturbed_state(model: nn.Module, scale: float, seed: int) -> dict:
    """``model``'s state_dict plus seeded Gaussian noise of standard deviation ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator, dtype=v.dtype)
            for k, v in model.state_dict().items()}
