"""Bad input to the pipeline commands (``srcproj featurize -c run.toml`` and the scoring
commands): each gets one line, ``srcproj: error: ...``, exit status 2 and no traceback,
naming the problem and the fix.

Config-only mistakes need no training: they use a tiny entry module and small TOML files.
The scoring commands' mistakes share one featurized copy of examples/digits_pipeline
(trained and featurized once per module, k = 64), which no test changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import copy_recorded

from srcproj.cli import main
from srcproj.store import AttributionStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_pipeline"
K = ["--set", "store.proj_dim=64"]  # the shared store's k; the example's file says 512
QUIET = ["--no-progress"]
PIPELINE = ("featurize", "score", "top-k", "self-influence", "mislabeled", "curate")

TINY_ENTRY = '''
import torch

import srcproj


def build_model(hidden=4):
    return torch.nn.Linear(3, 2)


def not_a_model():
    return "a string"


def not_a_task():
    return 42


def data():
    return torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
'''

TINY = """
[model]
entry = "tiny_entry:build_model"

[task]
entry = "srcproj:ClassificationTask"

[data]
train = "tiny_entry:data"

[trajectory]
segments = [{ checkpoints = ["a.pt", "b.pt"], steps = 2, lr = 0.1, data = "train" }]

[store]
path = "tiny.zarr"
proj_dim = 4
"""


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with its stdout and stderr captured (usable in a module fixture)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _assert_one_line_error(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("srcproj: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _fails(argv: list[str], *needles: str) -> str:
    """Run ``argv``: exit status 2, nothing on stdout, one error line holding ``needles``."""
    code, out, err = _run(argv)
    assert code == 2, (code, out, err)
    assert out == ""
    return _assert_one_line_error(err, *needles)


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    """Entry points put the config's directory on sys.path: undo it after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


# ---------------------------------------------------------------------- config-only fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A directory holding ``tiny_entry.py``; each test writes its own config file into it."""
    path = tmp_path_factory.mktemp("tiny")
    (path / "tiny_entry.py").write_text(TINY_ENTRY)
    return path


def _config(directory: Path, text: str) -> str:
    handle, path = tempfile.mkstemp(suffix=".toml", dir=directory)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    return path


def _tiny(tiny_dir: Path, text: str = TINY, *, replace: tuple[str, str] | None = None) -> str:
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    return _config(tiny_dir, text)


# ---------------------------------------------------------------------- the file itself
def test_config_file_missing(tmp_path):
    _fails(["featurize", *QUIET, "-c", str(tmp_path / "nope.toml")], "no config file at", "nope.toml", "TOML file")


def test_config_file_not_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model\nentry = 'x:y'\n")
    _fails(["featurize", *QUIET, "-c", str(path)], "is not valid TOML", "bad.toml")


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00[model]")
    _fails(["featurize", *QUIET, "-c", str(path)], "is not valid TOML")


def test_config_is_a_directory(tmp_path):
    _fails(["featurize", *QUIET, "-c", str(tmp_path)], "no config file at")


def test_unknown_section_suggests_the_close_one(tiny_dir):
    path = _tiny(tiny_dir, TINY.replace("[store]", "[stor]"))
    _fails(["featurize", *QUIET, "-c", path], "stor: unknown section", "did you mean [store]?", "[featurize]")


def test_top_level_key_names_its_section(tiny_dir):
    # A key written before the first [section] lands at the top level.
    path = _config(tiny_dir, "proj_dim = 64\n" + TINY)
    _fails(["featurize", *QUIET, "-c", path], "proj_dim: unknown section or top-level key", "did you mean store.proj_dim?")


def test_unknown_key_in_a_section_suggests_the_close_one(tiny_dir):
    path = _tiny(tiny_dir, replace=("proj_dim = 4", "proj_dmi = 4"))
    _fails(["featurize", *QUIET, "-c", path], "store.proj_dmi: unknown key", "did you mean store.proj_dim?")


def test_unknown_key_given_by_set(tiny_dir):
    _fails(["featurize", *QUIET, "-c", _tiny(tiny_dir), "--set", "featurize.batchsize=8"],
           "featurize.batchsize: unknown key", "did you mean featurize.batch_size?")


