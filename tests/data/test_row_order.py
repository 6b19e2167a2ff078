"""Training rows are stored in a uniformly random order whatever order a converter writes them in,
so that every batch sees the nominal mix of row kinds (e.g. rated rows vs sampled negatives)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from towerrec.data import dataset as dataset_module
from towerrec.data.config import PrepareConfig, SparseFeature
from towerrec.data.dataset import DatasetWriter
from towerrec.data.reader import BatchStream, LabelSpec, ReadSpec


def blocked_rows(num_rows: int, positive_fraction: float) -> list[pa.Table]:
    """Chunks of rows with every positive first, then every negative (the worst order)."""
    num_positive = int(num_rows * positive_fraction)
    label = np.r_[np.ones(num_positive), np.zeros(num_rows - num_positive)].astype(np.float32)
    table = pa.table({"id": pa.array(np.arange(num_rows, dtype=np.int64) % 50), "y": pa.array(label),
                      "n": pa.array(np.arange(num_rows, dtype=np.int64))})  # fmt: skip
    return [table.slice(start, 1000) for start in range(0, num_rows, 1000)]


def write(path, chunks, shuffle: bool) -> object:
    writer = DatasetWriter(
        path, num_shards=3, row_group_size=512, shuffle_splits=("train",) if shuffle else (), seed=4
    )
    for chunk in chunks:
        writer.write("train", chunk)
        writer.write("test", chunk)
    return writer.commit(
        {"id": {"kind": "sparse", "num_embeddings": 50}, "y": {"kind": "label"}, "n": {"kind": "other"}}
    )


def batch_fractions(meta, batch_size: int = 256) -> np.ndarray:
    spec = ReadSpec(sparse=(SparseFeature("id"),), dense=(), labels=(LabelSpec("y", binary=True),),
                    num_embeddings={"id": 50})  # fmt: skip
    stream = BatchStream(meta, "train", spec, batch_size, seed=1, window_rows=2048)
    return np.array([float(b.labels[:, 0].mean()) for b in stream if b.batch_size == batch_size])


@pytest.mark.parametrize("spill", [False, True])
def test_every_batch_sees_the_nominal_mix_however_the_rows_were_written(tmp_path, monkeypatch, spill):
    if spill:  # force the out-of-memory path: buckets spilled to Arrow files several times
        monkeypatch.setattr(dataset_module, "SPILL_ROWS", 3000)
    meta = write(tmp_path / "shuffled", blocked_rows(20_000, 0.2), shuffle=True)
    train = pq.read_table(meta.root / "train", columns=["n"]).column(0).to_numpy()
    assert sorted(train) == list(range(20_000))  # every row once
    fractions = batch_fractions(meta)
    sigma = np.sqrt(0.2 * 0.8 / 256)
    assert np.all(np.abs(fractions - 0.2) < 6 * sigma), (fractions.min(), fractions.max())
    for group in meta.row_groups("test"):  # evaluation splits keep the converter's order
        n = pq.ParquetFile(group.file).read_row_group(group.index, columns=["n"]).column(0).to_numpy()
        assert np.array_equal(n, np.arange(n[0], n[0] + len(n)))
    assert meta.shuffled_splits == ["train"]
    assert not list(meta.root.glob(".shuffle*")) and not (meta.root / ".shuffle").exists()


def test_without_the_writer_shuffle_the_reader_alone_gives_blocked_batches(tmp_path):
    """The defect this guards against: window shuffling cannot mix what lies far apart."""
    meta = write(tmp_path / "blocked", blocked_rows(20_000, 0.2), shuffle=False)
    fractions = batch_fractions(meta)
    assert (fractions == 0).mean() > 0.2


def test_the_shuffle_is_seeded(tmp_path):
    a = write(tmp_path / "a", blocked_rows(5000, 0.5), shuffle=True)
    b = write(tmp_path / "b", blocked_rows(5000, 0.5), shuffle=True)
    read = lambda meta: pq.read_table(meta.root / "train", columns=["n"]).column(0).to_numpy()  # noqa: E731
    np.testing.assert_array_equal(read(a), read(b))


def test_movielens_topk_batches_hold_the_nominal_share_of_rated_rows(tmp_path, ml100k_dir):
    from towerrec.data.movielens100k import prepare_movielens100k

    cfg = PrepareConfig(format="movielens100k", source=str(ml100k_dir), split="u1", negatives_per_positive=4)
    meta = prepare_movielens100k(cfg, str(tmp_path / "topk"))
    spec = ReadSpec(sparse=(SparseFeature("user_id"),), dense=(), labels=(LabelSpec("rated", binary=True),),
                    num_embeddings={"user_id": meta.vocab_size("user_id")})  # fmt: skip
    stream = BatchStream(meta, "train", spec, 1024, seed=0)
    fractions = np.array([float(b.labels[:, 0].mean()) for b in stream if b.batch_size == 1024])
    sigma = np.sqrt(0.2 * 0.8 / 1024)
    assert np.all(np.abs(fractions - 0.2) < 6 * sigma), (fractions.min(), fractions.max())
