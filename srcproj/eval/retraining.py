"""Ground truth by retraining: random subsets and a resumable, multi-process runner.

Every retraining result is one small ``.npy`` file named by a hash of its keep-mask and
its seed, written to a temporary name and renamed into place, so an interrupted run
loses at most the models that were training when it stopped, and a rerun (or another
process) skips every finished one.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigurationError, DataError

__all__ = ["TrainFunction", "draw_subsets", "retrain"]

TrainFunction = Callable[[np.ndarray, int], np.ndarray]


def draw_subsets(num_examples: int, num_subsets: int = 100, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Random subsets of the training set, as boolean keep-masks.

    Parameters
    ----------
    num_examples : int
        N, the size of the attribution target.
    num_subsets : int
        S, how many subsets.
    fraction : float
        α, each subset keeps exactly ``round(α·N)`` examples drawn without replacement.
    seed : int
        Decides the subsets.

    Returns
    -------
    np.ndarray of bool, shape ``(S, N)``
    """
    for name, value in (("num_examples", num_examples), ("num_subsets", num_subsets)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigurationError(f"{name}={value!r}; it must be a positive integer")
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigurationError(f"fraction={fraction!r}; it must lie strictly between 0 and 1")
    keep = round(float(fraction) * num_examples)
    if keep < 1 or keep >= num_examples:
        raise ConfigurationError(
            f"fraction={fraction} of {num_examples} examples keeps {keep}; choose a fraction that keeps "
            "at least one example and removes at least one"
        )
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, num_examples), dtype=bool)
    for row in masks:
        row[rng.choice(num_examples, size=keep, replace=False)] = True
    return masks


def _cache_path(cache_dir: str, mask: np.ndarray, seed: int) -> str:
    digest = hashlib.sha1(np.packbits(mask).tobytes() + str(mask.shape[0]).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"{digest}_seed{seed}.npy")


def _worker_init() -> None:
    # Two busy threads per process on two cores collide; one thread per worker.
    import torch

    torch.set_num_threads(1)


def _save(path: str, value: np.ndarray) -> None:
    tmp = f"{path}.part{os.getpid()}"
    with open(tmp, "wb") as handle:
        np.save(handle, value)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _run_group(job: tuple[TrainFunction, list[np.ndarray], list[int], list[str | None], bool]) -> list[np.ndarray]:
    train_fn, masks, seeds, paths, batched = job
    if batched:
        outs = np.asarray(train_fn(np.stack(masks), np.asarray(seeds)), dtype=np.float64)
        if outs.ndim != 2 or outs.shape[0] != len(masks):
            raise DataError(f"the batched train_fn returned shape {outs.shape} for {len(masks)} models; "
                            "it must return (models, queries)")
    else:
        outs = [np.asarray(train_fn(m, s), dtype=np.float64) for m, s in zip(masks, seeds, strict=False)]
    for path, out in zip(paths, outs, strict=False):
        if path is not None:
            _save(path, out)
    return list(outs)


def retrain(
    train_fn: TrainFunction,
    masks: np.ndarray,
    seeds: Sequence[int],
    cache_dir: str | os.PathLike | None = None,
    processes: int = 1,
    progress: bool = True,
    models_per_call: int = 1,
) -> np.ndarray:
    """Train one model per (subset, seed) and collect its query measurements.

    Parameters
    ----------
    train_fn : callable
        ``train_fn(keep_mask, seed) -> (Q,)`` array: the query measurements of a model
        trained on the examples where ``keep_mask`` is True, with ``seed`` deciding its
        initialisation and batch order. With ``processes > 1`` it must be picklable (a
        module-level function or a ``functools.partial`` of one).
    masks : np.ndarray of bool, shape ``(S, N)``
    seeds : sequence of int
        R seeds; every subset is trained once per seed.
    cache_dir : path, optional
        Where each result is kept, named by a hash of its mask and seed. Give one folder
        per training recipe and query set: the name does not encode them.
    processes : int
        Worker processes (spawned, one torch thread each).
    progress : bool
        Show a progress bar.
    models_per_call : int
        With a value above 1, ``train_fn`` is batched: it is called as
        ``train_fn(masks, seeds)`` with up to that many ``(M, N)`` masks and ``(M,)``
        seeds and returns ``(M, Q)``, so that small models can be trained side by
        side (e.g. with ``torch.bmm``). Each model must depend only on its own mask and
        seed, never on the others trained with it, or the cache would mix results.

    Returns
    -------
    np.ndarray, shape ``(S, R, Q)``, float64
    """
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != bool:
        raise ConfigurationError(f"masks must be a 2-D boolean array (subsets × examples); got {masks.dtype} "
                                 f"of shape {masks.shape}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigurationError("seeds is empty; give at least one seed")
    for name, value in (("processes", processes), ("models_per_call", models_per_call)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"{name}={value!r}; it must be a positive integer")
    folder = None
    if cache_dir is not None:
        folder = os.fspath(cache_dir)
        os.makedirs(folder, exist_ok=True)
    results: dict[tuple[int, int], np.ndarray] = {}
    pending, keys = [], []
    for i, mask in enumerate(masks):
        for j, seed in enumerate(seeds):
            path = _cache_path(folder, mask, seed) if folder is not None else None
            if path is not None and os.path.exists(path):
                try:
                    results[i, j] = np.load(path)
                    continue
                except (OSError, ValueError):  # a damaged file is recomputed
                    os.remove(path)
            pending.append((mask, seed, path))
            keys.append((i, j))
    batched = models_per_call > 1
    groups = [pending[g:g + models_per_call] for g in range(0, len(pending), models_per_call)]
    jobs = [(train_fn, [m for m, _, _ in group], [s for _, s, _ in group], [p for _, _, p in group], batched)
            for group in groups]
    key_groups = [keys[g:g + models_per_call] for g in range(0, len(keys), models_per_call)]
    bar = tqdm(total=len(masks) * len(seeds), initial=len(results), desc="srcproj retrain",
               unit="model", disable=not progress)
    try:
        if processes == 1 or len(jobs) <= 1:
            outputs = map(_run_group, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(processes, initializer=_worker_init)
            outputs = pool.imap(_run_group, jobs)
        try:
            for group_keys, outs in zip(key_groups, outputs, strict=False):
                for key, out in zip(group_keys, outs, strict=False):
                    results[key] = out
                bar.update(len(group_keys))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    finally:
        bar.close()
    shapes = {results[key].shape for key in results}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise DataError(f"train_fn returned outputs of shapes {sorted(shapes)}; it must return one (Q,) "
                        "array of query measurements, the same Q for every call")
    out = np.empty((len(masks), len(seeds), next(iter(shapes))[0]))
    for (i, j), value in results.items():
        out[i, j] = value
    if not np.isfinite(out).all():
        raise DataError("train_fn returned NaN or inf measurements; a retrained model diverged "
                        "(lower its learning rate) or the measurement is undefined")
    return out
