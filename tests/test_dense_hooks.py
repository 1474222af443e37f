"""The dense (Rademacher) projection's hook path: per-example gradients of Linear and
Conv2d layers from one batched forward and backward pass give the same features as
torch.func.vmap, with the other parameters (LayerNorm, embeddings, reused weights)
still vmapped, in the attributed parameters' order."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_scores_close
from test_factored import ReusedWeight, SequenceNet, cnn, mlp
from torch import nn

from srcproj import (
    Attributor,
    ClassificationTask,
    MatrixProjector,
    RademacherProjector,
    Segment,
    Trajectory,
)
from srcproj.gradients import GradientComputer

pytestmark = pytest.mark.usefixtures("single_thread")


class TokenNet(nn.Module):
    """An embedding (vmapped), a Linear over positions (B, T, d), a LayerNorm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 4) token ids
        return self.head(self.norm(torch.tanh(self.mix(self.embed(x)))).mean(dim=1))


class TwiceCalled(nn.Module):
    """One Linear module called twice (two terms Σ over calls) and a frozen-weight bias."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def no_bias_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))


MODELS = {
    "mlp": (mlp, (6,), None),
    "mlp_no_bias": (no_bias_mlp, (6,), None),
    "cnn": (cnn, (2, 6, 6), None),
    "sequence": (SequenceNet, (12,), None),
    "tokens": (TokenNet, (4,), 7),
    "reused_weight": (ReusedWeight, (4,), None),
    "twice_called": (TwiceCalled, (4,), None),
}


def build(name: str, batch: int = 5):
    factory, shape, vocab = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    generator = torch.Generator().manual_seed(1)
    if vocab is None:
        x = torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
    else:
        x = torch.randint(0, vocab, (batch, *shape), generator=generator)
    y = torch.randint(0, 3, (batch,), generator=generator)
    return model, x, y


class VmapRademacher(RademacherProjector):
    """The same matrix through the generic path (flat vmapped gradients, then project)."""

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return super().project(grads)


def bound(name: str, proj_dim: int = 37, seed: int = 3):
    model, x, y = build(name)
    computer = GradientComputer(model, ClassificationTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    projector = RademacherProjector(proj_dim, seed=seed)
    with computer.evaluating():
        projector.bind(model, computer.param_names, params={**trainable, **fixed}, example=x[:2])
    return projector, computer, trainable, fixed, x, y


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["loss", "measurement"])
def test_hook_features_equal_the_vmap_features(name, kind):
    projector, computer, trainable, fixed, x, y = bound(name)
    assert projector._hooked is not None  # the hook path is used
    with computer.evaluating():
        have = projector.features(computer, trainable, fixed, x, y, kind)
        want = projector.project(computer.per_example_grads(trainable, fixed, x, y, kind))
        generic = VmapRademacher(37, seed=3).features(computer, trainable, fixed, x, y, kind)
    torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(generic, want, rtol=1e-10, atol=1e-12)
    assert bool((have != 0).any(dim=1).all())


def test_layers_used_outside_their_forward_are_vmapped():
    projector, computer, *_ = bound("reused_weight")
    _, names, layers, others = projector._hooked
    assert names == computer.param_names
    assert [layer.module for layer in layers] == ["head"]
    assert others == ["fc.weight", "fc.bias"]
    projector, *_ = bound("tokens")
    assert [layer.module for layer in projector._hooked[2]] == ["mix", "head"]
    assert projector._hooked[3] == ["embed.weight", "norm.weight", "norm.bias"]


def test_hook_path_under_no_grad_with_a_module_subset_and_a_large_batch():
    """Grad mode does not matter; a subset of modules keeps the attributed order; many tiles."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.LayerNorm(30), nn.Linear(30, 20), nn.ReLU(),
                          nn.Linear(20, 3)).double()
    x = torch.randn(9, 40, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    for modules in (None, ["5", "2", "0"]):
        computer = GradientComputer(model, ClassificationTask(), modules=modules)
        trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
        projector = RademacherProjector(50, seed=1)
        with torch.no_grad(), computer.evaluating():
            projector.bind(model, computer.param_names, params={**trainable, **fixed}, example=x[:2])
            assert projector._hooked is not None
            for kind in ("loss", "measurement"):
                have = projector.features(computer, trainable, fixed, x, y, kind)
                want = projector.project(computer.per_example_grads(trainable, fixed, x, y, kind))
                torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)


