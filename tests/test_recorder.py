"""The trajectory recorder and its manifest: recorded runs equal hand-built ones (same
trajectory, same scores), a killed run loads its completed segments, and every bad
manifest or misuse is a clear error."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_source_math import classification_data, orthogonal, tiny_classifier

from srcproj import (
    Attributor,
    ClassificationTask,
    MatrixProjector,
    Segment,
    Trajectory,
    TrajectoryRecorder,
    load_trajectory,
)
from srcproj.errors import CheckpointMismatchError, ConfigurationError, DataError
from srcproj.optimizer import resolve_optimizer
from srcproj.recorder import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
WEIGHTS, BIASES = ["0.weight", "2.weight"], ["0.bias", "2.bias"]
DECAY, BATCH = 0.05, 4
# Stage "a": 12 steps in 2 segments; stage "b": 8 steps in 1 segment; 2 checkpoints per segment.
PLAN = [("a", 12, 2), ("b", 8, 1)]
CHECKPOINT_STEPS = [3, 6, 9, 12, 16, 20]
SEGMENT_STEPS = [(0, 6), (6, 12), (12, 20)]


def warmup(t: int) -> float:
    return min(1.0, (t + 1) / 4)


def recorded_run(kind: str, directory: Path):
    """One training run, recorded twice: by a TrajectoryRecorder and by hand (deep
    copies at the same steps, the rate each step used read before it)."""
    model = tiny_classifier(0)
    params = dict(model.named_parameters())
    if kind == "adamw":  # two groups: biases exempt from decay, at half the rate; a warm-up schedule
        optimizer = torch.optim.AdamW([{"params": [params[n] for n in WEIGHTS], "weight_decay": DECAY},
                                       {"params": [params[n] for n in BIASES], "weight_decay": 0.0, "lr": 0.01}],
                                      lr=0.02, betas=(0.9, 0.99))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5, weight_decay=DECAY)
        scheduler = None
    data = {"a": classification_data(12, seed=1), "b": classification_data(10, seed=2, shift=1.5)}
    task = ClassificationTask()
    recorder = TrajectoryRecorder(model, optimizer, directory, batch_size=BATCH, checkpoints_per_segment=2)
    generator = torch.Generator().manual_seed(0)
    hand: list[dict] = []
    rates: list[float] = []
    step = 0
    for name, steps, segments in PLAN:
        recorder.stage(name, data[name], steps=steps, segments=segments)
        X, y = data[name]
        for _ in range(steps):
            pick = torch.randperm(len(y), generator=generator)[:BATCH]
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            task.loss(model(X[pick]), y[pick]).mean().backward()
            optimizer.step()
            recorder.step()
            if scheduler is not None:
                scheduler.step()  # right after the step: the recorder keeps the rate the step used
            step += 1
            if step in CHECKPOINT_STEPS:
                hand.append({"model": copy.deepcopy(model.state_dict()),
                             "optimizer": copy.deepcopy(optimizer.state_dict())})
    recorder.close()
    stage_of = ["a", "a", "b"]
    if kind == "adamw":
        segments = [Segment(hand[2 * s:2 * s + 2], stop - start, rates[start:stop], data[stage_of[s]])
                    for s, (start, stop) in enumerate(SEGMENT_STEPS)]
        built = Trajectory(segments, optimizer=optimizer, batch_size=BATCH)
    else:  # as the quick start used to describe it: the mean rate, SGD's settings
        segments = [Segment([c["model"] for c in hand[2 * s:2 * s + 2]], stop - start, 0.05, data[stage_of[s]])
                    for s, (start, stop) in enumerate(SEGMENT_STEPS)]
        built = Trajectory(segments, momentum=0.5, weight_decay=DECAY, batch_size=BATCH)
    return model, optimizer, data, hand, rates, built


def assert_same_trajectory(model, recorded: Trajectory, built: Trajectory, hand, rates, kind):
    assert len(recorded.segments) == len(built.segments) == 3
    assert recorded.batch_size == built.batch_size == BATCH
    for s, (mine, theirs) in enumerate(zip(recorded.segments, built.segments, strict=True)):
        start, stop = SEGMENT_STEPS[s]
        assert mine.steps == theirs.steps == stop - start
        assert list(mine.lr) == rates[start:stop]  # the rate each step used, exactly
        assert mine.data is theirs.data
        assert mine.total_lr == pytest.approx(theirs.total_lr, rel=1e-12)
        assert [os.path.basename(c) for c in mine.checkpoints] == [
            f"ckpt-{t:08d}.pt" for t in CHECKPOINT_STEPS[2 * s:2 * s + 2]]
        for position, path in enumerate(mine.checkpoints):
            saved = torch.load(path, weights_only=True)
            reference = hand[2 * s + position]
            assert saved["model"].keys() == reference["model"].keys()
            for key, value in reference["model"].items():
                assert torch.equal(saved["model"][key], value), key
            groups = saved["optimizer"]["param_groups"]
            names = [n for g in groups for n in g["param_names"]]
            assert sorted(names) == sorted(NAMES)
            if kind == "adamw":
                order = [i for g in groups for i in g["params"]]
                by_name = dict(zip(names, order, strict=True))
                hand_order = [i for g in reference["optimizer"]["param_groups"] for i in g["params"]]
                hand_by_name = dict(zip(WEIGHTS + BIASES, hand_order, strict=True))
                for name in NAMES:
                    entry = saved["optimizer"]["state"][by_name[name]]
                    assert set(entry) == {"exp_avg", "exp_avg_sq", "step"}
                    for key in entry:
                        assert torch.equal(entry[key], reference["optimizer"]["state"][hand_by_name[name]][key])
            else:
                assert saved["optimizer"]["state"] == {}  # SGD's momentum buffers are not needed
    mine = resolve_optimizer(recorded.optimizer, model, NAMES)
    theirs = resolve_optimizer(built.optimizer if built.optimizer is not None else built.spec, model, NAMES)
    if kind == "adamw":  # the live optimizer's groups, named, equal the recorded description
        assert mine.spec.describe() == theirs.spec.describe()
    else:  # the hand-built SGD run has no groups; the recorded one has one group of every parameter
        assert mine.spec.describe() == {**theirs.spec.describe(), "groups": [
            {"params": NAMES, "weight_decay": DECAY, "lr_scale": 1.0}]}
    assert mine.weight_decay == theirs.weight_decay
    assert mine.lr_scale == theirs.lr_scale
    assert recorded.spec.kind == built.spec.kind
    assert recorded.spec.gain() == built.spec.gain()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_recorded_run_equals_the_hand_built_description(kind, tmp_path):
    model, optimizer, data, hand, rates, built = recorded_run(kind, tmp_path / "run")
    recorded = Trajectory.from_manifest(tmp_path / "run" / MANIFEST_NAME, data={"a": data["a"], "b": data["b"]})
    assert_same_trajectory(model, recorded, built, hand, rates, kind)
    if kind == "adamw":
        assert recorded.spec.describe()["groups"] == [
            {"params": WEIGHTS, "weight_decay": DECAY, "lr_scale": 1.0},
            {"params": BIASES, "weight_decay": 0.0, "lr_scale": 0.5}]
        assert rates[:4] == [0.005, 0.01, 0.015, 0.02]  # the warm-up is in the recorded rates
    else:
        assert recorded.spec.describe()["momentum"] == 0.5 and recorded.momentum == 0.5
    # The same scores: featurize both into their own stores.
    p = sum(v.numel() for v in model.parameters())
    task = ClassificationTask()
    queries = classification_data(5, seed=3)
    scores = []
    for name, trajectory in (("recorded", recorded), ("built", built)):
        attr = Attributor(model, task, trajectory, tmp_path / f"{name}.zarr",
                          projector=MatrixProjector(orthogonal(p, 5)[:8]), feature_dtype="float64",
                          chunk_size=8, hessian="exact")
        report = attr.featurize(batch_size=4, progress=False)
        if kind == "adamw":
            assert report.preconditioner == "optimizer state"
        scores.append((attr.score(queries), attr.score(queries, segments=[2])))
    assert np.abs(scores[0][0]).max() > 0 and scores[0][0].shape == (5, 12) and scores[0][1].shape == (5, 10)
    if kind == "adamw":  # the same checkpoints, rates and optimizer: the same numbers
        np.testing.assert_array_equal(scores[0][0], scores[1][0])
        np.testing.assert_array_equal(scores[0][1], scores[1][1])
    else:  # the hand-built run gives the mean rate: its segment time is rounded otherwise
        np.testing.assert_allclose(scores[0][0], scores[1][0], rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(scores[0][1], scores[1][1], rtol=1e-9, atol=1e-14)
    # The live optimizer may replace the recorded description.
    live = load_trajectory(tmp_path / "run", {"a": data["a"], "b": data["b"]}, optimizer=optimizer)
    assert live.optimizer is optimizer
    assert resolve_optimizer(live.optimizer, model, NAMES).weight_decay == \
        resolve_optimizer(recorded.optimizer, model, NAMES).weight_decay


# ---------------------------------------------------------------------- killed mid-run
KILLED_RUN = """
import sys, time, torch
from torch import nn
from srcproj import TrajectoryRecorder
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
generator = torch.Generator().manual_seed(1)
X, y = torch.randn(20, 3, generator=generator), torch.randint(0, 3, (20,), generator=generator)
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
recorder = TrajectoryRecorder(model, optimizer, sys.argv[1], batch_size=5)
recorder.stage("train", (X, y), steps=100000, segments=20000)
for step in range(100000):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(X[:5]), y[:5]).backward()
    optimizer.step()
    recorder.step()
    time.sleep(0.01)
