"""CUDA paths. Skipped without a GPU (CI here has none); fast-jl tests also need
``pip install 'srcproj[cuda]'``. Run them on a GPU machine with

    python -m pytest tests/test_cuda.py

* fast-jl's matrix, read back column by column (projecting unit vectors), has entries
  ±1/√k and the same values for every kernel variant and batch; it changes with the
  seed and the number of feature tiles.
* Its projection of arbitrary rows equals that matrix applied to the rows rounded to
  float16 after the exact power-of-two row scaling, and tiny gradients do not vanish.
* An attributor with fast-jl on the GPU gives the scores of an attributor on the CPU
  with ``MatrixProjector(that matrix)``: an independent check of the whole pipeline.
* The Rademacher and Kronecker projections on the GPU give the CPU's scores, and their
  gradient backends (hooks for the dense projection, layer factors for the factored
  one) the CPU's features and projected Jacobians.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import assert_scores_close, build_tiny_run

from srcproj import (
    ClassificationTask,
    FastJLProjector,
    KroneckerProjector,
    MatrixProjector,
    RademacherProjector,
    StoreMismatchError,
)
from srcproj.gradients import DenseHookBackend, FactoredBackend, GradientComputer, ProjectedGradients

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_fast_jl = pytest.mark.skipif(importlib.util.find_spec("fast_jl") is None,
                                   reason="needs fast-jl (pip install 'srcproj[cuda]')")

K = 512
HIDDEN = 64  # 8 -> 64 -> 3: 771 parameters, several per feature tile


@pytest.fixture(scope="module")
def run():
    return build_tiny_run(hidden=HIDDEN)


def _num_params(run) -> int:
    return sum(p.numel() for p in run.model.parameters())


def _explicit(projector: FastJLProjector, num_params: int) -> torch.Tensor:
    """The p×k matrix Pᵀ the projector applies, one unit vector per parameter."""
    return projector.project(torch.eye(num_params, device="cuda"))


def _float16_rounded(rows: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies: each row scaled into [0.5, 1) by a power of two,
    rounded to float16, scaled back (float64)."""
    exponent = torch.frexp(rows.abs().amax(1, keepdim=True)).exponent
    return torch.ldexp(torch.ldexp(rows, -exponent).half().double(), exponent)


@needs_fast_jl
def test_fast_jl_matrix_is_a_scaled_rademacher_matrix(run):
    p = _num_params(run)
    matrix = _explicit(FastJLProjector(K, seed=3), p).double()
    assert matrix.shape == (p, K)
    torch.testing.assert_close(matrix.abs(), torch.full_like(matrix, K ** -0.5), rtol=1e-6, atol=0)
    # Balanced signs. Not checked: that the columns are distinct. fast-jl seeds one
    # XORWOW stream per (output column, feature tile), and the low bits of a stream's
    # first words depend on few bits of its seed, so the first features of tiles t and
    # t + 2^m often get identical columns: here 771 parameters have about 352 distinct
    # columns (benchmarks/projection_quality.py measures what that costs).
    assert abs(float(matrix.sign().mean())) < 0.01


@needs_fast_jl
def test_fast_jl_matrix_depends_on_seed_and_tiles_only(run):
    p = _num_params(run)
    reference = _explicit(FastJLProjector(K, seed=3), p)
    for batch_size in (8, 16):
        torch.testing.assert_close(_explicit(FastJLProjector(K, seed=3, batch_size=batch_size), p), reference,
                                   rtol=0, atol=0)
    # Rows in another order and another batch composition: the same rows of the result.
    order = torch.randperm(p, generator=torch.Generator().manual_seed(0)).cuda()
    shuffled = FastJLProjector(K, seed=3).project(torch.eye(p, device="cuda")[order][:37])
    torch.testing.assert_close(shuffled, reference[order][:37], rtol=0, atol=0)
    for other in (FastJLProjector(K, seed=4), FastJLProjector(K, seed=3, num_feature_tiles=64)):
        agreement = float((_explicit(other, p) == reference).double().mean())
        assert 0.45 < agreement < 0.55, agreement


