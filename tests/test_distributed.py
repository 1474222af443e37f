"""Featurizing on several processes (torchrun, gloo, CPU) equals one process; any zarr store URL works.

Two torchrun jobs of 2 processes run tests/distributed_worker.py on the tiny run of
conftest.py with float32 stores: the first featurizes with each Hessian estimator and
scores on every rank; the second reruns it (everything is skipped) and then tries
inputs that must fail on every rank without leaving one waiting.

A third job is killed part-way: rank 0 stops at the start of its third chunk of
checkpoint 1 (a projector in the worker waits there; nothing depends on timing) while
rank 1 has flagged all its chunks and waits for rank 0 in the Hessian's all-reduce.
Once the store shows that, the test SIGKILLs both workers and torchrun, reads the done
flags the kill left (checkpoint 0 and its Hessian done, 5 of checkpoint 1's 7 chunks),
and reruns the same job: each rank computes exactly the feature chunks of its own that
were not flagged (rank 0 two, rank 1 none), leaves the flagged chunks' files untouched,
both ranks compute the missing Hessian and the caches, and the store and scores equal
one uninterrupted process's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zarr
from conftest import adam_trajectory, assert_scores_close

from srcproj import ConfigurationError
from srcproj import layout as names
from srcproj.distributed import (
    Collective,
    all_reduce,
    barrier,
    get_rank,
    get_world_size,
    init_from_torchrun,
)
from srcproj.store import AttributionStore

pytestmark = pytest.mark.usefixtures("single_thread")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
ESTIMATORS = ("exact", "fisher", "empirical")
CHUNKS = 7  # 100 rows in chunks of 16
needs_torchrun = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def start_torchrun(plan: list[dict], out) -> subprocess.Popen:
    """Start the worker on 2 processes; its output goes to ``out/output.log``."""
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    plan_file.write_text(json.dumps(plan))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               WORKER, str(plan_file), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(out / "output.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def kill_job(proc: subprocess.Popen, out, timeout: float = 30) -> None:
    """SIGKILL a torchrun job: its workers first, by the ids in ``pid_rank{r}``, then torchrun.

    torchrun starts every worker in a session of its own, so killing torchrun's process
    group alone would leave the workers running (and writing to the store).
    """
    workers = [int(path.read_text()) for path in sorted(out.glob("pid_rank*"))]
    for group in workers + [proc.pid]:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} still run {timeout} s after SIGKILL"
        time.sleep(0.05)


def torchrun(plan: list[dict], out, timeout: float = 240) -> tuple[int, str, dict]:
    """Run the worker on 2 processes; ``(exit code, output, {rank: results})``."""
    proc = start_torchrun(plan, out)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc, out)
        pytest.fail(f"the torchrun job hung for {timeout} s; its output:\n{(out / 'output.log').read_text()}")
    output = (out / "output.log").read_text()
    results = {}
    for rank in (0, 1):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no results (exit code {proc.returncode}); output:\n{output}"
        results[rank] = json.loads(path.read_text())
    return proc.returncode, output, results


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The first 2-process job: one float32 store per estimator, scored on both ranks."""
    root = tmp_path_factory.mktemp("distributed")
    plan = [{"name": name, "store": str(root / f"{name}.zarr"), "hessian": name, "score": True}
            for name in ESTIMATORS]
    code, output, results = torchrun(plan, root / "first")
    assert code == 0, output
    return root, results


@pytest.fixture(scope="module")
def second_job(job):
    """The same job again, then inputs that must fail on every rank."""
    root, _ = job
    plan = [{"name": name, "store": str(root / f"{name}.zarr"), "hessian": name} for name in ESTIMATORS]
    plan += [
        {"name": "other_seed", "store": str(root / "exact.zarr"), "seed": 1},
        {"name": "seed_per_rank", "store": str(root / "fresh.zarr"), "seed_plus_rank": True},
        {"name": "nan_in_rank_0_shard", "store": str(root / "nan.zarr"), "nan_row": 37},
        {"name": "memory", "store": "memory://distributed-test"},
    ]
    return torchrun(plan, root / "second")


