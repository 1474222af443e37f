"""Scores ``-Ψ Tᵀ`` streamed over the store's cached training features.

Nothing here builds more than one block of training rows at a time, except
:func:`score_matrix`, whose output the caller asked for whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

__all__ = ["TopK", "score_matrix", "top_k", "self_scores"]

BlockReader = Callable[[int, int], np.ndarray]


def _blocks(read: BlockReader, num_rows: int, block_rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    for start in range(0, num_rows, block_rows):
        stop = min(start + block_rows, num_rows)
        yield start, stop, torch.from_numpy(np.ascontiguousarray(read(start, stop)))


def score_matrix(queries: np.ndarray, read: BlockReader, num_rows: int, block_rows: int) -> np.ndarray:
    """All scores ``(Q, N)``; ``read(start, stop)`` returns rows of the cache T."""
    psi = torch.from_numpy(np.ascontiguousarray(queries))
    out = np.empty((psi.shape[0], num_rows), dtype=queries.dtype)
    for start, stop, block in _blocks(read, num_rows, block_rows):
        out[:, start:stop] = (psi @ block.to(psi.dtype).T).neg_().numpy()
    return out


@dataclass
class TopK:
    """The most helpful and most harmful training examples per query.

    ``helpful_indices[q]`` are sorted by decreasing score, ``harmful_indices[q]`` by
    increasing score (most negative first).
    """

    helpful_indices: np.ndarray
    helpful_scores: np.ndarray
    harmful_indices: np.ndarray
    harmful_scores: np.ndarray


def top_k(queries: np.ndarray, read: BlockReader, num_rows: int, block_rows: int, k: int) -> TopK:
    """Top ``k`` helpful and harmful rows per query without the ``(Q, N)`` matrix."""
    psi = torch.from_numpy(np.ascontiguousarray(queries))
    k = min(k, num_rows)
    q = psi.shape[0]
    best_vals = torch.full((q, 0), 0.0, dtype=psi.dtype)
    best_idx = torch.zeros((q, 0), dtype=torch.long)
    worst_vals, worst_idx = best_vals.clone(), best_idx.clone()
    for start, stop, block in _blocks(read, num_rows, block_rows):
        scores = (psi @ block.to(psi.dtype).T).neg_()
        idx = torch.arange(start, stop).expand(q, -1)
        vals = torch.cat([best_vals, scores], 1)
        cand = torch.cat([best_idx, idx], 1)
        top = vals.topk(min(k, vals.shape[1]), dim=1)
        best_vals, best_idx = top.values, cand.gather(1, top.indices)
        vals = torch.cat([worst_vals, scores], 1)
        cand = torch.cat([worst_idx, idx], 1)
        low = vals.topk(min(k, vals.shape[1]), dim=1, largest=False)
        worst_vals, worst_idx = low.values, cand.gather(1, low.indices)
    return TopK(best_idx.numpy(), best_vals.numpy(), worst_idx.numpy(), worst_vals.numpy())


def self_scores(query_rows: Callable[[int, int], np.ndarray], read: BlockReader, num_rows: int,
                block_rows: int) -> np.ndarray:
    """``score(m, m) = -ψ_mᵀ t(m)`` with both sides streamed in the same blocks."""
    out = np.empty(num_rows, dtype=np.float64)
    for start, stop, block in _blocks(read, num_rows, block_rows):
        psi = torch.from_numpy(np.ascontiguousarray(query_rows(start, stop))).to(torch.float64)
        out[start:stop] = -(psi * block.to(torch.float64)).sum(1).numpy()
    return out
