"""The standard next-item evaluation protocols, shared by retrieval and ranking models.

Leave-last-out: each evaluated user's held-out item is ranked

- ``full``: among every item of the catalogue, the user's seen items excluded (HR@K, NDCG@K);
- ``sampled_<n>``: against ``n`` items drawn uniformly (seeded) from those the user never interacted
  with, as in the SASRec paper; a tie counts half (the expected rank under random tie-breaking).

Lists also report their diversity: distinct items, the share of lists holding the most frequent
item, and catalogue coverage.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from towerrec.data.negatives import ExcludedItems
from towerrec.serving.catalogue import Catalogue, seen_codes
from towerrec.serving.scoring import TopK


def rank_metrics(ranks: np.ndarray, k: int) -> dict[str, float]:
    """HR@k and NDCG@k of 0-based ranks (fractional for half-counted ties), one target per user."""
    hit = ranks < k
    return {
        f"hit_rate@{k}": float(hit.mean()) if len(ranks) else math.nan,
        f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if len(ranks) else math.nan,
    }


def full_ranks(top: TopK, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target among a list (K where it is not in the top K)."""
    items = top.items.numpy()
    found = items == targets[:, None]
    return np.where(found.any(1), found.argmax(1), items.shape[1]).astype(np.float64)


def sampled_candidates(
    interacted: np.ndarray, num_users: int, num_items: int, count: int, seed: int
) -> np.ndarray:
    """(U, count) item positions drawn uniformly without replacement from those each user never
    interacted with (``interacted``: sorted codes ``user * N + item``), -1 where a user has fewer.
    Draws come from ``towerrec.data.negatives.ExcludedItems`` (exactly uniform over the user's
    never-touched items, no rejection); repeats are dropped, the first ``count`` distinct kept (a
    uniform sample without replacement), and users left short draw again."""
    users_of, items_of = interacted // max(num_items, 1), interacted % max(num_items, 1)
    excluded = ExcludedItems(users_of, items_of, np.arange(num_items, dtype=np.int64))
    rng = np.random.default_rng([seed, 100])
    available = num_items - np.bincount(users_of, minlength=num_users)[:num_users]
    wanted = np.minimum(count, available)
    chosen = np.full((num_users, count), -1, dtype=np.int64)
    filled = np.zeros(num_users, dtype=np.int64)
    need = np.flatnonzero(filled < wanted)
    for _ in range(50):
        if not len(need):
            break
        fresh = excluded.sample(np.repeat(need, 2 * count), rng).reshape(len(need), 2 * count)
        draws = np.concatenate([chosen[need], fresh], axis=1)  # the ones kept so far first: they stay
        ok = draws >= 0
        order = np.argsort(np.where(ok, draws, -1), axis=1, kind="stable")
        ranked = np.take_along_axis(draws, order, axis=1)
        repeat = np.zeros_like(ok)
        repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
        first = np.empty_like(ok)
        np.put_along_axis(first, order, ~repeat, axis=1)  # a value's first occurrence in draw order
        ok &= first
        position = np.cumsum(ok, axis=1) - 1
        keep = ok & (position < wanted[need][:, None])
        rows, columns = np.nonzero(keep)
        chosen[need] = -1
        chosen[need[rows], position[rows, columns]] = draws[rows, columns]
        filled[need] = keep.sum(1)
        need = need[filled[need] < wanted[need]]
    return chosen


def sampled_ranks(
    target_scores: torch.Tensor, negative_scores: torch.Tensor, valid: torch.Tensor
) -> np.ndarray:
    """0-based rank of each target among its sampled items; a tie counts half."""
    above = ((negative_scores > target_scores[:, None]) & valid).sum(1)
    ties = ((negative_scores == target_scores[:, None]) & valid).sum(1)
    return (above + 0.5 * ties).double().numpy()


def diversity(top: TopK, num_items: int) -> dict[str, float]:
    """Distinct items in the lists, the share of lists holding the most frequent one, coverage."""
    items = top.items.numpy()
    shown = items[items >= 0]
    if not len(shown):
        return {"distinct_items": 0, "top_item_share": math.nan, "coverage": 0.0}
    counts = np.bincount(shown, minlength=num_items)
    return {
        "distinct_items": int((counts > 0).sum()),
        "top_item_share": float(counts.max() / len(items)),
        "coverage": float((counts > 0).sum() / num_items),
    }


def interaction_codes(catalogue: Catalogue, user_rows: np.ndarray) -> np.ndarray:
    """Sorted codes ``query * N + item`` of every interaction, in any split, of the queried users
    (``user_rows``: their catalogue positions, one query each)."""
    query_of = np.full(len(catalogue.users.ids), -1, dtype=np.int64)
    query_of[user_rows] = np.arange(len(user_rows))
    users, items = [], []
    for rows in catalogue.splits.values():
        rows = rows.interactions()
        users.append(query_of[np.maximum(catalogue.users.positions(rows.users), 0)])
        items.append(catalogue.items.positions(rows.items))
    return seen_codes(np.concatenate(users), np.concatenate(items), len(catalogue.items.ids))
