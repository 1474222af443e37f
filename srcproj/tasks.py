"""Tasks: what the model was trained to minimise and what a query measures.

A :class:`Task` is the only model-specific code a user writes. It maps a batch of model
outputs to per-example losses and measurements; it gives the curvature of the loss in
output space (for the ``exact`` Gauss-Newton estimator) and samples labels from the
model's predictive distribution (for the ``fisher`` one). It also says which tensor of
the model's output those read (:meth:`Task.model_outputs`) and in which mode the model
runs while it is attributed (:attr:`Task.model_mode`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigurationError, DataError

__all__ = ["Task", "ClassificationTask", "RegressionTask", "MODEL_MODES", "default_model_outputs"]

MODEL_MODES = ("eval", "train")


def default_model_outputs(output: Any, owner: str = "Task") -> Tensor:
    """The tensor a model's ``output`` holds, as :meth:`Task.model_outputs` reads it by default.

    A tensor is returned as it is; an object with a tensor attribute ``logits`` (a
    ``transformers`` ``ModelOutput``) gives ``output.logits``; a mapping with a
    ``"logits"`` key gives that entry; a tuple or list whose first item is a tensor
    gives the first item.

    Parameters
    ----------
    output : Any
        What the model's ``forward`` returned.
    owner : str
        The task class named in the error message.

    Returns
    -------
    Tensor
        The model's outputs, ``(B, C)`` for a batch of B examples.

    Raises
    ------
    ConfigurationError
        For any other output, naming its type.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    kind = type(output)
    type_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(output, Mapping):
        what = f"a {type_name} with keys {list(output)[:6]} and no tensor under 'logits'"
    elif isinstance(output, (tuple, list)):
        first = type(output[0]).__name__ if output else "nothing"
        what = f"a {type_name} whose first item is {first}, not a tensor"
    else:
        what = f"a {type_name}"
    raise ConfigurationError(
        f"the model returned {what}; srcproj reads a tensor, a tuple or list whose first item is a tensor, "
        f"a mapping with a 'logits' tensor or an object with a .logits tensor. Override "
        f"{owner}.model_outputs(output) (Task.model_outputs) to return the (batch, outputs) tensor the "
        "loss and measurement read"
    )


