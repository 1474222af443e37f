"""Mislabeled-data detection: rank a training run's examples by how suspicious their labels are.

:func:`detect_mislabeled` scores every training example of a featurized
:class:`~srcproj.Attributor` (higher = more suspicious) with one detector, by default
:data:`DEFAULT_DETECTOR` (``"mean_loss"``), and returns every individual detector's
scores next to it in a :class:`MislabelScores`, with the run's training accuracy.

Individual detectors (all on the labels as given, which is what a mislabeled example
disagrees with):

- ``"loss"``: the training loss of each example at the final checkpoint;
- ``"mean_loss"``: its loss averaged over the checkpoints that trained on the data (a
  mislabeled example is learned late, if at all, so its loss stays high for longer);
- ``"self_influence"``: SOURCE's ``score(m, m)`` (:meth:`Attributor.self_influence`):
  how much including the example raises its own margin, i.e. how much it had to be
  memorised;
- ``"tracin"``: TracIn-CP's self-influence (:class:`~srcproj.baselines.TracIn`);
- ``"influence_function"``: the damped influence function's self-influence at the final
  checkpoint (:class:`~srcproj.baselines.InfluenceFunction`).

Combinations:

- ``"fusion"``: :func:`rank_fusion` (the mean of normalised ranks) of the
  :data:`FUSION_MEMBERS`, the best fusion on the benchmark's tune seeds.

The default, ``"mean_loss"``, was the best or within 0.007 of the best individual
detector in every regime of ``benchmarks/mislabeled.py`` on its tune seeds (unconverged,
partly fitted and memorised runs, 10% and 30% of labels flipped), where rank fusions and
rules switching detectors by the training accuracy did worse; docs/mislabeled.md has
the tables and says which detector to use when.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

from .attributor import Attributor
from .errors import ConfigurationError, DataError
from .tasks import ClassificationTask
from .validation import check_choice, check_int, check_positive_int

__all__ = [
    "DEFAULT_DETECTOR",
    "DETECTORS",
    "FUSION_MEMBERS",
    "INDIVIDUAL_DETECTORS",
    "MislabelScores",
    "detect_mislabeled",
    "rank_fusion",
]

#: The detectors that score examples by themselves.
INDIVIDUAL_DETECTORS = ("loss", "mean_loss", "self_influence", "tracin", "influence_function")
#: The individual detectors whose ranks ``"fusion"`` averages.
FUSION_MEMBERS = ("mean_loss", "tracin")
#: Every name :func:`detect_mislabeled` accepts.
DETECTORS = (*INDIVIDUAL_DETECTORS, "fusion")
#: :func:`detect_mislabeled`'s default: chosen on the tune seeds of benchmarks/mislabeled.py.
DEFAULT_DETECTOR = "mean_loss"


def rank_fusion(scores: Sequence[np.ndarray]) -> np.ndarray:
    """The mean over detectors of each example's normalised rank, ``(N,)`` in (0, 1].

    Each detector's scores are ranked in ascending order (ties get their average rank)
    and divided by N, so the most suspicious example of a detector gets 1; the fused
    score is the mean of these over the detectors. Ranks make detectors of different
    scales (a loss, an influence) comparable without any weight.

    Parameters
    ----------
    scores : sequence of ndarray, each shape (N,)
        Per detector, one finite score per example, higher = more suspicious.

    Returns
    -------
    ndarray, shape (N,)
        Higher = more suspicious.

    Raises
    ------
    DataError
        No detectors, scores that are not 1-D, of different lengths, empty, or not finite.
    """
    from scipy.stats import rankdata

    arrays = [np.asarray(s, dtype=np.float64) for s in scores]
    if not arrays:
        raise DataError("rank_fusion got no scores; give the scores of at least one detector")
    for i, a in enumerate(arrays):
        if a.ndim != 1 or a.size == 0:
            raise DataError(f"scores[{i}] has shape {a.shape}; give one score per example (a non-empty 1-D array)")
        if a.shape != arrays[0].shape:
            raise DataError(f"scores[{i}] has {a.size} examples but scores[0] has {arrays[0].size}; fuse the scores "
                            "of one data set")
        if not np.isfinite(a).all():
            raise DataError(f"scores[{i}] holds NaN or infinite values; fuse finite scores only")
    n = arrays[0].size
    return np.mean([rankdata(a) / n for a in arrays], axis=0)


@dataclass(frozen=True)
class MislabelScores:
    """Suspicion scores of a run's training examples (higher = more likely mislabeled).

    Attributes
    ----------
    scores : ndarray, shape (N,)
        The chosen detector's scores, higher = more suspicious.
    detector : str
        The detector that produced ``scores``.
    training_accuracy : float or None
        Accuracy of the final checkpoint on the given training labels (classification
        tasks; ``None`` otherwise): near 1, the run has memorised its labels, mislabeled
        ones included, and the final ``"loss"`` no longer finds them.
    checkpoints : tuple of int
        The checkpoints whose losses ``"mean_loss"`` averages (those that trained on
        the data). A single one makes ``"mean_loss"`` equal to ``"loss"``.
    components : mapping of str to ndarray
        Every computed individual detector's (and the fusion's) scores, by name.
    """

    scores: np.ndarray
    detector: str
    training_accuracy: float | None
    checkpoints: tuple[int, ...]
    components: Mapping[str, np.ndarray] = field(repr=False)

    def flag(self, count: int | None = None, fraction: float | None = None) -> np.ndarray:
        """Indices of the most suspicious examples, most suspicious first.

        Parameters
        ----------
        count : int, optional
            How many examples, 1..N.
        fraction : float, optional
            Or which share of them, in (0, 1]: ``round(fraction·N)``, at least one.
            Give exactly one of ``count`` and ``fraction``.

        Returns
        -------
        ndarray of int
            Indices into the scored data set; ties are broken by the lower index, so the
            result is deterministic.

        Raises
        ------
        ConfigurationError
            Neither or both given, or a value out of range.
        """
        n = self.scores.size
        if (count is None) == (fraction is None):
            raise ConfigurationError("give exactly one of count=... (a number of examples) and fraction=... "
                                     "(a share of the training set)")
        if count is not None:
            count = check_int(count, "count", minimum=1, maximum=n)
        else:
            number = isinstance(fraction, (int, float, np.integer, np.floating)) and not isinstance(fraction, bool)
            if not number or not 0.0 < float(fraction) <= 1.0:
                raise ConfigurationError(f"fraction={fraction!r}; it must be in (0, 1]")
            count = max(1, int(math.floor(float(fraction) * n + 0.5)))  # halves up, as curate and the report
        return np.argsort(-self.scores, kind="stable")[:count]

    def mask(self, count: int | None = None, fraction: float | None = None) -> np.ndarray:
        """A boolean ``(N,)`` mask of :meth:`flag`'s examples (same parameters)."""
        out = np.zeros(self.scores.size, dtype=bool)
        out[self.flag(count, fraction)] = True
        return out


