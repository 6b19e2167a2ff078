"""Top-K recommendation lists: every (user, candidate item) pair scored by the unsharded model.

    towerrec recommend --config configs/movielens100k.yaml --k 10 --output runs/ml100k-u1/recs.parquet
    towerrec recommend --config configs/movielens100k.yaml --users users.txt --candidates items.parquet
    towerrec recommend --config configs/movielens100k.yaml --evaluate      # + ranking metrics on the test split

How the scores are computed (U users, C candidates, T tasks, D_f embedding width of feature f)::

    data set rows ──▶ per entity (user / item) the feature values of its last row (``side`` of each feature)
    user-side features ──embedding_bag once per user──▶ (U, D_f)
    item-side features ──embedding_bag once per item block──▶ (C_block, D_f)
    context features: id 0 (out of vocabulary), dense 0 ──▶ one vector shared by every pair
    for each block of users × items: expand to pairs ─▶ interaction ─▶ tower ─▶ heads ─▶ (U_b, C_b, T)
    ranking score per pair (``recommend.score``/``task_weights``) ─▶ merged into a running top-K per user

Embedding lookups happen once per entity, never per pair; candidates stream in blocks of
``recommend.item_block_size``, so memory is bounded by the block and the (U, K) lists, not by U × C.
Items a user interacted with in ``recommend.seen_splits`` are excluded when ``recommend.exclude_seen``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from data.config import SparseFeature
from data.dataset import DataError, DatasetMeta
from data.reader import map_ids
from models.heads import predictions
from models.multitask import MultiTaskModel
from trainer.config import Config, ConfigError
from trainer.sharding import resolve_num_embeddings


class RecommendError(ConfigError):
    """A bad recommendation request (unknown feature, unreadable id file, bad output name); names the flag or key."""


# ------------------------------------------------------------------------------------------ data set rows
@dataclass
class Jagged:
    """Variable-length ids per row: row r holds ``values[offsets[r]:offsets[r + 1]]``."""

    values: np.ndarray  # (N_ids,) int64
    offsets: np.ndarray  # (N + 1,) int64

    def take(self, rows: np.ndarray) -> Jagged:
        """The rows ``rows`` (vectorized gather of variable-length slices)."""
        lengths = np.diff(self.offsets)[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = np.repeat(self.offsets[:-1][rows] - offsets[:-1], lengths)
        return Jagged(self.values[np.arange(offsets[-1]) + starts], offsets)

    @classmethod
    def single(cls, ids: np.ndarray) -> Jagged:
        return cls(np.asarray(ids, dtype=np.int64), np.arange(len(ids) + 1, dtype=np.int64))

    @classmethod
    def concat(cls, parts: Sequence[Jagged]) -> Jagged:
        starts = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
        offsets = [parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, starts)]
        return cls(np.concatenate([p.values for p in parts]), np.concatenate(offsets))


@dataclass
class Rows:
    """Feature values of data set rows, already mapped to embedding rows as the training reader does.

    ``sparse[name]``: Jagged ids per row; ``dense``: (N, num_dense) float32; ``users``/``items``:
    the raw user and item ids of each row (N,) int64; ``labels``: (N, T) float32 and ``label_mask``;
    ``interaction``: (N,) bool, false for sampled negatives (``recommend.interaction_column``).
    """

    sparse: dict[str, Jagged]
    dense: np.ndarray
    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    label_mask: np.ndarray
    interaction: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.users)

    def interactions(self) -> Rows:
        """The rows that are real interactions (all of them when there are no sampled negatives)."""
        if self.interaction.all():
            return self
        rows = np.flatnonzero(self.interaction)
        return Rows(
            sparse={name: jagged.take(rows) for name, jagged in self.sparse.items()},
            dense=self.dense[rows],
            users=self.users[rows],
            items=self.items[rows],
            labels=self.labels[rows],
            label_mask=self.label_mask[rows],
            interaction=self.interaction[rows],
        )


def _feature(cfg: Config, name: str, key: str) -> SparseFeature:
    for feature in cfg.data.sparse:
        if feature.name == name:
            if feature.multi_hot:
                raise RecommendError(f"{key}: feature {name!r} is multi-hot; it must hold one id per row")
            return feature
    raise RecommendError(
        f"{key}: {name!r} is not a data.sparse feature ({', '.join(f.name for f in cfg.data.sparse)})"
    )


def _int_column(table: pa.Table, column: str, file: str) -> np.ndarray:
    array = table.column(column)
    if not pa.types.is_integer(array.type):
        raise DataError(f"{file}: column {column!r} has type {array.type}, expected integer ids")
    return np.asarray(array.fill_null(0).to_numpy(), dtype=np.int64)


def _flags(table: pa.Table, column: str) -> np.ndarray:
    """A mask-like column as booleans: true where the value is finite and non-zero (null: false)."""
    values = np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.isfinite(values) & (values != 0)


def read_rows(cfg: Config, meta: DatasetMeta, split: str, num_embeddings: dict[str, int]) -> Rows:
    """All rows of ``split`` (whole files, file order), with ids mapped like ``data.reader``."""
    user_feature = _feature(cfg, cfg.recommend.user_feature, "recommend.user_feature")
    item_feature = _feature(cfg, cfg.recommend.item_feature, "recommend.item_feature")
    columns = [f.source_column for f in cfg.data.sparse] + [f.source_column for f in cfg.data.dense]
    for task in cfg.tasks:
        columns += [task.label_column] + ([task.mask] if task.mask else [])
    interaction_column = cfg.recommend.interaction_column
    if interaction_column:
        columns.append(interaction_column)
    columns = list(dict.fromkeys(columns))
    files = list(dict.fromkeys(rg.file for rg in meta.row_groups(split)))
    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file, columns=columns))
        except (pa.ArrowInvalid, OSError, KeyError) as err:
            if interaction_column and interaction_column not in pq.read_schema(file).names:
                raise RecommendError(
                    f"recommend.interaction_column: {file} has no column {interaction_column!r}"
                ) from err
            raise DataError(f"{file}: cannot read columns {columns} ({err})") from err
    table = pa.concat_tables(tables).combine_chunks()
    where = files[0] if files else str(meta.root)
    sparse = {}
    for feature in cfg.data.sparse:
        column = table.column(feature.source_column)
        if feature.multi_hot:
            array = column.chunk(0) if column.num_chunks else pa.array([], type=column.type)
            array = array.fill_null([]) if array.null_count else array
            offsets = array.offsets.to_numpy().astype(np.int64)
            raw = np.asarray(
                array.values.slice(offsets[0], offsets[-1] - offsets[0]).to_numpy(), dtype=np.int64
            )
            jagged = Jagged(raw, offsets - offsets[0])
        else:
            jagged = Jagged.single(_int_column(table, feature.source_column, where))
        jagged.values = map_ids(np.maximum(jagged.values, 0), feature, num_embeddings[feature.name])
        sparse[feature.name] = jagged
    dense = np.zeros((table.num_rows, len(cfg.data.dense)), dtype=np.float32)
    for j, feature in enumerate(cfg.data.dense):
        values = np.asarray(
            table.column(feature.source_column).to_numpy(zero_copy_only=False), dtype=np.float32
        )
        dense[:, j] = np.nan_to_num(values, nan=feature.fill_nan or 0.0, posinf=0.0, neginf=0.0)
    labels = np.zeros((table.num_rows, len(cfg.tasks)), dtype=np.float32)
    label_mask = np.ones_like(labels)
    for t, task in enumerate(cfg.tasks):
        labels[:, t] = np.asarray(
            table.column(task.label_column).to_numpy(zero_copy_only=False), dtype=np.float32
        )
        if task.mask:
            label_mask[:, t] = _flags(table, task.mask)
    interaction = _flags(table, interaction_column) if interaction_column else np.ones(table.num_rows, bool)
    return Rows(
        sparse=sparse,
        dense=dense,
        users=_int_column(table, user_feature.source_column, where),
        items=_int_column(table, item_feature.source_column, where),
        labels=labels,
        label_mask=label_mask,
        interaction=interaction,
    )


def concat_rows(parts: Sequence[Rows]) -> Rows:
    return Rows(
        sparse={name: Jagged.concat([p.sparse[name] for p in parts]) for name in parts[0].sparse},
        dense=np.concatenate([p.dense for p in parts]),
        users=np.concatenate([p.users for p in parts]),
        items=np.concatenate([p.items for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        label_mask=np.concatenate([p.label_mask for p in parts]),
        interaction=np.concatenate([p.interaction for p in parts]),
    )


# ------------------------------------------------------------------------------------------ entities
@dataclass
class Entities:
    """One side's entities (users or items): sorted raw ``ids`` (E,), their side features' ids
    (``sparse[name]``: Jagged, E rows) and dense values (``dense``: (E, num_side_dense))."""

    ids: np.ndarray
    sparse: dict[str, Jagged]
    dense: np.ndarray
    known: np.ndarray  # (E,) bool: the id occurs in the data set

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Position of each raw id in ``self.ids`` (-1 when absent)."""
        pos = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        found = (self.ids[pos] == ids) if len(self.ids) else np.zeros(len(ids), dtype=bool)
        return np.where(found, pos, -1)


