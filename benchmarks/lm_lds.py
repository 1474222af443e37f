"""LDS on a small GPT-2 language model: SOURCE (AdamW) against TracIn, the influence
function and a text-similarity baseline, on held-out prompt + completion queries.

    python benchmarks/lm_lds.py                  # the reported run (about an hour on 2 cores)
    python benchmarks/lm_lds.py --smoke          # a minute-long end-to-end check
    python benchmarks/lm_lds.py --scenario finetune   # pretraining, then fine-tuning on the attributed passages
    python benchmarks/lds.py --scenarios lm      # the same, from the LDS benchmark's command

The scenario: a 2-layer GPT-2 from a config (random init, tied embeddings), trained
with AdamW (weight decay 0.01 on the weights, a linear warm-up and decay) on
``TRAIN`` passages of Python's own documentation prose read character by character
(srcproj.text_demo), for ``STEPS`` steps of ``BATCH`` passages. Queries are held-out
passages: a 16-character prompt (labels −100) and its completion; the measurement is
the completion's log-probability (LanguageModelTask.measurement), the quantity the
retrained models are scored on.

``--scenario finetune``: the same model is first pretrained on ``PRETRAIN`` other
passages (the same in every retraining; 2 segments), then trained for ``FT_STEPS``
steps at a lower rate on the attributed passages (2 more segments); the retrainings
change only the second stage's data, and every method attributes the second stage's
passages (SOURCE over the fine-tuning segments, through the pretraining's; TracIn and
IF on the fine-tuning data).

Two splits, as in lds.py: ``--split tune`` (its own subsets, retraining seeds and
attributed models, the even-numbered queries) is where settings were chosen;
``--split report`` (the default; the odd-numbered queries) is what docs/benchmarks.md
reports.

Ground truth: ``--subsets`` random halves of the training passages, each retrained with
``--seeds`` seeds for as many steps as the full run (the "same steps" protocol, the
default counterfactual of docs/math.md §8), cached and resumable under ``--cache``
like the digits benchmark's. The LDS of a method is the Spearman correlation, over the
subsets, between its summed scores of a subset's passages and the retrained models'
mean measurement, per query (srcproj.eval.lds); the paired bootstrap over queries
compares SOURCE with the best other method.

Sizing: one retraining takes about ``SECONDS_PER_MODEL`` (4) seconds on one core; 2
processes run ``subsets × seeds`` of them, so the default 100 × 6 = 600 retrainings
take about 600 × 4 / 2 s = 20 minutes, and the methods (featurizing 2 attributed models
at k = 2048) a few minutes more.

Methods, each on the same featurized store where it can be (one attributed model, and
the mean over ``--models`` independently trained ones):

- SOURCE: the defaults (``Attributor(model, LanguageModelTask(), trajectory)``: the
  AdamW preconditioner, the ``fisher`` Gauss-Newton Hessian, k = 2048, ``--proj-dim``);
- TracIn (Adam): ``-Σ_c η_c ψ_cᵀ φ_c`` over the checkpoints, with the preconditioned
  gradients of the store;
- IF: the damped influence function at the final checkpoint (damping = the run's
  weight decay in the preconditioned space, as the store has it);
- BM25: word-level BM25 between the query's text and each training passage;
- character 4-gram overlap: the Jaccard similarity of their character 4-gram sets.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lds import Timed, _featurized  # noqa: E402
from paired_lds import paired_difference  # noqa: E402

from srcproj import LanguageModelTask, Segment, Trajectory  # noqa: E402
from srcproj.baselines import InfluenceFunction, SourceVariant, TracIn  # noqa: E402
from srcproj.eval import draw_subsets, lds, retrain  # noqa: E402
from srcproj.text_demo import (  # noqa: E402
    completion_queries,
    load_prose_passages,
    make_tiny_gpt2,
    passage_examples,
)

TRAIN, QUERIES, LENGTH, PROMPT = 240, 120, 48, 16
STEPS, BATCH, PEAK_LR, WARMUP, DECAY = 240, 16, 4e-3, 20, 0.01
SEGMENTS, CHECKPOINTS_PER_SEGMENT = 2, 2
MODEL = {"n_embd": 48, "n_layer": 2, "n_head": 2, "n_positions": 64}
SECONDS_PER_MODEL = 4.0  # one core of the 2-core x86_64 container of docs/benchmarks.md
# As in lds.py: settings are chosen on "tune" (its own subsets, retraining seeds,
# attributed models and the even queries); "report" (the odd queries) is what
# docs/benchmarks.md reports.
SPLITS = {
    "tune": {"subset_seed": 18, "first_retrain_seed": 0, "first_model_seed": 2000, "first_query": 0},
    "report": {"subset_seed": 17, "first_retrain_seed": 10, "first_model_seed": 1000, "first_query": 1},
}

#: The fine-tuning scenario: a pretraining stage on PRETRAIN other passages (the same
#: in every retraining), then FT_STEPS steps on the attributed passages at a lower rate.
PRETRAIN, FT_STEPS, FT_PEAK_LR, FT_WARMUP = 240, 120, 2e-3, 10
SCENARIOS = ("single", "finetune")

_DATA: dict = {}
_PRETRAINED: dict = {}


def data() -> dict:
    """The passages, training examples and queries (built once per process)."""
    if not _DATA:
        passages = load_prose_passages(TRAIN + QUERIES + PRETRAIN, length=LENGTH, seed=0)
        _DATA["train_texts"], _DATA["query_texts"] = passages[:TRAIN], passages[TRAIN:TRAIN + QUERIES]
        _DATA["train"] = passage_examples(passages[:TRAIN])
        _DATA["queries"] = completion_queries(passages[TRAIN:TRAIN + QUERIES], PROMPT)
        _DATA["pretrain"] = passage_examples(passages[TRAIN + QUERIES:])
    return _DATA


def _schedule(peak: float, warmup: int, steps: int) -> list[float]:
    """One learning rate per step: linear warm-up, then linear decay to 10%."""
    return [peak * min(1.0, (t + 1) / warmup) * (1.0 - 0.9 * t / steps) for t in range(steps)]


def rates() -> list[float]:
    return _schedule(PEAK_LR, WARMUP, STEPS)


def finetune_rates() -> list[float]:
    return _schedule(FT_PEAK_LR, FT_WARMUP, FT_STEPS)


def _run(model, optimizer, examples: list, indices: np.ndarray, schedule: list[float], generator,
         segments: int, record: bool) -> list[dict]:
    """AdamW steps on HF's loss, ``BATCH`` passages drawn from ``indices`` per step."""
    task = LanguageModelTask()
    every = len(schedule) // (segments * CHECKPOINTS_PER_SEGMENT)
    checkpoints = []
    model.train()
    for step, rate in enumerate(schedule):
        for group in optimizer.param_groups:
            group["lr"] = rate
        pick = indices[torch.randint(len(indices), (BATCH,), generator=generator).numpy()]
        input_ids, labels = task.collate([examples[i] for i in pick], "batch")
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        if record and (step + 1) % every == 0:
            checkpoints.append({"model": {k: v.clone() for k, v in model.state_dict().items()},
                                "optimizer": _copy(optimizer.state_dict())})
    model.eval()
    return checkpoints


