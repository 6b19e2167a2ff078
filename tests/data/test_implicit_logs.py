"""Implicit logs (user, item, time; no label) through the generic CSV path: the leave-last-out
split with its minimum, rows without keys, empty item cells, and sampled negatives for any log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerrec.data.cleaning import TableSchema
from towerrec.data.config import HistoryConfig, PrepareConfig
from towerrec.data.convert import ConstantLabel
from towerrec.data.dataset import DataError, DatasetMeta
from towerrec.data.negatives import ExcludedItems
from towerrec.data.prepare import prepare


def write_log(path: Path, rows: list[tuple], header: str = "user,item,ts") -> Path:
    path.write_text(header + "\n" + "\n".join(",".join(map(str, row)) for row in rows) + "\n")
    return path


def split_rows(meta: DatasetMeta, split: str, columns: list[str]) -> list[tuple]:
    if not meta.row_groups(split):
        return []
    table = pq.read_table(meta.root / split, columns=columns)
    return sorted(zip(*(table.column(c).to_pylist() for c in columns)))


def implicit(source: Path, **prepare_keys) -> tuple[PrepareConfig, TableSchema]:
    cfg = PrepareConfig(format="csv", source=str(source), user_column="user", time_column="ts",
                        split="leave_last_out", num_shards=1, columns={"ts": "other"}, **prepare_keys)  # fmt: skip
    cfg.check()
    schema = TableSchema(
        {"user": "sparse", "item": "sparse", "ts": "other"}, user_column="user", time_column="ts"
    )
    return cfg, schema


# users with 1, 2, 3 and 5 events; u5's last two events share a time and the file lists one of its
# events out of time order
LOG = [
    ("u5", "c", 40), ("u3", "a", 10), ("u2", "b", 10), ("u5", "d", 90), ("u1", "a", 10), ("u3", "b", 20),
    ("u5", "a", 15), ("u2", "c", 20), ("u3", "c", 30), ("u5", "e", 90), ("u5", "b", 5),
]  # fmt: skip


def test_leave_last_out_on_a_csv_log_keeps_users_below_the_minimum_in_train(tmp_path):
    source = write_log(tmp_path / "log.csv", LOG)
    cfg, schema = implicit(source)
    schema.kinds["item"] = "other"  # items as written (those of val/test only are out of the vocabulary)
    meta = prepare(cfg, str(tmp_path / "out"), schema)
    users = ["<oov>", *meta.vocabulary("user").tolist()]

    def named(split):
        return sorted((users[u], i, int(t)) for u, i, t in split_rows(meta, split, ["user", "item", "ts"]))

    assert named("test") == [("u3", "c", 30), ("u5", "e", 90)]  # the later row of the tie at 90
    assert named("val") == [("u3", "b", 20), ("u5", "d", 90)]
    assert {u for u, _, _ in named("train")} == {"u1", "u2", "u3", "u5"}  # u1, u2: every event in train
    assert len(named("train")) == 7
    assert meta.report["leave_last_out"] == {
        "min_events_per_user": 3,
        "users_held_out": 2,
        "users_train_only": 2,
    }


def test_a_log_where_no_user_has_enough_events_stops_naming_the_key_and_the_file(tmp_path):
    source = write_log(tmp_path / "log.csv", [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1)])
    with pytest.raises(
        DataError, match=r"log\.csv: no user has data\.prepare\.min_events_per_user = 3 .*most .*: 2"
    ):
        cfg, schema = implicit(source)
        prepare(cfg, str(tmp_path / "out"), schema)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


@pytest.mark.parametrize("empty", ["user", "ts"])
def test_a_row_without_its_user_or_time_is_an_error_naming_file_row_and_column(tmp_path, empty):
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "a", 1)]
    rows[2] = ("", "c", 3) if empty == "user" else ("u1", "c", "")
    cfg, schema = implicit(write_log(tmp_path / "log.csv", rows))
    if empty == "user":
        cfg.missing_sparse = "fill"
    with pytest.raises(
        DataError, match=rf"log\.csv: row 2: column '{empty}' \(data\.prepare\.(user|time)_column\) is empty"
    ):
        prepare(cfg, str(tmp_path / "out"), schema)
    assert not list(tmp_path.glob("out*"))


def test_empty_item_cells_are_dropped_and_counted_with_missing_sparse_drop(tmp_path):
    rows = [(u, f"i{k}", k) for u in ("u1", "u2") for k in range(4)]
    rows[1] = ("u1", "", 1)
    cfg, schema = implicit(write_log(tmp_path / "log.csv", rows), missing_sparse="drop")
    meta = prepare(cfg, str(tmp_path / "out"), schema)
    assert meta.report["cleaning"]["sparse_missing_dropped"] == {"user": 0, "item": 1}
    assert sum(meta.num_rows(s) for s in meta.splits) == 7


def test_histories_follow_the_row_order_without_a_time_column(tmp_path):
    rows = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "d"), ("u1", "c"), ("u3", "c"), ("u1", "d")]
    source = write_log(tmp_path / "log.csv", rows, header="user,item")
    cfg = PrepareConfig(format="csv", source=str(source), user_column="user", split="leave_last_out",
                        num_shards=1, histories=[HistoryConfig(name="hist", column="item", events="all")])  # fmt: skip
    cfg.check()
    meta = prepare(
        cfg, str(tmp_path / "out"), TableSchema({"user": "sparse", "item": "sparse"}, user_column="user")
    )
    items = ["<oov>", *meta.vocabulary("item").tolist()]
    (test,) = pq.read_table(meta.root / "test").to_pylist()
    # events: all, so the test row's history holds the validation event c too (nothing later)
    assert items[test["item"]] == "d" and [items[i] for i in test["hist"]] == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------- negatives
def test_sampling_draws_uniformly_among_the_items_a_user_never_had():
    catalogue = np.array([3, 8, 10, 11, 20, 21, 40])
    users = np.array([1, 1, 1, 2, 2, 2, 2, 2, 2, 9])
    items = np.array([8, 11, 99, 3, 8, 10, 11, 20, 40, 3])  # 99 is not in the catalogue
    excluded = ExcludedItems(users, items, catalogue)
    rng = np.random.default_rng(0)
    draws = excluded.sample(np.repeat([1, 2, 5], 14_000), rng).reshape(3, -1)
    allowed = {1: {3, 10, 20, 21, 40}, 2: {21}, 5: set(catalogue.tolist())}  # 5: no interactions at all
    for row, user in enumerate((1, 2, 5)):
        values, counts = np.unique(draws[row], return_counts=True)
        assert set(values.tolist()) == allowed[user]
        assert counts.min() > 0.9 * counts.mean()  # uniform (each count within ~5 standard deviations)
    from towerrec.data.negatives import NothingToSample

    with pytest.raises(NothingToSample):
        ExcludedItems(np.array([4] * 7), catalogue, catalogue).sample(np.array([1, 4]), rng)


def shop_log(num_users: int = 30, events: int = 8, seed: int = 0) -> list[tuple]:
    """user, item, category (one per item), age (one per user), device (per row), ts, stars."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        for k in rng.choice(24, events, replace=False):
            rows.append((f"u{u}", f"i{k}", f"cat{k % 5}", 20 + u % 7, ["web", "app"][int(rng.integers(2))],
                         100 * u + len(rows), int(rng.integers(1, 6))))  # fmt: skip
    return rows


