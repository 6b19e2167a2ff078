"""The MovieLens 100K converter on the real files (skipped where the licensed data is absent)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from towerrec.data.config import PrepareConfig
from towerrec.data.dataset import DataError
from towerrec.data.movielens100k import prepare_movielens100k


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


def test_vocabularies_map_rows_back_to_movielens_ids(u1, ml100k_dir):
    users, items = u1.vocabulary("user_id"), u1.vocabulary("item_id")
    assert len(users) == u1.columns["user_id"]["num_embeddings"] - 1
    assert len(items) == u1.columns["item_id"]["num_embeddings"] - 1
    assert u1.vocabulary("gender") is None  # only the id columns are saved
    base = np.loadtxt(ml100k_dir / "splits" / "u1.base", dtype=np.int64)
    val = pq.read_table(u1.root / "val", columns=["user_id", "item_id", "timestamp"]).to_pydict()
    # every validation row, mapped back, is a row of u1.base (same user, item and time)
    codes = set(zip(base[:, 0].tolist(), base[:, 1].tolist(), base[:, 3].tolist()))
    user_rows, item_rows = np.array(val["user_id"]), np.array(val["item_id"])
    known = item_rows > 0  # items rated only in the validation slice are out of vocabulary (row 0)
    assert known.mean() > 0.95
    mapped = zip(
        users[user_rows[known] - 1].tolist(),
        items[item_rows[known] - 1].tolist(),
        np.array(val["timestamp"])[known].tolist(),
    )
    assert all(row in codes for row in mapped)


@pytest.fixture(scope="module")
def u1_negatives(tmp_path_factory, ml100k_dir):
    cfg = PrepareConfig(
        format="movielens100k",
        source=str(ml100k_dir),
        split="u1",
        num_shards=2,
        val_fraction=0.1,
        negatives_per_positive=2,
    )
    return prepare_movielens100k(cfg, str(tmp_path_factory.mktemp("ml") / "u1neg"))


def _raw_pairs(meta, split: str) -> tuple[np.ndarray, dict]:
    table = pq.read_table(meta.root / split).to_pydict()
    users = meta.vocabulary("user_id")[np.array(table["user_id"]) - 1]
    items = np.array(table["item_id"])
    raw_items = np.where(items > 0, meta.vocabulary("item_id")[np.maximum(items, 1) - 1], -1)
    return users * 10_000 + raw_items, table


def test_sampled_negatives_are_unrated_pairs_with_no_rating(u1, u1_negatives, ml100k_dir):
    for split in ("train", "val", "test"):
        assert u1_negatives.num_rows(split) == 3 * u1.num_rows(split)
    rated = {}
    for name in ("u1.base", "u1.test"):
        data = np.loadtxt(ml100k_dir / "splits" / name, dtype=np.int64)
        rated[name] = set((data[:, 0] * 10_000 + data[:, 1]).tolist())
    # training negatives avoid what the user rated before the test; test negatives anything rated
    for split, excluded in (("train", rated["u1.base"]), ("test", rated["u1.base"] | rated["u1.test"])):
        codes, table = _raw_pairs(u1_negatives, split)
        is_rated = np.array(table["rated"])
        sampled = is_rated == 0
        assert sampled.sum() == 2 * (is_rated == 1).sum()
        in_vocabulary = np.array(table["item_id"]) > 0
        assert in_vocabulary[sampled].mean() > 0.9
        assert not set(codes[sampled & in_vocabulary].tolist()) & excluded, split
        if split == "train":  # (a test negative may be a pair the training split never saw rated)
            assert set(codes[~sampled & in_vocabulary].tolist()) <= excluded
        assert all(
            table["rating"][i] is None and table["click"][i] is None for i in np.flatnonzero(sampled)[:500]
        )
        assert all(table["rating"][i] is not None for i in np.flatnonzero(~sampled)[:500])


def test_negative_rows_keep_the_users_features_and_take_the_items(u1_negatives):
    table = pq.read_table(u1_negatives.root / "train").to_pydict()
    rows = range(len(table["rated"]))
    user_columns = ("gender", "age_bucket", "occupation", "zip_prefix", "user_log_days")
    item_columns = ("release_decade", "genres")

    def values(i: int, columns) -> tuple:
        return tuple(str(table[c][i]) for c in columns)

    positives = [i for i in rows if table["rated"][i] == 1]
    negatives = [i for i in rows if table["rated"][i] == 0]
    by_user_time = {(table["user_id"][i], table["timestamp"][i]): values(i, user_columns) for i in positives}
    by_item = {table["item_id"][i]: values(i, item_columns) for i in positives}
    # user-side values are copied from the rated row of the same user at the same time
    assert all(
        by_user_time[(table["user_id"][i], table["timestamp"][i])] == values(i, user_columns)
        for i in negatives
    )
    # item-side values of a sampled row are the item's (as in that item's rated rows)
    known = [i for i in negatives if table["item_id"][i] in by_item]
    assert len(known) > 0.9 * len(negatives)
    assert all(by_item[table["item_id"][i]] == values(i, item_columns) for i in known)


def test_no_negatives_leaves_the_data_set_as_before(u1):
    assert "rated" not in u1.columns
    assert u1.report["negatives_per_positive"] == 0


def test_neighbourhood_cap_and_no_validation_slice(tmp_path, ml100k_dir, u1):
    cfg = PrepareConfig(
        format="movielens100k",
        source=str(ml100k_dir),
        split="u1",
        num_shards=1,
        val_fraction=0.0,  # refit on all of u1.base: the validation split is empty
        neighbourhood_max_ids=5,
    )
    meta = prepare_movielens100k(cfg, str(tmp_path / "u1cap"))
    assert meta.num_rows("train") == 80_000 and meta.num_rows("val") == 0
    assert meta.report["neighbourhood_max_ids"] == 5
    uncapped = prepare_movielens100k(
        PrepareConfig(
            format="movielens100k", source=str(ml100k_dir), split="u1", num_shards=1, val_fraction=0.0
        ),
        str(tmp_path / "u1full"),
    )  # the same folds: only the cap differs
    capped = pq.read_table(meta.root / "test", columns=["item_users_r4"]).column(0)
    default = pq.read_table(uncapped.root / "test", columns=["item_users_r4"]).column(0)
    capped_lengths = np.diff(capped.combine_chunks().offsets.to_numpy())
    default_lengths = np.diff(default.combine_chunks().offsets.to_numpy())
    assert capped_lengths.max() == 5 and default_lengths.max() == 24
    # the capped bag keeps the most recent raters: a prefix of the default bag
    first = int(np.flatnonzero(default_lengths == 24)[0])
    assert capped[first].as_py() == default[first].as_py()[:5]
    with pytest.raises(DataError, match=r"data\.prepare\.neighbourhood_max_ids: must be >= 1, got 0"):
        prepare_movielens100k(
            PrepareConfig(
                format="movielens100k", source=str(ml100k_dir), split="u1", neighbourhood_max_ids=0
            ),
            str(tmp_path / "bad"),
        )


def _auc_gap_allowed(train_labels: np.ndarray, val_labels: np.ndarray) -> float:
    """4 standard errors of the difference of two AUCs, bounding each AUC's variance by
    AUC(1 - AUC) / (size of its smaller class) <= 0.25 / that size (Hanley & McNeil's bound)."""

    def smaller(labels):
        return min(int(labels.sum()), int((1 - labels).sum()))

    return 4 * np.sqrt(0.25 / smaller(train_labels) + 0.25 / smaller(val_labels))


@pytest.fixture(scope="module")
def u1_topk(tmp_path_factory, ml100k_dir):
    cfg = PrepareConfig(format="movielens100k", source=str(ml100k_dir), split="u1", negatives_per_positive=4)
    return prepare_movielens100k(cfg, str(tmp_path_factory.mktemp("ml") / "topk"))


BAGS = [f"{side}_r{level}" for side in ("user_items", "item_users") for level in range(1, 6)]


def test_no_history_feature_separates_the_labels_better_on_training_rows(u1, u1_topk):
    """A probe on the features alone: each feature's AUC against a label must be the same on the
    training split as on the validation split (evaluation rows, same distribution) within noise. A
    leave-one-out count (one lower on rated training rows than on their sampled negatives) or mean
    (moving against the row's own rating) gives AUC ~1 on training rows and ~0.5 on evaluation rows."""
    from sklearn.metrics import roc_auc_score

    def probe(meta, label: str, features: dict) -> None:
        split_values = {}
        for split in ("train", "val"):
            table = pq.read_table(meta.root / split)
            labels = np.nan_to_num(table.column(label).to_numpy(zero_copy_only=False))
            split_values[split] = (labels, {name: fn(table) for name, fn in features.items()})
        allowed = _auc_gap_allowed(split_values["train"][0], split_values["val"][0])
        for name in features:
            aucs = [roc_auc_score(labels, values[name]) for labels, values in split_values.values()]
            assert abs(aucs[0] - aucs[1]) <= allowed, (
                f"{name} vs {label}: AUC train {aucs[0]:.3f}, val {aucs[1]:.3f}"
            )

    def column(name):
        return lambda table: table.column(name).to_numpy()

    def bag_size(names):
        return lambda table: sum(np.diff(table.column(n).combine_chunks().offsets.to_numpy()) for n in names)

    def within_user(name):  # the row's value minus its user's mean value in that split
        def deviation(table):
            users, values = table.column("user_id").to_numpy(), table.column(name).to_numpy()
            means = np.bincount(users, weights=values) / np.maximum(np.bincount(users), 1)
            return values - means[users]

        return deviation

    dense = ("user_mean_rating", "item_mean_rating", "user_log_count", "item_log_count")
    features = {name: column(name) for name in dense}
    features["user bags"] = bag_size(BAGS[:5])
    features["item bags"] = bag_size(BAGS[5:])
    probe(u1_topk, "rated", features)  # rated rows vs their sampled negatives
    with_deviation = {**features, **{f"{n} within user": within_user(n) for n in dense}}
    probe(u1, "click", with_deviation)  # like = rating >= 4 among rated rows