@pytest.mark.parametrize("old, new, needles", [
    ("proj_dim = 4", 'proj_dim = "big"', ["store.proj_dim", "'big'", "whole number"]),
    ("proj_dim = 4", "proj_dim = 1.5", ["store.proj_dim", "1.5", "whole number"]),
    ("proj_dim = 4", "proj_dim = 4\nseed = true", ["store.seed", "True", "whole number"]),
    ('path = "tiny.zarr"', "path = 5", ["store.path", "directory path"]),
    ('path = "tiny.zarr"', 'path = "tiny.zarr"\ncounterfactual = "sometimes"', ["store.counterfactual", "same_steps"]),
    ('path = "tiny.zarr"', 'path = "tiny.zarr"\nprojector = "gaussian"', ["store.projector", "kronecker"]),
    ('path = "tiny.zarr"', 'path = "tiny.zarr"\nunroll = "paper"', ["unroll", "'paper'", "stages"]),
    ("[store]", 'verify = "yes"\n\n[store]', ["trajectory.verify", "true or false"]),
    ("steps = 2", "steps = 2.5", ["trajectory.segments[0].steps", "whole number of optimizer steps"]),
    ("proj_dim = 4", 'proj_dim = 4\n\n[featurize]\nbatch_size = "x"',
     ["featurize.batch_size", "'x'", "whole number of examples"]),
    ("proj_dim = 4", 'proj_dim = 4\n\n[top_k]\nk = "ten"', ["top_k.k", "whole number"]),
    ("proj_dim = 4", "proj_dim = 4\n\n[top_k]\nqueries = 3", ["top_k.queries", "data set of [data]"]),
    ("[store]", "[store]\n[store.x]\ny = 1\n", ["store.x: unknown key"]),
])
def test_wrong_value_type(tiny_dir, old, new, needles):
    _fails(["featurize", *QUIET, "-c", _tiny(tiny_dir, replace=(old, new))], *needles)
    assert not (tiny_dir / "tiny.zarr").exists()


def test_wrong_value_type_given_by_set(tiny_dir):
    # --set reads a bare word as a string: it is checked like the file's value.
    _fails(["featurize", *QUIET, "-c", _tiny(tiny_dir), "--set", "store.proj_dim=big"], "store.proj_dim", "'big'")


@pytest.mark.parametrize("override", ["store.proj_dim", "store.proj_dim 64", "=64", "store..proj_dim=64"])
def test_set_without_key_value(tiny_dir, override):
    _fails(["featurize", *QUIET, "-c", _tiny(tiny_dir), "--set", override], "--set", "KEY=VALUE", "store.proj_dim=512")


def test_set_into_a_value_that_is_not_a_table(tiny_dir):
    _fails(["featurize", *QUIET, "-c", _tiny(tiny_dir), "--set", "store.path.x=1"], "store.path is not a table")


@pytest.mark.parametrize("section", ["model", "task", "trajectory"])
def test_missing_section(tiny_dir, section):
    start = TINY.index(f"[{section}]")
    end = TINY.index("\n[", start) + 1
    _fails(["featurize", *QUIET, "-c", _config(tiny_dir, TINY[:start] + TINY[end:])], f"{section}: missing", "give")


def test_store_path_missing(tiny_dir):
    _fails(["featurize", *QUIET, "-c", _tiny(tiny_dir, replace=('path = "tiny.zarr"\n', ""))],
           "store.path: missing", "--store")


# ---------------------------------------------------------------------- entry points
@pytest.mark.parametrize("entry, needles", [
    ("nocolon", ["model.entry", "'nocolon' is not \"module:attribute\"", "mypackage.models:build_model"]),
    ("tiny_entry:", ["model.entry", "is not \"module:attribute\""]),
    ("no_such_module_xyz:build", ["no module named 'no_such_module_xyz'", "install it", "beside the config file"]),
    ("tiny_entry:no_such_function", ["'tiny_entry' has no attribute 'no_such_function'", "name a function"]),
    ("missing_entry.py:build_model", ["no file", "missing_entry.py", "relative to the config file"]),
    ("sub/tiny_entry.py:build_model", ["no file", "tiny_entry.py", "relative to the config file"]),
])
def test_bad_model_entry_point(tiny_dir, entry, needles):
    path = _tiny(tiny_dir, replace=('"tiny_entry:build_model"', json.dumps(entry)))
    _fails(["featurize", *QUIET, "-c", path], *needles)


