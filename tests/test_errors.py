"""Bad inputs get a clear srcproj error of the right type, and never damage a store.

Most tests run the failing call against a finished store (``store``) and then check
that the store is still usable: reopened with the correct inputs, ``featurize()``
computes nothing and ``score`` returns the same numbers as before.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr
from conftest import build_tiny_run

from srcproj import (
    CheckpointMismatchError,
    ConfigurationError,
    DataError,
    NonFiniteGradientError,
    RademacherProjector,
    Segment,
    SrcprojError,
    StoreError,
    StoreMismatchError,
    Trajectory,
)
from srcproj import layout as names

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def prebuilt(tiny_run, tmp_path_factory):
    """A finished store for ``tiny_run`` and its scores for the run's queries."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("prebuilt") / "run.zarr"
        attr = tiny_run.attributor(path)
        attr.featurize(progress=False)
        return path, attr.score(tiny_run.queries)
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def store(prebuilt, tmp_path):
    """A private copy of the finished store: ``(path, baseline scores)``."""
    source, baseline = prebuilt
    path = tmp_path / "run.zarr"
    shutil.copytree(source, path)
    return path, baseline


def assert_store_intact(run, path, baseline, **kwargs) -> None:
    """Reopened with the correct inputs, the store computes nothing and scores as before."""
    attr = run.attributor(path, **kwargs)
    report = attr.featurize(progress=False)
    assert report.feature_chunks_computed == 0
    assert report.hessians_computed == 0
    assert report.cache_chunks_computed == 0
    assert report.examples_featurized == 0
    np.testing.assert_array_equal(attr.score(run.queries), baseline)


def without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def with_nan(state: dict, key: str = "0.weight") -> dict:
    out = {k: v.clone() for k, v in state.items()}
    out[key].view(-1)[0] = float("nan")
    return out


# ---------------------------------------------------------------------------- all errors are srcproj errors
def test_error_hierarchy():
    for cls in (ConfigurationError, DataError, CheckpointMismatchError, NonFiniteGradientError,
                StoreError, StoreMismatchError):
        assert issubclass(cls, SrcprojError)
    # Argument errors stay catchable as ValueError.
    for cls in (ConfigurationError, DataError, CheckpointMismatchError):
        assert issubclass(cls, ValueError)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_with_wrong_shapes(tiny_run, make_tiny_run, store):
    path, baseline = store
    other = make_tiny_run(hidden=5).checkpoints
    traj = tiny_run.trajectory(checkpoints=other)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint 0 .*another architecture.*shape mismatch.*0\.weight"):
        tiny_run.attributor(path, trajectory=traj)
    assert_store_intact(tiny_run, path, baseline)


def test_second_checkpoint_with_wrong_shapes_is_named(tiny_run, make_tiny_run, store):
    path, baseline = store
    bad = [tiny_run.checkpoints[0], make_tiny_run(hidden=7).checkpoints[1]]
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint 1 \(segment 0, position 1\).*shape mismatch"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=bad))
    assert_store_intact(tiny_run, path, baseline)


def test_checkpoint_with_missing_keys(tiny_run, store):
    path, baseline = store
    bad = [tiny_run.checkpoints[0], without(tiny_run.checkpoints[1], "2.bias")]
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint 1 .*missing \['2\.bias'\]"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=bad))
    assert_store_intact(tiny_run, path, baseline)


def test_checkpoint_with_unexpected_keys(tiny_run, store):
    path, baseline = store
    extra = dict(tiny_run.checkpoints[0], **{"3.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \['3\.weight'\]"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=[extra]))
    assert_store_intact(tiny_run, path, baseline)


def test_checkpoint_path_that_does_not_exist(tiny_run, store, tmp_path):
    path, baseline = store
    missing = tmp_path / "nowhere" / "ckpt.pt"
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint 0 .*no checkpoint file at .*ckpt\.pt"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=[missing]))
    assert_store_intact(tiny_run, path, baseline)


def test_checkpoint_file_that_is_not_a_state_dict(tiny_run, store, tmp_path):
    path, baseline = store
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointMismatchError, match=r"could not be read as a torch\.save'd state_dict"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=[garbage]))
    not_a_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(CheckpointMismatchError, match=r"pass a state_dict"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=[not_a_dict]))
    assert_store_intact(tiny_run, path, baseline)


