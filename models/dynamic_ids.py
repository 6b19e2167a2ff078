"""Dynamic ids: raw int64 ids → rows of an embedding table, assigned as ids arrive in training,
collision-free until the table is full, then with eviction (LRU, LFU, TTL). No torch.distributed:
the trainer (``towerrec.trainer.dynamic_ids``) gathers each step's ids over the ranks and calls
``DynamicIds.update`` with the same global (id, count) set on every rank, so every replica of the
map stays bitwise identical (the maps are small, replicated, fixed-shape buffers; why not TorchRec's
managed-collision modules: README.md, "Dynamic ids").

One step of training, per table (ids of all ranks; B ids per rank, C = capacity)::

    local ids ──unique+counts──▶ (table, id, count) ──all-gather──▶ global (uniq, counts), sorted
        IdMap.update(uniq, counts): hits refresh LRU/LFU/TTL metadata; new ids take free rows,
        else rows evicted ahead of need (a pool refilled ``evict_chunk`` rows at a time) ──▶
        rows of uniq (0 = overflow) + rows to re-initialise (given to a new id, or a TTL-expired id's)
    local ids ──searchsorted(uniq)──▶ their rows

Rows: the table has ``C + 1`` rows; row 0 is every id without a row (never seen in training,
evicted, overflow, ``MISSING_ID``); an id's row is ``1 + its slot``. Evaluation and serving only
look ids up (``IdMap.lookup``: pure, two ``searchsorted``), never insert.

State per map (persistent buffers, fixed shapes: DCP saves them once and loads them on any number
of ranks)::

    row_key   (C,) int64   the id each slot holds (slots [0, meta.high_water) were given out)
    row_count (C,) int64   training occurrences since the id got the slot (LFU)
    row_last  (C,) int32   last training step the id was seen (LRU, TTL); POOLED: slot in the pool
    pool      (E,) int64   evicted slots waiting for reuse (E = evict_chunk; meta.pool valid)
    main_key, main_row (C,)  sorted keys → slots (-1: removed), meta.n_main valid
    delta_key, delta_row (D,)  small sorted index new keys enter first, meta.n_delta valid
    meta      (12,) int64  step, high_water, dead, inserted, evicted, expired, overflow, rebuilds,
                           pool, n_main, n_delta, spare (counters are cumulative)

Every int64 is a valid id (emptiness is marked in slots, never in keys), except ``MISSING_ID``
(int64 min), which never gets a row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from towerrec.data.config import MISSING_ID, DynamicIdsConfig, SparseFeature

POOLED = 2**31 - 1  # row_last of a slot in the pool (>= any step: never picked as a victim again)
META_NAMES = ("step", "high_water", "dead", "inserted", "evicted", "expired", "overflow",
              "rebuilds", "pool", "n_main", "n_delta", "spare")  # fmt: skip
STEP, HIGH_WATER, DEAD, INSERTED, EVICTED, EXPIRED, OVERFLOW, REBUILDS, POOL, NMAIN, NDELTA, _ = range(12)
I64MAX = torch.iinfo(torch.int64).max


class TableTooSmall(ValueError):
    """One training step brought more distinct ids of a table than its capacity."""

    def __init__(self, table: str, distinct: int, capacity: int):
        super().__init__(f"table {table!r}: {distinct} distinct ids in one step, capacity {capacity}")
        self.table, self.distinct, self.capacity = table, distinct, capacity


def _merge_sorted(ak, ar, bk, br):
    """Merges two sorted key arrays with disjoint keys (and their slots): O(len) scatters."""
    pos_b = torch.searchsorted(ak, bk) + torch.arange(bk.numel(), device=bk.device)
    pos_a = torch.arange(ak.numel(), device=ak.device) + torch.searchsorted(bk, ak)
    keys = torch.empty(ak.numel() + bk.numel(), dtype=ak.dtype, device=ak.device)
    rows = torch.empty(keys.numel(), dtype=ar.dtype, device=ar.device)
    keys.index_copy_(0, pos_a, ak)
    keys.index_copy_(0, pos_b, bk)
    rows.index_copy_(0, pos_a, ar)
    rows.index_copy_(0, pos_b, br)
    return keys, rows


def _search(keys_sorted: torch.Tensor, slots: torch.Tensor, query: torch.Tensor):
    """(slot or -1, index or -1) of each query in a sorted key array."""
    n = keys_sorted.numel()
    if n == 0:
        missing = torch.full_like(query, -1)
        return missing, missing
    index = torch.searchsorted(keys_sorted, query).clamp_(max=n - 1)
    hit = keys_sorted.index_select(0, index) == query
    return torch.where(hit, slots.index_select(0, index).long(), -1), torch.where(hit, index, -1)


class IdMap(nn.Module):
    """The id → row map of one table (see the module docstring for the state and the step).

    Example::

        ids = IdMap(DynamicIdsConfig(capacity=1000))
        uniq, counts = torch.unique(batch_ids, return_counts=True)   # all ranks' ids of the step
        rows, reset = ids.update(uniq, counts)      # identical call on every rank (training only)
        batch_rows = rows[torch.searchsorted(uniq, batch_ids)]
        ids.lookup(other_ids)                       # evaluation: unknown → 0, nothing changes
    """

    def __init__(self, settings: DynamicIdsConfig, device: torch.device | str | None = None):
        super().__init__()
        capacity = settings.capacity
        self.capacity, self.policy, self.ttl_steps = capacity, settings.policy, settings.ttl_steps
        self.evict_chunk = max(1, capacity // 64) if settings.evict_chunk is None else settings.evict_chunk
        self.delta_capacity = (
            max(1024, capacity // 32) if settings.delta_capacity is None else settings.delta_capacity
        )
        self.slot_bits = max(1, (capacity - 1).bit_length())
        options = dict(device=device)
        self.register_buffer("row_key", torch.zeros(capacity, dtype=torch.int64, **options))
        self.register_buffer("row_count", torch.zeros(capacity, dtype=torch.int64, **options))
        self.register_buffer("row_last", torch.full((capacity,), -1, dtype=torch.int32, **options))
        self.register_buffer("pool", torch.zeros(self.evict_chunk, dtype=torch.int64, **options))
        self.register_buffer("main_key", torch.full((capacity,), I64MAX, dtype=torch.int64, **options))
        self.register_buffer("main_row", torch.full((capacity,), -1, dtype=torch.int32, **options))
        self.register_buffer(
            "delta_key", torch.full((self.delta_capacity,), I64MAX, dtype=torch.int64, **options)
        )
        self.register_buffer(
            "delta_row", torch.full((self.delta_capacity,), -1, dtype=torch.int32, **options)
        )
        self.register_buffer("meta", torch.zeros(len(META_NAMES), dtype=torch.int64, **options))

    # ------------------------------------------------------------------ lookups (pure)
    def _parts(self):
        n_main, n_delta = int(self.meta[NMAIN]), int(self.meta[NDELTA])
        return (
            self.main_key[:n_main],
            self.main_row[:n_main],
            self.delta_key[:n_delta],
            self.delta_row[:n_delta],
        )

    def _find_slots(self, keys: torch.Tensor) -> torch.Tensor:
        main_key, main_row, delta_key, delta_row = self._parts()
        in_main, _ = _search(main_key, main_row, keys)
        in_delta, _ = _search(delta_key, delta_row, keys)
        return torch.where(in_main >= 0, in_main, in_delta)  # a key removed from main may be back in delta

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (any shape, int64): ``1 + slot``, 0 for ids without a row. Pure."""
        slots = self._find_slots(ids.reshape(-1))
        return (slots + 1).clamp_(min=0).reshape(ids.shape)

    def live_slots(self) -> torch.Tensor:
        """Slots holding an id now, ascending."""
        high_water = int(self.meta[HIGH_WATER])
        return (self.row_last[:high_water] != POOLED).nonzero().squeeze(1)

    def sorted_snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted ids holding a row, their rows): the read-only form serving looks ids up in
        (``torch.searchsorted``; exportable)."""
        live = self.live_slots()
        keys, order = self.row_key.index_select(0, live).sort()
        return keys, live.index_select(0, order) + 1

    def stats(self) -> dict[str, int]:
        """Cumulative counters (``meta``) and ``live`` = ids holding a row now."""
        out = dict(zip(META_NAMES[:-1], self.meta.tolist()))
        out["live"] = out["high_water"] - out["pool"]
        return out

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def update(
        self, uniq: torch.Tensor, counts: torch.Tensor, table: str = ""
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step. ``uniq``: the sorted distinct ids of the step over all ranks,
        ``counts``: their occurrences (int64); identical arguments on every rank.

        Returns (rows of ``uniq`` after the update, 0 for ``MISSING_ID`` and overflow; the rows whose
        embedding and optimizer state must be re-initialised, sorted: rows given to new ids, and
        rows of TTL-expired ids that came back). Raises ``TableTooSmall`` when ``uniq`` holds more
        ids than the capacity (they could not all have rows)."""
        skip = int(uniq.numel() > 0 and bool(uniq[0] == MISSING_ID))  # int64 min sorts first
        uniq, counts = uniq[skip:], counts[skip:]
        if uniq.numel() > self.capacity:
            raise TableTooSmall(table, uniq.numel(), self.capacity)
        self.meta[STEP] += 1
        step = int(self.meta[STEP])
        slot = self._find_slots(uniq)
        hit = slot >= 0
        hit_slots = slot[hit]
        reset = [hit_slots[:0]]
        if self.policy == "ttl" and hit_slots.numel():
            stale = self.row_last.index_select(0, hit_slots).long() < step - self.ttl_steps
            if bool(stale.any()):  # expired but not yet reused: same row, a fresh start
                stale_slots = hit_slots[stale]
                self.row_count[stale_slots] = 0
                self.meta[EXPIRED] += stale_slots.numel()
                reset.append(stale_slots)
        self.row_count[hit_slots] += counts[hit]
        self.row_last[hit_slots] = step
        new_at = (~hit).nonzero().squeeze(1)
        new, new_counts = uniq[new_at], counts[new_at]
        rows = torch.where(hit, slot + 1, 0)
        if new.numel():
            high_water = int(self.meta[HIGH_WATER])
            num_fresh = min(new.numel(), self.capacity - high_water)
            fresh = torch.arange(high_water, high_water + num_fresh, device=uniq.device)
            self.row_last[fresh] = step  # taken this step: not victims
            self.meta[HIGH_WATER] += num_fresh
            need = new.numel() - num_fresh
            taken = fresh[:0]
            if need:
                taken = self._take_from_pool(need, step)
            got = num_fresh + taken.numel()
            if (
                got < new.numel()
            ):  # more new ids than evictable rows (TTL): most frequent first, then smallest
                order = torch.argsort(new_counts, descending=True, stable=True)[:got].sort().values
                self.meta[OVERFLOW] += new.numel() - got
                new, new_counts, new_at = new[order], new_counts[order], new_at[order]
            given = torch.cat([fresh, taken])
            self.row_key[given] = new
            self.row_count[given] = new_counts
            self.row_last[given] = step
            self.meta[INSERTED] += given.numel()
            self._index_insert(new, given)
            rows[new_at] = given + 1
            reset.append(given)
        resets = torch.cat(reset).sort().values + 1
        if skip:
            rows = torch.cat([rows.new_zeros(1), rows])
        return rows, resets

    def _take_from_pool(self, need: int, step: int) -> torch.Tensor:
        """``need`` free slots (fewer if not enough are evictable), lowest first. Refills the pool
        when short: evicts max(need - pool, evict_chunk) slots at once."""
        pooled = int(self.meta[POOL])
        pool = self.pool[:pooled]
        if pooled < need:
            victims = self._victims(max(need - pooled, self.evict_chunk), step)
            if victims.numel():
                self._index_remove(self.row_key.index_select(0, victims))
                self.meta[EVICTED] += victims.numel()
                self.row_last.index_fill_(0, victims, POOLED)
                self.row_count.index_fill_(0, victims, 0)
                pool = torch.cat([pool, victims]).sort().values
        taken, rest = pool[:need].clone(), pool[need:].clone()  # pool may be a view of self.pool
        self.pool[: rest.numel()] = rest
        self.meta[POOL] = rest.numel()
        return taken

    def _victims(self, k: int, step: int) -> torch.Tensor:
        """Up to ``k`` slots to evict, lowest score first, sorted. Never slots seen this step (pooled
        ones count as seen), nor for ``ttl`` slots seen within ``ttl_steps``. The score is packed
        with the slot index, so ties go to the lowest slot and topk's selection is unique."""
        last = self.row_last.long()
        if self.policy == "lfu":
            primary = self.row_count.clamp(max=(1 << (62 - self.slot_bits)) - 1)
        else:  # lru, ttl: least recently seen first
            primary = last.clamp(min=0)
        score = (primary << self.slot_bits) | torch.arange(self.capacity, device=last.device)
        blocked = last >= (step if self.policy != "ttl" else step - self.ttl_steps)
        score = score.masked_fill(blocked, I64MAX)
        values, index = torch.topk(score, min(k, self.capacity), largest=False, sorted=False)
        return index[values != I64MAX].sort().values

    def _index_remove(self, keys: torch.Tensor) -> None:
        main_key, main_row, delta_key, delta_row = self._parts()
        in_main, main_index = _search(main_key, main_row, keys)
        found = in_main >= 0
        self.main_row.index_fill_(0, main_index[found], -1)
        self.meta[DEAD] += int(found.sum())
        _, delta_index = _search(delta_key, delta_row, keys[~found])
        self.delta_row.index_fill_(0, delta_index[delta_index >= 0], -1)

    def _index_insert(self, keys: torch.Tensor, slots: torch.Tensor) -> None:
        """Sorted distinct keys known to be absent: merged into the delta (O(D)), or, when it would
        overflow, main (removed keys dropped) + delta + keys into main (O(C))."""
        main_key, main_row, delta_key, delta_row = self._parts()
        slots = slots.to(torch.int32)
        kept = delta_row >= 0
        delta_key, delta_row = delta_key[kept], delta_row[kept]
        if delta_key.numel() + keys.numel() <= self.delta_capacity:
            merged_keys, merged_rows = _merge_sorted(delta_key, delta_row, keys, slots)
            self.delta_key[: merged_keys.numel()] = merged_keys
            self.delta_row[: merged_keys.numel()] = merged_rows
            self.meta[NDELTA] = merged_keys.numel()
            return
        live = main_row >= 0
        merged_keys, merged_rows = _merge_sorted(main_key[live], main_row[live], delta_key, delta_row)
        merged_keys, merged_rows = _merge_sorted(merged_keys, merged_rows, keys, slots)
        self.main_key[: merged_keys.numel()] = merged_keys
        self.main_row[: merged_keys.numel()] = merged_rows
        self.meta[NMAIN], self.meta[NDELTA], self.meta[DEAD] = merged_keys.numel(), 0, 0
        self.meta[REBUILDS] += 1

    def _index_rebuild(self) -> None:
        live = self.live_slots()
        keys, order = self.row_key.index_select(0, live).sort()
        self.main_key.fill_(I64MAX)
        self.main_row.fill_(-1)
        self.delta_key.fill_(I64MAX)
        self.delta_row.fill_(-1)
        self.meta[NMAIN], self.meta[NDELTA], self.meta[DEAD] = 0, 0, 0
        if keys.numel():
            self._index_insert(keys, live.index_select(0, order))

    @torch.no_grad()
    def load_smaller(self, state: dict[str, torch.Tensor]) -> None:
        """Loads the state of a map of smaller (or equal) capacity, as a warm start onto a grown
        table does: every id keeps its row (rows 1..old capacity), the counters go on, the rows
        beyond are free. Raises ValueError when the state does not fit (a larger capacity, or more
        evicted slots waiting for reuse than this map's ``evict_chunk``)."""
        old_capacity = state["row_key"].numel()
        pooled = int(state["meta"][POOL])
        if old_capacity > self.capacity:
            raise ValueError(
                f"capacity: the saved map holds {old_capacity} rows, more than {self.capacity}: a table cannot shrink "
                "(ids hold rows up to the old capacity)"
            )
        if pooled > self.pool.numel():
            raise ValueError(
                f"evict_chunk: the saved map has {pooled} evicted rows waiting for reuse, more than "
                f"evict_chunk {self.pool.numel()}: keep evict_chunk >= {pooled}"
            )
        for name in ("row_key", "row_count", "row_last"):
            buffer = getattr(self, name)
            buffer.fill_(-1 if name == "row_last" else 0)
            buffer[:old_capacity] = state[name].to(buffer.device)
        self.pool.zero_()
        self.pool[:pooled] = state["pool"][:pooled].to(self.pool.device)
        self.meta.copy_(state["meta"].to(self.meta.device))
        self._index_rebuild()


