"""The dense (Rademacher) projection's hook backend: per-example gradients of Linear and
Conv2d layers from one batched forward and backward pass give the same features as
torch.func.vmap, with the other parameters (LayerNorm, embeddings, reused weights)
still vmapped, in the attributed parameters' order; which backend a projector gets."""

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
from srcproj.gradients import DenseHookBackend, GradientComputer, ProjectedGradients, VmapBackend

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
    """The same matrix through the generic path (flat vmapped gradients, then project):
    a class that defines project() does not accept pieces unless it says so."""

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return super().project(grads)


def bound(name: str, proj_dim: int = 37, seed: int = 3, projector=None):
    model, x, y = build(name)
    computer = GradientComputer(model, ClassificationTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    projector = RademacherProjector(proj_dim, seed=seed) if projector is None else projector
    gradients = ProjectedGradients(computer, projector)
    with computer.evaluating():
        gradients.bind({**trainable, **fixed}, x[:2])
    return gradients, computer, trainable, fixed, x, y


def test_backends_follow_the_declared_capabilities():
    assert RademacherProjector.accepts_pieces and not RademacherProjector.factored
    assert not VmapRademacher.accepts_pieces  # defines project(): loses the piece path

    class Declared(VmapRademacher):
        accepts_pieces = True  # states that its project() is still the piece path's map

    class Described(RademacherProjector):  # project() inherited: keeps the capability
        def describe(self):
            return super().describe()

    assert Declared.accepts_pieces and Described.accepts_pieces
    assert not MatrixProjector.accepts_pieces and not MatrixProjector.factored
    for projector, backend in [(RademacherProjector(37, seed=3), DenseHookBackend),
                               (Described(37, seed=3), DenseHookBackend),
                               (Declared(37, seed=3), DenseHookBackend),
                               (VmapRademacher(37, seed=3), VmapBackend),
                               (MatrixProjector(torch.randn(4, 70, dtype=torch.float64)), VmapBackend)]:
        gradients = bound("mlp", projector=projector)[0]
        assert type(gradients.backend) is backend, type(projector).__name__
    model, x, _ = build("mlp")
    unbound = ProjectedGradients(GradientComputer(model, ClassificationTask()), RademacherProjector(37, seed=3))
    assert type(unbound.backend) is VmapBackend  # hooks only once bound
    # Nothing to hook (only a LayerNorm is attributed): the vmap backend.
    computer = GradientComputer(nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)).double(), ClassificationTask(),
                                modules=["1"])
    trainable, fixed = computer.split(computer.model.state_dict(), torch.device("cpu"))
    gradients = ProjectedGradients(computer, RademacherProjector(8))
    gradients.bind({**trainable, **fixed}, x[:2])
    assert type(gradients.backend) is VmapBackend


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["loss", "measurement"])
def test_hook_features_equal_the_vmap_features(name, kind):
    gradients, computer, trainable, fixed, x, y = bound(name)
    projector = gradients.projector
    assert isinstance(gradients.backend, DenseHookBackend)  # the hook backend is used
    generic = bound(name, projector=VmapRademacher(37, seed=3))[0]
    assert isinstance(generic.backend, VmapBackend)
    with computer.evaluating():
        have = gradients.features(trainable, fixed, x, y, kind)
        want = projector.project(computer.per_example_grads(trainable, fixed, x, y, kind))
        generic = generic.features(trainable, fixed, x, y, kind)
    torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(generic, want, rtol=1e-10, atol=1e-12)
    assert bool((have != 0).any(dim=1).all())


def test_layers_used_outside_their_forward_are_vmapped():
    gradients, computer, *_ = bound("reused_weight")
    backend = gradients.backend
    assert backend.computer is computer
    assert [layer.module for layer in backend.layers] == ["head"]
    assert backend.others == ["fc.weight", "fc.bias"]
    backend = bound("tokens")[0].backend
    assert [layer.module for layer in backend.layers] == ["mix", "head"]
    assert backend.others == ["embed.weight", "norm.weight", "norm.bias"]


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
        gradients = ProjectedGradients(computer, projector)
        with torch.no_grad(), computer.evaluating():
            gradients.bind({**trainable, **fixed}, x[:2])
            assert isinstance(gradients.backend, DenseHookBackend)
            for kind in ("loss", "measurement"):
                have = gradients.features(trainable, fixed, x, y, kind)
                want = projector.project(computer.per_example_grads(trainable, fixed, x, y, kind))
                torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)


def test_unbound_training_mode_and_other_models_take_the_vmap_path(monkeypatch):
    gradients, computer, trainable, fixed, x, y = bound("mlp")
    projector = gradients.projector
    calls = []
    original = GradientComputer.layer_deltas

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradientComputer, "layer_deltas", counting)
    with computer.evaluating():
        want = gradients.features(trainable, fixed, x, y)
    assert len(calls) == 1
    computer.model.train()
    torch.testing.assert_close(gradients.features(trainable, fixed, x, y), want, rtol=1e-10, atol=1e-12)
    assert isinstance(gradients.backend, DenseHookBackend)  # kept for eval mode
    other = GradientComputer(build("mlp")[0], ClassificationTask())  # another model object, same projector
    with other.evaluating():
        torch.testing.assert_close(ProjectedGradients(other, projector).features(trainable, fixed, x, y), want,
                                   rtol=1e-10, atol=1e-12)
        fresh = RademacherProjector(37, seed=3)  # never bound
        torch.testing.assert_close(ProjectedGradients(other, fresh).features(trainable, fixed, x, y), want,
                                   rtol=1e-10, atol=1e-12)
    assert len(calls) == 1
    assert fresh.describe() == projector.describe()


def test_attributor_scores_are_unchanged(tmp_path, monkeypatch):
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
    hooked = []
    original = DenseHookBackend.features
    monkeypatch.setattr(DenseHookBackend, "features",
                        lambda self, *a, **kw: hooked.append(1) or original(self, *a, **kw))
    default = Attributor(model, ClassificationTask(), traj, tmp_path / "default.zarr", proj_dim=k, seed=0,
                         hessian="fisher", feature_dtype="float32", chunk_size=16)
    default.featurize(batch_size=8, progress=False)
    assert hooked  # the features came from the hook backend
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
    gradients = ProjectedGradients(computer, projector)
    with computer.evaluating():
        gradients.bind({**trainable, **fixed}, x[:2])
        assert isinstance(gradients.backend, DenseHookBackend)
        calls = []
        original = computer.layer_deltas
        monkeypatch.setattr(computer, "layer_deltas", lambda *a, **kw: calls.append(1) or original(*a, **kw))
        first = gradients.features(trainable, fixed, x, y)
        second = gradients.features(trainable, fixed, x, y)
        want = projector.project(computer.per_example_grads(trainable, fixed, x, y))
    assert len(calls) == 1 and isinstance(gradients.backend, VmapBackend)  # tried once, then vmap only
    torch.testing.assert_close(first, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, want, rtol=1e-10, atol=1e-12)
