"""The pipeline commands from the shell, as a user runs them, against the Python API.

The digits example (examples/digits_pipeline) is copied, trained and recorded once;
``featurize → self-influence → top-k → curate`` then run as subprocesses from its one
config file, and every table is read back with pandas and compared with what the
Attributor gives in Python. A language model run (inline segments, a glob of
checkpoints) and a featurize under torchrun follow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import zarr
from conftest import copy_recorded

from srcproj import Counterfactual, curate, detect_mislabeled
from srcproj.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_pipeline"
K = 64


def srcproj(*args: str, cwd: Path, timeout: float = 300) -> tuple[str, str]:
    """``python -m srcproj ARGS`` in ``cwd``; its stdout and stderr, after checking it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    done = subprocess.run([sys.executable, "-m", "srcproj", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, f"srcproj {' '.join(args)} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout, done.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, recorded_digits) -> Path:
    """The digits example, trained and recorded by its train.py, featurized from the shell (k = 64)."""
    root = copy_recorded(recorded_digits, tmp_path_factory.mktemp("pipeline") / "digits")
    out, err = srcproj("featurize", "-c", "config.toml", "--set", f"store.proj_dim={K}", cwd=root)
    assert out.count("\n") == 1 and out.startswith(f"featurized {root / 'digits.zarr'}: complete")
    assert "srcproj featurize" in err  # progress goes to stderr
    return root


@pytest.fixture(scope="module")
def api(pipeline: Path):
    """The same run in Python: its config and Attributor."""
    config = load_config(pipeline / "config.toml", [f"store.proj_dim={K}"])
    torch.set_num_threads(1)
    return config, config.attributor(existing=True)


@pytest.mark.slow
def test_featurize_again_resumes_with_nothing_to_compute(pipeline):
    out, _ = srcproj("featurize", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--no-progress", cwd=pipeline)
    assert "resumed, nothing to compute" in out


@pytest.mark.slow
def test_self_influence_table_matches_the_api(pipeline, api):
    config, attributor = api
    out, _ = srcproj("self-influence", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--out", "self.parquet",
                     cwd=pipeline)
    assert out == f"wrote the self-influence of 1,437 training examples (parquet, largest first) to " \
                  f"{pipeline / 'self.parquet'}\n"
    table = pd.read_parquet(pipeline / "self.parquet")
    assert list(table.columns) == ["index", "label", "id", "self_influence", "rank"]
    expected = attributor.self_influence()
    np.testing.assert_allclose(table["self_influence"], expected[table["index"]], rtol=1e-6)
    assert (np.diff(table["self_influence"]) <= 0).all() and table["rank"].tolist() == list(range(1, 1438))
    train = config.dataset("train")
    assert table["id"].tolist() == [train[i]["id"] for i in table["index"]]
    assert table["label"].tolist() == [train[i]["label"] for i in table["index"]]


@pytest.mark.slow
def test_top_k_table_matches_the_api(pipeline, api):
    config, attributor = api
    out, _ = srcproj("top-k", "-c", "config.toml", "--set", f"store.proj_dim={K}", "-k", "3", "--out", "top.csv",
                     cwd=pipeline)
    assert "top 3 helpful and harmful training examples of 180 queries (1,080 rows, csv)" in out
    table = pd.read_csv(pipeline / "top.csv")
    assert list(table.columns) == ["query_index", "query_label", "query_id", "direction", "rank", "train_index",
                                   "train_label", "train_id", "score"]
    test = config.dataset("test")  # [top_k] queries = "test" in the config
    top = attributor.top_k(test, k=3)
    helpful = table[table.direction == "helpful"].sort_values(["query_index", "rank"])
    harmful = table[table.direction == "harmful"].sort_values(["query_index", "rank"])
    np.testing.assert_allclose(helpful["score"].to_numpy().reshape(180, 3), top.helpful_scores, rtol=1e-6)
    np.testing.assert_allclose(harmful["score"].to_numpy().reshape(180, 3), top.harmful_scores, rtol=1e-6)
    assert helpful["query_id"].tolist()[:3] == [test[0]["id"]] * 3
    assert table["train_id"].tolist() == [f"train-{i:04d}" for i in table["train_index"]]


@pytest.mark.slow
def test_mislabeled_table_matches_the_default_detector(pipeline, api):
    config, attributor = api
    out, _ = srcproj("mislabeled", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--flag-fraction", "0.05",
                     "--out", "suspects.parquet", cwd=pipeline)
    assert out.startswith("wrote the mislabel suspicion of 1,437 training examples (detector 'mean_loss', training "
                          "accuracy ")
    table = pd.read_parquet(pipeline / "suspects.parquet")
    assert list(table.columns) == ["index", "label", "id", "suspicion", "rank", "loss", "mean_loss", "self_influence",
                                   "tracin", "influence_function", "flagged"]
    expected = detect_mislabeled(attributor)
    assert table["index"].tolist() == expected.flag(count=1437).tolist()  # most suspicious first
    np.testing.assert_allclose(table["suspicion"], expected.scores[table["index"]], rtol=1e-6)
    np.testing.assert_allclose(table["self_influence"], attributor.self_influence()[table["index"]], rtol=1e-6)
    assert table["flagged"].tolist() == [True] * 72 + [False] * (1437 - 72)


@pytest.mark.slow
def test_curate_writes_the_keep_mask_the_api_gives(pipeline, api):
    config, attributor = api
    out, _ = srcproj("curate", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--drop-fraction", "0.05",
                     "--out", "keep.parquet", cwd=pipeline)
    assert out.startswith("kept 1,365 of 1,437 training examples (dropped the 72 examples")
    table = pd.read_parquet(pipeline / "keep.parquet")
    assert list(table.columns) == ["index", "label", "id", "influence", "rank", "keep"]
    assert table["index"].tolist() == list(range(1437))  # data-set order: the column is the mask
    expected = curate(attributor, config.dataset("validation"), aggregate="mean", drop_fraction=0.05)
    np.testing.assert_allclose(table["influence"], expected.influence, rtol=1e-6, atol=1e-12)
    assert table["keep"].tolist() == expected.keep.tolist()
    # The worst case from a flag; a threshold on the command line replaces the rule.
    srcproj("curate", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--aggregate", "worst",
            "--drop-fraction", "0.2", "--out", "worst.csv", cwd=pipeline)
    worst = pd.read_csv(pipeline / "worst.csv")
    scores = attributor.score(config.dataset("validation")).astype(np.float64)
    np.testing.assert_allclose(worst["influence"], scores.min(0), rtol=1e-5, atol=1e-7)
    assert (~worst["keep"]).sum() == 287  # round(0.2 * 1437)
    srcproj("curate", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--set", "curate.drop_fraction=0.5",
            "--threshold", "0", "--out", "harmful.csv", cwd=pipeline)
    harmful = pd.read_csv(pipeline / "harmful.csv")
    assert harmful["keep"].tolist() == (expected.influence >= 0).tolist()


@pytest.mark.slow
def test_score_writes_the_dense_scores_to_zarr(pipeline, api):
    config, attributor = api
    out, _ = srcproj("score", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--queries", "validation",
                     "--out", "scores.zarr", cwd=pipeline)
    assert out == f"wrote scores of shape (180, 1437) ('validation' x training examples) to {pipeline / 'scores.zarr'}\n"
    written = zarr.open_array(str(pipeline / "scores.zarr"), mode="r")
    np.testing.assert_allclose(written[:], attributor.score(config.dataset("validation")), rtol=1e-6)


@pytest.mark.slow
def test_a_counterfactual_setting_from_the_config(pipeline, api):
    setting = "store.counterfactual={same_epochs = 0.5}"
    out, _ = srcproj("featurize", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--set", setting,
                     "--no-progress", cwd=pipeline)
    assert "complete" in out
    srcproj("self-influence", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--set", setting, "--out",
            "self_half.csv", cwd=pipeline)
    table = pd.read_csv(pipeline / "self_half.csv").sort_values("index")
    config, _ = api
    half = config.attributor(existing=True, counterfactual=Counterfactual.same_epochs(0.5)).self_influence()
    np.testing.assert_allclose(table["self_influence"], half, rtol=1e-6)
    assert not np.allclose(half, api[1].self_influence(), rtol=1e-3)  # another setting, other scores


# ---------------------------------------------------------------------------- a language model
LM_ENTRY = '''
from srcproj.text_demo import completion_queries, load_prose_passages, make_tiny_gpt2, passage_examples

PASSAGES = load_prose_passages(20, length=24, seed=0)


def model():
    return make_tiny_gpt2(n_embd=16, n_layer=1, n_head=2, n_positions=32)


def train():
    return [{**row, "text": text} for row, text in zip(passage_examples(PASSAGES[:16]), PASSAGES[:16])]


def prompts():
    return [{**row, "text": text} for row, text in zip(completion_queries(PASSAGES[16:], 8), PASSAGES[16:])]
'''

LM_CONFIG = '''
[model]
entry = "lm_entry:model"

[task]
entry = "srcproj:LanguageModelTask"
kwargs = { token_weighting = "sum" }

[data]
train = "lm_entry:train"
prompts = "lm_entry:prompts"

[trajectory]
[[trajectory.segments]]
checkpoints = "ckpt/*.pt"
steps = 4
lr = 0.05
data = "train"

[store]
path = "lm.zarr"
proj_dim = 32
hessian = "empirical"

[top_k]
queries = "prompts"
k = 2
'''


@pytest.mark.slow
def test_a_language_model_pipeline_from_inline_segments(tmp_path):
    (tmp_path / "lm_entry.py").write_text(LM_ENTRY)
    (tmp_path / "run.toml").write_text(LM_CONFIG)
    config = load_config(tmp_path / "run.toml")
    model, task, train = config.build_model(), config.build_task(), config.dataset("train")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    (tmp_path / "ckpt").mkdir()
    for step in range(4):
        input_ids, labels = task.collate(train[4 * step: 4 * step + 4], "batch")
        optimizer.zero_grad()
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        if step in (1, 3):
            torch.save(model.state_dict(), tmp_path / "ckpt" / f"step{step + 1}.pt")
    srcproj("featurize", "-c", "run.toml", "--no-progress", cwd=tmp_path)
    out, _ = srcproj("top-k", "-c", "run.toml", "--out", "top.parquet", cwd=tmp_path)
    assert "of 4 queries (16 rows, parquet)" in out
    table = pd.read_parquet(tmp_path / "top.parquet")
    # Token sequences have no single label; the passages' text is carried as an id column.
    assert list(table.columns) == ["query_index", "query_text", "direction", "rank", "train_index", "train_text",
                                   "score"]
    assert table["train_text"].tolist() == [train[i]["text"] for i in table["train_index"]]


# ---------------------------------------------------------------------------- torchrun
@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_featurize_under_torchrun_equals_one_process(pipeline, api):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "srcproj",
               "featurize", "-c", "config.toml", "--set", f"store.proj_dim={K}", "--store", "two.zarr",
               "--set", "store.chunk_size=256", "--no-progress"]
    done = subprocess.run(command, cwd=pipeline, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("featurized ") == 1  # the summary comes from rank 0 only
    config = load_config(pipeline / "config.toml", [f"store.proj_dim={K}", f"store.path={pipeline / 'two.zarr'}",
                                                    "store.chunk_size=256"])
    two = config.attributor(existing=True)
    np.testing.assert_allclose(two.self_influence(), api[1].self_influence(), rtol=1e-5)
