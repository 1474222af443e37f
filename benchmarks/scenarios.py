"""The three digits scenarios of the LDS benchmark, and a trainer for many MLPs at once.

Every model here is the 64 → 64 → 10 ReLU MLP of :func:`srcproj.demo.make_mlp`,
trained by SGD with heavy-ball momentum and weight decay exactly as
``torch.optim.SGD`` does it, but with M models side by side in ``torch.bmm``: the
ground truth needs thousands of retrained models and one at a time the per-step
overhead of a model this small dominates. A model depends only on its own keep-mask and
seed (its initialisation and batch order come from generators seeded by its seed), so
which models share a call does not change any of them.

Scenarios (``SCENARIOS``):

- ``converged``: 40 epochs, checkpoints spread over training, test-set queries;
- ``noisy-short``: 30% of the training labels flipped, 5 epochs;
- ``two-stage``: stage 1 on half the digits, stage 2 on the other half rotated by 90°,
  queries from the rotated test set, attribution to stage 1's examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from srcproj import ClassificationTask, Segment, Trajectory
from srcproj.demo import load_digits_split, make_mlp

HIDDEN = 64
BATCH = 64
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
LAYERS = (("0.weight", "0.bias"), ("2.weight", "2.bias"))


@dataclass
class Stage:
    """One stage of training: its data, its length in epochs, how SOURCE cuts it."""

    X: torch.Tensor
    y: torch.Tensor
    epochs: float
    lr: float
    segments: int
    target: bool  # its examples are the attribution target (subsampled by the ground truth)

    def steps(self, examples: int) -> int:
        return max(1, round(self.epochs * examples / BATCH))


@dataclass
class Scenario:
    name: str
    stages: list[Stage]
    queries: tuple[torch.Tensor, torch.Tensor]
    flipped: np.ndarray | None = None  # which target examples had their labels flipped
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def target(self) -> Stage:
        return next(s for s in self.stages if s.target)

    @property
    def num_targets(self) -> int:
        return int(self.target.X.shape[0])


def _rotate(X: torch.Tensor) -> torch.Tensor:
    return torch.rot90(X.reshape(-1, 8, 8), 1, dims=(1, 2)).reshape(-1, 64).contiguous()


def make_scenario(name: str) -> Scenario:
    X, y, Xt, yt = load_digits_split(seed=0)
    if name == "converged":
        return Scenario(name, [Stage(X, y, epochs=40, lr=0.05, segments=3, target=True)], (Xt, yt),
                        description="40 epochs, lr 0.05, clean labels")
    if name == "noisy-short":
        rng = np.random.default_rng(7)
        flipped = rng.random(len(y)) < 0.3
        noisy = y.clone()
        shift = torch.from_numpy(rng.integers(1, 10, size=int(flipped.sum())))
        noisy[torch.from_numpy(flipped)] = (y[torch.from_numpy(flipped)] + shift) % 10
        return Scenario(name, [Stage(X, noisy, epochs=5, lr=0.1, segments=3, target=True)], (Xt, yt),
                        flipped=flipped, description="30% of labels flipped, 5 epochs, lr 0.1")
    if name == "two-stage":
        half = len(y) // 2
        first = Stage(X[:half], y[:half], epochs=15, lr=0.05, segments=2, target=True)
        second = Stage(_rotate(X[half:]), y[half:], epochs=8, lr=0.05, segments=2, target=False)
        return Scenario(name, [first, second], (_rotate(Xt), yt),
                        description="stage 1: 718 digits, 15 epochs; stage 2: 719 other digits rotated 90°, "
                                    "8 epochs; rotated test queries")
    raise ValueError(f"unknown scenario {name!r}; choose one of {SCENARIOS}")


SCENARIOS = ("converged", "noisy-short", "two-stage")


# --------------------------------------------------------------------------- trainer
def _init(seed: int) -> list[torch.Tensor]:
    model = make_mlp(HIDDEN, seed)
    state = model.state_dict()
    return [state[name].clone() for layer in LAYERS for name in layer]


def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = params
    hidden = torch.relu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))


def train_models(scenario: Scenario, masks: np.ndarray, seeds: np.ndarray, protocol: str = "steps",
                 checkpoints: dict[int, list[int]] | None = None):
    """Train M models side by side; return their parameters and optional checkpoints.

    Parameters
    ----------
    masks : (M, N_target) bool
        Which target examples each model keeps (all models must keep as many).
    seeds : (M,) int
        Initialisation and batch order of each model.
    protocol : {"steps", "epochs"}
        A subset is trained for the full run's steps ("steps") or for its epochs, i.e.
        fewer steps ("epochs"), in the target stage.
    checkpoints : {stage index: [step, ...]}, optional
        Steps after which to save every model's parameters.
    """
    masks = np.asarray(masks, dtype=bool)
    counts = set(masks.sum(1).tolist())
    if len(counts) != 1:
        raise ValueError("every model of one call must keep the same number of examples")
    M = len(seeds)
    params = [torch.stack(t) for t in zip(*[_init(int(s)) for s in seeds], strict=False)]
    saved: dict[int, list[list[torch.Tensor]]] = {}
    for stage_index, stage in enumerate(scenario.stages):
        if stage.target:
            index = torch.stack([torch.from_numpy(np.flatnonzero(m)) for m in masks])
        else:
            index = torch.arange(stage.X.shape[0]).expand(M, -1)
        n = index.shape[1]
        full_steps = stage.steps(stage.X.shape[0])
        steps = stage.steps(n) if (stage.target and protocol == "epochs") else full_steps
        generators = [torch.Generator().manual_seed(int(s) * 1009 + stage_index) for s in seeds]
        buffers = [torch.zeros_like(p) for p in params]
        marks = set((checkpoints or {}).get(stage_index, []))
        order = None
        position = n
        for step in range(1, steps + 1):
            if position + BATCH > n:
                order = torch.stack([torch.randperm(n, generator=g) for g in generators])
                position = 0
            picked = index.gather(1, order[:, position:position + BATCH])
            position += BATCH
            x, y = stage.X[picked], stage.y[picked]
            for p in params:
                p.requires_grad_(True)
            logits = _forward(params, x)
            # Sum over models of each model's mean loss: model i's gradient is its own.
            loss = F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1), reduction="sum") / x.shape[1]
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g, buf in zip(params, grads, buffers, strict=False):
                    buf.mul_(MOMENTUM).add_(g + WEIGHT_DECAY * p)
                    p.sub_(stage.lr * buf)
            params = [p.detach() for p in params]
            if step in marks:
                saved.setdefault(stage_index, []).append([p.clone() for p in params])
    return params, saved


def state_dicts(params: list[torch.Tensor]) -> list[dict]:
    """Per model, a state_dict that :func:`srcproj.demo.make_mlp` loads."""
    names = [name for layer in LAYERS for name in layer]
    return [{name: p[i].clone() for name, p in zip(names, params, strict=False)} for i in range(params[0].shape[0])]


def margins(params: list[torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(M, Q) classification margins of every model on the queries."""
    with torch.no_grad():
        logits = _forward(params, X.expand(params[0].shape[0], -1, -1))
        return ClassificationTask().measurement(logits.reshape(-1, 10), y.repeat(params[0].shape[0])) \
            .reshape(params[0].shape[0], -1).double().numpy()