def side_features(cfg: Config, side: str) -> tuple[list[str], list[int]]:
    """(sparse feature names, dense column indices) whose ``side`` is ``side``."""
    sparse = [f.name for f in cfg.data.sparse if f.side == side]
    dense = [j for j, f in enumerate(cfg.data.dense) if f.side == side]
    return sparse, dense


def build_entities(
    cfg: Config, rows: Rows, side: str, num_embeddings: dict[str, int], extra_ids=None
) -> Entities:
    """Each entity's feature values from its last row in ``rows``; ``extra_ids`` not in the data
    get their id feature alone (mapped like training: out-of-range → row 0), other sparse
    features id 0 (empty bag when multi-hot) and the mean of each dense column."""
    keys = rows.users if side == "user" else rows.items
    id_feature = _feature(
        cfg,
        cfg.recommend.user_feature if side == "user" else cfg.recommend.item_feature,
        f"recommend.{side}_feature",
    )
    sparse_names, dense_columns = side_features(cfg, side)
    if id_feature.name not in sparse_names:
        sparse_names = [id_feature.name, *sparse_names]
    ids, first_in_reversed = np.unique(keys[::-1], return_index=True)
    last = len(keys) - 1 - first_in_reversed
    sparse = {name: rows.sparse[name].take(last) for name in sparse_names}
    dense = rows.dense[last][:, dense_columns]
    known = np.ones(len(ids), dtype=bool)
    if extra_ids is not None:
        extra = np.setdiff1d(np.asarray(extra_ids, dtype=np.int64), ids)
        if len(extra):
            by_feature = {f.name: f for f in cfg.data.sparse}
            for name in sparse_names:
                feature = by_feature[name]
                if name == id_feature.name:
                    part = Jagged.single(map_ids(np.maximum(extra, 0), feature, num_embeddings[name]))
                elif feature.multi_hot:
                    part = Jagged(np.zeros(0, dtype=np.int64), np.zeros(len(extra) + 1, dtype=np.int64))
                else:
                    part = Jagged.single(np.zeros(len(extra), dtype=np.int64))
                sparse[name] = Jagged.concat([sparse[name], part])
            fill = (
                dense.mean(axis=0, keepdims=True)
                if len(dense)
                else np.zeros((1, len(dense_columns)), np.float32)
            )
            dense = np.concatenate([dense, np.repeat(fill, len(extra), axis=0)]).astype(np.float32)
            order = np.argsort(np.concatenate([ids, extra]), kind="stable")
            ids = np.concatenate([ids, extra])[order]
            known = np.concatenate([known, np.zeros(len(extra), dtype=bool)])[order]
            sparse = {name: jagged.take(order) for name, jagged in sparse.items()}
            dense = dense[order]
    return Entities(ids, sparse, dense, known)


