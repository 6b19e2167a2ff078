"""A trained two-tower model at serving time: the catalogue's item vectors in an index, users'
vectors, top-K lists (optionally re-ranked by a multi-task ranker), and evaluation by both standard
next-item protocols.

    towerrec recommend --config configs/sessions_retrieval.yaml --k 10 --output recs.parquet
    towerrec recommend --config configs/sessions_retrieval.yaml --evaluate    # + recs.parquet.metrics.json

Vectors come from the unsharded model through plain-torch lookups (``towerrec.models.tables.TableLookup``),
the same path as the exported program. A user's vector for a list reads the user's features and
history as of now: the history of their latest row plus that row's item. Evaluation queries are
the test split's rows themselves (the features and history strictly before the held-out event).

Protocols: ``towerrec.serving.protocols`` (full ranking with seen items excluded, and the sampled
protocol); a held-out item the user had already seen cannot be retrieved: such users are counted in
``skipped_seen_targets`` and not evaluated by full ranking. Popularity (training-split counts) goes
through both.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from towerrec.data.jagged import Jagged
from towerrec.models.retrieval import TwoTowerModel
from towerrec.models.tables import TableLookup
from towerrec.serving.catalogue import Catalogue, Entities, Rows, excluded_pairs, item_counts
from towerrec.serving.index import IndexSettings, ItemIndex
from towerrec.serving.protocols import (
    diversity,
    full_ranks,
    interaction_codes,
    rank_metrics,
    sampled_candidates,
    sampled_ranks,
)
from towerrec.serving.scoring import ProgressLines, TopK
from towerrec.trainer.config import Config
from towerrec.trainer.errors import RecommendError

BLOCK_ROWS = 8192


# ------------------------------------------------------------------------------------------ vectors
def _vectors(
    model: TwoTowerModel,
    lookup: TableLookup,
    sparse: dict[str, Jagged],
    dense: np.ndarray,
    side: str,
    block_rows: int = BLOCK_ROWS,
) -> torch.Tensor:
    """(E, d) vectors of E entities or rows on one ``side`` from their features' ids (``sparse``)
    and the full-width dense matrix (E, num_dense), in blocks."""
    names = model.user_features if side == "user" else model.item_features
    lists = [n for n in model.sequence_lists if side == "user"]
    num_rows = len(dense)
    parts = []
    with torch.inference_mode():
        for start in range(0, num_rows, block_rows):
            rows = np.arange(start, min(start + block_rows, num_rows))
            features, histories = {}, {}
            for name in dict.fromkeys([*names, *lists]):
                if name in model.sequences and name not in model.sequence_lists:
                    continue
                jagged = sparse[name].take(rows)
                values, lengths = torch.from_numpy(jagged.values), torch.from_numpy(jagged.lengths())
                if name in model.sequence_lists:
                    histories[name] = (lookup.unpooled(name, values), lengths)
                else:
                    features[name] = lookup.pooled(name, values, lengths)
            block_dense = torch.from_numpy(np.ascontiguousarray(dense[rows], dtype=np.float32))
            if side == "user":
                parts.append(model.user_vectors(features, block_dense, histories))
            else:
                parts.append(model.item_vectors(features, block_dense))
    return torch.cat(parts) if parts else torch.zeros(0, model.towers.dim)


def _full_dense(cfg: Config, entities: Entities, side: str) -> np.ndarray:
    """An entity table's side-only dense values (E, side columns) at their columns of the full matrix."""
    full = np.zeros((len(entities.ids), len(cfg.data.dense)), dtype=np.float32)
    columns = [j for j, f in enumerate(cfg.data.dense) if f.side == side]
    full[:, columns] = entities.dense
    return full


def item_vectors(cfg: Config, model: TwoTowerModel, lookup: TableLookup, items: Entities) -> torch.Tensor:
    """(N, d): every catalogue item's vector (the index's rows, in ``items.ids`` order)."""
    return _vectors(model, lookup, items.sparse, _full_dense(cfg, items, "item"), "item")


def with_latest_item(
    cfg: Config, model: TwoTowerModel, users: Entities, latest_items: np.ndarray
) -> Entities:
    """Users as of now: each history whose candidate is the item feature gets the item of the user's
    latest row appended (its aligned side lists an unknown id 0); ``latest_items`` (U,) table rows,
    -1 for a user with no row."""
    item = cfg.recommend.item_feature
    sparse = dict(users.sparse)
    for name, feature in model.sequences.items():
        if feature.candidate != item:
            continue
        for list_name, appended in (
            (name, latest_items),
            *((side, np.zeros_like(latest_items)) for side in feature.side),
        ):
            sparse[list_name] = append_one(sparse[list_name], appended, latest_items >= 0)
    return Entities(users.ids, sparse, users.dense, users.known)