def test_entry_module_whose_own_import_fails_keeps_its_traceback(tiny_dir):
    # The entry module exists but imports a missing module whose name is a prefix of its
    # own: that is the user's code failing, not a wrong entry point (no "install it" line).
    (tiny_dir / "tiny_broken.py").write_text("import tiny\n")
    path = _tiny(tiny_dir, replace=('"tiny_entry:build_model"', '"tiny_broken:build_model"'))
    with pytest.raises(ModuleNotFoundError, match="'tiny'"):
        main(["featurize", *QUIET, "-c", path])


def test_entry_in_a_package_that_does_not_exist(tiny_dir):
    path = _tiny(tiny_dir, replace=('"tiny_entry:build_model"', '"no_such_package_xyz.models:build_model"'))
    _fails(["featurize", *QUIET, "-c", path], "no module named 'no_such_package_xyz'", "install it")


def test_model_entry_that_is_not_a_module(tiny_dir):
    path = _tiny(tiny_dir, replace=('"tiny_entry:build_model"', '"tiny_entry:not_a_model"'))
    _fails(["featurize", *QUIET, "-c", path], "model.entry", "returned a str", "nn.Module")


def test_model_entry_from_a_py_path_that_is_not_a_module(tiny_dir):
    path = _tiny(tiny_dir, replace=('"tiny_entry:build_model"', '"tiny_entry.py:not_a_model"'))
    _fails(["featurize", *QUIET, "-c", path], "model.entry", "returned a str", "nn.Module")


def test_task_entry_that_is_not_a_task(tiny_dir):
    path = _tiny(tiny_dir, replace=('"srcproj:ClassificationTask"', '"tiny_entry:not_a_task"'))
    _fails(["featurize", *QUIET, "-c", path], "task.entry", "gave an int", "srcproj Task", "srcproj:ClassificationTask")


def test_task_entry_attribute_missing(tiny_dir):
    path = _tiny(tiny_dir, replace=('"srcproj:ClassificationTask"', '"srcproj:ClassifyTask"'))
    _fails(["featurize", *QUIET, "-c", path], "task.entry", "'srcproj' has no attribute 'ClassifyTask'")


def test_entry_kwargs_the_function_does_not_take(tiny_dir):
    path = _tiny(tiny_dir, replace=('entry = "tiny_entry:build_model"',
                                    'entry = "tiny_entry:build_model"\nkwargs = { width = 3 }'))
    _fails(["featurize", *QUIET, "-c", path], "model.kwargs", "'tiny_entry:build_model' does not take", "width",
           "keyword arguments it takes")


def test_entry_missing_an_argument_it_needs(tiny_dir):
    (tiny_dir / "tiny_needs.py").write_text("def needs_size(size):\n    return size\n")
    path = _tiny(tiny_dir, replace=('train = "tiny_entry:data"', 'train = "tiny_needs:needs_size"'))
    _fails(["featurize", *QUIET, "-c", path], "data.train.kwargs", "needs more arguments", "'size'",
           "give them under data.train.kwargs")


def test_entry_table_without_entry(tiny_dir):
    path = _tiny(tiny_dir, replace=('train = "tiny_entry:data"', "train = { kwargs = {} }"))
    _fails(["featurize", *QUIET, "-c", path], "data.train: it has no entry", 'entry = "module:attribute"')


# ---------------------------------------------------------------------- data
def test_segment_naming_an_unknown_data_set(tiny_dir):
    path = _tiny(tiny_dir, replace=('data = "train"', 'data = "training"'))
    _fails(["featurize", *QUIET, "-c", path], "trajectory.segments[0].data", "'training' is not a data set of [data]",
           "it has: train", "add it under [data]")
    assert not (tiny_dir / "tiny.zarr").exists()


def test_segment_without_its_data(tiny_dir):
    path = _tiny(tiny_dir, replace=(', data = "train"', ""))
    _fails(["featurize", *QUIET, "-c", path], "trajectory.segments[0]: it has no data", "checkpoints, steps, lr, data")


