"""The training run as SOURCE sees it: segments of SGD with their checkpoints and data."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from torch import Tensor

from .errors import ConfigurationError

__all__ = ["Segment", "Trajectory", "Checkpoint"]

Checkpoint = Union[Mapping[str, Tensor], str, "os.PathLike[str]"]


@dataclass
class Segment:
    """One stretch of training that SOURCE treats as stationary.

    Parameters
    ----------
    checkpoints : sequence of state_dicts or paths
        Checkpoints saved inside the segment (the paper uses two). A path names a file
        written by ``torch.save(model.state_dict(), path)``.
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
    """A training run cut into segments, optimised by SGD (optionally heavy-ball momentum).

    Parameters
    ----------
    segments : sequence of Segment
        In training order.
    momentum : float
        SGD's heavy-ball momentum beta (``torch.optim.SGD(momentum=...)``); the effective
        learning rate is ``lr / (1 - beta)``.
    weight_decay : float
        ``torch.optim.SGD(weight_decay=...)``; enters SOURCE as ``wd * I`` in the
        projected Hessian.
    nesterov, dampening : as in ``torch.optim.SGD``
        Not covered by SOURCE's derivation: a trajectory that used them is refused.
    """

    segments: Sequence[Segment]
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0

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
        if not (0.0 <= float(self.momentum) < 1.0):
            raise ConfigurationError(f"momentum={self.momentum!r}; it must be in [0, 1)")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigurationError(f"weight_decay={self.weight_decay!r}; it must be >= 0")
        if self.nesterov:
            raise ConfigurationError(
                "nesterov momentum is not covered by SOURCE's derivation (docs/math.md §1); "
                "only plain heavy-ball SGD momentum is supported"
            )
        if self.dampening != 0:
            raise ConfigurationError(
                f"dampening={self.dampening!r} is not covered by SOURCE's derivation; "
                "only SGD without dampening is supported"
            )

    @property
    def checkpoint_index(self) -> list[tuple[int, int]]:
        """``(segment, position in segment)`` for every checkpoint, in training order."""
        return [(s, c) for s, seg in enumerate(self.segments) for c in range(len(seg.checkpoints))]

    def segment_time(self, index: int) -> float:
        """SOURCE's time ``a = sum(lr) / (1 - momentum)`` of a segment."""
        return self.segments[index].total_lr / (1.0 - float(self.momentum))
