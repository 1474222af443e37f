"""Language models from transformers (docs/math.md §9): tasks, tied weights, Conv1D hooks, LoRA.

Every number is checked against plain autograd one example at a time in float64, or
against explicit Gauss-Newton matrices built from the Hessian of the loss in the logits.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call

transformers = pytest.importorskip("transformers")

from srcproj import AdamW, Attributor, KroneckerProjector, RademacherProjector, Segment, Trajectory  # noqa: E402
from srcproj.curvature import ExactGaussNewton, SampledFisher  # noqa: E402
from srcproj.data import ExampleSource  # noqa: E402
from srcproj.errors import CheckpointMismatchError, ConfigurationError, DataError  # noqa: E402
from srcproj.gradients import (  # noqa: E402
    DenseHookBackend,
    GradientComputer,
    ProjectedGradients,
    VmapBackend,
    factored_layers,
)
from srcproj.language_models import LanguageModelTask, SequenceClassificationTask  # noqa: E402

VOCAB = 12


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, classes: int | None = None, dtype=torch.float64):
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    if classes is None:
        model = transformers.GPT2LMHeadModel(config)
    else:
        config.num_labels = classes
        model = transformers.GPT2ForSequenceClassification(config)
    return model.to(dtype).eval()


def sequences(count: int, seed: int = 0, lengths=(4, 9)) -> list[dict]:
    """Ragged token sequences as a Hugging Face data set yields them (lists)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(*lengths))
        ids = rng.integers(1, VOCAB, size=length).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length})
    return out


def autograd_rows(model, state, names, fn, ids: list[torch.Tensor], labels: list[torch.Tensor]) -> np.ndarray:
    """∇θ fn for each sequence alone (no padding), plain autograd over a flat float64 vector."""
    rows = []
    for x, y in zip(ids, labels, strict=True):
        leaves = {n: state[n].detach().clone().requires_grad_(True) for n in names}
        params = {**{k: v for k, v in state.items() if k not in leaves and k != "lm_head.weight"}, **leaves}
        out = functional_call(model, params, (x[None],)).logits
        grads = torch.autograd.grad(fn(out, y[None]).sum(), [leaves[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(leaves[n]) if g is None else g).reshape(-1)
                               for n, g in zip(names, grads, strict=True)]).numpy())
    return np.stack(rows)


def dense_matrix(projector, num_params: int, dtype) -> torch.Tensor:
    """The projector's k × p matrix, read off by projecting the identity."""
    return projector.project(torch.eye(num_params, dtype=dtype)).T


def as_pairs(examples: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ids = [torch.tensor(e["input_ids"]) for e in examples]
    labels = [torch.tensor(e.get("labels", e["input_ids"])) for e in examples]
    return ids, labels


# ---------------------------------------------------------------------------- the task itself
def test_loss_weights_and_masked_labels_match_hugging_face():
    """Σ_i loss_i / B with w = 1/T̄ is HF's own loss over a batch; -100 labels count for nothing."""
    model = tiny_gpt2()
    task = LanguageModelTask()
    examples = sequences(5, seed=1)
    examples[2]["labels"] = [-100, -100] + examples[2]["input_ids"][2:]  # a prompt without targets
    ids, labels = task.collate(examples, "data")
    task.calibrate([labels])
    targets = sum(int((torch.tensor(e.get("labels", e["input_ids"]))[1:] != -100).sum()) for e in examples)
    assert task.mean_target_tokens == pytest.approx(targets / 5)
    with torch.no_grad():
        logits = model(ids).logits
        ours = task.loss(logits, labels).mean()
        theirs = model(ids, labels=labels).loss  # HF: mean over every target token of the batch
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=1e-6)
    # The padding is masked: each sequence alone gives the same loss as in the batch (sum weighting).
    summed = LanguageModelTask("sum")
    with torch.no_grad():
        batch_losses = summed.loss(logits, labels)
        for i, e in enumerate(examples):
            x = torch.tensor(e["input_ids"])[None]
            y = torch.tensor(e.get("labels", e["input_ids"]))[None]
            torch.testing.assert_close(summed.loss(model(x).logits, y), batch_losses[i:i + 1])