# ------------------------------------------------------------------------------------------ scoring
def _pool(model: MultiTaskModel, name: str, jagged: Jagged, rows: slice | None = None) -> torch.Tensor:
    """Pooled embedding (E, D) of feature ``name`` for each row of ``jagged`` (or rows ``rows``)."""
    if rows is not None:
        offsets = jagged.offsets[rows.start : rows.stop + 1]
        values = jagged.values[offsets[0] : offsets[-1]]
        jagged = Jagged(values, offsets - offsets[0])
    table = model.embeddings.embedding_bags[_table_of(model)[name]]
    return F.embedding_bag(
        torch.from_numpy(jagged.values),
        table.weight,
        torch.from_numpy(jagged.offsets),
        mode=table.mode,
        include_last_offset=True,
    )


def _table_of(model: MultiTaskModel) -> dict[str, str]:
    return {f: t.name for t in model.embeddings.embedding_bag_configs() for f in t.feature_names}


class ModelScorer:
    """Predictions (U_b, C_b, T) for blocks of users × candidate items, with per-entity lookups.

    Args:
        model: the unsharded model (``trainer.export.load_unsharded_model``), in eval mode.
        cfg: the run configuration (feature sides, dense order).
        users, items: the entities; ``user_rows``/``item_rows`` select and order those scored.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        cfg: Config,
        users: Entities,
        items: Entities,
        user_rows,
        item_rows,
        item_prior: np.ndarray | None = None,
    ):
        self.model = model
        self.item_prior = (
            None if item_prior is None else torch.from_numpy(np.asarray(item_prior, dtype=np.float32))
        )
        self.task_names = list(model.task_names)
        self.items, self.item_rows = items, np.asarray(item_rows)
        self.sides = {f.name: f.side for f in cfg.data.sparse}
        self.dense_sides = [f.side for f in cfg.data.dense]
        users = _subset(users, np.asarray(user_rows))
        with torch.inference_mode():
            self.user_pooled = {name: _pool(model, name, jagged) for name, jagged in users.sparse.items()}
            context = [
                f.name for f in cfg.data.sparse if f.name not in users.sparse and f.name not in items.sparse
            ]
            zero_id = Jagged.single(np.zeros(1, dtype=np.int64))
            self.context_pooled = {name: _pool(model, name, zero_id) for name in context}
        self.user_dense = torch.from_numpy(users.dense)

    def item_block(self, start: int, end: int) -> dict:
        block = _subset(self.items, self.item_rows[start:end])
        pooled = {name: _pool(self.model, name, jagged) for name, jagged in block.sparse.items()}
        prior = None if self.item_prior is None else self.item_prior[self.item_rows[start:end]]
        return {"pooled": pooled, "dense": torch.from_numpy(block.dense), "size": end - start, "prior": prior}

    def __call__(self, user_start: int, user_end: int, block: dict) -> torch.Tensor:
        num_users, num_items = user_end - user_start, block["size"]
        pairs = num_users * num_items
        embeddings = []
        for name in self.model.feature_names:
            if name in self.user_pooled:
                e = self.user_pooled[name][user_start:user_end, None, :].expand(num_users, num_items, -1)
            elif name in block["pooled"]:
                e = block["pooled"][name][None, :, :].expand(num_users, num_items, -1)
            else:
                e = self.context_pooled[name].expand(pairs, -1)
            embeddings.append(e.reshape(pairs, -1))
        dense = torch.zeros(num_users, num_items, len(self.dense_sides))
        user_cols = [j for j, side in enumerate(self.dense_sides) if side == "user"]
        item_cols = [j for j, side in enumerate(self.dense_sides) if side == "item"]
        if user_cols:
            dense[:, :, user_cols] = self.user_dense[user_start:user_end, None, :]
        if item_cols:
            dense[:, :, item_cols] = block["dense"][None, :, :]
        model = self.model
        outputs = model.heads(model.tower(model.interaction(embeddings, dense.reshape(pairs, -1))))
        return predictions(outputs, model.output_kinds).reshape(num_users, num_items, -1)


class PopularityScorer:
    """The popularity baseline in the same interface: every user gets each item's training count."""

    task_names = ["popularity"]

    def __init__(self, counts: np.ndarray, item_rows):
        self.counts = torch.from_numpy(np.asarray(counts, dtype=np.float32)[np.asarray(item_rows)])

    def item_block(self, start: int, end: int) -> dict:
        return {"counts": self.counts[start:end]}

    def __call__(self, user_start: int, user_end: int, block: dict) -> torch.Tensor:
        return block["counts"][None, :, None].expand(user_end - user_start, -1, 1)


