"""The factored (Kronecker) projection: exactness against the explicit matrix, scaling,
the store's record of it, agreement with the dense projection, and its errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from srcproj import (
    Attributor,
    ClassificationTask,
    ConfigurationError,
    KroneckerProjector,
    MatrixProjector,
    RademacherProjector,
    Segment,
    StoreMismatchError,
    Trajectory,
)
from srcproj.gradients import FactoredBackend, GradientComputer, ProjectedGradients, VmapBackend

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------- models
class SequenceNet(nn.Module):
    """A Linear over positions (Σ_t δ_t a_tᵀ), a LayerNorm (dense share), an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 12), read as 3 positions of 4 features
        h = self.act(self.norm(self.embed(x.reshape(x.shape[0], 3, 4))))
        return self.head(h).mean(dim=1)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.ReLU(inplace=True),
                         nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(3, 4, 2, stride=2),
                         nn.Tanh(), nn.Conv2d(4, 2, 3, padding="same", bias=False), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 3))


MODELS = {"mlp": (mlp, (6,)), "sequence": (SequenceNet, (12,)), "cnn": (cnn, (2, 6, 6))}


def build(name: str, batch: int = 5):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,), generator=generator)
    return model, x, y


def explicit_matrix(projector: KroneckerProjector, model: nn.Module, param_names) -> torch.Tensor:
    """The k×p matrix, built from its description: block rows P_out ⊗ P_in per layer, then the
    other parameters' block (dense Rademacher, or the identity), then zeros.

    A factor is a ±1/√k Rademacher matrix or, in version 2 where the description says so,
    the identity. The rows of P_out ⊗ P_in are taken in order (r, s) (output row r, input
    row s), or (s, r) when only the outputs are the identity; the first ``dims`` are
    kept. Random on both sides, they are scaled by √(k_out·k_in/dims) (version 1's
    truncation). With one identity side, an identity index left with n of the k random
    rows has them scaled by √(k/n), as an n-row Rademacher matrix would be."""
    shapes = dict(model.named_parameters())
    offsets, start = {}, 0
    for name in param_names:
        offsets[name] = (start, start + shapes[name].numel())
        start += shapes[name].numel()
    description = projector.describe()
    blocks = []
    for index, entry in enumerate(description["layers"]):
        k_out, k_in, width = entry["k_out"], entry["k_in"], entry["d_in"] + entry["bias"]
        identity_out, identity_in = entry.get("out") == "identity", entry.get("in") == "identity"
        p_out, p_in = projector.layer_matrices(index)
        assert p_out.shape == (k_out, entry["d_out"])
        assert p_in.shape == (k_in, width)
        for matrix, identity, k in ((p_out, identity_out, k_out), (p_in, identity_in, k_in)):
            if identity:
                torch.testing.assert_close(matrix, torch.eye(k, dtype=torch.float64), rtol=0, atol=0)
            else:
                np.testing.assert_allclose(matrix.abs().numpy(), 1 / math.sqrt(k))
        kron = torch.kron(p_out, p_in)  # row r·k_in + s
        order = [(r, s) for r in range(k_out) for s in range(k_in)]
        if identity_out and not identity_in:
            order = [(r, s) for s in range(k_in) for r in range(k_out)]
        order = order[: entry["dims"]]
        rows = torch.tensor([r * k_in + s for r, s in order])
        kron = kron[rows]
        if identity_out == identity_in:
            kron = kron * math.sqrt(k_out * k_in / entry["dims"])
        else:  # the identity side's index of each kept row, and how many random rows it kept
            side = [r if identity_out else s for r, s in order]
            counts = {i: side.count(i) for i in side}
            random_rows = k_in if identity_out else k_out
            kron = kron * torch.tensor([math.sqrt(random_rows / counts[i]) for i in side],
                                       dtype=torch.float64)[:, None]
        block = torch.zeros(entry["dims"], start, dtype=torch.float64)
        module = entry["module"]
        lo, hi = offsets[f"{module}.weight"]
        columns = (torch.arange(entry["d_out"])[:, None] * width + torch.arange(entry["d_in"])[None, :]).reshape(-1)
        block[:, lo:hi] = kron[:, columns]
        if entry["bias"]:
            lo, hi = offsets[f"{module}.bias"]
            block[:, lo:hi] = kron[:, torch.arange(entry["d_out"]) * width + entry["d_in"]]
        blocks.append(block)
        if index == len(description["layers"]) - 1 and description.get("padding"):
            blocks.append(torch.zeros(description["padding"], start, dtype=torch.float64))
    dense = description["dense"]
    if dense is not None:
        size = sum(shapes[n].numel() for n in dense["params"])
        if dense["projector"] == {"kind": "identity"}:
            assert dense["dims"] == size
            matrix = torch.eye(size, dtype=torch.float64)
        else:
            matrix = RademacherProjector(dense["dims"], description["seed"]).project(
                torch.eye(size, dtype=torch.float64)).T
        block = torch.zeros(dense["dims"], start, dtype=torch.float64)
        column = 0
        for name in dense["params"]:
            lo, hi = offsets[name]
            block[:, lo:hi] = matrix[:, column:column + hi - lo]
            column += hi - lo
        blocks.append(block)
    full = torch.cat(blocks)
    assert full.shape == (projector.proj_dim, start)
    return full


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("proj_dim", [23, 60])
def test_features_equal_the_explicit_kronecker_matrix(name, proj_dim):
    model, x, y = build(name)
    computer = GradientComputer(model, ClassificationTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    projector = KroneckerProjector(proj_dim, seed=3)
    gradients = ProjectedGradients(computer, projector)
    with computer.evaluating():
        gradients.bind({**trainable, **fixed}, x[:2])
        assert isinstance(gradients.backend, FactoredBackend)
        matrix = explicit_matrix(projector, model, computer.param_names)
        for kind in ("loss", "measurement"):
            flat = computer.per_example_grads(trainable, fixed, x, y, kind)  # autograd, (B, p)
            expected = flat @ matrix.T
            torch.testing.assert_close(gradients.features(trainable, fixed, x, y, kind), expected,
                                       rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(projector.project(flat), expected, rtol=1e-5, atol=1e-12)
        jacobians, outputs = computer.output_jacobians(trainable, fixed, x)
        projected, outputs_k = gradients.output_features(trainable, fixed, x)
        torch.testing.assert_close(projected, jacobians @ matrix.T, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(outputs_k, outputs)
    layers = projector.describe()["layers"]
    assert sum(e["dims"] for e in layers) + (projector.describe()["dense"] or {"dims": 0})["dims"] + \
        projector.describe()["padding"] == proj_dim
    if name == "sequence":  # the LayerNorm is projected densely, in its own share
        assert projector.describe()["dense"]["params"] == ["norm.weight", "norm.bias"]
    if name == "cnn":
        assert [e["type"] for e in layers] == ["conv2d", "conv2d", "conv2d", "linear"]


def test_columns_have_unit_norm_and_PtP_is_the_identity_on_average():
    """Version 1: every column of P has norm 1 exactly (truncated layers included); over seeds
    PᵀP → I. (Version 2: tests/test_factored_v2.py.)"""
    model, x, _ = build("sequence")
    names = [n for n, _ in model.named_parameters()]
    p = sum(v.numel() for v in model.parameters())
    total = torch.zeros(p, p, dtype=torch.float64)
    seeds = 300
    for seed in range(seeds):
        projector = KroneckerProjector(37, seed=seed, version=1)  # 37 = 12 + 12 + 13: truncated layers
        projector.bind(model)
        matrix = explicit_matrix(projector, model, names)
        gram = matrix.T @ matrix
        np.testing.assert_allclose(torch.diagonal(gram).numpy(), 1.0, rtol=1e-12)
        total += gram
    assert any(e["k_out"] * e["k_in"] != e["dims"] for e in projector.describe()["layers"])
    mean = total / seeds
    # Off-diagonal entries of one PᵀP have std at most 1/√min(k_in, k_out) ≈ 0.3.
    off = (mean - torch.eye(p, dtype=torch.float64)).abs().max()
    assert float(off) < 6 * 0.3 / math.sqrt(seeds), float(off)
    # Inner products are preserved on average: E ⟨Px, Pz⟩ = ⟨x, z⟩.
    generator = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, p, generator=generator, dtype=torch.float64)
    assert abs(float(u @ mean @ v - u @ v)) < 0.05 * float(u.norm() * v.norm())


def test_version_1_layout_divides_k_equally_and_caps_small_layers():
    """Version 1 (stores made before version 2 are rebuilt with it); version 2: test_factored_v2.py."""
    model = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 2))
    projector = KroneckerProjector(1000, seed=0, version=1)
    projector.bind(model)
    layers = projector.describe()["layers"]
    assert [e["dims"] for e in layers] == [898, 102]  # the head has 2 × 51 parameters: its cap
    # 898 and 102 have no divisor near their square root: 30 × 30 and 11 × 10, truncated.
    assert [(e["k_out"], e["k_in"]) for e in layers] == [(30, 30), (11, 10)]
    projector = KroneckerProjector(1024, seed=0, version=1)
    projector.bind(nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 20)))
    assert [(e["k_out"], e["k_in"], e["dims"]) for e in projector.describe()["layers"]] == [
        (16, 32, 512), (16, 32, 512)]
    assert projector.describe()["dense"] is None


