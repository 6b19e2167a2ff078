"""The streaming reader: exactly-once per epoch across ranks, determinism, exact resume, batch layout."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from towerrec.data.config import DenseFeature, PrepareConfig, SparseFeature
from towerrec.data.dataset import DataError, DatasetMeta, DatasetWriter
from towerrec.data.reader import BatchStream, LabelSpec, ReadSpec
from towerrec.data.synthetic import prepare_synthetic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> DatasetMeta:
    cfg = PrepareConfig(num_rows=20_000, num_users=300, num_items=200, row_group_size=1000, num_shards=3)
    return prepare_synthetic(cfg, str(tmp_path_factory.mktemp("reader") / "syn"))


def spec_for(meta: DatasetMeta, **kwargs) -> ReadSpec:
    return ReadSpec(
        sparse=(SparseFeature("user_id"), SparseFeature("genres", multi_hot=True)),
        dense=(DenseFeature("row_id"), DenseFeature("price")),
        labels=(LabelSpec("rating", min_value=1, max_value=5), LabelSpec("click", binary=True)),
        num_embeddings={"user_id": meta.vocab_size("user_id"), "genres": meta.vocab_size("genres")},
        **kwargs,
    )


def row_ids(batch) -> np.ndarray:
    keep = batch.weights.numpy() > 0
    return batch.dense[:, 0].numpy()[keep].astype(np.int64)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_exactly_once_per_epoch_across_ranks(dataset, world_size):
    spec = spec_for(dataset)
    expected = np.sort(pq.read_table(dataset.root / "train", columns=["row_id"]).column(0).to_numpy())
    for epoch in range(2):
        seen, batch_counts = [], []
        for rank in range(world_size):
            stream = BatchStream(
                dataset,
                "train",
                spec,
                batch_size=256,
                rank=rank,
                world_size=world_size,
                seed=3,
                window_rows=3000,
            )
            stream.epoch = epoch
            batches = list(stream)
            batch_counts.append(len(batches))
            assert len(batches) == len(stream)
            seen += [row_ids(b) for b in batches]
        assert len(set(batch_counts)) == 1, "every rank must yield the same number of batches"
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), expected)


def test_order_is_deterministic_by_seed_and_changes_per_epoch(dataset):
    spec = spec_for(dataset)

    def first_ids(seed, epoch):
        stream = BatchStream(dataset, "train", spec, batch_size=128, seed=seed)
        stream.epoch = epoch
        return row_ids(next(iter(stream)))

    np.testing.assert_array_equal(first_ids(1, 0), first_ids(1, 0))
    assert not np.array_equal(first_ids(1, 0), first_ids(1, 1))
    assert not np.array_equal(first_ids(1, 0), first_ids(2, 0))


@pytest.mark.parametrize("world_size,consumed", [(1, 0), (1, 37), (2, 20), (2, 31)])
def test_resume_continues_at_the_exact_sample(dataset, world_size, consumed):
    spec = spec_for(dataset)
    for rank in range(world_size):
        full = [
            row_ids(b)
            for b in BatchStream(dataset, "train", spec, 256, rank, world_size, seed=5, window_rows=2048)
        ]
        resumed = BatchStream(dataset, "train", spec, 256, rank, world_size, seed=5, window_rows=2048)
        resumed.load_state_dict(
            {"epoch": 0, "consumed": consumed, "world_size": world_size, "batch_size": 256, "seed": 5}
        )
        rest = [row_ids(b) for b in resumed]
        assert len(rest) == len(full) - consumed
        for a, b in zip(full[consumed:], rest):
            np.testing.assert_array_equal(a, b)


def epoch_rows(dataset, spec, layout, state=None, consumed=None):
    """Every rank's batches of one epoch under ``layout`` = (world_size, batch_size, window_rows),
    optionally resumed from ``state``; stops each rank after ``consumed`` batches when given.
    Returns (row ids per rank, state after the last batch, per-rank positions, lengths)."""
    world_size, batch_size, window_rows = layout
    rows, positions, lengths, states = [], [], [], []
    for rank in range(world_size):
        stream = BatchStream(
            dataset, "train", spec, batch_size, rank, world_size, seed=9, window_rows=window_rows
        )
        if state is not None:
            stream.load_state_dict(state)
        lengths.append(len(stream))
        mine, seen = [], []
        for batch in stream:
            assert batch.batch_size == stream.batch_rows(batch.position)
            stream.mark_consumed(batch.position)
            mine.append(row_ids(batch))
            seen.append(batch.position)
            if consumed is not None and len(seen) == consumed:
                break
        rows.append(np.concatenate(mine) if mine else np.zeros(0, np.int64))
        positions.append(seen)
        states.append(stream.state_dict())
    assert all(state == states[0] for state in states), "every rank must save the same reader state"
    assert len(set(lengths)) == 1 and len({len(p) for p in positions}) == 1
    return rows, states[0], positions, lengths[0]


@pytest.mark.parametrize(
    "first,second",
    [
        ((2, 256, 2048), (1, 256, 2048)),  # 2 -> 1 ranks
        ((1, 256, 2048), (2, 256, 2048)),  # 1 -> 2
        ((2, 256, 2048), (2, 128, 2048)),  # another batch size
        ((2, 256, 2048), (3, 300, 3000)),  # another world, batch and shuffle window
        ((2, 512, 2048), (1, 1024, 2048)),  # the same global batch: the step count of the straight run
    ],
)
def test_resume_on_another_layout_finishes_the_epoch_with_every_row_once(dataset, first, second):
    spec = spec_for(dataset)
    expected = np.sort(pq.read_table(dataset.root / "train", columns=["row_id"]).column(0).to_numpy())
    done, state, positions, _ = epoch_rows(dataset, spec, first, consumed=13)
    rest, after, rest_positions, length = epoch_rows(dataset, spec, second, state=state)
    seen = np.concatenate(done + rest)
    np.testing.assert_array_equal(np.sort(seen), expected)  # every row once: none lost, none twice
    assert rest_positions[0][0] == 13 and rest_positions[0][-1] == length - 1
    if first[0] * first[1] == second[0] * second[1]:  # same global batch
        _, _, straight, straight_length = epoch_rows(dataset, spec, first)
        assert length == straight_length
    # the next epoch is an ordinary one of the new layout
    nxt, _, next_positions, _ = epoch_rows(dataset, spec, second, state=after)
    np.testing.assert_array_equal(np.sort(np.concatenate(nxt)), expected)
    assert next_positions[0][0] == 0
    assert next_positions[0][-1] + 1 == math.ceil(math.ceil(len(expected) / second[0]) / second[1])


def test_resumes_across_layouts_chain(dataset):
    """2 ranks -> 1 -> 3 within one epoch, then the same layout again: still every row once."""
    spec = spec_for(dataset)
    expected = np.sort(pq.read_table(dataset.root / "train", columns=["row_id"]).column(0).to_numpy())
    a, state, _, _ = epoch_rows(dataset, spec, (2, 256, 2048), consumed=11)
    b, state, _, _ = epoch_rows(dataset, spec, (1, 384, 2048), state=state, consumed=9)
    c, state, _, _ = epoch_rows(dataset, spec, (3, 100, 1000), state=state, consumed=7)
    d, state, positions, length = epoch_rows(dataset, spec, (3, 100, 1000), state=state)
    np.testing.assert_array_equal(np.sort(np.concatenate(a + b + c + d)), expected)
    assert positions[0][0] == 11 + 9 + 7 and positions[0][-1] == length - 1 and state["epoch"] == 0


def test_a_resume_at_the_end_of_an_epoch_on_another_layout_starts_the_next_one(dataset):
    spec = spec_for(dataset)
    _, state, positions, length = epoch_rows(dataset, spec, (2, 256, 2048))
    assert positions[0][-1] == length - 1
    stream = BatchStream(dataset, "train", spec, 512, 0, 1, seed=9, window_rows=2048)
    stream.load_state_dict(state)
    first = next(iter(stream))
    assert stream.epoch == 1 and first.position == 0


def test_a_changed_data_set_is_not_resumed_silently(dataset):
    spec = spec_for(dataset)
    stream = BatchStream(dataset, "train", spec, 256, seed=9)
    state = {**stream.state_dict(), "num_rows": stream.num_rows + 1, "consumed": 3}
    with pytest.raises(DataError, match="the data set changed since the checkpoint"):
        stream.load_state_dict(state)


def test_decoding_in_the_callers_thread_gives_the_same_batches(dataset):
    spec = spec_for(dataset)
    streams = [
        BatchStream(dataset, "train", spec, 512, seed=4, window_rows=3000, background_decode=background)
        for background in (True, False)
    ]
    pairs = list(zip(*streams, strict=True))
    assert len(pairs) == len(streams[0]) > 5
    for threaded, inline in pairs:
        assert threaded.position == inline.position
        np.testing.assert_array_equal(row_ids(threaded), row_ids(inline))
        assert torch.equal(threaded.sparse.values(), inline.sparse.values())
        assert torch.equal(threaded.sparse.lengths(), inline.sparse.lengths())
        assert torch.equal(threaded.labels, inline.labels)


def _bag_pairs(batch, key: str) -> np.ndarray:
    """(row, id) of every id in ``key``'s bags, encoded as row * 2**32 + id."""
    bags = batch.sparse.to_dict()[key]
    rows = np.repeat(np.arange(batch.batch_size), bags.lengths().numpy())
    return rows * 2**32 + bags.values().numpy()