def _subset(entities: Entities, rows: np.ndarray) -> Entities:
    return Entities(
        entities.ids[rows],
        {name: jagged.take(rows) for name, jagged in entities.sparse.items()},
        entities.dense[rows],
        entities.known[rows],
    )


def score_function(cfg: Config, task_names: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(…, T) predictions → (…) ranking score per ``recommend.score`` and ``recommend.task_weights``.

    ``weighted_sum``: Σ_t w_t · pred_t. ``product``: Π_t pred_t^w_t (= exp Σ_t w_t log pred_t; predictions
    must be positive, e.g. a probability and a rating in [1, 5]). Empty weights: the first task alone.
    """
    given = cfg.recommend.task_weights or {task_names[0]: 1.0}
    weights = torch.tensor([given.get(name, 0.0) for name in task_names])
    if cfg.recommend.score == "product":
        used = weights != 0
        return lambda preds: (preds[..., used].clamp_min(1e-12).log() * weights[used]).sum(-1).exp()
    return lambda preds: preds @ weights


# ------------------------------------------------------------------------------------------ top-K
@dataclass
class TopK:
    """Per-user lists, best first: ``items`` (U, K) candidate positions (-1 where the list is shorter
    than K), ``scores`` (U, K) (-inf there) and ``predictions`` (U, K, T)."""

    items: torch.Tensor
    scores: torch.Tensor
    predictions: torch.Tensor


def seen_codes(user_positions: np.ndarray, item_positions: np.ndarray, num_candidates: int) -> np.ndarray:
    """Sorted unique ``user * num_candidates + item`` codes of the pairs where both positions are >= 0."""
    keep = (user_positions >= 0) & (item_positions >= 0)
    return np.unique(user_positions[keep].astype(np.int64) * num_candidates + item_positions[keep])


def top_k_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` along dim 1 with ties broken by position (lower first), deterministically.

    ``torch.topk`` leaves the order of equal scores unspecified, so lists would depend on the
    block layout. Here: every score above the k-th value is kept, then as many of the ones equal
    to it as fit, the lowest positions first; the k are ordered by score, then position (a stable
    sort of k entries, not of the whole row). (U, C) → values (U, k), positions (U, k)."""
    if k == 0:
        return scores[:, :0], torch.zeros(scores.shape[0], 0, dtype=torch.int64)
    scores = torch.nan_to_num(scores, nan=-math.inf)
    threshold = torch.topk(scores, k, dim=1, sorted=True).values[:, -1:]  # (U, 1): the k-th score
    above = scores > threshold
    tied = scores == threshold
    room = k - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=1) <= room))  # exactly k per row, in position order
    positions = chosen.nonzero()[:, 1].view(scores.shape[0], k)
    values = scores.gather(1, positions)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, order), positions.gather(1, order)


