"""Where srcproj meets the user's model: precision, checkpoint identity, outputs, mode.

* 16-bit gradients are projected with float32 sums (a bfloat16 sum over p = 2·10⁵
  parameters is off by ~3e-3), in every projector.
* A checkpoint's digest covers every entry: one changed weight is a new checkpoint.
* A model may return a tuple, a dict or a ``ModelOutput``-like object: the task's
  ``model_outputs`` picks the tensor, everywhere the output is read.
* Models are attributed in eval mode unless the task says ``model_mode = "train"``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import IN_FEATURES, NUM_CLASSES
from torch import Tensor, nn

from srcproj import Attributor, ClassificationTask, ConfigurationError, KroneckerProjector, RademacherProjector
from srcproj.gradients import GradientComputer, GradientPieces, ProjectedGradients
from srcproj.projection import MatrixProjector, accumulation_dtype
from srcproj.tasks import default_model_outputs

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_PARAMS = 200_000


# ---------------------------------------------------------------------------- precision
def _relative_error(have: Tensor, want: Tensor) -> float:
    return float((have.to(torch.float64) - want).norm() / want.norm())


def _half_dtypes() -> list[torch.dtype]:
    dtypes = [torch.bfloat16]
    try:  # float16 matmuls exist on most CPUs' builds; skip where they do not
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        dtypes.append(torch.float16)
    except RuntimeError:
        pass
    return dtypes


def _rows(dtype: torch.dtype, num_params: int = NUM_PARAMS, batch: int = 4, seed: int = 0) -> Tensor:
    """Gradient rows rounded to ``dtype`` (their exact values are the float64 of the rounded ones)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_params, generator=generator, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", _half_dtypes())
def test_rademacher_projects_16_bit_gradients_with_float32_sums(dtype):
    rows = _rows(dtype)
    projector = RademacherProjector(64, seed=3)
    want = projector.project(rows.to(torch.float64))
    have = projector.project(rows)
    assert have.dtype == torch.float32
    assert _relative_error(have, want) < 1e-5  # summed in 16 bits: ~3e-3
    # Column pieces (the hook backends' path) take the same float32 sums.
    sizes = [1000, 50_000, NUM_PARAMS - 51_000]
    pieces = list(torch.split(rows, sizes, dim=1))
    assert _relative_error(projector.project_pieces(pieces), want) < 1e-5
    lazy = GradientPieces(sizes, pieces.__getitem__, rows.shape[0], dtype, rows.device)
    assert _relative_error(projector.project_pieces(lazy), want) < 1e-5


def test_rademacher_regenerated_blocks_sum_in_float32_too():
    """Past the tile cache the blocks are regenerated into a scratch buffer: same sums."""
    rows = _rows(torch.bfloat16, num_params=40_000)
    projector = RademacherProjector(64, seed=1, cache_bytes=0)
    projector.BLOCK_BYTES = 64 * 512 * 4 * 8  # 8 tiles per block: several regenerated blocks
    have = projector.project(rows)
    want = RademacherProjector(64, seed=1).project(rows.to(torch.float64))
    assert have.dtype == torch.float32 and _relative_error(have, want) < 1e-5


@pytest.mark.parametrize("dtype", _half_dtypes())
def test_matrix_projector_sums_16_bit_gradients_in_float32(dtype):
    rows = _rows(dtype, num_params=50_000)
    matrix = torch.randn(32, 50_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    projector = MatrixProjector(matrix)
    have = projector.project(rows)
    assert have.dtype == torch.float32
    assert _relative_error(have, rows.to(torch.float64) @ matrix.to(torch.float32).to(torch.float64).T) < 1e-5


def _bound_kronecker(proj_dim: int = 64) -> tuple[nn.Module, KroneckerProjector]:
    model = nn.Sequential(nn.Linear(400, 500), nn.Tanh(), nn.Linear(500, 3), nn.LayerNorm(3))
    projector = KroneckerProjector(proj_dim, seed=1)
    projector.bind(model)
    return model, projector


@pytest.mark.parametrize("dtype", _half_dtypes())
def test_kronecker_projects_16_bit_rows_with_float32_sums(dtype):
    model, projector = _bound_kronecker()
    num_params = sum(p.numel() for p in model.parameters())  # 202,009: layers and dense LayerNorm
    rows = _rows(dtype, num_params=num_params)
    want = projector.project(rows.to(torch.float64))
    have = projector.project(rows)
    assert have.dtype == torch.float32
    assert _relative_error(have, want) < 1e-5


@pytest.mark.parametrize("dtype", _half_dtypes())
def test_kronecker_layer_factors_are_projected_with_float32_sums(dtype):
    """The factored path: ``Σ_t (P_out δ_t)(P_in a_t)ᵀ`` from 16-bit inputs and output gradients."""
    model, projector = _bound_kronecker()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 7, 400, generator=generator, dtype=torch.float64).to(dtype)  # 7 positions
    delta = torch.randn(4, 7, 500, generator=generator, dtype=torch.float64).to(dtype)
    module = model[0]

    def features(inputs: Tensor, deltas: Tensor) -> Tensor:
        projected = projector.project_inputs(0, module, inputs)
        return projector.layer_features(0, [projected], [deltas], batch=4, dtype=inputs.dtype, device=inputs.device)

    want = features(x.to(torch.float64), delta.to(torch.float64))
    have = features(x, delta)
    assert have.dtype == torch.float32
    assert _relative_error(have, want) < 1e-5


