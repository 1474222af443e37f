"""Why the segment time is wrong: SOURCE against retraining as the time scale varies.

    python benchmarks/time_scale.py                        # the tune split, all four scenarios
    python benchmarks/time_scale.py --scenarios cnn-digits --seeds 5 --proj-dims 2048
    python benchmarks/time_scale.py --scenarios mlp-lds --split report --proj-dims 2048 --layouts one-segment
    python benchmarks/time_scale.py --smoke                # a short end-to-end check

A diagnosis (docs/benchmarks.md, "The segment time against retraining"), run by default
on the LDS benchmark's ``tune`` split (benchmarks/lds.py: its subsets, retraining seeds,
attributed model 2000 and even test queries; the ground truth shares lds.py's and
end_to_end.py's caches). Scenarios: lds.py's ``converged``, ``noisy-short`` and
``two-stage`` (the 64-64-10 MLP) and end_to_end.py's ``cnn-digits`` (a small CNN without
BatchNorm) and ``mlp-lds`` (a 64-64-64-10 MLP, kept out of every choice: the held-out
scenario, measured on the report split). For each it measures, against retraining:

- **the time sweep**: SOURCE with every segment's time ``η·K`` multiplied by ``c`` (the
  learning rates scaled by ``c`` through :class:`SourceVariant`) under both retraining
  protocols, at each ``--proj-dims`` k (``p``: an identity :class:`MatrixProjector`, no
  projection at all); IF and TracIn beside it; and, as "chained", the default before
  issue 18 (``unroll="segments"``, ψ over the last segment). At the first k also: the
  other query side (ψ over the last segment instead of the last stage) and
  the same checkpoints cut into other segments (``--layouts``: ``fine``, one checkpoint
  per segment; ``one-segment``, one segment per stage);
- **the exact derivative of the run that was attributed**: ``d margin_q(θ_T) / d w_m``
  with every training example's loss weighted by ``w_m`` and autograd through every
  real step, batch, momentum and weight-decay update (reverse mode, float64). SOURCE
  approximates this derivative; any first-order estimator built from one trajectory can
  at best match it;
- **three ground truths of decreasing noise**, each on the same 50% subsets:
  ``retrain`` (the benchmark's: other inits and batch orders, ``--seeds`` seeds,
  averaged; both protocols), ``same init`` (one model per subset from the attributed
  run's seed: its init and its generator, so only the batches' composition changes) and
  ``same batches`` (the attributed run replayed with the left-out examples' losses
  weighted 0: the exact counterfactual the derivative linearises).

Reading it: SOURCE(c) against the exact derivative ("corr. with exact") says what the
Gauss-Newton and stationary-segment approximations cost; the exact derivative against
``same batches`` what linearisation costs; ``same batches`` → ``same init`` →
``retrain`` what the protocol adds. Results are printed, merged into ``--out`` (JSON;
rows of earlier runs of a scenario are kept) and, with ``--markdown``, written as tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import end_to_end as e2e  # noqa: E402
import lds as bench  # noqa: E402
import scenarios as sc  # noqa: E402
from torch.func import functional_call, vmap  # noqa: E402

from srcproj import Attributor, ClassificationTask, MatrixProjector, Segment, Trajectory  # noqa: E402
from srcproj.baselines import InfluenceFunction, SourceVariant, TracIn  # noqa: E402
from srcproj.eval import lds  # noqa: E402

TIMES = (0.01, 0.03, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0, 100.0)
SCENARIOS = (*sc.SCENARIOS, "cnn-digits", "mlp-lds")


def scaled(trajectory: Trajectory, c: float) -> Trajectory:
    """The same segments with every learning rate (hence every segment time) times c."""
    segments = [replace(s, lr=s.lr * c if np.isscalar(s.lr) else [lr * c for lr in s.lr])
                for s in trajectory.segments]
    return replace(trajectory, segments=segments)


def build(name: str):
    """``(scenario, make_model)``: lds.py's MLP scenarios or end_to_end.py's (single-stage) ones."""
    if name in sc.SCENARIOS:
        return sc.make_scenario(name), e2e.make_lds_mlp
    return e2e.build_scenario(name)


def attributed(name: str, scenario: sc.Scenario, make_model, seed: int, layout: str = "default"):
    """The attributed run's final state and ``trajectory(protocol)`` (docs/math.md §8 for "epochs").

    ``layout``: ``default`` (segments of 2 checkpoints), ``fine`` (one checkpoint per
    segment: twice as many segments, each half as long) or ``one-segment`` (one segment
    per stage holding every checkpoint), always over the same checkpoints.
    """
    if name in sc.SCENARIOS:
        return sc.attributed_run(scenario, seed, layout)
    if len(scenario.stages) != 1:
        raise ValueError(f"{name}: only single-stage end_to_end.py scenarios are described here")
    per_segment = {"default": 2, "fine": 1, "one-segment": 2 * scenario.target.segments}[layout]
    if layout == "one-segment":  # the same 2 x segments checkpoints, in one segment
        scenario = replace(scenario, stages=[replace(stage, segments=1) for stage in scenario.stages])
    final, segments = sc.module_attributed_run(make_model, scenario, seed, per_segment=per_segment)
    data = (scenario.target.X, scenario.target.y)

    def trajectory(protocol: str = "steps") -> Trajectory:
        return Trajectory([Segment(states, max(1, round(steps * 0.5)) if protocol == "epochs" else steps,
                                   scenario.stages[stage].lr, data) for stage, states, steps in segments],
                          momentum=sc.MOMENTUM, weight_decay=sc.WEIGHT_DECAY)

    return final, trajectory


def ground_truth(name: str, scenario: sc.Scenario, seeds: int, cache: str, split_name: str = "tune") -> dict:
    """The split's 100 subsets retrained with ``seeds`` seeds under both protocols
    (end_to_end.py's runner and caches, shared with lds.py)."""
    settings = SimpleNamespace(subsets=100, seeds=seeds, protocols=bench.PROTOCOLS, cache=cache, processes=2,
                               no_progress=True)
    return e2e.ground_truth(name, False, scenario, settings, split_name)


def replay(make_model, scenario: sc.Scenario, seed: int, weights: torch.Tensor, create_graph: bool = False):
    """The attributed run (``sc.train_models`` with every example, one seed) replayed for
    M weightings of the target examples' losses at once: ``weights`` is (M, N_target).

    Every model sees the batches of the unweighted run; an example weighted 0 is in its
    batch but contributes nothing (the batch mean still divides by the batch size).
    With ``create_graph`` the updates keep autograd's graph, so the final parameters are
    differentiable in ``weights``. Returns the stacked parameters, by name.
    """
    M = weights.shape[0]
    module = make_model(seed)
    names = [name for name, _ in module.named_parameters()]
    params = {name: p.detach().to(weights.dtype).expand(M, *p.shape).clone().requires_grad_(True)
              for name, p in module.named_parameters()}
    module = module.to(weights.dtype)
    forward = vmap(lambda p, x: functional_call(module, p, (x,)))
    for stage_index, stage in enumerate(scenario.stages):
        buffers = {name: torch.zeros_like(p) for name, p in params.items()}  # a fresh optimizer per stage
        n = stage.X.shape[0]
        generator = torch.Generator().manual_seed(int(seed) * 1009 + stage_index)
        X, y = stage.X.to(weights.dtype), stage.y
        position, order = n, None
        for _ in range(stage.steps(n)):
            if position + sc.BATCH > n:
                order = torch.randperm(n, generator=generator)
                position = 0
            picked = order[position:position + sc.BATCH]
            position += sc.BATCH
            if not create_graph:
                params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
            logits = forward(params, X[picked].expand(M, *X[picked].shape))
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[picked].repeat(M),
                                     reduction="none").reshape(M, -1)
            if stage.target:
                losses = losses * weights[:, picked]
            grads = torch.autograd.grad(losses.sum() / len(picked), [params[k] for k in names],
                                        create_graph=create_graph)
            buffers = {k: sc.MOMENTUM * buffers[k] + g + sc.WEIGHT_DECAY * params[k] for k, g in zip(names, grads,
                                                                                                     strict=True)}
            params = {k: params[k] - stage.lr * buffers[k] for k in names}
            if not create_graph:
                params = {k: p.detach() for k, p in params.items()}
                buffers = {k: b.detach() for k, b in buffers.items()}
    return params