def train(indices: np.ndarray, seed: int, record: bool = False, scenario: str = "single"):
    """The scenario's run with the attributed passages ``indices``: ``(model, optimizer,
    checkpoints)``, with ``{"model", "optimizer"}`` checkpoints (every stage's) when ``record``."""
    torch.manual_seed(seed)  # dropout's masks: every run is reproducible from its seed
    model = make_tiny_gpt2(seed=seed, **MODEL)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR)
    generator = torch.Generator().manual_seed(seed)
    if scenario == "single":
        return model, optimizer, _run(model, optimizer, data()["train"], indices, rates(), generator, SEGMENTS,
                                      record)
    # Pretraining does not depend on the subset: done once per seed and process.
    if seed not in _PRETRAINED or record:
        checkpoints = _run(model, optimizer, data()["pretrain"], np.arange(PRETRAIN), rates(), generator,
                           SEGMENTS, record)
        _PRETRAINED[seed] = (_copy(model.state_dict()), _copy(optimizer.state_dict()), generator.get_state(),
                             torch.random.get_rng_state(), checkpoints)
    state, optimizer_state, generator_state, dropout_state, checkpoints = _PRETRAINED[seed]
    model.load_state_dict(state)
    optimizer.load_state_dict(_copy(optimizer_state))  # torch would share the cached moments, then step them
    generator.set_state(generator_state)
    torch.random.set_rng_state(dropout_state)
    checkpoints = list(checkpoints) + _run(model, optimizer, data()["train"], indices, finetune_rates(), generator,
                                           SEGMENTS, record)
    return model, optimizer, checkpoints


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def measure(model) -> np.ndarray:
    """The completions' log-probabilities under ``model``, ``(Q,)``."""
    task = LanguageModelTask()
    input_ids, labels = task.collate(data()["queries"], "queries")
    with torch.no_grad():
        return task.measurement(model(input_ids=input_ids).logits, labels).double().numpy()


