"""Curation checked by retraining: srcproj's drops against random and loss-based drops.

    python benchmarks/curation.py --split tune     # choose the aggregate (mean / total / worst)
    python benchmarks/curation.py                  # the reported split, with the chosen aggregate
    python benchmarks/curation.py --split pilot    # the first, 20-seed report run
    python benchmarks/curation.py --smoke          # a short end-to-end check (2 seeds, 1 fraction)

Data: scikit-learn's digits, 1,000 training images and 797 held out (stratified,
:func:`srcproj.demo.load_digits_split` with seed 0). The held-out images are shuffled
once (seed 11) and cut into three disjoint parts: ``validation`` (265, clean labels:
what srcproj ranks the training set by), ``test-tune`` (266) and ``test-report`` (266).

Scenarios (the recipes of benchmarks/scenarios.py, on these 1,000 images; every model
is the 64-64-10 MLP trained by SGD, batch 64, momentum 0.9, weight decay 1e-3):

- ``noisy``: 30% of the training labels flipped to another class (the ``noisy-short``
  recipe: 5 epochs, lr 0.1);
- ``clean``: the labels as they are (the ``converged`` recipe: 40 epochs, lr 0.05).

Per split, one attributed model is trained on every example (seed 2000 for ``tune``,
1000 for ``pilot`` and ``report``) and featurized with srcproj's defaults (k = 2048, 3 segments of 2
checkpoints). Three drop orders of the training set:

- ``srcproj``: lowest influence on the validation set first (:func:`srcproj.curate`'s
  ranking with the given aggregate);
- ``loss``: highest final training loss of the attributed model first (its own labels);
- ``random``: drawn afresh per retraining seed and fraction.

For each drop fraction every order is retrained with ``--seeds`` seeds (``tune``: 0-9,
``pilot``: 10-29, ``report``: 30-129; random draws seeded 18, 17 and 19) for as many SGD steps as the full run,
and measured by accuracy on the split's own test part: the ranking never sees it.
:func:`srcproj.eval.curation.compare_curation` gives the t-intervals over seeds and the
paired differences. The tune split evaluates every aggregate and picks the one with the
highest test-tune accuracy averaged over the fractions and scenarios; the pilot and
report splits use ``--aggregate`` (default: that choice). Results are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenarios as sc  # noqa: E402

from srcproj import Attributor, ClassificationTask, curate  # noqa: E402
from srcproj.demo import load_digits_split, make_mlp  # noqa: E402
from srcproj.eval.curation import compare_curation, drop_count, drop_order  # noqa: E402

NUM_TRAIN = 1000
PARTS = {"validation": (0, 265), "test-tune": (265, 531), "test-report": (531, 797)}
SPLITS = {
    "tune": {"model_seed": 2000, "first_seed": 0, "seeds": 10, "random_seed": 18, "test": "test-tune"},
    # The first report run: 20 seeds turned out too few to separate srcproj from the loss
    # (docs/curation.md). Kept so that its figures can be reproduced.
    "pilot": {"model_seed": 1000, "first_seed": 10, "seeds": 20, "random_seed": 17, "test": "test-report"},
    # A fresh replication sized from the tune and pilot runs (docs/curation.md, "How many
    # seeds"): the same attributed model and test part, 100 retraining seeds not used before.
    "report": {"model_seed": 1000, "first_seed": 30, "seeds": 100, "random_seed": 19, "test": "test-report"},
}
SCENARIOS = ("noisy", "clean")
AGGREGATES = ("mean", "total", "worst")
CHOSEN_AGGREGATE = "mean"  # chosen on the tune split (docs/curation.md); the report split's default


def held_out_parts() -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    _, _, Xh, yh = load_digits_split(seed=0, test_size=1797 - NUM_TRAIN)
    order = np.random.default_rng(11).permutation(len(yh))
    return Xh, yh, {name: order[a:b] for name, (a, b) in PARTS.items()}


def make_scenario(name: str) -> sc.Scenario:
    X, y, _, _ = load_digits_split(seed=0, test_size=1797 - NUM_TRAIN)
    Xh, yh, parts = held_out_parts()
    queries = (Xh[parts["validation"]], yh[parts["validation"]])
    if name == "noisy":
        noisy, flipped = sc.flip_labels(y, 0.3, seed=7)
        return sc.Scenario(name, [sc.Stage(X, noisy, epochs=5, lr=0.1, segments=3, target=True)], queries,
                           flipped=flipped, description=f"{int(flipped.sum())} of {len(y)} labels (30%) flipped, "
                                                        "5 epochs, lr 0.1")
    if name == "clean":
        return sc.Scenario(name, [sc.Stage(X, y, epochs=40, lr=0.05, segments=3, target=True)], queries,
                           description="clean labels, 40 epochs, lr 0.05")
    raise ValueError(f"unknown scenario {name!r}; choose one of {SCENARIOS}")


_CACHE: dict[str, sc.Scenario] = {}


def _scenario(name: str) -> sc.Scenario:
    if name not in _CACHE:
        _CACHE[name] = make_scenario(name)
    return _CACHE[name]


def _logits(params: list[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for state in sc.state_dicts(params):
            model = make_mlp(sc.HIDDEN)
            model.load_state_dict(state)
            out.append(model(X))
    return torch.stack(out)


@dataclass(frozen=True)
class TestCorrectness:
    """Batched ``train_fn(masks, seeds) -> (M, Q)``: each retrained model's 0/1 correctness
    on one held-out part (picklable, for :func:`compare_curation`)."""

    scenario: str
    part: str

    def __call__(self, masks: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        params, _ = sc.train_models(_scenario(self.scenario), masks, seeds, "steps")
        Xh, yh, parts = held_out_parts()
        index = parts[self.part]
        logits = _logits(params, Xh[index])
        return (logits.argmax(-1) == yh[index]).double().numpy()


def rankings(name: str, split: dict, aggregates: list[str], stores: str) -> tuple[dict[str, np.ndarray], dict]:
    """The drop orders of one attributed model: srcproj per aggregate, and final loss."""
    scenario = _scenario(name)
    final, trajectory = sc.attributed_run(scenario, split["model_seed"])
    path = os.path.join(stores, name, f"model{split['model_seed']}.zarr")
    attributor = Attributor(make_mlp(sc.HIDDEN), ClassificationTask(), trajectory("steps"), path)
    began = time.perf_counter()
    report = attributor.featurize(progress=False)
    info = {"featurize_seconds": time.perf_counter() - began, "proj_dim": attributor.proj_dim,
            "store_reused": report.feature_chunks_computed == 0}
    orders = {}
    validation = scenario.queries
    for aggregate in aggregates:
        began = time.perf_counter()
        result = curate(attributor, validation, aggregate=aggregate, drop_fraction=0.1)
        info[f"curate_{aggregate}_seconds"] = time.perf_counter() - began
        order = drop_order(result.influence)
        assert np.array_equal(result.drop, ~_keep(order, 0.1)), "drop_order disagrees with curate's keep mask"
        orders[f"srcproj ({aggregate})" if len(aggregates) > 1 else "srcproj"] = order
    model = make_mlp(sc.HIDDEN)
    model.load_state_dict(final)
    with torch.no_grad():
        losses = F.cross_entropy(model(scenario.target.X), scenario.target.y, reduction="none").double().numpy()
    orders["loss"] = drop_order(losses, drop="highest")
    if scenario.flipped is not None:
        for label, order in orders.items():
            count = drop_count(len(order), 0.3)
            info[f"flipped_in_first_30%_{label}"] = float(scenario.flipped[order[:count]].mean())
    return orders, info


def _keep(order: np.ndarray, fraction: float) -> np.ndarray:
    keep = np.ones(len(order), dtype=bool)
    keep[order[:drop_count(len(order), fraction)]] = False
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=tuple(SPLITS), default="report")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--aggregate", choices=AGGREGATES, default=CHOSEN_AGGREGATE,
                        help="the report split's aggregate (the tune split tries all)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--seeds", type=int, default=None,
                        help="retraining seeds (default: tune 10, pilot 20, report 100)")
    parser.add_argument("--random-draws", type=int, default=2)
    parser.add_argument("--processes", type=int, default=1, help="worker processes for the retraining")
    parser.add_argument("--cache", default="benchmarks/.cache/curation")
    parser.add_argument("--out", default=None, help="JSON results (default: <cache>/<split>.json)")
    parser.add_argument("--smoke", action="store_true", help="2 seeds, one fraction, the noisy scenario")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.seeds, args.fractions, args.scenarios, args.random_draws = 2, [0.2], ["noisy"], 1
        args.cache = os.path.join(args.cache, "smoke")
    split = SPLITS[args.split]
    args.seeds = args.seeds or split["seeds"]
    aggregates = list(AGGREGATES) if args.split == "tune" else [args.aggregate]
    seeds = list(range(split["first_seed"], split["first_seed"] + args.seeds))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread; split {args.split} (model seed {split['model_seed']}, retraining "
          f"seeds {seeds[0]}-{seeds[-1]}, measured on {split['test']}); fractions {args.fractions}; "
          f"{args.random_draws} random draws per seed and fraction")
    results: dict = {"split": args.split, "seeds": seeds, "fractions": args.fractions, "scenarios": {}}
    for name in args.scenarios:
        began = time.perf_counter()
        scenario = _scenario(name)
        orders, info = rankings(name, split, aggregates, os.path.join(args.cache, "stores"))
        if len(aggregates) > 1 and np.array_equal(orders["srcproj (mean)"], orders["srcproj (total)"]):
            del orders["srcproj (total)"]  # the total is the mean times Q: the same ranking
            info["total_equals_mean"] = True
        comparison = compare_curation(
            TestCorrectness(name, split["test"]), orders, args.fractions, seeds,
            random_draws=args.random_draws, random_seed=split["random_seed"],
            cache_dir=os.path.join(args.cache, "models", name, split["test"]), processes=args.processes,
            models_per_call=max(len(orders), args.random_draws) * min(len(seeds), 20))
        seconds = time.perf_counter() - began
        print(f"\n== {name}: {scenario.description}; {scenario.num_targets} training digits, "
              f"{len(scenario.queries[1])} validation digits; featurize {info['featurize_seconds']:.1f} s"
              f"{' (store reused)' if info['store_reused'] else ''}, "
              f"scenario total {seconds:.1f} s")
        for key, value in info.items():
            if key.startswith("flipped"):
                print(f"  {key}: {value:.1%}")
        print(comparison.table(against=["random", "loss"]))
        results["scenarios"][name] = {"info": info, "rows": comparison.rows(), "seconds": seconds,
                                      "full": comparison.full.tolist(),
                                      "values": {m: comparison.values[i].tolist()
                                                 for i, m in enumerate(comparison.methods)}}
        srcproj_names = [m for m in comparison.methods if m.startswith("srcproj")]
        if args.split == "tune":
            results["scenarios"][name]["mean_accuracy"] = {
                m: float(comparison.values[comparison.methods.index(m)].mean()) for m in srcproj_names}
        else:
            verdicts, separated = [], []
            for fraction in args.fractions:
                vs_random = comparison.difference("srcproj", "random", fraction)
                vs_loss = comparison.difference("srcproj", "loss", fraction)
                verdicts.append(bool(vs_random.low > 0 and vs_loss.low > 0))
                # The stricter reading: srcproj's own interval lies above both others' intervals.
                ours = comparison.summary("srcproj", fraction)
                separated.append(bool(all(ours.low > comparison.summary(m, fraction).high
                                          for m in ("random", "loss"))))
                print(f"  {fraction:.0%}: srcproj - random {vs_random.mean:+.4f} [{vs_random.low:+.5f}, "
                      f"{vs_random.high:+.4f}], srcproj - loss {vs_loss.mean:+.4f} [{vs_loss.low:+.5f}, "
                      f"{vs_loss.high:+.4f}]: paired intervals above 0: {'both' if verdicts[-1] else 'NOT both'}; "
                      f"srcproj's interval above both others': {'yes' if separated[-1] else 'no'}")
            results["scenarios"][name]["above_both_paired"] = verdicts
            results["scenarios"][name]["above_both_separated"] = separated
    if args.split == "tune":
        names = sorted({m for s in results["scenarios"].values() for m in s["mean_accuracy"]})
        average = {m: float(np.mean([s["mean_accuracy"][m] for s in results["scenarios"].values()])) for m in names}
        best = max(average, key=average.get)
        results["chosen"] = best
        print("\ntune: mean test-tune accuracy over fractions, seeds and scenarios: "
              + ", ".join(f"{m} {v:.4f}" for m, v in average.items()) + f"; chosen: {best}")
    out = args.out or os.path.join(args.cache, f"{args.split}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