def _margins(make_model, params: dict, queries) -> torch.Tensor:
    Xq, yq = queries
    module = make_model(0).to(next(iter(params.values())).dtype)
    logits = vmap(lambda p: functional_call(module, p, (Xq.to(module_dtype(module)),)))(params)
    M = logits.shape[0]
    return ClassificationTask().measurement(logits.reshape(M * len(yq), -1), yq.repeat(M)).reshape(M, -1)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def exact_derivative(make_model, scenario: sc.Scenario, seed: int, queries) -> np.ndarray:
    """(Q, N_target): d margin_q(θ_T) / d w_m through every step of the attributed run (float64)."""
    weights = torch.ones(1, scenario.num_targets, dtype=torch.float64, requires_grad=True)
    margin = _margins(make_model, replay(make_model, scenario, seed, weights, create_graph=True), queries)[0]
    rows = []
    for q in range(len(margin)):
        (grad,) = torch.autograd.grad(margin[q], weights, retain_graph=q + 1 < len(margin))
        rows.append(grad[0].numpy())
    return np.stack(rows)


def same_init_truth(name: str, make_model, scenario: sc.Scenario, seed: int, masks: np.ndarray,
                    queries) -> np.ndarray:
    """(S, 1, Q): one model per subset, trained from the attributed run's seed."""
    seeds = np.full(len(masks), seed)
    if name in sc.SCENARIOS:
        params, _ = sc.train_models(scenario, masks, seeds, "steps")
        return sc.margins(params, *queries)[:, None, :]
    params, _ = sc.train_module_models(make_model, scenario, masks, seeds, "steps")
    return sc.module_margins(make_model, params, *queries)[:, None, :]


