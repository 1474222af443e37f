"""The training run as SOURCE sees it: segments with their checkpoints and data, and the optimizer."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from .errors import ConfigurationError
from .optimizer import SGD, OptimizerSpec, describe_torch_optimizer

__all__ = ["Segment", "Trajectory", "Checkpoint"]

Checkpoint = Union[Mapping[str, Tensor], str, "os.PathLike[str]"]


@dataclass
class Segment:
    """One stretch of training that SOURCE treats as stationary.

    Parameters
    ----------
    checkpoints : sequence of checkpoints
        Checkpoints saved inside the segment (the paper uses two). A checkpoint is a
        state_dict, or a dict ``{"model": model.state_dict(), "optimizer":
        optimizer.state_dict()}`` (also ``model_state_dict``/``optimizer_state_dict``),
        or the path of either saved with ``torch.save``. An Adam run's optimizer state
        gives SOURCE its preconditioner.
    steps : int
        Optimizer steps the segment took.
    lr : float or sequence of float
        The segment's mean learning rate, or one rate per step (``len(lr) == steps``).
    data : tuple (X, y), or an indexable of (x, y) pairs or of mappings
        The examples the segment trained on (:mod:`srcproj.data`). Segments whose data
        hold the same examples in the same order (the same fingerprint) share training
        examples, whether they were given one object or equal copies.
    """

    checkpoints: Sequence[Checkpoint]
    steps: int
    lr: float | Sequence[float]
    data: Any

    def __post_init__(self) -> None:
        if isinstance(self.steps, numbers.Integral) and not isinstance(self.steps, bool):
            self.steps = int(self.steps)
        if isinstance(self.checkpoints, (str, os.PathLike, Mapping)):
            self.checkpoints = [self.checkpoints]
        self.checkpoints = list(self.checkpoints)
        # A one-shot iterator of per-step rates would be consumed by the first reading.
        if not isinstance(self.lr, (numbers.Real, str, bytes)) and hasattr(self.lr, "__iter__"):
            try:
                self.lr = tuple(self.lr)
            except TypeError:  # e.g. a 0-d array: validation names it
                pass

    @property
    def total_lr(self) -> float:
        """Sum of the learning rates over the segment's steps (mean rate times steps)."""
        if isinstance(self.lr, numbers.Real):
            return float(self.lr) * self.steps
        return float(sum(float(v) for v in self.lr))

    def _validate(self, index: int) -> None:
        where = f"segment {index}"
        if len(self.checkpoints) == 0:
            raise ConfigurationError(f"{where} has no checkpoints; give it at least one")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ConfigurationError(
                f"{where} has steps={self.steps!r}; it must be a positive number of optimizer steps"
            )
        if isinstance(self.lr, numbers.Real) and not isinstance(self.lr, bool):
            if not math.isfinite(self.lr) or self.lr <= 0:
                raise ConfigurationError(
                    f"{where} has lr={self.lr!r}; the learning rate must be a finite number > 0"
                )
        else:
            try:
                rates = [float(v) for v in self.lr]
            except TypeError:
                raise ConfigurationError(
                    f"{where} has lr of type {type(self.lr).__name__}; give a float or one rate per step"
                ) from None
            if len(rates) != self.steps:
                raise ConfigurationError(
                    f"{where} has {len(rates)} per-step learning rates for {self.steps} steps; "
                    "give one rate per step, or the mean rate as a float"
                )
            if any(not math.isfinite(r) or r < 0 for r in rates) or sum(rates) <= 0:
                raise ConfigurationError(
                    f"{where} has per-step learning rates that are negative, non-finite or all "
                    "zero; rates must be >= 0 with a positive sum"
                )


