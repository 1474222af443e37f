"""The ``srcproj`` command line, the demo helpers and the example scripts.

The CLI runs in-process through :func:`srcproj.cli.main`; ``python -m srcproj`` and the
examples run as subprocesses, as a user would run them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from srcproj import ConfigurationError
from srcproj import layout as names
from srcproj.cli import main
from srcproj.demo import format_bytes, load_digits_split, make_mlp, run_demo, train_sgd

ROOT = Path(__file__).resolve().parents[1]
K = 32  # small k: the demo's figures, not its accuracy, are under test
# torch's default thread count throughout: training rounds differently with another
# count, and a store only resumes for bit-identical checkpoints.
DEMO = ["demo", "--proj-dim", str(K), "--no-progress"]


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with its stdout and stderr captured (usable outside a test's capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One fresh demo run shared by the tests that only read its store or its output."""
    store = tmp_path_factory.mktemp("demo") / "demo.zarr"
    code, out, err = _run(DEMO + ["--store", str(store)])
    assert code == 0, err
    return store, out


def _assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("srcproj: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_prints_attributions_and_timings(demo_store):
    _, out = demo_store
    assert f"k = {K}" in out
    assert out.count("query: test example") == 3
    assert "most helpful" in out and "most harmful" in out
    assert "ms per example x checkpoint, 5,748 of them" in out  # 1,437 examples x 4 checkpoints
    assert "scores per second" in out
    assert "bytes per example x checkpoint" in out
    assert "test accuracy" in out


@pytest.mark.slow
def test_demo_resumes_an_existing_store(demo_store, tmp_path, capsys):
    store = tmp_path / "demo.zarr"
    shutil.copytree(demo_store[0], store)
    assert main(DEMO + ["--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "nothing to compute" in out
    # Resuming reproduces the fresh run's attributions exactly.
    first_query = demo_store[1].split("query: test example 0")[1].split("query:")[0]
    assert first_query in out


@pytest.mark.slow
def test_demo_fresh_recomputes(demo_store, tmp_path, capsys):
    store = tmp_path / "demo.zarr"
    shutil.copytree(demo_store[0], store)
    assert main(DEMO + ["--store", str(store), "--fresh"]) == 0
    out = capsys.readouterr().out
    assert "removed the previous store" in out
    assert "5,748 of them" in out and "resumed" not in out


def test_demo_fresh_refuses_to_delete_a_non_store(tmp_path, capsys):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    assert main(DEMO + ["--store", str(precious), "--fresh"]) == 2
    _assert_one_line_error(capsys.readouterr().err, "not a srcproj store", "refusing to delete")
    assert (precious / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_demo_on_a_store_for_other_inputs_suggests_fresh_and_restores_threads(demo_store, capsys):
    store, _ = demo_store
    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    assert main(["demo", "--proj-dim", "16", "--no-progress", "--threads", str(other), "--store", str(store)]) == 2
    _assert_one_line_error(capsys.readouterr().err, "other inputs", "proj_dim", "--fresh")
    # main() may set threads for the demo but must hand the process back as it was,
    # on the error path too (tests and notebooks call it in-process).
    assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_run_demo_returns_its_figures(demo_store, tmp_path):
    store = tmp_path / "demo.zarr"
    shutil.copytree(demo_store[0], store)
    lines: list[str] = []
    figures = run_demo(store, proj_dim=K, progress=False, out=lines.append)
    assert figures["resumed"] and figures["featurize_ms_per_example_checkpoint"] is None
    assert figures["num_train"] == 1437 and figures["num_checkpoints"] == 4 and figures["proj_dim"] == K
    assert figures["scores_per_second"] > 0
    assert figures["store_bytes"] == sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert figures["store_bytes_per_example_checkpoint"] == pytest.approx(figures["store_bytes"] / (1437 * 4))
    assert [q["index"] for q in figures["queries"]] == [0, 1, 2]
    assert all(len(q["helpful"]) == 5 and len(q["harmful"]) == 5 for q in figures["queries"])
    helpful = [s for _, _, s in figures["queries"][0]["helpful"]]
    assert helpful == sorted(helpful, reverse=True) and helpful[0] > 0
    assert any("summary" in line for line in lines)


# ---------------------------------------------------------------------- info
@pytest.mark.slow
def test_info_describes_the_demo_store(demo_store, capsys):
    store, _ = demo_store
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    for needle in ["rademacher", "exact Gauss-Newton", "float16", "4,810 in 4 tensors", "momentum 0.9",
                   "1,437", "4/4 checkpoints (8/8 chunks)", "2/2 segments", "complete: ready to score",
                   "bytes"]:
        assert needle in out, needle
    assert f"k          {K}" in out
    # One row per segment: index, steps 120, and the second shares the first's data.
    assert "same as segment 0" in out and out.count(" 120 ") >= 2


@pytest.mark.slow
def test_info_json(demo_store, capsys):
    store, _ = demo_store
    assert main(["info", "--json", str(store)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["proj_dim"] == K and summary["hessian"] == "exact"
    assert [s["steps"] for s in summary["segments"]] == [120, 120]
    assert summary["segments"][0]["time"] == pytest.approx(0.02 * 120 / (1 - 0.9))
    assert summary["completion"]["complete"] is True
    assert summary["completion"]["hessians"] == [4, 4]
    assert summary["bytes_on_disk"] == sum(f.stat().st_size for f in store.rglob("*") if f.is_file())


@pytest.mark.slow
def test_info_reads_completion_from_done_flags(demo_store, tmp_path, capsys):
    store = tmp_path / "partial.zarr"
    shutil.copytree(demo_store[0], store)
    # As if the job stopped before the last checkpoint's second chunk and the caches.
    zarr.open_array(store / names.features_done(3), mode="r+")[1] = False
    zarr.open_array(store / names.cache_done(1), mode="r+")[:] = False
    shutil.rmtree(store / "hessians" / "ckpt_3")
    zarr.open_array(store / "hessians" / "done", mode="r+")[3] = False
    assert main(["info", "--json", str(store)]) == 0
    done = json.loads(capsys.readouterr().out)["completion"]
    assert done["features"] == {"checkpoints": [3, 4], "chunks": [7, 8]}
    assert done["hessians"] == [3, 4]
    assert done["caches"] == {"segments": [1, 2], "chunks": [2, 4]}
    assert done["complete"] is False
    assert main(["info", str(store)]) == 0
    assert "incomplete" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "file", "zarr_not_srcproj"])
def test_info_on_a_non_store_is_a_one_line_error(kind, tmp_path, capsys):
    path = tmp_path / "thing"
    if kind == "empty_dir":
        path.mkdir()
    elif kind == "file":
        path.write_text("not a store")
    elif kind == "zarr_not_srcproj":
        zarr.open_group(path, mode="w", zarr_format=3)
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _assert_one_line_error(captured.err, str(path))


def test_usage_errors_return_2(capsys):
    assert main([]) == 2
    assert main(["demo", "--proj-dim", "0"]) == 2
    assert "--proj-dim" in capsys.readouterr().err
    assert main(["--version"]) == 0


def test_python_dash_m_srcproj(tmp_path):
    missing = tmp_path / "missing.zarr"
    done = subprocess.run([sys.executable, "-m", "srcproj", "info", str(missing)],
                          check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    _assert_one_line_error(done.stderr, "no store at")
    done = subprocess.run([sys.executable, "-m", "srcproj", "--help"],
                          check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and "demo" in done.stdout and "info" in done.stdout


# ---------------------------------------------------------------------- helpers
def test_demo_helpers_are_deterministic_and_leave_global_state_alone():
    X, y, X_test, y_test = load_digits_split(seed=0)
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert X.shape[1] == 64 and float(X.min()) >= 0 and float(X.max()) <= 1
    assert len(X) + len(X_test) == 1797 and set(y_test.tolist()) == set(range(10))

    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    runs = []
    for _ in range(2):
        model = make_mlp(hidden=16, seed=3)
        runs.append(train_sgd(model, X, y, steps=5, lr=0.1, seed=4, checkpoint_at=[5, 2]))
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert len(runs[0]) == 2
    for a, b in zip(*runs, strict=False):
        assert all(torch.equal(a[key], b[key]) for key in a)
    # Saved states are copies taken after 2 and 5 steps, not views of the live weights.
    assert not torch.equal(runs[0][0]["0.weight"], runs[0][1]["0.weight"])
    assert torch.equal(runs[0][1]["0.weight"], model.state_dict()["0.weight"])
    other = train_sgd(make_mlp(hidden=16, seed=3), X, y, steps=5, lr=0.1, seed=5, checkpoint_at=[5])
    assert not torch.equal(other[0]["0.weight"], runs[0][1]["0.weight"])
    with pytest.raises(ConfigurationError, match="checkpoint_at"):
        train_sgd(make_mlp(hidden=16), X, y, steps=5, lr=0.1, checkpoint_at=[6])


# ---------------------------------------------------------------------- examples
@pytest.mark.slow
@pytest.mark.parametrize("script, needles", [
    ("quickstart.py", ["helpful:", "harmful:", "share its label"]),
    ("two_stage.py", ["stage 1:", "stage 2:", "stage-1 digits sharing", "mean |score|"]),
    ("adam_run.py", ["preconditioner: optimizer state", "(parameter mean of the groups' λ)", "top proponents",
                     "share its label"]),
    ("language_model.py", ["fisher Gauss-Newton Hessian", "target characters per passage", "-> completion",
                           "helpful +", "harmful -"]),
])
def test_example_runs(script, needles, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--store", str(tmp_path / "s.zarr")],
                          check=False, capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600 if script == "language_model.py" else 180)  # ~30 s alone on 2 cores
    assert done.returncode == 0, done.stderr[-2000:]
    for needle in needles:
        assert needle in done.stdout, needle


def test_format_bytes():
    assert format_bytes(1023) == "1023 bytes"
    assert format_bytes(1024) == "1.0 KiB"
    assert format_bytes(8 * 2**20 + 2**19) == "8.5 MiB"
    assert format_bytes(3 * 2**40) == "3.0 TiB"
