"""Per-example gradients, for one checkpoint at a time, and how they reach a projector.

This module knows about models, checkpoints and tasks and nothing about storage: it
turns ``(state, x, y)`` into per-example gradient rows ``(B, p)`` with torch.func
(:class:`GradientComputer`), and captures the inputs and output gradients of Linear,
transformers' Conv1D and Conv2d layers in one batched forward and backward pass
(:class:`LayerCapture`), whose products ``Σ_t δ_t a_tᵀ`` are the layers' per-example
weight gradients.

:class:`ProjectedGradients` is the one adapter the rest of srcproj asks for features:
it picks a gradient backend (:class:`VmapBackend`, :class:`DenseHookBackend`,
:class:`FactoredBackend`) from the capabilities its projector declares, and the backend
hands the projector gradient rows, column pieces of them (:class:`GradientPieces`) or a
layer's factors. Projectors (srcproj.projection) only map.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from .errors import CheckpointMismatchError, ConfigurationError, DataError
from .optimizer import split_checkpoint
from .tasks import MODEL_MODES, Task, default_model_outputs
from .trajectory import Checkpoint
from .validation import check_choice

if TYPE_CHECKING:  # pragma: no cover
    from .projection import Projector

__all__ = ["GradientComputer", "ProjectedGradients", "GradientBackend", "VmapBackend", "DenseHookBackend",
           "FactoredBackend", "GradientPieces", "FactoredLayer", "FactoredSplit", "LayerCapture",
           "checked_factored_layers", "factored_layers", "factored_split", "layer_bias_grads", "layer_inputs",
           "layer_weight_grads", "not_factored_reasons", "project_layer_inputs", "verify_factored"]

KINDS = ("loss", "measurement", "sampled_loss")


def _tensor_digest(digest: hashlib._Hash, name: str, tensor: Tensor) -> None:
    """Feed ``tensor``'s name, shape, dtype and every byte of its values to ``digest``.

    The whole tensor is hashed (as the raw bytes of a contiguous CPU copy): a change of
    any one entry changes the digest, so a checkpoint that differs from the one a store
    was featurized with is never taken for it.
    """
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy())


ModelOutputs = Callable[[Any], Tensor]  # what the model returned -> its (B, C) tensor (Task.model_outputs)
ModelInputs = Callable[[Tensor], tuple[tuple, dict]]  # a batch -> the model's (args, kwargs) (Task.model_inputs)


def _call(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, inputs: ModelInputs | None) -> Any:
    """``model(*args, **kwargs)`` with ``params``, the arguments made from ``x`` by ``inputs``
    (the task's :meth:`~srcproj.Task.model_inputs`; default: ``model(x)``)."""
    if inputs is None:
        return functional_call(model, dict(params), (x,))
    args, kwargs = inputs(x)
    return functional_call(model, dict(params), tuple(args), dict(kwargs))


def _checked_outputs(value: Any, outputs: ModelOutputs) -> Tensor:
    """``value`` (what ``outputs`` made of the model's output) if it is a tensor."""
    if isinstance(value, Tensor):
        return value
    owner = getattr(outputs, "__self__", None)
    name = (f"{type(owner).__name__}.model_outputs" if owner is not None
            else getattr(outputs, "__qualname__", repr(outputs)))
    raise ConfigurationError(f"{name} returned a {type(value).__name__}, not a tensor; it must return the "
                             "(batch, outputs) tensor the loss and measurement read from the model's output")


@dataclass(frozen=True)
class FactoredLayer:
    """A layer whose per-example weight gradient is ``Σ_t δ_t a_tᵀ`` (docs/math.md §3).

    ``a_t`` is the layer's input at position ``t`` (for a Conv2d, the input patch of
    output pixel ``t``) and ``δ_t`` the gradient of the objective in the layer's output
    there. An attributed bias is the weight of an extra input column of ones.
    """

    module: str  # name in model.named_modules()
    kind: str  # "linear", "conv1d" (transformers' Conv1D: y = x W + b, W stored d_in × d_out) or "conv2d"
    weight: str  # parameter name of the weight
    bias: str | None  # parameter name of the bias when it is attributed
    d_out: int  # output features (Linear) or channels (Conv2d)
    d_in: int  # inputs per output: in_features, or in_channels·kh·kw (without the bias column)

    @property
    def d_in_total(self) -> int:
        """Inputs per output including the bias column of ones."""
        return self.d_in + (1 if self.bias is not None else 0)

    @property
    def position_wise(self) -> bool:
        """Whether each position's input is one vector of ``d_in`` (Linear, Conv1D)."""
        return self.kind != "conv2d"

    def as_weight(self, matrices: Tensor) -> Tensor:
        """``(..., d_out, d_in)`` gradients in the weight's own flattening order, ``(..., d_out · d_in)``."""
        if self.kind == "conv1d":  # the weight is stored transposed, d_in × d_out
            matrices = matrices.transpose(-1, -2)
        return matrices.reshape(*matrices.shape[:-2], -1)

    def from_weight(self, flat: Tensor) -> Tensor:
        """Rows in the weight's flattening order, ``(..., d_out · d_in)``, as ``(..., d_out, d_in)``."""
        if self.kind == "conv1d":
            return flat.reshape(*flat.shape[:-1], self.d_in, self.d_out).transpose(-1, -2)
        return flat.reshape(*flat.shape[:-1], self.d_out, self.d_in)


def _conv1d_class(module: nn.Module) -> type | None:
    """transformers' ``Conv1D`` among the module's classes (transformers is never imported here)."""
    for kind in type(module).__mro__:
        if kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers."):
            return kind
    return None


def _factorable(module: nn.Module) -> tuple[str | None, str]:
    """``(kind, why not)`` for a module; kind is None when its gradient is not factored."""
    if isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward:
            return None, f"{type(module).__name__} overrides Linear.forward"
        return "linear", ""
    if isinstance(module, nn.Conv2d):
        if type(module).forward is not nn.Conv2d.forward:
            return None, f"{type(module).__name__} overrides Conv2d.forward"
        if module.groups != 1:
            return None, f"Conv2d with groups={module.groups}"
        if module.padding_mode != "zeros":
            return None, f"Conv2d with padding_mode={module.padding_mode!r}"
        return "conv2d", ""
    conv1d = _conv1d_class(module)
    if conv1d is not None:
        if type(module).forward is not conv1d.forward:
            return None, f"{type(module).__name__} overrides Conv1D.forward"
        return "conv1d", ""
    return None, f"{type(module).__name__} is neither Linear, transformers' Conv1D nor Conv2d"


def factored_layers(model: nn.Module, param_names: Sequence[str]) -> tuple[list[FactoredLayer], list[str]]:
    """Split the attributed parameters into factored layers and the other parameters.

    A layer is factored when it is an ``nn.Linear``, a ``transformers`` ``Conv1D`` or an
    ``nn.Conv2d`` (``groups=1``, zero padding), with its class's own ``forward``, whose
    weight is attributed; its bias joins it
    when attributed too. Every other attributed parameter (LayerNorm, embeddings, other
    layer types, a bias whose weight is frozen) is returned in the second list, in
    ``param_names`` order.
    """
    wanted = set(param_names)
    layers: list[FactoredLayer] = []
    claimed: set[str] = set()
    for name, module in model.named_modules():
        kind, _ = _factorable(module)
        weight = f"{name}.weight" if name else "weight"
        if kind is None or weight not in wanted or module.weight is None:
            continue
        bias_name = f"{name}.bias" if name else "bias"
        bias = bias_name if module.bias is not None and bias_name in wanted else None
        if kind == "conv1d":
            d_in, d_out = (int(n) for n in module.weight.shape)
        else:
            d_out = int(module.weight.shape[0])
            d_in = int(module.weight[0].numel())
        layers.append(FactoredLayer(name, kind, weight, bias, d_out, d_in))
        claimed.update({weight} | ({bias} if bias else set()))
    return layers, [n for n in param_names if n not in claimed]


def not_factored_reasons(model: nn.Module, param_names: Sequence[str]) -> dict[str, str]:
    """For each attributed parameter outside a factored layer: why (for error messages)."""
    _, others = factored_layers(model, param_names)
    modules = dict(model.named_modules())
    reasons = {}
    for pname in others:
        owner, _, leaf = pname.rpartition(".")
        module = modules.get(owner)
        if module is None:
            reasons[pname] = "not a parameter of a submodule"
            continue
        kind, why = _factorable(module)
        reasons[pname] = why if kind is None else f"the layer's weight is not attributed ({leaf} alone)"
    return reasons


def _check_input(layer: FactoredLayer, x: Tensor) -> None:
    if layer.position_wise and x.ndim < 2:
        raise DataError(f"layer {layer.module!r} received an input of shape {tuple(x.shape)}; "
                        "the factored projection needs a batch dimension")
    if layer.kind == "conv2d" and x.ndim != 4:
        raise DataError(f"Conv2d {layer.module!r} received an input of shape {tuple(x.shape)}; "
                        "the factored projection needs batched (B, C, H, W) inputs")


def layer_inputs(layer: FactoredLayer, module: nn.Module, x: Tensor) -> Tensor:
    """The layer's inputs ``a_t`` as ``(B, T, d_in)``: positions (or Conv2d patches) in the middle."""
    _check_input(layer, x)
    if layer.position_wise:
        return x.reshape(x.shape[0], -1, layer.d_in)
    padding = module.padding
    if isinstance(padding, str):  # "same" / "valid": pad explicitly as Conv2d does
        x = F.pad(x, module._reversed_padding_repeated_twice)
        padding = 0
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2)  # (B, L, C·kh·kw), channel-major like weight[o].reshape(-1)


