"""Train the digits MLP with AdamW and record the run for the srcproj pipeline.

    python train.py config.toml

The model and the training data are the config's own entry points, so the recorded run
and the pipeline's commands see the same examples. The run (two segments of two
checkpoints, AdamW with a decaying learning rate) is recorded into the config's
``trajectory.manifest`` directory by ``srcproj.TrajectoryRecorder``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from srcproj import ClassificationTask, TrajectoryRecorder
from srcproj.config import load_config

STEPS, BATCH, LR = 240, 64, 3e-3


def main(config_path: str) -> None:
    config = load_config(config_path)
    model, data = config.build_model(), config.dataset("train")
    X = torch.stack([example["x"] for example in data])
    y = torch.tensor([example["label"] for example in data])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.2, total_iters=STEPS)
    generator = torch.Generator().manual_seed(0)
    with TrajectoryRecorder(model, optimizer, config.trajectory.manifest, batch_size=BATCH,
                            task=ClassificationTask(), overwrite=True) as recorder:
        recorder.stage("train", data, steps=STEPS, segments=2)
        for _ in range(STEPS):
            index = torch.randperm(len(y), generator=generator)[:BATCH]  # a fresh uniform draw per step
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(X[index]), y[index]).backward()
            optimizer.step()
            recorder.step()
            scheduler.step()
    print(f"recorded {STEPS} AdamW steps in 2 segments to {config.trajectory.manifest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "config.toml")