@dataclass
class Trajectory:
    """A training run cut into segments, with the optimizer that ran it.

    Parameters
    ----------
    segments : sequence of Segment
        In training order.
    optimizer : torch.optim.Optimizer or SGD or Adam, optional
        The optimizer the run used: the live ``torch.optim`` object built over the
        model (``torch.optim.SGD``, ``Adam`` or ``AdamW``; its hyperparameters and
        parameter groups are read from it, its learning rates only as ratios between
        groups), or a description (:class:`~srcproj.SGD`, :class:`~srcproj.Adam`,
        :func:`~srcproj.AdamW`). Any other optimizer is refused by name. Without it the
        run is SGD with the ``momentum``, ``weight_decay``, ``nesterov`` and
        ``dampening`` given here.
    momentum, weight_decay, nesterov, dampening : as in ``torch.optim.SGD``
        Shorthand for ``optimizer=srcproj.SGD(...)``; give them in the optimizer
        when one is given. The segment's time is ``Σ lr · (1 - dampening) / (1 -
        momentum)`` (``1 / (1 - momentum)`` with Nesterov).
    batch_size : int, optional
        The training batch size. Needed only for an Adam run whose checkpoints carry
        no optimizer state: the second moment is then estimated from per-example
        gradients as ``mean² + variance / batch_size``.
    """

    segments: Sequence[Segment]
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    optimizer: Any = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        self.segments = list(self.segments)
        if not self.segments:
            raise ConfigurationError("the trajectory has no segments; give at least one Segment")
        for index, segment in enumerate(self.segments):
            if not isinstance(segment, Segment):
                raise ConfigurationError(
                    f"segment {index} is a {type(segment).__name__}; build it with srcproj.Segment"
                )
            segment._validate(index)
        if self.optimizer is None:
            if isinstance(self.weight_decay, numbers.Real) and not math.isfinite(self.weight_decay):
                raise ConfigurationError(f"weight_decay={self.weight_decay!r}; it must be >= 0")
            self.spec: OptimizerSpec = SGD(momentum=self.momentum, dampening=self.dampening, nesterov=self.nesterov,
                                           weight_decay=self.weight_decay)
        else:
            given = {name: value for name, value, default in (
                ("momentum", self.momentum, 0.0), ("weight_decay", self.weight_decay, 0.0),
                ("nesterov", self.nesterov, False), ("dampening", self.dampening, 0.0)) if value != default}
            if given:
                raise ConfigurationError(
                    f"Trajectory got optimizer=... and also {sorted(given)}; the optimizer carries its own "
                    "hyperparameters: give them there only")
            if isinstance(self.optimizer, torch.optim.Optimizer):
                self.spec = describe_torch_optimizer(self.optimizer)[0]
            elif isinstance(self.optimizer, OptimizerSpec):
                self.spec = self.optimizer
            else:
                raise ConfigurationError(
                    f"optimizer is a {type(self.optimizer).__name__}; give the torch.optim optimizer the run used "
                    "(built over the model), or srcproj.SGD(...), srcproj.Adam(...) or srcproj.AdamW(...)")
            # The fields mirror the optimizer's settings (Adam's weight decay too; its momentum stays 0).
            self.weight_decay = self.spec.weight_decay
            if isinstance(self.spec, SGD):
                self.momentum = self.spec.momentum
                self.nesterov, self.dampening = self.spec.nesterov, self.spec.dampening
        if self.batch_size is not None:
            if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, numbers.Integral) \
                    or self.batch_size <= 0:
                raise ConfigurationError(f"batch_size={self.batch_size!r}; give the training batch size, an int > 0")
            self.batch_size = int(self.batch_size)

    @classmethod
    def from_manifest(cls, path: str | os.PathLike[str], data: Mapping[str, Any], optimizer: Any = None, *,
                      verify: bool = True, task: Any = None) -> Trajectory:
        """The trajectory a :class:`~srcproj.TrajectoryRecorder` (or the Hugging Face
        ``SrcprojCallback``) recorded: its completed segments, with their checkpoint files,
        steps and per-step learning rates, the optimizer's description and the batch size.

        ``path`` is the ``manifest.json`` or its directory; ``data`` maps every recorded
        stage name with a completed segment to its data set, checked against the recorded
        number of examples and fingerprint; ``optimizer`` replaces the recorded
        description by the live optimizer; ``verify`` checks each checkpoint file's
        SHA-256; ``task``: the task the recorder was given, for data it batches itself
        (ragged token sequences). Same as :func:`srcproj.load_trajectory`.
        """
        from .recorder import load_trajectory

        return load_trajectory(path, data, optimizer, verify=verify, task=task)

    @property
    def checkpoint_index(self) -> list[tuple[int, int]]:
        """``(segment, position in segment)`` for every checkpoint, in training order."""
        return [(s, c) for s, seg in enumerate(self.segments) for c in range(len(seg.checkpoints))]

    def segment_time(self, index: int) -> float:
        """SOURCE's time of a segment: the sum of its learning rates times the optimizer's
        gain (``1 / (1 - momentum)`` for heavy-ball SGD, 1 for Adam)."""
        return self.segments[index].total_lr * self.spec.gain()