def test_train_drop_prob_thins_training_bags_reproducibly(dataset):
    genres = SparseFeature("genres", multi_hot=True, pooling="mean", train_drop_prob=0.3)
    spec = spec_for(dataset)
    dropping = ReadSpec(**{**spec.__dict__, "sparse": (SparseFeature("user_id"), genres)})

    def stream(read_spec, drop, **kwargs):
        return BatchStream(
            dataset, "train", read_spec, 256, seed=7, window_rows=2048, drop_bag_ids=drop, **kwargs
        )

    full, thinned = list(stream(spec, False)), list(stream(dropping, True))
    kept = total = 0
    for whole, thin in zip(full, thinned, strict=True):
        np.testing.assert_array_equal(row_ids(whole), row_ids(thin))  # same rows, same order
        assert torch.equal(whole.sparse["user_id"].values(), thin.sparse["user_id"].values())
        assert np.isin(_bag_pairs(thin, "genres"), _bag_pairs(whole, "genres")).all()
        kept, total = kept + len(thin.sparse["genres"].values()), total + len(whole.sparse["genres"].values())
    assert total > 10_000 and abs(kept / total - 0.7) < 0.02
    # the same bags again, and after a resume; evaluation-style streams (drop_bag_ids=False) read them whole
    again = list(stream(dropping, True))
    assert all(torch.equal(a.sparse.values(), b.sparse.values()) for a, b in zip(thinned, again))
    resumed = stream(dropping, True)
    resumed.load_state_dict({"epoch": 0, "consumed": 9, "world_size": 1, "batch_size": 256, "seed": 7})
    assert all(torch.equal(a.sparse.values(), b.sparse.values()) for a, b in zip(thinned[9:], resumed))
    whole_again = list(stream(dropping, False))
    assert all(torch.equal(a.sparse.values(), b.sparse.values()) for a, b in zip(full, whole_again))


