"""srcproj.eval: the LDS (hand-computed and against scipy), ROC-AUC and detection (against
scikit-learn and constructed cases), and the subset-removal evaluation with a cheap
deterministic stand-in for training whose flips are known in advance.
"""

from __future__ import annotations

import functools
import math
import os
import time

import numpy as np
import pytest
from scipy.stats import spearmanr

from srcproj.errors import ConfigurationError, DataError
from srcproj.eval import (
    DetectionResult,
    LDSResult,
    RemovalResult,
    detection,
    draw_subsets,
    group_predictions,
    lds,
    removal_evaluation,
    roc_auc,
)
from srcproj.eval.counterfactual import _random_removals, select_correct
from srcproj.eval.metrics import _subset_bootstrap

# ----------------------------------------------------------------------------- LDS

# Hand-computed example: 2 queries, 4 training examples, 4 subsets.
HAND_SCORES = np.array([[1.0, 2.0, 3.0, 4.0],
                        [4.0, -1.0, 0.0, 2.0]])
HAND_MASKS = np.array([[1, 1, 0, 0],
                       [0, 1, 1, 0],
                       [1, 0, 0, 1],
                       [0, 0, 1, 1]], dtype=bool)
# Group predictions (sum of the kept examples' scores), per subset s0..s3:
#   q0: 1+2=3, 2+3=5, 1+4=5, 3+4=7   -> ranks 1, 2.5, 2.5, 4 (the two 5s share 2 and 3)
#   q1: 4-1=3, -1+0=-1, 4+2=6, 0+2=2 -> ranks 3, 1, 4, 2
HAND_OUTPUTS = np.array([[0.1, 0.2],
                         [0.3, 0.1],
                         [0.2, 0.8],
                         [0.9, 0.5]])
# Outputs: q0: 0.1, 0.3, 0.2, 0.9 -> ranks 1, 3, 2, 4;  q1: 0.2, 0.1, 0.8, 0.5 -> ranks 2, 1, 4, 3.
# q0: Pearson of x = (1, 2.5, 2.5, 4) and y = (1, 3, 2, 4); both have mean 2.5, so
#     x - 2.5 = (-1.5, 0, 0, 1.5), y - 2.5 = (-1.5, 0.5, -0.5, 1.5),
#     Σxy = 2.25 + 2.25 = 4.5, Σx² = 4.5, Σy² = 2.25 + 0.25 + 0.25 + 2.25 = 5,
#     rho = 4.5 / sqrt(4.5 · 5) = sqrt(0.9) = 0.9486832980505138.
# q1: no ties, rank differences d = (1, 0, 0, -1), rho = 1 - 6·Σd² / (n(n²-1)) = 1 - 12/60 = 0.8.
# LDS = (0.9486832980505138 + 0.8) / 2 = 0.8743416490252569.
HAND_PER_QUERY = (0.9486832980505138, 0.8)
HAND_LDS = 0.8743416490252569


def _synthetic(num_queries: int, num_subsets: int = 60, num_train: int = 80, noise: float = 1.0,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, masks and outputs = true group effect + noise, with independent queries."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(num_queries, num_train))
    scores = true + 0.7 * rng.normal(size=true.shape)
    masks = draw_subsets(num_train, num_subsets, seed=seed)
    outputs = masks @ true.T + noise * rng.normal(size=(num_subsets, num_queries))
    return scores, masks, outputs


def test_lds_matches_the_hand_computed_example():
    result = lds(HAND_SCORES, HAND_MASKS, HAND_OUTPUTS, num_bootstrap=50)
    np.testing.assert_allclose(result.per_query, HAND_PER_QUERY, rtol=1e-12)
    assert result.mean == pytest.approx(HAND_LDS, rel=1e-12)
    assert isinstance(result, LDSResult) and result.confidence == 0.95


def test_group_predictions_are_the_subset_sums():
    expected = np.array([[3, 3], [5, -1], [5, 6], [7, 2]], dtype=float)  # from the comment above
    np.testing.assert_array_equal(group_predictions(HAND_SCORES, HAND_MASKS), expected)


def test_lds_per_query_matches_scipy_spearman_on_random_data_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(-2, 3, size=(7, 30)).astype(float)  # integer scores: tied group sums
    masks = draw_subsets(30, 25, seed=1)
    outputs = np.round(rng.normal(size=(25, 7)), 1)  # tied outputs too
    result = lds(scores, masks, outputs, num_bootstrap=20)
    predictions = masks @ scores.T
    expected = [spearmanr(predictions[:, q], outputs[:, q])[0] for q in range(7)]
    np.testing.assert_allclose(result.per_query, expected, rtol=1e-10, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected), rel=1e-10)


