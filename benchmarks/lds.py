"""LDS benchmark: SOURCE against every baseline on three digits scenarios, one command.

    python benchmarks/lds.py                       # the reported split (after tuning)
    python benchmarks/lds.py --split tune          # the split that settings were chosen on
    python benchmarks/lds.py --smoke               # a minute-long end-to-end check
    python benchmarks/lds.py --scenarios lm        # the small GPT-2 language model (lm_lds.py)

Scenarios (benchmarks/scenarios.py): ``converged``, ``noisy-short`` and ``two-stage``.
Ground truth: ``--subsets`` random 50% subsets of the attribution target, each
retrained with ``--seeds`` seeds under two protocols, cached under ``--cache``:

- ``steps``: a subset is trained for as many optimizer steps as the full run;
- ``epochs``: for as many epochs (half the steps in the subsampled stage), the usual
  LDS recipe. SOURCE is told so (docs/math.md §8) by :class:`SourceVariant` with the
  subsampled segments' steps halved; the other methods have no notion of it.

The benchmark has two disjoint splits, each with its own random subsets, retraining
seeds, attributed models and queries: ``tune`` (subsets seed 18, retraining seeds
0-9, models 2000+, even test indices) is where settings were chosen; ``report``
(subsets seed 17, retraining seeds 10-19, models 1000+, odd test indices) is what
docs/benchmarks.md reports. Each method is evaluated on one attributed model and as an
ensemble of ``--models`` independently trained ones (mean scores; the official TRAK
ensembles with its own rule). The time column is each method's own wall time per
model: SOURCE's includes featurizing its store, recorded when the store was made;
IF, TracIn, TRAK (srcproj) and the last-segment query reuse that store and count only
what they compute on top of it.
Results are printed and written as JSON to ``--out``.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenarios as sc
from paired_lds import paired_difference  # noqa: E402

from srcproj import Attributor, ClassificationTask
from srcproj.baselines import (
    TRAK,
    InfluenceFunction,
    RepresentationSimilarity,
    SourceVariant,
    TracIn,
    average_checkpoints,
)
from srcproj.demo import make_mlp
from srcproj.eval import detection, draw_subsets, lds, retrain

PROTOCOLS = ("steps", "epochs")


@dataclass
class Settings:
    subsets: int = 100
    seeds: int = 10
    models: int = 3
    proj_dim: int = 512
    queries: int = 360
    processes: int = 2
    cache: str = "benchmarks/.cache"
    batch: int = 50
    stores: str | None = None


# Each split has its own subsets, retraining seeds, attributed models and queries, so
# that settings chosen on "tune" are not fitted to what "report" measures.
SPLITS = {
    "tune": {"subset_seed": 18, "first_retrain_seed": 0, "first_model_seed": 2000, "first_query": 0},
    "report": {"subset_seed": 17, "first_retrain_seed": 10, "first_model_seed": 1000, "first_query": 1},
}


def ground_truth(name: str, scenario: sc.Scenario, settings: Settings, split: dict, progress: bool) -> dict:
    masks = draw_subsets(scenario.num_targets, settings.subsets, 0.5, seed=split["subset_seed"])
    seeds = range(split["first_retrain_seed"], split["first_retrain_seed"] + settings.seeds)
    outputs = {}
    for protocol in PROTOCOLS:
        folder = os.path.join(settings.cache, "ground_truth", name, protocol)
        began = time.perf_counter()
        outputs[protocol] = retrain(sc.GroundTruthFn(name, protocol), masks, seeds, folder,
                                    processes=settings.processes, progress=progress,
                                    models_per_call=settings.batch)
        print(f"  ground truth {name}/{protocol}: {outputs[protocol].shape} in {time.perf_counter() - began:.1f} s")
    return {"masks": masks, "outputs": outputs}


class Timed:
    """Wall seconds of what a method computes itself (its store's featurize counted once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds


def _featurized(model, trajectory, path: str, timer: Timed, key: str, task=None, **kwargs) -> Attributor:
    """The featurized Attributor of a store at ``path``; ``timer`` gets its featurize
    seconds, those of the run that made the store when it is reused."""
    attributor = Attributor(model, ClassificationTask() if task is None else task, trajectory, path, **kwargs)
    sidecar = path + ".seconds.json"
    report = attributor.featurize(progress=False)
    # Featurize time is recorded when a store is made from scratch and reused after.
    if report.feature_chunks_skipped == 0 and report.feature_chunks_computed:
        with open(sidecar, "w") as handle:
            json.dump({"seconds": report.seconds}, handle)
    seconds = report.seconds
    if os.path.exists(sidecar):
        with open(sidecar) as handle:
            seconds = json.load(handle)["seconds"]
    timer.add(key, seconds)
    return attributor


def method_scores(name: str, scenario: sc.Scenario, seed: int, queries, settings: Settings,
                  methods: set[str], timer: Timed) -> tuple[dict, dict]:
    """Scores (Q, N_target) per (method, protocol) for one attributed model; self-influence too."""
    final, trajectory = sc.attributed_run(scenario, seed)
    folder = os.path.join(settings.stores or os.path.join(settings.cache, "stores"), name, f"model{seed}")
    os.makedirs(folder, exist_ok=True)
    k = settings.proj_dim
    model = make_mlp(sc.HIDDEN)
    scores: dict[tuple[str, str], np.ndarray] = {}
    selfinf: dict[str, np.ndarray] = {}

    def timed(key, fn):
        began = time.perf_counter()
        out = fn()
        timer.add(key, time.perf_counter() - began)
        return out

    base = _featurized(model, trajectory("steps"), os.path.join(folder, f"source_k{k}.zarr"), timer,
                       "SOURCE", proj_dim=k)
    for protocol in PROTOCOLS:
        variant = SourceVariant(base, trajectory(protocol))
        scores["SOURCE", protocol] = timed("SOURCE", lambda v=variant: v.score(queries))
    # The same store's same-steps answer scored against both protocols: what re-timing
    # the subsampled segments (Counterfactual.same_epochs) changes.
    for protocol in PROTOCOLS:
        scores["SOURCE, same-steps setting", protocol] = scores["SOURCE", "steps"]
    selfinf["SOURCE"] = base.self_influence()
    if CHAINED in methods:  # the paper's chain of every segment, from the same store
        for protocol in PROTOCOLS:
            variant = SourceVariant(base, trajectory(protocol), unroll="segments", query="last_segment")
            scores[CHAINED, protocol] = timed(CHAINED, lambda v=variant: v.score(queries))

    shared = {"IF": lambda: InfluenceFunction(base), "TracIn": lambda: TracIn(base),
              "TRAK (srcproj)": lambda: TRAK(base), "RepSim": lambda: RepresentationSimilarity(base, "1")}
    for label, make in shared.items():
        if label not in methods:
            continue
        method = make()
        out = timed(label, lambda m=method: m.score(queries))
        for protocol in PROTOCOLS:
            scores[label, protocol] = out
        if label in ("IF", "TracIn"):
            selfinf[label] = method.self_influence()

    if "SOURCE last-segment query" in methods:
        for protocol in PROTOCOLS:
            variant = SourceVariant(base, trajectory(protocol), query="last_segment")
            scores["SOURCE last-segment query", protocol] = timed("SOURCE last-segment query",
                                                                  lambda v=variant: v.score(queries))
    for label, (layout, proj_dim, estimator, dtype) in SOURCE_VARIANTS.items():
        if label not in methods:
            continue
        proj_dim = proj_dim or k
        _, layout_trajectory = sc.attributed_run(scenario, seed, layout)
        path = os.path.join(folder, f"source_{layout}_{estimator}_{dtype}_k{proj_dim}.zarr")
        att = _featurized(model, layout_trajectory("steps"), path, timer, label, proj_dim=proj_dim,
                          hessian=estimator, feature_dtype=dtype)
        for protocol in PROTOCOLS:
            variant = SourceVariant(att, layout_trajectory(protocol))
            scores[label, protocol] = timed(label, lambda v=variant: v.score(queries))
    if "SOURCE Kronecker projection" in methods:
        from srcproj import KroneckerProjector

        label = "SOURCE Kronecker projection"
        att = _featurized(model, trajectory("steps"), os.path.join(folder, f"kronecker_k{k}.zarr"), timer, label,
                          projector=KroneckerProjector(k, seed=0))
        for protocol in PROTOCOLS:
            variant = SourceVariant(att, trajectory(protocol))
            scores[label, protocol] = timed(label, lambda v=variant: v.score(queries))
    if "Fast-SOURCE" in methods:
        att = _featurized(model, average_checkpoints(trajectory("steps")), os.path.join(folder, f"fast_k{k}.zarr"),
                          timer, "Fast-SOURCE", proj_dim=k)
        for protocol in PROTOCOLS:
            fast = average_checkpoints(trajectory(protocol))
            scores["Fast-SOURCE", protocol] = timed("Fast-SOURCE",
                                                    lambda a=att, t=fast: SourceVariant(a, t).score(queries))
    if "TRAK (official)" in methods:
        from trak_official import official_trak_scores

        out, seconds = official_trak_scores(make_mlp(sc.HIDDEN), [final], (scenario.target.X, scenario.target.y),
                                            queries, proj_dim=k, seed=0)
        timer.add("TRAK (official)", seconds)
        for protocol in PROTOCOLS:
            scores["TRAK (official)", protocol] = out
    return scores, selfinf, final


def label_baseline(scenario: sc.Scenario, queries) -> np.ndarray:
    return (queries[1][:, None] == scenario.target.y[None, :]).double().numpy()


def final_losses(scenario: sc.Scenario, seed: int) -> np.ndarray:
    final, _ = sc.attributed_run(scenario, seed)
    model = make_mlp(sc.HIDDEN)
    model.load_state_dict(final)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(scenario.target.X), scenario.target.y,
                                                 reduction="none").double().numpy()


