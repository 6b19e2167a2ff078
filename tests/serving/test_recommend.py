"""Recommendation lists: exact agreement with row-by-row scoring, ordering, exclusion of seen
items, unknown ids, short catalogues, block streaming and a 200k-item catalogue."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from towerrec.data.jagged import Jagged
from towerrec.data.prepare import prepare
from towerrec.data.rows import DecodedRows
from towerrec.serving.catalogue import Entities, Rows, load_catalogue
from towerrec.serving.export import build_unsharded_model
from towerrec.serving.ranking import evaluate_ranking, predict_rows
from towerrec.serving.recommend import dataset_ids, read_ids, to_table, write_table
from towerrec.serving.scoring import ModelScorer, recommend, top_k
from towerrec.trainer.config import load_config
from towerrec.trainer.errors import RecommendError

SMALL = [
    "data.prepare.num_rows=4000",
    "data.prepare.num_users=150",
    "data.prepare.num_items=90",
    "data.prepare.num_shards=2",
    "data.prepare.row_group_size=512",
    "recommend.k=5",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny synthetic data set, its catalogue and an (untrained, seeded) unsharded model."""
    tmp = tmp_path_factory.mktemp("rec")
    cfg = load_config("configs/default.yaml", [f"data.path={tmp / 'data'}", f"run_dir={tmp / 'run'}", *SMALL])
    meta = prepare(cfg.data.prepare, cfg.data.path)
    catalogue = load_catalogue(cfg, meta)
    torch.manual_seed(0)
    model = build_unsharded_model(cfg, catalogue.num_embeddings).eval()
    return cfg, meta, catalogue, model


def pair_rows(cfg, catalogue, user_rows: np.ndarray, item_rows: np.ndarray) -> Rows:
    """Explicit rows for every (user, item) pair: what a data set row of that pair would hold."""
    users = np.repeat(user_rows, len(item_rows))
    items = np.tile(item_rows, len(user_rows))
    sparse = {}
    for feature in cfg.data.sparse:
        if feature.side == "user":
            sparse[feature.name] = catalogue.users.sparse[feature.name].take(users)
        else:
            sparse[feature.name] = catalogue.items.sparse[feature.name].take(items)
    dense = np.zeros((len(users), len(cfg.data.dense)), dtype=np.float32)
    user_cols = [j for j, f in enumerate(cfg.data.dense) if f.side == "user"]
    item_cols = [j for j, f in enumerate(cfg.data.dense) if f.side == "item"]
    dense[:, user_cols] = catalogue.users.dense[users]
    dense[:, item_cols] = catalogue.items.dense[items]
    decoded = DecodedRows.from_columns(sparse, {f.name: f.multi_hot for f in cfg.data.sparse}, dense)
    return Rows(
        decoded, catalogue.users.ids[users], catalogue.items.ids[items], np.ones(len(users), dtype=bool)
    )


def test_entities_take_each_ids_last_row(setup):
    cfg, meta, catalogue, _ = setup
    rows = catalogue.splits[cfg.data.test_split]  # the last split read: its rows win
    last = {}
    for r, item in enumerate(rows.items):
        last[int(item)] = r
    item, r = next(iter(last.items()))
    position = catalogue.items.positions(np.array([item]))[0]
    genres = catalogue.items.sparse["genres"].take(np.array([position]))
    expected = rows.sparse("genres").take(np.array([r]))
    np.testing.assert_array_equal(genres.values, expected.values)
    price_column = [f.name for f in cfg.data.dense if f.side == "item"].index("price")
    assert (
        catalogue.items.dense[position, price_column]
        == rows.dense[r, [f.name for f in cfg.data.dense].index("price")]
    )


