"""Version 2 of the factored (Kronecker) projection: shares by layer size, identity factors
for small dimensions, exact small layers, and the same map on the factored and the row
paths. The explicit matrix is built from the description by ``test_factored.explicit_matrix``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_factored import build, explicit_matrix
from torch import nn

from srcproj import ClassificationTask, ConfigurationError, KroneckerProjector
from srcproj.gradients import FactoredBackend, GradientComputer, ProjectedGradients
from srcproj.projection import _factor_shape, _proportional_fill

pytestmark = pytest.mark.usefixtures("single_thread")


def ragged_mlp() -> nn.Module:
    """At k = 15: identity on the first layer's 3 inputs, random on both sides of the middle
    layer, identity on the head's 3 outputs; every one truncated (ragged)."""
    return nn.Sequential(nn.Linear(2, 15), nn.Tanh(), nn.Linear(15, 10), nn.ReLU(), nn.Linear(10, 3))


def ragged_cnn() -> nn.Module:
    """At k = 45: the same three kinds, for Conv2d layers (d_in = 5, 109 and 145 with the bias)."""
    return nn.Sequential(nn.Conv2d(1, 12, 2), nn.ReLU(), nn.Conv2d(12, 16, 3), nn.Tanh(), nn.Conv2d(16, 3, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


CASES = {"mlp": (ragged_mlp, (2,), 15), "cnn": (ragged_cnn, (1, 7, 7), 45)}


def data(factory, shape, batch: int = 6):
    torch.manual_seed(0)
    model = factory().double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,), generator=generator)
    return model, x, y


def kinds(projector: KroneckerProjector) -> list[tuple[str, str, bool]]:
    """(out, in, truncated) per layer."""
    return [(e["out"], e["in"], e["k_out"] * e["k_in"] != e["dims"]) for e in projector.describe()["layers"]]