def project_layer_inputs(layer: FactoredLayer, module: nn.Module, x: Tensor, p_in: Tensor) -> Tensor:
    """``P_in a_t`` for every position, ``(B, T, k_in)``, without forming the patches.

    ``p_in`` is ``k_in × (d_in [+ 1])``; its last column, when the bias is attributed,
    multiplies the input column of ones. For a Conv2d, projecting every patch is a
    convolution with ``P_in`` as its kernel (much faster than unfolding the patches).
    ``x`` is converted to ``p_in``'s dtype (the projection's accumulation dtype, float32
    for a 16-bit model), which is the result's.
    """
    _check_input(layer, x)
    if x.dtype != p_in.dtype:
        x = x.to(p_in.dtype)
    weight = p_in[:, : layer.d_in]
    if layer.position_wise:
        projected = x.reshape(x.shape[0], -1, layer.d_in) @ weight.T
    else:
        kernel = weight.reshape(p_in.shape[0], *module.weight.shape[1:])
        out = F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation)
        projected = out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2)
    if layer.bias is not None:
        projected = projected + p_in[:, layer.d_in]
    return projected


def _layer_delta(layer: FactoredLayer, grad_out: Tensor) -> Tensor:
    """The output gradient as ``(B, T, d_out)``."""
    if layer.position_wise:
        return grad_out.reshape(grad_out.shape[0], -1, layer.d_out)
    return grad_out.reshape(grad_out.shape[0], layer.d_out, -1).transpose(1, 2)