def ranker_config(tmp_path: Path, source: Path, per_row: int = 3, mask: str | None = "rated"):
    import yaml

    from towerrec.trainer.config import load_config

    tree = {
        "data": {
            "path": str(tmp_path / "data"),
            "prepare": {"format": "csv", "source": str(source), "user_column": "user", "item_column": "item",
                        "time_column": "ts", "split": "leave_last_out", "num_shards": 1, "columns": {"ts": "other"},
                        "negatives_per_positive": per_row, "histories": [{"name": "hist", "column": "item"}]},
            "sparse": [{"name": "user", "side": "user"}, {"name": "item", "side": "item", "table": "t_item"},
                       {"name": "category", "side": "item"}, {"name": "device"},
                       {"name": "hist", "side": "user", "sequence": True, "table": "t_item", "candidate": "item"}],
            "dense": [{"name": "age", "side": "user"}],
        },
        "tasks": [{"name": "rated", "label": "rated"},
                  {"name": "stars", "type": "regression", "min_value": 1.0, "max_value": 5.0, "mask": mask}],
        "model": {"alpha": None},
    }  # fmt: skip
    config = tmp_path / "ranker.yaml"
    config.write_text(yaml.safe_dump(tree))
    return load_config(config)


@pytest.mark.parametrize("slice_rows", [262_144, 8])
def test_negatives_for_a_csv_log_avoid_the_users_items_and_carry_the_items_own_features(
    tmp_path, monkeypatch, slice_rows
):
    import towerrec.data.convert as convert
    from towerrec.trainer.dataset_setup import input_schema

    monkeypatch.setattr(convert, "SAMPLED_SLICE_ROWS", slice_rows)  # chunks are augmented slice by slice

    rows = shop_log()
    source = write_log(tmp_path / "shop.csv", rows, header="user,item,category,age,device,ts,stars")
    cfg = ranker_config(tmp_path, source)
    meta = prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))
    items = ["<oov>", *meta.vocabulary("item").tolist()]
    users = ["<oov>", *meta.vocabulary("user").tolist()]
    categories = ["<oov>", *meta.vocabulary("category").tolist()]
    tables = {split: pq.read_table(meta.root / split).to_pylist() for split in ("train", "val", "test")}
    had = {
        split: {(users[r["user"]], items[r["item"]]) for r in tables[split] if r["rated"] == 1}
        for split in tables
    }
    raw = {(u, ts): (i, c, a, d) for u, i, c, a, d, ts, _ in rows}
    item_category = {i: c for _, i, c, *_ in rows}
    for split, table in tables.items():
        real = [r for r in table if r["rated"] == 1]
        sampled = [r for r in table if r["rated"] == 0]
        assert len(sampled) == 3 * len(real) and real
        avoid = had["train"] | had["val"] | (had["test"] if split == "test" else set())
        real_by_key = {(r["user"], r["ts"]): r for r in real}
        for r in sampled:
            user, item = users[r["user"]], items[r["item"]]
            assert (user, item) not in avoid  # never an item the user interacted with
            assert categories[r["category"]] == item_category[item]  # the item's own category
            twin = real_by_key[(r["user"], r["ts"])]  # its row: same user, time, context, history
            _, _, age, device = raw[(user, int(r["ts"]))]
            assert r["device"] == twin["device"] and r["age"] == twin["age"] and r["hist"] == twin["hist"]
            assert r["stars"] is None or np.isnan(r["stars"])  # no label on a sampled row
        for r in real:
            assert categories[r["category"]] == item_category[items[r["item"]]]
    assert meta.columns["rated"] == {"kind": "label", "min": 0.0, "max": 1.0, "binary": True}
    assert meta.report["negatives_per_positive"] == 3
    # the same recipe draws the same negatives
    again = prepare(cfg.data.prepare, str(tmp_path / "again"), input_schema(cfg))
    first, second = (pq.read_table(m.root / "test").drop_columns(["stars"]) for m in (meta, again))
    assert first.equals(second)


