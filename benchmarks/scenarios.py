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


def flip_labels(y: torch.Tensor, rate: float, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Each label moved, with probability ``rate``, to another of the 10 classes drawn
    uniformly (seeded); ``(noisy labels, flipped mask)``."""
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(y)) < rate
    noisy = y.clone()
    shift = torch.from_numpy(rng.integers(1, 10, size=int(flipped.sum())))
    noisy[torch.from_numpy(flipped)] = (y[torch.from_numpy(flipped)] + shift) % 10
    return noisy, flipped


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
        noisy, flipped = flip_labels(y, 0.3, seed=7)
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




# --------------------------------------------------------------------------- any architecture
# The trainer above is specialised to the 64 → 64 → 10 MLP for speed. The helpers below
# train any buffer-free ``nn.Module`` on a :class:`Scenario` with the same recipe (SGD
# with heavy-ball momentum and weight decay, batch 64, the same per-seed batch order),
# M models side by side with ``torch.func.vmap``. ``make_model(seed)`` must return the
# architecture with seeded initial weights (like :func:`srcproj.demo.make_mlp`).
def load_standardised_digits(num_train: int = 1000, seed: int = 0):
    """Digits with ``num_train`` training images, every pixel standardised.

    The split is :func:`srcproj.demo.load_digits_split`'s (stratified, ``seed``) with the
    other 1,797 - ``num_train`` images as the test set; each pixel is shifted and scaled
    by the training set's mean and standard deviation (pixels constant in training are
    only shifted).

    Returns
    -------
    X_train, y_train, X_test, y_test : torch.Tensor
        Inputs float32 ``(n, 64)``, labels int64.
    """
    X, y, Xt, yt = load_digits_split(seed=seed, test_size=1797 - int(num_train))
    mean, std = X.mean(0), X.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return (X - mean) / std, y, (Xt - mean) / std, yt


def _stacked_init(make_model, seeds) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    models = [make_model(int(s)) for s in seeds]
    if any(True for _ in models[0].buffers()):
        raise ValueError("train_module_models handles models without buffers (no batch norm)")
    names = [name for name, _ in models[0].named_parameters()]
    params = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]) for name in names}
    return models[0], params


def train_module_models(make_model, scenario: Scenario, masks: np.ndarray, seeds: np.ndarray,
                        protocol: str = "steps", checkpoints: dict[int, list[int]] | None = None):
    """Train M models of any buffer-free architecture side by side, as :func:`train_models` does.

    Parameters
    ----------
    make_model : callable
        ``make_model(seed) -> nn.Module`` with seeded initial weights.
    scenario, masks, seeds, protocol, checkpoints
        As in :func:`train_models`.

    Returns
    -------
    params : dict of str to torch.Tensor
        Every parameter, stacked over the models (leading dimension M).
    saved : dict of int to list of dict
        Per stage, the stacked parameters after each step named in ``checkpoints``.
    """
    from torch.func import functional_call, grad, vmap

    masks = np.asarray(masks, dtype=bool)
    if len(set(masks.sum(1).tolist())) != 1:
        raise ValueError("every model of one call must keep the same number of examples")
    M = len(seeds)
    module, params = _stacked_init(make_model, seeds)

    def mean_loss(p, x, y):
        return F.cross_entropy(functional_call(module, p, (x,)), y)

    gradient = vmap(grad(mean_loss))
    saved: dict[int, list[dict[str, torch.Tensor]]] = {}
    for stage_index, stage in enumerate(scenario.stages):
        if stage.target:
            index = torch.stack([torch.from_numpy(np.flatnonzero(m)) for m in masks])
        else:
            index = torch.arange(stage.X.shape[0]).expand(M, -1)
        n = index.shape[1]
        full_steps = stage.steps(stage.X.shape[0])
        steps = stage.steps(n) if (stage.target and protocol == "epochs") else full_steps
        generators = [torch.Generator().manual_seed(int(s) * 1009 + stage_index) for s in seeds]
        buffers = {name: torch.zeros_like(p) for name, p in params.items()}
        marks = set((checkpoints or {}).get(stage_index, []))
        order, position = None, n
        for step in range(1, steps + 1):
            if position + BATCH > n:
                order = torch.stack([torch.randperm(n, generator=g) for g in generators])
                position = 0
            picked = index.gather(1, order[:, position:position + BATCH])
            position += BATCH
            grads = gradient(params, stage.X[picked], stage.y[picked])
            with torch.no_grad():
                for name, p in params.items():
                    buffers[name].mul_(MOMENTUM).add_(grads[name] + WEIGHT_DECAY * p)
                    p.sub_(stage.lr * buffers[name])
            if step in marks:
                saved.setdefault(stage_index, []).append({name: p.clone() for name, p in params.items()})
    return params, saved


def unstack(params: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per model, the state_dict of stacked parameters (from :func:`train_module_models`)."""
    count = next(iter(params.values())).shape[0]
    return [{name: p[i].clone() for name, p in params.items()} for i in range(count)]


def module_margins(make_model, params: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(M, Q) classification margins of M stacked models on the queries."""
    from torch.func import functional_call, vmap

    module = make_model(0)
    with torch.no_grad():
        logits = vmap(lambda p: functional_call(module, p, (X,)))(params)
    count = logits.shape[0]
    return ClassificationTask().measurement(logits.reshape(count * X.shape[0], -1), y.repeat(count)) \
        .reshape(count, -1).double().numpy()


@dataclass(frozen=True)
class ModuleGroundTruthFn:
    """The picklable batched ``train_fn(masks, seeds) -> (M, Q)`` of :func:`srcproj.eval.retrain`.

    ``build`` is a picklable callable (a module-level function or a ``functools.partial``
    of one) returning ``(scenario, make_model)``; it is called once per process.
    """

    build: object
    protocol: str

    def __call__(self, masks: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        key = repr(self.build)
        if key not in _BUILT:
            _BUILT[key] = self.build()
        scenario, make_model = _BUILT[key]
        params, _ = train_module_models(make_model, scenario, masks, seeds, self.protocol)
        return module_margins(make_model, params, *scenario.queries)


_BUILT: dict[str, tuple] = {}


def module_attributed_run(make_model, scenario: Scenario, seed: int, per_segment: int = 2):
    """Train the model to attribute (all data) and describe its run to srcproj.

    Like :func:`attributed_run` with the ``default`` layout, for any architecture: each
    stage saves ``per_segment × stage.segments`` evenly spaced checkpoints (the last at
    its final step), ``per_segment`` to a segment.

    Returns
    -------
    final : dict
        The final state_dict.
    segments : list of (stage index, list of state_dict, steps)
        The trajectory's segments, in training order.
    """
    marks, plan = {}, []
    for stage_index, stage in enumerate(scenario.stages):
        steps = stage.steps(stage.X.shape[0])
        count = per_segment * stage.segments
        marks[stage_index] = [round(steps * (c + 1) / count) for c in range(count)]
        start = 0
        for first in range(0, count, per_segment):
            end = marks[stage_index][first + per_segment - 1]
            plan.append((stage_index, first, end - start))
            start = end
    full = np.ones((1, scenario.num_targets), dtype=bool)
    params, saved = train_module_models(make_model, scenario, full, np.array([seed]), "steps", marks)
    states = {i: [unstack(p)[0] for p in saved[i]] for i in saved}
    segments = [(i, states[i][first:first + per_segment], steps) for i, first, steps in plan]
    return unstack(params)[0], segments
