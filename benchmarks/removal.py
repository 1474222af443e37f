"""Subset-removal counterfactual (the SOURCE paper's §B.3) on the digits scenarios.

    python benchmarks/removal.py [--scenarios two-stage noisy-short] [--queries 40]

For queries that models trained on all the data classify correctly on every seed, each
method's top-k most helpful training examples are removed and the model retrained
(same-steps protocol, 3 seeds); a query counts as flipped when its mean margin falls
below 0. Reported: the fraction of queries flipped by removing at most k examples, for
each method and for random removals of k examples with the query's label. Stores and
retrained models are cached under ``--cache`` (shared with benchmarks/lds.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenarios as sc

from srcproj import Attributor, ClassificationTask
from srcproj.baselines import TRAK, InfluenceFunction, TracIn
from srcproj.demo import make_mlp
from srcproj.eval import removal_evaluation, retrain, select_correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(sc.SCENARIOS), choices=sc.SCENARIOS)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 40],
                        help="removal sizes; at most the smallest class's count (66 in two-stage)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cache", default="benchmarks/.cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(100, 100 + args.seeds))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.queries} queries, sizes {args.sizes}, {args.seeds} seeds, k = {args.proj_dim}")
    for name in args.scenarios:
        began = time.perf_counter()
        scenario = sc.make_scenario(name)
        Xq, yq = scenario.queries
        train_fn = sc.GroundTruthFn(name, "steps")
        full = np.ones((1, scenario.num_targets), dtype=bool)
        full_outputs = retrain(train_fn, full, seeds, os.path.join(args.cache, "removal", name, "full"),
                               progress=False, models_per_call=len(seeds))[0]
        correct = np.flatnonzero(select_correct(full_outputs))
        picked = correct[np.linspace(0, len(correct) - 1, min(args.queries, len(correct))).astype(int)]
        queries = (Xq[picked], yq[picked])
        # Retrained margins are cached for exactly these queries.
        folder = "models_" + hashlib.sha1(picked.tobytes()).hexdigest()[:12]

        _, trajectory = sc.attributed_run(scenario, 1000)
        path = os.path.join(args.cache, "stores", name, "model1000", f"source_k{args.proj_dim}.zarr")
        attributor = Attributor(make_mlp(sc.HIDDEN), ClassificationTask(), trajectory("steps"), path,
                                proj_dim=args.proj_dim)
        attributor.featurize(progress=False)
        methods = {
            "SOURCE": attributor.score(queries),
            "IF": InfluenceFunction(attributor).score(queries),
            "TRAK (srcproj)": TRAK(attributor).score(queries),
            "TracIn": TracIn(attributor).score(queries),
        }
        print(f"\n== {name}: {scenario.description}; {len(picked)} of {len(correct)} correctly classified queries")
        print(f"{'method':<16}" + "".join(f"{'≤' + str(s):>8}" for s in args.sizes) + "   (fraction flipped)")
        random_row = None
        for label, scores in methods.items():
            # Retrained outputs cover every query of the scenario; keep the picked ones.
            picked_fn = _Picked(train_fn, picked)
            result = removal_evaluation(scores, scenario.target.y.numpy(), queries[1].numpy(), picked_fn,
                                        sizes=args.sizes, seeds=seeds,
                                        cache_dir=os.path.join(args.cache, "removal", name, folder),
                                        processes=args.processes, progress=False, models_per_call=40)
            print(f"{label:<16}" + "".join(f"{v:>8.2f}" for v in result.flipped))
            random_row = result.random_flipped
        print(f"{'random, same class':<16}" + "".join(f"{v:>8.2f}" for v in random_row))
        print(f"  ({time.perf_counter() - began:.0f} s)")


class _Picked:
    """A train function that returns only the picked queries' margins (picklable)."""

    def __init__(self, train_fn, picked: np.ndarray) -> None:
        self.train_fn, self.picked = train_fn, picked

    def __call__(self, masks, seeds):
        return self.train_fn(masks, seeds)[:, self.picked]


if __name__ == "__main__":
    main()
