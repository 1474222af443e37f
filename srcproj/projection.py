"""Random projections from parameter space (p) to the small space (k).

A projector maps gradient rows ``(B, p)`` to ``(B, k)``. One projector (one seed)
serves every checkpoint, segment, training example and query of a store: otherwise the
small spaces do not line up. Each projector describes itself; the store records that
description and refuses features from any other projector.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigurationError

__all__ = ["Projector", "RademacherProjector", "MatrixProjector", "FastJLProjector"]


class Projector(ABC):
    """Maps gradient rows ``(B, p)`` to features ``(B, k)`` with ``E[P^T P] = I``."""

    proj_dim: int

    @abstractmethod
    def project(self, grads: Tensor) -> Tensor:
        """Project rows of ``grads`` (shape ``(B, p)``) to shape ``(B, proj_dim)``."""

    @abstractmethod
    def describe(self) -> dict:
        """A JSON-able description; two projectors with equal descriptions are equal."""


def _check_dim(proj_dim: int) -> int:
    if isinstance(proj_dim, bool) or not isinstance(proj_dim, (int, np.integer)) or proj_dim < 1:
        raise ConfigurationError(f"proj_dim={proj_dim!r}; the projection size k must be an integer >= 1")
    return int(proj_dim)


class RademacherProjector(Projector):
    """Seeded Rademacher matrix with entries ±1/√k, generated tile by tile.

    Column ``i`` of the k×p matrix depends only on ``(seed, i, k)``: the matrix is the
    same whatever the batch size, the number of parameters processed at once, or the
    device, and the full matrix never has to exist. Tiles are generated on the CPU from
    a counter-based generator keyed by ``(seed, tile index)`` and kept in memory up to
    ``cache_bytes``; past that budget they are regenerated for every batch.

    Parameters
    ----------
    proj_dim : int
        k, the projected dimension.
    seed : int
        Decides the matrix.
    cache_bytes : int
        Memory for keeping generated tiles (default 1 GiB).
    """

    TILE = 512  # parameters per generated tile; fixed so the matrix never depends on it

    def __init__(self, proj_dim: int, seed: int = 0, cache_bytes: int = 1 << 30) -> None:
        self.proj_dim = _check_dim(proj_dim)
        self.seed = int(seed)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[tuple, Tensor] = {}
        self._cached_bytes = 0

    def describe(self) -> dict:
        return {"kind": "rademacher", "proj_dim": self.proj_dim, "seed": self.seed, "tile": self.TILE}

    def _tile(self, index: int) -> np.ndarray:
        """Tile ``index`` of Pᵀ as int8 ±1, shape ``(TILE, k)``."""
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, index, self.proj_dim])))
        bits = np.unpackbits(np.frombuffer(rng.bytes(self.TILE * self.proj_dim // 8 + 1), dtype=np.uint8))
        signs = bits[: self.TILE * self.proj_dim].astype(np.int8) * 2 - 1
        return signs.reshape(self.TILE, self.proj_dim)

    def _block(self, start_tile: int, stop_tile: int, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (start_tile, stop_tile, rows, dtype, device)
        block = self._cache.get(key)
        if block is None:
            signs = np.concatenate([self._tile(t) for t in range(start_tile, stop_tile)])[:rows]
            block = torch.from_numpy(signs).to(device=device, dtype=dtype) / math.sqrt(self.proj_dim)
            size = block.numel() * block.element_size()
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[key] = block
                self._cached_bytes += size
        return block

    def _tiles_per_block(self, dtype: torch.dtype) -> int:
        # Blocks of about 64 MiB keep the matmuls large without a large transient.
        per_tile = self.TILE * self.proj_dim * torch.empty(0, dtype=dtype).element_size()
        return max(1, (64 << 20) // per_tile)

    def project(self, grads: Tensor) -> Tensor:
        if grads.ndim != 2:
            raise ConfigurationError(f"project() takes rows (B, p), got shape {tuple(grads.shape)}")
        num_params = grads.shape[1]
        out = torch.zeros(grads.shape[0], self.proj_dim, dtype=grads.dtype, device=grads.device)
        tiles = math.ceil(num_params / self.TILE)
        step = self._tiles_per_block(grads.dtype)
        for start in range(0, tiles, step):
            stop = min(start + step, tiles)
            lo, hi = start * self.TILE, min(stop * self.TILE, num_params)
            out.addmm_(grads[:, lo:hi], self._block(start, stop, hi - lo, grads.dtype, grads.device))
        return out


class MatrixProjector(Projector):
    """An explicit k×p matrix (e.g. an orthogonal one for exactness tests)."""

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
        return grads @ self.matrix.to(device=grads.device, dtype=grads.dtype).T


class FastJLProjector(Projector):
    """The fast-jl CUDA kernel (TRAK's), scaled by 1/√k to match the Rademacher one.

    Its matrix depends on ``num_feature_tiles`` as well as the seed, so both are part
    of its description. Needs ``pip install srcproj[cuda]`` and CUDA tensors; it is a
    different matrix from :class:`RademacherProjector` with the same seed.
    """

    def __init__(self, proj_dim: int, seed: int = 0, num_feature_tiles: int = 128, batch_size: int = 32) -> None:
        self.proj_dim = _check_dim(proj_dim)
        if self.proj_dim % 512:
            raise ConfigurationError(f"fast-jl needs proj_dim to be a multiple of 512, got {proj_dim}")
        if batch_size not in (8, 16, 32):
            raise ConfigurationError(f"fast-jl batch_size must be 8, 16 or 32, got {batch_size}")
        try:
            import fast_jl  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(
                "FastJLProjector needs the fast-jl CUDA extension: pip install 'srcproj[cuda]' "
                "on a machine with CUDA, or use the default RademacherProjector"
            ) from exc
        self.seed = int(seed)
        self.num_feature_tiles = int(num_feature_tiles)
        self.batch_size = batch_size

    def describe(self) -> dict:
        return {
            "kind": "fast_jl",
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "num_feature_tiles": self.num_feature_tiles,
            "batch_size": self.batch_size,
        }

    def project(self, grads: Tensor) -> Tensor:
        import fast_jl

        if grads.device.type != "cuda":
            raise ConfigurationError("FastJLProjector runs on CUDA tensors only; featurize with device='cuda'")
        kernel = getattr(fast_jl, f"project_rademacher_{self.batch_size}")
        rows = []
        for start in range(0, grads.shape[0], self.batch_size):
            part = grads[start : start + self.batch_size].contiguous()
            pad = self.batch_size - part.shape[0]
            if pad:
                part = torch.cat([part, part.new_zeros(pad, part.shape[1])])
            out = kernel(part.to(torch.float32), self.proj_dim, self.seed, self.num_feature_tiles)
            rows.append(out[: self.batch_size - pad])
        return torch.cat(rows).to(grads.dtype) / math.sqrt(self.proj_dim)