def test_checkpoint_files_work_like_state_dicts(tiny_run, store, tmp_path):
    """The same checkpoints given as torch.save'd files are the same inputs."""
    path, baseline = store
    files = []
    for i, state in enumerate(tiny_run.checkpoints):
        files.append(tmp_path / f"ckpt_{i}.pt")
        torch.save(state, files[-1])
    attr = tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=files))
    assert attr.featurize(progress=False).feature_chunks_computed == 0
    np.testing.assert_array_equal(attr.score(tiny_run.queries), baseline)


# ---------------------------------------------------------------------------- segments and trajectory
def test_segment_without_checkpoints(tiny_run, store):
    path, baseline = store
    with pytest.raises(ConfigurationError, match=r"segment 0 has no checkpoints"):
        tiny_run.trajectory(checkpoints=[])
    good = Segment(tiny_run.checkpoints, 10, 0.1, tiny_run.data)
    with pytest.raises(ConfigurationError, match=r"segment 1 has no checkpoints"):
        Trajectory([good, Segment([], 10, 0.1, tiny_run.data)])
    assert_store_intact(tiny_run, path, baseline)


def test_trajectory_without_segments():
    with pytest.raises(ConfigurationError, match=r"no segments"):
        Trajectory([])


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_segment_with_bad_steps(tiny_run, store, steps):
    path, baseline = store
    with pytest.raises(ConfigurationError, match=rf"segment 0 has steps={steps!r}.*positive"):
        tiny_run.trajectory(steps=steps)
    assert_store_intact(tiny_run, path, baseline)


@pytest.mark.parametrize("lr", [0, 0.0, -0.1, float("nan"), float("inf")])
def test_segment_with_bad_scalar_lr(tiny_run, store, lr):
    path, baseline = store
    with pytest.raises(ConfigurationError, match=r"segment 0 has lr=.*finite number > 0"):
        tiny_run.trajectory(lr=lr)
    assert_store_intact(tiny_run, path, baseline)


@pytest.mark.parametrize("count", [3, 11])
def test_per_step_lr_of_wrong_length(tiny_run, store, count):
    path, baseline = store
    with pytest.raises(ConfigurationError, match=rf"{count} per-step learning rates for 10 steps"):
        tiny_run.trajectory(lr=[0.1] * count)
    assert_store_intact(tiny_run, path, baseline)


@pytest.mark.parametrize("rates", [[0.0] * 10, [0.1] * 9 + [-0.1], [0.1] * 9 + [float("nan")]])
def test_per_step_lr_not_positive(tiny_run, rates):
    with pytest.raises(ConfigurationError, match=r"per-step learning rates that are negative, non-finite or all zero"):
        tiny_run.trajectory(lr=rates)


def test_per_step_lr_with_the_same_total_is_the_same_trajectory(tiny_run, store):
    path, baseline = store
    attr = tiny_run.attributor(path, trajectory=tiny_run.trajectory(lr=[0.1] * 10))
    assert attr.featurize(progress=False).feature_chunks_computed == 0
    np.testing.assert_array_equal(attr.score(tiny_run.queries), baseline)


def test_nesterov_without_momentum_is_refused(tiny_run, store):
    path, baseline = store
    with pytest.raises(ConfigurationError, match=r"nesterov momentum needs momentum > 0 and dampening = 0"):
        tiny_run.trajectory(momentum=0.0, nesterov=True)
    with pytest.raises(ConfigurationError, match=r"nesterov momentum needs momentum > 0 and dampening = 0"):
        tiny_run.trajectory(momentum=0.9, nesterov=True, dampening=0.1)
    assert_store_intact(tiny_run, path, baseline)


def test_bad_dampening_is_refused(tiny_run, store):
    path, baseline = store
    with pytest.raises(ConfigurationError, match=r"dampening=1\.5; it must be in \[0, 1\]"):
        tiny_run.trajectory(momentum=0.9, dampening=1.5)
    assert_store_intact(tiny_run, path, baseline)