# ---------------------------------------------------------------------------- Attributor
@pytest.fixture(scope="module")
def float64_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(2)
    X = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=generator)
    states = []
    for scale in (0.2, 0.4):
        states.append({k: v + scale * torch.randn(v.shape, generator=generator, dtype=v.dtype)
                       for k, v in model.state_dict().items()})
    traj = Trajectory([Segment(states, steps=30, lr=0.1, data=(X, y))], momentum=0.5, weight_decay=0.01)
    queries = (X[:7] + 0.1, y[:7])
    return model, traj, queries


@pytest.mark.parametrize("hessian", ["exact", "fisher", "empirical"])
def test_attributor_equals_the_explicit_matrix_end_to_end(float64_run, tmp_path, hessian):
    """Features, Hessians (exact, fisher) and scores equal MatrixProjector(P_out ⊗ P_in)'s."""
    model, traj, queries = float64_run
    projector = KroneckerProjector(20, seed=0)
    kron = Attributor(model, ClassificationTask(), traj, tmp_path / "kron.zarr", projector=projector,
                      hessian=hessian, feature_dtype="float64", chunk_size=16)
    kron.featurize(batch_size=8, progress=False)
    matrix = explicit_matrix(projector, model, kron.computer.param_names)
    dense = Attributor(model, ClassificationTask(), traj, tmp_path / "matrix.zarr",
                       projector=MatrixProjector(matrix), hessian=hessian, feature_dtype="float64", chunk_size=16)
    dense.featurize(batch_size=8, progress=False)
    for c in range(2):
        np.testing.assert_allclose(kron.checkpoint_features(c), dense.checkpoint_features(c), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(kron.checkpoint_hessian(c), dense.checkpoint_hessian(c), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(kron.query_features(queries), dense.query_features(queries), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(kron.score(queries), dense.score(queries), rtol=1e-5, atol=1e-10)


def test_modules_subset_goes_through_the_factored_projection(float64_run, tmp_path):
    model, traj, queries = float64_run
    attr = Attributor(model, ClassificationTask(), traj, tmp_path / "sub.zarr", projector=KroneckerProjector(9),
                      modules=["2"], hessian="exact", feature_dtype="float64", chunk_size=16, query="final")
    assert [e["module"] for e in attr.store.metadata["projector"]["layers"]] == ["2"]
    attr.featurize(batch_size=8, progress=False)
    computer = attr.computer
    trainable, fixed = computer.split(traj.segments[0].checkpoints[1], torch.device("cpu"))
    flat = computer.per_example_grads(trainable, fixed, *queries, "measurement")
    matrix = explicit_matrix(attr.projector, model, computer.param_names)
    np.testing.assert_allclose(attr.query_features(queries), (flat @ matrix.T).numpy(), rtol=1e-5, atol=1e-12)


def test_store_records_the_projector_and_refuses_mixing(tiny_run, tmp_path):
    path = tmp_path / "kron.zarr"
    attr = tiny_run.attributor(path, projector=KroneckerProjector(16, seed=0))
    recorded = attr.store.metadata["projector"]
    assert recorded["kind"] == "kronecker" and recorded["proj_dim"] == 16 and recorded["seed"] == 0
    assert [(e["module"], e["d_out"], e["d_in"], e["bias"]) for e in recorded["layers"]] == [
        ("0", 6, 8, True), ("2", 3, 6, True)]
    attr.featurize(batch_size=32, progress=False)
    # The same projector again: resumed, nothing recomputed.
    again = tiny_run.attributor(path, projector=KroneckerProjector(16, seed=0)).featurize(progress=False)
    assert again.feature_chunks_computed == 0
    with pytest.raises(StoreMismatchError, match=r"projector\.kind: 'kronecker' in the store, 'rademacher' now"):
        tiny_run.attributor(path)  # the default dense projection, same k and seed
    with pytest.raises(StoreMismatchError, match=r"projector\.seed: 0 in the store, 1 now"):
        tiny_run.attributor(path, projector=KroneckerProjector(16, seed=1))
    dense_path = tmp_path / "dense.zarr"
    tiny_run.attributor(dense_path)
    with pytest.raises(StoreMismatchError, match=r"projector\.kind: 'rademacher' in the store, 'kronecker' now"):
        tiny_run.attributor(dense_path, projector=KroneckerProjector(16, seed=0))


def test_dense_stores_of_the_old_generator_are_refused(tiny_run, tmp_path):
    class OldRademacher(RademacherProjector):
        def describe(self):
            return {k: v for k, v in super().describe().items() if k != "version"}

    path = tmp_path / "old.zarr"
    tiny_run.attributor(path, projector=OldRademacher(16, 0))
    with pytest.raises(StoreMismatchError, match=r"projector\.version: '?absent'? in the store, 2 now"):
        tiny_run.attributor(path)


def test_scores_agree_with_the_dense_projection_on_the_digits_mlp(tmp_path):
    """The demo's digits MLP: factored and dense scores at the same k agree about as well
    as two dense projections with different seeds do."""
    from srcproj.demo import load_digits_split, make_mlp, train_sgd

    X, y, Xt, yt = load_digits_split()
    X, y = X[:300], y[:300]
    states = train_sgd(make_mlp(), X, y, steps=120, lr=0.02, checkpoint_at=[60, 120])
    traj = Trajectory([Segment(states, steps=120, lr=0.02, data=(X, y))], momentum=0.9, weight_decay=1e-3)
    queries = (Xt[:20], yt[:20])

    def scores(projector, name):
        attr = Attributor(make_mlp(), ClassificationTask(), traj, tmp_path / name, proj_dim=512,
                          projector=projector, feature_dtype="float32", chunk_size=150)
        attr.featurize(batch_size=150, progress=False)
        return attr.score(queries)

    dense = scores(None, "dense.zarr")
    factored = scores(KroneckerProjector(512, seed=0), "kron.zarr")
    other_seed = scores(RademacherProjector(512, seed=1), "dense1.zarr")

    def agreement(a, b):
        return float(np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(len(a))]))

    kron_vs_dense, seed_vs_seed = agreement(factored, dense), agreement(other_seed, dense)
    assert kron_vs_dense > 0.8, (kron_vs_dense, seed_vs_seed)
    assert kron_vs_dense > seed_vs_seed - 0.1, (kron_vs_dense, seed_vs_seed)


def test_factored_features_do_not_depend_on_the_grad_mode():
    """Under torch.no_grad the hooks still see the output gradients (nothing silently zero)."""
    model, x, y = build("sequence")
    computer = GradientComputer(model, ClassificationTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    projector = KroneckerProjector(30)
    gradients = ProjectedGradients(computer, projector)
    with torch.no_grad():
        gradients.bind(dict(model.state_dict()), x[:2])
        features = gradients.features(trainable, fixed, x, y)
        jacobians, _ = gradients.output_features(trainable, fixed, x)
    assert [e["module"] for e in projector.describe()["layers"]] == ["embed", "head"]
    torch.testing.assert_close(features, gradients.features(trainable, fixed, x, y), rtol=0, atol=0)
    torch.testing.assert_close(jacobians, gradients.output_features(trainable, fixed, x)[0], rtol=0, atol=0)
    assert bool((features != 0).any(dim=1).all())  # every example has features


# ---------------------------------------------------------------------------- dense pieces
def test_rademacher_features_project_gradient_pieces_like_flat_rows():
    model, x, y = build("cnn")
    computer = GradientComputer(model, ClassificationTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    projector = RademacherProjector(24, seed=2)
    gradients = ProjectedGradients(computer, projector)  # unbound: vmapped pieces, one per parameter
    assert isinstance(gradients.backend, VmapBackend)
    with computer.evaluating():
        flat = computer.per_example_grads(trainable, fixed, x, y)
        torch.testing.assert_close(gradients.features(trainable, fixed, x, y), projector.project(flat),
                                   rtol=1e-12, atol=1e-12)
    pieces = [flat[:, a:b] for a, b in [(0, 5), (5, 600), (600, 1100), (1100, flat.shape[1])]]
    torch.testing.assert_close(projector.project_pieces(pieces), projector.project(flat), rtol=1e-12, atol=1e-12)


def test_rademacher_keeps_blocks_within_its_budget_and_regenerates_the_rest(monkeypatch):
    k, p = 16, 512 * 6
    block_bytes = 512 * k * 4  # one tile per block in float32
    projector = RademacherProjector(k, seed=4, cache_bytes=2 * block_bytes)
    monkeypatch.setattr(projector, "_tiles_per_block", lambda dtype: 1)
    generated = []
    original = projector._generate
    monkeypatch.setattr(projector, "_generate", lambda *a, **kw: generated.append(a[0]) or original(*a, **kw))
    grads = torch.randn(3, p, generator=torch.Generator().manual_seed(0))
    first = projector.project(grads)
    assert generated == [0, 1, 2, 3, 4, 5] and projector._cached_bytes == 2 * block_bytes
    generated.clear()
    second = projector.project(grads[:1])  # another batch (or checkpoint): tiles 0 and 1 come from the cache
    assert generated == [2, 3, 4, 5]
    # Not bit-equal in general: BLAS may round a 1-row product differently from a 3-row
    # one (seen with 16 cores), so float32 tolerance.
    torch.testing.assert_close(second, first[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first, RademacherProjector(k, seed=4).project(grads), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- errors
class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x).mean(dim=(2, 3))))


def test_other_parameters_refused_on_request():
    model = GroupedConv()
    with pytest.raises(ConfigurationError, match=re.escape("other_params='refuse'") + r".*4 attributed parameters"
                       r".*conv\.weight \(Conv2d with groups=2\).*norm\.weight \(LayerNorm is neither Linear, "
                       r"transformers' Conv1D nor Conv2d\).*modules=\[\.\.\.\]"):
        KroneckerProjector(32, other_params="refuse").bind(model)
    # Only the head: nothing outside a factored layer.
    projector = KroneckerProjector(32, other_params="refuse")
    projector.bind(model, ["head.weight", "head.bias"])
    assert projector.describe()["dense"] is None
    # By default they are projected densely, in their own share of k.
    projector = KroneckerProjector(32)
    projector.bind(model)
    assert projector.describe()["dense"]["params"] == ["conv.weight", "conv.bias", "norm.weight", "norm.bias"]


class ReusedWeight(nn.Module):
    """``fc.weight`` also enters the output outside ``fc``'s forward, as in nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) + x @ self.fc.weight.T)


def test_weight_used_outside_its_module_is_projected_densely(tmp_path):
    torch.manual_seed(0)
    model = ReusedWeight().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    projector = KroneckerProjector(12)
    projector.bind(model, params=dict(model.state_dict()), example=x[:2])
    assert [e["module"] for e in projector.describe()["layers"]] == ["head"]
    assert projector.describe()["dense"]["params"] == ["fc.weight", "fc.bias"]
    computer = GradientComputer(model, ClassificationTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    matrix = explicit_matrix(projector, model, computer.param_names)
    gradients = ProjectedGradients(computer, projector)  # laid out by projector.bind: used as it is
    assert isinstance(gradients.backend, FactoredBackend)
    torch.testing.assert_close(gradients.features(trainable, fixed, x, y),
                               computer.per_example_grads(trainable, fixed, x, y) @ matrix.T, rtol=1e-5, atol=1e-12)
    jacobians, _ = computer.output_jacobians(trainable, fixed, x)
    torch.testing.assert_close(gradients.output_features(trainable, fixed, x)[0], jacobians @ matrix.T,
                               rtol=1e-5, atol=1e-12)
    # ProjectedGradients.bind lays it out the same way: binding again is fine.
    gradients.bind({**trainable, **fixed}, x[:2])
    assert [e["module"] for e in projector.describe()["layers"]] == ["head"]
    with pytest.raises(ConfigurationError, match=r"fc\.weight \(used outside its module\)"):
        KroneckerProjector(12, other_params="refuse").bind(model, params=dict(model.state_dict()), example=x[:2])


def test_projector_errors(tiny_run, tmp_path):
    with pytest.raises(ConfigurationError, match=r"found no Linear, Conv1D or Conv2d layer.*RademacherProjector"):
        KroneckerProjector(8).bind(nn.Sequential(nn.LayerNorm(4)))
    with pytest.raises(ConfigurationError, match=r"not bound to a model.*Attributor\(\.\.\., projector=\.\.\.\)"):
        KroneckerProjector(8).project(torch.zeros(2, 69))
    with pytest.raises(ConfigurationError, match=r"proj_dim=1 is smaller than the 2 groups"):
        tiny_run.attributor(tmp_path / "small.zarr", projector=KroneckerProjector(1))
    with pytest.raises(ConfigurationError, match=r"other_params='all'; choose one of \('dense', 'refuse'\)"):
        KroneckerProjector(8, other_params="all")
    with pytest.raises(ConfigurationError, match=r"seed=-1; it must be an integer >= 0"):
        KroneckerProjector(8, seed=-1)
    with pytest.raises(ConfigurationError, match=r"proj_dim=0"):
        KroneckerProjector(0)
    projector = KroneckerProjector(16)
    tiny_run.attributor(tmp_path / "a.zarr", projector=projector)
    tiny_run.attributor(tmp_path / "b.zarr", projector=projector)  # the same model again: fine
    with pytest.raises(ConfigurationError, match=r"already bound to another model.*one projector per model"):
        projector.bind(nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)))
    with pytest.raises(ConfigurationError, match=r"already bound to another model"):
        tiny_run.attributor(tmp_path / "c.zarr", projector=projector, modules=["2"])
    with pytest.raises(ConfigurationError, match=r"bound to 75"):
        projector.project(torch.zeros(2, 70))


def test_projected_gradients_need_a_laid_out_projector_for_these_parameters():
    model, x, y = build("mlp")
    computer = GradientComputer(model, ClassificationTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    with pytest.raises(ConfigurationError, match=r"not bound to a model.*Attributor\(\.\.\., projector=\.\.\.\)"):
        ProjectedGradients(computer, KroneckerProjector(8)).features(trainable, fixed, x, y)
    projector = KroneckerProjector(8)
    projector.bind(model)  # every parameter
    subset = GradientComputer(model, ClassificationTask(), modules=["4"])
    trainable, fixed = subset.split(model.state_dict(), torch.device("cpu"))
    with pytest.raises(ConfigurationError,
                       match=r"bound to other attributed parameters \(5 tensors\) than these \(2\)"):
        ProjectedGradients(subset, projector).output_features(trainable, fixed, x)
    with pytest.raises(ConfigurationError, match=r"already bound to another model"):
        ProjectedGradients(subset, projector).bind({**trainable, **fixed}, x[:2])