"""


@pytest.mark.slow
def test_a_run_killed_with_sigkill_leaves_a_manifest_of_its_completed_segments(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(KILLED_RUN))
    directory = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(script), str(directory)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = directory / MANIFEST_NAME
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if manifest.exists() and len(json.loads(manifest.read_text())["segments"]) >= 2:
                break
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        else:
            pytest.fail("the training process completed no segment within 60 s")
        time.sleep(0.05)  # somewhere in the middle of the next segment
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    content = json.loads(manifest.read_text())
    assert content["complete"] is False and len(content["segments"]) >= 2
    generator = torch.Generator().manual_seed(1)
    X, y = torch.randn(20, 3, generator=generator), torch.randint(0, 3, (20,), generator=generator)
    trajectory = Trajectory.from_manifest(directory, data={"train": (X, y)})
    assert len(trajectory.segments) == len(content["segments"])
    assert all(s.steps == 5 and s.lr == (0.01,) * 5 for s in trajectory.segments)
    assert trajectory.spec.kind == "adam" and trajectory.batch_size == 5
    for index, segment in enumerate(trajectory.segments):
        assert [os.path.basename(c) for c in segment.checkpoints] == [
            f"ckpt-{5 * index + 2:08d}.pt", f"ckpt-{5 * index + 5:08d}.pt"]
        state = torch.load(segment.checkpoints[-1], weights_only=True)
        assert int(state["optimizer"]["state"][0]["step"]) == 5 * index + 5


# ---------------------------------------------------------------------- bad manifests
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A recorded two-stage SGD run: the directory, the model and the data."""
    directory = tmp_path_factory.mktemp("small") / "run"
    model = tiny_classifier(1)
    data = {"a": classification_data(10, seed=4), "b": classification_data(8, seed=5)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with TrajectoryRecorder(model, optimizer, directory) as recorder:
        for name in ("a", "b"):
            recorder.stage(name, data[name], steps=4)
            for _ in range(4):
                optimizer.zero_grad()
                ClassificationTask().loss(model(data[name][0]), data[name][1]).mean().backward()
                optimizer.step()
                recorder.step()
    return directory, model, data


def copy_of(small_run, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(small_run[0], target)
    return target


def test_the_small_run_loads(small_run):
    directory, model, data = small_run
    trajectory = load_trajectory(directory, data)
    assert [s.steps for s in trajectory.segments] == [4, 4]
    assert [os.path.basename(c) for s in trajectory.segments for c in s.checkpoints] == [
        "ckpt-00000002.pt", "ckpt-00000004.pt", "ckpt-00000006.pt", "ckpt-00000008.pt"]
    assert trajectory.batch_size is None and trajectory.spec.kind == "sgd"


def test_a_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match=r"no trajectory manifest at '.*nowhere'; give the manifest.json"):
        load_trajectory(tmp_path / "nowhere", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="no trajectory manifest at .*give the manifest.json a "
                                                 "TrajectoryRecorder"):
        Trajectory.from_manifest(tmp_path / "empty", data={})


def test_wrong_data_is_refused_with_the_stage_named(small_run):
    directory, _, data = small_run
    X, y = data["b"]
    changed = (X.clone(), y.clone())
    changed[0][3, 1] += 1e-6
    with pytest.raises(DataError, match=r"the data given for stage 'b' are not the examples the stage trained on "
                                        r"\(same number of examples, 8, but other contents or order"):
        load_trajectory(directory, {"a": data["a"], "b": changed})
    shuffled = (X.flip(0), y.flip(0))
    with pytest.raises(DataError, match="stage 'b' are not the examples.*unshuffled and unchanged"):
        load_trajectory(directory, {"a": data["a"], "b": shuffled})
    with pytest.raises(DataError, match="the data given for stage 'a' has 8 examples, the stage trained on 10"):
        load_trajectory(directory, {"a": data["b"], "b": data["b"]})
    # The same examples in another container are the same data.
    pairs = [(X[i], y[i]) for i in range(len(y))]
    assert len(load_trajectory(directory, {"a": data["a"], "b": pairs}).segments) == 2


def test_missing_or_unknown_data_names_are_refused(small_run):
    directory, _, data = small_run
    with pytest.raises(ConfigurationError, match=r"no data given for stage\(s\) \['b'\]; give data=\{name: data "
                                                 r"set\} for every recorded stage with a completed segment "
                                                 r"\(\['a', 'b'\]\)"):
        load_trajectory(directory, {"a": data["a"]})
    with pytest.raises(ConfigurationError, match=r"data names \['train'\] that the run did not record; its stages "
                                                 r"are \['a', 'b'\]"):
        load_trajectory(directory, {"a": data["a"], "b": data["b"], "train": data["a"]})
    with pytest.raises(ConfigurationError, match=r"data is a tuple; give a dict \{stage name: data set\}"):
        load_trajectory(directory, data["a"])


def test_an_edited_or_missing_checkpoint_file_is_refused(small_run, tmp_path):
    directory = copy_of(small_run, tmp_path)
    data = small_run[2]
    path = directory / "ckpt-00000006.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["0.bias"] += 1.0
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"segment 1 \(stage 'b'\): the checkpoint file .*"
                                                      r"ckpt-00000006.pt' changed after it was recorded \(its "
                                                      r"SHA-256 differs from the manifest's\)"):
        load_trajectory(directory, data)
    assert len(load_trajectory(directory, data, verify=False).segments) == 2
    path.unlink()
    with pytest.raises(CheckpointMismatchError, match=r"segment 1 \(stage 'b'\): its checkpoint file .*"
                                                      r"ckpt-00000006.pt' is missing; .*copy the whole directory"):
        load_trajectory(directory, data)


