"""Scores do not depend on how featurize was batched or chunked, nor on being killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_scores_close

from srcproj import layout as names

pytestmark = pytest.mark.usefixtures("single_thread")


def scores_of(run, path, batch_size: int = 64, **kwargs) -> np.ndarray:
    attr = run.attributor(path, **kwargs)
    attr.featurize(batch_size=batch_size, progress=False)
    return attr.score(run.queries)


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory):
    """Scores with batch_size 64 and chunk_size 16 (float32 features)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return scores_of(tiny_run, tmp_path_factory.mktemp("reference") / "run.zarr")
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- (a) invariance
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_scores_do_not_depend_on_batch_size(tiny_run, reference, tmp_path, batch_size):
    scores = scores_of(tiny_run, tmp_path / "run.zarr", batch_size=batch_size)
    assert scores.shape == (6, 100)
    assert np.abs(scores).max() > 0
    assert_scores_close(scores, reference, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [5, 16, 1000])
def test_scores_do_not_depend_on_chunk_size(tiny_run, reference, tmp_path, chunk_size):
    scores = scores_of(tiny_run, tmp_path / "run.zarr", chunk_size=chunk_size)
    assert_scores_close(scores, reference, rtol=1e-5)


# ---------------------------------------------------------------------------- (c) reopening
def test_reopening_a_finished_store_computes_nothing(tiny_run, tmp_path):
    path = tmp_path / "run.zarr"
    first = tiny_run.attributor(path, chunk_size=16)
    report = first.featurize(progress=False)
    # 100 rows in chunks of 16 = 7 chunks; two checkpoints, one segment.
    assert (report.feature_chunks_computed, report.hessians_computed, report.cache_chunks_computed) == (14, 2, 7)
    assert report.examples_featurized == 200
    scores = first.score(tiny_run.queries)
    best = first.top_k(tiny_run.queries, k=5)
    own = first.self_influence()

    second = tiny_run.attributor(path, chunk_size=16)
    assert second.is_featurized()
    again = second.featurize(progress=False)
    assert (again.feature_chunks_computed, again.hessians_computed, again.cache_chunks_computed) == (0, 0, 0)
    assert again.examples_featurized == 0
    assert (again.feature_chunks_skipped, again.hessians_skipped, again.cache_chunks_skipped) == (14, 2, 7)
    np.testing.assert_array_equal(second.score(tiny_run.queries), scores)
    np.testing.assert_array_equal(second.top_k(tiny_run.queries, k=5).helpful_indices, best.helpful_indices)
    np.testing.assert_array_equal(second.self_influence(), own)
    # Featurizing the same Attributor twice is also a no-op.
    assert second.featurize(progress=False).feature_chunks_computed == 0


def test_lost_flags_are_recomputed(tiny_run, tmp_path):
    """Chunks whose done flag is missing are computed again; the others are not."""
    path = tmp_path / "run.zarr"
    scores = scores_of(tiny_run, path)
    group = zarr.open_group(path, mode="r+")
    group[names.features_done(1)][2] = False
    group[names.features_done(1)][5] = False
    group[names.HESSIANS_DONE][1] = False
    group[names.cache_done(0)][0] = False
    attr = tiny_run.attributor(path)
    report = attr.featurize(progress=False)
    assert (report.feature_chunks_computed, report.feature_chunks_skipped) == (2, 12)
    assert (report.hessians_computed, report.hessians_skipped) == (1, 1)
    assert (report.cache_chunks_computed, report.cache_chunks_skipped) == (1, 6)
    assert report.examples_featurized == 32
    assert_scores_close(attr.score(tiny_run.queries), scores, rtol=1e-5)


# ---------------------------------------------------------------------------- (b) a real kill
CHILD = """
import sys
import time

import torch
from torch import nn

torch.set_num_threads(1)
from srcproj import Attributor, ClassificationTask, RademacherProjector, Segment, Trajectory


class SlowProjector(RademacherProjector):
    # describe() is inherited: the store sees an ordinary Rademacher projector.
    def project(self, grads):
        time.sleep({delay})
        return super().project(grads)


inputs = torch.load({inputs!r}, weights_only=True)
model = nn.Sequential(nn.Linear(8, {hidden}), nn.Tanh(), nn.Linear({hidden}, 3))
trajectory = Trajectory([Segment({checkpoints!r}, steps={steps}, lr={lr}, data=(inputs["X"], inputs["y"]))])
attr = Attributor(model, ClassificationTask(), trajectory, {store!r}, projector=SlowProjector({proj_dim}, {seed}),
                  feature_dtype="float32", chunk_size={chunk_size})
print("featurizing", flush=True)
attr.featurize(batch_size=64, progress=False)
print("finished", flush=True)
"""


