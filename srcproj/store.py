"""Generic zarr v3 storage for srcproj: open or create a store, checked arrays, durable writes.

What the arrays are called and what they hold is :mod:`srcproj.layout`'s business;
this module knows only how to open a group made for given metadata (refusing one made
for other inputs), create or find an array, read rows with an error that names a
damaged chunk, and write so that a finished write survives a crash.

The location may be a directory or any zarr store URL (``memory://``, ``s3://``...,
opened by zarr through fsspec). Several processes may write one store at once (a
distributed featurize): each row chunk and each marker is written by exactly one
process, and rank 0 alone creates the group and the arrays before the others open them.
On a local file system a chunk file is fsync'ed before its marker is set.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import StoreError, StoreMismatchError

__all__ = ["AttributionStore", "compressors", "fsync_path", "local_path", "metadata_differences"]

# 2: stage inputs (weight decay, segment times) recorded apart from the store's identity.
# 3: checksummed flags; float16 features with a per-row power-of-two scale (features/ckpt_{c}_scale).
# 4: the optimizer in the identity (Adam's preconditioner, preconditioner/seg_{l}_*).
FORMAT_VERSION = 4
_UNCHECKED = {"library_version", "created"}


def compressors() -> list:
    """The codecs of every compressed srcproj array: zstd, then a checksum, so that a
    flipped byte on disk fails loudly on read."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]


def checksum_only() -> list:
    """The codecs of an uncompressed srcproj array (the done flags): a checksum alone."""
    return [Crc32cCodec()]


#: Every chunk written is kept, also one equal to the fill value (zarr would drop it):
#: a unit flagged done then always has its chunks in the store, which ``srcproj verify``
#: checks.
_KEEP_EVERY_CHUNK = {"write_empty_chunks": True}


def _show(location: Any) -> Any:
    return os.fspath(location) if isinstance(location, os.PathLike) else location


def _differences(stored: Any, wanted: Any, path: str = "",
                 where: tuple[str, str] = ("in the store", "now")) -> list[str]:
    here, there = where
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for key in sorted(set(stored) | set(wanted)):
            if key in _UNCHECKED and not path:
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in stored or key not in wanted:
                out.append(f"{sub}: {'absent' if key not in stored else stored[key]!r} {here}, "
                           f"{'absent' if key not in wanted else wanted[key]!r} {there}")
            else:
                out.extend(_differences(stored[key], wanted[key], sub, where))
        return out
    if isinstance(stored, list) and isinstance(wanted, list):
        if len(stored) != len(wanted):
            return [f"{path}: {len(stored)} entries {here}, {len(wanted)} {there}"]
        out = []
        for i, (a, b) in enumerate(zip(stored, wanted, strict=False)):
            out.extend(_differences(a, b, f"{path}[{i}]", where))
        return out
    if isinstance(stored, float) or isinstance(wanted, float):
        try:
            if np.isclose(float(stored), float(wanted), rtol=1e-12, atol=0):
                return []
        except (TypeError, ValueError):
            pass
    return [] if stored == wanted else [f"{path}: {stored!r} {here}, {wanted!r} {there}"]


