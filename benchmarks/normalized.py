"""Raw and normalised SOURCE scores on digits: LDS and top-5 label agreement, side by side.

    python benchmarks/normalized.py                         # the three MLP scenarios of lds.py + the CNNs
    python benchmarks/normalized.py --scenarios converged   # one scenario
    python benchmarks/normalized.py --smoke                 # a quick end-to-end check (no LDS)

For every scenario, SOURCE's scores of one attributed model (seed 1000, the report split
of ``benchmarks/lds.py``) are ranked raw and with ``normalize="train"`` and ``"both"``
(srcproj.normalization), and with two other divisors considered for ``"train"``:
RelatIF's ``√|self-influence|`` and the norm ``‖ψ_i‖`` of the training example's own
query-side row (gradient-cosine style). Columns:

- LDS, same steps / same epochs: against the cached retraining ground truth of
  lds.py (100 subsets × 10 seeds, report split; 180 queries) or, for ``cnn-digits``,
  of end_to_end.py (same steps only; 100 queries). A scenario whose ground truth is
  not all cached is reported without LDS rather than retrained.
- label agreement: the fraction of each query's top-5 helpful training examples
  whose (training) label is the query's label.
- norm pct: the mean percentile, among all training examples, of ``‖t_i‖`` of the
  top-5 helpful examples (100: the largest rows): how much the ranking follows the
  size of the training-side rows.

Scenarios: ``converged``, ``noisy-short``, ``two-stage`` (lds.py's 64 → 64 → 10 MLP on
1,437 digits), ``cnn-digits`` (end_to_end.py's CNN on 1,000 8 × 8 digits) and
``cnn-bn`` (a CNN with BatchNorm, conv 1 → 16 → 32 with BatchNorm, ReLU and pooling, on
the same 1,000 digits, 40 epochs; label agreement only: it has no retraining ground
truth). RepSim (cosine of the last hidden representation) is the reference for label
agreement. k = ``--proj-dim`` (512). Results are printed and written to ``--out``
(JSON) and ``--markdown``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenarios as sc  # noqa: E402

from srcproj import Attributor, ClassificationTask, Segment, Trajectory  # noqa: E402
from srcproj.baselines import RepresentationSimilarity, SourceVariant  # noqa: E402
from srcproj.demo import make_mlp  # noqa: E402
from srcproj.eval import draw_subsets, lds  # noqa: E402
from srcproj.eval.retraining import _cache_path  # noqa: E402
from srcproj.normalization import NORMALIZATIONS  # noqa: E402

SPLIT = {"subset_seed": 17, "first_retrain_seed": 10, "model_seed": 1000, "first_query": 1}  # lds.py's "report"
MLP_SCENARIOS = ("converged", "noisy-short", "two-stage")
ALL_SCENARIOS = (*MLP_SCENARIOS, "cnn-digits", "cnn-bn")
TOP = 5


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_bn_cnn(seed: int = 0) -> nn.Module:
    """A CNN with BatchNorm on flat 8 × 8 digits."""
    return _seeded(lambda: nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10)), seed)


def train_bn_cnn(X: torch.Tensor, y: torch.Tensor, seed: int, epochs: int, lr: float = 0.05,
                 segments: int = 3, per_segment: int = 2) -> tuple[nn.Module, Trajectory]:
    """SGD (momentum 0.9, weight decay 1e-3, batch 64) in train mode; 3 segments × 2 checkpoints."""
    model = make_bn_cnn(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=sc.MOMENTUM, weight_decay=sc.WEIGHT_DECAY)
    n = X.shape[0]
    per_epoch = -(-n // sc.BATCH)
    steps = epochs * per_epoch
    count = segments * per_segment
    marks = [round(steps * (c + 1) / count) for c in range(count)]
    generator = torch.Generator().manual_seed(seed)
    saved, step = [], 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for lo in range(0, n, sc.BATCH):
            pick = order[lo:lo + sc.BATCH]
            if len(pick) < 2:  # BatchNorm needs two examples in train mode
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[pick]), y[pick]).backward()
            optimizer.step()
            step += 1
            if step in marks:
                saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    segs, start, data = [], 0, (X, y)  # one tuple: the segments share their data
    for first in range(0, count, per_segment):
        end = marks[first + per_segment - 1]
        segs.append(Segment(saved[first:first + per_segment], end - start, lr, data))
        start = end
    return model, Trajectory(segs, momentum=sc.MOMENTUM, weight_decay=sc.WEIGHT_DECAY)


def cached_truth(folder: str, num_examples: int, subsets: int, seeds: int) -> dict | None:
    """The masks and (S, R, Q_all) outputs when every retraining is cached; else None."""
    masks = draw_subsets(num_examples, subsets, 0.5, seed=SPLIT["subset_seed"])
    seed_list = range(SPLIT["first_retrain_seed"], SPLIT["first_retrain_seed"] + seeds)
    paths = [[_cache_path(folder, mask, s) for s in seed_list] for mask in masks]
    if not all(os.path.exists(p) for row in paths for p in row):
        return None
    return {"masks": masks, "outputs": np.stack([np.stack([np.load(p) for p in row]) for row in paths])}


def norm_percentiles(norms: np.ndarray) -> np.ndarray:
    """Each row's percentile (0-100) among all rows by norm."""
    ranks = np.empty(len(norms))
    ranks[np.argsort(norms, kind="stable")] = np.arange(len(norms))
    return 100.0 * ranks / max(1, len(norms) - 1)


