"""Stage recording: a store reopened with other stage inputs recomputes only what depends on them.

The spectra depend on the weight decay, the caches on the segments' times (steps,
learning rates, momentum). Re-describing those reuses the features and Hessians; the
counters of the featurize report show what was recomputed, and the scores equal those
of a store made from scratch with the new description.
"""

from __future__ import annotations

import numpy as np
import pytest

from srcproj import Segment, Trajectory
from srcproj.layout import StoreLayout

pytestmark = pytest.mark.usefixtures("single_thread")


def _trajectory(run, steps=(6, 4), lr=0.1, momentum=0.0, weight_decay=0.0) -> Trajectory:
    """Two segments on the same data (chunk_size 16: 7 chunks per checkpoint)."""
    return Trajectory([Segment(run.checkpoints[:1], steps[0], lr, run.data),
                       Segment(run.checkpoints[1:], steps[1], lr, run.data)],
                      momentum=momentum, weight_decay=weight_decay)


@pytest.fixture
def featurized(tiny_run, tmp_path):
    path = tmp_path / "run.zarr"
    attr = tiny_run.attributor(path, trajectory=_trajectory(tiny_run))
    report = attr.featurize(progress=False)
    assert report.recomputed_stages == [] and report.spectra_computed == 2
    return path, attr.score(tiny_run.queries)


def _fresh_scores(run, tmp_path, trajectory) -> np.ndarray:
    attr = run.attributor(tmp_path / "fresh.zarr", trajectory=trajectory)
    attr.featurize(progress=False)
    return attr.score(run.queries)


def _assert_recomputed(report, spectra: int, caches: int, stages: list[str]) -> None:
    assert (report.feature_chunks_computed, report.examples_featurized, report.hessians_computed) == (0, 0, 0)
    assert report.hessians_skipped == 2
    assert report.spectra_computed == spectra and report.spectra_skipped == 2 - spectra
    assert report.cache_chunks_computed == caches and report.cache_chunks_skipped == 14 - caches
    assert report.recomputed_stages == stages


@pytest.mark.parametrize("change", [{"momentum": 0.5}, {"steps": (12, 2)}, {"lr": 0.05}])
def test_segment_times_recompute_only_the_caches(tiny_run, featurized, tmp_path, change):
    path, before = featurized
    trajectory = _trajectory(tiny_run, **change)
    attr = tiny_run.attributor(path, trajectory=trajectory)
    assert not attr.is_featurized()
    _assert_recomputed(attr.featurize(progress=False), spectra=0, caches=14, stages=["caches"])
    scores = attr.score(tiny_run.queries)
    np.testing.assert_allclose(scores, _fresh_scores(tiny_run, tmp_path, trajectory), rtol=1e-6, atol=1e-9)
    assert not np.allclose(scores, before, rtol=1e-3)
    # Described as before again: the caches go back to the first ones.
    again = tiny_run.attributor(path, trajectory=_trajectory(tiny_run))
    _assert_recomputed(again.featurize(progress=False), spectra=0, caches=14, stages=["caches"])
    np.testing.assert_allclose(again.score(tiny_run.queries), before, rtol=1e-6, atol=1e-9)


def test_weight_decay_recomputes_spectra_and_caches(tiny_run, featurized, tmp_path):
    path, before = featurized
    trajectory = _trajectory(tiny_run, weight_decay=0.01)
    attr = tiny_run.attributor(path, trajectory=trajectory)
    _assert_recomputed(attr.featurize(progress=False), spectra=2, caches=14, stages=["spectra", "caches"])
    np.testing.assert_allclose(attr.score(tiny_run.queries), _fresh_scores(tiny_run, tmp_path, trajectory),
                               rtol=1e-6, atol=1e-9)
    second = attr.featurize(progress=False)  # nothing left to do
    assert (second.spectra_computed, second.cache_chunks_computed, second.recomputed_stages) == (0, 0, [])


def test_a_reconcile_killed_before_recording_clears_again(tiny_run, featurized):
    """The flags are cleared before the new inputs are recorded: a job killed in between
    finds the old inputs and clears again, so no stale cache is ever flagged done."""
    path, _ = featurized
    attr = tiny_run.attributor(path, trajectory=_trajectory(tiny_run, momentum=0.5))
    layout = StoreLayout(attr.store)
    wanted = attr.context.stage_inputs()
    layout._clear("caches")  # what reconcile does first; then the job dies
    assert not any(layout.caches_done(s).any() for s in range(2))
    assert layout.stale(wanted) == ["caches"]
    _assert_recomputed(attr.featurize(progress=False), spectra=0, caches=14, stages=["caches"])
    assert layout.stale(wanted) == [] and layout.is_complete()
