"""Mislabeled detection (srcproj.detection) against brute force, and its boundary.

The run is projected with an orthogonal k = p matrix, so every projected quantity equals
its full-parameter-space formula, built here from plain autograd (tests/bruteforce.py)
and ``F.cross_entropy``: the losses, SOURCE's, TracIn's and the influence function's
self-influences. Rank fusion is checked against ranks computed by hand.
"""

from __future__ import annotations

import dataclasses

import bruteforce
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturbed_state, small_data, small_model
from torch.func import functional_call

from srcproj import (
    Attributor,
    ClassificationTask,
    ConfigurationError,
    DataError,
    MatrixProjector,
    RegressionTask,
    Segment,
    StoreError,
    Trajectory,
)
from srcproj.detection import (
    DEFAULT_DETECTOR,
    FUSION_MEMBERS,
    INDIVIDUAL_DETECTORS,
    MislabelScores,
    detect_mislabeled,
    rank_fusion,
)

WD, MOMENTUM = 0.01, 0.5
P = 31  # parameters of the 3-4-3 model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Segments 0 and 2 train on data A, segment 1 on data B; orthogonal k = p projection."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = small_model()
    data_a, data_b = small_data(20, 1), small_data(15, 2, shift=1.5)
    states = [perturbed_state(model, 0.3 * (i + 1), 10 + i) for i in range(6)]
    segments = [(states[0:2], 40, 0.05, data_a), (states[2:4], 30, 0.08, data_b), (states[4:6], 25, 0.1, data_a)]
    traj = Trajectory([Segment(c, steps=k, lr=lr, data=d) for c, k, lr, d in segments],
                      momentum=MOMENTUM, weight_decay=WD)
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    root = tmp_path_factory.mktemp("detection")
    attr = Attributor(model, ClassificationTask(), traj, root / "s.zarr", projector=MatrixProjector(q),
                      feature_dtype="float64", chunk_size=7, hessian="exact", query="final")
    attr.featurize(batch_size=4, progress=False)
    names = [n for n, _ in model.named_parameters()]
    yield {"model": model, "attr": attr, "states": states, "names": names, "a": data_a, "b": data_b,
           "segments": segments, "root": root, "traj": traj, "projection": q}
    torch.set_num_threads(torch_threads)


@pytest.fixture(scope="module")
def all_a(setup):
    return detect_mislabeled(setup["attr"], "loss", components="all", batch_size=4)


def _grads(s, state, fn, X, y):
    return bruteforce.per_example_gradients(s["model"], state, s["names"], fn, X, y)


def _loss(s, state, X, y) -> np.ndarray:
    with torch.no_grad():
        return F.cross_entropy(functional_call(s["model"], state, (X,)), y, reduction="none").numpy()


# --------------------------------------------------------------------------- detectors against brute force
def test_loss_and_accuracy_at_the_final_checkpoint(setup, all_a):
    s = setup
    final = s["states"][-1]
    np.testing.assert_allclose(all_a.components["loss"], _loss(s, final, *s["a"]), rtol=1e-12)
    np.testing.assert_array_equal(all_a.scores, all_a.components["loss"])
    with torch.no_grad():
        logits = functional_call(s["model"], final, (s["a"][0],))
    assert all_a.training_accuracy == pytest.approx(float((logits.argmax(1) == s["a"][1]).double().mean()))
    assert all_a.detector == "loss"


def test_mean_loss_averages_the_checkpoints_that_trained_on_the_data(setup, all_a):
    s = setup
    # Data A trained in segments 0 and 2: checkpoints 0, 1, 4, 5 (not segment 1's 2, 3).
    expected = np.mean([_loss(s, s["states"][c], *s["a"]) for c in (0, 1, 4, 5)], axis=0)
    np.testing.assert_allclose(all_a.components["mean_loss"], expected, rtol=1e-12)
    only_b = detect_mislabeled(s["attr"], "mean_loss", components="used", data_segment=1)
    np.testing.assert_allclose(only_b.scores, np.mean([_loss(s, s["states"][c], *s["b"]) for c in (2, 3)], axis=0),
                               rtol=1e-12)
    assert set(only_b.components) == {"mean_loss"}


