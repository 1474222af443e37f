"""Random projections from parameter space (p) to the small space (k).

A projector only maps. It takes per-example gradient rows ``(B, p)`` to features
``(B, k)`` (:meth:`Projector.project`), takes the same rows given as consecutive column
pieces (:meth:`Projector.project_pieces`) and describes itself
(:meth:`Projector.describe`). How the gradients are obtained (``torch.func.vmap``,
hooks on Linear, Conv1D and Conv2d layers, factored layer captures) is the business of
:class:`~srcproj.gradients.ProjectedGradients`, which picks a gradient backend from
what the projector declares:

``accepts_pieces``
    :meth:`~Projector.project_pieces` reads the pieces one at a time, in column order,
    never concatenating them, so a backend may form each piece only when it is asked
    for (one layer's gradients at a time, in one reused buffer). Without it, backends
    give :meth:`~Projector.project` whole rows. The attribute is declared per class: a
    class whose body defines ``project()`` without also stating ``accepts_pieces`` gets
    ``accepts_pieces = False``, so a subclass that wraps or changes ``project()`` sees
    every gradient row and is never bypassed by the piece path. A subclass whose
    ``project()`` is still the same map as its ``project_pieces()`` may state
    ``accepts_pieces = True`` itself.
``factored``
    The projector maps a layer's factors (its inputs and output gradients) instead of
    gradient rows (:class:`KroneckerProjector`); it is laid out over the model's layers
    first (:meth:`KroneckerProjector.lay_out`).

One projector (one seed) serves every checkpoint, segment, training example and query
of a store: otherwise the small spaces do not line up. The store records
:meth:`~Projector.describe` and refuses features from any other projector.

Precision: a projection sums p products per feature, so it accumulates in at least
float32 (:func:`accumulation_dtype`): gradients of a bfloat16 or float16 model are
projected in float32 and their features are float32 (summed in 16 bits, their relative
error would grow like √p: about 3e-3 at p = 2·10⁵ in bfloat16). float32 and float64
gradients are projected in their own dtype, as before.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigurationError
from .gradients import FactoredLayer, FactoredSplit, GradientPieces, factored_split, project_layer_inputs
from .validation import check_choice, check_int

__all__ = ["Projector", "RademacherProjector", "KroneckerProjector", "MatrixProjector", "FastJLProjector",
           "accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a projection of ``dtype`` gradients sums in and returns its features in.

    float32 for 16-bit floating types (bfloat16, float16), otherwise ``dtype`` itself
    (float32 stays float32, float64 stays float64).
    """
    return torch.promote_types(dtype, torch.float32)


class Projector(ABC):
    """Maps gradient rows ``(B, p)`` to features ``(B, k)`` with ``E[P^T P] = I``.

    Subclasses implement :meth:`project` and :meth:`describe` and declare their
    capabilities (``accepts_pieces``, ``factored``; see the module docstring).

    The projectors of srcproj sum in, and return, :func:`accumulation_dtype` of the
    gradients' dtype: float32 features for bfloat16 or float16 gradients, the
    gradients' own dtype otherwise. Callers convert features to float64 on the CPU, so
    a custom projector may return any floating dtype.
    """

    proj_dim: int
    accepts_pieces: bool = False  # project_pieces() reads lazily formed pieces one at a time
    factored: bool = False  # maps layer factors, laid out over the model's layers

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A new project() may not be the map the inherited piece path computes: it keeps
        # the capability only by saying so in the same class body.
        if "project" in cls.__dict__ and "accepts_pieces" not in cls.__dict__:
            cls.accepts_pieces = False

    @abstractmethod
    def project(self, grads: Tensor) -> Tensor:
        """Project rows of ``grads`` (shape ``(B, p)``) to shape ``(B, proj_dim)``
        (in :func:`accumulation_dtype` of their dtype)."""

    def project_pieces(self, pieces: Sequence[Tensor]) -> Tensor:
        """Project rows given as consecutive column pieces ``(B, p_i)``: their concatenation
        is the gradient. The default concatenates them and calls :meth:`project`."""
        if not isinstance(pieces, GradientPieces):
            pieces = GradientPieces.of(pieces)
        return self.project(pieces.cat())

    @abstractmethod
    def describe(self) -> dict:
        """A JSON-able description; two projectors with equal descriptions are equal."""


def _check_dim(proj_dim: int) -> int:
    return check_int(proj_dim, "proj_dim", minimum=1, hint=" (the projection size k: an integer >= 1)")


def _check_seed(seed: int) -> int:
    return check_int(seed, "seed", minimum=0)


# ---------------------------------------------------------------------------- sign generation
# Signs come from Philox4x64, a counter-based generator: word w of a stream keyed by
# (seed, ...) is a pure function of the key and w, so any range of the stream can be
# generated on its own. Bit j (least significant first) of stream byte i is the sign of
# entry 8i + j: set = +1, clear = -1. A byte indexes a 256 x 8 table of signed values,
# so one gather writes the scaled floating-point entries directly.
_SIGN_TABLE = torch.tensor([[1.0 if (byte >> bit) & 1 else -1.0 for bit in range(8)] for byte in range(256)],
                           dtype=torch.float64)


def _stream_key(*words: int) -> np.ndarray:
    return np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint64)


