"""The whole job as a user runs it: srcproj's defaults against the official TRAK and kronfluence.

For each scenario, in one run, on the same model, data and checkpoint(s):

* **srcproj** with its defaults: ``Attributor(model, ClassificationTask(), trajectory,
  store, proj_dim=k)`` (nothing else given; the progress bar is switched off), then
  ``featurize()`` and ``score(queries)``. The wall time is the whole job: building the
  Attributor (store creation), every featurize stage (features, Hessians, spectra,
  caches) and scoring. It is split (under the table) by the ``FeaturizeReport``'s
  ``stage_seconds`` where srcproj records them, and by timers wrapped around a few of
  srcproj's functions (eigendecompositions, k × k Hessian sums, unrolling operators,
  query gradients; instrumentation only, it changes nothing);
* **TRAK (official)**, ``traker`` 0.3.2 through ``benchmarks/trak_official.py`` (CPU,
  float32, Rademacher ``BasicProjector``, one model: the final checkpoint): TRAKer
  construction, featurize, finalize and scoring. Its k is the largest power of two
  at most N / 2 (capped at srcproj's k; ``--trak-proj-dim`` sets it): TRAK inverts
  ``ΦᵀΦ`` undamped, which is singular for k ≥ N (:func:`trak_proj_dim`). Its batch
  is its best CPU batch as in ``benchmarks/featurize.py``: the largest whose
  predicted peak memory (TRAK's peak RSS featurizing one batch of 16 and of 128
  examples, extrapolated linearly) fits srcproj's measured peak;
* **kronfluence EK-FAC** (``kronfluence`` 1.0.1, ``Analyzer(cpu=True)``,
  ``FactorArguments(strategy="ekfac")``) at the final checkpoint: covariance factors,
  eigendecomposition, eigenvalue correction (lambda) and pairwise scores (all queries
  in one batch, so each training gradient is taken once; the factor and training
  batch is TRAK's best batch). Two runs: ``kronfluence`` with its default damping
  (``ScoreArguments().damping_factor``, 1e-8) and ``kronfluence-heuristic`` with its
  heuristic (``damping_factor=None``: 0.1 × the mean eigenvalue), each timed whole.
  Its train loss is the summed cross-entropy, its measurement srcproj's margin, and
  its scores are turned into srcproj's sign convention by :func:`orient_kronfluence`.

Each method runs in its own subprocess with ``--threads`` threads (torch, OpenMP, BLAS);
its peak memory is that process's VmHWM. On the LDS scenarios every method's scores
are compared with retraining by ``srcproj.eval.lds`` on the ``report`` split of
``benchmarks/lds.py`` (its subsets, retraining seeds, attributed model seed and odd
test indices as queries). The ground truth is the "same steps" protocol (a 50% subset
trained for as many steps as the full run, the counterfactual srcproj's defaults
estimate; ``--protocols steps epochs`` adds the same-epochs one, on which srcproj's
default scores are not adjusted), cached under ``--cache`` and shared with
``benchmarks/lds.py`` for its scenarios.

Scenarios (``--scenario``; all use SGD with momentum 0.9, weight decay 1e-3, batch 64,
100 queries from the test set):

* ``mlp-1m``: MLP 64 → 1024 → 896 → 10 (993,930 parameters) on 1,000 standardised
  digits, 10 epochs, one checkpoint (the final one), k = 1024; speed only;
* ``mlp-lds``: MLP 64 → 64 → 64 → 10 (8,970 parameters), 1,000 standardised digits,
  20 epochs, 3 segments × 2 checkpoints, k = 2048; LDS;
* ``cnn``: the small CNN of ``benchmarks/featurize.py`` (421,642 parameters) on 1,000
  standardised digits upsampled to 1 × 28 × 28, 10 epochs, one checkpoint, k = 1024;
  speed only;
* ``cnn-digits``: a CNN on the 8 × 8 digits (conv 1 → 16 and 16 → 16, 3 × 3, each with
  ReLU and 2 × 2 max-pooling, then linear 64 → 10; 3,130 parameters), 1,000
  standardised digits, 20 epochs, 3 segments × 2 checkpoints, k = 2048; LDS (the
  accuracy guard of srcproj's defaults on a convolutional model);
* ``converged``, ``noisy-short``, ``two-stage``: the LDS scenarios of
  ``benchmarks/lds.py`` (64 → 64 → 10 MLP, 1,437 digits), k = 2048.

The table gives, per method, its k, batch, wall seconds, wall time ÷ srcproj's, peak
RSS, and on LDS scenarios the LDS with its 95% bootstrap interval over subsets and
LDS ÷ srcproj's (shown when srcproj's LDS is at least 0.05). Under it: srcproj's time
split, each baseline's stages, and the mean per-query Spearman correlation of its
scores with srcproj's. The header names the commit of the checkout and whether
``srcproj/`` had uncommitted changes.

    python benchmarks/end_to_end.py --scenario mlp-lds --threads 1 --json mlp-lds.json
    python benchmarks/end_to_end.py --scenario all --json all.json     # hours on 2 cores
    python benchmarks/end_to_end.py --scenario mlp-lds --quick         # a smoke-size run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing
sys.path.insert(0, HERE)

import scenarios as sc  # noqa: E402

METHODS = ("srcproj", "trak", "kronfluence", "kronfluence-heuristic")
LABELS = {"srcproj": "srcproj (defaults)", "trak": "TRAK (official)", "kronfluence": "kronfluence EK-FAC",
          "kronfluence-heuristic": "kronfluence, heur. damp"}
PACKAGES = {"srcproj": "srcproj", "trak": "trak", "kronfluence": "kronfluence", "kronfluence-heuristic": "kronfluence"}
# kronfluence's ScoreArguments.damping_factor per run: "default" keeps its own default.
DAMPING = {"kronfluence": "default", "kronfluence-heuristic": None}
PROTOCOLS = ("steps", "epochs")


# --------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Spec:
    """What a scenario trains and measures."""

    summary: str
    proj_dim: int
    lds: bool
    per_segment: int = 2  # checkpoints per segment of the scenario's own trajectory


SPECS = {
    "mlp-1m": Spec("MLP 64-1024-896-10 on 1,000 standardised digits, one checkpoint", 1024, False, 1),
    "mlp-lds": Spec("MLP 64-64-64-10 on 1,000 standardised digits, 3 segments x 2 checkpoints", 2048, True),
    "cnn": Spec("featurize.py's CNN on 1,000 digits upsampled to 28x28, one checkpoint", 1024, False, 1),
    "cnn-digits": Spec("CNN on 1,000 8x8 digits, 3 segments x 2 checkpoints", 2048, True),
    "converged": Spec("lds.py's converged: MLP 64-64-10, 1,437 digits, 40 epochs", 2048, True),
    "noisy-short": Spec("lds.py's noisy-short: 30% flipped labels, 5 epochs", 2048, True),
    "two-stage": Spec("lds.py's two-stage: stage 1 attributed, rotated queries", 2048, True),
}
QUICK = {"train": 200, "queries": 10, "proj_dim": 64, "epochs": 5, "subsets": 8, "seeds": 1}


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_wide_mlp(seed: int = 0) -> nn.Module:
    """The ``mlp-1m`` model: 64 → 1024 → 896 → 10 ReLU MLP (993,930 parameters)."""
    return _seeded(lambda: nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 896), nn.ReLU(),
                                         nn.Linear(896, 10)), seed)


def make_deep_mlp(seed: int = 0) -> nn.Module:
    """The ``mlp-lds`` model: 64 → 64 → 64 → 10 ReLU MLP (8,970 parameters)."""
    return _seeded(lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                         nn.Linear(64, 10)), seed)


def make_digits_cnn(seed: int = 0) -> nn.Module:
    """The ``cnn-digits`` model on flat 8 × 8 digits (3,130 parameters)."""
    return _seeded(lambda: nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10)), seed)


def make_featurize_cnn(seed: int = 0) -> nn.Module:
    """``benchmarks/featurize.py``'s CNN (421,642 parameters), initialised with ``seed``."""
    from featurize import _model

    model = _model("cnn")  # featurize.py seeds its own initialisation with 0
    if seed:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return model


