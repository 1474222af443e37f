"""Paired LDS: does a faster srcproj path lose accuracy against a reference path?

For a scenario of ``benchmarks/end_to_end.py`` with a cached ground truth (``mlp-lds``,
``cnn-digits``, and ``lds.py``'s ``converged``, ``noisy-short``, ``two-stage`` where
their retraining results are cached), the same attributed model, checkpoints, training
data, queries, k and projection seed are given to two srcproj installations, each in its
own subprocess with one thread:

* the **reference** ("today's path"): srcproj imported from ``--reference-path``, a
  directory holding a ``srcproj/`` package (e.g. a worktree of an older commit,
  ``git worktree add /tmp/srcproj-old 0170db1``); it is put first on ``PYTHONPATH``,
  nothing is installed;
* the **candidate**: srcproj imported from ``--candidate-path`` (default: this
  checkout), with the extra ``Attributor`` keyword arguments of ``--candidate-kwargs``
  (JSON; the option may be repeated, each one a comparison with the same reference
  run).

Each runs ``Attributor(model, ClassificationTask(), trajectory, store, proj_dim=k,
seed=seed, **kwargs)``, ``featurize()`` and ``score(queries)``; the wall time reported
is featurize + score (building the Attributor is recorded in the JSON). Each variant's
per-query LDS is the Spearman correlation, over the ground truth's subsets, between the
summed scores of a subset's examples and the retrained models' mean margin
(:func:`srcproj.eval.lds`, the "same steps" protocol of the ``report`` split of
``benchmarks/lds.py``, as ``end_to_end.py`` computes it). The paired difference is the
mean over queries of candidate − reference, with a percentile bootstrap interval over
queries (:func:`paired_difference`: queries resampled with replacement, 2,000 resamples,
a fixed seed). Issue 11 asks that this interval include 0 or lie above it ("ok" in the
table; "WORSE" otherwise). Each line also gives how close the candidate's scores are to
the reference's: their mean per-query Spearman correlation and the largest absolute
difference over the largest absolute reference score.

The ground truth is only read from ``--cache`` (never retrained, except the toy one of
``--quick``); a scenario whose ground truth is not fully cached is skipped with a note.

    git worktree add /tmp/srcproj-old 0170db1
    python benchmarks/paired_lds.py --scenario mlp-lds cnn-digits --reference-path /tmp/srcproj-old
    python benchmarks/paired_lds.py --scenario cnn-digits --reference-path /tmp/srcproj-old \\
        --candidate-kwargs '{"hessian_sample": 250}' --candidate-kwargs '{"hessian_sample": 100}' --json out.json
    python benchmarks/paired_lds.py --scenario converged --subsets 50 --seeds 3 --reference-path /tmp/srcproj-old
    python benchmarks/paired_lds.py --scenario mlp-lds --quick --reference-path /tmp/srcproj-old  # toy size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LDS_SCENARIOS = ("mlp-lds", "cnn-digits", "converged", "noisy-short", "two-stage")


# --------------------------------------------------------------------------- statistics
@dataclass
class PairedDifference:
    """The mean paired difference of per-query values and its bootstrap interval.

    Attributes
    ----------
    mean : float
        Mean over the paired queries of ``candidate - reference``.
    ci : tuple of float
        Percentile bootstrap interval of ``mean``, queries resampled with replacement.
    num_queries : int
        Queries where both values are defined (not NaN); only these are paired.
    confidence : float
        The interval's confidence level.
    """

    mean: float
    ci: tuple[float, float]
    num_queries: int
    confidence: float

    @property
    def not_worse(self) -> bool:
        """True when the interval includes 0 or lies above it (no accuracy lost)."""
        return bool(self.ci[1] >= 0.0)


def paired_difference(candidate, reference, num_bootstrap: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> PairedDifference:
    """Mean of ``candidate - reference`` over queries, with a bootstrap interval over queries.

    Parameters
    ----------
    candidate, reference : array_like, shape (Q,)
        One value per query (e.g. each query's LDS) for the two variants, same queries in
        the same order. A query where either is NaN is left out of both.
    num_bootstrap : int, default 2000
        Bootstrap resamples.
    confidence : float, default 0.95
        Confidence level of the percentile interval, in (0, 1).
    seed : int, default 0
        Seed of the resampling (the same seed gives the same interval).

    Returns
    -------
    PairedDifference
        The mean difference, its interval and the number of paired queries.

    Raises
    ------
    ValueError
        Shapes that differ or are not 1-D, no query defined in both, a confidence outside
        (0, 1) or fewer than one resample.
    """
    cand = np.asarray(candidate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if cand.ndim != 1 or cand.shape != ref.shape:
        raise ValueError(f"candidate {cand.shape} and reference {ref.shape} must be 1-D with one value per query")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}; it must lie strictly between 0 and 1")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap={num_bootstrap}; it must be at least 1")
    both = ~(np.isnan(cand) | np.isnan(ref))
    diff = cand[both] - ref[both]
    if diff.size == 0:
        raise ValueError("no query has a defined value in both variants")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(num_bootstrap, diff.size))].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.percentile(means, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return PairedDifference(float(diff.mean()), (float(lo), float(hi)), int(diff.size), confidence)


# --------------------------------------------------------------------------- child side
def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM), 0 where unknown."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child(config: dict) -> dict:
    """Featurize and score with the srcproj found under ``config["srcproj_path"]``."""
    root = os.path.abspath(config["srcproj_path"])
    sys.path.insert(0, root)
    import torch

    torch.set_num_threads(config["threads"])
    import srcproj  # before any benchmark module can put another checkout first on sys.path

    found = os.path.abspath(srcproj.__file__)
    if not found.startswith(os.path.join(root, "srcproj") + os.sep):
        raise ImportError(f"srcproj was imported from {found}, not from {root}")
    sys.path.insert(1, HERE)
    from end_to_end import model_factory

    from srcproj import Attributor, ClassificationTask, Segment, Trajectory

    job = torch.load(config["job"], weights_only=True)
    make_model = model_factory(job["scenario"])
    store = tempfile.mkdtemp(prefix="paired_", dir=config["workdir"])
    began = time.perf_counter()
    trajectory = Trajectory(
        [Segment(s["checkpoints"], s["steps"], s["lr"], job["stages"][s["stage"]]) for s in job["segments"]],
        momentum=job["momentum"], weight_decay=job["weight_decay"])
    attributor = Attributor(make_model(0), ClassificationTask(), trajectory, os.path.join(store, "store.zarr"),
                            config["proj_dim"], config["seed"], **config["kwargs"])
    built = time.perf_counter()
    report = attributor.featurize(progress=False)
    featurized = time.perf_counter()
    scores = np.asarray(attributor.score(job["queries"]), dtype=np.float32)
    done = time.perf_counter()
    if not np.all(np.isfinite(scores)):
        raise FloatingPointError("srcproj returned non-finite scores")
    np.save(config["scores"], scores)
    shutil.rmtree(store, ignore_errors=True)
    return {"srcproj_file": found, "build_seconds": built - began, "featurize_seconds": featurized - built,
            "score_seconds": done - featurized, "wall_seconds": done - built, "proj_dim": attributor.proj_dim,
            "hessian": getattr(attributor, "hessian", None),
            "stage_seconds": dict(getattr(report, "stage_seconds", None) or {}), "peak_rss": _peak_rss(),
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- parent side
class GroundTruthMissing(RuntimeError):
    """A retraining result that the run needs is not in the cache."""


def _not_cached(mask, seed):
    raise GroundTruthMissing(f"no cached result for seed {seed}")


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _tree(path: str) -> str:
    """The commit of the checkout at ``path`` and whether its srcproj/ has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "srcproj"], cwd=path, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit or 'unknown'}{' + uncommitted srcproj/ changes' if dirty else ''}"