def test_position_marks_and_epoch_rollover(dataset):
    stream = BatchStream(dataset, "train", spec_for(dataset), batch_size=4096, seed=0)
    batches = list(stream)
    stream.mark_consumed(batches[-1].position)
    assert stream.state_dict()["consumed"] == len(stream)
    next(iter(stream))
    assert stream.epoch == 1


def test_batch_layout_matches_the_source_rows(dataset):
    spec = spec_for(dataset)
    stream = BatchStream(dataset, "test", spec, batch_size=100, shuffle=False)
    batch = next(iter(stream))
    table = pq.read_table(dataset.root / "test").slice(0, 100)
    assert batch.sparse.keys() == ["user_id", "genres"]
    per_key = batch.sparse.to_dict()
    np.testing.assert_array_equal(per_key["user_id"].values().numpy(), table.column("user_id").to_numpy())
    genres = table.column("genres").combine_chunks()
    np.testing.assert_array_equal(per_key["genres"].lengths().numpy(), genres.value_lengths().to_numpy())
    np.testing.assert_array_equal(per_key["genres"].values().numpy(), genres.flatten().to_numpy())
    np.testing.assert_allclose(batch.labels[:, 0].numpy(), table.column("rating").to_numpy())
    assert (
        batch.dense.shape == (100, 2)
        and batch.labels.shape == (100, 2)
        and batch.label_mask.shape == (100, 2)
    )
    moved = batch.to(torch.device("cpu"))
    assert moved.position == batch.position == 0


