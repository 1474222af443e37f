"""The gradient stage: features and Hessian parts per chunk, in one pass for the exact estimator.

A killed featurize loses at most the chunk in progress, Hessian work included; the
features derived from the projected output Jacobians equal the loss-gradient
features; the report says which estimator ran, on how many examples, and where the
time went.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_scores_close

from srcproj import layout as names
from srcproj.gradients import ProjectedGradients
from srcproj.pipeline import STAGE_TIMES

pytestmark = pytest.mark.usefixtures("single_thread")


class _Interrupt(Exception):
    pass


@pytest.fixture
def stop_after(monkeypatch):
    """``stop_after(n)``: the (n+1)-th output-Jacobian pass raises, as a kill would stop the job."""

    def arm(calls: int) -> None:
        original = ProjectedGradients.output_features
        left = [calls]

        def output_features(self, trainable, fixed, x):
            if left[0] == 0:
                raise _Interrupt
            left[0] -= 1
            return original(self, trainable, fixed, x)

        monkeypatch.setattr(ProjectedGradients, "output_features", output_features)

    return arm


def test_an_interrupted_hessian_resumes_from_its_parts(tiny_run, tmp_path, stop_after, monkeypatch):
    reference = tiny_run.attributor(tmp_path / "ref.zarr")
    reference.featurize(progress=False)
    path = tmp_path / "run.zarr"
    stop_after(10)  # 7 chunks of checkpoint 0 (Hessian written), 3 of checkpoint 1
    with pytest.raises(_Interrupt):
        tiny_run.attributor(path).featurize(progress=False)
    monkeypatch.undo()
    attr = tiny_run.attributor(path)
    layout = attr.layout
    assert layout.hessians_done().tolist() == [True, False]
    assert layout.hessian_parts_done(1).tolist() == [True] * 3 + [False] * 4
    assert not layout.store.has(names.hessian_parts(0))  # dropped once Hessian 0 was written
    report = attr.featurize(progress=False)
    assert (report.hessian_chunks_computed, report.hessian_chunks_skipped) == (4, 0)
    assert (report.feature_chunks_computed, report.feature_chunks_skipped) == (4, 10)
    assert (report.hessians_computed, report.hessians_skipped) == (1, 1)
    assert report.hessian_examples == 100 - 3 * 16
    assert not layout.store.has(names.hessian_parts(1))
    np.testing.assert_allclose(layout.read_hessian(1), reference.layout.read_hessian(1), rtol=1e-12, atol=1e-15)
    assert_scores_close(attr.score(tiny_run.queries), reference.score(tiny_run.queries))


def test_lost_part_flags_recompute_only_those_parts(tiny_run, tmp_path, stop_after, monkeypatch):
    path = tmp_path / "run.zarr"
    stop_after(10)
    with pytest.raises(_Interrupt):
        tiny_run.attributor(path).featurize(progress=False)
    monkeypatch.undo()
    attr = tiny_run.attributor(path)
    attr.layout.hessian_parts(1)[2][1] = False
    report = attr.featurize(progress=False)
    # Chunk 1's features are done: its part alone is recomputed (with chunks 3..6).
    assert (report.hessian_chunks_computed, report.feature_chunks_computed) == (5, 4)


def test_features_from_jacobians_equal_loss_gradients(tiny_run, tmp_path):
    attr = tiny_run.attributor(tmp_path / "run.zarr", feature_dtype="float64")
    attr.featurize(progress=False)
    ctx = attr.context
    for checkpoint in range(2):
        direct = ctx.projected(ctx.split(checkpoint), ctx.source(0), 0, 100, 64, "loss", "test")
        np.testing.assert_allclose(attr.checkpoint_features(checkpoint), direct.to(torch.float64).numpy(),
                                   rtol=1e-6, atol=1e-7 * float(direct.abs().max()))


@pytest.mark.parametrize("hessian, examples", [("exact", 200), ("fisher", 200), ("empirical", 200)])
def test_the_report_says_what_ran_and_where_the_time_went(tiny_run, tmp_path, hessian, examples):
    attr = tiny_run.attributor(tmp_path / "run.zarr", hessian=hessian)
    report = attr.featurize(progress=False)
    assert report.hessian_estimator == hessian
    assert report.hessian_examples == examples
    assert report.hessian_chunks_computed == 14
    assert set(report.stage_seconds) == set(STAGE_TIMES)
    assert all(seconds > 0 for kind, seconds in report.stage_seconds.items() if kind != "preconditioner")
    assert report.stage_seconds["preconditioner"] == 0.0 and report.preconditioner == "none"  # an SGD run
    assert sum(report.stage_seconds.values()) <= report.seconds
    again = tiny_run.attributor(tmp_path / "run.zarr", hessian=hessian).featurize(progress=False)
    assert again.hessian_examples == 0 and again.hessian_chunks_computed == 0


@pytest.mark.parametrize("hessian", ["exact", "fisher", "empirical"])
def test_a_hessian_sample_averages_the_chosen_rows(tiny_run, tmp_path, hessian):
    attr = tiny_run.attributor(tmp_path / "run.zarr", hessian=hessian, hessian_sample=40)
    report = attr.featurize(progress=False)
    ctx, layout = attr.context, attr.layout
    assert report.feature_chunks_computed == 14 and report.examples_featurized == 200
    chosen = [np.concatenate([rows for chunk, (start, stop) in enumerate(layout.chunks(0))
                              if (rows := ctx.hessian_rows(c, chunk, start, stop)) is not None]) for c in range(2)]
    assert report.hessian_examples == sum(rows.size for rows in chosen)
    assert all(36 <= rows.size <= 44 and np.unique(rows).size == rows.size for rows in chosen)
    assert not np.array_equal(chosen[0], chosen[1])  # drawn per checkpoint
    if hessian == "exact":  # brute force: the Gauss-Newton mean over exactly those rows
        for c in range(2):
            trainable, fixed = ctx.split(c)
            x, y = tiny_run.X[chosen[c]], tiny_run.y[chosen[c]]
            projected, outputs = ctx.gradients.output_features(trainable, fixed, x)
            rows = ctx.estimator.rows(projected, outputs, y)
            expected = (rows.T @ rows / len(chosen[c])).numpy()
            # float32 Jacobians, batched per chunk there and all at once here: rounding apart.
            np.testing.assert_allclose(layout.read_hessian(c), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    full = tiny_run.attributor(tmp_path / "full.zarr", hessian=hessian)
    full.featurize(progress=False)
    # The same features (float32 rounding apart: here they come from the loss gradient, there from the Jacobians).
    assert_scores_close(attr.checkpoint_features(1), full.checkpoint_features(1), rtol=1e-4)
    assert not np.allclose(layout.read_hessian(1), full.layout.read_hessian(1))


def test_a_hessian_sample_is_part_of_the_store_identity(tiny_run, tmp_path):
    from srcproj import ConfigurationError, StoreMismatchError

    tiny_run.attributor(tmp_path / "run.zarr", hessian_sample=40).featurize(progress=False)
    with pytest.raises(StoreMismatchError, match="hessian_sample"):
        tiny_run.attributor(tmp_path / "run.zarr", hessian_sample=50)
    with pytest.raises(ConfigurationError, match="hessian_sample"):
        tiny_run.attributor(tmp_path / "other.zarr", hessian_sample=0)
    # A sample as large as the data is every example: the same Hessian as without one.
    every = tiny_run.attributor(tmp_path / "every.zarr", hessian_sample=100)
    every.featurize(progress=False)
    plain = tiny_run.attributor(tmp_path / "plain.zarr")
    plain.featurize(progress=False)
    np.testing.assert_allclose(every.layout.read_hessian(0), plain.layout.read_hessian(0), rtol=1e-12)


def test_a_loss_of_another_shape_gives_the_same_features(tiny_run, tmp_path):
    """A task whose loss is (B, 1) rather than (B,): each example is differentiated on its own."""
    from srcproj import Attributor, ClassificationTask

    class ColumnLoss(ClassificationTask):
        def loss(self, outputs, targets):
            return super().loss(outputs, targets).unsqueeze(1)

    column = Attributor(tiny_run.model, ColumnLoss(), tiny_run.trajectory(), tmp_path / "column.zarr",
                        proj_dim=16, feature_dtype="float32", chunk_size=16)
    column.featurize(progress=False)
    plain = tiny_run.attributor(tmp_path / "plain.zarr")
    plain.featurize(progress=False)
    assert_scores_close(column.checkpoint_features(0), plain.checkpoint_features(0), rtol=1e-5)


def test_a_hessian_with_missing_parts_is_not_written(tiny_run, tmp_path, stop_after, monkeypatch):
    from srcproj import StoreError

    stop_after(10)
    with pytest.raises(_Interrupt):
        tiny_run.attributor(tmp_path / "run.zarr").featurize(progress=False)
    monkeypatch.undo()
    layout = tiny_run.attributor(tmp_path / "run.zarr").layout
    with pytest.raises(StoreError, match=r"checkpoint 1 lacks the parts of row chunks \[3, 4, 5, 6\].*featurize"):
        layout.sum_hessian_parts(1)
