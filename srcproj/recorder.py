"""Recording a training run as SOURCE needs it, from inside the training loop.

A :class:`TrajectoryRecorder` is created with the model, the optimizer and a directory.
The run's stages are declared with :meth:`TrajectoryRecorder.stage` (a name, the data
set, the optimizer steps and how many segments cut it), and :meth:`TrajectoryRecorder.step`
is called after every ``optimizer.step()``. The recorder then

- logs the learning rate of group 0 that every optimizer step *used* (an
  ``optimizer.register_step_post_hook``, so a scheduler stepping right after does not
  shift the schedule, and a step AMP's GradScaler skipped is not counted);
- saves checkpoints at the segment boundaries, evenly spaced inside each segment (the
  last at its end): the model's ``state_dict`` and the part of the optimizer state
  SOURCE reads (Adam's moments and step, the groups' settings and parameter names);
- writes ``manifest.json`` beside them, atomically, after each checkpoint. A segment
  enters the manifest once all its checkpoints are on disk, so a run killed at any
  point leaves a manifest of the segments it completed.

:func:`load_trajectory` (also ``Trajectory.from_manifest``) turns the manifest back into
a :class:`~srcproj.Trajectory`, checking the data given for each stage against the
recorded fingerprint and each checkpoint file against its recorded SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .data import ExampleSource
from .errors import CheckpointMismatchError, ConfigurationError, DataError
from .optimizer import (
    SGD,
    Adam,
    OptimizerSpec,
    ParamGroup,
    describe_torch_optimizer,
    group_parameter_names,
    unwrap_optimizer,
    with_named_groups,
)
from .store import fsync_path, metadata_differences

__all__ = ["TrajectoryRecorder", "load_trajectory", "read_manifest", "MANIFEST_NAME", "MANIFEST_FORMAT",
           "MANIFEST_VERSION"]

#: The manifest's file name inside the recorder's directory.
MANIFEST_NAME = "manifest.json"
#: The manifest's ``"format"`` entry.
MANIFEST_FORMAT = "srcproj-trajectory"
#: The manifest's ``"format_version"``: what this srcproj writes and the newest it reads.
MANIFEST_VERSION = 1

_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


# --------------------------------------------------------------------------- durable files
class _HashingWriter:
    """A file object that hashes what is written through it."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _fsync_directory(path: str) -> None:
    try:
        fsync_path(path)
    except OSError:  # e.g. a platform that cannot open or fsync a directory
        pass


def _write_atomically(path: str, write: Any) -> Any:
    """Write ``path`` through ``write(handle)`` into a temporary file of the same
    directory, flush and fsync it, then ``os.replace`` it into place; return what
    ``write`` returned. A crash leaves the old file or the new one, never a torn one."""
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            result = write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    _fsync_directory(directory)
    return result


def _save_checkpoint(path: str, payload: Mapping) -> str:
    """``torch.save`` ``payload`` atomically; return the file's SHA-256."""
    def write(handle: Any) -> str:
        writer = _HashingWriter(handle)
        torch.save(payload, writer)
        return writer.digest.hexdigest()
    return _write_atomically(path, write)


def _write_json(path: str, value: Mapping) -> None:
    text = json.dumps(value, indent=1, allow_nan=False) + "\n"
    _write_atomically(path, lambda handle: handle.write(text.encode()))


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the recorder
def _count(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ConfigurationError(f"{what}={value!r}; it must be an int >= {minimum}")
    return int(value)


@dataclass
class _Stage:
    name: str
    data: Any
    fingerprint: str
    examples: int
    keys: dict
    steps: int | None          # None: open-ended, cut every ``segment_every`` steps
    segments: int | None
    segment_every: int | None
    checkpoints: int
    taken: int = 0
    completed_segments: int = 0

    def segment_length(self) -> int | None:
        """The planned length of the stage's next segment (None: the stage is done)."""
        if self.steps is not None and self.taken >= self.steps:
            return None
        if self.segment_every is not None:
            length = self.segment_every
            return length if self.steps is None else min(length, self.steps - self.taken)
        assert self.steps is not None and self.segments is not None
        j = self.completed_segments
        return (self.steps * (j + 1)) // self.segments - (self.steps * j) // self.segments

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "examples": self.examples,
                "input_key": self.keys["input_key"], "target_key": self.keys["target_key"],
                **({"collated_by": self.keys["collated_by"]} if "collated_by" in self.keys else {}),
                "steps": self.steps, "segments": self.segments, "segment_every": self.segment_every,
                "checkpoints_per_segment": self.checkpoints, "steps_taken": self.taken}


