"""MovieLens 100K (``u.data``, ``u.user``, ``u.item``) → the project's Parquet data set.

Columns written: ``user_id``, ``item_id``, ``gender``, ``age_bucket``, ``occupation``,
``zip_prefix``, ``release_decade`` (sparse, vocabularies fitted on the training split, row 0 =
unseen), ``genres`` (multi-hot), ``timestamp`` (int64), dense history features
(``user_mean_rating``, ``item_mean_rating``, ``user_log_count``, ``item_log_count``), time
features (``user_log_days``: log(1 + days since the user's first training rating, 0 before it);
``item_age_decades``: (rating year - release year) / 10, clipped to [0, 8], 0 when the release
year is unknown), rating-level neighbourhoods (multi-hot): ``user_items_r1`` .. ``user_items_r5``
(items the user rated 1..5, item-id vocabulary) and ``item_users_r1`` .. ``item_users_r5`` (users
who rated the item 1..5, user-id vocabulary), each the ``neighbourhood_max_ids`` most recent, and
the labels ``rating`` (1..5) and ``click`` (= rating >= 4). Behaviour sequences (ordered lists,
oldest first, the ``history_max_length`` most recent training ratings strictly before the row):
``hist_items`` (item-id vocabulary: share the ``item_id`` table), ``hist_ratings`` (their rating
levels 1..5) and ``hist_age`` (time from each to the row, ``data.history.age_buckets`` of seconds).

History features are strictly earlier, for every row of every split alike: a row's means, counts
and neighbourhood bags come from the training ratings whose timestamp is before the row's own
(its sampled negatives carry its timestamp, so they see the same history). A row never sees its
own rating, and training and evaluation rows are built by one rule, so their features share one
distribution, also within a user. (Leave-one-out statistics do not: a leave-one-out count is one
lower on each rated training row than on its sampled negatives, and a leave-one-out mean varies
across a user's training rows exactly against their own ratings: within a user both separate the
labels perfectly on training rows and not at all on evaluation rows. Out-of-fold statistics
leave the same effect at the scale of a fold.)

With ``negatives_per_positive`` = k > 0 every split also gets k sampled unrated items per rated row
(see ``with_negatives``) and a ``rated`` label: 1 for the rated rows, 0 for the sampled ones, whose
``rating`` and ``click`` are null. That is the data for a model of which items a user rates at all,
P(rated), beside how they rate them: what a top-K list needs (``configs/movielens100k_topk.yaml``).

The neighbourhood bags are the inputs of a graph-convolution encoder in the style of GC-MC (van
den Berg et al., 2017): with one embedding table per rating level and mean pooling, a user is
represented by the items they rated r for each r (and an item by its raters), so the model sees
the rating structure around a pair without the pair's own label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from towerrec.data.config import PrepareConfig
from towerrec.data.dataset import DataError, DatasetMeta, DatasetWriter
from towerrec.data.history import MAX_AGE_BUCKET, EventLog, earlier_events
from towerrec.data.jagged import Jagged
from towerrec.data.negatives import ExcludedItems, NothingToSample
from towerrec.data.vocab import Vocabulary

CANONICAL_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
NUM_GENRES = 19
RATING_LEVELS = (1, 2, 3, 4, 5)
SECONDS_PER_DAY = 86_400.0
SPARSE_COLUMNS = ("user_id", "item_id", "gender", "age_bucket", "occupation", "zip_prefix", "release_decade")


def _read_delimited(path: Path, delimiter: str, names: list[str], types: dict) -> pa.Table:
    if not path.exists():
        raise DataError(f"{path}: file not found (expected the MovieLens 100K folder layout)")
    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, encoding="latin-1"),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types),
        )
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: cannot parse as MovieLens 100K ({err})") from err


def read_ratings(path: Path) -> dict[str, np.ndarray]:
    table = _read_delimited(
        path,
        "\t",
        ["user", "item", "rating", "timestamp"],
        {"user": pa.int64(), "item": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()},
    )
    ratings = {name: table.column(name).to_numpy() for name in table.column_names}
    bad = np.flatnonzero((ratings["rating"] < 1) | (ratings["rating"] > 5))
    if len(bad):
        raise DataError(
            f"{path}: column rating, row {bad[0]}: value {ratings['rating'][bad[0]]} outside [1, 5]"
        )
    bad = np.flatnonzero((ratings["user"] < 0) | (ratings["item"] < 0))
    if len(bad):
        raise DataError(f"{path}: row {bad[0]}: negative user or item id")
    return ratings


def _user_table(root: Path) -> dict[str, np.ndarray]:
    names = ["user", "age", "gender", "occupation", "zip"]
    table = _read_delimited(
        root / "u.user", "|", names, {"user": pa.int64(), "age": pa.int64(), "zip": pa.string()}
    )
    users = table.column("user").to_numpy()
    size = users.max() + 1
    out = {}
    for name in ("age", "gender", "occupation", "zip"):
        values = table.column(name).to_numpy(zero_copy_only=False)
        if name == "zip":
            values = np.array([z[:1] if z[:1].isdigit() else "X" for z in values])
        full = np.empty(size, dtype=values.dtype)
        full[users] = values
        out[name] = full
    return out


def _item_table(root: Path) -> dict[str, np.ndarray]:
    names = ["item", "title", "release", "video", "url"] + [f"g{i}" for i in range(NUM_GENRES)]
    table = _read_delimited(root / "u.item", "|", names, {"item": pa.int64(), "release": pa.string()})
    items = table.column("item").to_numpy()
    size = items.max() + 1
    genre_matrix = np.zeros((size, NUM_GENRES), dtype=bool)
    for i in range(NUM_GENRES):
        genre_matrix[items, i] = table.column(f"g{i}").to_numpy() == 1
    release = table.column("release").to_numpy(zero_copy_only=False)
    years = np.array([int(r[-4:]) if r and r[-4:].isdigit() else 0 for r in release])
    decade = np.zeros(size, dtype=np.int64)
    decade[items] = np.where(years > 0, years // 10, 0)
    year = np.zeros(size, dtype=np.int64)
    year[items] = years
    return {"genres": genre_matrix, "decade": decade, "year": year}


def _history_features(rows: dict[str, np.ndarray], train: dict[str, np.ndarray], global_mean: float):
    """Mean rating (smoothed towards ``global_mean``) and log count of each row's user and item
    over the training ratings strictly before the row's timestamp."""
    out = {}
    for prefix, key in (("user", "user"), ("item", "item")):
        order, first, end = earlier_events(rows[key], rows["timestamp"], train[key], train["timestamp"])
        cumulative = np.concatenate([[0.0], np.cumsum(train["rating"][order].astype(np.float64))])
        counts = (end - first).astype(np.float64)
        sums = cumulative[end] - cumulative[first]
        prior = 5.0
        out[f"{prefix}_mean_rating"] = ((sums + prior * global_mean) / (counts + prior)).astype(np.float32)
        out[f"{prefix}_log_count"] = np.log1p(counts).astype(np.float32)
    return out


