"""Exact Gauss-Newton at the price of one projection (docs/math.md §10): the hook
backend's projected output Jacobians equal vmap's, whatever the layers (fused Linear
layers, Conv2d and Linear over positions from their captures, LayerNorm from vmap),
the attributed subset, the number of rows per call and the memory budget; the
Rademacher projector's rows come from the same tiles and cache as its projections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from srcproj import ClassificationTask, KroneckerProjector, RademacherProjector
from srcproj.gradients import (
    DenseHookBackend,
    FactoredBackend,
    GradientComputer,
    ProjectedGradients,
    VmapBackend,
)

pytestmark = pytest.mark.usefixtures("single_thread")


class NormNet(nn.Module):
    """A LayerNorm between two Linear layers: its parameters come from vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.fc(x))))


class PositionNet(nn.Module):
    """A Linear over positions (B, T, d), T = 3: Σ_t δ_t a_tᵀ, not one outer product."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 12)
        return self.head(torch.relu(self.mix(x.reshape(x.shape[0], 3, 4))).mean(dim=1))


class TwiceCalled(nn.Module):
    """One Linear called twice: two outer products, so not fused."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Repeat(nn.Module):
    """A parameter-free leaf module with a wide output (large activations per example)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 400)


class Fold(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 400, -1).mean(dim=1)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5, bias=False), nn.ReLU(inplace=True),
                         nn.Linear(5, 4))


def no_bias_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 9, bias=False), nn.Tanh(), nn.Linear(9, 4, bias=False))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 5), nn.Tanh(), nn.Linear(5, 3))


def wide() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), Repeat(), Fold(), nn.Tanh(), nn.Linear(5, 3))


MODELS = {  # name: (factory, input shape, attributed modules)
    "mlp": (mlp, (6,), None),
    "mlp_subset": (mlp, (6,), ["4", "0"]),  # a subset, not in the model's order
    "mlp_no_bias": (no_bias_mlp, (6,), None),
    "cnn": (cnn, (2, 6, 6), None),
    "cnn_subset": (cnn, (2, 6, 6), ["6", "2"]),
    "layernorm": (NormNet, (6,), None),
    "layernorm_subset": (NormNet, (6,), ["head", "norm"]),
    "positions": (PositionNet, (12,), None),
    "twice_called": (TwiceCalled, (4,), None),
}


def setup(name: str, rows: int = 6, projector=None, seed: int = 0):
    factory, shape, modules = MODELS[name] if name in MODELS else (wide, (6,), None)
    torch.manual_seed(seed)
    model = factory().double()
    x = torch.randn(rows, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    computer = GradientComputer(model, ClassificationTask(), modules=modules)
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    gradients = ProjectedGradients(computer, RademacherProjector(29, seed=5) if projector is None else projector)
    with computer.evaluating():
        gradients.bind({**trainable, **fixed}, x[:2])
    return gradients, computer, trainable, fixed, x


def assert_same(have: torch.Tensor, want: torch.Tensor, rtol: float = 1e-10) -> None:
    scale = float(want.abs().max())
    assert scale > 0
    torch.testing.assert_close(have, want, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_hook_jacobians_equal_vmap_jacobians(name, monkeypatch):
    gradients, computer, trainable, fixed, x = setup(name)
    backend = gradients.backend
    assert isinstance(backend, DenseHookBackend)
    monkeypatch.setattr(backend.fallback, "output_features", None)  # the vmap path is not taken
    with computer.evaluating():
        have, outputs = gradients.output_features(trainable, fixed, x)
        want, want_outputs = VmapBackend(computer, gradients.projector).output_features(trainable, fixed, x)
    assert have.shape == want.shape == (x.shape[0], want_outputs.shape[1], 29)
    assert_same(have, want)
    torch.testing.assert_close(outputs, want_outputs, rtol=0, atol=0)
    assert bool((have != 0).any(dim=2).all())


def test_attributed_order_and_offsets_follow_param_names():
    """The subset's rows are the full model's Jacobian columns of those parameters, in
    ``param_names`` order, projected by P's first columns."""
    gradients, computer, trainable, fixed, x = setup("mlp_subset")
    assert computer.param_names == ["4.weight", "4.bias", "0.weight", "0.bias"]
    with computer.evaluating():
        have, _ = gradients.output_features(trainable, fixed, x)
        jacobians, _ = computer.output_jacobians(trainable, fixed, x)
    batch, outputs, p = jacobians.shape
    assert_same(have, gradients.projector.project(jacobians.reshape(batch * outputs, p)).reshape(batch, outputs, -1))


@pytest.mark.parametrize("name", ["mlp", "cnn", "layernorm", "positions"])
def test_many_rows_with_a_tiny_budget_equal_one_call(name):
    gradients, computer, trainable, fixed, x = setup(name, rows=300)
    backend = gradients.backend
    with computer.evaluating():
        whole, outputs = backend.output_features(trainable, fixed, x)
        backend.memory_bytes = 20_000  # a few rows per sub-batch and per group
        split, split_outputs = backend.output_features(trainable, fixed, x)
        vmap = VmapBackend(computer, gradients.projector)
        vmap.memory_bytes = 20_000
        want, _ = vmap.output_features(trainable, fixed, x[:40])
    assert_same(split, whole)
    torch.testing.assert_close(split_outputs, outputs, rtol=0, atol=1e-14)
    assert_same(whole[:40], want)