def make_lds_mlp(seed: int = 0) -> nn.Module:
    """The 64 → 64 → 10 MLP of ``benchmarks/lds.py``'s scenarios."""
    from srcproj.demo import make_mlp

    return make_mlp(sc.HIDDEN, seed)


MODELS = {"mlp-1m": make_wide_mlp, "mlp-lds": make_deep_mlp, "cnn": make_featurize_cnn,
          "cnn-digits": make_digits_cnn}


def model_factory(name: str):
    """``make_model(seed)`` of a scenario."""
    return MODELS.get(name, make_lds_mlp)


def build_scenario(name: str, quick: bool = False):
    """The scenario's data and training recipe, and its model factory.

    Returns
    -------
    scenario : scenarios.Scenario
        Its stages (data, epochs, learning rate, segments) and all its test queries.
    make_model : callable
        ``make_model(seed) -> nn.Module``.
    """
    if name not in SPECS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {sorted(SPECS)}")
    if name in sc.SCENARIOS:
        return sc.make_scenario(name), make_lds_mlp
    X, y, Xt, yt = sc.load_standardised_digits(QUICK["train"] if quick else 1000)
    if name == "cnn":
        def up(images):
            return torch.nn.functional.interpolate(images.reshape(-1, 1, 8, 8), size=(28, 28), mode="bilinear",
                                                   align_corners=False).contiguous()

        X, Xt = up(X), up(Xt)
    epochs = {"mlp-1m": 10, "mlp-lds": 20, "cnn": 10, "cnn-digits": 20}[name]
    lr = {"mlp-1m": 0.02, "mlp-lds": 0.05, "cnn": 0.02, "cnn-digits": 0.05}[name]
    segments = 1 if SPECS[name].per_segment == 1 else 3
    stage = sc.Stage(X, y, epochs=QUICK["epochs"] if quick else epochs, lr=lr, segments=segments, target=True)
    return sc.Scenario(name, [stage], (Xt, yt), description=SPECS[name].summary), MODELS[name]