def edit_manifest(directory: Path, change) -> None:
    path = directory / MANIFEST_NAME
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def test_unknown_format_versions_and_malformed_manifests_are_refused(small_run, tmp_path):
    directory = copy_of(small_run, tmp_path)
    data = small_run[2]
    edit_manifest(directory, lambda m: m.update(format_version=2))
    with pytest.raises(ConfigurationError, match=r"has trajectory manifest format version 2, written by a newer "
                                                 r"srcproj \(0.1.0\); this srcproj reads versions up to 1: upgrade"):
        load_trajectory(directory, data)
    edit_manifest(directory, lambda m: m.update(format_version="1"))
    with pytest.raises(ConfigurationError, match="is not a well-formed trajectory manifest: format_version is '1'"):
        load_trajectory(directory, data)
    edit_manifest(directory, lambda m: m.update(format_version=1, format="something else"))
    with pytest.raises(ConfigurationError, match='no "format": "srcproj-trajectory" entry'):
        load_trajectory(directory, data)
    edit_manifest(directory, lambda m: (m.update(format="srcproj-trajectory"), m["segments"][0].pop("lr")))
    with pytest.raises(ConfigurationError, match=r"not a well-formed trajectory manifest: an entry is missing or of "
                                                 r"the wrong type \(KeyError\('lr'\)\)"):
        load_trajectory(directory, data)
    (directory / MANIFEST_NAME).write_text('{"format": "srcproj-traj')
    with pytest.raises(ConfigurationError, match="not a well-formed trajectory manifest: it cannot be read as JSON"):
        load_trajectory(directory, data)


