"""Tasks for token sequences: causal language models and sequence classifiers.

:class:`LanguageModelTask` attributes a causal language model (a ``transformers``
``*ForCausalLM``, or any module mapping token ids ``(B, T)`` to logits ``(B, T, V)``)
trained on next-token prediction. Its examples are token sequences: mappings with
``input_ids`` and, optionally, ``attention_mask`` and ``labels`` (what a Hugging Face
data set or tokenizer yields), ``(input_ids, labels)`` pairs, bare id sequences, or a
tuple of two ``(N, T)`` arrays. Sequences of different lengths are padded on the right
(:meth:`LanguageModelTask.collate`), with labels −100 where padded: a causal model's
outputs at the real tokens never depend on tokens to their right, so padding on the
right changes no loss, gradient or measurement, and the model is called on the ids
alone (an attention mask's masked positions are dropped first; only a mask that keeps
one contiguous run of tokens is accepted).

The per-example loss is what the training loop minimised for that sequence
(docs/math.md §9): a weighted sum ``Σ_t w_t ℓ_t`` of its target tokens' cross-entropies
(labels shifted by one, as Hugging Face's causal models do; −100 is ignored). By default
``w_t = 1/T̄``, Hugging Face's loss (the mean over every target token of a batch), with
``T̄`` the mean number of target tokens per training sequence. The query measurement
is the log-probability of the query's target tokens: a query can be a prompt whose
labels are −100 followed by a completion, and only the completion is attributed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigurationError, DataError
from .tasks import ClassificationTask, Task
from .validation import check_choice

__all__ = ["LanguageModelTask", "SequenceClassificationTask", "TOKEN_WEIGHTINGS"]

#: How a sequence's token losses are weighted in the training loss (docs/math.md §9).
TOKEN_WEIGHTINGS = ("batch_mean", "sequence_mean", "sum")


def _ids(value: Any, what: str) -> Tensor:
    """A 1-D integer tensor of token ids (or labels, or a mask)."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    elif not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{what} cannot be made a tensor of token ids ({exc})") from None
    if value.ndim == 2 and value.shape[0] == 1:  # a tokenizer's return_tensors="pt" output for one text
        value = value[0]
    if value.ndim != 1 or value.dtype.is_floating_point or value.dtype.is_complex:
        raise DataError(f"{what} must be a 1-D sequence of integers, got shape {tuple(value.shape)} and dtype "
                        f"{value.dtype}")
    return value.long()