def metadata_differences(first: dict, second: dict, where: tuple[str, str] = ("in the store", "now")) -> str:
    """The differences of two metadata dicts as one line ("" when they agree)."""
    diffs = _differences(json.loads(json.dumps(first)), json.loads(json.dumps(second)), "", where)
    return "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def fsync_path(path: str) -> None:
    """fsync a file or directory if it exists (a chunk zarr never wrote is all fill value)."""
    if os.path.exists(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def local_path(location: Any) -> str | None:
    """The absolute directory of a local location (a path or ``file://`` URL), else None."""
    if isinstance(location, (str, os.PathLike)):
        text = os.fspath(location)
        if "://" not in text:
            return os.path.abspath(text)
        if text.startswith("file://"):
            return os.path.abspath(text[len("file://"):])
    return None


class AttributionStore:
    """A srcproj store opened for reading and writing.

    Use :meth:`open` (create or check against metadata) or :meth:`read` (open an
    existing store without a model, e.g. for ``srcproj info``).
    """

    def __init__(self, group: zarr.Group, location: str, local_root: str | None) -> None:
        self.group = group
        self.location = location
        self._local_root = local_root
        self.metadata: dict = dict(group.attrs["srcproj"])

    @property
    def local_root(self) -> str | None:
        """The store's directory when it is on the local file system, else None."""
        return self._local_root

    @staticmethod
    def compressors() -> list:
        return compressors()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, location: Any, metadata: dict, create: bool = True) -> AttributionStore:
        """Open ``location``, creating the store if absent; refuse one made for other inputs.

        ``location`` is a directory path, any zarr store URL (``"memory://run"``,
        ``"s3://bucket/run.zarr"``: zarr opens it through fsspec) or a zarr store
        object. With ``create=False`` the store must exist already (the other ranks
        of a distributed job open the store that rank 0 created).
        """
        local = local_path(location)
        if local is not None and os.path.isfile(local):
            raise StoreError(f"store path {local!r} is a file; give a directory path (e.g. 'run.zarr')")
        if local is not None and os.path.isdir(local) and os.listdir(local) and not os.path.exists(
            os.path.join(local, "zarr.json")
        ):
            raise StoreError(
                f"{local!r} is a non-empty directory that is not a zarr store; choose another path"
            )
        if not create and local is not None and not os.path.exists(os.path.join(local, "zarr.json")):
            raise StoreError(f"no store at {local!r}")
        try:
            group = zarr.open_group(location, mode="a" if create else "r+", zarr_format=3)
        except Exception as exc:  # zarr raises several types for unusable locations
            if not create:
                raise StoreError(f"no store at {_show(location)!r} ({type(exc).__name__}: {exc})") from exc
            raise StoreError(f"cannot open a zarr store at {_show(location)!r}: {exc}") from exc
        full = {"format": FORMAT_VERSION, **metadata}
        if "srcproj" not in group.attrs:
            if len(list(group.keys())):
                raise StoreError(f"{_show(location)!r} is a zarr store that srcproj did not make; choose another path")
            if not create:
                raise StoreError(f"{_show(location)!r} is not a srcproj store (no srcproj metadata)")
            group.attrs["srcproj"] = json.loads(json.dumps(full))
        else:
            stored = dict(group.attrs["srcproj"])
            shown = metadata_differences(stored, full)
            if shown:
                raise StoreMismatchError(
                    f"the store at {_show(location)!r} was made for other inputs ({shown}). Use a new store "
                    "path, or delete this one to recompute"
                )
        return cls(group, str(location), local)

    @classmethod
    def open_shared(cls, location: Any, metadata: dict, collective: Any) -> AttributionStore:
        """:meth:`open` by every rank of a job: rank 0 creates or checks the store first.

        Every rank must describe the same inputs; that is checked before anything
        touches the store. ``collective`` is a :class:`~srcproj.distributed.Collective`.
        """
        from .errors import ConfigurationError

        if not collective.active:
            return cls.open(location, metadata)
        everyone = collective.all_gather_object(metadata)
        for rank, theirs in enumerate(everyone):
            shown = metadata_differences(everyone[0], theirs, ("on rank 0", f"on rank {rank}"))
            if shown:
                raise ConfigurationError(
                    f"rank {rank} was given other inputs than rank 0 ({shown}); every rank must build the "
                    "Attributor from the same model, checkpoints, data and arguments"
                )
        opened, error = None, None
        if collective.rank == 0:
            try:
                opened = cls.open(location, metadata)
            except Exception as exc:  # noqa: BLE001 - agreed on below, so that no rank waits for rank 0
                error = exc
        collective.agree(error)
        if collective.rank != 0:
            try:
                opened = cls.open(location, metadata, create=False)
            except StoreError as exc:
                error = StoreError(
                    f"{exc}; rank {collective.rank} cannot open the store that rank 0 opened: every rank must "
                    "reach the same storage (a shared file system or an object store URL; a memory:// store "
                    "exists in one process only)"
                )
            except Exception as exc:  # noqa: BLE001 - raised on every rank by agree
                error = exc
        collective.agree(error)
        return opened

    @classmethod
    def read(cls, location: Any) -> AttributionStore:
        """Open an existing store without checking it against a model."""
        local = local_path(location)
        if local is not None and os.path.isfile(local):
            raise StoreError(f"{local!r} is a file; give a store directory")
        if local is not None and not os.path.isdir(local):
            raise StoreError(f"no store at {local!r}")
        try:
            group = zarr.open_group(location, mode="r", zarr_format=3)
        except Exception as exc:
            raise StoreError(f"cannot open a zarr store at {_show(location)!r}: {exc}") from exc
        if "srcproj" not in group.attrs:
            raise StoreError(f"{_show(location)!r} is not a srcproj store (no srcproj metadata)")
        return cls(group, str(location), local)

    # ------------------------------------------------------------------ arrays
    def array(self, name: str, shape: tuple, dtype: str, chunks: tuple | None = None,
              compressed: bool = True) -> zarr.Array:
        """The array ``name``, created if absent (creation is idempotent).

        Every array carries a Crc32c checksum; ``compressed=False`` leaves out the
        compression (for tiny chunks such as the done flags).
        """
        if name in self.group:
            found = self.group[name]
            if tuple(found.shape) != tuple(shape) or str(found.dtype) != str(np.dtype(dtype)):
                raise StoreError(
                    f"array {name!r} in the store has shape {found.shape} and dtype {found.dtype}, "
                    f"expected {shape} and {dtype}: the store is damaged; delete it to recompute"
                )
            # A reopened array has zarr's default configuration: keep every chunk again.
            return found.with_config(_KEEP_EVERY_CHUNK) if hasattr(found, "with_config") else found
        return self.group.create_array(
            name,
            shape=shape,
            chunks=chunks or shape,
            dtype=dtype,
            compressors=compressors() if compressed else checksum_only(),
            fill_value=0,
            config=_KEEP_EVERY_CHUNK,
        )

    def flags(self, name: str, count: int) -> zarr.Array:
        """A boolean marker array, one zarr chunk per flag so that flags never race.

        A flag chunk is one byte and its Crc32c checksum: a flipped bit fails on read.
        """
        return self.array(name, (count,), "bool", chunks=(1,), compressed=False)

    def has(self, name: str) -> bool:
        return name in self.group

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows of an array, with an error that names the array and chunk if it is corrupt."""
        array = self.group[name]
        try:
            return array[start:stop]
        except Exception as exc:
            # Several chunks were read at once: name the first one that fails on its own.
            rows = array.chunks[0]
            chunk, error = start // rows, exc
            for index in range(start // rows, -(-stop // rows)):
                try:
                    array[index * rows:min((index + 1) * rows, array.shape[0])]
                except Exception as own:  # noqa: BLE001 - reported below
                    chunk, error = index, own
                    break
            first, last = chunk * rows, min((chunk + 1) * rows, array.shape[0]) - 1
            raise StoreError(
                f"array {name!r}, chunk {chunk} (rows {first}..{last}) of {self.location!r} "
                f"cannot be read: {error}. The file is damaged; delete this array's chunk file "
                "and the matching _done flag to recompute it"
            ) from exc

    def read_all(self, name: str) -> np.ndarray:
        return self.read_rows(name, 0, self.group[name].shape[0])

    def write_durably(self, array: zarr.Array, selection: slice | int, value: np.ndarray) -> None:
        """Write, then fsync the chunk files on a local file system."""
        array[selection] = value
        if self._local_root is None:
            return
        start = selection.start if isinstance(selection, slice) else selection
        index = start // array.chunks[0]
        chunk_dir = os.path.join(self._local_root, *array.path.split("/"), "c")
        path = os.path.join(chunk_dir, str(index), *(["0"] * (array.ndim - 1)))
        for target in (path, os.path.dirname(path)):
            fsync_path(target)

    def nbytes_stored(self) -> int:
        """Bytes stored: on disk for a local store, through fsspec for a URL; 0 when unknown."""
        if self._local_root is None:
            if "://" not in self.location:
                return 0
            try:  # an fsspec URL (memory://, s3://...): ask its file system
                import fsspec

                fs, path = fsspec.core.url_to_fs(self.location)
                return int(fs.du(path, total=True))
            except Exception:  # noqa: BLE001 - a size is optional
                return 0
        total = 0
        for root, _, files in os.walk(self._local_root):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total