class Task(ABC):
    """Base class to subclass for a custom model.

    Methods receive batched ``outputs`` of shape ``(B, C)`` and ``targets`` as the data
    set yields them (stacked along the first dimension). ``loss`` and ``measurement``
    are traced by :mod:`torch.func` per example, so they must be written with batched
    tensor operations only (no ``.item()``, no Python branching on values).

    ``outputs`` is the tensor :meth:`model_outputs` takes from what the model returns:
    by default the model's tensor itself, the first item of a tuple, the ``"logits"``
    entry of a dict or the ``.logits`` of a ``transformers`` ``ModelOutput``.

    Models are attributed in eval mode: dropout off, BatchNorm on its running
    statistics, and the examples of a batch independent. Set ``model_mode = "train"``
    (a class attribute) to differentiate the model as it ran in training instead:
    dropout is then active (each example draws its own mask, so features are random),
    and BatchNorm normalizes with the statistics of the batch it is given, which for
    per-example gradients is a single example (its running statistics are neither used
    nor updated). Any other value is refused with :class:`ConfigurationError` when the
    model and task are put together (``Attributor``, ``GradientComputer``).

    Attributes
    ----------
    name : str
        A short name for reports.
    model_mode : {"eval", "train"}
        The mode the model runs in while it is attributed (default ``"eval"``).
    input_key, target_key : str or None
        For data sets whose examples are mappings (a Hugging Face ``Dataset``): the
        keys of the input and the target. ``None`` (the default) uses the one
        well-known key the examples hold (:data:`srcproj.data.INPUT_KEYS`,
        :data:`srcproj.data.TARGET_KEYS`) and refuses anything ambiguous.
    """

    name: str = "task"
    model_mode: str = "eval"
    input_key: str | None = None
    target_key: str | None = None
    #: Optional ``collate(examples, what) -> (inputs, targets)``: batch a list of the data
    #: set's raw examples itself (pad ragged sequences, read several keys). ``None``: the
    #: examples are ``(x, y)`` pairs or mappings, stacked as they are (srcproj.data).
    collate: Callable[[list, str], tuple[Tensor, Tensor]] | None = None

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example training loss, shape ``(B,)``.

        It must be exactly the loss the model was trained on (mean over the batch in
        training): a factor of 2 changes SOURCE's time scale ``a * lambda``.
        """

    @abstractmethod
    def measurement(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example query measurement, shape ``(B,)``, oriented higher = better."""

    def output_hessian(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Hessian of the per-example loss in the outputs, shape ``(B, C, C)``.

        It is the factor Lambda of the Gauss-Newton matrix ``J^T Lambda J`` used by the
        ``exact`` estimator; it must be positive semi-definite.
        """
        raise ConfigurationError(
            f"{type(self).__name__} has no output_hessian(); implement it or use "
            "hessian='fisher' or hessian='empirical'"
        )

    def sample_targets(self, outputs: Tensor, generator: torch.Generator, targets: Tensor | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution (``fisher`` estimator).

        ``targets`` are the examples' true targets (a subclass may accept them, to keep
        what they mask, or leave the parameter out).
        """
        raise ConfigurationError(
            f"{type(self).__name__} has no sample_targets(); implement it or use "
            "hessian='exact' or hessian='empirical'"
        )

    def sampled_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The per-example function whose gradient, at sampled targets, is a Gauss-Newton
        pseudo-gradient: the mean outer product of those gradients estimates the Hessian
        ``JᵀΛJ`` (``fisher``, and ``empirical`` at the true targets).

        The default is :meth:`loss`, right for a loss that is one log-likelihood term per
        example. A loss that is a weighted sum of terms ``Σ_t w_t ℓ_t`` (tokens of a
        sequence) needs ``Σ_t √w_t ℓ_t``: its gradients' outer products then average to
        ``Σ_t w_t J_tᵀΛ_tJ_t`` (docs/math.md §9).
        """
        return self.loss(outputs, targets)

    def calibrate(self, targets: Iterable[Tensor]) -> None:  # noqa: B027 - optional hook
        """Called once with the training targets (blocks of them) before featurizing, for a
        task whose loss depends on the data set (the mean number of target tokens of a
        language model's batches). The default does nothing."""

    def calibrated_from(self, description: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Take what :meth:`calibrate` found from a store's record of the task (its
        :meth:`describe`), when reopening the store. The default does nothing."""

    def validate_targets(self, targets: Tensor, num_outputs: int, what: str) -> None:  # noqa: B027 - optional hook
        """Raise :class:`DataError` when ``targets`` cannot belong to this task (default: accept)."""

    def model_inputs(self, inputs: Tensor) -> tuple[tuple, dict]:
        """The model's positional and keyword arguments for a batch of inputs.

        Called on a batch, and (inside :mod:`torch.func` transforms) on one example at a
        time, so it must only select, reshape or build constant tensors. The default,
        ``((inputs,), {})``, calls ``model(inputs)``.
        """
        return (inputs,), {}

    def model_outputs(self, output: Any) -> Tensor:
        """The tensor of shape ``(B, C)`` the loss and measurement read from the model's output.

        Called on whatever the model's ``forward`` returns, for a batch and (inside
        :mod:`torch.func` transforms) for one example at a time, so it must only select
        or reshape (no ``.item()``, no Python branching on values).

        Parameters
        ----------
        output : Any
            What the model returned.

        Returns
        -------
        Tensor
            By default (:func:`default_model_outputs`): a tensor as it is; an object
            with a tensor attribute ``logits`` (a ``transformers`` ``ModelOutput``):
            ``output.logits``; a mapping with a ``"logits"`` key: that entry; a tuple
            or list whose first item is a tensor: the first item.

        Raises
        ------
        ConfigurationError
            For any other output, naming its type; override this method for it.
        """
        return default_model_outputs(output, type(self).__name__)

    def describe(self) -> dict:
        """A JSON-able description recorded in the store (a mismatch is refused on reopen).

        The default names the class, and adds ``model_mode`` when it is not ``"eval"``
        (so the descriptions of eval-mode tasks, and the stores that recorded them, stay
        as before). A subclass that adds options should extend ``super().describe()``.
        """
        description: dict = {"class": f"{type(self).__module__}.{type(self).__qualname__}"}
        if self.model_mode != "eval":
            description["model_mode"] = self.model_mode
        return description


class ClassificationTask(Task):
    """Softmax classification trained with cross-entropy.

    The measurement is the margin ``logit_y - logsumexp(other logits)``, the quantity
    TRAK and the SOURCE paper attribute.
    """

    name = "classification"

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def measurement(self, outputs: Tensor, targets: Tensor) -> Tensor:
        classes = torch.arange(outputs.shape[-1], device=outputs.device)
        is_label = classes == targets.unsqueeze(-1)
        correct = (outputs * is_label).sum(-1)
        others = outputs.masked_fill(is_label, float("-inf")).logsumexp(-1)
        return correct - others

    def output_hessian(self, outputs: Tensor, targets: Tensor) -> Tensor:
        probs = torch.softmax(outputs, dim=-1)
        return torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator, targets: Tensor | None = None) -> Tensor:
        probs = torch.softmax(outputs.detach().to(torch.float64), dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(outputs.device)

    def validate_targets(self, targets: Tensor, num_outputs: int, what: str) -> None:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise DataError(
                f"{what} has labels of dtype {targets.dtype}; ClassificationTask needs "
                "integer class indices (e.g. y.long())"
            )
        if targets.ndim != 1:
            raise DataError(
                f"{what} has labels of shape {tuple(targets.shape)}; ClassificationTask "
                "needs one class index per example"
            )
        bad = (targets < 0) | (targets >= num_outputs)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0, 0])
            raise DataError(
                f"{what}: label {int(targets[first])} of example {first} is outside the "
                f"model's {num_outputs} classes (valid labels are 0..{num_outputs - 1})"
            )


class RegressionTask(Task):
    """Regression trained with the loss ``0.5 * ||f - y||^2`` per example.

    With that loss the output-space Hessian is the identity. The measurement is
    ``-||f - y||`` (the negative absolute error for one output).
    """

    name = "regression"

    def _residual(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs - targets.reshape(outputs.shape).to(outputs.dtype)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * self._residual(outputs, targets).pow(2).flatten(1).sum(-1)

    def measurement(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return -self._residual(outputs, targets).flatten(1).norm(dim=-1)

    def output_hessian(self, outputs: Tensor, targets: Tensor) -> Tensor:
        batch, dim = outputs.shape[0], outputs[0].numel()
        eye = torch.eye(dim, dtype=outputs.dtype, device=outputs.device)
        return eye.expand(batch, dim, dim)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator, targets: Tensor | None = None) -> Tensor:
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
        return outputs.detach() + noise.to(outputs.device)

    def validate_targets(self, targets: Tensor, num_outputs: int, what: str) -> None:
        if targets.numel() != targets.shape[0] * num_outputs:
            raise DataError(
                f"{what} has targets of shape {tuple(targets.shape)} but the model has "
                f"{num_outputs} outputs per example"
            )
        if not bool(torch.isfinite(targets.to(torch.float64)).all()):
            raise DataError(f"{what} has NaN or inf targets")
