"""The bad-input catalogue: each problem gives a DataError/ValueError naming file, column (row) and problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from towerrec.data.config import DenseFeature, PrepareConfig, SparseFeature
from towerrec.data.dataset import DataError, DatasetMeta, DatasetWriter
from towerrec.data.prepare import prepare
from towerrec.data.reader import LabelSpec, ReadSpec
from towerrec.data.rows import OutOfRangeIds
from towerrec.data.validate import validate_dataset

COLUMNS = {
    "user_id": {"kind": "sparse", "num_embeddings": 10},
    "genres": {"kind": "multi_hot", "num_embeddings": 5},
    "price": {"kind": "dense"},
    "rating": {"kind": "label", "min": 1.0, "max": 5.0},
    "click": {"kind": "label", "min": 0.0, "max": 1.0},
    "rated": {"kind": "label", "min": 0.0, "max": 1.0},
}


def good_table(num: int = 12) -> dict:
    return {
        "user_id": pa.array(np.arange(num) % 10, pa.int64()),
        "genres": pa.array([[k % 5, (k + 1) % 5][: k % 3] for k in range(num)], pa.list_(pa.int64())),
        "price": pa.array(np.linspace(0, 1, num)),
        "rating": pa.array((np.arange(num) % 5 + 1).astype(np.float32)),
        "click": pa.array((np.arange(num) % 2).astype(np.float32)),
    }


def spec(fill_nan=None, skip=False) -> ReadSpec:
    return ReadSpec(
        sparse=(SparseFeature("user_id"), SparseFeature("genres", multi_hot=True)),
        dense=(DenseFeature("price", fill_nan=fill_nan),),
        labels=(LabelSpec("rating", min_value=1.0, max_value=5.0), LabelSpec("click", binary=True)),
        num_embeddings={"user_id": 10, "genres": 5},
        skip_bad_rows=skip,
    )


def build(path: Path, **overrides) -> DatasetMeta:
    columns = {**good_table(), **overrides}
    writer = DatasetWriter(path, num_shards=2, row_group_size=5)  # groups: 0-4, 5-9 (shard 1), 10-11
    writer.write("train", pa.table(columns))
    return writer.commit(columns={k: v for k, v in COLUMNS.items() if k in columns})


def first_file(meta: DatasetMeta) -> Path:
    return Path(meta.row_groups("train")[0].file)


def check(meta: DatasetMeta, *patterns: str, read_spec: ReadSpec | None = None) -> str:
    with pytest.raises(DataError) as info:
        validate_dataset(meta, read_spec or spec())
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    return str(info.value)


def test_good_dataset_passes(tmp_path):
    summary = validate_dataset(build(tmp_path / "d"), spec())
    read = OutOfRangeIds(found={"user_id": 0, "genres": 0}, read={"user_id": 12, "genres": 12})
    assert summary == {
        "rows": {"train": 12},
        "bad_rows": 0,
        "ids_out_of_range": {},
        "out_of_range_ids": {"train": read},
    }


def test_missing_file(tmp_path):
    meta = build(tmp_path / "d")
    first_file(meta).unlink()
    check(meta, str(first_file(meta)), "listed in metadata.json but missing")


def test_not_parquet_and_truncated(tmp_path):
    meta = build(tmp_path / "d")
    files = sorted({rg.file for rg in meta.row_groups("train")})
    Path(files[0]).write_text("user_id,price\n1,2\n")
    data = Path(files[1]).read_bytes()
    Path(files[1]).write_bytes(data[: len(data) // 2])
    message = check(meta, "not a readable Parquet file")
    assert files[0] in message and files[1] in message


def test_missing_and_mistyped_columns(tmp_path):
    meta = build(tmp_path / "d", user_id=pa.array([str(k) for k in range(12)]))
    missing = build(tmp_path / "m", **{})
    for file in {rg.file for rg in missing.row_groups("train")}:
        pq.write_table(pq.read_table(file).drop_columns(["price"]), file, row_group_size=5)
    check(meta, "column 'user_id' (sparse feature 'user_id') has type string, expected integer ids")
    check(missing, "column 'price' of metadata.json is missing from the file")
    flat_genres = build(tmp_path / "g", genres=pa.array(np.arange(12)))
    check(
        flat_genres,
        "column 'genres' (sparse feature 'genres') has type int64, expected a list of integer ids",
    )


def test_labels_out_of_range(tmp_path):
    rating = np.arange(12) % 5 + 1.0
    rating[6] = 7.0
    meta = build(tmp_path / "d", rating=pa.array(rating))
    file = meta.row_groups("train")[2].file  # rows 5..9 went to the second shard: row 6 is its row 1
    check(meta, f"{file}: row group 0, row 1: label column 'rating' has value 7.0 outside [1.0, 5.0]")
    click = np.zeros(12)
    click[1] = 0.5
    check(
        build(tmp_path / "c", click=pa.array(click)),
        "row 1: label column 'click' has value 0.5 outside {0, 1}",
    )
    missing = pa.array([1.0] * 11 + [None])
    check(
        build(tmp_path / "n", rating=missing),
        "label column 'rating' has no value (null or NaN), expected one in [1.0, 5.0]",
    )


def test_masked_out_rows_may_have_no_label(tmp_path):
    """A task's mask leaves rows out (e.g. sampled negatives have no rating): their label is not
    checked and reads as 0 with mask 0; a missing label on a counted row is still an error."""
    from towerrec.data.reader import BatchStream

    rating = pa.array([None if k % 3 == 0 else float(k % 5 + 1) for k in range(12)], pa.float32())
    rated = pa.array([0.0 if k % 3 == 0 else 1.0 for k in range(12)], pa.float32())
    meta = build(tmp_path / "d", rating=rating, rated=rated)
    masked = ReadSpec(
        sparse=spec().sparse,
        dense=spec().dense,
        labels=(
            LabelSpec("rating", mask_column="rated", min_value=1.0, max_value=5.0),
            LabelSpec("click", binary=True),
        ),
        num_embeddings=spec().num_embeddings,
    )
    assert validate_dataset(meta, masked)["bad_rows"] == 0
    batches = list(BatchStream(meta, "train", masked, batch_size=12, seed=0))
    labels, mask = batches[0].labels, batches[0].label_mask
    assert torch.isfinite(labels).all()
    assert mask[:, 0].sum() == 8 and (labels[:, 0][mask[:, 0] == 0] == 0).all()
    assert set(labels[:, 0][mask[:, 0] == 1].tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    # the same missing ratings without the mask are bad rows
    check(meta, "label column 'rating' has no value (null or NaN), expected one in [1.0, 5.0]")
    with pytest.raises(DataError, match="label column 'rating' has no value"):
        list(BatchStream(meta, "train", spec(), batch_size=12, seed=0))


def test_nan_dense_unless_fill(tmp_path):
    price = np.linspace(0, 1, 12)
    price[[3, 9]] = [np.nan, np.inf]
    meta = build(tmp_path / "d", price=pa.array(price))
    check(
        meta,
        "row 3: column 'price' has non-finite value nan (set fill_nan for data.dense feature 'price' to replace it)",
    )
    assert validate_dataset(meta, spec(fill_nan=0.0))["rows"] == {"train": 12}


def test_negative_ids(tmp_path):
    users = np.arange(12) % 10
    users[5] = -4
    check(
        build(tmp_path / "d", user_id=pa.array(users)),
        "row group 0, row 0: column 'user_id' has negative id -4",
    )
    genres = pa.array([[1]] * 11 + [[2, -1]], pa.list_(pa.int64()))
    check(
        build(tmp_path / "g", genres=genres),
        "row group 1, row 1: column 'genres' has negative id -1",
    )


def test_skip_bad_rows_counts_instead(tmp_path):
    users = np.arange(12) % 10
    users[[0, 1]] = -1
    click = np.zeros(12)
    click[1] = 3
    summary = validate_dataset(
        build(tmp_path / "d", user_id=pa.array(users), click=pa.array(click)), spec(skip=True)
    )
    assert summary["bad_rows"] == 2


def test_empty_shard_and_row_count_mismatch(tmp_path):
    meta = build(tmp_path / "d")
    file = first_file(meta)
    pq.write_table(pq.read_table(file).slice(0, 0), file)
    check(meta, f"{file}: empty shard (0 rows)")

    meta = build(tmp_path / "e")
    raw = json.loads((meta.root / "metadata.json").read_text())
    raw["splits"]["train"][0][2] = 3
    (meta.root / "metadata.json").write_text(json.dumps(raw))
    check(DatasetMeta.load(meta.root), "row group 0 has 5 rows, metadata.json says 3")


def test_ids_beyond_vocabulary_are_counted(tmp_path):
    users = np.arange(12) % 10
    users[0] = 50
    summary = validate_dataset(build(tmp_path / "d", user_id=pa.array(users)), spec())
    assert summary["ids_out_of_range"] == {"user_id": 1}
    assert summary["out_of_range_ids"]["train"].found == {"user_id": 1, "genres": 0}
    assert summary["out_of_range_ids"]["train"].read == {"user_id": 12, "genres": 12}


def test_missing_split(tmp_path):
    with pytest.raises(DataError, match="no split 'val'"):
        validate_dataset(build(tmp_path / "d"), spec(), splits=["train", "val"])


# --------------------------------------------------------------------------------------------- converters
def test_criteo_wrong_field_count(tmp_path):
    (tmp_path / "c.tsv").write_text("1\t2\t3\n")
    with pytest.raises(DataError, match=r"c\.tsv: line 1: expected 40 fields, found 3"):
        prepare(PrepareConfig(format="criteo", source=str(tmp_path / "c.tsv")), str(tmp_path / "o"))


def test_criteo_bad_click(tmp_path):
    lines = ["0" + "\t1" * 13 + "\tab" * 26, "2" + "\t1" * 13 + "\tab" * 26]
    (tmp_path / "c.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"c\.tsv: row 1, column 'click': label value 2\.0 outside \{0, 1\}"):
        prepare(PrepareConfig(format="criteo", source=str(tmp_path / "c.tsv")), str(tmp_path / "o"))


def test_movielens_bad_values(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::2::5::100\n1::3::five::101\n")
    with pytest.raises(DataError, match=r"ratings\.dat: cannot parse .*column 'rating'"):
        prepare(PrepareConfig(format="movielens", source=str(tmp_path)), str(tmp_path / "o"))
    (tmp_path / "ratings.dat").write_text("1::2::5::100\n1::3::6::101\n")
    with pytest.raises(DataError, match=r"row 1, column 'rating': label value 6\.0 outside \[0\.5, 5\.0\]"):
        prepare(PrepareConfig(format="movielens", source=str(tmp_path)), str(tmp_path / "o"))
    with pytest.raises(DataError, match="no ratings.dat"):
        prepare(PrepareConfig(format="movielens", source=str(tmp_path / "o")), str(tmp_path / "o2"))


def test_generic_config_and_header_errors(tmp_path):
    from towerrec.data.cleaning import TableSchema

    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    base = {"format": "csv", "source": str(tmp_path / "t.csv")}
    with pytest.raises(DataError, match="data.prepare.format: csv needs the columns to read"):
        prepare(PrepareConfig(**base), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="data.prepare.columns.a: kind 'id'"):
        prepare(PrepareConfig(**base), str(tmp_path / "o"), TableSchema({"a": "id"}))
    with pytest.raises(DataError, match=r"t\.csv: columns \['c'\] that the config names are missing"):
        prepare(PrepareConfig(**base), str(tmp_path / "o"), TableSchema({"a": "sparse", "c": "dense"}))
    (tmp_path / "t.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"t\.parquet: not a readable Parquet file"):
        prepare(
            PrepareConfig(format="parquet", source=str(tmp_path / "t.parquet")),
            str(tmp_path / "o"),
            TableSchema({"a": "sparse"}),
        )
    with pytest.raises(DataError, match="unknown format 'tsv'"):
        prepare(PrepareConfig(format="tsv"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_metadata_that_does_not_describe_the_shards_is_an_error(tmp_path):
    """A vocabulary size below the ids in the shards, or a label range that excludes labels
    present, is reported by the up-front validation (it would otherwise train silently)."""
    import json

    from towerrec.data.config import DataConfig
    from towerrec.data.reader import read_spec
    from towerrec.models.config import TaskConfig

    meta = build(tmp_path / "d")
    raw = json.loads((meta.root / "metadata.json").read_text())
    raw["columns"]["user_id"]["num_embeddings"] = 5  # the shards hold ids up to 9
    raw["columns"]["rating"].update(min=1.0, max=3.0)  # the shards hold ratings up to 5
    (meta.root / "metadata.json").write_text(json.dumps(raw))
    meta = DatasetMeta.load(meta.root)
    data = DataConfig(sparse=[SparseFeature("user_id"), SparseFeature("genres", multi_hot=True)],
                      dense=[DenseFeature("price")])  # fmt: skip
    tasks = [TaskConfig("rating", type="regression"), TaskConfig("click")]
    spec = read_spec(data, tasks, meta.table_rows(data.sparse), meta.columns)
    with pytest.raises(DataError) as err:
        validate_dataset(meta, spec)
    assert "column 'user_id' has id 5, but metadata.json gives its vocabulary 5 rows" in str(err.value)
    assert "label column 'rating' has value 4.0 outside [1.0, 3.0]" in str(err.value)
