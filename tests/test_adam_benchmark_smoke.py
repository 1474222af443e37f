"""The AdamW LDS benchmark (benchmarks/adam_scenarios.py, adam_lds.py) at toy size.

- the stacked, hand-written AdamW of the ground truth is torch.optim.AdamW (+ LambdaLR);
- the schedule, its compression under the same-epochs protocol, the segments;
- the ground truth is cached, and a model depends only on its own mask and seed;
- the runner end to end (its SGD columns always; its AdamW columns once srcproj has
  ``Trajectory(optimizer=...)``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("sklearn")

import adam_scenarios as asc  # noqa: E402


@pytest.fixture(scope="module")
def cosine():
    return asc.make_scenario("adamw-cosine")


@pytest.fixture(scope="module")
def twostage():
    return asc.make_scenario("adamw-twostage")


@pytest.mark.parametrize("name", asc.SCENARIOS)
def test_stacked_adamw_is_torch_adamw(name):
    """One model trained both ways for 30 steps (warm-up, both groups, a stage change for
    twostage when stopped later): the same parameters up to float round-off."""
    scenario = asc.make_scenario(name)
    torch.manual_seed(123)  # neither trainer may depend on the global RNG
    steps = 30
    run = asc.train_run(scenario, seed=5, stop_after=steps)
    assert len(run.lrs) == steps
    torch.manual_seed(999)
    stacked = asc.train_models(scenario, np.ones((1, scenario.num_targets), bool), np.array([5]), stop_after=steps)
    state = asc.sc.state_dicts(stacked)[0]
    start = asc.make_mlp(asc.HIDDEN, 5).state_dict()
    for key in asc.NAMES:
        assert torch.allclose(state[key], run.final[key], atol=1e-5, rtol=0), key
        assert (state[key] - start[key]).abs().max() > 1e-3  # they did train
    # Biases are not decayed, weights are: a group mix-up would show in the weights' norm.
    groups = asc.make_optimizer(asc.make_mlp(asc.HIDDEN)).param_groups
    assert [g["weight_decay"] for g in groups] == [asc.WEIGHT_DECAY, 0.0]
    assert [len(g["params"]) for g in groups] == [2, 2]


def test_stacked_adamw_with_subsets_matches_torch(twostage):
    """A subset under the epochs protocol (compressed schedule) through the stage change."""
    mask = np.zeros(twostage.num_targets, bool)
    mask[np.random.default_rng(0).choice(twostage.num_targets, twostage.num_targets // 2, replace=False)] = True
    steps = twostage.stage_steps("epochs")[0] + 10  # 10 steps into stage 2
    run = asc.train_run(twostage, seed=3, mask=mask, protocol="epochs", stop_after=steps)
    stacked = asc.train_models(twostage, mask[None], np.array([3]), "epochs", stop_after=steps)
    state = asc.sc.state_dicts(stacked)[0]
    for key in asc.NAMES:
        assert torch.allclose(state[key], run.final[key], atol=1e-5, rtol=0), key


def test_schedule_and_protocols(cosine, twostage):
    full = cosine.stage_steps()
    half = cosine.stage_steps("epochs")
    assert full == [449] and half == [224]
    rates = cosine.learning_rates(full)
    warm = round(asc.WARMUP * full[0])
    assert rates[warm - 1] == pytest.approx(cosine.peak_lr)
    assert np.all(np.diff(rates[:warm]) > 0) and np.all(np.diff(rates[warm:]) < 0)
    assert rates[-1] < 0.001 * cosine.peak_lr
    compressed = cosine.learning_rates(half)  # the same shape over half the steps
    assert len(compressed) == 224 and max(compressed) == pytest.approx(cosine.peak_lr)
    assert sum(compressed) == pytest.approx(sum(rates) / 2, rel=0.02)
    # twostage: only stage 1 (the target) is shortened; constant after the warm-up.
    assert twostage.stage_steps("epochs")[1] == twostage.stage_steps()[1]
    assert twostage.learning_rates(twostage.stage_steps())[-1] == twostage.peak_lr
    # 3 segments, 2 checkpoints each (the middle and the end of each stretch).
    assert len(cosine.segment_bounds(full)) == 3 and len(twostage.segment_bounds(twostage.stage_steps())) == 3
    assert cosine.checkpoint_steps(full) == [75, 150, 224, 299, 374, 449]


def test_attributed_run_segments(twostage):
    run = asc.attributed_run(twostage, seed=1)
    assert run.test_accuracy > 0.8
    assert len(run.run.checkpoints) == 6
    assert set(run.run.checkpoints[0]) == {"model", "optimizer"}
    assert run.run.checkpoints[0]["optimizer"]["state"][0]["exp_avg_sq"].shape == (asc.HIDDEN, 64)
    steps = run.segments("steps")
    epochs = run.segments("epochs")
    assert [s.steps for s in steps] == [84, 84, 90] and [s.steps for s in epochs] == [42, 42, 90]
    assert sum(len(s.lr) for s in steps) == len(run.run.lrs) and steps[0].lr[0] == run.run.lrs[0]
    assert epochs[2].lr == steps[2].lr  # stage 2 is not shortened
    scaled = run.segments("steps", time_scale=5.0)
    assert scaled[1].total_lr == pytest.approx(5 * steps[1].total_lr)
    bare = run.segments("steps", model_only=True)
    assert set(bare[0].checkpoints[0]) == set(asc.NAMES)
    # Checkpoints are copies: the later training did not move the saved moments.
    first, last = run.run.checkpoints[0], run.run.checkpoints[-1]
    assert not torch.equal(first["model"]["0.weight"], last["model"]["0.weight"])
    assert not torch.equal(first["optimizer"]["state"][0]["exp_avg_sq"], last["optimizer"]["state"][0]["exp_avg_sq"])


def test_ground_truth_cache_and_independence(tmp_path, cosine):
    from srcproj.eval import draw_subsets, retrain

    masks = draw_subsets(cosine.num_targets, 3, 0.5, seed=0)
    fn = asc.GroundTruthFn("adamw-cosine", "epochs")
    together = retrain(fn, masks, [0, 1], tmp_path / "gt", progress=False, models_per_call=6)
    assert together.shape == (3, 2, len(cosine.queries[1]))
    assert len(list((tmp_path / "gt").glob("*.npy"))) == 6
    # Another grouping (one model per call) gives the same models.
    alone = np.stack([np.stack([fn(m[None], np.array([s]))[0] for s in (0, 1)]) for m in masks])
    assert np.allclose(together, alone, atol=1e-4)
    # Retrained subsets are real models: most margins of the test queries are positive.
    assert (together > 0).mean() > 0.85
    again = retrain(lambda *_: 1 / 0, masks, [0, 1], tmp_path / "gt", progress=False, models_per_call=6)
    assert np.array_equal(again, together)


def _has_adam_api() -> bool:
    from srcproj import Trajectory

    try:
        model = asc.make_mlp(asc.HIDDEN)
        Trajectory([asc.Segment([model.state_dict()], 1, 1e-3, (torch.zeros(2, 64), torch.zeros(2).long()))],
                   optimizer=asc.make_optimizer(model))
    except TypeError:
        return False
    return True


@pytest.mark.slow
def test_runner_smoke(tmp_path):
    import adam_lds

    adam = _has_adam_api()
    methods = list(adam_lds.ALL_METHODS if adam else adam_lds.SGD_METHODS)
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "adam_lds.py"), "--smoke", "--scenarios", "adamw-cosine",
         "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress", "--methods", *methods],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    entry = results["scenarios"]["adamw-cosine"]
    assert entry["test_accuracy"] > 0.9
    for protocol in ("steps", "epochs"):
        rows = entry["lds"][protocol]
        assert set(rows) == {*methods, "same label"}
        for row in rows.values():
            assert -1 <= row["single"] <= 1 and row["single_ci"][0] <= row["single_ci"][1]
            assert row["ensemble_ci"][0] <= row["ensemble_ci"][1]
        ranked = sorted(rows, key=lambda m: -rows[m]["single"])
        assert rows[ranked[0]]["single_paired"]["vs_next"]["other"] == ranked[1]
        assert "vs_next" not in rows[ranked[-1]]["single_paired"]
        # Everything is seeded; even at 12 subsets x 2 seeds SOURCE tracks retraining.
        assert rows["SOURCE as SGD"]["single"] > 0.1
        if adam:
            assert rows[adam_lds.DEFAULT]["single"] > 0.1
            assert "vs_default" in rows["IF"]["single_paired"]
    # The ground truth went to the cache: scenario x protocols x 12 subsets x 2 seeds.
    assert len(list((tmp_path / "cache" / "ground_truth" / "adamw-cosine").rglob("*.npy"))) == 2 * 12 * 2
