"""The counterfactual setting: same steps, or same epochs at a fraction α (docs/math.md §8).

Under same epochs the segments that trained on the attributed data set take α·K steps,
so their time is α·a; the stored caches of that setting equal SOURCE re-timed that way
(``SourceVariant``), several settings live in one store, switching recomputes only the
caches, and a change of the spectra clears every setting's caches.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from srcproj import (
    Attributor,
    ClassificationTask,
    ConfigurationError,
    Counterfactual,
    Segment,
    StoreError,
    Trajectory,
    verify_store,
)
from srcproj import layout as names
from srcproj.baselines import SourceVariant
from srcproj.cli import store_summary
from srcproj.layout import StoreLayout
from srcproj.store import AttributionStore

pytestmark = pytest.mark.usefixtures("single_thread")

HALF = Counterfactual.same_epochs(0.5)


def _trajectory(run, steps=(6, 4), lr=0.1, weight_decay=0.0, two_stage=False) -> Trajectory:
    """Two segments (chunk_size 16: 7 chunks per segment on one data set); with
    ``two_stage``, segment 1 trains on another data set (the last 50 examples)."""
    second = (run.X[50:], run.y[50:]) if two_stage else run.data
    return Trajectory([Segment(run.checkpoints[:1], steps[0], lr, run.data),
                       Segment(run.checkpoints[1:], steps[1], lr, second)], weight_decay=weight_decay)


def _featurized(run, path, setting="same_steps", **kwargs) -> Attributor:
    attr = run.attributor(path, trajectory=_trajectory(run, **kwargs), counterfactual=setting)
    attr.featurize(progress=False)
    return attr


def _assert_only_caches(report, cache_chunks: int) -> None:
    assert (report.feature_chunks_computed, report.hessians_computed, report.spectra_computed) == (0, 0, 0)
    assert report.cache_chunks_computed == cache_chunks


# ---------------------------------------------------------------------- the setting itself
def test_the_setting_validates_and_names_itself():
    assert Counterfactual() == Counterfactual.same_steps()
    assert Counterfactual.same_steps().key == "same_steps"
    assert HALF.key == "same_epochs_0.5" and HALF.fraction == 0.5 and HALF.protocol == "same_epochs"
    assert Counterfactual.same_epochs(1).fraction == 1.0 and Counterfactual.same_epochs(1).key == "same_epochs_1.0"
    assert Counterfactual.same_epochs(0.8, data_segment=2).key == "same_epochs_0.8_seg2"
    assert "0.5" in HALF.describe() and "same steps" in Counterfactual().describe()
    assert HALF.times([1.0, 2.0, 3.0], [0, 1, 0]) == [0.5, 2.0, 1.5]
    assert Counterfactual.same_epochs(0.25, 1).times([1.0, 2.0, 3.0], [0, 1, 0]) == [1.0, 0.5, 3.0]
    assert Counterfactual().times([1.0, 2.0], [0, 0]) == [1.0, 2.0]
    with pytest.raises(ConfigurationError, match="protocol='same_data'; choose 'same_steps' or 'same_epochs'"):
        Counterfactual("same_data")
    for fraction in (0, -0.2, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ConfigurationError, match=r"fraction=.*a number in \(0, 1\]"):
            Counterfactual.same_epochs(fraction)
    with pytest.raises(ConfigurationError, match="with protocol 'same_steps'.*Counterfactual.same_epochs"):
        Counterfactual("same_steps", 0.5)
    for segment in (-1, 1.0, True):
        with pytest.raises(ConfigurationError, match="data_segment=.*an int >= 0"):
            Counterfactual.same_epochs(0.5, segment)
    with pytest.raises(AttributeError):
        HALF.fraction = 0.3  # frozen


# ---------------------------------------------------------------------- the scores
def test_same_epochs_caches_equal_a_retimed_source(tiny_run, tmp_path):
    attr = tiny_run.attributor(tmp_path / "run.zarr", trajectory=_trajectory(tiny_run), counterfactual=HALF)
    assert not attr.is_featurized()
    report = attr.featurize(progress=False)
    assert report.cache_chunks_computed == 14 and attr.is_featurized()
    layout = StoreLayout(attr.store)
    assert not layout.caches_done(0).any() and not layout.is_complete()  # the same-steps caches: not computed
    assert layout.is_complete(HALF.key)
    retimed = SourceVariant(attr, _trajectory(tiny_run, steps=(3, 2)))
    scores = attr.score(tiny_run.queries)
    np.testing.assert_allclose(scores, retimed.score(tiny_run.queries), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(attr.self_influence(), retimed.self_influence(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(attr.top_k(tiny_run.queries, k=3).helpful_indices,
                                  retimed.top_k(tiny_run.queries, k=3).helpful_indices)
    same_steps = SourceVariant(attr).score(tiny_run.queries)
    assert not np.allclose(scores, same_steps, rtol=1e-3)


@pytest.mark.parametrize("data_segment", [0, 1])
def test_two_stages_retime_only_the_attributed_data_set(tiny_run, tmp_path, data_segment):
    setting = Counterfactual.same_epochs(0.5, data_segment)
    attr = _featurized(tiny_run, tmp_path / "run.zarr", setting, two_stage=True)
    steps = [6, 4]
    steps[data_segment] //= 2  # only the attributed data set's segment takes α·K steps
    retimed = SourceVariant(attr, _trajectory(tiny_run, steps=steps, two_stage=True), segments=[data_segment])
    scores = attr.score(tiny_run.queries)
    assert scores.shape == (6, 100 if data_segment == 0 else 50)
    np.testing.assert_allclose(scores, retimed.score(tiny_run.queries), rtol=1e-6, atol=1e-9)
    # Re-timing every segment is another answer (segment 1's forgetting acts on segment 0).
    everything = SourceVariant(attr, _trajectory(tiny_run, steps=(3, 2), two_stage=True), segments=[data_segment])
    if data_segment == 0:
        assert not np.allclose(scores, everything.score(tiny_run.queries), rtol=1e-3)
    with pytest.raises(ConfigurationError, match="trained on another data set than segment"):
        attr.score(tiny_run.queries, segments=[1 - data_segment])


def test_fraction_one_equals_same_steps(tiny_run, tmp_path):
    path = tmp_path / "run.zarr"
    same_steps = _featurized(tiny_run, path)
    one = _featurized(tiny_run, path, Counterfactual.same_epochs(1.0))
    np.testing.assert_allclose(one.score(tiny_run.queries), same_steps.score(tiny_run.queries), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------- one store, several settings
def test_switching_setting_recomputes_only_the_caches(tiny_run, tmp_path):
    path = tmp_path / "run.zarr"
    same_steps = _featurized(tiny_run, path)
    expected = same_steps.score(tiny_run.queries)
    half = tiny_run.attributor(path, trajectory=_trajectory(tiny_run), counterfactual=HALF)
    assert not half.is_featurized() and same_steps.is_featurized()
    report = half.featurize(progress=False)
    _assert_only_caches(report, 14)
    assert report.recomputed_stages == [] and report.hessians_skipped == 2 and report.spectra_skipped == 2
    half_expected = SourceVariant(half, _trajectory(tiny_run, steps=(3, 2))).score(tiny_run.queries)
    np.testing.assert_allclose(half.score(tiny_run.queries), half_expected, rtol=1e-6, atol=1e-9)
    # Back to same steps: its caches are still there, nothing is computed.
    back = tiny_run.attributor(path, trajectory=_trajectory(tiny_run))
    assert back.is_featurized()
    _assert_only_caches(back.featurize(progress=False), 0)
    assert half.is_featurized()
    # Both score from the store once reopened.
    for setting, want in (("same_steps", expected), (HALF, half_expected)):
        reopened = Attributor.open(path, tiny_run.model, ClassificationTask(), counterfactual=setting)
        np.testing.assert_allclose(reopened.score(tiny_run.queries), want, rtol=1e-6, atol=1e-9)
    # srcproj info lists both; srcproj verify checks the extra caches' finite data.
    store = AttributionStore.read(path)
    assert store_summary(store)["completion"]["settings"] == {"same_steps": [14, 14], HALF.key: [14, 14]}
    assert verify_store(path, progress=False).ok
    zarr.open_array(path / names.cache(0, HALF.key), mode="r+")[20, 3] = np.nan  # row 20: chunk 1
    damage = verify_store(path, progress=False).damage
    assert [(d.array, d.chunk) for d in damage] == [(names.cache(0, HALF.key), (1, 0))]
    assert "NaN or infinite" in damage[0].problem


def test_new_spectra_clear_every_settings_caches(tiny_run, tmp_path):
    path = tmp_path / "run.zarr"
    _featurized(tiny_run, path)
    _featurized(tiny_run, path, Counterfactual.same_epochs(0.8))
    changed = tiny_run.attributor(path, trajectory=_trajectory(tiny_run, weight_decay=0.01), counterfactual=HALF)
    report = changed.featurize(progress=False)
    assert report.spectra_computed == 2 and report.feature_chunks_computed == 0 and report.cache_chunks_computed == 14
    assert report.recomputed_stages == ["spectra", "caches"]
    fresh = _featurized(tiny_run, tmp_path / "fresh.zarr", HALF, weight_decay=0.01)
    np.testing.assert_allclose(changed.score(tiny_run.queries), fresh.score(tiny_run.queries), rtol=1e-6, atol=1e-9)
    layout = StoreLayout(AttributionStore.read(path))
    assert not layout.is_complete() and not layout.is_complete("same_epochs_0.8")
    assert set(layout.settings()) == {HALF.key}
    for setting in ("same_steps", Counterfactual.same_epochs(0.8)):
        with pytest.raises(StoreError, match="complete"):
            Attributor.open(path, tiny_run.model, ClassificationTask(), counterfactual=setting)
    # The other settings recompute their caches only, and equal a fresh store.
    again = _featurized(tiny_run, path, weight_decay=0.01)
    fresh_steps = _featurized(tiny_run, tmp_path / "fresh_steps.zarr", weight_decay=0.01)
    np.testing.assert_allclose(again.score(tiny_run.queries), fresh_steps.score(tiny_run.queries), rtol=1e-6,
                               atol=1e-9)
    # A setting whose stored inputs are those of another weight decay reports it.
    old = tiny_run.attributor(path, trajectory=_trajectory(tiny_run), counterfactual=HALF)
    assert not old.is_featurized()
    with pytest.raises(StoreError, match="made with other inputs"):
        old.score(tiny_run.queries)


# ---------------------------------------------------------------------- refusals
def test_refusals(tiny_run, tmp_path):
    path = tmp_path / "run.zarr"
    with pytest.raises(ConfigurationError, match=r"needs the fraction.*Counterfactual\.same_epochs\(fraction\)"):
        tiny_run.attributor(path, counterfactual="same_epochs")
    with pytest.raises(ConfigurationError, match="pass 'same_steps' or a srcproj.Counterfactual"):
        tiny_run.attributor(path, counterfactual="epochs")
    with pytest.raises(ConfigurationError, match="data_segment=2 does not exist"):
        tiny_run.attributor(path, trajectory=_trajectory(tiny_run), counterfactual=Counterfactual.same_epochs(0.5, 2))
    attr = _featurized(tiny_run, path, two_stage=True)
    with pytest.raises(StoreError, match=r"no complete caches for the counterfactual 'same_epochs_0.5'.*has: "
                                         r"same_steps"):
        Attributor.open(path, tiny_run.model, ClassificationTask(), counterfactual=HALF)
    with pytest.raises(ConfigurationError, match="needs the fraction"):
        Attributor.open(path, tiny_run.model, ClassificationTask(), counterfactual="same_epochs")
    unfeaturized = tiny_run.attributor(path, trajectory=_trajectory(tiny_run, two_stage=True), counterfactual=HALF)
    with pytest.raises(StoreError, match="not complete for the counterfactual 'same_epochs_0.5'"):
        unfeaturized.score(tiny_run.queries)
    unfeaturized.featurize(progress=False)
    with pytest.raises(ConfigurationError, match=r"segments \[1\] trained on another data set than segment 0's"):
        unfeaturized.score(tiny_run.queries, segments=[1])
    assert attr.score(tiny_run.queries, segments=[1]).shape == (6, 50)  # same steps scores any data set
    # A store featurized with a same-epochs setting only has no same-steps caches.
    only = tmp_path / "only.zarr"
    _featurized(tiny_run, only, HALF)
    with pytest.raises(StoreError, match="no complete same-steps caches.*same_epochs_0.5"):
        Attributor.open(only, tiny_run.model, ClassificationTask())