@pytest.mark.parametrize("kwargs, message", [
    ({"momentum": 1.0}, r"momentum=1\.0.*\[0, 1\)"),
    ({"momentum": -0.5}, r"momentum=-0\.5"),
    ({"weight_decay": -1e-3}, r"weight_decay=-0\.001.*>= 0"),
])
def test_bad_momentum_or_weight_decay(tiny_run, kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        tiny_run.trajectory(**kwargs)


# ---------------------------------------------------------------------------- data
def test_training_data_with_wrong_number_of_features(tiny_run, store):
    path, baseline = store
    data = (torch.randn(100, 5), tiny_run.y)
    with pytest.raises(DataError, match=r"segment 0's data: the model failed on inputs of shape \(1, 5\)"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=data))
    assert_store_intact(tiny_run, path, baseline)


def test_empty_training_data(tiny_run, store):
    path, baseline = store
    data = (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match=r"segment 0's data is empty"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=data))
    assert_store_intact(tiny_run, path, baseline)


def test_training_X_and_y_of_different_lengths(tiny_run, store):
    path, baseline = store
    data = (tiny_run.X, tiny_run.y[:99])
    with pytest.raises(DataError, match=r"segment 0's data has 100 inputs but 99 targets"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=data))
    assert_store_intact(tiny_run, path, baseline)


@pytest.mark.parametrize("data, message", [
    ((torch.zeros(4, 8),), r"example 0 is a Tensor, not an \(x, y\) pair.*tuple \(X, y\)"),
    (([1.0] * 4, [0] * 4), r"example 0 is a list of 4 items, not an \(x, y\) pair"),
    ((torch.zeros(4, 8), [0] * 4), r"with a list in it; X and y must both be torch tensors or numpy arrays"),
    (42, r"must be a tuple \(X, y\) of arrays, or an indexable .* of \(x, y\) pairs or of mappings; got int"),
])
def test_training_data_of_the_wrong_kind(tiny_run, store, data, message):
    path, baseline = store
    with pytest.raises(DataError, match=message):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=data))
    assert_store_intact(tiny_run, path, baseline)


class PairDataset(torch.utils.data.Dataset):
    """``(x, y)`` items from tensors, with optional replacement inputs for some indices."""

    def __init__(self, X, y, replace=None):
        self.X, self.y, self.replace = X, y, replace or {}

    def __len__(self):
        return len(self.X)

    def __getitem__(self, index):
        return self.replace.get(index, self.X[index]), self.y[index]


def test_dataset_of_the_same_examples_is_the_same_data(tiny_run, store):
    path, baseline = store
    attr = tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=PairDataset(tiny_run.X, tiny_run.y)))
    assert attr.featurize(progress=False).feature_chunks_computed == 0
    np.testing.assert_array_equal(attr.score(PairDataset(tiny_run.Xq, tiny_run.yq)), baseline)


def test_dataset_with_one_malformed_example(tiny_run, store):
    path, baseline = store
    data = PairDataset(tiny_run.X, tiny_run.y, replace={50: torch.zeros(5)})
    with pytest.raises(DataError, match=r"segment 0's data: examples 0\.\.99 cannot be stacked.*\[5\] at entry 50"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=data))
    attr = tiny_run.attributor(path)
    with pytest.raises(DataError, match=r"the query set: examples 0\.\.5 cannot be stacked"):
        attr.score(PairDataset(tiny_run.Xq, tiny_run.yq, replace={3: torch.zeros(8, 1)}))
    assert_store_intact(tiny_run, path, baseline)


def test_dataset_whose_items_are_not_pairs(tiny_run, store):
    path, baseline = store
    with pytest.raises(DataError, match=r"segment 0's data: example 0 is a tuple of 1 item, not an \(x, y\) pair"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=torch.utils.data.TensorDataset(tiny_run.X)))
    assert_store_intact(tiny_run, path, baseline)


def test_training_labels_outside_the_classes(tiny_run, store):
    path, baseline = store
    y = tiny_run.y.clone()
    y[17] = 3
    with pytest.raises(DataError, match=r"segment 0's data: label 3 of example 17 is outside the model's 3 classes"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=(tiny_run.X, y)))
    assert_store_intact(tiny_run, path, baseline)


def test_query_with_wrong_number_of_features(tiny_run, store):
    path, baseline = store
    attr = tiny_run.attributor(path)
    with pytest.raises(DataError, match=r"the query set, examples 0\.\.5: per-example gradients failed on inputs of shape \(6, 5\)"):
        attr.score((torch.randn(6, 5), tiny_run.yq))
    assert_store_intact(tiny_run, path, baseline)


