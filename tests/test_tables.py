"""Per-example tables: which columns a data set gives, and files pandas reads back as written."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from srcproj import ConfigurationError, DataError, LanguageModelTask, TopK
from srcproj.tables import (
    check_table_target,
    curation_table,
    example_columns,
    self_influence_table,
    top_k_table,
    write_table,
)


def _rows(n: int = 5) -> list[dict]:
    return [{"x": torch.full((3,), float(i)), "label": i % 3, "id": f"ex-{i}", "weight": 0.5 * i,
             "tags": [1, 2]} for i in range(n)]


def test_array_data_give_index_and_label():
    X, y = torch.randn(4, 2), torch.tensor([3, 1, 4, 1])
    columns = example_columns((X, y))
    assert list(columns) == ["index", "label"]
    assert columns["index"].tolist() == [0, 1, 2, 3] and columns["label"].tolist() == [3, 1, 4, 1]


def test_scalar_fields_of_dict_examples_are_id_columns():
    columns = example_columns(_rows())
    # "x" is the input and "label" the target; the list "tags" is not one value.
    assert list(columns) == ["index", "label", "id", "weight"]
    assert columns["id"].tolist() == [f"ex-{i}" for i in range(5)]
    assert columns["weight"].tolist() == [0.5 * i for i in range(5)]
    assert list(example_columns(_rows(), ids=["id"])) == ["index", "label", "id"]
    assert list(example_columns(_rows(), ids=[])) == ["index", "label"]


def test_id_fields_named_like_the_reserved_columns_are_renamed():
    rows = [{"x": torch.zeros(2), "y": 1, "index": 10 + i} for i in range(3)]
    columns = example_columns(rows)
    assert columns["index"].tolist() == [0, 1, 2] and columns["example_index"].tolist() == [10, 11, 12]


class ColumnStore:
    """A data set with named columns read whole, as a Hugging Face Dataset does."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows, self.column_names, self.column_reads = rows, list(rows[0]), []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            self.column_reads.append(key)
            return [row[key] for row in self.rows]
        return self.rows[key]


def test_a_data_set_with_named_columns_is_read_a_column_at_a_time():
    data = ColumnStore(_rows())
    columns = example_columns(data, ids=["id"])
    assert data.column_reads == ["id"] and columns["id"].tolist() == [f"ex-{i}" for i in range(5)]


def test_token_sequences_have_no_label_and_keep_their_text():
    rows = [{"input_ids": [1, 2, 3][: 2 + i % 2], "text": f"passage {i}"} for i in range(4)]
    columns = example_columns(rows, LanguageModelTask())
    assert list(columns) == ["index", "text"]
    assert columns["text"].tolist() == [f"passage {i}" for i in range(4)]


def test_missing_or_misnamed_ids_are_refused():
    with pytest.raises(DataError, match=r"id column\(s\) \['name'\] are not keys"):
        example_columns(_rows(), ids=["name"])
    with pytest.raises(DataError, match="not mappings"):
        example_columns((torch.zeros(2, 1), torch.zeros(2)), ids=["id"])
    rows = _rows()
    del rows[3]["id"]
    with pytest.raises(DataError, match="example 3 has no key 'id'"):
        example_columns(rows)


def test_top_k_table_has_one_row_per_query_direction_and_rank():
    top = TopK(np.array([[2, 0], [1, 2]]), np.array([[0.5, 0.25], [0.75, 0.5]], np.float32),
               np.array([[1, 3], [0, 3]]), np.array([[-0.5, -0.125], [-1.0, -0.25]], np.float32))
    queries = {"index": np.arange(2), "label": np.array([7, 8])}
    train = {"index": np.arange(4), "id": np.array(["a", "b", "c", "d"], dtype=object)}
    table = top_k_table(top, queries, train)
    assert list(table) == ["query_index", "query_label", "direction", "rank", "train_index", "train_id", "score"]
    assert table["query_label"].tolist() == [7] * 4 + [8] * 4
    assert table["direction"].tolist() == ["helpful", "helpful", "harmful", "harmful"] * 2
    assert table["rank"].tolist() == [1, 2, 1, 2] * 2
    assert table["train_id"].tolist() == ["c", "a", "b", "d", "b", "c", "a", "d"]
    assert table["score"].tolist() == [0.5, 0.25, -0.5, -0.125, 0.75, 0.5, -1.0, -0.25]


