"""Curation: influence aggregated over a validation set, and the keep masks it gives.

The streamed reductions are checked against the full score matrix reduced by numpy;
the masks against a sort written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from srcproj import ConfigurationError, Curation, curate
from srcproj.curation import keep_mask
from srcproj.scoring import Cache, Queries, reduce_over_queries

pytestmark = pytest.mark.usefixtures("single_thread")


def _sides(q: int, n: int, k: int, seed: int = 0, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((q, k)).astype(dtype), rng.standard_normal((n, k)).astype(dtype)


@pytest.mark.parametrize("reduction", ["total", "mean", "worst"])
@pytest.mark.parametrize("memory", [1 << 30, 6_000], ids=["one block", "many blocks"])
def test_reductions_equal_the_full_score_matrix_reduced(reduction, memory):
    psi, table = _sides(37, 203, 8)
    scores = -(psi.astype(np.float64) @ table.astype(np.float64).T)
    expected = {"total": scores.sum(0), "mean": scores.mean(0), "worst": scores.min(0)}[reduction]
    got = reduce_over_queries(psi, Cache.of(table, chunk_rows=16), reduction, memory)
    assert got.dtype == np.float64 and got.shape == (203,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(scores).max())


def test_the_worst_case_streams_queries_in_batches_when_the_budget_is_small():
    psi, table = _sides(500, 64, 4, seed=3)
    reads: list[tuple[int, int]] = []
    queries = Queries(lambda a, b: reads.append((a, b)) or psi[a:b], len(psi))
    got = reduce_over_queries(queries, Cache.of(table, chunk_rows=64), "worst", 64 * 4 * 4 * 3 + 40 * 64 * 12)
    assert len(reads) > 1  # several query batches, each against the whole table
    np.testing.assert_allclose(got, (-(psi.astype(np.float64) @ table.T.astype(np.float64))).min(0), rtol=1e-5)


def test_an_unknown_reduction_is_refused():
    psi, table = _sides(2, 3, 2)
    with pytest.raises(ConfigurationError, match="reduction='median'"):
        reduce_over_queries(psi, Cache.of(table), "median")


# ---------------------------------------------------------------------------- masks
def test_a_fraction_drops_the_lowest_influence_ties_in_data_set_order():
    influence = np.array([0.5, -1.0, 0.0, -1.0, 2.0, -3.0, 0.0, 1.0])
    keep, rule = keep_mask(influence, drop_fraction=0.5)  # round(0.5 * 8) = 4 dropped
    # Sorted by hand: -3 (5), -1 (1), -1 (3), 0 (2), 0 (6) ...: the first 4 go.
    assert keep.tolist() == [True, False, False, False, True, False, True, True]
    assert "4 examples" in rule
    keep, _ = keep_mask(influence, drop_fraction=0.0)
    assert keep.all()


def test_a_threshold_drops_everything_below_it():
    influence = np.array([0.5, -1.0, 0.0, -0.25, 2.0])
    keep, rule = keep_mask(influence, threshold=0.0)
    assert keep.tolist() == [True, False, True, False, True]
    assert "2 examples" in rule and "below 0" in rule


def test_a_threshold_that_drops_everything_is_refused():
    with pytest.raises(ConfigurationError, match=r"threshold=1 drops every one of the 3 examples \(the highest "
                                                 r"influence is 0.5\); give a lower threshold"):
        keep_mask(np.array([0.5, -1.0, 0.0]), threshold=1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of drop_fraction"),
    ({"drop_fraction": 0.1, "threshold": 0.0}, "exactly one of drop_fraction"),
    ({"drop_fraction": 1.0}, r"drop_fraction=1.0; it must be in \[0, 1\)"),
    ({"drop_fraction": -0.1}, "drop_fraction=-0.1"),
    ({"threshold": float("nan")}, "threshold=nan"),
])
def test_a_bad_rule_is_refused(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        keep_mask(np.zeros(4), **kwargs)


def test_the_rank_puts_the_lowest_influence_first():
    result = Curation(np.array([0.3, -0.2, 0.3, -5.0]), np.ones(4, bool), "mean", "")
    assert result.rank.tolist() == [3, 2, 4, 1]
    assert result.drop.tolist() == [False] * 4


# ---------------------------------------------------------------------------- on a featurized run
@pytest.fixture(scope="module")
def featurized(tiny_run, tmp_path_factory):
    attr = tiny_run.attributor(tmp_path_factory.mktemp("curate") / "run.zarr")
    attr.featurize(batch_size=32, progress=False)
    return attr


@pytest.mark.parametrize("aggregate", ["mean", "total", "worst"])
def test_curate_ranks_by_the_aggregated_scores_of_the_validation_set(featurized, tiny_run, aggregate):
    scores = featurized.score(tiny_run.queries).astype(np.float64)
    expected = {"mean": scores.mean(0), "total": scores.sum(0), "worst": scores.min(0)}[aggregate]
    result = curate(featurized, tiny_run.queries, aggregate=aggregate, drop_fraction=0.1)
    np.testing.assert_allclose(result.influence, expected, rtol=1e-5, atol=1e-6 * np.abs(scores).max())
    dropped = np.sort(np.argsort(expected, kind="stable")[:10])
    assert np.flatnonzero(result.drop).tolist() == dropped.tolist()
    assert result.aggregate == aggregate and aggregate in result.rule


def test_curate_checks_its_arguments_before_scoring(featurized, tiny_run):
    with pytest.raises(ConfigurationError, match="aggregate='median'"):
        curate(featurized, tiny_run.queries, aggregate="median", threshold=0.0)
    with pytest.raises(ConfigurationError, match="exactly one"):
        curate(featurized, tiny_run.queries)


def test_a_positive_threshold_is_accepted_before_scoring(featurized, tiny_run):
    scores = featurized.score(tiny_run.queries).astype(np.float64).mean(0)
    limit = float(np.quantile(scores, 0.25))  # positive or not, the rule is checked, not applied to zeros
    result = curate(featurized, tiny_run.queries, threshold=limit)
    assert result.keep.tolist() == (result.influence >= limit).tolist()
    result = curate(featurized, tiny_run.queries, threshold=float(scores.min()) + 1e-12 if scores.min() > 0 else 1e-9)
    assert result.drop.sum() >= 1
