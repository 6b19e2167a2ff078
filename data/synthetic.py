"""Synthetic multi-task interaction data with planted structure, generated in bounded memory.

Users and items have hidden factor vectors; a user's affinity for an item is their dot product
plus biases plus a genre-preference term. The rating (1..5), the click (rating-like preference
plus position noise) and the conversion (only possible after a click) all depend on that affinity,
so a multi-task model has real, shared signal to learn. User and item ids are drawn with Zipf
popularity. Rows are produced chunk by chunk: memory is O(num_users + num_items + chunk_rows).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from towerrec.data.config import PrepareConfig
from towerrec.data.dataset import DatasetMeta, DatasetWriter

NUM_GENRES = 18
NUM_CATEGORIES = 20
NUM_REGIONS = 50
NUM_AGE_BUCKETS = 7
FACTOR_DIM = 8
CHUNK_ROWS = 262_144


def _zipf_sampler(num: int, exponent: float, rng: np.random.Generator):
    weights = 1.0 / np.arange(1, num + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    order = rng.permutation(num)  # popular ids are spread over the id range

    def sample(size: int, rng: np.random.Generator) -> np.ndarray:
        return order[np.searchsorted(cdf, rng.random(size), side="right").clip(max=num - 1)]

    return sample


def generate_chunks(cfg: PrepareConfig) -> Iterator[pa.Table]:
    """Yields tables of at most ``CHUNK_ROWS`` rows, deterministic for ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    user_factors = rng.normal(0, 1 / np.sqrt(FACTOR_DIM), (cfg.num_users, FACTOR_DIM))
    item_factors = rng.normal(0, 1 / np.sqrt(FACTOR_DIM), (cfg.num_items, FACTOR_DIM))
    user_bias = rng.normal(0, 0.3, cfg.num_users)
    item_bias = rng.normal(0, 0.3, cfg.num_items)
    user_gender = rng.integers(0, 2, cfg.num_users)
    user_age = rng.integers(0, NUM_AGE_BUCKETS, cfg.num_users)
    user_region = rng.integers(0, NUM_REGIONS, cfg.num_users)
    user_activity = rng.lognormal(0, 0.5, cfg.num_users).astype(np.float32)
    genre_pref = rng.normal(0, 0.5, (NUM_AGE_BUCKETS * 2, NUM_GENRES))  # by (age, gender)
    item_category = rng.integers(0, NUM_CATEGORIES, cfg.num_items)
    item_num_genres = rng.integers(1, 4, cfg.num_items)
    item_genres = [np.sort(rng.choice(NUM_GENRES, k, replace=False)) for k in item_num_genres]
    item_genre_matrix = np.zeros((cfg.num_items, NUM_GENRES))
    for item, genres in enumerate(item_genres):
        item_genre_matrix[item, genres] = 1.0 / len(genres)
    genre_offsets = np.concatenate([[0], np.cumsum(item_num_genres)]).astype(np.int32)
    genre_values = np.concatenate(item_genres).astype(np.int64)
    item_price = rng.lognormal(2.0, 0.7, cfg.num_items).astype(np.float32)

    sample_user = _zipf_sampler(cfg.num_users, cfg.zipf_exponent, rng)
    sample_item = _zipf_sampler(cfg.num_items, cfg.zipf_exponent, rng)
    for start in range(0, cfg.num_rows, CHUNK_ROWS):
        size = min(CHUNK_ROWS, cfg.num_rows - start)
        users = sample_user(size, rng)
        items = sample_item(size, rng)
        pref_group = user_age[users] * 2 + user_gender[users]
        affinity = (
            np.einsum("ij,ij->i", user_factors[users], item_factors[items]) * 3.0
            + user_bias[users]
            + item_bias[items]
            + np.einsum("ij,ij->i", genre_pref[pref_group], item_genre_matrix[items])
        )
        rating = np.clip(np.rint(3.5 + 1.1 * affinity + rng.normal(0, 0.6, size)), 1, 5)
        click = (rng.random(size) < 1 / (1 + np.exp(-(1.6 * affinity - 0.4)))).astype(np.float32)
        conversion = click * (rng.random(size) < 1 / (1 + np.exp(-(2.0 * affinity - 1.5))))
        lengths = item_num_genres[items]
        row_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        starts = np.repeat(genre_offsets[items], lengths)
        within = np.arange(row_offsets[-1]) - np.repeat(row_offsets[:-1], lengths)
        genres = pa.ListArray.from_arrays(pa.array(row_offsets), pa.array(genre_values[starts + within]))
        yield pa.table(
            {
                "row_id": pa.array(np.arange(start, start + size, dtype=np.int64)),
                "user_id": pa.array(users.astype(np.int64) + 1),
                "item_id": pa.array(items.astype(np.int64) + 1),
                "gender": pa.array(user_gender[users].astype(np.int64) + 1),
                "age_bucket": pa.array(user_age[users].astype(np.int64) + 1),
                "region": pa.array(user_region[users].astype(np.int64) + 1),
                "category": pa.array(item_category[items].astype(np.int64) + 1),
                "genres": genres.cast(pa.list_(pa.int64())),
                "price": pa.array(np.log1p(item_price[items])),
                "user_activity": pa.array(user_activity[users]),
                "rating": pa.array(rating.astype(np.float32)),
                "click": pa.array(click),
                "conversion": pa.array(conversion.astype(np.float32)),
            }
        )


