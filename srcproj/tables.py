"""Per-example results as tables a person or the next pipeline step can read.

Every row names its example the way the data set does: its ``index`` (row ``i`` of the
data set, as in every score), its ``label`` (when each target is one number) and any
id columns the examples carry (scalar fields of mapping examples beside the input and
target, e.g. a Hugging Face data set's ``"id"``). Tables are written as Parquet
(pyarrow, the ``tables`` extra) or CSV, chosen by the file's suffix, so that pandas,
polars or a spreadsheet read them without srcproj.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .data import ExampleSource
from .errors import ConfigurationError, DataError

__all__ = [
    "TABLE_FORMATS",
    "check_table_target",
    "curation_table",
    "example_columns",
    "mislabel_table",
    "readable_by_others",
    "self_influence_table",
    "top_k_table",
    "write_table",
]

#: Table formats by file suffix.
TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# Columns every example table has; an id field of the same name is renamed.
_RESERVED = ("index", "label")


def _scalar(value: Any) -> Any:
    """``value`` as a plain Python scalar, or ``None`` when it is not one number or string."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        return value.item()
    return None


def _labels(source: ExampleSource) -> np.ndarray | None:
    """One label per example when every target is a single number, else ``None``."""
    blocks = []
    for targets, _ in source.target_blocks():
        if targets.ndim != 1:
            return None
        blocks.append(targets.detach().cpu().numpy())
    return np.concatenate(blocks)


def _id_keys(example: Mapping, source: ExampleSource, ids: Sequence[str] | None, what: str) -> list[str]:
    if ids is not None:
        missing = [key for key in ids if key not in example]
        if missing:
            raise DataError(f"{what}: the id column(s) {missing} are not keys of its examples (they have "
                            f"{list(example)}); name existing keys, or none")
        return list(ids)
    used = source.field_keys(example)
    return [key for key, value in example.items() if key not in used and _scalar(value) is not None]


def _id_values(data: Any, key: str, length: int, what: str) -> np.ndarray:
    names = getattr(data, "column_names", None)
    if isinstance(names, (list, tuple)) and key in names:  # a Hugging Face data set: read the column whole
        values = list(data[key])
    else:
        values = []
        for index in range(length):
            item = data[index]
            if not isinstance(item, Mapping) or key not in item:
                raise DataError(f"{what}: example {index} has no key {key!r}, which the first example has; give "
                                "every example the same keys")
            values.append(item[key])
    plain = [_scalar(v) for v in values]
    if any(v is None for v in plain):
        raise DataError(f"{what}: the id column {key!r} holds a value that is not one number or string")
    if all(isinstance(v, str) for v in plain):
        return np.array(plain, dtype=object)
    if any(isinstance(v, str) for v in plain):
        return np.array([str(v) for v in plain], dtype=object)
    return np.asarray(plain)


def example_columns(data: Any, task: Any = None, *, ids: Sequence[str] | None = None, what: str = "the data",
                    source: ExampleSource | None = None) -> dict[str, np.ndarray]:
    """``index``, ``label`` (when each target is one number) and id columns of a data set.

    Parameters
    ----------
    data : data set
        As the Attributor takes it.
    task : Task, optional
        Names the input and target keys of mapping examples, and batches them.
    ids : sequence of str, optional
        The id fields of mapping examples. ``None`` (default): every field whose value
        is one number or string, other than the input and the target.
    what : str
        How errors name the data set.
    source : ExampleSource, optional
        ``data`` already wrapped (its targets are read from it).
    """
    source = ExampleSource(data, what, task) if source is None else source
    columns: dict[str, np.ndarray] = {"index": np.arange(len(source), dtype=np.int64)}
    labels = _labels(source)
    if labels is not None:
        columns["label"] = labels
    first = source.first_item()
    if isinstance(first, Mapping):
        for key in _id_keys(first, source, ids, what):
            name = f"example_{key}" if key in _RESERVED else key
            columns[name] = _id_values(source.data, key, len(source), what)
    elif ids:
        raise DataError(f"{what}: id columns {list(ids)} were named, but its examples are not mappings (dicts) with "
                        "keys; only mapping examples carry ids")
    return columns