def test_self_influence_is_source_score_of_each_example_on_itself(setup, all_a):
    s = setup
    task = ClassificationTask()
    brute = [{"states": c, "time_lr": k * lr, "X": d[0], "y": d[1]} for c, k, lr, d in s["segments"]]
    delta = bruteforce.source_displacement(s["model"], task, brute, WD, MOMENTUM, [0, 2])  # (p, N)
    psi = _grads(s, s["states"][-1], task.measurement, *s["a"])
    expected = -np.einsum("np,pn->n", psi, delta)
    np.testing.assert_allclose(all_a.components["self_influence"], expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(all_a.components["self_influence"], s["attr"].self_influence(), rtol=1e-12)


def test_tracin_self_influence_sums_learning_rate_weighted_self_products(setup, all_a):
    s = setup
    task = ClassificationTask()
    expected = 0.0
    for c, lr in zip((0, 1, 4, 5), (0.05, 0.05, 0.1, 0.1), strict=True):
        state = s["states"][c]
        psi, g = _grads(s, state, task.measurement, *s["a"]), _grads(s, state, task.loss, *s["a"])
        expected = expected - lr * np.einsum("np,np->n", psi, g)
    np.testing.assert_allclose(all_a.components["tracin"], expected, rtol=1e-6, atol=1e-12)
    assert (all_a.components["tracin"] > 0).all()  # margin and loss gradients point opposite ways


def test_influence_function_self_influence_uses_the_damped_inverse(setup, all_a):
    s = setup
    task = ClassificationTask()
    final = s["states"][-1]
    hessian = bruteforce.gauss_newton(s["model"], final, s["names"], task, *s["a"]) + WD * np.eye(P)
    psi, g = _grads(s, final, task.measurement, *s["a"]), _grads(s, final, task.loss, *s["a"])
    expected = -np.einsum("np,np->n", psi, np.linalg.solve(hessian, g.T).T) / 20
    np.testing.assert_allclose(all_a.components["influence_function"], expected, rtol=1e-6, atol=1e-12)
    damped = detect_mislabeled(s["attr"], "influence_function", components="used", damping=0.5)
    expected = -np.einsum("np,np->n", psi, np.linalg.solve(hessian + (0.5 - WD) * np.eye(P), g.T).T) / 20
    np.testing.assert_allclose(damped.scores, expected, rtol=1e-6, atol=1e-12)


def test_fusion_is_the_mean_of_the_members_normalised_ranks(setup, all_a):
    s = setup
    fused = detect_mislabeled(s["attr"], "fusion", components="used")
    assert set(fused.components) == {*FUSION_MEMBERS, "fusion"}
    n = 20
    by_hand = np.zeros(n)
    for name in FUSION_MEMBERS:
        values = all_a.components[name]
        ranks = np.array([1 + (values < v).sum() + 0.5 * ((values == v).sum() - 1) for v in values])
        by_hand += ranks / n / 2
    np.testing.assert_allclose(fused.scores, by_hand, rtol=1e-12)


def test_rank_fusion_by_hand_with_ties():
    a = np.array([0.3, 0.1, 0.3, 5.0])  # ranks 2.5, 1, 2.5, 4
    b = np.array([-1.0, 2.0, 0.0, 1.0])  # ranks 1, 4, 2, 3
    expected = (np.array([2.5, 1, 2.5, 4]) + np.array([1, 4, 2, 3])) / 4 / 2
    np.testing.assert_allclose(rank_fusion([a, b]), expected, rtol=1e-15)
    np.testing.assert_allclose(rank_fusion([b]), np.array([1, 4, 2, 3]) / 4)
    # Monotone transforms of a detector do not change the fusion.
    np.testing.assert_allclose(rank_fusion([np.exp(a), b * 1e6]), expected, rtol=1e-15)


# --------------------------------------------------------------------------- the default
def test_default_is_the_mean_loss_with_the_training_accuracy(setup, all_a):
    assert DEFAULT_DETECTOR == "mean_loss"
    result = detect_mislabeled(setup["attr"], components="used")
    assert result.detector == "mean_loss" and set(result.components) == {"mean_loss"}
    np.testing.assert_allclose(result.scores, all_a.components["mean_loss"], rtol=1e-12)
    assert result.checkpoints == (0, 1, 4, 5)
    assert result.training_accuracy == all_a.training_accuracy


def test_memorised_run_reports_accuracy_one(setup, tmp_path):
    """A run whose final checkpoint fits every given label; one segment's two checkpoints."""
    s = setup
    X, _ = s["a"]
    with torch.no_grad():
        y = functional_call(s["model"], s["states"][-1], (X,)).argmax(1)  # labels the final model predicts
    traj = Trajectory([Segment(s["states"][4:6], steps=25, lr=0.1, data=(X, y))], weight_decay=WD)
    attr = Attributor(s["model"], ClassificationTask(), traj, tmp_path / "m.zarr", proj_dim=8,
                      feature_dtype="float64", chunk_size=32)
    attr.featurize(progress=False)
    result = detect_mislabeled(attr, components="used")
    assert result.training_accuracy == 1.0 and result.checkpoints == (0, 1)
    expected = np.mean([_loss(s, s["states"][c], X, y) for c in (4, 5)], axis=0)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-12)


