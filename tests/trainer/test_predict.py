"""``towerrec predict`` under several ranks: each rank reads the context of its own rows only (the
row groups they lie in, each once) and writes its own shard batch by batch; together the shards
hold every row of the split once, with the context its stored row holds and the scores one rank
gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import TINY_SYNTHETIC
from tests.trainer import rank_jobs
from towerrec.data.dataset import DatasetMeta
from towerrec.data.reader import StoredRows
from towerrec.data.vocab import original_ids

SPLIT = "train"  # tiny_data's largest split: 10 row groups
CONTEXT_COLUMNS = ["user_id", "item_id", "rating", "click"]  # ids, then the tasks' labels


def predict_counting_reads(overrides: list[str], output: str, split: str) -> list[tuple[str, int, list[str]]]:
    """A rank of a ``RankPool``: ``predict`` (without closing the pool's process group), returning
    the (file, row group, columns) of every stored row group this rank read while predicting."""
    from towerrec.data import reader
    from towerrec.trainer import predict as predicting

    reads: list[tuple[str, int, list[str]]] = []
    read_row_group, finish = reader.read_row_group, predicting.finish
    on_predict_start = predicting.PredictionWriter.on_predict_start

    def counting(files, group, columns):
        reads.append((group.file, group.index, list(columns)))
        return read_row_group(files, group, columns)

    def starting(self, trainer, pl_module):  # what building the job read (label checks) is not predicting
        reads.clear()
        on_predict_start(self, trainer, pl_module)

    reader.read_row_group, predicting.finish = counting, lambda: None
    predicting.PredictionWriter.on_predict_start = starting
    try:
        predicting.predict(rank_jobs.load(overrides), None, split, output)
    finally:
        reader.read_row_group, predicting.finish = read_row_group, finish
        predicting.PredictionWriter.on_predict_start = on_predict_start
    return reads


@pytest.mark.slow
def test_each_rank_reads_and_writes_only_its_own_rows(rank_pools, tiny_data, tmp_path):
    overrides = [
        f"data.path={tiny_data}", *TINY_SYNTHETIC, f"run_dir={tmp_path / 'run'}", "data.val_split=null",
        "data.test_split=null", "data.validate_on_start=false", "data.batch_size=64", "data.eval_batch_size=100",
    ]  # fmt: skip
    rank_pools(2).run(rank_jobs.fit, [*overrides, "trainer.max_steps=2"])
    two = rank_pools(2).run(predict_counting_reads, overrides, str(tmp_path / "two"), SPLIT)

    meta = DatasetMeta.load(tiny_data)
    groups = meta.row_groups(SPLIT)
    starts = np.cumsum([0, *(g.num_rows for g in groups)])
    num_rows = int(starts[-1])
    index = {(g.file, g.index): i for i, g in enumerate(groups)}
    for rank, reads in enumerate(two):
        lo, hi = rank * num_rows // 2, (rank + 1) * num_rows // 2
        mine = {i for i in range(len(groups)) if starts[i] < hi and starts[i + 1] > lo}
        assert {index[file, group] for file, group, _ in reads} == mine, (
            f"rank {rank} read another rank's rows"
        )
        context = [index[file, group] for file, group, columns in reads if columns == CONTEXT_COLUMNS]
        assert sorted(context) == sorted(mine), (
            f"rank {rank}: each of its row groups read once for the context"
        )
        shard = pq.ParquetFile(tmp_path / "two" / f"part-rank{rank:05d}.parquet")
        assert shard.read().column("row").to_pylist() == list(range(lo, hi))
        assert shard.num_row_groups == -(-(hi - lo) // 100)  # written a batch at a time

    # the rows' context is what `predict` wrote when it read the whole split: the stored row's
    # ids (the original ones where the data set saved vocabularies; synthetic ids are their own) and labels
    table = pq.read_table(tmp_path / "two")
    rows = table.column("row").to_numpy()
    assert sorted(rows) == list(range(num_rows))
    stored = pa.concat_tables(
        pq.ParquetFile(g.file).read_row_group(g.index, columns=CONTEXT_COLUMNS) for g in groups
    )
    stored = stored.take(rows)
    for column in ("user_id", "item_id"):
        vocabulary, values = meta.vocabulary(column), stored.column(column)
        expected = values if vocabulary is None else original_ids(values.to_numpy(), vocabulary)
        assert table.column(column).to_pylist() == expected.to_pylist()
    assert table.column("rating_label").to_pylist() == stored.column("rating").to_pylist()
    assert table.column("ctr_label").to_pylist() == stored.column("click").to_pylist()

    # ... and each row's scores are the ones one rank gives it
    rank_pools(1).run(predict_counting_reads, overrides, str(tmp_path / "one"), SPLIT)
    one = pq.read_table(tmp_path / "one").sort_by("row")
    two_sorted = table.sort_by("row")
    for task in ("rating", "ctr"):
        np.testing.assert_allclose(two_sorted.column(task).to_numpy(), one.column(task).to_numpy(), rtol=1e-5)


def test_stored_rows_reads_only_the_row_groups_holding_the_rows(tiny_data, monkeypatch):
    from towerrec.data import reader

    meta = DatasetMeta.load(tiny_data)
    groups = meta.row_groups(SPLIT)  # 5 x 256, then 4 x 256 and 93 rows (two files)
    everything = pa.concat_tables(
        pq.ParquetFile(g.file).read_row_group(g.index, columns=["row_id"]) for g in groups
    )
    reads = []
    read_row_group = reader.read_row_group
    monkeypatch.setattr(
        reader, "read_row_group", lambda f, g, c: reads.append(groups.index(g)) or read_row_group(f, g, c)
    )
    stored = StoredRows(meta, SPLIT, ["row_id"])

    for rows in (np.arange(250, 300), np.arange(300, 512), np.arange(512, 520)):  # ascending batches
        assert stored.take(rows).column(0).to_pylist() == everything.column(0).take(rows).to_pylist()
    assert reads == [0, 1, 2]  # each group once: the last one read is kept for the next batch

    reads.clear()
    scattered = np.array([2392, 3, 1500, 4, 2300])  # any order: the groups holding them, rows in that order
    assert stored.take(scattered).column(0).to_pylist() == everything.column(0).take(scattered).to_pylist()
    assert sorted(reads) == [0, 5, 8, 9]
    assert stored.take(np.array([], np.int64)).num_rows == 0
