"""Converters end to end on small files written by the tests (and the real ML-100K when present)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import towerrec.data.criteo as criteo
from tests.conftest import ML100K
from towerrec.data.cleaning import TableSchema
from towerrec.data.config import DenseFeature, PrepareConfig, SparseFeature
from towerrec.data.dataset import DataError, DatasetMeta, DatasetWriter, is_complete
from towerrec.data.normalize import normalize_table
from towerrec.data.prepare import FORMATS, prepare
from towerrec.data.reader import BatchStream, LabelSpec, ReadSpec


def read_split(meta: DatasetMeta, split: str) -> pa.Table:
    files = sorted({rg.file for rg in meta.row_groups(split)})
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def all_rows(meta: DatasetMeta) -> pa.Table:
    return pa.concat_tables([read_split(meta, s) for s in meta.splits if meta.row_groups(s)])


def test_formats_registered():
    assert {"synthetic", "movielens100k", "movielens", "criteo", "csv", "parquet"} <= set(FORMATS)


# --------------------------------------------------------------------------------------------- movielens
def write_ml1m(root: Path) -> None:
    root.mkdir()
    ratings = [
        (u, i, r, 978300000 + 10 * k)
        for k, (u, i, r) in enumerate(
            [
                (1, 10, 5),
                (1, 20, 3),
                (1, 30, 4),
                (2, 10, 4),
                (2, 30, 1),
                (2, 20, 2),
                (3, 20, 2),
                (3, 30, 5),
                (3, 10, 1),
            ]
        )
    ]
    lines = [f"{u}::{i}::{r}::{t}" for u, i, r, t in ratings] + ["1::10::5::978300000"]  # an exact duplicate
    (root / "ratings.dat").write_text("\n".join(lines) + "\n")
    (root / "movies.dat").write_text(
        "10::Toy Story: The Movie (1995)::Animation|Children's|Comedy\n20::Heat (1995)::Action|Crime\n30::Odd::(no genres listed)\n"
    )
    (root / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072-1234\n3::M::25::15::55117\n")


def test_movielens_1m_double_colon(tmp_path):
    write_ml1m(tmp_path / "ml-1m")
    cfg = PrepareConfig(
        format="movielens",
        source=str(tmp_path / "ml-1m"),
        val_fraction=0.0,
        test_fraction=0.0,
        num_shards=2,
        dedup=True,
    )
    meta = prepare(cfg, str(tmp_path / "out"))
    table = read_split(meta, "train")
    assert table.num_rows == 9  # the duplicate line is dropped
    assert meta.report["cleaning"]["duplicates_dropped"] == 1
    assert meta.report["genres"] == ["Action", "Animation", "Children's", "Comedy", "Crime"]
    assert meta.columns["genres"]["kind"] == "multi_hot"
    assert meta.columns["rating"] == {"kind": "label", "min": 0.5, "max": 5.0, "binary": False}
    rows = table.to_pylist()
    by_time = {r["timestamp"]: r for r in rows}
    first = by_time[978300000]  # user 1, movie 10 (3 genres), rating 5
    assert len(first["genres"]) == 3 and first["rating"] == 5.0 and first["click"] == 1.0
    assert by_time[978300020]["genres"] == []  # (no genres listed)
    assert [r["click"] for r in rows] == [float(r["rating"] >= 4) for r in rows]
    # vocabularies fitted on train: 3 users, 3 items, genders M/F → rows 1..V-1
    assert (
        meta.vocab_size("user_id") == 4 and meta.vocab_size("item_id") == 4 and meta.vocab_size("gender") == 3
    )
    users = np.array([r["user_id"] for r in rows])
    assert set(users) == {1, 2, 3}
    genders = {r["timestamp"] // 10 % 100: r["gender"] for r in rows}
    assert len({genders[0], genders[3]}) == 2  # F vs M map to different rows


def test_movielens_20m_csv_half_stars_leave_last_out(tmp_path):
    root = tmp_path / "ml-20m"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = ["userId,movieId,rating,timestamp"]
    expected_last = {}
    for user in range(1, 21):
        times = rng.permutation(np.arange(5)) + 1000 * user
        for k, t in enumerate(times):
            lines.append(f"{user},{k + 1},{rng.integers(1, 11) / 2},{t}")
        expected_last[user] = int(times.max())
    (root / "ratings.csv").write_text("\n".join(lines) + "\n")
    (root / "movies.csv").write_text(
        'movieId,title,genres\n1,"Heat, The (1995)",Action|Crime\n2,X,Comedy\n3,Y,(no genres listed)\n'
    )
    cfg = PrepareConfig(
        format="movielens", source=str(root), split="leave_last_out", val_fraction=0.1, num_shards=1
    )
    meta = prepare(cfg, str(tmp_path / "out"))
    test, val, train = (read_split(meta, s) for s in ("test", "val", "train"))
    assert test.num_rows == 20 and val.num_rows == 20 and train.num_rows == 60
    assert sorted(test.column("timestamp").to_pylist()) == sorted(expected_last.values())
    ratings = all_rows(meta).column("rating").to_numpy()
    assert ratings.min() >= 0.5 and ratings.max() <= 5 and (ratings * 2 == np.round(ratings * 2)).all()
    assert meta.report["passes"] == 3  # split fit, vocabulary, write
    # every user's val row is its second-to-last interaction
    val_times = sorted(val.column("timestamp").to_pylist())
    assert all(t < expected_last[t // 1000] for t in val_times)


def test_movielens_folder_with_u_data_uses_100k_converter(tmp_path):
    if not (ML100K / "u.data").exists():
        pytest.skip(f"{ML100K} not present")
    meta = prepare(
        PrepareConfig(format="movielens", source=str(ML100K), split="u1", num_shards=1), str(tmp_path / "out")
    )
    assert meta.report["converter"] == "movielens100k"
    assert sum(meta.num_rows(s) for s in meta.splits) == 100_000
    assert meta.num_rows("test") == 20_000


# --------------------------------------------------------------------------------------------- criteo
def criteo_lines(num_rows: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(num_rows):
        fields = [str(int(rng.random() < 0.3))]
        for i in range(13):
            fields.append(
                ""
                if rng.random() < 0.2
                else str(int(rng.integers(-2, 1000)) if i == 1 else int(rng.integers(0, 500)))
            )
        for i in range(26):
            fields.append("" if rng.random() < 0.1 else f"{int(rng.zipf(1.5)) % 1000 * 7919 + i:08x}")
        lines.append("\t".join(fields))
    return lines


def test_criteo_missing_values_log_and_min_count(tmp_path):
    lines = criteo_lines(400)
    lines.append(lines[5])  # exact duplicate
    lines.append(
        "1\t123456\t-3" + "\t" * 11 + "\tdeadbeef" + "\t" * 25
    )  # I1 unique, I2 negative, most fields missing
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    cfg = PrepareConfig(
        format="criteo",
        source=str(tmp_path / "train.txt"),
        min_count=3,
        num_shards=2,
        row_group_size=64,
        dedup=True,
    )
    meta = prepare(cfg, str(tmp_path / "out"))
    rows = all_rows(meta)
    assert rows.num_rows == 401
    report = meta.report["cleaning"]
    assert report["duplicates_dropped"] == 1
    raw_i1_missing = sum(1 for line in lines[:-2] if line.split("\t")[1] == "")
    assert report["dense_missing_filled"]["I1"] == raw_i1_missing
    assert meta.columns["I1"]["transforms"] == [{"op": "log1p"}]
    # log(1 + max(x, 0)): the hand-written row has I1 = 123456 → log(123457), I2 = -3 → 0, I3 missing → 0
    special = rows.filter(pa.compute.equal(rows.column("I1"), np.float32(math.log(123457))))
    assert (
        special.num_rows == 1
        and special.column("I2")[0].as_py() == 0.0
        and special.column("I3")[0].as_py() == 0.0
    )
    assert set(rows.column("click").to_pylist()) <= {0.0, 1.0}
    for name in criteo.CRITEO_SPARSE:
        ids = rows.column(name).to_numpy()
        assert ids.min() >= 0 and ids.max() < meta.vocab_size(name)
    # min_count: an id seen fewer than 3 times in train is row 0
    train = read_split(meta, "train")
    c3 = train.column("C3").to_numpy()
    counts = np.bincount(c3)
    assert counts[0] > 0 and (counts[1:][counts[1:] > 0] >= 3).all()


def test_criteo_chunked_equals_single_chunk_and_hashing(tmp_path, monkeypatch):
    (tmp_path / "day_0").write_text("\n".join(criteo_lines(300, seed=1) * 2) + "\n")  # every row twice
    cfg = PrepareConfig(format="criteo", source=str(tmp_path / "day_0"), num_shards=1, dedup=True)
    whole = all_rows(prepare(cfg, str(tmp_path / "a")))
    monkeypatch.setattr(criteo, "CSV_BLOCK_BYTES", 4096)  # many chunks: dedup and vocab across chunks
    chunked_meta = prepare(cfg, str(tmp_path / "b"))
    assert chunked_meta.report["cleaning"]["rows_in"] == 600
    assert whole.equals(all_rows(chunked_meta))
    hashed = prepare(
        PrepareConfig(**{**cfg.__dict__, "sparse_mapping": "hash", "num_hash_buckets": 50}),
        str(tmp_path / "c"),
    )
    assert hashed.vocab_size("C1") == 51 and hashed.report["passes"] == 1
    ids = all_rows(hashed).column("C1").to_numpy()
    assert ids.min() >= 0 and ids.max() <= 50


def test_criteo_time_split_keeps_file_order(tmp_path):
    (tmp_path / "t.tsv").write_text("\n".join(criteo_lines(500, seed=2)) + "\n")
    cfg = PrepareConfig(
        format="criteo", source=str(tmp_path / "t.tsv"), split="time", dedup=False, num_shards=1
    )
    meta = prepare(cfg, str(tmp_path / "out"))
    assert [meta.num_rows(s) for s in ("train", "val", "test")] == [400, 50, 50]


def test_criteo_reads_through_batch_stream(tmp_path):
    (tmp_path / "t.tsv").write_text("\n".join(criteo_lines(300, seed=3)) + "\n")
    meta = prepare(
        PrepareConfig(format="criteo", source=str(tmp_path / "t.tsv"), num_shards=2, row_group_size=50),
        str(tmp_path / "o"),
    )
    spec = ReadSpec(
        sparse=tuple(SparseFeature(n) for n in criteo.CRITEO_SPARSE),
        dense=tuple(DenseFeature(n) for n in criteo.CRITEO_DENSE),
        labels=(LabelSpec("click", binary=True),),
        num_embeddings={n: meta.vocab_size(n) for n in criteo.CRITEO_SPARSE},
    )
    batches = list(BatchStream(meta, "train", spec, batch_size=64))
    assert sum(int(b.weights.sum()) for b in batches) == meta.num_rows("train")


# --------------------------------------------------------------------------------------------- generic
def generic(tmp_path: Path, prepare_section: dict, sparse: list, dense: list, tasks: list, out: str = "out"):
    """Prepares a csv/parquet data set the way the trainer does: the columns come from the
    config's features and tasks (declared once), the preparation from ``data.prepare``."""
    import yaml

    from towerrec.trainer.config import load_config
    from towerrec.trainer.dataset_setup import input_schema

    tree = {"data": {"path": str(tmp_path / out), "prepare": prepare_section, "sparse": sparse, "dense": dense},
            "tasks": tasks}  # fmt: skip
    config = tmp_path / f"{out}.yaml"
    config.write_text(yaml.safe_dump(tree))
    cfg = load_config(config)
    return prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))