def trak_proj_dim(k: int, num_train: int) -> int:
    """TRAK's k: the largest power of two at most ``num_train / 2``, and at most ``k``.

    TRAK inverts ``ΦᵀΦ`` (k × k, from N projected gradients) without damping: it is
    singular for k ≥ N and ill-conditioned close to it (on ``mlp-lds``, N = 1,000, its
    LDS was 0.27 / 0.29 / 0.28 / 0.18 at k = 64 / 128 / 256 / 512). This rule gives
    lds.py's k = 512 on its 1,437-example scenarios.
    """
    return int(min(k, 2 ** int(np.floor(np.log2(max(num_train // 2, 1))))))


# --------------------------------------------------------------------------- kronfluence
def orient_kronfluence(scores) -> np.ndarray:
    """Kronfluence's pairwise scores in srcproj's sign convention, ``(Q, N)`` float32.

    Kronfluence 1.0.1 returns ``∇f(z_q)ᵀ (G + λI)⁻¹ ∇L(z_m)`` (``score/pairwise.py``:
    the preconditioned measurement gradient dotted with the training-loss gradient,
    no sign). Up-weighting example m by ε moves the parameters by ``-ε H⁻¹ ∇L(z_m)``,
    so the measurement changes by ``-ε`` times that score: a positive kronfluence score
    means including the example *lowers* f. With the margin as f (higher = better),
    srcproj's convention (positive = including the example helps the query) is its
    negative.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    return -np.asarray(scores, dtype=np.float32)


def kronfluence_task():
    """A kronfluence ``Task``: summed cross-entropy as the train loss, srcproj's margin as f."""
    from kronfluence.task import Task

    from srcproj import ClassificationTask

    margin = ClassificationTask()

    class MarginTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # labels drawn from the model's prediction: the true Fisher
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return margin.measurement(model(x), y).sum()

    return MarginTask()


def kronfluence_scores(model: nn.Module, train, queries, workdir: str, batch_size: int = 64,
                       damping: float | str | None = "default") -> tuple[np.ndarray, dict]:
    """EK-FAC influence from kronfluence at ``model``'s weights, in srcproj's sign.

    Parameters
    ----------
    model : nn.Module
        The trained model (wrapped in place by ``kronfluence.prepare_model``).
    train, queries : (inputs, labels)
        Training examples and queries.
    workdir : str
        kronfluence's ``output_dir`` (factors and scores are written there).
    batch_size : int
        Examples per batch when fitting factors and taking training gradients; the
        queries go in one batch.
    damping : float, None or "default"
        ``ScoreArguments.damping_factor``: ``"default"`` keeps kronfluence's own
        (1e-8 in 1.0.1); ``None`` is its heuristic, 0.1 × the mean eigenvalue.

    Returns
    -------
    scores : numpy.ndarray
        ``(Q, N)`` float32, positive = including the example raises the query's margin.
    seconds : dict
        Wall seconds of each kronfluence stage.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = kronfluence_task()
    train_set = torch.utils.data.TensorDataset(*train)
    query_set = torch.utils.data.TensorDataset(*queries)
    seconds: dict[str, float] = {}

    def timed(key, fn, **kwargs):
        began = time.perf_counter()
        with warnings.catch_warnings():  # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler even on CPU
            warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)
            out = fn(**kwargs)
        seconds[key] = time.perf_counter() - began
        return out

    threads = torch.get_num_threads()
    model = prepare_model(model, task)
    analyzer = Analyzer("end_to_end", model, task, cpu=True, disable_tqdm=True, output_dir=workdir,
                        log_level=logging.WARNING)
    torch.set_num_threads(threads)  # keep --threads whatever accelerate's state does
    factor_args = FactorArguments(strategy="ekfac")
    common = {"factors_name": "ekfac", "factor_args": factor_args, "overwrite_output_dir": True}
    timed("covariance factors", analyzer.fit_covariance_matrices, dataset=train_set, per_device_batch_size=batch_size,
          **common)
    timed("eigendecomposition", analyzer.perform_eigendecomposition, **common)
    timed("eigenvalue correction", analyzer.fit_lambda_matrices, dataset=train_set, per_device_batch_size=batch_size,
          **common)
    timed("pairwise scores", analyzer.compute_pairwise_scores, scores_name="pairwise", factors_name="ekfac",
          query_dataset=query_set, train_dataset=train_set, per_device_query_batch_size=len(query_set),
          per_device_train_batch_size=batch_size,
          score_args=ScoreArguments() if damping == "default" else ScoreArguments(damping_factor=damping),
          overwrite_output_dir=True)
    raw = analyzer.load_pairwise_scores("pairwise")["all_modules"]
    return orient_kronfluence(raw), seconds


# --------------------------------------------------------------------------- srcproj's stage split
@contextlib.contextmanager
def stage_timers():
    """Wall seconds spent inside some of srcproj's functions during featurize and score.

    Wraps functions of :mod:`srcproj.pipeline`, :mod:`srcproj.curvature` and
    :mod:`srcproj.context` (a missing name is skipped, so a renamed internal only loses
    its line). They complement ``FeaturizeReport.stage_seconds`` with what is inside
    its stages: the k × k Hessian sums, the eigendecompositions, the unrolling
    operators, and the query gradients of scoring.
    """
    import srcproj.context
    import srcproj.curvature
    import srcproj.pipeline as pipeline

    targets = [
        ("k x k Hessian sums", srcproj.curvature, "HessianAccumulator", "add"),
        ("eigendecompositions", pipeline, None, "eigendecompose"),
        ("unrolling operators", pipeline, None, "unrolling_operators"),
        ("query gradients", srcproj.context, "AttributionContext", "measurement_features"),
    ]
    seconds: dict[str, float] = {}
    restore = []
    for key, module, cls, attr in targets:
        owner = getattr(module, cls, None) if cls else module
        original = getattr(owner, attr, None) if owner is not None else None
        if original is None:
            continue

        def wrapper(*args, _key=key, _original=original, **kwargs):
            began = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_key] = seconds.get(_key, 0.0) + time.perf_counter() - began

        functools.update_wrapper(wrapper, original)
        setattr(owner, attr, wrapper)
        restore.append((owner, attr, original))
    try:
        yield seconds
    finally:
        for owner, attr, original in reversed(restore):
            setattr(owner, attr, original)


# --------------------------------------------------------------------------- child side
def _load_job(path: str) -> dict:
    return torch.load(path, weights_only=True)


def _child(config: dict) -> dict:
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)  # kronfluence's sampled labels (true Fisher) draw from the global generator
    from featurize import _peak_rss

    job = _load_job(config["job"])
    make_model = model_factory(job["scenario"])
    train = job["stages"][job["target_stage"]]
    queries = job["queries"]
    final = torch.load(job["final"], weights_only=True)
    workdir = tempfile.mkdtemp(prefix=f"e2e_{config['method']}_", dir=config["workdir"])
    result: dict = {"method": config["method"]}
    scores = None
    if config["method"] == "srcproj":
        from srcproj import Attributor, ClassificationTask, Segment, Trajectory

        with stage_timers() as stages:
            began = time.perf_counter()
            trajectory = Trajectory(
                [Segment(s["checkpoints"], s["steps"], s["lr"], job["stages"][s["stage"]]) for s in job["segments"]],
                momentum=job["momentum"], weight_decay=job["weight_decay"])
            attributor = Attributor(make_model(0), ClassificationTask(), trajectory,
                                    os.path.join(workdir, "store.zarr"), proj_dim=config["proj_dim"])
            built = time.perf_counter()
            report = attributor.featurize(progress=False)
            featurized = time.perf_counter()
            scores = np.asarray(attributor.score(queries), dtype=np.float32)
            done = time.perf_counter()
        result.update(seconds=done - began, proj_dim=attributor.proj_dim, hessian=attributor.hessian, batch=64,
                      stages={"build Attributor": built - began, "featurize": featurized - built,
                              "score": done - featurized},
                      featurize_stages=dict(getattr(report, "stage_seconds", None) or {}), inside=dict(stages),
                      featurize_report_seconds=report.seconds)
    elif config["method"] in ("trak", "trak-probe"):
        from trak_official import official_trak_scores

        if config["method"] == "trak":
            began = time.perf_counter()
            scores, inner = official_trak_scores(make_model(0), [final], train, queries, proj_dim=config["proj_dim"],
                                                 seed=0, batch_size=config["batch"],
                                                 save_dir=os.path.join(workdir, "trak"))
            result.update(seconds=time.perf_counter() - began, trak_seconds=inner, proj_dim=config["proj_dim"],
                          batch=config["batch"])
        else:  # featurize one batch only: TRAK's peak memory at this batch size
            from trak import TRAKer
            from trak_official import _quiet_trak, make_basic_projector

            model, batch = make_model(0), config["batch"]
            params = sum(p.numel() for p in model.parameters())
            x, y = train[0][:batch], train[1][:batch]
            with _quiet_trak():
                traker = TRAKer(model=model, task="image_classification", train_set_size=len(x),
                                save_dir=os.path.join(workdir, "probe"), load_from_save_dir=True, device="cpu",
                                projector=make_basic_projector(params, config["proj_dim"], 0),
                                use_half_precision=False, logging_level=logging.ERROR)
                traker.load_checkpoint(final, model_id=0)
                traker.featurize(batch=(x, y), num_samples=len(x))
    elif config["method"].startswith("kronfluence"):
        model = make_model(0)
        model.load_state_dict(final)
        began = time.perf_counter()
        scores, stages = kronfluence_scores(model, train, queries, os.path.join(workdir, "kronfluence"),
                                            batch_size=config["batch"], damping=config["damping"])
        result.update(seconds=time.perf_counter() - began, stages=stages, batch=config["batch"])
    else:
        raise ValueError(config["method"])
    if scores is not None:
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError(f"{config['method']} returned non-finite scores")
        result["scores"] = os.path.join(config["workdir"], f"{config['method']}_scores.npy")
        np.save(result["scores"], scores)
    result["peak_rss"] = _peak_rss()
    result["threads"] = torch.get_num_threads()
    return result


# --------------------------------------------------------------------------- parent side
def _run_child(config: dict, timeout: float) -> dict:
    threads = str(config["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{config['method']} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare_job(name: str, quick: bool, seed: int, workdir: str, num_queries: int, first_query: int) -> dict:
    """Train the attributed model, save its checkpoints and the data for the children."""
    scenario, make_model = build_scenario(name, quick)
    spec = SPECS[name]
    began = time.perf_counter()
    if name in sc.SCENARIOS:
        final, trajectory_of = sc.attributed_run(scenario, seed)
        trajectory = trajectory_of("steps")
        stage_of = {id(stage.X): i for i, stage in enumerate(scenario.stages)}
        segments = [(stage_of[id(segment.data[0])], list(segment.checkpoints), segment.steps)
                    for segment in trajectory.segments]
    else:
        final, segments = sc.module_attributed_run(make_model, scenario, seed, spec.per_segment)
    trained = time.perf_counter() - began
    Xq, yq = scenario.queries
    picked = np.arange(first_query, len(yq), 2)[:num_queries]
    model = make_model(0)
    model.load_state_dict(final)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(Xq).argmax(1) == yq).float().mean())
    described, count = [], 0
    for stage_index, states, steps in segments:
        paths = []
        for state in states:
            paths.append(os.path.join(workdir, f"checkpoint{count}.pt"))
            torch.save(state, paths[-1])
            count += 1
        described.append({"stage": stage_index, "checkpoints": paths, "steps": int(steps),
                          "lr": float(scenario.stages[stage_index].lr)})
    torch.save(final, os.path.join(workdir, "final.pt"))
    target = next(i for i, s in enumerate(scenario.stages) if s.target)
    job = {"scenario": name, "quick": quick, "stages": [(s.X, s.y) for s in scenario.stages],
           "target_stage": target, "segments": described, "momentum": sc.MOMENTUM,
           "weight_decay": sc.WEIGHT_DECAY, "final": os.path.join(workdir, "final.pt"),
           "queries": (Xq[picked], yq[picked])}
    torch.save(job, os.path.join(workdir, "job.pt"))
    return {"path": os.path.join(workdir, "job.pt"), "picked": picked, "accuracy": accuracy,
            "train_seconds": trained, "checkpoints": count, "num_train": int(scenario.target.X.shape[0]),
            "params": sum(p.numel() for p in model.parameters()), "scenario": scenario}


def ground_truth(name: str, quick: bool, scenario, args, split_name: str = "report") -> dict:
    """Masks and retrained query margins per protocol, by lds.py's split and retraining runner.

    ``args`` gives ``subsets``, ``seeds``, ``protocols``, ``cache``, ``processes`` and
    ``no_progress``.
    """
    from lds import SPLITS

    from srcproj.eval import draw_subsets, retrain

    split = SPLITS[split_name]
    masks = draw_subsets(scenario.num_targets, args.subsets, 0.5, seed=split["subset_seed"])
    seeds = range(split["first_retrain_seed"], split["first_retrain_seed"] + args.seeds)
    outputs = {}
    for protocol in args.protocols:
        if name in sc.SCENARIOS:
            train_fn, folder = sc.GroundTruthFn(name, protocol), os.path.join(args.cache, "ground_truth", name)
        else:
            train_fn = sc.ModuleGroundTruthFn(functools.partial(build_scenario, name, quick), protocol)
            folder = os.path.join(args.cache, "ground_truth", f"e2e-{name}{'-quick' if quick else ''}")
        began = time.perf_counter()
        outputs[protocol] = retrain(train_fn, masks, seeds, os.path.join(folder, protocol), processes=args.processes,
                                    progress=not args.no_progress, models_per_call=50)
        print(f"  ground truth {protocol}: {outputs[protocol].shape} (subsets, seeds, queries) "
              f"in {time.perf_counter() - began:.1f} s")
    return {"masks": masks, "outputs": outputs}


def _tree_state() -> str:
    """The checkout's commit, and whether srcproj/ differs from it (read-only git calls)."""
    root = os.path.dirname(HERE)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "srcproj"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit or 'unknown'}{' + uncommitted srcproj/ changes' if dirty else ''}"


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _available(method: str) -> bool:
    return importlib.util.find_spec(PACKAGES[method]) is not None


def run_scenario(name: str, args) -> dict:
    """Train, time every method, compute LDS; print the table and return the results."""
    from lds import SPLITS

    spec, quick = SPECS[name], args.quick
    split = SPLITS["report"]
    workdir = tempfile.mkdtemp(prefix=f"e2e_{name}_")
    num_queries = QUICK["queries"] if quick else args.queries
    job = _prepare_job(name, quick, split["first_model_seed"], workdir, num_queries, split["first_query"])
    k = QUICK["proj_dim"] if quick else spec.proj_dim
    n = job["num_train"]
    print(f"\n== {name}: {spec.summary}; {job['params']:,} parameters, {n:,} training examples, "
          f"{job['checkpoints']} checkpoint(s), {len(job['picked'])} queries, k = {k}; test accuracy "
          f"{job['accuracy']:.3f} (trained in {job['train_seconds']:.1f} s)")
    truth = None
    if spec.lds and not args.no_lds:
        truth = ground_truth(name, quick, job["scenario"], args)  # before the timed runs: it loads the CPUs
    base = {"job": job["path"], "workdir": workdir, "threads": args.threads}
    runs: dict[str, dict] = {}
    notes: list[str] = []
    for method in args.methods:
        if not _available(method):
            notes.append(f"{LABELS[method]}: skipped ({PACKAGES[method]} is not installed)")
            continue
        load = _loadavg()
        if method == "srcproj":
            runs[method] = _run_child({**base, "method": "srcproj", "proj_dim": k}, args.timeout)
        elif method == "trak":
            k_trak = args.trak_proj_dim or trak_proj_dim(k, n)
            batch = args.trak_batch or _trak_best_batch(base, k_trak, n, runs, notes, args.timeout)
            runs[method] = _run_child({**base, "method": "trak", "proj_dim": k_trak, "batch": batch}, args.timeout)
        else:
            batch = args.kronfluence_batch or runs.get("trak", {}).get("batch", 64)
            runs[method] = _run_child({**base, "method": method, "batch": batch, "damping": DAMPING[method]},
                                      args.timeout)
        runs[method]["load_before"] = load
    scores = {m: np.load(r["scores"]) for m, r in runs.items()}
    for method, r in runs.items():
        if truth is not None:
            r["lds"] = {}
            for protocol in args.protocols:
                from srcproj.eval import lds

                result = lds(scores[method], truth["masks"], truth["outputs"][protocol][:, :, job["picked"]])
                r["lds"][protocol] = {"mean": result.mean, "ci_subsets": list(result.ci_subsets)}
        r.pop("scores")
    if "srcproj" in scores:
        for method in scores:
            if method != "srcproj":
                runs[method]["spearman_vs_srcproj"] = _mean_spearman(scores[method], scores["srcproj"])
    _print_table(runs, args.protocols if truth is not None else [], notes)
    shutil.rmtree(workdir, ignore_errors=True)
    return {"scenario": name, "summary": spec.summary, "params": job["params"], "num_train": n,
            "queries": len(job["picked"]), "checkpoints": job["checkpoints"], "proj_dim": k,
            "test_accuracy": job["accuracy"], "quick": quick, "threads": args.threads,
            "ground_truth": None if truth is None else {"subsets": args.subsets, "seeds": args.seeds,
                                                        "protocols": list(args.protocols)},
            "methods": runs, "notes": notes}


def _trak_best_batch(base: dict, k_trak: int, n: int, runs: dict, notes: list, timeout: float) -> int:
    """TRAK's largest batch whose predicted peak memory fits srcproj's (as benchmarks/featurize.py)."""
    if "srcproj" not in runs:
        notes.append("TRAK: batch 64 (no srcproj run to size its memory budget)")
        return 64
    small, large = 16, 128
    if n < large:
        return n
    probes = [_run_child({**base, "method": "trak-probe", "proj_dim": k_trak, "batch": b}, timeout)["peak_rss"]
              for b in (small, large)]
    per_example = max((probes[1] - probes[0]) / (large - small), 1.0)
    budget = runs["srcproj"]["peak_rss"]
    fit = int((budget - probes[0]) / per_example) + small
    best = max(1, min(n, fit))
    notes.append(f"TRAK batch {best}: its peak RSS {probes[0] / 2**20:,.0f} MiB at batch {small}, "
                 f"{probes[1] / 2**20:,.0f} MiB at {large} ({per_example / 2**20:.2f} MiB per example); srcproj "
                 f"peaked at {budget / 2**20:,.0f} MiB{' (capped at N)' if fit > n else ''}")
    return best


def _mean_spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    values = [spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)]
    return float(np.nanmean(values))


def _print_table(runs: dict, protocols, notes: list) -> None:
    ref = runs.get("srcproj")
    head = f"  {'method':<24} {'k':>5} {'batch':>5} {'wall s':>8} {'x srcproj':>9} {'peak MiB':>9}"
    for protocol in protocols:
        head += f" {'LDS same ' + protocol:>26} {'x srcproj':>9}"
    print(head)
    for method, r in runs.items():
        line = (f"  {LABELS[method]:<24} {r.get('proj_dim', '-')!s:>5} {r.get('batch', '-')!s:>5} "
                f"{r['seconds']:8.1f} {r['seconds'] / ref['seconds'] if ref else float('nan'):9.2f} "
                f"{r['peak_rss'] / 2**20:9,.0f}")
        for protocol in protocols:
            value = r["lds"][protocol]
            interval = f"{value['mean']:.3f} [{value['ci_subsets'][0]:.3f}, {value['ci_subsets'][1]:.3f}]"
            base = ref["lds"][protocol]["mean"] if ref else float("nan")
            ratio = f"{value['mean'] / base:9.2f}" if base >= 0.05 else f"{'-':>9}"
            line += f" {interval:>26} {ratio}"
        print(line)
    if ref:
        stages, inner = ref["stages"], ref["featurize_stages"]
        split = ", ".join(f"{key} {value:.1f}" for key, value in inner.items())
        if inner:
            split += f", other {stages['featurize'] - sum(inner.values()):.1f}"
        print(f"  srcproj (s): build Attributor {stages['build Attributor']:.1f}, featurize {stages['featurize']:.1f}"
              f"{f' ({split})' if split else ''}, score {stages['score']:.1f}; inside: "
              + ", ".join(f"{key} {value:.1f}" for key, value in ref["inside"].items()))
    for method in METHODS[1:]:
        if method in runs and "spearman_vs_srcproj" in runs[method]:
            extra = ""
            if "stages" in runs[method]:
                extra = "; " + ", ".join(f"{k} {v:.1f} s" for k, v in runs[method]["stages"].items())
            print(f"  {LABELS[method]}: mean per-query Spearman with srcproj "
                  f"{runs[method]['spearman_vs_srcproj']:.3f}{extra}")
    for note in notes:
        print(f"  note: {note}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="mlp-lds", choices=[*SPECS, "all"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke size: {QUICK['train']} training examples, {QUICK['queries']} queries, "
                             f"k = {QUICK['proj_dim']}, {QUICK['epochs']} epochs, {QUICK['subsets']} subsets x "
                             f"{QUICK['seeds']} seed (lds.py's scenarios keep their own training set)")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP / BLAS threads of every method")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=100, help="ground truth: random 50%% subsets")
    parser.add_argument("--seeds", type=int, default=10, help="ground truth: retraining seeds per subset")
    parser.add_argument("--protocols", nargs="+", default=["steps"], choices=PROTOCOLS)
    parser.add_argument("--processes", type=int, default=1, help="ground truth: retraining processes")
    parser.add_argument("--cache", default=os.path.join(HERE, ".cache"), help="ground-truth cache")
    parser.add_argument("--no-lds", action="store_true", help="time only, no ground truth")
    parser.add_argument("--trak-batch", type=int, default=None, help="skip TRAK's memory probes, use this batch")
    parser.add_argument("--trak-proj-dim", type=int, default=None)
    parser.add_argument("--kronfluence-batch", type=int, default=None, help="default: TRAK's batch, else 64")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    if args.quick:
        args.subsets, args.seeds = min(args.subsets, QUICK["subsets"]), min(args.seeds, QUICK["seeds"])
    torch.set_num_threads(args.threads)
    tree = _tree_state()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} "
          f"thread(s) per method, python {platform.python_version()}; srcproj at {tree}; load average {_loadavg()}")
    names = list(SPECS) if args.scenario == "all" else [args.scenario]
    results = {"threads": args.threads, "torch": torch.__version__, "srcproj_tree": tree, "scenarios": {}}
    for name in names:
        results["scenarios"][name] = run_scenario(name, args)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=1, default=float)
    print(f"\nload average at the end: {_loadavg()}")


if __name__ == "__main__":
    main()