def test_segment_with_an_unknown_key(tiny_dir):
    path = _tiny(tiny_dir, replace=("steps = 2", "step = 2"))
    _fails(["featurize", *QUIET, "-c", path], "trajectory.segments[0].step: unknown key", "did you mean")


def test_segment_checkpoint_files_missing(tiny_dir):
    _fails(["featurize", *QUIET, "-c", _tiny(tiny_dir)], "no checkpoint file at", "a.pt")
    assert not (tiny_dir / "tiny.zarr").exists()


def test_segment_checkpoint_pattern_matching_nothing(tiny_dir):
    path = _tiny(tiny_dir, replace=('["a.pt", "b.pt"]', '"ckpt/*.pt"'))
    _fails(["featurize", *QUIET, "-c", path], "trajectory.segments[0].checkpoints", "matches no file")


@pytest.mark.parametrize("ids, needles", [
    ('"id"', ["data.train.ids", "give a list of key names"]),
    ("[1]", ["data.train.ids", "give a list of key names"]),
])
def test_ids_not_a_list_of_names(tiny_dir, ids, needles):
    path = _tiny(tiny_dir, replace=('train = "tiny_entry:data"', f'train = {{ entry = "tiny_entry:data", ids = {ids} }}'))
    _fails(["featurize", *QUIET, "-c", path], *needles)


# ---------------------------------------------------------------------- trajectory
def test_trajectory_with_none_of_manifest_segments_entry(tiny_dir):
    path = _tiny(tiny_dir, replace=('segments = [{ checkpoints = ["a.pt", "b.pt"], steps = 2, lr = 0.1, '
                                    'data = "train" }]', "verify = true"))
    _fails(["featurize", *QUIET, "-c", path], "trajectory: it gives none of manifest, entry and segments",
           "give exactly one", 'manifest = "run"')


def test_trajectory_with_two_of_manifest_segments_entry(tiny_dir):
    path = _tiny(tiny_dir, replace=("[trajectory]", '[trajectory]\nmanifest = "run"'))
    _fails(["featurize", *QUIET, "-c", path], "trajectory: it gives manifest and segments", "give exactly one")


def test_trajectory_manifest_that_does_not_exist(tiny_dir):
    path = _config(tiny_dir, TINY.replace('segments = [{ checkpoints = ["a.pt", "b.pt"], steps = 2, lr = 0.1, '
                                          'data = "train" }]', 'manifest = "no_run"'))
    line = _fails(["featurize", *QUIET, "-c", path], "no trajectory manifest at", "no_run", "TrajectoryRecorder")
    assert str(tiny_dir) in line  # relative to the config file
    assert not (tiny_dir / "tiny.zarr").exists()


def test_trajectory_unknown_optimizer_kind(tiny_dir):
    path = _tiny(tiny_dir, replace=("[store]", '[trajectory.optimizer]\nkind = "rmsprop"\n\n[store]'))
    _fails(["featurize", *QUIET, "-c", path], "trajectory.optimizer.kind", "'rmsprop'", "sgd, adam, adamw")


def test_trajectory_optimizer_setting_it_does_not_take(tiny_dir):
    path = _tiny(tiny_dir, replace=("[store]", '[trajectory.optimizer]\nkind = "adam"\nmomentum = 0.9\n\n[store]'))
    _fails(["featurize", *QUIET, "-c", path], "trajectory.optimizer", "momentum", "srcproj.Adam")


def test_trajectory_entry_that_is_not_a_trajectory(tiny_dir):
    path = _tiny(tiny_dir, replace=('segments = [{ checkpoints = ["a.pt", "b.pt"], steps = 2, lr = 0.1, '
                                    'data = "train" }]', 'entry = "tiny_entry:data"'))
    _fails(["featurize", *QUIET, "-c", path], "trajectory.entry", "returned a tuple", "srcproj.Trajectory")


def test_progress_lines_then_one_error_line(tiny_dir):
    # Without --no-progress the command says what it builds first; the error is still one line.
    code, out, err = _run(["featurize", "-c", _tiny(tiny_dir, replace=('data = "train"', 'data = "nope"'))])
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert all(line.startswith("srcproj featurize: ") for line in lines[:-1])
    _assert_one_line_error(lines[-1], "'nope' is not a data set of [data]")


