"""A data set as serving sees it: every split's rows (decoded and validated as training reads
them), one table per side of each entity (users, items) with its features, and the pairs already
seen.

    data set rows ──read_rows (data.reader.read_split)──▶ Rows: ids as table rows, dense, labels
        (raw ids of ``id_mapping: dynamic`` features looked up in the checkpoint's id maps: row 0
        for an id without a row)
    per entity (user / item): the feature values of its last row (``side`` of each feature) ──▶ Entities
    seen pairs (``recommend.seen_splits``; sampled negatives excluded) ──▶ codes excluded from lists
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow.parquet as pq
import torch

from towerrec.data.config import SparseFeature
from towerrec.data.dataset import DatasetMeta
from towerrec.data.jagged import Jagged
from towerrec.data.reader import map_ids, read_spec, read_split
from towerrec.data.rows import DecodedRows, RowLocator, flags
from towerrec.models.dynamic_ids import DynamicIds
from towerrec.trainer.config import Config
from towerrec.trainer.errors import RecommendError


@dataclass
class Rows:
    """Data set rows for serving: ``decoded`` (``towerrec.data.rows.DecodedRows``: ids as table rows,
    dense values, labels and label masks, as training reads them) plus the stored ``users`` and
    ``items`` ids (N,) int64 and ``interaction`` (N,) bool, false for sampled negatives
    (``recommend.interaction_column``)."""

    decoded: DecodedRows
    users: np.ndarray
    items: np.ndarray
    interaction: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.users)

    @property
    def dense(self) -> np.ndarray:
        return self.decoded.dense

    @property
    def labels(self) -> np.ndarray:
        return self.decoded.labels

    @property
    def label_mask(self) -> np.ndarray:
        return self.decoded.label_mask

    def sparse(self, name: str) -> Jagged:
        return self.decoded.sparse(name)

    def take(self, rows: np.ndarray) -> Rows:
        return Rows(self.decoded.take(rows), self.users[rows], self.items[rows], self.interaction[rows])

    def interactions(self) -> Rows:
        """The rows that are real interactions (all of them when there are no sampled negatives)."""
        return self if self.interaction.all() else self.take(np.flatnonzero(self.interaction))


def id_feature(cfg: Config, name: str, key: str) -> SparseFeature:
    for feature in cfg.data.sparse:
        if feature.name == name:
            if feature.multi_hot:
                raise RecommendError(f"{key}: feature {name!r} is multi-hot; it must hold one id per row")
            return feature
    raise RecommendError(
        f"{key}: {name!r} is not a data.sparse feature ({', '.join(f.name for f in cfg.data.sparse)})"
    )


def rows_of_dynamic_ids(decoded: DecodedRows, id_maps: DynamicIds | None) -> DecodedRows:
    """``decoded`` with the raw ids of ``id_mapping: dynamic`` features replaced by their rows in
    ``id_maps`` (lookups: an id without a row gets row 0)."""
    if id_maps is None:
        return decoded
    single_ids, bags = decoded.single_ids.copy(), list(decoded.bags)
    single = multi = 0
    for name, is_multi in zip(decoded.keys, decoded.multi_hot):
        if name in id_maps.feature_tables:
            if is_multi:
                bag = bags[multi]
                bags[multi] = Jagged(id_maps.rows_of(name, torch.from_numpy(bag.values)).numpy(), bag.offsets)
            else:
                single_ids[single] = id_maps.rows_of(name, torch.from_numpy(single_ids[single])).numpy()
        multi += is_multi
        single += not is_multi
    return replace(decoded, single_ids=single_ids, bags=bags)


def read_rows(
    cfg: Config, meta: DatasetMeta, split: str, table_rows: dict[str, int], id_maps: DynamicIds | None = None
) -> Rows:
    """All rows of ``split`` (stored order), read and validated like ``towerrec.data.reader`` reads
    them; raw dynamic ids looked up in ``id_maps`` (the checkpoint's; needed when there are any)."""
    if cfg.data.dynamic_tables and id_maps is None:
        raise RecommendError(
            "data.sparse: id_mapping: dynamic features need the checkpoint's id maps to find their rows "
            "(towerrec.serving.export.load_id_maps)"
        )
    user = id_feature(cfg, cfg.recommend.user_feature, "recommend.user_feature")
    item = id_feature(cfg, cfg.recommend.item_feature, "recommend.item_feature")
    interaction = cfg.recommend.interaction_column
    groups = meta.row_groups(split)
    if interaction and groups and interaction not in pq.read_schema(groups[0].file).names:
        raise RecommendError(f"recommend.interaction_column: {groups[0].file} has no column {interaction!r}")
    extra = tuple(
        dict.fromkeys([user.source_column, item.source_column, *([interaction] if interaction else [])])
    )
    decoded, raw = read_split(meta, split, read_spec(cfg.data, cfg.tasks, table_rows, meta.columns), extra)
    where = RowLocator([(meta.row_groups(split)[0], 0)]) if meta.row_groups(split) else None

    def ids(column: str) -> np.ndarray:
        return np.asarray(raw[column].fill_null(0).to_numpy(), dtype=np.int64)

    return Rows(
        decoded=rows_of_dynamic_ids(decoded, id_maps),
        users=ids(user.source_column),
        items=ids(item.source_column),
        interaction=flags(raw[interaction], interaction, where)
        if interaction
        else np.ones(decoded.num_rows, dtype=bool),
    )


def concat_rows(parts: Sequence[Rows]) -> Rows:
    return Rows(
        decoded=DecodedRows.concat([p.decoded for p in parts]),
        users=np.concatenate([p.users for p in parts]),
        items=np.concatenate([p.items for p in parts]),
        interaction=np.concatenate([p.interaction for p in parts]),
    )


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
    cfg: Config,
    rows: Rows,
    side: str,
    num_embeddings: dict[str, int],
    extra_ids=None,
    id_maps: DynamicIds | None = None,
) -> Entities:
    """Each entity's feature values from its last row in ``rows``; ``extra_ids`` not in the data
    get their id feature alone (mapped like training: out-of-range → row 0; a dynamic id through
    ``id_maps``), other sparse features id 0 (empty bag when multi-hot) and the mean of each dense
    column."""
    keys = rows.users if side == "user" else rows.items
    own = id_feature(
        cfg,
        cfg.recommend.user_feature if side == "user" else cfg.recommend.item_feature,
        f"recommend.{side}_feature",
    )
    sparse_names, dense_columns = side_features(cfg, side)
    if own.name not in sparse_names:
        sparse_names = [own.name, *sparse_names]
    ids, first_in_reversed = np.unique(keys[::-1], return_index=True)
    last = len(keys) - 1 - first_in_reversed
    sparse = {name: rows.sparse(name).take(last) for name in sparse_names}
    dense = rows.dense[last][:, dense_columns]
    known = np.ones(len(ids), dtype=bool)
    if extra_ids is not None:
        extra = np.setdiff1d(np.asarray(extra_ids, dtype=np.int64), ids)
        if len(extra):
            by_feature = {f.name: f for f in cfg.data.sparse}
            for name in sparse_names:
                feature = by_feature[name]
                if name == own.name and feature.id_mapping == "dynamic":
                    part = Jagged.single(id_maps.rows_of(name, torch.from_numpy(extra)).numpy())
                elif name == own.name:
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