def _time_features(
    rows: dict[str, np.ndarray], train: dict[str, np.ndarray], release_year: np.ndarray
) -> dict:
    """``user_log_days`` and ``item_age_decades`` of each row (first ratings from the training split)."""
    size = max(rows["user"].max(initial=0), train["user"].max()) + 1
    first = np.full(size, np.iinfo(np.int64).max)
    np.minimum.at(first, train["user"], train["timestamp"])
    first_of_row = first[rows["user"]]
    days = np.where(
        first_of_row == np.iinfo(np.int64).max, 0.0, (rows["timestamp"] - first_of_row) / SECONDS_PER_DAY
    )
    rating_year = rows["timestamp"].astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    released = release_year[rows["item"]]
    age = np.where(released > 0, np.clip((rating_year - released) / 10.0, 0.0, 8.0), 0.0)
    return {
        "user_log_days": np.log1p(np.maximum(days, 0.0)).astype(np.float32),
        "item_age_decades": age.astype(np.float32),
    }


def _neighbourhoods(
    rows: dict[str, np.ndarray], train: dict[str, np.ndarray], key: str, other: str, max_ids: int
) -> dict[int, Jagged]:
    """Per rating level r: for each row, the ``other`` ids (raw) that the row's ``key`` rated r in
    the training split strictly before the row's timestamp, most recent first, at most
    ``max_ids``. Vectorized: one gather of every row's bag, no per-row Python."""
    out = {}
    for level in RATING_LEVELS:
        events = {name: values[train["rating"] == level] for name, values in train.items()}
        order, first, end = earlier_events(rows[key], rows["timestamp"], events[key], events["timestamp"])
        begin = np.maximum(first, end - max_ids)
        lengths = end - begin
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        newest_first = np.repeat(end, lengths) - 1 - within
        out[level] = Jagged(events[other][order][newest_first].astype(np.int64), offsets)
    return out