# --------------------------------------------------------------------------- flagging
def _scores(values) -> MislabelScores:
    values = np.asarray(values, dtype=float)
    return MislabelScores(values, "loss", None, (0,), {"loss": values})


def test_flag_returns_the_most_suspicious_first_with_stable_ties():
    result = _scores([0.2, 0.9, 0.5, 0.9, 0.1])
    np.testing.assert_array_equal(result.flag(count=3), [1, 3, 2])
    np.testing.assert_array_equal(result.flag(fraction=0.4), [1, 3])
    np.testing.assert_array_equal(result.flag(fraction=0.01), [1])  # at least one
    np.testing.assert_array_equal(result.flag(count=5), [1, 3, 2, 0, 4])
    np.testing.assert_array_equal(result.mask(count=2), [False, True, False, True, False])


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of count"),
    ({"count": 2, "fraction": 0.5}, "exactly one of count"),
    ({"count": 0}, "count=0"),
    ({"count": 6}, "count=6"),
    ({"count": 2.0}, "count=2.0"),
    ({"fraction": 0.0}, r"fraction=0.0; it must be in \(0, 1\]"),
    ({"fraction": 1.5}, "fraction=1.5"),
    ({"fraction": True}, "fraction=True"),
])
def test_flag_rejects_bad_counts(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        _scores([0.2, 0.9, 0.5, 0.9, 0.1]).flag(**kwargs)


def test_result_is_frozen(all_a):
    with pytest.raises(dataclasses.FrozenInstanceError):
        all_a.detector = "tracin"
    with pytest.raises(ValueError):
        all_a.scores[0] = 1.0
    with pytest.raises(TypeError):
        all_a.components["loss"] = np.zeros(20)
    assert set(all_a.components) == set(INDIVIDUAL_DETECTORS)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, message", [
    ({"detector": "margin"}, ConfigurationError, "detector='margin'"),
    ({"detector": "auto"}, ConfigurationError, "detector='auto'"),
    ({"components": "some"}, ConfigurationError, "components='some'"),
    ({"components": ["loss", "trak"]}, ConfigurationError, "components holds 'trak'"),
    ({"components": 3}, ConfigurationError, "components=3; give 'all', 'used' or a list"),
    ({"data_segment": 3}, ConfigurationError, "data_segment=3"),
    ({"batch_size": 0}, ConfigurationError, "batch_size=0"),
    ({"detector": "influence_function", "damping": -1.0}, ConfigurationError, "damping=-1.0"),
])
def test_bad_arguments_name_the_problem(setup, kwargs, error, message):
    with pytest.raises(error, match=message):
        detect_mislabeled(setup["attr"], **{"components": "used", **kwargs})