SYNTHETIC_COLUMN_SIZES = {
    "gender": 3,
    "age_bucket": NUM_AGE_BUCKETS + 1,
    "region": NUM_REGIONS + 1,
    "category": NUM_CATEGORIES + 1,
}


def split_of_rows(row_ids: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """0 = train, 1 = val, 2 = test: a seeded hash of the row id, stable under chunking."""
    mixed = (row_ids.astype(np.uint64) + np.uint64(cfg.seed) * np.uint64(0x9E3779B97F4A7C15)) * np.uint64(
        0xBF58476D1CE4E5B9
    )
    unit = ((mixed >> np.uint64(11)) & np.uint64((1 << 53) - 1)).astype(np.float64) / float(1 << 53)
    split = np.zeros(len(row_ids), dtype=np.int8)
    split[unit < cfg.test_fraction + cfg.val_fraction] = 1
    split[unit < cfg.test_fraction] = 2
    return split


def prepare_synthetic(cfg: PrepareConfig, out: str) -> DatasetMeta:
    """Generates ``cfg.num_rows`` rows and writes train/val/test shards plus metadata."""
    writer = DatasetWriter(out, cfg.num_shards, cfg.row_group_size, shuffle_splits=("train",), seed=cfg.seed)
    counts = {"train": 0, "val": 0, "test": 0}
    try:
        for table in generate_chunks(cfg):
            codes = split_of_rows(table.column("row_id").to_numpy(), cfg)
            for name, rows in writer.write_splits(table, codes, ("train", "val", "test")).items():
                counts[name] += rows
    except BaseException:
        writer.abort()
        raise
    columns = {
        "row_id": {"kind": "other"},
        "user_id": {"kind": "sparse", "num_embeddings": cfg.num_users + 1},
        "item_id": {"kind": "sparse", "num_embeddings": cfg.num_items + 1},
        **{name: {"kind": "sparse", "num_embeddings": size} for name, size in SYNTHETIC_COLUMN_SIZES.items()},
        "genres": {"kind": "multi_hot", "num_embeddings": NUM_GENRES + 1},
        "price": {"kind": "dense"},
        "user_activity": {"kind": "dense"},
        "rating": {"kind": "label", "min": 1.0, "max": 5.0},
        "click": {"kind": "label", "min": 0.0, "max": 1.0},
        "conversion": {"kind": "label", "min": 0.0, "max": 1.0},
    }
    report = {"generator": "synthetic", "seed": cfg.seed, "rows_per_split": counts}
    return writer.commit(columns=columns, report=report)