def test_subset_bootstrap_recomputes_every_spearman_on_the_resampled_subsets():
    # Same draws as the implementation (one block of integers(0, S, (B, S))), but each
    # resample's correlations come from scipy on the explicitly resampled rows.
    rng = np.random.default_rng(2)
    predictions = np.round(rng.normal(size=(12, 4)), 1)
    outputs = np.round(rng.normal(size=(12, 4)), 1)
    means = _subset_bootstrap(predictions, outputs, np.ones(4, bool), 40, np.random.default_rng(7))
    draws = np.random.default_rng(7).integers(0, 12, size=(40, 12))
    expected = []
    for rows in draws:
        rhos = [spearmanr(predictions[rows, q], outputs[rows, q])[0] for q in range(4)]
        expected.append(np.nanmean(rhos))
    np.testing.assert_allclose(means, expected, rtol=1e-10)


def test_lds_bootstrap_over_subsets_takes_about_a_second_at_paper_size():
    scores, masks, outputs = _synthetic(num_queries=500, num_subsets=100, num_train=200)
    start = time.perf_counter()
    result = lds(scores, masks, outputs, num_bootstrap=1000)
    assert time.perf_counter() - start < 10.0  # about 1 s alone on 2 cores
    assert result.ci_subsets[0] < result.ci_subsets[1] and result.ci_queries[0] < result.ci_queries[1]


def test_lds_gives_undefined_queries_nan_and_leaves_them_out():
    scores = np.vstack([HAND_SCORES, np.zeros(4), np.full(4, 0.1)])  # constant group sums
    outputs = np.hstack([HAND_OUTPUTS, np.ones((4, 1)), np.arange(4.0)[:, None]])
    result = lds(scores, HAND_MASKS, outputs, num_bootstrap=50)
    np.testing.assert_allclose(result.per_query[:2], HAND_PER_QUERY, rtol=1e-12)
    assert np.isnan(result.per_query[2:]).all()
    assert result.mean == pytest.approx(HAND_LDS, rel=1e-12)
    # Constant outputs (a model that ignores the data) are undefined too.
    outputs = HAND_OUTPUTS.copy()
    outputs[:, 1] = 0.5
    result = lds(HAND_SCORES, HAND_MASKS, outputs, num_bootstrap=50)
    assert np.isnan(result.per_query[1]) and result.mean == pytest.approx(HAND_PER_QUERY[0])


def test_lds_raises_when_no_query_is_defined():
    with pytest.raises(DataError, match="undefined for all 2 queries"):
        lds(np.zeros((2, 4)), HAND_MASKS, HAND_OUTPUTS)


def test_lds_bootstrap_intervals_contain_the_mean_and_narrow_with_more_queries():
    widths = {}
    for num_queries in (5, 40, 200):
        scores, masks, outputs = _synthetic(num_queries, noise=3.0)
        result = lds(scores, masks, outputs, num_bootstrap=400, seed=3)
        if num_queries <= 40:
            # With many queries the subset interval gets narrower than the O(1/S) downward
            # bias of resampled rank correlations (see lds's Notes), so containment is only
            # asserted where the interval is wider than that bias.
            for lo, hi in (result.ci_queries, result.ci_subsets):
                assert lo <= result.mean <= hi
        widths[num_queries] = (result.ci_queries[1] - result.ci_queries[0],
                               result.ci_subsets[1] - result.ci_subsets[0])
        assert str(result) == f"{result.mean:.3f} [{result.ci_subsets[0]:.3f}, {result.ci_subsets[1]:.3f}]"
    assert widths[200][0] < widths[40][0] < widths[5][0]
    assert widths[200][1] < widths[40][1] < widths[5][1]
    assert widths[200][0] < 0.3 * widths[5][0] and widths[200][1] < 0.3 * widths[5][1]


