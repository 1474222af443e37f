"""benchmarks/end_to_end.py at smoke size, and kronfluence's sign turned into srcproj's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def test_end_to_end_quick_srcproj(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "e2e.json"
    run = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "end_to_end.py"), "--scenario", "mlp-lds", "--quick",
         "--methods", "srcproj", "--cache", str(tmp_path / "cache"), "--json", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "srcproj (defaults)" in run.stdout and "srcproj (s): build Attributor" in run.stdout
    entry = json.loads(out.read_text())["scenarios"]["mlp-lds"]
    assert entry["quick"] and entry["params"] == 8970 and entry["checkpoints"] == 6
    r = entry["methods"]["srcproj"]
    assert r["proj_dim"] == 64 and r["hessian"] == "exact" and r["threads"] == 1
    assert r["seconds"] > 0 and r["peak_rss"] > 0
    # The split covers srcproj's whole job; what featurize reports of its stages fits inside it.
    stages = r["stages"]
    assert set(stages) == {"build Attributor", "featurize", "score"}
    assert sum(stages.values()) == pytest.approx(r["seconds"])
    assert sum(r["featurize_stages"].values()) <= stages["featurize"] + 1e-6
    assert 0 < r["inside"]["query gradients"] <= stages["score"]
    # Seeded throughout, so deterministic; even 8 subsets x 1 seed must correlate with retraining.
    lds = r["lds"]["steps"]
    assert lds["ci_subsets"][0] <= lds["mean"] <= lds["ci_subsets"][1]
    assert lds["mean"] > 0.2


def test_trak_proj_dim_stays_below_the_training_set():
    sys.path.insert(0, BENCHMARKS)
    from end_to_end import trak_proj_dim

    assert trak_proj_dim(2048, 1000) == 256
    assert trak_proj_dim(2048, 1437) == 512  # lds.py's k on its scenarios
    assert trak_proj_dim(64, 200) == 64
    assert trak_proj_dim(2048, 718) == 256


@pytest.mark.usefixtures("single_thread")
def test_kronfluence_orientation_identical_example_helps(tmp_path):
    """A training example identical to the query must get a positive score once oriented.

    For cross-entropy the loss gradient is ``-(1 - p_y)`` times the margin gradient, so
    kronfluence's raw score of an identical pair is ``-(1 - p_y) gᵀ P g < 0`` for its
    positive definite preconditioner P; srcproj's convention makes it positive.
    """
    pytest.importorskip("kronfluence")
    pytest.importorskip("sklearn")
    sys.path.insert(0, BENCHMARKS)
    from end_to_end import kronfluence_scores, orient_kronfluence

    from srcproj.demo import load_digits_split, make_mlp, train_sgd

    X, y, _, _ = load_digits_split()
    X, y = X[:200], y[:200]
    model = make_mlp(16, seed=0)
    train_sgd(model, X, y, steps=60, lr=0.05, seed=0)
    scores, seconds = kronfluence_scores(model, (X, y), (X[:8], y[:8]), str(tmp_path / "kf"), batch_size=50)
    assert scores.shape == (8, 200) and scores.dtype == np.float32
    assert set(seconds) == {"covariance factors", "eigendecomposition", "eigenvalue correction", "pairwise scores"}
    diagonal = scores[np.arange(8), np.arange(8)]
    assert np.all(diagonal > 0)
    # An identical example is among the query's most helpful ones.
    assert np.all((scores > diagonal[:, None]).sum(1) < 20)
    # The orientation is exactly a sign flip, whatever the input type.
    raw = torch.tensor([[1.0, -2.0]])
    np.testing.assert_array_equal(orient_kronfluence(raw), np.array([[-1.0, 2.0]], dtype=np.float32))