def shop_lines(num_rows: int = 600, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = ["user,item,tags,price,stars,bought,ts"]
    for k in range(num_rows):
        tags = "|".join(rng.choice(["a", "b", "c", "d"], rng.integers(0, 3), replace=False))
        price = "" if k % 50 == 0 else f"{rng.random() * 100:.2f}"
        lines.append(f"u{k % 40},i{rng.integers(0, 30)},{tags},{price},{rng.integers(1, 6)},{k % 2},{k}")
    return lines


SHOP_SPARSE = [{"name": "user", "side": "user"}, {"name": "item", "side": "item"},
               {"name": "tags", "multi_hot": True, "pooling": "mean"}]  # fmt: skip
SHOP_TASKS = [{"name": "stars", "type": "regression", "min_value": 1.0, "max_value": 5.0},
              {"name": "bought", "type": "binary"}]  # fmt: skip


def test_generic_csv_declared_once_multi_hot_user_split_and_transforms(tmp_path):
    (tmp_path / "events.csv").write_text("\n".join(shop_lines()) + "\n")
    dense = [{"name": "price", "transform": ["log1p", "standardize"], "clip_quantile": 0.9}]
    meta = generic(
        tmp_path,
        {"format": "csv", "source": str(tmp_path / "events.csv"), "user_column": "user", "split": "user",
         "num_shards": 1, "columns": {"ts": "other"}},
        SHOP_SPARSE, dense, SHOP_TASKS,
    )  # fmt: skip
    assert meta.report["cleaning"]["dense_missing_filled"]["price"] == 12
    assert meta.columns["tags"]["num_embeddings"] == 5
    users_per_split = {
        s: set(read_split(meta, s).column("ts").cast(pa.int64()).to_numpy() % 40) for s in meta.splits
    }
    splits = list(users_per_split.values())
    assert all(not (a & b) for i, a in enumerate(splits) for b in splits[i + 1 :])  # a user is in one split
    steps = meta.columns["price"]["transforms"]
    assert [step["op"] for step in steps] == ["log1p", "clip", "standardize"]
    train_price = read_split(meta, "train").column("price").to_numpy()
    assert abs(train_price.mean()) < 1e-3 and abs(train_price.std() - 1) < 1e-2  # training statistics
    assert meta.report["dense"]["clipped"]["price"] > 0
    tag_lengths = [len(t) for t in all_rows(meta).column("tags").to_pylist()]
    assert max(tag_lengths) == 2 and min(tag_lengths) == 0
    # string ids come back as written: the vocabulary holds 'u3', not a hash
    assert {"u0", "u3"} <= set(meta.vocabulary("user").tolist()) and meta.report["cleaning"][
        "duplicates_dropped"
    ] == 0


def test_generic_parquet_time_split(tmp_path):
    num = 1000
    table = pa.table(
        {
            "uid": pa.array(np.arange(num) % 17),
            "genres": pa.array([[1, 2][: k % 3] for k in range(num)], pa.list_(pa.int64())),
            "score": pa.array(np.linspace(0, 1, num)),
            "y": pa.array((np.arange(num) % 2).astype(np.int8)),
            "when": pa.array(np.random.default_rng(0).permutation(num)),
        }
    )
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=100)
    meta = generic(
        tmp_path,
        {"format": "parquet", "source": str(tmp_path / "in.parquet"), "time_column": "when", "split": "time",
         "num_shards": 1, "columns": {"when": "other"}},
        [{"name": "uid"}, {"name": "genres", "multi_hot": True}], [{"name": "score"}], [{"name": "y"}],
    )  # fmt: skip
    times = {s: read_split(meta, s).column("when").to_numpy() for s in ("train", "val", "test")}
    assert times["train"].max() < times["val"].min() and times["val"].max() < times["test"].min()
    assert len(times["test"]) == 100 and len(times["val"]) == 100
    assert meta.vocabulary("uid").dtype.kind == "i"  # integer ids stay integers