def _sequence(example: Any, index: int, what: str, label_key: str, default_labels: bool) -> tuple[Tensor, Any]:
    """``(input_ids, labels)`` of one example, with its attention mask applied."""
    where = f"{what}: example {index}"
    if isinstance(example, Mapping):
        if "input_ids" not in example:
            raise DataError(f"{where} is a mapping with keys {list(example)} and no 'input_ids'; language-model "
                            "examples hold input_ids (and optionally attention_mask and labels)")
        ids = _ids(example["input_ids"], f"{where}, input_ids")
        labels = example.get(label_key)
        mask = example.get("attention_mask")
    elif isinstance(example, (tuple, list)) and len(example) == 2 and not isinstance(example[0], (int, np.integer)):
        ids, labels, mask = _ids(example[0], f"{where}, input_ids"), example[1], None
    else:
        ids, labels, mask = _ids(example, f"{where}, input_ids"), None, None
    if labels is None:
        if not default_labels:
            raise DataError(f"{where} has no {label_key!r}; the task needs one target per example")
        labels = ids.clone()  # next-token prediction of the sequence itself (shifted in the loss)
    if mask is not None:
        mask = _ids(mask, f"{where}, attention_mask")
        if mask.shape != ids.shape:
            raise DataError(f"{where}: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
        kept = torch.nonzero(mask != 0).flatten()
        if kept.numel() == 0:
            raise DataError(f"{where}: the attention mask masks every token")
        if int(kept[-1] - kept[0]) + 1 != kept.numel():
            raise DataError(f"{where}: the attention mask has holes (masked tokens between kept ones); srcproj "
                            "drops padding and pads on the right, which needs one contiguous run of kept tokens")
        lo, hi = int(kept[0]), int(kept[-1]) + 1
        if hi - lo < ids.numel():
            ids = ids[lo:hi]
            if not isinstance(labels, (int, np.integer)) and np.ndim(labels) == 1:  # per-token labels go with them
                labels = _ids(labels, f"{where}, {label_key}")[lo:hi]
    return ids, labels


def _pad(rows: Sequence[Tensor], value: int) -> Tensor:
    length = max((int(r.numel()) for r in rows), default=0)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


def _token_model_inputs(ids: Tensor) -> tuple[tuple, dict]:
    """``model(input_ids=ids, attention_mask=ones)``: right padding needs no mask, and a mask of
    ones made here is a constant, never batched by vmap (transformers' checks for padding
    and for an all-ones mask read values, which vmap cannot do on a batched mask)."""
    return (), {"input_ids": ids, "attention_mask": torch.ones(ids.shape, dtype=torch.long, device=ids.device)}


class LanguageModelTask(Task):
    """Next-token prediction with a causal language model (module docstring).

    Parameters
    ----------
    token_weighting : {"batch_mean", "sequence_mean", "sum"}
        The training loss of a sequence, ``Σ_t w_t ℓ_t`` over its target tokens:
        ``"batch_mean"`` (the default, Hugging Face's loss: the mean over every target
        token of a batch) gives ``w_t = 1/T̄``; ``"sequence_mean"`` (each sequence's
        mean, then the batch's) gives ``w_t = 1/T_i``; ``"sum"`` gives ``w_t = 1``.
        SOURCE's time scale depends on it (a wrong weight mis-sets it by about ``T``).
    mean_target_tokens : float, optional
        ``T̄`` for ``"batch_mean"``. ``None`` (the default): the mean number of target
        tokens per sequence of the training data, counted once when featurizing
        (:meth:`calibrate`) and recorded with the task. HF normalizes by each batch's
        own count, so with sequences of very different lengths the data set's mean is
        an approximation of each batch's; pass the value your loop used if it differs.
    pad_token_id : int
        The id padded sequences get on the right (never read: those positions are
        masked from every loss and measurement).
    ignore_index : int
        The label of positions without a target (Hugging Face: −100).

    Attributes
    ----------
    model_outputs
        ``output.logits`` (or the tensor) of shape ``(B, T, V)``.
    """

    name = "language_model"

    def __init__(self, token_weighting: str = "batch_mean", mean_target_tokens: float | None = None, *,
                 pad_token_id: int = 0, ignore_index: int = -100) -> None:
        self.token_weighting = check_choice(token_weighting, "token_weighting", TOKEN_WEIGHTINGS)
        if mean_target_tokens is not None:
            if isinstance(mean_target_tokens, bool) or not isinstance(mean_target_tokens, (int, float)) \
                    or not math.isfinite(mean_target_tokens) or mean_target_tokens <= 0:
                raise ConfigurationError(f"mean_target_tokens={mean_target_tokens!r}; give a positive number (the "
                                         "mean count of target tokens per training sequence) or None")
            if token_weighting != "batch_mean":
                raise ConfigurationError(f"mean_target_tokens is only used with token_weighting='batch_mean', not "
                                         f"{token_weighting!r}; leave it None")
        for value, label in ((pad_token_id, "pad_token_id"), (ignore_index, "ignore_index")):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigurationError(f"{label}={value!r}; give an integer")
        self.mean_target_tokens = None if mean_target_tokens is None else float(mean_target_tokens)
        self._given_mean = mean_target_tokens is not None
        self.pad_token_id = int(pad_token_id)
        self.ignore_index = int(ignore_index)

    # ------------------------------------------------------------------ data
    def model_inputs(self, inputs: Tensor) -> tuple[tuple, dict]:
        return _token_model_inputs(inputs)

    def collate(self, examples: list, what: str) -> tuple[Tensor, Tensor]:
        """Token sequences padded on the right: ``(input_ids (B, T), labels (B, T))``."""
        pairs = [_sequence(example, i, what, "labels", True) for i, example in enumerate(examples)]
        labels = []
        for i, (ids, label) in enumerate(pairs):
            label = _ids(label, f"{what}: example {i}, labels")
            if label.shape != ids.shape:
                raise DataError(f"{what}: example {i} has {ids.numel()} input ids and {label.numel()} labels; a "
                                "language model needs one label per token (−100 where there is no target)")
            labels.append(label)
        return _pad([ids for ids, _ in pairs], self.pad_token_id), _pad(labels, self.ignore_index)

    def _shifted(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits (B, T-1, V), next-token targets (B, T-1), mask)`` of every position that has one."""
        batch, length = targets.shape[0], targets.shape[-1]
        logits = outputs.reshape(batch, length, -1)[:, :-1]
        following = targets.reshape(batch, length)[:, 1:]
        mask = following != self.ignore_index
        return logits, following.clamp_min(0), mask

    def _weights(self, mask: Tensor) -> Tensor:
        """``w_t`` of every position, ``(B, T-1)`` (0 where there is no target)."""
        weights = mask.to(torch.get_default_dtype() if not mask.is_floating_point() else mask.dtype)
        if self.token_weighting == "sum":
            return weights
        if self.token_weighting == "sequence_mean":
            return weights / weights.sum(-1, keepdim=True).clamp_min(1)
        if self.mean_target_tokens is None:
            raise ConfigurationError("LanguageModelTask(token_weighting='batch_mean') does not know the mean number "
                                     "of target tokens per sequence yet: give mean_target_tokens=..., or let the "
                                     "Attributor count it from the training data")
        return weights / self.mean_target_tokens

    def _token_log_probs(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits, following, mask = self._shifted(outputs, targets)
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, following.unsqueeze(-1)).squeeze(-1)
        return log_probs, mask

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        log_probs, mask = self._token_log_probs(outputs, targets)
        return -(log_probs * self._weights(mask).to(log_probs.dtype)).sum(-1)

    def sampled_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        log_probs, mask = self._token_log_probs(outputs, targets)
        return -(log_probs * self._weights(mask).to(log_probs.dtype).sqrt()).sum(-1)

    def measurement(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The log-probability of the target tokens (of the completion, for a prompt with labels −100)."""
        log_probs, mask = self._token_log_probs(outputs, targets)
        return (log_probs * mask.to(log_probs.dtype)).sum(-1)

    def output_hessian(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Block diagonal over positions: ``w_t (diag p_t − p_t p_tᵀ)``, ``(B, T·V, T·V)``
        (for small vocabularies: the ``exact`` estimator)."""
        batch, length = targets.shape[0], targets.shape[-1]
        logits, _, mask = self._shifted(outputs, targets)
        probs = torch.softmax(logits, dim=-1)  # (B, T-1, V)
        vocab = probs.shape[-1]
        blocks = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
        blocks = blocks * self._weights(mask).to(probs.dtype)[..., None, None]
        blocks = torch.cat([blocks, blocks.new_zeros(batch, 1, vocab, vocab)], dim=1)  # the last position: no target
        eye = torch.eye(length, dtype=probs.dtype, device=probs.device)
        return torch.einsum("btij,ts->btisj", blocks, eye).reshape(batch, length * vocab, length * vocab)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator, targets: Tensor | None = None) -> Tensor:
        """One token per position drawn from the model (``fisher``); positions without a
        true target keep ``ignore_index``."""
        if targets is None:
            raise ConfigurationError("LanguageModelTask.sample_targets needs the true targets (their −100 mask)")
        batch, length = targets.shape[0], targets.shape[-1]
        logits = outputs.detach().reshape(batch, length, -1)[:, :-1]
        probs = torch.softmax(logits.to(torch.float64), dim=-1).cpu().reshape(-1, logits.shape[-1])
        drawn = torch.multinomial(probs, 1, generator=generator).reshape(batch, length - 1).to(targets.device)
        sampled = targets.reshape(batch, length).clone()
        keep = sampled[:, 1:] != self.ignore_index
        sampled[:, 1:] = torch.where(keep, drawn, sampled[:, 1:])
        return sampled

    def validate_targets(self, targets: Tensor, num_outputs: int, what: str) -> None:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.ndim != 2:
            raise DataError(f"{what} has labels of shape {tuple(targets.shape)} and dtype {targets.dtype}; a "
                            "language model needs (examples, tokens) integer labels")
        bad = (targets < 0) & (targets != self.ignore_index)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise DataError(f"{what}: example {row} has a negative label other than ignore_index="
                            f"{self.ignore_index}")

    # ------------------------------------------------------------------ calibration
    def calibrate(self, targets: Iterable[Tensor]) -> None:
        """Count ``T̄`` (the mean number of target tokens per training sequence) unless given."""
        if self.token_weighting != "batch_mean" or self._given_mean:
            return
        tokens = sequences = 0
        for block in targets:
            tokens += int((block[:, 1:] != self.ignore_index).sum())
            sequences += int(block.shape[0])
        if tokens == 0:
            raise DataError("the training data has no target tokens (every label is ignore_index)")
        self.mean_target_tokens = tokens / sequences

    def calibrated_from(self, description: Mapping[str, Any]) -> None:
        if not self._given_mean and description.get("mean_target_tokens") is not None:
            self.mean_target_tokens = float(description["mean_target_tokens"])

    def describe(self) -> dict:
        description = {**super().describe(), "token_weighting": self.token_weighting,
                       "ignore_index": self.ignore_index}
        if self.token_weighting == "batch_mean":
            description["mean_target_tokens"] = self.mean_target_tokens
        return description


class SequenceClassificationTask(ClassificationTask):
    """A classifier of token sequences (a ``transformers`` ``*ForSequenceClassification``).

    Examples are mappings with ``input_ids``, a label under ``labels`` or ``label`` and,
    optionally, an ``attention_mask`` (its masked positions are dropped), or
    ``(input_ids, label)`` pairs. Loss, measurement and curvature are
    :class:`~srcproj.ClassificationTask`'s, on ``output.logits``.

    Parameters
    ----------
    pad_token_id : int
        The id sequences are padded with on the right; it must be the model's
        ``config.pad_token_id`` (a causal classifier such as GPT-2's reads the last
        token before the first pad).
    causal : bool
        Whether the model is causal (decoder-only): then right padding changes nothing at
        the real tokens and sequences of any lengths are batched. A bidirectional encoder
        (BERT) would attend to the padding, since srcproj calls the model on the ids
        alone: with ``causal=False``, sequences of different lengths are refused.
    """

    name = "sequence_classification"

    def __init__(self, pad_token_id: int = 0, *, causal: bool = True) -> None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)):
            raise ConfigurationError(f"pad_token_id={pad_token_id!r}; give an integer")
        self.pad_token_id = int(pad_token_id)
        self.causal = bool(causal)

    def model_inputs(self, inputs: Tensor) -> tuple[tuple, dict]:
        return _token_model_inputs(inputs)

    def collate(self, examples: list, what: str) -> tuple[Tensor, Tensor]:
        """Token sequences padded on the right and their class labels: ``((B, T), (B,))``."""
        ids, labels = [], []
        for i, example in enumerate(examples):
            key = "labels" if isinstance(example, Mapping) and "labels" in example else "label"
            sequence, label = _sequence(example, i, what, key, False)
            ids.append(sequence)
            labels.append(torch.as_tensor(label).long().reshape(()))
        if not self.causal and len({int(s.numel()) for s in ids}) > 1:
            raise DataError(f"{what}: sequences of different lengths for SequenceClassificationTask(causal=False); a "
                            "bidirectional model would attend to the padding. Pad them to one length yourself "
                            "(the padding then is part of every example, as in training with that padding)")
        return _pad(ids, self.pad_token_id), torch.stack(labels)

    def describe(self) -> dict:
        return {**super().describe(), "pad_token_id": self.pad_token_id, "causal": self.causal}