def test_accumulation_dtype_keeps_32_and_64_bit_gradients_as_they_are():
    assert accumulation_dtype(torch.float32) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float16) == torch.float32
    rows = _rows(torch.float64, num_params=3000)
    assert RademacherProjector(16).project(rows).dtype == torch.float64
    assert RademacherProjector(16).project(rows.to(torch.float32)).dtype == torch.float32


# ---------------------------------------------------------------------------- checkpoint digest
def test_checkpoint_digest_sees_every_entry():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 3))
    model[1].to(torch.bfloat16)  # any dtype is hashed by its bytes
    computer = GradientComputer(model, ClassificationTask())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    digest = computer.checkpoint_digest(state)
    assert computer.checkpoint_digest({k: v.clone() for k, v in state.items()}) == digest
    changed = {k: v.clone() for k, v in state.items()}
    changed["0.weight"][37, 59] += 1e-3  # one entry of 10,000 (an odd flat index)
    assert computer.checkpoint_digest(changed) != digest
    changed = {k: v.clone() for k, v in state.items()}
    changed["1.weight"][2, 99] = -changed["1.weight"][2, 99] + 1
    assert computer.checkpoint_digest(changed) != digest
    # The same values in another dtype are another checkpoint.
    assert computer.checkpoint_digest({**state, "0.bias": state["0.bias"].double()}) != digest


# ---------------------------------------------------------------------------- model outputs
@dataclass
class _Output:
    """A stand-in for a transformers ModelOutput."""

    logits: Tensor
    hidden: Tensor | None = None


class _TupleMLP(nn.Sequential):
    def forward(self, x):
        out = super().forward(x)
        return out, out.detach().sum(-1)


class _DictMLP(nn.Sequential):
    def forward(self, x):
        out = super().forward(x)
        return {"hidden": out * 2, "logits": out}


class _ObjectMLP(nn.Sequential):
    def forward(self, x):
        out = super().forward(x)
        return _Output(logits=out, hidden=out.detach())


class _NamedMLP(nn.Sequential):
    def forward(self, x):
        return {"scores": super().forward(x)}


class _ScoresTask(ClassificationTask):
    """A task that reads another key of the model's output."""

    def model_outputs(self, output):
        return output["scores"]


def _featurized_scores(run, store, model, task=None, **kwargs) -> np.ndarray:
    attr = Attributor(model, task or ClassificationTask(), run.trajectory(), store, proj_dim=16, seed=0,
                      feature_dtype="float32", chunk_size=16, **kwargs)
    attr.featurize(progress=False)
    return attr.score(run.queries)


@pytest.mark.parametrize("projector", ["rademacher", "kronecker"])
@pytest.mark.parametrize("wrapper", [_TupleMLP, _DictMLP, _ObjectMLP])
def test_models_returning_tuples_dicts_and_model_outputs_are_attributed(tiny_run, tmp_path, projector, wrapper):
    def make():
        return KroneckerProjector(16, seed=0) if projector == "kronecker" else None

    plain = _featurized_scores(tiny_run, tmp_path / "plain.zarr", tiny_run.model, projector=make(), hessian="exact")
    model = wrapper(*copy.deepcopy(tiny_run.model))
    scores = _featurized_scores(tiny_run, tmp_path / "wrapped.zarr", model, projector=make(), hessian="exact")
    np.testing.assert_array_equal(scores, plain)


