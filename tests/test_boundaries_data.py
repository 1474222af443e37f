"""Inputs a user hands over that used to change scores silently or fail with another library's error.

Each test fails without its fix: data sets grouped by identity instead of content, a
one-shot iterator of learning rates consumed by validation, float16 rows flushed to
zero or overflowing, examples given as pairs or dicts, ``proj_dim`` above the number of
parameters, and devices that do not exist.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_scores_close
from torch.utils.data import Dataset

from srcproj import ClassificationTask, ConfigurationError, DataError, Segment, Trajectory
from srcproj.data import ExampleSource
from srcproj.layout import decode_float16_rows, encode_float16_rows

pytestmark = pytest.mark.usefixtures("single_thread")


def _two_segments(run, first_data, second_data) -> Trajectory:
    return Trajectory([Segment(run.checkpoints[:1], 5, 0.1, first_data),
                       Segment(run.checkpoints[1:], 5, 0.1, second_data)])


# ---------------------------------------------------------------- 1. data sets by content
def test_segments_with_equal_data_share_examples(tiny_run, tmp_path):
    shared = tiny_run.attributor(tmp_path / "same.zarr", _two_segments(tiny_run, tiny_run.data, tiny_run.data))
    shared.featurize(progress=False)
    # The way users write it: a fresh (X, y) tuple per segment, even fresh tensors.
    copies = _two_segments(tiny_run, (tiny_run.X, tiny_run.y), (tiny_run.X.clone(), tiny_run.y.clone()))
    written = tiny_run.attributor(tmp_path / "copies.zarr", copies)
    written.featurize(progress=False)
    assert written.context.data_groups == [0, 0]
    assert_scores_close(written.score(tiny_run.queries), shared.score(tiny_run.queries))


def test_segments_with_other_data_stay_apart(tiny_run, tmp_path):
    changed = tiny_run.X.clone()
    changed[17, 3] += 1.0
    attr = tiny_run.attributor(tmp_path / "other.zarr", _two_segments(tiny_run, tiny_run.data, (changed, tiny_run.y)))
    assert attr.context.data_groups == [0, 1]
    with pytest.raises(ConfigurationError, match="different data sets"):
        attr.context.selection([0, 1])


def test_fingerprint_is_the_same_for_every_form_of_the_data(tiny_run):
    pairs = [(tiny_run.X[i], tiny_run.y[i]) for i in range(len(tiny_run.y))]
    dicts = [{"x": tiny_run.X[i], "y": tiny_run.y[i]} for i in range(len(tiny_run.y))]
    prints = {ExampleSource(d, "data").fingerprint() for d in (tiny_run.data, pairs, dicts)}
    assert len(prints) == 1


# ---------------------------------------------------------------- 2. one-shot learning rates
def test_per_step_learning_rates_from_an_iterator_are_kept(tiny_run, tmp_path):
    rates = [0.05, 0.15] * 5
    from_list = Trajectory([Segment(tiny_run.checkpoints, 10, rates, tiny_run.data)])
    from_iterator = Trajectory([Segment(tiny_run.checkpoints, 10, iter(rates), tiny_run.data)])
    assert from_iterator.segment_time(0) == pytest.approx(1.0)
    assert from_iterator.segment_time(0) == from_list.segment_time(0)
    gen = Trajectory([Segment(tiny_run.checkpoints, 10, (r for r in rates), tiny_run.data)])
    assert gen.segment_time(0) == pytest.approx(1.0)
    a = tiny_run.attributor(tmp_path / "list.zarr", from_list)
    a.featurize(progress=False)
    b = tiny_run.attributor(tmp_path / "iter.zarr", from_iterator)
    b.featurize(progress=False)
    assert_scores_close(b.score(tiny_run.queries), a.score(tiny_run.queries))


def test_too_few_rates_from_an_iterator_are_refused(tiny_run):
    with pytest.raises(ConfigurationError, match="3 per-step learning rates for 10 steps"):
        Trajectory([Segment(tiny_run.checkpoints, 10, iter([0.1] * 3), tiny_run.data)])


# ---------------------------------------------------------------- 3. float16 at any magnitude
@pytest.mark.parametrize("exponent", [-40, -20, 0, 20, 40])
def test_float16_rows_keep_their_relative_precision(exponent):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 64)) * np.exp(rng.uniform(-3, 3, (50, 1))) * 2.0 ** exponent
    rows[7] = 0.0
    stored, scale = encode_float16_rows(rows)
    assert stored.dtype == np.float16 and scale.dtype == np.float32
    assert np.isfinite(stored).all()
    back = decode_float16_rows(stored, scale).astype(np.float64)
    peak = np.abs(rows).max(axis=1, keepdims=True)
    # float16 rounds to half an ulp, 2^-11 of the row's largest entry at most.
    assert np.all(np.abs(back - rows) <= 2.0 ** -11 * peak + 1e-300)
    np.testing.assert_array_equal(back[7], 0.0)
    # Every row uses float16's normal range: its largest entry is in [2^14, 2^15].
    nonzero = np.abs(stored.astype(np.float64)).max(axis=1)[np.arange(50) != 7]
    assert np.all((nonzero >= 2.0 ** 14) & (nonzero <= 2.0 ** 15))


def test_rows_beyond_float32_are_refused():
    from srcproj import StoreError

    with pytest.raises(StoreError, match="beyond float32's range"):
        encode_float16_rows(np.full((2, 4), 1e300))


class _ScaledLoss(ClassificationTask):
    """Cross-entropy times a constant: every gradient is scaled by it."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def loss(self, outputs, targets):
        return self.factor * super().loss(outputs, targets)

    def output_hessian(self, outputs, targets):
        return self.factor * super().output_hessian(outputs, targets)

    def describe(self) -> dict:
        return {**super().describe(), "factor": self.factor}


