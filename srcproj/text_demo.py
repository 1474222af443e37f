"""Text for language-model demonstrations, without downloads.

English prose from the Python documentation that ships with every Python
(``pydoc_data.topics``), cut into short passages and read character by character: a
vocabulary of lower-case letters, digits, space and common punctuation (id 0 pads, id 1
stands for any other character). :func:`make_tiny_gpt2` builds a small GPT-2 from a
config with random weights (``transformers`` is an optional extra: ``srcproj[hf]``).
The examples, the language-model benchmark and the tests share these helpers.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .errors import ConfigurationError

__all__ = ["VOCABULARY", "PAD_ID", "encode", "decode", "load_prose_passages", "passage_examples",
           "completion_queries", "make_tiny_gpt2"]

#: Characters with their own id (2 onwards); 0 pads, 1 is any other character.
VOCABULARY = " abcdefghijklmnopqrstuvwxyz0123456789.,;:'\"()-?!_=+*/<>[]{}%#"
PAD_ID, UNKNOWN_ID = 0, 1
_IDS = {c: i + 2 for i, c in enumerate(VOCABULARY)}


def vocab_size() -> int:
    """Ids in use: padding, unknown and :data:`VOCABULARY`."""
    return len(VOCABULARY) + 2


def encode(text: str) -> list[int]:
    """Character ids of ``text`` (lower-cased)."""
    return [_IDS.get(c, UNKNOWN_ID) for c in text.lower()]


def decode(ids: Any) -> str:
    """The text of character ids (padding dropped, unknown characters as ``~``)."""
    chars = {i: c for c, i in _IDS.items()}
    return "".join(chars.get(int(i), "~") for i in ids if int(i) != PAD_ID)


def load_prose_passages(count: int, length: int = 48, seed: int = 0) -> list[str]:
    """``count`` distinct passages of about ``length`` characters of documentation prose.

    Paragraphs of ``pydoc_data.topics`` that read as sentences (no code, grammar or
    tables) are cut at word boundaries into passages of ``length`` characters or a few
    fewer; ``seed`` decides which passages are taken and their order.
    """
    import pydoc_data.topics

    if count < 1 or length < 8:
        raise ConfigurationError(f"count={count}, length={length}; ask for at least 1 passage of 8 characters")
    passages: list[str] = []
    for name in sorted(pydoc_data.topics.topics):
        for paragraph in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            if paragraph.startswith((" ", "\t")) or "::=" in paragraph or "*" in paragraph or "|" in paragraph:
                continue
            words = " ".join(paragraph.split()).lower().split(" ")
            if len(words) < 8:
                continue
            current = ""
            for word in words:
                if len(current) + len(word) + 1 > length:
                    if len(current) >= length - 8:
                        passages.append(current)
                    current = ""
                current = f"{current} {word}" if current else word
    passages = sorted(set(passages))
    if count > len(passages):
        raise ConfigurationError(f"only {len(passages)} passages of {length} characters exist; ask for fewer")
    order = np.random.default_rng(seed).permutation(len(passages))[:count]
    return [passages[i] for i in order]


def passage_examples(passages: list[str]) -> list[dict]:
    """Training examples as a tokenizer gives them: ``input_ids`` and ``attention_mask``."""
    out = []
    for text in passages:
        ids = encode(text)
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return out


def completion_queries(passages: list[str], prompt_chars: int) -> list[dict]:
    """Each passage as a prompt (its first ``prompt_chars`` characters, labels −100) and a
    completion (the rest): only the completion's log-probability is measured."""
    out = []
    for text in passages:
        ids = encode(text)
        cut = min(prompt_chars, len(ids) - 1)
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def make_tiny_gpt2(n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_positions: int = 64, seed: int = 0,
                   vocab: int | None = None) -> Any:
    """A GPT-2 language model from a config, random weights (tied input and output embeddings)."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the hf extra is missing
        raise ConfigurationError("make_tiny_gpt2 needs transformers: pip install 'srcproj[hf]'") from exc
    import torch

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=vocab or vocab_size(), n_positions=n_positions, n_embd=n_embd,
                                     n_layer=n_layer, n_head=n_head, bos_token_id=PAD_ID, eos_token_id=PAD_ID,
                                     pad_token_id=PAD_ID)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = transformers.GPT2LMHeadModel(config)
    finally:
        torch.random.set_rng_state(state)  # the caller's random stream is left as it was
    return model