def test_pre_split_files_and_a_split_column_keep_every_row_in_its_split(tmp_path):
    lines = shop_lines(300)
    for name, part in (("train", lines[1:201]), ("test", lines[201:])):
        (tmp_path / name).mkdir()
        for k in range(2):  # several files per split
            (tmp_path / name / f"part{k}.csv").write_text("\n".join([lines[0], *part[k::2]]) + "\n")
    meta = generic(
        tmp_path,
        {"format": "csv", "split_files": {"train": str(tmp_path / "train"), "test": str(tmp_path / "test" / "*.csv")},
         "num_shards": 1, "columns": {"ts": "other"}},
        SHOP_SPARSE, [], SHOP_TASKS,
    )  # fmt: skip
    assert meta.num_rows("test") == 100 and meta.num_rows("train") + meta.num_rows("val") == 200
    assert set(read_split(meta, "test").column("ts").cast(pa.int64()).to_numpy()) == set(range(200, 300))
    # no val file: val_fraction of the training rows (never a test row) is held out for validation
    assert 5 <= meta.num_rows("val") <= 40
    assert set(read_split(meta, "val").column("ts").cast(pa.int64()).to_numpy()) < set(range(200))
    # the same rows with a split column
    column = [lines[0] + ",part"] + [
        f"{line},{'train' if k < 200 else 'test'}" for k, line in enumerate(lines[1:])
    ]
    (tmp_path / "all.csv").write_text("\n".join(column) + "\n")
    by_column = generic(
        tmp_path,
        {"format": "csv", "source": str(tmp_path / "all.csv"), "split_column": "part", "num_shards": 1,
         "columns": {"ts": "other"}},
        SHOP_SPARSE, [], SHOP_TASKS, out="column",
    )  # fmt: skip
    assert set(read_split(by_column, "test").column("ts").cast(pa.int64()).to_numpy()) == set(range(200, 300))


