"""Baselines against their formulas (docs/math.md §5), computed by brute force.

With an orthogonal k = p projection the projected space preserves inner products and
matrix functions, so each baseline must equal its full-parameter-space formula built
from explicit per-example gradients and Gauss-Newton matrices (tests/bruteforce.py).
"""

from __future__ import annotations

import bruteforce
import numpy as np
import pytest
import torch
from conftest import perturbed_state, small_data, small_model
from torch import nn

from srcproj import (
    Attributor,
    ClassificationTask,
    ConfigurationError,
    MatrixProjector,
    RegressionTask,
    Segment,
    StoreError,
    Trajectory,
)
from srcproj.baselines import (
    TRAK,
    Ensemble,
    InfluenceFunction,
    RepresentationSimilarity,
    SourceVariant,
    TracIn,
    average_checkpoints,
)

WD, MOMENTUM = 0.01, 0.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Segments 0 and 2 train on data A, segment 1 on data B; orthogonal k = p projection."""
    model = small_model()
    data_a, data_b = small_data(20, 1), small_data(15, 2, shift=1.5)
    states = [perturbed_state(model, 0.3 * (i + 1), 10 + i) for i in range(6)]
    traj = Trajectory([
        Segment(states[0:2], steps=40, lr=0.05, data=data_a),
        Segment(states[2:4], steps=30, lr=0.08, data=data_b),
        Segment(states[4:6], steps=25, lr=0.1, data=data_a),
    ], momentum=MOMENTUM, weight_decay=WD)
    p = sum(v.numel() for v in model.parameters())
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    attr = Attributor(model, ClassificationTask(), traj, tmp_path_factory.mktemp("b") / "s.zarr",
                      projector=MatrixProjector(q), feature_dtype="float64", chunk_size=7, hessian="exact",
                      query="final")
    attr.featurize(batch_size=4, progress=False)
    names = [n for n, _ in model.named_parameters()]
    return {"model": model, "traj": traj, "attr": attr, "states": states, "names": names,
            "a": data_a, "b": data_b, "query": small_data(5, 3)}


def _grads(s, state, fn, X, y):
    return bruteforce.per_example_gradients(s["model"], state, s["names"], fn, X, y)


def test_influence_function_matches_damped_inverse(setup):
    s = setup
    task = ClassificationTask()
    final = s["states"][-1]
    expected = bruteforce.damped_influence(s["model"], final, s["names"], task, s["a"], s["query"], WD)
    method = InfluenceFunction(s["attr"])
    np.testing.assert_allclose(method.score(s["query"]), expected, rtol=1e-6, atol=1e-12)
    # Explicit damping, and examples of another data set than the final segment's:
    # the Hessian stays that of the final checkpoint (on data A), the gradients are B's.
    hessian = bruteforce.gauss_newton(s["model"], final, s["names"], task, *s["a"]) + 0.5 * np.eye(31)
    grads_b = _grads(s, final, task.loss, *s["b"])
    psi = _grads(s, final, task.measurement, *s["query"])
    expected_b = -psi @ np.linalg.solve(hessian, grads_b.T) / 15
    np.testing.assert_allclose(InfluenceFunction(s["attr"], damping=0.5, data_segment=1).score(s["query"]),
                               expected_b, rtol=1e-6, atol=1e-12)
    psi_train = _grads(s, final, task.measurement, *s["a"])
    grads_a = _grads(s, final, task.loss, *s["a"])
    hessian_wd = hessian - 0.5 * np.eye(31) + WD * np.eye(31)
    self_expected = -np.einsum("np,np->n", psi_train, np.linalg.solve(hessian_wd, grads_a.T).T) / 20
    np.testing.assert_allclose(method.self_influence(), self_expected, rtol=1e-6, atol=1e-12)


def test_tracin_sums_learning_rate_weighted_dot_products(setup):
    s = setup
    task = ClassificationTask()
    expected = 0.0
    # Data A trained in segments 0 (lr 0.05) and 2 (lr 0.1): their four checkpoints.
    for state, lr in zip(s["states"][0:2] + s["states"][4:6], [0.05, 0.05, 0.1, 0.1], strict=False):
        psi = _grads(s, state, task.measurement, *s["query"])
        expected = expected - lr * psi @ _grads(s, state, task.loss, *s["a"]).T
    np.testing.assert_allclose(TracIn(s["attr"]).score(s["query"]), expected, rtol=1e-6, atol=1e-12)
    state = s["states"][2]
    only_b = -0.08 * (_grads(s, state, task.measurement, *s["query"]) @ _grads(s, state, task.loss, *s["b"]).T)
    only_b += -0.08 * (_grads(s, s["states"][3], task.measurement, *s["query"])
                       @ _grads(s, s["states"][3], task.loss, *s["b"]).T)
    np.testing.assert_allclose(TracIn(s["attr"], data_segment=1).score(s["query"]), only_b, rtol=1e-6, atol=1e-12)


def test_trak_kernel_and_one_minus_p_weighting(setup):
    s = setup
    task = ClassificationTask()
    final = s["states"][-1]
    phi = _grads(s, final, task.measurement, *s["a"])
    psi = _grads(s, final, task.measurement, *s["query"])
    with torch.no_grad():
        logits = torch.func.functional_call(s["model"], final, (s["a"][0],))
    p_correct = torch.softmax(logits, 1).gather(1, s["a"][1][:, None])[:, 0].numpy()
    delta = 0.3  # p = 31 > N = 20: TRAK's undamped kernel is singular here
    expected = psi @ np.linalg.solve(phi.T @ phi + delta * np.eye(31), phi.T) * (1 - p_correct)
    method = TRAK(s["attr"], damping=delta)
    np.testing.assert_allclose(method.score(s["query"]), expected, rtol=1e-6, atol=1e-12)
    with pytest.raises(ConfigurationError, match=r"kernel ΦᵀΦ is singular \(k = 31, N = 20\)"):
        TRAK(s["attr"]).score(s["query"])


def test_source_variant_retimes_without_recomputing(setup):
    s = setup
    attr, task = s["attr"], ClassificationTask()
    same = SourceVariant(attr)
    np.testing.assert_allclose(same.score(s["query"]), attr.score(s["query"]), rtol=1e-6, atol=1e-12)
    # Half the steps in the segments on data A (docs/math.md §8's same-epochs protocol).
    traj = s["traj"]
    halved = Trajectory([
        Segment(traj.segments[0].checkpoints, 20, 0.05, traj.segments[0].data),
        traj.segments[1],
        Segment(traj.segments[2].checkpoints, 12, 0.1, traj.segments[2].data),
    ], momentum=MOMENTUM, weight_decay=WD)
    brute_segments = [
        {"states": s["states"][0:2], "time_lr": 20 * 0.05, "X": s["a"][0], "y": s["a"][1]},
        {"states": s["states"][2:4], "time_lr": 30 * 0.08, "X": s["b"][0], "y": s["b"][1]},
        {"states": s["states"][4:6], "time_lr": 12 * 0.1, "X": s["a"][0], "y": s["a"][1]},
    ]
    delta = bruteforce.source_displacement(s["model"], task, brute_segments, WD, MOMENTUM, [0, 2])
    psi_final = _grads(s, s["states"][5], task.measurement, *s["query"])
    np.testing.assert_allclose(SourceVariant(attr, halved).score(s["query"]), -psi_final @ delta,
                               rtol=1e-6, atol=1e-12)
    psi_mean = (psi_final + _grads(s, s["states"][4], task.measurement, *s["query"])) / 2
    np.testing.assert_allclose(SourceVariant(attr, halved, query="last_segment").score(s["query"]),
                               -psi_mean @ delta, rtol=1e-6, atol=1e-12)
    assert not np.allclose(SourceVariant(attr, halved).score(s["query"]), attr.score(s["query"]), rtol=1e-3)
    # The Attributor's own query="last_segment" setting: same ψ, the stored caches.
    averaged = Attributor(s["model"], task, traj, attr.store.location, projector=attr.projector,
                          feature_dtype="float64", chunk_size=7, hessian="exact", query="last_segment")
    delta_own = bruteforce.source_displacement(s["model"], task, [
        {"states": s["states"][0:2], "time_lr": 40 * 0.05, "X": s["a"][0], "y": s["a"][1]},
        {"states": s["states"][2:4], "time_lr": 30 * 0.08, "X": s["b"][0], "y": s["b"][1]},
        {"states": s["states"][4:6], "time_lr": 25 * 0.1, "X": s["a"][0], "y": s["a"][1]},
    ], WD, MOMENTUM, [0, 2])
    np.testing.assert_allclose(averaged.score(s["query"]), -psi_mean @ delta_own, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(SourceVariant(averaged).score(s["query"]), -psi_mean @ delta_own,
                               rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(same.self_influence(), attr.self_influence(), rtol=1e-6, atol=1e-12)


def test_representation_similarity_is_cosine_of_the_layer(setup):
    s = setup
    final = s["states"][-1]
    with torch.no_grad():
        def hidden(X):
            return torch.tanh(X @ final["0.weight"].T + final["0.bias"])
        train = torch.nn.functional.normalize(hidden(s["a"][0]), dim=1)
        query = torch.nn.functional.normalize(hidden(s["query"][0]), dim=1)
    np.testing.assert_allclose(RepresentationSimilarity(s["attr"], "1").score(s["query"]),
                               (query @ train.T).numpy(), rtol=1e-10)
    with pytest.raises(ConfigurationError, match="module 'fc9' is not in the model"):
        RepresentationSimilarity(s["attr"], "fc9")


def test_ensemble_averages_members(setup):
    s = setup
    a, b = InfluenceFunction(s["attr"]), TracIn(s["attr"])
    np.testing.assert_allclose(Ensemble([a, b]).score(s["query"]),
                               (a.score(s["query"]) + b.score(s["query"])) / 2, rtol=1e-12)
    with pytest.raises(ConfigurationError, match="disagree on the score shape"):
        Ensemble([a, TracIn(s["attr"], data_segment=1)]).score(s["query"])
    with pytest.raises(ConfigurationError, match="at least one member"):
        Ensemble([])


def test_average_checkpoints_is_fast_source(setup, tmp_path):
    s = setup
    fast = average_checkpoints(s["traj"])
    assert [len(seg.checkpoints) for seg in fast.segments] == [1, 1, 1]
    assert all(a.data is b.data for a, b in zip(fast.segments, s["traj"].segments, strict=True))
    mean = {k: (s["states"][2][k] + s["states"][3][k]) / 2 for k in s["states"][2]}
    for k, v in fast.segments[1].checkpoints[0].items():
        torch.testing.assert_close(v, mean[k])
    path = tmp_path / "ckpt.pt"
    torch.save(s["states"][0], path)
    other = average_checkpoints(Trajectory([Segment([path, s["states"][1]], 4, 0.1, s["a"])]))
    torch.testing.assert_close(other.segments[0].checkpoints[0]["2.bias"],
                               (s["states"][0]["2.bias"] + s["states"][1]["2.bias"]) / 2)
    broken = dict(s["states"][1])
    broken.pop("2.bias")
    with pytest.raises(ConfigurationError, match="segment 0: checkpoint 0 has other tensors"):
        average_checkpoints(Trajectory([Segment([broken, s["states"][1]], 4, 0.1, s["a"])]))


def test_bad_inputs_are_refused(setup, tmp_path):
    s = setup
    no_wd = Trajectory([Segment(s["states"][:1], 5, 0.1, s["a"])])
    attr = Attributor(s["model"], ClassificationTask(), no_wd, tmp_path / "nowd.zarr", proj_dim=8,
                      feature_dtype="float32")
    with pytest.raises(StoreError, match="run featurize"):
        InfluenceFunction(attr)
    attr.featurize(progress=False)
    with pytest.raises(ConfigurationError, match="no weight decay, so the influence function needs an explicit damping"):
        InfluenceFunction(attr)
    with pytest.raises(ConfigurationError, match="damping=-1"):
        InfluenceFunction(attr, damping=-1.0)
    with pytest.raises(ConfigurationError, match="checkpoint 4 does not exist"):
        InfluenceFunction(attr, damping=0.1, checkpoint=4)
    with pytest.raises(ConfigurationError, match="segment 3 does not exist"):
        TracIn(attr, data_segment=3)
    with pytest.raises(ConfigurationError, match="Only steps and learning rates may change"):
        SourceVariant(s["attr"], no_wd)
    with pytest.raises(ConfigurationError, match="query='mean'"):
        SourceVariant(s["attr"], query="mean")
    with pytest.raises(ConfigurationError, match=r"query='mean'; choose one of \('final', 'last_segment', 'last_stage'\)"):
        Attributor(s["model"], ClassificationTask(), no_wd, tmp_path / "q.zarr", proj_dim=8, query="mean")
    assert not (tmp_path / "q.zarr").exists()
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(10, 3, dtype=torch.float64)
    regression = Attributor(model, RegressionTask(), Trajectory([Segment([model.state_dict()], 5, 0.1,
                            (X, torch.randn(10, 2, dtype=torch.float64)))]), tmp_path / "r.zarr", proj_dim=4)
    regression.featurize(progress=False)
    with pytest.raises(ConfigurationError, match="ClassificationTask"):
        TRAK(regression)
    with pytest.raises(ConfigurationError, match="expected a srcproj.Attributor"):
        TracIn("store.zarr")


def test_self_influence_of_tracin_trak_and_ensembles(setup):
    s = setup
    task = ClassificationTask()
    expected = 0.0
    for state, lr in zip(s["states"][0:2] + s["states"][4:6], [0.05, 0.05, 0.1, 0.1], strict=False):
        psi = _grads(s, state, task.measurement, *s["a"])
        expected = expected - lr * np.einsum("np,np->n", psi, _grads(s, state, task.loss, *s["a"]))
    tracin = TracIn(s["attr"])
    np.testing.assert_allclose(tracin.self_influence(), expected, rtol=1e-6, atol=1e-12)
    final = s["states"][-1]
    phi = _grads(s, final, task.measurement, *s["a"])
    with torch.no_grad():
        logits = torch.func.functional_call(s["model"], final, (s["a"][0],))
    p_correct = torch.softmax(logits, 1).gather(1, s["a"][1][:, None])[:, 0].numpy()
    kernel_inverse = np.linalg.inv(phi.T @ phi + 0.3 * np.eye(31))
    trak = TRAK(s["attr"], damping=0.3)
    np.testing.assert_allclose(trak.self_influence(),
                               np.einsum("np,pq,nq->n", phi, kernel_inverse, phi) * (1 - p_correct),
                               rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(Ensemble([tracin, trak]).self_influence(),
                               (tracin.self_influence() + trak.self_influence()) / 2, rtol=1e-12)
    # One segment of the data, as Attributor.score(segments=[0]) selects it.
    np.testing.assert_allclose(SourceVariant(s["attr"], segments=[0]).score(s["query"]),
                               s["attr"].score(s["query"], segments=[0]), rtol=1e-6, atol=1e-12)


def test_more_bad_inputs(setup):
    s = setup
    attr, traj = s["attr"], s["traj"]
    with pytest.raises(ConfigurationError, match="kind='grad'; choose 'loss' or 'measurement'"):
        attr.checkpoint_features(0, kind="grad")
    with pytest.raises(ConfigurationError, match="trajectory must be a srcproj.Trajectory"):
        SourceVariant(attr, trajectory="run")
    other_momentum = Trajectory(traj.segments, momentum=0.0, weight_decay=WD)
    with pytest.raises(ConfigurationError, match=r"optimizer differs from the store.s \(momentum: 0.5 in the store, 0.0 now\)"):
        SourceVariant(attr, other_momentum)
    smaller = (s["b"][0][:10], s["b"][1][:10])
    resized = Trajectory([traj.segments[0], Segment(traj.segments[1].checkpoints, 30, 0.08, smaller),
                          traj.segments[2]], momentum=MOMENTUM, weight_decay=WD)
    with pytest.raises(ConfigurationError, match="segment 1's data has another number of examples"):
        SourceVariant(attr, resized)
    fewer = Trajectory([traj.segments[0], Segment(traj.segments[1].checkpoints[:1], 30, 0.08, s["b"]),
                        traj.segments[2]], momentum=MOMENTUM, weight_decay=WD)
    with pytest.raises(ConfigurationError, match="segment 1 has 1 checkpoints; the store has 2"):
        SourceVariant(attr, fewer)
    with pytest.raises(ConfigurationError, match="damping=-0.1; it must be a finite number ≥ 0"):
        TRAK(attr, damping=-0.1)
    with pytest.raises(ConfigurationError, match="self-similarity is 1 for every example"):
        RepresentationSimilarity(attr, "1").self_influence()
    with pytest.raises(ConfigurationError, match="need a score\\(\\) method; got str"):
        Ensemble(["IF"])
    with pytest.raises(ConfigurationError, match="expected a srcproj.Trajectory, got list"):
        average_checkpoints([])
    with pytest.raises(ConfigurationError, match="a checkpoint must be a state_dict or a path, got int"):
        average_checkpoints(Trajectory([Segment([3], 4, 0.1, s["a"])]))
