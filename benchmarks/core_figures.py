"""Core figures of srcproj on this machine: featurize time, scoring rate, store size.

Runs the digits demo (an MLP of 4,810 parameters, 1,437 training examples, 4
checkpoints in 2 segments, exact Gauss-Newton Hessians) in fresh stores at several
projection sizes and prints, for each: featurize milliseconds per example × checkpoint,
scores per second (360 queries × 1,437 training examples, query gradients included),
and store bytes per example × checkpoint (features, Hessians, spectra and caches).

    python benchmarks/core_figures.py [--proj-dims 256 1024 2048]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import torch

from srcproj.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proj-dims", type=int, nargs="+", default=[256, 1024, 2048])
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for k in args.proj_dims:
        with tempfile.TemporaryDirectory() as tmp:
            figures = run_demo(os.path.join(tmp, "bench.zarr"), proj_dim=k, progress=False, out=lambda s: None)
        rows.append((k, figures))
    print(f"{'k':>6} {'featurize ms/(ex*ckpt)':>24} {'scores/s':>14} {'store B/(ex*ckpt)':>19}")
    for k, f in rows:
        print(f"{k:>6} {f['featurize_ms_per_example_checkpoint']:>24.3f} {f['scores_per_second']:>14,.0f} "
              f"{f['store_bytes_per_example_checkpoint']:>19,.0f}")


if __name__ == "__main__":
    main()
