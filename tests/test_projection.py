"""The random projections: the Rademacher matrix's entries, determinism and statistics."""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest
import torch

from srcproj import ConfigurationError, FastJLProjector, MatrixProjector, RademacherProjector
from srcproj.gradients import GradientPieces

pytestmark = pytest.mark.usefixtures("single_thread")


def matrix_of(projector, p: int, rows_per_batch: int | None = None, dtype=torch.float64) -> torch.Tensor:
    """The k×p matrix, read off by projecting the identity's rows (``rows_per_batch`` at a time)."""
    eye = torch.eye(p, dtype=dtype)
    step = rows_per_batch or p
    columns = torch.cat([projector.project(eye[i:i + step]) for i in range(0, p, step)])  # (p, k) = Pᵀ
    return columns.T


# ---------------------------------------------------------------------------- RademacherProjector
@pytest.mark.parametrize("k", [1, 16, 37, 64])
def test_entries_are_plus_or_minus_one_over_sqrt_k(k):
    P = matrix_of(RademacherProjector(k, seed=3), p=700)
    assert P.shape == (k, 700)
    np.testing.assert_allclose(P.abs().numpy(), 1 / math.sqrt(k), rtol=1e-12)
    # Both signs occur, in roughly equal numbers.
    positive = float((P > 0).double().mean())
    assert 0.45 < positive < 0.55 or k == 1


