"""SOURCE against independent brute force (docs/math.md §7)."""

from __future__ import annotations

import bruteforce
import numpy as np
import pytest
import torch
from torch import nn

from srcproj import Attributor, ClassificationTask, MatrixProjector, RegressionTask, Segment, Trajectory
from srcproj import layout as names
from srcproj.baselines import SourceVariant
from srcproj.errors import ConfigurationError, StoreError
from srcproj.source import (
    SegmentSpectrum,
    accumulate_spectrum,
    eigendecompose,
    forget_spectrum,
    stage_of_segments,
    unrolling_operators,
)


def tiny_classifier(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def perturbed(model: nn.Module, scale: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator, dtype=v.dtype)
            for k, v in model.state_dict().items()}


def classification_data(n: int, seed: int, shift: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=generator, dtype=torch.float64) + shift
    y = torch.randint(0, 3, (n,), generator=generator)
    return X, y


def orthogonal(p: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=generator, dtype=torch.float64))
    return q


@pytest.fixture(scope="module")
def three_segments():
    """Segments 0 and 2 share data A, segment 1 trains on data B; every checkpoint differs."""
    model = tiny_classifier(0)
    data_a = classification_data(20, seed=1)
    data_b = classification_data(15, seed=2, shift=1.5)
    states = [perturbed(model, 0.3 * (i + 1), seed=10 + i) for i in range(6)]
    traj = Trajectory(
        segments=[
            Segment(states[0:2], steps=40, lr=0.05, data=data_a),
            Segment(states[2:4], steps=30, lr=[0.1] * 10 + [0.05] * 20, data=data_b),
            Segment(states[4:6], steps=25, lr=0.08, data=data_a),
        ],
        momentum=0.5,
        weight_decay=0.01,
    )
    brute_segments = [
        {"states": states[0:2], "time_lr": 40 * 0.05, "X": data_a[0], "y": data_a[1]},
        {"states": states[2:4], "time_lr": 10 * 0.1 + 20 * 0.05, "X": data_b[0], "y": data_b[1]},
        {"states": states[4:6], "time_lr": 25 * 0.08, "X": data_a[0], "y": data_a[1]},
    ]
    query = classification_data(7, seed=3)
    return model, traj, brute_segments, query


def test_orthogonal_projection_equals_full_space_brute_force(three_segments, tmp_path):
    model, traj, brute_segments, query = three_segments
    p = sum(v.numel() for v in model.parameters())
    task = ClassificationTask()
    attr = Attributor(model, task, traj, tmp_path / "exact.zarr", projector=MatrixProjector(orthogonal(p, 5)),
                      feature_dtype="float64", chunk_size=6, hessian="exact", query="final")
    attr.featurize(batch_size=4, progress=False)

    expected_a = bruteforce.source_scores(model, task, brute_segments, 0.01, 0.5, query, selected=[0, 2])
    np.testing.assert_allclose(attr.score(query), expected_a, rtol=1e-6, atol=1e-12)
    expected_first = bruteforce.source_scores(model, task, brute_segments, 0.01, 0.5, query, selected=[0])
    np.testing.assert_allclose(attr.score(query, segments=[0]), expected_first, rtol=1e-6, atol=1e-12)
    expected_b = bruteforce.source_scores(model, task, brute_segments, 0.01, 0.5, query, selected=[1])
    np.testing.assert_allclose(attr.score(query, segments=[1]), expected_b, rtol=1e-6, atol=1e-12)
    # The product order matters here: a transposed operator gives other scores.
    assert not np.allclose(expected_first, expected_a, rtol=1e-3)

    Xa, ya = brute_segments[0]["X"], brute_segments[0]["y"]
    self_expected = np.array([
        bruteforce.source_scores(model, task, brute_segments, 0.01, 0.5, (Xa[i:i + 1], ya[i:i + 1]), [0, 2])[0, i]
        for i in range(len(ya))
    ])
    np.testing.assert_allclose(attr.self_influence(), self_expected, rtol=1e-6, atol=1e-12)


