"""A report a person looks at: one self-contained HTML file of a run's attributions.

The report shows, for the first queries of a query set, each query beside its most
helpful and most harmful training examples (with their scores and labels); the
distribution of the training examples' self-influence with the flagged examples
marked and shown; and, when a validation set is given, the curation summary (what is
kept and dropped, under which rule, and the examples with the lowest influence).

Computing and rendering are separate:

- :func:`compute_report` scores (top-k, self-influence, curation) and returns the
  numbers as a :class:`ReportResults`;
- :func:`example_views` turns the examples the report shows into plain
  :class:`ExampleView` records: an image (2-D or 3-D inputs, or flat inputs whose
  length is a perfect square, like 8×8 digits; ``image_shape`` overrides it), a text
  (an id field such as ``"text"``), or only the index, label and ids;
- :func:`render_report` turns both into the HTML string, a pure function;
  :func:`write_report` writes it.

Figures and thumbnails are PNGs embedded as base64 data URIs, drawn with matplotlib
(the ``plots`` extra); the file needs nothing else to be viewed. ``srcproj report``
(docs/report.md) is the command-line way to the same file.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .curation import Curation, check_rule, curate
from .data import ExampleSource
from .errors import ConfigurationError, DataError
from .scoring import DEFAULT_MEMORY_BYTES, REDUCTIONS, TopK
from .tables import example_columns, readable_by_others
from .validation import check_choice, check_positive_int, check_probability

__all__ = [
    "DEFAULT_DROP_FRACTION",
    "TEXT_KEYS",
    "ExampleView",
    "ReportResults",
    "check_report_target",
    "compute_report",
    "example_views",
    "flag_examples",
    "render_report",
    "require_matplotlib",
    "write_report",
]

#: Id columns read as an example's text when no ``text_key`` is given (the first present).
TEXT_KEYS = ("text", "sentence", "passage", "content", "document", "prompt", "question")
#: The curation rule when a validation set is given without one.
DEFAULT_DROP_FRACTION = 0.05
#: File suffixes a report may have.
REPORT_SUFFIXES = (".html", ".htm")
# The side of a thumbnail in pixels (small images are enlarged by whole pixels).
_THUMBNAIL = 72


# ---------------------------------------------------------------------------- optional dependency
def require_matplotlib() -> Any:
    """The ``matplotlib`` module, or a :class:`ConfigurationError` naming the extra to install."""
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401
        import matplotlib.image  # noqa: F401
    except ImportError:
        raise ConfigurationError("the HTML report draws its figures with matplotlib, which is not installed: "
                                 "pip install 'srcproj[plots]' (or matplotlib)") from None
    return matplotlib


# ---------------------------------------------------------------------------- what is shown
@dataclass(frozen=True)
class ExampleView:
    """One example as the report shows it: plain data, no model or data set.

    Attributes
    ----------
    index : int
        Its row in its data set (as in every score).
    label : str, optional
        Its label, when each target is one number.
    image : numpy.ndarray, optional
        ``(H, W)`` grayscale or ``(H, W, 3 or 4)`` colour values in any range (each
        image is scaled to its own range when drawn; ``uint8`` is read as 0..255).
    text : str, optional
        Its text (a passage, a prompt), shown escaped.
    ids : mapping of str to str
        Its other id columns (``{"id": "train-0042"}``).
    """

    index: int
    label: str | None = None
    image: np.ndarray | None = None
    text: str | None = None
    ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportResults:
    """The numbers a report shows, from :func:`compute_report`.

    Attributes
    ----------
    query_indices : numpy.ndarray
        ``(Q,)`` the rows of the query set shown (its first ``Q``).
    top : TopK
        Their most helpful and harmful training examples, one row per shown query.
    self_influence : numpy.ndarray
        ``(N,)`` every training example's score on itself.
    flagged : numpy.ndarray
        Indices of the flagged training examples, most suspicious first.
    flag_rule : str
        How they were flagged, in words.
    curation : Curation, optional
        The curation on the validation set, when one was given.
    most_harmful : numpy.ndarray
        Indices of the training examples with the lowest influence on the validation
        set, lowest first (empty without a curation).
    """

    query_indices: np.ndarray
    top: TopK
    self_influence: np.ndarray
    flagged: np.ndarray
    flag_rule: str
    curation: Curation | None = None
    most_harmful: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def training_indices(self) -> np.ndarray:
        """Every training example the report shows, in increasing order."""
        parts = [self.top.helpful_indices.reshape(-1), self.top.harmful_indices.reshape(-1), self.flagged,
                 self.most_harmful]
        return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))


# ---------------------------------------------------------------------------- computing
def flag_examples(self_influence: np.ndarray, fraction: float, suspicion: Any = None) -> tuple[np.ndarray, str]:
    """The training examples a report flags as suspicious, most suspicious first, and the rule.

    With ``suspicion`` (a :class:`~srcproj.detection.MislabelScores`), the flag is the
    ``round(fraction · N)`` examples its detector ranks most likely mislabeled; without
    it, the largest self-influences (an example the model could only fit by memorizing
    it, often a mislabeled one, has a large score on itself).

    Parameters
    ----------
    self_influence : numpy.ndarray
        ``(N,)`` every training example's score on itself.
    fraction : float
        In ``[0, 1)``: the fraction flagged (0 flags none).
    suspicion : MislabelScores, optional
        The mislabel detector's scores of the same examples (:func:`srcproj.detect_mislabeled`).

    Returns
    -------
    indices : numpy.ndarray
        The flagged examples, most suspicious first (ties in data-set order).
    rule : str
        The rule in words.
    """
    values = np.asarray(self_influence, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ConfigurationError("self_influence must be a 1-D array with one value per training example")
    fraction = check_probability(fraction, "flag_fraction", allow_one=False,
                                 hint=": the fraction of the training set flagged, e.g. 0.02")
    count = int(math.floor(fraction * len(values) + 0.5))
    ranking, by = values, "the largest self-influence"
    if suspicion is not None:
        ranking = np.asarray(suspicion.scores, dtype=np.float64)
        if ranking.shape != values.shape:
            raise ConfigurationError(f"suspicion scores {ranking.shape} do not match the {len(values):,} training "
                                     "examples; detect on the same data set")
        by = f"the highest suspicion of mislabeling (detector {suspicion.detector!r}, docs/mislabeled.md)"
    order = np.argsort(-np.nan_to_num(ranking, nan=-np.inf), kind="stable")
    return order[:count], f"the {count:,} examples ({fraction:.4g} of {len(values):,}) with {by}"


class _Head:
    """The first ``count`` examples of an indexable data set."""

    def __init__(self, data: Any, count: int) -> None:
        self.data, self.count = data, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return self.data[index % self.count]


def _first(data: Any, count: int) -> Any:
    """The first ``count`` examples of a data set, as a data set of the same kind."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in data):
        return data[0][:count], data[1][:count]
    if not hasattr(data, "__len__") or count >= len(data):
        return data  # whole (what the scoring refuses, it refuses with its own error)
    if isinstance(data, (list, tuple)):
        return data[:count]
    return _Head(data, count)


