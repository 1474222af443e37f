"""The HTML report: ``srcproj report`` on the digits example, and its parts on plain data.

The digits example (examples/digits_pipeline) is trained, recorded and featurized once
(k = 64); ``srcproj report`` then writes reports that are parsed with ``html.parser``
(every element closed), whose every embedded image is decoded, and whose examples,
scores and flags are compared with what the Attributor gives in Python. Text examples,
the choice between image, text and ids, and the errors are tested on plain data.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import copy_recorded

from srcproj import ConfigurationError, DataError, TopK, curate, detect_mislabeled
from srcproj.cli import main
from srcproj.config import load_config
from srcproj.report import (
    ExampleView,
    ReportResults,
    check_report_target,
    compute_report,
    example_views,
    flag_examples,
    render_report,
    require_matplotlib,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_pipeline"
K = 64
PNG = "data:image/png;base64,"
# Elements HTML never closes.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """A parsed document: its elements, ids, image sources and text; every misnested tag in ``problems``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[tuple[str, tuple[int, int]]] = []
        self.elements: list[tuple[str, dict]] = []
        self.problems: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag not in VOID:
            self.open.append((tag, self.getpos()))

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag not in VOID:
            self.problems.append(f"<{tag} /> at {self.getpos()}: only void elements may be self-closed")

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1][0] != tag:
            self.problems.append(f"</{tag}> at {self.getpos()} closes {self.open[-1] if self.open else 'nothing'}")
        else:
            self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def with_attribute(self, name: str) -> list[dict]:
        return [attrs for _, attrs in self.elements if name in attrs]

    def ids(self) -> set[str]:
        return {attrs["id"] for attrs in self.with_attribute("id")}

    def images(self) -> list[str]:
        return [attrs["src"] for tag, attrs in self.elements if tag == "img"]


def parse(document: str) -> Page:
    """``document`` parsed; it must be well-formed: a doctype, every element closed in order."""
    assert document.startswith("<!DOCTYPE html>")
    page = Page()
    page.feed(document)
    page.close()
    assert page.problems == []
    assert page.open == [], f"unclosed elements: {page.open}"
    return page