def test_a_manifest_without_a_completed_segment_says_so(tmp_path):
    model = tiny_classifier(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = classification_data(6, seed=1)
    recorder = TrajectoryRecorder(model, optimizer, tmp_path / "run")
    recorder.stage("train", data, steps=10)
    for _ in range(3):
        optimizer.step()
        recorder.step()
    content = json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())
    assert content["segments"] == [] and content["in_progress"] is None  # the first checkpoint is due at step 5
    with pytest.raises(ConfigurationError, match="records no completed segment: the run stopped \\(or is still "
                                                 "running\\) before the end of its first segment"):
        load_trajectory(tmp_path / "run", {"train": data})
    for _ in range(2):
        optimizer.step()
        recorder.step()
    content = json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())
    assert content["segments"] == [] and content["in_progress"]["steps"] == 5
    assert [c["step"] for c in content["in_progress"]["checkpoints"]] == [5]


def test_a_live_optimizer_with_other_settings_is_refused(small_run):
    directory, model, data = small_run
    other = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ConfigurationError, match=r"the optimizer given is not the one the run recorded \(momentum: "
                                                 r"0.0 recorded, 0.9 given\)"):
        load_trajectory(directory, data, optimizer=other)
    with pytest.raises(ConfigurationError, match="optimizer is a str; give the run's live torch.optim optimizer"):
        load_trajectory(directory, data, optimizer="sgd")