def _stream_bytes(key: np.ndarray, first_word: int, num_words: int) -> np.ndarray:
    """Bytes of words ``first_word .. first_word + num_words - 1`` (first_word divisible by 4)."""
    generator = np.random.Philox(key=key, counter=first_word // 4)
    return generator.random_raw(num_words).astype("<u8", copy=False).view(np.uint8)


def _expand_signs(raw: np.ndarray, table: Tensor, out: Tensor | None = None,
                  index: Tensor | None = None) -> Tensor:
    """``(8 * len(raw),)`` signed entries of ``table`` (shape (256, 8)) selected by ``raw``'s bits.

    ``out`` and ``index`` (int32, ``len(raw)`` entries, on the table's device) are
    optional reused buffers.
    """
    source = torch.from_numpy(raw)
    if index is None:
        index = source.to(device=table.device, dtype=torch.int32)
    else:
        index.copy_(source)
    if out is None:
        return torch.index_select(table, 0, index).reshape(-1)
    torch.index_select(table, 0, index, out=out.view(-1, 8))
    return out


def _rademacher_matrix(key: np.ndarray, rows: int, cols: int) -> Tensor:
    """A float64 ``rows × cols`` matrix of ±1/√rows from the stream ``key`` (row-major)."""
    words = math.ceil(rows * cols / 64)
    words += -words % 4
    signs = _expand_signs(_stream_bytes(key, 0, words), _SIGN_TABLE)
    return signs[: rows * cols].reshape(rows, cols) / math.sqrt(rows)


class RademacherProjector(Projector):
    """Seeded Rademacher matrix with entries ±1/√k, generated tile by tile.

    Column ``i`` of the k×p matrix depends only on ``(seed, i, k)``: the matrix is the
    same whatever the batch size, the number of parameters processed at once, or the
    device, and the full matrix never has to exist. The transposed matrix, read row by
    row (parameter by parameter), is the bit stream of a Philox4x64 generator keyed by
    ``(seed, k)``; tiles of 512 parameters are generated independently from their place
    in that stream, directly in the accumulation dtype (:func:`accumulation_dtype` of
    the gradients': float32 for 16-bit gradients, whose blocks of columns are converted
    to float32 as they are multiplied) and on the gradients' device, and kept in memory
    up to ``cache_bytes`` (across batches, checkpoints and queries). Past that budget the
    remaining tiles are regenerated for every batch into one reused buffer (several GB/s
    on two CPU cores, against about 0.4 GB/s for version 1's generator).

    Declares ``accepts_pieces``: :meth:`project_pieces` reads the gradient pieces one
    at a time, in column order, against the matching rows of the matrix, so
    :class:`~srcproj.gradients.ProjectedGradients` may form one layer's per-example
    gradients at a time (from hooks, in one reused buffer) instead of whole rows. A
    subclass that defines ``project()`` loses the capability unless it states
    ``accepts_pieces = True`` itself (then its ``project()`` must stay this map).

    Parameters
    ----------
    proj_dim : int
        k, the projected dimension.
    seed : int
        Decides the matrix (an integer >= 0).
    cache_bytes : int
        Memory for keeping generated tiles (default 1 GiB).
    """

    TILE = 512  # parameters per generated tile; fixed so the matrix never depends on it
    VERSION = 2  # 1: one numpy SeedSequence per tile and unpackbits (stores of 0.1.0)
    BLOCK_BYTES = 64 << 20  # large blocks keep the matmuls efficient (inner dimension ~8k at k=2048)
    accepts_pieces = True  # stated in this body because it defines project()

    def __init__(self, proj_dim: int, seed: int = 0, cache_bytes: int = 1 << 30) -> None:
        self.proj_dim = _check_dim(proj_dim)
        self.seed = _check_seed(seed)
        self.cache_bytes = check_int(cache_bytes, "cache_bytes", minimum=0)
        self._cache: dict[tuple, Tensor] = {}
        self._cached_bytes = 0
        self._key = _stream_key(self.seed, self.proj_dim, 0x52414430)
        self._tables: dict[tuple, Tensor] = {}
        self._scratch: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._warned_regeneration = False

    def describe(self) -> dict:
        return {"kind": "rademacher", "version": self.VERSION, "proj_dim": self.proj_dim, "seed": self.seed,
                "tile": self.TILE}

    def _table(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        table = self._tables.get((dtype, device))
        if table is None:
            table = (_SIGN_TABLE / math.sqrt(self.proj_dim)).to(device=device, dtype=dtype)
            self._tables[(dtype, device)] = table
        return table

    def _generate(self, start_tile: int, stop_tile: int, dtype: torch.dtype, device: torch.device,
                  out: Tensor | None = None, index: Tensor | None = None) -> Tensor:
        """Tiles ``start_tile .. stop_tile - 1`` of Pᵀ, shape ``(tiles · TILE, k)``."""
        words_per_tile = self.TILE * self.proj_dim // 64  # TILE is a multiple of 256
        raw = _stream_bytes(self._key, start_tile * words_per_tile, (stop_tile - start_tile) * words_per_tile)
        return _expand_signs(raw, self._table(dtype, device), out, index).view(-1, self.proj_dim)

    def _tile(self, index: int) -> np.ndarray:
        """Tile ``index`` of Pᵀ as int8 ±1, shape ``(TILE, k)`` (for inspection and tests)."""
        block = self._generate(index, index + 1, torch.float64, torch.device("cpu"))
        return (block > 0).numpy().astype(np.int8) * 2 - 1

    def _block(self, start_tile: int, stop_tile: int, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (start_tile, stop_tile, dtype, device)
        block = self._cache.get(key)
        if block is None:
            entries = (stop_tile - start_tile) * self.TILE * self.proj_dim
            size = entries * torch.empty(0, dtype=dtype).element_size()
            if self._cached_bytes + size <= self.cache_bytes:
                block = self._generate(start_tile, stop_tile, dtype, device)
                self._cache[key] = block
                self._cached_bytes += size
            else:
                if device.type != "cpu" and not self._warned_regeneration:
                    self._warned_regeneration = True
                    warnings.warn(
                        f"RademacherProjector(cache_bytes={self.cache_bytes:,}) keeps only part of its k×p "
                        f"matrix on {device}; the rest is regenerated on the CPU for every batch, which "
                        f"makes the projection up to 10x slower on a GPU. Pass a cache_bytes of at least "
                        f"proj_dim * num_params * {torch.empty(0, dtype=dtype).element_size()} bytes if the "
                        f"device has the memory", RuntimeWarning, stacklevel=2)
                # Regenerated every batch: into one buffer, never a fresh allocation
                # (fresh pages cost more than generating the signs).
                scratch, index = self._scratch.get((dtype, device), (None, None))
                if scratch is None or scratch.numel() < entries:
                    scratch = torch.empty(entries, dtype=dtype, device=device)
                    index = torch.empty(entries // 8, dtype=torch.int32, device=device)
                    self._scratch[(dtype, device)] = (scratch, index)
                block = self._generate(start_tile, stop_tile, dtype, device, scratch[:entries],
                                       index[: entries // 8])
        return block[:rows]

    def _tiles_per_block(self, dtype: torch.dtype) -> int:
        # Small blocks: a regenerated block is still in the CPU cache when the matmul
        # reads it. Cached blocks gain nothing from being larger.
        per_tile = self.TILE * self.proj_dim * torch.empty(0, dtype=dtype).element_size()
        return max(1, self.BLOCK_BYTES // per_tile)

    def row_blocks(self, lo: int, hi: int, dtype: torch.dtype, device: torch.device | str,
                   num_params: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """Rows ``lo .. hi - 1`` of Pᵀ (the columns of P that multiply parameters
        ``lo .. hi - 1``) as consecutive pieces ``(start, stop, rows (stop - start, k))``.

        The pieces are slices of the blocks :meth:`project_pieces` generates, taken from
        (and kept in) the same cache within ``cache_bytes``, so asking for rows never
        generates a block twice while it fits. A piece of a block past that budget lives
        in a reused buffer: it is valid only until the next piece is asked for, and no
        piece may be written to.

        Parameters
        ----------
        lo, hi : int
            The parameter range, ``0 <= lo <= hi``.
        dtype, device
            The entries' dtype (the accumulation dtype of the gradients, as
            :meth:`project_pieces` uses) and device.
        num_params : int, optional
            p, the number of parameters of the gradients the matrix projects: the last
            block then ends where :meth:`project_pieces`'s does, and is shared with it
            (default ``hi``).
        """
        lo, hi = int(lo), int(hi)
        num_params = hi if num_params is None else int(num_params)
        if not 0 <= lo <= hi <= num_params:
            raise ConfigurationError(f"rows {lo}..{hi} of a projection of {num_params} parameters")
        device = torch.device(device)
        tiles = math.ceil(num_params / self.TILE)
        step = self._tiles_per_block(dtype)
        start = (lo // self.TILE) // step * step  # the block boundaries of project_pieces
        while lo < hi and start * self.TILE < hi:
            stop = min(start + step, tiles)
            b_lo, b_hi = start * self.TILE, min(stop * self.TILE, num_params)
            block = self._block(start, stop, b_hi - b_lo, dtype, device)
            a, b = max(lo, b_lo), min(hi, b_hi)
            yield a, b, block[a - b_lo:b - b_lo]
            start = stop

    def rows_of(self, lo: int, hi: int, dtype: torch.dtype, device: torch.device | str,
                num_params: int | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``lo .. hi - 1`` of Pᵀ in one tensor ``(hi - lo, k)`` (see :meth:`row_blocks`).

        A range within one cached block is returned as a view of it (read-only); any
        other range is copied into ``out`` (a buffer of at least ``(hi - lo) · k``
        entries of ``dtype`` on ``device``, reused by a caller that asks for many
        ranges) or a new tensor, which stays valid until the caller overwrites it.
        """
        device = torch.device(device)
        rows_out = None
        for a, b, rows in self.row_blocks(lo, hi, dtype, device, num_params):
            if rows_out is None and a == lo and b == hi and self._holds(rows):
                return rows
            if rows_out is None:
                rows_out = (torch.empty(hi - lo, self.proj_dim, dtype=dtype, device=device) if out is None
                            else out.view(-1)[: (hi - lo) * self.proj_dim].view(hi - lo, self.proj_dim))
            rows_out[a - lo:b - lo].copy_(rows)
        return rows_out if rows_out is not None else torch.empty(0, self.proj_dim, dtype=dtype, device=device)

    def _holds(self, rows: Tensor) -> bool:
        """Whether ``rows`` is a view of a cached block (not of the reused buffer)."""
        storage = rows.untyped_storage().data_ptr()
        return any(block.untyped_storage().data_ptr() == storage for block in self._cache.values())

    def project(self, grads: Tensor) -> Tensor:
        if grads.ndim != 2:
            raise ConfigurationError(f"project() takes rows (B, p), got shape {tuple(grads.shape)}")
        return self.project_pieces([grads])

    def project_pieces(self, pieces: Sequence[Tensor]) -> Tensor:
        """Project rows given as consecutive column pieces ``(B, p_i)`` (their concatenation
        is the gradient), without concatenating them.

        ``pieces`` may be a :class:`~srcproj.gradients.GradientPieces` whose pieces are
        formed on demand: they are asked for in increasing order, and only the latest
        one is kept.
        """
        if not isinstance(pieces, GradientPieces):
            pieces = GradientPieces.of(pieces)
        sizes, batch, device = pieces.sizes, pieces.batch, pieces.device
        dtype = accumulation_dtype(pieces.dtype)  # 16-bit gradients: summed (and returned) in float32
        num_params = int(sum(sizes))
        out = torch.zeros(batch, self.proj_dim, dtype=dtype, device=device)
        bounds = np.cumsum([0] + [int(size) for size in sizes])
        tiles = math.ceil(num_params / self.TILE)
        step = self._tiles_per_block(dtype)
        current, values = -1, None
        for start in range(0, tiles, step):
            stop = min(start + step, tiles)
            lo, hi = start * self.TILE, min(stop * self.TILE, num_params)
            block = self._block(start, stop, hi - lo, dtype, device)
            # The pieces overlapping columns lo..hi-1: one matmul each, no copy.
            for index in range(int(np.searchsorted(bounds, lo, side="right")) - 1, len(sizes)):
                p_lo, p_hi = int(bounds[index]), int(bounds[index + 1])
                if p_lo >= hi:
                    break
                a, b = max(lo, p_lo), min(hi, p_hi)
                if b > a:
                    if index != current:
                        values = None  # free the previous piece before forming this one
                        current, values = index, pieces[index]
                    columns = values[:, a - p_lo:b - p_lo]
                    if columns.dtype != dtype:  # one block's columns at a time: no float32 copy of the rows
                        columns = columns.to(dtype)
                    out.addmm_(columns, block[a - lo:b - lo])
        return out


def _water_fill(total: int, caps: list[int]) -> list[int]:
    """Equal integer shares of ``total`` (the first groups get the remainder), none above its cap
    while another group can still take more; the shares sum to ``total``."""
    shares = [0] * len(caps)
    remaining, open_groups = total, list(range(len(caps)))
    while remaining and open_groups:
        each = remaining // len(open_groups)
        full = [g for g in open_groups if caps[g] - shares[g] <= each]
        if full:  # these groups are filled to their cap; share the rest among the others
            for g in full:
                remaining -= caps[g] - shares[g]
                shares[g] = caps[g]
                open_groups.remove(g)
            continue
        for position, g in enumerate(open_groups):
            extra = each + (1 if position < remaining - each * len(open_groups) else 0)
            shares[g] += extra
        remaining = 0
    for position in range(remaining):  # every group is at its cap: k exceeds p
        shares[position % len(shares)] += 1
    return shares


def _kron_shape(dims: int) -> tuple[int, int]:
    """``(k_out, k_in)`` for a layer of ``dims`` features: the most balanced factorisation,
    exact when ``dims`` has a divisor within a factor √2 of √dims, else ⌈dims/k_in⌉ × k_in
    truncated to ``dims``."""
    root = math.sqrt(dims)
    candidates = [k for k in range(max(1, math.ceil(root / math.sqrt(2))), math.floor(root * math.sqrt(2)) + 1)
                  if dims % k == 0]
    if candidates:
        k_in = min(candidates, key=lambda k: (abs(math.log(k / root)), k))
        return dims // k_in, k_in
    k_in = max(1, round(root))
    return math.ceil(dims / k_in), k_in


# ---------------------------------------------------------------------------- version 2 layout
# The shares come from +, *, / and sqrt only (correctly rounded in IEEE 754), so a layout
# is the same on every machine: a store made on one is reopened on another.
_IDENTITY, _RANDOM = "identity", "rademacher"


def _share_weight(size: int) -> float:
    """A group's weight in the division of k: the square root of its number of parameters.

    Measured by LDS on the digits MLP (docs/benchmarks.md, "Factored projection,
    version 2") against equal shares (version 1's rule), the 3/4 power and the size
    itself: best at k = 512, within noise of the best at 1024 and 2048.
    """
    return math.sqrt(size)


def _proportional_fill(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Integer shares of ``total``: 1 each, and the rest proportional to ``weights``, none above its cap.

    A group whose proportional share of the rest reaches its cap gets the cap and the
    others share what is left; then the shares are rounded down and the units left go
    to the largest fractional parts (the first group on a tie). The shares sum to
    ``min(total, sum(caps))``. Needs ``total >= len(weights)`` and every cap ``>= 1``.
    """
    # One each first, so that a group with a tiny weight still gets its dimension.
    shares = [1] * len(weights)
    room = [cap - 1 for cap in caps]
    remaining = min(total, sum(caps)) - len(weights)
    open_groups = [g for g in range(len(weights)) if room[g] > 0]
    ideal: dict[int, float] = {}
    while open_groups:
        weight_sum = sum(weights[g] for g in open_groups)
        ideal = {g: remaining * weights[g] / weight_sum for g in open_groups}
        capped = [g for g in open_groups if ideal[g] >= room[g]]
        if not capped:
            break
        for g in capped:  # what they leave only raises the others' shares
            shares[g] += room[g]
            remaining -= room[g]
            open_groups.remove(g)
    extra = {g: math.floor(ideal[g]) for g in open_groups}
    left = remaining - sum(extra.values())
    for g in sorted(open_groups, key=lambda g: (extra[g] - ideal[g], g))[:left]:
        extra[g] += 1
    for g, value in extra.items():
        shares[g] += value
    return shares


def _factor_shape(share: int, d_out: int, d_in: int) -> dict:
    """``k_out``, ``k_in``, ``dims`` and the kind of each factor of a layer given ``share`` dimensions.

    The candidates: exact (identity on both sides) when ``d_out·d_in <= share``;
    otherwise the identity on the outputs and ``k_in = ⌈share/d_out⌉`` random rows on
    the inputs (ragged: the last outputs get one row fewer, so that ``dims = share``),
    its mirror image, and random on both sides (``_kron_shape(share)``, truncated to
    ``share`` as in version 1). A random factor of k rows estimates inner products with
    relative variance about 1/k and the identity with none, so a layer's is about
    ``(1 + v_out)(1 + v_in) - 1``; the smallest wins (the first on a tie). Balanced
    random factors cost about 2/√share and the identity on ``d_out`` outputs
    ``d_out/share``: the identity wins when ``d_out`` is below about ``2√share``, twice
    the random factor's rows. Only an exact layer uses fewer than ``share`` dimensions.
    """
    if d_out * d_in <= share:
        return {"k_out": d_out, "k_in": d_in, "dims": d_out * d_in, "out": _IDENTITY, "in": _IDENTITY}
    candidates = []  # (relative variance, k_out, k_in, out kind, in kind)
    if share >= d_out:  # every output gets at least one input row; ⌈share/d_out⌉ <= d_in
        candidates.append((d_out / share, d_out, -(-share // d_out), _IDENTITY, _RANDOM))
    if share >= d_in:
        candidates.append((d_in / share, -(-share // d_in), d_in, _RANDOM, _IDENTITY))
    k_out, k_in = _kron_shape(share)
    if k_out <= d_out and k_in <= d_in:  # always so when share is below both dimensions
        candidates.append(((1 + 1 / k_out) * (1 + 1 / k_in) - 1, k_out, k_in, _RANDOM, _RANDOM))
    _, k_out, k_in, out_kind, in_kind = min(candidates, key=lambda c: c[0])
    return {"k_out": k_out, "k_in": k_in, "dims": share, "out": out_kind, "in": in_kind}


def _allot(total: int, layer_dims: Sequence[tuple[int, int]], other_size: int) -> tuple[list[dict], int, int]:
    """Version 2's division of ``total`` dimensions: ``(layer shapes, other parameters' share, zeros)``.

    Shares by :func:`_share_weight`, none above its group's number of parameters (a
    group given that many is exact); every layer then uses its whole share
    (:func:`_factor_shape`). ``other_size``: the number of other parameters (0: none).
    What is left when every group is exact (k above the number of parameters) is zeros.
    """
    sizes = [d_out * d_in for d_out, d_in in layer_dims] + ([other_size] if other_size else [])
    shares = _proportional_fill(total, [_share_weight(size) for size in sizes], sizes)
    shapes = [_factor_shape(share, d_out, d_in) for share, (d_out, d_in) in zip(shares, layer_dims, strict=False)]
    return shapes, (shares[-1] if other_size else 0), total - sum(shares)


def _ragged_scale(major: int, minor: int, dims: int) -> Tensor | None:
    """Scales of the first ``dims`` features of a ``major × minor`` outer product, flattened
    row-major, whose ``minor`` side is the identity and ``major`` side random.

    The last ``t = major·minor - dims`` minor indices lose their last random row; their
    features are scaled by ``√(major/(major-1))`` so that every column of P keeps norm 1.
    None when nothing is truncated.
    """
    short = major * minor - dims
    if short == 0:
        return None
    scale = torch.ones(major, minor, dtype=torch.float64)
    scale[:, minor - short:] = math.sqrt(major / (major - 1))
    return scale.reshape(-1)[:dims]


class KroneckerProjector(Projector):
    """Factored (Kronecker) projection for Linear, Conv1D and Conv2d layers, never forming a gradient.

    The per-example gradient of a Linear layer is ``Σ_t δ_t a_tᵀ`` (``a``: the layer's
    inputs, ``δ``: the gradient in its outputs, ``t`` over positions of sequence inputs;
    for a Conv2d, ``a_t`` is the input patch of output pixel ``t``). With two factors
    ``P_in`` (k_in × d_in) and ``P_out`` (k_out × d_out), each a seeded Rademacher
    matrix (entries ±1/√k) or the identity, ``(P_out ⊗ P_in) vec(δaᵀ) = vec(P_out δ
    (P_in a)ᵀ)``, so a layer's features are ``Σ_t (P_out δ_t)(P_in a_t)ᵀ``, flattened:
    the inputs and output gradients are projected separately (:meth:`project_inputs`,
    :meth:`layer_features`) and the p-sized gradient never exists. The features of any
    gradient are ``P g`` for one fixed matrix P, whichever path computes them, with
    ``E[PᵀP] = I`` (every column of P has norm 1). An attributed bias is the weight of
    an extra input column of ones: ``P_in`` has ``d_in + 1`` columns.

    How k is divided (version 2): every group (each factored layer, and the other
    parameters below) gets a share of ``proj_dim`` proportional to the square root of its
    number of parameters (at least 1, integers summing to k, none above the group's
    size: a group given that many is exact, the identity, and the rest goes to the
    others). Within a layer of share ``m`` (``d_in`` counts the bias column), a factor
    whose dimension is below about twice its random share of rows is the identity: a
    10-output layer keeps its 10 outputs exactly and spends ``m`` on ``⌈m/10⌉`` input
    rows (the last outputs get one row fewer when 10 does not divide ``m``). The choice
    among identity on the outputs, on the inputs, on both (``d_out·d_in <= m``) and
    random on both (``k_in ≈ √m``, as in version 1) minimises a variance proxy
    (:func:`_factor_shape`). Identity factors are unscaled (their columns have norm 1);
    a truncated random row is made up for by scaling the features of the columns that
    lose it, so every column of P still has norm 1 and ``E[PᵀP] = I``. The features of
    the layers are concatenated in the model's order, the other parameters' last; when
    k exceeds the number of parameters, the last layer's features end with zeros.
    :meth:`describe` (recorded in the store) lists the exact layout. Version 1 (equal
    shares, random factors on both sides even for a 10-output layer) is rebuilt with
    ``version=1``.

    Parameters outside a factored layer (LayerNorm, embeddings, Conv2d with groups, a
    layer whose weight is also used outside its forward, ...) are, with
    ``other_params="dense"`` (the default), projected together by a
    :class:`RademacherProjector` of their own share of k (:meth:`project_dense`), from
    per-example gradients of those parameters only. ``other_params="refuse"`` raises
    :class:`ConfigurationError` instead, naming them.

    Declares ``factored``: :class:`~srcproj.gradients.ProjectedGradients` lays the
    projector out over the layers it finds (:meth:`lay_out`; :meth:`bind` does the same
    from a model), captures every layer's inputs and output gradients in one batched
    forward and backward pass and hands them to :meth:`project_inputs` and
    :meth:`layer_features`; one projector serves one model. :meth:`project` takes flat
    gradient rows too, with the same matrix.

    Parameters
    ----------
    proj_dim : int
        k, the total projected dimension.
    seed : int
        Decides every matrix (an integer >= 0).
    other_params : {"dense", "refuse"}
        What to do with attributed parameters outside factored layers.
    cache_bytes : int
        Tile cache of the dense projection of the other parameters.
    version : {2, 1}
        The layout rule; 1 only to rebuild the projector of a store made with it.
    """

    VERSION = 2  # 1: equal shares, random factors on both sides (stores made before version 2)
    VERSIONS = (1, 2)  # the versions a description can be rebuilt from
    factored = True

    def __init__(self, proj_dim: int, seed: int = 0, *, other_params: str = "dense",
                 cache_bytes: int = 1 << 30, version: int = VERSION) -> None:
        self.version = check_choice(version, "version", self.VERSIONS)
        self.proj_dim = _check_dim(proj_dim)
        self.seed = _check_seed(seed)
        self.other_params = check_choice(other_params, "other_params", ("dense", "refuse"))
        self.cache_bytes = check_int(cache_bytes, "cache_bytes", minimum=0)
        self.layers: list[FactoredLayer] | None = None
        self.dense_params: list[str] = []
        self.param_names: list[str] | None = None
        self._layout: list[dict] = []
        self._dense: RademacherProjector | None = None
        self._matrices: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        self._padding = 0  # zero features at the end of the last layer's (version 2, k > p)
        self._dense_dims = 0
        self._scales: dict[tuple, Tensor | None] = {}

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> KroneckerProjector:
        """A new, unbound projector equal to the one ``description`` (:meth:`describe`'s
        output, as a store records it) describes, of any version in :attr:`VERSIONS`; it
        lays itself out again when bound to the same model.

        Raises :class:`ConfigurationError` for another kind or an unknown version.
        """
        version = description.get("version")
        if description.get("kind") != "kronecker" or version not in cls.VERSIONS:
            raise ConfigurationError(
                f"cannot rebuild a KroneckerProjector from kind={description.get('kind')!r}, version={version!r} "
                f"(versions {cls.VERSIONS} are known); pass the same projector again with projector=..."
            )
        return cls(int(description["proj_dim"]), int(description["seed"]),
                   other_params=str(description["other_params"]), version=int(version))

    # ------------------------------------------------------------------ laying out
    def bind(self, model: nn.Module, param_names: Sequence[str] | None = None, *,
             params: Mapping[str, Tensor] | None = None, example: Tensor | None = None) -> None:
        """Lay out the features of ``model``'s attributed parameters (default: every one
        with ``requires_grad``), as :class:`~srcproj.gradients.ProjectedGradients` does.

        With ``params`` (a full state dict) and ``example`` (a few inputs, model in
        eval mode), each layer is first checked on the example: a layer whose gradient
        is not the product of its inputs and output gradients joins the other parameters
        (:func:`~srcproj.gradients.factored_split`). Then :meth:`lay_out`.
        """
        self.lay_out(factored_split(model, param_names, params, example))

    def lay_out(self, split: FactoredSplit) -> None:
        """Divide k among the factored layers and the other parameters of ``split``.

        Raises :class:`ConfigurationError` when there is no factored layer, when
        ``other_params="refuse"`` and there are other parameters, when k is smaller than
        the number of groups, or when the projector is already laid out differently.
        """
        layers, others, names = list(split.layers), list(split.others), list(split.param_names)
        if not layers:
            raise ConfigurationError(
                "KroneckerProjector found no Linear, Conv1D or Conv2d layer among the attributed parameters "
                f"({len(names)} tensors); use RademacherProjector (the default) for this model"
            )
        if others and self.other_params == "refuse":
            listed = "; ".join(f"{n} ({split.reasons.get(n, '')})" for n in others[:6])
            raise ConfigurationError(
                f"KroneckerProjector(other_params='refuse'): {len(others)} attributed parameters are not in "
                f"a factored Linear/Conv1D/Conv2d layer: {listed}{' ...' if len(others) > 6 else ''}; "
                "attribute only factored layers with modules=[...], or use other_params='dense'"
            )
        groups = len(layers) + (1 if others else 0)
        if self.proj_dim < groups:
            raise ConfigurationError(
                f"proj_dim={self.proj_dim} is smaller than the {groups} groups of the factored projection "
                f"({len(layers)} layers{' and the other parameters' if others else ''}): each needs one dimension"
            )
        other_size = sum(split.sizes[n] for n in others)
        layout = []
        if self.version == 1:
            caps = [layer.d_out * layer.d_in_total for layer in layers] + ([other_size] if others else [])
            shares = _water_fill(self.proj_dim, caps)
            shapes = [dict(zip(("k_out", "k_in"), _kron_shape(dims), strict=True), dims=dims)
                      for dims in shares[: len(layers)]]
            other_dims, padding = (shares[-1] if others else 0), 0
        else:
            shapes, other_dims, padding = _allot(self.proj_dim, [(layer.d_out, layer.d_in_total) for layer in layers],
                                                 other_size)
        for layer, shape in zip(layers, shapes, strict=True):
            layout.append({"module": layer.module, "type": layer.kind, "d_out": layer.d_out, "d_in": layer.d_in,
                           "bias": layer.bias is not None, **shape})
        if self.layers is not None and (layout != self._layout or others != self.dense_params
                                        or names != self.param_names):
            raise ConfigurationError(
                "this KroneckerProjector is already bound to another model or parameter set; "
                "create one projector per model"
            )
        self.layers, self._layout, self.dense_params, self.param_names = layers, layout, others, names
        self._padding = padding
        # Version 2 gives the other parameters at most their number: then they are exact.
        self._dense = (RademacherProjector(other_dims, self.seed, self.cache_bytes)
                       if others and (self.version == 1 or other_dims < other_size) else None)
        self._dense_dims = other_dims
        offset = 0
        self._offsets = {}
        for n in names:
            self._offsets[n] = (offset, offset + split.sizes[n])
            offset += split.sizes[n]

    def require_bound(self, param_names: Sequence[str] | None = None) -> list[FactoredLayer]:
        """The factored layers, once laid out (for ``param_names``, in that order, if given)."""
        if self.layers is None:
            raise ConfigurationError(
                "KroneckerProjector is not bound to a model: pass it to Attributor(..., projector=...) "
                "or call projector.bind(model) first"
            )
        if param_names is not None and list(param_names) != self.param_names:
            raise ConfigurationError(
                "this KroneckerProjector was bound to other attributed parameters "
                f"({len(self.param_names)} tensors) than these ({len(param_names)}); create one projector per model"
            )
        return self.layers

    def describe(self) -> dict:
        out = {"kind": "kronecker", "version": self.version, "proj_dim": self.proj_dim, "seed": self.seed,
               "other_params": self.other_params}
        if self.layers is None:
            return {**out, "layers": None}
        dense = None
        if self.dense_params:
            dense = {"params": list(self.dense_params), "dims": self._dense_dims,
                     "projector": self._dense.describe() if self._dense is not None else {"kind": "identity"}}
        out = {**out, "layers": [dict(entry) for entry in self._layout], "dense": dense}
        return out if self.version == 1 else {**out, "padding": self._padding}

    # ------------------------------------------------------------------ matrices
    def _is_identity(self, index: int, side: str) -> bool:
        return self._layout[index].get(side) == _IDENTITY  # version 1 entries have no "out"/"in": random

    def layer_matrices(self, index: int, dtype: torch.dtype = torch.float64,
                       device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(P_out (k_out × d_out), P_in (k_in × d_in [+1 bias column]))`` of layer ``index``;
        an identity factor is the identity matrix."""
        layers = self.require_bound()
        key = (dtype, torch.device(device))
        if key not in self._matrices:
            mats = []
            for i, (layer, entry) in enumerate(zip(layers, self._layout, strict=True)):
                pair = []
                for side, k, d in ((0, entry["k_out"], layer.d_out), (1, entry["k_in"], layer.d_in_total)):
                    if self._is_identity(i, ("out", "in")[side]):
                        matrix = torch.eye(d, dtype=torch.float64)
                    else:
                        matrix = _rademacher_matrix(_stream_key(self.seed, 0x4B524F4E, i, side, k, d), k, d)
                    pair.append(matrix.to(device=key[1], dtype=dtype))
                mats.append(tuple(pair))
            self._matrices[key] = mats
        return self._matrices[key][index]

    def _feature_scale(self, index: int, dtype: torch.dtype, device: torch.device) -> Tensor | float:
        """What the layer's kept features are multiplied by so that every column of P has norm 1."""
        entry = self._layout[index]
        out_identity, in_identity = self._is_identity(index, "out"), self._is_identity(index, "in")
        if out_identity == in_identity:  # random on both sides (a uniform scale, as in version 1) or exact
            return math.sqrt(entry["k_out"] * entry["k_in"] / entry["dims"])
        key = (index, dtype, device)
        if key not in self._scales:
            if out_identity:  # features ordered input row-major: the truncation cuts the last input row
                scale = _ragged_scale(entry["k_in"], entry["k_out"], entry["dims"])
            else:
                scale = _ragged_scale(entry["k_out"], entry["k_in"], entry["dims"])
            self._scales[key] = None if scale is None else scale.to(device=device, dtype=dtype)
        return 1.0 if self._scales[key] is None else self._scales[key]

    def _finish(self, index: int, outer: Tensor) -> Tensor:
        """``(B, k_out, k_in)`` → the layer's ``dims`` features, scaled when truncated.

        Flattened row-major, except with the identity on the outputs only: then input row
        by input row, so that a truncation cuts random rows (of the last outputs), never
        an output. The last layer's features end with the zeros of a k above p.
        """
        if self._is_identity(index, "out") and not self._is_identity(index, "in"):
            outer = outer.transpose(1, 2)
        flat = outer.reshape(outer.shape[0], -1)[:, : self._layout[index]["dims"]]
        scale = self._feature_scale(index, flat.dtype, flat.device)
        if not isinstance(scale, float) or scale != 1.0:
            flat = flat * scale
        if self._padding and index == len(self._layout) - 1:
            flat = torch.cat([flat, flat.new_zeros(flat.shape[0], self._padding)], dim=1)
        return flat

    # ------------------------------------------------------------------ projecting factors
    def project_inputs(self, index: int, module: nn.Module, x: Tensor) -> Tensor:
        """``P_in a_t`` ``(B, T, k_in)`` from layer ``index``'s input ``x`` as the module
        received it (the bias column is ones), in :func:`accumulation_dtype` of ``x``'s."""
        _, p_in = self.layer_matrices(index, accumulation_dtype(x.dtype), x.device)
        return project_layer_inputs(self.layers[index], module, x, p_in)

    def layer_features(self, index: int, projected_inputs: Sequence[Tensor], deltas: Sequence[Tensor], *,
                       batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Layer ``index``'s ``dims`` features ``(batch, dims)``: ``Σ_t (P_out δ_t)(P_in a_t)ᵀ``
        summed over the module's calls.

        ``projected_inputs``: :meth:`project_inputs` of each call; ``deltas``: the matching
        output gradients ``(B, T, d_out)``. No call (the module was not used): zeros.
        ``dtype`` is the gradients'; the features are summed in, and returned in,
        :func:`accumulation_dtype` of it.
        """
        dtype = accumulation_dtype(dtype)
        p_out, _ = self.layer_matrices(index, dtype, device)
        entry = self._layout[index]
        identity_out = self._is_identity(index, "out")
        total = torch.zeros(batch, entry["k_out"], entry["k_in"], dtype=dtype, device=device)
        for a_proj, delta in zip(projected_inputs, deltas, strict=True):  # one term per call of the module
            d_proj = delta.to(dtype) if identity_out else delta.to(dtype) @ p_out.T  # (B, T, k_out)
            total.baddbmm_(d_proj.transpose(1, 2), a_proj.to(dtype))
        return self._finish(index, total)

    def project_dense(self, grads: Tensor) -> Tensor:
        """The other parameters' share: their gradient rows ``(B, p_dense)``, in
        :attr:`dense_params` order, projected by the dense Rademacher matrix (or, in
        version 2 when their share is their number, kept as they are)."""
        self.require_bound()
        if not self.dense_params:
            raise ConfigurationError("this KroneckerProjector has no other parameters to project densely")
        if self._dense is None:
            return grads.to(accumulation_dtype(grads.dtype))
        return self._dense.project(grads)

    # ------------------------------------------------------------------ projecting rows
    def project(self, grads: Tensor) -> Tensor:
        """Flat gradient rows ``(B, p)``, in the bound parameters' order, with the same matrix."""
        layers = self.require_bound()
        if grads.ndim != 2:
            raise ConfigurationError(f"project() takes rows (B, p), got shape {tuple(grads.shape)}")
        expected = max(stop for _, stop in self._offsets.values())
        if grads.shape[1] != expected:
            raise ConfigurationError(
                f"the gradients have {grads.shape[1]} parameters but the projector was bound to {expected}"
            )
        parts = []
        dtype = accumulation_dtype(grads.dtype)
        for index, layer in enumerate(layers):
            p_out, p_in = self.layer_matrices(index, dtype, grads.device)  # identity factors: exact products
            lo, hi = self._offsets[layer.weight]
            weight = layer.from_weight(grads[:, lo:hi].to(dtype))  # (B, d_out, d_in), one layer at a time
            outer = p_out @ (weight @ p_in[:, : layer.d_in].T)  # (B, k_out, k_in)
            if layer.bias is not None:
                lo, hi = self._offsets[layer.bias]
                outer = outer + (grads[:, lo:hi].to(dtype) @ p_out.T).unsqueeze(2) * p_in[:, layer.d_in]
            parts.append(self._finish(index, outer))
        if self.dense_params:
            columns = torch.cat([grads[:, slice(*self._offsets[n])] for n in self.dense_params], dim=1)
            parts.append(self.project_dense(columns))
        return torch.cat(parts, dim=1)


class MatrixProjector(Projector):
    """An explicit k×p matrix (e.g. an orthogonal one for exactness tests).

    Applied as ``grads @ matrix.T`` in :func:`accumulation_dtype` of the gradients'
    dtype (the matrix is converted to it).
    """

    def __init__(self, matrix: Tensor | np.ndarray) -> None:
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or not matrix.is_floating_point():
            raise ConfigurationError("MatrixProjector needs a floating-point k×p matrix")
        self.matrix = matrix
        self.proj_dim = _check_dim(matrix.shape[0])
        digest = hashlib.blake2b(matrix.detach().cpu().to(torch.float64).numpy().tobytes(), digest_size=12)
        self._digest = digest.hexdigest()

    def describe(self) -> dict:
        return {"kind": "matrix", "shape": list(self.matrix.shape), "digest": self._digest}

    def project(self, grads: Tensor) -> Tensor:
        if grads.shape[1] != self.matrix.shape[1]:
            raise ConfigurationError(
                f"the projection matrix has {self.matrix.shape[1]} columns but the gradients "
                f"have {grads.shape[1]} parameters"
            )
        dtype = accumulation_dtype(grads.dtype)
        return grads.to(dtype) @ self.matrix.to(device=grads.device, dtype=dtype).T


class FastJLProjector(Projector):
    """The fast-jl CUDA kernel (TRAK's), scaled by 1/√k to match the Rademacher one.

    The kernel draws its ±1 entries per (output column, feature tile), so its matrix
    depends on the number of parameters p, the seed and ``num_feature_tiles``; TRAK
    sets the latter to the GPU's multiprocessor count, which makes TRAK's matrix depend
    on the GPU model. Here it is fixed (128 by default) and recorded in the store, so
    features from two GPU models line up and a store refuses features made with another
    setting. The matrix does not depend on the batch or on ``batch_size`` (the kernel
    variant: 8, 16 or 32 rows per launch).

    The kernel rounds its input to float16 and accumulates in float32. Each gradient row
    is scaled by a power of two (exact) so that its largest entry lies in [0.5, 1)
    before the kernel sees it and scaled back after: small gradients keep float16's
    full precision (relative rounding 2⁻¹¹ per entry) instead of flushing to zero, and
    large ones cannot overflow. The features come in :func:`accumulation_dtype` of the
    gradients' dtype (float32 for bfloat16 and float16 gradients).

    Needs ``pip install srcproj[cuda]`` and CUDA tensors; it is a different matrix from
    :class:`RademacherProjector` with the same seed.
    """

    def __init__(self, proj_dim: int, seed: int = 0, num_feature_tiles: int = 128, batch_size: int = 32) -> None:
        self.proj_dim = _check_dim(proj_dim)
        if self.proj_dim % 512:
            raise ConfigurationError(f"fast-jl needs proj_dim to be a multiple of 512, got {proj_dim}")
        self.seed = check_int(seed, "seed", minimum=0, maximum=2**32 - 1,
                              hint=" (fast-jl takes a 32-bit seed: 0 <= seed < 2**32)")
        num_feature_tiles = check_int(num_feature_tiles, "num_feature_tiles", minimum=1, maximum=65535)
        batch_size = check_choice(batch_size, "batch_size", (8, 16, 32))
        try:
            import fast_jl  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(
                "FastJLProjector needs the fast-jl CUDA extension: pip install 'srcproj[cuda]' "
                "on a machine with CUDA, or use the default RademacherProjector"
            ) from exc
        self.num_feature_tiles = num_feature_tiles
        self.batch_size = batch_size

    def describe(self) -> dict:
        return {
            "kind": "fast_jl",
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "num_feature_tiles": self.num_feature_tiles,
        }

    def project(self, grads: Tensor) -> Tensor:
        import fast_jl

        if grads.ndim != 2:
            raise ConfigurationError(f"project() takes rows (B, p), got shape {tuple(grads.shape)}")
        if grads.device.type != "cuda":
            raise ConfigurationError("FastJLProjector runs on CUDA tensors only; featurize with device='cuda'")
        rows, num_params = grads.shape
        if num_params * self.batch_size >= 2**32:
            # The kernel indexes a launch's rows with 32-bit offsets.
            raise ConfigurationError(
                f"fast-jl cannot project {num_params:,} parameters {self.batch_size} rows at a time (32-bit "
                f"offsets); use batch_size=8, restrict the attributed parameters (modules=...) or use "
                f"KroneckerProjector"
            )
        values = grads.detach().to(torch.float32)
        peak = values.abs().amax(dim=1, keepdim=True)
        exponent = torch.where(peak > 0, torch.frexp(peak).exponent, torch.zeros_like(peak, dtype=torch.int32))
        values = torch.ldexp(values, -exponent)
        kernel = getattr(fast_jl, f"project_rademacher_{self.batch_size}")
        out = torch.empty(rows, self.proj_dim, dtype=torch.float32, device=grads.device)
        for start in range(0, rows, self.batch_size):
            stop = min(start + self.batch_size, rows)
            out[start:stop] = kernel(values[start:stop].contiguous(), self.proj_dim, self.seed,
                                     self.num_feature_tiles)
        return (torch.ldexp(out, exponent) / math.sqrt(self.proj_dim)).to(accumulation_dtype(grads.dtype))