@dataclass
class Catalogue:
    """Everything recommendation and ranking evaluation share for one data set."""

    users: Entities
    items: Entities
    splits: dict[str, Rows]
    """Every split's rows (train, val, test as configured)."""
    seen: Rows | None
    num_embeddings: dict[str, int]


def load_catalogue(
    cfg: Config, meta: DatasetMeta, extra_users=None, extra_items=None, id_maps: DynamicIds | None = None
) -> Catalogue:
    """Reads every split once and builds the user and item tables (see module docstring);
    ``id_maps``: the checkpoint's (``towerrec.serving.export.load_id_maps``) with dynamic ids."""
    num_embeddings = meta.table_rows(cfg.data.sparse)
    splits = [
        s for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) if s and s in meta.splits
    ]
    by_split = {split: read_rows(cfg, meta, split, num_embeddings, id_maps) for split in splits}
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
        users=build_entities(cfg, everything, "user", num_embeddings, extra_users, id_maps),
        items=build_entities(cfg, everything, "item", num_embeddings, extra_items, id_maps),
        splits=by_split,
        seen=seen,
        num_embeddings=num_embeddings,
    )


def seen_codes(user_positions: np.ndarray, item_positions: np.ndarray, num_candidates: int) -> np.ndarray:
    """Sorted unique ``user * num_candidates + item`` codes of the pairs where both positions are >= 0."""
    keep = (user_positions >= 0) & (item_positions >= 0)
    return np.unique(user_positions[keep].astype(np.int64) * num_candidates + item_positions[keep])


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