def _bench_modules():
    """``end_to_end``, ``lds`` and ``scenarios`` of this checkout (parent side only)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import end_to_end
    import lds
    import scenarios

    return end_to_end, lds, scenarios


def ground_truth(name: str, num_train: int, subsets: int, seeds: int, cache: str, quick: bool):
    """Masks and retrained query margins ``(S, R, all test queries)`` of the ``report`` split.

    Read from the cache ``end_to_end.py`` and ``lds.py`` share; only ``quick`` (a toy
    ground truth of its own) trains anything.

    Raises
    ------
    GroundTruthMissing
        Some (subset, seed) result is not cached.
    """
    end_to_end, lds_module, sc = _bench_modules()
    import functools

    from srcproj.eval import draw_subsets, retrain

    split = lds_module.SPLITS["report"]
    masks = draw_subsets(num_train, subsets, 0.5, seed=split["subset_seed"])
    seed_list = range(split["first_retrain_seed"], split["first_retrain_seed"] + seeds)
    if name in sc.SCENARIOS:
        folder = os.path.join(cache, "ground_truth", name, "steps")
    else:
        folder = os.path.join(cache, "ground_truth", f"e2e-{name}{'-quick' if quick else ''}", "steps")
    if quick:  # as end_to_end.py --quick: lds.py's scenarios keep their trainer and cache folder
        if name in sc.SCENARIOS:
            train_fn = sc.GroundTruthFn(name, "steps")
        else:
            train_fn = sc.ModuleGroundTruthFn(functools.partial(end_to_end.build_scenario, name, True), "steps")
        return masks, retrain(train_fn, masks, seed_list, folder, progress=False, models_per_call=50)
    held = len([f for f in os.listdir(folder) if f.endswith(".npy")]) if os.path.isdir(folder) else 0
    try:
        if not held:
            raise GroundTruthMissing("empty")
        outputs = retrain(_not_cached, masks, seed_list, folder, progress=False)
    except GroundTruthMissing:
        raise GroundTruthMissing(
            f"{folder} holds {held} retraining results; this run needs {subsets} subsets x {seeds} seeds (seeds "
            f"{split['first_retrain_seed']}+); pass --subsets/--seeds that were cached (the first S subsets and "
            f"R seeds of the report split)") from None
    return masks, outputs


def _run_child(config: dict, srcproj_path: str, timeout: float) -> dict:
    threads = str(config["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
           "PYTHONPATH": os.path.abspath(srcproj_path)}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=config["workdir"])
    if out.returncode != 0:
        raise RuntimeError(f"{config['label']} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mean_spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(np.nanmean([spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)]))


def _label(kwargs: dict) -> str:
    return "defaults" if not kwargs else ", ".join(f"{k}={v}" for k, v in kwargs.items())


def run_scenario(name: str, args) -> dict:
    """Both variants on one scenario: LDS of each, paired differences, wall times."""
    end_to_end, lds_module, _ = _bench_modules()
    from srcproj.eval import lds

    split = lds_module.SPLITS["report"]
    quick = args.quick
    scenario, _ = end_to_end.build_scenario(name, quick)
    subsets, seeds = (end_to_end.QUICK["subsets"], end_to_end.QUICK["seeds"]) if quick else (args.subsets, args.seeds)
    masks, outputs = ground_truth(name, scenario.num_targets, subsets, seeds, args.cache, quick)
    k = args.proj_dim or (end_to_end.QUICK["proj_dim"] if quick else end_to_end.SPECS[name].proj_dim)
    queries = end_to_end.QUICK["queries"] if quick else args.queries
    workdir = tempfile.mkdtemp(prefix=f"paired_{name}_")
    try:
        job = end_to_end._prepare_job(name, quick, split["first_model_seed"], workdir, queries, split["first_query"])
        truth = outputs[:, :, job["picked"]]
        print(f"\n== {name}: {job['params']:,} parameters, {job['num_train']:,} training examples, "
              f"{job['checkpoints']} checkpoint(s), {len(job['picked'])} queries, k = {k}, seed {args.seed}; "
              f"ground truth {subsets} subsets x {seeds} seeds; test accuracy {job['accuracy']:.3f}")
        base = {"job": job["path"], "workdir": workdir, "threads": args.threads, "proj_dim": k, "seed": args.seed}
        variants = [("reference", args.reference_path, {})]
        variants += [(f"candidate {_label(kw)}", args.candidate_path, kw) for kw in args.candidate_kwargs]
        runs: dict[str, dict] = {}
        scores: dict[str, np.ndarray] = {}
        for i, (label, path, kwargs) in enumerate(variants):
            config = {**base, "label": label, "srcproj_path": path, "kwargs": kwargs,
                      "scores": os.path.join(workdir, f"scores{i}.npy")}
            load = _loadavg()
            runs[label] = _run_child(config, path, args.timeout)
            runs[label].update(kwargs=kwargs, srcproj_path=os.path.abspath(path), load_before=load,
                               tree=_tree(path))
            scores[label] = np.load(config["scores"])
            result = lds(scores[label], masks, truth)
            runs[label]["lds"] = {"mean": result.mean, "ci_subsets": list(result.ci_subsets),
                                  "ci_queries": list(result.ci_queries),
                                  "per_query": [None if np.isnan(v) else float(v) for v in result.per_query]}
            runs[label]["_per_query"] = result.per_query
            print(f"  {label}: srcproj {runs[label]['tree']} ({runs[label]['srcproj_file']}), "
                  f"hessian {runs[label]['hessian']}, LDS {result}, featurize {runs[label]['featurize_seconds']:.1f} s"
                  f" + score {runs[label]['score_seconds']:.1f} s, load before {load}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    reference = runs["reference"]
    comparisons = []
    for label, run in runs.items():
        if label == "reference":
            continue
        diff = paired_difference(run["_per_query"], reference["_per_query"], args.bootstrap, seed=args.bootstrap_seed)
        comparisons.append({
            "scenario": name, "variant": label, "kwargs": run["kwargs"],
            "lds_reference": reference["lds"]["mean"], "lds_candidate": run["lds"]["mean"],
            "diff": diff.mean, "diff_ci": list(diff.ci), "paired_queries": diff.num_queries,
            "not_worse": diff.not_worse, "wall_reference": reference["wall_seconds"],
            "wall_candidate": run["wall_seconds"],
            "score_spearman": _mean_spearman(scores[label], scores["reference"]),
            "score_max_rel_diff": float(np.abs(scores[label].astype(np.float64) - scores["reference"]).max()
                                        / max(float(np.abs(scores["reference"]).max()), 1e-30)),
        })
    for run in runs.values():
        run.pop("_per_query")
    return {"scenario": name, "params": job["params"], "num_train": job["num_train"],
            "queries": len(job["picked"]), "checkpoints": job["checkpoints"], "proj_dim": k, "seed": args.seed,
            "quick": quick, "ground_truth": {"subsets": subsets, "seeds": seeds, "protocol": "steps"},
            "runs": runs, "comparisons": comparisons}


def _print_comparisons(comparisons: list[dict]) -> None:
    print(f"\n{'scenario':<12} {'variant':<32} {'LDS ref':>7} {'LDS cand':>8} {'diff [95% CI over queries]':>32} "
          f"{'wall ref':>8} {'wall cand':>9}  verdict  scores vs ref: Spearman, max rel. diff")
    for c in comparisons:
        lo, hi = c["diff_ci"]
        interval = f"{c['diff']:+.3g} [{lo:+.3g}, {hi:+.3g}]"
        print(f"{c['scenario']:<12} {c['variant']:<32} {c['lds_reference']:7.3f} {c['lds_candidate']:8.3f} "
              f"{interval:>32} {c['wall_reference']:7.1f}s {c['wall_candidate']:8.1f}s  "
              f"{'ok' if c['not_worse'] else 'WORSE':<7}  {c['score_spearman']:.4f}, {c['score_max_rel_diff']:.1e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", nargs="+", default=["mlp-lds"], choices=LDS_SCENARIOS)
    parser.add_argument("--reference-path", help="directory holding the reference srcproj/ package")
    parser.add_argument("--candidate-path", default=ROOT, help="directory holding the candidate srcproj/ package "
                                                               "(default: this checkout)")
    parser.add_argument("--candidate-kwargs", action="append", type=json.loads, default=None,
                        help="JSON object of extra Attributor keyword arguments of a candidate; repeat for more "
                             "candidates (default: one candidate with srcproj's defaults)")
    parser.add_argument("--proj-dim", type=int, default=None, help="default: the scenario's k in end_to_end.py")
    parser.add_argument("--seed", type=int, default=0, help="projection seed of both variants")
    parser.add_argument("--queries", type=int, default=100, help="odd test indices, as end_to_end.py")
    parser.add_argument("--subsets", type=int, default=100, help="cached ground truth: first S subsets")
    parser.add_argument("--seeds", type=int, default=10, help="cached ground truth: first R retraining seeds")
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples of the paired difference")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP / BLAS threads of each variant")
    parser.add_argument("--cache", default=os.path.join(HERE, ".cache"), help="ground-truth cache")
    parser.add_argument("--quick", action="store_true", help="toy size (end_to_end.py's --quick), its own "
                                                             "small ground truth trained into the cache")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    if not args.reference_path:
        parser.error("--reference-path is required")
    for path in (args.reference_path, args.candidate_path):
        if not os.path.isfile(os.path.join(path, "srcproj", "__init__.py")):
            parser.error(f"{path} holds no srcproj/ package")
    args.candidate_kwargs = args.candidate_kwargs or [{}]
    if not all(isinstance(kw, dict) for kw in args.candidate_kwargs):
        parser.error("--candidate-kwargs must be a JSON object")
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, python "
          f"{platform.python_version()}, {args.threads} thread(s) per variant; reference {args.reference_path} at "
          f"{_tree(args.reference_path)}; candidate {args.candidate_path} at {_tree(args.candidate_path)}; "
          f"load average {_loadavg()}")
    results = {"reference_path": os.path.abspath(args.reference_path),
               "candidate_path": os.path.abspath(args.candidate_path), "threads": args.threads,
               "torch": torch.__version__, "bootstrap": args.bootstrap, "bootstrap_seed": args.bootstrap_seed,
               "scenarios": {}, "skipped": {}, "comparisons": []}
    for name in args.scenario:
        try:
            entry = run_scenario(name, args)
        except GroundTruthMissing as missing:
            print(f"\n== {name}: skipped, ground truth not cached: {missing}")
            results["skipped"][name] = str(missing)
            continue
        results["scenarios"][name] = entry
        results["comparisons"] += entry["comparisons"]
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=1, default=float)
    _print_comparisons(results["comparisons"])
    print(f"\nload average at the end: {_loadavg()}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, default=float)


if __name__ == "__main__":
    main()
