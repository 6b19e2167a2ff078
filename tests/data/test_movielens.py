"""The MovieLens 100K converter on the real files (skipped where the licensed data is absent)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.config import PrepareConfig
from data.movielens import prepare_movielens100k


@pytest.fixture(scope="module")
def u1(tmp_path_factory, ml100k_dir):
    cfg = PrepareConfig(
        format="movielens100k", source=str(ml100k_dir), split="u1", num_shards=2, val_fraction=0.1
    )
    return prepare_movielens100k(cfg, str(tmp_path_factory.mktemp("ml") / "u1"))


def test_canonical_u1_split_and_labels(u1):
    assert u1.num_rows("train") + u1.num_rows("val") == 80_000 and u1.num_rows("test") == 20_000
    test = pq.read_table(u1.root / "test", columns=["rating", "click"]).to_pydict()
    assert np.array_equal(np.array(test["click"]), (np.array(test["rating"]) >= 4).astype(np.float32))
    assert u1.columns["genres"]["kind"] == "multi_hot" and u1.columns["user_id"]["num_embeddings"] == 944


def test_history_features_never_contain_the_row_itself(u1):
    train = pq.read_table(u1.root / "train").to_pydict()
    for level in range(1, 6):
        lists = train[f"user_items_r{level}"]
        rows = [i for i, r in enumerate(train["rating"]) if r == level][:2000]
        assert all(train["item_id"][i] not in lists[i] for i in rows), level


def test_unseen_test_items_map_to_the_oov_row(u1):
    train_items = set(pq.read_table(u1.root / "train", columns=["item_id"]).column(0).to_pylist())
    test_items = pq.read_table(u1.root / "test", columns=["item_id"]).column(0).to_numpy()
    assert 0 not in train_items
    assert (test_items == 0).any()  # u1.test has items that u1.base never rated
    assert set(test_items[test_items > 0]) <= train_items
