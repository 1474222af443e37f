"""Streamed scoring: the memory budget, top-k against a full sort, zarr output, concurrency.

Block plans are checked on the scoring functions directly (synthetic caches in
memory); the Attributor tests use the tiny run's store (100 rows in chunks of 16, k=16).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_scores_close

from srcproj import ConfigurationError, Segment, StoreError, Trajectory
from srcproj.scoring import (
    DEFAULT_MEMORY_BYTES,
    Cache,
    check_score_target,
    plan_blocks,
    plan_top_k,
    score_matrix,
    score_to_array,
    top_k,
)

pytestmark = pytest.mark.usefixtures("single_thread")
TESTS = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------- helpers
class Recorder:
    """An in-memory cache that records the row ranges it is asked for."""

    def __init__(self, table: np.ndarray, chunk_rows: int, fail_at: int | None = None) -> None:
        self.table, self.chunk_rows, self.fail_at = table, chunk_rows, fail_at
        self.reads: list[tuple[int, int]] = []

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.fail_at is not None and len(self.reads) == self.fail_at:
            raise StoreError("simulated damaged chunk")
        self.reads.append((start, stop))
        return self.table[start:stop].copy()

    def cache(self) -> Cache:
        n, k = self.table.shape
        return Cache(self.read, n, k, self.table.dtype, self.chunk_rows)


def synthetic(q: int, n: int, k: int, seed: int = 0, integers: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if integers:  # small integers: exact scores with many ties
        return (rng.integers(-2, 3, (q, k)).astype(np.float32), rng.integers(-2, 3, (n, k)).astype(np.float32))
    return rng.standard_normal((q, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)


@pytest.fixture(scope="module")
def store(tiny_run, tmp_path_factory):
    """A featurized tiny store: ``(attributor, path, full scores)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("scoring") / "run.zarr"
        attr = tiny_run.attributor(path)
        attr.featurize(progress=False)
        return attr, path, attr.score(tiny_run.queries)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- the budget
@pytest.mark.parametrize("queries,rows,chunk,budget", [
    (10_000, 100_000, 1024, 1 << 30), (10, 100_000, 1024, 1 << 30), (1_000_000, 100_000, 1024, 1 << 30),
    (6, 100, 16, 30_000), (6, 100, 16, 120_000), (1, 5, 16, 40_000), (50_000, 3_000, 7, 1 << 22),
])
def test_plans_fit_the_budget_in_whole_chunks(queries, rows, chunk, budget):
    cache = Cache(lambda a, b: None, rows, 64, np.dtype("float32"), chunk)
    for plan in (plan_blocks(queries, cache, budget, cell_bytes=4, query_row_bytes=512, row_bytes=512),
                 plan_top_k(queries, cache, 10, budget)):
        for r0, r1 in plan.row_blocks():
            assert r0 % chunk == 0 and (r1 % chunk == 0 or r1 == rows)
        assert plan.row_blocks()[-1][1] == rows and plan.query_batches()[-1][1] == queries
    plan = plan_blocks(queries, cache, budget, cell_bytes=4, query_row_bytes=512, row_bytes=512)
    used = plan.query_rows * plan.block_rows * 4 + plan.query_rows * 512 + plan.block_rows * 512
    assert used <= budget


def test_a_small_budget_gives_the_same_scores_in_several_batches_and_blocks():
    psi, table = synthetic(37, 500, 8)
    expected = -(psi.astype(np.float64) @ table.astype(np.float64).T)
    small = Recorder(table, chunk_rows=32)
    scores = score_matrix(psi, small.cache(), 3000, prefetch=True)
    assert_scores_close(scores, expected, rtol=1e-5)
    assert len(set(small.reads)) > 1 and len(small.reads) > len(set(small.reads))  # blocks, re-read per batch
    assert all(a % 32 == 0 and (b % 32 == 0 or b == 500) for a, b in small.reads)  # whole chunks
    big = Recorder(table, chunk_rows=32)
    np.testing.assert_allclose(score_matrix(psi, big.cache(), DEFAULT_MEMORY_BYTES), scores, rtol=1e-6, atol=1e-6)
    assert big.reads == [(0, 500)]