# ---------------------------------------------------------------------- recording rules
def sgd_setup(tmp_path, **options):
    model = tiny_classifier(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, TrajectoryRecorder(model, optimizer, tmp_path / "run", **options)


def test_step_calls_must_match_optimizer_steps(tmp_path):
    model, optimizer, recorder = sgd_setup(tmp_path)
    data = classification_data(6, seed=1)
    with pytest.raises(ConfigurationError, match=r"the optimizer stepped before any stage was declared; call "
                                                 r"rec.stage\(name, data, steps=...\)"):
        optimizer.step()
        recorder.step()
    recorder.stage("train", data, steps=4)
    with pytest.raises(ConfigurationError, match=r"rec.step\(\) was called but the optimizer has not stepped since "
                                                 r"the last rec.step\(\).*allow_skipped_steps=True"):
        recorder.step()
    optimizer.step()
    optimizer.step()
    with pytest.raises(ConfigurationError, match=r"the optimizer stepped 2 times since the last rec.step\(\); call "
                                                 r"rec.step\(\) once right after each optimizer.step\(\)"):
        recorder.step()
    for _ in range(4):
        optimizer.step()
        recorder.step()
    optimizer.step()
    with pytest.raises(ConfigurationError, match="the optimizer stepped past the 4 steps of the declared stages; "
                                                 "declare the next stage"):
        recorder.step()
    optimizer.step()
    with pytest.raises(ConfigurationError, match=r"the optimizer stepped 1 time\(s\) after the last rec.step\(\)"):
        recorder.close()
    with pytest.raises(ConfigurationError, match="the recorder is closed"):
        recorder.step()


def test_skipped_steps_and_checkpoint_placement(tmp_path):
    """A step AMP's GradScaler skipped is not counted; checkpoints are evenly spaced with the
    last at the segment's end; an open-ended stage is cut every n steps."""
    model, optimizer, recorder = sgd_setup(tmp_path, allow_skipped_steps=True, checkpoints_per_segment=3)
    data = classification_data(6, seed=1)
    recorder.stage("warm", data, steps=10, segments=2)
    recorder.stage("long", data, segment_every=4, checkpoints_per_segment=2)
    for step in range(19):
        if step == 3:
            recorder.step()  # as after a GradScaler.step that skipped optimizer.step()
        optimizer.step()
        recorder.step()
    recorder.close()
    content = json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())
    assert content["skipped_steps"] == 1 and content["steps"] == 19 and content["complete"] is True
    checkpoints = [[c["step"] for c in s["checkpoints"]] for s in content["segments"]]
    # warm: 2 segments of 5 steps with 3 checkpoints; long: 4 steps with 2, the last cut short at step 19
    assert checkpoints == [[1, 3, 5], [6, 8, 10], [12, 14], [16, 18], [19]]
    assert [s["steps"] for s in content["segments"]] == [5, 5, 4, 4, 1]
    assert content["stages"][1]["steps"] == 9