def decode(src: str) -> np.ndarray:
    """An ``<img src>`` data URI decoded: a PNG whose header and pixels agree."""
    assert src.startswith(PNG), src[:40]
    raw = base64.b64decode(src[len(PNG):], validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    image = matplotlib.image.imread(io.BytesIO(raw), format="png")
    assert image.shape[:2] == (height, width) and width > 0 and height > 0
    return image


def run(*argv: str, capsys) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def digits(tmp_path_factory, recorded_digits) -> Path:
    """The digits example, trained, recorded and featurized (k = 64); its config's path."""
    root = copy_recorded(recorded_digits, tmp_path_factory.mktemp("report") / "digits")
    torch.set_num_threads(1)
    assert main(["featurize", "-c", str(root / "config.toml"), "--set", f"store.proj_dim={K}", "--no-progress"]) == 0
    return root / "config.toml"


@pytest.fixture(scope="module")
def api(digits: Path):
    config = load_config(digits, [f"store.proj_dim={K}"])
    return config, config.attributor(existing=True)


def report_args(config: Path, out: Path, *more: str) -> list[str]:
    return ["report", "-c", str(config), "--set", f"store.proj_dim={K}", "--out", str(out), *more]


# ---------------------------------------------------------------------------- the digits report
@pytest.mark.slow
def test_the_digits_report_shows_what_the_api_computes(digits, api, tmp_path, capsys):
    config, attributor = api
    out = tmp_path / "report.html"
    code, stdout, stderr = run(*report_args(digits, out, "--queries", "test", "--validation", "validation", "-k", "3",
                                            "--max-queries", "4"), capsys=capsys)
    assert code == 0, stderr
    assert stdout.startswith("wrote the report of 4 queries (top 3), 29 flagged training examples, the curation on "
                             "'validation' (kept 1,365 of 1,437) (")
    assert stdout.endswith(f" KiB) to {out}\n") and stdout.count("\n") == 1
    assert "srcproj report: the 3 most helpful and harmful training examples of 4 queries" in stderr and "srcproj report: drawing the report" in stderr
    page = parse(out.read_text(encoding="utf-8"))
    assert {"queries", "self-influence", "flagged", "curation", "most-harmful"} <= page.ids()

    # Every embedded image decodes: 4 queries, 4 x 6 training examples, 29 flagged, 12 lowest, 2 histograms.
    images = [decode(src) for src in page.images()]
    assert len(images) == 4 + 4 * 6 + 29 + 12 + 2
    assert not any(src.startswith(("http", "file", "/")) for src in page.images())  # self-contained

    # The queries and their examples are the API's.
    test = config.dataset("test")
    top = attributor.top_k(test[:4], k=3)
    cells = page.with_attribute("data-score")
    shown = np.array([int(c["data-index"]) for c in cells]).reshape(4, 2, 3)
    np.testing.assert_array_equal(shown[:, 0], top.helpful_indices)
    np.testing.assert_array_equal(shown[:, 1], top.harmful_indices)
    scores = np.array([float(c["data-score"]) for c in cells]).reshape(4, 2, 3)
    np.testing.assert_allclose(scores[:, 0], top.helpful_scores, rtol=5.1e-3)  # 3 digits shown
    np.testing.assert_allclose(scores[:, 1], top.harmful_scores, rtol=5.1e-3)
    assert [int(a["data-query"]) for a in page.with_attribute("data-query")] == [0, 1, 2, 3]
    # The first image is query 0's: its 8 x 8 pixels, enlarged 9 times, scaled to its own range.
    pixels = images[0][::9, ::9, 0]
    x = test[0]["x"].reshape(8, 8).numpy()
    np.testing.assert_allclose(pixels, (x - x.min()) / (x.max() - x.min()), atol=2 / 255)
    text = " ".join(page.text)
    assert f"id {test[0]['id']}" in text and f"label {test[0]['label']}" in text

    # The flagged examples are the 2% the default mislabel detector suspects most, most suspicious first.
    flagged = [int(a["data-index"]) for a in page.with_attribute("data-self-influence")]
    assert flagged == detect_mislabeled(attributor).flag(count=29).tolist()
    assert "highest suspicion of mislabeling (detector 'mean_loss'" in " ".join(page.text)
    # The curation: the 5% default rule, and the lowest influences shown lowest first.
    expected = curate(attributor, config.dataset("validation"), aggregate="mean", drop_fraction=0.05)
    lowest = [int(a["data-index"]) for a in page.with_attribute("data-influence")]
    assert lowest == np.argsort(expected.influence, kind="stable")[:12].tolist()
    assert "drop the 72 examples (0.05 of 1,437) with the lowest mean influence" in text
    assert "1,365" in text


@pytest.mark.slow
def test_config_keys_and_a_report_without_validation_or_flags(digits, tmp_path, capsys):
    out = tmp_path / "plain.html"
    code, stdout, stderr = run("report", "-c", str(digits), "--set", f"store.proj_dim={K}", "--set",
                               'report.queries="validation"', "--set", f'report.out="{out}"', "--set", "report.k=1",
                               "--set", "report.max_queries=2", "--flag-fraction", "0", "--no-progress",
                               capsys=capsys)
    assert code == 0, stderr
    assert stderr == "" and stdout.startswith("wrote the report of 2 queries (top 1), 0 flagged training examples (")
    page = parse(out.read_text(encoding="utf-8"))
    assert "flagged" not in page.ids() and "most-harmful" not in page.ids()
    assert len(page.images()) == 2 + 2 * 2 + 1  # queries, their examples, one histogram
    for src in page.images():
        decode(src)
    text = " ".join(page.text)
    assert "No validation set was given" in text and "No example is flagged" in text
    # --overwrite replaces it; without it the file is refused (below).
    code, _, stderr = run(*report_args(digits, out, "--queries", "test", "-k", "1", "--max-queries", "1",
                                       "--overwrite", "--no-progress"), capsys=capsys)
    assert code == 0, stderr


@pytest.mark.slow
def test_compute_report_takes_any_indexable_query_set(api):
    config, attributor = api
    test = config.dataset("test")

    class Queries(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(test)

        def __getitem__(self, index: int) -> dict:
            return test[index]

    results = compute_report(attributor, Queries(), k=2, max_queries=3, flag_fraction=0.01)
    expected = attributor.top_k(test[:3], k=2)
    np.testing.assert_array_equal(results.top.helpful_indices, expected.helpful_indices)
    np.testing.assert_array_equal(results.query_indices, [0, 1, 2])
    assert results.curation is None and len(results.most_harmful) == 0 and len(results.flagged) == 14


# ---------------------------------------------------------------------------- errors from the shell
@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    ((), "report.queries is not set; give --queries NAME"),
    (("--queries", "nope"), "report.queries: 'nope' is not a data set of [data]"),
    (("--queries", "test", "--validation", "nope"), "report.validation: 'nope' is not a data set of [data]"),
    (("--queries", "test", "--set", "report.flag_fraction=1.5"), "report.flag_fraction: 1.5; it must be a fraction"),
    (("--queries", "test", "--flag-fraction", "-0.1"), "report.flag_fraction: -0.1; it must be a fraction"),
    (("--queries", "test", "--set", "report.k=0"), "report.k: 0; it must be a whole number of examples, at least 1"),
    (("--queries", "test", "--set", "report.image_shape=[3, 3]"), "report.image_shape=[3, 3] holds 9 values, but "
     "each input of the data set 'test' has 64 (shape [64]); give a shape with as many values"),
    (("--queries", "test", "--set", "report.image_shape=[8, 2, 5]"), "report.image_shape=[8, 2, 5]; give [height, "
     "width]"),
    (("--queries", "test", "--set", 'report.text_key="caption"'), "report.text_key='caption' is not an id column of "
     "the data set 'test' (it has: id)"),
    (("--queries", "test", "--validation", "validation", "--drop-fraction", "1"), "drop_fraction=1.0; it must be in "
     "[0, 1)"),
    (("--queries", "test", "--set", "report.drop_fraction=0.1", "--set", "report.threshold=0"), "report: it has two "
     "curation rules"),
    (("--queries", "test", "--threshold", "0.001"), "report.threshold set the curation, which needs a validation set"),
    (("--queries", "test", "--aggregate", "worst"), "report.aggregate set the curation, which needs a validation"),
])
def test_bad_settings_are_one_line_errors_before_any_scoring(digits, tmp_path, capsys, args, message):
    code, stdout, stderr = run(*report_args(digits, tmp_path / "r.html", "--no-progress", *args), capsys=capsys)
    assert code == 2 and stdout == ""
    assert stderr.startswith("srcproj: error: ") and stderr.count("\n") == 1
    assert message in stderr
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_bad_output_paths_are_refused(digits, tmp_path, capsys):
    (tmp_path / "there.html").write_text("keep me")
    (tmp_path / "dir.html").mkdir()
    cases = [
        (tmp_path / "report.txt", "does not end in .html; name the file e.g. report.html"),
        (tmp_path / "there.html", "exists; give another path, or overwrite it (--overwrite"),
        (tmp_path / "dir.html", "is a directory; give a file name ending in .html"),
        (tmp_path / "missing" / "r.html", "does not exist; create"),
    ]
    for out, message in cases:
        code, _, stderr = run(*report_args(digits, out, "--queries", "test", "--no-progress"), capsys=capsys)
        assert code == 2 and stderr.startswith("srcproj: error: ") and message in stderr, stderr
    assert (tmp_path / "there.html").read_text() == "keep me"
    code, _, stderr = run("report", "-c", str(digits), "--queries", "test", capsys=capsys)
    assert code == 2 and "report.out is not set; give --out PATH" in stderr


