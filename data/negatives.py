"""Sampled negatives: items drawn uniformly from a catalogue among those a user never interacted
with (``data.prepare.negatives_per_positive``).

    interactions (user, item)  ──▶  ExcludedItems: per user, the sorted catalogue positions e_0 < e_1 < ...
    a draw for user u          ──▶  r uniform in [0, C - m_u)  ──▶  the r-th position not excluded

The r-th free position is ``r + #{j : e_j - j <= r}`` (``e_j - j`` counts the free positions
below ``e_j``, so it never decreases): one ``searchsorted`` per draw, all draws at once, exact and
uniform over the free items with no rejection loop, however many items a user has. Memory: 8
bytes per distinct (user, catalogue item) pair (plus 17 bytes per row of the log while
:class:`LogNegatives` gathers them).

:class:`LogNegatives` applies it to a streamed CSV/Parquet log (``towerrec.data.convert``): the
training split's items with their item-side values form the catalogue; each row gets
``per_row`` copies whose item and item-side columns are a sampled item's own, and a ``rated``
column says which rows are real (1) and which sampled (0).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from towerrec.data.dataset import DataError
from towerrec.data.id_mapping import IdMapper, id_values
from towerrec.data.splits import TEST, TRAIN, SplitKeys

RATED = "rated"
"""The label column of data sets with sampled negatives: 1 on real rows, 0 on sampled ones."""


class NothingToSample(Exception):
    """A user interacted with every catalogue item (``rows``: the positions of their draws)."""

    def __init__(self, rows: np.ndarray):
        super().__init__(f"{len(rows)} draws for users who interacted with every item")
        self.rows = rows


class ExcludedItems:
    """Per user, the catalogue items they interacted with; ``sample`` draws among the others.

    Args:
        users, items: (E,) int64 interactions (repeats and items outside the catalogue are fine).
        catalogue: (C,) sorted unique int64 item ids that can be drawn.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, catalogue: np.ndarray):
        self.catalogue = np.asarray(catalogue, dtype=np.int64)
        size = len(self.catalogue)
        position = np.minimum(np.searchsorted(self.catalogue, items), max(size - 1, 0))
        listed = (self.catalogue[position] == items) if size else np.zeros(len(items), bool)
        self.users, user_index = np.unique(np.asarray(users, np.int64)[listed], return_inverse=True)
        codes = np.unique(user_index.astype(np.int64) * size + position[listed])  # (user, item) pairs
        first_of_user = np.searchsorted(codes, codes // max(size, 1) * size)
        self.adjusted = codes - (np.arange(len(codes)) - first_of_user)  # u*C + e_j - j: sorted

    def sample(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(N,) item ids, one uniform draw per entry of ``users`` among the catalogue items that
        user never interacted with. Raises ``NothingToSample`` for users who interacted with all."""
        size = len(self.catalogue)
        users = np.asarray(users, dtype=np.int64)
        index = np.searchsorted(self.users, users)
        known = index < len(self.users)
        known[known] = self.users[index[known]] == users[known]
        base = index.astype(np.int64) * size
        start = np.where(known, np.searchsorted(self.adjusted, base), 0)
        end = np.where(known, np.searchsorted(self.adjusted, base + size), 0)
        free = size - (end - start)
        if (free <= 0).any():
            raise NothingToSample(np.flatnonzero(free <= 0))
        rank = np.minimum((rng.random(len(users)) * free).astype(np.int64), free - 1)
        below = np.where(known, np.searchsorted(self.adjusted, base + rank, side="right") - start, 0)
        return self.catalogue[rank + below]


class LogNegatives:
    """``per_row`` sampled negatives per row of a streamed log (see the module docstring).

    ``observe`` (the fitting pass) gathers every row's (user, item) pair and the training rows'
    items with their ``item_side`` values; ``finish`` fixes the catalogue (training items the item
    vocabulary keeps); ``augment`` (the writing pass) appends the sampled rows to a chunk.
    Negatives of training and validation rows avoid the user's training and validation items;
    negatives of test rows avoid all of the user's items.
    """

    def __init__(self, per_row: int, user_column: str, item_column: str, item_side: list[str], seed: int):
        self.per_row, self.user_column, self.item_column, self.seed = per_row, user_column, item_column, seed
        self.item_side = [c for c in item_side if c != item_column]
        self.pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.items = np.zeros(0, dtype=np.int64)
        self.item_rows: list[pa.Table] = []
        self.before_test: ExcludedItems | None = None
        self.every_split: ExcludedItems | None = None
        self.catalogue: pa.Table | None = None

    def _item_table(self, table: pa.Table, filled: dict[str, np.ndarray]) -> pa.Table:
        columns = {name: table.column(name) for name in (self.item_column, *self.item_side)}
        for name in self.item_side:  # which dense values the cleaner filled (a bucket reads them as missing)
            if name in filled:
                columns[f"__filled__{name}"] = pa.array(filled[name])
        return pa.table(columns)

    def observe(
        self, table: pa.Table, keys: SplitKeys, codes: np.ndarray, filled: dict[str, np.ndarray]
    ) -> None:
        items, _, missing, _ = id_values(table.column(self.item_column))
        known = ~missing
        self.pairs.append((keys.user[known], items[known], codes[known] == TEST))
        train = known & (codes == TRAIN)
        unique, first = np.unique(items[train], return_index=True)
        new = ~np.isin(unique, self.items)
        if new.any():
            rows = np.flatnonzero(train)[first[new]]
            self.items = np.concatenate([self.items, unique[new]])
            self.item_rows.append(self._item_table(table, filled).take(pa.array(rows)))

    def finish(self, mapper: IdMapper, where: str) -> None:
        if not self.item_rows:
            raise DataError(f"{where}: data.prepare.negatives_per_positive: no training item to sample from")
        catalogue = pa.concat_tables(self.item_rows, promote_options="permissive")
        order = np.argsort(self.items, kind="stable")
        ids = self.items[order]
        kept = mapper.rows(ids) != 0 if mapper.vocabulary is not None else np.ones(len(ids), bool)
        self.catalogue = catalogue.take(pa.array(order[kept]))
        ids = ids[kept]
        if not len(ids):
            raise DataError(
                f"{where}: data.prepare.negatives_per_positive: no training item is in the item vocabulary "
                "(data.prepare.min_count) to sample from"
            )
        users = np.concatenate([p[0] for p in self.pairs])
        items = np.concatenate([p[1] for p in self.pairs])
        test = np.concatenate([p[2] for p in self.pairs])
        self.pairs = []
        self.before_test = ExcludedItems(users[~test], items[~test], ids)
        self.every_split = ExcludedItems(users, items, ids)
        self.item_rows = []

    def augment(
        self, table: pa.Table, keys: SplitKeys, codes: np.ndarray, filled: dict[str, np.ndarray],
        labels: list[str], where: str, first_row: int,
    ) -> tuple[pa.Table, SplitKeys, np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
        """The chunk with its sampled rows appended (same user, time, context and user-side values
        as their row; the sampled item's own item-side values; ``labels`` missing) and ``rated``."""
        assert self.catalogue is not None and self.before_test is not None and self.every_split is not None
        num_rows = table.num_rows
        copies = np.repeat(np.arange(num_rows), self.per_row)
        users = keys.user[copies]
        is_test = codes[copies] == TEST
        rng = np.random.default_rng([self.seed, 7, int(keys.row_index[0]) if num_rows else 0])
        drawn = np.zeros(len(copies), dtype=np.int64)
        for chosen, excluded in ((~is_test, self.before_test), (is_test, self.every_split)):
            try:
                drawn[chosen] = excluded.sample(users[chosen], rng)
            except NothingToSample as err:
                row = int(copies[np.flatnonzero(chosen)[err.rows[0]]])
                user = table.column(self.user_column)[row].as_py()
                raise DataError(
                    f"{where}: row {int(keys.row_index[row]) - first_row}: user {user!r} interacted with every one of "
                    f"the {len(self.catalogue)} training items: no item left to sample "
                    "(data.prepare.negatives_per_positive)"
                ) from None
        catalogue_rows = np.searchsorted(self.every_split.catalogue, drawn)
        sampled = table.take(pa.array(copies))
        from_items = self.catalogue.take(pa.array(catalogue_rows))
        for name in (self.item_column, *self.item_side):
            column = from_items.column(name).cast(table.schema.field(name).type)
            sampled = sampled.set_column(sampled.column_names.index(name), name, column)
        for name in labels:
            index = sampled.column_names.index(name)
            sampled = sampled.set_column(index, name, pa.nulls(len(copies), table.schema.field(name).type))
        out_filled = {}
        for name, missing in filled.items():
            flag = f"__filled__{name}"
            if flag in from_items.column_names:  # an item-side value: missing as the item's own was
                extra = np.asarray(from_items.column(flag).to_numpy(zero_copy_only=False), bool)
            else:
                extra = missing[copies]
            out_filled[name] = np.concatenate([missing, extra])
        rated = np.concatenate([np.ones(num_rows, np.float32), np.zeros(len(copies), np.float32)])
        combined = pa.concat_tables([table, sampled]).append_column(RATED, pa.array(rated))
        out_keys = SplitKeys(
            row_index=np.concatenate([keys.row_index, keys.row_index[copies]]),
            user=np.concatenate([keys.user, users]),
            time=None if keys.time is None else np.concatenate([keys.time, keys.time[copies]]),
        )
        return combined, out_keys, np.concatenate([codes, codes[copies]]), out_filled