def test_csv_without_header_other_delimiter_missing_tokens_and_derived_labels(tmp_path):
    rows = ["1; a, b; 4.5; NA; 5", "2; NA; ?; x; 3", "3; c; 2.0; NA; ?", "1; a; 1.0; y; 5"] * 25
    (tmp_path / "raw.txt").write_text("\n".join(rows) + "\n")
    meta = generic(
        tmp_path,
        {"format": "csv", "source": str(tmp_path / "raw.txt"), "num_shards": 1, "val_fraction": 0.0,
         "test_fraction": 0.0,
         "csv": {"header": False, "column_names": ["user", "tags", "price", "category", "stars"],
                 "delimiter": ";", "null_values": ["?"]},
         "derive": {"liked": "stars >= 4", "spend": "where(is_null(price), 0, price * 2)"}},
        [{"name": "user"}, {"name": "tags", "multi_hot": True, "delimiter": ","}, {"name": "category"}],
        [{"name": "spend"}],
        [{"name": "liked"}],
    )  # fmt: skip
    # '?' is missing (not NA: "NA" stays a category), ", " reads like ","; 'liked' derived from stars
    assert set(meta.vocabulary("category").tolist()) == {"NA", "x", "y"}
    assert set(meta.vocabulary("tags").tolist()) == {"a", "b", "NA"}  # 'c' is only on a dropped row
    rows_out = all_rows(meta)
    assert rows_out.num_rows == 75  # the rows whose stars is '?' have no label: dropped, and said so
    assert meta.report["cleaning"]["label_missing_dropped"]["liked"] == 25
    assert sorted(set(rows_out.column("spend").to_pylist())) == [0.0, 2.0, 9.0]