def test_lds_bootstrap_is_seeded_and_confidence_widens_it():
    scores, masks, outputs = _synthetic(30)
    a = lds(scores, masks, outputs, num_bootstrap=200, seed=5)
    b = lds(scores, masks, outputs, num_bootstrap=200, seed=5)
    assert a.ci_queries == b.ci_queries and a.ci_subsets == b.ci_subsets
    wide = lds(scores, masks, outputs, num_bootstrap=200, seed=5, confidence=0.99)
    assert wide.ci_subsets[0] <= a.ci_subsets[0] and wide.ci_subsets[1] >= a.ci_subsets[1]


def test_lds_averages_outputs_over_seeds_first():
    # Each seed alone ranks the subsets differently; their mean is HAND_OUTPUTS.
    shift = np.array([[0.5, -0.4], [-0.6, 0.3], [0.2, 0.5], [-0.3, -0.9]])
    per_seed = np.stack([HAND_OUTPUTS + shift, HAND_OUTPUTS - shift], axis=1)  # (S, R=2, Q)
    result = lds(HAND_SCORES, HAND_MASKS, per_seed, num_bootstrap=50)
    assert result.mean == pytest.approx(HAND_LDS, rel=1e-12)
    assert lds(HAND_SCORES, HAND_MASKS, per_seed[:, 0], num_bootstrap=50).mean != pytest.approx(HAND_LDS)


def test_lds_error_mismatched_training_columns():
    with pytest.raises(DataError, match="scores has 5 training columns but subset_masks has 4"):
        lds(np.ones((2, 5)), HAND_MASKS, HAND_OUTPUTS)


def test_lds_error_masks_not_boolean():
    with pytest.raises(DataError, match=r"subset_masks must be boolean.*astype\(bool\)"):
        lds(HAND_SCORES, HAND_MASKS.astype(int), HAND_OUTPUTS)


def test_lds_error_nan_scores():
    scores = HAND_SCORES.copy()
    scores[1, 2] = np.nan
    with pytest.raises(DataError, match=r"scores holds 1 NaN or infinite values \(the first at index \(1, 2\)\)"):
        lds(scores, HAND_MASKS, HAND_OUTPUTS)


def test_lds_error_nan_outputs():
    outputs = HAND_OUTPUTS.copy()
    outputs[0, 0] = np.inf
    with pytest.raises(DataError, match="subset_outputs holds 1 NaN or infinite"):
        lds(HAND_SCORES, HAND_MASKS, outputs)


def test_lds_error_fewer_than_three_subsets():
    with pytest.raises(DataError, match="has 2 subsets; .* at least 3"):
        lds(HAND_SCORES, HAND_MASKS[:2], HAND_OUTPUTS[:2])


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_lds_error_confidence_outside_zero_one(confidence):
    with pytest.raises(ConfigurationError, match="strictly between 0 and 1"):
        lds(HAND_SCORES, HAND_MASKS, HAND_OUTPUTS, confidence=confidence)


def test_lds_error_outputs_subset_count():
    with pytest.raises(DataError, match="subset_outputs has 3 subsets but subset_masks has 4"):
        lds(HAND_SCORES, HAND_MASKS, HAND_OUTPUTS[:3])


def test_lds_error_outputs_query_count():
    with pytest.raises(DataError, match="scores has 2 queries but subset_outputs has 3"):
        lds(HAND_SCORES, HAND_MASKS, np.ones((4, 3)))


def test_lds_error_outputs_dimensions():
    with pytest.raises(DataError, match=r"shape \(subsets, queries\) or \(subsets, seeds, queries\)"):
        lds(HAND_SCORES, HAND_MASKS, np.ones(4))


def test_lds_error_scores_dimensions():
    with pytest.raises(DataError, match=r"scores\[None, :\]"):
        lds(HAND_SCORES[0], HAND_MASKS, HAND_OUTPUTS)


def test_lds_error_num_bootstrap():
    with pytest.raises(ConfigurationError, match="num_bootstrap=0; it must be a positive integer"):
        lds(HAND_SCORES, HAND_MASKS, HAND_OUTPUTS, num_bootstrap=0)