@pytest.fixture(scope="module")
def one_process(tiny_run, tmp_path_factory):
    """The same stores computed in this process, and their scores."""
    root = tmp_path_factory.mktemp("one_process")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scores = {}
        for name in ESTIMATORS:
            attr = tiny_run.attributor(root / f"{name}.zarr", hessian=name)
            attr.featurize(progress=False)
            scores[name] = attr.score(tiny_run.queries)
        return root, scores
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- torchrun, 2 processes
@needs_torchrun
@pytest.mark.slow
@pytest.mark.parametrize("name", ESTIMATORS)
def test_each_rank_featurizes_only_its_own_shard(job, name):
    _, results = job
    features, caches = {}, {}
    for rank in (0, 1):
        report = results[rank][name]["report"]
        assert (report["rank"], report["world_size"]) == (rank, 2)
        features[rank] = {tuple(pair) for pair in report["computed_feature_chunks"]}
        caches[rank] = {tuple(pair) for pair in report["computed_cache_chunks"]}
        own = [c for c in range(CHUNKS) if c % 2 == rank]
        assert features[rank] == {(ckpt, c) for ckpt in (0, 1) for c in own}
        assert caches[rank] == {(0, c) for c in own}
        assert report["feature_chunks_computed"] == 2 * len(own) and report["feature_chunks_skipped"] == 0
        assert report["cache_chunks_computed"] == len(own)
        assert report["examples_featurized"] == 2 * sum(min(16, 100 - 16 * c) for c in own)
        assert report["hessians_computed"] == 2
    assert not features[0] & features[1] and not caches[0] & caches[1]
    assert features[0] | features[1] == {(ckpt, c) for ckpt in (0, 1) for c in range(CHUNKS)}
    assert caches[0] | caches[1] == {(0, c) for c in range(CHUNKS)}


@needs_torchrun
@pytest.mark.slow
def test_an_adam_run_on_two_processes_equals_one(tiny_run, tmp_path):
    """Rank 0 writes the preconditioner before any rank projects a gradient with it."""
    code, output, results = torchrun([{"name": "adam", "store": str(tmp_path / "adam.zarr"), "adam": True,
                                       "score": True}], tmp_path / "job")
    assert code == 0, output
    assert results[0]["adam"]["report"]["preconditioner"] == "optimizer state"
    single = tiny_run.attributor(tmp_path / "one.zarr", trajectory=adam_trajectory(tiny_run))
    single.featurize(progress=False)
    expected = single.score(tiny_run.queries)
    two = zarr.open_group(tmp_path / "adam.zarr", mode="r")
    np.testing.assert_array_equal(two[names.preconditioner_scale(0)][:], single.layout.read_scale(0))
    for rank in (0, 1):
        assert_scores_close(np.load(tmp_path / "job" / f"adam_scores_rank{rank}.npy"), expected)


@needs_torchrun
@pytest.mark.slow
@pytest.mark.parametrize("name", ESTIMATORS)
def test_two_processes_equal_one(tiny_run, job, one_process, name):
    """Features, Hessians, spectra, caches and scores (from each rank and from here) equal one process's."""
    root, _ = job
    single_root, single_scores = one_process
    two = zarr.open_group(root / f"{name}.zarr", mode="r")
    one = zarr.open_group(single_root / f"{name}.zarr", mode="r")
    arrays = [names.features(0), names.features(1), names.hessian(0), names.hessian(1),
              names.eigenvalues(0), names.cache(0)]
    for array in arrays:
        np.testing.assert_allclose(two[array][:], one[array][:], rtol=1e-5, atol=1e-7 * np.abs(one[array][:]).max(),
                                   err_msg=array)
    for flags in (names.features_done(0), names.features_done(1), names.HESSIANS_DONE, names.SPECTRA_DONE,
                  names.cache_done(0)):
        assert two[flags][:].all(), flags
    for rank in (0, 1):
        assert_scores_close(np.load(root / "first" / f"{name}_scores_rank{rank}.npy"), single_scores[name])
    # A later single process scores from the store the two processes wrote.
    later = tiny_run.attributor(root / f"{name}.zarr", hessian=name)
    assert later.is_featurized()
    assert_scores_close(later.score(tiny_run.queries), single_scores[name])


@needs_torchrun
@pytest.mark.slow
def test_rerunning_the_job_skips_everything(second_job):
    _, output, results = second_job
    for rank in (0, 1):
        own = len([c for c in range(CHUNKS) if c % 2 == rank])
        for name in ESTIMATORS:
            report = results[rank][name]["report"]
            assert report["computed_feature_chunks"] == [] and report["computed_cache_chunks"] == [], output
            assert (report["feature_chunks_computed"], report["hessians_computed"], report["cache_chunks_computed"],
                    report["examples_featurized"]) == (0, 0, 0, 0)
            assert (report["feature_chunks_skipped"], report["hessians_skipped"],
                    report["cache_chunks_skipped"]) == (2 * own, 2, own)


@needs_torchrun
@pytest.mark.slow
def test_a_store_made_for_another_seed_fails_on_every_rank(tiny_run, job, one_process, second_job):
    root, _ = job
    code, output, results = second_job
    assert code != 0  # the worker exits with 3 when a step failed
    first, second = results[0]["other_seed"], results[1]["other_seed"]
    assert first["error"] == second["error"] == "StoreMismatchError"
    assert "projector.seed: 0 in the store, 1 now" in first["message"]
    assert second["message"].startswith("rank 0 failed: ") and "projector.seed: 0 in the store, 1 now" in second["message"]
    assert "StoreMismatchError" in output and "projector.seed" in output  # what the user sees
    # The store is untouched.
    assert_scores_close(tiny_run.attributor(root / "exact.zarr").score(tiny_run.queries), one_process[1]["exact"])