@pytest.mark.parametrize("exponent", [-40, 40])
def test_float16_features_of_tiny_and_huge_gradients(tiny_run, tmp_path, exponent):
    from srcproj import Attributor

    def features(dtype: str) -> np.ndarray:
        attr = Attributor(tiny_run.model, _ScaledLoss(2.0 ** exponent), tiny_run.trajectory(),
                          tmp_path / f"{dtype}.zarr", proj_dim=16, feature_dtype=dtype, chunk_size=16)
        attr.featurize(progress=False)
        return attr.checkpoint_features(0).astype(np.float64)

    exact, half = features("float32"), features("float16")
    peak = np.abs(exact).max(axis=1, keepdims=True)
    assert np.all(peak > 0)
    assert np.all(np.abs(half - exact) <= 2.0 ** -10 * peak)


# ---------------------------------------------------------------- 7. examples as pairs and dicts
class _DictDataset(Dataset):
    """A torch Dataset yielding dicts, as a Hugging Face data set formatted for torch does."""

    def __init__(self, X, y, input_key="pixel_values", target_key="label"):
        self.X, self.y, self.keys = X, y, (input_key, target_key)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {self.keys[0]: self.X[i], self.keys[1]: self.y[i], "idx": i}


class _NamedKeys(ClassificationTask):
    input_key = "image_embedding"
    target_key = "fine_label"


def test_pairs_and_dicts_are_read_as_examples(tiny_run, tmp_path):
    reference = tiny_run.attributor(tmp_path / "ref.zarr")
    reference.featurize(progress=False)
    expected = reference.score(tiny_run.queries)
    pairs = [(tiny_run.X[i], tiny_run.y[i]) for i in range(len(tiny_run.y))]
    hf_like = _DictDataset(tiny_run.X, tiny_run.y)
    lists = [{"x": tiny_run.X[i].tolist(), "y": int(tiny_run.y[i])} for i in range(len(tiny_run.y))]
    for name, data in [("pairs", pairs), ("hf", hf_like), ("lists", lists)]:
        attr = tiny_run.attributor(tmp_path / f"{name}.zarr", tiny_run.trajectory(data=data))
        attr.featurize(progress=False)
        assert_scores_close(attr.score(tiny_run.queries), expected)
    query_pairs = [(tiny_run.Xq[i], tiny_run.yq[i]) for i in range(len(tiny_run.yq))]
    assert_scores_close(reference.score(query_pairs), expected)


def test_the_task_names_the_keys_of_dict_examples(tiny_run):
    data = _DictDataset(tiny_run.X, tiny_run.y, "image_embedding", "fine_label")
    with pytest.raises(DataError, match=r"keys \['image_embedding', 'fine_label', 'idx'\].*input_key"):
        ExampleSource(data, "segment 0's data", ClassificationTask()).rows(0, 4)
    x, y = ExampleSource(data, "segment 0's data", _NamedKeys()).rows(0, 4)
    torch.testing.assert_close(x, tiny_run.X[:4])
    torch.testing.assert_close(y, tiny_run.y[:4])
    wrong = type("Wrong", (_NamedKeys,), {"target_key": "coarse_label"})()
    with pytest.raises(DataError, match="target_key='coarse_label' is not a key"):
        ExampleSource(data, "segment 0's data", wrong).rows(0, 4)
    with pytest.raises(ConfigurationError, match=r"_NumericKey.input_key=3; it must be a key"):
        ExampleSource(data, "data", type("_NumericKey", (ClassificationTask,), {"input_key": 3})())
    ambiguous = [{"x": tiny_run.X[0], "input": tiny_run.X[0], "y": tiny_run.y[0]}]
    with pytest.raises(DataError, match="several"):
        ExampleSource(ambiguous, "the query set").rows(0, 1)