# ---------------------------------------------------------------------------- one map
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("extra", [0, 300])  # 300 more than k: every layer exact, then zeros
def test_factored_path_equals_project_and_the_explicit_matrix(name, extra):
    factory, shape, proj_dim = CASES[name]
    model, x, y = data(factory, shape)
    computer = GradientComputer(model, ClassificationTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    p = sum(v.numel() for v in model.parameters())
    proj_dim = proj_dim if not extra else p + extra
    projector = KroneckerProjector(proj_dim, seed=3)
    gradients = ProjectedGradients(computer, projector)
    with computer.evaluating():
        gradients.bind({**trainable, **fixed}, x[:2])
        assert isinstance(gradients.backend, FactoredBackend)
        if extra:
            assert all(k == ("identity", "identity", False) for k in kinds(projector))
            assert projector.describe()["padding"] == extra
        else:
            assert set(kinds(projector)) == {("rademacher", "identity", True), ("rademacher", "rademacher", True),
                                             ("identity", "rademacher", True)}
        matrix = explicit_matrix(projector, model, computer.param_names)
        for kind in ("loss", "measurement"):
            flat = computer.per_example_grads(trainable, fixed, x, y, kind)  # autograd, (B, p)
            factored = gradients.features(trainable, fixed, x, y, kind)
            torch.testing.assert_close(factored, projector.project(flat), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(factored, flat @ matrix.T, rtol=1e-10, atol=1e-12)
            if extra:
                assert bool((factored[:, p:] == 0).all())
        if extra:  # P is a permutation (each layer's bias as its last input column), then zeros
            assert bool((matrix[:p].abs().sum(0) == 1).all() and (matrix[:p].abs().sum(1) == 1).all())
            assert bool((matrix[:p] >= 0).all()) and bool((matrix[p:] == 0).all())
        jacobians, _ = computer.output_jacobians(trainable, fixed, x)
        projected, _ = gradients.output_features(trainable, fixed, x)
        torch.testing.assert_close(projected, jacobians @ matrix.T, rtol=1e-10, atol=1e-12)


def test_random_rows_project_like_project_on_random_gradients():
    """Random float64 rows (not gradients): project() is the explicit matrix, for every kind."""
    for factory, shape, proj_dim in CASES.values():
        model, _, _ = data(factory, shape)
        names = [n for n, _ in model.named_parameters()]
        projector = KroneckerProjector(proj_dim, seed=0)
        projector.bind(model)
        rows = torch.randn(4, sum(v.numel() for v in model.parameters()), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(projector.project(rows), rows @ explicit_matrix(projector, model, names).T,
                                   rtol=1e-10, atol=1e-12)


def test_columns_have_unit_norm_and_PtP_is_the_identity_on_average():
    """Identity factors unscaled, ragged random rows rescaled: every column of P has norm 1,
    and over seeds PᵀP → I (the identity blocks exactly, the random ones on average)."""
    model, _, _ = data(ragged_mlp, (2,))
    names = [n for n, _ in model.named_parameters()]
    p = sum(v.numel() for v in model.parameters())
    total = torch.zeros(p, p, dtype=torch.float64)
    seeds = 300
    for seed in range(seeds):
        projector = KroneckerProjector(15, seed=seed)
        projector.bind(model)
        matrix = explicit_matrix(projector, model, names)
        gram = matrix.T @ matrix
        np.testing.assert_allclose(torch.diagonal(gram).numpy(), 1.0, rtol=1e-12)
        total += gram
    mean = total / seeds
    off = (mean - torch.eye(p, dtype=torch.float64)).abs().max()
    # One PᵀP entry has std at most 1: a column kept with one random row (of 2) is ±1.
    assert float(off) < 6 / math.sqrt(seeds), float(off)
    generator = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, p, generator=generator, dtype=torch.float64)
    assert abs(float(u @ mean @ v - u @ v)) < 0.05 * float(u.norm() * v.norm())


# ---------------------------------------------------------------------------- layout rules
def test_identity_rule_for_a_ten_output_layer():
    """A 10-output layer keeps its outputs exactly; its share goes to the input rows."""
    # Share 64 of a 10 × 65 layer: 10 outputs × ⌈64/10⌉ = 7 input rows, the last 6 outputs with 6.
    assert _factor_shape(64, 10, 65) == {"k_out": 10, "k_in": 7, "dims": 64, "out": "identity",
                                         "in": "rademacher"}
    # Twice the balanced random factor's rows: identity below, random above (share 400: 20 × 20).
    assert _factor_shape(400, 40, 1000)["out"] == "identity"
    assert _factor_shape(400, 45, 1000) == {"k_out": 20, "k_in": 20, "dims": 400, "out": "rademacher",
                                            "in": "rademacher"}
    assert _factor_shape(400, 1000, 12)["in"] == "identity"  # the mirror image: few inputs
    assert _factor_shape(650, 10, 65)["out"] == _factor_shape(650, 10, 65)["in"] == "identity"  # exact
    assert _factor_shape(1, 1, 7) == {"k_out": 1, "k_in": 1, "dims": 1, "out": "identity", "in": "rademacher"}
    # The digits MLP of the benchmarks at k = 512: the 10-output head has the identity on its outputs.
    from srcproj.demo import make_mlp

    projector = KroneckerProjector(512, seed=0)
    projector.bind(make_mlp())
    assert [(e["k_out"], e["k_in"], e["dims"], e["out"], e["in"]) for e in projector.describe()["layers"]] == [
        (20, 19, 367, "rademacher", "rademacher"), (10, 15, 145, "identity", "rademacher")]


def test_shares_sum_to_k_and_follow_the_square_root_of_the_size():
    model = nn.Sequential(nn.Linear(100, 60), nn.ReLU(), nn.Linear(60, 30), nn.ReLU(), nn.Linear(30, 2),
                          nn.LayerNorm(2))
    sizes = [60 * 101, 30 * 61, 2 * 31, 4]  # the last: the LayerNorm, projected apart
    for proj_dim in (4, 40, 300, 1000, 3000):
        projector = KroneckerProjector(proj_dim, seed=0)
        projector.bind(model)
        description = projector.describe()
        shares = [e["dims"] for e in description["layers"]] + [description["dense"]["dims"]]
        assert sum(shares) + description["padding"] == proj_dim
        assert min(shares) >= 1 and all(s <= size for s, size in zip(shares, sizes, strict=True))
        assert shares == _proportional_fill(proj_dim, [math.sqrt(s) for s in sizes], sizes)
    # At k = 300 only the LayerNorm is capped (at 4): the layers get 1 + (300 - 4 - 3)·√size / Σ√size.
    shares = _proportional_fill(300, [math.sqrt(s) for s in sizes], sizes)
    roots = [math.sqrt(s) for s in sizes[:3]]
    ideal = [1 + 293 * root / sum(roots) for root in roots]
    assert shares[3] == 4 and all(abs(s - i) < 1 for s, i in zip(shares, ideal, strict=False)), (shares, ideal)
    # At k = 3000 the head (62 parameters) and the LayerNorm (4) are exact; the rest goes to the others.
    projector = KroneckerProjector(3000, seed=0)
    projector.bind(model)
    description = projector.describe()
    assert [(e["dims"], e["out"], e["in"]) for e in description["layers"]][2] == (62, "identity", "identity")
    assert description["dense"] == {"params": ["5.weight", "5.bias"], "dims": 4, "projector": {"kind": "identity"}}
    assert sum(e["dims"] for e in description["layers"][:2]) == 3000 - 62 - 4
    # Tiny weights still get one dimension each.
    assert _proportional_fill(3, [100.0, 1.0, 1.0], [2, 5, 5]) == [1, 1, 1]
    assert _proportional_fill(10, [1.0, 1.0, 1.0], [1, 1, 100]) == [1, 1, 8]


def test_exact_small_layer_reproduces_its_gradient():
    """A layer given at least its number of parameters is the identity: its features are its
    per-example gradient (weight row by row, the bias as the last input column), unscaled."""
    model, x, y = build("mlp")  # 6-5-4-3: the last layer has 3 × 5 = 15 parameters
    computer = GradientComputer(model, ClassificationTask())
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    projector = KroneckerProjector(60, seed=1)
    gradients = ProjectedGradients(computer, projector)
    with computer.evaluating():
        gradients.bind({**trainable, **fixed}, x[:2])
        layers = projector.describe()["layers"]
        assert (layers[2]["out"], layers[2]["in"], layers[2]["dims"]) == ("identity", "identity", 15)
        grads = computer.per_example_grads(trainable, fixed, x, y, names=["4.weight", "4.bias"])
        expected = torch.cat([grads[:, :12].reshape(-1, 3, 4), grads[:, 12:].reshape(-1, 3, 1)], dim=2)
        features = gradients.features(trainable, fixed, x, y)
        torch.testing.assert_close(features[:, -15:], expected.reshape(-1, 15), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- versions
def test_describe_and_rebuild_round_trip():
    model, _, _ = data(ragged_mlp, (2,))
    for version in (1, 2):
        projector = KroneckerProjector(15, seed=4, version=version)
        projector.bind(model)
        description = projector.describe()
        assert description["version"] == version
        assert ("padding" in description) == (version == 2)
        assert all(("out" in e) == (version == 2) for e in description["layers"])
        again = KroneckerProjector.from_description(description)
        assert again.describe()["layers"] is None  # unbound until bound to the model
        again.bind(model)
        assert again.describe() == description
        rows = torch.randn(3, sum(v.numel() for v in model.parameters()), dtype=torch.float64)
        torch.testing.assert_close(again.project(rows), projector.project(rows), rtol=0, atol=0)
    with pytest.raises(ConfigurationError, match=r"version=3.*versions \(1, 2\) are known"):
        KroneckerProjector.from_description({**description, "version": 3})
    with pytest.raises(ConfigurationError, match=r"version=3; choose one of \(1, 2\)"):
        KroneckerProjector(8, version=3)


def test_version_1_features_are_unchanged():
    """Stores made with version 1 are rebuilt with version=1: the same map as before version 2
    (values computed with the version 1 code)."""
    expected = {"mlp": ([(2, 4, 8), (2, 4, 8), (3, 3, 7)],
                        [0.430444353463205, -0.2629099821881538, -1.8107117357867961, 0.33187407999350305],
                        [-0.5393205762345118, -0.8869082955211868, 1.1810284223588705], 14.046608273818102),
                "cnn": ([(3, 2, 6), (3, 2, 6), (3, 2, 6), (3, 2, 5)],
                        [-2.9792033063765095, -2.0604238535684254, -5.926858334699937, -3.604970831750218],
                        [4.0025209470852925, 5.375814067860907, -0.36943365674182926], -6.821905866624056)}
    for name, (layout, first, last, total) in expected.items():
        model, _, _ = build(name)
        projector = KroneckerProjector(23, seed=3, version=1)
        projector.bind(model)
        assert [(e["k_out"], e["k_in"], e["dims"]) for e in projector.describe()["layers"]] == layout
        rows = torch.randn(2, sum(v.numel() for v in model.parameters()), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5))
        features = projector.project(rows)
        np.testing.assert_allclose(features[0, :4].numpy(), first, rtol=1e-12)
        np.testing.assert_allclose(features[1, -3:].numpy(), last, rtol=1e-12)
        assert math.isclose(float(features.sum()), total, rel_tol=1e-12)