def compute_report(method: Any, queries: Any, *, k: int = 5, max_queries: int = 20, flag_fraction: float = 0.02,
                   validation: Any = None, aggregate: str = "mean", drop_fraction: float | None = None,
                   threshold: float | None = None, most_harmful: int = 12, batch_size: int = 64,
                   score_memory_bytes: int = DEFAULT_MEMORY_BYTES, suspicion: Any = None,
                   progress: Callable[[str], None] | None = None) -> ReportResults:
    """Score what a report shows.

    Parameters
    ----------
    method : Attributor or AttributionMethod
        A featurized attribution.
    queries : Dataset or tuple (X, y)
        The query set; its first ``max_queries`` examples are scored and shown.
    k : int
        Helpful and harmful training examples per query.
    max_queries : int
        How many queries the report shows.
    flag_fraction : float
        The fraction of the training set flagged (:func:`flag_examples`): those
        ``suspicion`` ranks most likely mislabeled, or without it the largest
        self-influences.
    validation : Dataset or tuple (X, y), optional
        With it, the training set is curated on it (:func:`srcproj.curate`).
    aggregate, drop_fraction, threshold
        The curation's aggregate and rule, as in :func:`srcproj.curate`; without a rule,
        ``drop_fraction`` is :data:`DEFAULT_DROP_FRACTION`.
    most_harmful : int
        How many of the lowest-influence training examples the curation summary shows.
    batch_size, score_memory_bytes
        As in :meth:`Attributor.score`.
    suspicion : MislabelScores, optional
        A mislabel detector's scores of the training examples
        (:func:`srcproj.detect_mislabeled`; ``srcproj report`` passes the default's).
    progress : callable, optional
        Called with a line before each scoring pass.

    Returns
    -------
    ReportResults
    """
    k = check_positive_int(k, "k")
    max_queries = check_positive_int(max_queries, "max_queries")
    most_harmful = check_positive_int(most_harmful, "most_harmful")
    check_probability(flag_fraction, "flag_fraction", allow_one=False,
                      hint=": the fraction of the training set flagged, e.g. 0.02")
    if validation is not None:
        check_choice(aggregate, "aggregate", REDUCTIONS)
        if drop_fraction is None and threshold is None:
            drop_fraction = DEFAULT_DROP_FRACTION
        check_rule(drop_fraction, threshold)  # the rule, before any scoring
    say = progress or (lambda message: None)
    shown = _first(queries, max_queries)
    count = len(ExampleSource(shown, "the queries"))
    say(f"the {k} most helpful and harmful training examples of {count:,} queries")
    top = method.top_k(shown, k, batch_size=batch_size, score_memory_bytes=score_memory_bytes)
    say("every training example's score on itself")
    values = np.asarray(method.self_influence(batch_size=batch_size, score_memory_bytes=score_memory_bytes),
                        dtype=np.float64)
    flagged, rule = flag_examples(values, flag_fraction, suspicion)
    curation, lowest = None, np.zeros(0, dtype=np.int64)
    if validation is not None:
        say(f"the {aggregate} influence of every training example on the validation set")
        curation = curate(method, validation, aggregate=aggregate, drop_fraction=drop_fraction, threshold=threshold,
                          batch_size=batch_size, score_memory_bytes=score_memory_bytes)
        lowest = np.argsort(curation.influence, kind="stable")[:most_harmful]
    return ReportResults(np.arange(count, dtype=np.int64), top, values, flagged, rule, curation, lowest)