def test_scores_equal_row_by_row_model_and_are_ranked(setup):
    cfg, _, catalogue, model = setup
    cfg.recommend.exclude_seen = False
    try:
        user_ids, item_ids, result = recommend(cfg, model, catalogue, catalogue.users.ids[:7])
    finally:
        cfg.recommend.exclude_seen = True
    num_items = len(catalogue.items.ids)
    assert result.items.shape == (7, 5) and len(item_ids) == num_items
    brute = predict_rows(model, pair_rows(cfg, catalogue, np.arange(7), np.arange(num_items))).reshape(
        7, num_items, -1
    )
    expected_scores, expected_items = torch.topk(
        brute[:, :, 0], 5, dim=1
    )  # default score: first task (rating)
    torch.testing.assert_close(result.scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert (result.items == expected_items).float().mean() > 0.99  # only exact ties may swap
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()
    torch.testing.assert_close(
        result.predictions, brute.gather(1, result.items[:, :, None].expand(-1, -1, 2))
    )


def test_seen_items_are_excluded(setup):
    cfg, _, catalogue, model = setup
    users, items, result = recommend(cfg, model, catalogue)
    table = to_table(users, items, result, model.task_names)
    recommended = set(zip(table.column("user").to_pylist(), table.column("item").to_pylist()))
    seen = set(zip(catalogue.seen.users.tolist(), catalogue.seen.items.tolist()))
    assert recommended and not recommended & seen
    cfg.recommend.exclude_seen = False
    try:
        users, items, result = recommend(cfg, model, catalogue)
    finally:
        cfg.recommend.exclude_seen = True
    table = to_table(users, items, result, model.task_names)
    assert set(zip(table.column("user").to_pylist(), table.column("item").to_pylist())) & seen


def test_unknown_ids_and_k_larger_than_candidates(setup, tmp_path):
    cfg, meta, _, model = setup
    known_item = 1
    users_file = tmp_path / "users.csv"
    users_file.write_text("user_id\n1\n999999\n")
    candidates_file = tmp_path / "items.txt"
    candidates_file.write_text(f"{known_item}\n888888\n2\n")
    user_ids, _ = dataset_ids(read_ids(users_file, "user_id", "--users"), None, "--users")
    candidate_ids, _ = dataset_ids(read_ids(candidates_file, "item_id", "--candidates"), None, "--candidates")
    catalogue = load_catalogue(cfg, meta, extra_users=user_ids, extra_items=candidate_ids)
    assert not catalogue.users.known[catalogue.users.positions(np.array([999999]))[0]]
    users, items, result = recommend(cfg, model, catalogue, user_ids, candidate_ids, k=10)
    table = to_table(users, items, result, model.task_names)
    rows_of_new_user = [r for r, u in enumerate(table.column("user").to_pylist()) if u == 999999]
    assert len(rows_of_new_user) == 3  # no history: nothing excluded, every candidate ranked
    assert sorted(table.column("item").to_pylist()[r] for r in rows_of_new_user) == [1, 2, 888888]
    assert np.isfinite(table.column("score").to_numpy()).all()
    ranks = table.column("rank").to_pylist()
    assert ranks[rows_of_new_user[0] : rows_of_new_user[-1] + 1] == [1, 2, 3]
    path = write_table(table, tmp_path / "recs.parquet")
    assert pq.read_table(path).column_names == ["user", "rank", "item", "score", "rating", "ctr"]


def test_blocks_give_the_same_lists(setup):
    cfg, _, catalogue, model = setup
    _, _, whole = recommend(cfg, model, catalogue)
    cfg.recommend.item_block_size, cfg.recommend.max_pairs_per_step = 7, 50
    try:
        _, _, blocked = recommend(cfg, model, catalogue)
    finally:
        cfg.recommend.item_block_size, cfg.recommend.max_pairs_per_step = 65536, 262144
    torch.testing.assert_close(blocked.scores, whole.scores)
    assert torch.equal(blocked.items, whole.items)


class TiedScorer:
    """Scores where many candidates tie: prediction = (candidate position // 3) % 4."""

    task_names = ["score"]

    def item_block(self, start: int, end: int) -> dict:
        return {"positions": torch.arange(start, end)}

    def __call__(self, user_start: int, user_end: int, block: dict) -> torch.Tensor:
        values = ((block["positions"] // 3) % 4).float()
        return values.expand(user_end - user_start, -1)[:, :, None]


@pytest.mark.parametrize("block_size", [1, 5, 7, 64, 1000])
def test_ties_are_broken_by_candidate_position_whatever_the_blocks(block_size):
    result = top_k(TiedScorer(), lambda p: p[..., 0], 3, 50, 10, item_block_size=block_size, max_pairs=40)
    # score 3 for positions 9-11, 21-23, 33-35, 45-47; then score 2 for 6-8, 18-20, ...
    expected = [9, 10, 11, 21, 22, 23, 33, 34, 35, 45]
    assert result.items.tolist() == [expected] * 3


def test_large_synthetic_catalogue_streams_in_blocks(setup):
    cfg, _, catalogue, model = setup
    num_items = 200_000
    rng = np.random.default_rng(0)
    items = {}
    for feature in cfg.data.sparse:
        if feature.side == "item":
            rows = catalogue.num_embeddings[feature.name]
            if feature.multi_hot:
                lengths = rng.integers(0, 4, num_items)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                items[feature.name] = Jagged(rng.integers(0, rows, offsets[-1]), offsets)
            else:
                items[feature.name] = Jagged.single(rng.integers(0, rows, num_items))
    num_item_dense = sum(f.side == "item" for f in cfg.data.dense)
    catalogue_items = Entities(
        np.arange(num_items),
        items,
        rng.random((num_items, num_item_dense), dtype=np.float32),
        np.ones(num_items, bool),
    )
    scorer = ModelScorer(model, cfg, catalogue.users, catalogue_items, np.arange(4), np.arange(num_items))
    result = top_k(scorer, lambda p: p[..., 1], 4, num_items, 10, item_block_size=32768, max_pairs=65536)
    assert result.items.shape == (4, 10) and (result.items >= 0).all()
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()
    # the best of the last block competes with the earlier ones: check against a full scan of a user
    full = torch.cat(
        [
            scorer(0, 1, scorer.item_block(s, min(s + 50000, num_items)))[0, :, 1]
            for s in range(0, num_items, 50000)
        ]
    )
    torch.testing.assert_close(result.scores[0], torch.topk(full, 10).values)


def test_evaluate_ranking_on_tiny_data(setup):
    cfg, meta, catalogue, model = setup
    result = evaluate_ranking(cfg, model, catalogue, meta, k=5)
    test = catalogue.splits["test"]
    positives = np.unique(test.users[test.labels[:, 1] == 1])
    assert result["model"]["num_users"] == result["popularity"]["num_users"] <= len(positives)
    for who in ("model", "popularity"):
        assert all(
            0 <= result[who][m] <= 1 for m in ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")
        )
    assert 0 <= result["classification"]["ctr"]["f1"] <= 1


def test_sampled_negatives_are_not_seen_and_not_popularity(setup, tmp_path):
    """With ``recommend.interaction_column`` rows marked 0 (sampled negatives) are neither excluded
    as seen nor counted by the popularity baseline."""
    import shutil

    from towerrec.data.dataset import DatasetMeta
    from towerrec.serving.catalogue import item_counts

    cfg, meta, catalogue, model = setup
    copy = tmp_path / "data"
    shutil.copytree(meta.root, copy)
    for file in sorted(copy.glob("*/*.parquet")):
        table = pq.read_table(file)
        rated = np.ones(table.num_rows, dtype=np.float32)
        if file.parent.name == "train":
            rated = (np.arange(table.num_rows) % 2).astype(np.float32)  # every other row "sampled"
        pq.write_table(table.append_column("rated", pa.array(rated)), file, row_group_size=512)
    copy_meta = DatasetMeta.load(copy)
    cfg.recommend.interaction_column = "rated"
    try:
        marked = load_catalogue(cfg, copy_meta)
        train = marked.splits["train"]
        assert 0 < train.interaction.sum() < train.num_rows
        real = set(zip(train.users[train.interaction].tolist(), train.items[train.interaction].tolist()))
        val = catalogue.splits["val"]
        expected_seen = real | set(zip(val.users.tolist(), val.items.tolist()))
        assert set(zip(marked.seen.users.tolist(), marked.seen.items.tolist())) == expected_seen
        positions = marked.items.positions(train.items[train.interaction])
        assert np.array_equal(
            item_counts(cfg, marked), np.bincount(positions, minlength=len(marked.items.ids))
        )
        assert item_counts(cfg, marked).sum() < item_counts(cfg, catalogue).sum()
        cfg.recommend.interaction_column = "no_such_column"
        with pytest.raises(
            RecommendError, match="recommend.interaction_column: .* has no column 'no_such_column'"
        ):
            load_catalogue(cfg, copy_meta)
    finally:
        cfg.recommend.interaction_column = None


def test_original_ids_come_from_the_saved_vocabulary():
    from towerrec.data.vocab import original_ids

    vocabulary = np.array([10, 20, 35])  # rows 1, 2, 3
    assert original_ids(np.array([2, 0, 3, 7, 1]), vocabulary).to_pylist() == [20, None, 35, None, 10]
