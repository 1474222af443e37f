"""The optimizer of a training run, as SOURCE models it (docs/math.md §6).

A run's optimizer fixes three things SOURCE needs: the segment's *time* (the sum of
the learning rates, times a gain for SGD's momentum), the *preconditioner* the steps
apply (Adam divides by √v̂ + ε; per-group learning rates scale it), and the *weight
decay* that joins the Hessian in the small space. This module describes the covered
optimizers (:class:`SGD`, :class:`Adam`, :func:`AdamW`), reads a live
``torch.optim`` optimizer into that description (refusing by name what SOURCE does
not cover), unwraps the checkpoint forms users save, and maps a saved optimizer state
(keyed by parameter index) to parameter names.

Nothing here computes gradients or touches a store; :mod:`srcproj.preconditioning`
turns the description and the checkpoints' states into per-parameter scales.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointMismatchError, ConfigurationError

__all__ = ["SGD", "Adam", "AdamW", "OptimizerSpec", "ParamGroup", "describe_torch_optimizer", "ResolvedOptimizer",
           "resolve_optimizer", "split_checkpoint", "unwrap_optimizer", "with_named_groups", "group_parameter_names",
           "CHECKPOINT_KEYS"]

#: The key pairs of a checkpoint saved as ``{"model": ..., "optimizer": ...}``.
CHECKPOINT_KEYS = (("model", "optimizer"), ("model_state_dict", "optimizer_state_dict"))

_ADAM_STATE = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class ParamGroup:
    """Settings of some parameters that differ from the optimizer's defaults.

    Parameters
    ----------
    params : sequence of str
        Parameter names (as in ``model.named_parameters()``).
    weight_decay : float, optional
        The group's weight decay (``None``: the optimizer's). The usual recipe gives
        biases and norms 0.
    lr_scale : float
        The group's learning rate over the reference rate (the segments' ``lr``), held
        for the whole run: groups must share one schedule.
    """

    params: tuple[str, ...]
    weight_decay: float | None = None
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.params, str):
            object.__setattr__(self, "params", (self.params,))
        object.__setattr__(self, "params", tuple(str(p) for p in self.params))
        if self.weight_decay is not None:
            _check_nonnegative(self.weight_decay, "a group's weight_decay")
        _check_positive(self.lr_scale, "a group's lr_scale")


def _check_nonnegative(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"{what}={value!r}; it must be a finite number >= 0")
    return float(value)


def _check_positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{what}={value!r}; it must be a finite number > 0")
    return float(value)


def _groups(groups: Any) -> tuple[ParamGroup, ...]:
    out = []
    for group in groups or ():
        if isinstance(group, ParamGroup):
            out.append(group)
        elif isinstance(group, Mapping):
            unknown = set(group) - {"params", "weight_decay", "lr_scale"}
            if unknown or "params" not in group:
                raise ConfigurationError(
                    f"a parameter group is {dict(group)!r}; give {{'params': [names], 'weight_decay': ..., "
                    "'lr_scale': ...}} (only 'params' is required)")
            out.append(ParamGroup(tuple(group["params"]), group.get("weight_decay"), group.get("lr_scale", 1.0)))
        else:
            raise ConfigurationError(f"a parameter group is a {type(group).__name__}; give a dict or a ParamGroup")
    seen: set[str] = set()
    for group in out:
        twice = seen & set(group.params)
        if twice:
            raise ConfigurationError(f"parameters {sorted(twice)[:5]} are in two parameter groups")
        seen |= set(group.params)
    return tuple(out)


class OptimizerSpec(ABC):
    """What SOURCE needs of an optimizer: implemented by :class:`SGD` and :class:`Adam`."""

    kind: str = ""
    weight_decay: float = 0.0
    groups: tuple[ParamGroup, ...] = ()

    #: Whether the steps divide by a running second moment (Adam's √v̂ + ε).
    adaptive: bool = False
    #: Whether weight decay is added to the gradient (inside the preconditioner) or
    #: applied to the parameters directly (AdamW).
    coupled_decay: bool = True

    @abstractmethod
    def gain(self) -> float:
        """The factor between the sum of the learning rates and the segment's time."""

    @abstractmethod
    def describe(self) -> dict:
        """Plain data that identifies the optimizer's settings (JSON-able)."""

    def _describe_groups(self) -> list[dict]:
        return [{"params": list(g.params), "weight_decay": g.weight_decay, "lr_scale": g.lr_scale}
                for g in self.groups]


