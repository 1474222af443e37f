"""Check a store end to end, without writing to it: ``srcproj verify STORE`` and :func:`verify_store`.

Two passes:

1. **Every chunk of every array** (the zarr group is walked recursively, whatever its
   arrays are called) is read and decoded, so every Crc32c checksum is checked. A chunk
   that fails is reported by array and chunk index and the walk goes on. A boolean
   chunk holding a byte other than 0 or 1 is damage too.
2. **What the done flags claim** is checked against the data, using the names of
   :mod:`srcproj.layout`: a unit flagged done must have its data chunks in the store;
   its features, caches and spectra must be finite; a Hessian must be finite and
   symmetric.

Each problem is a :class:`Damage`; a unit's damage is repaired by deleting the damaged
chunk and the unit's done flag chunk, then rerunning ``featurize()`` (it recomputes
only the units not flagged done), or by featurizing into a new store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.core.sync import sync

from . import layout as names
from .errors import StoreError
from .store import AttributionStore

__all__ = ["Damage", "VerifyReport", "verify_store"]

ChunkIndex = tuple[int, ...]
#: Decoded bytes read at once along the first axis (then split into chunks).
_BATCH_BYTES = 64 << 20
#: Largest |H - Hᵀ| accepted, relative to the largest |H|: float64 sums of outer
#: products are symmetric up to rounding, never off by more.
_SYMMETRY_RTOL = 1e-8


@dataclass(frozen=True)
class Damage:
    """One problem found in a store.

    Attributes
    ----------
    array : str
        The array's zarr path inside the store (e.g. ``"features/ckpt_0"``).
    chunk : int, tuple of int or None
        The chunk's index in the array's chunk grid: an int for a 1-D array, a tuple
        otherwise; None when the problem is the whole array (absent, unreadable metadata).
    problem : str
        What is wrong, as a sentence.
    key : str or None
        The damaged chunk's store key relative to the store root (on a local store, its
        file path relative to the store directory), when there is one.
    flag : str or None
        The store key of the done flag chunk of the unit the damage belongs to: delete
        it with ``key`` and rerun ``featurize()`` to recompute the unit.
    """

    array: str
    chunk: int | tuple[int, ...] | None
    problem: str
    key: str | None = None
    flag: str | None = None

    def to_dict(self) -> dict:
        chunk = list(self.chunk) if isinstance(self.chunk, tuple) else self.chunk
        return {"array": self.array, "chunk": chunk, "problem": self.problem, "key": self.key, "flag": self.flag}


@dataclass
class VerifyReport:
    """The result of :func:`verify_store`.

    Attributes
    ----------
    location : str
        The store that was verified.
    ok : bool
        True when no damage was found.
    arrays_checked : int
        Arrays walked.
    chunks_checked : int
        Stored chunks read and decoded (chunks never written hold nothing to check).
    damage : list of Damage
        Every problem found, in walk order.
    format : int or None
        The store's format version, from its metadata.
    """

    location: str
    ok: bool
    arrays_checked: int
    chunks_checked: int
    damage: list[Damage] = field(default_factory=list)
    format: int | None = None

    def to_dict(self) -> dict:
        """The report as JSON-able builtins."""
        return {"location": self.location, "ok": self.ok, "format": self.format,
                "arrays_checked": self.arrays_checked, "chunks_checked": self.chunks_checked,
                "damage": [d.to_dict() for d in self.damage]}


def _index(coords: ChunkIndex) -> int | tuple[int, ...]:
    return coords[0] if len(coords) == 1 else coords


def _describe(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


@dataclass
class _Unit:
    """The done flag that covers a data array's chunks (srcproj.layout's naming)."""

    flag: str
    index: Callable[[ChunkIndex], int]


class _Walk:
    """State of one verification: the group, its keys, and what was decoded."""

    def __init__(self, store: AttributionStore, progress: bool) -> None:
        self.store = store
        self.group = store.group
        self.backend = self.group.store_path.store
        root = self.group.store_path.path
        self.prefix = f"{root}/" if root else ""
        self.progress = progress
        self.damage: list[Damage] = []
        self.arrays: dict[str, zarr.Array] = {}
        self.keys: set[str] | None = None
        self.units: dict[str, _Unit] = {}
        self.stored: dict[str, set[ChunkIndex]] = {}
        self.failed: dict[str, set[ChunkIndex]] = {}
        self.nonfinite: dict[str, set[ChunkIndex]] = {}
        self.flag_bytes: dict[str, np.ndarray] = {}  # raw flag bytes; 255 where unreadable
        self.chunks_checked = 0

    # ------------------------------------------------------------------ keys
    def chunk_key(self, path: str, coords: ChunkIndex) -> str:
        """The store key of a chunk, relative to the store's root group."""
        return f"{path}/{self.arrays[path].metadata.encode_chunk_key(coords)}"

    def exists(self, path: str, coords: ChunkIndex) -> bool:
        key = self.prefix + self.chunk_key(path, coords)
        if self.keys is not None:
            return key in self.keys
        return bool(sync(self.backend.exists(key)))

    def flag_key(self, flag: str, index: int) -> str | None:
        if flag not in self.arrays:
            return None
        array = self.arrays[flag]
        return self.chunk_key(flag, (index // _unit_shape(array)[0],))

    def add(self, path: str, coords: ChunkIndex | None, problem: str, unit: tuple[str, int] | None = None) -> None:
        """Record damage of chunk ``coords`` of ``path`` (None: the whole array) in unit ``(flag, index)``."""
        if unit is None and path in self.units and coords is not None:
            unit = self.units[path].flag, self.units[path].index(coords)
        self.damage.append(Damage(path, None if coords is None else _index(coords), problem,
                                  None if coords is None else self.chunk_key(path, coords),
                                  None if unit is None else self.flag_key(*unit)))

    # ------------------------------------------------------------------ pass 1: every chunk
    def find_arrays(self) -> None:
        """Open every array of the group; one whose metadata cannot be read is damage."""
        if getattr(self.backend, "supports_listing", False):
            self.keys = set(sync(_collect(self.backend.list_prefix(self.prefix))))
            paths = sorted(key[len(self.prefix):-len("zarr.json")].rstrip("/") for key in self.keys
                           if key.endswith("zarr.json") and key != self.prefix + "zarr.json")
            for path in paths:
                try:
                    node = self.group[path]
                except Exception as exc:  # noqa: BLE001 - reported, and the walk goes on
                    self.damage.append(Damage(path, None, f"its metadata ({path}/zarr.json) cannot be read: "
                                              f"{_describe(exc)}", f"{path}/zarr.json"))
                    continue
                if isinstance(node, zarr.Array):
                    self.arrays[path] = node
        else:
            for path, node in self.group.members(max_depth=None):
                if isinstance(node, zarr.Array):
                    self.arrays[path] = node

    def read_chunks(self) -> None:
        plan = {path: [c for c in _grid(array) if self.exists(path, c)] for path, array in self.arrays.items()}
        total = sum(len(chunks) for chunks in plan.values())
        with tqdm(total=total, desc="srcproj verify", unit="chunk", disable=not self.progress) as bar:
            for path, chunks in plan.items():
                array = self.arrays[path]
                self.stored[path] = set(chunks)
                if array.dtype == np.bool_:
                    self.flag_bytes[path] = np.zeros(array.shape, dtype=np.uint8)
                for batch in _batches(array, chunks):
                    for coords, data in self._decode(path, array, batch):
                        self._observe(path, array, coords, data)
                    self.chunks_checked += len(batch)
                    bar.update(len(batch))

    def _decode(self, path: str, array: zarr.Array, batch: list[ChunkIndex]) -> Iterator[tuple[ChunkIndex, Any]]:
        """Decoded chunks of ``batch``; a chunk that fails on its own is damage."""
        if len(batch) > 1:  # consecutive chunks along the first axis, read at once
            unit = _unit_shape(array)[0]
            first, last = batch[0][0] * unit, min((batch[-1][0] + 1) * unit, array.shape[0])
            try:
                data = np.asarray(array[first:last])
            except Exception:  # noqa: BLE001 - read again chunk by chunk below, to name the chunk
                pass
            else:
                for coords in batch:
                    lo = coords[0] * unit - first
                    yield coords, data[lo:lo + unit]
                return
        for coords in batch:
            try:
                data = np.asarray(array[_region(array, coords)])
            except Exception as exc:  # noqa: BLE001 - reported, and the walk goes on
                self.failed.setdefault(path, set()).add(coords)
                if path in self.flag_bytes:
                    self.flag_bytes[path][_region(array, coords)] = 255
                self.add(path, coords, f"the chunk is damaged: it cannot be decoded ({_describe(exc)})")
                continue
            yield coords, data

    def _observe(self, path: str, array: zarr.Array, coords: ChunkIndex, data: np.ndarray) -> None:
        if path in self.flag_bytes:
            raw = np.ascontiguousarray(data).view(np.uint8)
            self.flag_bytes[path][_region(array, coords)] = raw
            odd = np.unique(raw[raw > 1])
            if odd.size:
                self.add(path, coords, f"a boolean chunk holds the byte value(s) {odd.tolist()}, not only 0 and 1: "
                         "the chunk is damaged")
        elif data.dtype.kind in "fc" and not np.isfinite(data).all():
            self.nonfinite.setdefault(path, set()).add(coords)

    # ------------------------------------------------------------------ pass 2: the flags
    def check_flags(self, layout: names.StoreLayout) -> None:
        """Every unit flagged done has sound data, by srcproj.layout's names."""
        claims = _claims(layout)
        # Which flag covers which data chunk, so that every damage names its flag.
        size = layout.shape.chunk_size
        for claim in claims:
            for i, arrays in enumerate(claim.units):
                for data, _, _ in arrays:
                    if data not in self.arrays:
                        continue
                    if claim.segment is None:
                        self.units[data] = _Unit(claim.flag, lambda coords, i=i: i)
                    else:
                        rows = _unit_shape(self.arrays[data])[0] if self.arrays[data].ndim else 1
                        self.units[data] = _Unit(claim.flag, lambda coords, rows=rows: coords[0] * rows // size)
            if claim.flag in self.arrays:  # a damaged flag chunk is its own unit's flag
                rows = _unit_shape(self.arrays[claim.flag])[0] if self.arrays[claim.flag].ndim else 1
                self.units[claim.flag] = _Unit(claim.flag, lambda coords, rows=rows: coords[0] * rows if coords else 0)
        for n, damage in enumerate(self.damage):  # pass 1 ran before the units were known
            unit = self.units.get(damage.array)
            if unit is not None and damage.flag is None and damage.chunk is not None:
                coords = damage.chunk if isinstance(damage.chunk, tuple) else (damage.chunk,)
                self.damage[n] = replace(damage, flag=self.flag_key(unit.flag, unit.index(coords)))

        for claim in claims:
            raw = self.flag_bytes.get(claim.flag)
            if raw is None:
                continue  # never created: nothing of it is done
            raw = raw.reshape(-1)
            for i in range(min(claim.count, raw.size)):
                if raw[i] != 1:
                    continue  # not done, or a damaged flag (reported in pass 1)
                arrays = claim.units[0] if claim.segment is not None else claim.units[i]
                for data, check, optional in arrays:
                    if optional and data not in self.arrays:
                        continue
                    if claim.segment is not None:
                        start, stop = layout.chunks(claim.segment)[i]
                        self._check_rows(claim.flag, i, data, check, start, stop)
                    else:
                        self._check_whole(claim.flag, i, data, check)

    def _missing(self, flag: str, index: int, data: str) -> bool:
        """Report ``data`` absent though ``flag[index]`` says its unit is done."""
        if data in self.arrays:
            return False
        self.add(data, None, f"{flag}[{index}] says its unit is done but the array is absent", (flag, index))
        return True

    def _check_chunk(self, flag: str, index: int, data: str, coords: ChunkIndex, check: str | None) -> None:
        if coords in self.failed.get(data, ()):
            return  # reported in pass 1
        if coords not in self.stored.get(data, ()):
            note = ""
            if not isinstance(self.store.metadata.get("format"), int) or self.store.metadata["format"] < 3:
                note = " (or it was all zeros: stores of format 2 and older did not keep such chunks)"
            self.add(data, coords, f"{flag}[{index}] says its unit is done but the chunk "
                     f"{self.chunk_key(data, coords)} is absent from the store{note}", (flag, index))
        elif check in ("finite", "symmetric") and coords in self.nonfinite.get(data, ()):
            self.add(data, coords, f"holds NaN or infinite values though {flag}[{index}] says it is done",
                     (flag, index))

    def _check_rows(self, flag: str, index: int, data: str, check: str | None, start: int, stop: int) -> None:
        if self._missing(flag, index, data):
            return
        array = self.arrays[data]
        if array.ndim == 0 or array.shape[0] < stop:
            self.add(data, None, f"has shape {tuple(array.shape)}, too short for rows {start}..{stop - 1} that "
                     f"{flag}[{index}] says are done", (flag, index))
            return
        rows = _unit_shape(array)[0]
        for coords in _grid(array):
            if coords[0] * rows < stop and (coords[0] + 1) * rows > start:
                self._check_chunk(flag, index, data, coords, check)

    def _check_whole(self, flag: str, index: int, data: str, check: str | None) -> None:
        if self._missing(flag, index, data):
            return
        array = self.arrays[data]
        grid = list(_grid(array))
        for coords in grid:
            self._check_chunk(flag, index, data, coords, check)
        if check != "symmetric" or any(c in self.failed.get(data, ()) or c not in self.stored.get(data, ())
                                       or c in self.nonfinite.get(data, ()) for c in grid):
            return  # nothing more to check, or reported above
        where = grid[0] if len(grid) == 1 else None
        if array.ndim != 2 or array.shape[0] != array.shape[1]:
            self.add(data, where, f"is a Hessian of shape {tuple(array.shape)}, not square", (flag, index))
            return
        matrix = np.asarray(array[...], dtype=np.float64)
        scale = float(np.abs(matrix).max()) if matrix.size else 0.0
        asymmetry = float(np.abs(matrix - matrix.T).max()) if matrix.size else 0.0
        if asymmetry > _SYMMETRY_RTOL * scale:
            self.add(data, where, f"is a Hessian flagged done in {flag}[{index}] but not symmetric "
                     f"(max |H - Hᵀ| = {asymmetry:.3g}, max |H| = {scale:.3g})", (flag, index))


@dataclass
class _Claim:
    """A flag array and the data each of its units stands for.

    With ``segment`` set, unit ``i`` is row chunk ``i`` of that segment in every array
    of ``units[0]``; otherwise unit ``i`` is the whole of the arrays ``units[i]``.
    Each array comes as ``(name, check, optional)``: check is "finite", "symmetric" or
    None (present only); an optional array may be absent (older formats lack it).
    """

    flag: str
    count: int
    segment: int | None
    units: list[list[tuple[str, str | None, bool]]]


def _claims(layout: names.StoreLayout) -> list[_Claim]:
    claims = []
    fmt = layout.store.metadata.get("format")
    # float16 features have per-row scales from format 3 on.
    scaled = layout.feature_dtype == "float16" and isinstance(fmt, int) and fmt >= 3
    for c in range(layout.num_checkpoints):
        seg = layout.segment_of(c)
        claims.append(_Claim(names.features_done(c), len(layout.chunks(seg)), seg,
                             [[(names.features(c), "finite", False), (names.feature_scale(c), "finite", not scaled)]]))
    for s in range(layout.num_segments):
        claims.append(_Claim(names.cache_done(s), len(layout.chunks(s)), s, [[(names.cache(s), "finite", False)]]))
    for setting in layout.settings():  # the caches of other counterfactual settings, beside them
        for s in range(layout.num_segments):
            claims.append(_Claim(names.cache_done(s, setting), len(layout.chunks(s)), s,
                                 [[(names.cache(s, setting), "finite", False)]]))
    claims.append(_Claim(names.HESSIANS_DONE, layout.num_checkpoints, None,
                         [[(names.hessian(c), "symmetric", False)] for c in range(layout.num_checkpoints)]))
    claims.append(_Claim(names.SPECTRA_DONE, layout.num_segments, None,
                         [[(names.eigenvalues(s), "finite", False), (names.eigenvectors(s), "finite", False)]
                          for s in range(layout.num_segments)]))
    claims.append(_Claim(names.QUERY_DONE, layout.num_checkpoints, None,
                         [[(names.query_checkpoint(c), None, False)] for c in range(layout.num_checkpoints)]))
    adam = (layout.store.metadata.get("optimizer") or {}).get("second_moment") is not None
    claims.append(_Claim(names.PRECONDITIONER_DONE, layout.num_segments, None,
                         [[(names.preconditioner_scale(s), "finite", False),
                           (names.preconditioner_moment(s), "finite", not adam)] for s in range(layout.num_segments)]))
    return claims


async def _collect(iterator: Any) -> list[str]:
    return [key async for key in iterator]


def _unit_shape(array: zarr.Array) -> tuple[int, ...]:
    """The shape of the array's storage unit: its shard, or its chunk when not sharded."""
    return tuple(array.shards or array.chunks)


def _grid(array: zarr.Array) -> Iterator[ChunkIndex]:
    unit = _unit_shape(array)
    return iter(np.ndindex(*(math.ceil(s / u) if u else 0 for s, u in zip(array.shape, unit, strict=True))))


def _region(array: zarr.Array, coords: ChunkIndex) -> tuple[slice, ...]:
    unit = _unit_shape(array)
    return tuple(slice(c * u, min((c + 1) * u, s)) for c, u, s in zip(coords, unit, array.shape, strict=True))


def _batches(array: zarr.Array, chunks: list[ChunkIndex]) -> Iterator[list[ChunkIndex]]:
    """Runs of consecutive chunks along the first axis (of an array chunked along it only)."""
    unit = _unit_shape(array)
    if array.ndim == 0 or any(math.ceil(s / u) > 1 for s, u in zip(array.shape[1:], unit[1:], strict=True)):
        for coords in chunks:
            yield [coords]
        return
    per = max(1, _BATCH_BYTES // max(1, math.prod(unit) * array.dtype.itemsize))
    run: list[ChunkIndex] = []
    for coords in chunks:
        if run and (coords[0] != run[-1][0] + 1 or len(run) >= per):
            yield run
            run = []
        run.append(coords)
    if run:
        yield run


def verify_store(location: Any, *, progress: bool = True) -> VerifyReport:
    """Read every chunk of a store and check what its done flags claim; never write.

    Parameters
    ----------
    location : str, os.PathLike or zarr store
        The store: a directory, a zarr store URL (``memory://``, ``s3://``...) or a
        zarr store object, as for :class:`~srcproj.Attributor`.
    progress : bool, default True
        Show a tqdm progress bar over the chunks.

    Returns
    -------
    VerifyReport
        ``ok`` is True when nothing is damaged; otherwise ``damage`` names each
        damaged array and chunk, with the problem.

    Raises
    ------
    StoreError
        ``location`` is not a srcproj store, or its srcproj metadata cannot be parsed.

    Notes
    -----
    Checked: every stored chunk of every array decodes (this checks each Crc32c
    checksum); boolean chunks hold only 0 and 1; every unit flagged done has its data
    chunks in the store; features and caches of flagged chunks, and flagged spectra,
    are finite; flagged Hessians are finite and symmetric. To repair a damaged unit,
    delete its chunk (``Damage.key``) and its done flag chunk (``Damage.flag``), then
    rerun ``featurize()``, which recomputes only that unit; or featurize into a new store.
    """
    try:
        store = AttributionStore.read(location)
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - srcproj attributes that are not a mapping
        raise StoreError(f"the srcproj metadata of {location!r} cannot be parsed ({_describe(exc)}): the store "
                         "is damaged; featurize into a new store") from exc
    metadata = store.metadata
    try:
        if not isinstance(metadata, dict):
            raise TypeError(f"it is a {type(metadata).__name__}, not a mapping")
        layout = names.StoreLayout(store)
        for segment in range(layout.num_segments):  # the sizes the flags are checked with
            layout.chunks(segment)
            layout.members(segment)
    except Exception as exc:  # noqa: BLE001 - any malformed field
        raise StoreError(
            f"the srcproj metadata of {store.location!r} cannot be parsed ({_describe(exc)}): the store is "
            "damaged; featurize into a new store"
        ) from exc
    walk = _Walk(store, progress)
    walk.find_arrays()
    walk.read_chunks()
    walk.check_flags(layout)
    fmt = metadata.get("format")
    return VerifyReport(location=store.location, ok=not walk.damage, arrays_checked=len(walk.arrays),
                        chunks_checked=walk.chunks_checked, damage=walk.damage,
                        format=fmt if isinstance(fmt, int) else None)