@needs_fast_jl
def test_fast_jl_projection_equals_its_matrix_on_float16_rounded_rows(run):
    p = _num_params(run)
    projector = FastJLProjector(K, seed=3)
    matrix = _explicit(projector, p).double()
    generator = torch.Generator().manual_seed(1)
    rows = (torch.randn(45, p, generator=generator, dtype=torch.float64)
            * torch.logspace(-6, 3, 45, dtype=torch.float64)[:, None]).cuda()
    got = projector.project(rows.float()).double()
    expected = _float16_rounded(rows.float().double()) @ matrix
    norms = expected.norm(dim=1, keepdim=True)  # rows span 9 orders of magnitude: compare each to its own norm
    torch.testing.assert_close(got / norms, expected / norms, rtol=0, atol=1e-5)
    # Power-of-two scaling is exact: gradients of 1e-12 are projected as precisely as
    # gradients of 1 (unscaled, float16 would flush them to zero).
    tiny = projector.project(rows.float() * 2.0 ** -40)
    torch.testing.assert_close(tiny, projector.project(rows.float()) * 2.0 ** -40, rtol=0, atol=0)
    assert bool((projector.project(torch.zeros(3, p, device="cuda")) == 0).all())


@needs_fast_jl
def test_fast_jl_attributor_equals_the_explicit_matrix_on_cpu(run, tmp_path):
    p = _num_params(run)
    projector = FastJLProjector(K, seed=3)
    matrix = _explicit(projector, p).T.double().cpu()  # k×p
    gpu = run.attributor(tmp_path / "gpu.zarr", projector=projector, proj_dim=K, device="cuda")
    gpu.featurize(progress=False)
    cpu = run.attributor(tmp_path / "cpu.zarr", projector=MatrixProjector(matrix), proj_dim=K, device="cpu")
    cpu.featurize(progress=False)
    got, expected = gpu.score(run.queries), cpu.score(run.queries)
    # Float16 rounding of the gradients (2⁻¹¹ per entry) is the only difference.
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) < 1e-2 * scale
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9999
    # The store records the tiles, not the kernel variant.
    again = run.attributor(tmp_path / "gpu.zarr", projector=FastJLProjector(K, seed=3, batch_size=8),
                           proj_dim=K, device="cuda")
    np.testing.assert_array_equal(again.score(run.queries), got)
    with pytest.raises(StoreMismatchError, match="num_feature_tiles"):
        run.attributor(tmp_path / "gpu.zarr", projector=FastJLProjector(K, seed=3, num_feature_tiles=64),
                       proj_dim=K, device="cuda")


@pytest.mark.parametrize("hessian", ["exact", "fisher", "empirical"])
@pytest.mark.parametrize("kind", ["dense", "kronecker"])
def test_gpu_scores_equal_cpu_scores(run, tmp_path, kind, hessian):
    k = 64

    def make(device):
        projector = RademacherProjector(k, seed=5) if kind == "dense" else KroneckerProjector(k, seed=5)
        att = run.attributor(tmp_path / f"{device}.zarr", projector=projector, proj_dim=k, device=device,
                             hessian=hessian)
        att.featurize(progress=False)
        return att

    gpu, cpu = make("cuda"), make("cpu")
    for c in range(len(run.checkpoints)):
        np.testing.assert_allclose(gpu.checkpoint_hessian(c), cpu.checkpoint_hessian(c), rtol=1e-4,
                                   atol=1e-6 * float(np.abs(cpu.checkpoint_hessian(c)).max()))
    assert_scores_close(gpu.score(run.queries), cpu.score(run.queries), rtol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "kronecker"])
def test_gradient_backends_on_the_gpu_equal_the_cpu(run, kind):
    backend = DenseHookBackend if kind == "dense" else FactoredBackend

    def features(device: str) -> list[torch.Tensor]:
        computer = GradientComputer(run.model, ClassificationTask())
        trainable, fixed = computer.split(run.checkpoints[-1], torch.device(device))
        projector = RademacherProjector(64, seed=5) if kind == "dense" else KroneckerProjector(64, seed=5)
        gradients = ProjectedGradients(computer, projector)
        x, y = run.X[:40].to(device), run.y[:40].to(device)
        gradients.bind({**trainable, **fixed}, x[:2])
        assert type(gradients.backend) is backend
        with computer.evaluating():
            jacobians, outputs = gradients.output_features(trainable, fixed, x)
            return [gradients.features(trainable, fixed, x, y, "loss"),
                    gradients.features(trainable, fixed, x, y, "measurement"), jacobians, outputs]

    for got, want in zip(features("cuda"), features("cpu"), strict=True):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_dense_projection_past_its_cache_on_a_gpu_warns_once():
    projector = RademacherProjector(64, seed=0, cache_bytes=64 * 512 * 4)  # one tile of 512 parameters
    grads = torch.randn(3, 2000, device="cuda")
    with pytest.warns(RuntimeWarning, match=r"regenerated on the CPU for every batch.*cache_bytes"):
        first = projector.project(grads)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = projector.project(grads)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    cpu = RademacherProjector(64, seed=0).project(grads.cpu())
    torch.testing.assert_close(first.cpu(), cpu, rtol=1e-5, atol=1e-5)