@pytest.fixture(scope="module")
def staged_run():
    """Segments on data A, A, B, A: stages 0, 0, 1, 2; unequal times within the first stage."""
    model = tiny_classifier(4)
    data_a = classification_data(18, seed=5)
    data_b = classification_data(12, seed=6, shift=1.0)
    states = [perturbed(model, 0.25 * (i + 1), seed=30 + i) for i in range(8)]
    lrs = [(40, 0.05), (20, 0.2), (30, 0.1), (25, 0.08)]
    datas = [data_a, data_a, data_b, data_a]
    traj = Trajectory(segments=[Segment(states[2 * i:2 * i + 2], steps=steps, lr=lr, data=data)
                                for i, ((steps, lr), data) in enumerate(zip(lrs, datas, strict=True))],
                      momentum=0.5, weight_decay=0.02)
    brute = [{"states": states[2 * i:2 * i + 2], "time_lr": steps * lr, "X": data[0], "y": data[1], "stage": stage}
             for i, ((steps, lr), data, stage) in enumerate(zip(lrs, datas, (0, 0, 1, 2), strict=True))]
    return model, traj, brute, classification_data(5, seed=7)


def test_stages_unroll_equals_full_space_brute_force(staged_run, tmp_path):
    model, traj, brute, query = staged_run
    p = sum(v.numel() for v in model.parameters())
    task = ClassificationTask()
    attr = Attributor(model, task, traj, tmp_path / "staged.zarr", projector=MatrixProjector(orthogonal(p, 8)),
                      feature_dtype="float64", chunk_size=5, query="final")
    attr.featurize(batch_size=4, progress=False)
    expected = bruteforce.stage_source_scores(model, task, brute, 0.02, 0.5, query, selected=[0, 1, 3])
    np.testing.assert_allclose(attr.score(query), expected, rtol=1e-6, atol=1e-12)
    first = bruteforce.stage_source_scores(model, task, brute, 0.02, 0.5, query, selected=[0])
    np.testing.assert_allclose(attr.score(query, segments=[0]), first, rtol=1e-6, atol=1e-12)
    # The paper's chain, from the same store's features and spectra, and after switching.
    chained = bruteforce.source_scores(model, task, brute, 0.02, 0.5, query, selected=[0, 1, 3])
    np.testing.assert_allclose(SourceVariant(attr, unroll="segments").score(query), chained, rtol=1e-6, atol=1e-12)
    assert not np.allclose(chained, expected, rtol=1e-2)  # the two forms differ here, so the test can fail
    switched = Attributor(model, task, traj, tmp_path / "staged.zarr", projector=MatrixProjector(orthogonal(p, 8)),
                          feature_dtype="float64", chunk_size=5, query="final", unroll="segments")
    report = switched.featurize(batch_size=4, progress=False)
    assert report.recomputed_stages == ["caches"] and report.feature_chunks_computed == 0
    np.testing.assert_allclose(switched.score(query), chained, rtol=1e-6, atol=1e-12)
    with pytest.raises(ConfigurationError, match="unroll"):
        SourceVariant(attr, unroll="paper")


