"""LDS benchmark of SOURCE on AdamW runs (issue 12): its AdamW path, ablations, baselines.

    python benchmarks/adam_lds.py --truth-only --split tune     # retrain the ground truth only
    python benchmarks/adam_lds.py --truth-only --split report
    python benchmarks/adam_lds.py --split report --scenarios adamw-cosine --out adam.json
    python benchmarks/adam_lds.py --smoke                       # a toy-size end-to-end check

Scenarios (benchmarks/adam_scenarios.py): ``adamw-cosine`` (one stage, warm-up then
cosine decay) and ``adamw-twostage`` (two data sets, warm-up then constant; held out
from all tuning). Ground truth: ``--subsets`` random 50% subsets of the attribution
target, each retrained ``--seeds`` times under two protocols by a stacked trainer with a
hand-written AdamW identical to ``torch.optim.AdamW``, cached under
``--cache``/ground_truth/<scenario>/<protocol>/ by :func:`srcproj.eval.retrain`:

- ``steps``: a subset trains for as many optimizer steps as the full run;
- ``epochs``: for as many epochs (half the steps in the target stage), the learning-rate
  schedule compressed to the shorter run (adam_scenarios.py's docstring). SOURCE-type
  methods are told so by :class:`srcproj.baselines.SourceVariant` with segments cut at
  the same fractions of the shorter stage and the compressed schedule's rates; the other
  methods have no notion of it.

Splits as benchmarks/lds.py (``tune``: subsets seed 18, retraining seeds 0+, models
2000+, even test indices; ``report``: subsets seed 17, retraining seeds 10+, models
1000+, odd test indices). Each method is evaluated on one attributed model and as the
mean score of ``--models`` independently trained ones.

Methods (one attributed run: ``torch.optim.AdamW`` with two groups, ``LambdaLR``,
checkpoints ``{"model", "optimizer"}``, per-step rates of group 0):

- ``SOURCE (AdamW default)``: ``Trajectory(segments, optimizer=AdamW over the model)``;
- ``SOURCE per-segment preconditioner``: the same with ``preconditioner="segment"``;
- ``SOURCE without optimizer state``: model-only checkpoints,
  ``Trajectory(..., optimizer=opt, batch_size=64)`` (v estimated from gradients);
- ``SOURCE time ×0.2`` / ``SOURCE time ×5``: every segment's rates scaled (SourceVariant
  on the default store);
- ``IF``: ``InfluenceFunction(default store)`` with its default damping, as lds.py (the
  run's weight decay as it enters the final segment's preconditioned Hessian; the value
  used is in the JSON, ``if_damping``); ``IF (oracle damping)``: the same at the best of
  ``ORACLE_DAMPINGS`` (multiples of the mean eigenvalue of the final Hessian) on the
  evaluated split and protocol, an advantage given to the baseline; ``IF plain gradients
  (oracle damping)``: the same on the store of the run described as SGD (gradients not
  preconditioned); ``Adam TracIn`` (TracIn on the default, preconditioned store);
  ``TRAK (srcproj)``: TRAK's kernel at the best of those dampings (relative to the mean
  eigenvalue of ΦᵀΦ), since k may exceed N;
- ``SOURCE fixed second moment``: ``adam_response="fixed"`` (Adam's v̂ held fixed, the
  paper's Appendix C) instead of the default linearized step;
- ``SOURCE as SGD`` / ``SOURCE as SGD+momentum``: model-only checkpoints described as
  SGD with weight decay 0.01, without and with momentum 0.9 (what a user of an SGD-only
  tool would do);
- ``same label``: 1 where the training label equals the query's.

For each scenario, protocol and split: the LDS of each method (bootstrap interval over
subsets), and paired bootstrap intervals over queries (2,000 resamples) of each method's
per-query LDS minus that of the method ranked just below it (for the best: minus the
runner-up) and minus the default's. Time: each method's own wall seconds per model
(featurize counted when its store was made, as lds.py; variants count their scoring).
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

import adam_scenarios as asc  # noqa: E402
from lds import SPLITS, Timed, _featurized  # noqa: E402
from paired_lds import paired_difference  # noqa: E402

from srcproj import Trajectory  # noqa: E402
from srcproj.baselines import TRAK, InfluenceFunction, SourceVariant, TracIn  # noqa: E402
from srcproj.demo import make_mlp  # noqa: E402
from srcproj.eval import draw_subsets, lds, retrain  # noqa: E402

PROTOCOLS = asc.PROTOCOLS
DEFAULT = "SOURCE (AdamW default)"  # preconditioner="shared", adam_response="linearized"
TIME_SCALES = {"SOURCE time ×0.2": 0.2, "SOURCE time ×0.5": 0.5, "SOURCE time ×2": 2.0, "SOURCE time ×5": 5.0}
CHAINED = "SOURCE, segments chained"  # the default before issue 18: every segment chained, ψ over the last one
ADAM_METHODS = (DEFAULT, CHAINED, "SOURCE per-segment preconditioner", "SOURCE without optimizer state",
                "SOURCE fixed second moment", *TIME_SCALES, "IF", "IF (oracle damping)",
                "Adam TracIn", "TRAK (srcproj)")
SGD_METHODS = ("SOURCE as SGD", "SOURCE as SGD+momentum", "IF plain gradients (oracle damping)")
ALL_METHODS = ADAM_METHODS + SGD_METHODS
NEEDS_DEFAULT_STORE = {DEFAULT, CHAINED, *TIME_SCALES, "IF", "IF (oracle damping)", "Adam TracIn", "TRAK (srcproj)"}
#: Damping of the oracle influence functions: these multiples of the mean eigenvalue of
#: the final checkpoint's Hessian are all scored, and the best on the evaluated split
#: and protocol is reported (an advantage given to the baseline, not to SOURCE).
ORACLE_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass
class Settings:
    subsets: int = 100
    seeds: int = 10
    models: int = 3
    proj_dim: int = 2048  # srcproj's default
    queries: int = 360
    processes: int = 1
    cache: str = "benchmarks/.cache"
    batch: int = 100
    stores: str | None = None


def ground_truth(name: str, scenario: asc.AdamScenario, settings: Settings, split: dict, progress: bool) -> dict:
    """Masks ``(S, N)`` and retrained margins ``{protocol: (S, R, all queries)}``, cached."""
    masks = draw_subsets(scenario.num_targets, settings.subsets, 0.5, seed=split["subset_seed"])
    seeds = range(split["first_retrain_seed"], split["first_retrain_seed"] + settings.seeds)
    outputs, seconds = {}, {}
    for protocol in PROTOCOLS:
        folder = os.path.join(settings.cache, "ground_truth", name, protocol)
        began = time.perf_counter()
        outputs[protocol] = retrain(asc.GroundTruthFn(name, protocol), masks, seeds, folder,
                                    processes=settings.processes, progress=progress,
                                    models_per_call=settings.batch)
        seconds[protocol] = time.perf_counter() - began
        print(f"  ground truth {name}/{protocol}: {outputs[protocol].shape} in {seconds[protocol]:.1f} s", flush=True)
    return {"masks": masks, "outputs": outputs, "seconds": seconds}


def adam_trajectory(segments, model, **kwargs) -> Trajectory:
    """``Trajectory(segments, optimizer=AdamW over model with the run's groups)``."""
    return Trajectory(segments, optimizer=asc.make_optimizer(model), **kwargs)


def sgd_trajectory(segments, momentum: float) -> Trajectory:
    return Trajectory(segments, momentum=momentum, weight_decay=asc.WEIGHT_DECAY)


def method_scores(name: str, run: asc.AttributedRun, queries, settings: Settings, methods: set[str],
                  timer: Timed) -> tuple[dict, dict]:
    """Scores ``(Q, N_target)`` per (method, protocol) for one attributed model, and notes (IF's damping)."""
    folder = os.path.join(settings.stores or os.path.join(settings.cache, "stores"), name, f"model{run.seed}")
    os.makedirs(folder, exist_ok=True)
    k = settings.proj_dim
    model = make_mlp(asc.HIDDEN)
    scores: dict[tuple[str, str], np.ndarray] = {}
    info: dict = {}

    def timed(key, fn):
        began = time.perf_counter()
        out = fn()
        timer.add(key, time.perf_counter() - began)
        return out

    def store(label: str) -> str:
        return os.path.join(folder, f"{label}_k{k}.zarr")

    def source_family(label, path, make_trajectory, **kwargs):
        """Featurize with the ``steps`` trajectory; score both protocols with SourceVariant."""
        att = _featurized(model, make_trajectory("steps"), path, timer, label, proj_dim=k, **kwargs)
        for protocol in PROTOCOLS:
            variant = SourceVariant(att, make_trajectory(protocol))
            scores[label, protocol] = timed(label, lambda v=variant: v.score(queries))
        return att

    base = None
    if methods & NEEDS_DEFAULT_STORE:
        def default_trajectory(protocol, scale=1.0):
            return adam_trajectory(run.segments(protocol, time_scale=scale), model)

        base = _featurized(model, default_trajectory("steps"), store("adamw_default"), timer, DEFAULT, proj_dim=k)
        if DEFAULT in methods:
            for protocol in PROTOCOLS:
                variant = SourceVariant(base, default_trajectory(protocol))
                scores[DEFAULT, protocol] = timed(DEFAULT, lambda v=variant: v.score(queries))
        if CHAINED in methods:
            for protocol in PROTOCOLS:
                variant = SourceVariant(base, default_trajectory(protocol), unroll="segments",
                                        query="last_segment")
                scores[CHAINED, protocol] = timed(CHAINED, lambda v=variant: v.score(queries))
        for label, scale in TIME_SCALES.items():
            if label in methods:
                for protocol in PROTOCOLS:
                    variant = SourceVariant(base, default_trajectory(protocol, scale))
                    scores[label, protocol] = timed(label, lambda v=variant: v.score(queries))
        shared = {"IF": lambda: InfluenceFunction(base), "Adam TracIn": lambda: TracIn(base)}
        if "TRAK (srcproj)" in methods:  # k may exceed N: TRAK's kernel then needs damping, given as an oracle
            phi = base.checkpoint_features(-1, "measurement").astype(np.float64)
            mean_eigenvalue = float((phi * phi).sum() / phi.shape[1])
            for factor in ORACLE_DAMPINGS[1:]:
                method = timed("TRAK (srcproj)", lambda f=factor: TRAK(base, damping=f * mean_eigenvalue))
                out = timed("TRAK (srcproj)", lambda m=method: m.score(queries))
                for protocol in PROTOCOLS:
                    scores[f"TRAK (srcproj)@{factor:g}", protocol] = out
        for label, make in shared.items():
            if label in methods:
                method = timed(label, make)
                out = timed(label, lambda m=method: m.score(queries))
                for protocol in PROTOCOLS:
                    scores[label, protocol] = out
                if label == "IF":
                    info["if_damping"] = method.damping
        if "IF (oracle damping)" in methods:
            _oracle_if(base, queries, scores, "IF (oracle damping)", timed)
    if "SOURCE fixed second moment" in methods:
        source_family("SOURCE fixed second moment", store("adamw_fixed"),
                      lambda p: adam_trajectory(run.segments(p), model), adam_response="fixed")
    if "SOURCE per-segment preconditioner" in methods:
        source_family("SOURCE per-segment preconditioner", store("adamw_segment"),
                      lambda p: adam_trajectory(run.segments(p), model), preconditioner="segment")
    if "SOURCE without optimizer state" in methods:
        source_family("SOURCE without optimizer state", store("adamw_model_only"),
                      lambda p: adam_trajectory(run.segments(p, model_only=True), model, batch_size=asc.BATCH))
    for label, momentum in (("SOURCE as SGD", 0.0), ("SOURCE as SGD+momentum", 0.9)):
        plain_if = label == "SOURCE as SGD" and "IF plain gradients (oracle damping)" in methods
        if label in methods or plain_if:
            att = source_family(label, store(f"sgd_m{momentum}"),
                                lambda p, m=momentum: sgd_trajectory(run.segments(p, model_only=True), m))
            if plain_if:
                _oracle_if(att, queries, scores, "IF plain gradients (oracle damping)", timed)
    return scores, info


def _oracle_if(attributor, queries, scores: dict, label: str, timed) -> None:
    """The influence function at every damping of ORACLE_DAMPINGS (``evaluate`` keeps the best)."""
    mean_eigenvalue = float(np.mean(np.linalg.eigvalsh(attributor.checkpoint_hessian(-1))))
    for factor in ORACLE_DAMPINGS:
        method = InfluenceFunction(attributor, damping=max(factor * mean_eigenvalue, 1e-12))
        out = timed(label, lambda m=method: m.score(queries))
        for protocol in PROTOCOLS:
            scores[f"{label}@{factor:g}", protocol] = out


def label_baseline(scenario: asc.AdamScenario, queries) -> np.ndarray:
    return (queries[1][:, None] == scenario.target.y[None, :]).double().numpy()


def _row(result, ensemble) -> dict:
    return {"single": result.mean, "single_ci": list(result.ci_subsets), "single_ci_queries": list(result.ci_queries),
            "ensemble": ensemble.mean, "ensemble_ci": list(ensemble.ci_subsets)}


def _paired(per_query: dict[str, np.ndarray], ranked: list[str], default: str | None) -> dict[str, dict]:
    out = {}
    for i, method in enumerate(ranked):
        entry = {}
        other = ranked[i + 1] if i + 1 < len(ranked) else None
        if other is not None:
            d = paired_difference(per_query[method], per_query[other])
            entry["vs_next"] = {"other": other, "diff": d.mean, "ci": list(d.ci)}
        if default is not None and method != default and default in per_query:
            d = paired_difference(per_query[method], per_query[default])
            entry["vs_default"] = {"diff": d.mean, "ci": list(d.ci)}
        out[method] = entry
    return out


def evaluate(truth: dict, per_model: list[dict], picked: np.ndarray, timer: Timed, models: int) -> dict:
    """LDS rows per (protocol, method) and the paired differences over queries."""
    table = {}
    for protocol in PROTOCOLS:
        outputs = truth["outputs"][protocol][:, :, picked]
        keys = [key for key in per_model[0] if key[1] == protocol]
        rows, single_q, ensemble_q = {}, {}, {}
        for key in keys:
            single = lds(per_model[0][key], truth["masks"], outputs)
            ensemble = lds(np.mean([m[key] for m in per_model], axis=0), truth["masks"], outputs)
            rows[key[0]] = _row(single, ensemble)
            rows[key[0]]["seconds_per_model"] = timer.seconds.get(key[0], 0.0) / models
            single_q[key[0]], ensemble_q[key[0]] = single.per_query, ensemble.per_query
        # An oracle method keeps its best damping on this split and protocol (by one model's LDS).
        for label in {name.split("@")[0] for name in rows if "@" in name}:
            tried = [name for name in rows if name.startswith(label + "@")]
            best = max(tried, key=lambda name: rows[name]["single"])
            rows[label] = {**rows[best], "oracle_damping_factor": float(best.split("@")[1]),
                           "seconds_per_model": timer.seconds.get(label, 0.0) / models}
            single_q[label], ensemble_q[label] = single_q[best], ensemble_q[best]
            for name in tried:
                del rows[name], single_q[name], ensemble_q[name]
        default = DEFAULT if DEFAULT in rows else None
        for kind, per_query in (("single", single_q), ("ensemble", ensemble_q)):
            ranked = sorted(rows, key=lambda m, kind=kind: -rows[m][kind])
            for method, entry in _paired(per_query, ranked, default).items():
                rows[method][f"{kind}_paired"] = entry
        table[protocol] = rows
    return table


def _interval(value: float, ci) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _diff(entry: dict | None) -> str:
    if not entry:
        return "—"
    return f"{entry['diff']:+.3f} [{entry['ci'][0]:+.3f}, {entry['ci'][1]:+.3f}]"


def markdown_tables(results: dict) -> str:
    """One table per scenario and protocol, best single-model LDS first."""
    lines = []
    for name, entry in results["scenarios"].items():
        for protocol, rows in entry["lds"].items():
            lines += [f"### {name}, same {protocol} ({results['split']} split): {entry['description']} "
                      f"({entry['steps']}; test accuracy {entry['test_accuracy']:.3f})", "",
                      "| method | LDS, 1 model | Δ next below, 1 model | Δ vs default, 1 model | LDS, ensemble "
                      f"of {results['settings']['models']} | Δ vs default, ensemble | s per model |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for method, row in sorted(rows.items(), key=lambda kv: -kv[1]["single"]):
                paired, ens = row.get("single_paired", {}), row.get("ensemble_paired", {})
                nxt = paired.get("vs_next")
                nxt_text = f"{_diff(nxt)} vs {nxt['other']}" if nxt else "—"
                shown = method
                if "oracle_damping_factor" in row:
                    shown = f"{method}: δ = {row['oracle_damping_factor']:g}·mean λ"
                lines.append(f"| {shown} | {_interval(row['single'], row['single_ci'])} | {nxt_text} | "
                             f"{_diff(paired.get('vs_default'))} | {_interval(row['ensemble'], row['ensemble_ci'])} | "
                             f"{_diff(ens.get('vs_default'))} | {row['seconds_per_model']:.2f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(asc.SCENARIOS), choices=asc.SCENARIOS)
    parser.add_argument("--split", choices=("tune", "report"), default="report")
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--subsets", type=int, default=Settings.subsets)
    parser.add_argument("--seeds", type=int, default=Settings.seeds)
    parser.add_argument("--models", type=int, default=Settings.models)
    parser.add_argument("--proj-dim", type=int, default=Settings.proj_dim)
    parser.add_argument("--queries", type=int, default=Settings.queries,
                        help="test indices below this; the split takes every other one")
    parser.add_argument("--processes", type=int, default=Settings.processes, help="ground-truth worker processes")
    parser.add_argument("--cache", default=Settings.cache)
    parser.add_argument("--stores", default=None, help="folder for the attribution stores (default: CACHE/stores)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--markdown", default=None, help="file for the results as markdown tables")
    parser.add_argument("--truth-only", action="store_true", help="compute (or check) the ground truth and stop")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: a quick end-to-end check")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings(args.subsets, args.seeds, args.models, args.proj_dim, args.queries, args.processes,
                        args.cache, stores=args.stores)
    if args.smoke:
        settings = Settings(subsets=12, seeds=2, models=2, proj_dim=64, queries=40, processes=1, cache=args.cache,
                            batch=24, stores=args.stores)
    methods = set(args.methods)
    split = SPLITS[args.split]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; split {args.split}; "
          f"{settings.subsets} subsets × {settings.seeds} seeds, {settings.models} models, k = {settings.proj_dim}",
          flush=True)
    model_seeds = [split["first_model_seed"] + m for m in range(settings.models)]
    results = {"settings": vars(settings), "split": args.split, "machine": platform.machine(),
               "cores": os.cpu_count(), "torch": torch.__version__, "scenarios": {}}
    for name in args.scenarios:
        scenario = asc.make_scenario(name)
        print(f"\n== {name}: {scenario.description}; {asc.describe_steps(scenario)}", flush=True)
        truth = ground_truth(name, scenario, settings, split, not args.no_progress)
        if args.truth_only:
            results["scenarios"][name] = {"ground_truth_seconds": truth["seconds"]}
            continue
        Xq, yq = scenario.queries
        picked = np.arange(split["first_query"], min(len(yq), settings.queries), 2)
        queries = (Xq[picked], yq[picked])
        timer = Timed()
        per_model, accuracies, notes = [], [], []
        for seed in model_seeds:
            began = time.perf_counter()
            run = asc.attributed_run(scenario, seed)
            accuracies.append(run.test_accuracy)
            print(f"  model {seed}: trained in {time.perf_counter() - began:.1f} s, test accuracy "
                  f"{accuracies[-1]:.3f}", flush=True)
            scores, info = method_scores(name, run, queries, settings, methods, timer)
            notes.append({"model_seed": seed, "test_accuracy": accuracies[-1], **info})
            label = label_baseline(scenario, queries)
            for protocol in PROTOCOLS:
                scores["same label", protocol] = label
            per_model.append(scores)
        table = evaluate(truth, per_model, picked, timer, settings.models)
        entry = {"lds": table, "description": scenario.description, "steps": asc.describe_steps(scenario),
                 "test_accuracy": float(np.mean(accuracies)), "queries": int(len(picked)),
                 "ground_truth_seconds": truth["seconds"], "models": notes}
        results["scenarios"][name] = entry
        print(markdown_tables({**results, "scenarios": {name: entry}}), flush=True)
        if args.out:  # after every scenario, so a long run keeps what it finished
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=1, default=float)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1, default=float)
        print(f"\nwrote {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown_tables(results))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
