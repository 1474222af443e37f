"""Two AdamW scenarios of the LDS benchmark (issue 12), and a trainer for many of them at once.

The model is the 64 → 64 → 10 ReLU MLP of :func:`srcproj.demo.make_mlp` on the digits
standardised pixel by pixel (:func:`scenarios.load_standardised_digits` with 1,437
training images: the split of ``scenarios.py``, 360 test images as queries), trained
with AdamW (betas 0.9 / 0.999, eps 1e-8), batch 64, weight decay 0.01 on the weight
matrices only (the biases are a second parameter group without decay):

- ``adamw-cosine``: 20 epochs (449 steps), learning rate warmed up linearly over the
  first 10% of the steps to 2e-3, then a cosine decay towards 0; 3 segments;
- ``adamw-twostage`` (held out from all tuning): scenarios.py's ``two-stage`` data
  (stage 1: 718 digits, 15 epochs, the attribution target; stage 2: the other 719
  rotated by 90°, 8 epochs; rotated test queries) with one optimizer and one schedule
  over both stages: warm-up over the first 10% of stage 1, then a constant 1e-3;
  segments: 2 in stage 1, 1 in stage 2.

Each segment saves 2 checkpoints, in the middle and at the end of its stretch of steps.

Learning-rate schedule (:meth:`AdamScenario.learning_rates`): a function of the steps of
each stage, ``multiplier(i) = (i + 1) / W`` for the first ``W = round(0.1 · K_1)`` steps
(``K_1`` the first stage's steps), then ``0.5 · (1 + cos(π (i − W) / (T − W)))``
(cosine, ``T`` all steps) or 1 (constant); it is given to ``LambdaLR``, which steps once
after every optimizer step. Under the ``epochs`` retraining protocol a 50% subset trains
its stage for half the steps, and the schedule is laid out the same way over the shorter
run: the same shape compressed to the fewer steps (the warm-up is 10% of the shorter
stage 1, the cosine reaches its end at the run's new last step). SOURCE is told so with
segments cut at the same fractions of the shorter stage and the compressed schedule's
rates (:meth:`AttributedRun.segments`).

Two trainers that agree to float round-off (tests/test_adam_benchmark_smoke.py):

- :func:`train_run`: what srcproj sees, trained the way a user trains: an ``nn.Module``,
  ``torch.optim.AdamW(param_groups)``, ``LambdaLR``, checkpoints
  ``{"model": state_dict, "optimizer": optimizer.state_dict()}`` (in memory);
- :func:`train_models`: the ground truth's trainer, M models side by side in
  ``torch.bmm`` with a hand-written AdamW step identical to ``torch.optim.AdamW``'s
  (single-tensor CPU path: decoupled decay ``θ ← θ(1 − lr·λ)`` first, then the
  bias-corrected Adam update). A model depends only on its own keep-mask and seed (its
  initialisation, by ``make_mlp(64, seed)``, and its batch order, by generators seeded
  ``seed · 1009 + stage``, as in scenarios.py), never on the models trained beside it.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenarios as sc  # noqa: E402

from srcproj import Segment  # noqa: E402
from srcproj.demo import make_mlp  # noqa: E402

HIDDEN = 64
BATCH = 64
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
WARMUP = 0.1  # fraction of the first stage's steps
NUM_TRAIN = 1437
CHECKPOINTS_PER_SEGMENT = 2
NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")  # make_mlp's parameters, in order
DECAY = {"0.weight": WEIGHT_DECAY, "0.bias": 0.0, "2.weight": WEIGHT_DECAY, "2.bias": 0.0}
SCENARIOS = ("adamw-cosine", "adamw-twostage")
PROTOCOLS = ("steps", "epochs")


@dataclass
class Stage:
    """One stage of training: its data, its length in epochs and how many segments cut it."""

    X: torch.Tensor
    y: torch.Tensor
    epochs: float
    segments: int
    target: bool  # its examples are the attribution target (subsampled by the ground truth)

    def steps(self, examples: int) -> int:
        return max(1, round(self.epochs * examples / BATCH))


@dataclass
class AdamScenario:
    name: str
    stages: list[Stage]
    queries: tuple[torch.Tensor, torch.Tensor]
    peak_lr: float
    schedule: str  # "cosine" or "constant" after the warm-up
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def target(self) -> Stage:
        return next(s for s in self.stages if s.target)

    @property
    def target_stage(self) -> int:
        return next(i for i, s in enumerate(self.stages) if s.target)

    @property
    def num_targets(self) -> int:
        return int(self.target.X.shape[0])

    def stage_steps(self, protocol: str = "steps", fraction: float = 0.5) -> list[int]:
        """Steps of every stage: the full run's, or a ``fraction`` subset's under ``protocol``."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}; choose one of {PROTOCOLS}")
        out = []
        for stage in self.stages:
            n = stage.X.shape[0]
            if stage.target and protocol == "epochs":
                n = round(fraction * n)
            out.append(stage.steps(n))
        return out

    def multipliers(self, stage_steps: list[int]) -> list[float]:
        """The schedule's multiplier of the peak rate at every step of a run with these stage lengths."""
        total = sum(stage_steps)
        warm = max(1, round(WARMUP * stage_steps[0]))
        out = []
        for i in range(total):
            if i < warm:
                out.append((i + 1) / warm)
            elif self.schedule == "cosine":
                out.append(0.5 * (1.0 + math.cos(math.pi * (i - warm) / max(1, total - warm))))
            else:
                out.append(1.0)
        return out

    def learning_rates(self, stage_steps: list[int]) -> list[float]:
        """Per-step learning rates (both groups) of a run with these stage lengths."""
        return [self.peak_lr * m for m in self.multipliers(stage_steps)]

    def segment_bounds(self, stage_steps: list[int]) -> list[tuple[int, int, int]]:
        """``(stage, first step, end step)`` of every segment, steps counted over the whole run.

        Stage ``i``'s steps are cut into ``stages[i].segments`` equal stretches (rounded).
        """
        out, offset = [], 0
        for index, (stage, steps) in enumerate(zip(self.stages, stage_steps, strict=True)):
            cuts = [round(steps * c / stage.segments) for c in range(stage.segments + 1)]
            out += [(index, offset + a, offset + b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
            offset += steps
        return out

    def checkpoint_steps(self, stage_steps: list[int]) -> list[int]:
        """Steps (counted over the whole run, 1-based: "after step t") after which to checkpoint."""
        out = []
        for _, a, b in self.segment_bounds(stage_steps):
            out += [a + round((b - a) * (c + 1) / CHECKPOINTS_PER_SEGMENT) for c in range(CHECKPOINTS_PER_SEGMENT)]
        return out


def make_scenario(name: str) -> AdamScenario:
    X, y, Xt, yt = sc.load_standardised_digits(NUM_TRAIN)
    if name == "adamw-cosine":
        stage = Stage(X, y, epochs=20, segments=3, target=True)
        return AdamScenario(name, [stage], (Xt, yt), peak_lr=2e-3, schedule="cosine",
                            description="AdamW, 20 epochs, warm-up 10% to 2e-3 then cosine decay, wd 0.01 on weights")
    if name == "adamw-twostage":
        half = len(y) // 2
        first = Stage(X[:half], y[:half], epochs=15, segments=2, target=True)
        second = Stage(sc._rotate(X[half:]), y[half:], epochs=8, segments=1, target=False)
        return AdamScenario(name, [first, second], (sc._rotate(Xt), yt), peak_lr=1e-3, schedule="constant",
                            description="AdamW, stage 1: 718 digits, 15 epochs; stage 2: 719 other digits "
                                        "rotated 90°, 8 epochs; warm-up 10% of stage 1 to 1e-3 then constant; "
                                        "rotated test queries")
    raise ValueError(f"unknown scenario {name!r}; choose one of {SCENARIOS}")


_SCENARIO_CACHE: dict[str, AdamScenario] = {}


def cached_scenario(name: str) -> AdamScenario:
    if name not in _SCENARIO_CACHE:
        _SCENARIO_CACHE[name] = make_scenario(name)
    return _SCENARIO_CACHE[name]


def describe_steps(scenario: AdamScenario) -> str:
    return "; ".join(f"{k} steps on {s.X.shape[0]} examples"
                     for s, k in zip(scenario.stages, scenario.stage_steps(), strict=True))


# --------------------------------------------------------------------------- the user's way
def param_groups(model: torch.nn.Module) -> list[dict]:
    """AdamW's two parameter groups: the weight matrices with decay, the biases without."""
    named = dict(model.named_parameters())
    return [{"params": [named[n] for n in NAMES if DECAY[n] > 0], "weight_decay": WEIGHT_DECAY},
            {"params": [named[n] for n in NAMES if DECAY[n] == 0], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float = 1e-3) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``model`` with the scenarios' groups, betas and eps."""
    return torch.optim.AdamW(param_groups(model), lr=lr, betas=BETAS, eps=EPS)


def _batches(stage: Stage, index: torch.Tensor, generator: torch.Generator, steps: int):
    """Yield ``steps`` batches of indices into the stage's data, a fresh permutation per pass."""
    n = index.shape[0]
    order, position = None, n
    for _ in range(steps):
        if position + BATCH > n:
            order = torch.randperm(n, generator=generator)
            position = 0
        yield index[order[position:position + BATCH]]
        position += BATCH


@dataclass
class RunResult:
    final: dict                 # the model's final state_dict
    checkpoints: list[dict]     # {"model": state_dict, "optimizer": optimizer state_dict}, in training order
    lrs: list[float]            # group 0's learning rate at every step
    stage_steps: list[int]


def train_run(scenario: AdamScenario, seed: int, mask: np.ndarray | None = None, protocol: str = "steps",
              checkpoint_at: list[int] | None = None, stop_after: int | None = None) -> RunResult:
    """Train one model with ``torch.optim.AdamW`` and ``LambdaLR``, as a user would.

    Parameters
    ----------
    mask : (N_target,) bool, optional
        The target examples kept (default all).
    protocol : {"steps", "epochs"}
        As in :func:`train_models` (only matters with a mask).
    checkpoint_at : list of int
        Steps (1-based, over the whole run) after which ``{"model", "optimizer"}`` is saved.
    stop_after : int, optional
        Stop after this many steps (the schedule stays the full run's).
    """
    model = make_mlp(HIDDEN, seed)
    optimizer = make_optimizer(model, scenario.peak_lr)
    kept = scenario.num_targets if mask is None else int(np.asarray(mask).sum())
    stage_steps = scenario.stage_steps(protocol, kept / scenario.num_targets) if mask is not None \
        else scenario.stage_steps()
    mult = scenario.multipliers(stage_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: mult[min(i, len(mult) - 1)])
    marks = set(checkpoint_at or [])
    saved, lrs, done = [], [], 0
    for stage_index, (stage, steps) in enumerate(zip(scenario.stages, stage_steps, strict=True)):
        if stage.target and mask is not None:
            index = torch.from_numpy(np.flatnonzero(mask))
        else:
            index = torch.arange(stage.X.shape[0])
        generator = torch.Generator().manual_seed(int(seed) * 1009 + stage_index)
        for picked in _batches(stage, index, generator, steps):
            if stop_after is not None and done >= stop_after:
                break
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(stage.X[picked]), stage.y[picked]).backward()
            optimizer.step()
            scheduler.step()
            done += 1
            if done in marks:
                saved.append({"model": copy.deepcopy(model.state_dict()),
                              "optimizer": copy.deepcopy(optimizer.state_dict())})
    return RunResult(copy.deepcopy(model.state_dict()), saved, lrs, stage_steps)


def accuracy(state: dict, X: torch.Tensor, y: torch.Tensor) -> float:
    model = make_mlp(HIDDEN)
    model.load_state_dict(state)
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- stacked trainer
def train_models(scenario: AdamScenario, masks: np.ndarray, seeds: np.ndarray, protocol: str = "steps",
                 stop_after: int | None = None) -> list[torch.Tensor]:
    """Train M models side by side with a hand-written ``torch.optim.AdamW``; their parameters.

    Parameters
    ----------
    masks : (M, N_target) bool
        Which target examples each model keeps (all models must keep as many).
    seeds : (M,) int
        Initialisation and batch order of each model.
    protocol : {"steps", "epochs"}
        A subset trains for the full run's steps ("steps") or for its epochs ("epochs":
        fewer steps in the target stage, the schedule compressed to the shorter run).
    stop_after : int, optional
        Stop after this many steps (for tests).

    Returns
    -------
    list of 4 tensors
        ``0.weight, 0.bias, 2.weight, 2.bias``, each stacked over the models.
    """
    masks = np.asarray(masks, dtype=bool)
    counts = set(masks.sum(1).tolist())
    if len(counts) != 1:
        raise ValueError("every model of one call must keep the same number of examples")
    kept = counts.pop()
    M = len(seeds)
    params = [torch.stack(t) for t in zip(*[sc._init(int(s)) for s in seeds], strict=True)]
    decay = [DECAY[n] for n in NAMES]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    stage_steps = scenario.stage_steps(protocol, kept / scenario.num_targets)
    lrs = scenario.learning_rates(stage_steps)
    beta1, beta2 = BETAS
    done = 0
    for stage_index, (stage, steps) in enumerate(zip(scenario.stages, stage_steps, strict=True)):
        if stage.target:
            index = torch.stack([torch.from_numpy(np.flatnonzero(m)) for m in masks])
        else:
            index = torch.arange(stage.X.shape[0]).expand(M, -1)
        n = index.shape[1]
        generators = [torch.Generator().manual_seed(int(s) * 1009 + stage_index) for s in seeds]
        order, position = None, n
        for _ in range(steps):
            if stop_after is not None and done >= stop_after:
                break
            if position + BATCH > n:
                order = torch.stack([torch.randperm(n, generator=g) for g in generators])
                position = 0
            picked = index.gather(1, order[:, position:position + BATCH])
            position += BATCH
            x, y = stage.X[picked], stage.y[picked]
            for p in params:
                p.requires_grad_(True)
            logits = sc._forward(params, x)
            # Sum over models of each model's mean loss: model i's gradient is its own.
            loss = F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), reduction="sum") / x.shape[1]
            grads = torch.autograd.grad(loss, params)
            params = [p.detach() for p in params]
            lr = lrs[done]
            done += 1
            # torch.optim.adam._single_tensor_adam with decoupled_weight_decay=True, step for step.
            bias_correction1 = 1 - beta1 ** done
            bias_correction2_sqrt = (1 - beta2 ** done) ** 0.5
            step_size = lr / bias_correction1
            with torch.no_grad():
                for p, g, m, v, wd in zip(params, grads, exp_avg, exp_avg_sq, decay, strict=True):
                    if wd != 0:
                        p.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (v.sqrt() / bias_correction2_sqrt).add_(EPS)
                    p.addcdiv_(m, denom, value=-step_size)
    return params


