"""Retrieval at serving time: the index against brute force, the sampled protocol's draws, users'
histories as of now, and a trained two-tower model end to end (lists, both protocols, JSON)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import IMPLICIT_CONFIG, run_cli, tiny_implicit_overrides
from towerrec.data.jagged import Jagged
from towerrec.serving.catalogue import seen_codes
from towerrec.serving.index import ItemIndex, faiss_available
from towerrec.serving.protocols import full_ranks, sampled_candidates, sampled_ranks
from towerrec.serving.retrieval import append_one


def brute_force(queries, items, k, excluded):
    scores = queries @ items.T
    for code in excluded:
        scores[code // items.shape[0], code % items.shape[0]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_exact_index_is_the_brute_force_top_k_without_excluded_items():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(1000, 8)).astype(np.float32)
    queries = rng.normal(size=(37, 8)).astype(np.float32)
    excluded = seen_codes(rng.integers(0, 37, 400), rng.integers(0, 1000, 400), 1000)
    index = ItemIndex(torch.from_numpy(items))
    index.settings.block_rows = 128  # several item blocks: the running top-K merges them
    result = index.search(torch.from_numpy(queries), 25, excluded)
    order, scores = brute_force(queries.astype(np.float64), items.astype(np.float64), 25, excluded)
    np.testing.assert_array_equal(result.items.numpy(), order)
    np.testing.assert_allclose(result.scores.numpy(), scores, rtol=1e-5)
    assert not np.isin(np.arange(37)[:, None] * 1000 + result.items.numpy(), excluded).any()


def test_a_list_longer_than_what_is_left_is_padded():
    index = ItemIndex(torch.eye(3))
    result = index.search(torch.ones(1, 3), 3, excluded=np.array([1]))
    assert result.items.tolist() == [[0, 2, -1]]


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_most_of_the_exact_lists_and_never_excluded_items(kind):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(50, 16))
    items = centres[rng.integers(0, 50, 20_000)] + 0.3 * rng.normal(size=(20_000, 16))
    items = torch.nn.functional.normalize(torch.from_numpy(items).float(), dim=1)
    queries = items[rng.integers(0, 20_000, 200)] + 0.05
    excluded = seen_codes(np.repeat(np.arange(200), 20), rng.integers(0, 20_000, 4000), 20_000)
    exact = ItemIndex(items).search(queries, 50, excluded).items.numpy()
    approximate = ItemIndex(items, kind).search(queries, 50, excluded).items.numpy()
    recall = np.mean([len(np.intersect1d(a, e)) / 50 for a, e in zip(approximate, exact)])
    assert recall > 0.9
    assert not np.isin(np.arange(200)[:, None] * 20_000 + approximate, excluded).any()


def test_sampled_items_are_distinct_never_interacted_and_seeded():
    rng = np.random.default_rng(2)
    num_users, num_items = 300, 150
    interacted = seen_codes(rng.integers(0, num_users, 20_000), rng.integers(0, num_items, 20_000), num_items)
    interacted = np.union1d(interacted, np.arange(60) + 7 * num_items)  # user 7 saw 60 items: 90 left
    drawn = sampled_candidates(interacted, num_users, num_items, 100, seed=5)
    assert np.array_equal(drawn, sampled_candidates(interacted, num_users, num_items, 100, seed=5))
    for user in range(num_users):
        row = drawn[user][drawn[user] >= 0]
        left = (
            num_items
            - np.isin(np.arange(num_items), interacted[interacted // num_items == user] % num_items).sum()
        )
        assert len(row) == min(100, left) and len(np.unique(row)) == len(row)
        assert not np.isin(user * num_items + row, interacted).any()
    counts = np.bincount(drawn[drawn >= 0], minlength=num_items)  # roughly uniform over items
    assert counts.min() > 0


def test_ranks_count_ties_half_and_list_misses_as_k():
    ranks = sampled_ranks(
        torch.tensor([1.0, 0.0]),
        torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
        torch.ones(2, 3, dtype=torch.bool),
    )
    assert ranks.tolist() == [1.5, 1.5]
    from towerrec.serving.scoring import TopK

    top = TopK(torch.tensor([[4, 2, 9], [1, 3, 5]]), torch.zeros(2, 3), torch.zeros(2, 3, 1))
    assert full_ranks(top, np.array([9, 7])).tolist() == [2.0, 3.0]


def test_append_one_adds_the_latest_item_to_the_chosen_rows():
    jagged = Jagged(np.array([1, 2, 3, 4]), np.array([0, 2, 2, 4]))
    appended = append_one(jagged, np.array([7, 8, 9]), np.array([True, True, False]))
    assert [appended.values[a:b].tolist() for a, b in zip(appended.offsets[:-1], appended.offsets[1:])] == [
        [1, 2, 7], [8], [3, 4]
    ]  # fmt: skip


@pytest.mark.slow
def test_an_implicit_log_trains_and_evaluates_by_both_protocols_beating_popularity(tiny_implicit, tmp_path):
    overrides = [
        *tiny_implicit_overrides(tiny_implicit),
        f"run_dir={tmp_path / 'run'}",
        "trainer.max_epochs=3",
    ]
    run_cli(["fit", "--config", IMPLICIT_CONFIG, *overrides])
    output = tmp_path / "recs.csv"
    result = run_cli(
        [
            "recommend",
            "--config",
            IMPLICIT_CONFIG,
            *overrides,
            "--k",
            "10",
            "--evaluate",
            "--output",
            str(output),
        ]
    )
    metrics = json.loads((tmp_path / "recs.csv.metrics.json").read_text())
    assert {"full", "sampled_100"} <= metrics.keys()
    for protocol in ("full", "sampled_100"):
        model, popular = metrics[protocol]["model"], metrics[protocol]["popularity"]
        assert model["hit_rate@10"] > popular["hit_rate@10"] + 0.2, (protocol, model, popular)
        assert 0 < model["ndcg@10"] <= model["hit_rate@10"]
    assert metrics["full"]["model"]["distinct_items"] > metrics["full"]["popularity"]["distinct_items"]
    assert "next-item evaluation @10" in result.stdout
    lists = output.read_text().splitlines()
    assert lists[0].split(",")[:4] == ['"user"', '"rank"', '"item"', '"score"'] or lists[0].startswith(
        "user,rank,item,score"
    )
    assert len(lists) == 1 + 10 * metrics["num_users"] or len(lists) > 1


def test_progress_lines_say_how_far_a_long_job_is_and_when_it_ends(capsys, monkeypatch):
    from towerrec.serving import scoring

    clock = iter([0.0, 5.0, 12.0, 13.0, 30.0])
    monkeypatch.setattr(scoring.time, "perf_counter", lambda: next(clock))
    lines = scoring.ProgressLines("scored 10 users", every_s=10)  # started at 0
    lines(0.1)  # at 5 s: too soon
    lines(0.4)  # at 12 s: 40% done, 18 s left
    lines(0.5)  # at 13 s: too soon after the last line
    lines(0.9)  # at 30 s
    printed = capsys.readouterr().err.splitlines()
    assert printed == [
        "[towerrec] scored 10 users: 40% (ETA 0:00:18)",
        "[towerrec] scored 10 users: 90% (ETA 0:00:03)",
    ]
