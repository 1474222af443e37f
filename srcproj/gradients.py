"""Per-example gradients with torch.func, for one checkpoint at a time.

This module knows about models, checkpoints and tasks and nothing about projection or
storage: it turns ``(state, x, y)`` into flat per-example gradient rows ``(B, p)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from .errors import CheckpointMismatchError, ConfigurationError, DataError
from .tasks import Task
from .trajectory import Checkpoint

__all__ = ["GradientComputer"]


def _tensor_digest(digest: "hashlib._Hash", name: str, tensor: Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    # A strided sample keeps fingerprinting cheap for large checkpoints.
    if flat.numel() > 4096:
        flat = flat[:: flat.numel() // 4096]
    digest.update(name.encode())
    digest.update(str(tuple(tensor.shape)).encode())
    digest.update(flat.to("cpu", torch.float64).numpy().tobytes())


class GradientComputer:
    """Per-example gradients of a task's loss and measurement for a model.

    Parameters
    ----------
    model : nn.Module
        The architecture; its own weights are never used or modified: every
        computation runs on a checkpoint's tensors through ``functional_call``.
    task : Task
        Loss and measurement.
    modules : sequence of str, optional
        Names of submodules (as in ``model.named_modules()``) whose parameters are
        attributed; by default every parameter with ``requires_grad``.
    """

    def __init__(self, model: nn.Module, task: Task, modules: Sequence[str] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise ConfigurationError(f"task must be a srcproj.Task, got {type(task).__name__}")
        self.model = model
        self.task = task
        named = dict(model.named_parameters())
        if modules is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            known = dict(model.named_modules())
            unknown = [m for m in modules if m not in known]
            if unknown:
                raise ConfigurationError(
                    f"modules {unknown} are not in the model; known modules include "
                    f"{[m for m in known if m][:10]}"
                )
            names = []
            for module_name in modules:
                for pname, _ in known[module_name].named_parameters():
                    full = f"{module_name}.{pname}" if module_name else pname
                    if full not in names:
                        names.append(full)
        if not names:
            raise ConfigurationError("no trainable parameters were selected")
        self.param_names: list[str] = names
        self.param_shapes = {n: tuple(named[n].shape) for n in names}
        self.num_params = sum(int(named[n].numel()) for n in names)
        self._reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self) -> str:
        """Hash of the model's state names and shapes and of the attributed parameters."""
        digest = hashlib.blake2b(digest_size=12)
        for name, shape in self._reference.items():
            digest.update(f"{name}:{shape};".encode())
        digest.update(("|".join(self.param_names)).encode())
        return digest.hexdigest()

    def load_checkpoint(self, checkpoint: Checkpoint, label: str) -> dict[str, Tensor]:
        """Read and check a checkpoint; ``label`` names it in errors ("checkpoint 3")."""
        if isinstance(checkpoint, (str, os.PathLike)):
            path = os.fspath(checkpoint)
            if not os.path.isfile(path):
                raise CheckpointMismatchError(f"{label}: no checkpoint file at {path!r}")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for unreadable files
                raise CheckpointMismatchError(
                    f"{label}: {path!r} could not be read as a torch.save'd state_dict ({exc})"
                ) from exc
        else:
            state = checkpoint
        if not isinstance(state, Mapping):
            raise CheckpointMismatchError(
                f"{label} is a {type(state).__name__}; pass a state_dict (model.state_dict()) "
                "or the path of one saved with torch.save"
            )
        missing = [k for k in self._reference if k not in state]
        unexpected = [k for k in state if k not in self._reference]
        wrong = [
            f"{k}: {tuple(state[k].shape)} vs {self._reference[k]}"
            for k in self._reference
            if k in state and isinstance(state[k], Tensor) and tuple(state[k].shape) != self._reference[k]
        ]
        if missing or unexpected or wrong:
            have = sum(int(v.numel()) for v in state.values() if isinstance(v, Tensor))
            want = sum(int(torch.Size(s).numel()) for s in self._reference.values())
            details = []
            if missing:
                details.append(f"missing {missing[:5]}")
            if unexpected:
                details.append(f"unexpected {unexpected[:5]}")
            if wrong:
                details.append(f"shape mismatch {wrong[:5]}")
            raise CheckpointMismatchError(
                f"{label} has {have} values, the model has {want}: was it saved from another "
                f"architecture? ({'; '.join(details)})"
            )
        return dict(state)

    def checkpoint_digest(self, state: Mapping[str, Tensor]) -> str:
        digest = hashlib.blake2b(digest_size=12)
        for name in self._reference:
            _tensor_digest(digest, name, state[name])
        return digest.hexdigest()

    # ------------------------------------------------------------------ computation
    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Run the model in eval mode (dropout off, batch-norm on running stats)."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def split(self, state: Mapping[str, Tensor], device: torch.device) -> tuple[dict, dict]:
        """``(attributed parameters, everything else)`` moved to ``device``."""
        trainable = {n: state[n].detach().to(device) for n in self.param_names}
        fixed = {n: v.to(device) for n, v in state.items() if n not in trainable and isinstance(v, Tensor)}
        return trainable, fixed

    def _prepare(self, x: Tensor, y: Tensor, trainable: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        x = x.to(device)
        dtype = next(iter(trainable.values())).dtype
        if x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        return x, y.to(device)

    def forward(self, trainable: dict, fixed: dict, x: Tensor) -> Tensor:
        try:
            return functional_call(self.model, {**trainable, **fixed}, (x,))
        except RuntimeError as exc:
            raise DataError(
                f"the model failed on inputs of shape {tuple(x.shape)} (batch first): {exc}"
            ) from exc

    def _flatten(self, grads: Mapping[str, Tensor], lead: int) -> Tensor:
        return torch.cat([grads[n].reshape(*grads[n].shape[:lead], -1) for n in self.param_names], dim=lead)

    def _per_example(self, fn, trainable: dict, fixed: dict, x: Tensor, y: Tensor) -> Tensor:
        model = self.model

        def single(params: dict, xi: Tensor, yi: Tensor) -> Tensor:
            out = functional_call(model, {**params, **fixed}, (xi.unsqueeze(0),))
            return fn(out, yi.unsqueeze(0)).sum()

        try:
            grads = vmap(grad(single), in_dims=(None, 0, 0))(trainable, x, y)
        except RuntimeError as exc:
            raise DataError(
                f"per-example gradients failed on inputs of shape {tuple(x.shape)} "
                f"and targets of shape {tuple(y.shape)}: {exc}"
            ) from exc
        return self._flatten(grads, 1)

    def loss_grads(self, trainable: dict, fixed: dict, x: Tensor, y: Tensor) -> Tensor:
        """Per-example gradients of the training loss, shape ``(B, p)``."""
        device = next(iter(trainable.values())).device
        x, y = self._prepare(x, y, trainable, device)
        return self._per_example(self.task.loss, trainable, fixed, x, y)

    def measurement_grads(self, trainable: dict, fixed: dict, x: Tensor, y: Tensor) -> Tensor:
        """Per-example gradients of the query measurement, shape ``(B, p)``."""
        device = next(iter(trainable.values())).device
        x, y = self._prepare(x, y, trainable, device)
        return self._per_example(self.task.measurement, trainable, fixed, x, y)

    def output_jacobians(self, trainable: dict, fixed: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example Jacobians of the outputs ``(B, C, p)`` and the outputs ``(B, C)``."""
        device = next(iter(trainable.values())).device
        x, _ = self._prepare(x, torch.zeros(0), trainable, device)
        model = self.model

        def single(params: dict, xi: Tensor) -> Tensor:
            return functional_call(model, {**params, **fixed}, (xi.unsqueeze(0),)).reshape(-1)

        jac = vmap(jacrev(single), in_dims=(None, 0))(trainable, x)
        with torch.no_grad():
            outputs = self.forward(trainable, fixed, x)
        return self._flatten(jac, 2), outputs.reshape(outputs.shape[0], -1)
