"""Normalised scores (srcproj.normalization) against explicit matrices.

The brute force builds the score matrix ``S = -Ψ Tᵀ`` with numpy in float64 and
divides it by the row norms computed by hand (``np.linalg.norm``); the library's
streamed, block-by-block path must give the same numbers, top-k must equal a full
argsort of the brute-force matrix, and the option must reach the Attributor, the
zarr attributes, the config file and the command line.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_scores_close

from srcproj import ConfigurationError
from srcproj.cli import main
from srcproj.config import load_config
from srcproj.errors import NonFiniteGradientError, SrcprojError
from srcproj.method import AttributionMethod
from srcproj.normalization import (
    NORMALIZATIONS,
    Normalized,
    check_normalize,
    normalize_sides,
    training_norms,
)
from srcproj.scoring import Cache, Queries

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------- brute force
def brute_force(psi: np.ndarray, train: np.ndarray, normalize: str) -> np.ndarray:
    """``-Ψ Tᵀ`` divided by the norms, with explicit loops over the norms (zero norm: score 0)."""
    psi, train = np.asarray(psi, np.float64), np.asarray(train, np.float64)
    scores = -psi @ train.T
    if normalize in ("train", "both"):
        for i in range(train.shape[0]):
            norm = np.linalg.norm(train[i])
            scores[:, i] = scores[:, i] / norm if norm > 0 else 0.0
    if normalize == "both":
        for q in range(psi.shape[0]):
            norm = np.linalg.norm(psi[q])
            scores[q, :] = scores[q, :] / norm if norm > 0 else 0.0
    return scores


class Explicit(AttributionMethod):
    """A method given by its two matrices (the training side read in chunks of ``chunk`` rows)."""

    name = "explicit"

    def __init__(self, train: np.ndarray, chunk: int = 7) -> None:
        self.train, self.chunk = train, chunk

    def training_side(self) -> Cache:
        return Cache.of(self.train, self.chunk)

    def query_side(self, queries, batch_size: int = 64) -> Queries:
        return Queries.of(np.asarray(queries, dtype=self.train.dtype))

    def self_query_side(self, batch_size: int = 64):
        return lambda start, stop: self.train[start:stop]


def matrices(q: int = 9, n: int = 50, k: int = 6, dtype=np.float64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ψ and T whose rows have very different norms (scaled by 10^U(-2, 2)), one zero row in each."""
    rng = np.random.default_rng(seed)
    psi = rng.standard_normal((q, k)) * 10.0 ** rng.uniform(-2, 2, (q, 1))
    train = rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-2, 2, (n, 1))
    psi[3] = 0.0
    train[11] = 0.0
    return psi.astype(dtype), train.astype(dtype)


# ---------------------------------------------------------------------------- scores
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("memory", [1 << 30, 3_000])  # one block; blocks of one chunk (7 rows)
def test_score_equals_the_brute_force(normalize, memory):
    psi, train = matrices()
    got = Explicit(train).score(psi, normalize=normalize, score_memory_bytes=memory)
    expected = brute_force(psi, train, normalize)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert (got[:, 11] == 0).all()
    if normalize == "both":
        assert (got[3] == 0).all()
        assert np.abs(got).max() <= 1 + 1e-12  # a cosine


def test_float32_sides_stay_float32_and_close_to_the_brute_force():
    psi, train = matrices(dtype=np.float32)
    for normalize in NORMALIZATIONS:
        got = Explicit(train).score(psi, normalize=normalize)
        assert got.dtype == np.float32
        assert_scores_close(got, brute_force(psi, train, normalize), rtol=1e-5)


def test_a_cache_read_into_reused_blocks_is_normalised_in_place():
    psi, train = matrices(n=40, dtype=np.float32)
    calls = []

    def read_into(start, stop, out):
        calls.append((start, stop))
        out[:] = train[start:stop]
        return out

    cache = Cache(lambda a, b: train[a:b], len(train), train.shape[1], train.dtype, 8, read_into=read_into)
    normalized, _ = normalize_sides(cache, Queries.of(psi), "train")
    assert normalized.read_into is not None and normalized.copies == 1
    block = np.empty((8, train.shape[1]), np.float32)
    got = normalized.read_into(16, 24, block)
    assert got is block and calls == [(16, 24)]
    expected = train[16:24] / np.linalg.norm(train[16:24].astype(np.float64), axis=1)[:, None]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(normalized.read(16, 24), got, rtol=0)
    assert (normalized.read_into(8, 16, block)[3] == 0).all()  # the zero row 11 stays zero