def _prefixed(columns: Mapping[str, np.ndarray], prefix: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{prefix}{name}": np.asarray(values)[rows] for name, values in columns.items()}


def top_k_table(top: Any, query_columns: Mapping[str, np.ndarray],
                train_columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per query, direction and rank of a :class:`~srcproj.TopK`.

    Columns: ``query_*`` (the query's index, label, ids), ``direction``
    (``"helpful"`` or ``"harmful"``), ``rank`` (1: the most helpful, or the most
    harmful), ``train_*`` (the training example's) and ``score``.
    """
    queries, k = top.helpful_indices.shape
    query_rows = np.repeat(np.arange(queries), 2 * k)
    direction = np.tile(np.repeat(np.array(["helpful", "harmful"], dtype=object), k), queries)
    rank = np.tile(np.arange(1, k + 1), 2 * queries)
    train_rows = np.concatenate([top.helpful_indices, top.harmful_indices], axis=1).reshape(-1)
    scores = np.concatenate([top.helpful_scores, top.harmful_scores], axis=1).reshape(-1)
    return {**_prefixed(query_columns, "query_", query_rows), "direction": direction, "rank": rank,
            **_prefixed(train_columns, "train_", train_rows), "score": scores.astype(np.float64)}


def _beside(examples: dict[str, np.ndarray], computed: Sequence[str]) -> dict[str, np.ndarray]:
    """The example columns, an id column named like a computed one renamed ``example_<name>``."""
    return {(f"example_{name}" if name in computed else name): values for name, values in examples.items()}


def self_influence_table(values: np.ndarray, train_columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The training examples by decreasing self-influence: their columns, ``self_influence``
    and ``rank`` (1: the largest; ties in data-set order)."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    return {**_beside(_prefixed(train_columns, "", order), ("self_influence", "rank")),
            "self_influence": np.asarray(values, dtype=np.float64)[order], "rank": np.arange(1, len(order) + 1)}


def mislabel_table(suspicion: Any, train_columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The training examples most suspicious first: their columns, ``suspicion`` (the
    detector's score, higher = more likely mislabeled), ``rank`` (1: the most suspicious;
    ties in data-set order) and one column per computed detector."""
    scores = np.asarray(suspicion.scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    examples = _prefixed(train_columns, "", order)
    taken = {*examples, "suspicion", "rank", "flagged"}
    # A detector's column keeps its name unless an id column has it already.
    components = {(name if name not in taken else f"detector_{name}"): np.asarray(values, dtype=np.float64)[order]
                  for name, values in suspicion.components.items()}
    examples = _beside(examples, ("suspicion", "rank", "flagged"))
    return {**examples, "suspicion": scores[order], "rank": np.arange(1, len(order) + 1), **components}


def curation_table(curation: Any, train_columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The training examples in data-set order: their columns, ``influence``, ``rank``
    (1: the lowest influence, the first dropped) and ``keep``."""
    everything = np.arange(len(curation.influence))
    return {**_beside(_prefixed(train_columns, "", everything), ("influence", "rank", "keep")),
            "influence": curation.influence, "rank": curation.rank, "keep": curation.keep}


def _format_of(path: str, format: str | None) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if format is not None:
        if format not in set(TABLE_FORMATS.values()):
            raise ConfigurationError(f"format={format!r}; choose 'parquet' or 'csv'")
        if TABLE_FORMATS.get(suffix, format) != format:
            raise ConfigurationError(f"the table path {path!r} ends in {suffix} but the format asked for is {format}; "
                                     "make them agree (or leave the format to the suffix)")
        return format
    if suffix not in TABLE_FORMATS:
        raise ConfigurationError(f"cannot tell the table format of {path!r} from its suffix; name the file "
                                 f"{', '.join(TABLE_FORMATS)} (or give the format: 'parquet' or 'csv')")
    return TABLE_FORMATS[suffix]


def check_table_target(path: str | os.PathLike, format: str | None = None, overwrite: bool = False) -> str:
    """The format of a table to be written at ``path``, checked before any work is done.

    Refuses a directory, a file already there (unless ``overwrite``), a missing parent
    directory, and Parquet without pyarrow.
    """
    path = os.fspath(path)
    chosen = _format_of(path, format)
    if os.path.isdir(path):
        raise ConfigurationError(f"the table path {path!r} is a directory; give a file name ending in .parquet or "
                                 ".csv")
    if os.path.exists(path) and not overwrite:
        raise ConfigurationError(f"{path!r} exists; give another path, or overwrite it (--overwrite, "
                                 "overwrite=True)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigurationError(f"the directory of the table path {path!r} does not exist; create {parent!r} "
                                 "first")
    if chosen == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigurationError("writing Parquet needs pyarrow: pip install 'srcproj[tables]' (or pyarrow), "
                                     "or write CSV (a path ending in .csv)") from None
    return chosen


def _csv_cell(value: Any) -> Any:
    # repr round-trips a float exactly; csv would write str(), which is the same in Python 3.
    return repr(value) if isinstance(value, float) else value


def readable_by_others(path: str) -> None:
    """Give a file made by :func:`tempfile.mkstemp` (owner-only) the mode ``open()`` would:
    0o666 less the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_table(columns: Mapping[str, np.ndarray], path: str | os.PathLike, format: str | None = None, *,
                overwrite: bool = False) -> str:
    """Write equal-length columns to ``path`` as Parquet or CSV; return the format.

    The file appears whole or not at all: it is written beside ``path`` and renamed.
    """
    path = os.fspath(path)
    chosen = check_table_target(path, format, overwrite)
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigurationError(f"the columns differ in length: {lengths}")
    handle, temporary = tempfile.mkstemp(prefix=".srcproj-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(handle)
    readable_by_others(temporary)  # mkstemp makes it owner-only; the user's umask decides, as for open()
    try:
        if chosen == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({name: pa.array(np.asarray(values).tolist() if np.asarray(values).dtype == object
                                             else np.asarray(values)) for name, values in columns.items()})
            pq.write_table(table, temporary)
        else:
            with open(temporary, "w", newline="", encoding="utf-8") as stream:
                writer = csv.writer(stream)
                writer.writerow(list(columns))
                lists = [np.asarray(values).tolist() for values in columns.values()]
                for row in zip(*lists, strict=True):
                    writer.writerow([_csv_cell(value) for value in row])
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return chosen
