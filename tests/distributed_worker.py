"""A torchrun worker for tests/test_distributed.py (not a test module itself).

Every rank builds the deterministic tiny run of conftest.py (a plain function, no
pytest fixture), then runs the steps of a JSON plan, one Attributor each::

    {"name": "exact", "store": "/tmp/.../exact.zarr", "hessian": "exact",
     "seed": 0, "seed_plus_rank": false, "nan_row": null, "adam": false, "score": true,
     "hang": {"rank": 0, "after_chunks": 6}}

and writes ``rank{r}.json`` to the output directory: per step, the FeaturizeReport
or the srcproj error this rank raised. Scores go to ``{name}_scores_rank{r}.npy``.
Exit code 3 when some step failed (after every rank has written its file).

Each rank writes its process id to ``pid_rank{r}`` first: torchrun starts every
worker in a session of its own, so killing torchrun's process group does not reach
the workers, and a test that kills a job must kill them by these ids.

``hang`` makes the job stop part-way, to be killed there: rank ``rank`` computes the
features of ``after_chunks`` row chunks, then, at the start of the next one, writes
``{name}_hung_rank{r}`` and waits to be killed (for at most 300 s, then it exits
with code 4). The other rank goes on until it waits for it in a collective. Chunks
are counted by the calls of ``ProjectedGradients.output_features()`` (with the "exact"
Hessian one call gives a chunk's features and Hessian part) and of ``features()`` for
the loss with the hanging projector (patched in this worker only): one per chunk when
``batch_size >= chunk_size`` (the "fisher" estimator calls ``features()`` for the loss
more often, so do not combine it with ``hang``).

    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        tests/distributed_worker.py PLAN.json OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from conftest import adam_trajectory, build_tiny_run  # tests/ is the script's directory

from srcproj import RademacherProjector, SrcprojError
from srcproj.distributed import init_from_torchrun
from srcproj.gradients import ProjectedGradients

HANG_SECONDS = 300


def wait_to_be_killed(marker: str) -> None:
    """Say so in ``marker`` (written whole, then renamed), then wait for SIGKILL."""
    with open(marker + ".tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    deadline = time.monotonic() + HANG_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"{marker}: nobody killed this worker in {HANG_SECONDS} s", file=sys.stderr, flush=True)
    os._exit(4)


class HangingProjector(RademacherProjector):
    """The default projector (same ``describe()``, same features) that stops at chunk ``after_chunks + 1``.

    A projector only maps: the chunks are counted where features are asked for,
    :meth:`ProjectedGradients.features` (see :func:`count_chunks`).
    """

    def __init__(self, proj_dim: int, seed: int, after_chunks: int, marker: str) -> None:
        super().__init__(proj_dim, seed)
        self.chunks_left, self.marker = after_chunks, marker

    def chunk_started(self) -> None:
        if self.chunks_left == 0:
            wait_to_be_killed(self.marker)
        self.chunks_left -= 1


def count_chunks() -> None:
    """Make ``ProjectedGradients`` tell a :class:`HangingProjector` about each batch of
    loss features or output Jacobians (in this worker process only)."""
    original_features, original_outputs = ProjectedGradients.features, ProjectedGradients.output_features

    def features(self, trainable, fixed, x, y, kind="loss"):
        if kind == "loss" and isinstance(self.projector, HangingProjector):
            self.projector.chunk_started()
        return original_features(self, trainable, fixed, x, y, kind)

    def output_features(self, trainable, fixed, x):
        if isinstance(self.projector, HangingProjector):
            self.projector.chunk_started()
        return original_outputs(self, trainable, fixed, x)

    ProjectedGradients.features = features
    ProjectedGradients.output_features = output_features


def main() -> int:
    torch.set_num_threads(1)
    plan_path, out = sys.argv[1], sys.argv[2]
    with open(os.path.join(out, f"pid_rank{os.environ['RANK']}"), "w") as handle:
        handle.write(str(os.getpid()))
    with open(plan_path) as handle:
        plan = json.load(handle)
    rank, world_size = init_from_torchrun("gloo")
    assert world_size > 1 and dist.is_initialized(), "start this script with torchrun"
    run = build_tiny_run()
    count_chunks()
    results = {}
    for step in plan:
        seed = step.get("seed", 0) + (rank if step.get("seed_plus_rank") else 0)
        trajectory = None
        if step.get("nan_row") is not None:  # a NaN input in one rank's shard
            X = run.X.clone()
            X[step["nan_row"], 0] = float("nan")
            trajectory = run.trajectory(data=(X, run.y))
        if step.get("adam"):  # the same data trained by AdamW: the preconditioner stage runs on rank 0
            trajectory = adam_trajectory(run)
        projector = None
        hang = step.get("hang")
        if hang is not None and hang["rank"] == rank:
            projector = HangingProjector(16, seed, hang["after_chunks"],
                                         os.path.join(out, f"{step['name']}_hung_rank{rank}"))
        try:
            attr = run.attributor(step["store"], trajectory=trajectory, seed=seed, projector=projector,
                                  hessian=step.get("hessian", "exact"), chunk_size=step.get("chunk_size", 16))
            report = attr.featurize(batch_size=step.get("batch_size", 64), progress=False)
            results[step["name"]] = {"report": dataclasses.asdict(report)}
            if step.get("score"):
                np.save(os.path.join(out, f"{step['name']}_scores_rank{rank}.npy"), attr.score(run.queries))
        except SrcprojError as exc:
            print(f"rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            results[step["name"]] = {"error": type(exc).__name__, "message": str(exc)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    # Every rank has written its file before any exits (torchrun stops the others when one fails).
    dist.barrier()
    dist.destroy_process_group()
    return 3 if any("error" in entry for entry in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