@pytest.mark.slow
def test_without_matplotlib_the_error_names_the_extra(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ConfigurationError, match=r"pip install 'srcproj\[plots\]'"):
        require_matplotlib()
    code, _, stderr = run(*report_args(digits, tmp_path / "r.html", "--queries", "test"), capsys=capsys)
    assert code == 2 and "matplotlib, which is not installed: pip install 'srcproj[plots]'" in stderr


# ---------------------------------------------------------------------------- plain data
def _results(queries: int, training: int, k: int = 2) -> ReportResults:
    rows = np.arange(queries)[:, None]
    helpful = (rows + np.arange(k)) % training
    harmful = (rows + np.arange(k) + k) % training
    top = TopK(helpful, np.full((queries, k), 0.5), harmful, np.full((queries, k), -0.25))
    values = np.linspace(0.0, 1.0, training)
    flagged, rule = flag_examples(values, 0.25)
    return ReportResults(np.arange(queries), top, values, flagged, rule)


PASSAGES = [
    "plain prose about rivers",
    '<script>alert("x")</script> & a <b>bold</b> claim',
    "tabs\tand\nnew lines",
    "a fourth passage",
]


def test_text_examples_are_shown_escaped():
    data = [{"x": torch.randn(5), "label": i % 2, "text": text, "id": f"t<{i}>"} for i, text in enumerate(PASSAGES)]
    views = example_views(data, range(4))
    assert views[1].text == PASSAGES[1] and views[1].image is None and views[1].ids == {"id": "t<1>"}
    document = render_report(_results(2, 4), views, views, summary={"run": "a <b> & c"}, title="passages & <co>")
    page = parse(document)
    assert "<script>" not in document and "<b>bold" not in document and "<co>" not in document
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a &lt;b&gt;bold&lt;/b&gt; claim" in document
    text = " ".join(page.text)
    assert PASSAGES[1] in text and "id t<1>" in text and "a <b> & c" in text  # read back as written
    assert all(tag != "script" for tag, _ in page.elements)
    assert [a["class"] for a in page.with_attribute("data-index")][0] == "ex text"
    assert len(page.images()) == 1  # the histogram only: text examples have no pictures
    decode(page.images()[0])