def test_needs_a_featurized_attributor(setup, tmp_path):
    with pytest.raises(ConfigurationError, match="featurized srcproj.Attributor"):
        detect_mislabeled("store.zarr")
    fresh = Attributor(setup["model"], ClassificationTask(), setup["traj"], tmp_path / "f.zarr", proj_dim=4)
    with pytest.raises(StoreError, match="featurize"):
        detect_mislabeled(fresh)


def test_reopened_store_has_only_the_last_segments_checkpoints(setup):
    s = setup
    opened = Attributor.open(s["root"] / "s.zarr", s["model"], ClassificationTask(), s["a"], query="final",
                             projector=MatrixProjector(s["projection"]))
    with pytest.raises(ConfigurationError, match=r"checkpoints \[0, 1\] are missing.*detector='loss'"):
        detect_mislabeled(opened, components="used")
    with pytest.raises(ConfigurationError, match="TracIn needs every checkpoint.*leave the tracin detector out"):
        detect_mislabeled(opened, "loss", components=["loss", "tracin"])
    result = detect_mislabeled(opened, "loss", components=["loss", "self_influence"])
    np.testing.assert_allclose(result.scores, _loss(s, s["states"][-1], *s["a"]), rtol=1e-12)
    np.testing.assert_allclose(result.components["self_influence"], s["attr"].self_influence(), rtol=1e-10)


def test_influence_function_without_weight_decay_asks_for_damping(setup, tmp_path):
    s = setup
    traj = Trajectory([Segment(s["states"][4:6], steps=25, lr=0.1, data=s["a"])])
    attr = Attributor(s["model"], ClassificationTask(), traj, tmp_path / "n.zarr", proj_dim=8, chunk_size=32)
    attr.featurize(progress=False)
    with pytest.raises(ConfigurationError, match="explicit damping.*leave the influence_function detector out"):
        detect_mislabeled(attr, "loss", components="all")
    with pytest.raises(ConfigurationError, match="explicit damping") as caught:
        detect_mislabeled(attr, "influence_function")
    assert "leave the" not in str(caught.value)
    assert detect_mislabeled(attr, "loss", components=["loss", "tracin"]).components.keys() == {"loss", "tracin"}


def test_regression_runs_have_losses_but_no_accuracy(setup, tmp_path):
    s = setup
    X, _ = s["a"]
    y = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    traj = Trajectory([Segment(s["states"][4:6], steps=25, lr=0.1, data=(X, y))], weight_decay=WD)
    attr = Attributor(s["model"], RegressionTask(), traj, tmp_path / "r.zarr", proj_dim=8, chunk_size=32)
    attr.featurize(progress=False)
    result = detect_mislabeled(attr, "loss", components="used")
    assert result.training_accuracy is None
    with torch.no_grad():
        out = functional_call(s["model"], s["states"][-1], (X,))
    np.testing.assert_allclose(result.scores, RegressionTask().loss(out, y).reshape(20, -1).sum(1).numpy(),
                               rtol=1e-12)


@pytest.mark.parametrize("scores, message", [
    ([], "got no scores"),
    ([np.zeros((2, 2))], r"scores\[0\] has shape \(2, 2\)"),
    ([np.zeros(3), np.zeros(4)], r"scores\[1\] has 4 examples"),
    ([np.array([0.0, np.nan])], "NaN or infinite"),
])
def test_rank_fusion_rejects_bad_scores(scores, message):
    with pytest.raises(DataError, match=message):
        rank_fusion(scores)
