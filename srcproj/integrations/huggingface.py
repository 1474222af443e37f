"""Recording a Hugging Face ``Trainer`` run as a SOURCE trajectory.

``transformers`` is an optional extra (``pip install srcproj[hf]``); this module is the
only one that imports it, and ``import srcproj`` does not import this module::

    from srcproj.integrations.huggingface import SrcprojCallback

    trainer = Trainer(model, args, train_dataset=train, callbacks=[SrcprojCallback("run-trajectory", segments=3)])
    trainer.train()
    trajectory = srcproj.Trajectory.from_manifest("run-trajectory", data={"train": train})

One optimizer step is one step (with gradient accumulation, a step takes
``gradient_accumulation_steps`` batches); the learning rate of each step is the one the
optimizer used, read after it stepped and before the scheduler moved it; the batch size
is ``train_batch_size × gradient_accumulation_steps × world_size``. Only the main process
records.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigurationError
from ..recorder import TrajectoryRecorder

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "srcproj.integrations.huggingface needs transformers (and accelerate, which Trainer uses): "
        "pip install 'srcproj[hf]'") from exc

__all__ = ["SrcprojCallback"]


class SrcprojCallback(TrainerCallback):
    """A ``TrainerCallback`` that records the run with a :class:`~srcproj.TrajectoryRecorder`.

    Parameters
    ----------
    directory : path
        Where the checkpoints and ``manifest.json`` go.
    segments : int
        The run's optimizer steps (``state.max_steps``: ``args.max_steps`` or the
        computed total) are cut into this many segments of nearly equal length.
    segment_every : int, optional
        Instead of ``segments``: a segment every this many optimizer steps (e.g. the
        optimizer steps of an epoch).
    checkpoints_per_segment : int
        Checkpoints saved in each segment, evenly spaced, the last at its end.
    data : data set, optional
        What the run trained on, as srcproj reads data (:mod:`srcproj.data`); by default
        the train dataloader's ``dataset``.
    stage : str
        The stage's name: ``Trajectory.from_manifest(..., data={stage: dataset})``.
    task : Task, optional
        Names the input and target keys of the examples for the data's fingerprint.
    overwrite : bool
        Whether a directory holding a recorded run may be recorded into again.

    After training, ``callback.recorder`` is the recorder (``None`` on processes other
    than the main one).
    """

    def __init__(self, directory: str | os.PathLike, *, segments: int = 1, segment_every: int | None = None,
                 checkpoints_per_segment: int = 2, data: Any = None, stage: str = "train", task: Any = None,
                 overwrite: bool = False) -> None:
        self.directory = directory
        self.segments = segments
        self.segment_every = segment_every
        self.checkpoints_per_segment = checkpoints_per_segment
        self.data = data
        self.stage = stage
        self.task = task
        self.overwrite = overwrite
        self.recorder: TrajectoryRecorder | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if state.global_step != 0:
            raise ConfigurationError(
                f"SrcprojCallback: training resumes at step {state.global_step}; a resumed run cannot be recorded "
                "(its first steps are not in this process): record a run from its start")
        if model is None or optimizer is None:
            raise ConfigurationError("SrcprojCallback: the Trainer gave no model or optimizer at on_train_begin")
        data = self.data
        if data is None:
            data = getattr(train_dataloader, "dataset", None)
            if data is None:
                raise ConfigurationError("SrcprojCallback: the Trainer has no train dataloader with a dataset; give "
                                         "the training data: SrcprojCallback(..., data=train_dataset)")
        per_device = int(getattr(args, "train_batch_size", args.per_device_train_batch_size))
        batch_size = per_device * int(args.gradient_accumulation_steps) * int(args.world_size)
        self.recorder = TrajectoryRecorder(model, optimizer, self.directory, batch_size=batch_size,
                                           checkpoints_per_segment=self.checkpoints_per_segment, task=self.task,
                                           # fp16's GradScaler skips steps with inf gradients; otherwise a
                                           # skipped step means the hook is not on the optimizer that steps
                                           allow_skipped_steps=bool(getattr(args, "fp16", False)),
                                           overwrite=self.overwrite)
        if self.segment_every is not None:
            self.recorder.stage(self.stage, data, steps=int(state.max_steps), segment_every=self.segment_every)
        else:
            self.recorder.stage(self.stage, data, steps=int(state.max_steps), segments=self.segments)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.close()