def test_long_passages_are_cut_with_the_whole_in_the_title():
    data = [{"x": torch.zeros(3), "label": 0, "text": "word " * 400}] * 2
    views = example_views(data, [0, 1])
    page = parse(render_report(_results(1, 2, k=1), views, views))
    passage = [a for a in page.with_attribute("title")][0]
    assert passage["title"] == ("word " * 400)[:2000]
    assert "word " * 121 not in " ".join(page.text)


@pytest.mark.parametrize(("inputs", "expected"), [
    (torch.rand(3, 64), (8, 8)),                           # flat, a perfect square: 8 x 8 digits
    (torch.rand(3, 5, 7), (5, 7)),                         # 2-D
    (torch.rand(3, 3, 5, 6), (5, 6, 3)),                   # channels first, as torch has them
    (torch.randint(0, 256, (3, 6, 4, 3), dtype=torch.uint8), (6, 4, 3)),  # bytes, channels last
    (torch.rand(3, 1, 6, 6), (6, 6)),                      # one channel
    (torch.rand(3, 10), None),                             # flat, not square: ids only
    (torch.randint(0, 50, (3, 16)), None),                 # integers (tokens), even if square
])
def test_which_inputs_are_shown_as_images(inputs, expected):
    views = example_views((inputs, torch.zeros(3, dtype=torch.long)), [0, 2])
    assert sorted(views) == [0, 2]
    for view in views.values():
        assert (None if view.image is None else view.image.shape) == expected
        assert view.label == "0" and view.text is None
    if expected is not None:
        page = parse(render_report(_results(1, 3, k=1), {0: views[0]}, {**views, 1: views[0]}))
        assert all(decode(src).ndim == 3 for src in page.images())


def test_image_shape_overrides_and_text_key_chooses():
    X = torch.arange(30, dtype=torch.float32).reshape(3, 10)
    views = example_views((X, torch.zeros(3)), [1], image_shape=[2, 5])
    np.testing.assert_array_equal(views[1].image, X[1].reshape(2, 5).numpy())
    data = [{"x": torch.rand(64), "label": 1, "caption": f"digit {i}", "id": f"d{i}"} for i in range(3)]
    assert example_views(data, [0])[0].image.shape == (8, 8)  # "caption" is not a text key: the image wins
    view = example_views(data, [0], text_key="caption")[0]
    assert view.text == "digit 0" and view.image is None and view.ids == {"id": "d0"}
    view = example_views(data, [0], text_key="caption", image_shape=[4, 16])[0]
    assert view.image.shape == (4, 16)  # a given image shape wins over text