def top_k(
    scorer,
    score: Callable[[torch.Tensor], torch.Tensor],
    num_users: int,
    num_candidates: int,
    k: int,
    excluded: np.ndarray | None = None,
    item_block_size: int = 65536,
    max_pairs: int = 262144,
) -> TopK:
    """Streams candidates in blocks and keeps a running top-K per user (``torch.topk`` merges).

    ``scorer.item_block(start, end)`` prepares candidates [start, end); ``scorer(u0, u1, block)``
    returns (u1 - u0, block size, T) predictions; ``score`` maps them to (u1 - u0, block size).
    A block may carry ``"prior"`` (block size,): a factor multiplying every user's score of those items.
    ``excluded``: sorted ``user * num_candidates + candidate`` codes never recommended (see ``seen_codes``).
    Ties keep the lower candidate position first.
    """
    num_tasks = len(scorer.task_names)
    best_scores = torch.full((num_users, 0), -math.inf)
    best_items = torch.zeros((num_users, 0), dtype=torch.int64)
    best_preds = torch.zeros((num_users, 0, num_tasks))
    excluded = np.zeros(0, dtype=np.int64) if excluded is None else excluded
    with torch.inference_mode():
        for item_start in range(0, num_candidates, item_block_size):
            item_end = min(item_start + item_block_size, num_candidates)
            block = scorer.item_block(item_start, item_end)
            users_per_step = max(1, max_pairs // (item_end - item_start))
            merged_scores, merged_items, merged_preds = [], [], []
            for user_start in range(0, num_users, users_per_step):
                user_end = min(user_start + users_per_step, num_users)
                preds = scorer(user_start, user_end, block).float()  # (Ub, Ib, T)
                scores = score(preds).clone()
                if block.get("prior") is not None:
                    scores *= block["prior"]
                lo, hi = np.searchsorted(excluded, [user_start * num_candidates, user_end * num_candidates])
                codes = excluded[lo:hi]
                user_of, item_of = codes // num_candidates, codes % num_candidates
                inside = (item_of >= item_start) & (item_of < item_end)
                scores[
                    torch.from_numpy(user_of[inside] - user_start),
                    torch.from_numpy(item_of[inside] - item_start),
                ] = -math.inf
                rows = slice(user_start, user_end)
                all_scores = torch.cat([best_scores[rows], scores], dim=1)
                block_items = torch.arange(item_start, item_end).expand(user_end - user_start, -1)
                all_items = torch.cat([best_items[rows], block_items], dim=1)
                top_scores, top = top_k_stable(all_scores, min(k, all_scores.shape[1]))
                merged_scores.append(top_scores)
                merged_items.append(all_items.gather(1, top))
                all_preds = torch.cat([best_preds[rows], preds], dim=1)
                merged_preds.append(all_preds.gather(1, top[:, :, None].expand(-1, -1, num_tasks)))
            best_scores = torch.cat(merged_scores)
            best_items = torch.cat(merged_items)
            best_preds = torch.cat(merged_preds)
    pad = k - best_scores.shape[1]
    if pad > 0:  # fewer candidates than K
        best_scores = F.pad(best_scores, (0, pad), value=-math.inf)
        best_items = F.pad(best_items, (0, pad), value=-1)
        best_preds = F.pad(best_preds, (0, 0, 0, pad), value=math.nan)
    best_items = torch.where(
        torch.isinf(best_scores), -1, best_items
    )  # excluded items are not recommendations
    return TopK(best_items, best_scores, best_preds)


# ------------------------------------------------------------------------------------------ the request
@dataclass
class Catalogue:
    """Everything recommendation and ranking evaluation share for one data set."""

    users: Entities
    items: Entities
    splits: dict[str, Rows]
    """Every split's rows (train, val, test as configured)."""
    seen: Rows | None
    num_embeddings: dict[str, int]


def load_catalogue(cfg: Config, meta: DatasetMeta, extra_users=None, extra_items=None) -> Catalogue:
    """Reads every split once and builds the user and item tables (see module docstring)."""
    num_embeddings = resolve_num_embeddings(cfg, meta)
    splits = [
        s for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) if s and s in meta.splits
    ]
    by_split = {split: read_rows(cfg, meta, split, num_embeddings) for split in splits}
    everything = concat_rows(list(by_split.values()))
    seen_splits = (
        cfg.recommend.seen_splits
        if cfg.recommend.seen_splits is not None
        else [s for s in (cfg.data.train_split, cfg.data.val_split) if s]
    )
    for split in seen_splits:
        if split not in by_split:
            raise RecommendError(
                f"recommend.seen_splits: split {split!r} is not in {meta.root} (have: {', '.join(by_split)})"
            )
    seen = concat_rows([by_split[s] for s in seen_splits]).interactions() if seen_splits else None
    return Catalogue(
        users=build_entities(cfg, everything, "user", num_embeddings, extra_users),
        items=build_entities(cfg, everything, "item", num_embeddings, extra_items),
        splits=by_split,
        seen=seen,
        num_embeddings=num_embeddings,
    )


