"""``srcproj verify`` and :func:`srcproj.verify_store`: every chunk decoded, every done flag checked.

One small store (two checkpoints, one segment, float16 features with per-row scales,
k = 8, 7 row chunks per checkpoint) is featurized once per module; each test damages
a copy of it on disk, as a bad disk or an interrupted copy would, and checks that
verify names exactly the damaged array and chunk, never writes, and exits with 1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from srcproj import StoreError, VerifyReport, verify_store
from srcproj import layout as names
from srcproj.cli import main
from srcproj.store import FORMAT_VERSION, AttributionStore

pytestmark = pytest.mark.usefixtures("single_thread")

CHUNKS = 7  # 100 examples in chunks of 16


@pytest.fixture(scope="module")
def featurized(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete store; tests damage copies of it (see :func:`store`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = tmp_path_factory.mktemp("verify") / "run.zarr"
        attr = tiny_run.attributor(path, proj_dim=8, feature_dtype="float16")
        attr.featurize(progress=False)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture
def store(featurized, tmp_path) -> Path:
    copy = tmp_path / "run.zarr"
    shutil.copytree(featurized, copy)
    return copy


def _files(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a store with its mtime and bytes, to show that verify writes nothing."""
    return {str(f.relative_to(path)): (f.stat().st_mtime_ns, f.read_bytes()) for f in path.rglob("*") if f.is_file()}


def _chunk_files(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file() and f.name != "zarr.json"]


def _verify(path: Path, *extra: str, capsys) -> tuple[int, str, str]:
    before = _files(path)
    code = main(["verify", "--no-progress", *extra, str(path)])
    captured = capsys.readouterr()
    assert _files(path) == before, "verify changed the store"
    return code, captured.out, captured.err