@needs_torchrun
@pytest.mark.slow
def test_ranks_given_different_inputs_fail_before_touching_the_store(job, second_job):
    root, _ = job
    _, _, results = second_job
    for rank in (0, 1):
        entry = results[rank]["seed_per_rank"]
        assert entry["error"] == "ConfigurationError"
        assert "rank 1 was given other inputs than rank 0 (projector.seed: 0 on rank 0, 1 on rank 1)" in entry["message"]
    assert not (root / "fresh.zarr").exists()


@needs_torchrun
@pytest.mark.slow
def test_an_error_in_one_ranks_shard_reaches_every_rank(job, second_job):
    root, _ = job
    _, _, results = second_job
    first, second = results[0]["nan_in_rank_0_shard"], results[1]["nan_in_rank_0_shard"]
    assert first["error"] == second["error"] == "NonFiniteGradientError"
    assert "the gradient of example 37 of segment 0's data is NaN or inf" in first["message"]
    assert second["message"].startswith("rank 0 failed: checkpoint 0 (segment 0): the gradient of example 37")
    # Rank 1's chunks are done; rank 0's chunk 2 (rows 32..47) is not; a rerun would redo only rank 0's part.
    flags = zarr.open_group(root / "nan.zarr", mode="r")[names.features_done(0)][:]
    assert flags[[1, 3, 5]].all() and not flags[2]


@needs_torchrun
@pytest.mark.slow
def test_a_memory_store_in_a_distributed_job_is_refused_clearly(second_job):
    _, _, results = second_job
    for rank in (0, 1):
        entry = results[rank]["memory"]
        assert entry["error"] == "StoreError"
        assert "rank 1 cannot open the store that rank 0 opened" in entry["message"]
        assert "memory:// store exists in one process only" in entry["message"]


def read_flags(store, name: str) -> np.ndarray | None:
    """The done flags ``name`` of a store that may be in the middle of being written."""
    try:
        return np.asarray(zarr.open_group(store, mode="r")[name][:], dtype=bool)
    except Exception:  # noqa: BLE001 - not created yet, or its metadata is being written
        return None