def ground_truth_fn(mask: np.ndarray, seed: int, scenario: str = "single") -> np.ndarray:
    """The retraining the LDS ground truth is made of (module level: picklable)."""
    model, _, _ = train(np.flatnonzero(mask), seed, scenario=scenario)
    return measure(model)


def attributed_run(seed: int, scenario: str = "single"):
    """The full run that is attributed: ``(model, trajectory, attributed segments)``."""
    model, optimizer, checkpoints = train(np.arange(TRAIN), seed, record=True, scenario=scenario)
    per = CHECKPOINTS_PER_SEGMENT
    stages = [(data()["train"], rates())] if scenario == "single" else [(data()["pretrain"], rates()),
                                                                        (data()["train"], finetune_rates())]
    segments = []
    for examples, schedule in stages:
        steps = len(schedule) // SEGMENTS
        for s in range(SEGMENTS):
            first = len(segments) * per
            segments.append(Segment(checkpoints[first:first + per], steps, schedule[s * steps:(s + 1) * steps],
                                    examples))
    attributed = list(range(len(segments) - SEGMENTS, len(segments)))
    # The live optimizer: its two groups by tensor.
    return model, Trajectory(segments, optimizer=optimizer), attributed


# ---------------------------------------------------------------------------- text similarity
def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def bm25_scores(queries: list[str], documents: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 of each document for each query (words), ``(Q, N)``."""
    docs = [Counter(_words(d)) for d in documents]
    lengths = np.array([sum(d.values()) for d in docs], dtype=float)
    mean_length = lengths.mean()
    frequency = Counter(w for d in docs for w in d)
    n = len(docs)
    out = np.zeros((len(queries), n))
    for q, text in enumerate(queries):
        for word in set(_words(text)):
            idf = math.log(1 + (n - frequency[word] + 0.5) / (frequency[word] + 0.5))
            for i, d in enumerate(docs):
                tf = d.get(word, 0)
                if tf:
                    out[q, i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[i] / mean_length))
    return out


def ngram_overlap(queries: list[str], documents: list[str], n: int = 4) -> np.ndarray:
    """Jaccard similarity of character ``n``-gram sets, ``(Q, N)``."""
    def grams(text: str) -> set[str]:
        return {text[i:i + n] for i in range(len(text) - n + 1)}

    doc_grams = [grams(d) for d in documents]
    out = np.zeros((len(queries), len(documents)))
    for q, text in enumerate(queries):
        g = grams(text)
        for i, d in enumerate(doc_grams):
            out[q, i] = len(g & d) / max(1, len(g | d))
    return out


# ---------------------------------------------------------------------------- the benchmark
@dataclass
class Settings:
    subsets: int = 100
    seeds: int = 6
    models: int = 2
    proj_dim: int = 2048  # srcproj's default
    processes: int = 2
    cache: str = "benchmarks/.cache"
    stores: str | None = None


def method_scores(seed: int, settings: Settings, picked: np.ndarray, timer: Timed,
                  scenario: str = "single") -> dict[str, np.ndarray]:
    began = time.perf_counter()
    model, trajectory, attributed = attributed_run(seed, scenario)
    timer.add("training the attributed model", time.perf_counter() - began)
    name = "lm" if scenario == "single" else f"lm-{scenario}"
    folder = os.path.join(settings.stores or os.path.join(settings.cache, "stores"), name, f"model{seed}")
    os.makedirs(folder, exist_ok=True)
    queries = [data()["queries"][i] for i in picked]
    attributor = _featurized(model, trajectory, os.path.join(folder, f"source_k{settings.proj_dim}.zarr"), timer,
                             "SOURCE", task=LanguageModelTask(), proj_dim=settings.proj_dim)
    scores = {}

    def timed(label, fn):
        t = time.perf_counter()
        out = fn()
        timer.add(label, time.perf_counter() - t)
        return out

    first = attributed[0]
    scores["SOURCE"] = timed("SOURCE", lambda: attributor.score(queries, segments=attributed))
    # The default before issue 18: every segment chained, ψ over the last segment.
    scores["SOURCE before issue 18"] = timed("SOURCE before issue 18", lambda: SourceVariant(
        attributor, segments=attributed, unroll="segments", query="last_segment").score(queries))
    scores["TracIn (Adam)"] = timed("TracIn (Adam)",
                                    lambda: TracIn(attributor, data_segment=first).score(queries))
    scores["IF"] = timed("IF", lambda: InfluenceFunction(attributor, data_segment=first).score(queries))
    texts = [data()["query_texts"][i] for i in picked]
    scores["BM25"] = timed("BM25", lambda: bm25_scores(texts, data()["train_texts"]))
    scores["character 4-gram overlap"] = timed("character 4-gram overlap",
                                                lambda: ngram_overlap(texts, data()["train_texts"]))
    return scores


def evaluate(settings: Settings, split: str = "report", progress: bool = True, scenario: str = "single") -> dict:
    """The LM scenario's entry in lds.py's results (same keys as a digits scenario's)."""
    chosen = SPLITS[split]
    masks = draw_subsets(TRAIN, settings.subsets, 0.5, seed=chosen["subset_seed"])
    seeds = range(chosen["first_retrain_seed"], chosen["first_retrain_seed"] + settings.seeds)
    picked = np.arange(chosen["first_query"], QUERIES, 2)
    name = "lm" if scenario == "single" else f"lm-{scenario}"
    folder = os.path.join(settings.cache, "ground_truth", name, "steps")
    began = time.perf_counter()
    outputs = retrain(functools.partial(ground_truth_fn, scenario=scenario), masks, seeds, folder,
                      processes=settings.processes, progress=progress)
    print(f"  ground truth lm/steps: {outputs.shape} in {time.perf_counter() - began:.1f} s")
    outputs = outputs[:, :, picked]
    timer = Timed()
    per_model = [method_scores(chosen["first_model_seed"] + m, settings, picked, timer, scenario)
                 for m in range(settings.models)]
    table, per_query, per_query_ensemble = {}, {}, {}
    for key in per_model[0]:
        single = lds(per_model[0][key], masks, outputs)
        ensemble = lds(np.mean([m[key] for m in per_model], axis=0), masks, outputs)
        per_query[key] = single.per_query
        per_query_ensemble[key] = ensemble.per_query
        table[f"{key} | steps"] = {"single": single.mean, "single_ci": single.ci_subsets,
                                   "single_ci_queries": single.ci_queries, "ensemble": ensemble.mean,
                                   "ensemble_ci": ensemble.ci_subsets,
                                   "seconds_per_model": timer.seconds.get(key, 0.0) / settings.models}
    others = [k for k in per_query if not k.startswith("SOURCE")]  # the other methods, not SOURCE's variants
    before = paired_difference(per_query["SOURCE"], per_query["SOURCE before issue 18"])
    print(f"SOURCE − SOURCE before issue 18, one model: {before.mean:+.3f} "
          f"[{before.ci[0]:+.3f}, {before.ci[1]:+.3f}]")
    runner_up = max(others, key=lambda k: table[f"{k} | steps"]["single"])
    d = paired_difference(per_query["SOURCE"], per_query[runner_up])
    e = paired_difference(per_query_ensemble["SOURCE"], per_query_ensemble[runner_up])
    versus = {"steps": {"other": runner_up, "diff": d.mean, "ci": list(d.ci),
                        "ensemble_diff": e.mean, "ensemble_ci": list(e.ci)}}
    print(f"SOURCE − {runner_up}, one model: {d.mean:+.3f} [{d.ci[0]:+.3f}, {d.ci[1]:+.3f}]; "
          f"{settings.models} models: {e.mean:+.3f} [{e.ci[0]:+.3f}, {e.ci[1]:+.3f}]")
    print(f"{'method':<28} {'LDS 1 model':>22} {'LDS ensemble':>22} {'s/model':>8}")
    for key, row in sorted(table.items(), key=lambda kv: -kv[1]["single"]):
        lo, hi = row["single_ci"]
        elo, ehi = row["ensemble_ci"]
        print(f"{key.split(' | ')[0]:<28} {row['single']:>7.3f} [{lo:.3f}, {hi:.3f}] "
              f"{row['ensemble']:>7.3f} [{elo:.3f}, {ehi:.3f}] {row['seconds_per_model']:>8.2f}")
    description = (f"GPT-2 ({MODEL['n_layer']} layers, width {MODEL['n_embd']}, tied embeddings) trained with AdamW "
                   f"on {TRAIN} prose passages of {LENGTH} characters; {len(picked)} held-out prompt + completion "
                   f"queries ({split} split)")
    steps = f"{STEPS} steps of {BATCH}, {SEGMENTS} segments of {CHECKPOINTS_PER_SEGMENT} checkpoints"
    if scenario == "finetune":
        description = (f"the same GPT-2 pretrained on {PRETRAIN} other passages, then fine-tuned on the {TRAIN} "
                       f"attributed ones; {len(picked)} held-out prompt + completion queries ({split} split)")
        steps = (f"{STEPS} pretraining + {FT_STEPS} fine-tuning steps of {BATCH}, {SEGMENTS} segments of "
                 f"{CHECKPOINTS_PER_SEGMENT} checkpoints per stage")
    return {"lds": table, "description": description, "steps": steps,
            "source_vs_runner_up": versus, "timer": timer.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=tuple(SPLITS), default="report")
    parser.add_argument("--scenario", choices=SCENARIOS, default="single")
    parser.add_argument("--subsets", type=int, default=Settings.subsets)
    parser.add_argument("--seeds", type=int, default=Settings.seeds)
    parser.add_argument("--models", type=int, default=Settings.models)
    parser.add_argument("--proj-dim", type=int, default=Settings.proj_dim)
    parser.add_argument("--processes", type=int, default=Settings.processes)
    parser.add_argument("--cache", default=Settings.cache)
    parser.add_argument("--stores", default=None)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: a quick end-to-end check")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = Settings(args.subsets, args.seeds, args.models, args.proj_dim, args.processes, args.cache, args.stores)
    if args.smoke:
        settings = Settings(subsets=8, seeds=1, models=1, proj_dim=32, processes=1, cache=args.cache,
                            stores=args.stores)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{settings.subsets} subsets × {settings.seeds} seeds, {settings.models} models, k = {settings.proj_dim}")
    entry = evaluate(settings, args.split, not args.no_progress, args.scenario)
    if args.out:
        with open(args.out, "w") as handle:
            key = "lm" if args.scenario == "single" else f"lm-{args.scenario}"
            json.dump({"settings": vars(settings), "split": args.split, "scenarios": {key: entry}}, handle,
                      indent=1, default=float)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