# --------------------------------------------------------------------------- individual detectors
def _group_segments(attributor: Attributor, data_segment: int) -> list[int]:
    ctx = attributor.context
    group = ctx.data_groups[data_segment]
    return [s for s in range(ctx.num_segments) if ctx.data_groups[s] == group]


def _loss(attributor: Attributor, checkpoint: int, data_segment: int, batch: int) -> tuple[np.ndarray, float | None]:
    """Every example's training loss at one checkpoint (float64, batch by batch, so memory
    stays one batch's outputs), and the accuracy on the given labels (classification)."""
    ctx = attributor.context
    source = ctx.source(data_segment)
    trainable, fixed = ctx.split(checkpoint)
    classifying = isinstance(attributor.task, ClassificationTask)
    losses, correct = [], 0
    with torch.no_grad(), ctx.computer.evaluating():
        for lo in range(0, len(source), batch):
            x, y = source.rows(lo, min(lo + batch, len(source)))
            x, y = ctx.computer.prepare(trainable, x, y)
            outputs = ctx.computer.forward(trainable, fixed, x).double()
            losses.append(attributor.task.loss(outputs, y).reshape(len(outputs), -1).sum(1).cpu())
            classifying = classifying and outputs.ndim == 2
            if classifying:
                correct += int((outputs.argmax(1) == y.long()).sum())
    loss = torch.cat(losses).numpy().astype(np.float64)
    return loss, (correct / len(loss) if classifying else None)


