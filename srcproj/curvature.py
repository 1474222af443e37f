"""Projected Gauss-Newton Hessians ``Ĥ_c = (1/n) Σ_i P J_iᵀ Λ_i J_i Pᵀ`` at one checkpoint.

Three estimators (docs/math.md §3):

``exact``
    Per example, the C output-Jacobian rows are projected once and combined with a
    square-root factor of the output Hessian Λ (for softmax cross-entropy,
    ``diag(p) - ppᵀ``): the Fisher with its expectation over labels computed exactly.
``fisher``
    Labels sampled from the model's own predictive distribution; the mean outer
    product of the projected pseudo-gradients.
``empirical``
    The mean outer product of the stored true-label features (free and biased).

Sums are accumulated in float64 whatever the model's precision.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from .gradients import GradientComputer
from .projection import Projector

__all__ = ["ESTIMATORS", "HessianAccumulator", "exact_hessian_batch", "fisher_hessian_batch"]

ESTIMATORS = ("exact", "fisher", "empirical")


class HessianAccumulator:
    """Running float64 sum of outer products of projected vectors."""

    def __init__(self, proj_dim: int) -> None:
        self.proj_dim = proj_dim
        self._total: Tensor | None = None  # float64, on the device of the first vectors added
        self.count = 0

    def add(self, vectors: Tensor, examples: int) -> None:
        """Add ``vectorsᵀ vectors`` (rows already weighted) for ``examples`` examples."""
        rows = vectors.detach().to(torch.float64)
        if self._total is None:
            # Summed where the vectors are: on a GPU, copying every batch to the CPU
            # and multiplying there would cost more than computing the features.
            self._total = torch.zeros(self.proj_dim, self.proj_dim, dtype=torch.float64, device=rows.device)
        self._total.addmm_(rows.T, rows.to(self._total.device))
        self.count += examples

    @property
    def total(self) -> Tensor:
        """The float64 sum so far, on the CPU."""
        if self._total is None:
            return torch.zeros(self.proj_dim, self.proj_dim, dtype=torch.float64)
        return self._total.cpu()

    def mean(self) -> np.ndarray:
        return (self.total / max(self.count, 1)).numpy()


def _psd_sqrt(matrices: Tensor) -> Tensor:
    """``R`` with ``R Rᵀ = M`` for a batch of symmetric PSD matrices (eigenvalues clipped at 0)."""
    values, vectors = torch.linalg.eigh(matrices.to(torch.float64))
    return vectors * values.clamp_min(0).sqrt().unsqueeze(-2)


def exact_hessian_batch(
    computer: GradientComputer, projector: Projector, trainable: dict, fixed: dict, x: Tensor, y: Tensor
) -> Tensor:
    """Rows whose outer products sum to ``Σ_i P J_iᵀ Λ_i J_i Pᵀ`` over the batch.

    The projected Jacobians ``P J_iᵀ`` come from ``projector.output_features``: flat
    Jacobians projected for a dense projector, one backward pass per output through
    the layers for the factored one.
    """
    projected, outputs = projector.output_features(computer, trainable, fixed, x)
    projected = projected.to(torch.float64)
    factor = _psd_sqrt(computer.task.output_hessian(outputs.detach(), y.to(outputs.device)))
    factor = factor.to(projected.device)
    # (Λ^{1/2})ᵀ (P Jᵀ)ᵀ: one weighted vector per output direction and example.
    return torch.einsum("bcj,bck->bjk", factor, projected).reshape(-1, projected.shape[-1])


def fisher_hessian_batch(
    computer: GradientComputer,
    projector: Projector,
    trainable: dict,
    fixed: dict,
    x: Tensor,
    samples: int,
    generator: torch.Generator,
) -> Tensor:
    """Projected pseudo-gradients with labels sampled from the model, scaled by 1/√samples."""
    device = next(iter(trainable.values())).device
    with torch.no_grad():
        outputs = computer.forward(trainable, fixed, x.to(device) if not x.is_floating_point()
                                   else x.to(device, next(iter(trainable.values())).dtype))
    rows = []
    for _ in range(samples):
        sampled = computer.task.sample_targets(outputs, generator)
        features = projector.features(computer, trainable, fixed, x, sampled, "loss")
        rows.append(features.to(torch.float64) / np.sqrt(samples))
    return torch.cat(rows)


def empirical_hessian(feature_blocks: Iterable[np.ndarray], proj_dim: int) -> np.ndarray:
    """Mean outer product of stored training features, streamed block by block."""
    accumulator = HessianAccumulator(proj_dim)
    for block in feature_blocks:
        accumulator.add(torch.from_numpy(np.asarray(block, dtype=np.float64)), block.shape[0])
    return accumulator.mean()
