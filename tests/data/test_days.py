"""Data sets that grow by days: appending keeps the earlier days as they were (bytes and
encoding), encodes the new day with the first preparation's vocabularies, refuses another schema,
survives an interrupted append, and reading a range of days reads that range's row groups only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from towerrec.data.dataset import DataError, DatasetMeta
from towerrec.data.prepare import append_day, prepare
from towerrec.data.reader import BatchStream, read_spec
from towerrec.data.samples import drifting_days, write_days
from towerrec.trainer.config import load_config
from towerrec.trainer.dataset_setup import input_schema

CONFIG = "configs/rolling_days.yaml"


def day_config(root: Path, *overrides: str):
    return load_config(
        CONFIG,
        [f"data.path={root / 'data'}", f"data.prepare.source={root / 'log' / 'day-00.parquet'}",
         "data.prepare.row_group_size=512", *overrides],
    )  # fmt: skip


@pytest.fixture(scope="module")
def day_log(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drift")
    write_days(drifting_days(num_days=4, rows_per_day=3000, seed=2), root / "log")
    return root


def prepared(day_log: Path, tmp_path: Path, *overrides: str):
    """Day 0 of the log prepared under ``tmp_path`` (a config whose paths point there)."""
    (tmp_path / "log").symlink_to(day_log / "log")
    cfg = day_config(tmp_path, *overrides)
    prepare(cfg.data.prepare, cfg.data.path, input_schema(cfg))
    return cfg


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stored_ids(meta: DatasetMeta, column: str, days) -> np.ndarray:
    files = sorted({rg.file for rg in meta.row_groups("train", days)})
    return np.concatenate([pq.read_table(f, columns=[column]).column(0).to_numpy() for f in files])


def test_appended_days_keep_the_earlier_days_and_their_vocabulary(day_log, tmp_path):
    cfg = prepared(day_log, tmp_path)
    path = Path(cfg.data.path)
    before = snapshot(path)
    vocabulary = DatasetMeta.load(path).vocabulary("item")
    for day in (1, 2):
        meta = append_day(cfg.data.prepare, cfg.data.path, str(tmp_path / "log" / f"day-{day:02d}.parquet"),
                          input_schema(cfg))  # fmt: skip
    after = snapshot(path)
    assert {k: v for k, v in after.items() if k in before and k != "metadata.json"} == {
        k: v for k, v in before.items() if k != "metadata.json"
    }, "an earlier day's file changed"
    assert meta.num_days == 3 and [d["day"] for d in meta.days] == [0, 1, 2]
    assert meta.vocab_size("item") == len(vocabulary) + 1  # frozen: the table keeps its size
    log = [pq.read_table(tmp_path / "log" / f"day-{d:02d}.parquet") for d in range(3)]
    for day in range(3):
        assert meta.num_rows("train", (day, day)) == log[day].num_rows
        files = {rg.file for rg in meta.row_groups("train", (day, day))}
        assert all(("days/" in f) == (day > 0) for f in files)
        # each day's ids encoded with day 0's vocabulary: known ids to their row, new ids to row 0
        rows = np.sort(stored_ids(meta, "item", (day, day)))
        raw = log[day].column("item").to_numpy()
        position = {item: r + 1 for r, item in enumerate(vocabulary)}
        np.testing.assert_array_equal(rows, np.sort([position.get(i, 0) for i in raw]))
        if day:
            new = int(np.sum([i not in position for i in raw]))
            assert meta.days[day]["report"]["ids_outside_vocabulary"]["item"] == new > 0
    assert meta.num_rows("train", (0, 2)) == meta.num_rows("train") == sum(t.num_rows for t in log)


def test_hashed_ids_of_new_days_get_their_own_rows(day_log, tmp_path):
    cfg = prepared(day_log, tmp_path, "data.prepare.sparse_mapping=hash")
    meta = append_day(
        cfg.data.prepare, cfg.data.path, str(tmp_path / "log" / "day-03.parquet"), input_schema(cfg)
    )
    assert meta.vocabulary("item") is None and not meta.days[1]["report"]["ids_outside_vocabulary"]
    items = stored_ids(meta, "item", (1, 1))
    assert (items > 0).all() and len(np.unique(items)) > 100


def test_reading_a_range_of_days_reads_only_its_row_groups(day_log, tmp_path, monkeypatch):
    cfg = prepared(day_log, tmp_path)
    for day in (1, 2, 3):
        meta = append_day(cfg.data.prepare, cfg.data.path, str(tmp_path / "log" / f"day-{day:02d}.parquet"),
                          input_schema(cfg))  # fmt: skip
    spec = read_spec(cfg.data, cfg.tasks, meta.table_rows(cfg.data.sparse), meta.columns)
    wanted = set(meta.row_groups("train", (2, 3)))
    assert wanted and not wanted & set(meta.row_groups("train", (0, 1)))
    read = []
    import towerrec.data.reader as reader

    original = reader.read_row_group

    def recording(files, group, columns):
        read.append(group)
        return original(files, group, columns)

    monkeypatch.setattr(reader, "read_row_group", recording)
    stream = BatchStream(
        meta, "train", spec, batch_size=256, rank=1, world_size=2, days=(2, 3), background_decode=False
    )
    rows = sum(int(batch.weights.sum()) for batch in stream)
    assert read and set(read) <= wanted
    assert rows == stream.num_rows - stream.num_rows // 2  # rank 1's half
    assert stream.num_rows == meta.num_rows("train", (2, 3)) == 6000


def test_a_day_with_another_schema_is_refused_and_nothing_changes(day_log, tmp_path):
    cfg = prepared(day_log, tmp_path)
    day = pq.read_table(tmp_path / "log" / "day-01.parquet")
    texts = day.set_column(
        day.column_names.index("item"), "item", pa.array([f"i{v}" for v in day["item"].to_pylist()])
    )
    pq.write_table(texts, tmp_path / "text_items.parquet")
    path = Path(cfg.data.path)
    before = snapshot(path)
    with pytest.raises(
        DataError,
        match=r"text_items\.parquet: column 'item' has type string, but the data set's earlier days have int64",
    ):
        append_day(cfg.data.prepare, cfg.data.path, str(tmp_path / "text_items.parquet"), input_schema(cfg))
    pq.write_table(day.drop_columns(["category"]), tmp_path / "no_category.parquet")
    with pytest.raises(
        DataError, match=r"no_category\.parquet: columns \['category'\] that the config names are missing"
    ):
        append_day(cfg.data.prepare, cfg.data.path, str(tmp_path / "no_category.parquet"), input_schema(cfg))
    assert {k: v for k, v in snapshot(path).items() if not k.startswith("days/")} == before
    assert DatasetMeta.load(path).num_days == 1


def test_an_interrupted_append_leaves_the_data_set_as_it_was(day_log, tmp_path, monkeypatch):
    cfg = prepared(day_log, tmp_path)
    path = Path(cfg.data.path)
    metadata = (path / "metadata.json").read_bytes()
    import towerrec.data.prepare as preparation

    def killed(*args):  # the day's shards are written and renamed into place, metadata.json is not
        raise KeyboardInterrupt

    monkeypatch.setattr(preparation, "_check_same_shards", killed)
    with pytest.raises(KeyboardInterrupt):
        append_day(
            cfg.data.prepare, cfg.data.path, str(tmp_path / "log" / "day-01.parquet"), input_schema(cfg)
        )
    assert (path / "metadata.json").read_bytes() == metadata and (path / "days" / "0001").exists()
    assert DatasetMeta.load(path).num_days == 1
    monkeypatch.undo()
    meta = append_day(
        cfg.data.prepare, cfg.data.path, str(tmp_path / "log" / "day-02.parquet"), input_schema(cfg)
    )
    assert meta.num_days == 2 and meta.days[1]["source"].endswith("day-02.parquet")
    assert meta.num_rows("train", (1, 1)) == pq.read_metadata(tmp_path / "log" / "day-02.parquet").num_rows


def test_append_command_refuses_another_recipe_and_bad_days_with_exit_2(day_log, tmp_path):
    cfg = prepared(day_log, tmp_path)
    common = ["--config", CONFIG, "--data.path", cfg.data.path, "--data.prepare.source", cfg.data.prepare.source,
              "--data.prepare.row_group_size", "512"]  # fmt: skip
    day1 = str(tmp_path / "log" / "day-01.parquet")
    other = run_cli(["prepare", *common, "--data.prepare.num_shards", "3", "--append", day1], check=False)
    assert (
        other.returncode == 2
        and "data.prepare: " in other.stderr
        and "num_shards: 2 there, 3 in the config" in other.stderr
    )
    done = run_cli(["prepare", *common, "--append", day1])
    assert "as day 1" in done.stdout and "not in the data set's vocabulary: row 0" in done.stdout
    fit = run_cli(
        ["fit", *common, "--run_dir", str(tmp_path / "run"), "--data.train_days", "[0,2]"], check=False
    )
    assert (
        fit.returncode == 2 and "data.train_days: [0, 2], but" in fit.stderr and "has days 0..1" in fit.stderr
    )
    days = json.loads((Path(cfg.data.path) / "metadata.json").read_text())["days"]
    assert [d["day"] for d in days] == [0, 1]