def _checked(name: str, values: np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size != n:
        raise DataError(f"the {name} detector gave {values.size} scores for {n} examples")
    if not np.isfinite(values).all():
        raise DataError(f"the {name} detector gave NaN or infinite scores (a diverged checkpoint?); "
                        "check the run's final loss, or choose another detector")
    return values


def detect_mislabeled(attributor: Attributor, detector: str = DEFAULT_DETECTOR, *,
                      components: str | Sequence[str] = "all", data_segment: int = 0,
                      damping: float | None = None, batch_size: int = 64) -> MislabelScores:
    """Rank a run's training examples by how likely their labels are wrong.

    Parameters
    ----------
    attributor : Attributor
        A featurized attributor of the training run, built with the trajectory:
        ``"mean_loss"`` and TracIn read every checkpoint (a store reopened with
        :meth:`Attributor.open` keeps only the last stage's).
    detector : str
        ``"mean_loss"`` (the default: each example's training loss averaged over the
        checkpoints that trained on its data), another of :data:`INDIVIDUAL_DETECTORS`,
        or ``"fusion"`` (:func:`rank_fusion` of :data:`FUSION_MEMBERS`).
    components : "all", "used" or sequence of str
        Which individual detectors to compute besides the one(s) used: every one
        (``"all"``, the default), only those ``detector`` needs (``"used"``: the cheapest),
        or the named ones.
    data_segment : int
        The examples scored are this segment's data (every segment that trained on the
        same data set contributes to the self-influences and to ``"mean_loss"``).
    damping : float, optional
        The influence function's δ (default: the run's weight decay; needed when it is 0).
    batch_size : int
        Examples per gradient batch.

    Returns
    -------
    MislabelScores
        ``scores`` (higher = more suspicious), the ``detector`` used, the training
        accuracy, and the computed detectors' scores in ``components``.

    Raises
    ------
    ConfigurationError
        An unknown detector or component, a bad ``data_segment`` or ``batch_size``, a
        reopened attributor (:meth:`Attributor.open`) without the checkpoints that
        ``"mean_loss"`` or TracIn read, or a run without weight decay and no
        ``damping`` when the influence function is computed.
    StoreError
        The attributor's store is not featurized.
    DataError
        A detector gave NaN or infinite scores.
    """
    if not isinstance(attributor, Attributor):
        raise ConfigurationError(f"attributor must be a featurized srcproj.Attributor, got "
                                 f"{type(attributor).__name__}; build one and call featurize() first")
    detector = check_choice(detector, "detector", DETECTORS)
    batch_size = check_positive_int(batch_size, "batch_size")
    ctx = attributor.context
    data_segment = check_int(data_segment, "data_segment", minimum=0, maximum=ctx.num_segments - 1)
    if isinstance(components, str):
        components = check_choice(components, "components", ("all", "used"))
        extra = list(INDIVIDUAL_DETECTORS) if components == "all" else []
    else:
        try:
            extra = list(components)
        except TypeError:
            raise ConfigurationError(f"components={components!r}; give 'all', 'used' or a list of detector names, "
                                     f"e.g. ['loss', 'self_influence']") from None
        for name in extra:
            if name not in INDIVIDUAL_DETECTORS:
                raise ConfigurationError(f"components holds {name!r}; choose among {', '.join(INDIVIDUAL_DETECTORS)} "
                                         "(or pass 'all' or 'used')")
    attributor.require_featurized()

    final = ctx.num_checkpoints - 1
    final_loss, accuracy = _loss(attributor, final, data_segment, batch_size)
    used = detector
    needed = list(FUSION_MEMBERS) if used == "fusion" else [used]
    wanted = list(dict.fromkeys(needed + extra))
    n = final_loss.size

    segments = _group_segments(attributor, data_segment)
    checkpoints = tuple(c for c in range(ctx.num_checkpoints) if ctx.segment_of(c) in segments)
    if "mean_loss" in wanted and attributor.trajectory is None:
        missing = [c for c in checkpoints if not attributor.layout.has_checkpoint(c)]
        if missing:
            hint = "" if "mean_loss" in needed else "; or leave it out of components (e.g. components='used')"
            raise ConfigurationError(
                f"the mean_loss detector reads every checkpoint that trained on the data, but this Attributor was "
                f"reopened from its store (Attributor.open), which keeps only the last stage's (checkpoints "
                f"{missing} are missing): build it with the trajectory, Attributor(model, task, trajectory, "
                f"store), or choose detector='loss'{hint}")
    computed: dict[str, np.ndarray] = {}
    for name in wanted:
        if name == "loss":
            values = final_loss
        elif name == "mean_loss":
            values = np.mean([final_loss if c == final else _loss(attributor, c, data_segment, batch_size)[0]
                              for c in checkpoints], axis=0)
        elif name == "self_influence":
            values = attributor.self_influence(segments, batch_size)
        else:
            from .baselines import InfluenceFunction, TracIn

            try:
                method = (TracIn(attributor, data_segment) if name == "tracin"
                          else InfluenceFunction(attributor, damping, data_segment=data_segment))
            except ConfigurationError as exc:
                if name in needed:
                    raise
                raise ConfigurationError(f"{exc}; or leave the {name} detector out of components (e.g. "
                                         "components='used')") from None
            values = method.self_influence(batch_size)
        computed[name] = _checked(name, values, n)
    if used == "fusion":
        computed["fusion"] = rank_fusion([computed[m] for m in FUSION_MEMBERS])
    frozen = {}
    for name in (*INDIVIDUAL_DETECTORS, "fusion"):
        if name not in computed:
            continue
        values = computed[name].copy()
        values.flags.writeable = False
        frozen[name] = values
    return MislabelScores(scores=frozen[used], detector=used, training_accuracy=accuracy, checkpoints=checkpoints,
                          components=MappingProxyType(frozen))