def evaluate(label: str, methods: dict, queries, train_labels: np.ndarray, truth: dict | None,
             picked: np.ndarray, repsim=None) -> dict:
    """Rows of the table for one scenario; ``methods``: protocol -> SOURCE method."""
    query_labels = np.asarray(queries[1])
    rows: dict[str, dict] = {}
    timing: dict[str, float] = {}

    def add(row: str, protocol: str, scores: np.ndarray, top_helpful: np.ndarray | None = None) -> None:
        entry = rows.setdefault(row, {})
        if truth is not None and protocol in truth["outputs"]:
            result = lds(np.asarray(scores, np.float64), truth["masks"], truth["outputs"][protocol][:, :, picked])
            entry[f"lds_{protocol}"] = result.mean
            entry[f"lds_{protocol}_ci"] = list(result.ci_subsets)
        if protocol == "steps":
            helpful = top_helpful if top_helpful is not None else np.argsort(-scores, axis=1, kind="stable")[:, :TOP]
            entry["label_agreement"] = float((train_labels[helpful] == query_labels[:, None]).mean())
            entry["norm_pct"] = float(percentiles[helpful].mean())

    base = methods["steps"]
    cache = base.training_side()
    train_rows = np.asarray(cache.read(0, cache.num_rows), np.float64)
    percentiles = norm_percentiles(np.linalg.norm(train_rows, axis=1))
    psi_q = np.linalg.norm(np.asarray(base.query_side(queries).read(0, len(query_labels)), np.float64), axis=1)
    for protocol, method in methods.items():
        began = time.perf_counter()
        raw = np.asarray(method.score(queries), np.float64)
        timing[f"raw score ({protocol})"] = time.perf_counter() - began
        for normalize in NORMALIZATIONS:
            began = time.perf_counter()
            scores = method.score(queries, normalize=normalize) if normalize != "none" else raw
            seconds = time.perf_counter() - began
            top = method.top_k(queries, TOP, normalize=normalize).helpful_indices if protocol == "steps" else None
            timing[f"normalize={normalize} score ({protocol})"] = seconds
            add(f"SOURCE, normalize={normalize!r}", protocol, np.asarray(scores, np.float64), top)
        # The other divisors considered for "train" (from the dense raw scores).
        began = time.perf_counter()
        self_influence = method.self_influence()
        timing[f"self-influence ({protocol})"] = time.perf_counter() - began
        nonpositive = int((self_influence <= 0).sum())
        rows.setdefault("SOURCE / √|self-influence| (RelatIF)", {})[f"nonpositive_self_influence_{protocol}"] = \
            nonpositive
        relatif = np.sqrt(np.abs(self_influence))
        add("SOURCE / √|self-influence| (RelatIF)", protocol, raw / np.where(relatif > 0, relatif, 1.0)[None, :])
        began = time.perf_counter()
        psi_train = np.linalg.norm(np.asarray(method.self_query_side()(0, cache.num_rows), np.float64), axis=1)
        timing[f"training ψ norms ({protocol})"] = time.perf_counter() - began
        add("SOURCE / ‖ψ_i‖ (gradient norm)", protocol, raw / np.where(psi_train > 0, psi_train, 1.0)[None, :])
        add("SOURCE / (‖ψ_i‖ ‖ψ_q‖)", protocol,
            raw / np.where(psi_train > 0, psi_train, 1.0)[None, :] / np.where(psi_q > 0, psi_q, 1.0)[:, None])
    if repsim is not None:
        scores = np.asarray(repsim.score(queries), np.float64)
        for protocol in methods:
            add("RepSim (reference)", protocol, scores)
    return {"rows": rows, "seconds": timing}