def test_group_predictions_error_mismatched_columns():
    with pytest.raises(DataError, match="scores has 3 training columns but masks has 4"):
        group_predictions(np.ones((2, 3)), HAND_MASKS)


def test_errors_are_value_errors():
    assert issubclass(DataError, ValueError) and issubclass(ConfigurationError, ValueError)


# ----------------------------------------------------------------------------- detection


def test_roc_auc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    for scores in (rng.integers(0, 5, size=300).astype(float), rng.normal(size=300)):
        positives = rng.random(300) < 0.2
        assert roc_auc(scores, positives) == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)


def test_roc_auc_counts_ties_as_half():
    # One positive tied with one of two negatives, above the other: (1 + 0.5) / 2.
    assert roc_auc(np.array([1.0, 1.0, 0.0]), np.array([True, False, False])) == 0.75


def test_detection_on_a_constructed_ranking():
    # 20 examples ranked 19, 18, ..., 0; positives at ranks 1, 2, 5, 9 (1-based).
    scores = np.arange(20.0)[::-1]
    positives = np.zeros(20, bool)
    positives[[0, 1, 4, 8]] = True
    result = detection(scores, positives, fractions=(0.05, 0.1, 0.25, 0.5))
    assert isinstance(result, DetectionResult)
    # top 1: 1 of 4; top 2: 2 of 4; top 5: 3 of 4; top 10: 4 of 4.
    assert result.found == {0.05: 0.25, 0.1: 0.5, 0.25: 0.75, 0.5: 1.0}
    # AUC: the positives beat 16, 16, 14 and 11 of the 16 negatives.
    assert result.auc == pytest.approx((16 + 16 + 14 + 11) / 64)
    assert "AUC 0.891" in str(result)


def test_detection_splits_a_tie_at_the_cut():
    # Top 2 of 4: one example above, then a tie of three (one positive) for one place.
    scores = np.array([5.0, 1.0, 1.0, 1.0])
    positives = np.array([False, True, False, False])
    assert detection(scores, positives, fractions=(0.5,)).found == {0.5: pytest.approx(1 / 3)}


def test_roc_auc_error_no_positives():
    with pytest.raises(DataError, match="positives has no positives"):
        roc_auc(np.arange(4.0), np.zeros(4, bool))


def test_roc_auc_error_no_negatives():
    with pytest.raises(DataError, match="positives has no negatives"):
        roc_auc(np.arange(4.0), np.ones(4, bool))


def test_roc_auc_error_positives_not_boolean():
    with pytest.raises(DataError, match="positives must be a boolean mask"):
        roc_auc(np.arange(4.0), np.array([0, 1, 0, 1]))


def test_roc_auc_error_shape_mismatch():
    with pytest.raises(DataError, match=r"scores has shape \(4,\) but positives has shape \(3,\)"):
        roc_auc(np.arange(4.0), np.array([True, False, False]))


def test_detection_error_fraction_outside_range():
    with pytest.raises(ConfigurationError, match=r"fractions holds 1.5; every fraction must be in \(0, 1\]"):
        detection(np.arange(4.0), np.array([True, False, False, True]), fractions=(0.5, 1.5))


# ----------------------------------------------------------------------------- removal

# 60 training examples in 3 classes (label = index % 3); 5 queries. Query q's margin is
# (t_q - 0.5 - removed_q) / t_q + 0.3 (seed - 1), where removed_q counts the removed
# examples of q's planted support set: with seeds (0, 1, 2) the mean margin is negative
# exactly when removed_q >= t_q, while seed 0 alone goes negative earlier.
TRAIN_LABELS = np.arange(60) % 3
CLASS = [np.flatnonzero(TRAIN_LABELS == c) for c in range(3)]
QUERY_LABELS = np.array([0, 0, 1, 2, 1])
SUPPORTS = (tuple(CLASS[2][:4]),  # q0: 4 class-2 examples, ranked top by the scores
            tuple(CLASS[1][:6]),  # q1: 6 class-1 examples, ranked 3rd to 8th
            tuple(CLASS[1]),      # q2: its whole class, scores rank class 0 on top
            tuple(CLASS[2]),      # q3: its whole class, scores rank it on top
            ())                   # q4: never flips
