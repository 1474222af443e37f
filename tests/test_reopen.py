"""Reopening a featurized store for scoring from its path, the model and the task."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import tiny_mlp

from srcproj import (
    Attributor,
    ClassificationTask,
    ConfigurationError,
    KroneckerProjector,
    MatrixProjector,
    RegressionTask,
    StoreError,
    StoreMismatchError,
)
from srcproj import layout as names

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def featurized(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("reopen") / "run.zarr"
    attr = tiny_run.attributor(path)
    attr.featurize(progress=False)
    return path, attr


def test_reopened_store_scores_like_the_original(tiny_run, featurized):
    path, original = featurized
    reopened = Attributor.open(path, tiny_run.model, ClassificationTask())
    np.testing.assert_array_equal(reopened.score(tiny_run.queries), original.score(tiny_run.queries))
    top, want = reopened.top_k(tiny_run.queries, k=5), original.top_k(tiny_run.queries, k=5)
    np.testing.assert_array_equal(top.helpful_indices, want.helpful_indices)
    np.testing.assert_array_equal(top.harmful_scores, want.harmful_scores)
    final = Attributor.open(path, tiny_run.model, ClassificationTask(), query="final")
    np.testing.assert_array_equal(final.score(tiny_run.queries),
                                  tiny_run.attributor(path, query="final").score(tiny_run.queries))


def test_training_data_is_optional_and_checked(tiny_run, featurized):
    path, original = featurized
    without = Attributor.open(path, tiny_run.model, ClassificationTask())
    with pytest.raises(ConfigurationError, match=r"training data is needed here .* data=\.\.\."):
        without.self_influence()
    with_data = Attributor.open(path, tiny_run.model, ClassificationTask(), data=(tiny_run.X, tiny_run.y))
    np.testing.assert_array_equal(with_data.self_influence(), original.self_influence())
    with pytest.raises(StoreMismatchError, match="segment 0's data is not the data the store was featurized with"):
        Attributor.open(path, tiny_run.model, ClassificationTask(), data=(tiny_run.X + 1, tiny_run.y))
    with pytest.raises(StoreMismatchError, match="it has 90 examples, the store 100"):
        Attributor.open(path, tiny_run.model, ClassificationTask(), data=(tiny_run.X[:90], tiny_run.y[:90]))


def test_reopen_refuses_another_model_task_or_an_incomplete_store(tiny_run, featurized, tmp_path):
    path, _ = featurized
    with pytest.raises(StoreMismatchError, match="the model does not match the store"):
        Attributor.open(path, tiny_mlp(hidden=7), ClassificationTask())
    with pytest.raises(StoreMismatchError, match="the task does not match the store"):
        Attributor.open(path, tiny_run.model, RegressionTask())
    with pytest.raises(StoreError, match="no store at"):
        Attributor.open(tmp_path / "missing.zarr", tiny_run.model, ClassificationTask())
    partial = tiny_run.attributor(tmp_path / "partial.zarr")
    with pytest.raises(StoreError, match="not complete: run featurize"):
        Attributor.open(tmp_path / "partial.zarr", tiny_run.model, ClassificationTask())
    assert partial.store is not None
    reopened = Attributor.open(path, tiny_run.model, ClassificationTask())
    with pytest.raises(ConfigurationError, match="reopened for scoring"):
        reopened.featurize()


def test_a_damaged_saved_checkpoint_is_refused(tiny_run, featurized, tmp_path):
    import shutil

    path, _ = featurized
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    chunk = next((copy / names.query_checkpoint(1) / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    reopened = Attributor.open(copy, tiny_run.model, ClassificationTask())
    with pytest.raises(StoreError, match=r"query/ckpt_1.*damaged"):
        reopened.score(tiny_run.queries)


@pytest.mark.parametrize("version", [1, 2])
def test_factored_projectors_of_either_version_are_rebuilt(tiny_run, tmp_path, version):
    kron = tiny_run.attributor(tmp_path / "k.zarr", projector=KroneckerProjector(12, seed=3, version=version))
    kron.featurize(progress=False)
    reopened = Attributor.open(tmp_path / "k.zarr", tiny_run.model, ClassificationTask())
    np.testing.assert_array_equal(reopened.score(tiny_run.queries), kron.score(tiny_run.queries))
    assert reopened.projector.describe() == kron.projector.describe()  # laid out on the first query batch
    assert reopened.projector.describe()["version"] == version


def test_projector_is_rebuilt_from_the_store(tiny_run, tmp_path):
    matrix = MatrixProjector(np.random.default_rng(0).standard_normal((10, 75)))
    explicit = tiny_run.attributor(tmp_path / "m.zarr", projector=matrix)
    explicit.featurize(progress=False)
    with pytest.raises(ConfigurationError, match="pass the same projector again"):
        Attributor.open(tmp_path / "m.zarr", tiny_run.model, ClassificationTask())
    again = Attributor.open(tmp_path / "m.zarr", tiny_run.model, ClassificationTask(), projector=matrix)
    np.testing.assert_array_equal(again.score(tiny_run.queries), explicit.score(tiny_run.queries))
    other = MatrixProjector(np.random.default_rng(1).standard_normal((10, 75)))
    with pytest.raises(StoreMismatchError, match="the projector does not match"):
        Attributor.open(tmp_path / "m.zarr", tiny_run.model, ClassificationTask(), projector=other).score(
            tiny_run.queries)
    assert zarr.open_group(tmp_path / "m.zarr", mode="r").attrs["srcproj"]["projector"]["kind"] == "matrix"