def layer_weight_grads(layer: FactoredLayer, module: nn.Module, inputs: Sequence[Tensor],
                       deltas: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """Per-example weight gradients ``Σ_t δ_t a_tᵀ``, ``(B, d_out · d_in)`` in the weight's flattening order.

    ``inputs``: the layer's input tensors, one per call of the module (as the module
    received them, at least one); ``deltas``: the matching output gradients
    ``(B, T, d_out)`` (:meth:`LayerCapture.backward`). With one position per call (a plain
    Linear) the product is an outer product, otherwise a batched matmul over positions.
    ``out``: a buffer of at least ``B · d_out · d_in`` entries to write them into (fresh
    pages of a large new tensor cost several times the products themselves).
    """
    batch = deltas[0].shape[0]
    size = batch * layer.d_out * layer.d_in
    if out is None:
        out = torch.empty(size, dtype=deltas[0].dtype, device=deltas[0].device)
    rows, cols = (layer.d_in, layer.d_out) if layer.kind == "conv1d" else (layer.d_out, layer.d_in)
    total = out.view(-1)[:size].view(batch, rows, cols)
    for call, (x, delta) in enumerate(zip(inputs, deltas, strict=True)):
        a = layer_inputs(layer, module, x)  # (B, T, d_in)
        # Conv1D stores its weight d_in × d_out, so its gradient is Σ_t a_t δ_tᵀ.
        left, right = (a, delta) if layer.kind == "conv1d" else (delta, a)
        if call and a.shape[1] == 1:
            total.addcmul_(left[:, 0, :, None], right[:, 0, None, :])
        elif call:
            total.baddbmm_(left.transpose(1, 2), right)
        elif a.shape[1] == 1:
            torch.mul(left[:, 0, :, None], right[:, 0, None, :], out=total)
        else:
            torch.bmm(left.transpose(1, 2), right, out=total)
    return total.view(batch, -1)


def layer_bias_grads(deltas: Sequence[Tensor]) -> Tensor:
    """Per-example bias gradients ``Σ_t δ_t``, ``(B, d_out)``, summed over the module's calls."""
    total = None
    for delta in deltas:
        term = delta.sum(dim=1)
        total = term if total is None else total + term
    return total


class LayerCapture:
    """One batched forward with hooks on factored layers, then backward passes.

    The forward records, for every call of every layer, ``input_fn(i, module, x)`` with
    ``x`` the module's (detached) input tensor; ``input_fn`` should reduce it at once
    (e.g. :func:`project_layer_inputs`), so later in-place operations cannot alter it.
    It keeps
    the layer's output in the autograd graph. :meth:`backward` then returns, for a
    scalar objective that is a sum of per-example terms, the output gradients
    ``δ (B, T, d_out)`` of every call. In eval mode the examples of a batch are
    independent, so row ``b`` of ``δ`` is the gradient of example ``b``'s own term.

    Parameters are never differentiated: the graph starts at the first hooked layer.
    :meth:`forward` returns the tensor ``outputs(what the model returned)``
    (:meth:`Task.model_outputs <srcproj.Task.model_outputs>`; default:
    :func:`~srcproj.tasks.default_model_outputs`).
    """

    def __init__(self, model: nn.Module, layers: Sequence[FactoredLayer],
                 input_fn: Callable[[int, nn.Module, Tensor], object], outputs: ModelOutputs | None = None,
                 inputs: ModelInputs | None = None) -> None:
        self.model = model
        self.model_inputs = inputs
        self.layers = list(layers)
        self.input_fn = input_fn
        self.outputs = default_model_outputs if outputs is None else outputs
        modules = dict(model.named_modules())
        self.modules = [modules[layer.module] for layer in self.layers]
        self.inputs: list[list[object]] = [[] for _ in self.layers]
        self._outputs: list[list[Tensor]] = [[] for _ in self.layers]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            self.inputs[index].append(self.input_fn(index, module, args[0].detach()))
            tracked = output if output.requires_grad else output.detach().requires_grad_(True)
            self._outputs[index].append(tracked)
            # A copy goes on: an in-place op downstream (ReLU(inplace=True)) must not
            # change the tensor whose gradient is δ.
            return tracked.clone()

        return hook

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        try:
            with torch.enable_grad():
                output = _call(self.model, params, x, self.model_inputs)
        except RuntimeError as exc:
            raise DataError(f"the model failed on inputs of shape {tuple(x.shape)} (batch first): {exc}") from exc
        finally:
            for handle in handles:
                handle.remove()
        return _checked_outputs(self.outputs(output), self.outputs)

    def backward(self, objective: Tensor, retain_graph: bool = False) -> list[list[Tensor]]:
        """``δ`` per layer and call for ``objective`` (a scalar: the sum over examples)."""
        flat = [t for outs in self._outputs for t in outs]
        if not flat:
            return [[] for _ in self.layers]
        if objective.requires_grad:
            grads = torch.autograd.grad(objective, flat, retain_graph=retain_graph, allow_unused=True)
        else:  # the objective does not depend on any hooked layer
            grads = [None] * len(flat)
        out, position = [], 0
        for layer, outs in zip(self.layers, self._outputs, strict=True):
            deltas = []
            for tracked in outs:
                g = grads[position]
                position += 1
                deltas.append(_layer_delta(layer, torch.zeros_like(tracked) if g is None else g))
            out.append(deltas)
        return out


def verify_factored(model: nn.Module, layers: Sequence[FactoredLayer], params: Mapping[str, Tensor],
                    x: Tensor, tolerance: float = 1e-3, outputs: ModelOutputs | None = None,
                    inputs: ModelInputs | None = None) -> list[str]:
    """Modules among ``layers`` whose per-example weight gradient on ``x`` is not ``Σ_t δ_t a_tᵀ``
    (or whose attributed bias gradient is not ``Σ_t δ_t``).

    Compares, for a fixed weighted sum of the outputs, the gradients rebuilt from the
    hooks with autograd's per-example gradients. A layer fails when its weight is also
    used outside the module's own forward (``nn.MultiheadAttention`` reads
    ``out_proj.weight`` directly, tied weights) or the layer mixes examples of a batch.
    ``outputs`` takes the tensor from what the model returns (the task's
    ``model_outputs``; default :func:`~srcproj.tasks.default_model_outputs`).
    """
    if not layers:
        return []
    outputs_of = default_model_outputs if outputs is None else outputs
    capture = LayerCapture(model, layers, lambda index, module, a: layer_inputs(layers[index], module, a).clone(),
                           outputs_of, inputs)
    batch_outputs = capture.forward(params, x)
    with torch.enable_grad():  # the caller may be under no_grad: keep the graph
        flat = batch_outputs.reshape(batch_outputs.shape[0], -1)
        weights = torch.linspace(0.5, 1.5, flat.shape[1], dtype=flat.dtype, device=flat.device)
        objective = (flat * weights).sum()
    deltas = capture.backward(objective)
    names = [n for layer in layers for n in (layer.weight, layer.bias) if n is not None]
    reference = {n: [] for n in names}
    for b in range(x.shape[0]):  # plain autograd, one example at a time
        leaves = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        with torch.enable_grad():
            out = outputs_of(_call(model, {**params, **leaves}, x[b:b + 1], inputs))
            grads = torch.autograd.grad((out.reshape(-1) * weights).sum(), list(leaves.values()), allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            reference[n].append(torch.zeros_like(leaves[n]) if g is None else g)

    def differs(have: Tensor, want: Tensor) -> bool:
        scale = float(want.abs().max())
        return float((have - want).abs().max()) > tolerance * max(scale, 1e-30) and scale + float(have.abs().max()) > 0

    failed = []
    for index, layer in enumerate(layers):
        want = layer.from_weight(torch.stack(reference[layer.weight]).reshape(x.shape[0], -1))
        have = torch.zeros_like(want)
        for a, d in zip(capture.inputs[index], deltas[index], strict=True):
            have = have + torch.einsum("btk,btj->bkj", d, a)
        wrong = differs(have, want)
        if layer.bias is not None and not wrong:  # a bias read outside the module (rare) fails too
            want = torch.stack(reference[layer.bias]).reshape(x.shape[0], layer.d_out)
            have = torch.zeros_like(want)
            for d in deltas[index]:
                have = have + d.sum(dim=1)
            wrong = differs(have, want)
        if wrong:
            failed.append(layer.module)
    return failed


def checked_factored_layers(model: nn.Module, param_names: Sequence[str], params: Mapping[str, Tensor] | None,
                            example: Tensor | None, outputs: ModelOutputs | None = None,
                            inputs: ModelInputs | None = None) -> tuple[list[FactoredLayer], list[str], list[str]]:
    """:func:`factored_layers`, less the layers that fail :func:`verify_factored` on ``example``.

    Returns ``(layers, other parameters in param_names order, demoted modules)``. Without
    ``example`` nothing is checked. ``params`` is the full state the check runs with
    (default: the model's own parameters and buffers); ``outputs`` takes the tensor from
    what the model returns (the task's ``model_outputs``).
    """
    layers, others = factored_layers(model, param_names)
    if example is None or not layers:
        return layers, others, []
    state = dict(params) if params is not None else {**dict(model.named_parameters()),
                                                     **dict(model.named_buffers())}
    demoted = verify_factored(model, layers, state, example, outputs=outputs, inputs=inputs)
    if not demoted:
        return layers, others, []
    kept = [layer for layer in layers if layer.module not in demoted]
    claimed = {n for layer in kept for n in (layer.weight, layer.bias) if n is not None}
    return kept, [n for n in param_names if n not in claimed], demoted


@dataclass(frozen=True)
class FactoredSplit:
    """A model's attributed parameters split for a factored projection (:func:`factored_split`)."""

    param_names: list[str]  # the attributed parameters, in the order of the gradient rows
    sizes: dict[str, int]  # entries of each attributed parameter
    layers: list[FactoredLayer]  # the factored layers, in the model's order
    others: list[str]  # the other attributed parameters, in param_names order
    reasons: dict[str, str]  # for each of the others: why it is not in a factored layer


def factored_split(model: nn.Module, param_names: Sequence[str] | None = None,
                   params: Mapping[str, Tensor] | None = None, example: Tensor | None = None,
                   outputs: ModelOutputs | None = None, inputs: ModelInputs | None = None) -> FactoredSplit:
    """:func:`checked_factored_layers` of ``param_names`` (default: every parameter with
    ``requires_grad``), with the sizes of the parameters and why the others are not factored.

    Raises :class:`ConfigurationError` when ``model`` is not a module or a name is not
    one of its parameters.
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"bind() needs a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if param_names is None else list(param_names)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ConfigurationError(f"parameters {unknown[:5]} are not in the model")
    layers, others, demoted = checked_factored_layers(model, names, params, example, outputs, inputs)
    reasons = not_factored_reasons(model, names) if others else {}
    reasons.update({n: "used outside its module" for n in others if n.rpartition(".")[0] in demoted})
    return FactoredSplit(names, {n: int(named[n].numel()) for n in names}, layers, others,
                         {n: reasons.get(n, "") for n in others})


class GradientPieces(Sequence[Tensor]):
    """Per-example gradient rows ``(B, p)`` as consecutive column pieces ``(B, p_i)``,
    each formed only when it is asked for.

    The sizes, the batch, the dtype and the device are known up front; ``pieces[i]``
    calls ``make(i)``. A consumer that asks for the pieces in increasing order and
    drops each before asking for the next (``RademacherProjector.project_pieces``) holds
    one at a time, so a backend can form them in one reused buffer: piece ``i`` is only
    valid until piece ``i + 1`` is asked for.

    Parameters
    ----------
    sizes : sequence of int
        Columns of each piece.
    make : callable
        ``make(i)`` returns piece ``i``, shape ``(batch, sizes[i])``.
    batch : int
        Rows.
    dtype, device
        Those of every piece.
    """

    def __init__(self, sizes: Sequence[int], make: Callable[[int], Tensor], batch: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.sizes = [int(size) for size in sizes]
        self.batch, self.dtype, self.device = int(batch), dtype, device
        self._make = make

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> GradientPieces:
        """Pieces that already exist (at least one)."""
        tensors = list(tensors)
        if not tensors:
            raise ConfigurationError("no gradient pieces to project")
        first = tensors[0]
        return cls([t.shape[1] for t in tensors], tensors.__getitem__, first.shape[0], first.dtype, first.device)

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        if not -len(self.sizes) <= index < len(self.sizes):
            raise IndexError(f"piece {index} of {len(self.sizes)}")
        return self._make(index % len(self.sizes))

    def cat(self) -> Tensor:
        """The rows ``(B, p)`` (one piece is returned as it is, without a copy)."""
        if len(self.sizes) == 1:
            return self[0]
        return torch.cat([self[i] for i in range(len(self.sizes))], dim=1)


def _module_parameters(model: nn.Module, modules: Sequence[str]) -> list[str]:
    """The trainable parameters of the modules named or matched (``fnmatch`` patterns
    such as ``"*.mlp.*"``) by ``modules``: in the entries' order, each module's in its
    ``named_parameters()`` order, each parameter once."""
    if isinstance(modules, str):
        modules = [modules]
    known = dict(model.named_modules())
    chosen: dict[str, None] = {}  # ordered: the entries' order, each module's own within it
    for entry in modules:
        if not isinstance(entry, str):
            raise ConfigurationError(f"modules holds a {type(entry).__name__}; give module names or patterns (str)")
        matched = [entry] if entry in known else [m for m in known if m and fnmatch.fnmatchcase(m, entry)]
        if not matched:
            raise ConfigurationError(
                f"modules entry {entry!r} names no module of the model and matches none as a pattern; known modules "
                f"include {[m for m in known if m][:10]}"
            )
        found = [f"{m}.{p}" if m else p for m in matched for p, param in known[m].named_parameters()
                 if param.requires_grad]
        if not found:
            raise ConfigurationError(f"modules entry {entry!r} has no trainable parameters (requires_grad); only "
                                     "what training changed can be attributed")
        chosen.update(dict.fromkeys(found))
    return list(chosen)


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Every other name of a tied parameter -> its name in ``model.named_parameters()``."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name:
            tied[name] = owner
    return tied


@contextlib.contextmanager
def _vmappable_attention() -> Iterator[None]:
    """Scaled dot-product attention through its plain math under vmap: the fused
    kernels have no batching rule (torch warns of a performance drop at every call and
    loops over the examples); the math kernel is batched, and the same function."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without the attention module
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


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
        Submodules whose trainable parameters are attributed: names as in
        ``model.named_modules()`` or ``fnmatch`` patterns of them (``"*.mlp.*"``); by
        default every parameter with ``requires_grad`` (a LoRA model: its adapters).

    Raises
    ------
    ConfigurationError
        For a model that is not a module, a task that is not a :class:`Task`, a
        ``task.model_mode`` other than "eval" or "train", or unknown modules.
    """

    def __init__(self, model: nn.Module, task: Task, modules: Sequence[str] | None = None, *,
                 param_names: Sequence[str] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise ConfigurationError(f"task must be a srcproj.Task, got {type(task).__name__}")
        self.model = model
        self.task = task
        self._checked_mode()  # an unknown Task.model_mode is refused now, not at the first batch
        named = dict(model.named_parameters())
        if param_names is not None:  # the attributed parameters by name (a reopened store lists them)
            names = list(param_names)
            unknown = [n for n in names if n not in named]
            if unknown:
                raise ConfigurationError(f"parameters {unknown[:5]} are not in the model; pass the architecture "
                                         "the store was featurized with")
        elif modules is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            names = _module_parameters(model, modules)
        if not names:
            raise ConfigurationError("no trainable parameters were selected")
        self.param_names: list[str] = names
        self.param_shapes = {n: tuple(named[n].shape) for n in names}
        self.num_params = sum(int(named[n].numel()) for n in names)
        self._reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        #: Tied parameters (an output layer sharing the embedding matrix): each other name
        #: of a parameter -> the name ``named_parameters()`` gives it. A tied parameter is
        #: one parameter: only that name is passed to the model, so its gradient is the
        #: sum over all its uses (docs/math.md §9).
        self.tied: dict[str, str] = _tied_names(model)

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self) -> str:
        """Hash of the model's state names and shapes and of the attributed parameters."""
        digest = hashlib.blake2b(digest_size=12)
        for name, shape in self._reference.items():
            digest.update(f"{name}:{shape};".encode())
        digest.update(("|".join(self.param_names)).encode())
        return digest.hexdigest()

    def load_checkpoint(self, checkpoint: Checkpoint, label: str) -> dict[str, Tensor]:
        """Read and check a checkpoint's model state; ``label`` names it in errors ("checkpoint 3")."""
        return self.read_checkpoint(checkpoint, label)[0]

    def read_checkpoint(self, checkpoint: Checkpoint, label: str) -> tuple[dict[str, Tensor], Mapping | None]:
        """``(checked model state, optimizer state or None)`` of a checkpoint: a
        state_dict, or ``{"model": ..., "optimizer": ...}``, in memory or as a path."""
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
        state, optimizer_state = split_checkpoint(state)
        if not isinstance(state, Mapping):
            raise CheckpointMismatchError(
                f"{label} is a {type(state).__name__}; pass a state_dict (model.state_dict()), a dict "
                '{"model": model.state_dict(), "optimizer": optimizer.state_dict()}, or the path of either '
                "saved with torch.save"
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
        for alias, name in self.tied.items():
            if isinstance(state[alias], Tensor) and not torch.equal(state[alias], state[name]):
                raise CheckpointMismatchError(
                    f"{label}: {alias!r} and {name!r} differ, but the model ties them (one parameter); the "
                    "checkpoint was saved from an untied model. Load it into the architecture it was trained as "
                    "(e.g. tie_word_embeddings=False in the model's config)"
                )
        return dict(state), optimizer_state

    def checkpoint_digest(self, state: Mapping[str, Tensor]) -> str:
        digest = hashlib.blake2b(digest_size=12)
        for name in self._reference:
            _tensor_digest(digest, name, state[name])
        return digest.hexdigest()

    # ------------------------------------------------------------------ computation
    def _checked_mode(self) -> str:
        return check_choice(getattr(self.task, "model_mode", "eval"), f"{type(self.task).__name__}.model_mode",
                            MODEL_MODES)

    @property
    def model_mode(self) -> str:
        """The task's :attr:`~srcproj.Task.model_mode`, checked: "eval" or "train"."""
        return self._checked_mode()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Run the model in the mode it is attributed in (:attr:`Task.model_mode`) meanwhile.

        "eval" (the default): dropout off, BatchNorm on its running statistics. "train":
        see :meth:`running`. Every module's own mode is restored afterwards.
        """
        with self.running(self.model_mode):
            yield

    @contextlib.contextmanager
    def running(self, mode: str) -> Iterator[None]:
        """Run the model in ``mode`` ("eval" or "train") meanwhile, whatever the task says.

        In "train" mode BatchNorm layers normalize with the statistics of the batch they
        are given and never read or update their running statistics (their
        ``track_running_stats`` is off meanwhile): a checkpoint's buffers are never
        modified, and ``torch.func`` can differentiate them. Every module's own
        ``training`` flag (and BatchNorm's ``track_running_stats``) is restored afterwards.
        """
        mode = check_choice(mode, "mode", MODEL_MODES)
        modules = list(self.model.modules())
        flags = [module.training for module in modules]
        untracked = []
        self.model.train(mode == "train")
        if mode == "train":
            for module in modules:
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                    module.track_running_stats = False
                    untracked.append(module)
        try:
            yield
        finally:
            for module in untracked:
                module.track_running_stats = True
            for module, flag in zip(modules, flags, strict=True):
                module.training = flag

    @property
    def _randomness(self) -> str:
        """vmap's randomness: each example draws its own dropout mask in training mode;
        in eval mode a random operation is an error, as torch.func makes it by default."""
        return "different" if self.model.training else "error"

    def inputs(self, x: Tensor) -> tuple[tuple, dict]:
        """The model's ``(args, kwargs)`` for a batch ``x`` (:meth:`Task.model_inputs`)."""
        made = self.task.model_inputs(x)
        if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], (tuple, list))
                and isinstance(made[1], Mapping)):
            raise ConfigurationError(f"{type(self.task).__name__}.model_inputs returned a {type(made).__name__}; it "
                                     "must return (args, kwargs): a tuple of positional arguments and a dict")
        return made

    def outputs(self, output: Any) -> Tensor:
        """The tensor of shape ``(B, C)`` the task reads from what the model returned
        (:meth:`Task.model_outputs`)."""
        return _checked_outputs(self.task.model_outputs(output), self.task.model_outputs)

    def split(self, state: Mapping[str, Tensor], device: torch.device) -> tuple[dict, dict]:
        """``(attributed parameters, everything else)`` moved to ``device``; the other
        names of tied parameters are left out (the model reads them through the one name)."""
        trainable = {n: state[n].detach().to(device) for n in self.param_names}
        fixed = {n: v.to(device) for n, v in state.items()
                 if n not in trainable and n not in self.tied and isinstance(v, Tensor)}
        return trainable, fixed

    def _prepare(self, x: Tensor, y: Tensor, trainable: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        x = x.to(device)
        dtype = next(iter(trainable.values())).dtype
        if x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        return x, y.to(device)

    def prepare(self, trainable: dict, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, y)`` on the parameters' device, floating inputs in their dtype."""
        return self._prepare(x, y, trainable, next(iter(trainable.values())).device)

    def objective(self, kind: str):
        """The task's per-example function for ``kind``: "loss" or "measurement"."""
        if kind == "loss":
            return self.task.loss
        if kind == "measurement":
            return self.task.measurement
        if kind == "sampled_loss":
            return self.task.sampled_loss
        raise ConfigurationError(f"kind={kind!r}; choose one of {KINDS}")

    def forward(self, trainable: dict, fixed: dict, x: Tensor) -> Tensor:
        """The model's outputs on ``x`` with a checkpoint's tensors: the tensor the task
        reads (:meth:`outputs`), whatever the model returns."""
        try:
            output = _call(self.model, {**trainable, **fixed}, x, self.inputs)
        except RuntimeError as exc:
            raise DataError(
                f"the model failed on inputs of shape {tuple(x.shape)} (batch first): {exc}"
            ) from exc
        return self.outputs(output)

    def _flatten(self, grads: Mapping[str, Tensor], lead: int, names: Sequence[str] | None = None) -> Tensor:
        names = self.param_names if names is None else names
        return torch.cat([grads[n].reshape(*grads[n].shape[:lead], -1) for n in names], dim=lead)

    def _subset(self, trainable: dict, fixed: dict, names: Sequence[str] | None) -> tuple[dict, dict]:
        """``(differentiated, held fixed)`` when only ``names`` are differentiated."""
        if names is None:
            return trainable, fixed
        unknown = [n for n in names if n not in trainable]
        if unknown:
            raise ConfigurationError(f"parameters {unknown[:5]} are not attributed")
        chosen = set(names)
        return ({n: trainable[n] for n in names},
                {**fixed, **{n: v for n, v in trainable.items() if n not in chosen}})

    def _per_example(self, fn, trainable: dict, fixed: dict, x: Tensor, y: Tensor,
                     names: Sequence[str] | None = None, pieces: bool = False) -> Tensor | list[Tensor]:
        model, outputs, inputs = self.model, self.outputs, self.inputs
        trainable, fixed = self._subset(trainable, fixed, names)

        def single(params: dict, xi: Tensor, yi: Tensor) -> Tensor:
            out = outputs(_call(model, {**params, **fixed}, xi.unsqueeze(0), inputs))
            return fn(out, yi.unsqueeze(0)).sum()

        try:
            with _vmappable_attention():
                grads = vmap(grad(single), in_dims=(None, 0, 0), randomness=self._randomness)(trainable, x, y)
        except RuntimeError as exc:
            raise DataError(
                f"per-example gradients failed on inputs of shape {tuple(x.shape)} "
                f"and targets of shape {tuple(y.shape)}: {exc}"
            ) from exc
        if pieces:
            return [grads[n].reshape(x.shape[0], -1) for n in (self.param_names if names is None else names)]
        return self._flatten(grads, 1, names)

    def per_example_grads(self, trainable: dict, fixed: dict, x: Tensor, y: Tensor, kind: str = "loss",
                          names: Sequence[str] | None = None, pieces: bool = False) -> Tensor | list[Tensor]:
        """Per-example gradients of the loss or measurement, ``(B, p)``; ``names``: only those parameters.

        ``pieces=True``: one ``(B, p_i)`` tensor per parameter instead of their
        concatenation (the columns of the rows, in order, without the copy).
        """
        fn = self.objective(kind)
        x, y = self.prepare(trainable, x, y)
        return self._per_example(fn, trainable, fixed, x, y, names, pieces)

    def layer_deltas(self, trainable: dict, fixed: dict, x: Tensor, y: Tensor, kind: str,
                     layers: Sequence[FactoredLayer], input_fn: Callable[[int, nn.Module, Tensor], object],
                     ) -> tuple[LayerCapture, list[list[Tensor]]]:
        """One batched forward with hooks on ``layers`` and one backward pass of the sum of
        the per-example ``kind`` objectives: ``(capture, δ per layer and call)``.

        ``x`` and ``y`` as returned by :meth:`prepare`; the model in eval mode, so that the
        examples of the batch are independent and row ``b`` of each ``δ`` belongs to
        example ``b`` alone (the per-example objective is summed, never averaged).
        """
        fn = self.objective(kind)
        batch = x.shape[0]
        capture = LayerCapture(self.model, layers, input_fn, self.outputs, self.inputs)
        outputs = capture.forward({**trainable, **fixed}, x)
        try:
            with torch.enable_grad():
                values = fn(outputs, y)
        except RuntimeError as exc:
            raise DataError(f"the task's {kind} failed on outputs of shape {tuple(outputs.shape)} "
                            f"and targets of shape {tuple(y.shape)}: {exc}") from exc
        if values.shape != (batch,):
            raise DataError(f"the task's {kind} returned shape {tuple(values.shape)} for {batch} examples; "
                            f"it must return one value per example, ({batch},)")
        with torch.enable_grad():
            objective = values.sum()
        return capture, capture.backward(objective)

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

    def output_jacobians(self, trainable: dict, fixed: dict, x: Tensor,
                         names: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """Per-example Jacobians of the outputs ``(B, C, p)`` and the outputs ``(B, C)``.

        ``names``: differentiate only those parameters (the Jacobian has their columns).
        """
        device = next(iter(trainable.values())).device
        x, _ = self._prepare(x, torch.zeros(0), trainable, device)
        model, outputs, inputs = self.model, self.outputs, self.inputs
        outer_trainable, outer_fixed = trainable, fixed
        trainable, fixed = self._subset(trainable, fixed, names)

        def single(params: dict, xi: Tensor) -> Tensor:
            return outputs(_call(model, {**params, **fixed}, xi.unsqueeze(0), inputs)).reshape(-1)

        with _vmappable_attention():
            jac = vmap(jacrev(single), in_dims=(None, 0), randomness=self._randomness)(trainable, x)
        with torch.no_grad():
            outputs = self.forward(outer_trainable, outer_fixed, x)
        return self._flatten(jac, 2, names), outputs.reshape(outputs.shape[0], -1)


# ---------------------------------------------------------------------------- gradient backends
@dataclass(frozen=True)
class _Footprint:
    """What one example costs in a forward pass (:meth:`GradientBackend._footprint`)."""

    outputs: int  # C, the model outputs the task reads
    activations: int  # entries of the input and of the leaf modules' outputs
    positions: dict[str, int]  # for each Linear module: input vectors it received (positions × calls)


def _in_slices(rows: int, step: int) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` of consecutive slices of ``step`` rows covering ``rows``."""
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def _cat_outputs(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The ``(projected, outputs)`` pairs of consecutive sub-batches, as one."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p for p, _ in parts]), torch.cat([o for _, o in parts])


class GradientBackend(ABC):
    """How the per-example gradients of one model and task reach a projector.

    :class:`ProjectedGradients` picks a backend from what its projector declares
    (``factored``, ``accepts_pieces``) and asks it for :meth:`features` and
    :meth:`output_features`; a projector only maps, it never computes a gradient.

    ``fallback``: the backend to keep to from now on when this one raises
    :class:`DataError` on a batch and the fallback does not (``None``: the error stands).

    ``memory_bytes``: the working memory :meth:`output_features` aims to stay under,
    whatever the number of rows it is given: it splits them into sub-batches sized
    from one example's footprint (:meth:`_footprint`, an estimate). The result
    ``(B, C, k)`` itself and, for :class:`DenseHookBackend`, the layer inputs and
    output gradients it keeps for a whole call come on top.

    Every gradient row a backend forms reaches the projector through :meth:`_project`.
    The interface leaves room for backends and steps not written yet:

    * contracting once: :class:`DenseHookBackend` contracts the projection with a
      Linear layer's input once per example and applies the result to the C outputs'
      backpropagated vectors (docs/math.md §10) in :meth:`output_features`; the loss's
      vector could join them, as :meth:`features` and :meth:`output_features` are
      methods of one object that could share those captures;
    * preconditioning: an elementwise preconditioner of the gradient rows belongs in
      :meth:`_project`, applied piece by piece before the projector sees them (each
      piece's columns are known from :attr:`GradientPieces.sizes`);
    * sparse rows: a piece of :class:`GradientPieces` may become a sparse tensor (the
      embedding rows a batch touches), for a projector that declares it takes them.

    Parameters
    ----------
    computer : GradientComputer
        The model, the task and the attributed parameters.
    projector : Projector
        The map to k dimensions.
    """

    fallback: GradientBackend | None = None
    memory_bytes: int = 256 << 20

    def __init__(self, computer: GradientComputer, projector: Projector) -> None:
        self.computer = computer
        self.projector = projector
        self._footprints: dict[tuple, _Footprint] = {}
        #: ``M^{1/2}`` of the optimizer's preconditioner, one entry per attributed
        #: parameter entry (``param_names`` order), or ``None``: the rows are scaled by it
        #: before they are projected (docs/math.md §6), exactly, on every path.
        self.scale: Tensor | None = None
        self._scale_copy: tuple | None = None

    def _scale_of(self, lo: int, hi: int, like: Tensor) -> Tensor:
        scale = self.scale
        assert scale is not None
        if scale.dtype != like.dtype or scale.device != like.device:
            # Converted once per scale, dtype and device, not per piece and batch (the
            # source is kept with its copy, so a new scale is never mistaken for it).
            source, dtype, device, copy = self._scale_copy or (None, None, None, None)
            if source is not scale or dtype != like.dtype or device != like.device:
                copy = scale.to(like.device, like.dtype)
                self._scale_copy = (scale, like.dtype, like.device, copy)
            scale = copy
        return scale[lo:hi]

    def _footprint(self, trainable: dict, fixed: dict, x: Tensor) -> _Footprint:
        """One example's outputs and activations, from one forward pass of ``x[0]``
        (``x`` prepared, at least one row) with hooks on the leaf modules, in eval mode
        (a batch of one is fine there); kept per input shape, dtype and device."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        found = self._footprints.get(key)
        if found is not None:
            return found
        computer = self.computer
        one = x[:1]
        entries = [int(one.numel())]
        positions: dict[str, int] = {}

        def hook(name: str) -> Callable:
            def record(module: nn.Module, args: tuple, output: Any) -> None:
                tensors = output if isinstance(output, (tuple, list)) else (output,)
                entries[0] += sum(int(t.numel()) for t in tensors if isinstance(t, Tensor))
                if isinstance(module, nn.Linear) and args and isinstance(args[0], Tensor):
                    calls = int(args[0].numel()) // max(1, module.in_features)
                    positions[name] = positions.get(name, 0) + calls

            return record

        handles = [module.register_forward_hook(hook(name)) for name, module in computer.model.named_modules()
                   if isinstance(module, nn.Linear) or next(module.children(), None) is None]
        try:
            with torch.no_grad(), computer.running("eval"):
                outputs = computer.forward(trainable, fixed, one)
        finally:
            for handle in handles:
                handle.remove()
        found = _Footprint(int(outputs.reshape(1, -1).shape[1]), entries[0], positions)
        self._footprints[key] = found
        return found

    def _rows_per_pass(self, row_bytes: int) -> int:
        """Rows whose working memory (``row_bytes`` each) fits :attr:`memory_bytes`; at least one."""
        return max(1, int(self.memory_bytes) // max(1, int(row_bytes)))

    @abstractmethod
    def features(self, trainable: dict, fixed: dict, x: Tensor, y: Tensor, kind: str = "loss") -> Tensor:
        """Projected per-example gradients of ``kind`` ("loss" or "measurement"), ``(B, k)``."""

    @abstractmethod
    def output_features(self, trainable: dict, fixed: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        """Projected per-example Jacobians of the C outputs ``(B, C, k)`` and the outputs ``(B, C)``."""

    def _project(self, pieces: GradientPieces) -> Tensor:
        """Gradient rows to features: the pieces as they are for a projector that
        accepts pieces (formed one at a time), else the concatenated rows; each
        piece's columns scaled by :attr:`scale` first, when there is one."""
        if self.scale is not None:
            pieces = self._scaled(pieces)
        if self.projector.accepts_pieces:
            return self.projector.project_pieces(pieces)
        return self.projector.project(pieces.cat())


    def _scaled(self, pieces: GradientPieces) -> GradientPieces:
        if pieces.num_params != int(self.scale.numel()):
            raise ConfigurationError(f"the preconditioner has {int(self.scale.numel())} entries, the gradient rows "
                                     f"{pieces.num_params}")
        offsets = np.cumsum([0, *pieces.sizes])

        def make(i: int) -> Tensor:
            piece = pieces[i]
            return piece * self._scale_of(int(offsets[i]), int(offsets[i + 1]), piece)

        return GradientPieces(pieces.sizes, make, pieces.batch, pieces.dtype, pieces.device)


class VmapBackend(GradientBackend):
    """Per-example gradients and Jacobians of every attributed parameter from ``torch.func.vmap``.

    Works for any projector of gradient rows, in any mode. A projector that accepts
    pieces gets one piece per parameter (never concatenated), any other the flat rows.
    """

    def features(self, trainable: dict, fixed: dict, x: Tensor, y: Tensor, kind: str = "loss") -> Tensor:
        computer = self.computer
        if self.projector.accepts_pieces:
            pieces = computer.per_example_grads(trainable, fixed, x, y, kind, pieces=True)
        else:
            pieces = [computer.per_example_grads(trainable, fixed, x, y, kind)]
        return self._project(GradientPieces.of(pieces))

    def output_features(self, trainable: dict, fixed: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        """The C Jacobian rows of each example ``(B, C, p)`` from ``vmap(jacrev)``, projected,
        a sub-batch at a time (the rows take ``C · p`` entries per example, twice over)."""
        computer = self.computer
        x, _ = computer.prepare(trainable, x, torch.zeros(0))
        if x.shape[0] == 0:
            return self._output_features(trainable, fixed, x)
        footprint = self._footprint(trainable, fixed, x)
        size = next(iter(trainable.values())).element_size()
        step = self._rows_per_pass(size * footprint.outputs * (2 * computer.num_params + 2 * footprint.activations))
        return _cat_outputs([self._output_features(trainable, fixed, x[lo:hi])
                             for lo, hi in _in_slices(x.shape[0], step)])

    def _output_features(self, trainable: dict, fixed: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        jacobians, outputs = self.computer.output_jacobians(trainable, fixed, x)
        batch, num_outputs, num_params = jacobians.shape
        projected = self._project(GradientPieces.of([jacobians.reshape(batch * num_outputs, num_params)]))
        return projected.reshape(batch, num_outputs, -1), outputs


def _gives_rows(projector: Projector) -> bool:
    """Whether ``projector`` is :class:`~srcproj.RademacherProjector`'s map, whose rows
    (``row_blocks``, ``rows_of``) :meth:`DenseHookBackend.output_features` may contract
    directly: a subclass with its own ``project_pieces`` or rows keeps to its own."""
    from .projection import RademacherProjector  # srcproj.projection imports this module

    kind = type(projector)
    return (isinstance(projector, RademacherProjector)
            and kind.project_pieces is RademacherProjector.project_pieces
            and kind.row_blocks is RademacherProjector.row_blocks and kind.rows_of is RademacherProjector.rows_of)


class _FusedPlan:
    """The attributed parameters' offsets in the projected rows (``param_names`` order)."""

    def __init__(self, names: Sequence[str], trainable: Mapping[str, Tensor], dtype: torch.dtype) -> None:
        self.sizes = {n: int(trainable[n].numel()) for n in names}
        self.offsets: dict[str, int] = {}
        offset = 0
        for n in names:
            self.offsets[n] = offset
            offset += self.sizes[n]
        self.num_params = offset
        self.dtype = dtype
        self.element_size = torch.empty(0, dtype=dtype).element_size()


def _layer_output_jacobians(layer: FactoredLayer, module: nn.Module, inputs: Sequence[Tensor],
                            deltas: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor | None]:
    """Per-example weight and bias Jacobians of C outputs, ``(B, C, d_out · d_in)`` and
    ``(B, C, d_out)`` (``None`` without an attributed bias): ``Σ_t δ_{c,t} a_tᵀ`` summed
    over the module's calls, all C in one batched product per call.

    ``inputs``: the layer's inputs, one per call; ``deltas[c]``: output ``c``'s gradients
    ``(B, T, d_out)`` of each call (:meth:`LayerCapture.backward`).
    """
    weight = bias = None
    for call, x in enumerate(inputs):
        a = layer_inputs(layer, module, x)  # (B, T, d_in)
        delta = torch.stack([d[call] for d in deltas], dim=1)  # (B, C, T, d_out)
        batch, num_outputs, positions, d_out = delta.shape
        term = torch.bmm(delta.transpose(2, 3).reshape(batch, num_outputs * d_out, positions), a)
        weight = term if weight is None else weight.add_(term)
        if layer.bias is not None:
            summed = delta.sum(dim=2)
            bias = summed if bias is None else bias.add_(summed)
    weight = weight.view(weight.shape[0], len(deltas), layer.d_out, layer.d_in)
    return layer.as_weight(weight), bias


class DenseHookBackend(GradientBackend):
    """Per-example gradients of Linear, Conv1D and Conv2d layers from one batched forward
    and backward pass with hooks (``Σ_t δ_t a_tᵀ``), for a projector that accepts pieces.

    The other attributed parameters (LayerNorm, embeddings, layers that failed the
    check of :func:`checked_factored_layers`) still go through vmap. A layer's weight
    gradients are formed only when the projector asks for that piece, one layer at a
    time, in one buffer kept for later batches (batch size × the largest layer's
    parameters): the same gradients as :class:`VmapBackend`'s, so the same features.

    The Jacobians of :meth:`output_features` cost about one projection per example on
    the Linear layers that receive one input vector per example (docs/math.md §10):
    the layer's block of P, seen as k×o×i, is contracted with the input ``a`` once,
    and each output's backpropagated vector ``δ_c`` then costs ``k·o``. The other
    parameters' Jacobian rows are formed and projected with the matching rows of P.

    In training mode (the examples of a batch are then not independent), and for the
    Jacobians with a projector that does not give the rows of its matrix
    (:meth:`~srcproj.RademacherProjector.row_blocks`, with its own ``project_pieces``),
    the vmap backend does the work. A task whose objective is not one value per
    example of a batch (it sums or averages) cannot use one batched backward pass: its
    :class:`DataError` makes :class:`ProjectedGradients` keep to the vmap backend
    (``fallback``) from then on, if that succeeds.

    Parameters
    ----------
    computer, projector
        As for :class:`GradientBackend`.
    layers : sequence of FactoredLayer
        The layers whose gradients come from the hooks.
    others : sequence of str
        The other attributed parameters (vmapped).
    """

    def __init__(self, computer: GradientComputer, projector: Projector, layers: Sequence[FactoredLayer],
                 others: Sequence[str]) -> None:
        super().__init__(computer, projector)
        self.layers, self.others = list(layers), list(others)
        self.fallback = VmapBackend(computer, projector)
        self._buffers: dict[tuple, Tensor] = {}  # reused buffer of the largest layer's weight gradients

    @classmethod
    def bound(cls, computer: GradientComputer, projector: Projector, params: Mapping[str, Tensor] | None,
              example: Tensor | None) -> GradientBackend:
        """This backend for the layers that pass the check on ``example`` (with the full
        state ``params``, model in eval mode); the vmap backend without ``example``, when
        the check cannot run on it, or when no layer can be hooked."""
        if example is None:
            return VmapBackend(computer, projector)
        try:
            layers, others, _ = checked_factored_layers(computer.model, computer.param_names, params, example,
                                                        computer.outputs, computer.inputs)
        except (DataError, RuntimeError, ValueError, TypeError, KeyError):
            return VmapBackend(computer, projector)  # the hooks are only a speed-up
        if not layers:
            return VmapBackend(computer, projector)
        return cls(computer, projector, layers, others)

    def features(self, trainable: dict, fixed: dict, x: Tensor, y: Tensor, kind: str = "loss") -> Tensor:
        computer = self.computer
        if computer.model.training:
            return self.fallback.features(trainable, fixed, x, y, kind)
        layers, names = self.layers, computer.param_names
        x, y = computer.prepare(trainable, x, y)
        batch = x.shape[0]
        # The inputs are copied as the modules receive them (unfolded only when used).
        capture, deltas = computer.layer_deltas(trainable, fixed, x, y, kind, layers,
                                                lambda index, module, a: a.clone())
        reference = next(iter(trainable.values()))
        sources: dict[str, tuple[int, str]] = {}
        for index, layer in enumerate(layers):
            sources[layer.weight] = (index, "weight")
            if layer.bias is not None:
                sources[layer.bias] = (index, "bias")
        dense = {}
        if self.others:
            grads = computer.per_example_grads(trainable, fixed, x, y, kind, names=self.others, pieces=True)
            dense = dict(zip(self.others, grads, strict=True))
        sizes = [int(trainable[n].numel()) for n in names]
        # One buffer, reused for every layer and batch: only one layer's gradients exist at a time.
        largest = batch * max(layer.d_out * layer.d_in for layer in layers)
        key = (reference.dtype, reference.device)
        scratch = self._buffers.get(key)
        if scratch is None or scratch.numel() < largest:
            self._buffers.pop(key, None)
            scratch = torch.empty(largest, dtype=reference.dtype, device=reference.device)
            self._buffers[key] = scratch

        def piece(i: int) -> Tensor:
            name = names[i]
            if name in dense:
                return dense.pop(name)  # the projection holds it while it needs it
            index, what = sources[name]
            if not deltas[index]:  # the module was not called: a zero gradient
                return torch.zeros(batch, sizes[i], dtype=reference.dtype, device=reference.device)
            if what == "bias":
                return layer_bias_grads(deltas[index])
            return layer_weight_grads(layers[index], capture.modules[index], capture.inputs[index], deltas[index],
                                      scratch)

        return self._project(GradientPieces(sizes, piece, batch, reference.dtype, reference.device))

    def output_features(self, trainable: dict, fixed: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        """Projected Jacobians ``(B, C, k)`` and outputs ``(B, C)``, the same as
        :class:`VmapBackend`'s (docs/math.md §10).

        The rows go through the model in sub-batches (one forward with hooks, C backward
        passes), sized to :attr:`memory_bytes`. A Linear layer called once with one input
        vector per example keeps its inputs ``a (B, i)`` and output gradients
        ``δ (B, C, o)`` for all the rows of the call; then, a block of its output rows at
        a time, ``P_W ×₃ a`` is formed for every example and applied to the C vectors.
        P's rows are so generated once per call, whatever the number of rows (calls
        with more rows than fit :attr:`memory_bytes` are split in groups). Other hooked
        layers (Conv2d, Linear over positions) give their Jacobian rows from the same
        captures (``Σ_t δ_t a_tᵀ``, all C at once), the other parameters from vmap; they
        are projected with their rows of P sub-batch by sub-batch.
        """
        computer, projector = self.computer, self.projector
        if computer.model.training or not _gives_rows(projector):
            return self.fallback.output_features(trainable, fixed, x)
        x, _ = computer.prepare(trainable, x, torch.zeros(0))
        rows = x.shape[0]
        if rows == 0:
            return self.fallback.output_features(trainable, fixed, x)
        reference = next(iter(trainable.values()))
        dtype = torch.promote_types(reference.dtype, torch.float32)  # projection.accumulation_dtype
        plan = _FusedPlan(computer.param_names, trainable, dtype)
        footprint = self._footprint(trainable, fixed, x)
        num_outputs = footprint.outputs
        fused = {index for index, layer in enumerate(self.layers)
                 if layer.kind == "linear" and footprint.positions.get(layer.module) == 1}
        slow = sum(plan.sizes[n] for index, layer in enumerate(self.layers) if index not in fused
                   for n in (layer.weight, layer.bias) if n is not None) + sum(plan.sizes[n] for n in self.others)
        # A sub-batch holds the graph, C sets of output gradients (each about the
        # activations) and the unfused parameters' Jacobian rows (twice: formed, cast).
        step = self._rows_per_pass(reference.element_size() * ((num_outputs + 3) * footprint.activations
                                                               + 2 * num_outputs * slow))
        # A group keeps the fused layers' a and δ for all its rows, and one output row
        # of P_W ×₃ a per example, within half the budget: P is generated once per group.
        kept = sum(self.layers[i].d_in + num_outputs * self.layers[i].d_out for i in fused)
        group = self._rows_per_pass(2 * plan.element_size * (kept + projector.proj_dim))
        projected = torch.zeros(rows, num_outputs, projector.proj_dim, dtype=dtype, device=reference.device)
        outputs = torch.empty(rows, num_outputs, dtype=reference.dtype, device=reference.device)
        for g_lo, g_hi in _in_slices(rows, group):
            kept_rows: dict[int, tuple[Tensor, Tensor]] = {}
            for lo, hi in _in_slices(g_hi - g_lo, step):
                self._capture_jacobians(trainable, fixed, x[g_lo + lo:g_lo + hi], plan, kept_rows,
                                        (lo, hi, g_hi - g_lo), projected[g_lo + lo:g_lo + hi],
                                        outputs[g_lo + lo:g_lo + hi])
            for index in sorted(kept_rows, key=lambda i: plan.offsets[self.layers[i].weight]):
                a, delta = kept_rows.pop(index)  # the layer's captures go once contracted
                self._contract(self.layers[index], a, delta, plan, projected[g_lo:g_hi])
        return projected, outputs

    def _capture_jacobians(self, trainable: dict, fixed: dict, x: Tensor, plan: _FusedPlan,
                           kept_rows: dict[int, tuple[Tensor, Tensor]], where: tuple[int, int, int],
                           projected: Tensor, outputs: Tensor) -> None:
        """One sub-batch: a forward with hooks and C backward passes. Fills ``outputs``;
        stores the inputs and output gradients of the fused layers in ``kept_rows``
        (rows ``where[0] .. where[1] - 1`` of ``where[2]``); adds the projected Jacobian
        rows of the other parameters to ``projected`` ``(b, C, k)``."""
        computer = self.computer
        batch, num_outputs = x.shape[0], outputs.shape[1]
        capture = LayerCapture(computer.model, self.layers, lambda index, module, a: a.clone(), computer.outputs,
                               computer.inputs)
        with torch.enable_grad():  # the caller may be under no_grad: keep the graph
            result = capture.forward({**trainable, **fixed}, x).reshape(batch, -1)
        if result.shape[1] != num_outputs:
            raise DataError(f"the model gave {result.shape[1]} outputs per example for a batch of {batch} and "
                            f"{num_outputs} for one example; the Jacobians need the same outputs whatever the batch")
        outputs.copy_(result.detach())
        per_output = []  # δ of every layer and call, for each output
        for c in range(num_outputs):
            with torch.enable_grad():
                objective = result[:, c].sum()
            per_output.append(capture.backward(objective, retain_graph=c < num_outputs - 1))
        del result  # the last backward pass freed the graph
        flat = projected.view(batch * num_outputs, -1)
        lo, hi, group = where
        for index, layer in enumerate(self.layers):
            inputs, module = capture.inputs[index], capture.modules[index]
            deltas = [per_output[c][index] for c in range(num_outputs)]
            if not inputs:  # the module was not called: zero Jacobians
                continue
            a = layer_inputs(layer, module, inputs[0]) if layer.kind == "linear" and len(inputs) == 1 else None
            if a is not None and a.shape[1] == 1:  # one outer product per output: kept for §10
                if index not in kept_rows:
                    kept_rows[index] = (
                        torch.zeros(group, layer.d_in, dtype=plan.dtype, device=x.device),
                        torch.zeros(group, num_outputs, layer.d_out, dtype=plan.dtype, device=x.device))
                a_rows, delta_rows = kept_rows[index]
                a_rows[lo:hi] = a[:, 0]
                delta_rows[lo:hi] = torch.stack([d[0][:, 0] for d in deltas], dim=1)
                continue
            weight, bias = _layer_output_jacobians(layer, module, inputs, deltas)
            self._project_columns(weight.view(batch * num_outputs, -1), plan.offsets[layer.weight], plan, flat)
            del weight
            if bias is not None:
                self._project_columns(bias.view(batch * num_outputs, -1), plan.offsets[layer.bias], plan, flat)
        del per_output
        if self.others:
            jacobians, _ = computer.output_jacobians(trainable, fixed, x, names=self.others)
            jacobians = jacobians.reshape(batch * num_outputs, -1)
            column = 0
            for name in self.others:
                size = plan.sizes[name]
                self._project_columns(jacobians[:, column:column + size], plan.offsets[name], plan, flat)
                column += size

    def _project_columns(self, values: Tensor, lo: int, plan: _FusedPlan, out: Tensor) -> None:
        """``out (R, k) += values (R, width) @ Pᵀ[lo : lo + width]``, one block of P at a time."""
        for a, b, rows in self.projector.row_blocks(lo, lo + values.shape[1], plan.dtype, out.device,
                                                    plan.num_params):
            columns = values[:, a - lo:b - lo]
            if columns.dtype != plan.dtype:
                columns = columns.to(plan.dtype)
            if self.scale is not None:
                columns = columns * self._scale_of(a, b, columns)
            out.addmm_(columns, rows)

    def _contract(self, layer: FactoredLayer, a: Tensor, delta: Tensor, plan: _FusedPlan, out: Tensor) -> None:
        """``out (B, C, k) += Σ_r δ[:, :, r] (P_W ×₃ a)[:, r]`` and the bias's ``P_b δ``.

        The weight's rows of Pᵀ, ``(o · i, k)`` seen as ``(o, i, k)`` (row-major ``W``),
        are taken a block of output rows at a time; ``(P_W ×₃ a)`` of those rows,
        ``(rows, B, k)``, is one matrix product per output row.
        """
        k, d_out, d_in = out.shape[2], layer.d_out, layer.d_in
        batch, num_outputs = a.shape[0], delta.shape[1]
        device, size = out.device, plan.element_size
        # P's rows and the contracted rows of a block within half the budget.
        block = max(1, min(d_out, (self.memory_bytes // 2) // (size * k * (batch + d_in))))
        contracted = torch.empty(block, batch, k, dtype=plan.dtype, device=device)
        buffer = torch.empty(block * d_in * k, dtype=plan.dtype, device=device)
        start = plan.offsets[layer.weight]
        for r_lo in range(0, d_out, block):
            r_hi = min(d_out, r_lo + block)
            rows = self.projector.rows_of(start + r_lo * d_in, start + r_hi * d_in, plan.dtype, device,
                                          plan.num_params, out=buffer).view(r_hi - r_lo, d_in, k)
            if self.scale is not None:  # (P_W diag(s)) ×₃ a: the preconditioner scales P's rows, still exact
                # (a view of P's cached block may come back: never scaled in place)
                rows = rows * self._scale_of(start + r_lo * d_in, start + r_hi * d_in, rows).view(r_hi - r_lo, d_in, 1)
            part = contracted[: r_hi - r_lo]
            for r in range(r_hi - r_lo):
                torch.mm(a, rows[r], out=part[r])
            out.baddbmm_(delta[:, :, r_lo:r_hi], part.transpose(0, 1))
        if layer.bias is not None:
            bias = self.projector.rows_of(plan.offsets[layer.bias], plan.offsets[layer.bias] + d_out, plan.dtype,
                                          device, plan.num_params, out=buffer)
            if self.scale is not None:
                bias = bias * self._scale_of(plan.offsets[layer.bias], plan.offsets[layer.bias] + d_out,
                                             bias).unsqueeze(1)
            out.view(batch * num_outputs, k).addmm_(delta.view(batch * num_outputs, d_out), bias)


class FactoredBackend(GradientBackend):
    """Layer factors for a factored projector: every layer's inputs and output gradients
    from one batched forward and backward pass with hooks (:class:`LayerCapture`).

    The projector lays itself out over the layers found here (:meth:`bind`), projects
    each input as the forward pass meets it (``project_inputs``) and turns the projected
    inputs and output gradients into a layer's features (``layer_features``); the
    p-sized gradient never exists. Its other parameters (``dense_params``) go through
    vmap and ``project_dense``; their features come after the layers'. Jacobians
    (:meth:`output_features`): one backward pass per output through the same captures.

    In training mode (``Task.model_mode = "train"``) the examples of a batch are not
    independent (BatchNorm takes the batch's statistics), so one batched pass cannot
    give per-example gradients: the per-example gradient rows then come from vmap and
    go to the projector's ``project()``, the same map (they need ``B × p`` memory).
    """

    def __init__(self, computer: GradientComputer, projector: Projector) -> None:
        super().__init__(computer, projector)
        self._rows = VmapBackend(computer, projector)  # training mode: gradient rows, project()

    def bind(self, params: Mapping[str, Tensor] | None, example: Tensor | None) -> None:
        """Lay the projector out over the layers that pass the check on ``example``."""
        computer = self.computer
        self.projector.lay_out(factored_split(computer.model, computer.param_names, params, example,
                                              computer.outputs, computer.inputs))

    def _refuse_scale(self) -> None:
        if self.scale is not None:
            raise ConfigurationError(
                "the factored projection (KroneckerProjector) cannot apply an elementwise preconditioner (an Adam "
                "run, or SGD groups with different learning rates): it breaks the layers' rank-one gradients. Use "
                "the dense RademacherProjector (the default), which applies it exactly")

    def features(self, trainable: dict, fixed: dict, x: Tensor, y: Tensor, kind: str = "loss") -> Tensor:
        computer, projector = self.computer, self.projector
        self._refuse_scale()
        layers = projector.require_bound(computer.param_names)
        if computer.model.training:
            return self._rows.features(trainable, fixed, x, y, kind)
        x, y = computer.prepare(trainable, x, y)
        reference = next(iter(trainable.values()))
        dtype, device, batch = reference.dtype, reference.device, x.shape[0]
        capture, deltas = computer.layer_deltas(trainable, fixed, x, y, kind, layers, projector.project_inputs)
        parts = [projector.layer_features(i, capture.inputs[i], deltas[i], batch=batch, dtype=dtype, device=device)
                 for i in range(len(layers))]
        if projector.dense_params:
            grads = computer.per_example_grads(trainable, fixed, x, y, kind, names=projector.dense_params)
            parts.append(projector.project_dense(grads))
        return torch.cat(parts, dim=1)

    def output_features(self, trainable: dict, fixed: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        computer, projector = self.computer, self.projector
        self._refuse_scale()
        projector.require_bound(computer.param_names)
        if computer.model.training:
            return self._rows.output_features(trainable, fixed, x)
        x, _ = computer.prepare(trainable, x, torch.zeros(0))
        if x.shape[0] == 0:
            return self._output_features(trainable, fixed, x)
        # Per example: the graph and C sets of output gradients (about the activations
        # each), C feature rows and the other parameters' Jacobian rows.
        footprint = self._footprint(trainable, fixed, x)
        size = next(iter(trainable.values())).element_size()
        dense = sum(int(trainable[n].numel()) for n in projector.dense_params)
        outputs = footprint.outputs
        step = self._rows_per_pass(size * ((outputs + 3) * footprint.activations
                                           + outputs * (projector.proj_dim + 2 * dense)))
        return _cat_outputs([self._output_features(trainable, fixed, x[lo:hi])
                             for lo, hi in _in_slices(x.shape[0], step)])

    def _output_features(self, trainable: dict, fixed: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        computer, projector = self.computer, self.projector
        layers = projector.require_bound(computer.param_names)
        reference = next(iter(trainable.values()))
        dtype, device, batch = reference.dtype, reference.device, x.shape[0]
        capture = LayerCapture(computer.model, layers, projector.project_inputs, computer.outputs, computer.inputs)
        with torch.enable_grad():  # the caller may be under no_grad: keep the graph
            outputs = capture.forward({**trainable, **fixed}, x).reshape(batch, -1)
        num_outputs = outputs.shape[1]
        rows = []
        for c in range(num_outputs):  # one backward per output: the Jacobian's rows
            with torch.enable_grad():
                objective = outputs[:, c].sum()
            deltas = capture.backward(objective, retain_graph=c < num_outputs - 1)
            rows.append(torch.cat([projector.layer_features(i, capture.inputs[i], deltas[i], batch=batch,
                                                            dtype=dtype, device=device)
                                   for i in range(len(layers))], dim=1))
        projected = torch.stack(rows, dim=1)
        if projector.dense_params:
            jacobians, _ = computer.output_jacobians(trainable, fixed, x, names=projector.dense_params)
            dense = projector.project_dense(jacobians.reshape(batch * num_outputs, -1))
            projected = torch.cat([projected, dense.reshape(batch, num_outputs, -1)], dim=2)
        return projected, outputs.detach()


class ProjectedGradients:
    """Projected per-example gradients of one model and task with one projector.

    The one place the rest of srcproj asks for features: the featurize pipeline, the
    curvature estimators' inputs and the query side all call :meth:`features` and
    :meth:`output_features`, whichever way the gradients are obtained. That way is a
    :class:`GradientBackend` (:attr:`backend`), chosen by :meth:`bind` from what the
    projector declares:

    * ``factored`` (:class:`~srcproj.KroneckerProjector`): :class:`FactoredBackend`,
      which lays the projector out over the model's layers;
    * ``accepts_pieces`` (:class:`~srcproj.RademacherProjector`):
      :class:`DenseHookBackend` when some Linear, Conv1D or Conv2d layer passes the check on
      the example inputs, else :class:`VmapBackend`;
    * anything else (:class:`~srcproj.MatrixProjector`, :class:`~srcproj.FastJLProjector`,
      a subclass that defines its own ``project()``): :class:`VmapBackend`.

    Before :meth:`bind`, a factored projector uses the layout it already has (from
    ``projector.bind(model)``) and any other projector the vmap backend.

    Parameters
    ----------
    computer : GradientComputer
        The model, the task and the attributed parameters.
    projector : Projector
        The seeded map to k dimensions.
    """

    def __init__(self, computer: GradientComputer, projector: Projector) -> None:
        self.computer = computer
        self.projector = projector
        self.backend: GradientBackend = (FactoredBackend(computer, projector) if projector.factored
                                         else VmapBackend(computer, projector))
        self._scale: Tensor | None = None

    @property
    def proj_dim(self) -> int:
        return int(self.projector.proj_dim)

    @property
    def scale(self) -> Tensor | None:
        """The preconditioner ``M^{1/2}`` applied to every gradient row (``None``: none)."""
        return self._scale

    @scale.setter
    def scale(self, value: Tensor | None) -> None:
        if value is not None and int(value.numel()) != self.computer.num_params:
            raise ConfigurationError(f"the preconditioner has {int(value.numel())} entries for "
                                     f"{self.computer.num_params} attributed parameters")
        self._scale = value
        backend = self.backend
        while backend is not None:
            backend.scale = value
            backend = backend.fallback
        rows = getattr(self.backend, "_rows", None)
        if rows is not None:
            rows.scale = value

    def bind(self, params: Mapping[str, Tensor], example: Tensor) -> None:
        """Choose the backend and lay out the model's layers for the projector, checked on
        ``example`` (a few inputs on the computation device) with the full state ``params``
        (the model is put in eval mode meanwhile, whatever ``Task.model_mode`` says: the
        check is of the layers' structure, and eval mode makes it deterministic).

        Raises :class:`ConfigurationError` for a factored projector that cannot be laid
        out over the model (see :meth:`~srcproj.KroneckerProjector.lay_out`).
        """
        computer, projector = self.computer, self.projector
        with computer.running("eval"):
            if projector.factored:
                backend = FactoredBackend(computer, projector)
                backend.bind(params, example)
            elif projector.accepts_pieces:
                backend = DenseHookBackend.bound(computer, projector, params, example)
            else:
                backend = VmapBackend(computer, projector)
        self.backend = backend
        self.scale = self._scale

    def features(self, trainable: dict, fixed: dict, x: Tensor, y: Tensor, kind: str = "loss") -> Tensor:
        """Projected per-example gradients of ``kind`` ("loss" or "measurement"), ``(B, k)``."""
        backend = self.backend
        try:
            return backend.features(trainable, fixed, x, y, kind)
        except DataError:
            if backend.fallback is None:
                raise
        # The backend cannot take this batch (the hooks need one objective value per
        # example; vmap calls the task one example at a time). If the fallback can, keep
        # to it instead of failing every batch; if not, its own error stands and the
        # backend stays for the next call.
        features = backend.fallback.features(trainable, fixed, x, y, kind)
        self.backend = backend.fallback
        self.scale = self._scale
        return features

    def output_features(self, trainable: dict, fixed: dict, x: Tensor) -> tuple[Tensor, Tensor]:
        """Projected per-example Jacobians of the C outputs ``(B, C, k)`` and the outputs ``(B, C)``.

        Callers may pass any number of rows (a whole store chunk): every backend splits
        them into sub-batches that keep its working memory near its ``memory_bytes``
        (:class:`GradientBackend`), and :class:`DenseHookBackend` generates the
        projection's blocks once per call, so more rows per call cost less per row.
        """
        return self.backend.output_features(trainable, fixed, x)