def test_self_influence_table_is_sorted_largest_first():
    table = self_influence_table(np.array([0.1, 3.0, -1.0, 3.0]), {"index": np.arange(4)})
    assert table["index"].tolist() == [1, 3, 0, 2] and table["rank"].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_tables_read_back_with_pandas_as_written(tmp_path, suffix):
    columns = {"index": np.arange(3), "label": np.array([1, 0, 1]),
               "id": np.array(["a", "b,with comma", 'c "quoted"'], dtype=object),
               "score": np.array([0.1, -1 / 3, 1e-30]), "keep": np.array([True, False, True])}
    path = tmp_path / f"t{suffix}"
    write_table(columns, path)
    frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    assert list(frame.columns) == list(columns)
    for name, values in columns.items():
        assert frame[name].tolist() == values.tolist(), name  # floats exactly, strings unchanged
    assert sorted(os.listdir(tmp_path)) == [f"t{suffix}"]  # no temporary file left behind


def test_curation_table_keeps_data_set_order(tmp_path):
    from srcproj import Curation

    result = Curation(np.array([0.2, -0.4, 0.1]), np.array([True, False, True]), "mean", "")
    table = curation_table(result, {"index": np.arange(3)})
    assert table["index"].tolist() == [0, 1, 2] and table["rank"].tolist() == [3, 1, 2]
    assert table["keep"].tolist() == [True, False, True]


def test_bad_table_targets_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot tell the table format"):
        check_table_target(tmp_path / "out.txt")
    with pytest.raises(ConfigurationError, match="ends in .parquet but the format asked for is csv"):
        check_table_target(tmp_path / "out.parquet", format="csv")
    assert check_table_target(tmp_path / "out.tsv.gz", format="csv") == "csv"  # an unknown suffix: the format says
    with pytest.raises(ConfigurationError, match="is a directory"):
        check_table_target(tmp_path, format="csv")
    with pytest.raises(ConfigurationError, match="does not exist"):
        check_table_target(tmp_path / "missing" / "out.csv")
    (tmp_path / "old.csv").write_text("kept\n")
    with pytest.raises(ConfigurationError, match="exists"):
        write_table({"a": np.arange(2)}, tmp_path / "old.csv")
    assert (tmp_path / "old.csv").read_text() == "kept\n"
    write_table({"a": np.arange(2)}, tmp_path / "old.csv", overwrite=True)
    assert pd.read_csv(tmp_path / "old.csv")["a"].tolist() == [0, 1]
    with pytest.raises(ConfigurationError, match="differ in length"):
        write_table({"a": np.arange(2), "b": np.arange(3)}, tmp_path / "new.csv")
    assert not (tmp_path / "new.csv").exists()


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ConfigurationError, match=r"srcproj\[tables\]"):
        check_table_target(tmp_path / "out.parquet")


def test_a_table_gets_the_mode_open_would_give_it(tmp_path):
    mask = os.umask(0o022)
    try:
        write_table({"a": np.arange(2)}, tmp_path / "t.csv")
    finally:
        os.umask(mask)
    assert (tmp_path / "t.csv").stat().st_mode & 0o777 == 0o644


def test_mislabel_table_keeps_every_column_when_names_collide():
    from srcproj import MislabelScores
    from srcproj.tables import mislabel_table

    suspicion = MislabelScores(np.array([0.1, 0.9, 0.5]), "mean_loss", None, (0,),
                               {"loss": np.array([1.0, 2.0, 3.0]), "mean_loss": np.array([0.1, 0.9, 0.5])})
    table = mislabel_table(suspicion, {"index": np.arange(3), "loss": np.array([7, 8, 9]),
                                       "rank": np.array([3, 2, 1])})
    assert list(table) == ["index", "loss", "example_rank", "suspicion", "rank", "detector_loss", "mean_loss"]
    assert table["index"].tolist() == [1, 2, 0] and table["loss"].tolist() == [8, 9, 7]
    assert table["detector_loss"].tolist() == [2.0, 3.0, 1.0] and table["example_rank"].tolist() == [2, 1, 3]


def test_id_columns_named_like_computed_ones_are_kept():
    from srcproj import Curation

    train = {"index": np.arange(2), "rank": np.array([10, 20]), "keep": np.array(["a", "b"], dtype=object)}
    table = self_influence_table(np.array([1.0, 2.0]), train)
    assert table["example_rank"].tolist() == [20, 10] and table["rank"].tolist() == [1, 2]
    table = curation_table(Curation(np.array([0.5, -0.5]), np.array([True, False]), "mean", ""), train)
    assert table["example_keep"].tolist() == ["a", "b"] and table["keep"].tolist() == [True, False]
