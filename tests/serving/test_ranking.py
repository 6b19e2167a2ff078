"""Ranking metrics against hand-computed cases, and the per-rank combination."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from towerrec.serving.ranking import combine, finalize, hit_matrix, ranking_sums, threshold_metrics


def _metrics(hits, num_relevant, items=None, num_candidates=10):
    hits = torch.tensor(hits, dtype=torch.bool)
    items = (
        torch.tensor(items)
        if items is not None
        else torch.arange(hits.numel()).reshape(hits.shape) % num_candidates
    )
    return finalize(ranking_sums(hits, torch.tensor(num_relevant), items, num_candidates))


def test_one_user_by_hand():
    # relevant at ranks 1 and 3 of 3, two relevant items in all
    m = _metrics([[1, 0, 1]], [2])
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)
    ideal = 1 + 1 / math.log2(3)
    assert m["ndcg"] == pytest.approx((1 + 1 / math.log2(4)) / ideal)  # = 0.919721...
    assert m["ndcg"] == pytest.approx(0.9197207891481876)
    assert m["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m["hit_rate"] == 1.0


def test_more_relevant_than_k_and_misses():
    # user 0: 5 relevant, K = 2, hit at rank 2 only; user 1: no hit; user 2: no relevant item (ignored)
    m = _metrics([[0, 1], [0, 0], [1, 1]], [5, 1, 0])
    assert m["num_users"] == 2
    assert m["precision"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall"] == pytest.approx((1 / 5 + 0) / 2)
    assert m["ndcg"] == pytest.approx(((1 / math.log2(3)) / (1 + 1 / math.log2(3)) + 0) / 2)
    assert m["map"] == pytest.approx(((1 / 2) / 2 + 0) / 2)  # AP@K divides by min(R, K) = 2
    assert m["hit_rate"] == pytest.approx(0.5)


def test_perfect_list_has_ndcg_and_map_one():
    m = _metrics([[1, 1, 1, 0]], [3])
    assert m["ndcg"] == pytest.approx(1.0) and m["map"] == pytest.approx(1.0) and m["recall"] == 1.0


def test_coverage_counts_distinct_recommended_candidates():
    m = _metrics([[0, 0], [0, 0]], [1, 1], items=[[0, 1], [1, -1]], num_candidates=4)
    assert m["coverage"] == pytest.approx(2 / 4)


def test_hit_matrix_matches_codes():
    items = torch.tensor([[2, 0, -1], [1, 2, 3]])
    relevant = np.array([0 * 4 + 0, 1 * 4 + 3, 1 * 4 + 0])  # user 0: item 0; user 1: items 3, 0
    assert hit_matrix(items, np.sort(relevant), 4).tolist() == [[False, True, False], [False, False, True]]


def test_combining_two_halves_equals_the_whole():
    generator = torch.Generator().manual_seed(0)
    hits = torch.rand(50, 10, generator=generator) < 0.2
    num_relevant = torch.randint(0, 6, (50,), generator=generator) + hits.sum(1)
    items = torch.randint(-1, 40, (50, 10), generator=generator)
    whole = finalize(ranking_sums(hits, num_relevant, items, 40))
    halves = [ranking_sums(hits[s], num_relevant[s], items[s], 40) for s in (slice(0, 23), slice(23, 50))]
    combined = finalize(combine(halves))
    assert combined == pytest.approx(whole)
    assert combined["num_users"] == int((num_relevant > 0).sum())


def test_threshold_metrics_by_hand():
    probabilities = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.7])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    m = threshold_metrics(probabilities, labels)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["count"] == 5