def test_bad_views_and_inputs_are_refused():
    X, y = torch.rand(4, 64), torch.zeros(4)
    with pytest.raises(ConfigurationError, match=r"image_shape=\[9, 9\] holds 81 values, but each input"):
        example_views((X, y), [0], image_shape=[9, 9])
    with pytest.raises(ConfigurationError, match=r"image_shape=\[8\]; give \[height, width\]"):
        example_views((X, y), [0], image_shape=[8])
    with pytest.raises(ConfigurationError, match=r"text_key='text' is not an id column of the data \(it has: none\)"):
        example_views((X, y), [0], text_key="text")
    with pytest.raises(DataError, match=r"has 4 examples; the indices to show must be in 0..3, not 4"):
        example_views((X, y), [1, 4])
    views = example_views((X, y), range(4))
    with pytest.raises(ConfigurationError, match="the top-k has 2 rows but 1 queries are shown"):
        render_report(ReportResults(np.arange(1), _results(2, 4).top, np.zeros(4), np.zeros(0, dtype=int), "none"),
                      views, views)
    with pytest.raises(ConfigurationError, match=r"no view of training example\(s\) \[3\]"):
        render_report(_results(2, 4), views, {i: views[i] for i in range(3)})
    with pytest.raises(DataError, match=r"image has shape \[2, 2, 2\]"):
        render_report(_results(1, 1, k=1), {0: ExampleView(0, image=np.zeros((2, 2, 2)))},
                      {0: ExampleView(0)})


def test_flag_examples_takes_the_largest_self_influence():
    values = np.array([0.1, 0.9, 0.3, 0.9, 0.2, 0.5, 0.0, 0.4, 0.6, 0.7])
    indices, rule = flag_examples(values, 0.3)
    assert indices.tolist() == [1, 3, 9] and rule == "the 3 examples (0.3 of 10) with the largest self-influence"
    assert flag_examples(values, 0.0)[0].tolist() == []
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(ConfigurationError, match=r"flag_fraction=.*; it must be in \[0, 1\)"):
            flag_examples(values, bad)
    with pytest.raises(ConfigurationError, match="one value per training example"):
        flag_examples(np.zeros((2, 2)), 0.1)


def test_flag_examples_follows_a_mislabel_detector_when_given_one():
    from srcproj import MislabelScores

    values = np.array([0.1, 0.9, 0.3, 0.9, 0.2])
    suspicion = MislabelScores(np.array([5.0, 0.0, 2.0, 1.0, 5.0]), "mean_loss", None, (0,), {})
    indices, rule = flag_examples(values, 0.4, suspicion)
    assert indices.tolist() == [0, 4]  # the detector's order, ties in data-set order; not self-influence's
    assert rule == ("the 2 examples (0.4 of 5) with the highest suspicion of mislabeling (detector 'mean_loss', "
                    "docs/mislabeled.md)")
    wrong = MislabelScores(np.zeros(3), "loss", None, (0,), {})
    with pytest.raises(ConfigurationError, match="do not match the 5 training examples"):
        flag_examples(values, 0.4, wrong)


def test_write_report_is_whole_or_nothing(tmp_path):
    path = tmp_path / "r.html"
    assert write_report("<!DOCTYPE html>\n<p>é</p>", path) == len("<!DOCTYPE html>\n<p>é</p>".encode())
    with pytest.raises(ConfigurationError, match="exists"):
        write_report("other", path)
    assert write_report("other", path, overwrite=True) == 5 and path.read_text() == "other"
    assert sorted(os.listdir(tmp_path)) == ["r.html"]  # no temporary file left
    assert check_report_target(tmp_path / "x.HTM") == str(tmp_path / "x.HTM")