def test_sub_batches_do_not_regenerate_the_projection(monkeypatch):
    """Without a cache, P's blocks are generated per call (per fused layer and block of
    output rows), never per sub-batch."""
    generated = []
    projector = RademacherProjector(29, seed=5, cache_bytes=0)
    original = projector._generate
    monkeypatch.setattr(projector, "_generate", lambda *a, **kw: generated.append(a[:2]) or original(*a, **kw))
    gradients, computer, trainable, fixed, x = setup("wide", rows=300, projector=projector)
    backend = gradients.backend
    backend.memory_bytes = 1 << 20  # ~10 rows per sub-batch (wide activations), one group
    calls = []
    original_capture = backend._capture_jacobians
    monkeypatch.setattr(backend, "_capture_jacobians", lambda *a: calls.append(1) or original_capture(*a))
    with computer.evaluating():
        generated.clear()
        few, _ = backend.output_features(trainable, fixed, x[:3])
        once, first = len(generated), len(calls)
        generated.clear()
        many, _ = backend.output_features(trainable, fixed, x)
    assert first == 1 and len(calls) > 10  # one sub-batch, then many
    assert len(generated) == once <= 4  # two layers: weight and bias rows each
    assert_same(many[:3], few)
    with computer.evaluating():
        want, _ = VmapBackend(computer, RademacherProjector(29, seed=5)).output_features(trainable, fixed, x[:50])
    assert_same(many[:50], want)


def test_factored_backend_splits_rows_too():
    gradients, computer, trainable, fixed, x = setup("layernorm", rows=60,
                                                     projector=KroneckerProjector(24, seed=2))
    backend = gradients.backend
    assert isinstance(backend, FactoredBackend)
    with computer.evaluating():
        whole, outputs = backend.output_features(trainable, fixed, x)
        backend.memory_bytes = 5_000
        split, split_outputs = backend.output_features(trainable, fixed, x)
    assert_same(split, whole)
    torch.testing.assert_close(split_outputs, outputs, rtol=0, atol=1e-14)


def test_float32_no_grad_and_training_mode():
    gradients, computer, trainable, fixed, x = setup("cnn")
    model = computer.model.float()
    trainable32 = {n: v.float() for n, v in trainable.items()}
    fixed32 = {n: v.float() for n, v in fixed.items()}
    projector = gradients.projector
    with torch.no_grad(), computer.evaluating():
        have, _ = gradients.output_features(trainable32, fixed32, x.float())
        want, _ = VmapBackend(computer, projector).output_features(trainable, fixed, x)
    assert have.dtype == torch.float32
    assert_same(have.double(), want, rtol=1e-4)
    model.double().train()  # training mode: the vmap backend's Jacobians, the same here (no dropout)
    trained, _ = gradients.output_features(trainable, fixed, x)
    assert_same(trained, want)


def test_a_projector_with_its_own_pieces_keeps_to_vmap(monkeypatch):
    class Preconditioned(RademacherProjector):
        def project_pieces(self, pieces):
            return 2 * super().project_pieces(pieces)

    gradients, computer, trainable, fixed, x = setup("mlp", projector=Preconditioned(29, seed=5))
    assert isinstance(gradients.backend, DenseHookBackend)
    with computer.evaluating():
        have, _ = gradients.output_features(trainable, fixed, x)
        want, _ = setup("mlp")[0].output_features(trainable, fixed, x)
    assert_same(have, 2 * want)


# ---------------------------------------------------------------------------- the projector's rows
def test_rows_are_the_matrix_columns_and_share_the_cache():
    k, p = 13, 5000
    reference = RademacherProjector(k, seed=4).project(torch.eye(p, dtype=torch.float64))  # Pᵀ, (p, k)
    block_bytes = 512 * k * 8
    projector = RademacherProjector(k, seed=4, cache_bytes=3 * block_bytes)
    projector._tiles_per_block = lambda dtype: 1  # blocks of one tile: several per range
    generated = []
    original = projector._generate
    projector._generate = lambda *a, **kw: generated.append(a[0]) or original(*a, **kw)
    for lo, hi in [(0, 10), (500, 1700), (1030, 1030), (4990, 5000), (0, p)]:
        rows = projector.rows_of(lo, hi, torch.float64, "cpu", num_params=p)
        torch.testing.assert_close(rows, reference[lo:hi], rtol=0, atol=0)
        pieces = list(projector.row_blocks(lo, hi, torch.float64, "cpu", num_params=p))
        assert [a for a, _, _ in pieces[:1]] == ([lo] if hi > lo else [])
        assert all(b == a2 for (_, b, _), (a2, _, _) in zip(pieces, pieces[1:], strict=False))
    # The first three tiles are cached, within the budget, and reused by project().
    assert sorted(key[0] for key in projector._cache) == [0, 1, 2]
    assert projector._cached_bytes == 3 * block_bytes == sum(b.numel() * 8 for b in projector._cache.values())
    cached = projector.rows_of(520, 1000, torch.float64, "cpu", num_params=p)
    assert cached.data_ptr() == projector._cache[(1, 2, torch.float64, torch.device("cpu"))][8:].data_ptr()
    generated.clear()
    grads = torch.randn(3, p, dtype=torch.float64)
    torch.testing.assert_close(projector.project(grads), grads @ reference, rtol=1e-12, atol=1e-12)
    assert 0 not in generated and projector._cached_bytes == 3 * block_bytes
    # Rows of regenerated tiles are copied into the caller's buffer.
    buffer = torch.empty(2000 * k, dtype=torch.float64)
    rows = projector.rows_of(2000, 3100, torch.float64, "cpu", num_params=p, out=buffer)
    assert rows.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(rows, reference[2000:3100], rtol=0, atol=0)
    with pytest.raises(Exception, match="rows"):
        projector.rows_of(10, p + 1, torch.float64, "cpu", num_params=p)