def test_empty_query_set(tiny_run, store):
    path, baseline = store
    attr = tiny_run.attributor(path)
    with pytest.raises(DataError, match=r"the query set is empty"):
        attr.score((torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)))
    assert_store_intact(tiny_run, path, baseline)


def test_query_X_and_y_of_different_lengths(tiny_run, store):
    path, baseline = store
    attr = tiny_run.attributor(path)
    with pytest.raises(DataError, match=r"the query set has 6 inputs but 5 targets"):
        attr.score((tiny_run.Xq, tiny_run.yq[:5]))
    assert_store_intact(tiny_run, path, baseline)


@pytest.mark.parametrize("label", [3, 7, -1])
def test_query_labels_outside_the_classes(tiny_run, store, label):
    path, baseline = store
    attr = tiny_run.attributor(path)
    y = tiny_run.yq.clone()
    y[2] = label
    with pytest.raises(DataError, match=rf"the query set: label {label} of example 2 is outside the model's 3 classes \(valid labels are 0\.\.2\)"):
        attr.score((tiny_run.Xq, y))
    with pytest.raises(DataError, match=rf"label {label} of example 2"):
        attr.top_k((tiny_run.Xq, y), k=3)
    assert_store_intact(tiny_run, path, baseline)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_query_labels_that_are_not_integers(tiny_run, store, dtype):
    path, baseline = store
    attr = tiny_run.attributor(path)
    with pytest.raises(DataError, match=rf"labels of dtype {dtype}.*integer class indices"):
        attr.score((tiny_run.Xq, tiny_run.yq.to(dtype)))
    assert_store_intact(tiny_run, path, baseline)


def test_query_labels_of_the_wrong_shape(tiny_run, store):
    path, baseline = store
    attr = tiny_run.attributor(path)
    with pytest.raises(DataError, match=r"labels of shape \(6, 1\).*one class index per example"):
        attr.score((tiny_run.Xq, tiny_run.yq[:, None]))
    assert_store_intact(tiny_run, path, baseline)


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("proj_dim", [0, -3])
def test_proj_dim_below_one(tiny_run, store, proj_dim):
    path, baseline = store
    with pytest.raises(ConfigurationError, match=rf"proj_dim={proj_dim}.*integer >= 1"):
        tiny_run.attributor(path, proj_dim=proj_dim)
    with pytest.raises(ConfigurationError, match=rf"proj_dim={proj_dim}"):
        RademacherProjector(proj_dim)
    assert_store_intact(tiny_run, path, baseline)


@pytest.mark.parametrize("kwargs, message", [
    ({"chunk_size": 0}, r"chunk_size=0.*positive integer"),
    ({"feature_dtype": "int8"}, r"feature_dtype='int8'"),
    ({"hessian": "kfac"}, r"hessian='kfac'"),
    ({"fisher_samples": 0}, r"fisher_samples=0"),
    ({"projector": "rademacher"}, r"projector must be a srcproj Projector"),
    ({"modules": ["9"]}, r"modules entry '9' names no module of the model"),
])
def test_bad_attributor_arguments(tiny_run, store, kwargs, message):
    path, baseline = store
    with pytest.raises(ConfigurationError, match=message):
        tiny_run.attributor(path, **kwargs)
    assert_store_intact(tiny_run, path, baseline)


def test_bad_call_arguments(tiny_run, store):
    path, baseline = store
    attr = tiny_run.attributor(path)
    with pytest.raises(ConfigurationError, match=r"batch_size=0.*positive integer"):
        attr.featurize(batch_size=0, progress=False)
    with pytest.raises(ConfigurationError, match=r"k=0.*positive integer"):
        attr.top_k(tiny_run.queries, k=0)
    with pytest.raises(ConfigurationError, match=r"segment 1 does not exist; the trajectory has segments 0\.\.0"):
        attr.score(tiny_run.queries, segments=[1])
    with pytest.raises(ConfigurationError, match=r"segments=\[\] selects nothing"):
        attr.score(tiny_run.queries, segments=[])
    assert_store_intact(tiny_run, path, baseline)