class DynamicIds(nn.Module):
    """The id maps of every ``id_mapping: dynamic`` table (features sharing a table share one)
    and the batch-level steps the trainer composes around its one all-gather per step::

        payload = ids.step_counts([batch.sparse, batch.sequences], batch.row_id >= 0)   # (3, N)
        assigned, resets = ids.update(all_ranks(payload))      # the same on every rank
        sparse = ids.remap(batch.sparse, assigned)             # raw ids → rows (training)
        sparse = ids.lookup(batch.sparse)                      # evaluation: pure

    ``epoch_start`` keeps the counters at the first step of the current epoch (``epoch``), so a
    resumed epoch reports the same totals as an uninterrupted one (both are in the checkpoint).
    """

    def __init__(self, tables: dict[str, DynamicIdsConfig], feature_tables: dict[str, str]):
        super().__init__()
        self.settings = dict(tables)
        self.maps = nn.ModuleDict({table: IdMap(settings) for table, settings in tables.items()})
        self.table_names = list(tables)
        self.feature_tables = dict(feature_tables)
        self.register_buffer("epoch_start", torch.zeros(len(tables), len(META_NAMES), dtype=torch.int64))
        self.register_buffer("epoch", torch.full((1,), -1, dtype=torch.int64))

    @classmethod
    def of(cls, sparse: Sequence[SparseFeature]) -> DynamicIds | None:
        """The maps of ``data.sparse``'s dynamic tables (None when there are none)."""
        dynamic = [f for f in sparse if f.dynamic is not None]
        if not dynamic:
            return None
        return cls({f.table_name: f.dynamic for f in dynamic}, {f.name: f.table_name for f in dynamic})

    def features_of(self, table: str) -> list[str]:
        return [name for name, owner in self.feature_tables.items() if owner == table]

    # ------------------------------------------------------------------ training step
    def _table_values(
        self, jagged: Sequence[KeyedJaggedTensor | None], real_rows: torch.Tensor | None
    ) -> list[list[torch.Tensor]]:
        """Per table, the raw ids of its features in ``jagged`` (only those of ``real_rows``)."""
        per_table: list[list[torch.Tensor]] = [[] for _ in self.table_names]
        for kjt in jagged:
            if kjt is None:
                continue
            offsets = kjt.offset_per_key()
            values = kjt.values()
            lengths = kjt.lengths()
            stride = kjt.stride()
            for index, key in enumerate(kjt.keys()):
                table = self.feature_tables.get(key)
                if table is None:
                    continue
                part = values[offsets[index] : offsets[index + 1]]
                if real_rows is not None:
                    part = part[
                        torch.repeat_interleave(real_rows, lengths[index * stride : (index + 1) * stride])
                    ]
                per_table[self.table_names.index(table)].append(part)
        return per_table

    def step_counts(
        self, jagged: Sequence[KeyedJaggedTensor | None], real_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(3, N) int64: (table index, id, count) of this rank's distinct ids per table, counting
        only the rows where ``real_rows`` (B,) is true (padding rows never change a map)."""
        parts = []
        for index, values in enumerate(self._table_values(jagged, real_rows)):
            if not values:
                continue
            uniq, counts = torch.unique(torch.cat(values), return_counts=True)
            parts.append(torch.stack([torch.full_like(uniq, index), uniq, counts]))
        device = self.epoch.device
        return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(
        self, gathered: torch.Tensor
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
        """Applies one training step: ``gathered`` (3, N) is every rank's ``step_counts``
        concatenated (any order). Returns, per table, (sorted global ids, their rows) and the rows
        to re-initialise."""
        assigned, resets = {}, {}
        for index, table in enumerate(self.table_names):
            mine = gathered[0] == index
            ids, counts = gathered[1][mine], gathered[2][mine]
            uniq, inverse = torch.unique(ids, return_inverse=True)
            total = torch.zeros_like(uniq).scatter_add_(0, inverse, counts)
            rows, reset = self.maps[table].update(uniq, total, table)
            assigned[table], resets[table] = (uniq, rows), reset
        return assigned, resets

    def remap(
        self, kjt: KeyedJaggedTensor | None, assigned: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> KeyedJaggedTensor | None:
        """``kjt`` with the raw ids of dynamic features replaced by their rows after ``update``
        (a padding row's id that is not in the step's ids is looked up)."""

        def rows_of(table: str, values: torch.Tensor) -> torch.Tensor:
            uniq, rows = assigned[table]
            if uniq.numel() == 0:
                return self.maps[table].lookup(values)
            position = torch.searchsorted(uniq, values).clamp_(max=uniq.numel() - 1)
            found = rows.index_select(0, position)
            hit = uniq.index_select(0, position) == values
            return found if bool(hit.all()) else torch.where(hit, found, self.maps[table].lookup(values))

        return self._replace(kjt, rows_of)

    def lookup(self, kjt: KeyedJaggedTensor | None) -> KeyedJaggedTensor | None:
        """``kjt`` with the raw ids of dynamic features replaced by their rows; changes nothing."""
        return self._replace(kjt, lambda table, values: self.maps[table].lookup(values))

    def rows_of(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows of raw ids of ``feature`` (pure; serving)."""
        return self.maps[self.feature_tables[feature]].lookup(ids)

    def _replace(self, kjt: KeyedJaggedTensor | None, rows_of) -> KeyedJaggedTensor | None:
        if kjt is None or not any(key in self.feature_tables for key in kjt.keys()):
            return kjt
        offsets = kjt.offset_per_key()
        values = kjt.values().clone()
        for index, key in enumerate(kjt.keys()):
            table = self.feature_tables.get(key)
            if table is not None and offsets[index + 1] > offsets[index]:
                start, end = offsets[index], offsets[index + 1]
                values[start:end] = rows_of(table, values[start:end])
        return KeyedJaggedTensor(
            keys=kjt.keys(),
            values=values,
            lengths=kjt.lengths(),
            weights=kjt.weights_or_none(),
            stride=kjt.stride(),
        )

    # ------------------------------------------------------------------ counters
    def begin_epoch(self, epoch: int) -> None:
        """Keeps the counters at the first training step of ``epoch`` (once per epoch)."""
        if int(self.epoch) != epoch:
            self.epoch.fill_(epoch)
            for index, table in enumerate(self.table_names):
                self.epoch_start[index] = self.maps[table].meta

    def epoch_stats(self) -> dict[str, dict[str, float]]:
        """Per table, since the current epoch's first step: ``inserted``, ``evicted``, ``expired``,
        ``overflow`` (new ids left on row 0); and now: ``live`` ids holding a row, ``fill`` = live /
        capacity."""
        out = {}
        for index, table in enumerate(self.table_names):
            now = self.maps[table].stats()
            start = dict(zip(META_NAMES, self.epoch_start[index].tolist()))
            out[table] = {
                **{
                    name: float(now[name] - start[name])
                    for name in ("inserted", "evicted", "expired", "overflow")
                },
                "live": float(now["live"]),
                "fill": now["live"] / self.maps[table].capacity,
            }
        return out

    def totals(self) -> dict[str, dict[str, int]]:
        """Per table, the cumulative counters since training began (``IdMap.stats``)."""
        return {table: self.maps[table].stats() for table in self.table_names}
