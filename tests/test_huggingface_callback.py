"""The Hugging Face Trainer callback records a run: one optimizer step per step with
gradient accumulation, the scheduler's per-step rates, the batch size, the optimizer's
groups; the recorded trajectory featurizes and scores."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from srcproj import Attributor, ClassificationTask, Trajectory  # noqa: E402
from srcproj.errors import ConfigurationError  # noqa: E402
from srcproj.integrations.huggingface import SrcprojCallback  # noqa: E402
from srcproj.recorder import MANIFEST_NAME  # noqa: E402

N, LENGTH, VOCAB = 24, 8, 30
MAX_STEPS, WARMUP, PEAK = 24, 4, 1e-3


def tiny_bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=LENGTH, num_labels=2,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def examples(n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    labels = (ids[:, 0] > VOCAB // 2).long()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def linear_with_warmup(step: int) -> float:
    """transformers' "linear" schedule, written out: the rate optimizer step ``step`` uses."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    return PEAK * max(0.0, (MAX_STEPS - step) / (MAX_STEPS - WARMUP))


@pytest.mark.slow
def test_the_callback_records_a_trainer_run_with_a_scheduler_and_gradient_accumulation(tmp_path):
    train = examples(N, seed=1)
    model = tiny_bert()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=MAX_STEPS, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=PEAK, lr_scheduler_type="linear", warmup_steps=WARMUP,
        weight_decay=0.01, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0)
    callback = SrcprojCallback(tmp_path / "run", segments=3, checkpoints_per_segment=2)
    micro_batches = []

    class CountBatches(transformers.TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):
            micro_batches.append(state.global_step)

    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, callbacks=[callback, CountBatches()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert trainer.state.global_step == MAX_STEPS
    assert len(micro_batches) == MAX_STEPS  # accumulation 2: each optimizer step took one more (non-sync) batch

    manifest = json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["steps"] == MAX_STEPS and manifest["skipped_steps"] == 0
    assert manifest["batch_size"] == 4 * 2 * 1  # per device x accumulation x world size
    assert [s["steps"] for s in manifest["segments"]] == [8, 8, 8]
    assert [[c["step"] for c in s["checkpoints"]] for s in manifest["segments"]] == [[4, 8], [12, 16], [20, 24]]
    rates = [r for s in manifest["segments"] for r in s["lr"]]
    expected = [linear_with_warmup(t) for t in range(MAX_STEPS)]
    assert rates == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert rates[0] == 0.0 and rates[WARMUP] == pytest.approx(PEAK)
    description = manifest["optimizer"]["description"]
    assert description["kind"] == "adamw" and [g["weight_decay"] for g in description["groups"]] == [0.01, 0.0]
    no_decay = description["groups"][1]["params"]
    assert "classifier.bias" in no_decay and all("bias" in n or "LayerNorm" in n for n in no_decay)
    named = [n for n, _ in model.named_parameters()]
    assert sorted(description["groups"][0]["params"] + no_decay) == sorted(named)

    trajectory = Trajectory.from_manifest(tmp_path / "run", data={"train": train})
    assert trajectory.batch_size == 8 and trajectory.spec.kind == "adamw"
    assert [s.steps for s in trajectory.segments] == [8, 8, 8]
    final = torch.load(trajectory.segments[-1].checkpoints[-1], weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(final["model"][key], value.cpu()), key
    assert all(int(entry["step"]) == MAX_STEPS for entry in final["optimizer"]["state"].values())

    attr = Attributor(model, ClassificationTask(), trajectory, tmp_path / "s.zarr", proj_dim=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = attr.featurize(batch_size=8, progress=False)
        scores = attr.score(examples(3, seed=2))
    assert report.preconditioner == "optimizer state"
    assert scores.shape == (3, N) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_the_callback_refuses_a_resumed_run(tmp_path):
    state = transformers.TrainerState()
    state.global_step = 5
    with pytest.raises(ConfigurationError, match="training resumes at step 5; a resumed run cannot be recorded"):
        SrcprojCallback(tmp_path).on_train_begin(None, state, None, model=tiny_bert(), optimizer=None)
