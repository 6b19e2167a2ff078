"""Behaviour histories are built from strictly earlier events only: on a constructed log, through
the generic CSV path, and on the real ML-100K when present."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from towerrec.data.config import HistoryConfig, PrepareConfig
from towerrec.data.history import EventLog, age_buckets
from towerrec.data.prepare import prepare
from towerrec.trainer.config import load_config
from towerrec.trainer.dataset_setup import input_schema


def test_a_row_sees_only_its_users_events_strictly_before_its_time():
    # user 7: events at t=1, 2, 2, 5, 9; user 8: one event at t=3
    log = EventLog.build(
        users=[7, 7, 8, 7, 7, 7], times=[5, 1, 3, 2, 9, 2], columns={"item": [50, 10, 80, 20, 90, 21]}
    )
    rows_users = np.array([7, 7, 7, 7, 8, 9])
    rows_times = np.array([2, 5, 6, 100, 3, 4])
    lists = log.sequences(rows_users, rows_times, max_length=3, age="age")["item"]
    got = [lists.values[a:b].tolist() for a, b in zip(lists.offsets[:-1], lists.offsets[1:])]
    assert got == [
        [10],  # t=2: the two events at t=2 (its own time) are not earlier
        [10, 20, 21],  # t=5: its own event at 5 is not in it
        [20, 21, 50],  # the 3 most recent, oldest first
        [21, 50, 90],
        [],  # user 8 at t=3: its only event is at t=3
        [],  # a user with no events
    ]


def test_age_buckets_grow_with_log2_of_the_gap_and_stay_below_64():
    assert age_buckets(np.array([10, 10, 10, 10**30]), np.array([10, 9, 7, 0])).tolist() == [1, 2, 3, 63]


def test_csv_histories_come_from_earlier_clicks_of_training_rows(tmp_path):
    # rows at t >= 6.5 are test; only clicked training rows are events
    rows = [
        ("u1", "a", 1, 1), ("u2", "a", 1, 1), ("u1", "b", 2, 1), ("u1", "c", 3, 0),
        ("u2", "b", 4, 0), ("u1", "a", 5, 1), ("u1", "d", 6, 1), ("u2", "c", 7, 1),
    ]  # fmt: skip
    source = tmp_path / "log.csv"
    source.write_text("user,item,ts,click\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    overrides = [
        "data.prepare.format=csv", f"data.prepare.source={source}", "data.prepare.user_column=user",
        "data.prepare.time_column=ts", "data.prepare.split=time", "data.prepare.cut_time=6.5",
        "data.prepare.val_fraction=0.0", "data.prepare.num_shards=1", "data.prepare.columns={ts: other}",
        "data.prepare.histories=[{name: hist, column: item, where: click, age: hist_age, max_length: 2}]",
        "data.sparse=[{name: user}, {name: item, table: t_item},"
        " {name: hist, sequence: true, table: t_item, candidate: item, max_length: 2},"
        " {name: hist_age, sequence: true, align_with: hist, max_length: 2}]",
        "data.dense=[]", "tasks=[{name: ctr, type: binary, label: click}]", "model.alpha=null",
    ]  # fmt: skip
    cfg = load_config("configs/default.yaml", overrides)
    meta = prepare(cfg.data.prepare, str(tmp_path / "out"), input_schema(cfg))
    items = meta.vocabulary("item").tolist()  # row r + 1 is items[r]
    decoded = {}
    for split in ("train", "test"):
        table = pq.read_table(meta.root / split).to_pydict()
        for item, ts, hist, age in zip(table["item"], table["ts"], table["hist"], table["hist_age"]):
            decoded[(int(ts), items[item - 1])] = ([items[h - 1] for h in hist], age)
    # events: the clicked rows of the training split (t < 6.5), strictly earlier than the row
    assert decoded[(1, "a")][0] == []  # both users' first rows
    assert decoded[(2, "b")][0] == ["a"]
    assert decoded[(3, "c")][0] == ["a", "b"]
    assert decoded[(5, "a")][0] == ["a", "b"]  # c was not clicked
    assert decoded[(6, "d")][0] == ["b", "a"]  # the 2 most recent
    assert decoded[(7, "c")][0] == ["a"]  # u2 (test row): its click at 1 only; row t=4 was no click
    assert decoded[(6, "d")][1] == age_buckets(np.array([6, 6]), np.array([2, 5])).tolist()
    assert meta.columns["hist"]["num_embeddings"] == meta.columns["item"]["num_embeddings"]


def test_histories_need_a_user_column():
    with pytest.raises(ValueError, match="histories: need user_column"):
        PrepareConfig(format="csv", histories=[HistoryConfig(name="h", column="item")]).check()
    PrepareConfig(format="csv", user_column="u", histories=[HistoryConfig(name="h", column="item")]).check()


@pytest.fixture(scope="module")
def u1(tmp_path_factory, ml100k_dir):
    from towerrec.data.movielens100k import prepare_movielens100k

    cfg = PrepareConfig(format="movielens100k", source=str(ml100k_dir), split="u1", num_shards=1)
    return prepare_movielens100k(cfg, str(tmp_path_factory.mktemp("ml") / "u1"))


def test_movielens_histories_are_earlier_training_ratings_oldest_first(u1):
    train = pq.read_table(u1.root / "train").to_pydict()
    test = pq.read_table(u1.root / "test").to_pydict()
    by_user: dict[int, list[tuple[int, int, int]]] = {}
    for user, item, ts, rating in zip(
        train["user_id"], train["item_id"], train["timestamp"], train["rating"]
    ):
        by_user.setdefault(user, []).append((ts, item, int(rating)))
    for events in by_user.values():
        events.sort()
    rng = np.random.default_rng(0)
    for rows in (train, test):
        for i in rng.choice(len(rows["user_id"]), 300, replace=False):
            earlier = [e for e in by_user.get(rows["user_id"][i], []) if e[0] < rows["timestamp"][i]][-50:]
            assert rows["hist_ratings"][i] == [r for _, _, r in earlier]
            assert sorted(rows["hist_items"][i]) == sorted(item for _, item, _ in earlier)  # ties in time
            assert len(rows["hist_age"][i]) == len(earlier)


def test_leave_last_out_test_histories_hold_the_validation_ratings_and_no_other_history_does(
    tmp_path, ml100k_dir
):
    """The published next-item protocol: the held-out item is predicted from everything before it,
    validation ratings included; training and validation rows see training ratings only."""
    from towerrec.data.movielens100k import prepare_movielens100k

    cfg = PrepareConfig(format="movielens100k", source=str(ml100k_dir), split="leave_last_out", num_shards=1)
    meta = prepare_movielens100k(cfg, str(tmp_path / "llo"))
    splits = {name: pq.read_table(meta.root / name).to_pydict() for name in ("train", "val", "test")}
    val_items = {}
    for user, item, ts in zip(splits["val"]["user_id"], splits["val"]["item_id"], splits["val"]["timestamp"]):
        val_items.setdefault(user, set()).add((item, ts))
    in_test = in_train = 0
    for name in ("train", "test"):
        rows = splits[name]
        for user, ts, history in zip(rows["user_id"], rows["timestamp"], rows["hist_items"]):
            earlier_val = {item for item, when in val_items.get(user, ()) if when < ts}
            held = len(earlier_val & set(history))
            if name == "test":
                in_test += held
            else:
                in_train += held
    assert in_test > 100 and in_train == 0


def test_data_sets_prepared_before_histories_keep_their_fingerprint_and_histories_change_it():
    from towerrec.data.prepare import fingerprint, prepared_with

    plain = prepared_with(PrepareConfig(), None)
    assert "histories" not in plain["prepare"] and "history_max_length" not in plain["prepare"]
    with_history = PrepareConfig(
        user_column="u", time_column="t", histories=[HistoryConfig(name="h", column="i")]
    )
    assert fingerprint(prepared_with(with_history, None)) != fingerprint(
        prepared_with(PrepareConfig(user_column="u", time_column="t"), None)
    )


def test_a_data_set_prepared_without_the_histories_the_config_asks_for_is_refused(tmp_path):
    from towerrec.trainer.dataset_setup import ensure_dataset
    from towerrec.trainer.errors import ConfigError

    rows = [("u1", "a", 1, 1), ("u1", "b", 2, 1), ("u2", "a", 3, 0), ("u2", "b", 4, 1)]
    source = tmp_path / "log.csv"
    source.write_text("user,item,ts,click\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    base = [
        "data.prepare.format=csv", f"data.prepare.source={source}", "data.prepare.user_column=user",
        "data.prepare.time_column=ts", "data.prepare.num_shards=1", f"data.path={tmp_path / 'data'}",
        "data.prepare.val_fraction=0.0", "data.prepare.test_fraction=0.0",  # both click values in train
        "data.sparse=[{name: user}, {name: item}]", "data.dense=[]", "model.alpha=null",
        "tasks=[{name: ctr, type: binary, label: click}]",
    ]  # fmt: skip
    ensure_dataset(load_config("configs/default.yaml", base))
    with_history = load_config(
        "configs/default.yaml", [*base, "data.prepare.histories=[{name: hist, column: item, where: click}]"]
    )
    with pytest.raises(ConfigError, match=r"prepared differently .*histories.*data.rebuild"):
        ensure_dataset(with_history)


def test_reading_keeps_the_most_recent_ids_and_refuses_side_lists_of_another_length():
    import pyarrow as pa

    from towerrec.data.config import SparseFeature
    from towerrec.data.dataset import RowGroup
    from towerrec.data.errors import DataError
    from towerrec.data.rows import ReadSpec, RowLocator, decode_rows

    spec = ReadSpec(
        sparse=(
            SparseFeature("item", table="t_item"),
            SparseFeature("hist", sequence=True, table="t_item", candidate="item", max_length=2),
            SparseFeature("hist_age", sequence=True, align_with="hist", max_length=2),
        ),
        dense=(),
        labels=(),
        num_embeddings={"item": 10, "hist": 10, "hist_age": 64},
    )
    table = pa.table({"item": [1, 2], "hist": [[3, 4, 5], [6]], "hist_age": [[9, 8, 7], [1]]})
    locator = RowLocator([(RowGroup("part-0.parquet", 0, 2), 0)])
    rows, _ = decode_rows(table, spec, locator)
    batch = rows.to_batch()
    assert batch.sequences.keys() == ["item", "hist", "hist_age"] and batch.sparse.keys() == []
    assert batch.sequences["hist"].values().tolist() == [4, 5, 6]  # the last 2, oldest first
    assert batch.sequences["hist_age"].values().tolist() == [8, 7, 1]
    broken = pa.table({"item": [1, 2], "hist": [[3, 4], [6]], "hist_age": [[9, 8], [1, 2]]})
    with pytest.raises(DataError, match=r"part-0.parquet: row group 0, row 1: column 'hist_age' has 2 ids"):
        decode_rows(broken, spec, locator)