def test_training_norms_in_blocks_equal_numpy():
    _, train = matrices(n=200)
    cache = Cache.of(train, 8)
    expected = np.linalg.norm(train, axis=1)
    np.testing.assert_allclose(training_norms(cache), expected, rtol=1e-14)
    np.testing.assert_allclose(training_norms(cache, 1_200), expected, rtol=1e-14)  # blocks of 8 rows


def test_normalize_none_returns_the_sides_unchanged():
    psi, train = matrices()
    cache, queries = Cache.of(train), Queries.of(psi)
    assert normalize_sides(cache, queries, "none") == (cache, queries)


def test_normalisation_reorders_the_raw_ranking():
    # The point of the option: a training row 100x longer wins the raw ranking, not the normalised one.
    train = np.array([[100.0, 100.0], [1.0, 0.0]])
    psi = np.array([[-1.0, 0.0]])
    method = Explicit(train)
    assert method.score(psi)[0].tolist() == [100.0, 1.0]
    np.testing.assert_allclose(method.score(psi, normalize="train")[0], [100 / np.hypot(100, 100), 1.0])
    assert method.top_k(psi, 1).helpful_indices[0, 0] == 0
    assert method.top_k(psi, 1, normalize="train").helpful_indices[0, 0] == 1


# ---------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_top_k_equals_the_argsort_of_the_brute_force(normalize):
    psi, train = matrices(q=12, n=300, k=5, seed=3)
    train[40] = 0.0
    expected = brute_force(psi, train, normalize)
    k = 6
    top = Explicit(train, chunk=16).top_k(psi, k=k, normalize=normalize, score_memory_bytes=60_000)
    for q in range(psi.shape[0]):
        if q == 3:  # the zero query: every score is 0, in any order
            assert (top.helpful_scores[q] == 0).all() and (top.harmful_scores[q] == 0).all()
            continue
        helpful = np.argsort(-expected[q], kind="stable")[:k]
        harmful = np.argsort(expected[q], kind="stable")[:k]
        assert top.helpful_indices[q].tolist() == helpful.tolist()
        assert top.harmful_indices[q].tolist() == harmful.tolist()
        np.testing.assert_allclose(top.helpful_scores[q], expected[q, helpful], rtol=1e-12)
        np.testing.assert_allclose(top.harmful_scores[q], expected[q, harmful], rtol=1e-12)


# ---------------------------------------------------------------------------- the wrapper
@pytest.mark.parametrize("normalize", ("train", "both"))
def test_normalized_wrapper_equals_the_option(normalize):
    psi, train = matrices()
    wrapped = Normalized(Explicit(train), normalize)
    np.testing.assert_allclose(wrapped.score(psi), brute_force(psi, train, normalize), rtol=1e-12, atol=1e-15)
    # Normalising normalised sides changes nothing.
    np.testing.assert_allclose(wrapped.score(psi, normalize=normalize), brute_force(psi, train, normalize),
                               rtol=1e-12, atol=1e-15)
    assert wrapped.name == f"explicit, normalize={normalize}"
    mean = wrapped.aggregate_scores(psi, "mean")
    np.testing.assert_allclose(mean, brute_force(psi, train, normalize).mean(0), rtol=1e-10, atol=1e-15)


def test_normalized_wrapper_refuses_self_influence_and_non_methods():
    with pytest.raises(ConfigurationError, match="self-influence is not defined for normalised scores"):
        Normalized(Explicit(matrices()[1]), "train").self_influence()
    with pytest.raises(ConfigurationError, match="needs a srcproj attribution method.*got ndarray"):
        Normalized(np.zeros((3, 3)), "train")


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", ["cosine", "Train", "", None, True, 1])
def test_bad_normalize_values_name_the_choices(bad):
    psi, train = matrices()
    method = Explicit(train)
    for call in (lambda: method.score(psi, normalize=bad), lambda: method.top_k(psi, 3, normalize=bad),
                 lambda: check_normalize(bad), lambda: Normalized(method, bad)):
        with pytest.raises(ConfigurationError, match=r"normalize=.*choose 'none' .*'train' .*'both'"):
            call()