def test_padding_rows_carry_no_weight(dataset):
    spec = spec_for(dataset)
    num_rows = dataset.num_rows("test")
    world_size = 7 if num_rows % 7 else 11
    padding = 0
    for rank in range(world_size):
        for batch in BatchStream(dataset, "test", spec, 512, rank, world_size, shuffle=False):
            pad = batch.row_id < 0
            padding += int(pad.sum())
            assert torch.all(batch.weights[pad] == 0) and torch.all(batch.label_mask[pad] == 0)
    assert padding == world_size * -(-num_rows // world_size) - num_rows


def test_unseen_and_out_of_range_ids_map_to_the_oov_row(tmp_path):
    writer = DatasetWriter(tmp_path / "d", num_shards=1, row_group_size=10)
    writer.write(
        "train",
        pa.table({"u": pa.array([1, 5, 999], pa.int64()), "y": pa.array([0.0, 1.0, 1.0], pa.float32())}),
    )
    meta = writer.commit({"u": {"kind": "sparse", "num_embeddings": 10}, "y": {"kind": "label"}})
    spec = ReadSpec(
        sparse=(SparseFeature("u"),),
        dense=(),
        labels=(LabelSpec("y", binary=True),),
        num_embeddings={"u": 10},
    )
    batch = next(iter(BatchStream(meta, "train", spec, 3, shuffle=False)))
    assert batch.sparse.values().tolist() == [1, 5, 0]
    hashed = ReadSpec(
        sparse=(SparseFeature("u", id_mapping="hash", num_embeddings=4),),
        dense=(),
        labels=(LabelSpec("y", binary=True),),
        num_embeddings={"u": 4},
    )
    values = next(iter(BatchStream(meta, "train", hashed, 3, shuffle=False))).sparse.values()
    assert values.min() >= 0 and values.max() < 4


def bad_dataset(tmp_path, columns: dict, kinds: dict) -> DatasetMeta:
    writer = DatasetWriter(tmp_path / "bad", num_shards=1, row_group_size=4)
    writer.write("train", pa.table(columns))
    return writer.commit(kinds)


def test_reader_errors_name_file_row_group_row_and_column(tmp_path):
    meta = bad_dataset(
        tmp_path,
        {"u": pa.array([1, 2, 3, 4, 5, 6], pa.int64()), "y": pa.array([0, 1, 0, 1, 2, 0], pa.float32())},
        {"u": {"kind": "sparse", "num_embeddings": 10}, "y": {"kind": "label"}},
    )
    spec = ReadSpec(
        sparse=(SparseFeature("u"),),
        dense=(),
        labels=(LabelSpec("y", binary=True),),
        num_embeddings={"u": 10},
    )
    with pytest.raises(
        DataError, match=r"part-00000\.parquet: row group 1, row 0: label column 'y' has value 2\.0"
    ):
        list(BatchStream(meta, "train", spec, 2, shuffle=False))
    skipping = ReadSpec(**{**spec.__dict__, "skip_bad_rows": True})
    stream = BatchStream(meta, "train", skipping, 2, shuffle=False)
    weights = torch.cat([b.weights for b in stream])
    assert stream.skipped_bad_rows == 1 and weights.tolist() == [1, 1, 1, 1, 0, 1]


def test_negative_ids_and_nan_dense_values_are_errors(tmp_path):
    meta = bad_dataset(
        tmp_path,
        {
            "u": pa.array([1, -2, 3], pa.int64()),
            "x": pa.array([0.5, 1.0, float("nan")], pa.float32()),
            "y": pa.array([0, 1, 0], pa.float32()),
        },
        {"u": {"kind": "sparse", "num_embeddings": 10}, "x": {"kind": "dense"}, "y": {"kind": "label"}},
    )
    labels = (LabelSpec("y", binary=True),)
    ids_only = ReadSpec(sparse=(SparseFeature("u"),), dense=(), labels=labels, num_embeddings={"u": 10})
    with pytest.raises(DataError, match=r"row 1: column 'u' has negative id -2"):
        list(BatchStream(meta, "train", ids_only, 3, shuffle=False))
    meta_ok_ids = bad_dataset(
        tmp_path / "b",
        {
            "u": pa.array([1, 2, 3], pa.int64()),
            "x": pa.array([0.5, 1.0, float("nan")], pa.float32()),
            "y": pa.array([0, 1, 0], pa.float32()),
        },
        {"u": {"kind": "sparse", "num_embeddings": 10}, "x": {"kind": "dense"}, "y": {"kind": "label"}},
    )
    with_dense = ReadSpec(
        sparse=(SparseFeature("u"),), dense=(DenseFeature("x"),), labels=labels, num_embeddings={"u": 10}
    )
    with pytest.raises(DataError, match=r"row 2: column 'x' has non-finite value nan"):
        list(BatchStream(meta_ok_ids, "train", with_dense, 3, shuffle=False))
    filled = ReadSpec(
        sparse=(SparseFeature("u"),),
        dense=(DenseFeature("x", fill_nan=-1.0),),
        labels=labels,
        num_embeddings={"u": 10},
    )
    batch = next(iter(BatchStream(meta_ok_ids, "train", filled, 3, shuffle=False)))
    assert batch.dense[:, 0].tolist() == [0.5, 1.0, -1.0]


def test_missing_and_truncated_files(tmp_path, dataset):
    with pytest.raises(DataError, match="does not exist"):
        DatasetMeta.load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="metadata.json: missing"):
        DatasetMeta.load(tmp_path / "half")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset.root, copy)
    victim = copy / "train" / "part-00001.parquet"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    meta = DatasetMeta.load(copy)
    with pytest.raises(DataError, match=r"part-00001\.parquet: not a readable Parquet file"):
        list(BatchStream(meta, "train", spec_for(meta), 4096, shuffle=False))


def test_more_ranks_than_rows_is_a_clear_error(tmp_path):
    meta = bad_dataset(
        tmp_path,
        {"u": pa.array([1, 2], pa.int64()), "y": pa.array([0, 1], pa.float32())},
        {"u": {"kind": "sparse", "num_embeddings": 10}, "y": {"kind": "label"}},
    )
    spec = ReadSpec(
        sparse=(SparseFeature("u"),),
        dense=(),
        labels=(LabelSpec("y", binary=True),),
        num_embeddings={"u": 10},
    )
    with pytest.raises(DataError, match="has 2 rows, fewer than the 3 ranks"):
        BatchStream(meta, "train", spec, 2, rank=0, world_size=3)
