"""Checks of the values a user hands to srcproj's public functions.

Each check returns the value in its plain Python form or raises
:class:`~srcproj.errors.ConfigurationError` with a message that names the argument, the
value given and what would be accepted. Every public entry point validates its
arguments with these, so that the same mistake reads the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import ConfigurationError

__all__ = [
    "check_bool",
    "check_choice",
    "check_device",
    "check_finite",
    "check_int",
    "check_positive_int",
    "check_probability",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
              hint: str = "") -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]`` (each bound optional)."""
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            wanted = f"an integer in {minimum}..{maximum}"
        elif minimum == 1:
            wanted = "a positive integer"
        elif minimum is not None:
            wanted = f"an integer >= {minimum}"
        elif maximum is not None:
            wanted = f"an integer <= {maximum}"
        else:
            wanted = "an integer"
        raise ConfigurationError(f"{name}={value!r}; it must be {wanted}{hint}")
    return int(value)


def check_positive_int(value: Any, name: str, hint: str = "") -> int:
    """``value`` as an ``int`` >= 1."""
    return check_int(value, name, minimum=1, hint=hint)


def check_finite(value: Any, name: str, *, minimum: float | None = None, strict: bool = False,
                 hint: str = "") -> float:
    """``value`` as a finite ``float``, at least ``minimum`` (above it with ``strict``)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    ok = number and math.isfinite(float(value))
    if ok and minimum is not None:
        ok = float(value) > minimum if strict else float(value) >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ConfigurationError(f"{name}={value!r}; it must be a finite number{bound}{hint}")
    return float(value)


def check_probability(value: Any, name: str, *, allow_one: bool = True, hint: str = "") -> float:
    """``value`` as a ``float`` in ``[0, 1]`` (``[0, 1)`` without ``allow_one``)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    ok = number and math.isfinite(float(value)) and 0.0 <= float(value) and (
        float(value) <= 1.0 if allow_one else float(value) < 1.0)
    if not ok:
        raise ConfigurationError(f"{name}={value!r}; it must be in [0, 1{']' if allow_one else ')'}{hint}")
    return float(value)


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise ConfigurationError(f"{name}={value!r}; choose one of {tuple(choices)}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigurationError(f"{name}={value!r}; it must be True or False")
    return bool(value)


def check_device(value: Any, name: str = "device") -> torch.device:
    """``value`` as a ``torch.device`` that exists on this machine."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"{name}={value!r} is not a torch device ({exc}); pass e.g. 'cpu' or 'cuda:0'") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(f"{name}={value!r} but CUDA is not available to this torch "
                                     f"({torch.__version__}); pass {name}='cpu' or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigurationError(f"{name}={value!r} but this machine has {torch.cuda.device_count()} CUDA "
                                     "device(s); pick an existing index")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"{name}={value!r} but MPS is not available; pass {name}='cpu'")
    return device