def excluded_pairs(
    cfg: Config, catalogue: Catalogue, user_rows: np.ndarray, item_rows: np.ndarray
) -> np.ndarray | None:
    """Codes of (scored user, candidate) pairs seen in ``recommend.seen_splits`` (None when not excluding)."""
    if not cfg.recommend.exclude_seen or catalogue.seen is None:
        return None
    user_index = np.full(len(catalogue.users.ids), -1, dtype=np.int64)
    user_index[user_rows] = np.arange(len(user_rows))
    item_index = np.full(len(catalogue.items.ids), -1, dtype=np.int64)
    item_index[item_rows] = np.arange(len(item_rows))
    users = catalogue.users.positions(catalogue.seen.users)
    items = catalogue.items.positions(catalogue.seen.items)
    users = np.where(users >= 0, user_index[users], -1)
    items = np.where(items >= 0, item_index[items], -1)
    return seen_codes(users, items, len(item_rows))


def item_counts(cfg: Config, catalogue: Catalogue) -> np.ndarray:
    """Training-split interactions per item entity (E_items,)."""
    positions = catalogue.items.positions(catalogue.splits[cfg.data.train_split].interactions().items)
    return np.bincount(positions[positions >= 0], minlength=len(catalogue.items.ids))


def recommend(
    cfg: Config,
    model: MultiTaskModel,
    catalogue: Catalogue,
    user_ids: np.ndarray | None = None,
    candidate_ids: np.ndarray | None = None,
    k: int | None = None,
) -> tuple[np.ndarray, np.ndarray, TopK]:
    """Top-K lists for ``user_ids`` (default: every user) over ``candidate_ids`` (default: every item).

    Returns ``(user ids (U,), candidate item ids (C,), TopK)``; ``TopK.items`` index the candidates.
    """
    if cfg.recommend.max_pairs_per_step < 1:
        raise RecommendError(
            f"recommend.max_pairs_per_step: must be > 0, got {cfg.recommend.max_pairs_per_step}"
        )
    users, items = catalogue.users, catalogue.items
    user_rows = np.arange(len(users.ids)) if user_ids is None else users.positions(np.asarray(user_ids))
    item_rows = (
        np.arange(len(items.ids))
        if candidate_ids is None
        else np.unique(items.positions(np.asarray(candidate_ids)))
    )
    assert (user_rows >= 0).all() and (item_rows >= 0).all(), (
        "ids missing from the catalogue (pass them as extra ids)"
    )
    prior = None
    if cfg.recommend.popularity_exponent:
        prior = (1.0 + item_counts(cfg, catalogue)) ** cfg.recommend.popularity_exponent
    scorer = ModelScorer(model, cfg, users, items, user_rows, item_rows, prior)
    result = top_k(
        scorer,
        score_function(cfg, scorer.task_names),
        len(user_rows),
        len(item_rows),
        k or cfg.recommend.k,
        excluded_pairs(cfg, catalogue, user_rows, item_rows),
        cfg.recommend.item_block_size,
        cfg.recommend.max_pairs_per_step,
    )
    return users.ids[user_rows], items.ids[item_rows], result