# ---------------------------------------------------------------------------- examples as views
def _text_column(columns: Mapping[str, np.ndarray], text_key: str | None, what: str) -> str | None:
    names = [name for name in columns if name not in ("index", "label")]
    if text_key is not None:
        if not isinstance(text_key, str) or text_key not in columns:
            raise ConfigurationError(f"text_key={text_key!r} is not an id column of {what} (it has: "
                                     f"{', '.join(names) or 'none'}); name one of those, or list the field among "
                                     "the data set's ids = [...] under [data]")
        return text_key
    for name in names:
        if name.lower() in TEXT_KEYS and np.asarray(columns[name]).dtype == object:
            return name
    return None


def _check_image_shape(image_shape: Any) -> tuple[int, ...]:
    ok = (isinstance(image_shape, (list, tuple)) and len(image_shape) in (2, 3)
          and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_shape))
    if ok and len(image_shape) == 3 and image_shape[0] not in (1, 3, 4) and image_shape[-1] not in (1, 3, 4):
        ok = False
    if not ok:
        raise ConfigurationError(f"image_shape={image_shape!r}; give [height, width] or, in colour, [channels, "
                                 "height, width] or [height, width, channels] with 1, 3 or 4 channels, e.g. [8, 8]")
    return tuple(image_shape)


def _auto_shape(x: torch.Tensor) -> tuple[int, ...] | None:
    """The image shape of an input that looks like an image, else ``None``."""
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.bool)):
        return None  # integers other than bytes are tokens or categories
    shape = tuple(x.shape)
    if x.ndim == 1:
        side = math.isqrt(shape[0])
        return (side, side) if shape[0] >= 16 and side * side == shape[0] else None
    if x.ndim == 2:
        return shape if min(shape) >= 2 else None
    if x.ndim == 3 and (shape[0] in (1, 3, 4) or shape[-1] in (1, 3, 4)):
        return shape
    return None