def test_the_kind_of_data_is_decided_by_type_not_length(tiny_run):
    two_pairs = [(tiny_run.X[0], tiny_run.y[0]), (tiny_run.X[1], tiny_run.y[1])]
    source = ExampleSource(two_pairs, "data")
    assert len(source) == 2
    torch.testing.assert_close(source.rows(0, 2)[0], tiny_run.X[:2])
    # A list [X, y] is a list of two examples, each an array: refused with the fix.
    with pytest.raises(DataError, match=r"example 0 is a Tensor, not an \(x, y\) pair.*tuple \(X, y\)"):
        ExampleSource([tiny_run.X, tiny_run.y], "data").rows(0, 2)
    with pytest.raises(DataError, match="tuple"):
        ExampleSource((tiny_run.X, tiny_run.y.tolist()), "data")
    with pytest.raises(DataError, match="example 0 is a tuple of 3 items"):
        ExampleSource([(tiny_run.X[0], tiny_run.y[0], 1)], "data").rows(0, 1)
    with pytest.raises(DataError, match="is a dict"):
        ExampleSource({"x": tiny_run.X, "y": tiny_run.y}, "data")
    with pytest.raises(DataError, match="is empty"):
        ExampleSource([], "data")


def test_examples_that_do_not_stack_name_them(tiny_run):
    ragged = [(tiny_run.X[i][: 8 - i % 2], tiny_run.y[i]) for i in range(8)]
    with pytest.raises(DataError, match=r"examples 0, 1, 2, 3, 4, \.\.\. cannot be stacked"):
        ExampleSource(ragged, "data").take(np.arange(8))
    with pytest.raises(DataError, match=r"examples 0\.\.3 cannot be stacked"):
        ExampleSource(ragged, "data").rows(0, 4)


def test_unconvertible_dict_values_name_the_fix(tiny_run):
    with pytest.raises(DataError, match="with_format"):
        ExampleSource([{"x": object(), "y": 1}], "data").rows(0, 1)


def test_a_reopened_store_takes_pairs_or_a_dict_of_segments(tiny_run, tmp_path):
    from srcproj import Attributor, StoreMismatchError

    changed = tiny_run.X.flip(0), tiny_run.y.flip(0)
    attr = tiny_run.attributor(tmp_path / "two.zarr", _two_segments(tiny_run, tiny_run.data, changed))
    attr.featurize(progress=False)
    pairs = [(tiny_run.X[i], tiny_run.y[i]) for i in range(len(tiny_run.y))]
    task = ClassificationTask()
    first = Attributor.open(tmp_path / "two.zarr", tiny_run.model, task, data=pairs)
    np.testing.assert_allclose(first.self_influence(), attr.self_influence(), rtol=1e-6)
    second = Attributor.open(tmp_path / "two.zarr", tiny_run.model, task, data={1: changed})
    np.testing.assert_allclose(second.self_influence(segments=[1]), attr.self_influence(segments=[1]), rtol=1e-6)
    with pytest.raises(StoreMismatchError, match="segment 1's data is not the data"):
        Attributor.open(tmp_path / "two.zarr", tiny_run.model, task, data={1: pairs})
    with pytest.raises(ConfigurationError, match="data names segment 2; the store has segments 0..1"):
        Attributor.open(tmp_path / "two.zarr", tiny_run.model, task, data={2: pairs})


# ---------------------------------------------------------------- 8. proj_dim above p
def test_proj_dim_above_the_parameter_count_warns(tiny_run, tmp_path):
    num_params = sum(p.numel() for p in tiny_run.model.parameters())
    with pytest.warns(UserWarning, match=rf"proj_dim=100 exceeds the {num_params} attributed.*proj_dim <= {num_params}"):
        tiny_run.attributor(tmp_path / "big.zarr", proj_dim=100)


# ---------------------------------------------------------------- 6. devices that do not exist
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_the_library_error(tiny_run, tmp_path):
    with pytest.raises(ConfigurationError, match="CUDA is not available.*device='cpu'"):
        tiny_run.attributor(tmp_path / "cuda.zarr", device="cuda")


def test_a_device_that_is_not_a_device(tiny_run, tmp_path):
    with pytest.raises(ConfigurationError, match="not a torch device"):
        tiny_run.attributor(tmp_path / "bad.zarr", device="gpu please")