def original_ids(ids: np.ndarray, vocabulary: np.ndarray) -> pa.Array:
    """Data set ids (vocabulary rows) → the original ids they encode; null for row 0 (unseen) and
    for ids outside the vocabulary."""
    known = (ids >= 1) & (ids <= len(vocabulary))
    return pa.array(np.asarray(vocabulary)[np.where(known, ids - 1, 0)], mask=~known)


def to_table(
    user_ids: np.ndarray,
    candidate_ids: np.ndarray,
    result: TopK,
    task_names: list[str],
    vocabularies: dict[str, np.ndarray | None] | None = None,
) -> pa.Table:
    """Long format: one row per (user, rank) with ``user, rank, item, score`` and one column per task.

    ``user``/``item`` are data set ids (what the training data and ``--users``/``--candidates`` hold).
    With ``vocabularies["user"]``/``["item"]`` (the data set's saved vocabularies) the table also
    has ``original_user``/``original_item``: the ids of the source data (e.g. MovieLens ids)."""
    num_users, k = result.items.shape
    items = result.items.numpy()
    keep = (items >= 0).ravel()
    columns = {
        "user": np.repeat(user_ids, k)[keep],
        "rank": np.tile(np.arange(1, k + 1), num_users)[keep],
        "item": candidate_ids[np.maximum(items, 0)].ravel()[keep],
        "score": result.scores.numpy().ravel()[keep],
    }
    for side, vocabulary in (vocabularies or {}).items():
        if vocabulary is not None:
            columns[f"original_{side}"] = original_ids(columns[side], vocabulary)
    for t, name in enumerate(task_names):
        columns[name] = result.predictions[:, :, t].numpy().ravel()[keep]
    return pa.table(columns)


def check_output(path: str | Path) -> Path:
    """``--output``: a new .parquet or .csv file."""
    from trainer.run_folder import user_output

    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise RecommendError(f"--output: {path} must end in .parquet or .csv")
    return user_output(path, "--output", folder=False)