def test_numbers_bucketized_into_ids(tmp_path):
    lines = ["user,age,y"] + [f"u{k % 7},{k % 90},{k % 2}" for k in range(900)]
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    meta = generic(
        tmp_path,
        {"format": "csv", "source": str(tmp_path / "a.csv"), "num_shards": 1},
        [{"name": "user"}, {"name": "age_group", "column": "age", "buckets": [18, 30, 50]},
         {"name": "age_decile", "column": "age", "buckets": 10}],
        [], [{"name": "y"}],
    )  # fmt: skip
    groups = all_rows(meta).column("age_group").to_numpy()
    ages = all_rows(meta).column("age_decile").to_numpy()
    assert meta.columns["age_group"]["num_embeddings"] == 5 and set(groups) == {1, 2, 3, 4}
    assert meta.columns["age_group"]["edges"] == [18, 30, 50]
    assert len(meta.columns["age_decile"]["edges"]) == 9 and len(set(ages)) == 10


def test_a_filesystem_uri_source(tmp_path):
    (tmp_path / "events.csv").write_text("\n".join(shop_lines(200)) + "\n")
    meta = generic(
        tmp_path,
        {"format": "csv", "source": (tmp_path / "events.csv").as_uri(), "num_shards": 1},
        SHOP_SPARSE, [], SHOP_TASKS,
    )  # fmt: skip
    assert sum(meta.num_rows(s) for s in meta.splits) == 200


