"""Counterfactual evaluation of attribution scores.

- :mod:`.metrics`: the linear datamodeling score with bootstrap intervals, ROC-AUC and
  the fraction of planted (e.g. mislabeled) examples found at the top of a ranking;
- :mod:`.retraining`: random subsets and a resumable, multi-process retraining runner
  whose outputs are cached on disk;
- :mod:`.counterfactual`: remove each query's top-k helpful examples, retrain, and count
  the queries whose prediction flips, against a random same-class removal;
- :mod:`.curation`: retrain on a curated training set and on the same fractions dropped
  at random or by another ranking, over seeds, with paired intervals.
"""

from .counterfactual import RemovalResult, removal_evaluation, select_correct
from .curation import CurationComparison, Interval, compare_curation, drop_order, random_drop_masks
from .metrics import DetectionResult, LDSResult, detection, group_predictions, lds, roc_auc
from .retraining import draw_subsets, retrain

__all__ = [
    "lds",
    "LDSResult",
    "group_predictions",
    "roc_auc",
    "detection",
    "DetectionResult",
    "draw_subsets",
    "retrain",
    "removal_evaluation",
    "RemovalResult",
    "select_correct",
    "compare_curation",
    "CurationComparison",
    "Interval",
    "drop_order",
    "random_drop_masks",
]
