"""Raw ids for ``id_mapping: dynamic`` features: the reader passes int64 ids through (negatives
included, a null as ``MISSING_ID``) and refuses other types naming the file, column and feature;
preparation stores raw ids (text hashed, the texts kept for outputs) instead of vocabulary rows;
the config section checks itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from towerrec.data.cleaning import string_ids
from towerrec.data.config import MISSING_ID, DynamicIdsConfig, SparseFeature
from towerrec.data.dataset import DataError, DatasetMeta, DatasetWriter
from towerrec.data.reader import BatchStream, LabelSpec, ReadSpec
from towerrec.data.validate import validate_dataset
from towerrec.trainer.config import ConfigError, load_config
from towerrec.trainer.dataset_setup import input_schema

DYNAMIC = DynamicIdsConfig(capacity=100)


def dataset(path: Path, user: pa.Array) -> DatasetMeta:
    writer = DatasetWriter(path, num_shards=1, row_group_size=8)
    rows = len(user)
    writer.write("train", pa.table({"user": user, "click": pa.array(np.arange(rows) % 2, pa.float32())}))
    return writer.commit(columns={"user": {"kind": "sparse"}, "click": {"kind": "label", "min": 0, "max": 1}})


def read_spec(feature: SparseFeature) -> ReadSpec:
    return ReadSpec(
        sparse=(feature,),
        dense=(),
        labels=(LabelSpec("click", binary=True),),
        num_embeddings={feature.name: 101},
    )


def test_the_reader_passes_raw_int64_ids_through(tmp_path):
    ids = [-5, 2**62, None, 7, -(2**63) + 1, 0]
    meta = dataset(tmp_path / "d", pa.array(ids, pa.int64()))
    feature = SparseFeature("user", id_mapping="dynamic", dynamic=DYNAMIC)
    stream = BatchStream(
        meta, "train", read_spec(feature), batch_size=6, shuffle=False, background_decode=False
    )
    (batch,) = list(stream)
    assert batch.sparse.values().tolist() == [-5, 2**62, MISSING_ID, 7, -(2**63) + 1, 0]
    with pytest.raises(DataError, match="column 'user' has negative id -5"):  # a vocab feature still refuses
        list(
            BatchStream(
                meta, "train", read_spec(SparseFeature("user")), 6, shuffle=False, background_decode=False
            )
        )


@pytest.mark.parametrize("column", [pa.array(["u1", "u2"] * 4), pa.array(np.linspace(0, 1, 8))])
def test_ids_of_another_type_for_a_dynamic_feature_are_refused_naming_file_column_and_feature(
    tmp_path, column
):
    meta = dataset(tmp_path / "d", column)
    feature = SparseFeature("user", id_mapping="dynamic", dynamic=DYNAMIC)
    with pytest.raises(DataError) as info:
        validate_dataset(meta, read_spec(feature))
    message = str(info.value)
    assert str(meta.row_groups("train")[0].file) in message and "column 'user'" in message
    assert f"has type {column.type}" in message and "expected integer ids" in message
    assert "feature 'user', id_mapping: dynamic" in message
    with pytest.raises(DataError, match="feature 'user', id_mapping: dynamic"):  # the reader says the same
        list(BatchStream(meta, "train", read_spec(feature), 8, shuffle=False, background_decode=False))


def shop_config(tmp_path: Path, *overrides: str):
    from towerrec.data.samples import shop_impressions, write_csv

    write_csv(shop_impressions(num_rows=800, num_users=60, num_items=40, seed=3), tmp_path / "shop.csv")
    return load_config(
        "configs/shop_csv_esmm.yaml",
        [
            f"data.path={tmp_path / 'data'}", f"data.prepare.source={tmp_path / 'shop.csv'}",
            "data.prepare.row_group_size=256", "data.sparse.0.id_mapping=dynamic",
            "data.sparse.0.dynamic={capacity: 50}", *overrides,
        ],
    )  # fmt: skip


def test_preparation_stores_raw_ids_of_dynamic_columns_and_keeps_their_texts(tmp_path):
    from towerrec.data.prepare import prepare
    from towerrec.data.reader import StoredRows

    cfg = shop_config(tmp_path)
    meta = prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))
    assert meta.columns["user"]["mapping"] == "dynamic" and meta.columns["user"]["id_type"] == "text"
    assert "num_embeddings" not in meta.columns["user"] and meta.columns["item"]["mapping"] == "vocab"
    texts = pacsv.read_csv(tmp_path / "shop.csv").column("user").combine_chunks()
    expected = set(np.asarray(string_ids(texts).to_numpy(zero_copy_only=False)).tolist())
    for split in ("train", "val", "test"):
        stored = StoredRows(meta, split, ["user", "item"]).take(np.arange(meta.num_rows(split)))
        users = stored.column("user").to_numpy()
        assert set(users.tolist()) <= expected, "not the hashes of the file's user ids"
        names = meta.original_ids("user", users)
        assert names.null_count == 0 and bool(pc.all(pc.equal(string_ids(names), pa.array(users))).as_py())
        assert stored.column("item").to_numpy().max() < meta.columns["item"]["num_embeddings"]  # still rows
    assert meta.report["dynamic_id_columns"] == ["user"]


def test_the_fingerprint_of_a_preparation_without_dynamic_ids_is_unchanged(tmp_path):
    from towerrec.data.prepare import prepared_with

    cfg = load_config("configs/shop_csv_esmm.yaml", [])
    assert "dynamic_ids" not in prepared_with(cfg.data.prepare, input_schema(cfg))["columns"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.sparse.0.id_mapping=dynamic"], "data.sparse[0].dynamic: required by id_mapping: dynamic"),
        (["data.sparse.0.dynamic={capacity: 10}"], "data.sparse[0].dynamic: required by id_mapping: dynamic"),
        (
            ["data.sparse.0.id_mapping=dynamic", "data.sparse.0.dynamic={capacity: 10, policy: ttl}"],
            "data.sparse[0].dynamic.ttl_steps: required by policy: ttl",
        ),
        (
            ["data.sparse.0.id_mapping=dynamic", "data.sparse.0.dynamic={capacity: 10, ttl_steps: 5}"],
            "data.sparse[0].dynamic.ttl_steps: only for policy: ttl",
        ),
        (
            ["data.sparse.0.id_mapping=dynamic", "data.sparse.0.dynamic={capacity: 0}"],
            "data.sparse[0].dynamic.capacity: must be > 0",
        ),
        (
            ["data.sparse.0.id_mapping=dynamic", "data.sparse.0.dynamic={capacity: 10}", "data.sparse.0.num_embeddings=11"],
            "data.sparse[0].num_embeddings: an id_mapping: dynamic table has dynamic.capacity + 1 rows",
        ),
        (
            ["data.sparse.0.id_mapping=dynamic", "data.sparse.0.dynamic={capacity: 10}", "data.sparse.1.table=t_user_id"],
            "data.sparse[1].dynamic: table 't_user_id' is shared with 'user_id'",
        ),
        (
            ["data.sparse.0.id_mapping=dynamic", "data.sparse.0.dynamic={capacity: 10}",
             "trainer.train_pipeline=sparse_dist"],
            "trainer.train_pipeline: sparse_dist prefetches batches",
        ),
        (
            ["data.sparse.0.id_mapping=dynamic", "data.sparse.0.dynamic={capacity: 10}",
             "sharding.table_constraints={t_user_id: [data_parallel]}"],
            "sharding.table_constraints.t_user_id: data_parallel",
        ),
    ],
)  # fmt: skip
def test_the_dynamic_section_is_checked_when_the_config_is_loaded(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/default.yaml", overrides)
    assert message in str(info.value), str(info.value)


def test_an_appended_day_stores_raw_ids_and_names_its_new_text_ids(tmp_path):
    from towerrec.data.prepare import append_day, prepare
    from towerrec.data.samples import drifting_days, write_days

    days = []
    for table in drifting_days(num_days=2, rows_per_day=2000, seed=2):
        texts = pc.binary_join_element_wise("u", pc.cast(table.column("user"), pa.string()), "")
        days.append(table.set_column(table.schema.get_field_index("user"), "user", texts))
    write_days(days, tmp_path / "log")
    cfg = load_config(
        "configs/rolling_days.yaml",
        [
            f"data.path={tmp_path / 'data'}", f"data.prepare.source={tmp_path / 'log' / 'day-00.parquet'}",
            "data.prepare.row_group_size=512", "data.sparse.0.id_mapping=dynamic",
            "data.sparse.0.dynamic={capacity: 500}",
        ],
    )  # fmt: skip
    prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))
    meta = append_day(
        cfg.data.prepare, cfg.data.path, str(tmp_path / "log" / "day-01.parquet"), input_schema(cfg)
    )
    per_day = []
    for day in (0, 1):
        files = sorted({rg.file for rg in meta.row_groups("train", (day, day))})
        stored = np.concatenate([pq.read_table(f, columns=["user"]).column(0).to_numpy() for f in files])
        names = meta.original_ids("user", stored)
        assert names.null_count == 0 and bool(pc.all(pc.equal(string_ids(names), pa.array(stored))).as_py())
        per_day.append(set(names.to_pylist()))
    assert per_day[1] - per_day[0], "day 1 brings users day 0 did not have"
    assert meta.days[1]["originals"]["user"].startswith("days/0001/")