def test_a_skipped_step_with_a_real_grad_scaler_is_not_counted(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    recorder = TrajectoryRecorder(model, optimizer, tmp_path / "run", allow_skipped_steps=True,
                                  checkpoints_per_segment=1)
    X, y = torch.randn(6, 3), torch.randn(6, 2)
    recorder.stage("train", (X, y), steps=3)
    for step in range(4):
        optimizer.zero_grad()
        loss = ((model(X) - y) ** 2).mean() * (float("inf") if step == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        recorder.step()
    recorder.close()
    content = json.loads((tmp_path / "run" / MANIFEST_NAME).read_text())
    assert content["skipped_steps"] == 1 and content["segments"][0]["steps"] == 3


def test_stages_switch_optimizers_only_with_the_same_settings(tmp_path):
    model, optimizer, recorder = sgd_setup(tmp_path)
    data = classification_data(6, seed=1)
    recorder.stage("one", data, steps=2)
    with pytest.raises(ConfigurationError, match="stage 'two' brings a new optimizer while the declared stages have "
                                                 "steps to go"):
        recorder.stage("two", data, steps=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(2):
        optimizer.step()
        recorder.step()
    with pytest.raises(ConfigurationError, match="stage 'two': the new optimizer is Adam, the recorded one SGD; a "
                                                 "trajectory has one optimizer"):
        recorder.stage("two", data, steps=2, optimizer=torch.optim.Adam(model.parameters(), lr=0.1))
    with pytest.raises(ConfigurationError, match=r"stage 'two': the new optimizer differs from the recorded one "
                                                 r"\(momentum: 0.0 recorded, 0.9 new\)"):
        recorder.stage("two", data, steps=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    fresh = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder.stage("two", data, steps=2, optimizer=fresh)
    for _ in range(2):
        optimizer.step()  # the old optimizer is no longer recorded
        fresh.step()
        recorder.step()
    recorder.close()
    trajectory = load_trajectory(tmp_path / "run", {"one": data, "two": data})
    assert [s.lr for s in trajectory.segments] == [(0.1, 0.1), (0.05, 0.05)]


def test_stage_and_recorder_arguments_are_checked(tmp_path):
    model, optimizer, recorder = sgd_setup(tmp_path)
    data = classification_data(6, seed=1)
    with pytest.raises(ConfigurationError, match="stage 'x' has neither steps nor segment_every"):
        recorder.stage("x", data)
    with pytest.raises(ConfigurationError, match="stage 'x': its segments of 1 steps cannot hold 2 checkpoints"):
        recorder.stage("x", data, steps=3, segments=3)
    with pytest.raises(DataError, match="stage 'x''s data is a dict"):
        recorder.stage("x", {"X": data[0]}, steps=4)
    recorder.stage("x", data, steps=4)
    with pytest.raises(ConfigurationError, match="stage 'x' is declared twice"):
        recorder.stage("x", data, steps=4)
    optimizer.step()
    recorder.step()
    with pytest.raises(ConfigurationError, match="stage 'x' has taken 1 of its 4 steps; declare stage 'y' when"):
        recorder.stage("y", data, steps=4)
    with pytest.raises(ConfigurationError, match="already holds a recorded run.*overwrite=True"):
        TrajectoryRecorder(model, optimizer, tmp_path / "run")
    with pytest.raises(ConfigurationError, match="the optimizer RMSprop is not covered"):
        TrajectoryRecorder(model, torch.optim.RMSprop(model.parameters()), tmp_path / "other")
    with pytest.raises(ConfigurationError, match="the optimizer holds 1 tensors that are not parameters of the model"):
        TrajectoryRecorder(model, torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1), tmp_path / "other")
    groups = torch.optim.SGD([{"params": [model[0].weight, model[0].bias]},
                              {"params": [model[2].weight, model[2].bias]}], lr=0.1)
    recorder = TrajectoryRecorder(model, groups, tmp_path / "groups")
    recorder.stage("x", data, steps=4)
    groups.param_groups[1]["lr"] = 0.3
    groups.step()
    with pytest.raises(ConfigurationError, match="SOURCE needs one schedule for every group"):
        recorder.step()