def test_last_stage_query_is_the_time_weighted_mean_over_the_last_stage(tmp_path):
    """ψ for query="last_stage": Σ_c a_ℓ(c) / (A |C_ℓ|) · Q ∇f(θ_c) over the last stage's
    checkpoints, with explicit per-example gradients; also from the reopened store."""
    model = tiny_classifier(9)
    data_b, data_a = classification_data(10, seed=11, shift=1.0), classification_data(12, seed=12)
    states = [perturbed(model, 0.2 * (i + 1), seed=40 + i) for i in range(7)]
    traj = Trajectory([Segment(states[0:2], steps=10, lr=0.1, data=data_b),
                       Segment(states[2:4], steps=30, lr=0.05, data=data_a),       # a = 1.5, 2 checkpoints
                       Segment(states[4:7], steps=20, lr=[0.3] * 20, data=data_a)],  # a = 6.0, 3 checkpoints
                      weight_decay=0.01)
    p = sum(v.numel() for v in model.parameters())
    matrix = orthogonal(p, 13)[:6]
    task = ClassificationTask()
    attr = Attributor(model, task, traj, tmp_path / "q.zarr", projector=MatrixProjector(matrix),
                      feature_dtype="float64", chunk_size=4)
    assert attr.query == "last_stage"
    attr.featurize(batch_size=4, progress=False)
    names_ = [n for n, _ in model.named_parameters()]
    Xq, yq = classification_data(3, seed=14)
    psi = [bruteforce.per_example_gradients(model, s, names_, task.measurement, Xq, yq) @ matrix.numpy().T
           for s in states]
    weights = [1.5 / 7.5 / 2] * 2 + [6.0 / 7.5 / 3] * 3
    expected = sum(w * psi[2 + i] for i, w in enumerate(weights))
    np.testing.assert_allclose(attr.query_features((Xq, yq)), expected, rtol=1e-8, atol=1e-12)
    last_segment = np.mean(psi[4:7], axis=0)
    assert not np.allclose(expected, last_segment, rtol=1e-3)  # the weights matter here
    # SourceVariant with other rates weighs ψ with its own times: a = 3.0 and 6.0 here.
    faster = Trajectory([Segment(s.checkpoints, s.steps, lr, s.data) for s, lr in
                         zip(traj.segments, (0.1, 0.1, [0.3] * 20), strict=True)], weight_decay=0.01)
    reweighted = sum(w * psi[2 + i] for i, w in enumerate([3.0 / 9.0 / 2] * 2 + [6.0 / 9.0 / 3] * 3))
    np.testing.assert_allclose(SourceVariant(attr, faster).query_side((Xq, yq)).read(0, 3), reweighted,
                               rtol=1e-8, atol=1e-12)
    reopened = Attributor.open(tmp_path / "q.zarr", model, task, projector=MatrixProjector(matrix))
    np.testing.assert_allclose(reopened.query_features((Xq, yq)), expected, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(reopened.score((Xq, yq)), attr.score((Xq, yq)), rtol=1e-8, atol=1e-14)
    other = Attributor.open(tmp_path / "q.zarr", model, task, projector=MatrixProjector(matrix), query="last_segment")
    np.testing.assert_allclose(other.query_features((Xq, yq)), last_segment, rtol=1e-8, atol=1e-12)
    # A store from before query="last_stage" saved only the last segment's checkpoints.
    attr.layout.query_flags()[2] = False
    older = Attributor.open(tmp_path / "q.zarr", model, task, projector=MatrixProjector(matrix))
    with pytest.raises(StoreError, match="reopen such a store with query='last_segment'"):
        older.score((Xq, yq))
    older = Attributor.open(tmp_path / "q.zarr", model, task, projector=MatrixProjector(matrix), query="last_segment")
    np.testing.assert_allclose(older.query_features((Xq, yq)), last_segment, rtol=1e-8, atol=1e-12)


def test_stage_of_segments_numbers_runs_of_one_data_set():
    assert stage_of_segments([0, 0, 0]) == [0, 0, 0]
    assert stage_of_segments([0, 0, 1, 1]) == [0, 0, 1, 1]
    assert stage_of_segments([0, 1, 0]) == [0, 1, 2]
    assert stage_of_segments([4]) == [0]


def test_a_stage_with_one_hessian_sums_to_its_chained_segments():
    """With one Hessian H throughout a stage, Σ_ℓ W_ℓ is F_A(H)/N in both forms (the
    chain's exp(-a₂H)F_{a₁} + F_{a₂} = F_{a₁+a₂}), checked with scipy's expm."""
    rng = np.random.default_rng(0)
    root = rng.standard_normal((5, 5))
    hessian = root @ root.T / 5 + 0.05 * np.eye(5)
    spectrum = eigendecompose(hessian)
    times, size = [0.7, 2.0, 1.3], 9
    forget, accumulate = bruteforce.segment_matrices(hessian, sum(times))
    for stages in ([0, 0, 0], None):
        operators = unrolling_operators([spectrum] * 3, times, [size] * 3, stages)
        np.testing.assert_allclose(sum(operators), accumulate / size, rtol=1e-10, atol=1e-12)
    merged = unrolling_operators([spectrum] * 3, times, [size] * 3, [0, 0, 0])
    np.testing.assert_allclose(merged[1], accumulate / size * times[1] / sum(times), rtol=1e-10, atol=1e-12)


def test_stages_of_another_shape_are_refused():
    spectrum = SegmentSpectrum(np.ones(2), np.eye(2))
    with pytest.raises(ValueError, match="consecutive"):
        unrolling_operators([spectrum] * 3, [1.0] * 3, [4] * 3, [0, 2, 2])
    with pytest.raises(ValueError, match="consecutive"):
        unrolling_operators([spectrum] * 2, [1.0] * 2, [4] * 2, [1, 1])
    with pytest.raises(ValueError, match="same number"):
        unrolling_operators([spectrum] * 2, [1.0] * 2, [4, 5], [0, 0])


def test_an_unknown_unroll_is_refused(staged_run, tmp_path):
    model, traj, _, _ = staged_run
    with pytest.raises(ConfigurationError, match="unroll"):
        Attributor(model, ClassificationTask(), traj, tmp_path / "bad.zarr", unroll="paper")
    assert not (tmp_path / "bad.zarr").exists()


def test_rademacher_projection_stays_close_to_brute_force(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()  # p = 163
    X = torch.randn(60, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    states = [perturbed(model, 0.2, seed=s) for s in range(2)]
    data = (X, y)
    traj = Trajectory([Segment(states, steps=50, lr=0.1, data=data)], weight_decay=0.01)
    query = (X[:5] + 0.1, y[:5])
    task = ClassificationTask()
    brute = bruteforce.source_scores(
        model, task, [{"states": states, "time_lr": 5.0, "X": X, "y": y}], 0.01, 0.0, query, [0])
    correlations = []
    for seed in range(2):
        attr = Attributor(model, task, traj, tmp_path / f"r{seed}.zarr", proj_dim=96, seed=seed,
                          feature_dtype="float32", chunk_size=32, query="final")
        attr.featurize(progress=False)
        scores = attr.score(query)
        correlations.append(np.corrcoef(scores.ravel(), brute.ravel())[0, 1])
    assert min(correlations) > 0.9, correlations
    # A different seed is a different matrix, so the estimates are not identical.
    assert correlations[0] != correlations[1]


def test_long_time_single_segment_is_the_damped_influence_function(tmp_path):
    model = tiny_classifier(3)
    X, y = classification_data(25, seed=4)
    state = perturbed(model, 0.5, seed=7)
    wd = 0.05
    traj = Trajectory([Segment([state], steps=1, lr=1e9, data=(X, y))], weight_decay=wd)
    p = sum(v.numel() for v in model.parameters())
    task = ClassificationTask()
    attr = Attributor(model, task, traj, tmp_path / "if.zarr", projector=MatrixProjector(orthogonal(p, 1)),
                      feature_dtype="float64", chunk_size=10)
    attr.featurize(progress=False)
    query = classification_data(4, seed=5)

    names = [n for n, _ in model.named_parameters()]
    influence = bruteforce.damped_influence(model, state, names, task, (X, y), query, wd)
    np.testing.assert_allclose(attr.score(query), influence, rtol=1e-6, atol=1e-12)


def test_stationary_functions_are_stable_near_zero():
    lam = np.array([0.0, 1e-300, 1e-12, 1e-6, 1.0, 1e6])
    a = 3.0
    exact = np.array([a, a, a * (1 - a * 1e-12 / 2), -np.expm1(-a * 1e-6) / 1e-6, 1 - np.exp(-3.0), 1e-6])
    np.testing.assert_allclose(accumulate_spectrum(lam, a), exact, rtol=1e-12)
    np.testing.assert_allclose(forget_spectrum(lam, a), np.exp(-a * lam), rtol=1e-15)
    assert np.all(np.isfinite(accumulate_spectrum(lam, 1e12)))


# --------------------------------------------------------------------------- linear regression
def _regression_problem():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=generator, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64) + 0.3 * torch.randn(40, generator=generator, dtype=torch.float64)
    Xq = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    yq = Xq @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    return X, y, Xq, yq


def _gd_run(X, y, lr, steps, init, weights=None):
    """Full-batch GD on mean ½(f - y)², optionally with per-example weights; returns all iterates."""
    w, b = init
    iterates = [(w, b)]
    n = X.shape[0]
    eps = torch.ones(n, dtype=X.dtype) if weights is None else weights
    for _ in range(steps):
        residual = X @ w + b - y
        w = w - lr * (X.T @ (eps * residual)) / n
        b = b - lr * (eps * residual).sum() / n
        iterates.append((w, b))
    return iterates


def test_linear_regression_matches_unrolled_derivative_and_finer_segments_help(tmp_path):
    X, y, Xq, yq = _regression_problem()
    lr, steps = 0.02, 240
    init = (torch.full((4,), -3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))

    # Exact first-order effect of each example: d f(θ_T) / d ε_m through the GD loop.
    weights = torch.ones(40, dtype=torch.float64, requires_grad=True)
    w_T, b_T = _gd_run(X, y, lr, steps, init, weights)[-1]
    measurement = -(Xq @ w_T + b_T - yq).abs()
    exact = np.stack([torch.autograd.grad(m, weights, retain_graph=True)[0].numpy() for m in measurement])

    iterates = _gd_run(X, y, lr, steps, init)
    model = nn.Linear(4, 1).double()

    def state(t):
        w, b = iterates[t]
        return {"weight": w.detach().reshape(1, 4).clone(), "bias": b.detach().reshape(1).clone()}

    errors = {}
    for count in (1, 3, 12):
        bounds = np.linspace(0, steps, count + 1).astype(int)
        segments = [Segment([state(bounds[i]), state(bounds[i + 1])], steps=int(bounds[i + 1] - bounds[i]),
                            lr=lr, data=(X, y)) for i in range(count)]
        # The same examples for every segment: they share the training examples.
        data = segments[0].data
        for seg in segments:
            seg.data = data
        # The paper's chain of every segment: the form whose fine limit is the run's derivative.
        attr = Attributor(model, RegressionTask(), Trajectory(segments), tmp_path / f"lin{count}.zarr",
                          projector=MatrixProjector(orthogonal(5, 2)), feature_dtype="float64", chunk_size=16,
                          query="final", unroll="segments")
        attr.featurize(progress=False)
        scores = attr.score((Xq, yq))
        errors[count] = np.linalg.norm(scores - exact) / np.linalg.norm(exact)
    assert errors[1] > errors[3] > errors[12], errors
    assert errors[12] < 0.03, errors
    assert errors[1] > 0.05, errors  # the drift gap is real with one segment, so the test can fail


def _stored_hessian(attr, checkpoint: int) -> np.ndarray:
    return attr.store.read_all(names.hessian(checkpoint))


def test_hessian_estimators_against_explicit_matrices(tmp_path):
    model = tiny_classifier(4)
    X, y = classification_data(30, seed=8)
    state = perturbed(model, 0.4, seed=9)
    traj = Trajectory([Segment([state], steps=10, lr=0.1, data=(X, y))], weight_decay=0.0)
    p = sum(v.numel() for v in model.parameters())
    Q = orthogonal(p, 3)
    task = ClassificationTask()
    names = [n for n, _ in model.named_parameters()]
    gauss_newton = Q.numpy() @ bruteforce.gauss_newton(model, state, names, task, X, y) @ Q.numpy().T
    grads = bruteforce.per_example_gradients(model, state, names, task.loss, X, y) @ Q.numpy().T

    stored = {}
    for estimator, extra in (("exact", {}), ("empirical", {}), ("fisher", {"fisher_samples": 400})):
        attr = Attributor(model, task, traj, tmp_path / f"{estimator}.zarr", projector=MatrixProjector(Q),
                          feature_dtype="float64", chunk_size=8, hessian=estimator, **extra)
        attr.featurize(progress=False)
        stored[estimator] = _stored_hessian(attr, 0)
    np.testing.assert_allclose(stored["exact"], gauss_newton, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(stored["empirical"], grads.T @ grads / len(y), rtol=1e-8, atol=1e-12)
    # Sampled labels: unbiased, so many samples come close to the exact matrix.
    error = np.linalg.norm(stored["fisher"] - gauss_newton) / np.linalg.norm(gauss_newton)
    assert error < 0.1, error
    assert error > 0  # it really was sampled


def test_attributing_a_subset_of_modules_uses_only_their_parameters(tmp_path):
    model = tiny_classifier(6)
    X, y = classification_data(20, seed=11)
    state = perturbed(model, 0.3, seed=12)
    wd = 0.02
    traj = Trajectory([Segment([state], steps=1, lr=1e9, data=(X, y))], weight_decay=wd)
    names = ["2.weight", "2.bias"]  # the last Linear layer only
    p = sum(state[n].numel() for n in names)
    task = ClassificationTask()
    attr = Attributor(model, task, traj, tmp_path / "sub.zarr", projector=MatrixProjector(orthogonal(p, 4)),
                      modules=["2"], feature_dtype="float64", chunk_size=8)
    attr.featurize(progress=False)
    query = classification_data(3, seed=13)
    influence = bruteforce.damped_influence(model, state, names, task, (X, y), query, wd)
    np.testing.assert_allclose(attr.score(query), influence, rtol=1e-6, atol=1e-12)

