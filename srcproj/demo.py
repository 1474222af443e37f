"""A small end-to-end demonstration on scikit-learn's bundled digits data set.

The helpers here are what the ``srcproj demo`` command, the examples and the tests
share: a deterministic data split, a small MLP, a plain SGD loop that saves
checkpoints, and :func:`run_demo`, which runs the whole pipeline and reports timings.

Everything is deterministic given its seeds and nothing touches process-wide state
(the global RNG, torch's thread count), because tests import these functions and must
not leak state from one test into the next. Nothing is downloaded: ``load_digits``
ships with scikit-learn.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attributor import Attributor
from .errors import ConfigurationError, StoreError
from .store import AttributionStore
from .tasks import ClassificationTask
from .trajectory import Segment, Trajectory

__all__ = ["load_digits_split", "make_mlp", "train_sgd", "run_demo", "remove_store", "format_bytes", "DEMO_SETTINGS"]

# The demo's training run. Short on purpose: SOURCE is meant for runs that have not
# converged (where an influence function's stationarity assumption fails), and a short
# run keeps the demo well under half a minute on two cores.
DEMO_SETTINGS = {
    "hidden": 64,
    "steps_per_segment": 120,
    "checkpoints_per_segment": 2,
    "segments": 2,
    "lr": 0.02,
    "batch_size": 64,
    "momentum": 0.9,
    "weight_decay": 1e-3,
}


def load_digits_split(
    seed: int = 0, test_size: float | int = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8×8 digits, split into stratified train and test sets.

    Parameters
    ----------
    seed : int
        Decides the split.
    test_size : float or int
        Fraction (or number) of the 1,797 examples held out for testing.

    Returns
    -------
    X_train, y_train, X_test, y_test : torch.Tensor
        Inputs as float32 of shape ``(n, 64)`` scaled to [0, 1]; labels as int64.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # scikit-learn is an optional dependency
        raise ConfigurationError(
            "the digits demo needs scikit-learn: pip install 'srcproj[demo]'"
        ) from exc
    digits = load_digits()
    # Pixel intensities are 0..16; [0, 1] keeps the first layer's gradients well scaled.
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_size, random_state=seed, stratify=y
    )
    return (torch.from_numpy(X_train), torch.from_numpy(y_train),
            torch.from_numpy(X_test), torch.from_numpy(y_test))


def make_mlp(hidden: int = 64, seed: int = 0) -> nn.Module:
    """A 64 → ``hidden`` → 10 ReLU MLP with seeded initial weights.

    Parameters
    ----------
    hidden : int
        Width of the hidden layer.
    seed : int
        Decides the initial weights.
    """
    # fork_rng: seed the initialisation without moving the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_sgd(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    seed: int = 0,
    checkpoint_at: Sequence[int] = (),
) -> list[dict]:
    """Train ``model`` in place with ``torch.optim.SGD`` on the mean cross-entropy.

    Each step draws ``batch_size`` distinct examples uniformly at random (a fresh draw
    per step, from a seeded ``torch.Generator``), which is the sampling SOURCE's
    derivation assumes: every step picks example m with probability B/N.

    Parameters
    ----------
    model : nn.Module
        Trained in place.
    X, y : torch.Tensor
        Inputs and integer labels.
    steps : int
        Optimizer steps.
    lr, momentum, weight_decay : float
        Passed to ``torch.optim.SGD``; describe the run to srcproj with the same values
        (``Segment(lr=...)``, ``Trajectory(momentum=..., weight_decay=...)``).
    batch_size : int
        Examples per step (capped at ``len(X)``).
    seed : int
        Decides the batches.
    checkpoint_at : sequence of int
        Step counts (1..steps) after which a copy of ``model.state_dict()`` is saved.

    Returns
    -------
    list of dict
        Deep copies of the state_dict, one per distinct entry of ``checkpoint_at``, in
        step order.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigurationError(f"steps={steps!r}; it must be a positive integer")
    marks = {int(s) for s in checkpoint_at}
    if marks and not (1 <= min(marks) and max(marks) <= steps):
        raise ConfigurationError(f"checkpoint_at={list(checkpoint_at)!r}; every entry must be in 1..{steps}")
    n = int(X.shape[0])
    batch = min(int(batch_size), n)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    saved: list[dict] = []
    was_training = model.training
    model.train()
    try:
        for step in range(1, steps + 1):
            index = torch.randperm(n, generator=generator)[:batch]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[index]), y[index]).backward()
            optimizer.step()
            if step in marks:
                saved.append(copy.deepcopy(model.state_dict()))
    finally:
        model.train(was_training)
    return saved


