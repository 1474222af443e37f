"""Scores ``-Ψ Tᵀ`` streamed over the store's cached training features, in a memory budget.

Every function here works on blocks: a batch of queries against a block of training
rows. :func:`plan_blocks` sizes both so that the transient buffers (the score block,
the cache blocks being used and read ahead, the query batch and the top-k state) stay
within ``memory_bytes``, whatever the number of queries ``Q`` and training rows ``N``.
Only an output the caller asked for whole (:func:`score_matrix`'s ``(Q, N)`` matrix)
is outside the budget.

Row blocks are whole multiples of the store's chunk rows, so each zarr chunk is read
and decompressed once per query batch; all queries form one batch unless the budget
cannot hold their scores against one chunk.

``prefetch=True`` reads and decompresses the next block in a thread while torch
multiplies the current one. It is off by default because it did not help
consistently on the 2-core machine it was measured on, where decompression competes
with torch's two threads for the same cores: top-k of 10,000 queries × k=1024 took a
median 15.2 s with it and 13.2 s without over 28,672 rows (5 paired runs), 26.2 s and
24.9 s over 52,224 rows (4 pairs), and 45.8 s and 46.3 s (best of 2) over 100,000
rows. It may pay where a read waits on a network (an object store) or cores are spare.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from .errors import ConfigurationError, StoreError
from .store import compressors, fsync_path, local_path

__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "REDUCTIONS",
    "BlockPlan",
    "Cache",
    "Queries",
    "TopK",
    "check_memory_bytes",
    "check_score_target",
    "plan_blocks",
    "plan_top_k",
    "read_only",
    "reduce_over_queries",
    "score_matrix",
    "score_to_array",
    "self_scores",
    "store_cache",
    "top_k",
]

BlockReader = Callable[[int, int], np.ndarray]

#: Default transient-memory budget of one scoring call: 1 GiB.
DEFAULT_MEMORY_BYTES = 1 << 30
#: Default of ``prefetch`` (see the module docstring).
PREFETCH = False
# Cache rows read per block are capped at about this many bytes even when the budget
# allows more: larger blocks gain nothing once the matmul is efficient, and smaller
# ones let a reader thread (prefetch) overlap more of the reading.
_CACHE_BLOCK_CAP = 128 << 20
# Two-stage top-k: the block's columns are reduced to group maxima (minima) first, and
# only the k best groups are searched element by element.
_GROUP = 64
# Target size of one chunk of a zarr score array (before compression).
_OUT_CHUNK_BYTES = 4 << 20


try:  # zarr reads into a caller's array through its NDBuffer wrapper
    from zarr.core.buffer import default_buffer_prototype

    _nd_buffer = default_buffer_prototype().nd_buffer.from_numpy_array
except (ImportError, AttributeError):  # pragma: no cover - another zarr layout: allocate per block
    _nd_buffer = None


# ---------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Cache:
    """The training side ``T`` (``num_rows × dim``), read by row ranges.

    ``read(start, stop)`` returns rows ``start..stop-1`` as a C-contiguous array of
    ``dtype``; ``read_into(start, stop, out)``, when given, reads them into ``out``
    (a reused block: no fresh pages to fault in for every block). ``chunk_rows`` is
    the store's chunk length: blocks are multiples of it. ``copies`` counts the
    block-sized arrays one read holds at its peak (2 when several segments' caches
    are summed).
    """

    read: BlockReader
    num_rows: int
    dim: int
    dtype: np.dtype
    chunk_rows: int
    copies: int = 1
    read_into: Callable[[int, int, np.ndarray], np.ndarray] | None = None

    @classmethod
    def of(cls, array: np.ndarray, chunk_rows: int = 1024) -> Cache:
        """A training side held in memory."""
        array = np.ascontiguousarray(array)
        return cls(lambda start, stop: array[start:stop], int(array.shape[0]), int(array.shape[1]),
                   array.dtype, max(1, min(chunk_rows, int(array.shape[0]))))

    @classmethod
    def hstack(cls, parts: list[Cache], dtype: Any = None) -> Cache:
        """The column concatenation of several training sides over the same rows.

        ``-[Ψ_1 … Ψ_n][T_1 … T_n]ᵀ = -Σ_i Ψ_i T_iᵀ``: a sum of scores is one product.
        """
        if len(parts) == 1 and (dtype is None or np.dtype(dtype) == parts[0].dtype):
            return parts[0]
        dtype = np.dtype(dtype if dtype is not None else np.result_type(*[p.dtype for p in parts]))

        def read(start: int, stop: int) -> np.ndarray:
            return np.concatenate([p.read(start, stop).astype(dtype, copy=False) for p in parts], axis=1)

        return cls(read, parts[0].num_rows, sum(p.dim for p in parts), dtype, parts[0].chunk_rows,
                   copies=2)


@dataclass(frozen=True)
class Queries:
    """The query side ``Ψ`` (``count × dim``): ``read(start, stop)`` returns its rows."""

    read: BlockReader
    count: int

    @classmethod
    def of(cls, array: np.ndarray) -> Queries:
        """Queries held in memory."""
        return cls(lambda start, stop: array[start:stop], int(array.shape[0]))

    @classmethod
    def hstack(cls, parts: list[Queries]) -> Queries:
        """The column concatenation of several query sides (see :meth:`Cache.hstack`)."""
        if len(parts) == 1:
            return parts[0]

        def read(start: int, stop: int) -> np.ndarray:
            blocks = [np.asarray(p.read(start, stop)) for p in parts]
            return np.concatenate([b.astype(np.result_type(*blocks), copy=False) for b in blocks], axis=1)

        return cls(read, parts[0].count)


def check_memory_bytes(value: Any, name: str = "score_memory_bytes") -> int:
    """``value`` as a positive int of bytes, or :class:`ConfigurationError`."""
    ok = isinstance(value, (int, np.integer, float, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok and isinstance(value, (float, np.floating)):
        ok = math.isfinite(value) and float(value).is_integer()
    if not ok or value <= 0:
        raise ConfigurationError(
            f"{name}={value!r}; it must be a positive whole number of bytes, e.g. {name}=1 << 30 "
            "for 1 GiB (the default)"
        )
    return int(value)


# ---------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class BlockPlan:
    """How one scoring call is cut: ``query_rows`` queries × ``block_rows`` training rows."""

    query_rows: int
    block_rows: int
    num_queries: int
    num_rows: int

    def query_batches(self) -> list[tuple[int, int]]:
        return [(q, min(q + self.query_rows, self.num_queries)) for q in range(0, self.num_queries, self.query_rows)]

    def row_blocks(self) -> list[tuple[int, int]]:
        return [(r, min(r + self.block_rows, self.num_rows)) for r in range(0, self.num_rows, self.block_rows)]


def _balanced(total: int, most: int, unit: int = 1) -> int:
    """The smallest multiple of ``unit`` ≤ ``most`` that cuts ``total`` into as few pieces as ``most`` does."""
    units = -(-total // unit)
    per = max(1, most // unit)
    pieces = -(-units // per)
    return min(most, -(-units // pieces) * unit)


def plan_blocks(num_queries: int, cache: Cache, memory_bytes: int, *, cell_bytes: float,
                query_row_bytes: float, row_bytes: float, query_unit: int = 1,
                name: str = "score_memory_bytes") -> BlockPlan:
    """Block sizes whose transient memory fits ``memory_bytes``.

    The memory of a batch of ``q`` queries against a block of ``n`` rows is taken as
    ``q·n·cell_bytes + q·query_row_bytes + n·row_bytes``. All queries form one batch
    if a block of at least one chunk then fits; otherwise blocks are one chunk and
    the queries are batched. ``query_unit``: batches are multiples of it (but for
    the last).
    """
    num_rows, chunk = cache.num_rows, cache.chunk_rows
    one_chunk = min(chunk, num_rows)

    def cost(q: int, n: int) -> float:
        return q * n * cell_bytes + q * query_row_bytes + n * row_bytes

    least = cost(1, one_chunk)
    if memory_bytes < least:
        raise ConfigurationError(
            f"{name}={memory_bytes} bytes cannot hold the smallest block (one query, one store chunk of "
            f"{one_chunk} rows × k={cache.dim} {np.dtype(cache.dtype).name}), which needs about "
            f"{math.ceil(least):,} bytes; give a larger {name} (the default is {DEFAULT_MEMORY_BYTES:,}, 1 GiB)"
        )
    cap_rows = max(chunk, (_CACHE_BLOCK_CAP // max(1, cache.dim * np.dtype(cache.dtype).itemsize)) // chunk * chunk)
    spare = memory_bytes - num_queries * query_row_bytes
    fit = spare / (num_queries * cell_bytes + row_bytes) if spare > 0 else 0.0
    if fit >= one_chunk:
        queries = num_queries
        rows = num_rows if fit >= num_rows else int(fit) // chunk * chunk
    else:
        rows = one_chunk
        queries = int((memory_bytes - rows * row_bytes) // (rows * cell_bytes + query_row_bytes))
        queries = max(1, min(queries, num_queries))
        if queries < num_queries and queries >= query_unit:
            queries = queries // query_unit * query_unit
    rows = min(rows, cap_rows)
    if rows < num_rows:
        rows = _balanced(num_rows, rows, chunk)
    if queries < num_queries:
        queries = _balanced(num_queries, queries, query_unit if queries >= query_unit else 1)
    return BlockPlan(int(queries), int(rows), num_queries, num_rows)


# ---------------------------------------------------------------------------- streaming
def _stream(plan: BlockPlan, queries: Queries, cache: Cache, prefetch: bool
            ) -> Iterator[tuple[int, int, torch.Tensor, int, int, torch.Tensor]]:
    """``(q0, q1, -ψ batch, r0, r1, cache block)`` for every batch × block, reading one block ahead."""
    batches, blocks = plan.query_batches(), plan.row_blocks()
    order = [(b, r) for b in batches for r in blocks]
    # Reused blocks: the one in use and, with prefetch, the one being read.
    buffers = [np.empty((min(plan.block_rows, cache.num_rows), cache.dim), cache.dtype)
               for _ in range(2 if prefetch and len(order) > 1 else 1)] if cache.read_into else []

    def load(index: int) -> torch.Tensor:
        start, stop = order[index][1]
        if buffers:
            rows = cache.read_into(start, stop, buffers[index % len(buffers)][: stop - start])
        else:
            rows = cache.read(start, stop)
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=cache.dtype))

    pool = ThreadPoolExecutor(1, thread_name_prefix="srcproj-read") if prefetch and len(order) > 1 else None
    try:
        pending = pool.submit(load, 0) if pool else None
        current_batch, negated = None, None
        for index, ((q0, q1), (r0, r1)) in enumerate(order):
            if pool:
                block = pending.result()
                if index + 1 < len(order):
                    pending = pool.submit(load, index + 1)
            else:
                block = load(index)
            if current_batch != (q0, q1):
                psi = np.ascontiguousarray(queries.read(q0, q1), dtype=cache.dtype)
                # -(ψ Tᵀ) == (-ψ) Tᵀ exactly: negation is exact in floating point.
                negated = torch.from_numpy(psi).neg()
                current_batch = (q0, q1)
            yield q0, q1, negated, r0, r1, block
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def _cache_row_bytes(cache: Cache, prefetch: bool) -> int:
    # The block in use, the block being read ahead, and a summing temporary.
    live = (2 if prefetch else 1) + (cache.copies - 1)
    return live * cache.dim * np.dtype(cache.dtype).itemsize


# ---------------------------------------------------------------------------- all scores
def score_matrix(queries: Queries | np.ndarray, cache: Cache, memory_bytes: int = DEFAULT_MEMORY_BYTES, *,
                 prefetch: bool = PREFETCH, name: str = "score_memory_bytes") -> np.ndarray:
    """All scores ``(Q, N)`` in memory; torch writes each block straight into the result."""
    queries = queries if isinstance(queries, Queries) else Queries.of(queries)
    item = np.dtype(cache.dtype).itemsize
    plan = plan_blocks(queries.count, cache, memory_bytes, cell_bytes=0.0,
                       query_row_bytes=2 * cache.dim * item, row_bytes=_cache_row_bytes(cache, prefetch), name=name)
    out = np.empty((queries.count, cache.num_rows), dtype=cache.dtype)
    target = torch.from_numpy(out)
    for q0, q1, negated, r0, r1, block in _stream(plan, queries, cache, prefetch):
        torch.mm(negated, block.T, out=target[q0:q1, r0:r1])
    return out


def _show(location: Any) -> str:
    return os.fspath(location) if isinstance(location, os.PathLike) else str(location)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_score_target(out: Any, overwrite: bool, protected: str | None = None) -> str | None:
    """Refuse an unusable ``out`` for :func:`score_to_array`; its local directory, if local.

    A non-empty target is refused unless ``overwrite`` and it is a zarr node; a
    directory that is not zarr is never replaced, nor anything holding or inside the
    ``protected`` directory (the attribution store).
    """
    if not isinstance(overwrite, (bool, np.bool_)):
        raise ConfigurationError(f"overwrite={overwrite!r}; it must be True or False")
    local = local_path(out)
    if local is None:
        if isinstance(out, (str, os.PathLike)) or hasattr(out, "with_read_only"):
            try:
                zarr.open(out, mode="r")
            except Exception:  # nothing there (zarr raises several types)
                return None
            if not overwrite:
                raise StoreError(f"out={_show(out)!r} already holds zarr data; pass overwrite=True to replace it, "
                                 "or give another location")
            return None
        raise ConfigurationError(
            f"out={out!r} ({type(out).__name__}); give a directory path, a zarr store URL or a zarr Store"
        )
    if protected is not None and (_inside(local, protected) or _inside(protected, local)):
        raise StoreError(f"out={local!r} would overwrite the attribution store at {protected!r}; write the "
                         "scores to a path outside the store")
    if os.path.isfile(local):
        raise StoreError(f"out={local!r} is a file; give a directory path for the zarr array, e.g. 'scores.zarr'")
    if os.path.isdir(local) and os.listdir(local):
        if not os.path.exists(os.path.join(local, "zarr.json")):
            raise StoreError(f"out={local!r} is a non-empty directory that is not a zarr array; srcproj will not "
                             "replace it, even with overwrite=True: choose another path")
        if not overwrite:
            raise StoreError(f"out={local!r} already holds a zarr array or group; pass overwrite=True to replace "
                             "it, or choose another path")
    return local


def store_cache(store: Any, names: list[str], dtype: Any) -> Cache:
    """The sum of the store arrays ``names`` (same shape and chunks) as a :class:`Cache`.

    ``store`` is an :class:`~srcproj.store.AttributionStore` (best a :func:`read_only`
    view); rows are read with its ``read_rows``, which names the array and chunk of
    a damaged file. No copy is made when the stored dtype is ``dtype`` already.
    """
    arrays = [store.group[name] for name in names]
    first = arrays[0]
    dtype = np.dtype(dtype)
    spare: list[np.ndarray] = []  # the block of the second and later arrays, reused

    def read(start: int, stop: int) -> np.ndarray:
        total = store.read_rows(names[0], start, stop)
        if total.dtype != dtype or not total.flags.writeable:
            total = total.astype(dtype)
        for name in names[1:]:
            np.add(total, store.read_rows(name, start, stop), out=total)
        return total

    def fill(index: int, start: int, stop: int, out: np.ndarray) -> None:
        try:
            arrays[index].get_basic_selection(slice(start, stop), out=_nd_buffer(out))
        except Exception:
            store.read_rows(names[index], start, stop)  # raises the StoreError naming the array and chunk
            raise

    def read_into(start: int, stop: int, out: np.ndarray) -> np.ndarray:
        fill(0, start, stop, out)
        if len(arrays) > 1:
            if not spare or spare[0].shape[0] < stop - start:
                spare[:] = [np.empty((stop - start, out.shape[1]), dtype)]
            other = spare[0][: stop - start]
            for index in range(1, len(arrays)):
                fill(index, start, stop, other)
                np.add(out, other, out=out)
        return out

    direct = _nd_buffer is not None and all(np.dtype(a.dtype) == dtype for a in arrays)
    return Cache(read, int(first.shape[0]), int(first.shape[1]), dtype, int(first.chunks[0]),
                 copies=2 if len(names) > 1 else 1, read_into=read_into if direct else None)


def read_only(store: Any) -> Any:
    """A view of an :class:`~srcproj.store.AttributionStore` whose zarr group is opened read-only.

    Scoring only reads, so any number of processes may score from one store at once;
    the read-only view makes sure of it. Stores without read-only views are returned as is.
    """
    group = store.group
    try:
        readonly = zarr.open_group(group.store.with_read_only(True), path=group.path, mode="r", zarr_format=3)
    except Exception:  # noqa: BLE001 - a store type without read-only views: read through the writable one
        return store
    view = copy.copy(store)
    view.group = readonly
    return view


def score_to_array(queries: Queries | np.ndarray, cache: Cache, out: Any, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                   *, overwrite: bool = False, local_root: str | None = None, attributes: dict | None = None,
                   prefetch: bool = PREFETCH, name: str = "score_memory_bytes") -> Any:
    """All scores written into a new zarr v3 array at ``out``; the array, opened read-only.

    ``out`` must have passed :func:`check_score_target` (``local_root`` is what it
    returned). The array's chunks are ``(query rows, store chunk rows)``, about 4 MiB,
    compressed and checksummed like the store's arrays, and every block covers whole
    chunks, so no chunk is read back or written twice. Each chunk file is replaced
    atomically (zarr writes a temporary file and renames it); on a local file system
    it is also fsync'ed after its block. The array's ``srcproj_scores`` attribute says
    ``complete: false`` until every chunk is durably written; chunks never written read
    as NaN (the fill value).
    """
    queries = queries if isinstance(queries, Queries) else Queries.of(queries)
    item = np.dtype(cache.dtype).itemsize
    query_chunk = max(1, min(queries.count, _OUT_CHUNK_BYTES // (cache.chunk_rows * item)))
    # The score block, plus its encoded chunks on their way to storage.
    plan = plan_blocks(queries.count, cache, memory_bytes, cell_bytes=2.0 * item,
                       query_row_bytes=2 * cache.dim * item, row_bytes=_cache_row_bytes(cache, prefetch),
                       query_unit=query_chunk, name=name)
    query_chunk = min(query_chunk, plan.query_rows)
    info = {**(attributes or {}), "complete": False, "queries": queries.count, "training_examples": cache.num_rows}
    array, chunk_dir = None, None
    buffer = torch.empty(plan.query_rows * plan.block_rows, dtype=torch.from_numpy(np.empty(0, cache.dtype)).dtype)
    for q0, q1, negated, r0, r1, block in _stream(plan, queries, cache, prefetch):
        if array is None:  # created once the first query batch is known to be valid
            array = zarr.create_array(
                out, shape=(queries.count, cache.num_rows), chunks=(query_chunk, cache.chunk_rows),
                dtype=cache.dtype, compressors=compressors(), fill_value=np.nan, overwrite=bool(overwrite),
                zarr_format=3, attributes={"srcproj_scores": info},
                # Every chunk is written once, whole: skip zarr's comparison with the fill value.
                config={"write_empty_chunks": True},
            )
            if local_root is not None:
                chunk_dir = os.path.join(local_root, *[p for p in array.path.split("/") if p], "c")
        scores = buffer[: (q1 - q0) * (r1 - r0)].view(q1 - q0, r1 - r0)
        torch.mm(negated, block.T, out=scores)
        array[q0:q1, r0:r1] = scores.numpy()
        if chunk_dir is not None:
            for qi in range(q0 // query_chunk, -(-q1 // query_chunk)):
                for ri in range(r0 // cache.chunk_rows, -(-r1 // cache.chunk_rows)):
                    fsync_path(os.path.join(chunk_dir, str(qi), str(ri)))
                fsync_path(os.path.join(chunk_dir, str(qi)))
    if chunk_dir is not None:
        fsync_path(chunk_dir)
    array.update_attributes({"srcproj_scores": {**info, "complete": True}})
    if local_root is not None:
        fsync_path(os.path.join(local_root, *[p for p in array.path.split("/") if p], "zarr.json"))
    try:
        return zarr.open_array(array.store.with_read_only(True), path=array.path, mode="r", zarr_format=3)
    except Exception:  # noqa: BLE001 - a store type without read-only views
        return array


# ---------------------------------------------------------------------------- top-k
@dataclass
class TopK:
    """The most helpful and most harmful training examples per query.

    ``helpful_indices[q]`` are sorted by decreasing score, ``harmful_indices[q]`` by
    increasing score (most negative first).
    """

    helpful_indices: np.ndarray
    helpful_scores: np.ndarray
    harmful_indices: np.ndarray
    harmful_scores: np.ndarray


def _block_top(scores: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest (smallest) entries per row of a block, and their columns.

    Two stages when the block is wide: the maxima (minima) of groups of ``_GROUP``
    columns, then an exact search of the ``k`` best groups only. Any entry among the
    row's ``k`` best lies in a group whose maximum is at least the ``k``-th best value,
    and at most ``k`` groups have one, so the values are exact (which of several tied
    entries is returned may differ from a full sort).
    """
    rows, width = scores.shape
    groups = width // _GROUP
    if groups < 4 * k:
        found = scores.topk(min(k, width), dim=1, largest=largest, sorted=False)
        return found.values, found.indices
    body = scores[:, : groups * _GROUP].unflatten(1, (groups, _GROUP))
    reduced = body.amax(2) if largest else body.amin(2)
    best_groups = reduced.topk(k, dim=1, largest=largest, sorted=False).indices
    candidates = body.gather(1, best_groups.unsqueeze(2).expand(-1, -1, _GROUP)).flatten(1)
    found = candidates.topk(k, dim=1, largest=largest, sorted=False)
    values = found.values
    columns = best_groups.gather(1, found.indices // _GROUP) * _GROUP + found.indices % _GROUP
    if width > groups * _GROUP:  # the columns that do not fill a group are all candidates
        values = torch.cat([values, scores[:, groups * _GROUP:]], 1)
        columns = torch.cat([columns, torch.arange(groups * _GROUP, width).expand(rows, -1)], 1)
        found = values.topk(k, dim=1, largest=largest, sorted=False)
        values, columns = found.values, columns.gather(1, found.indices)
    return values, columns


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread: the selection after each block is memory-bound or tiny, and on
    a busy machine every multi-threaded op waits for its slowest thread (measured: a
    10,000 × 10 index op took 50 ms on 2 threads of a loaded 2-core machine, 2.5 ms on 1)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plan_top_k(num_queries: int, cache: Cache, k: int, memory_bytes: int, *, prefetch: bool = PREFETCH,
               name: str = "score_memory_bytes") -> BlockPlan:
    """The blocks :func:`top_k` uses."""
    k = min(k, cache.num_rows)
    item = np.dtype(cache.dtype).itemsize
    # Per query: ψ and -ψ; per direction the candidates (values, int64 columns) and the
    # running best and the block's best, merged; per score, its group extremum.
    state = 2 * (k * _GROUP * (item + 8) + 4 * k * (item + 8))
    return plan_blocks(num_queries, cache, memory_bytes, cell_bytes=item * (1 + 1 / _GROUP),
                       query_row_bytes=2 * cache.dim * item + state, row_bytes=_cache_row_bytes(cache, prefetch),
                       name=name)


def top_k(queries: Queries | np.ndarray, cache: Cache, k: int, memory_bytes: int = DEFAULT_MEMORY_BYTES, *,
          prefetch: bool = PREFETCH, name: str = "score_memory_bytes") -> TopK:
    """Top ``k`` helpful and harmful rows per query without the ``(Q, N)`` matrix."""
    queries = queries if isinstance(queries, Queries) else Queries.of(queries)
    k = min(k, cache.num_rows)
    plan = plan_top_k(queries.count, cache, k, memory_bytes, prefetch=prefetch, name=name)
    q_total = queries.count
    torch_dtype = torch.from_numpy(np.empty(0, cache.dtype)).dtype
    helpful_idx = np.empty((q_total, k), dtype=np.int64)
    harmful_idx = np.empty((q_total, k), dtype=np.int64)
    helpful_val = np.empty((q_total, k), dtype=cache.dtype)
    harmful_val = np.empty((q_total, k), dtype=cache.dtype)
    buffer = torch.empty(plan.query_rows * plan.block_rows, dtype=torch_dtype)
    best: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def finish(q0: int, q1: int) -> None:
        for largest, values_out, index_out in ((True, helpful_val, helpful_idx), (False, harmful_val, harmful_idx)):
            values, index = best[largest]
            order = values.argsort(dim=1, descending=largest, stable=True)
            values_out[q0:q1] = values.gather(1, order).numpy()
            index_out[q0:q1] = index.gather(1, order).numpy()

    batch = None
    for q0, q1, negated, r0, r1, block in _stream(plan, queries, cache, prefetch):
        if batch != (q0, q1):
            if batch is not None:
                finish(*batch)
            batch, best = (q0, q1), {}
        scores = buffer[: (q1 - q0) * (r1 - r0)].view(q1 - q0, r1 - r0)
        torch.mm(negated, block.T, out=scores)
        with _one_thread():
            for largest in (True, False):
                values, index = _block_top(scores, k, largest)
                index = index + r0
                if largest in best:
                    values = torch.cat([best[largest][0], values], 1)
                    index = torch.cat([best[largest][1], index], 1)
                    kept = values.topk(k, dim=1, largest=largest, sorted=False).indices
                    values, index = values.gather(1, kept), index.gather(1, kept)
                best[largest] = (values, index)
    finish(*batch)
    return TopK(helpful_idx, helpful_val, harmful_idx, harmful_val)


# ---------------------------------------------------------------------------- self-influence
def self_scores(query_rows: BlockReader, cache: Cache, memory_bytes: int = DEFAULT_MEMORY_BYTES, *,
                name: str = "score_memory_bytes") -> np.ndarray:
    """``score(m, m) = -ψ_mᵀ t(m)`` in float64, with both sides streamed in the same blocks."""
    item = np.dtype(cache.dtype).itemsize
    # Per row: the cache block (and the one read ahead), ψ, and float64 copies of both and their product.
    plan = plan_blocks(1, cache, memory_bytes, cell_bytes=0.0, query_row_bytes=0.0,
                       row_bytes=_cache_row_bytes(cache, PREFETCH) + cache.dim * (item + 3 * 8), name=name)
    out = np.empty(cache.num_rows, dtype=np.float64)
    rows_only = Queries(lambda start, stop: np.empty((0, cache.dim), cache.dtype), 1)
    for _, _, _, r0, r1, block in _stream(plan, rows_only, cache, PREFETCH):
        psi = torch.from_numpy(np.ascontiguousarray(query_rows(r0, r1))).to(torch.float64)
        out[r0:r1] = -(psi * block.to(torch.float64)).sum(1).numpy()
    return out



# ---------------------------------------------------------------------------- reductions over queries
#: How :func:`reduce_over_queries` combines a training example's scores over the queries.
REDUCTIONS = ("total", "mean", "worst")


def reduce_over_queries(queries: Queries | np.ndarray, cache: Cache, reduction: str,
                        memory_bytes: int = DEFAULT_MEMORY_BYTES, *, name: str = "score_memory_bytes") -> np.ndarray:
    """One number per training row over all queries, in float64, without the ``(Q, N)`` matrix.

    ``"total"`` is ``Σ_q score(q, i)``, ``"mean"`` that over ``Q`` and ``"worst"``
    ``min_q score(q, i)`` (the most harmful effect on any query). Scores are linear in
    ψ, so the total is one product with ``Σ_q ψ_q``; the worst case needs every score
    and streams them in blocks like :func:`top_k`.
    """
    if reduction not in REDUCTIONS:
        raise ConfigurationError(f"reduction={reduction!r}; choose one of {', '.join(map(repr, REDUCTIONS))}")
    queries = queries if isinstance(queries, Queries) else Queries.of(queries)
    out = np.empty(cache.num_rows, dtype=np.float64)
    item = np.dtype(cache.dtype).itemsize
    if reduction in ("total", "mean"):
        plan = plan_blocks(1, cache, memory_bytes, cell_bytes=0.0, query_row_bytes=0.0,
                           row_bytes=_cache_row_bytes(cache, PREFETCH) + cache.dim * 8 + 8, name=name)
        step = max(1, plan.block_rows)
        summed = np.zeros(cache.dim, dtype=np.float64)
        for q0 in range(0, queries.count, step):
            summed += np.asarray(queries.read(q0, min(q0 + step, queries.count)), dtype=np.float64).sum(0)
        if reduction == "mean":
            summed /= queries.count
        direction = torch.from_numpy(summed)
        rows_only = Queries(lambda start, stop: np.empty((0, cache.dim), cache.dtype), 1)
        for _, _, _, r0, r1, block in _stream(plan, rows_only, cache, PREFETCH):
            out[r0:r1] = -(block.to(torch.float64) @ direction).numpy()
        return out
    # Per score: the score block and its float64 copy; per row, the running minimum.
    plan = plan_blocks(queries.count, cache, memory_bytes, cell_bytes=item + 8,
                       query_row_bytes=2 * cache.dim * item, row_bytes=_cache_row_bytes(cache, PREFETCH) + 16,
                       name=name)
    out.fill(np.inf)
    for _, _, negated, r0, r1, block in _stream(plan, queries, cache, PREFETCH):
        lowest = torch.mm(negated, block.T).to(torch.float64).amin(0).numpy()
        np.minimum(out[r0:r1], lowest, out=out[r0:r1])
    return out