def write_table(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise RecommendError(f"--output: {path} must end in .parquet or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)
    return path


def read_ids(path: str | Path, column: str, flag: str) -> np.ndarray:
    """Ids from a Parquet file (column ``column``, or its only column) or a text/CSV file (one id
    per line; a first line that is not a number is a header naming the columns)."""
    path = Path(path)
    if not path.exists():
        raise RecommendError(f"{flag}: {path} does not exist")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        name = (
            column
            if column in table.column_names
            else (table.column_names[0] if table.num_columns == 1 else None)
        )
        if name is None:
            raise RecommendError(
                f"{flag}: {path} has no column {column!r} (columns: {', '.join(table.column_names)})"
            )
        if not pa.types.is_integer(table.column(name).type):
            raise RecommendError(
                f"{flag}: {path} column {name!r} has type {table.column(name).type}, expected integer ids"
            )
        return np.asarray(table.column(name).drop_null().to_numpy(), dtype=np.int64)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    field = 0
    if lines and not lines[0].split(",")[0].strip().lstrip("-").isdigit():
        header = [h.strip() for h in lines.pop(0).split(",")]
        if column not in header and len(header) > 1:
            raise RecommendError(f"{flag}: {path} header has no column {column!r} ({', '.join(header)})")
        field = header.index(column) if column in header else 0
    try:
        return np.array([int(line.split(",")[field]) for line in lines], dtype=np.int64)
    except (ValueError, IndexError) as err:
        raise RecommendError(f"{flag}: {path} must hold one integer id per line ({err})") from err


# ------------------------------------------------------------------------------------------ command
def add_recommend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="checkpoint folder or run folder (default: the run's latest)")
    parser.add_argument(
        "--users", default="all", help="'all' (every user in the data set) or a file of user ids"
    )
    parser.add_argument("--k", type=int, help="list length (overrides recommend.k)")
    parser.add_argument(
        "--candidates", help="file of candidate item ids (default: every item in the data set)"
    )
    parser.add_argument(
        "--output",
        help="output .parquet or .csv, new (default: <run_dir>/recommendations/top<k>-<checkpoint>.parquet)",
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="also compute ranking metrics on the test split"
    )


def recommend_overrides(args: argparse.Namespace) -> list[str]:
    return [f"recommend.k={args.k}"] if args.k is not None else []


def run_recommend(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.export import load_unsharded_model
    from trainer.run_folder import new_output

    output = check_output(args.output) if args.output else None
    meta = DatasetMeta.load(cfg.data.path)
    rec = cfg.recommend
    user_ids = (
        None
        if args.users == "all"
        else read_ids(
            args.users, _feature(cfg, rec.user_feature, "recommend.user_feature").source_column, "--users"
        )
    )
    candidate_ids = (
        None
        if not args.candidates
        else read_ids(
            args.candidates,
            _feature(cfg, rec.item_feature, "recommend.item_feature").source_column,
            "--candidates",
        )
    )
    started = time.perf_counter()
    catalogue = load_catalogue(cfg, meta, extra_users=user_ids, extra_items=candidate_ids)
    model, path = load_unsharded_model(cfg, args.checkpoint, catalogue.num_embeddings)
    loaded = time.perf_counter()
    users, candidates, result = recommend(cfg, model, catalogue, user_ids, candidate_ids)
    scored = time.perf_counter()
    vocabularies = {
        side: meta.vocabulary(_feature(cfg, name, f"recommend.{side}_feature").source_column)
        for side, name in (("user", rec.user_feature), ("item", rec.item_feature))
    }
    out = write_table(
        to_table(users, candidates, result, model.task_names, vocabularies),
        output or new_output(Path(cfg.run_dir) / "recommendations", f"top{rec.k}-{path.name}", ".parquet"),
    )
    unknown_users = int((~catalogue.users.known[catalogue.users.positions(users)]).sum())
    print(
        f"[towerrec] top-{rec.k} of {len(candidates):,} candidates for {len(users):,} users "
        f"({unknown_users} without history) from {path}: scored in {scored - loaded:.2f} s "
        f"(data + model {loaded - started:.2f} s) → {out}",
        flush=True,
    )
    if args.evaluate:
        from trainer.ranking import evaluate_ranking, format_ranking

        print(format_ranking(evaluate_ranking(cfg, model, catalogue, meta)), flush=True)
    return 0