def test_a_non_finite_training_row_is_refused_with_the_fix():
    psi, train = matrices()
    train[5, 2] = np.nan
    with pytest.raises(NonFiniteGradientError, match="1 training-side rows hold NaN or inf .first: row 5.*"
                                                     "normalize='none'"):
        Explicit(train).score(psi, normalize="train")


def test_a_non_finite_query_row_is_refused():
    psi, train = matrices()
    psi[2, 0] = np.inf
    with pytest.raises(NonFiniteGradientError, match="query-side rows hold NaN or inf"):
        Explicit(train).score(psi, normalize="both")


# ---------------------------------------------------------------------------- the Attributor
@pytest.fixture(scope="module")
def tiny_attributor(tmp_path_factory):
    from conftest import build_tiny_run

    run = build_tiny_run()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        attributor = run.attributor(tmp_path_factory.mktemp("norm") / "store.zarr")
        attributor.featurize(progress=False)
    finally:
        torch.set_num_threads(before)
    return run, attributor


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_attributor_score_and_top_k_against_explicit_matrices(tiny_attributor, normalize):
    run, attributor = tiny_attributor
    cache = attributor.training_side()
    train = np.asarray(cache.read(0, cache.num_rows), dtype=np.float64)
    psi = attributor.query_features(run.queries).astype(np.float64)
    expected = brute_force(psi, train, normalize)
    got = attributor.score(run.queries, normalize=normalize)
    assert_scores_close(got, expected, rtol=1e-5)
    top = attributor.top_k(run.queries, k=4, normalize=normalize)
    np.testing.assert_allclose(top.helpful_scores, -np.sort(-expected, axis=1)[:, :4], rtol=1e-5)
    np.testing.assert_allclose(top.harmful_scores, np.sort(expected, axis=1)[:, :4], rtol=1e-5)
    assert top.helpful_indices[:, 0].tolist() == expected.argmax(1).tolist()


def test_attributor_score_array_records_normalize(tiny_attributor, tmp_path):
    run, attributor = tiny_attributor
    for normalize in NORMALIZATIONS:
        array = attributor.score(run.queries, out=tmp_path / f"{normalize}.zarr", normalize=normalize)
        info = array.attrs["srcproj_scores"]
        assert info["normalize"] == normalize and info["complete"] is True
        np.testing.assert_allclose(array[:], attributor.score(run.queries, normalize=normalize), rtol=1e-6)
    with pytest.raises(ConfigurationError, match="normalize='cos'"):
        attributor.score(run.queries, out=tmp_path / "bad.zarr", normalize="cos")
    assert not (tmp_path / "bad.zarr").exists()


# ---------------------------------------------------------------------------- config and CLI
ENTRY = '''
import torch

DATA = torch.load(__file__.replace("norm_entry.py", "data.pt"))


def build_model():
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def train():
    return DATA["train"]


def test():
    return DATA["test"]
'''

CONFIG = """
[model]
entry = "norm_entry:build_model"

[task]
entry = "srcproj:ClassificationTask"

[data]
train = "norm_entry:train"
test = "norm_entry:test"

[trajectory]
segments = [{ checkpoints = ["c0.pt", "c1.pt"], steps = 10, lr = 0.1, data = "train" }]

[store]
path = "tiny.zarr"
proj_dim = 16
feature_dtype = "float32"
chunk_size = 16

[score]
queries = "test"

[top_k]
queries = "test"
k = 3
"""


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """The tiny run as a config file, featurized from the command line."""
    from conftest import build_tiny_run

    run = build_tiny_run()
    root = tmp_path_factory.mktemp("normcli")
    torch.save({"train": (run.X, run.y), "test": (run.Xq, run.yq)}, root / "data.pt")
    for i, state in enumerate(run.checkpoints):
        torch.save(state, root / f"c{i}.pt")
    (root / "norm_entry.py").write_text(ENTRY)
    (root / "run.toml").write_text(CONFIG)
    path = list(sys.path)
    try:
        code, _, err = _cli(["featurize", "-c", str(root / "run.toml"), "--no-progress"])
        assert code == 0, err
        config = load_config(root / "run.toml")
        attributor = config.attributor(existing=True)
    finally:
        sys.path[:] = path
    return root, config, attributor


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.mark.parametrize("normalize", ("train", "both"))
def test_cli_top_k_normalize_flag_equals_the_api(cli_run, normalize):
    import pandas as pd

    root, config, attributor = cli_run
    out = root / f"top_{normalize}.csv"
    code, stdout, err = _cli(["top-k", "-c", str(root / "run.toml"), "--normalize", normalize, "--out", str(out),
                              "--no-progress"])
    assert code == 0, err
    assert f"scores normalized: {normalize})" in stdout  # the summary says which scores the table holds
    table = pd.read_csv(out)
    top = attributor.top_k(config.dataset("test"), k=3, normalize=normalize)
    helpful = table[table.direction == "helpful"].sort_values(["query_index", "rank"])
    assert helpful["train_index"].to_numpy().reshape(-1, 3).tolist() == top.helpful_indices.tolist()
    np.testing.assert_allclose(helpful["score"].to_numpy().reshape(-1, 3), top.helpful_scores, rtol=1e-6)
    raw = attributor.top_k(config.dataset("test"), k=3)
    assert not np.allclose(top.helpful_scores, raw.helpful_scores)


