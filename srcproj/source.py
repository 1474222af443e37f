"""SOURCE's unrolling math in the small space: pure numpy, no I/O.

Notation follows ``docs/math.md``: a segment with mean Hessian ``H = V diag(λ) Vᵀ``
and time ``a`` forgets with ``S = exp(-aH)`` and accumulates with
``F = (I - exp(-aH)) H⁻¹``; removing example m moves the final parameters by
``Σ_ℓ W_ℓ ḡ_ℓ(m)`` with ``W_ℓ = S_L ⋯ S_{ℓ+1} F_ℓ / N_ℓ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = [
    "SegmentSpectrum",
    "forget_spectrum",
    "accumulate_spectrum",
    "eigendecompose",
    "unrolling_operators",
    "segment_time",
]


@dataclass(frozen=True)
class SegmentSpectrum:
    """Eigendecomposition of a segment's mean Hessian (weight decay included)."""

    eigenvalues: np.ndarray  # (k,), clipped at 0
    eigenvectors: np.ndarray  # (k, k), columns

    def function(self, values: np.ndarray) -> np.ndarray:
        """The matrix ``V diag(values) Vᵀ``."""
        return (self.eigenvectors * values) @ self.eigenvectors.T


def segment_time(total_lr: float, momentum: float = 0.0) -> float:
    """``a = Σ_t η_t / (1 - β)``: heavy-ball momentum scales the learning rate."""
    return float(total_lr) / (1.0 - float(momentum))


def forget_spectrum(eigenvalues: np.ndarray, time: float) -> np.ndarray:
    """``s(λ) = exp(-aλ)``."""
    return np.exp(-time * np.asarray(eigenvalues, dtype=np.float64))


def accumulate_spectrum(eigenvalues: np.ndarray, time: float) -> np.ndarray:
    """``F(λ) = (1 - exp(-aλ)) / λ``, with its limit ``F(0) = a``.

    ``-expm1(-aλ)`` keeps full precision when ``aλ`` is small; below ``aλ = 1e-8`` the
    second-order Taylor form ``a (1 - aλ/2)`` is exact to rounding.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    x = time * lam
    small = x < 1e-8
    safe = np.where(small, 1.0, lam)
    return np.where(small, time * (1.0 - 0.5 * x), -np.expm1(-x) / safe)


def eigendecompose(hessian: np.ndarray, damping: float = 0.0) -> SegmentSpectrum:
    """Eigendecompose a symmetric k×k Hessian plus ``damping·I`` in float64.

    Eigenvalues are clipped at 0: a Gauss-Newton matrix is positive semi-definite, and
    negative values are rounding (or a non-PSD estimate) that ``exp(-aλ)`` would blow up.
    """
    matrix = np.asarray(hessian, dtype=np.float64)
    matrix = 0.5 * (matrix + matrix.T)
    if damping:
        matrix = matrix + float(damping) * np.eye(matrix.shape[0])
    # LAPACK's divide and conquer (syevd), as numpy's eigh, through scipy: it skips
    # numpy's extra copies and finiteness pass (the matrix was checked when stored).
    values, vectors = scipy.linalg.eigh(matrix, driver="evd", check_finite=False, overwrite_a=True)
    return SegmentSpectrum(np.clip(values, 0.0, None), vectors)


def unrolling_operators(
    spectra: Sequence[SegmentSpectrum], times: Sequence[float], sizes: Sequence[int]
) -> list[np.ndarray]:
    """The k×k operators ``W_ℓ = S_L ⋯ S_{ℓ+1} F_ℓ / N_ℓ`` for every segment ℓ.

    Parameters
    ----------
    spectra : per segment, in training order
    times : per segment, ``a_ℓ``
    sizes : per segment, ``N_ℓ`` (the number of examples it trained on)
    """
    if not (len(spectra) == len(times) == len(sizes)):
        raise ValueError("spectra, times and sizes need one entry per segment")
    later: np.ndarray | None = None  # S_L ⋯ S_{ℓ+1}, built from the last segment backwards; None: I
    operators: list[np.ndarray] = [np.empty(0)] * len(spectra)
    for index in range(len(spectra) - 1, -1, -1):
        spectrum, time = spectra[index], times[index]
        vectors = spectrum.eigenvectors
        # later · V f(Λ) Vᵀ = ((later · V) f(Λ)) Vᵀ: one product with V serves F_ℓ and S_ℓ,
        # and none is needed after the last segment (later = I) or before the first.
        moved = vectors if later is None else later @ vectors
        accumulate = accumulate_spectrum(spectrum.eigenvalues, time) / float(sizes[index])
        operators[index] = (moved * accumulate) @ vectors.T
        if index:
            later = (moved * forget_spectrum(spectrum.eigenvalues, time)) @ vectors.T
    return operators
