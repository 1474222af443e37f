"""Projected Gauss-Newton Hessians ``Ĥ_c = (1/n) Σ_i P J_iᵀ Λ_i J_i Pᵀ`` at one checkpoint.

Three estimators (docs/math.md §3), each an object that turns projected rows into
weighted rows whose outer products sum to the Hessian. They never see the model or the
projector: :attr:`HessianEstimator.needs` declares which projected quantities the
featurize pipeline must hand them.

``exact`` (:class:`ExactGaussNewton`)
    Per example, the C projected output-Jacobian rows combined with a square-root
    factor of the output Hessian Λ (for softmax cross-entropy ``diag(p) - ppᵀ``): the
    Fisher with its expectation over labels computed exactly.
``fisher`` (:class:`SampledFisher`)
    Labels sampled from the model's own predictive distribution; the mean outer
    product of the projected pseudo-gradients.
``empirical`` (:class:`EmpiricalFisher`)
    The mean outer product of the stored true-label features (free and biased).

Sums are accumulated in float64 whatever the model's precision.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigurationError
from .tasks import Task

__all__ = ["ESTIMATORS", "EmpiricalFisher", "ExactGaussNewton", "HessianAccumulator", "HessianEstimator",
           "SampledFisher", "choose_estimator", "empirical_hessian"]

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


class HessianEstimator(ABC):
    """Turns projected rows of a batch into rows whose outer products sum to its Hessian.

    ``needs`` says what the pipeline hands to :meth:`rows`:

    - ``"output_jacobians"``: ``(projected Jacobians (B, C, k), outputs (B, C), targets)``;
    - ``"sampled_gradients"``: a list of projected loss gradients ``(B, k)``, one per
      target set drawn by :meth:`sample_targets`;
    - ``"features"``: the stored training features ``(B, k)``.
    """

    name: ClassVar[str]
    needs: ClassVar[str]

    def describe(self) -> dict:
        return {"hessian": self.name}

    @abstractmethod
    def rows(self, *inputs) -> Tensor:
        """Weighted float64 rows ``(R, k)`` for one batch."""


class ExactGaussNewton(HessianEstimator):
    """``Σ_i (P J_iᵀ) Λ_i (P J_iᵀ)ᵀ`` through a square root of Λ: no sampling noise."""

    name = "exact"
    needs = "output_jacobians"

    def __init__(self, task: Task) -> None:
        self.task = task

    def rows(self, projected: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
        projected = projected.to(torch.float64)
        factor = _psd_sqrt(self.task.output_hessian(outputs.detach(), targets.to(outputs.device)))
        factor = factor.to(projected.device)
        # (Λ^{1/2})ᵀ (P Jᵀ)ᵀ: one weighted vector per output direction and example.
        return torch.einsum("bcj,bck->bjk", factor, projected).reshape(-1, projected.shape[-1])


class SampledFisher(HessianEstimator):
    """Projected pseudo-gradients at labels drawn from the model, scaled by 1/√samples."""

    name = "fisher"
    needs = "sampled_gradients"

    def __init__(self, task: Task, samples: int = 1) -> None:
        self.task = task
        self.samples = samples

    def describe(self) -> dict:
        return {"hessian": self.name, "fisher_samples": self.samples}

    def sample_targets(self, outputs: Tensor, generator: torch.Generator, targets: Tensor) -> list[Tensor]:
        """``samples`` target sets drawn from the model's predictive distribution
        (``targets``, the true ones, go to a task that takes them: what they mask)."""
        sample = self.task.sample_targets
        if "targets" in inspect.signature(sample).parameters:
            return [sample(outputs, generator, targets=targets) for _ in range(self.samples)]
        return [sample(outputs, generator) for _ in range(self.samples)]

    def rows(self, features: list[Tensor]) -> Tensor:
        return torch.cat([f.to(torch.float64) / np.sqrt(self.samples) for f in features])


class EmpiricalFisher(HessianEstimator):
    """The stored true-label features themselves; for a task with its own
    :meth:`~srcproj.Task.sampled_loss` (weighted token losses), the gradients of that
    function at the true targets instead (``needs = "sampled_gradients"``)."""

    name = "empirical"
    needs = "features"

    def __init__(self, task: Task | None = None) -> None:
        if task is not None and type(task).sampled_loss is not Task.sampled_loss:
            self.needs = "sampled_gradients"

    def sample_targets(self, outputs: Tensor, generator: torch.Generator, targets: Tensor) -> list[Tensor]:
        """The true targets: the empirical Fisher."""
        return [targets]

    def rows(self, features: Tensor | list[Tensor]) -> Tensor:
        if isinstance(features, list):
            return torch.cat([f.to(torch.float64) for f in features])
        return features.to(torch.float64)


def choose_estimator(name: str, task: Task, num_outputs: int, fisher_samples: int = 1) -> HessianEstimator:
    """The estimator called ``name``; ``"auto"``: exact for at most 20 outputs, else fisher.

    A task without ``output_hessian`` cannot use exact, one without ``sample_targets``
    cannot use fisher; ``"auto"`` then takes what the task has (empirical at worst).
    """
    if name not in ("auto",) + ESTIMATORS:
        raise ConfigurationError(f"hessian={name!r}; choose 'auto' or one of {ESTIMATORS}")
    if name == "auto":
        has_exact = type(task).output_hessian is not Task.output_hessian
        has_fisher = type(task).sample_targets is not Task.sample_targets
        if has_exact and num_outputs <= 20:
            name = "exact"
        elif has_fisher:
            name = "fisher"
        else:
            name = "exact" if has_exact else "empirical"
    if name == "exact":
        return ExactGaussNewton(task)
    if name == "fisher":
        return SampledFisher(task, fisher_samples)
    return EmpiricalFisher(task)


def empirical_hessian(feature_blocks: Iterable[np.ndarray], proj_dim: int) -> np.ndarray:
    """Mean outer product of stored training features, streamed block by block."""
    accumulator = HessianAccumulator(proj_dim)
    for block in feature_blocks:
        accumulator.add(torch.from_numpy(np.asarray(block, dtype=np.float64)), block.shape[0])
    return accumulator.mean()