@needs_torchrun
@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_job_resumes_where_it_stopped(tiny_run, one_process, tmp_path):
    """SIGKILL a 2-process job in checkpoint 1's features; the rerun computes only what was not flagged done."""
    store = tmp_path / "killed.zarr"
    step = {"name": "exact", "store": str(store), "hessian": "exact", "score": True}
    # Rank 0 stops at the start of its 7th chunk: 4 of checkpoint 0, 2 of checkpoint 1 (chunks 0, 2) are done.
    # Rank 1 flags all its chunks (1, 3, 5) of checkpoint 1, then waits for rank 0 to sum Hessian 1.
    out = tmp_path / "killed"
    proc = start_torchrun([dict(step, hang={"rank": 0, "after_chunks": 6})], out)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the job ended (code {proc.returncode}):\n{(out / 'output.log').read_text()}"
            flags = read_flags(store, names.features_done(1))
            if (out / "exact_hung_rank0").exists() and flags is not None and flags[1::2].all():
                break
            assert time.monotonic() < deadline, f"the job did not stop part-way:\n{(out / 'output.log').read_text()}"
            time.sleep(0.05)
    finally:
        kill_job(proc, out)
    output = (out / "output.log").read_text()
    assert proc.returncode == -signal.SIGKILL, output
    assert not list(out.glob("rank*.json")), output  # no rank got to the end of its plan

    # What the killed job had flagged done, now that nothing writes any more.
    killed = zarr.open_group(store, mode="r")
    done = {ckpt: np.asarray(killed[names.features_done(ckpt)][:], dtype=bool) for ckpt in (0, 1)}
    hessians_done = np.asarray(killed[names.HESSIANS_DONE][:], dtype=bool)
    flagged = {(ckpt, c) for ckpt in (0, 1) for c in range(CHUNKS) if done[ckpt][c]}
    assert 0 < len(flagged) < 2 * CHUNKS
    assert done[0].all() and done[1].tolist() == [True, True, True, True, False, True, False]
    assert hessians_done.tolist() == [True, False]
    assert not killed[names.cache_done(0)][:].any() and not killed[names.SPECTRA_DONE][:].any()
    # The chunk files the killed job wrote, to check that the rerun leaves them alone.
    files = {(ckpt, c): store / "features" / f"ckpt_{ckpt}" / "c" / str(c) / "0" for ckpt, c in flagged}
    assert all(path.is_file() for path in files.values()), sorted(store.rglob("*"))
    stamps = {key: (path.stat().st_mtime_ns, path.read_bytes()) for key, path in files.items()}

    code, output, results = torchrun([step], tmp_path / "resumed")
    assert code == 0, output
    for rank in (0, 1):
        report = results[rank]["exact"]["report"]
        own = [(ckpt, c) for ckpt in (0, 1) for c in range(CHUNKS) if c % 2 == rank]
        left = [pair for pair in own if pair not in flagged]
        assert [tuple(pair) for pair in report["computed_feature_chunks"]] == left, output
        assert report["feature_chunks_computed"] == len(left)
        assert report["feature_chunks_skipped"] == len(own) - len(left)
        assert report["examples_featurized"] == sum(min(16, 100 - 16 * c) for _, c in left)
        # Every rank adds to the Hessians that were not written, even rank 1, which has no features left.
        assert (report["hessians_computed"], report["hessians_skipped"]) == (2 - hessians_done.sum(), hessians_done.sum())
        assert [tuple(pair) for pair in report["computed_cache_chunks"]] == [(0, c) for c in range(rank, CHUNKS, 2)]
    assert [tuple(pair) for pair in results[0]["exact"]["report"]["computed_feature_chunks"]] == [(1, 4), (1, 6)]
    assert results[1]["exact"]["report"]["computed_feature_chunks"] == []
    for key, path in files.items():
        assert (path.stat().st_mtime_ns, path.read_bytes()) == stamps[key], f"feature chunk {key} was rewritten"

    # The resumed store equals one uninterrupted process's.
    single_root, single_scores = one_process
    resumed = zarr.open_group(store, mode="r")
    one = zarr.open_group(single_root / "exact.zarr", mode="r")
    for array in (names.features(0), names.features(1), names.hessian(0), names.hessian(1),
                  names.eigenvalues(0), names.cache(0)):
        np.testing.assert_allclose(resumed[array][:], one[array][:], rtol=1e-5,
                                   atol=1e-7 * np.abs(one[array][:]).max(), err_msg=array)
    for flags in (names.features_done(0), names.features_done(1), names.HESSIANS_DONE, names.SPECTRA_DONE,
                  names.cache_done(0)):
        assert resumed[flags][:].all(), flags
    for rank in (0, 1):
        assert_scores_close(np.load(tmp_path / "resumed" / f"exact_scores_rank{rank}.npy"), single_scores["exact"])
    assert_scores_close(tiny_run.attributor(store, hessian="exact").score(tiny_run.queries), single_scores["exact"])


# ---------------------------------------------------------------------------- one process
def test_memory_url_store_equals_a_local_store(tiny_run, tmp_path):
    local = tiny_run.attributor(tmp_path / "local.zarr")
    local.featurize(progress=False)
    url = f"memory://srcproj-test-{os.getpid()}/run.zarr"
    remote = tiny_run.attributor(url)
    report = remote.featurize(progress=False)
    assert (report.rank, report.world_size) == (0, 1)
    assert report.computed_feature_chunks == [(ckpt, c) for ckpt in (0, 1) for c in range(CHUNKS)]
    assert report.computed_cache_chunks == [(0, c) for c in range(CHUNKS)]
    np.testing.assert_array_equal(remote.score(tiny_run.queries), local.score(tiny_run.queries))
    np.testing.assert_array_equal(remote.self_influence(), local.self_influence())
    # Reopened through the URL: resumed, nothing recomputed; readable without a model.
    again = tiny_run.attributor(url).featurize(progress=False)
    assert (again.feature_chunks_computed, again.hessians_computed, again.cache_chunks_computed) == (0, 0, 0)
    stored = AttributionStore.read(url)
    assert stored.metadata["proj_dim"] == 16 and stored.nbytes_stored() > 0
    np.testing.assert_array_equal(stored.read_all(names.cache(0)),
                                  zarr.open_group(tmp_path / "local.zarr", mode="r")[names.cache(0)][:])


def test_distributed_helpers_are_no_ops_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist.is_available() or not dist.is_initialized()
    assert (get_rank(), get_world_size()) == (0, 1)
    assert init_from_torchrun() == (0, 1)  # not started by torchrun: nothing to initialize
    barrier()
    values = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(all_reduce(values), values)
    one = Collective()
    assert (one.rank, one.world_size, one.active) == (0, 1, False)
    assert all(one.owns(c) for c in range(5))
    one.agree(None)
    with pytest.raises(KeyError):
        one.agree(KeyError("raised at once in one process"))
    with pytest.raises(ConfigurationError, match=r"distributed=True, but no torch.distributed process group"):
        Collective(True)
