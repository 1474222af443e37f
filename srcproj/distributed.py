"""Rank, world size and the few collectives srcproj needs, as no-ops in one process.

srcproj never starts a process group on its own. Launch your script with ``torchrun``
and initialize the default group first, either yourself::

    torch.distributed.init_process_group("gloo")   # CPU; "nccl" on GPUs

or with :func:`init_from_torchrun`, which does that from torchrun's environment
variables (and does nothing when the script runs as one plain process). An
:class:`~srcproj.Attributor` built while the default group is initialized with more
than one process is *collective*: every rank must build it with the same inputs and
call ``featurize()``; each rank then computes its own share of the store.

Errors are agreed on: when one rank fails inside a collective step (a store made for
other inputs, a NaN gradient in its shard), every rank raises at the next point where
the ranks meet, the failing rank its own error and the others the same error type
naming the rank it came from (:class:`RankFailedError` for errors that are not
srcproj's). No rank is left waiting at a barrier for a rank that has given up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigurationError, SrcprojError

__all__ = [
    "Collective",
    "DeferredErrors",
    "RankFailedError",
    "all_reduce",
    "barrier",
    "get_rank",
    "get_world_size",
    "init_from_torchrun",
    "is_distributed",
]


class RankFailedError(SrcprojError):
    """Another rank of the job failed; the message names it and its error."""


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """Whether the default process group is initialized with more than one process."""
    return _initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """The number of processes in the default group (1 without one)."""
    return dist.get_world_size() if _initialized() else 1


def init_from_torchrun(backend: str | None = None, timeout: Any = None) -> tuple[int, int]:
    """Initialize the default process group from torchrun's environment; ``(rank, world_size)``.

    Does nothing when the group is already initialized or when the script was not
    started by torchrun (no ``WORLD_SIZE`` in the environment): it then returns the
    current ``(rank, world_size)``, ``(0, 1)`` for one plain process.

    Parameters
    ----------
    backend : str, optional
        ``"gloo"`` (CPU) or ``"nccl"`` (GPU). Default: ``"nccl"`` when CUDA is
        available, else ``"gloo"``. With nccl the current CUDA device is set to
        ``LOCAL_RANK`` first, as nccl needs one GPU per process.
    timeout : datetime.timedelta, optional
        Passed to :func:`torch.distributed.init_process_group` (how long a collective
        waits for a rank that never comes).
    """
    if _initialized() or "WORLD_SIZE" not in os.environ:
        return get_rank(), get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, **kwargs)
    return get_rank(), get_world_size()


class Collective:
    """The default process group as srcproj uses it; every method is a no-op in one process.

    Parameters
    ----------
    enabled : bool, optional
        ``None``: use the default group if it is initialized. ``False``: act as one
        process even inside a distributed job. ``True``: require an initialized group.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        if enabled not in (None, True, False):
            raise ConfigurationError(f"distributed={enabled!r}; use None, True or False")
        if enabled and not _initialized():
            raise ConfigurationError(
                "distributed=True, but no torch.distributed process group is initialized: start the "
                "script with torchrun and call torch.distributed.init_process_group('gloo') (CPU) or "
                "('nccl') (GPU), or srcproj.distributed.init_from_torchrun(), before building the Attributor"
            )
        use = _initialized() if enabled is None else enabled
        self.rank = dist.get_rank() if use else 0
        self.world_size = dist.get_world_size() if use else 1
        self.active = self.world_size > 1
        self.device = torch.device("cpu")
        if self.active and "nccl" in str(dist.get_backend()).lower():
            self.device = torch.device("cuda", torch.cuda.current_device())

    def owns(self, chunk: int) -> bool:
        """Whether this rank computes row chunk ``chunk`` (chunks are dealt round-robin)."""
        return chunk % self.world_size == self.rank

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce(self, values: np.ndarray) -> np.ndarray:
        """The float64 sum of ``values`` over all ranks (``values`` itself in one process)."""
        values = np.asarray(values, dtype=np.float64)
        if not self.active:
            return values
        tensor = torch.from_numpy(np.ascontiguousarray(values)).to(self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def all_gather_object(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
        if not self.active:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def agree(self, error: BaseException | None, failed: float | None = None) -> None:
        """Meet the other ranks; raise on every rank if any of them brought an error.

        ``error`` is this rank's pending error (or ``None``). ``failed``, the number of
        ranks with an error, is given when it was already summed in another
        collective; otherwise it is summed here (this call is then also a barrier).
        The failing rank raises its own error; the others raise the same srcproj error
        type (or :class:`RankFailedError`) with the failing rank's message.
        """
        if not self.active:
            if error is not None:
                raise error
            return
        if failed is None:
            failed = float(self.all_reduce(np.array([0.0 if error is None else 1.0]))[0])
        if failed < 0.5:
            return
        shown = None if error is None else (type(error).__name__, str(error))
        reports = self.all_gather_object(shown)
        if error is not None:
            raise error
        rank, (name, message) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
        cls = _error_class(name)
        what = "" if cls is not RankFailedError else f" with {name}"
        raise cls(f"rank {rank} failed{what}: {message}")


class DeferredErrors:
    """Run a job's steps so that an error never leaves another rank waiting.

    :meth:`attempt` runs a step unless an error is already pending. In one process
    the error propagates at once; in a distributed job it is kept until the next point
    where the ranks meet (:meth:`agree`), where every rank raises it (see
    :meth:`Collective.agree`).
    """

    def __init__(self, collective: Collective) -> None:
        self.collective = collective
        self.error: Exception | None = None

    @property
    def pending(self) -> bool:
        return self.error is not None

    def attempt(self, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``, or None when an error is pending or ``step`` fails (distributed)."""
        if self.error is not None:
            return None
        if not self.collective.active:
            return step(*args)
        try:
            return step(*args)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree()
            self.error = exc
            return None

    def agree(self, failed: float | None = None) -> None:
        """Meet the other ranks; raise on every rank if any of them has an error pending."""
        self.collective.agree(self.error, failed)


def _error_class(name: str) -> type[Exception]:
    """The srcproj error class called ``name``, else :class:`RankFailedError`."""
    from . import errors

    found = getattr(errors, name, None)
    if isinstance(found, type) and issubclass(found, SrcprojError):
        return found
    return RankFailedError


def barrier() -> None:
    """``torch.distributed.barrier()`` in a distributed job; nothing in one process."""
    Collective().barrier()


def all_reduce(values: np.ndarray) -> np.ndarray:
    """The float64 sum of a numpy array over all ranks; the array itself in one process."""
    return Collective().all_reduce(values)