def _as_image(x: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    array = x.detach().cpu()
    array = (array.to(torch.uint8) if array.dtype == torch.bool else array).numpy().reshape(shape)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first, as torch has them
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _cell(value: Any) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def example_views(data: Any, indices: Sequence[int] | np.ndarray, *, task: Any = None,
                  columns: Mapping[str, np.ndarray] | None = None, image_shape: Sequence[int] | None = None,
                  text_key: str | None = None, what: str = "the data",
                  source: ExampleSource | None = None) -> dict[int, ExampleView]:
    """The examples at ``indices`` as the report shows them.

    An example is shown as an image when ``image_shape`` is given or its input looks
    like one (a floating-point or byte tensor of 2 or 3 dimensions, or a flat one whose
    length is a perfect square of at least 16); as a text when an id column holds it
    (``text_key``, or the first of :data:`TEXT_KEYS` present); otherwise by its index,
    label and ids. The choice is made once for the whole data set.

    Parameters
    ----------
    data : data set
        As the Attributor takes it.
    indices : sequence of int
        The rows to show.
    task : Task, optional
        Names the input and target keys of mapping examples.
    columns : mapping, optional
        The data set's :func:`~srcproj.tables.example_columns` (computed when not given).
    image_shape : sequence of int, optional
        ``[height, width]``, ``[channels, height, width]`` or ``[height, width, channels]``:
        each input, reshaped to it, is shown as an image.
    text_key : str, optional
        The id column holding each example's text.
    what : str
        How errors name the data set.
    source : ExampleSource, optional
        ``data`` already wrapped.

    Returns
    -------
    dict of int to ExampleView
    """
    source = ExampleSource(data, what, task) if source is None else source
    columns = example_columns(source.data, task, what=what, source=source) if columns is None else columns
    rows = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
    if len(rows) and (rows[0] < 0 or rows[-1] >= len(source)):
        raise DataError(f"{what} has {len(source):,} examples; the indices to show must be in 0..{len(source) - 1}, "
                        f"not {int(rows[0]) if rows[0] < 0 else int(rows[-1])}")
    shape = None if image_shape is None else _check_image_shape(image_shape)
    text = None if shape is not None else _text_column(columns, text_key, what)
    if shape is not None or text is None:  # a given shape is checked; without a text, an image is looked for
        first = source.take(np.array([0]))[0][0]
        if shape is None:
            shape = _auto_shape(first)
        elif first.numel() != math.prod(shape):
            raise ConfigurationError(f"image_shape={list(shape)} holds {math.prod(shape):,} values, but each input "
                                     f"of {what} has {first.numel():,} (shape {list(first.shape)}); give a shape "
                                     "with as many values")
    images: dict[int, np.ndarray] = {}
    if shape is not None and len(rows):
        inputs, _ = source.take(rows)
        images = {int(i): _as_image(x, shape) for i, x in zip(rows, inputs, strict=True)}
    id_names = [name for name in columns if name not in ("index", "label", text)]
    views = {}
    for i in rows.tolist():
        views[i] = ExampleView(
            index=i,
            label=_cell(columns["label"][i]) if "label" in columns else None,
            image=images.get(i),
            text=str(columns[text][i]) if text is not None else None,
            ids={name: _cell(columns[name][i]) for name in id_names},
        )
    return views


# ---------------------------------------------------------------------------- rendering
def _scaled(image: np.ndarray) -> np.ndarray:
    """``image`` as floats in [0, 1]: bytes over 255, anything else over its own range."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(array.min()), float(array.max())
    if array.ndim == 3 and low >= 0.0 and high <= 1.0:
        return array
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail(image: np.ndarray) -> str:
    from matplotlib import image as mpimg

    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise DataError(f"an example's image has shape {list(array.shape)}; give (H, W) or (H, W, 3 or 4)")
    array = _scaled(array)
    longest = max(array.shape[:2])
    if longest > 2 * _THUMBNAIL:  # large images: every s-th pixel
        step = math.ceil(longest / (2 * _THUMBNAIL))
        array = array[::step, ::step]
    factor = max(1, _THUMBNAIL // max(array.shape[:2]))  # small images: whole-pixel enlargement
    array = np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)
    buffer = io.BytesIO()
    if array.ndim == 2:
        mpimg.imsave(buffer, array, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    else:
        mpimg.imsave(buffer, np.clip(array, 0.0, 1.0), format="png")
    return _data_uri(buffer.getvalue())


def _histogram(values: np.ndarray, marked: np.ndarray, *, xlabel: str, marked_label: str,
               line: float | None = None, line_label: str | None = None) -> str:
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    marked = np.asarray(marked, dtype=np.float64)
    marked = marked[np.isfinite(marked)]
    log_x = len(values) > 0 and values.min() > 0 and values.max() / values.min() > 1e3
    if log_x:
        bins = np.geomspace(values.min(), values.max(), 61)
    else:
        bins = np.linspace(values.min(), values.max(), 61) if len(values) and values.max() > values.min() else 60
    figure = Figure(figsize=(7.2, 2.6), dpi=100)
    axes = figure.add_subplot()
    axes.hist(values, bins=bins, color="#9db4d3", label="all", log=True)
    if len(marked):
        axes.hist(marked, bins=bins, color="#d9480f", label=marked_label, log=True)
    if line is not None:
        axes.axvline(line, color="#333333", linestyle="--", linewidth=1, label=line_label)
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("examples")
    axes.legend(frameon=False, fontsize=8)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return _data_uri(buffer.getvalue())


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2433;
       background: #f5f6f8; line-height: 1.4; }
header, section { max-width: 1180px; margin: 0 auto; padding: 12px 24px; }
header { background: #1d2433; color: #fff; max-width: none; }
header h1 { margin: 4px 0 8px; font-size: 1.5em; }
header table { border-collapse: collapse; font-size: 0.9em; }
header th { text-align: left; font-weight: 600; padding: 1px 16px 1px 0; color: #b8c2d6; }
nav a { color: #9fc3ff; margin-right: 16px; font-size: 0.9em; }
section { background: #fff; margin-top: 16px; border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.08); }
h2 { font-size: 1.2em; margin: 6px 0 4px; }
p.note { color: #566176; font-size: 0.9em; margin: 4px 0 10px; }
.query { display: grid; grid-template-columns: 150px 1fr; gap: 12px; border-top: 1px solid #e3e6eb;
         padding: 10px 0; align-items: start; }
.strip { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin-bottom: 6px; }
.strip .what { width: 64px; font-size: 0.8em; font-weight: 600; padding-top: 4px; }
.helpful .what { color: #2b8a3e; }
.harmful .what { color: #c92a2a; }
.ex { width: 108px; font-size: 0.75em; text-align: center; border: 2px solid #e3e6eb; border-radius: 4px;
      padding: 3px; background: #fff; overflow-wrap: anywhere; }
.query > .ex { width: 132px; border-color: #1d2433; }
.helpful .ex { border-color: #b2f2bb; }
.harmful .ex { border-color: #ffc9c9; }
.ex.text { width: 250px; text-align: left; }
.query > .ex.text { width: 132px; }
.ex img { width: 72px; height: 72px; image-rendering: pixelated; display: block; margin: 0 auto 2px; }
.ex .passage { white-space: pre-wrap; max-height: 9em; overflow: auto; font-family: ui-serif, Georgia, serif;
               font-size: 1.15em; }
.score { font-weight: 600; font-variant-numeric: tabular-nums; }
.other-label { color: #c92a2a; font-weight: 600; }
.nowrap { white-space: nowrap; }
.muted { color: #7a8497; }
.gallery { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 6px 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #566176; }
table.counts td, table.counts th { padding: 2px 14px 2px 0; text-align: left; }
footer { text-align: center; color: #7a8497; font-size: 0.8em; padding: 16px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _score(value: float) -> str:
    return f"{value:+.3g}"


def _example(view: ExampleView, *, value: str | None = None, value_name: str = "score",
             query_label: str | None = None, extra: str = "", max_text_chars: int = 600) -> str:
    """One example as a ``div``: its picture or passage, its value, label and ids."""
    kind = "text" if view.image is None and view.text is not None else "image" if view.image is not None else "id"
    attributes = f' data-index="{view.index}"' + (f' data-{value_name}="{_e(value)}"' if value is not None else "")
    parts = [f'<div class="ex {kind}"{attributes}>']
    if view.image is not None:
        parts.append(f'<img src="{_thumbnail(view.image)}" alt="example {view.index}" />')
    if view.text is not None and view.image is None:
        text = view.text if len(view.text) <= max_text_chars else view.text[:max_text_chars] + " …"
        parts.append(f'<div class="passage" title="{_e(view.text[:2000])}">{_e(text)}</div>')
    if value is not None:
        parts.append(f'<div class="score">{_e(value)}</div>')
    line = [f"#{view.index}"]
    if view.label is not None:
        differs = query_label is not None and view.label != query_label
        label = f"label {_e(view.label)}"
        line.append(f'<span class="nowrap other-label">{label}</span>' if differs
                    else f'<span class="nowrap">{label}</span>')
    parts.append(f"<div>{' · '.join(line)}</div>")
    shown_ids = [f"{_e(name)} {_e(value)}" for name, value in view.ids.items()]
    if shown_ids:
        parts.append(f'<div class="muted">{" · ".join(shown_ids)}</div>')
    if extra:
        parts.append(extra)
    parts.append("</div>")
    return "".join(parts)


def _missing(views: Mapping[int, ExampleView], indices: np.ndarray, what: str) -> None:
    missing = [int(i) for i in np.asarray(indices).reshape(-1) if int(i) not in views]
    if missing:
        raise ConfigurationError(f"no view of {what} example(s) {missing[:5]}; give example_views() every index the "
                                 "report shows (ReportResults.training_indices() for the training set)")


def render_report(results: ReportResults, query_views: Mapping[int, ExampleView],
                  training_views: Mapping[int, ExampleView], *, summary: Mapping[str, Any] | None = None,
                  title: str = "srcproj report", validation_name: str | None = None,
                  footer: str | None = None) -> str:
    """The report as one self-contained HTML document (a pure function of its arguments).

    Parameters
    ----------
    results : ReportResults
        What :func:`compute_report` scored.
    query_views, training_views : mapping of int to ExampleView
        How the shown queries and training examples look (:func:`example_views`), by index.
    summary : mapping of str to str, optional
        Rows of the header table (store, k, run...), in order.
    title : str
        The page's title and heading.
    validation_name : str, optional
        How the curation summary names the validation set.
    footer : str, optional
        A line at the bottom (e.g. the version and time it was made).

    Returns
    -------
    str
        The HTML document; every text in it is escaped, every image an embedded PNG.
    """
    require_matplotlib()
    top = results.top
    if top.helpful_indices.shape[0] != len(results.query_indices):
        raise ConfigurationError(f"the top-k has {top.helpful_indices.shape[0]} rows but {len(results.query_indices)} "
                                 "queries are shown; give one row per shown query")
    _missing(query_views, results.query_indices, "query")
    _missing(training_views, results.training_indices(), "training")
    k = top.helpful_indices.shape[1]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8" />',
           '<meta name="viewport" content="width=device-width, initial-scale=1" />', f"<title>{_e(title)}</title>",
           f"<style>{_STYLE}</style>", "</head>", "<body>", "<header>", f"<h1>{_e(title)}</h1>"]
    if summary:
        out.append('<table class="summary">')
        out.extend(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in summary.items())
        out.append("</table>")
    out.append('<nav><a href="#queries">queries</a><a href="#self-influence">self-influence</a>'
               '<a href="#curation">curation</a></nav>')
    out.append("</header>")

    # queries
    out.append('<section id="queries">')
    out.append(f"<h2>Queries: their {k} most helpful and {k} most harmful training examples</h2>")
    out.append('<p class="note">A score is the predicted effect of training on the example on the query\'s '
               "measurement: positive helps, negative harms. A training label unlike the query's is in red.</p>")
    for row, q in enumerate(results.query_indices.tolist()):
        query = query_views[q]
        out.append(f'<div class="query" data-query="{q}">')
        out.append(_example(query, extra='<div class="muted">query</div>'))
        out.append("<div>")
        for direction, indices, scores in (("helpful", top.helpful_indices, top.helpful_scores),
                                           ("harmful", top.harmful_indices, top.harmful_scores)):
            out.append(f'<div class="strip {direction}"><div class="what">{direction}</div>')
            out.extend(_example(training_views[int(i)], value=_score(float(s)), query_label=query.label)
                       for i, s in zip(indices[row], scores[row], strict=True))
            out.append("</div>")
        out.append("</div></div>")
    out.append("</section>")

    # self-influence
    values = results.self_influence
    flagged = np.asarray(results.flagged, dtype=np.int64)
    out.append('<section id="self-influence">')
    out.append("<h2>Self-influence</h2>")
    out.append(f'<p class="note">Each training example\'s score on itself, for {len(values):,} examples. An example '
               "the model can only fit by memorizing it, often a mislabeled one, has a large self-influence. "
               f"Flagged: {_e(results.flag_rule)}.</p>")
    line = float(values[flagged].min()) if len(flagged) else None
    rest = np.delete(values, flagged)
    if line is not None and len(rest) and rest.max() > line:
        line = None  # flagged by a detector, not by a self-influence cut: there is no threshold to draw
    figure = _histogram(values, values[flagged], xlabel="self-influence", marked_label="flagged", line=line,
                        line_label="flag threshold" if line is not None else None)
    out.append(f'<figure><img src="{figure}" alt="histogram of the self-influence" />'
               f"<figcaption>Distribution of the self-influence (log counts); flagged examples in orange."
               "</figcaption></figure>")
    if len(flagged):
        out.append(f"<h3>The {len(flagged):,} flagged examples</h3>")
        out.append('<div class="gallery" id="flagged">')
        out.extend(_example(training_views[int(i)], value=f"{values[int(i)]:.4g}", value_name="self-influence")
                   for i in flagged)
        out.append("</div>")
    else:
        out.append('<p class="note">No example is flagged: the flag fraction of the training set rounds to 0 '
                   "examples.</p>")
    out.append("</section>")

    # curation
    out.append('<section id="curation">')
    out.append("<h2>Curation</h2>")
    curation = results.curation
    if curation is None:
        out.append('<p class="note">No validation set was given: with one (srcproj report --validation NAME), this '
                   "section ranks the training examples by their influence on it and shows what curation drops."
                   "</p>")
    else:
        influence = curation.influence
        dropped = int(curation.drop.sum())
        on = f" ({_e(validation_name)})" if validation_name else ""
        out.append(f'<p class="note">Each training example\'s {_e(curation.aggregate)} score over the validation '
                   f"set{on}: its predicted effect on the validation measurement. Dropping the lowest is predicted "
                   "to help it most.</p>")
        out.append('<table class="counts">')
        rows = [("validation set", validation_name or "given"), ("aggregate", curation.aggregate),
                ("rule", f"drop {curation.rule}"), ("kept", f"{len(influence) - dropped:,}"),
                ("dropped", f"{dropped:,}")]
        out.extend(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in rows)
        out.append("</table>")
        kept_low = influence[curation.keep].min() if curation.keep.any() else None
        figure = _histogram(influence, influence[curation.drop], xlabel=f"{curation.aggregate} influence",
                            marked_label="dropped", line=None if kept_low is None else float(kept_low),
                            line_label="lowest kept")
        out.append(f'<figure><img src="{figure}" alt="histogram of the influence on the validation set" />'
                   "<figcaption>Distribution of the influence on the validation set (log counts); dropped examples "
                   "in orange.</figcaption></figure>")
        if len(results.most_harmful):
            out.append(f"<h3>The {len(results.most_harmful):,} training examples with the lowest influence</h3>")
            out.append('<div class="gallery" id="most-harmful">')
            out.extend(_example(training_views[int(i)], value=_score(float(influence[int(i)])), value_name="influence",
                                extra=f'<div class="muted">{"dropped" if curation.drop[int(i)] else "kept"}</div>')
                       for i in results.most_harmful)
            out.append("</div>")
    out.append("</section>")
    if footer:
        out.append(f"<footer>{_e(footer)}</footer>")
    out.extend(["</body>", "</html>", ""])
    return "\n".join(out)


# ---------------------------------------------------------------------------- writing
def check_report_target(path: str | os.PathLike, overwrite: bool = False) -> str:
    """``path`` checked as where a report is written, before any work is done.

    Refuses a suffix other than ``.html`` or ``.htm``, a directory, a file already there
    (unless ``overwrite``) and a missing parent directory.
    """
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() not in REPORT_SUFFIXES:
        raise ConfigurationError(f"the report path {path!r} does not end in .html; name the file e.g. report.html")
    if os.path.isdir(path):
        raise ConfigurationError(f"the report path {path!r} is a directory; give a file name ending in .html")
    if os.path.exists(path) and not overwrite:
        raise ConfigurationError(f"{path!r} exists; give another path, or overwrite it (--overwrite, "
                                 "overwrite=True)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigurationError(f"the directory of the report path {path!r} does not exist; create {parent!r} first")
    return path


def write_report(document: str, path: str | os.PathLike, *, overwrite: bool = False) -> int:
    """Write an HTML document to ``path`` whole or not at all; return its size in bytes."""
    path = check_report_target(path, overwrite)
    data = document.encode("utf-8")
    handle, temporary = tempfile.mkstemp(prefix=".srcproj-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    readable_by_others(temporary)  # a report is meant to be shared: the user's umask decides, as for open()
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return len(data)