# ---------------------------------------------------------------------- help
@pytest.mark.parametrize("command", PIPELINE)
def test_help_shows_an_example(command):
    code, out, err = _run([command, "--help"])
    assert code == 0, err
    assert "example:" in out and f"srcproj {command} -c " in out
    assert "--config" in out and "--set KEY=VALUE" in out


@pytest.mark.parametrize("command", PIPELINE)
def test_config_flag_is_required(command):
    code, out, err = _run([command])
    assert code == 2 and out == "" and "Traceback" not in err
    assert "-c/--config" in err


# ---------------------------------------------------------------------- the featurized example
@pytest.fixture(scope="module")
def digits(tmp_path_factory, recorded_digits) -> dict:
    """examples/digits_pipeline trained and featurized (k = 64) once; tests only read it.

    featurize runs from another working directory: the file's relative paths (the
    manifest, the store) and its entry module resolve beside the file.
    """
    base = tmp_path_factory.mktemp("digits")
    example = copy_recorded(recorded_digits, base / "digits_pipeline")
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    before, path = os.getcwd(), list(sys.path)
    os.chdir(elsewhere)
    try:
        code, out, err = _run(["featurize", *QUIET, "-c", "../digits_pipeline/config.toml", *K, *QUIET])
    finally:
        os.chdir(before)
        sys.path[:] = path
    assert code == 0, err
    assert out.startswith("featurized ") and "k=64" in out
    assert os.listdir(elsewhere) == []  # nothing written in the working directory
    store = example / "digits.zarr"
    return {"dir": example, "config": str(example / "config.toml"), "store": store}


def _cfg(digits: dict) -> list[str]:
    return ["-c", digits["config"], *K, *QUIET]


def _snapshot(store: Path) -> dict:
    """Every file of ``store`` with its size and content hash (the store is small at k = 64)."""
    files = {}
    for path in sorted(store.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(store))] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return {"files": files, "zarr.json": (store / "zarr.json").read_bytes()}


def test_featurize_resolves_paths_beside_the_config_and_applies_set(digits):
    # The fixture ran featurize from another directory with a relative -c: the store
    # landed beside the config file (store.path = "digits.zarr"), with --set's k.
    store = AttributionStore.read(str(digits["store"]))
    assert store.metadata["proj_dim"] == 64  # --set store.proj_dim=64 over the file's 512


