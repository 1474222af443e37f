"""Adam and AdamW runs (docs/math.md §6): the pipeline against the full-space formula, and every refusal."""

from __future__ import annotations

import copy

import bruteforce
import numpy as np
import pytest
import torch
from test_source_math import classification_data, orthogonal, tiny_classifier
from torch import nn

from srcproj import (
    SGD,
    Adam,
    AdamW,
    Attributor,
    ClassificationTask,
    KroneckerProjector,
    MatrixProjector,
    RademacherProjector,
    Segment,
    Trajectory,
)
from srcproj.baselines import InfluenceFunction, SourceVariant, TracIn, average_checkpoints
from srcproj.errors import CheckpointMismatchError, ConfigurationError

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
WEIGHTS, BIASES = ["0.weight", "2.weight"], ["0.bias", "2.bias"]
BETAS, EPS, DECAY = (0.9, 0.99), 1e-8, 0.05
STEPS = 8  # per segment; checkpoints after steps 4 and 8 of each


def schedule(total: int) -> list[float]:
    """Warm-up over 4 steps, then linear decay: one rate per step."""
    peak = 0.02
    return [peak * min(1.0, (t + 1) / 4) * (1.0 - 0.5 * t / total) for t in range(total)]


def train(kind: str, lr_ratio: float = 1.0):
    """A real run: torch's optimizer over two groups (biases exempt from decay), data A,
    B, A, a per-step schedule; checkpoints saved as {"model", "optimizer"} dicts."""
    model = tiny_classifier(0)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in WEIGHTS], "weight_decay": DECAY},
              {"params": [params[n] for n in BIASES], "weight_decay": 0.0, "lr": 0.02 * lr_ratio}]
    if kind == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=0.02, betas=BETAS, eps=EPS)
    elif kind == "adam":
        optimizer = torch.optim.Adam(groups, lr=0.02, betas=BETAS, eps=EPS)
    else:
        optimizer = torch.optim.SGD(groups, lr=0.02, momentum=0.5)
    data = [classification_data(12, seed=1), classification_data(10, seed=2, shift=1.5)]
    order = [0, 1, 0]
    rates = schedule(3 * STEPS)
    task = ClassificationTask()
    checkpoints: list[list[dict]] = [[], [], []]
    generator = torch.Generator().manual_seed(0)
    for step, rate in enumerate(rates):
        seg = step // STEPS
        X, y = data[order[seg]]
        pick = torch.randperm(len(y), generator=generator)[:4]
        for group, ratio in zip(optimizer.param_groups, (1.0, lr_ratio), strict=True):
            group["lr"] = rate * ratio
        optimizer.zero_grad()
        task.loss(model(X[pick]), y[pick]).mean().backward()
        optimizer.step()
        if (step + 1) % (STEPS // 2) == 0:
            checkpoints[seg].append({"model": copy.deepcopy(model.state_dict()),
                                     "optimizer": copy.deepcopy(optimizer.state_dict())})
    segments = [Segment(checkpoints[s], STEPS, rates[s * STEPS:(s + 1) * STEPS], data[order[s]]) for s in range(3)]
    return model, optimizer, segments


def flat_moment(optimizer_state: dict, key: str = "exp_avg_sq") -> np.ndarray:
    """Bias-corrected v (or m², ``key="exp_avg"``) in the model's parameter order, read by
    hand: state index i is the i-th parameter of the groups [weights, biases]."""
    by_name = {}
    for index, name in enumerate(WEIGHTS + BIASES):
        entry = optimizer_state["state"][index]
        step = float(entry["step"])
        if key == "exp_avg":
            by_name[name] = (entry["exp_avg"].reshape(-1).double().numpy() / (1 - BETAS[0] ** step)) ** 2
        else:
            by_name[name] = entry["exp_avg_sq"].reshape(-1).double().numpy() / (1 - BETAS[1] ** step)
    return np.concatenate([by_name[n] for n in NAMES])


def response(checkpoints) -> np.ndarray:
    """The linearized step's factor 1 - m̂²/(√v̂(√v̂ + ε)), from the checkpoints' mean moments."""
    v = np.mean([flat_moment(c["optimizer"]) for c in checkpoints], axis=0)
    m2 = np.mean([flat_moment(c["optimizer"], "exp_avg") for c in checkpoints], axis=0)
    return np.clip(1.0 - m2 / (np.sqrt(v) * (np.sqrt(v) + EPS)), 0.0, 1.0)


def per_entry(model, values: dict) -> np.ndarray:
    return np.concatenate([np.full(p.numel(), values[n]) for n, p in model.named_parameters()])


def brute_segments(segments):
    return [{"states": [c["model"] for c in s.checkpoints], "time_lr": s.total_lr, "X": s.data[0], "y": s.data[1]}
            for s in segments]


@pytest.fixture(scope="module")
def adamw_run():
    return train("adamw")


@pytest.mark.parametrize("chaining, adam_response", [("segment", "fixed"), ("shared", "fixed"),
                                                     ("segment", "linearized"), ("shared", "linearized")])
def test_adamw_pipeline_equals_the_full_space_formula(adamw_run, chaining, adam_response, tmp_path):
    model, optimizer, segments = adamw_run
    p = sum(v.numel() for v in model.parameters())
    task = ClassificationTask()
    attr = Attributor(model, task, Trajectory(segments, optimizer=optimizer), tmp_path / "s.zarr",
                      projector=MatrixProjector(orthogonal(p, 5)), feature_dtype="float64", chunk_size=5,
                      hessian="exact", query="final", preconditioner=chaining, adam_response=adam_response)
    report = attr.featurize(batch_size=4, progress=False)
    assert report.preconditioner == "optimizer state"
    moments = [[flat_moment(c["optimizer"]) for c in s.checkpoints] for s in segments]
    groups = [s.checkpoints for s in segments]
    if chaining == "segment":
        means = [np.mean(m, axis=0) for m in moments]
    else:
        means = [np.mean([v for m in moments for v in m], axis=0)] * 3
        groups = [[c for s in segments for c in s.checkpoints]] * 3
    scales = [np.sqrt(1.0 / (np.sqrt(v) + EPS)) for v in means]
    if adam_response == "linearized":
        factors = [response(g) for g in groups]
        assert min(f.min() for f in factors) < 0.9  # the factor is not trivially 1 on this run
        scales = [s * np.sqrt(f) for s, f in zip(scales, factors, strict=True)]
    decays = per_entry(model, {**dict.fromkeys(WEIGHTS, DECAY), **dict.fromkeys(BIASES, 0.0)})
    lam = float(decays.mean())  # AdamW: the decay is λ_i in any coordinates; exempt biases make it a mean
    assert report.weight_decay_rule == "parameter mean of the groups' λ"
    np.testing.assert_allclose(report.weight_decays, [lam] * 3)
    query = classification_data(5, seed=3)
    brute = brute_segments(segments)
    expected = bruteforce.preconditioned_source_scores(model, task, brute, scales, [lam] * 3, [0, 2], query)
    np.testing.assert_allclose(attr.score(query), expected, rtol=1e-6, atol=1e-12)
    expected_b = bruteforce.preconditioned_source_scores(model, task, brute, scales, [lam] * 3, [1], query)
    np.testing.assert_allclose(attr.score(query, segments=[1]), expected_b, rtol=1e-6, atol=1e-12)
    # Preconditioning changes the answer: the SGD formula on the same run gives other scores.
    plain = bruteforce.preconditioned_source_scores(model, task, brute, [np.ones(p)] * 3, [lam] * 3, [0, 2], query)
    assert not np.allclose(plain, expected, rtol=1e-2)
    if chaining == "segment":  # the segments' preconditioners differ, so the chaining matters
        assert not np.allclose(scales[0], scales[2], rtol=1e-3)


@pytest.mark.parametrize("chaining", ["segment", "shared"])
def test_adamw_stages_equal_the_full_space_formula(adamw_run, chaining, tmp_path):
    """The run's three segments described as one data set: one stage, its preconditioned
    Hessians and gradients time-weighted (with "segment", in each segment's own M)."""
    model, optimizer, segments = adamw_run
    one_set = [Segment(s.checkpoints, s.steps, s.lr, segments[0].data) for s in segments]
    p = sum(v.numel() for v in model.parameters())
    task = ClassificationTask()
    attr = Attributor(model, task, Trajectory(one_set, optimizer=optimizer), tmp_path / "st.zarr",
                      projector=MatrixProjector(orthogonal(p, 9)), feature_dtype="float64", chunk_size=5,
                      hessian="exact", query="final", preconditioner=chaining, adam_response="fixed")
    attr.featurize(batch_size=4, progress=False)
    moments = [[flat_moment(c["optimizer"]) for c in s.checkpoints] for s in one_set]
    if chaining == "segment":
        means = [np.mean(m, axis=0) for m in moments]
    else:
        means = [np.mean([v for m in moments for v in m], axis=0)] * 3
    scales = [np.sqrt(1.0 / (np.sqrt(v) + EPS)) for v in means]
    decays = per_entry(model, {**dict.fromkeys(WEIGHTS, DECAY), **dict.fromkeys(BIASES, 0.0)})
    lam = float(decays.mean())
    query = classification_data(5, seed=10)
    brute = brute_segments(one_set)
    expected = bruteforce.preconditioned_stage_scores(model, task, brute, scales, [lam] * 3, [0, 0, 0],
                                                      [0, 1, 2], query)
    np.testing.assert_allclose(attr.score(query), expected, rtol=1e-6, atol=1e-12)
    chained = bruteforce.preconditioned_source_scores(model, task, brute, scales, [lam] * 3, [0, 1, 2], query)
    assert not np.allclose(chained, expected, rtol=1e-2)  # merging the stage changes the answer here


def test_coupled_adam_and_group_learning_rates_equal_the_full_space_formula(tmp_path):
    model, optimizer, segments = train("adam", lr_ratio=0.5)
    p = sum(v.numel() for v in model.parameters())
    task = ClassificationTask()
    attr = Attributor(model, task, Trajectory(segments, optimizer=optimizer), tmp_path / "a.zarr",
                      projector=MatrixProjector(orthogonal(p, 6)), feature_dtype="float64", chunk_size=7,
                      hessian="exact", query="final", adam_response="fixed", preconditioner="segment")
    report = attr.featurize(batch_size=4, progress=False)
    ratios = per_entry(model, {**dict.fromkeys(WEIGHTS, 1.0), **dict.fromkeys(BIASES, 0.5)})
    decays = per_entry(model, {**dict.fromkeys(WEIGHTS, DECAY), **dict.fromkeys(BIASES, 0.0)})
    means = [np.mean([flat_moment(c["optimizer"]) for c in s.checkpoints], axis=0) for s in segments]
    metric = [ratios / (np.sqrt(v) + EPS) for v in means]  # M = r / (√v̄ + ε)
    # Coupled decay: λ_i M_i in preconditioned coordinates, averaged with weights v̄_i.
    lams = [float(np.sum(v * decays * m) / np.sum(v)) for v, m in zip(means, metric, strict=True)]
    assert report.weight_decay_rule == "second-moment-weighted mean of λ·M"
    np.testing.assert_allclose(report.weight_decays, lams, rtol=1e-6)
    query = classification_data(5, seed=4)
    expected = bruteforce.preconditioned_source_scores(model, task, brute_segments(segments),
                                                       [np.sqrt(m) for m in metric], lams, [0, 2], query)
    np.testing.assert_allclose(attr.score(query), expected, rtol=1e-6, atol=1e-12)


def test_sgd_groups_with_different_rates_are_preconditioned_exactly(tmp_path):
    model, optimizer, segments = train("sgd", lr_ratio=0.25)
    p = sum(v.numel() for v in model.parameters())
    task = ClassificationTask()
    trajectory = Trajectory(segments, optimizer=optimizer)
    assert trajectory.segment_time(0) == pytest.approx(segments[0].total_lr / 0.5)  # heavy-ball gain 1/(1-β)
    attr = Attributor(model, task, trajectory, tmp_path / "g.zarr", projector=MatrixProjector(orthogonal(p, 7)),
                      feature_dtype="float64", chunk_size=7, hessian="exact", query="final")
    report = attr.featurize(batch_size=4, progress=False)
    assert report.preconditioner == "group learning-rate ratios"
    ratios = per_entry(model, {**dict.fromkeys(WEIGHTS, 1.0), **dict.fromkeys(BIASES, 0.25)})
    decays = per_entry(model, {**dict.fromkeys(WEIGHTS, DECAY), **dict.fromkeys(BIASES, 0.0)})
    lam = float((decays * ratios).mean())
    query = classification_data(5, seed=8)
    brute = brute_segments(segments)
    for seg in brute:
        seg["time_lr"] /= 0.5
    expected = bruteforce.preconditioned_source_scores(model, task, brute, [np.sqrt(ratios)] * 3, [lam] * 3,
                                                       [0, 2], query)
    np.testing.assert_allclose(attr.score(query), expected, rtol=1e-6, atol=1e-12)


def test_the_fused_pass_and_the_features_apply_the_preconditioner_exactly(adamw_run, tmp_path):
    """Rademacher projection (the §10 fused pass on the Linear layers): features and
    Hessians equal P diag(s) applied to explicit gradients and Gauss-Newton matrices."""
    model, optimizer, segments = adamw_run
    task = ClassificationTask()
    projector = RademacherProjector(16, seed=3)
    attr = Attributor(model, task, Trajectory(segments, optimizer=optimizer), tmp_path / "r.zarr",
                      projector=projector, feature_dtype="float64", chunk_size=5, hessian="exact",
                      adam_response="fixed", preconditioner="segment")
    attr.featurize(batch_size=4, progress=False)
    p = sum(v.numel() for v in model.parameters())
    matrix = projector.project(torch.eye(p, dtype=torch.float64)).T.numpy()  # P, (k, p)
    scale = np.sqrt(1.0 / (np.sqrt(np.mean([flat_moment(c["optimizer"]) for c in segments[1].checkpoints],
                                               axis=0)) + EPS))
    state = segments[1].checkpoints[0]["model"]
    X, y = segments[1].data
    grads = bruteforce.per_example_gradients(model, state, NAMES, task.loss, X, y)
    np.testing.assert_allclose(attr.checkpoint_features(2, data_segment=1), (grads * scale) @ matrix.T,
                               rtol=1e-8, atol=1e-12)
    gn = bruteforce.gauss_newton(model, state, NAMES, task, X, y)
    np.testing.assert_allclose(attr.checkpoint_hessian(2), matrix @ (scale[:, None] * gn * scale) @ matrix.T,
                               rtol=1e-8, atol=1e-12)


def test_second_moment_estimated_without_optimizer_state(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    bare = [Segment([c["model"] for c in s.checkpoints], s.steps, s.lr, s.data) for s in segments]
    task = ClassificationTask()
    p = sum(v.numel() for v in model.parameters())
    with pytest.raises(ConfigurationError, match=r"carry no optimizer state.*Trajectory\(batch_size=B\)"):
        Attributor(model, task, Trajectory(bare, optimizer=optimizer), tmp_path / "x.zarr", proj_dim=8)
    attr = Attributor(model, task, Trajectory(bare, optimizer=optimizer, batch_size=4), tmp_path / "e.zarr",
                      projector=MatrixProjector(orthogonal(p, 9)), feature_dtype="float64", chunk_size=5,
                      preconditioner="segment")
    report = attr.featurize(batch_size=4, progress=False)
    assert report.preconditioner == "estimated from per-example gradients, batch size 4"
    X, y = segments[0].data
    rows = [bruteforce.per_example_gradients(model, c["model"], NAMES, task.loss, X, y) for c in segments[0].checkpoints]
    expected = np.mean([g.mean(0) ** 2 + g.var(0) / 4 for g in rows], axis=0)
    np.testing.assert_allclose(attr.layout.read_moment(0), expected, rtol=1e-5)
    # The linearized step's factor uses the mean gradient's square as m̂².
    signal = np.mean([g.mean(0) ** 2 for g in rows], axis=0)
    root = np.sqrt(expected)
    scale = np.sqrt(np.clip(1 - signal / (root * (root + EPS)), 0, 1) / (root + EPS))
    np.testing.assert_allclose(attr.layout.read_scale(0), scale, rtol=1e-5)
    # Coupled Adam adds λθ to every gradient before its moments.
    coupled = Attributor(model, task, Trajectory(bare, optimizer=Adam(betas=BETAS, eps=EPS, weight_decay=0.1),
                                                 batch_size=4),
                         tmp_path / "c.zarr", projector=MatrixProjector(orthogonal(p, 9)), feature_dtype="float64",
                         preconditioner="segment")
    coupled.featurize(batch_size=4, progress=False)
    theta = [bruteforce.flat_params(c["model"], NAMES).numpy() for c in segments[0].checkpoints]
    shifted = np.mean([(g + 0.1 * t).mean(0) ** 2 + g.var(0) / 4 for g, t in zip(rows, theta, strict=True)], axis=0)
    np.testing.assert_allclose(coupled.layout.read_moment(0), shifted, rtol=1e-5)


def test_a_described_adamw_equals_the_live_optimizer(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    task = ClassificationTask()
    described = AdamW(betas=BETAS, eps=EPS, weight_decay=DECAY, groups=[{"params": BIASES, "weight_decay": 0.0}])
    live = Attributor(model, task, Trajectory(segments, optimizer=optimizer), tmp_path / "l.zarr", proj_dim=16)
    live.featurize(progress=False)
    # A description has no groups to map the saved state's indices: the state must name
    # its parameters, or have one group in the model's order.
    with pytest.raises(CheckpointMismatchError, match=r"groups of \[2, 2\] parameters, and the trajectory's description cannot map"):
        Attributor(model, task, Trajectory(segments, optimizer=described), tmp_path / "d.zarr", proj_dim=16)
    named = copy.deepcopy(segments)
    for seg in named:
        for c in seg.checkpoints:
            for group, names in zip(c["optimizer"]["param_groups"], (WEIGHTS, BIASES), strict=True):
                group["param_names"] = names
    by_name = Attributor(model, task, Trajectory(named, optimizer=described), tmp_path / "n.zarr", proj_dim=16)
    by_name.featurize(progress=False)
    query = classification_data(4, seed=11)
    np.testing.assert_allclose(by_name.score(query), live.score(query), rtol=1e-6)


def test_baselines_on_an_adam_store(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    task = ClassificationTask()
    trajectory = Trajectory(segments, optimizer=optimizer)
    attr = Attributor(model, task, trajectory, tmp_path / "b.zarr", proj_dim=16, query="final")
    attr.featurize(progress=False)
    query = classification_data(4, seed=12)
    # TracIn with Adam-preconditioned gradients: -Σ_c η_c (P s_ℓ ∇f)ᵀ (P s_ℓ ∇L).
    tracin = TracIn(attr).score(query)
    expected = 0.0
    for c, lr in TracIn(attr).terms:
        expected = expected - lr * attr.query_features_at(query, c) @ attr.checkpoint_features(c).T
    np.testing.assert_allclose(tracin, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    influence = InfluenceFunction(attr)
    assert influence.damping == pytest.approx(attr.context.small_space_decay(2)[0])
    # A variant with every time scaled by 5 is SOURCE with those times.
    scaled = Trajectory([Segment(s.checkpoints, s.steps, [5 * r for r in s.lr], s.data) for s in segments],
                        optimizer=optimizer)
    assert not np.allclose(SourceVariant(attr, scaled).score(query), attr.score(query), rtol=1e-3)
    with pytest.raises(ConfigurationError, match=r"optimizer differs from the store's .*kind: 'adamw' in the store, "
                                                 r"'sgd' now"):
        SourceVariant(attr, Trajectory([Segment([c["model"] for c in s.checkpoints], s.steps, s.lr, s.data)
                                        for s in segments], weight_decay=DECAY))
    fast = average_checkpoints(trajectory)
    fast_attr = Attributor(model, task, fast, tmp_path / "f.zarr", proj_dim=16)
    fast_attr.featurize(progress=False)
    assert np.isfinite(fast_attr.score(query)).all()


# --------------------------------------------------------------------------- refusals
def test_optimizers_not_covered_are_refused_by_name():
    model = tiny_classifier(0)
    for make, name in ((torch.optim.RMSprop, "RMSprop"), (torch.optim.Adagrad, "Adagrad"),
                       (torch.optim.NAdam, "NAdam"), (torch.optim.Adamax, "Adamax")):
        with pytest.raises(ConfigurationError, match=rf"the optimizer {name} is not covered by SOURCE"):
            Trajectory([Segment([model.state_dict()], 1, 0.1, classification_data(4, 0))],
                       optimizer=make(model.parameters()))


@pytest.mark.parametrize("make, message", [
    (lambda ps: torch.optim.Adam(ps, amsgrad=True), r"amsgrad=True, which SOURCE's derivation does not cover"),
    (lambda ps: torch.optim.AdamW(ps, maximize=True), r"maximize=True"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True), r"maximize=True"),
    (lambda ps: torch.optim.Adam([{"params": ps[:2]}, {"params": ps[2:], "betas": (0.8, 0.9)}]),
     r"different betas"),
    (lambda ps: torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "momentum": 0.5}], lr=0.1),
     r"different momentum"),
])
def test_optimizer_settings_not_covered_are_refused(make, message):
    model = tiny_classifier(0)
    with pytest.raises(ConfigurationError, match=message):
        Trajectory([Segment([model.state_dict()], 1, 0.1, classification_data(4, 0))],
                   optimizer=make(list(model.parameters())))


def test_groups_with_different_schedules_are_refused():
    model = tiny_classifier(0)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.1}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda t: 1.0, lambda t: 0.5 ** t])
    optimizer.step()
    scheduler.step()
    with pytest.raises(ConfigurationError, match=r"different learning-rate schedules"):
        Trajectory([Segment([model.state_dict()], 1, 0.1, classification_data(4, 0))], optimizer=optimizer)