def _offsets(length: int, count: int) -> list[int]:
    """Checkpoint positions (1..length) in a segment of ``length`` steps: evenly spaced,
    the last at its end."""
    count = min(count, length)
    return [(length * (i + 1)) // count for i in range(count)]


class TrajectoryRecorder:
    """Records a plain PyTorch training loop as a SOURCE trajectory.

    Parameters
    ----------
    model : nn.Module
        The model being trained; its ``state_dict()`` is saved at each checkpoint.
    optimizer : torch.optim.SGD, Adam or AdamW
        The optimizer the loop steps (a wrapper keeping it as ``.optimizer``, such as
        accelerate's, is unwrapped). Any other optimizer is refused by name.
    directory : path
        Where the checkpoints and ``manifest.json`` are written (created if absent).
    batch_size : int, optional
        The training batch size (examples per optimizer step), recorded for
        ``Trajectory(batch_size=...)``.
    checkpoints_per_segment : int
        Checkpoints saved in each segment (the paper uses two), evenly spaced, the last
        at the segment's end. A stage may override it.
    task : Task, optional
        Names the input and target keys of mapping examples (as for the Attributor);
        the data's fingerprints are taken with it.
    allow_skipped_steps : bool
        ``False`` (default): ``step()`` without an optimizer step since the last call is
        an error. ``True``: it is a skipped step (AMP's GradScaler skips steps whose
        gradients overflowed), not counted.
    overwrite : bool
        Whether a directory that already holds a manifest may be recorded into again.

    Call :meth:`stage` before the steps it covers, :meth:`step` after every
    ``optimizer.step()``, and :meth:`close` at the end (or use the recorder as a
    context manager).
    """

    def __init__(self, model: nn.Module, optimizer: Any, directory: str | os.PathLike, *,
                 batch_size: int | None = None, checkpoints_per_segment: int = 2, task: Any = None,
                 allow_skipped_steps: bool = False, overwrite: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"model is a {type(model).__name__}; give the nn.Module being trained")
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer)
        spec, tensors = describe_torch_optimizer(self.optimizer)
        grouped = group_parameter_names(model, tensors)
        if grouped is None:
            known = {id(p) for p in model.parameters()}
            outside = sum(id(p) not in known for group in tensors for p in group)
            raise ConfigurationError(
                f"the optimizer holds {outside} tensors that are not parameters of the model; record the model "
                "the optimizer trains")
        self._group_names = grouped
        flat = [n for group in self._group_names for n in group]
        self.spec: OptimizerSpec = with_named_groups(spec, flat, [len(g) for g in tensors])
        self._scales = [float(g.lr_scale) for g in spec.groups]
        if batch_size is not None:
            batch_size = _count(batch_size, "batch_size")
        self.batch_size = batch_size
        self.checkpoints_per_segment = _count(checkpoints_per_segment, "checkpoints_per_segment")
        self.task = task
        self.allow_skipped_steps = bool(allow_skipped_steps)
        self.directory = os.path.abspath(os.fspath(directory))
        self.manifest_path = os.path.join(self.directory, MANIFEST_NAME)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ConfigurationError(f"{self.directory!r} is a file; give the recorder a directory")
        if os.path.exists(self.manifest_path) and not overwrite:
            raise ConfigurationError(
                f"{self.directory!r} already holds a recorded run ({MANIFEST_NAME}); record into another directory, "
                "or pass overwrite=True to replace it")
        os.makedirs(self.directory, exist_ok=True)
        self._stages: list[_Stage] = []
        self._segments: list[dict] = []
        self._pending: list[list[float]] = []
        self._step = 0
        self._skipped = 0
        self._segment_start = 0
        self._segment_rates: list[float] = []
        self._segment_checkpoints: list[dict] = []
        self._segment_plan: tuple[_Stage, int, list[int]] | None = None
        self._closed = False
        self._handle = self.optimizer.register_step_post_hook(self._after_optimizer_step)
        self._write_manifest()

    # ------------------------------------------------------------------ public
    def stage(self, name: str, data: Any, *, steps: int | None = None, segments: int = 1,
              segment_every: int | None = None, checkpoints_per_segment: int | None = None,
              optimizer: Any = None) -> None:
        """Declare a stage: the data set the next ``steps`` optimizer steps train on.

        ``steps`` with ``segments``: the stage's steps cut into that many segments of
        (nearly) equal length. ``segment_every=n``: a segment every n steps (e.g. the
        optimizer steps of an epoch, or of several); with ``steps`` the last one may be
        shorter, without it the stage runs until the next stage or :meth:`close`.
        Stages may be declared ahead of their steps; they run in declaration order.

        ``optimizer``: a new optimizer the loop steps from now on (stage-wise training
        often builds one per stage). It must have the recorded optimizer's settings and
        groups: a trajectory has one optimizer. Its state starts afresh, a transient
        SOURCE's segments do not describe.
        """
        self._check_open()
        switch = None if optimizer is None else self._check_new_optimizer(optimizer, name)
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"stage name {name!r}; give a non-empty str")
        if any(s.name == name for s in self._stages):
            raise ConfigurationError(f"stage {name!r} is declared twice; give each stage its own name")
        if steps is not None:
            steps = _count(steps, f"stage {name!r}: steps")
        count = self.checkpoints_per_segment if checkpoints_per_segment is None else _count(
            checkpoints_per_segment, f"stage {name!r}: checkpoints_per_segment")
        segments_out: int | None
        if segment_every is not None:
            segment_every = _count(segment_every, f"stage {name!r}: segment_every")
            if segments != 1:
                raise ConfigurationError(f"stage {name!r} has segments={segments!r} and segment_every="
                                         f"{segment_every}; give one of them")
            segments_out = None if steps is None else math.ceil(steps / segment_every)
            shortest = segment_every if steps is None else min(segment_every, steps)
        elif steps is None:
            raise ConfigurationError(
                f"stage {name!r} has neither steps nor segment_every; give steps=N (its optimizer steps, cut "
                "into segments=K), or segment_every=N (a segment every N steps)")
        else:
            segments_out = _count(segments, f"stage {name!r}: segments")
            if segments_out > steps:
                raise ConfigurationError(f"stage {name!r}: {steps} steps cannot be cut into {segments_out} segments")
            shortest = steps // segments_out
        if shortest < count:
            raise ConfigurationError(
                f"stage {name!r}: its segments of {shortest} steps cannot hold {count} checkpoints each; give it "
                "fewer segments or fewer checkpoints_per_segment")
        last = self._stages[-1] if self._stages else None
        if last is not None and last.steps is not None and 0 < last.taken < last.steps:
            raise ConfigurationError(
                f"stage {last.name!r} has taken {last.taken} of its {last.steps} steps; declare stage {name!r} when "
                f"{last.name!r} has ended, or declare {last.name!r} with the steps it really takes")
        if last is not None and last.steps is None and last.taken == 0:
            raise ConfigurationError(
                f"stage {last.name!r} runs until the next stage is declared (segment_every without steps) and has "
                f"taken no step yet; declare stage {name!r} when {last.name!r} has ended, or give {last.name!r} "
                "steps=N")
        source = ExampleSource(data, f"stage {name!r}'s data", self.task)
        fingerprint = source.fingerprint()
        keys = {key: getattr(self.task, key, None) for key in ("input_key", "target_key")}
        if callable(getattr(self.task, "collate", None)):  # the task batched (and fingerprinted) the examples
            keys["collated_by"] = f"{type(self.task).__module__}.{type(self.task).__qualname__}"
        if last is not None and last.steps is None and self._segment_plan is not None \
                and self._segment_plan[0] is last:
            self._end_segment(partial=True)  # an open-ended stage ends where the next begins
        if last is not None and last.steps is None:
            last.steps = last.taken
        if switch is not None:
            self._detach()
            self.optimizer, self._group_names, self._scales = switch
            self._handle = self.optimizer.register_step_post_hook(self._after_optimizer_step)
        self._stages.append(_Stage(name, data, fingerprint, len(source), keys, steps, segments_out,
                                   segment_every, count))
        self._write_manifest()

    def step(self) -> None:
        """Call once after every ``optimizer.step()``: counts the step, saves the
        checkpoints due and, at a segment's end, adds it to the manifest."""
        self._check_open()
        if not self._pending:
            if self.allow_skipped_steps:
                self._skipped += 1
                return
            raise ConfigurationError(
                "rec.step() was called but the optimizer has not stepped since the last rec.step(); call "
                "rec.step() once right after each optimizer.step() (with AMP's GradScaler, which skips steps, "
                "create the recorder with allow_skipped_steps=True)")
        if len(self._pending) > 1:
            count = len(self._pending)
            self._pending.clear()
            raise ConfigurationError(
                f"the optimizer stepped {count} times since the last rec.step(); call rec.step() once right after "
                "each optimizer.step()")
        rates = self._pending.pop()
        if self._segment_plan is None:
            self._begin_segment()
        self._check_rates(rates)
        stage, length, offsets = self._segment_plan  # type: ignore[misc]
        self._step += 1
        stage.taken += 1
        self._segment_rates.append(rates[0])
        offset = self._step - self._segment_start
        if offset in offsets:
            self._save()
        if offset == length:
            self._end_segment(partial=False)

    def close(self) -> None:
        """End the recording: a segment under way is recorded with the steps it took (a
        warning says so when its stage declared more), and the hook is removed."""
        if self._closed:
            return
        try:
            if self._pending:
                raise ConfigurationError(
                    f"the optimizer stepped {len(self._pending)} time(s) after the last rec.step(); call rec.step() "
                    "right after each optimizer.step(), also the last one")
            if self._segment_plan is not None:
                self._end_segment(partial=True)
            for stage in self._stages:
                if stage.steps is None:
                    stage.steps = stage.taken
                elif stage.taken < stage.steps:
                    warnings.warn(f"stage {stage.name!r} declared {stage.steps} steps but the run stopped after "
                                  f"{stage.taken}; its segments are recorded with the steps they took",
                                  RuntimeWarning, stacklevel=2)
            self._closed = True
            self._write_manifest()
        finally:
            self._detach()

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.close()
        else:  # a failing loop records what it completed, nothing more
            self._detach()

    @property
    def steps(self) -> int:
        """Optimizer steps recorded so far."""
        return self._step

    @property
    def segments(self) -> list[dict]:
        """The completed segments, as the manifest records them."""
        return [dict(s) for s in self._segments]

    # ------------------------------------------------------------------ internals
    def _check_new_optimizer(self, optimizer: Any, stage: str) -> tuple | None:
        """``(optimizer, group names, lr scales)`` of a stage's new optimizer, checked."""
        inner = unwrap_optimizer(optimizer)
        if inner is self.optimizer:
            return None
        busy = self._pending or any(s.segment_length() is not None for s in self._stages if s.steps is not None)
        if busy:
            raise ConfigurationError(
                f"stage {stage!r} brings a new optimizer while the declared stages have steps to go; declare it "
                "when the previous stages have ended")
        spec, tensors = describe_torch_optimizer(inner)
        names = group_parameter_names(self.model, tensors)
        if names is None:
            raise ConfigurationError(f"stage {stage!r}: the new optimizer holds tensors that are not parameters of "
                                     "the recorded model")
        named = with_named_groups(spec, [n for g in names for n in g], [len(g) for g in tensors])
        if named.kind != self.spec.kind:
            raise ConfigurationError(
                f"stage {stage!r}: the new optimizer is {type(inner).__name__}, the recorded one "
                f"{type(self.optimizer).__name__}; a trajectory has one optimizer: give the new one the same kind, "
                "settings and parameter groups")
        differences = metadata_differences(self.spec.describe(), named.describe(), ("recorded", "new"))
        if differences:
            raise ConfigurationError(
                f"stage {stage!r}: the new optimizer differs from the recorded one ({differences}); a trajectory "
                "has one optimizer: give the new one the same settings and parameter groups")
        return inner, names, [float(g.lr_scale) for g in spec.groups]

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _check_open(self) -> None:
        if self._closed or self._handle is None:
            raise ConfigurationError("the recorder is closed; create a new one to record another run")

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._pending.append([float(g["lr"]) for g in optimizer.param_groups])

    def _check_rates(self, rates: list[float]) -> None:
        if len(rates) != len(self._scales):
            raise ConfigurationError(
                f"the optimizer has {len(rates)} parameter groups, it had {len(self._scales)} when the recorder was "
                "created; SOURCE needs the same groups for the whole run")
        if rates[0] > 0:
            ratios = [r / rates[0] for r in rates]
            if any(not math.isclose(r, s, rel_tol=1e-6) for r, s in zip(ratios, self._scales, strict=True)):
                raise ConfigurationError(
                    f"at step {self._step + 1} the optimizer's groups have learning rates {rates} (ratios {ratios}), "
                    f"the recording began with ratios {self._scales}; SOURCE needs one schedule for every group "
                    "(groups may differ by a constant factor)")

    def _begin_segment(self) -> None:
        stage = next((s for s in self._stages if s.segment_length() is not None), None)
        if stage is None:
            if not self._stages:
                raise ConfigurationError(
                    "the optimizer stepped before any stage was declared; call rec.stage(name, data, steps=...) "
                    "before training on that data")
            raise ConfigurationError(
                f"the optimizer stepped past the {self._step} steps of the declared stages; declare the next stage "
                "with rec.stage(name, data, steps=...) before its steps")
        length = stage.segment_length()
        assert length is not None
        self._segment_plan = (stage, length, _offsets(length, stage.checkpoints))
        self._segment_start = self._step
        self._segment_rates = []
        self._segment_checkpoints = []

    def _optimizer_state(self) -> dict:
        state = self.optimizer.state_dict()
        groups = []
        for group, names in zip(state["param_groups"], self._group_names, strict=True):
            entry = {k: v for k, v in group.items() if k != "param_names"}
            entry["param_names"] = list(names)
            groups.append(entry)
        kept: dict = {}
        if self.spec.adaptive:
            for index, entry in state["state"].items():
                kept[index] = {k: (entry[k].detach().cpu() if isinstance(entry[k], Tensor) else entry[k])
                               for k in _ADAM_KEYS if k in entry}
        return {"state": kept, "param_groups": groups}

    def _save(self) -> None:
        name = f"ckpt-{self._step:08d}.pt"
        model_state = {k: (v.detach().cpu() if isinstance(v, Tensor) else v)
                       for k, v in self.model.state_dict().items()}
        digest = _save_checkpoint(os.path.join(self.directory, name),
                                  {"model": model_state, "optimizer": self._optimizer_state()})
        self._segment_checkpoints.append({"file": name, "step": self._step, "sha256": digest})
        self._write_manifest()

    def _end_segment(self, partial: bool) -> None:
        assert self._segment_plan is not None
        stage = self._segment_plan[0]
        taken = self._step - self._segment_start
        if taken == 0:
            self._segment_plan = None
            return
        if partial and (not self._segment_checkpoints or self._segment_checkpoints[-1]["step"] != self._step):
            self._save()
        self._segments.append({"stage": stage.name, "steps": taken, "lr": list(self._segment_rates),
                               "checkpoints": list(self._segment_checkpoints),
                               "first_step": self._segment_start + 1, "last_step": self._step})
        stage.completed_segments += 1
        self._segment_plan = None
        self._segment_checkpoints = []
        self._segment_rates = []
        self._write_manifest()

    def _manifest(self) -> dict:
        in_progress = None
        if self._segment_plan is not None:
            in_progress = {"stage": self._segment_plan[0].name, "steps": self._step - self._segment_start,
                           "planned_steps": self._segment_plan[1], "checkpoints": list(self._segment_checkpoints)}
        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "library_version": __version__,
            "optimizer": {"class": type(self.optimizer).__name__, "description": self.spec.describe()},
            "batch_size": self.batch_size,
            "stages": [s.describe() for s in self._stages],
            "segments": self._segments,
            "steps": self._step,
            "skipped_steps": self._skipped,
            "in_progress": in_progress,
            "complete": self._closed,
        }

    def _write_manifest(self) -> None:
        _write_json(self.manifest_path, self._manifest())