def remove_store(path: str | os.PathLike) -> bool:
    """Delete a srcproj store directory; return whether there was one.

    Only a directory that :meth:`AttributionStore.read` accepts is deleted, so a
    mistyped ``--store ~`` cannot remove anything else.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return False
    if not os.path.isdir(path):
        raise StoreError(f"{path!r} is a file, not a srcproj store; refusing to delete it")
    try:
        AttributionStore.read(path)
    except StoreError:
        raise StoreError(f"{path!r} is not a srcproj store; refusing to delete it") from None
    shutil.rmtree(path)
    return True


def _accuracy_and_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(X)
    finally:
        model.train(was_training)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def format_bytes(count: int) -> str:
    """``count`` bytes in binary units, e.g. ``"8.0 MiB"``."""
    value, unit = float(count), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def run_demo(
    store: str | os.PathLike,
    proj_dim: int = 256,
    progress: bool = True,
    out: Callable[[str], object] = print,
    *,
    seed: int = 0,
    num_queries: int = 3,
    top: int = 5,
) -> dict:
    """Train an MLP on digits, attribute test predictions with SOURCE, report timings.

    The run (``DEMO_SETTINGS``) has 2 segments of 120 SGD steps with 2 checkpoints
    each; it is short on purpose, so the model has not converged. Rerunning with the
    same store resumes it and then computes nothing: training is deterministic, so the
    checkpoints match the store's bit for bit, provided torch's build and thread count
    are the same (another thread count rounds differently and the store refuses it).

    Parameters
    ----------
    store : str or path
        Directory of the attribution store.
    proj_dim : int
        k, the projected dimension.
    progress : bool
        Show featurize's progress bar.
    out : callable
        Receives each printed line (``print`` by default).
    seed : int
        Decides the split, the initial weights, the batches and the projection.
    num_queries : int
        Test examples whose top training examples are printed.
    top : int
        How many helpful and harmful examples are printed per query.

    Returns
    -------
    dict
        ``train_seconds``, ``test_accuracy``, ``train_loss``, ``num_train``,
        ``num_test``, ``num_params``, ``num_checkpoints``, ``proj_dim``, ``hessian``,
        ``resumed``, ``featurize_seconds``, ``featurize_ms_per_example_checkpoint``
        (over the examples × checkpoints featurized by this call; None when the store
        was already complete), ``score_seconds``, ``scores_per_second``,
        ``store_bytes``, ``store_bytes_per_example_checkpoint`` (the whole store,
        Hessians and caches included), ``top_helpful_same_label`` (over all test
        queries, the fraction of the ``top`` most helpful examples that share the
        query's label), ``queries`` (per
        shown query: ``index``, ``label``, ``helpful`` and ``harmful`` lists of
        ``(train index, label, score)``), ``threads`` and ``total_seconds``.
    """
    began = time.perf_counter()
    s = DEMO_SETTINGS
    X_train, y_train, X_test, y_test = load_digits_split(seed)
    model = make_mlp(s["hidden"], seed)
    steps_per_segment, per_segment, segments = s["steps_per_segment"], s["checkpoints_per_segment"], s["segments"]
    # Checkpoints evenly spaced inside each segment, the last at its end: the final
    # checkpoint must be the trained model, where queries are measured.
    marks = [seg * steps_per_segment + (c + 1) * steps_per_segment // per_segment
             for seg in range(segments) for c in range(per_segment)]
    total_steps = segments * steps_per_segment

    t0 = time.perf_counter()
    states = train_sgd(model, X_train, y_train, total_steps, s["lr"], s["batch_size"], s["momentum"],
                       s["weight_decay"], seed=seed, checkpoint_at=marks)
    train_seconds = time.perf_counter() - t0
    accuracy, _ = _accuracy_and_loss(model, X_test, y_test)
    _, train_loss = _accuracy_and_loss(model, X_train, y_train)
    num_params = sum(p.numel() for p in model.parameters())
    out(f"srcproj demo: MLP 64-{s['hidden']}-10 ({num_params:,} parameters) on {len(X_train):,} training "
        f"digits, {total_steps} SGD steps (lr {s['lr']}, momentum {s['momentum']}, weight decay "
        f"{s['weight_decay']}) in {train_seconds:.1f} s")
    out(f"  deliberately not converged: train loss {train_loss:.3f}, test accuracy {accuracy:.1%}")

    # Both segments trained on the same examples, so their terms add up per example.
    data = (X_train, y_train)
    trajectory = Trajectory(
        [Segment(states[seg * per_segment:(seg + 1) * per_segment], steps_per_segment, s["lr"], data)
         for seg in range(segments)],
        momentum=s["momentum"], weight_decay=s["weight_decay"],
    )
    attr = Attributor(model, ClassificationTask(), trajectory, store, proj_dim=proj_dim, seed=seed)
    out(f"  trajectory: {segments} segments x {per_segment} checkpoints (after steps "
        f"{', '.join(map(str, marks))}); k = {attr.proj_dim}, {attr.hessian} Gauss-Newton Hessian; "
        f"store {os.fspath(store)}")

    report = attr.featurize(progress=progress)
    computed = report.feature_chunks_computed + report.hessians_computed + report.cache_chunks_computed
    resumed = computed == 0
    if resumed:
        out("  featurize: the store was already complete (resumed); nothing recomputed")
    elif report.feature_chunks_skipped or report.hessians_skipped or report.cache_chunks_skipped:
        out(f"  featurize: resumed a partial store ({report.feature_chunks_skipped} feature chunks, "
            f"{report.hessians_skipped} Hessians and {report.cache_chunks_skipped} cache chunks were "
            "already done)")

    t0 = time.perf_counter()
    scores = attr.score((X_test, y_test))
    score_seconds = time.perf_counter() - t0
    num_scores = scores.shape[0] * scores.shape[1]

    # How often the most helpful examples share the query's label, over every test
    # query: a sanity figure (chance is about 10%), not a measure of attribution quality.
    best = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    same_label = float((y_train.numpy()[best] == y_test.numpy()[:, None]).mean())

    out("")
    out("score = predicted change of a test digit's margin (its label's logit minus the logsumexp of "
        "the others) caused by including the training digit: positive helps, negative hurts")
    shown = []
    for q in range(min(num_queries, len(X_test))):
        row = scores[q]
        helpful = np.argsort(-row, kind="stable")[:top]
        harmful = np.argsort(row, kind="stable")[:top]
        label = int(y_test[q])
        entry = {
            "index": q,
            "label": label,
            "helpful": [(int(i), int(y_train[i]), float(row[i])) for i in helpful],
            "harmful": [(int(i), int(y_train[i]), float(row[i])) for i in harmful],
        }
        shown.append(entry)
        out("")
        out(f"query: test example {q}, label {label}")
        out(f"  {'most helpful':<31}most harmful")
        out(f"  {'train':>6} {'label':>5} {'score':>11}       {'train':>6} {'label':>5} {'score':>11}")
        for (hi, hl, hs), (ai, al, as_) in zip(entry["helpful"], entry["harmful"], strict=False):
            out(f"  {hi:>6} {hl:>5} {hs:>+11.3e}       {ai:>6} {al:>5} {as_:>+11.3e}")

    store_bytes = attr.store.nbytes_stored()
    units = len(X_train) * len(attr.checkpoints)
    ms_per_unit = 1000.0 * report.seconds / report.examples_featurized if report.examples_featurized else None
    figures = {
        "train_seconds": train_seconds,
        "test_accuracy": accuracy,
        "train_loss": train_loss,
        "num_train": len(X_train),
        "num_test": len(X_test),
        "num_params": num_params,
        "num_checkpoints": len(attr.checkpoints),
        "proj_dim": attr.proj_dim,
        "hessian": attr.hessian,
        "resumed": resumed,
        "featurize_seconds": report.seconds,
        "featurize_ms_per_example_checkpoint": ms_per_unit,
        "score_seconds": score_seconds,
        "scores_per_second": num_scores / score_seconds if score_seconds > 0 else float("inf"),
        "store_bytes": store_bytes,
        "store_bytes_per_example_checkpoint": store_bytes / units,
        "top_helpful_same_label": same_label,
        "queries": shown,
        "threads": torch.get_num_threads(),
    }

    out("")
    out(f"summary ({figures['threads']} torch threads)")
    out(f"  top-{top} helpful training digits sharing the test digit's label: {same_label:.0%} over "
        f"{len(X_test)} test digits (chance: about 10%)")
    if ms_per_unit is None:
        out(f"  featurize           {report.seconds:8.2f} s   (resumed: nothing to compute)")
    else:
        out(f"  featurize           {report.seconds:8.2f} s   ({ms_per_unit:.3f} ms per example x checkpoint, "
            f"{report.examples_featurized:,} of them)")
    out(f"  score               {score_seconds:8.3f} s   ({figures['scores_per_second']:,.0f} scores per second, "
        f"{scores.shape[0]} queries x {scores.shape[1]:,} examples, query gradients included)")
    out(f"  store on disk       {format_bytes(store_bytes):>10}   "
        f"({figures['store_bytes_per_example_checkpoint']:,.0f} bytes per example x checkpoint, "
        "Hessians and caches included)")
    figures["total_seconds"] = time.perf_counter() - began
    out(f"  total               {figures['total_seconds']:8.2f} s")
    return figures
