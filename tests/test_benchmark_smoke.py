"""The LDS benchmark end to end, at toy size: every method, both protocols, cached truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cache, out, *extra):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "lds.py"), "--smoke", "--cache", str(cache),
         "--out", str(out), "--no-progress", *extra],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )


def test_lds_benchmark_smoke(tmp_path):
    pytest.importorskip("sklearn")
    methods = ["IF", "TracIn", "TRAK (srcproj)", "RepSim", "Fast-SOURCE", "SOURCE last-segment query"]
    try:
        import trak  # noqa: F401

        methods.append("TRAK (official)")
    except ImportError:
        pass
    cache = tmp_path / "cache"
    first = _run(cache, tmp_path / "a.json", "--methods", *methods)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "a.json").read_text())
    assert set(results["scenarios"]) == {"converged", "noisy-short", "two-stage"}
    for _name, entry in results["scenarios"].items():
        rows = entry["lds"]
        for method in ["SOURCE", "same label", *methods]:
            for protocol in ("steps", "epochs"):
                row = rows[f"{method} | {protocol}"]
                assert -1.0 <= row["single"] <= 1.0 and -1.0 <= row["ensemble"] <= 1.0
                assert row["single_ci"][0] <= row["single_ci"][1]
    # Everything is seeded, so these toy-size numbers are deterministic; even at 12
    # subsets × 2 seeds SOURCE must correlate with retraining on the converged run.
    assert results["scenarios"]["converged"]["lds"]["SOURCE | steps"]["single"] > 0.1
    detection = results["scenarios"]["noisy-short"]["detection"]
    assert {"final loss", "SOURCE self-influence", "TracIn self-influence"} <= set(detection)
    # Self-influence must find flipped labels far better than chance (AUC 0.5), even here.
    assert detection["SOURCE self-influence"]["auc"] > 0.7

    truth_files = sorted(p for p in cache.rglob("*.npy"))
    assert len(truth_files) == 3 * 2 * 12 * 2  # scenarios × protocols × subsets × seeds
    stamps = {p: p.stat().st_mtime_ns for p in truth_files}
    second = _run(cache, tmp_path / "b.json", "--methods", "IF", "--scenarios", "converged")
    assert second.returncode == 0, second.stderr[-3000:]
    # The cached ground truth is reused, not retrained; the numbers are the same.
    assert all(p.stat().st_mtime_ns == stamps[p] for p in truth_files)
    again = json.loads((tmp_path / "b.json").read_text())["scenarios"]["converged"]["lds"]
    assert again["IF | steps"]["single"] == pytest.approx(rows_of(results)["IF | steps"]["single"])


def rows_of(results):
    return results["scenarios"]["converged"]["lds"]


def test_language_model_lds_smoke(tmp_path):
    """lds.py --scenarios lm at toy size: the GPT-2 retrainings, SOURCE and every baseline,
    and the markdown table with the same-epochs cells left empty."""
    pytest.importorskip("transformers")
    done = _run(tmp_path / "cache", tmp_path / "lm.json", "--scenarios", "lm", "--markdown", str(tmp_path / "lm.md"))
    assert done.returncode == 0, done.stderr[-3000:]
    entry = json.loads((tmp_path / "lm.json").read_text())["scenarios"]["lm"]
    methods = {key.split(" | ")[0] for key in entry["lds"]}
    assert methods == {"SOURCE", "SOURCE before issue 18", "TracIn (Adam)", "IF", "BM25", "character 4-gram overlap"}
    for row in entry["lds"].values():
        assert -1.0 <= row["single"] <= 1.0 and row["single_ci"][0] <= row["single_ci"][1]
    assert entry["source_vs_runner_up"]["steps"]["other"] in methods - {"SOURCE", "SOURCE before issue 18"}
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 8  # 8 subsets × 1 seed
    assert "| SOURCE |" in (tmp_path / "lm.md").read_text()


def test_normalized_scores_benchmark_smoke(tmp_path):
    """benchmarks/normalized.py --smoke: label agreement of raw and normalised scores on every
    scenario (no LDS without the cached ground truth)."""
    pytest.importorskip("sklearn")
    out = tmp_path / "normalized.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "normalized.py"), "--smoke", "--cache",
                           str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["scenarios"]) == {"converged", "noisy-short", "two-stage", "cnn-digits", "cnn-bn"}
    for entry in results["scenarios"].values():
        rows = entry["rows"]
        for name in ("SOURCE, normalize='none'", "SOURCE, normalize='train'", "RepSim (reference)"):
            assert 0.0 <= rows[name]["label_agreement"] <= 1.0
    # Normalising by the training row's norm stops favouring high-norm examples, even at toy size.
    converged = results["scenarios"]["converged"]["rows"]
    assert converged["SOURCE, normalize='train'"]["norm_pct"] < converged["SOURCE, normalize='none'"]["norm_pct"]


def test_mislabeled_benchmark_smoke(tmp_path):
    """benchmarks/mislabeled.py --smoke: every detector on every regime, one seed, k = 64."""
    pytest.importorskip("sklearn")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "mislabeled.py"), "--smoke", "--cache",
                           str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert len(results["table"]) == 6  # three regimes x two noise rates
    for detectors in results["table"].values():
        for name in ("loss", "mean_loss", "self_influence", "tracin", "influence_function"):
            auc = detectors[name]["auc"][0]
            assert 0.5 < auc <= 1.0, (name, auc)  # every detector finds flipped labels better than chance


def test_time_scale_benchmark_smoke(tmp_path):
    """benchmarks/time_scale.py --smoke: the time sweep, the exact derivative of the run and
    the three ground truths on noisy-short, at toy size."""
    pytest.importorskip("sklearn")
    out = tmp_path / "time_scale.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "time_scale.py"), "--smoke", "--cache",
                           str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "differ from the attributed run's by at most" in done.stdout
    drift = float(done.stdout.split("by at most ")[1].split()[0])
    assert drift < 1e-4  # the replay used for the exact derivative is the attributed run
    rows = json.loads(out.read_text())["scenarios"]["noisy-short"]["lds"]
    assert rows["exact derivative"]["corr. with exact"] == pytest.approx(1.0)
    for c in ("0.25", "1", "100"):
        row = rows[f"SOURCE k=256 c={c}"]
        assert set(row) == {"retrain", "retrain (same epochs)", "same init", "same batches", "corr. with exact"}
        assert -1.0 <= row["retrain"] <= 1.0
    assert "retrain (same epochs)" in rows["SOURCE k=256 fine c=1"]


def test_time_scale_decomposition_adds_up(tiny_run, tmp_path):
    """benchmarks/time_scale.py's decompose(): the segments' terms are measured on the scores
    SOURCE gives, and the last segment's eigenvalue bands rebuild that segment's term."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import time_scale as ts
    finally:
        sys.path.pop(0)
    from srcproj import MatrixProjector, Segment, Trajectory
    from srcproj.baselines import SourceVariant
    from srcproj.eval import draw_subsets, lds

    run = tiny_run
    first, last = run.checkpoints

    def trajectory(protocol="steps"):
        steps = 5 if protocol == "steps" else 2
        return Trajectory([Segment([first], steps, run.lr, run.data), Segment([last], steps, run.lr, run.data)],
                          weight_decay=1e-3)

    p = sum(x.numel() for x in run.model.parameters())
    attributor = run.attributor(tmp_path / "store.zarr", trajectory(), proj_dim=p,
                                projector=MatrixProjector(torch.eye(p, dtype=torch.float64)))
    attributor.featurize(progress=False)
    masks = draw_subsets(len(run.y), 20, 0.5, seed=0)
    outputs = np.random.default_rng(0).normal(size=(20, 1, len(run.yq)))
    found = ts.decompose(attributor, trajectory, run.queries, masks, outputs)
    for c in ("0.1", "1", "100"):
        full = SourceVariant(attributor, ts.scaled(trajectory(), float(c)), unroll="segments",
                             query="last_segment").score(run.queries)
        segments = found["segments"][c]
        assert segments["all"] == pytest.approx(lds(full, masks, outputs, num_bootstrap=1).mean, abs=1e-9)
        assert set(segments) == {"all", "segment 0", "segment 1", "without the last"}
        # The bands' sum is the last segment's term, rebuilt from its stored spectrum.
        assert found["bands"][c]["all"] == pytest.approx(segments["segment 1"], abs=1e-6)
        assert any(key.startswith("a*lambda in") for key in found["bands"][c])
