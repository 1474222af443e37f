"""Reading examples: the one place that turns a user's data set into batches of ``(x, y)``.

Three kinds of data set are accepted, told apart by type, never by length:

- a ``tuple`` ``(X, y)`` of two arrays (torch tensors or numpy arrays) whose first
  dimension indexes examples: columns;
- any indexable with ``len()`` (a ``list``, a torch ``Dataset``, a Hugging Face
  ``datasets.Dataset``) whose items are ``(x, y)`` pairs (tuple or list of two);
- the same, whose items are mappings (what a Hugging Face data set yields): the task
  names the input and target keys (:attr:`srcproj.Task.input_key`,
  :attr:`srcproj.Task.target_key`); left unset, the one well-known input key
  (``input_ids``, ``pixel_values``, ``x``, ``input``, ``inputs``, ``image``,
  ``features``) and target key (``labels``, ``label``, ``y``, ``target``, ``targets``)
  that the example holds are used, and anything ambiguous is refused.

Either way the data is read as contiguous row ranges, which is what the store's chunks
need, and hashed example by example (:meth:`ExampleSource.fingerprint`): two data sets
with the same fingerprint hold the same examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from .errors import ConfigurationError, DataError

__all__ = ["ExampleSource", "INPUT_KEYS", "TARGET_KEYS", "group_by_fingerprint"]

#: Keys read as an example's input when the task names none (the first one present).
INPUT_KEYS = ("input_ids", "pixel_values", "x", "input", "inputs", "image", "features")
#: Keys read as an example's target when the task names none.
TARGET_KEYS = ("labels", "label", "y", "target", "targets")


def _is_array(value: Any) -> bool:
    return isinstance(value, (Tensor, np.ndarray))


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise DataError(f"{what} must be a torch tensor or a numpy array, got {type(value).__name__}")


def _item_value(value: Any, what: str) -> Any:
    """A value of a mapping example as a tensor (Hugging Face yields lists and numbers unformatted)."""
    if isinstance(value, (Tensor, np.ndarray)):
        return value
    if isinstance(value, (int, float, bool, list, tuple)):
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{what} cannot be made a tensor ({exc}); format the data set as torch tensors, "
                            "e.g. dataset.with_format('torch')") from None
    raise DataError(f"{what} is a {type(value).__name__}, not a tensor, array or number; format the data set as "
                    "torch tensors, e.g. dataset.with_format('torch'), or transform it to tensors")


def _pick_key(example: Mapping, declared: str | None, known: tuple[str, ...], role: str, attribute: str,
              what: str) -> str:
    keys = list(example.keys())
    if declared is not None:
        if declared not in example:
            raise DataError(f"{what}: the task's {attribute}={declared!r} is not a key of the examples "
                            f"(they have {keys}); set {attribute} to one of them")
        return declared
    present = [k for k in known if k in example]
    if len(present) != 1:
        found = "none" if not present else f"several ({present})"
        raise DataError(f"{what}: the examples are mappings with keys {keys}, and {found} of the usual {role} keys "
                        f"{list(known)}; name the {role} key on the task (class attribute {attribute} = '...')")
    return present[0]


class ExampleSource:
    """Row-range access to the examples of one data set.

    Parameters
    ----------
    data : tuple (X, y), or an indexable of (x, y) pairs or of mappings
        The examples (see the module docstring).
    what : str
        How error messages name this data set ("segment 1's data", "the query set").
    task : Task, optional
        Names the input and target keys of mapping examples (``input_key``,
        ``target_key``); unset keys fall back to the well-known names.
    """

    def __init__(self, data: Any, what: str, task: Any = None) -> None:
        self.what = what
        self.data = data
        collate = getattr(task, "collate", None)
        #: The task's own way of batching examples (``Task.collate``: padding ragged
        #: sequences), else the pairing and stacking below.
        self._collate = collate if callable(collate) else None
        self._input_key: str | None = getattr(task, "input_key", None)
        self._target_key: str | None = getattr(task, "target_key", None)
        for attribute in ("input_key", "target_key"):
            value = getattr(task, attribute, None)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{type(task).__name__}.{attribute}={value!r}; it must be a key (a str) "
                                         "or None")
        self._tensors: tuple[Tensor, Tensor] | None = None
        self._dataset: Any = None
        self._fingerprint: str | None = None
        if isinstance(data, tuple) and len(data) == 2 and all(_is_array(v) for v in data):
            inputs, targets = (_as_tensor(v, f"{what}: {n}") for v, n in zip(data, "Xy", strict=True))
            if inputs.ndim == 0 or targets.ndim == 0:
                raise DataError(f"{what}: X and y need a first dimension that indexes examples")
            if inputs.shape[0] != targets.shape[0]:
                raise DataError(
                    f"{what} has {inputs.shape[0]} inputs but {targets.shape[0]} targets; "
                    "X and y must have the same number of rows"
                )
            self._tensors = (inputs, targets)
            self._length = int(inputs.shape[0])
        elif isinstance(data, tuple) and len(data) == 2 and any(_is_array(v) for v in data):
            other = next(type(v).__name__ for v in data if not _is_array(v))
            raise DataError(f"{what} is a tuple (X, y) with a {other} in it; X and y must both be torch tensors "
                            "or numpy arrays (or pass a list of (x, y) pairs)")
        elif isinstance(data, (str, bytes, Mapping)) or _is_array(data):
            raise DataError(
                f"{what} is a {type(data).__name__}; pass a tuple (X, y) of arrays, or an indexable (list, torch "
                "Dataset, Hugging Face Dataset) of (x, y) pairs or of mappings"
            )
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self._dataset = data
            self._length = len(data)
        else:
            raise DataError(
                f"{what} must be a tuple (X, y) of arrays, or an indexable (list, torch Dataset, Hugging Face "
                f"Dataset) of (x, y) pairs or of mappings; got {type(data).__name__}"
            )
        if self._length == 0:
            raise DataError(f"{what} is empty: it needs at least one example")

    def __len__(self) -> int:
        return self._length

    def _pair(self, item: Any, index: int) -> tuple[Any, Any]:
        if isinstance(item, Mapping):
            where = f"{self.what}, example {index}"
            x_key = _pick_key(item, self._input_key, INPUT_KEYS, "input", "input_key", self.what)
            y_key = _pick_key(item, self._target_key, TARGET_KEYS, "target", "target_key", self.what)
            return (_item_value(item[x_key], f"{where}, key {x_key!r}"),
                    _item_value(item[y_key], f"{where}, key {y_key!r}"))
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return item[0], item[1]
        shown = f"a {type(item).__name__}"
        if isinstance(item, (tuple, list)):
            shown += f" of {len(item)} item" + ("s" if len(item) != 1 else "")
        raise DataError(
            f"{self.what}: example {index} is {shown}, not an (x, y) pair or a mapping; make the data set yield "
            "(input, target) pairs or dicts, or pass whole arrays as a tuple (X, y)"
        )

    def first_item(self) -> Any:
        """The data set's first example as it yields it; ``None`` for whole arrays ``(X, y)``."""
        return None if self._dataset is None else self._dataset[0]

    def field_keys(self, example: Mapping) -> set[str]:
        """The keys of a mapping example that hold its input and its target, as far as
        they can be told (a task's own ``collate`` may read other keys)."""
        found = set()
        for declared, known, role, attribute in ((self._input_key, INPUT_KEYS, "input", "input_key"),
                                                 (self._target_key, TARGET_KEYS, "target", "target_key")):
            try:
                found.add(_pick_key(example, declared, known, role, attribute, self.what))
            except DataError:
                pass
        return found

    def rows(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Examples ``start .. stop-1`` stacked as ``(inputs, targets)``."""
        if self._tensors is not None:
            inputs, targets = self._tensors
            return inputs[start:stop], targets[start:stop]
        return self._stack(range(start, stop), f"examples {start}..{stop - 1}")

    def take(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        """The examples at ``indices`` (increasing), stacked as ``(inputs, targets)``."""
        if self._tensors is not None:
            index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
            return self._tensors[0][index], self._tensors[1][index]
        shown = ", ".join(str(int(i)) for i in indices[:5]) + (", ..." if len(indices) > 5 else "")
        return self._stack([int(i) for i in indices], f"examples {shown}")

    def _stack(self, indices, shown: str) -> tuple[Tensor, Tensor]:
        """The data set's examples at ``indices`` collated into ``(inputs, targets)``."""
        if self._collate is not None:
            batch = self._collate([self._dataset[i] for i in indices], f"{self.what}, {shown}")
            if not (isinstance(batch, tuple) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
                raise ConfigurationError(f"the task's collate() returned a {type(batch).__name__}; it must return "
                                         "a pair (inputs, targets) of tensors")
            return batch
        items = [self._pair(self._dataset[i], i) for i in indices]
        try:
            inputs, targets = default_collate(items)
        except (RuntimeError, TypeError) as exc:
            raise DataError(
                f"{self.what}: {shown} cannot be stacked into a batch ({exc}); "
                "every example must have the same input shape and target type (token sequences of different "
                "lengths: use srcproj.LanguageModelTask or SequenceClassificationTask, which pad them, or a task "
                "with its own collate(); a recorded run's loader takes that task too: task=...)"
            ) from None
        return _as_tensor(inputs, f"{self.what}: x"), _as_tensor(targets, f"{self.what}: y")

    def target_blocks(self, block: int = 4096) -> Iterator[tuple[Tensor, str]]:
        """Every target, for validation: ``(targets, what)`` per block of examples (a
        task may pad each block to its own length, so blocks are not concatenated)."""
        if self._tensors is not None or len(self) <= block:
            yield self.rows(0, len(self))[1], self.what
            return
        for start in range(0, len(self), block):
            stop = min(start + block, len(self))
            yield self.rows(start, stop)[1], f"{self.what} (examples {start}..{stop - 1})"

    def fingerprint(self, block: int = 4096) -> str:
        """A hash of every example as it is read, computed once.

        One changed example must be noticed (a store silently reusing features of other
        data would give wrong scores), and data sets holding the same examples hash
        alike whatever their type (a tuple of arrays, a list of pairs, a Dataset). It
        costs one pass over the data, without gradients.
        """
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=12)
            digest.update(str(len(self)).encode())
            for start in range(0, len(self), block):
                for t in self.rows(start, min(start + block, len(self))):
                    t = t.detach().cpu().contiguous()
                    digest.update(str((tuple(t.shape[1:]), str(t.dtype))).encode())
                    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def group_by_fingerprint(sources: list[ExampleSource]) -> tuple[list[int], list[ExampleSource]]:
    """Which data sets hold the same examples.

    Returns, for each source, the index of the first source with the same fingerprint
    (its data group), and the sources with each one replaced by its group's first, so
    that a data set is read from one object. Sources wrapping the same object are
    hashed once.
    """
    by_object: dict[int, str] = {}
    first_of: dict[str, int] = {}
    groups: list[int] = []
    for index, source in enumerate(sources):
        key = id(source.data)
        if key not in by_object:
            by_object[key] = source.fingerprint()
        groups.append(first_of.setdefault(by_object[key], index))
    return groups, [sources[g] for g in groups]
