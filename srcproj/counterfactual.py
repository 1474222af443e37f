"""Which retraining a score predicts: the same number of steps, or of epochs (docs/math.md §8).

SOURCE's derivation keeps the K_ℓ steps of every segment: a score answers "retrain
without the example, with the *same number of optimizer steps*". A retraining on a
fraction α of the attributed data set for the *same number of epochs* takes α·K_ℓ steps
in the segments that trained on that data set, so their time is α·a_ℓ; the other
segments keep theirs. :class:`Counterfactual` names one of the two questions; the
:class:`~srcproj.Attributor` computes and stores the caches of the one it is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

__all__ = ["PROTOCOLS", "Counterfactual", "resolve_counterfactual"]

#: The retraining protocols a score can answer.
PROTOCOLS = ("same_steps", "same_epochs")


@dataclass(frozen=True)
class Counterfactual:
    """The retraining that scores predict.

    Parameters
    ----------
    protocol : {"same_steps", "same_epochs"}
        "same_steps" (the default): the retraining keeps every segment's steps.
        "same_epochs": it keeps the epochs, so the segments that trained on the
        attributed data set take ``fraction`` times their steps.
    fraction : float
        α in (0, 1], the fraction of the attributed data set a retraining keeps
        (removing 20% of it is α = 0.8). Must be 1 for "same_steps".
    data_segment : int
        A segment of the attributed data set (default 0): the segments whose data
        group equals its own are re-timed, and only they can be scored.

    Use :meth:`same_steps` and :meth:`same_epochs` to build one.
    """

    protocol: str = "same_steps"
    fraction: float = 1.0
    data_segment: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.protocol, str) or self.protocol not in PROTOCOLS:
            raise ConfigurationError(f"protocol={self.protocol!r}; choose 'same_steps' or 'same_epochs'")
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
                or not 0 < fraction <= 1:
            raise ConfigurationError(
                f"fraction={fraction!r}; it is α, the fraction of the attributed data set a retraining keeps, "
                "a number in (0, 1] (removing 20% of the data is fraction=0.8)")
        if self.protocol == "same_steps" and fraction != 1:
            raise ConfigurationError(
                f"fraction={fraction!r} with protocol 'same_steps': a same-steps retraining keeps every "
                "segment's steps whatever it removes; use Counterfactual.same_epochs(fraction) for a retraining "
                "that keeps the epochs")
        segment = self.data_segment
        if isinstance(segment, bool) or not isinstance(segment, int) or segment < 0:
            raise ConfigurationError(f"data_segment={segment!r}; give the index (an int >= 0) of a segment "
                                     "that trained on the attributed data set")
        object.__setattr__(self, "fraction", float(fraction))

    @classmethod
    def same_steps(cls) -> Counterfactual:
        """Retraining with the same number of optimizer steps (SOURCE's default)."""
        return cls()

    @classmethod
    def same_epochs(cls, fraction: float, data_segment: int = 0) -> Counterfactual:
        """Retraining on a fraction α of the attributed data set for the same number of epochs."""
        return cls("same_epochs", fraction, data_segment)

    @property
    def is_default(self) -> bool:
        """Whether this is the same-steps question (whose caches are the store's own)."""
        return self.protocol == "same_steps"

    @property
    def key(self) -> str:
        """The name its caches are stored under: "same_steps", or e.g. "same_epochs_0.5"."""
        if self.is_default:
            return "same_steps"
        key = f"same_epochs_{self.fraction!r}"
        return key if self.data_segment == 0 else f"{key}_seg{self.data_segment}"

    def describe(self) -> str:
        """One line for reports and tables."""
        if self.is_default:
            return "same steps: the retraining keeps every segment's steps"
        data = "" if self.data_segment == 0 else f" (the data set of segment {self.data_segment})"
        return (f"same epochs at fraction {self.fraction:g}: the retraining keeps {self.fraction:g} of the "
                f"attributed data set{data}, whose segments take {self.fraction:g}·K steps")

    def record(self) -> dict:
        """JSON-able fields (recorded with the caches)."""
        return {"protocol": self.protocol, "fraction": self.fraction, "data_segment": self.data_segment}

    def attributed_segments(self, data_groups: Sequence[int]) -> list[int]:
        """The segments that trained on the attributed data set (those sharing ``data_segment``'s data)."""
        if self.data_segment >= len(data_groups):
            raise ConfigurationError(f"data_segment={self.data_segment} does not exist; the trajectory has "
                                     f"segments 0..{len(data_groups) - 1}")
        group = data_groups[self.data_segment]
        return [s for s, g in enumerate(data_groups) if g == group]

    def times(self, times: Sequence[float], data_groups: Sequence[int]) -> list[float]:
        """Segment times under this retraining: α·a on the attributed data set's segments."""
        retimed = set(self.attributed_segments(data_groups)) if not self.is_default else set()
        return [float(t) * self.fraction if s in retimed else float(t) for s, t in enumerate(times)]


def resolve_counterfactual(value: Any) -> Counterfactual:
    """A :class:`Counterfactual` from the ``counterfactual`` argument (one, or "same_steps")."""
    if isinstance(value, Counterfactual):
        return value
    if value is None or value == "same_steps":
        return Counterfactual.same_steps()
    if value == "same_epochs":
        raise ConfigurationError(
            "counterfactual='same_epochs' needs the fraction of the data a retraining keeps: pass "
            "counterfactual=Counterfactual.same_epochs(fraction), e.g. Counterfactual.same_epochs(0.5) for half "
            "subsets")
    raise ConfigurationError(f"counterfactual={value!r}; pass 'same_steps' or a srcproj.Counterfactual, e.g. "
                             "Counterfactual.same_epochs(0.8) for retrainings that drop 20% of the data")