def _flip_byte(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x5A
    chunk.write_bytes(bytes(data))


# ---------------------------------------------------------------------- a sound store
def test_a_clean_store_passes(store, capsys):
    before = _files(store)
    report = verify_store(store, progress=False)
    assert _files(store) == before
    assert isinstance(report, VerifyReport)
    assert report.ok and report.damage == [] and report.format == FORMAT_VERSION
    # Every stored chunk was decoded, of every array (the scales and query checkpoints too).
    assert report.chunks_checked == len(_chunk_files(store))
    assert report.arrays_checked == 17
    code, out, err = _verify(store, capsys=capsys)
    assert code == 0, err
    assert f"{report.arrays_checked} arrays, {report.chunks_checked} chunks" in out
    assert out.strip().splitlines()[-1].startswith("ok: ")


def test_progress_bar_counts_chunks(store, capsys):
    report = verify_store(store)
    assert "srcproj verify" in capsys.readouterr().err
    assert report.ok


def test_flags_carry_a_checksum_and_zero_chunks_are_kept(tmp_path):
    store = AttributionStore.open(tmp_path / "s.zarr", {"test": True})
    flags = store.flags("done", 3)
    assert [type(c).__name__ for c in flags.compressors] == ["Crc32cCodec"]
    zeros = store.array("zeros", (4, 2), "float32", chunks=(2, 2))
    zeros[0:2] = 0.0
    # A written chunk equal to the fill value is kept, also through a reopened array.
    store.array("zeros", (4, 2), "float32", chunks=(2, 2))[2:4] = 0.0
    flags[1] = False
    assert (tmp_path / "s.zarr" / "zeros" / "c" / "0" / "0").is_file()
    assert (tmp_path / "s.zarr" / "zeros" / "c" / "1" / "0").is_file()
    assert (tmp_path / "s.zarr" / "done" / "c" / "1").is_file()


# ---------------------------------------------------------------------- a flipped byte
@pytest.mark.parametrize("array, chunk_key, chunk, flag", [
    (names.features(1), "c/2/0", (2, 0), "features/ckpt_1_done/c/2"),
    (names.feature_scale(0), "c/3", 3, "features/ckpt_0_done/c/3"),
    (names.hessian(1), "c/0/0", (0, 0), "hessians/done/c/1"),
    (names.eigenvalues(0), "c/0", 0, "segments/done/c/0"),
    (names.eigenvectors(0), "c/0/0", (0, 0), "segments/done/c/0"),
    (names.cache(0), "c/6/0", (6, 0), "caches/seg_0_done/c/6"),
    (names.features_done(0), "c/5", 5, "features/ckpt_0_done/c/5"),
    (names.HESSIANS_DONE, "c/0", 0, "hessians/done/c/0"),
    (names.query_checkpoint(1), "c/0", 0, "query/done/c/1"),
])
def test_a_flipped_byte_names_its_array_and_chunk(store, array, chunk_key, chunk, flag, capsys):
    _flip_byte(store / array / chunk_key)
    report = verify_store(store, progress=False)
    assert not report.ok
    assert [(d.array, d.chunk) for d in report.damage] == [(array, chunk)], report.damage
    damage = report.damage[0]
    assert "damaged: it cannot be decoded" in damage.problem
    assert damage.key == f"{array}/{chunk_key}" and damage.flag == flag
    # Every other chunk was still read: verification does not stop at the first damage.
    assert report.chunks_checked == len(_chunk_files(store))

    code, out, _ = _verify(store, capsys=capsys)
    assert code == 1
    label = f"chunk {chunk}"
    assert any(line.strip().startswith(f"{array} {label}:") for line in out.splitlines()), out
    assert f"{array}/{chunk_key}" in out and flag in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("fix: delete") and "featurize()" in last


def test_every_damaged_chunk_is_reported(store):
    for i in (0, 3, 6):
        _flip_byte(store / names.features(0) / "c" / str(i) / "0")
    _flip_byte(store / names.cache(0) / "c" / "1" / "0")
    report = verify_store(store, progress=False)
    assert [(d.array, d.chunk) for d in report.damage] == [
        (names.cache(0), (1, 0)), (names.features(0), (0, 0)), (names.features(0), (3, 0)),
        (names.features(0), (6, 0))]


def test_deleting_the_files_listed_and_refeaturizing_repairs_the_store(tiny_run, store):
    _flip_byte(store / names.features(1) / "c" / "2" / "0")
    damage = verify_store(store, progress=False).damage
    for d in damage:
        (store / d.key).unlink()
        (store / d.flag).unlink()
    report = tiny_run.attributor(store, proj_dim=8, feature_dtype="float16").featurize(progress=False)
    assert report.feature_chunks_computed == 1
    assert verify_store(store, progress=False).ok


# ---------------------------------------------------------------------- what the flags claim
@pytest.mark.parametrize("array, chunk_key, chunk", [
    (names.features(0), "c/1/0", (1, 0)),
    (names.feature_scale(1), "c/4", 4),
    (names.hessian(0), "c/0/0", (0, 0)),
    (names.cache(0), "c/0/0", (0, 0)),
])
def test_a_flagged_chunk_whose_file_is_gone_is_reported(store, array, chunk_key, chunk, capsys):
    (store / array / chunk_key).unlink()
    report = verify_store(store, progress=False)
    assert [(d.array, d.chunk) for d in report.damage] == [(array, chunk)], report.damage
    assert "says its unit is done" in report.damage[0].problem and "absent" in report.damage[0].problem
    code, out, _ = _verify(store, capsys=capsys)
    assert code == 1 and array in out


def test_an_unflagged_missing_chunk_is_not_damage(store):
    (store / names.cache(0) / "c" / "2" / "0").unlink()
    (store / names.cache_done(0) / "c" / "2").unlink()  # as after an interrupted featurize
    assert verify_store(store, progress=False).ok


def test_a_flagged_array_that_is_gone_is_reported(store):
    shutil.rmtree(store / names.eigenvectors(0))
    report = verify_store(store, progress=False)
    assert [(d.array, d.chunk, d.flag) for d in report.damage] == [(names.eigenvectors(0), None, "segments/done/c/0")]


def test_non_finite_values_in_flagged_chunks_are_reported(store):
    group = zarr.open_group(store, mode="r+")
    cache = group[names.cache(0)]
    cache[20, 3] = np.nan  # row 20 is in chunk 1 (rows 16..31)
    vectors = group[names.eigenvectors(0)]
    vectors[0, 0] = np.inf
    report = verify_store(store, progress=False)
    assert [(d.array, d.chunk) for d in report.damage] == [(names.cache(0), (1, 0)), (names.eigenvectors(0), (0, 0))]
    assert all("NaN or infinite" in d.problem for d in report.damage)
    # The same NaN in a chunk not flagged done is work featurize will redo: no damage.
    zarr.open_array(store / names.cache_done(0), mode="r+")[1] = False
    assert [d.array for d in verify_store(store, progress=False).damage] == [names.eigenvectors(0)]


def test_an_asymmetric_hessian_is_reported(store):
    hessian = zarr.open_array(store / names.hessian(1), mode="r+")
    matrix = hessian[:]
    matrix[0, 1] += 1.0 + abs(matrix[0, 1])
    hessian[:] = matrix
    report = verify_store(store, progress=False)
    assert [(d.array, d.chunk, d.flag) for d in report.damage] == [(names.hessian(1), (0, 0), "hessians/done/c/1")]
    assert "not symmetric" in report.damage[0].problem


def test_a_flag_byte_other_than_0_or_1_is_reported(store):
    google_crc32c = pytest.importorskip("google_crc32c")
    payload = b"\x02"  # a well-formed chunk (its checksum matches) that holds 2
    checksum = np.uint32(google_crc32c.value(payload)).tobytes()
    (store / names.features_done(1) / "c" / "4").write_bytes(payload + checksum)
    report = verify_store(store, progress=False)
    assert [(d.array, d.chunk) for d in report.damage] == [(names.features_done(1), 4)]
    assert "[2]" in report.damage[0].problem


# ---------------------------------------------------------------------- output and errors
def test_json_lists_the_damage(store, capsys):
    _flip_byte(store / names.cache(0) / "c" / "3" / "0")
    code, out, _ = _verify(store, "--json", capsys=capsys)
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and report["format"] == FORMAT_VERSION
    assert report["chunks_checked"] == len(_chunk_files(store))
    assert [(d["array"], d["chunk"], d["key"], d["flag"]) for d in report["damage"]] == [
        (names.cache(0), [3, 0], f"{names.cache(0)}/c/3/0", "caches/seg_0_done/c/3")]


def test_json_of_a_clean_store(store, capsys):
    code, out, _ = _verify(store, "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["ok"] is True and json.loads(out)["damage"] == []


def test_unreadable_array_metadata_is_damage_and_the_walk_goes_on(store, capsys):
    (store / names.features(1) / "zarr.json").write_text("{ not json")
    _flip_byte(store / names.cache(0) / "c" / "0" / "0")
    report = verify_store(store, progress=False)
    found = {(d.array, d.chunk) for d in report.damage}
    assert (names.features(1), None) in found and (names.cache(0), (0, 0)) in found
    code, out, _ = _verify(store, capsys=capsys)
    assert code == 1 and out.strip().splitlines()[-1].startswith("fix: featurize into a new store")


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "file", "zarr_not_srcproj"])
def test_a_non_store_exits_2_with_a_message(kind, tmp_path, capsys):
    path = tmp_path / "thing"
    if kind == "empty_dir":
        path.mkdir()
    elif kind == "file":
        path.write_text("not a store")
    elif kind == "zarr_not_srcproj":
        zarr.open_group(path, mode="w", zarr_format=3)
    assert main(["verify", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srcproj: error: ") and str(path) in lines[0]
    assert "Traceback" not in captured.err
    with pytest.raises(StoreError):
        verify_store(path, progress=False)


@pytest.mark.parametrize("damage", ["field", "whole"])
def test_unparsable_srcproj_metadata_is_a_store_error(store, damage, capsys):
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    if damage == "field":
        meta["attributes"]["srcproj"]["chunk_size"] = "sixteen"
    else:
        meta["attributes"]["srcproj"] = "not a mapping"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="cannot be parsed"):
        verify_store(store, progress=False)
    code, _, err = _verify(store, capsys=capsys)
    assert code == 2 and "cannot be parsed" in err


def test_a_store_url(tiny_run):
    """A store behind a URL: chunk keys are listed through the store, not the file system."""
    import fsspec

    url = f"memory://verify-{os.getpid()}.zarr"
    try:
        tiny_run.attributor(url, proj_dim=8, feature_dtype="float16").featurize(progress=False)
        assert verify_store(url, progress=False).ok
        fsspec.filesystem("memory").rm(f"/verify-{os.getpid()}.zarr/{names.cache(0)}/c/5/0")
        report = verify_store(url, progress=False)
        assert [(d.array, d.chunk) for d in report.damage] == [(names.cache(0), (5, 0))]
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/verify-{os.getpid()}.zarr"):
            fs.rm(f"/verify-{os.getpid()}.zarr", recursive=True)