def test_adam_state_described_as_sgd_is_refused(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    with pytest.raises(CheckpointMismatchError, match=r"optimizer state is Adam's \(\['exp_avg', 'exp_avg_sq'\]\) "
                                                      r"but the trajectory describes an SGD run"):
        Attributor(model, ClassificationTask(), Trajectory(segments, weight_decay=0.01), tmp_path / "s.zarr",
                   proj_dim=8)
    sgd_model, sgd_optimizer, sgd_segments = train("sgd")
    with pytest.raises(CheckpointMismatchError, match=r"holds \['momentum_buffer'\] and its groups no betas: it is "
                                                      r"not Adam's"):
        Attributor(sgd_model, ClassificationTask(),
                   Trajectory(sgd_segments, optimizer=torch.optim.AdamW(sgd_model.parameters(), betas=BETAS)),
                   tmp_path / "t.zarr", proj_dim=8)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "t.zarr").exists()


def test_mismatched_optimizer_states_are_refused(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    task = ClassificationTask()
    mixed = copy.deepcopy(segments)
    mixed[1].checkpoints[0] = mixed[1].checkpoints[0]["model"]
    with pytest.raises(ConfigurationError, match=r"checkpoints \[2\] carry no optimizer state while the others do"):
        Attributor(model, task, Trajectory(mixed, optimizer=optimizer), tmp_path / "m.zarr", proj_dim=8)
    reshaped = copy.deepcopy(segments)
    state = reshaped[0].checkpoints[0]["optimizer"]["state"][0]
    state["exp_avg_sq"] = state["exp_avg_sq"].reshape(-1)[:5]
    with pytest.raises(CheckpointMismatchError, match=r"exp_avg_sq for 0.weight has shape \(5,\), the parameter "
                                                      r"\(4, 3\)"):
        Attributor(model, task, Trajectory(reshaped, optimizer=optimizer), tmp_path / "r.zarr", proj_dim=8)
    other = torch.optim.AdamW(list(model.parameters())[:3], betas=BETAS, eps=EPS)
    with pytest.raises(ConfigurationError, match=r"parameters \['2.bias'\] are attributed but not in the optimizer"):
        Attributor(model, task, Trajectory(segments, optimizer=other), tmp_path / "o.zarr", proj_dim=8)
    one_group = torch.optim.AdamW(model.parameters(), betas=BETAS, eps=EPS)
    with pytest.raises(CheckpointMismatchError, match=r"groups of \[2, 2\] parameters, the optimizer given has \[4\]"):
        Attributor(model, task, Trajectory(segments, optimizer=one_group), tmp_path / "b.zarr", proj_dim=8)
    betas = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    with pytest.raises(CheckpointMismatchError, match=r"used betas \(0.9, 0.99\), the trajectory describes "
                                                      r"\(0.8, 0.9\)"):
        Attributor(model, task, Trajectory(segments, optimizer=betas), tmp_path / "b.zarr", proj_dim=8)
    wrong_betas = copy.deepcopy(segments)
    for seg in wrong_betas:
        for c in seg.checkpoints:
            for group in c["optimizer"]["param_groups"]:
                group["betas"] = (0.8, 0.9)
    with pytest.raises(CheckpointMismatchError, match=r"used betas \(0.8, 0.9\), the trajectory describes "
                                                      r"\(0.9, 0.99\)"):
        Attributor(model, task, Trajectory(wrong_betas, optimizer=optimizer), tmp_path / "w.zarr", proj_dim=8)
    bad_entry = [Segment([{"model": c["model"], "optimizer": "state"} for c in s.checkpoints], s.steps, s.lr, s.data)
                 for s in segments]
    with pytest.raises(CheckpointMismatchError, match=r"'optimizer' entry is a str; save optimizer.state_dict\(\)"):
        Attributor(model, task, Trajectory(bad_entry, optimizer=optimizer), tmp_path / "e.zarr", proj_dim=8)
    for name in "mrobwe":
        assert not (tmp_path / f"{name}.zarr").exists()


def test_trajectory_arguments_are_checked(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    with pytest.raises(ConfigurationError, match=r"optimizer=\.\.\. and also \['momentum'\]"):
        Trajectory(segments, optimizer=optimizer, momentum=0.9)
    with pytest.raises(ConfigurationError, match=r"optimizer is a str; give the torch.optim optimizer"):
        Trajectory(segments, optimizer="adamw")
    with pytest.raises(ConfigurationError, match=r"batch_size=0; give the training batch size"):
        Trajectory(segments, optimizer=optimizer, batch_size=0)
    with pytest.raises(ConfigurationError, match=r"betas=\(0.9, 1.0\); both must be in \[0, 1\)"):
        Adam(betas=(0.9, 1.0))
    with pytest.raises(ConfigurationError, match=r"eps=0; it must be a finite number > 0"):
        AdamW(eps=0)
    with pytest.raises(ConfigurationError, match=r"parameters \['0.bias'\] are in two parameter groups"):
        AdamW(groups=[{"params": ["0.bias"]}, {"params": ["0.bias", "2.bias"], "weight_decay": 0.0}])
    with pytest.raises(ConfigurationError, match=r"give \{'params': \[names\]"):
        AdamW(groups=[{"names": ["0.bias"]}])
    with pytest.raises(ConfigurationError, match=r"preconditioner='both'; choose one of"):
        Attributor(model, ClassificationTask(), Trajectory(segments, optimizer=optimizer), tmp_path / "p.zarr",
                   proj_dim=8, preconditioner="both")
    with pytest.raises(ConfigurationError, match=r"adam_response='exact'; choose one of"):
        Attributor(model, ClassificationTask(), Trajectory(segments, optimizer=optimizer), tmp_path / "q.zarr",
                   proj_dim=8, adam_response="exact")
    with pytest.raises(ConfigurationError, match=r"KroneckerProjector\) cannot apply the run's elementwise"):
        Attributor(model, ClassificationTask(), Trajectory(segments, optimizer=optimizer), tmp_path / "k.zarr",
                   projector=KroneckerProjector(16))
    with pytest.raises(ConfigurationError, match=r"group names \['fc.weight'\], which are not parameters"):
        Attributor(model, ClassificationTask(),
                   Trajectory([Segment([c["model"] for c in s.checkpoints], s.steps, s.lr, s.data)
                               for s in segments], optimizer=SGD(groups=[{"params": ["fc.weight"]}])),
                   tmp_path / "g.zarr", proj_dim=8)
    assert not any(tmp_path.iterdir())


def test_sgd_dampening_and_nesterov_set_the_time():
    data = classification_data(4, 0)
    segment = Segment([tiny_classifier(0).state_dict()], 10, 0.1, data)
    assert Trajectory([segment], momentum=0.9, dampening=0.5).segment_time(0) == pytest.approx(1.0 * 0.5 / 0.1)
    assert Trajectory([segment], momentum=0.9, nesterov=True).segment_time(0) == pytest.approx(1.0 / 0.1)
    assert Trajectory([segment], optimizer=AdamW()).segment_time(0) == pytest.approx(1.0)  # β₁: no gain
    model = tiny_classifier(0)
    torch_sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    assert Trajectory([segment], optimizer=torch_sgd).segment_time(0) == pytest.approx(5.0)


def test_checkpoint_files_in_the_model_optimizer_form(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    on_disk = []
    for s, seg in enumerate(segments):
        paths = []
        for i, c in enumerate(seg.checkpoints):
            path = tmp_path / f"ckpt{s}_{i}.pt"
            torch.save({"model_state_dict": c["model"], "optimizer_state_dict": c["optimizer"]}, path)
            paths.append(path)
        on_disk.append(Segment(paths, seg.steps, seg.lr, seg.data))
    task = ClassificationTask()
    files = Attributor(model, task, Trajectory(on_disk, optimizer=optimizer), tmp_path / "f.zarr", proj_dim=16)
    files.featurize(progress=False)
    memory = Attributor(model, task, Trajectory(segments, optimizer=optimizer), tmp_path / "m.zarr", proj_dim=16)
    memory.featurize(progress=False)
    query = classification_data(4, seed=13)
    np.testing.assert_array_equal(files.score(query), memory.score(query))
    # Reopened for scoring, the store's preconditioner serves the queries.
    reopened = Attributor.open(tmp_path / "f.zarr", model, task)
    np.testing.assert_array_equal(reopened.score(query), memory.score(query))


def test_another_model_instance_is_matched_by_order(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    twin = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    task = ClassificationTask()
    with pytest.raises(ConfigurationError, match=r"not built over this model's parameters"):
        Attributor(twin, task, Trajectory(segments, optimizer=optimizer), tmp_path / "t.zarr", proj_dim=16)
    fresh = torch.optim.AdamW(twin.parameters(), betas=BETAS, eps=EPS, weight_decay=DECAY)  # one group, model order
    flat = copy.deepcopy(segments)
    for seg in flat:
        for c in seg.checkpoints:
            saved = c["optimizer"]
            by_name = {name: saved["state"][i] for i, name in enumerate(WEIGHTS + BIASES)}
            c["optimizer"] = {"state": {i: by_name[n] for i, n in enumerate(NAMES)},
                              "param_groups": [{**saved["param_groups"][0], "params": [0, 1, 2, 3]}]}
    attr = Attributor(twin, task, Trajectory(flat, optimizer=AdamW(betas=BETAS, eps=EPS, weight_decay=DECAY)),
                      tmp_path / "o.zarr", proj_dim=16)
    attr.featurize(progress=False)
    other = Attributor(twin, task, Trajectory(flat, optimizer=fresh), tmp_path / "p.zarr", proj_dim=16)
    assert other.context.metadata()["optimizer"] == attr.context.metadata()["optimizer"]


def test_info_describes_an_adam_store(adamw_run, tmp_path, capsys):
    from srcproj.cli import main

    model, optimizer, segments = adamw_run
    attr = Attributor(model, ClassificationTask(), Trajectory(segments, optimizer=optimizer), tmp_path / "i.zarr",
                      proj_dim=8)
    attr.featurize(progress=False)
    assert main(["info", str(tmp_path / "i.zarr")]) == 0
    out = capsys.readouterr().out
    assert "AdamW, betas [0.9, 0.99], eps 1e-08, weight decay 0.05 (0 for 2 tensors); preconditioner: one " \
           "for the whole run, from the optimizer state (linearized step)" in out
    assert main(["verify", str(tmp_path / "i.zarr"), "--no-progress"]) == 0


def test_a_damaged_preconditioner_is_found_and_recomputed(adamw_run, tmp_path):
    from srcproj import layout as names
    from srcproj import verify_store

    model, optimizer, segments = adamw_run
    path = tmp_path / "v.zarr"
    trajectory = Trajectory(segments, optimizer=optimizer)
    attr = Attributor(model, ClassificationTask(), trajectory, path, proj_dim=8)
    attr.featurize(progress=False)
    query = classification_data(4, seed=14)
    before = attr.score(query)
    chunk = path / names.preconditioner_scale(1) / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x5A
    chunk.write_bytes(bytes(data))
    report = verify_store(path, progress=False)
    assert [(d.array, d.flag) for d in report.damage] == [(names.preconditioner_scale(1), "preconditioner/done/c/1")]
    for d in report.damage:
        (path / d.key).unlink()
        (path / d.flag).unlink()
    again = Attributor(model, ClassificationTask(), trajectory, path, proj_dim=8)
    again.featurize(progress=False)
    assert verify_store(path, progress=False).ok
    np.testing.assert_array_equal(again.score(query), before)


def test_the_saved_state_must_match_the_description(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    task = ClassificationTask()

    def edited(**changes):
        copied = copy.deepcopy(segments)
        for seg in copied:
            for c in seg.checkpoints:
                for group in c["optimizer"]["param_groups"]:
                    group.update(changes)
        return copied

    with pytest.raises(CheckpointMismatchError, match=r"used eps 1e-06, the trajectory describes 1e-08"):
        Attributor(model, task, Trajectory(edited(eps=1e-6), optimizer=optimizer), tmp_path / "e.zarr", proj_dim=8)
    with pytest.raises(CheckpointMismatchError, match=r"ran with coupled weight decay \(Adam\), the trajectory "
                                                      r"describes adamw"):
        Attributor(model, task, Trajectory(edited(decoupled_weight_decay=False), optimizer=optimizer),
                   tmp_path / "d.zarr", proj_dim=8)
    with pytest.raises(CheckpointMismatchError, match=r"decayed 0.weight with weight_decay 0.1, the "
                                                      r"trajectory describes 0.05"):
        Attributor(model, task, Trajectory(edited(weight_decay=0.1), optimizer=optimizer), tmp_path / "w.zarr",
                   proj_dim=8)
    assert not any(tmp_path.iterdir())


def test_group_rates_are_read_from_the_scheduler_even_at_zero(tmp_path):
    model = tiny_classifier(0)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [params[n] for n in WEIGHTS], "lr": 0.02, "weight_decay": 0.1},
                                   {"params": [params[n] for n in BIASES], "lr": 0.01, "weight_decay": 0.1}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t))
    optimizer.step()
    scheduler.step()  # every rate is now 0
    assert [g["lr"] for g in optimizer.param_groups] == [0.0, 0.0]
    from srcproj.optimizer import resolve_optimizer

    resolved = resolve_optimizer(optimizer, model, NAMES)
    assert resolved.lr_scale == {"0.weight": 1.0, "2.weight": 1.0, "0.bias": 0.5, "2.bias": 0.5}
    # AdamW decays each group at its own rate: r·λ in the small space.
    from srcproj.preconditioning import small_space_decay

    decays = per_entry(model, dict.fromkeys(NAMES, 0.1))
    rates = per_entry(model, resolved.lr_scale)
    decay, rule = small_space_decay(resolved.spec, decays, None, None, rates)
    assert decay == pytest.approx(float((0.1 * rates).mean())) and rule.name == "parameter mean of the groups' r·λ"


def test_sgd_state_of_several_groups_is_not_read(tmp_path):
    model, optimizer, segments = train("sgd")
    task = ClassificationTask()
    described = Trajectory(segments, momentum=0.5, weight_decay=DECAY)
    attr = Attributor(model, task, described, tmp_path / "s.zarr", proj_dim=8)
    assert attr.featurize(progress=False).preconditioner == "none"
    assert attr.context.optimizer_record == {"kind": "sgd", "preconditioned": False, "lr_scales": {}}


def test_a_wrapped_optimizer_is_read_through_its_wrapper(adamw_run, tmp_path):
    """accelerate's AcceleratedOptimizer (what a Hugging Face Trainer holds) keeps the
    torch optimizer as ``.optimizer``: it is unwrapped, not refused."""
    model, optimizer, segments = adamw_run

    class Wrapped(torch.optim.Optimizer):
        def __init__(self, inner):  # no super().__init__: a thin wrapper, as accelerate's
            self.optimizer = inner

        @property
        def param_groups(self):
            return self.optimizer.param_groups

    task = ClassificationTask()
    wrapped = Attributor(model, task, Trajectory(segments, optimizer=Wrapped(optimizer)), tmp_path / "w.zarr",
                         proj_dim=8)
    plain = Attributor(model, task, Trajectory(segments, optimizer=optimizer), tmp_path / "p.zarr", proj_dim=8)
    assert wrapped.context.metadata()["optimizer"] == plain.context.metadata()["optimizer"]
    assert wrapped.trajectory.spec == plain.trajectory.spec


# --------------------------------------------------------------------------- review findings
def test_fast_source_keeps_each_segments_preconditioner(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    task = ClassificationTask()
    trajectory = Trajectory(segments, optimizer=optimizer)
    full = Attributor(model, task, trajectory, tmp_path / "full.zarr", proj_dim=8, preconditioner="segment")
    fast = Attributor(model, task, average_checkpoints(trajectory), tmp_path / "fast.zarr", proj_dim=8,
                      preconditioner="segment")
    full.featurize(progress=False)
    fast.featurize(progress=False)
    for seg in range(3):  # the linearized M (both moments) is the segment's own
        np.testing.assert_allclose(fast.layout.read_scale(seg), full.layout.read_scale(seg), rtol=1e-5)


def test_a_changed_saved_state_or_decay_refuses_the_store(adamw_run, tmp_path):
    from srcproj.errors import StoreMismatchError

    model, optimizer, segments = adamw_run
    task = ClassificationTask()
    Attributor(model, task, Trajectory(segments, optimizer=optimizer), tmp_path / "s.zarr", proj_dim=8)
    zeroed = copy.deepcopy(segments)  # the linearized response reads exp_avg: it is part of the identity
    for seg in zeroed:
        for c in seg.checkpoints:
            for entry in c["optimizer"]["state"].values():
                entry["exp_avg"].zero_()
    with pytest.raises(StoreMismatchError, match="optimizer"):
        Attributor(model, task, Trajectory(zeroed, optimizer=optimizer), tmp_path / "s.zarr", proj_dim=8)
    # Coupled Adam with estimated moments: λθ entered the preconditioner, so λ is identity too.
    bare = [Segment([c["model"] for c in s.checkpoints], s.steps, s.lr, s.data) for s in segments]

    def coupled(decay):
        return Trajectory(bare, optimizer=Adam(betas=BETAS, eps=EPS, weight_decay=decay), batch_size=4)

    Attributor(model, task, coupled(0.1), tmp_path / "c.zarr", proj_dim=8)
    with pytest.raises(StoreMismatchError, match="estimated_with_decays"):
        Attributor(model, task, coupled(5.0), tmp_path / "c.zarr", proj_dim=8)


def test_saved_sgd_settings_and_group_rates_are_checked(adamw_run, tmp_path):
    task = ClassificationTask()
    model, optimizer, segments = train("sgd")  # momentum 0.5, decays 0.05 / 0, one lr
    with pytest.raises(CheckpointMismatchError, match=r"used momentum 0.5, the trajectory describes 0.9"):
        Attributor(model, task, Trajectory(segments, momentum=0.9, weight_decay=DECAY), tmp_path / "m.zarr",
                   proj_dim=8)
    with pytest.raises(CheckpointMismatchError, match=r"decayed 0.weight with weight_decay 0.05, the trajectory "
                                                      r"describes 0.3"):
        params = dict(model.named_parameters())
        other = torch.optim.SGD([{"params": [params[n] for n in WEIGHTS], "weight_decay": 0.3},
                                 {"params": [params[n] for n in BIASES], "weight_decay": 0.0}], lr=0.02, momentum=0.5)
        Attributor(model, task, Trajectory(segments, optimizer=other), tmp_path / "d.zarr", proj_dim=8)
    # A description that forgets a group's rate ratio.
    model, optimizer, segments = train("adamw", lr_ratio=0.5)
    named = copy.deepcopy(segments)
    for seg in named:
        for c in seg.checkpoints:
            for group, names in zip(c["optimizer"]["param_groups"], (WEIGHTS, BIASES), strict=True):
                group["param_names"] = names
    forgot = AdamW(betas=BETAS, eps=EPS, weight_decay=DECAY, groups=[{"params": BIASES, "weight_decay": 0.0}])
    with pytest.raises(CheckpointMismatchError, match=r"stepped 0.bias at 0.5 times group 0's learning rate, the "
                                                      r"trajectory describes 1"):
        Attributor(model, task, Trajectory(named, optimizer=forgot), tmp_path / "r.zarr", proj_dim=8)
    assert not any(tmp_path.iterdir())


def test_states_that_are_not_adams_are_refused_for_an_adam_run(adamw_run, tmp_path):
    model, optimizer, segments = adamw_run
    task = ClassificationTask()
    plain_sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: an empty state
    empty = [Segment([{"model": c["model"], "optimizer": plain_sgd.state_dict()} for c in s.checkpoints], s.steps,
                     s.lr, s.data) for s in segments]
    with pytest.raises(CheckpointMismatchError, match=r"holds no moments and its groups no betas: it is not Adam's"):
        Attributor(model, task, Trajectory(empty, optimizer=optimizer, batch_size=4), tmp_path / "e.zarr", proj_dim=8)
    fresh = torch.optim.AdamW(model.parameters(), betas=BETAS, eps=EPS, weight_decay=DECAY)  # before any step
    early = [Segment([{"model": c["model"], "optimizer": fresh.state_dict()} for c in s.checkpoints], s.steps, s.lr,
                     s.data) for s in segments]
    with pytest.raises(CheckpointMismatchError, match=r"saved before the optimizer's first step"):
        Attributor(model, task, Trajectory(early, optimizer=AdamW(betas=BETAS, eps=EPS, weight_decay=DECAY)),
                   tmp_path / "f.zarr", proj_dim=8)
    # Every group at rate 0 without a scheduler's base rates: the ratios cannot be read.
    params = dict(model.named_parameters())
    zero = torch.optim.AdamW([{"params": [params[n] for n in WEIGHTS], "lr": 0.0},
                              {"params": [params[n] for n in BIASES], "lr": 0.0}])
    with pytest.raises(ConfigurationError, match=r"every parameter group's learning rate is 0.0 now"):
        Trajectory(segments, optimizer=zero)
    assert not any(tmp_path.iterdir())