NEIGHBOURHOODS = (("user_items", "user", "item"), ("item_users", "item", "user"))


def with_negatives(
    rows: dict[str, np.ndarray],
    rated: list[dict[str, np.ndarray]],
    catalogue: np.ndarray,
    per_row: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``rows`` plus ``per_row`` sampled negatives per row and a ``rated`` column (1 / 0).

    A negative copies its rated row's user and timestamp and takes an item drawn uniformly from
    ``catalogue`` (sorted raw item ids) among those the user rated in none of ``rated`` (splits;
    ``towerrec.data.negatives.ExcludedItems``: exact, no redraws); its rating is NaN.
    """
    users = np.repeat(rows["user"], per_row)
    excluded = ExcludedItems(
        np.concatenate([split["user"] for split in rated]),
        np.concatenate([split["item"] for split in rated]),
        catalogue,
    )
    try:
        items = excluded.sample(users, rng)
    except NothingToSample:
        raise DataError(
            "data.prepare.negatives_per_positive: a user rated every item; nothing to sample"
        ) from None
    negatives = {
        "user": users,
        "item": items,
        "rating": np.full(len(users), np.nan, dtype=np.float32),
        "timestamp": np.repeat(rows["timestamp"], per_row),
    }
    out = {key: np.concatenate([rows[key], negatives[key]]) for key in negatives}
    out["rated"] = np.concatenate([np.ones(len(rows["user"])), np.zeros(len(users))]).astype(np.float32)
    return out


def prepare_movielens100k(cfg: PrepareConfig, out: str) -> DatasetMeta:
    """Converts the ml-100k folder ``cfg.source``; ``cfg.split`` is ``u1``..``u5``/``ua``/``ub``, ``random``
    or ``leave_last_out`` (each user's latest rating is test: the next-item setting)."""
    if not cfg.source:
        raise DataError("data.prepare.source: set it to the ml-100k folder (with u.data, u.user, u.item)")
    root = Path(cfg.source)
    if not root.is_dir():
        raise DataError(f"{root}: data.prepare.source is not a folder")
    if cfg.split in CANONICAL_SPLITS:
        split_dir = root / "splits" if (root / "splits").is_dir() else root
        base = read_ratings(split_dir / f"{cfg.split}.base")
        test = read_ratings(split_dir / f"{cfg.split}.test")
    elif cfg.split == "random":
        everything = read_ratings(root / "u.data")
        rng = np.random.default_rng(cfg.seed)
        is_test = rng.random(len(everything["user"])) < cfg.test_fraction
        base = {k: v[~is_test] for k, v in everything.items()}
        test = {k: v[is_test] for k, v in everything.items()}
    elif cfg.split == "leave_last_out":  # next-item: each user's latest rating (then latest row) is test
        everything = read_ratings(root / "u.data")
        order = np.lexsort((np.arange(len(everything["user"])), everything["timestamp"], everything["user"]))
        last = np.zeros(len(order), dtype=bool)
        last[order[np.r_[everything["user"][order][1:] != everything["user"][order][:-1], True]]] = True
        base = {k: v[~last] for k, v in everything.items()}
        test = {k: v[last] for k, v in everything.items()}
    else:
        raise DataError(
            f"data.prepare.split: {cfg.split!r} is not one of {CANONICAL_SPLITS + ('random', 'leave_last_out')}"
        )
    rng = np.random.default_rng(cfg.seed + 1)
    is_val = rng.random(len(base["user"])) < cfg.val_fraction
    splits = {
        "train": {k: v[~is_val] for k, v in base.items()},
        "val": {k: v[is_val] for k, v in base.items()},
        "test": test,
    }
    user_info = _user_table(root)
    item_info = _item_table(root)
    train = splits["train"]  # rated rows only: vocabularies and history features come from these
    if cfg.neighbourhood_max_ids < 1:
        raise DataError(f"data.prepare.neighbourhood_max_ids: must be >= 1, got {cfg.neighbourhood_max_ids}")
    if cfg.negatives_per_positive < 0:
        raise DataError(
            f"data.prepare.negatives_per_positive: must be >= 0, got {cfg.negatives_per_positive}"
        )
    if cfg.negatives_per_positive:
        catalogue = np.flatnonzero(item_info["genres"].any(1) | (item_info["year"] > 0))
        catalogue = np.union1d(catalogue, np.concatenate([rows["item"] for rows in splits.values()]))
        before_test = [splits["train"], splits["val"]]  # training/validation negatives avoid these
        negatives_rng = np.random.default_rng(cfg.seed + 2)
        splits = {
            name: with_negatives(
                rows,
                [*before_test, splits["test"]] if name == "test" else before_test,
                catalogue,
                cfg.negatives_per_positive,
                negatives_rng,
            )
            for name, rows in splits.items()
        }

    def raw_columns(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        users, items = rows["user"], rows["item"]
        return {
            "user_id": users,
            "item_id": items,
            "gender": (user_info["gender"][users] == "F").astype(np.int64),
            "age_bucket": np.searchsorted(AGE_EDGES, user_info["age"][users], side="right"),
            "occupation": user_info["occupation"][users],
            "zip_prefix": user_info["zip"][users],
            "release_decade": item_info["decade"][items],
        }

    train_raw = raw_columns(train)
    vocabs = {name: Vocabulary.fit(train_raw[name]) for name in SPARSE_COLUMNS}
    writer = DatasetWriter(out, cfg.num_shards, cfg.row_group_size, shuffle_splits=("train",), seed=cfg.seed)
    for name in ("user_id", "item_id"):
        writer.write_vocabulary(name, vocabs[name].keys)
    genre_values = np.arange(NUM_GENRES, dtype=np.int64) + 1  # row 0 stays unused (no genre)

    def history_log(events: dict[str, np.ndarray]) -> EventLog:
        return EventLog.build(
            events["user"],
            events["timestamp"],
            {
                "hist_items": vocabs["item_id"].lookup(events["item"]),
                "hist_ratings": events["rating"].astype(np.int64),
            },
        )

    logs = {name: history_log(train) for name in splits}
    if cfg.split == "leave_last_out":  # the test row's history holds the validation ratings too (the
        val = splits["val"]  # published next-item protocol: the test input is everything before it)
        rated_val = val.get("rated", np.ones(len(val["user"]))) == 1
        logs["test"] = history_log(
            {
                key: np.concatenate([train[key], val[key][rated_val]])
                for key in ("user", "timestamp", "item", "rating")
            }
        )
    for name, rows in splits.items():
        raw = raw_columns(rows)
        rated = rows.get("rated", np.ones(len(rows["user"]), dtype=np.float32)) == 1
        columns: dict[str, pa.Array] = {
            name_: pa.array(vocabs[name_].lookup(raw[name_])) for name_ in SPARSE_COLUMNS
        }
        genre_mask = item_info["genres"][rows["item"]]
        offsets = np.concatenate([[0], np.cumsum(genre_mask.sum(1))]).astype(np.int32)
        columns["genres"] = pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(np.tile(genre_values, len(genre_mask))[genre_mask.ravel()])
        )
        history = _history_features(rows, train, float(train["rating"].mean()))
        columns.update({key: pa.array(value) for key, value in history.items()})
        time_columns = _time_features(rows, train, item_info["year"])
        columns.update({key: pa.array(value) for key, value in time_columns.items()})
        for prefix, key, other in NEIGHBOURHOODS:
            vocab = vocabs[f"{other}_id"]
            for level, bag in _neighbourhoods(rows, train, key, other, cfg.neighbourhood_max_ids).items():
                columns[f"{prefix}_r{level}"] = Jagged(vocab.lookup(bag.values), bag.offsets).to_arrow(
                    pa.int64()
                )
        for key, jagged in (
            logs[name]
            .sequences(rows["user"], rows["timestamp"], cfg.history_max_length, age="hist_age")
            .items()
        ):
            columns[key] = jagged.to_arrow(pa.int64())
        columns["timestamp"] = pa.array(rows["timestamp"])
        columns["rating"] = pa.array(rows["rating"].astype(np.float32), mask=~rated)
        columns["click"] = pa.array((rows["rating"] >= 4).astype(np.float32), mask=~rated)
        if "rated" in rows:
            columns["rated"] = pa.array(rows["rated"])
        writer.write(name, pa.table(columns))
    meta_columns = {
        name: {"kind": "sparse", "num_embeddings": vocabs[name].num_embeddings} for name in SPARSE_COLUMNS
    }
    meta_columns["genres"] = {"kind": "multi_hot", "num_embeddings": NUM_GENRES + 1}
    for level in RATING_LEVELS:
        meta_columns[f"user_items_r{level}"] = {
            "kind": "multi_hot",
            "num_embeddings": vocabs["item_id"].num_embeddings,
        }
        meta_columns[f"item_users_r{level}"] = {
            "kind": "multi_hot",
            "num_embeddings": vocabs["user_id"].num_embeddings,
        }
    meta_columns["hist_items"] = {
        "kind": "multi_hot", "num_embeddings": vocabs["item_id"].num_embeddings, "history_of": "item_id",
    }  # fmt: skip
    meta_columns["hist_ratings"] = {"kind": "multi_hot", "num_embeddings": max(RATING_LEVELS) + 1}
    meta_columns["hist_age"] = {"kind": "multi_hot", "num_embeddings": MAX_AGE_BUCKET + 1}
    dense_columns = ("user_mean_rating", "item_mean_rating", "user_log_count", "item_log_count")
    for key in (*dense_columns, "user_log_days", "item_age_decades"):
        meta_columns[key] = {"kind": "dense"}
    meta_columns["timestamp"] = {"kind": "other"}
    meta_columns["rating"] = {"kind": "label", "min": 1.0, "max": 5.0}
    meta_columns["click"] = {"kind": "label", "min": 0.0, "max": 1.0}
    if cfg.negatives_per_positive:
        meta_columns["rated"] = {"kind": "label", "min": 0.0, "max": 1.0}
    report = {
        "converter": "movielens100k",
        "source": str(root),
        "split": cfg.split,
        "rows_per_split": {name: int(len(rows["user"])) for name, rows in splits.items()},
        "negatives_per_positive": cfg.negatives_per_positive,
        "neighbourhood_max_ids": cfg.neighbourhood_max_ids,
        "history": "strictly earlier training ratings"
        + (" and, for test rows, the validation ratings" if cfg.split == "leave_last_out" else ""),
        "train_rating_mean": float(train["rating"].mean()),
    }
    return writer.commit(columns=meta_columns, report=report)