def same_batches_truth(make_model, scenario: sc.Scenario, seed: int, masks: np.ndarray, queries) -> np.ndarray:
    """(S, 1, Q): the attributed run replayed with the left-out examples weighted 0."""
    params = replay(make_model, scenario, seed, torch.as_tensor(masks, dtype=torch.float32))
    with torch.no_grad():
        return _margins(make_model, params, queries).double().numpy()[:, None, :]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over queries of the Pearson correlation of two (Q, N) score matrices."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))))


def decompose(attributor: Attributor, trajectory, queries, masks: np.ndarray, outputs: np.ndarray) -> dict:
    """Where the score's signal lives: LDS of each segment's term, and of the last
    segment's term split by eigenvalue bands of its Hessian (a·λ), at c = 0.1, 1, 100.

    Meant for a k = p store (identity projection), where the eigenvectors are directions
    of parameter space. ``outputs``: the same-steps ground truth, (S, R, Q). It takes
    apart the form it diagnosed, the default before issue 18: every segment chained
    (``unroll="segments"``), ψ over the last segment.
    """
    from srcproj.source import accumulate_spectrum

    def score_lds(scores):
        return lds(scores, masks, outputs, num_bootstrap=1).mean

    layout, found = attributor.layout, {"segments": {}, "bands": {}}
    last = layout.num_segments - 1
    for c in (0.1, 1.0, 100.0):
        parts = [SourceVariant(attributor, scaled(trajectory("steps"), c), segments=[s], unroll="segments",
                               query="last_segment").score(queries)
                 for s in range(layout.num_segments)]
        row = {"all": score_lds(sum(parts)), **{f"segment {s}": score_lds(v) for s, v in enumerate(parts)}}
        if len(parts) > 1:
            row["without the last"] = score_lds(sum(parts[:-1]))
        found["segments"][f"{c:g}"] = row
    values, vectors = layout.read_spectrum(last)
    context = attributor.context
    psi = context.measurement_features(context.query_source(queries), 0, len(queries[1]), 64,
                                       "last_segment").astype(np.float64)
    members = layout.members(last)
    mean = sum(layout.read_features(c, 0, layout.rows(last)).astype(np.float64) for c in members) / len(members)
    time_ = trajectory("steps").segment_time(last)
    along_psi, along_g = psi @ vectors, mean @ vectors
    edges = (0.0, 0.1, 1.0, 10.0, 100.0, np.inf)
    for c in (0.1, 1.0, 100.0):
        weight = accumulate_spectrum(values, time_ * c)
        bands = {"all": score_lds(-(along_psi * weight) @ along_g.T)}
        for low, high in zip(edges[:-1], edges[1:], strict=True):
            chosen = (time_ * values >= low) & (time_ * values < high)
            if chosen.any():
                part = -(along_psi[:, chosen] * weight[chosen]) @ along_g[:, chosen].T
                bands[f"a*lambda in [{low:g}, {high:g}): {int(chosen.sum())} directions"] = score_lds(part)
        found["bands"][f"{c:g}"] = bands
    return found


def report_decomposition(results: dict, label: str, parts: dict) -> None:
    results.setdefault("decomposition", {})[label] = parts
    for c, row in parts["segments"].items():
        print(f"  {label}, k = p, c = {c}: segments' terms alone: "
              + ", ".join(f"{key} {value:.3f}" for key, value in row.items()))
    for c, row in parts["bands"].items():
        print(f"  {label}, k = p, c = {c}: the last segment's term by bands: "
              + "; ".join(f"{key}: {value:.3f}" for key, value in row.items()))


