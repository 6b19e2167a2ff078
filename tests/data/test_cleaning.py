"""Cleaning rules: counts per rule, exact de-duplication across chunks, dense transforms."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from towerrec.data.cleaning import (
    BottomKSample,
    BucketSpec,
    Cleaner,
    DenseSpec,
    DenseTransforms,
    SeenHashes,
    TableSchema,
    row_hashes,
    string_hashes,
)
from towerrec.data.dataset import DataError

SCHEMA = TableSchema(
    {"user": "sparse", "tags": "multi_hot", "price": "dense", "rating": "label", "click": "label"},
    label_ranges={"rating": (1.0, 5.0), "click": (0.0, 1.0)},
    binary_labels=("click",),
)


def table(**overrides):
    columns = {
        "user": pa.array([1, 2, None, 1, 3, 1], pa.int64()),
        "tags": pa.array([[1], [2, 3], [], [1], None, [1]], pa.list_(pa.int64())),
        "price": pa.array([1.0, None, 3.0, 1.0, float("nan"), 1.0]),
        "rating": pa.array([5.0, 4.0, None, 5.0, 1.0, 5.0]),
        "click": pa.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0]),
    }
    columns.update(overrides)
    return pa.table(columns)


def test_report_counts_fill():
    cleaner = Cleaner(SCHEMA, dedup=True, dense_fill=-1.0)
    out, rows = cleaner.clean(table(), np.arange(6), "x.csv")
    report = cleaner.report
    assert report["rows_in"] == 6 and report["rows_out"] == 3
    assert report["label_missing_dropped"] == {"rating": 1, "click": 0}
    assert report["duplicates_dropped"] == 2  # rows 3 and 5 repeat row 0
    assert report["sparse_missing_filled"] == {"user": 0}  # row 2 (null user) was dropped for its label
    assert report["multi_hot_missing_empty"] == {"tags": 1}  # a null list reads as an empty bag
    assert report["dense_missing_filled"] == {"price": 2}
    assert rows.tolist() == [0, 1, 4]
    assert out.column("price").to_pylist() == [1.0, -1.0, -1.0]


def test_report_counts_drop():
    cleaner = Cleaner(SCHEMA, dedup=False, missing_sparse="drop", missing_dense="drop")
    _, rows = cleaner.clean(table(), np.arange(6), "x.csv")
    assert cleaner.report["sparse_missing_dropped"] == {"user": 0, "tags": 1}
    assert cleaner.report["dense_missing_dropped"] == {"price": 1}
    assert cleaner.report["duplicates_dropped"] == 0
    assert rows.tolist() == [0, 3, 5]


def test_label_out_of_range_names_file_column_row():
    cleaner = Cleaner(SCHEMA)
    with pytest.raises(DataError, match=r"x\.csv: row 13, column 'click': label value 2\.0 outside \{0, 1\}"):
        cleaner.clean(table(click=pa.array([1.0, 1.0, 0.0, 2.0, 0.0, 1.0])), np.arange(10, 16), "x.csv")
    with pytest.raises(DataError, match=r"row 1, column 'rating'.*outside \[1\.0, 5\.0\]"):
        cleaner.clean(table(rating=pa.array([5.0, 9.0, None, 5.0, 1.0, 5.0])), np.arange(6), "x.csv")


def test_dedup_across_chunks_matches_whole():
    rng = np.random.default_rng(0)
    full = pa.table({"a": rng.integers(0, 5, 2000), "b": pa.array(rng.choice(["x", "yy", "", "zzz"], 2000))})
    whole = SeenHashes().first_occurrences(row_hashes(full))
    seen = SeenHashes()
    parts = [seen.first_occurrences(row_hashes(full.slice(s, 137))) for s in range(0, 2000, 137)]
    assert np.array_equal(np.concatenate(parts), whole)
    assert whole.sum() == len({tuple(r.values()) for r in full.to_pylist()}) == len(seen)


def test_string_hashes_distinguish_and_agree():
    values = pa.array(["", "a", "b", "ab", "ba", None, "a", "aa", "é"])
    hashes = string_hashes(values)
    assert hashes[1] == hashes[6]
    assert len(set(hashes.tolist())) == 8
    assert np.array_equal(string_hashes(values.slice(3, 3)), hashes[3:6])


def test_dense_transforms_log_clip_standardize_and_buckets():
    specs = {"x": DenseSpec(log1p=True, clip_quantile=0.9, standardize=True)}
    transforms = DenseTransforms(specs, {"x_bucket": BucketSpec("x", num_buckets=4)})
    values = np.arange(-5, 95, dtype=np.float64)
    transforms.observe("x", values, np.arange(100))
    transforms.finish_fit()
    out = transforms.apply("x", values)
    logged = np.log1p(np.maximum(values, 0))
    low, high = np.quantile(logged, [0.1, 0.9])
    assert transforms.bounds["x"] == pytest.approx((low, high))
    clipped = np.clip(logged, low, high)
    assert out == pytest.approx((clipped - clipped.mean()) / clipped.std())  # training mean and std
    assert transforms.report["clipped"]["x"] == int(((logged < low) | (logged > high)).sum()) == 20
    assert [s["op"] for s in transforms.steps("x")] == ["log1p", "clip", "standardize"]
    ids = transforms.bucketize("x_bucket", np.array([-100.0, 20.0, 60.0, 1000.0, np.nan]))
    assert transforms.edges["x_bucket"] == pytest.approx(list(np.quantile(values, [0.25, 0.5, 0.75])))
    assert ids.tolist() == [1, 2, 3, 4, 0] and transforms.num_buckets("x_bucket") == 5


def test_bottom_k_sample_is_exact_below_capacity_and_bounded_above():
    sample = BottomKSample(capacity=1000, seed=1)
    for start in range(0, 10_000, 500):
        sample.add(np.arange(start, start + 500, dtype=np.float64), np.arange(start, start + 500))
    assert len(sample.values) <= 2000
    assert sample.quantile(0.5) == pytest.approx(5000, rel=0.1)
    small = BottomKSample(capacity=1000)
    small.add(np.arange(11, dtype=np.float64), np.arange(11))
    assert small.quantile(0.5) == 5.0


def test_quantile_buckets_of_a_mostly_zero_column_still_split_its_non_zero_values():
    from towerrec.data.cleaning import quantile_edges

    values = np.r_[np.zeros(950), np.random.default_rng(0).lognormal(8, 1, 50)]
    plain = sorted(set(np.quantile(values, np.linspace(0, 1, 9)[1:-1]).tolist()))
    assert len(plain) <= 2  # the zeros swallow the quantiles
    edges = quantile_edges(values, 8)
    assert edges[0] == 0.0 and edges == sorted(edges)
    ids = np.searchsorted(edges, values, side="right")
    assert set(ids[:950]) == {1}  # zero: a bucket of its own
    assert 1 not in ids[950:] and len(np.unique(ids[950:])) >= 6  # the rest spread over the spare buckets
    assert quantile_edges(np.arange(100.0), 4) == pytest.approx([24.75, 49.5, 74.25])