# ---------------------------------------------------------------------------- NaN and inf
def clean_features(run, tmp_path, name: str, batch_size: int = 64) -> np.ndarray:
    """Features of a clean store built like the failing one, for comparison."""
    attr = run.attributor(tmp_path / "clean.zarr")
    attr.featurize(batch_size=batch_size, progress=False)
    return zarr.open_group(tmp_path / "clean.zarr", mode="r")[name][:]


def test_nan_weight_in_a_checkpoint(tiny_run, tmp_path):
    """The second checkpoint has a NaN weight: named in the error; checkpoint 0's work survives."""
    bad = [tiny_run.checkpoints[0], with_nan(tiny_run.checkpoints[1])]
    path = tmp_path / "nan_ckpt.zarr"
    attr = tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=bad))
    with pytest.raises(NonFiniteGradientError, match=r"checkpoint 1 \(segment 0\): the gradient of example 0 of segment 0's data is NaN or inf"):
        attr.featurize(progress=False)

    group = zarr.open_group(path, mode="r")
    assert group[names.features_done(0)][:].all()
    assert group[names.HESSIANS_DONE][:].tolist() == [True, False]
    assert not group[names.features_done(1)][:].any()
    np.testing.assert_array_equal(group[names.features(0)][:],
                                  clean_features(tiny_run, tmp_path, names.features(0)))

    # Reopened, the store resumes: checkpoint 0 is skipped and the error comes back.
    again = tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=bad))
    with pytest.raises(NonFiniteGradientError, match=r"checkpoint 1 .*example 0"):
        again.featurize(progress=False)
    with pytest.raises(StoreError, match=r"run featurize\(\) first"):
        again.score(tiny_run.queries)
    assert group[names.features_done(0)][:].all()


def test_nan_weight_in_the_only_checkpoint(tiny_run, tmp_path):
    attr = tiny_run.attributor(tmp_path / "nan.zarr",
                               trajectory=tiny_run.trajectory(checkpoints=[with_nan(tiny_run.checkpoints[0], "2.bias")]))
    with pytest.raises(NonFiniteGradientError, match=r"checkpoint 0 \(segment 0\): the gradient of example 0"):
        attr.featurize(progress=False)


@pytest.mark.parametrize("batch_size", [64, 5, 1])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_input_mid_featurize_keeps_finished_chunks(tiny_run, tmp_path, batch_size, value):
    """NaN/inf at examples 37 and 45 (chunk 2 of 16-row chunks): chunks 0 and 1 stay done and correct."""
    X = tiny_run.X.clone()
    X[45, 3] = value
    X[37, 1] = value
    path = tmp_path / "nan_data.zarr"
    attr = tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=(X, tiny_run.y)))
    with pytest.raises(NonFiniteGradientError,
                       match=r"checkpoint 0 \(segment 0\): the gradient of example 37 of segment 0's data is NaN or inf"):
        attr.featurize(batch_size=batch_size, progress=False)

    group = zarr.open_group(path, mode="r")
    flags = group[names.features_done(0)][:]
    assert flags.tolist() == [True, True] + [False] * (len(flags) - 2)
    np.testing.assert_allclose(group[names.features(0)][:32],
                               clean_features(tiny_run, tmp_path, names.features(0), batch_size)[:32], rtol=1e-6, atol=0)
    # Nothing past the bad chunk was flagged, and a second try reports the same example.
    again = tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=(X, tiny_run.y)))
    with pytest.raises(NonFiniteGradientError, match=r"example 37 "):
        again.featurize(batch_size=batch_size, progress=False)
    assert group[names.features_done(0)][:].tolist() == flags.tolist()


def test_nan_query_input(tiny_run, store):
    path, baseline = store
    attr = tiny_run.attributor(path)
    Xq = tiny_run.Xq.clone()
    Xq[4, 0] = float("nan")
    # Queries are measured at the last segment's checkpoints (0 and 1): the first names it.
    with pytest.raises(NonFiniteGradientError,
                       match=r"checkpoint 0 \(segment 0\): the gradient of example 4 of the query set"):
        attr.score((Xq, tiny_run.yq))
    final_only = tiny_run.attributor(path, query="final")
    with pytest.raises(NonFiniteGradientError, match=r"final checkpoint 1: the gradient of example 4 of the query set"):
        final_only.score((Xq, tiny_run.yq))
    assert_store_intact(tiny_run, path, baseline)