@dataclass(frozen=True)
class SGD(OptimizerSpec):
    """``torch.optim.SGD``: heavy-ball momentum, dampening, Nesterov, coupled weight decay.

    The segment's time is ``Σ η · gain`` with gain ``(1 - dampening) / (1 - momentum)``,
    or ``1 / (1 - momentum)`` with ``nesterov`` (docs/math.md §6).
    """

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    groups: tuple[ParamGroup, ...] = ()
    kind: str = field(default="sgd", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, numbers.Real) \
                or not 0.0 <= float(self.momentum) < 1.0:
            raise ConfigurationError(f"momentum={self.momentum!r}; it must be in [0, 1)")
        if isinstance(self.dampening, bool) or not isinstance(self.dampening, numbers.Real) \
                or not 0.0 <= float(self.dampening) <= 1.0:
            raise ConfigurationError(f"dampening={self.dampening!r}; it must be in [0, 1]")
        _check_nonnegative(self.weight_decay, "weight_decay")
        if not isinstance(self.nesterov, bool):
            raise ConfigurationError(f"nesterov={self.nesterov!r}; give True or False")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigurationError("nesterov momentum needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
        object.__setattr__(self, "groups", _groups(self.groups))
        if self.dampening == 1.0 and self.momentum > 0:
            raise ConfigurationError("dampening=1 with momentum > 0 never moves the parameters; check the optimizer")

    def gain(self) -> float:
        if self.nesterov:
            return 1.0 / (1.0 - float(self.momentum))
        return (1.0 - float(self.dampening)) / (1.0 - float(self.momentum))

    def describe(self) -> dict:
        return {"kind": "sgd", "momentum": float(self.momentum), "dampening": float(self.dampening),
                "nesterov": bool(self.nesterov), "weight_decay": float(self.weight_decay),
                "groups": self._describe_groups()}


@dataclass(frozen=True)
class Adam(OptimizerSpec):
    """``torch.optim.Adam`` (coupled weight decay) or, with ``decoupled=True``, ``AdamW``.

    SOURCE holds the preconditioner ``M = 1 / (√v̄ + ε)`` fixed within a segment (``v̄``:
    the bias-corrected second moment averaged over the segment's checkpoints) and
    projects preconditioned gradients. β₁ gives no gain: the segment's time is ``Σ η``.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    groups: tuple[ParamGroup, ...] = ()
    kind: str = field(default="adam", init=False)
    adaptive: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        try:
            beta1, beta2 = (float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise ConfigurationError(f"betas={self.betas!r}; give two numbers (beta1, beta2)") from None
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ConfigurationError(f"betas={self.betas!r}; both must be in [0, 1)")
        object.__setattr__(self, "betas", (beta1, beta2))
        _check_positive(self.eps, "eps")
        _check_nonnegative(self.weight_decay, "weight_decay")
        if not isinstance(self.decoupled, bool):
            raise ConfigurationError(f"decoupled={self.decoupled!r}; give True (AdamW) or False (Adam)")
        object.__setattr__(self, "kind", "adamw" if self.decoupled else "adam")
        object.__setattr__(self, "groups", _groups(self.groups))

    @property
    def coupled_decay(self) -> bool:  # type: ignore[override]
        return not self.decoupled

    def gain(self) -> float:
        return 1.0

    def describe(self) -> dict:
        return {"kind": self.kind, "betas": list(self.betas), "eps": float(self.eps),
                "weight_decay": float(self.weight_decay), "decoupled": bool(self.decoupled),
                "groups": self._describe_groups()}


def AdamW(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,  # noqa: N802
          groups: Sequence[Any] = ()) -> Adam:
    """``torch.optim.AdamW``'s description: :class:`Adam` with decoupled weight decay
    (torch's default decay 0.01)."""
    return Adam(betas=betas, eps=eps, weight_decay=weight_decay, decoupled=True, groups=tuple(groups))


# --------------------------------------------------------------------------- torch optimizers
_NOT_COVERED = {
    "Adafactor": "it factorises the second moment", "Adagrad": "its second moment is a sum, not an average",
    "Adadelta": "its step size adapts to past updates", "Adamax": "it divides by an infinity norm",
    "ASGD": "it averages iterates", "LBFGS": "it is a quasi-Newton method", "NAdam": "it uses Nesterov's moment",
    "RAdam": "it rectifies the variance", "RMSprop": "it has no bias-corrected first moment",
    "Rprop": "it uses signs of gradients", "SparseAdam": "it updates sparse rows", "Lion": "it steps by signs",
    "Muon": "it orthogonalises the update", "Shampoo": "its preconditioner is a Kronecker product",
}


def _refuse_optimizer(name: str, why: str) -> ConfigurationError:
    return ConfigurationError(
        f"the optimizer {name} is not covered by SOURCE's derivation ({why}); SOURCE models SGD (momentum, "
        "dampening, nesterov, weight decay), Adam and AdamW. Attribute a run trained with one of those, or "
        "describe the run explicitly (srcproj.SGD/Adam/AdamW) only if it really was one")


def _group_value(groups: Sequence[Mapping], key: str, default: Any = None) -> list:
    return [g.get(key, default) for g in groups]


def _one_value(groups: Sequence[Mapping], key: str, default: Any, name: str) -> Any:
    values = _group_value(groups, key, default)
    first = values[0]
    if any(v != first for v in values[1:]):
        raise ConfigurationError(
            f"the optimizer's parameter groups have different {key} ({values}); SOURCE needs one {key} for "
            f"every group of a {name} run")
    return first


def _check_flags(groups: Sequence[Mapping], name: str) -> None:
    for key in ("amsgrad", "maximize"):
        if any(bool(g.get(key, False)) for g in groups):
            what = ("amsgrad keeps the maximum of the second moment" if key == "amsgrad"
                    else "maximize climbs the loss")
            raise ConfigurationError(
                f"the {name} optimizer has {key}=True, which SOURCE's derivation does not cover ({what}); "
                f"attribute a run trained without {key}")


def _lr_scales(groups: Sequence[Mapping]) -> list[float]:
    """Each group's rate over group 0's; groups with different schedules are refused."""
    rates = [float(g.get("lr", 0.0)) for g in groups]
    initial = _group_value(groups, "initial_lr")
    if all(v is not None for v in initial):  # a torch LR scheduler ran: its base rates carry the ratios
        starts = [float(v) for v in initial]
        if starts[0] > 0 and any(r > 0 for r in rates):
            ratios = [r / s if s > 0 else 0.0 for r, s in zip(rates, starts, strict=True)]
            if any(not math.isclose(r, ratios[0], rel_tol=1e-6) for r in ratios):
                raise ConfigurationError(
                    f"the optimizer's parameter groups follow different learning-rate schedules (now {rates}, "
                    f"initially {starts}); SOURCE needs one schedule for every group (groups may differ by a "
                    "constant factor)")
        rates = starts
    if rates[0] <= 0:
        if any(r != rates[0] for r in rates):
            raise ConfigurationError(f"the optimizer's group 0 has learning rate {rates[0]}; SOURCE reads the other "
                                     "groups' rates relative to it, so it must be positive")
        if len(rates) > 1:
            raise ConfigurationError(
                f"every parameter group's learning rate is {rates[0]} now and no torch LR scheduler recorded the "
                "base rates (initial_lr), so the groups' rate ratios cannot be read; describe the optimizer "
                "instead (srcproj.AdamW(groups=[{'params': [...], 'lr_scale': ...}]))")
        return [1.0]
    if any(r <= 0 for r in rates):
        raise ConfigurationError(f"the optimizer's parameter groups have learning rates {rates}; a group with "
                                 "rate 0 is not trained: leave it out of the optimizer or of the attribution")
    return [r / rates[0] for r in rates]


def describe_torch_optimizer(optimizer: torch.optim.Optimizer) -> tuple[OptimizerSpec, list[list[Tensor]]]:
    """The description of a live ``torch.optim`` optimizer, with each group's tensors.

    The groups' settings are returned with empty ``params``: names are given by
    :func:`resolve_optimizer`, which knows the model.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = unwrap_optimizer(optimizer)
    name = type(optimizer).__name__
    groups = optimizer.param_groups
    if not groups:
        raise ConfigurationError(f"the {name} optimizer has no parameter groups")
    tensors = [list(g["params"]) for g in groups]
    scales = None
    if isinstance(optimizer, torch.optim.SGD):
        _check_flags(groups, name)
        momentum = float(_one_value(groups, "momentum", 0.0, name))
        dampening = float(_one_value(groups, "dampening", 0.0, name))
        nesterov = bool(_one_value(groups, "nesterov", False, name))
        decays = [float(v) for v in _group_value(groups, "weight_decay", 0.0)]
        scales = _lr_scales(groups)
        spec: OptimizerSpec = SGD(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=decays[0],
                                  groups=tuple(ParamGroup((), d, s) for d, s in zip(decays, scales, strict=True)))
        return spec, tensors
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        _check_flags(groups, name)
        betas = tuple(float(b) for b in _one_value(groups, "betas", (0.9, 0.999), name))
        eps = float(_one_value(groups, "eps", 1e-8, name))
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(
            _one_value(groups, "decoupled_weight_decay", False, name))
        decays = [float(v) for v in _group_value(groups, "weight_decay", 0.0)]
        scales = _lr_scales(groups)
        spec = Adam(betas=betas, eps=eps, weight_decay=decays[0], decoupled=decoupled,
                    groups=tuple(ParamGroup((), d, s) for d, s in zip(decays, scales, strict=True)))
        return spec, tensors
    why = _NOT_COVERED.get(name, "only SGD, Adam and AdamW are")
    raise _refuse_optimizer(name, why)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside wrappers that keep it as ``.optimizer``
    (accelerate's ``AcceleratedOptimizer``, which a Hugging Face Trainer holds)."""
    inner = optimizer
    for _ in range(8):
        if isinstance(inner, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
            return inner
        wrapped = getattr(inner, "optimizer", None)
        if not isinstance(wrapped, torch.optim.Optimizer) or wrapped is inner:
            break
        inner = wrapped
    if not isinstance(inner, torch.optim.Optimizer):
        raise ConfigurationError(f"optimizer is a {type(optimizer).__name__}; give the torch.optim optimizer the "
                                 "training loop steps")
    return inner



def group_parameter_names(model: nn.Module, tensors: Sequence[Sequence[Tensor]]) -> list[list[str]] | None:
    """The model's name of every tensor of an optimizer's groups, by identity; ``None``
    when some tensor is not a parameter of ``model``."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    if any(id(p) not in by_id for group in tensors for p in group):
        return None
    return [[by_id[id(p)] for p in group] for group in tensors]


# --------------------------------------------------------------------------- checkpoints
def split_checkpoint(checkpoint: Any) -> tuple[Any, Mapping | None]:
    """``(model state, optimizer state or None)`` of a checkpoint as users save it:
    a state_dict, or ``{"model": ..., "optimizer": ...}`` (also
    ``model_state_dict``/``optimizer_state_dict``). Anything else is returned as is."""
    if isinstance(checkpoint, Mapping):
        for model_key, optimizer_key in CHECKPOINT_KEYS:
            if isinstance(checkpoint.get(model_key), Mapping):
                optimizer_state = checkpoint.get(optimizer_key)
                if optimizer_state is not None and not isinstance(optimizer_state, Mapping):
                    raise CheckpointMismatchError(
                        f"the checkpoint's {optimizer_key!r} entry is a {type(optimizer_state).__name__}; save "
                        "optimizer.state_dict() there")
                return checkpoint[model_key], optimizer_state
    return checkpoint, None


@dataclass
class ResolvedOptimizer:
    """An optimizer description bound to a model's attributed parameters.

    ``weight_decay[name]`` and ``lr_scale[name]`` per attributed parameter;
    ``state_names``: the parameter name of each index of a saved optimizer state (its
    groups' ``params`` lists, in order), ``None`` where the parameter is not attributed.
    """

    spec: OptimizerSpec
    weight_decay: dict[str, float]
    lr_scale: dict[str, float]
    state_names: list[str | None] | None
    group_sizes: list[int] | None
    #: Whether a live torch optimizer gave the groups (else a description did).
    live: bool = True
    #: Every parameter of the model in ``named_parameters()`` order (a description's
    #: fallback for one saved group over all of them, frozen ones included).
    every_parameter: list[str] | None = None

    @property
    def uniform_lr(self) -> bool:
        return all(v == 1.0 for v in self.lr_scale.values())

    def state_by_name(self, optimizer_state: Mapping, label: str, shapes: Mapping[str, tuple]) -> dict[str, dict]:
        """The saved per-parameter state, keyed by attributed parameter name; checked
        against the model (count per group, shapes) and against the description."""
        spec = self.spec
        groups = optimizer_state.get("param_groups")
        state = optimizer_state.get("state")
        if not isinstance(groups, Sequence) or not isinstance(state, Mapping):
            raise CheckpointMismatchError(f"{label}: its optimizer entry has no 'state' and 'param_groups'; save "
                                          "optimizer.state_dict()")
        kinds = {key for entry in state.values() if isinstance(entry, Mapping) for key in entry}
        adam_groups = any("betas" in g for g in groups)
        if spec.adaptive and (("exp_avg_sq" not in kinds and state) or (not state and not adam_groups)):
            raise CheckpointMismatchError(
                f"{label}: the optimizer state holds {sorted(kinds) or 'no moments'} and its groups no betas: it is "
                "not Adam's; the trajectory describes an Adam run: describe the optimizer the checkpoints were "
                "saved with")
        if spec.adaptive and not state:
            raise CheckpointMismatchError(f"{label}: its Adam state is empty: it was saved before the optimizer's "
                                          "first step; save checkpoints after training steps")
        if not spec.adaptive and (kinds & set(_ADAM_STATE) or adam_groups):
            raise CheckpointMismatchError(
                f"{label}: the optimizer state is Adam's ({sorted(kinds & set(_ADAM_STATE)) or 'betas'}) but the "
                "trajectory describes an SGD run; pass the Adam/AdamW optimizer (Trajectory(optimizer=opt)): nothing "
                "is treated as SGD silently")
        for key in ("amsgrad", "maximize"):
            if any(bool(g.get(key, False)) for g in groups):
                raise CheckpointMismatchError(f"{label}: its optimizer ran with {key}=True, which SOURCE does not "
                                              "cover")
        self._check_settings(groups, label)
        saved_sizes = [len(g.get("params", ())) for g in groups]
        names = self.state_names
        saved_names = [n for g in groups for n in g.get("param_names", ())]
        if saved_names and len(saved_names) == sum(saved_sizes):
            names = [n if n in shapes else None for n in saved_names]
        elif (not self.live and len(saved_sizes) == 1 and self.every_parameter is not None
              and saved_sizes[0] == len(self.every_parameter) != sum(self.group_sizes or [0])):
            # One group over model.parameters(), frozen ones included (a LoRA model's
            # optimizer built over all of them): the model's order maps it.
            names = [n if n in shapes else None for n in self.every_parameter]
        elif names is None or self.group_sizes != saved_sizes:
            if not spec.adaptive:
                return {}  # SGD's state is not read: without a mapping its groups' decays cannot be checked
            raise CheckpointMismatchError(
                f"{label}: its optimizer state has groups of {saved_sizes} parameters, "
                + (f"the optimizer given has {self.group_sizes}" if self.live else
                   f"and the trajectory's description cannot map them to parameters (it maps one group of "
                   f"{sum(self.group_sizes or [0])} in the model's order)")
                + "; pass the live optimizer the run was trained with (Trajectory(optimizer=opt)), built over the "
                "same model in the same order, or save the state of an optimizer built with "
                "model.named_parameters() (it records the names)")
        self._check_groups(groups, names, label)
        if not spec.adaptive:
            return {}  # SGD's momentum buffers are not read
        order = [int(i) for g in groups for i in g.get("params", ())]
        out: dict[str, dict] = {}
        for position, index in enumerate(order):
            name = names[position] if position < len(names) else None
            if name is None:
                continue
            entry = state.get(index, state.get(str(index)))
            if entry is None:
                continue
            value = entry.get("exp_avg_sq")
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(shapes[name]):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise CheckpointMismatchError(
                    f"{label}: the optimizer's exp_avg_sq for {name} has shape {got}, the parameter "
                    f"{tuple(shapes[name])}; the optimizer state belongs to another model or another order of "
                    "parameters")
            out[name] = dict(entry)
        return out

    def _check_settings(self, groups: Sequence[Mapping], label: str) -> None:
        """The saved groups' hyperparameters against the description."""
        spec = self.spec

        def differs(key: str, want: Any) -> None:
            for group in groups:
                if key not in group:
                    continue
                have = group[key]
                same = (all(math.isclose(float(a), float(b), rel_tol=1e-9) for a, b in zip(have, want, strict=True))
                        if isinstance(want, tuple) else
                        (bool(have) == want if isinstance(want, bool) else
                         math.isclose(float(have), float(want), rel_tol=1e-9, abs_tol=1e-15)))
                if not same:
                    shown = tuple(have) if isinstance(want, tuple) else have
                    raise CheckpointMismatchError(
                        f"{label}: its optimizer used {key} {shown}, the trajectory describes "
                        f"{want if not isinstance(want, float) else f'{want:g}'}; describe the run as it was "
                        "trained")

        if isinstance(spec, Adam):
            differs("betas", spec.betas)
            differs("eps", spec.eps)
            flags = [bool(g["decoupled_weight_decay"]) for g in groups if "decoupled_weight_decay" in g]
            if any(flag != spec.decoupled for flag in flags):
                raise CheckpointMismatchError(
                    f"{label}: its optimizer ran with {'decoupled' if flags[0] else 'coupled'} weight decay "
                    f"({'AdamW' if flags[0] else 'Adam'}), the trajectory describes {spec.kind}; describe the run "
                    "as it was trained")
        else:
            assert isinstance(spec, SGD)
            differs("momentum", float(spec.momentum))
            differs("dampening", float(spec.dampening))
            differs("nesterov", bool(spec.nesterov))

    def _check_groups(self, groups: Sequence[Mapping], names: Sequence[str | None], label: str) -> None:
        """Each saved group's weight decay and rate ratio against the parameters' described ones."""
        rates = [float(g["initial_lr"] if "initial_lr" in g else g.get("lr", 0.0)) for g in groups]
        position = 0
        for group, rate in zip(groups, rates, strict=True):
            members = [n for n in names[position:position + len(group.get("params", ()))] if n is not None]
            position += len(group.get("params", ()))
            for name in members:
                if "weight_decay" in group and not math.isclose(float(group["weight_decay"]), self.weight_decay[name],
                                                                rel_tol=1e-9, abs_tol=1e-15):
                    raise CheckpointMismatchError(
                        f"{label}: its optimizer decayed {name} with weight_decay {float(group['weight_decay']):g}, "
                        f"the trajectory describes {self.weight_decay[name]:g}; describe the run's parameter groups "
                        "as they were trained")
                if rates[0] > 0 and rate > 0 and not math.isclose(rate / rates[0], self.lr_scale[name],
                                                                  rel_tol=1e-6):
                    raise CheckpointMismatchError(
                        f"{label}: its optimizer stepped {name} at {rate / rates[0]:g} times group 0's learning "
                        f"rate, the trajectory describes {self.lr_scale[name]:g}; give the group's lr_scale as it "
                        "was trained")


def resolve_optimizer(optimizer: Any, model: nn.Module, param_names: Sequence[str]) -> ResolvedOptimizer:
    """Bind a trajectory's optimizer (a live torch optimizer or a description) to the
    model's attributed parameters ``param_names``."""
    named = dict(model.named_parameters())
    attributed = set(param_names)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = unwrap_optimizer(optimizer)
        spec, tensors = describe_torch_optimizer(optimizer)
        flat = [p for group in tensors for p in group]
        grouped = group_parameter_names(model, tensors)
        if grouped is not None:
            names: list[str | None] = [n for group in grouped for n in group]
        else:
            # Not this model's tensors (another instance of the architecture): match by
            # the order the optimizer was built in, when it covered every parameter.
            trainable = [n for n, p in named.items() if p.requires_grad]
            shapes_match = len(flat) == len(trainable) and all(
                tuple(p.shape) == tuple(named[n].shape) for p, n in zip(flat, trainable, strict=True))
            if not shapes_match:
                raise ConfigurationError(
                    "the optimizer was not built over this model's parameters (nor over the same number of "
                    "parameters with the same shapes, in model.parameters() order); build it over the model "
                    "given to the Attributor")
            names = list(trainable)
        sizes = [len(g) for g in tensors]
        decays, scales = {}, {}
        position = 0
        for group, size in zip(spec.groups, sizes, strict=True):
            for name in names[position:position + size]:
                if name in attributed:
                    decays[name] = float(spec.weight_decay if group.weight_decay is None else group.weight_decay)
                    scales[name] = float(group.lr_scale)
            position += size
        missing = [n for n in param_names if n not in decays]
        if missing:
            raise ConfigurationError(
                f"parameters {missing[:5]} are attributed but not in the optimizer, so they were not trained; "
                "attribute only trained parameters (Attributor(modules=...)) or give the optimizer that trained them")
        spec = with_named_groups(spec, names, sizes)
        return ResolvedOptimizer(spec, decays, scales, [n if n in attributed else None for n in names], sizes)
    if not isinstance(optimizer, OptimizerSpec):
        raise ConfigurationError(
            f"optimizer is a {type(optimizer).__name__}; give the torch.optim optimizer the run used, or "
            "srcproj.SGD(...), srcproj.Adam(...), srcproj.AdamW(...)")
    decays = dict.fromkeys(param_names, float(optimizer.weight_decay))
    scales = dict.fromkeys(param_names, 1.0)
    for group in optimizer.groups:
        unknown = [n for n in group.params if n not in named]
        if unknown:
            raise ConfigurationError(f"parameter group names {unknown[:5]}, which are not parameters of the model")
        for name in group.params:
            if name in attributed:
                if group.weight_decay is not None:
                    decays[name] = float(group.weight_decay)
                scales[name] = float(group.lr_scale)
    trainable = [n for n, p in named.items() if p.requires_grad]
    return ResolvedOptimizer(optimizer, decays, scales, [n if n in attributed else None for n in trainable],
                             [len(trainable)], live=False, every_parameter=list(named))


def with_named_groups(spec: OptimizerSpec, names: Sequence[str | None], sizes: Sequence[int]) -> OptimizerSpec:
    """The description with each group's parameter names filled in (for the store's record)."""
    groups, position = [], 0
    for group, size in zip(spec.groups, sizes, strict=True):
        groups.append(ParamGroup(tuple(n for n in names[position:position + size] if n is not None),
                                 group.weight_decay, group.lr_scale))
        position += size
    if isinstance(spec, SGD):
        return SGD(momentum=spec.momentum, dampening=spec.dampening, nesterov=spec.nesterov,
                   weight_decay=spec.weight_decay, groups=tuple(groups))
    assert isinstance(spec, Adam)
    return Adam(betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, decoupled=spec.decoupled,
                groups=tuple(groups))