def test_store_flag_overrides_store_path_relative_to_the_working_directory(digits, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(digits["store"], tmp_path / "copy.zarr")
    code = main(["self-influence", *_cfg(digits), "--set", "store.path=nowhere.zarr", "--store", "copy.zarr",
                 "--out", "self.csv"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "self.csv").is_file()  # --out is relative to the working directory too
    assert len((tmp_path / "self.csv").read_text().splitlines()) == 1 + 1437
    assert not (tmp_path / "nowhere.zarr").exists() and not (digits["dir"] / "nowhere.zarr").exists()


def test_info_json_reports_the_overridden_proj_dim(digits, capsys):
    assert main(["info", "--json", str(digits["store"])]) == 0
    assert json.loads(capsys.readouterr().out)["proj_dim"] == 64


@pytest.mark.parametrize("command, extra", [
    ("score", ["--queries", "test", "--out", "s.zarr"]),
    ("top-k", ["--out", "top.csv"]),
    ("self-influence", ["--out", "self.csv"]),
    ("curate", ["--drop-fraction", "0.1", "--out", "keep.csv"]),
])
def test_scoring_a_store_that_does_not_exist_does_not_create_it(digits, tmp_path, monkeypatch, command, extra):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.zarr"
    _fails([command, *_cfg(digits), "--store", str(missing), *extra], "no store at", "missing.zarr",
           "featurize first", "--store")
    assert not missing.exists()
    assert os.listdir(tmp_path) == []


def test_scoring_a_directory_that_is_not_a_store(digits, tmp_path):
    _fails(["self-influence", *_cfg(digits), "--store", str(digits["dir"] / "run"), "--out",
            str(tmp_path / "self.csv")], "cannot open a zarr store", "run", "featurize first")


@pytest.mark.parametrize("override, needles", [
    (["--set", "store.seed=1"], ["was made for other inputs", "seed: 0 in the store, 1 now", "new store path"]),
    (["--set", "store.proj_dim=32"], ["was made for other inputs", "proj_dim: 64 in the store, 32 now"]),
])
def test_scoring_a_store_of_other_settings_leaves_it_alone(digits, tmp_path, override, needles):
    before = _snapshot(digits["store"])
    _fails(["score", *_cfg(digits), *override, "--queries", "test", "--out", str(tmp_path / "s.zarr")], *needles)
    assert _snapshot(digits["store"]) == before
    assert not (tmp_path / "s.zarr").exists()


def test_scoring_a_store_of_other_checkpoints_leaves_it_alone(digits, tmp_path):
    # Another run: the last checkpoint's weights differ (its manifest records the new hash).
    run = tmp_path / "run2"
    shutil.copytree(digits["dir"] / "run", run)
    checkpoint = run / "ckpt-00000240.pt"
    saved = torch.load(checkpoint, weights_only=False)
    state = saved["model"] if "model" in saved else saved
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    torch.save(saved, checkpoint)
    manifest = json.loads((run / "manifest.json").read_text())
    for segment in manifest["segments"]:
        for entry in segment["checkpoints"]:
            if entry["file"] == checkpoint.name:
                entry["sha256"] = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    (run / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(digits["store"])
    _fails(["top-k", *_cfg(digits), "--set", f"trajectory.manifest={json.dumps(str(run))}", "--out",
            str(tmp_path / "top.csv")], "was made for other inputs", "checkpoints", "new store path")
    assert _snapshot(digits["store"]) == before
    assert not (tmp_path / "top.csv").exists()


def test_scoring_with_data_the_run_did_not_train_on(digits, tmp_path):
    before = _snapshot(digits["store"])
    _fails(["self-influence", *_cfg(digits), "--set", "data.train.kwargs.flip_fraction=0.1", "--out",
            str(tmp_path / "self.csv")], "not the examples the stage trained on", "unchanged")
    assert _snapshot(digits["store"]) == before


def test_scoring_with_a_model_of_another_architecture(digits, tmp_path):
    _fails(["self-influence", *_cfg(digits), "--set", "model.kwargs.hidden=32", "--out",
            str(tmp_path / "self.csv")], "another architecture")


def test_stage_mapped_to_an_unknown_data_set(digits, tmp_path):
    _fails(["self-influence", *_cfg(digits), "--set", "trajectory.stages.train=training", "--out",
            str(tmp_path / "self.csv")], "trajectory.stages.train", "'training' is not a data set of [data]",
           "add it under [data]")


def test_recorded_stage_without_a_data_set(digits, tmp_path):
    text = Path(digits["config"]).read_text().replace("train = {", "training = {")
    path = _config(digits["dir"], text)
    _fails(["self-influence", "-c", path, *K, *QUIET, "--out", str(tmp_path / "self.csv")],
           "the recorded stage 'train'", "[trajectory.stages]", "it has: training")


def test_stage_the_run_did_not_record(digits, tmp_path):
    _fails(["self-influence", *_cfg(digits), "--set", "trajectory.stages.finetune=train", "--out",
            str(tmp_path / "self.csv")], "trajectory.stages", "'finetune'", "not stages of the recorded run")


@pytest.mark.parametrize("command, ids, extra", [
    ("top-k", "data.test.ids", ["--out", "top.csv"]),
    ("self-influence", "data.train.ids", ["--out", "self.csv"]),
    ("curate", "data.train.ids", ["--drop-fraction", "0.1", "--out", "keep.csv"]),
])
def test_ids_naming_a_missing_key(digits, tmp_path, monkeypatch, command, ids, extra):
    monkeypatch.chdir(tmp_path)
    _fails([command, *_cfg(digits), "--set", f'{ids}=["id", "uid"]', *extra], "id column(s) ['uid']",
           "are not keys of its examples", "'id'", "name existing keys")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["score", "top-k"])
def test_queries_missing(digits, tmp_path, command):
    text = Path(digits["config"]).read_text()
    assert 'queries = "test"' in text
    path = _config(digits["dir"], text.replace('queries = "test"', ""))
    section = command.replace("-", "_")
    out = str(tmp_path / ("s.zarr" if command == "score" else "top.csv"))
    _fails([command, "-c", path, *K, *QUIET, "--out", out], f"{section}.queries is not set", "--queries NAME",
           f"under [{section}]")


@pytest.mark.parametrize("command, out", [("score", "s.zarr"), ("top-k", "top.csv")])
def test_queries_naming_an_unknown_data_set(digits, tmp_path, command, out):
    _fails([command, *_cfg(digits), "--queries", "tset", "--out", str(tmp_path / out)],
           f"{command.replace('-', '_')}.queries", "'tset' is not a data set of [data]", "train, validation, test")
    assert not (tmp_path / out).exists()


def test_curate_validation_naming_an_unknown_data_set(digits, tmp_path):
    _fails(["curate", *_cfg(digits), "--validation", "val", "--drop-fraction", "0.1", "--out",
            str(tmp_path / "keep.csv")], "curate.validation", "'val' is not a data set of [data]")


@pytest.mark.parametrize("command, extra", [
    ("score", ["--queries", "test"]),
    ("top-k", []),
    ("self-influence", []),
    ("curate", ["--drop-fraction", "0.1"]),
])
def test_out_missing(digits, command, extra):
    section = command.replace("-", "_")
    _fails([command, *_cfg(digits), *extra], f"{section}.out is not set", "--out PATH", f"under [{section}]")


@pytest.mark.parametrize("command, extra", [
    ("top-k", []),
    ("self-influence", []),
    ("curate", ["--threshold", "0"]),
])
def test_table_out_exists_without_overwrite(digits, tmp_path, command, extra):
    out = tmp_path / "table.csv"
    out.write_text("keep me\n")
    _fails([command, *_cfg(digits), *extra, "--out", str(out)], "table.csv", "exists", "--overwrite")
    assert out.read_text() == "keep me\n"


def test_score_out_exists_without_overwrite(digits, tmp_path):
    out = tmp_path / "s.zarr"
    code, _, err = _run(["score", *_cfg(digits), "--queries", "test", "--out", str(out)])
    assert code == 0, err
    before = _snapshot(out)
    _fails(["score", *_cfg(digits), "--queries", "test", "--out", str(out)], "s.zarr", "already holds",
           "--overwrite")
    assert _snapshot(out) == before


def test_score_out_inside_the_store(digits, tmp_path):
    before = _snapshot(digits["store"])
    _fails(["score", *_cfg(digits), "--queries", "test", "--out", str(digits["store"] / "scores")],
           "would overwrite the attribution store", "outside the store")
    assert _snapshot(digits["store"]) == before


@pytest.mark.parametrize("command, extra", [
    ("top-k", []),
    ("self-influence", []),
    ("curate", ["--drop-fraction", "0.1"]),
])
def test_table_out_with_an_unknown_suffix(digits, tmp_path, command, extra):
    _fails([command, *_cfg(digits), *extra, "--out", str(tmp_path / "out.txt")], "out.txt",
           "cannot tell the table format", ".parquet", ".csv")
    assert not (tmp_path / "out.txt").exists()


def test_table_out_in_a_missing_directory(digits, tmp_path):
    _fails(["self-influence", *_cfg(digits), "--out", str(tmp_path / "no" / "self.csv")],
           "does not exist", "create")


def test_curate_without_a_rule(digits, tmp_path):
    _fails(["curate", *_cfg(digits), "--out", str(tmp_path / "keep.csv")], "curate has no rule",
           "--drop-fraction F", "--threshold T")


def test_curate_with_both_rules_in_the_config(digits, tmp_path):
    _fails(["curate", *_cfg(digits), "--set", "curate.drop_fraction=0.1", "--set", "curate.threshold=0.0",
            "--out", str(tmp_path / "keep.csv")], "drop_fraction and threshold", "keep one")


def test_curate_with_both_rule_flags(digits, tmp_path):
    code, out, err = _run(["curate", *_cfg(digits), "--drop-fraction", "0.1", "--threshold", "0", "--out",
                           str(tmp_path / "keep.csv")])
    assert code == 2 and out == "" and "Traceback" not in err
    assert "--threshold: not allowed with argument --drop-fraction" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("fraction", ["1.5", "-0.1", "1"])
def test_curate_drop_fraction_out_of_range(digits, tmp_path, fraction):
    _fails(["curate", *_cfg(digits), "--drop-fraction", fraction, "--out", str(tmp_path / "keep.csv")],
           "drop_fraction", "[0, 1)")
    assert not (tmp_path / "keep.csv").exists()


def test_curate_unknown_aggregate_in_the_config(digits, tmp_path):
    _fails(["curate", *_cfg(digits), "--set", "curate.aggregate=median", "--drop-fraction", "0.1", "--out",
            str(tmp_path / "keep.csv")], "aggregate='median'", "mean")


def test_segments_that_do_not_exist(digits, tmp_path):
    _fails(["self-influence", *_cfg(digits), "--segments", "5", "--out", str(tmp_path / "self.csv")],
           "segment 5 does not exist", "0..1")


@pytest.mark.parametrize("argv, needle", [
    (["top-k", "--queries", "train"], "top_k.out is not set"),
    (["score", "--queries", "nope", "--out", "s.zarr"], "'nope' is not a data set"),
    (["self-influence", "--out", "table.txt"], "cannot tell the table format"),
    (["curate", "--validation", "train", "--out", "keep.csv"], "curate has no rule"),
    (["curate", "--validation", "train", "--threshold", "0", "--set", "curate.aggregate='median'", "--out",
      "keep.csv"], "curate.aggregate='median'"),
])
def test_command_mistakes_are_reported_before_the_run_is_built(tiny_dir, argv, needle):
    # The model's entry module does not exist: an error about it would mean the run was built first.
    path = _tiny(tiny_dir, replace=('entry = "tiny_entry:build_model"', 'entry = "no_such_module:build_model"'))
    line = _fails([argv[0], *QUIET, "-c", path, *argv[1:]], needle)
    assert "no_such_module" not in line


def test_trajectory_optimizer_beside_the_sgd_shorthand(tiny_dir):
    path = _tiny(tiny_dir, replace=("[store]", 'momentum = 0.5\n[trajectory.optimizer]\nkind = "sgd"\n\n[store]'))
    _fails(["featurize", *QUIET, "-c", path], "trajectory:", "optimizer and also momentum",
           "inside optimizer = { kind = ..., ... } only")


@pytest.mark.parametrize("key", ["featurize.batch_size=0", "top_k.k=-1", "curate.batch_size=0",
                                 "score.score_memory_bytes=0"])
def test_counts_below_one_are_refused_when_the_file_is_read(tiny_dir, key):
    path = _tiny(tiny_dir, replace=('entry = "tiny_entry:build_model"', 'entry = "no_such_module:build_model"'))
    _fails(["featurize", *QUIET, "-c", path, "--set", key], key.split("=")[0], "at least 1")


def test_a_checkpoint_glob_is_in_the_numbers_order(tiny_dir, tmp_path):
    from srcproj.config import load_config

    for step in (9, 10, 100, 11):
        (tmp_path / f"step{step}.pt").write_bytes(b"")
    path = _tiny(tiny_dir, replace=('["a.pt", "b.pt"]', f'"{tmp_path}/step*.pt"'))
    files = load_config(path).trajectory.segments[0].files(str(tiny_dir))
    assert [os.path.basename(f) for f in files] == ["step9.pt", "step10.pt", "step11.pt", "step100.pt"]


@pytest.mark.parametrize("argv, needle", [
    (["--detector", "nope", "--out", "s.csv"], "mislabeled.detector='nope'; choose one of loss, mean_loss"),
    (["--flag-fraction", "1.5", "--out", "s.csv"], "mislabeled.flag_fraction=1.5; give a fraction in (0, 1]"),
    (["--set", "mislabeled.segments=[0]", "--out", "s.csv"], "did you mean mislabeled.data_segment?"),
    (["--set", "mislabeled.batch_size=0", "--out", "s.csv"], "mislabeled.batch_size"),
    ([], "mislabeled.out is not set"),
])
def test_mislabeled_mistakes_are_reported_before_the_run_is_built(tiny_dir, argv, needle):
    path = _tiny(tiny_dir, replace=('entry = "tiny_entry:build_model"', 'entry = "no_such_module:build_model"'))
    line = _fails(["mislabeled", *QUIET, "-c", path, *argv], needle)
    assert "no_such_module" not in line