# SOURCE settings compared with its defaults (the scenario's segments of 2 checkpoints,
# k = --proj-dim, exact Hessian): label -> (checkpoint grouping, see
# scenarios.attributed_run; k, None for --proj-dim; Hessian estimator; feature dtype).
SOURCE_VARIANTS = {
    "SOURCE empirical Hessian": ("default", None, "empirical", "float16"),
    "SOURCE fisher Hessian": ("default", None, "fisher", "float16"),
    "SOURCE one segment per stage": ("one-segment", None, "exact", "float16"),
    "SOURCE one checkpoint per segment": ("fine", None, "exact", "float16"),
    "SOURCE k=128": ("default", 128, "exact", "float16"),
    "SOURCE k=2048": ("default", 2048, "exact", "float16"),
    "SOURCE float32 features": ("default", None, "exact", "float32"),
}
# The default before issue 18 (every segment chained, ψ over the last segment), from SOURCE's store.
CHAINED = "SOURCE, segments chained"
ALL_METHODS = ("IF", "TracIn", "TRAK (srcproj)", "TRAK (official)", "RepSim", "Fast-SOURCE", CHAINED,
               "SOURCE last-segment query", *SOURCE_VARIANTS, "SOURCE Kronecker projection")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(sc.SCENARIOS), choices=(*sc.SCENARIOS, "lm"),
                        help="digits scenarios (default: all three); 'lm': the small GPT-2 of lm_lds.py, with its "
                        "own settings (100 subsets x 6 seeds, 2 models, k = 2048; about an hour)")
    parser.add_argument("--split", choices=("tune", "report"), default="report")
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--subsets", type=int, default=Settings.subsets)
    parser.add_argument("--seeds", type=int, default=Settings.seeds)
    parser.add_argument("--models", type=int, default=Settings.models)
    parser.add_argument("--proj-dim", type=int, default=Settings.proj_dim)
    parser.add_argument("--processes", type=int, default=Settings.processes)
    parser.add_argument("--cache", default=Settings.cache)
    parser.add_argument("--stores", default=None, help="folder for the attribution stores (default: CACHE/stores)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--markdown", default=None, help="file for the results as markdown tables")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: a quick end-to-end check")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = Settings(args.subsets, args.seeds, args.models, args.proj_dim, 360, args.processes, args.cache,
                        stores=args.stores)
    if args.smoke:
        settings = Settings(subsets=12, seeds=2, models=2, proj_dim=64, queries=40, processes=1,
                            cache=args.cache, batch=12, stores=args.stores)
    methods = set(args.methods)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; split {args.split}; "
          f"{settings.subsets} subsets × {settings.seeds} seeds, {settings.models} models, k = {settings.proj_dim}")
    split = SPLITS[args.split]
    model_seeds = [split["first_model_seed"] + m for m in range(settings.models)]
    results = {"settings": vars(settings), "split": args.split, "scenarios": {}}
    for name in args.scenarios:
        if name == "lm":
            import lm_lds

            lm_settings = lm_lds.Settings(cache=settings.cache, stores=settings.stores, processes=settings.processes)
            if args.smoke:
                lm_settings = lm_lds.Settings(subsets=8, seeds=1, models=1, proj_dim=32, processes=1,
                                              cache=settings.cache, stores=settings.stores)
            print(f"\n== lm: {lm_settings.subsets} subsets × {lm_settings.seeds} seeds, {lm_settings.models} models, "
                  f"k = {lm_settings.proj_dim}")
            results["scenarios"]["lm"] = lm_lds.evaluate(lm_settings, args.split, not args.no_progress)
            continue
        scenario = sc.make_scenario(name)
        print(f"\n== {name}: {scenario.description}; {sc.describe_steps(scenario)}")
        truth = ground_truth(name, scenario, settings, split, not args.no_progress)
        Xq, yq = scenario.queries
        picked = np.arange(split["first_query"], min(len(yq), settings.queries), 2)
        queries = (Xq[picked], yq[picked])
        timer = Timed()
        per_model, self_per_model, finals = [], [], []
        for seed in model_seeds:
            scores, selfinf, final = method_scores(name, scenario, seed, queries, settings, methods, timer)
            finals.append(final)
            label = label_baseline(scenario, queries)
            # Final loss: every query ranks the training examples by their final loss, the
            # highest (mislabeled, memorised) as the most harmful.
            loss = -np.broadcast_to(final_losses(scenario, seed)[None, :], label.shape)
            for protocol in PROTOCOLS:
                scores["same label", protocol] = label
                scores["final loss", protocol] = loss
            per_model.append(scores)
            self_per_model.append(selfinf)
        ensembled = {}
        if "TRAK (official)" in methods:
            # TRAK's own ensembling (it averages its kernel and 1 - p terms separately).
            from trak_official import official_trak_scores

            out, _ = official_trak_scores(make_mlp(sc.HIDDEN), finals, (scenario.target.X, scenario.target.y),
                                          queries, proj_dim=settings.proj_dim, seed=0)
            for protocol in PROTOCOLS:
                ensembled["TRAK (official)", protocol] = out
        table, per_query = {}, {}
        for protocol in PROTOCOLS:
            outputs = truth["outputs"][protocol][:, :, picked]
            for key in per_model[0]:
                if key[1] != protocol:
                    continue
                single = lds(per_model[0][key], truth["masks"], outputs)
                per_query[key] = single.per_query
                combined = ensembled.get(key)
                if combined is None:
                    combined = np.mean([m[key] for m in per_model], axis=0)
                ensemble = lds(combined, truth["masks"], outputs)
                table[f"{key[0]} | {protocol}"] = {
                    "single": single.mean, "single_ci": single.ci_subsets, "single_ci_queries": single.ci_queries,
                    "ensemble": ensemble.mean, "ensemble_ci": ensemble.ci_subsets,
                    "seconds_per_model": timer.seconds.get(key[0], 0.0) / settings.models,
                }
        entry = {"lds": table, "description": scenario.description, "steps": sc.describe_steps(scenario),
                 "source_vs_runner_up": _source_vs_runner_up(table, per_query)}
        for protocol, versus in entry["source_vs_runner_up"].items():
            print(f"SOURCE ({protocol}) − {versus['other']}, one model: {versus['diff']:+.3f} "
                  f"[{versus['ci'][0]:+.3f}, {versus['ci'][1]:+.3f}]")
        print(f"{'method':<28} {'protocol':<7} {'LDS 1 model':>22} {'LDS ensemble':>22} {'s/model':>8}")
        for key, row in sorted(table.items(), key=lambda kv: (kv[0].split(' | ')[1], -kv[1]['single'])):
            method, protocol = key.split(" | ")
            lo, hi = row["single_ci"]
            elo, ehi = row["ensemble_ci"]
            print(f"{method:<28} {protocol:<7} {row['single']:>7.3f} [{lo:.3f}, {hi:.3f}] "
                  f"{row['ensemble']:>7.3f} [{elo:.3f}, {ehi:.3f}] {row['seconds_per_model']:>8.2f}")
        if scenario.flipped is not None:
            losses = np.mean([final_losses(scenario, seed) for seed in model_seeds], axis=0)
            rankings = {"final loss": losses}
            for key in self_per_model[0]:
                rankings[f"{key} self-influence"] = np.mean([s[key] for s in self_per_model], axis=0)
            found = {}
            print("mislabeled detection (30% flipped): rank by", ", ".join(rankings))
            for key, values in rankings.items():
                result = detection(values, scenario.flipped)
                found[key] = {"auc": result.auc, "found": result.found}
                shown = ", ".join(f"top {int(f * 100)}%: {v:.2f}" for f, v in result.found.items())
                print(f"  {key:<28} AUC {result.auc:.3f}; {shown}")
            entry["detection"] = found
        results["scenarios"][name] = entry
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1, default=float)
        print(f"\nwrote {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown_tables(results))
        print(f"wrote {args.markdown}")


def _source_vs_runner_up(table: dict, per_query: dict) -> dict:
    """Per protocol, SOURCE (told the protocol, §8) minus the best other method, one model:
    the paired bootstrap over queries. SOURCE's own variants are not other methods."""
    out = {}
    for protocol in PROTOCOLS:
        others = [key for key in per_query if key[1] == protocol and not key[0].startswith(("SOURCE", "Fast-SOURCE"))]
        if ("SOURCE", protocol) not in per_query or not others:
            continue
        runner_up = max(others, key=lambda key: table[f"{key[0]} | {protocol}"]["single"])
        d = paired_difference(per_query["SOURCE", protocol], per_query[runner_up])
        out[protocol] = {"other": runner_up[0], "diff": d.mean, "ci": list(d.ci)}
    return out


def markdown_tables(results: dict) -> str:
    """The LDS tables of docs/benchmarks.md, one per scenario, best single-model first."""
    lines = []
    for name, entry in results["scenarios"].items():
        rows = {}
        for key, row in entry["lds"].items():
            method, protocol = key.split(" | ")
            rows.setdefault(method, {})[protocol] = row
        lines += [f"### {name}: {entry['description']} ({entry['steps']})", "",
                  "| method | same steps, 1 model | same epochs, 1 model | same steps, ensemble | "
                  "same epochs, ensemble | s per model |", "|---|---:|---:|---:|---:|---:|"]
        for method, row in sorted(rows.items(), key=lambda kv: -kv[1]["steps"]["single"]):
            cells = []
            for kind in ("single", "ensemble"):
                for protocol in ("steps", "epochs"):
                    r = row.get(protocol)
                    if r is None:  # a scenario measured under one protocol (lm: same steps)
                        cells.append((protocol, kind, "—"))
                        continue
                    lo, hi = r[f"{kind}_ci"]
                    cells.append((protocol, kind, f"{r[kind]:.3f} [{lo:.3f}, {hi:.3f}]"))
            ordered = [c[2] for c in sorted(cells, key=lambda c: (c[1] != "single", c[0] != "steps"))]
            lines.append(f"| {method} | " + " | ".join(ordered) + f" | {row['steps']['seconds_per_model']:.2f} |")
        lines.append("")
        versus = entry.get("source_vs_runner_up") or {}
        if versus:
            lines.append("SOURCE minus the best other method, one model (paired bootstrap over queries): " + "; ".join(
                f"same {protocol}: {v['diff']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] vs {v['other']}"
                for protocol, v in versus.items()))
            lines.append("")
        if "detection" in entry:
            lines += ["Mislabeled detection (30% of labels flipped), ensemble-averaged rankings:", "",
                      "| ranking | ROC-AUC | found in top 5% | 10% | 20% | 30% |", "|---|---:|---:|---:|---:|---:|"]
            for key, d in entry["detection"].items():
                found = [d["found"][f] for f in sorted(d["found"], key=float)]
                lines.append(f"| {key} | {d['auc']:.3f} | " + " | ".join(f"{v:.2f}" for v in found) + " |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