def _cells(values: dict) -> list[str]:
    """One row's LDS (steps, epochs) with intervals, label agreement and norm percentile, as text."""
    cells = []
    for protocol in ("steps", "epochs"):
        if f"lds_{protocol}" in values:
            lo, hi = values[f"lds_{protocol}_ci"]
            cells.append(f"{values[f'lds_{protocol}']:.3f} [{lo:.3f}, {hi:.3f}]")
        else:
            cells.append("—")
    agreement, pct = values.get("label_agreement"), values.get("norm_pct")
    cells.append("—" if agreement is None else f"{agreement:.3f}")
    cells.append("—" if pct is None else f"{pct:.1f}")
    return cells


def print_table(name: str, entry: dict) -> None:
    print(f"\n{name}: {entry['description']}")
    print(f"{'ranking':<40} {'LDS steps':>22} {'LDS epochs':>22} {'label agr.':>10} {'norm pct':>8}")
    for row, values in entry["rows"].items():
        cells = _cells(values)
        print(f"{row:<40} {cells[0]:>22} {cells[1]:>22} {cells[2]:>10} {cells[3]:>8}")
    for key, value in entry.get("notes", {}).items():
        print(f"  {key}: {value}")


def markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`; {results['machine']}; {results['seconds']:.0f} s in all.", ""]
    for name, entry in results["scenarios"].items():
        lines += [f"### {name}: {entry['description']}", "",
                  "| ranking | LDS, same steps | LDS, same epochs | top-5 label agreement | top-5 ‖t_i‖ percentile |",
                  "|---|---:|---:|---:|---:|"]
        for row, values in entry["rows"].items():
            lines.append(f"| {row} | " + " | ".join(_cells(values)) + " |")
        lines.append("")
        for key, value in entry.get("notes", {}).items():
            lines.append(f"- {key}: {value}")
        lines.append("")
    return "\n".join(lines)


def run_mlp(name: str, args, stores: str) -> dict:
    scenario = sc.make_scenario(name)
    final, trajectory = sc.attributed_run(scenario, SPLIT["model_seed"])
    folder = os.path.join(stores, name, f"model{SPLIT['model_seed']}")
    os.makedirs(folder, exist_ok=True)
    began = time.perf_counter()
    base = Attributor(make_mlp(sc.HIDDEN), ClassificationTask(), trajectory("steps"),
                      os.path.join(folder, f"source_k{args.proj_dim}.zarr"), proj_dim=args.proj_dim)
    base.featurize(progress=False)
    featurized = time.perf_counter() - began
    methods = {"steps": base, "epochs": SourceVariant(base, trajectory("epochs"))}
    Xq, yq = scenario.queries
    picked = np.arange(SPLIT["first_query"], min(len(yq), args.queries), 2)
    queries = (Xq[picked], yq[picked])
    truth = None
    if not args.smoke:
        outputs, masks = {}, None
        for protocol in ("steps", "epochs"):
            got = cached_truth(os.path.join(args.cache, "ground_truth", name, protocol), scenario.num_targets,
                               100, 10)
            if got is not None:
                outputs[protocol], masks = got["outputs"], got["masks"]
        truth = {"masks": masks, "outputs": outputs} if outputs else None
    entry = evaluate(name, methods, queries, scenario.target.y.numpy(), truth, picked,
                     RepresentationSimilarity(base, "1"))
    entry["description"] = f"{scenario.description} ({sc.describe_steps(scenario)}); {len(picked)} queries"
    entry["notes"] = {"featurize seconds": round(featurized, 1),
                      "ground truth": "cached, 100 subsets x 10 seeds" if truth else "none (not cached)"}
    return entry


def run_cnn(name: str, args, stores: str) -> dict:
    X, y, Xt, yt = sc.load_standardised_digits(1000)
    picked = np.arange(SPLIT["first_query"], len(yt), 2)[:100 if name == "cnn-digits" else args.queries // 2]
    queries = (Xt[picked], yt[picked])
    folder = os.path.join(stores, name, f"model{SPLIT['model_seed']}")
    os.makedirs(folder, exist_ok=True)
    began = time.perf_counter()
    if name == "cnn-digits":
        from end_to_end import build_scenario

        scenario, make_model = build_scenario("cnn-digits")
        final, segments = sc.module_attributed_run(make_model, scenario, SPLIT["model_seed"])
        data = (scenario.target.X, scenario.target.y)  # one tuple: the segments share their data
        trajectory = Trajectory([Segment(states, steps, scenario.stages[stage].lr, data)
                                 for stage, states, steps in segments],
                                momentum=sc.MOMENTUM, weight_decay=sc.WEIGHT_DECAY)
        model, module = make_model(0), "7"
        description = "end_to_end.py's CNN (no BatchNorm), 1,000 digits, 20 epochs"
    else:
        trained, trajectory = train_bn_cnn(X, y, SPLIT["model_seed"], epochs=args.cnn_epochs)
        with torch.no_grad():
            accuracy = float((trained(Xt).argmax(1) == yt).float().mean())
        model, module = make_bn_cnn(0), "9"
        description = (f"CNN with BatchNorm, 1,000 digits, {args.cnn_epochs} epochs, test accuracy {accuracy:.3f}; "
                       "no retraining ground truth")
    trained_seconds = time.perf_counter() - began
    began = time.perf_counter()
    base = Attributor(model, ClassificationTask(), trajectory, os.path.join(folder, f"source_k{args.proj_dim}.zarr"),
                      proj_dim=args.proj_dim)
    base.featurize(progress=False)
    featurized = time.perf_counter() - began
    truth = None
    if name == "cnn-digits" and not args.smoke:
        got = cached_truth(os.path.join(args.cache, "ground_truth", "e2e-cnn-digits", "steps"), 1000, 100, 10)
        truth = None if got is None else {"masks": got["masks"], "outputs": {"steps": got["outputs"]}}
    entry = evaluate(name, {"steps": base}, queries, y.numpy(), truth, picked,
                     RepresentationSimilarity(base, module))
    entry["description"] = f"{description}; {len(picked)} queries"
    entry["notes"] = {"train seconds": round(trained_seconds, 1), "featurize seconds": round(featurized, 1),
                      "ground truth": "cached, 100 subsets x 10 seeds (same steps)" if truth else "none"}
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(ALL_SCENARIOS), choices=ALL_SCENARIOS)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=360, help="test examples considered (every other one is used)")
    parser.add_argument("--cnn-epochs", type=int, default=40)
    parser.add_argument("--cache", default="benchmarks/.cache")
    parser.add_argument("--stores", default=None, help="folder of the stores (default: CACHE/normalized_stores)")
    parser.add_argument("--out", default=None, help="JSON results (default: CACHE/normalized.json, or "
                        "normalized_smoke.json with --smoke)")
    parser.add_argument("--markdown", default=None, help="markdown tables (default: beside --out, .md)")
    parser.add_argument("--smoke", action="store_true", help="k = 32, 40 queries, 2 CNN epochs, no LDS")
    args = parser.parse_args()
    if args.smoke:
        args.proj_dim, args.queries, args.cnn_epochs = 32, 40, 2
        args.stores = args.stores or os.path.join(args.cache, "smoke_stores")
    args.out = args.out or os.path.join(args.cache, "normalized_smoke.json" if args.smoke else "normalized.json")
    args.markdown = args.markdown or os.path.splitext(args.out)[0] + ".md"
    torch.set_num_threads(1)
    stores = args.stores or os.path.join(args.cache, "normalized_stores")
    machine = (f"{platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch thread")
    command = "python " + " ".join(sys.argv)
    print(f"{command}\nmachine: {machine}; k = {args.proj_dim}")
    began = time.perf_counter()
    results = {"command": command, "machine": machine, "proj_dim": args.proj_dim, "scenarios": {}}
    for name in args.scenarios:
        start = time.perf_counter()
        entry = run_mlp(name, args, stores) if name in MLP_SCENARIOS else run_cnn(name, args, stores)
        entry["notes"]["scenario seconds"] = round(time.perf_counter() - start, 1)
        results["scenarios"][name] = entry
        print_table(name, entry)
    results["seconds"] = time.perf_counter() - began
    print(f"\ntotal {results['seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1, default=float)
        print(f"wrote {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown(results))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