def test_unbound_training_mode_and_other_models_take_the_vmap_path(monkeypatch):
    projector, computer, trainable, fixed, x, y = bound("mlp")
    calls = []
    original = GradientComputer.layer_deltas

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradientComputer, "layer_deltas", counting)
    with computer.evaluating():
        want = projector.features(computer, trainable, fixed, x, y)
    assert len(calls) == 1
    computer.model.train()
    torch.testing.assert_close(projector.features(computer, trainable, fixed, x, y), want, rtol=1e-10, atol=1e-12)
    other = GradientComputer(build("mlp")[0], ClassificationTask())  # another model object
    with other.evaluating():
        torch.testing.assert_close(projector.features(other, trainable, fixed, x, y), want, rtol=1e-10, atol=1e-12)
        fresh = RademacherProjector(37, seed=3)  # never bound
        torch.testing.assert_close(fresh.features(other, trainable, fixed, x, y), want, rtol=1e-10, atol=1e-12)
    assert len(calls) == 1
    assert fresh.describe() == projector.describe()


def test_attributor_scores_are_unchanged(tmp_path):
    """A store featurized with the default projector (hooks) scores as the explicit matrix does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3))
    generator = torch.Generator().manual_seed(2)
    X = torch.randn(40, 5, generator=generator)
    y = torch.randint(0, 3, (40,), generator=generator)
    states = [{k: v + scale * torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}
              for scale in (0.2, 0.4)]
    traj = Trajectory([Segment(states, steps=30, lr=0.1, data=(X, y))], momentum=0.5)
    queries = (X[:7] + 0.1, y[:7])
    k = 16
    default = Attributor(model, ClassificationTask(), traj, tmp_path / "default.zarr", proj_dim=k, seed=0,
                         hessian="fisher", feature_dtype="float32", chunk_size=16)
    assert default.projector._hooked is not None
    default.featurize(batch_size=8, progress=False)
    p = sum(v.numel() for v in model.parameters())
    matrix = RademacherProjector(k, seed=0).project(torch.eye(p, dtype=torch.float64)).T
    explicit = Attributor(model, ClassificationTask(), traj, tmp_path / "matrix.zarr",
                          projector=MatrixProjector(matrix.float()), hessian="fisher", feature_dtype="float32",
                          chunk_size=16)
    explicit.featurize(batch_size=8, progress=False)
    for c in range(2):
        assert_scores_close(default.checkpoint_features(c), explicit.checkpoint_features(c), rtol=1e-5)
        assert_scores_close(default.checkpoint_hessian(c), explicit.checkpoint_hessian(c), rtol=1e-5)
    assert_scores_close(default.score(queries), explicit.score(queries), rtol=1e-5)


class SummedLossTask(ClassificationTask):
    """A task whose loss reduces the batch to one number: fine one example at a time (vmap),
    not for one batched backward pass."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().loss(outputs, targets).sum()


def test_a_task_with_a_reduced_loss_falls_back_to_vmap_once_and_for_all(monkeypatch):
    model, x, y = build("mlp")
    computer = GradientComputer(model, SummedLossTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    projector = RademacherProjector(37, seed=3)
    with computer.evaluating():
        projector.bind(model, computer.param_names, params={**trainable, **fixed}, example=x[:2])
        assert projector._hooked is not None
        calls = []
        original = computer.layer_deltas
        monkeypatch.setattr(computer, "layer_deltas", lambda *a, **kw: calls.append(1) or original(*a, **kw))
        first = projector.features(computer, trainable, fixed, x, y)
        second = projector.features(computer, trainable, fixed, x, y)
        want = projector.project(computer.per_example_grads(trainable, fixed, x, y))
    assert len(calls) == 1 and projector._hooked is None  # tried once, then vmap only
    torch.testing.assert_close(first, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, want, rtol=1e-10, atol=1e-12)
