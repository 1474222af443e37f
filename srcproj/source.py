"""SOURCE's unrolling math in the small space: pure numpy, no I/O.

Notation follows ``docs/math.md``: a segment with mean Hessian ``H = V diag(λ) Vᵀ``
and time ``a`` forgets with ``S = exp(-aH)`` and accumulates with
``F = (I - exp(-aH)) H⁻¹``; removing example m moves the final parameters by
``Σ_ℓ W_ℓ ḡ_ℓ(m)`` with ``W_ℓ = S_L ⋯ S_{ℓ+1} F_ℓ / N_ℓ``. With stages, consecutive
segments of one data set are first merged into one stretch (:func:`stage_of_segments`).
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
    "stage_of_segments",
    "segment_time",
    "UNROLLINGS",
]

#: How segments are unrolled: "stages" merges consecutive segments of one data set into
#: one stationary stretch (time-weighted mean Hessian and gradient) before chaining;
#: "segments" chains every segment as the paper does. docs/math.md §4 says why "stages"
#: is the default.
UNROLLINGS = ("stages", "segments")


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


def stage_of_segments(data_groups: Sequence[int]) -> list[int]:
    """The stage of every segment: consecutive segments of one data set share a stage.

    ``[0, 0, 0, 1, 1]`` (three segments on one data set, then two on another) gives
    ``[0, 0, 0, 1, 1]``; ``[0, 1, 0]`` gives ``[0, 1, 2]``: a data set trained on again
    after another is a new stage.
    """
    stages: list[int] = []
    for index, group in enumerate(data_groups):
        if index == 0:
            stages.append(0)
        else:
            stages.append(stages[-1] + int(group != data_groups[index - 1]))
    return stages


def _merge_stage(spectra: Sequence[SegmentSpectrum], times: Sequence[float]) -> SegmentSpectrum:
    """The spectrum of the time-weighted mean ``Σ a_ℓ H_ℓ / Σ a_ℓ`` of the segments' Hessians."""
    total = float(sum(times))
    merged = sum(spectrum.function(spectrum.eigenvalues) * (time / total)
                 for spectrum, time in zip(spectra, times, strict=True))
    return eigendecompose(merged)


def unrolling_operators(
    spectra: Sequence[SegmentSpectrum], times: Sequence[float], sizes: Sequence[int],
    stages: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """The k×k operators ``W_ℓ = S_L ⋯ S_{ℓ+1} F_ℓ / N_ℓ`` for every segment ℓ.

    Parameters
    ----------
    spectra : per segment, in training order
    times : per segment, ``a_ℓ``
    sizes : per segment, ``N_ℓ`` (the number of examples it trained on)
    stages : per segment, its stage (:func:`stage_of_segments`), optional
        Segments of one stage are unrolled as one stretch of time ``A = Σ a_ℓ`` with the
        time-weighted mean Hessian ``H̄ = Σ a_ℓ H_ℓ / A``, and segment ℓ's operator is that
        stretch's ``W`` times ``a_ℓ / A``, so that ``Σ_ℓ W_ℓ ḡ_ℓ = W · Σ_ℓ a_ℓ ḡ_ℓ / A``:
        the stretch's time-weighted mean gradient. Default: every segment is its own stage.
    """
    if not (len(spectra) == len(times) == len(sizes)):
        raise ValueError("spectra, times and sizes need one entry per segment")
    if stages is not None and any(s != i for i, s in enumerate(stages)):
        if len(stages) != len(spectra) or stages[0] != 0 or any(
                b not in (a, a + 1) for a, b in zip(stages, stages[1:], strict=False)):
            raise ValueError("stages must number consecutive segments 0, 1, ... in order")
        members = [[i for i, s in enumerate(stages) if s == stage] for stage in range(stages[-1] + 1)]
        for group in members:
            if len({int(sizes[i]) for i in group}) > 1:
                raise ValueError("the segments of one stage must train on the same number of examples")
        merged = unrolling_operators(
            [_merge_stage([spectra[i] for i in group], [times[i] for i in group]) if len(group) > 1
             else spectra[group[0]] for group in members],
            [float(sum(times[i] for i in group)) for group in members],
            [sizes[group[0]] for group in members])
        return [merged[stages[i]] * (float(times[i]) / float(sum(times[j] for j in members[stages[i]])))
                for i in range(len(spectra))]
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