# --------------------------------------------------------------------------- loading
def _malformed(path: str, what: str) -> ConfigurationError:
    return ConfigurationError(f"{path} is not a well-formed trajectory manifest: {what}; record the run again "
                              "with srcproj.TrajectoryRecorder (a manifest is not meant to be edited)")


def read_manifest(path: str | os.PathLike) -> tuple[str, dict]:
    """``(manifest file, its content)`` of a recorded run, checked for its format."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ConfigurationError(
            f"no trajectory manifest at {path!r}; give the {MANIFEST_NAME} a TrajectoryRecorder (or the Hugging "
            "Face SrcprojCallback) wrote, or its directory")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _malformed(path, f"it cannot be read as JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise _malformed(path, f"it has no \"format\": \"{MANIFEST_FORMAT}\" entry")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _malformed(path, f"format_version is {version!r}")
    if version > MANIFEST_VERSION:
        raise ConfigurationError(
            f"{path} has trajectory manifest format version {version}, written by a newer srcproj "
            f"({manifest.get('library_version', 'unknown')}); this srcproj reads versions up to {MANIFEST_VERSION}: "
            "upgrade srcproj")
    return path, manifest


def _spec_from_description(description: Any, path: str) -> OptimizerSpec:
    try:
        groups = tuple(ParamGroup(tuple(g["params"]), g["weight_decay"], g["lr_scale"])
                       for g in description["groups"])
        kind = description["kind"]
        if kind == "sgd":
            return SGD(momentum=description["momentum"], dampening=description["dampening"],
                       nesterov=description["nesterov"], weight_decay=description["weight_decay"], groups=groups)
        if kind in ("adam", "adamw"):
            return Adam(betas=tuple(description["betas"]), eps=description["eps"],
                        weight_decay=description["weight_decay"], decoupled=bool(description["decoupled"]),
                        groups=groups)
        raise _malformed(path, f"the optimizer kind {kind!r} is unknown")
    except (KeyError, TypeError, ConfigurationError) as exc:
        if isinstance(exc, ConfigurationError) and "not a well-formed" in str(exc):
            raise
        raise _malformed(path, f"its optimizer description does not describe an optimizer ({exc!r})") from None


def _without_names(description: Mapping) -> dict:
    out = {k: v for k, v in description.items() if k != "groups"}
    out["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in description.get("groups", ())]
    return out


def load_trajectory(path: str | os.PathLike, data: Mapping[str, Any], optimizer: Any = None, *,
                    verify: bool = True, task: Any = None) -> Any:
    """The :class:`~srcproj.Trajectory` of a recorded run (its completed segments).

    Parameters
    ----------
    path : path
        The ``manifest.json`` a :class:`TrajectoryRecorder` wrote, or its directory.
    data : mapping
        ``{stage name: data set}`` for every stage that has a completed segment, each
        checked against the recorded number of examples and fingerprint.
    optimizer : torch.optim optimizer, optional
        The live optimizer of the run; by default the recorded description (SGD, Adam or
        AdamW, with its parameter groups by name) is used.
    verify : bool
        Check every checkpoint file against the SHA-256 recorded when it was written.
    task : Task, optional
        The task the recorder was given, when it batches examples itself (a
        :class:`~srcproj.language_models.LanguageModelTask` pads ragged sequences): the
        data are read, and fingerprinted, as it reads them.
    """
    from .trajectory import Segment, Trajectory

    path, manifest = read_manifest(path)
    root = os.path.dirname(path)
    try:
        stages = {s["name"]: s for s in manifest["stages"]}
        for stage in stages.values():
            int(stage["examples"]), str(stage["fingerprint"])
        records = list(manifest["segments"])
        description = manifest["optimizer"]["description"]
        batch_size = manifest["batch_size"]
        for record in records:
            if record["stage"] not in stages or not isinstance(record["checkpoints"], list):
                raise KeyError(record["stage"])
            record["steps"], list(record["lr"])
            for checkpoint in record["checkpoints"]:
                if not isinstance(checkpoint["file"], str) or not isinstance(checkpoint["sha256"], str):
                    raise TypeError("a checkpoint's file and sha256 must be strings")
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed(path, f"an entry is missing or of the wrong type ({exc!r})") from None
    if not records:
        raise ConfigurationError(
            f"{path} records no completed segment: the run stopped (or is still running) before the end of its "
            "first segment; train at least one segment, or cut the run into shorter segments")
    if not isinstance(data, Mapping):
        raise ConfigurationError(
            f"data is a {type(data).__name__}; give a dict {{stage name: data set}} with the recorded stages "
            f"{sorted(stages)}")
    needed = list(dict.fromkeys(r["stage"] for r in records))
    unknown = [n for n in data if n not in stages]
    if unknown:
        raise ConfigurationError(f"data names {unknown} that the run did not record; its stages are "
                                 f"{sorted(stages)}")
    missing = [n for n in needed if n not in data]
    if missing:
        raise ConfigurationError(
            f"no data given for stage(s) {missing}; give data={{name: data set}} for every recorded stage with "
            f"a completed segment ({needed})")
    for name in needed:
        stage = stages[name]
        if task is None and stage.get("collated_by"):
            raise ConfigurationError(
                f"stage {name!r} was recorded with a {stage['collated_by']} batching its examples (it pads ragged "
                "sequences), so its data are read and fingerprinted that way: pass the same task, "
                "load_trajectory(..., task=...) or Trajectory.from_manifest(..., task=...)")
        keys = task if task is not None else SimpleNamespace(input_key=stage.get("input_key"),
                                                             target_key=stage.get("target_key"))
        source = ExampleSource(data[name], f"the data given for stage {name!r}", keys)
        if len(source) != int(stage["examples"]):
            raise DataError(
                f"the data given for stage {name!r} has {len(source)} examples, the stage trained on "
                f"{stage['examples']}; give the data set the stage trained on, in the same order")
        if source.fingerprint() != stage["fingerprint"]:
            raise DataError(
                f"the data given for stage {name!r} are not the examples the stage trained on (same number of "
                f"examples, {len(source)}, but other contents or order: fingerprint {source.fingerprint()}, "
                f"recorded {stage['fingerprint']}); give the data set the stage trained on, unshuffled and "
                "unchanged")
    segments = []
    for index, record in enumerate(records):
        files = []
        for checkpoint in record["checkpoints"]:
            file = os.path.join(root, checkpoint["file"])
            where = f"segment {index} (stage {record['stage']!r})"
            if not os.path.isfile(file):
                raise CheckpointMismatchError(
                    f"{where}: its checkpoint file {file!r} is missing; the manifest needs every checkpoint the "
                    "recorder wrote beside it (copy the whole directory)")
            if verify and _file_sha256(file) != checkpoint["sha256"]:
                raise CheckpointMismatchError(
                    f"{where}: the checkpoint file {file!r} changed after it was recorded (its SHA-256 differs from "
                    "the manifest's); restore the file the recorder wrote, or record the run again")
            files.append(file)
        segments.append(Segment(files, steps=record["steps"], lr=[float(r) for r in record["lr"]],
                                data=data[record["stage"]]))
    spec = _spec_from_description(description, path)
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigurationError(f"optimizer is a {type(optimizer).__name__}; give the run's live torch.optim "
                                     "optimizer, or None to use the recorded description")
        optimizer = unwrap_optimizer(optimizer)
        given = describe_torch_optimizer(optimizer)[0]
        if given.kind != description.get("kind"):
            raise ConfigurationError(
                f"the optimizer given is {type(optimizer).__name__} ({given.kind}), the run recorded "
                f"{manifest['optimizer'].get('class')} ({description.get('kind')}); give the run's optimizer, or "
                "none to use the recorded description")
        differences = metadata_differences(_without_names(description), _without_names(given.describe()),
                                           ("recorded", "given"))
        if differences:
            raise ConfigurationError(f"the optimizer given is not the one the run recorded ({differences}); give "
                                     "the run's optimizer, or none to use the recorded description")
    return Trajectory(segments, optimizer=spec if optimizer is None else optimizer, batch_size=batch_size)