@dataclass(frozen=True)
class GroundTruthFn:
    """The picklable batched ``train_fn(masks, seeds) -> (M, Q)`` for :func:`srcproj.eval.retrain`."""

    scenario: str
    protocol: str

    def __call__(self, masks: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        scenario = cached_scenario(self.scenario)
        params = train_models(scenario, masks, seeds, self.protocol)
        return sc.margins(params, *scenario.queries)


# --------------------------------------------------------------------------- SOURCE's view
@dataclass
class AttributedRun:
    """The model to attribute (trained on all data) and what srcproj needs to describe its run."""

    scenario: AdamScenario
    seed: int
    run: RunResult

    @property
    def final(self) -> dict:
        return self.run.final

    @property
    def test_accuracy(self) -> float:
        return accuracy(self.run.final, *self.scenario.queries)

    def segments(self, protocol: str = "steps", fraction: float = 0.5, time_scale: float = 1.0,
                 model_only: bool = False) -> list[Segment]:
        """The run's segments: 2 checkpoints each, its steps and per-step rates (group 0), its data.

        ``protocol="epochs"`` describes a ``fraction`` subset's same-epochs retraining: the
        segments of the target stage are cut at the same fractions of the shorter stage and
        take the compressed schedule's rates (see the module docstring). ``time_scale``
        multiplies every rate (an ablation of SOURCE's segment times). ``model_only``
        gives the checkpoints as bare ``state_dict``s (no optimizer state).
        """
        scenario = self.scenario
        steps = scenario.stage_steps(protocol, fraction)
        lrs = scenario.learning_rates(steps)
        if protocol == "steps":
            assert np.allclose(lrs, self.run.lrs, rtol=1e-12, atol=0), "recorded rates differ from the schedule"
            lrs = list(self.run.lrs)
        out = []
        per = CHECKPOINTS_PER_SEGMENT
        for s, (stage_index, a, b) in enumerate(scenario.segment_bounds(steps)):
            stage = scenario.stages[stage_index]
            chosen = self.run.checkpoints[s * per:(s + 1) * per]
            if model_only:
                chosen = [c["model"] for c in chosen]
            out.append(Segment(chosen, b - a, [time_scale * r for r in lrs[a:b]], (stage.X, stage.y)))
        return out


def attributed_run(scenario: AdamScenario, seed: int) -> AttributedRun:
    """Train the model to attribute with ``torch.optim.AdamW`` and ``LambdaLR`` (:func:`train_run`)."""
    run = train_run(scenario, seed, checkpoint_at=scenario.checkpoint_steps(scenario.stage_steps()))
    return AttributedRun(scenario, seed, run)


def target_segments(scenario: AdamScenario) -> list[int]:
    """0-based segments that trained on the attribution target."""
    out, index = [], 0
    for stage in scenario.stages:
        for _ in range(stage.segments):
            if stage.target:
                out.append(index)
            index += 1
    return out
