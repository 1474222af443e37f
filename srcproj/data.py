"""Uniform, validated access to the data sets a user hands over.

A data set is a torch ``Dataset`` whose items are ``(x, y)`` pairs, or a tuple of
tensors / arrays ``(X, y)``. Both are read as contiguous row ranges, which is what the
store's chunks need.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from .errors import DataError

__all__ = ["ExampleSource"]


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DataError(f"{what} must be a torch tensor or a numpy array, got {type(value).__name__}")


class ExampleSource:
    """Row-range access to ``(x, y)`` examples.

    Parameters
    ----------
    data : Dataset or tuple of (X, y)
        The examples.
    what : str
        How error messages name this data set ("segment 1's data", "the query set").
    """

    def __init__(self, data: Dataset | tuple, what: str) -> None:
        self.what = what
        self._tensors: tuple[Tensor, Tensor] | None = None
        self._dataset: Dataset | None = None
        if isinstance(data, (tuple, list)):
            if len(data) != 2:
                raise DataError(
                    f"{what} is a tuple of {len(data)} items; pass (X, y): inputs and targets"
                )
            inputs = _as_tensor(data[0], f"{what}: X")
            targets = _as_tensor(data[1], f"{what}: y")
            if inputs.ndim == 0 or targets.ndim == 0:
                raise DataError(f"{what}: X and y need a first dimension that indexes examples")
            if inputs.shape[0] != targets.shape[0]:
                raise DataError(
                    f"{what} has {inputs.shape[0]} inputs but {targets.shape[0]} targets; "
                    "X and y must have the same number of rows"
                )
            self._tensors = (inputs, targets)
            self._length = int(inputs.shape[0])
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self._dataset = data
            self._length = len(data)
        else:
            raise DataError(
                f"{what} must be a torch Dataset of (x, y) pairs or a tuple (X, y), "
                f"got {type(data).__name__}"
            )
        if self._length == 0:
            raise DataError(f"{what} is empty: it needs at least one example")

    def __len__(self) -> int:
        return self._length

    def rows(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Examples ``start .. stop-1`` stacked as ``(inputs, targets)``."""
        if self._tensors is not None:
            inputs, targets = self._tensors
            return inputs[start:stop], targets[start:stop]
        items = [self._dataset[i] for i in range(start, stop)]
        first = items[0]
        if not isinstance(first, (tuple, list)) or len(first) != 2:
            raise DataError(
                f"{self.what}: item {start} is a {type(first).__name__}, not an (x, y) pair; "
                "wrap the data set so that it yields (input, target)"
            )
        try:
            inputs, targets = default_collate(items)
        except (RuntimeError, TypeError) as exc:
            raise DataError(
                f"{self.what}: examples {start}..{stop - 1} cannot be stacked into a batch ({exc}); "
                "every example must have the same input shape and target type"
            ) from None
        return _as_tensor(inputs, f"{self.what}: x"), _as_tensor(targets, f"{self.what}: y")

    def all_targets(self) -> Tensor:
        """Every target, for validation."""
        if self._tensors is not None:
            return self._tensors[1]
        parts = [self.rows(s, min(s + 4096, len(self)))[1] for s in range(0, len(self), 4096)]
        return torch.cat(parts)

    def fingerprint(self, block: int = 4096) -> str:
        """A hash of every example, read in fixed blocks.

        One changed example must be noticed (a store silently reusing features of other
        data would give wrong scores), and a Dataset and a tuple holding the same
        examples hash alike. It costs one pass over the data, without gradients.
        """
        digest = hashlib.blake2b(digest_size=12)
        digest.update(str(len(self)).encode())
        for start in range(0, len(self), block):
            for t in self.rows(start, min(start + block, len(self))):
                t = t.detach().cpu().contiguous()
                digest.update(str((tuple(t.shape[1:]), str(t.dtype))).encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()