THRESHOLDS = (4, 6, 12, 5, 1)
SIZES = (4, 8, 12)
# Method:  q0 flips at 4 (4 of 4 removed); q1 at 8 (2 at size 4, 6 at 8); q2 never
#          (class 0 removed); q3 at 8 (4 < 5 at size 4, seed 0 alone is negative there;
#          8 at size 8); q4 never.
# Random (k examples of the query's own class): q0, q1 never (their supports are of
#          another class); q2 at 12 (k of its class removed); q3 at 8; q4 never.
METHOD_FIRST = [4, 8, 0, 8, 0]
RANDOM_FIRST = [0, 0, 12, 8, 0]


def _removal_scores() -> np.ndarray:
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, size=(5, 60))
    scores[0, list(SUPPORTS[0])] = 10.0
    scores[1, [0, 3]] = 11.0  # two decoys of class 0 above q1's support
    scores[1, list(SUPPORTS[1])] = 10.0 - 0.1 * np.arange(6)
    scores[2, CLASS[0]] = 10.0 + np.arange(20)
    scores[3, CLASS[2]] = 10.0 + np.arange(20)
    return scores


def fake_train(keep_mask: np.ndarray, seed: int, log_path: str | None = None) -> np.ndarray:
    """Margins of the 5 queries; appends ``seed: removed indices`` to ``log_path``."""
    removed = np.flatnonzero(~keep_mask)
    if log_path is not None:
        with open(log_path, "a") as handle:
            handle.write(f"{seed}:{','.join(map(str, removed))}\n")
    margins = [(t - 0.5 - np.isin(removed, support).sum()) / t for support, t in zip(SUPPORTS, THRESHOLDS, strict=False)]
    return np.asarray(margins) + 0.3 * (seed - 1)