def test_measurement_is_the_completion_log_probability():
    model = tiny_gpt2()
    task = LanguageModelTask()
    prompt, completion = [3, 5, 7], [2, 9, 4]
    example = {"input_ids": prompt + completion, "labels": [-100] * 3 + completion}
    ids, labels = task.collate([example], "queries")
    with torch.no_grad():
        value = task.measurement(model(ids).logits, labels)
        log_probs = torch.log_softmax(model(ids).logits[0], -1)
    expected = sum(float(log_probs[2 + j, token]) for j, token in enumerate(completion))
    assert float(value) == pytest.approx(expected, rel=1e-10)


def test_collate_pads_on_the_right_and_drops_masked_tokens():
    task = LanguageModelTask(pad_token_id=11)
    left_padded = {"input_ids": [11, 11, 4, 5, 6], "attention_mask": [0, 0, 1, 1, 1]}
    ids, labels = task.collate([left_padded, {"input_ids": [1, 2]}], "data")
    assert ids.tolist() == [[4, 5, 6], [1, 2, 11]]
    assert labels.tolist() == [[4, 5, 6], [1, 2, -100]]
    with pytest.raises(DataError, match="holes"):
        task.collate([{"input_ids": [1, 2, 3], "attention_mask": [1, 0, 1]}], "data")
    with pytest.raises(DataError, match="one label per token"):
        task.collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}], "data")
    with pytest.raises(DataError, match="no 'input_ids'"):
        task.collate([{"text": "hello"}], "data")
    with pytest.raises(ConfigurationError, match="token_weighting"):
        LanguageModelTask("mean")
    with pytest.raises(ConfigurationError, match="mean_target_tokens"):
        LanguageModelTask(mean_target_tokens=-1.0)
    with pytest.raises(ConfigurationError, match="only used with"):
        LanguageModelTask("sum", mean_target_tokens=4.0)


