"""A torchrun worker for tests/test_distributed.py (not a test module itself).

Every rank builds the deterministic tiny run of conftest.py (a plain function, no
pytest fixture), then runs the steps of a JSON plan, one Attributor each::

    {"name": "exact", "store": "/tmp/.../exact.zarr", "hessian": "exact",
     "seed": 0, "seed_plus_rank": false, "nan_row": null, "score": true}

and writes ``rank{r}.json`` to the output directory: per step, the FeaturizeReport
or the srcproj error this rank raised. Scores go to ``{name}_scores_rank{r}.npy``.
Exit code 3 when some step failed (after every rank has written its file).

    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        tests/distributed_worker.py PLAN.json OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from conftest import build_tiny_run  # tests/ is the script's directory

from srcproj import SrcprojError
from srcproj.distributed import init_from_torchrun


def main() -> int:
    torch.set_num_threads(1)
    plan_path, out = sys.argv[1], sys.argv[2]
    with open(plan_path) as handle:
        plan = json.load(handle)
    rank, world_size = init_from_torchrun("gloo")
    assert world_size > 1 and dist.is_initialized(), "start this script with torchrun"
    run = build_tiny_run()
    results = {}
    for step in plan:
        seed = step.get("seed", 0) + (rank if step.get("seed_plus_rank") else 0)
        trajectory = None
        if step.get("nan_row") is not None:  # a NaN input in one rank's shard
            X = run.X.clone()
            X[step["nan_row"], 0] = float("nan")
            trajectory = run.trajectory(data=(X, run.y))
        try:
            attr = run.attributor(step["store"], trajectory=trajectory, seed=seed,
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