# ---------------------------------------------------------------------------- store mismatches
def test_store_for_another_model(tiny_run, make_tiny_run, store):
    path, baseline = store
    other = make_tiny_run(hidden=5)
    with pytest.raises(StoreMismatchError, match=r"made for other inputs.*num_params: 75 in the store, 63 now"):
        other.attributor(path)
    assert_store_intact(tiny_run, path, baseline)


def test_store_for_another_seed(tiny_run, store):
    path, baseline = store
    with pytest.raises(StoreMismatchError, match=r"projector\.seed: 0 in the store, 1 now"):
        tiny_run.attributor(path, seed=1)
    assert_store_intact(tiny_run, path, baseline)


def test_store_for_another_proj_dim(tiny_run, store):
    path, baseline = store
    with pytest.raises(StoreMismatchError, match=r"proj_dim: 16 in the store, 32 now"):
        tiny_run.attributor(path, proj_dim=32)
    assert_store_intact(tiny_run, path, baseline)


def test_other_segment_times_are_not_scored_from_stale_caches(tiny_run, store):
    """Other steps / lr / momentum / weight decay reuse the store (tests/test_stages.py), but
    the caches made for the old ones are never scored: featurize() must run first."""
    path, baseline = store
    for trajectory in (tiny_run.trajectory(steps=20), tiny_run.trajectory(lr=0.05),
                       tiny_run.trajectory(momentum=0.5), tiny_run.trajectory(weight_decay=0.01)):
        attr = tiny_run.attributor(path, trajectory=trajectory)
        assert not attr.is_featurized()
        with pytest.raises(StoreError, match=r"made with other inputs \(.*\): run featurize\(\)"):
            attr.score(tiny_run.queries)
    assert_store_intact(tiny_run, path, baseline)


def test_store_for_other_data(tiny_run, store):
    path, baseline = store
    shifted = (tiny_run.X + 1.0, tiny_run.y)
    with pytest.raises(StoreMismatchError, match=r"segments\[0\]\.data_fingerprint"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=shifted))
    fewer = (tiny_run.X[:90], tiny_run.y[:90])
    with pytest.raises(StoreMismatchError, match=r"segments\[0\]\.num_examples: 100 in the store, 90 now"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=fewer))
    assert_store_intact(tiny_run, path, baseline)


def test_store_for_other_checkpoints(tiny_run, make_tiny_run, store):
    path, baseline = store
    other = make_tiny_run(seed=5).checkpoints  # same architecture, other weights
    with pytest.raises(StoreMismatchError, match=r"segments\[0\]\.checkpoints\[0\]"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=other))
    with pytest.raises(StoreMismatchError, match=r"segments\[0\]\.checkpoints: 2 entries in the store, 1 now"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(checkpoints=tiny_run.checkpoints[:1]))
    assert_store_intact(tiny_run, path, baseline)


@pytest.mark.parametrize("kwargs, message", [
    ({"chunk_size": 8}, r"chunk_size: 16 in the store, 8 now"),
    ({"feature_dtype": "float16"}, r"feature_dtype: 'float32' in the store, 'float16' now"),
    ({"hessian": "fisher"}, r"hessian: 'exact' in the store, 'fisher' now"),
])
def test_store_for_other_settings(tiny_run, store, kwargs, message):
    path, baseline = store
    with pytest.raises(StoreMismatchError, match=message):
        tiny_run.attributor(path, **kwargs)
    assert_store_intact(tiny_run, path, baseline)


def test_store_path_that_is_a_file(tiny_run, tmp_path):
    target = tmp_path / "run.zarr"
    target.write_text("not a store")
    with pytest.raises(StoreError, match=r"store path .*run\.zarr' is a file; give a directory path"):
        tiny_run.attributor(target)
    assert target.read_text() == "not a store"


def test_store_path_that_is_another_directory(tiny_run, tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StoreError, match=r"non-empty directory that is not a zarr store"):
        tiny_run.attributor(target)
    assert sorted(p.name for p in target.iterdir()) == ["cat.jpg"]


def test_zarr_store_not_made_by_srcproj(tiny_run, tmp_path):
    target = tmp_path / "foreign.zarr"
    group = zarr.open_group(target, mode="w", zarr_format=3)
    group.create_array("data", shape=(3,), dtype="float32")
    with pytest.raises(StoreError, match=r"zarr store that srcproj did not make"):
        tiny_run.attributor(target)