def test_attributor_budget_does_not_change_results(tiny_run, store):
    attr, _, full = store
    # 2,400 bytes: 3 query batches × 7 row blocks for score (k=16, chunk 16, 6 queries).
    assert_scores_close(attr.score(tiny_run.queries, score_memory_bytes=2400), full)
    small, big = (attr.top_k(tiny_run.queries, k=4, score_memory_bytes=b) for b in (15_000, DEFAULT_MEMORY_BYTES))
    np.testing.assert_array_equal(small.helpful_indices, big.helpful_indices)
    np.testing.assert_array_equal(small.harmful_indices, big.harmful_indices)
    assert_scores_close(small.helpful_scores, np.take_along_axis(full, big.helpful_indices, 1))
    np.testing.assert_allclose(attr.self_influence(score_memory_bytes=10_000), attr.self_influence(),
                               rtol=1e-9, atol=1e-15)


def test_several_segments_are_summed_in_blocks(tiny_run, tmp_path):
    run = tiny_run
    traj = Trajectory([Segment(run.checkpoints[:1], steps=5, lr=run.lr, data=run.data),
                       Segment(run.checkpoints[1:], steps=5, lr=run.lr, data=run.data)])
    attr = run.attributor(tmp_path / "two.zarr", trajectory=traj)
    attr.featurize(progress=False)
    both = attr.score(run.queries, score_memory_bytes=4000)  # 2 segments: 3 batches × 7 blocks
    parts = attr.score(run.queries, segments=[0]) + attr.score(run.queries, segments=[1])
    assert_scores_close(both, parts)
    assert_scores_close(both, attr.score(run.queries))


# ---------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("integers", [False, True])
@pytest.mark.parametrize("budget", [400_000, 1_000_000])
def test_top_k_matches_a_full_sort(integers, budget):
    psi, table = synthetic(9, 20_000, 8, seed=3, integers=integers)
    full = -(psi.astype(np.float64) @ table.astype(np.float64).T)
    reader = Recorder(table, chunk_rows=256)
    found = top_k(psi, reader.cache(), 10, budget)
    assert max(b - a for a, b in reader.reads) < 20_000  # blocks smaller than N
    # Values are exact; indices point at entries with those values (ties aside).
    np.testing.assert_allclose(found.helpful_scores, -np.sort(-full, 1)[:, :10], rtol=1e-5)
    np.testing.assert_allclose(found.harmful_scores, np.sort(full, 1)[:, :10], rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, found.helpful_indices, 1), found.helpful_scores, rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, found.harmful_indices, 1), found.harmful_scores, rtol=1e-5)
    for q in range(9):
        assert len(set(found.helpful_indices[q])) == 10 and len(set(found.harmful_indices[q])) == 10
        if not integers:  # no ties: the same indices as argsort
            np.testing.assert_array_equal(found.helpful_indices[q], np.argsort(-full[q])[:10])
            np.testing.assert_array_equal(found.harmful_indices[q], np.argsort(full[q])[:10])


def test_top_k_of_the_store_matches_argsort(tiny_run, store):
    attr, _, full = store
    found = attr.top_k(tiny_run.queries, k=5, score_memory_bytes=15_000)
    for q in range(len(full)):
        np.testing.assert_array_equal(found.helpful_indices[q], np.argsort(-full[q], kind="stable")[:5])
        np.testing.assert_array_equal(found.harmful_indices[q], np.argsort(full[q], kind="stable")[:5])
    capped = attr.top_k(tiny_run.queries, k=1000)
    assert capped.helpful_indices.shape == (6, 100)


# ---------------------------------------------------------------------------- zarr output
def test_zarr_output_equals_score(tiny_run, store, tmp_path):
    attr, _, full = store
    out = tmp_path / "scores.zarr"
    array = attr.score(tiny_run.queries, out=out, score_memory_bytes=3000)
    assert isinstance(array, zarr.Array) and array.read_only
    assert array.shape == (6, 100) and array.dtype == np.float32 and array.chunks[1] == 16
    assert_scores_close(array[:], full)
    about = array.attrs["srcproj_scores"]
    assert about["complete"] is True and about["segments"] == [0] and about["training_examples"] == 100
    np.testing.assert_array_equal(zarr.open_array(out, mode="r")[:], array[:])
    # A zarr Store object works too.
    memory = zarr.storage.MemoryStore()
    assert_scores_close(attr.score(tiny_run.queries, out=memory)[:], full)