def test_negatives_need_a_mask_on_every_other_task_and_the_item_column(tmp_path):
    from towerrec.trainer.dataset_setup import input_schema
    from towerrec.trainer.errors import ConfigError

    source = write_log(tmp_path / "shop.csv", shop_log(4), header="user,item,category,age,device,ts,stars")
    with pytest.raises(
        ConfigError, match=r"tasks\[1\]\.mask: .* no 'stars'; set mask: rated on task 'stars'"
    ):
        input_schema(ranker_config(tmp_path, source, mask=None))
    cfg = ranker_config(tmp_path, source)
    cfg.data.prepare.item_column = None
    with pytest.raises(DataError, match=r"data\.prepare\.item_column: negatives_per_positive"):
        prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))
    assert not Path(cfg.data.path).exists()


def test_a_binary_label_with_one_value_on_the_training_rows_stops_before_the_data_set_is_written(tmp_path):
    rows = [(f"u{k % 5}", f"i{k}", k, 1) for k in range(40)]
    source = write_log(tmp_path / "log.csv", rows, header="user,item,ts,click")
    cfg = PrepareConfig(format="csv", source=str(source), num_shards=1)
    schema = TableSchema({"user": "sparse", "item": "sparse", "click": "label"}, label_ranges={"click": (0.0, 1.0)},
                         binary_labels=("click",))  # fmt: skip
    with pytest.raises(ConstantLabel, match=r"log\.csv: label column 'click' is 1 on every training row"):
        prepare(cfg, str(tmp_path / "out"), schema)
    assert not list(tmp_path.glob("out*"))


def test_fit_refuses_a_constant_label_naming_the_task_the_column_and_the_value(tmp_path):
    from tests.conftest import run_cli

    rows = [(f"u{k % 5}", f"i{k % 7}", k) for k in range(60)]
    source = write_log(tmp_path / "log.csv", rows)
    result = run_cli(
        ["fit", "--config", "configs/default.yaml", "data.prepare.format=csv", f"data.prepare.source={source}",
         f"data.path={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", "data.prepare.derive={click: ts > -1}",
         "data.sparse=[{name: user}, {name: item}]", "data.dense=[]", "model.alpha=null",
         "tasks=[{name: ctr, type: binary, label: click}]"],
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "tasks: 'ctr' (label column 'click') is 1 on every training row" in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_fit_checks_a_prepared_data_set_whose_masked_label_is_constant(tmp_path):
    from towerrec.data.dataset import DatasetWriter
    from towerrec.trainer.config import load_config
    from towerrec.trainer.dataset_setup import check_data_against_config
    from towerrec.trainer.errors import ConfigError

    writer = DatasetWriter(str(tmp_path / "data"), 1, 64)
    n = 200
    table = pa.table({"user": np.arange(n) % 9, "item": np.arange(n) % 11,
                      "click": (np.arange(n) % 2).astype(np.float32),
                      "buy": np.where(np.arange(n) % 2 == 1, 0.0, 1.0).astype(np.float32)})  # fmt: skip
    for split in ("train", "val", "test"):
        writer.write(split, table)
    meta = writer.commit(columns={"user": {"kind": "sparse", "num_embeddings": 9},
                                  "item": {"kind": "sparse", "num_embeddings": 11},
                                  "click": {"kind": "label"}, "buy": {"kind": "label"}})  # fmt: skip
    cfg = load_config("configs/default.yaml", [
        f"data.path={tmp_path / 'data'}", "data.prepare=null", "data.sparse=[{name: user}, {name: item}]",
        "data.dense=[]", "model.alpha=null",
        "tasks=[{name: ctr, label: click}, {name: cvr, label: buy, mask: click}]"])  # fmt: skip
    # buy is 0 on every clicked row: the CVR task (counted on clicks) has nothing to learn
    with pytest.raises(
        ConfigError,
        match=r"tasks\[1\] \('cvr'\): label column 'buy' is 0 on every training row it counts \(mask: click\)",
    ):
        check_data_against_config(cfg, meta)