def append_one(jagged: Jagged, values: np.ndarray, where: np.ndarray) -> Jagged:
    """Each row's list with ``values[r]`` appended where ``where[r]`` (vectorised)."""
    lengths = jagged.lengths() + where.astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out = np.zeros(offsets[-1], dtype=jagged.values.dtype)
    old_lengths = jagged.lengths()
    row = np.repeat(np.arange(len(old_lengths)), old_lengths)
    out[offsets[:-1][row] + (np.arange(len(jagged.values)) - jagged.offsets[:-1][row])] = jagged.values
    out[offsets[1:][where] - 1] = values[where]
    return Jagged(out, offsets)


def latest_items(cfg: Config, catalogue: Catalogue) -> np.ndarray:
    """(U,) item table row of each user's latest interaction (-1 for a user without one). Rows are
    in time order within each split (the splitters keep input order) and splits are train, val,
    test: the last interaction read is the latest."""
    parts = [catalogue.splits[s].interactions() for s in catalogue.splits]
    users = np.concatenate([p.users for p in parts]) if parts else np.zeros(0, np.int64)
    items = np.concatenate([p.sparse(cfg.recommend.item_feature).values for p in parts]) if parts else users
    positions = catalogue.users.positions(users)
    latest = np.full(len(catalogue.users.ids), -1, dtype=np.int64)
    keep = positions >= 0
    latest[positions[keep]] = items[keep]  # later rows overwrite earlier ones
    return latest


# ------------------------------------------------------------------------------------------ lists
class Retriever:
    """A trained two-tower model with its catalogue's item index."""

    def __init__(self, cfg: Config, model: TwoTowerModel, catalogue: Catalogue):
        self.cfg, self.model, self.catalogue = cfg, model, catalogue
        self.lookup = TableLookup.of(model)
        rec = cfg.recommend
        started = time.perf_counter()
        self.item_vectors = item_vectors(cfg, model, self.lookup, catalogue.items)
        settings = IndexSettings(
            rec.index_hnsw_m, 200, rec.index_hnsw_ef_search, rec.index_ivf_lists, rec.index_ivf_probe
        )
        self.index = ItemIndex(self.item_vectors, rec.index, settings)
        self.build_seconds = time.perf_counter() - started

    def user_vectors(self, user_rows: np.ndarray) -> torch.Tensor:
        users = self.catalogue.users
        subset = Entities(
            users.ids[user_rows],
            {name: jagged.take(user_rows) for name, jagged in users.sparse.items()},
            users.dense[user_rows],
            users.known[user_rows],
        )
        subset = with_latest_item(
            self.cfg, self.model, subset, latest_items(self.cfg, self.catalogue)[user_rows]
        )
        return _vectors(self.model, self.lookup, subset.sparse, _full_dense(self.cfg, subset, "user"), "user")

    def top_k(self, user_rows: np.ndarray, k: int, progress: bool = False) -> TopK:
        """Lists of ``k`` items for the catalogue users ``user_rows`` (positions), seen items excluded,
        in blocks of users; with ``progress``, a line per block (users/s, ETA) when it takes long."""
        num_items = self.index.num_items
        parts = []
        lines = ProgressLines(f"retrieved for {len(user_rows):,} users") if progress else None
        for start in range(0, len(user_rows), BLOCK_ROWS):
            rows = user_rows[start : start + BLOCK_ROWS]
            excluded = excluded_pairs(self.cfg, self.catalogue, rows, np.arange(num_items))
            parts.append(self.index.search(self.user_vectors(rows), k, excluded))
            if lines is not None:
                lines((start + len(rows)) / len(user_rows))
        return TopK(*(torch.cat([getattr(p, f) for p in parts]) for f in ("items", "scores", "predictions")))


# ------------------------------------------------------------------------------------------ evaluation
def evaluation_queries(cfg: Config, catalogue: Catalogue, users: np.ndarray | None) -> Rows:
    """The held-out events: the test split's interactions, one per user (its last), restricted to
    ``users`` (raw ids) when given."""
    split = cfg.data.test_split
    if split is None or split not in catalogue.splits:
        raise RecommendError(
            f"data.test_split: {split!r} is not a split of the data set; --evaluate needs one"
        )
    test = catalogue.splits[split].interactions()
    if users is not None:
        test = test.take(np.flatnonzero(np.isin(test.users, users)))
    _, last_in_reversed = np.unique(test.users[::-1], return_index=True)
    return test.take(np.sort(len(test.users) - 1 - last_in_reversed))