def test_csv_defects_name_the_file_row_line_and_column(tmp_path):
    lines = shop_lines(1200)
    bad_number = list(lines)
    bad_number[1001] = bad_number[1001].replace(
        bad_number[1001].split(",")[3], "12,5", 1
    )  # one field too many
    (tmp_path / "fields.csv").write_text("\n".join(bad_number) + "\n")
    with pytest.raises(DataError, match=r"fields\.csv: line 1002: expected 7 fields, found 8"):
        generic(
            tmp_path, {"format": "csv", "source": str(tmp_path / "fields.csv")}, SHOP_SPARSE, [], SHOP_TASKS
        )
    not_a_number = list(lines)
    parts = not_a_number[1001].split(",")
    parts[4] = "five"
    not_a_number[1001] = ",".join(parts)
    (tmp_path / "value.csv").write_text("\n".join(not_a_number) + "\n")
    with pytest.raises(
        DataError, match=r"value\.csv: row 1000 \(line 1002\): column 'stars': 'five' is not a number"
    ):
        generic(
            tmp_path, {"format": "csv", "source": str(tmp_path / "value.csv")}, SHOP_SPARSE, [], SHOP_TASKS
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no input files \(\*\.csv\*\) found in folder .*empty"):
        generic(tmp_path, {"format": "csv", "source": str(tmp_path / "empty")}, SHOP_SPARSE, [], SHOP_TASKS)


def test_float_ids_follow_one_rule_in_csv_and_parquet(tmp_path):
    """Ids are integers or text; a float id (a Parquet float column, or a CSV cell written 3.0 as
    pandas writes integer ids that have missing values) is the integer it equals; 2.5 is refused."""
    users = ["3", "3.0", "4", "4.00", "", "5"] * 20
    (tmp_path / "ids.csv").write_text(
        "user,item,y\n" + "".join(f"{u},i{k % 7},{k % 2}\n" for k, u in enumerate(users))
    )
    floats = [None if u == "" else float(u) for u in users]
    pq.write_table(pa.table({"user": pa.array(floats, pa.float64()), "item": [f"i{k % 7}" for k in range(120)],
                             "y": [k % 2 for k in range(120)]}), tmp_path / "ids.parquet")  # fmt: skip
    sparse, tasks = [{"name": "user", "side": "user"}, {"name": "item", "side": "item"}], [{"name": "y"}]
    for fmt in ("csv", "parquet"):
        meta = generic(tmp_path, {"format": fmt, "source": str(tmp_path / f"ids.{fmt}"), "num_shards": 1},
                       sparse, [], tasks, out=f"made-{fmt}")  # fmt: skip
        assert sorted(str(v) for v in meta.vocabulary("user").tolist()) == ["3", "4", "5"], fmt
    # hexadecimal ids are digits around an 'e': text, not floats; a float is written with a point
    ids = normalize_table(pa.table({"user": ["0002e668", "1e3", "3.50e1", "-2.", " 7.000 "]}),
                          TableSchema(kinds={"user": "sparse"}), "f.csv", 0)  # fmt: skip
    assert ids.column("user").to_pylist() == ["0002e668", "1e3", "35", "-2", "7"]

    users[41] = "2.5"
    (tmp_path / "bad.csv").write_text(
        "user,item,y\n" + "".join(f"{u},i{k % 7},{k % 2}\n" for k, u in enumerate(users))
    )
    pq.write_table(pa.table({"user": pa.array([None if u == "" else float(u) for u in users]),
                             "item": [f"i{k % 7}" for k in range(120)], "y": [k % 2 for k in range(120)]}),
                   tmp_path / "bad.parquet")  # fmt: skip
    rule = "(ids are integers or text; a float id is read as the integer it equals (3.0 as 3) and refused otherwise)"
    for fmt, where, shown in (("csv", "row 41 (line 43)", "'2.5'"), ("parquet", "row 41", "2.5")):
        with pytest.raises(DataError) as err:
            generic(
                tmp_path, {"format": fmt, "source": str(tmp_path / f"bad.{fmt}")}, sparse, [], tasks, out=fmt
            )
        assert (
            str(err.value)
            == f"{tmp_path / f'bad.{fmt}'}: {where}: column 'user': id {shown} is not an integer {rule}"
        )


def test_an_entirely_empty_label_column_is_named(tmp_path):
    lines = [line.split(",") for line in shop_lines()]
    for fields in lines[1:]:
        fields[5] = ""  # bought
    (tmp_path / "events.csv").write_text("\n".join(",".join(fields) for fields in lines) + "\n")
    with pytest.raises(DataError) as err:
        generic(
            tmp_path, {"format": "csv", "source": str(tmp_path / "events.csv")}, SHOP_SPARSE, [], SHOP_TASKS
        )
    assert str(err.value) == (
        f"{tmp_path / 'events.csv'}: no training rows left after cleaning and splitting (label column 'bought' "
        "is empty in all 600 rows: is it the column you meant?)"
    )


@pytest.mark.parametrize("header", [True, False], ids=["header", "no-header"])
@pytest.mark.parametrize("line_end", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_a_csv_with_a_byte_order_mark_reads_as_the_same_file_without_it(tmp_path, line_end, header):
    """Excel's "CSV UTF-8" starts with a byte-order mark: it is not part of the first name or cell."""
    lines = shop_lines() if header else shop_lines()[1:]
    (tmp_path / "plain.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "marked.csv").write_bytes(b"\xef\xbb\xbf" + (line_end.join(lines) + line_end).encode())
    options = {"header": header, "column_names": [] if header else shop_lines()[0].split(",")}
    made = {
        name: generic(tmp_path, {"format": "csv", "source": str(tmp_path / f"{name}.csv"), "num_shards": 1,
                                 "csv": options}, SHOP_SPARSE, [], SHOP_TASKS, out=name)
        for name in ("plain", "marked")
    }  # fmt: skip
    assert all_rows(made["marked"]).equals(all_rows(made["plain"]))
    assert made["marked"].vocabulary("user").tolist() == made["plain"].vocabulary("user").tolist()


# --------------------------------------------------------------------------------------------- atomicity
def test_partial_folders_of_killed_preparations_are_removed_by_the_next(tmp_path):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys; from towerrec.data.dataset import "
                             "DatasetWriter; DatasetWriter(sys.argv[1]); os.kill(os.getpid(), signal.SIGKILL)",
                             str(out)], env=os.environ)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    host = socket.gethostname()
    (left,) = tmp_path.glob(f"out.partial-{host}-*")  # what the killed preparation wrote into
    live = subprocess.Popen(["sleep", "60"])
    try:
        kept = [tmp_path / f"out.partial-{host}-{live.pid}", tmp_path / "out.partial-elsewhere-1"]
        gone = subprocess.Popen(["true"])
        gone.wait()
        legacy = tmp_path / f"out.partial-{gone.pid}"  # written before hosts were named
        for folder in [*kept, legacy]:
            folder.mkdir()
        (tmp_path / "events.csv").write_text("\n".join(shop_lines()) + "\n")
        meta = generic(tmp_path, {"format": "csv", "source": str(tmp_path / "events.csv")}, SHOP_SPARSE, [],
                       SHOP_TASKS)  # fmt: skip
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in tmp_path.glob("out.partial-*")) == sorted(p.name for p in kept)
    assert sorted(meta.report["removed_partials"]) == sorted([str(left), str(legacy)])


def test_rerun_replaces_and_crash_keeps_previous(tmp_path, monkeypatch):
    write_ml1m(tmp_path / "ml")
    out = tmp_path / "out"
    cfg = PrepareConfig(
        format="movielens", source=str(tmp_path / "ml"), val_fraction=0.0, test_fraction=0.0, num_shards=1
    )
    first = prepare(cfg, str(out))
    assert first.report["seed"] == 0
    second = prepare(PrepareConfig(**{**cfg.__dict__, "seed": 7}), str(out))
    assert (
        json.loads((out / "metadata.json").read_text())["report"]["seed"] == 7 and second.report["seed"] == 7
    )

    calls = {"n": 0}
    original = DatasetWriter.write

    def failing_write(self, split, table):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full (simulated)")
        return original(self, split, table)

    monkeypatch.setattr(DatasetWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare(PrepareConfig(**{**cfg.__dict__, "seed": 9}), str(out))
    assert is_complete(out) and DatasetMeta.load(out).report["seed"] == 7  # previous data set intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml", "out"]  # no partial folder left

    calls["n"] = 0
    crash_out = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        prepare(cfg, str(crash_out))
    assert not crash_out.exists() and not is_complete(crash_out)