def _read_log(path: str) -> list[tuple[int, frozenset]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as handle:
        for line in handle:
            seed, removed = line.strip().split(":")
            out.append((int(seed), frozenset(int(i) for i in removed.split(",") if i)))
    return out


def _evaluate(tmp_path, **kwargs) -> tuple[RemovalResult, list[tuple[int, frozenset]]]:
    log = str(tmp_path / f"log{len(list(tmp_path.glob('log*')))}.txt")
    train_fn = functools.partial(fake_train, log_path=log)
    result = removal_evaluation(_removal_scores(), TRAIN_LABELS, QUERY_LABELS, train_fn, sizes=SIZES,
                                seeds=(0, 1, 2), progress=False, **kwargs)
    return result, _read_log(log)


def test_removal_evaluation_flips_the_planted_queries_at_the_known_sizes(tmp_path):
    result, calls = _evaluate(tmp_path)
    assert result.sizes == SIZES
    np.testing.assert_array_equal(result.per_query_size, METHOD_FIRST)
    np.testing.assert_array_equal(result.random_per_query_size, RANDOM_FIRST)
    np.testing.assert_allclose(result.flipped, [0.2, 0.6, 0.6])
    np.testing.assert_allclose(result.random_flipped, [0.0, 0.2, 0.4])
    table = str(result)
    assert "fraction of 5 queries flipped" in table and "12 |  0.600 |  0.400" in table

    # "At most": a flipped query is not retrained at larger sizes. Masks per size, method +
    # random: 5 + 5, then 4 + 5 (q0 done by the method), then 2 + 4; each for 3 seeds.
    assert len(calls) == 3 * (10 + 9 + 6)
    removed_sets = {removed for _, removed in calls}
    top = np.argsort(-_removal_scores(), axis=1, kind="stable")
    assert frozenset(top[0, :4]) in removed_sets
    assert frozenset(top[0, :8]) not in removed_sets and frozenset(top[0, :12]) not in removed_sets
    assert frozenset(top[3, :12]) not in removed_sets
    assert sorted(seed for seed, _ in calls) == sorted([0, 1, 2] * 25)

    # The random baseline removes only examples of a query's own class.
    method_sets = {frozenset(top[q, :k]) for q in range(5) for k in SIZES}
    random_sets = removed_sets - method_sets
    assert len(random_sets) == 5 + 5 + 4
    for removed in random_sets:
        labels = set(TRAIN_LABELS[list(removed)])
        assert len(labels) == 1 and labels <= set(QUERY_LABELS) and len(removed) in SIZES


def test_random_removals_are_same_class_seeded_and_nested():
    first = _random_removals(TRAIN_LABELS, QUERY_LABELS, 12, random_seed=0)
    for q, row in enumerate(first):
        assert len(set(row)) == 12 and (TRAIN_LABELS[row] == QUERY_LABELS[q]).all()
    np.testing.assert_array_equal(first, _random_removals(TRAIN_LABELS, QUERY_LABELS, 12, random_seed=0))
    assert set(first[0]) != set(first[1])  # same class, different queries: different draws
    assert set(_random_removals(TRAIN_LABELS, QUERY_LABELS, 12, random_seed=1)[0]) != set(first[0])


def test_removal_evaluation_resumes_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first, calls = _evaluate(tmp_path, cache_dir=cache)
    assert len(calls) == 75
    again, calls = _evaluate(tmp_path, cache_dir=cache)
    assert calls == []  # every model came from the cache
    np.testing.assert_array_equal(again.per_query_size, first.per_query_size)
    np.testing.assert_array_equal(again.random_per_query_size, first.random_per_query_size)


@pytest.mark.slow
def test_removal_evaluation_with_two_processes_matches_one(tmp_path):
    # One size, so one pool of spawned workers (each imports torch: a few seconds).
    log = str(tmp_path / "log.txt")
    result = removal_evaluation(_removal_scores(), TRAIN_LABELS, QUERY_LABELS,
                                functools.partial(fake_train, log_path=log), sizes=(8,), processes=2,
                                progress=False)
    np.testing.assert_array_equal(result.per_query_size, [8, 8, 0, 8, 0])
    np.testing.assert_array_equal(result.random_per_query_size, [0, 0, 0, 8, 0])
    assert len(_read_log(log)) == 3 * (5 + 5)


def test_select_correct_requires_a_positive_margin_on_every_seed():
    margins = np.array([[0.5, -0.1, 0.2, 0.0],
                        [0.4, 0.3, 0.1, 0.2]])
    np.testing.assert_array_equal(select_correct(margins), [True, False, True, False])
    np.testing.assert_array_equal(select_correct(margins[1]), [True, True, True, True])


def _removal(**overrides):
    kwargs = {"scores": _removal_scores(), "train_labels": TRAIN_LABELS, "query_labels": QUERY_LABELS,
              "train_fn": fake_train, "sizes": SIZES, "progress": False}
    kwargs.update(overrides)
    return removal_evaluation(**kwargs)


@pytest.mark.parametrize(("sizes", "message"), [
    ((8, 4), "strictly increasing"),
    ((4, 4), "strictly increasing"),
    ((0, 4), "sizes holds 0; every removal size must be a positive integer"),
    ((4, 60), "every size must be below the number of training examples"),
    ((), "sizes is empty"),
])
def test_removal_error_bad_sizes(sizes, message):
    with pytest.raises(ConfigurationError, match=message):
        _removal(sizes=sizes)


def test_removal_error_train_labels_shape():
    with pytest.raises(DataError, match=r"train_labels has shape \(59,\) but scores has 60 training examples"):
        _removal(train_labels=TRAIN_LABELS[:59])


def test_removal_error_query_labels_shape():
    with pytest.raises(DataError, match=r"query_labels has shape \(4,\) but scores has 5 queries"):
        _removal(query_labels=QUERY_LABELS[:4])


def test_removal_error_class_too_small_for_the_random_baseline():
    with pytest.raises(DataError, match="query 0 has label 0, of which the training data holds 20"):
        _removal(sizes=(4, 30))


def test_removal_error_empty_seeds():
    with pytest.raises(ConfigurationError, match="seeds is empty"):
        _removal(seeds=())


def test_removal_error_train_fn_returns_other_queries(tmp_path):
    def three_margins(keep_mask, seed):
        return np.ones(3)

    with pytest.raises(DataError, match="train_fn returned 3 measurements per model but scores has 5 queries"):
        _removal(train_fn=three_margins)


def test_removal_error_nan_scores():
    scores = _removal_scores()
    scores[2, 7] = math.nan
    with pytest.raises(DataError, match="scores holds 1 NaN"):
        _removal(scores=scores)