def markdown(results: dict) -> str:
    """The sweep as markdown: per scenario, LDS against each ground truth as c varies."""
    lines = []
    for name, entry in results["scenarios"].items():
        rows = entry["lds"]
        lines += [f"#### {name}", "", f"{entry.get('description', '')}; p = {entry.get('p')}, "
                  f"{entry.get('seeds')} seeds per subset, {entry.get('queries')} queries.", ""]
        swept = {m: m.rsplit(" c=", 1) for m in rows if " c=" in m}
        swept = {m: (sweep, float(c)) for m, (sweep, c) in swept.items() if c.replace(".", "", 1).isdigit()}
        sweeps = sorted({sweep for sweep, _ in swept.values()})
        times = sorted({c for _, c in swept.values()})
        fixed = [m for m in rows if " c=" not in m]
        for target in ("retrain", "retrain (same epochs)", "same init", "same batches", "corr. with exact"):
            lines.append(f"| {target} | " + " | ".join(f"c = {c:g}" for c in times) + " | " +
                         " | ".join(fixed) + " |")
            lines.append("|---|" + "---:|" * (len(times) + len(fixed)))
            for sweep in sweeps:
                cells = [rows.get(f"{sweep} c={c:g}", {}).get(target) for c in times]
                lines.append(f"| {sweep} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |"
                             + " |" * len(fixed))
            lines.append("| fixed methods | " + " |" * len(times) + " " + " | ".join(
                "" if rows[m].get(target) is None else f"{rows[m][target]:.3f}" for m in fixed) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--times", type=float, nargs="+", default=list(TIMES))
    parser.add_argument("--proj-dims", nargs="+", default=["2048", "p"],
                        help="k of the sweep ('p': the number of parameters, an identity projection)")
    parser.add_argument("--layouts", nargs="*", default=["fine", "one-segment"], choices=("fine", "one-segment"),
                        help="other segmentations of the same checkpoints, swept at the first k")
    parser.add_argument("--split", choices=tuple(bench.SPLITS), default="tune",
                        help="lds.py's split: its subsets, retraining seeds, attributed model and queries")
    parser.add_argument("--queries", type=int, default=60, help="test queries (even indices, as the tune split)")
    parser.add_argument("--seeds", type=int, default=10, help="retraining seeds per subset (100 subsets)")
    parser.add_argument("--cache", default="benchmarks/.cache")
    parser.add_argument("--out", default="benchmarks/.cache/time_scale.json")
    parser.add_argument("--decompose", action="store_true",
                        help="at k = p: the LDS of each segment's term and of eigenvalue bands (docs: 'the dip')")
    parser.add_argument("--markdown", default=None, help="also write every scenario's tables here")
    parser.add_argument("--smoke", action="store_true", help="noisy-short, 2 seeds, 8 queries, 3 times, k = 256")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.scenarios, args.queries, args.times, args.proj_dims = ["noisy-short"], 8, [0.25, 1.0, 100.0], ["256"]
        args.seeds, args.layouts = 2, ["fine"]
    split = bench.SPLITS[args.split]
    seed = split["first_model_seed"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; "
          f"{args.split} split, attributed model {seed}, 100 subsets x {args.seeds} seeds; times {args.times}; "
          f"k {args.proj_dims}")
    results: dict = {"times": args.times, "proj_dims": args.proj_dims, "scenarios": {}}
    if os.path.exists(args.out):
        with open(args.out) as handle:
            results["scenarios"] = json.load(handle).get("scenarios", {})
    for name in args.scenarios:
        began = time.perf_counter()
        scenario, make_model = build(name)
        num_params = sum(p.numel() for p in make_model(0).parameters())
        truth = ground_truth(name, scenario, args.seeds, args.cache, args.split)
        Xq, yq = scenario.queries
        picked = np.arange(split["first_query"], 2 * args.queries, 2)[:args.queries]
        queries = (Xq[picked], yq[picked])
        masks = truth["masks"]
        targets = {"retrain": truth["outputs"]["steps"][:, :, picked],
                   "retrain (same epochs)": truth["outputs"]["epochs"][:, :, picked],
                   "same init": same_init_truth(name, make_model, scenario, seed, masks, queries),
                   "same batches": same_batches_truth(make_model, scenario, seed, masks, queries)}
        print(f"\n== {name}: {scenario.description}; {sc.describe_steps(scenario)}; p = {num_params}; "
              f"{len(picked)} queries; ground truths ready in {time.perf_counter() - began:.0f} s")
        final, trajectory = attributed(name, scenario, make_model, seed)
        replayed = replay(make_model, scenario, seed, torch.ones(1, scenario.num_targets))
        drift = max(float((p[0] - final[n]).abs().max()) for n, p in replayed.items())
        print(f"  the replayed run's final parameters differ from the attributed run's by at most {drift:.1e}")
        t0 = time.perf_counter()
        exact = exact_derivative(make_model, scenario, seed, queries)
        print(f"  exact derivative through the run: {time.perf_counter() - t0:.0f} s")
        scores: dict[str, np.ndarray] = {"exact derivative": exact}
        folder = os.path.join(args.cache, "stores", name, f"model{seed}")
        for text in args.proj_dims:
            k = num_params if text == "p" else int(text)
            projector = MatrixProjector(torch.eye(num_params)) if text == "p" else None
            t0 = time.perf_counter()
            attributor = Attributor(make_model(0), ClassificationTask(), trajectory("steps"),
                                    os.path.join(folder, f"time_scale_k{k}.zarr"), proj_dim=k, projector=projector)
            attributor.featurize(progress=False)
            label = "p" if text == "p" else k
            for c in args.times:
                for protocol in bench.PROTOCOLS:
                    variant = SourceVariant(attributor, scaled(trajectory(protocol), c))
                    scores[f"SOURCE k={label} c={c:g} | {protocol}"] = variant.score(queries)
                    # The default before issue 18: the paper's chain of every segment, ψ over the last segment.
                    variant = SourceVariant(attributor, scaled(trajectory(protocol), c), unroll="segments",
                                            query="last_segment")
                    scores[f"SOURCE k={label} chained c={c:g} | {protocol}"] = variant.score(queries)
            if text == args.proj_dims[0]:
                scores[f"IF k={label}"] = InfluenceFunction(attributor).score(queries)
                scores[f"TracIn k={label}"] = TracIn(attributor).score(queries)
                # The query side: ψ over the last segment (or at θ_T) instead of the default.
                other_query = "last_segment" if attributor.query == "last_stage" else "final"
                for c in args.times:
                    for protocol in bench.PROTOCOLS:
                        variant = SourceVariant(attributor, scaled(trajectory(protocol), c), query=other_query)
                        scores[f"SOURCE k={label} query {other_query} c={c:g} | {protocol}"] = variant.score(queries)
                # Stationarity within a segment, and the chaining of segments: the same
                # checkpoints cut into twice as many segments, or into one.
                for layout in args.layouts:
                    _, other = attributed(name, scenario, make_model, seed, layout)
                    store = Attributor(make_model(0), ClassificationTask(), other("steps"),
                                       os.path.join(folder, f"time_scale_{layout}_k{k}.zarr"), proj_dim=k,
                                       projector=None if projector is None else MatrixProjector(torch.eye(k)))
                    store.featurize(progress=False)
                    for c in args.times:
                        for protocol in bench.PROTOCOLS:
                            variant = SourceVariant(store, scaled(other(protocol), c))
                            scores[f"SOURCE k={label} {layout} c={c:g} | {protocol}"] = variant.score(queries)
                    if text == "p" and args.decompose:
                        report_decomposition(results, f"{name} ({layout})",
                                             decompose(store, other, queries, masks, targets["retrain"]))
            print(f"  k = {label}: featurized and swept in {time.perf_counter() - t0:.0f} s")
            if text == "p" and args.decompose:
                report_decomposition(results, name, decompose(attributor, trajectory, queries, masks,
                                                              targets["retrain"]))
        table: dict[str, dict[str, float]] = {}
        for label, value in scores.items():
            method, _, protocol = label.partition(" | ")
            row = table.setdefault(method, {})
            for target, outputs in targets.items():
                if protocol and (protocol == "epochs") != target.endswith("(same epochs)"):
                    continue
                row[target] = lds(value, masks, outputs, num_bootstrap=1).mean
            if protocol != "epochs":
                row["corr. with exact"] = correlation(value, exact)
        columns = [*targets, "corr. with exact"]
        print(f"  {'method':<26}" + "".join(f"{c[:20]:>21}" for c in columns))
        for method, row in table.items():
            print(f"  {method:<26}" + "".join(f"{row[c]:>21.3f}" if c in row else f"{'':>21}" for c in columns))
        # Rows of an earlier run of this scenario (e.g. another --proj-dims) are kept, new ones replace.
        entry = results["scenarios"].setdefault(name, {"lds": {}})
        entry["lds"].update(table)
        entry.update(p=num_params, seeds=args.seeds, queries=len(picked), description=scenario.description)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