def done_flags(group, name: str) -> np.ndarray | None:
    try:
        return np.asarray(group[name][:], dtype=bool)
    except Exception:  # not created yet, or its metadata is being written
        return None


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_featurize_resumes_without_recomputing(tiny_run, tmp_path):
    chunk_size, proj_dim, seed = 5, 16, 0
    chunks_per_checkpoint = -(-len(tiny_run.X) // chunk_size)
    # Identical inputs for both processes: checkpoints and data as files.
    checkpoint_files = []
    for i, state in enumerate(tiny_run.checkpoints):
        checkpoint_files.append(str(tmp_path / f"ckpt_{i}.pt"))
        torch.save(state, checkpoint_files[-1])
    inputs = str(tmp_path / "data.pt")
    torch.save({"X": tiny_run.X, "y": tiny_run.y}, inputs)
    loaded = torch.load(inputs, weights_only=True)
    trajectory = tiny_run.trajectory(checkpoints=checkpoint_files, data=(loaded["X"], loaded["y"]))

    store = str(tmp_path / "killed.zarr")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD).format(
        delay=0.1, inputs=inputs, hidden=6, checkpoints=checkpoint_files, steps=tiny_run.steps,
        lr=tiny_run.lr, store=store, proj_dim=proj_dim, seed=seed, chunk_size=chunk_size))
    log = open(tmp_path / "child.log", "w+")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 90
        killed = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if os.path.exists(os.path.join(store, "zarr.json")):
                try:
                    group = zarr.open_group(store, mode="r")
                except Exception:
                    group = None
                flags = done_flags(group, names.features_done(0)) if group is not None else None
                if flags is not None and 2 <= flags.sum() < len(flags):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.seek(0)
        output = log.read()
        log.close()
    assert killed, f"the child was not killed mid-featurize (exit code {proc.returncode}); its output:\n{output}"
    assert proc.returncode == -signal.SIGKILL
    assert "finished" not in output

    # Count what the killed process had flagged done, now that nothing writes any more.
    group = zarr.open_group(store, mode="r")
    done_at_kill = 0
    for index in range(len(tiny_run.checkpoints)):
        flags = done_flags(group, names.features_done(index))
        if flags is not None:
            assert len(flags) == chunks_per_checkpoint
            done_at_kill += int(flags.sum())
    total_chunks = chunks_per_checkpoint * len(tiny_run.checkpoints)
    assert 2 <= done_at_kill < total_chunks

    resumed = tiny_run.attributor(store, trajectory=trajectory, proj_dim=proj_dim, seed=seed, chunk_size=chunk_size)
    report = resumed.featurize(progress=False)
    assert report.feature_chunks_skipped == done_at_kill
    assert report.feature_chunks_computed == total_chunks - done_at_kill
    assert report.cache_chunks_computed == chunks_per_checkpoint  # caches come after all features
    assert resumed.featurize(progress=False).feature_chunks_computed == 0

    uninterrupted = tiny_run.attributor(tmp_path / "whole.zarr", trajectory=trajectory, proj_dim=proj_dim,
                                        seed=seed, chunk_size=chunk_size)
    uninterrupted.featurize(progress=False)
    expected = uninterrupted.score(tiny_run.queries)
    assert_scores_close(resumed.score(tiny_run.queries), expected, rtol=1e-5)
    # The files written by the killed process hold the same features as the uninterrupted run.
    for index in range(len(tiny_run.checkpoints)):
        np.testing.assert_allclose(
            zarr.open_group(store, mode="r")[names.features(index)][:],
            zarr.open_group(tmp_path / "whole.zarr", mode="r")[names.features(index)][:],
            rtol=1e-5, atol=1e-7,
        )