def evaluate_retrieval(
    cfg: Config, retriever: Retriever, users: np.ndarray | None = None, k: int | None = None
) -> dict:
    """Both protocols for the model and popularity, plus list diversity (see the module docstring)."""
    k = k or cfg.recommend.k
    catalogue = retriever.catalogue
    num_items = retriever.index.num_items
    queries = evaluation_queries(cfg, catalogue, users)
    if not queries.num_rows:
        raise RecommendError("--evaluate: no test events for the requested users")
    user_rows = catalogue.users.positions(queries.users)
    targets = catalogue.items.positions(queries.items)
    seen = excluded_pairs(cfg, catalogue, user_rows, np.arange(num_items))
    seen = np.zeros(0, dtype=np.int64) if seen is None else seen
    target_codes = np.arange(len(targets)) * num_items + targets
    fresh = ~np.isin(target_codes, seen)
    query_vectors = _vectors(
        retriever.model, retriever.lookup, _sparse_of(queries, retriever.model), queries.dense, "user"
    )
    model_top = retriever.index.search(
        query_vectors[torch.from_numpy(fresh)], k, _renumber(seen, fresh, num_items)
    )
    counts = item_counts(cfg, catalogue).astype(np.float32)
    popular = ItemIndex(torch.from_numpy(counts)[:, None])
    popular_top = popular.search(torch.ones(int(fresh.sum()), 1), k, _renumber(seen, fresh, num_items))
    result = {
        "k": k,
        "split": cfg.data.test_split,
        "num_users": int(len(targets)),
        "evaluated_users": int(fresh.sum()),
        "skipped_seen_targets": int((~fresh).sum()),
        "num_candidates": num_items,
        "full": {
            name: {**rank_metrics(full_ranks(top, targets[fresh]), k), **diversity(top, num_items)}
            for name, top in (("model", model_top), ("popularity", popular_top))
        },
    }
    if cfg.recommend.ranker is not None:  # retrieve num_candidates, the ranker orders them
        from towerrec.serving.cascade import rank_candidates

        kept_rows = user_rows[fresh]
        fetched = retriever.index.search(
            query_vectors[torch.from_numpy(fresh)],
            max(cfg.recommend.num_candidates, k),
            _renumber(seen, fresh, num_items),
        )
        cascade, _ = rank_candidates(cfg, catalogue, kept_rows, fetched, k)
        result["full"]["cascade"] = {
            **rank_metrics(full_ranks(cascade, targets[fresh]), k),
            **diversity(cascade, num_items),
            "retrieved": int(fetched.items.shape[1]),
            "recall_of_retrieval": float((fetched.items.numpy() == targets[fresh][:, None]).any(1).mean()),
        }
    interacted = interaction_codes(catalogue, user_rows)  # every split: sampled items are never touched
    count = cfg.recommend.sampled_negatives
    negatives = torch.from_numpy(sampled_candidates(interacted, len(targets), num_items, count, cfg.seed))
    valid = negatives >= 0
    safe = negatives.clamp_min(0)
    target_vectors = retriever.item_vectors[torch.from_numpy(targets)]
    model_scores = (query_vectors * target_vectors).sum(1)
    negative_scores = torch.einsum("ud,und->un", query_vectors, retriever.item_vectors[safe])
    popularity = torch.from_numpy(counts)
    result[f"sampled_{count}"] = {
        "model": rank_metrics(sampled_ranks(model_scores, negative_scores, valid), k),
        "popularity": rank_metrics(
            sampled_ranks(popularity[torch.from_numpy(targets)], popularity[safe], valid), k
        ),
    }
    return result


def _sparse_of(rows: Rows, model: TwoTowerModel) -> dict[str, Jagged]:
    return {name: rows.sparse(name) for name in dict.fromkeys([*model.user_features, *model.sequence_lists])}


def _renumber(codes: np.ndarray, keep: np.ndarray, num_items: int) -> np.ndarray:
    """Codes ``query * N + item`` of the kept queries, renumbered to the kept queries' order."""
    new_index = np.cumsum(keep) - 1
    query = codes // num_items
    kept = keep[query]
    return np.sort(new_index[query[kept]] * num_items + codes[kept] % num_items)


def format_retrieval(result: dict) -> str:
    k = result["k"]
    lines = [
        f"[towerrec] next-item evaluation @{k} on split {result['split']!r}: {result['evaluated_users']:,} users "
        f"({result['skipped_seen_targets']} with an already seen held-out item left out), "
        f"{result['num_candidates']:,} items"
    ]
    for protocol in [p for p in result if p == "full" or p.startswith("sampled_")]:
        for who, values in result[protocol].items():
            shown = "  ".join(
                f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}"
                for name, value in values.items()
            )
            lines.append(f"{protocol:<11} {who:<11} {shown}")
    return "\n".join(lines)