def test_ragged_data_is_fingerprinted_and_read_by_rows():
    task = LanguageModelTask()
    data = sequences(7, seed=2)
    source = ExampleSource(data, "data", task)
    x, y = source.rows(0, 7)
    assert x.shape == y.shape and x.shape[0] == 7
    assert source.fingerprint() == ExampleSource(list(data), "data", task).fingerprint()
    changed = copy.deepcopy(data)
    changed[3]["input_ids"][0] = (changed[3]["input_ids"][0] % (VOCAB - 1)) + 1
    assert ExampleSource(changed, "data", task).fingerprint() != source.fingerprint()


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend_kind", ["vmap", "hooks"])
def test_per_example_gradients_with_tied_weights_conv1d_and_embeddings(backend_kind):
    """Every attributed parameter (tied wte = embedding + output layer, Conv1D, LayerNorm,
    positions) against autograd one unpadded sequence at a time, in float64."""
    model = tiny_gpt2()
    task = LanguageModelTask("sum")
    computer = GradientComputer(model, task)
    assert "lm_head.weight" not in computer.param_names and "transformer.wte.weight" in computer.param_names
    assert computer.tied == {"lm_head.weight": "transformer.wte.weight"}
    state = model.state_dict()
    trainable, fixed = computer.split(state, torch.device("cpu"))
    examples = sequences(4, seed=3)
    x, y = task.collate(examples, "data")
    projector = RademacherProjector(32, seed=1)
    gradients = ProjectedGradients(computer, projector)
    if backend_kind == "hooks":
        gradients.bind({**trainable, **fixed}, x[:2])
        assert isinstance(gradients.backend, DenseHookBackend)
        kinds = {layer.kind for layer in gradients.backend.layers}
        assert kinds == {"conv1d"}  # lm_head's weight is the tied embedding: not a hooked layer
    else:
        assert isinstance(gradients.backend, VmapBackend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop" flood from attention under vmap
        features = gradients.features(trainable, fixed, x, y, "loss")
    ids, labels = as_pairs(examples)
    rows = autograd_rows(model, state, computer.param_names, task.loss, ids, labels)
    matrix = dense_matrix(projector, computer.num_params, torch.float64).numpy()
    np.testing.assert_allclose(features.numpy(), rows @ matrix.T, rtol=1e-7, atol=1e-9)


def test_conv1d_layers_are_factored_and_their_hooked_gradients_are_exact():
    from srcproj.gradients import LayerCapture, layer_inputs, layer_weight_grads

    model = tiny_gpt2()
    task = LanguageModelTask("sum")
    computer = GradientComputer(model, task)
    layers, others = factored_layers(model, computer.param_names)
    assert [layer.module for layer in layers][:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    layer = layers[0]
    assert (layer.kind, layer.d_in, layer.d_out) == ("conv1d", 8, 24)
    state = model.state_dict()
    trainable, fixed = computer.split(state, torch.device("cpu"))
    examples = sequences(3, seed=4)
    x, y = task.collate(examples, "data")
    capture = LayerCapture(model, [layer], lambda i, m, a: a.clone())
    outputs = capture.forward({**trainable, **fixed}, x)
    deltas = capture.backward(task.loss(outputs, y).sum())
    module = dict(model.named_modules())[layer.module]
    got = layer_weight_grads(layer, module, capture.inputs[0], deltas[0])
    assert layer_inputs(layer, module, capture.inputs[0][0]).shape[2] == 8
    ids, labels = as_pairs(examples)
    want = autograd_rows(model, state, [layer.weight], task.loss, ids, labels)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_kronecker_projection_of_conv1d_matches_its_dense_matrix():
    """The factored path (inputs and output gradients) and project() of flat rows agree."""
    model = tiny_gpt2()
    task = LanguageModelTask("sum")
    computer = GradientComputer(model, task)
    state = model.state_dict()
    trainable, fixed = computer.split(state, torch.device("cpu"))
    examples = sequences(3, seed=5)
    x, y = task.collate(examples, "data")
    projector = KroneckerProjector(64, seed=2)
    gradients = ProjectedGradients(computer, projector)
    gradients.bind({**trainable, **fixed}, x[:2])
    factored = gradients.features(trainable, fixed, x, y, "loss")
    rows = computer.per_example_grads(trainable, fixed, *computer.prepare(trainable, x, y), "loss")
    torch.testing.assert_close(factored, projector.project(rows), rtol=1e-9, atol=1e-10)


def test_untied_checkpoint_for_a_tied_model_is_refused():
    model = tiny_gpt2()
    computer = GradientComputer(model, LanguageModelTask())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(CheckpointMismatchError, match="ties them"):
        computer.load_checkpoint(state, "checkpoint 0")


def test_module_patterns_select_trainable_parameters():
    model = tiny_gpt2()
    computer = GradientComputer(model, LanguageModelTask(), modules=["*.mlp.*"])
    assert computer.param_names == [f"transformer.h.{i}.mlp.{m}.{p}" for i in range(2)
                                    for m in ("c_fc", "c_proj") for p in ("weight", "bias")]
    with pytest.raises(ConfigurationError, match="matches none"):
        GradientComputer(model, LanguageModelTask(), modules=["*.nothing"])


# ---------------------------------------------------------------------------- curvature
def explicit_gauss_newton(model, state, names, task, x, y) -> np.ndarray:
    """Σ_i J_iᵀ H_i J_i / n with H_i the Hessian of the loss in the logits (autograd's, not
    the task's output_hessian) and J_i the explicit Jacobian of the logits."""
    theta0 = torch.cat([state[n].reshape(-1) for n in names])
    total = np.zeros((theta0.numel(), theta0.numel()))

    def params_of(theta):
        out, offset = {k: v for k, v in state.items() if k != "lm_head.weight"}, 0
        for n in names:
            size = state[n].numel()
            out[n] = theta[offset:offset + size].reshape(state[n].shape)
            offset += size
        return out

    for i in range(x.shape[0]):
        def logits_of(theta, i=i):
            return functional_call(model, params_of(theta), (x[i:i + 1],)).logits.reshape(-1)

        jac = torch.autograd.functional.jacobian(logits_of, theta0)
        with torch.no_grad():
            logits = logits_of(theta0)
        hess = torch.autograd.functional.hessian(lambda z, i=i: task.loss(z.reshape(1, x.shape[1], -1),
                                                                           y[i:i + 1]).sum(), logits)
        total += (jac.T @ hess @ jac).numpy()
    return total / x.shape[0]


def test_exact_and_fisher_estimators_match_the_explicit_gauss_newton():
    """V = 12: the task's block-diagonal output Hessian with w_t = 1/T̄ (exact), and the
    Fisher of sampled tokens with √w_t (its mean over many draws), both = J^T H J."""
    model = tiny_gpt2()
    task = LanguageModelTask(mean_target_tokens=3.0)
    names = ["transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight"]
    computer = GradientComputer(model, task, param_names=names)
    state = model.state_dict()
    trainable, fixed = computer.split(state, torch.device("cpu"))
    examples = sequences(3, seed=6, lengths=(5, 6))  # one length: the explicit Jacobian needs no padding
    examples[1]["labels"] = [-100, -100] + examples[1]["input_ids"][2:]
    x, y = task.collate(examples, "data")
    want = explicit_gauss_newton(model, state, names, task, x, y)
    projector = RademacherProjector(12, seed=3)
    matrix = dense_matrix(projector, computer.num_params, torch.float64).numpy()
    want_projected = matrix @ want @ matrix.T
    gradients = ProjectedGradients(computer, projector)
    projected, outputs = gradients.output_features(trainable, fixed, x)
    rows = ExactGaussNewton(task).rows(projected, outputs, y)
    exact = (rows.T @ rows).numpy() / x.shape[0]
    np.testing.assert_allclose(exact, want_projected, rtol=1e-8, atol=1e-12)
    fisher = SampledFisher(task, samples=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = computer.forward(trainable, fixed, x)
    total, draws = np.zeros_like(exact), 3000
    for _ in range(draws):
        (sampled,) = fisher.sample_targets(logits, generator, y)
        assert bool((sampled[1, :2] == -100).all())  # the prompt keeps its -100
        g = fisher.rows([gradients.features(trainable, fixed, x, sampled, "sampled_loss")]).numpy()
        total += g.T @ g / x.shape[0]
    scale = np.abs(want_projected).max()
    np.testing.assert_allclose(total / draws, want_projected, atol=0.08 * scale)


# ---------------------------------------------------------------------------- the whole pipeline
def train_lm(model, data, task, steps=6, lr=0.02, batch=4, seed=0, checkpoint_every=3):
    """AdamW on HF's loss (model(..., labels=...).loss), checkpoints with optimizer state."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    checkpoints = []
    model.train()
    for step in range(steps):
        pick = torch.randperm(len(data), generator=generator)[:batch].tolist()
        ids, labels = task.collate([data[i] for i in pick], "data")
        optimizer.zero_grad()
        model(ids, labels=labels).loss.backward()
        optimizer.step()
        if (step + 1) % checkpoint_every == 0:
            checkpoints.append({"model": copy.deepcopy(model.state_dict()),
                                "optimizer": copy.deepcopy(optimizer.state_dict())})
    model.eval()
    return optimizer, checkpoints


def test_tiny_gpt2_through_the_whole_pipeline(tmp_path):
    """Dict examples of ragged lengths, tied weights, AdamW checkpoints: featurize, score
    completion-only queries, reopen with a fresh task (T̄ restored from the store)."""
    model = tiny_gpt2(dtype=torch.float32)
    task = LanguageModelTask()
    data = sequences(12, seed=7)
    optimizer, checkpoints = train_lm(model, data, task)
    trajectory = Trajectory([Segment(checkpoints, 6, 0.02, data)], optimizer=AdamW(weight_decay=0.01))
    attributor = Attributor(model, task, trajectory, tmp_path / "store", proj_dim=16)
    assert task.mean_target_tokens is not None
    report = attributor.featurize(batch_size=5, progress=False)
    assert report is not None
    queries = [{"input_ids": [3, 4, 5, 6, 7], "labels": [-100, -100, -100, 6, 7]},
               {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    scores = attributor.score(queries)
    assert scores.shape == (2, 12) and np.isfinite(scores).all()
    reopened = Attributor.open(tmp_path / "store", model, LanguageModelTask())
    np.testing.assert_allclose(reopened.score(queries), scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="task does not match"):
        Attributor.open(tmp_path / "store", model, LanguageModelTask(mean_target_tokens=99.0))


def test_sequence_classification_with_gpt2(tmp_path):
    model = tiny_gpt2(classes=3, dtype=torch.float32)
    task = SequenceClassificationTask(pad_token_id=0)
    rng = np.random.default_rng(8)
    data = [{"input_ids": rng.integers(1, VOCAB, size=int(rng.integers(3, 8))).tolist(), "label": int(i % 3)}
            for i in range(9)]
    x, y = task.collate(data[:3], "data")
    assert x.shape[0] == 3 and y.tolist() == [0, 1, 2]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    checkpoints = []
    for _ in range(2):
        ids, labels = task.collate(data, "data")
        optimizer.zero_grad()
        model(ids, labels=labels).loss.backward()
        optimizer.step()
        checkpoints.append({"model": copy.deepcopy(model.state_dict()),
                            "optimizer": copy.deepcopy(optimizer.state_dict())})
    trajectory = Trajectory([Segment(checkpoints, 2, 0.01, data)], optimizer=AdamW(weight_decay=0.01))
    attributor = Attributor(model, task, trajectory, tmp_path / "store", proj_dim=8)
    attributor.featurize(progress=False)
    assert np.isfinite(attributor.score(data[:2])).all()
    with pytest.raises(DataError, match="different lengths"):
        SequenceClassificationTask(causal=False).collate(data[:3], "data")


def test_lora_through_peft_attributes_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_gpt2(dtype=torch.float32)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    task = LanguageModelTask()
    computer = GradientComputer(model, task)
    assert computer.param_names and all("lora_" in n for n in computer.param_names)
    data = sequences(10, seed=9)
    optimizer, checkpoints = train_lm(model, data, task)
    trajectory = Trajectory([Segment(checkpoints, 6, 0.02, data)], optimizer=AdamW(weight_decay=0.01))
    attributor = Attributor(model, task, trajectory, tmp_path / "store", proj_dim=16)
    attributor.featurize(progress=False)
    # The stored features are the adapters' projected, preconditioned gradients: check the
    # raw gradients (no optimizer) against autograd at the last checkpoint.
    state = checkpoints[-1]["model"]
    trainable, fixed = computer.split(state, torch.device("cpu"))
    x, y = task.collate(data[:3], "data")
    projector = RademacherProjector(16, seed=0)
    gradients = ProjectedGradients(computer, projector)
    gradients.bind({**trainable, **fixed}, x[:2])
    features = gradients.features(trainable, fixed, x, y, "loss")
    rows = []
    for i in range(3):
        leaves = {n: trainable[n].clone().requires_grad_(True) for n in computer.param_names}
        xi, yi = task.collate(data[i:i + 1], "data")
        out = functional_call(model, {**fixed, **leaves}, (xi,)).logits
        grads = torch.autograd.grad(task.loss(out, yi).sum(), list(leaves.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    want = torch.stack(rows) @ dense_matrix(projector, computer.num_params, torch.float32).T
    torch.testing.assert_close(features, want, rtol=1e-4, atol=1e-6)
    assert np.isfinite(attributor.score(data[:2])).all()


# ---------------------------------------------------------------------------- errors and records
def test_bad_task_hooks_and_targets_are_named():
    from srcproj import Task

    class BadInputs(LanguageModelTask):
        def model_inputs(self, inputs):
            return {"input_ids": inputs}

    computer = GradientComputer(tiny_gpt2(), BadInputs())
    with pytest.raises(ConfigurationError, match=r"model_inputs returned a dict.*\(args, kwargs\)"):
        computer.inputs(torch.zeros(1, 3, dtype=torch.long))

    class BadCollate(LanguageModelTask):
        def collate(self, examples, what):
            return [torch.zeros(1)]

    with pytest.raises(ConfigurationError, match="collate\\(\\) returned a list"):
        ExampleSource(sequences(2), "data", BadCollate()).rows(0, 2)
    task = LanguageModelTask()
    with pytest.raises(DataError, match="negative label"):
        task.validate_targets(torch.tensor([[1, -5, 2]]), 30, "data")
    with pytest.raises(DataError, match="integer labels"):
        task.validate_targets(torch.zeros(2, 3), 30, "data")
    with pytest.raises(ConfigurationError, match="does not know the mean number of target tokens"):
        task.loss(torch.zeros(1, 3, VOCAB), torch.tensor([[1, 2, 3]]))
    with pytest.raises(DataError, match="no target tokens"):
        task.calibrate([torch.full((2, 4), -100)])
    with pytest.raises(DataError, match="has no 'label'"):
        SequenceClassificationTask().collate([{"input_ids": [1, 2]}], "data")
    with pytest.raises(ConfigurationError, match="pad_token_id"):
        SequenceClassificationTask(pad_token_id=1.5)
    with pytest.raises(ConfigurationError, match="no trainable parameters"):
        frozen = tiny_gpt2()
        frozen.transformer.ln_f.requires_grad_(False)
        GradientComputer(frozen, LanguageModelTask(), modules=["transformer.ln_f"])
    with pytest.raises(DataError, match="LanguageModelTask or SequenceClassificationTask"):
        ExampleSource([(torch.tensor([1, 2]), torch.tensor([1, 2])), (torch.tensor([1]), torch.tensor([1]))],
                      "data", Task.__new__(ClassificationTaskForTest)).rows(0, 2)


class ClassificationTaskForTest(LanguageModelTask.__mro__[1]):  # a plain Task: stacks pairs as they are
    def loss(self, outputs, targets):
        return outputs.sum(-1)

    def measurement(self, outputs, targets):
        return outputs.sum(-1)


def test_a_recorded_run_of_ragged_sequences_loads_with_its_task(tmp_path):
    from srcproj import TrajectoryRecorder

    model = tiny_gpt2(dtype=torch.float32)
    task = LanguageModelTask()
    data = sequences(8, seed=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    with TrajectoryRecorder(model, optimizer, tmp_path / "run", batch_size=4, task=task) as recorder:
        recorder.stage("text", data, steps=4)
        for step in range(4):
            ids, labels = task.collate(data[step * 2:step * 2 + 4], "batch")
            optimizer.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            recorder.step()
    trajectory = Trajectory.from_manifest(tmp_path / "run", data={"text": data}, task=task)
    assert len(trajectory.segments) == 1 and trajectory.segments[0].steps == 4
    with pytest.raises(ConfigurationError, match=r"LanguageModelTask batching its examples.*task=\.\.\."):
        Trajectory.from_manifest(tmp_path / "run", data={"text": data})


def test_hooked_conv1d_jacobians_equal_the_vmapped_ones():
    """The exact estimator's projected Jacobians through the Conv1D hooks (Σ_t δ_t a_tᵀ of
    every output, the weight transposed) equal vmap(jacrev)'s."""
    model = tiny_gpt2()
    task = LanguageModelTask("sum")
    computer = GradientComputer(model, task, modules=["transformer.h.1.mlp.c_fc", "transformer.ln_f"])
    trainable, fixed = computer.split(model.state_dict(), torch.device("cpu"))
    x, _ = task.collate(sequences(3, seed=11, lengths=(3, 5)), "data")
    gradients = ProjectedGradients(computer, RademacherProjector(24, seed=4))
    gradients.bind({**trainable, **fixed}, x[:2])
    assert isinstance(gradients.backend, DenseHookBackend)
    assert [layer.kind for layer in gradients.backend.layers] == ["conv1d"]
    have, outputs = gradients.output_features(trainable, fixed, x)
    want, want_outputs = VmapBackend(computer, gradients.projector).output_features(trainable, fixed, x)
    torch.testing.assert_close(have, want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(outputs, want_outputs)


def test_empirical_hessian_of_a_language_model_uses_sqrt_weights(tmp_path):
    """hessian="empirical": the stored Hessian is the mean outer product of the projected
    gradients of Σ_t √w_t ℓ_t at the true tokens (autograd, one sequence at a time), not
    of the loss features (which would carry w_t²)."""
    from srcproj import SGD

    model = tiny_gpt2()
    task = LanguageModelTask(mean_target_tokens=4.0)
    data = sequences(6, seed=12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trajectory = Trajectory([Segment([state], 3, 0.1, data)], optimizer=SGD(weight_decay=0.01))
    projector = RademacherProjector(10, seed=5)
    attributor = Attributor(model, task, trajectory, tmp_path / "store", projector=projector, hessian="empirical",
                            feature_dtype="float32")
    attributor.featurize(progress=False)
    names = attributor.computer.param_names
    ids, labels = as_pairs(data)
    rows = autograd_rows(model, state, names, task.sampled_loss, ids, labels)
    projected = rows @ dense_matrix(projector, attributor.computer.num_params, torch.float64).numpy().T
    np.testing.assert_allclose(attributor.checkpoint_hessian(0), projected.T @ projected / len(data),
                               rtol=1e-6, atol=1e-12)
    loss_rows = autograd_rows(model, state, names, task.loss, ids, labels)
    assert not np.allclose(rows, loss_rows)  # the check can tell the two apart


def test_sequence_mean_weighting_and_malformed_sequences():
    """token_weighting="sequence_mean": each sequence's loss is the mean of its target
    tokens' cross-entropies (w_t = 1/T_i), whatever the padding; malformed ids and masks
    are refused by name."""
    model = tiny_gpt2()
    task = LanguageModelTask("sequence_mean")
    examples = sequences(3, seed=13)
    ids, labels = task.collate(examples, "data")
    with torch.no_grad():
        batch = task.loss(model(ids).logits, labels)
        for i, e in enumerate(examples):
            x = torch.tensor(e["input_ids"])[None]
            theirs = model(x, labels=x).loss  # HF's mean over this one sequence's targets
            torch.testing.assert_close(batch[i], theirs.to(batch.dtype), rtol=1e-6, atol=1e-6)
    with pytest.raises(DataError, match="1-D sequence of integers"):
        task.collate([{"input_ids": [0.5, 1.5]}], "data")
    with pytest.raises(DataError, match="masks every token"):
        task.collate([{"input_ids": [1, 2], "attention_mask": [0, 0]}], "data")
    with pytest.raises(DataError, match="attention_mask has shape"):
        task.collate([{"input_ids": [1, 2], "attention_mask": [1]}], "data")
    with pytest.raises(ConfigurationError, match="give module names or patterns"):
        GradientComputer(model, task, modules=[3])
