"""srcproj.eval.draw_subsets and retrain: exact subset sizes, caching, resumption, batching."""

from __future__ import annotations

import numpy as np
import pytest

from srcproj import ConfigurationError, DataError
from srcproj.eval import draw_subsets, retrain

CALLS: list[tuple[int, int]] = []


def fake_train(mask: np.ndarray, seed: int) -> np.ndarray:
    """Outputs any test can recompute: (kept count · (seed + 1), first kept index)."""
    CALLS.append((int(mask.sum()), seed))
    return np.array([mask.sum() * (seed + 1), np.flatnonzero(mask)[0]], dtype=float)


def fake_batched(masks: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    return np.stack([fake_train(m, int(s)) for m, s in zip(masks, seeds, strict=False)])


class Interrupt(Exception):
    pass


def failing_after(count: int):
    def train(mask, seed):
        if len(CALLS) >= count:
            raise Interrupt
        return fake_train(mask, seed)
    return train


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()


def test_draw_subsets_sizes_and_determinism():
    masks = draw_subsets(101, num_subsets=30, fraction=0.3, seed=4)
    assert masks.shape == (30, 101) and masks.dtype == bool
    assert (masks.sum(1) == 30).all()
    np.testing.assert_array_equal(masks, draw_subsets(101, 30, 0.3, seed=4))
    assert not np.array_equal(masks, draw_subsets(101, 30, 0.3, seed=5))
    # Every example is kept by some subsets and dropped by others.
    assert 0 < masks.mean(0).min() and masks.mean(0).max() < 1


@pytest.mark.parametrize("kwargs, message", [
    ({"num_examples": 0}, "num_examples=0"),
    ({"num_examples": 10, "num_subsets": 0}, "num_subsets=0"),
    ({"num_examples": 10, "fraction": 1.0}, "strictly between 0 and 1"),
    ({"num_examples": 3, "fraction": 0.1}, "keeps 0"),
])
def test_draw_subsets_errors(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        draw_subsets(**kwargs)


def test_retrain_shapes_and_values():
    masks = draw_subsets(20, 4, 0.5, seed=0)
    out = retrain(fake_train, masks, seeds=[0, 2], progress=False)
    assert out.shape == (4, 2, 2)
    np.testing.assert_array_equal(out[:, 1, 0], np.full(4, 10 * 3))
    np.testing.assert_array_equal(out[:, 0, 1], [np.flatnonzero(m)[0] for m in masks])
    batched = retrain(fake_batched, masks, seeds=[0, 2], progress=False, models_per_call=3)
    np.testing.assert_array_equal(batched, out)


def test_retrain_cache_resumes_after_an_interruption(tmp_path):
    masks = draw_subsets(20, 5, 0.5, seed=1)
    with pytest.raises(Interrupt):
        retrain(failing_after(4), masks, seeds=[0, 1], cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 4  # the finished models, nothing half-written
    assert not list(tmp_path.glob("*.part*"))
    CALLS.clear()
    out = retrain(fake_train, masks, seeds=[0, 1], cache_dir=tmp_path, progress=False)
    assert len(CALLS) == 10 - 4
    CALLS.clear()
    again = retrain(fake_train, masks, seeds=[0, 1], cache_dir=tmp_path, progress=False)
    assert CALLS == [] and np.array_equal(again, out)
    # A damaged file is recomputed, not trusted.
    victim = sorted(tmp_path.glob("*.npy"))[0]
    victim.write_bytes(b"not a numpy file")
    repaired = retrain(fake_train, masks, seeds=[0, 1], cache_dir=tmp_path, progress=False)
    assert len(CALLS) == 1 and np.array_equal(repaired, out)


def test_retrain_in_two_processes_equals_one(tmp_path):
    masks = draw_subsets(12, 3, 0.5, seed=2)
    one = retrain(fake_train, masks, seeds=[0, 1], progress=False)
    two = retrain(fake_batched, masks, seeds=[0, 1], processes=2, progress=False, models_per_call=2,
                  cache_dir=tmp_path)
    np.testing.assert_array_equal(one, two)
    assert len(list(tmp_path.glob("*.npy"))) == 6


def test_retrain_errors():
    masks = draw_subsets(10, 3, 0.5)
    with pytest.raises(ConfigurationError, match="2-D boolean"):
        retrain(fake_train, masks.astype(int), seeds=[0], progress=False)
    with pytest.raises(ConfigurationError, match="seeds is empty"):
        retrain(fake_train, masks, seeds=[], progress=False)
    with pytest.raises(ConfigurationError, match="processes=0"):
        retrain(fake_train, masks, seeds=[0], processes=0, progress=False)
    with pytest.raises(DataError, match="the same Q for every call"):
        retrain(lambda m, s: np.zeros(s + 1), masks, seeds=[0, 1], progress=False)
    with pytest.raises(DataError, match="NaN or inf"):
        retrain(lambda m, s: np.array([np.nan]), masks, seeds=[0], progress=False)
    with pytest.raises(DataError, match=r"returned shape \(1,\) for 2 models"):
        retrain(lambda m, s: np.zeros(1), masks, seeds=[0, 1], progress=False, models_per_call=2)