def test_projection_is_the_matrix_product():
    projector = RademacherProjector(32, seed=1)
    P = matrix_of(projector, p=600)
    grads = torch.randn(9, 600, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(projector.project(grads), grads @ P.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matrix_does_not_depend_on_rows_per_batch_or_cache(dtype):
    p, k = 1100, 24
    reference = matrix_of(RademacherProjector(k, seed=7), p, dtype=dtype)
    for rows in (1, 7, 64, 1100):
        torch.testing.assert_close(matrix_of(RademacherProjector(k, seed=7), p, rows, dtype), reference,
                                   rtol=0, atol=0)
    # No tile cache at all: every batch regenerates the tiles, with the same result.
    uncached = RademacherProjector(k, seed=7, cache_bytes=0)
    torch.testing.assert_close(matrix_of(uncached, p, 13, dtype), reference, rtol=0, atol=0)
    assert uncached._cached_bytes == 0 and not uncached._cache
    # One projector reused across batches of different sizes (cache hits and misses).
    shared = RademacherProjector(k, seed=7, cache_bytes=1 << 20)
    for rows in (5, 1100, 3):
        torch.testing.assert_close(matrix_of(shared, p, rows, dtype), reference, rtol=0, atol=0)


def test_matrix_does_not_depend_on_parameters_per_block(monkeypatch):
    """Tiles processed one per block (as for a huge p) give the same matrix."""
    p, k = 1500, 16
    reference = matrix_of(RademacherProjector(k, seed=2), p)
    small_blocks = RademacherProjector(k, seed=2)
    monkeypatch.setattr(small_blocks, "_tiles_per_block", lambda dtype: 1)
    torch.testing.assert_close(matrix_of(small_blocks, p), reference, rtol=0, atol=0)


def test_different_seeds_give_different_matrices():
    p, k = 300, 32
    matrices = [matrix_of(RademacherProjector(k, seed=s), p) for s in (0, 1, 2)]
    for i in range(3):
        for j in range(i + 1, 3):
            agree = float((matrices[i] == matrices[j]).double().mean())
            assert 0.4 < agree < 0.6, (i, j, agree)  # independent signs agree half the time
    torch.testing.assert_close(matrix_of(RademacherProjector(k, seed=1), p), matrices[1], rtol=0, atol=0)
    assert RademacherProjector(k, seed=0).describe() != RademacherProjector(k, seed=1).describe()


def test_columns_do_not_depend_on_the_number_of_parameters():
    """A p=700 gradient and the same gradient padded with zeros to p=1500 project alike."""
    projector = RademacherProjector(48, seed=11)
    grads = torch.randn(5, 700, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    padded = torch.cat([grads, torch.zeros(5, 800, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(projector.project(padded), projector.project(grads), rtol=1e-12, atol=1e-12)
    # Column i is the same column in both matrices.
    small, large = matrix_of(projector, 700), matrix_of(RademacherProjector(48, seed=11), 1500)
    torch.testing.assert_close(large[:, :700], small, rtol=0, atol=0)


def test_norms_and_inner_products_are_preserved_on_average():
    """E[PᵀP] = I: with k=2048, ‖Px‖²/‖x‖² ≈ 1 (std √(2/k) ≈ 0.03) and PᵀP ≈ I."""
    k, p = 2048, 400
    projector = RademacherProjector(k, seed=5)
    x = torch.randn(40, p, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    ratios = (projector.project(x).pow(2).sum(1) / x.pow(2).sum(1)).numpy()
    std = math.sqrt(2 / k)
    assert np.all(np.abs(ratios - 1) < 6 * std), ratios
    assert abs(ratios.mean() - 1) < 4 * std / math.sqrt(len(ratios))

    gram = (lambda P: P.T @ P)(matrix_of(projector, p))
    np.testing.assert_allclose(torch.diagonal(gram).numpy(), 1.0, rtol=1e-12)  # columns have unit norm
    off = gram[~torch.eye(p, dtype=torch.bool)].numpy()
    assert abs(off.mean()) < 5 / (math.sqrt(k) * p)  # mean of ~p² entries of std 1/√k
    assert abs(off.std() - 1 / math.sqrt(k)) < 0.05 / math.sqrt(k)
    assert np.abs(off).max() < 6 / math.sqrt(k)


@pytest.mark.parametrize("proj_dim", [0, -3, 2.5, "16", True, None])
def test_proj_dim_validation(proj_dim):
    with pytest.raises(ConfigurationError, match=re.escape(f"proj_dim={proj_dim!r}") + r".*integer >= 1"):
        RademacherProjector(proj_dim)


def test_numpy_integer_proj_dim_is_accepted():
    assert RademacherProjector(np.int64(8)).proj_dim == 8


def test_project_needs_rows():
    with pytest.raises(ConfigurationError, match=r"project\(\) takes rows \(B, p\), got shape \(10,\)"):
        RademacherProjector(4).project(torch.randn(10))


def test_lazy_pieces_are_asked_for_once_each_in_order(monkeypatch):
    """Pieces formed on demand: each asked for once, in column order, even when a piece spans
    several blocks of the matrix; the projection is that of the whole rows."""
    grads = torch.randn(3, 1500, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bounds = [0, 5, 600, 1100, 1500]
    asked = []

    def make(i: int) -> torch.Tensor:
        asked.append(i)
        return grads[:, bounds[i]:bounds[i + 1]].clone()

    pieces = GradientPieces([b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)], make, 3,
                            torch.float64, torch.device("cpu"))
    assert len(pieces) == 4 and pieces.num_params == 1500
    projector = RademacherProjector(16, seed=2)
    monkeypatch.setattr(projector, "_tiles_per_block", lambda dtype: 1)
    torch.testing.assert_close(projector.project_pieces(pieces), projector.project(grads), rtol=1e-12, atol=1e-12)
    assert asked == [0, 1, 2, 3]
    # A projector that does not accept pieces gets the concatenated rows.
    matrix = torch.randn(4, 1500, dtype=torch.float64)
    torch.testing.assert_close(MatrixProjector(matrix).project_pieces(pieces), grads @ matrix.T)
    torch.testing.assert_close(MatrixProjector(matrix).project_pieces([grads[:, :700], grads[:, 700:]]),
                               grads @ matrix.T)


# ---------------------------------------------------------------------------- MatrixProjector
def test_matrix_projector_with_wrong_number_of_columns():
    projector = MatrixProjector(torch.randn(4, 10, dtype=torch.float64))
    assert projector.proj_dim == 4
    with pytest.raises(ConfigurationError,
                       match=r"the projection matrix has 10 columns but the gradients have 12 parameters"):
        projector.project(torch.randn(3, 12, dtype=torch.float64))


def test_matrix_projector_projects_with_its_matrix():
    matrix = torch.randn(4, 10, dtype=torch.float64)
    grads = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(MatrixProjector(matrix).project(grads), grads @ matrix.T)
    assert MatrixProjector(matrix).describe() == MatrixProjector(matrix.clone()).describe()
    assert MatrixProjector(matrix).describe() != MatrixProjector(matrix * 2).describe()


@pytest.mark.parametrize("matrix", [torch.ones(4, 10, dtype=torch.long), torch.ones(10), torch.zeros(0, 5)])
def test_matrix_projector_needs_a_floating_point_matrix_of_at_least_one_row(matrix):
    with pytest.raises(ConfigurationError, match=r"k×p matrix|proj_dim=0"):
        MatrixProjector(matrix)


# ---------------------------------------------------------------------------- FastJLProjector
@pytest.mark.skipif(importlib.util.find_spec("fast_jl") is not None, reason="fast_jl is installed")
def test_fast_jl_without_the_extension():
    with pytest.raises(ConfigurationError, match=re.escape("srcproj[cuda]")):
        FastJLProjector(512)


@pytest.mark.parametrize("kwargs, message", [
    ({"proj_dim": 100}, r"multiple of 512, got 100"),
    ({"proj_dim": 512, "batch_size": 12}, r"batch_size=12; choose one of \(8, 16, 32\)"),
    ({"proj_dim": 0}, r"proj_dim=0"),
    ({"proj_dim": 512, "seed": 2**32}, r"32-bit seed"),
    ({"proj_dim": 512, "seed": -1}, r"seed=-1"),
    ({"proj_dim": 512, "num_feature_tiles": 0}, r"num_feature_tiles=0"),
    ({"proj_dim": 512, "num_feature_tiles": 2.5}, r"num_feature_tiles=2.5"),
])
def test_fast_jl_argument_validation(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        FastJLProjector(**kwargs)