@dataclass(frozen=True)
class GroundTruthFn:
    """The picklable ``train_fn(masks, seeds) -> (M, Q)`` for :func:`srcproj.eval.retrain`."""

    scenario: str
    protocol: str

    def __call__(self, masks: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        scenario = _cached_scenario(self.scenario)
        params, _ = train_models(scenario, masks, seeds, self.protocol)
        return margins(params, *scenario.queries)


_SCENARIO_CACHE: dict[str, Scenario] = {}


def _cached_scenario(name: str) -> Scenario:
    if name not in _SCENARIO_CACHE:
        _SCENARIO_CACHE[name] = make_scenario(name)
    return _SCENARIO_CACHE[name]


# --------------------------------------------------------------------------- SOURCE's view
LAYOUTS = ("default", "one-segment", "fine")


def attributed_run(scenario: Scenario, seed: int, layout: str = "default"):
    """Train the model to attribute (all data) and describe its run to srcproj.

    Each stage saves ``2 × stage.segments`` checkpoints, evenly spaced, and ``layout``
    decides only how SOURCE groups them: ``default`` (``stage.segments`` segments of 2
    checkpoints), ``one-segment`` (one segment per stage holding them all) or ``fine``
    (one segment per checkpoint). The trained model is the same for every layout.

    Returns the final state_dict and a function ``trajectory(protocol, fraction)`` that
    builds the :class:`Trajectory` answering that retraining protocol (docs/math.md
    §8: the same-epochs protocol trains the target stage for ``fraction`` of its steps).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}")
    marks: dict[int, list[int]] = {}
    plan = []
    for stage_index, stage in enumerate(scenario.stages):
        steps = stage.steps(stage.X.shape[0])
        count = 2 * stage.segments
        picks = [round(steps * (c + 1) / count) for c in range(count)]
        marks[stage_index] = picks
        per_segment = {"default": 2, "one-segment": count, "fine": 1}[layout]
        start = 0
        for first in range(0, count, per_segment):
            end = picks[first + per_segment - 1]
            plan.append((stage_index, end - start, per_segment))
            start = end
    full = np.ones((1, scenario.num_targets), dtype=bool)
    params, saved = train_models(scenario, full, np.array([seed]), "steps", marks)
    states = {i: [state_dicts(p)[0] for p in saved[i]] for i in saved}
    final = state_dicts(params)[0]

    def trajectory(protocol: str = "steps", fraction: float = 0.5) -> Trajectory:
        segments, taken = [], {i: 0 for i in states}
        data = {i: (s.X, s.y) for i, s in enumerate(scenario.stages)}
        for stage_index, steps, count in plan:
            stage = scenario.stages[stage_index]
            chosen = states[stage_index][taken[stage_index]:taken[stage_index] + count]
            taken[stage_index] += count
            scaled = steps
            if protocol == "epochs" and stage.target:
                scaled = max(1, round(steps * fraction))
            segments.append(Segment(chosen, scaled, stage.lr, data[stage_index]))
        return Trajectory(segments, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    return final, trajectory


def target_segments(scenario: Scenario) -> list[int]:
    """0-based segments that trained on the attribution target."""
    out, index = [], 0
    for stage in scenario.stages:
        for _ in range(stage.segments):
            if stage.target:
                out.append(index)
            index += 1
    return out


def describe_steps(scenario: Scenario) -> str:
    parts = []
    for stage in scenario.stages:
        parts.append(f"{stage.steps(stage.X.shape[0])} steps on {stage.X.shape[0]} examples")
    return "; ".join(parts)