def test_cli_score_normalize_flag_and_config_key(cli_run):
    root, config, attributor = cli_run
    queries = config.dataset("test")
    code, _, err = _cli(["score", "-c", str(root / "run.toml"), "--normalize", "both", "--out",
                         str(root / "both.zarr"), "--no-progress"])
    assert code == 0, err
    array = zarr.open_array(str(root / "both.zarr"), mode="r")
    assert array.attrs["srcproj_scores"]["normalize"] == "both"
    np.testing.assert_allclose(array[:], attributor.score(queries, normalize="both"), rtol=1e-6)
    # The key in the file (here by --set), and the flag over it.
    code, _, err = _cli(["score", "-c", str(root / "run.toml"), "--set", 'score.normalize="train"', "--out",
                         str(root / "train.zarr"), "--no-progress"])
    assert code == 0, err
    assert zarr.open_array(str(root / "train.zarr"), mode="r").attrs["srcproj_scores"]["normalize"] == "train"
    code, _, err = _cli(["score", "-c", str(root / "run.toml"), "--set", 'score.normalize="train"', "--normalize",
                         "none", "--out", str(root / "none.zarr"), "--no-progress"])
    assert code == 0, err
    none = zarr.open_array(str(root / "none.zarr"), mode="r")
    assert none.attrs["srcproj_scores"]["normalize"] == "none"
    np.testing.assert_allclose(none[:], attributor.score(queries), rtol=1e-6)


def test_config_normalize_defaults_and_bad_values(cli_run):
    root, _, _ = cli_run
    config = load_config(root / "run.toml")
    assert config.score.normalize == "none" and config.top_k.normalize == "none"
    for key in ("score", "top_k"):
        for bad in ('"cosine"', "true", "1"):
            with pytest.raises(ConfigurationError, match=rf"{key}\.normalize: .*it must be one of 'none', 'train', "
                                                         "'both'"):
                load_config(root / "run.toml", [f"{key}.normalize={bad}"])
    assert issubclass(ConfigurationError, SrcprojError)


@pytest.mark.parametrize("command", ["score", "top-k"])
def test_cli_bad_normalize_flag_is_a_usage_error(cli_run, command):
    root, _, _ = cli_run
    code, out, err = _cli([command, "-c", str(root / "run.toml"), "--normalize", "cosine", "--out", str(root / "x")])
    assert code == 2 and out == ""
    assert "argument --normalize: invalid choice: 'cosine'" in err and "'none', 'train', 'both'" in err
    assert not (root / "x").exists()


def test_cli_bad_normalize_key_is_one_error_line(cli_run):
    root, _, _ = cli_run
    code, out, err = _cli(["top-k", "-c", str(root / "run.toml"), "--set", 'top_k.normalize="cos"', "--out",
                           str(root / "t.csv"), "--no-progress"])
    assert code == 2 and out == ""
    assert err.startswith("srcproj: error: top_k.normalize: 'cos'; it must be one of 'none', 'train', 'both'")
    assert "Traceback" not in err and not Path(root / "t.csv").exists()