def test_sampled_fisher_reads_the_outputs_of_a_tuple(tiny_run, tmp_path):
    plain = _featurized_scores(tiny_run, tmp_path / "plain.zarr", tiny_run.model, hessian="fisher")
    scores = _featurized_scores(tiny_run, tmp_path / "tuple.zarr", _TupleMLP(*copy.deepcopy(tiny_run.model)),
                                hessian="fisher")
    np.testing.assert_array_equal(scores, plain)


def test_a_task_can_pick_its_own_output(tiny_run, tmp_path):
    plain = _featurized_scores(tiny_run, tmp_path / "plain.zarr", tiny_run.model)
    model = _NamedMLP(*copy.deepcopy(tiny_run.model))
    with pytest.raises(ConfigurationError, match=r"keys \['scores'\].*Override ClassificationTask.model_outputs"):
        Attributor(model, ClassificationTask(), tiny_run.trajectory(), tmp_path / "refused.zarr", proj_dim=16)
    np.testing.assert_array_equal(_featurized_scores(tiny_run, tmp_path / "named.zarr", model, _ScoresTask()), plain)


class _Returns(nn.Sequential):
    def __init__(self, value, *layers):
        super().__init__(*layers)
        self.value = value

    def forward(self, x):
        super().forward(x)
        return self.value


@pytest.mark.parametrize(("value", "name"), [("logits", "a str"), (None, "a NoneType"),
                                             ((None, 1), "a tuple whose first item is NoneType")])
def test_a_model_output_without_a_tensor_is_refused_naming_its_type(tiny_run, tmp_path, value, name):
    model = _Returns(value, *copy.deepcopy(tiny_run.model))
    with pytest.raises(ConfigurationError, match=f"returned {name}.*Task.model_outputs"):
        Attributor(model, ClassificationTask(), tiny_run.trajectory(), tmp_path / "s.zarr", proj_dim=16)


def test_default_model_outputs():
    t = torch.ones(2, 3)
    assert default_model_outputs(t) is t
    assert default_model_outputs((t, None)) is t and default_model_outputs([t]) is t
    assert default_model_outputs({"logits": t, "loss": None}) is t
    assert default_model_outputs(_Output(t)) is t
    with pytest.raises(ConfigurationError, match=r"a list whose first item is nothing"):
        default_model_outputs([])