# ---------------------------------------------------------------------------- scoring
def test_scoring_segments_with_different_data(tiny_run, tmp_path):
    """Segments 0 and 1 trained on different data sets: scoring them together is refused."""
    other = (tiny_run.X.flip(0), tiny_run.y.flip(0))  # the same examples in another order
    traj = Trajectory([
        Segment(tiny_run.checkpoints[:1], 5, 0.1, tiny_run.data),
        Segment(tiny_run.checkpoints[1:], 5, 0.1, other),
    ])
    path = tmp_path / "two.zarr"
    attr = tiny_run.attributor(path, trajectory=traj)
    attr.featurize(progress=False)
    first, second = attr.score(tiny_run.queries, segments=[0]), attr.score(tiny_run.queries, segments=[1])
    np.testing.assert_array_equal(attr.score(tiny_run.queries), first)

    for call in (lambda: attr.score(tiny_run.queries, segments=[0, 1]),
                 lambda: attr.top_k(tiny_run.queries, k=3, segments=[1, 0]),
                 lambda: attr.self_influence(segments=[0, 1])):
        with pytest.raises(ConfigurationError, match=r"segments \[[01], [01]\] trained on different data sets"):
            call()

    reopened = tiny_run.attributor(path, trajectory=traj)
    report = reopened.featurize(progress=False)
    assert (report.feature_chunks_computed, report.hessians_computed, report.cache_chunks_computed) == (0, 0, 0)
    np.testing.assert_array_equal(reopened.score(tiny_run.queries, segments=[0]), first)
    np.testing.assert_array_equal(reopened.score(tiny_run.queries, segments=[1]), second)


def test_score_before_featurize(tiny_run, tmp_path):
    path = tmp_path / "fresh.zarr"
    attr = tiny_run.attributor(path)
    for call in (lambda: attr.score(tiny_run.queries),
                 lambda: attr.top_k(tiny_run.queries, k=2),
                 lambda: attr.self_influence()):
        with pytest.raises(StoreError, match=r"not complete: run featurize\(\) first"):
            call()
    # The store is still a good, empty one: featurize then works.
    attr.featurize(progress=False)
    assert attr.score(tiny_run.queries).shape == (6, 100)


def test_score_on_a_partly_featurized_store(tiny_run, store):
    """A store whose caches are not all flagged (e.g. an interrupted run) refuses to score."""
    path, baseline = store
    group = zarr.open_group(path, mode="r+")
    group[names.cache_done(0)][3] = False
    attr = tiny_run.attributor(path)
    with pytest.raises(StoreError, match=r"run featurize\(\) first"):
        attr.score(tiny_run.queries)
    report = attr.featurize(progress=False)
    assert (report.feature_chunks_computed, report.cache_chunks_computed, report.cache_chunks_skipped) == (0, 1, 6)
    np.testing.assert_array_equal(attr.score(tiny_run.queries), baseline)


def test_errors_from_a_fresh_process_copy(tiny_run):
    """The fixtures are deterministic: a rebuilt run is identical (the resume tests rely on it)."""
    rebuilt = build_tiny_run()
    for a, b in zip(rebuilt.checkpoints, tiny_run.checkpoints, strict=False):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert torch.equal(rebuilt.X, tiny_run.X) and torch.equal(rebuilt.y, tiny_run.y)


def test_store_refuses_data_with_one_changed_example(tiny_run, store):
    path, baseline = store
    X = tiny_run.X.clone()
    X[37, 2] += 0.5
    with pytest.raises(StoreMismatchError, match=r"segments\[0\]\.data_fingerprint"):
        tiny_run.attributor(path, trajectory=tiny_run.trajectory(data=(X, tiny_run.y)))
    assert_store_intact(tiny_run, path, baseline)


def test_flipped_byte_in_a_cache_chunk_is_an_error_naming_the_array_and_chunk(tiny_run, store):
    path, baseline = store
    chunk_file = path / "caches" / "seg_0" / "c" / "1" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    attr = tiny_run.attributor(path)
    with pytest.raises(StoreError, match=r"array 'caches/seg_0', chunk 1 .*damaged"):
        attr.score(tiny_run.queries)