def test_existing_targets_are_refused_unless_overwrite(tiny_run, store, tmp_path):
    attr, store_path, full = store
    out = tmp_path / "scores.zarr"
    attr.score(tiny_run.queries, out=out)
    with pytest.raises(StoreError, match=r"already holds a zarr array.*overwrite=True"):
        attr.score(tiny_run.queries, out=out)
    again = attr.score(tiny_run.queries, out=out, overwrite=True, score_memory_bytes=3000)
    assert_scores_close(again[:], full)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a zarr array.*will not replace it"):
        attr.score(tiny_run.queries, out=tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        attr.score(tiny_run.queries, out=tmp_path / "file")
    for inside in (store_path, store_path / "scores", store_path.parent):
        with pytest.raises(StoreError, match="would overwrite the attribution store"):
            attr.score(tiny_run.queries, out=inside, overwrite=True)
    memory = zarr.storage.MemoryStore()
    attr.score(tiny_run.queries, out=memory)
    with pytest.raises(StoreError, match="already holds zarr data.*overwrite=True"):
        attr.score(tiny_run.queries, out=memory)
    assert attr.is_featurized()


def test_an_interrupted_zarr_output_is_marked_incomplete(tmp_path):
    psi, table = synthetic(5, 200, 4)
    out = tmp_path / "scores.zarr"
    local = check_score_target(out, overwrite=False)
    failing = Recorder(table, chunk_rows=20, fail_at=3)
    with pytest.raises(StoreError, match="simulated"):
        score_to_array(psi, failing.cache(), out, 2000, local_root=local, prefetch=False)
    array = zarr.open_array(out, mode="r")
    assert array.attrs["srcproj_scores"]["complete"] is False
    written = array[:]
    assert np.isfinite(written[:, :60]).all() and np.isnan(written[:, 60:]).all()  # never 0 for a missing chunk
    with pytest.raises(StoreError, match="overwrite=True"):
        check_score_target(out, overwrite=False)


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("value", [-1, 0, True, "1GB", float("nan"), 1.5, None])
def test_bad_budgets_are_refused(tiny_run, store, value):
    attr = store[0]
    for call in (lambda: attr.score(tiny_run.queries, score_memory_bytes=value),
                 lambda: attr.top_k(tiny_run.queries, score_memory_bytes=value),
                 lambda: attr.self_influence(score_memory_bytes=value)):
        with pytest.raises(ConfigurationError, match=r"score_memory_bytes=.*positive whole number of bytes.*1 << 30"):
            call()


def test_too_small_budgets_and_bad_targets_are_refused(tiny_run, store):
    attr = store[0]
    with pytest.raises(ConfigurationError, match=r"score_memory_bytes=100 bytes cannot hold the smallest block.*"
                                                  r"16 rows × k=16 float32.*give a larger score_memory_bytes"):
        attr.top_k(tiny_run.queries, score_memory_bytes=100)
    assert attr.score(tiny_run.queries, score_memory_bytes=1e6).shape == (6, 100)  # a whole float is fine
    with pytest.raises(ConfigurationError, match=r"overwrite='yes'; it must be True or False"):
        attr.score(tiny_run.queries, out="elsewhere.zarr", overwrite="yes")
    with pytest.raises(ConfigurationError, match=r"out=123 \(int\); give a directory path"):
        attr.score(tiny_run.queries, out=123)


# ---------------------------------------------------------------------------- concurrency
WORKER = """
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from conftest import build_tiny_run
run = build_tiny_run()
attr = run.attributor({store!r})
open({ready!r}, "w").close()
while not __import__("os").path.exists({go!r}):
    time.sleep(0.01)
for _ in range(5):  # small blocks, many reads: the two processes' reads interleave
    scores = attr.score(run.queries, score_memory_bytes=2400)
    top = attr.top_k(run.queries, k=5, score_memory_bytes=15000)
np.savez({result!r}, scores=scores, helpful=top.helpful_indices, harmful=top.harmful_indices)
"""


def snapshot(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


def test_two_processes_score_one_store_at_once(tiny_run, store, tmp_path):
    attr, store_path, full = store
    before = snapshot(store_path)
    expected_top = attr.top_k(tiny_run.queries, k=5, score_memory_bytes=15000)
    go = tmp_path / "go"
    procs, results, ready = [], [], []
    for i in range(2):
        ready.append(tmp_path / f"ready{i}")
        results.append(tmp_path / f"result{i}.npz")
        code = WORKER.format(tests=TESTS, store=str(store_path), ready=str(ready[i]), go=str(go),
                             result=str(results[i]))
        procs.append(subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 60
    while not all(r.exists() for r in ready):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.stderr.read() for p in procs
                                                                                  if p.poll() is not None]
        time.sleep(0.05)
    go.write_text("")
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    for result in results:
        got = np.load(result)
        assert_scores_close(got["scores"], full)
        np.testing.assert_array_equal(got["helpful"], expected_top.helpful_indices)
        np.testing.assert_array_equal(got["harmful"], expected_top.harmful_indices)
    assert snapshot(store_path) == before  # scoring wrote nothing to the store