# ---------------------------------------------------------------------------- model mode
class _Recorder(nn.Module):
    """Identity that records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


class _TrainModeTask(ClassificationTask):
    model_mode = "train"


def _remapped(checkpoints: list[dict], names: dict[str, str]) -> list[dict]:
    return [{names.get(k, k): v for k, v in state.items()} for state in checkpoints]


def test_dropout_is_off_by_default_and_features_are_deterministic(tiny_run, tmp_path):
    hidden = tiny_run.model[0].out_features
    model = nn.Sequential(nn.Linear(IN_FEATURES, hidden), nn.Dropout(0.5), nn.Tanh(), nn.Linear(hidden, NUM_CLASSES))
    model.train()  # left in training mode by the user: attributed in eval mode anyway
    checkpoints = _remapped(tiny_run.checkpoints, {"2.weight": "3.weight", "2.bias": "3.bias"})
    runs = []
    for i in range(2):
        attr = Attributor(model, ClassificationTask(), tiny_run.trajectory(checkpoints=checkpoints),
                          tmp_path / f"dropout{i}.zarr", proj_dim=16, feature_dtype="float32", chunk_size=16)
        attr.featurize(progress=False)
        runs.append((attr.checkpoint_features(-1), attr.score(tiny_run.queries)))
    assert model.training and model[1].training  # the user's mode is restored
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    plain = _featurized_scores(tiny_run, tmp_path / "plain.zarr", tiny_run.model)
    np.testing.assert_array_equal(runs[0][1], plain)  # dropout off: the model without it


def _recording_model(run) -> nn.Sequential:
    net = copy.deepcopy(run.model)
    return nn.Sequential(net[0], _Recorder(), net[1], net[2])


def test_model_mode_train_runs_the_model_in_training_mode(tiny_run, tmp_path):
    checkpoints = _remapped(tiny_run.checkpoints, {"2.weight": "3.weight", "2.bias": "3.bias"})
    for task, mode in [(ClassificationTask(), False), (_TrainModeTask(), True)]:
        model = _recording_model(tiny_run)
        recorder = model[1]
        computer = GradientComputer(model, task)
        trainable, fixed = computer.split(checkpoints[-1], torch.device("cpu"))
        with computer.evaluating():
            computer.forward(trainable, fixed, tiny_run.X[:3])
            gradients = ProjectedGradients(computer, RademacherProjector(16))
            gradients.features(trainable, fixed, tiny_run.X[:3], tiny_run.y[:3])
        assert recorder.seen and set(recorder.seen) == {mode}
        assert model.training and recorder.training  # a new module's training mode, restored
        # Through the Attributor: every forward that computes features runs in that mode
        # (binding checks the layers' structure in eval mode).
        recorder.seen.clear()
        attr = Attributor(model, task, tiny_run.trajectory(checkpoints=checkpoints), tmp_path / f"{mode}.zarr",
                          proj_dim=16, feature_dtype="float32", chunk_size=16)
        attr.featurize(progress=False)
        assert (True in recorder.seen) if mode else (True not in recorder.seen)


def test_model_mode_is_recorded_only_when_it_is_not_eval():
    assert ClassificationTask().describe() == {"class": "srcproj.tasks.ClassificationTask"}
    assert _TrainModeTask().describe()["model_mode"] == "train"


def test_an_unknown_model_mode_is_refused_when_the_computer_is_built(tiny_run):
    class Task(ClassificationTask):
        model_mode = "training"

    with pytest.raises(ConfigurationError, match=r"Task.model_mode='training'; choose one of \('eval', 'train'\)"):
        GradientComputer(tiny_run.model, Task())


class _ConvNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3))


@pytest.mark.parametrize("projector", ["rademacher", "kronecker"])
def test_train_mode_batch_norm_uses_each_example_s_own_statistics(projector):
    """Per-example gradients in training mode: BatchNorm normalizes each example with its
    own statistics (a batch of one), never touching the checkpoint's running statistics."""
    torch.manual_seed(0)
    model = _ConvNet().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved = {k: v.clone() for k, v in state.items()}
    x = torch.randn(4, 2, 5, 5)
    y = torch.tensor([0, 1, 2, 1])
    proj = KroneckerProjector(24, seed=2) if projector == "kronecker" else RademacherProjector(24, seed=2)
    computer = GradientComputer(model, _TrainModeTask())
    gradients = ProjectedGradients(computer, proj)
    trainable, fixed = computer.split(state, torch.device("cpu"))
    gradients.bind({**trainable, **fixed}, x[:2])
    with computer.evaluating():
        have = gradients.features(trainable, fixed, x, y)
        jacobians, _ = gradients.output_features(trainable, fixed, x)
    assert not model.training and model[1].track_running_stats  # restored
    for k, v in state.items():
        assert torch.equal(v, saved[k]), k  # the checkpoint's buffers are untouched

    # By hand: the module in training mode on one example at a time, without running statistics.
    reference = copy.deepcopy(model)
    reference.load_state_dict(saved)
    reference.train()
    reference[1].track_running_stats = False
    rows = []
    for b in range(4):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[b:b + 1]), y[b:b + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in reference.parameters()]))
    want = proj.project(torch.stack(rows))
    np.testing.assert_allclose(have.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)
    with computer.running("eval"):
        eval_features = gradients.features(trainable, fixed, x, y)
    assert not torch.allclose(eval_features, have, rtol=1e-3)
    assert jacobians.shape == (4, 3, 24)


def test_train_mode_dropout_draws_a_mask_per_example(tiny_run):
    hidden = tiny_run.model[0].out_features
    model = nn.Sequential(nn.Linear(IN_FEATURES, hidden), nn.Dropout(0.5), nn.Tanh(), nn.Linear(hidden, NUM_CLASSES))
    state = _remapped(tiny_run.checkpoints, {"2.weight": "3.weight", "2.bias": "3.bias"})[-1]
    computer = GradientComputer(model, _TrainModeTask())
    gradients = ProjectedGradients(computer, RademacherProjector(16))
    trainable, fixed = computer.split(state, torch.device("cpu"))
    x, y = tiny_run.X[:8], tiny_run.y[:8]
    with computer.evaluating():
        first = gradients.features(trainable, fixed, x, y)
        second = gradients.features(trainable, fixed, x, y)
    assert torch.isfinite(first).all() and not torch.equal(first, second)
