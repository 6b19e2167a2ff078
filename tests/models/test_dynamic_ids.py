"""The id map of ``id_mapping: dynamic`` tables (towerrec.models.dynamic_ids): collision-free rows,
the eviction policies, purity of lookups, replicas fed in any order, exact resume, growth, and the
batch-level steps (per-rank counts → one global update → rows) on KeyedJaggedTensors."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from towerrec.data.config import MISSING_ID, DynamicIdsConfig, SparseFeature
from towerrec.models.dynamic_ids import POOLED, DynamicIds, IdMap, TableTooSmall

I64 = torch.iinfo(torch.int64)


def idmap(capacity: int, policy: str = "lru", **settings) -> IdMap:
    return IdMap(DynamicIdsConfig(capacity=capacity, policy=policy, **settings))


def train(ids_map: IdMap, ids: torch.Tensor) -> torch.Tensor:
    """One training step on ``ids`` (a single process): rows of ``ids``."""
    uniq, counts = torch.unique(ids, return_counts=True)
    rows, _ = ids_map.update(uniq, counts)
    return rows[torch.searchsorted(uniq, ids)]


def check_invariants(m: IdMap) -> None:
    high_water = int(m.meta[1])
    live = m.live_slots()
    keys = m.row_key[live]
    assert torch.unique(keys).numel() == live.numel(), "an id holds two rows"
    assert torch.equal(m.lookup(keys), live + 1), "a live id does not find its row"
    pooled = m.pool[: int(m.meta[8])]
    assert torch.equal(pooled, (m.row_last[:high_water] == POOLED).nonzero().squeeze(1)), "pool mismatch"
    main_key, main_row, delta_key, delta_row = m._parts()
    assert bool((main_key[1:] > main_key[:-1]).all()) and bool((delta_key[1:] > delta_key[:-1]).all())
    assert int((main_row >= 0).sum()) + int((delta_row >= 0).sum()) == live.numel()


def test_rows_are_collision_free_until_full_and_every_int64_but_missing_is_an_id():
    m = idmap(1000)
    ids = torch.cat(
        [torch.tensor([-1, 0, I64.min + 1, I64.max]), torch.randint(-(2**62), 2**62, (996,))]
    ).unique()
    rows = train(m, ids)
    assert torch.equal(rows.sort().values, torch.arange(1, ids.numel() + 1))
    assert m.stats()["live"] == ids.numel()
    assert int(train(m, torch.tensor([MISSING_ID, ids[0]]))[0]) == 0  # missing: row 0, never inserted
    assert m.stats()["inserted"] == ids.numel()
    check_invariants(m)
    keys, key_rows = m.sorted_snapshot()
    assert torch.equal(keys, ids) and torch.equal(key_rows, m.lookup(ids))


def test_lookup_never_changes_the_map():
    m = idmap(100)
    train(m, torch.arange(50))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.lookup(torch.tensor([10**12, 3])).tolist() == [0, int(m.lookup(torch.tensor([3])))]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_lru_keeps_the_hot_ids_rows_and_evicts_the_oldest():
    m = idmap(200, "lru", evict_chunk=1)
    hot = torch.arange(10) * 7919
    first = train(m, hot).clone()
    for step in range(40):
        train(m, torch.cat([hot, 10**9 + step * 50 + torch.arange(50)]))
        assert torch.equal(m.lookup(hot), first)
        check_invariants(m)
    stats = m.stats()
    assert stats["live"] == 200 and stats["evicted"] == 10 + 40 * 50 - 200 and stats["overflow"] == 0
    assert bool((m.lookup(10**9 + 39 * 50 + torch.arange(50)) > 0).all())  # the newest are in
    assert bool((m.lookup(10**9 + torch.arange(50)) == 0).all())  # the oldest are out


def test_lfu_evicts_the_least_counted_and_never_an_id_of_the_step():
    m = idmap(4, "lfu", evict_chunk=1)
    train(m, torch.tensor([1, 1, 1, 2, 2, 3, 4, 4, 4, 4]))
    train(m, torch.tensor([5]))  # evicts 3 (count 1)
    assert int(m.lookup(torch.tensor([3]))) == 0 and int(m.lookup(torch.tensor([5]))) > 0
    rows = train(m, torch.tensor([10, 11, 12, 13]))
    assert sorted(rows.tolist()) == [1, 2, 3, 4]  # all 4 of the step get the 4 rows


def test_ttl_expires_unseen_ids_and_overflows_when_nothing_expired():
    m = idmap(3, "ttl", ttl_steps=2, evict_chunk=1)
    train(m, torch.tensor([1, 2, 3]))
    row_of_2 = int(m.lookup(torch.tensor([2])))
    train(m, torch.tensor([1]))
    train(m, torch.tensor([1]))
    uniq, counts = torch.unique(torch.tensor([2, 9]), return_counts=True)
    rows, reset = m.update(uniq, counts)  # step 4: 2 expired (last seen 1 < 4 - 2) but kept its row
    assert m.stats()["expired"] == 1 and int(rows[0]) == row_of_2 and row_of_2 in reset.tolist()
    assert int(m.lookup(torch.tensor([3]))) == 0 and int(m.lookup(torch.tensor([9]))) > 0  # 9 took 3's row
    rows = train(m, torch.tensor([1, 2, 20]))  # 9 was seen within the ttl: nothing to evict, 20 overflows
    assert rows.tolist()[-1] == 0 and m.stats()["overflow"] == 1


def test_a_step_with_more_distinct_ids_than_rows_is_refused():
    m = idmap(4)
    with pytest.raises(TableTooSmall, match="5 distinct ids in one step, capacity 4"):
        m.update(torch.arange(5), torch.ones(5, dtype=torch.int64), "t_user")


@pytest.mark.parametrize("policy,chunk", [("lru", 1), ("lfu", None), ("ttl", 300)])
def test_replicas_fed_in_any_order_are_bitwise_equal_and_a_reload_resumes_exactly(policy, chunk):
    settings = dict(capacity=5000, policy=policy, evict_chunk=chunk, ttl_steps=3 if policy == "ttl" else None)
    a, b, c = IdMap(DynamicIdsConfig(**settings)), IdMap(DynamicIdsConfig(**settings)), None
    generator = torch.Generator().manual_seed(1)
    for step in range(60):
        batch = torch.randint(0, 40000, (3000,), generator=generator) * 1_000_003
        uniq, counts = torch.unique(batch, return_counts=True)
        rows, _ = a.update(uniq, counts)
        assert torch.equal(rows, a.lookup(uniq)) or policy == "ttl"
        b.update(*torch.unique(batch.flip(0), return_counts=True))
        if step == 30:
            c = IdMap(DynamicIdsConfig(**settings))
            c.load_state_dict(a.state_dict())
        if step > 30:
            c.update(uniq, counts)
        if step % 10 == 0:
            check_invariants(a)
    check_invariants(a)
    for x, y, z in zip(a.state_dict().values(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert a.stats()["rebuilds"] >= 1 and a.stats()["evicted"] > 0


def test_chunked_eviction_uses_the_pool_and_keeps_the_hot_rows():
    m = idmap(6400, "lru", evict_chunk=500)
    generator = torch.Generator().manual_seed(3)
    hot = torch.arange(100) * 31337
    first, pooled = train(m, hot).clone(), False
    for _ in range(80):
        train(m, torch.cat([hot, torch.randint(0, 30000, (400,), generator=generator)]))
        pooled |= m.stats()["pool"] > 0
        assert torch.equal(m.lookup(hot), first)
    check_invariants(m)
    assert pooled and m.stats()["evicted"] > 0


def test_a_grown_map_keeps_every_ids_row_and_a_smaller_one_is_refused():
    small = idmap(300, "lru", evict_chunk=16)
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        train(small, torch.randint(0, 2000, (200,), generator=generator))
    keys, rows = small.sorted_snapshot()
    grown = idmap(1000, "lru", evict_chunk=16)
    grown.load_smaller(small.state_dict())
    assert torch.equal(grown.lookup(keys), rows)
    check_invariants(grown)
    new_rows = train(grown, torch.arange(10**6, 10**6 + 700))  # the new rows are free
    assert bool((new_rows > 300).all()) and grown.stats()["evicted"] == small.stats()["evicted"]
    assert torch.equal(grown.lookup(keys), rows)
    with pytest.raises(ValueError, match="cannot shrink"):
        idmap(100).load_smaller(small.state_dict())


def kjt(features: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    keys = list(features)
    values = [v for key in keys for row in features[key] for v in row]
    lengths = [len(row) for key in keys for row in features[key]]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
        stride=len(features[keys[0]]),
    )


def dynamic_ids() -> DynamicIds:
    features = [
        SparseFeature(name="user", id_mapping="dynamic", dynamic=DynamicIdsConfig(capacity=8)),
        SparseFeature(name="item", table="t_item", id_mapping="dynamic", dynamic=DynamicIdsConfig(capacity=6)),
        SparseFeature(name="seen", table="t_item", multi_hot=True, id_mapping="dynamic",
                      dynamic=DynamicIdsConfig(capacity=6)),
        SparseFeature(name="region"),
    ]  # fmt: skip
    return DynamicIds.of(features)


def test_ranks_holding_halves_of_a_batch_update_the_maps_as_one_process_does():
    users = [[-5], [2**40], [-5], [7]]
    items = [[3], [3], [9], [MISSING_ID]]
    seen = [[9, 11], [], [3], [12, 12]]
    regions = [[1], [2], [1], [0]]
    batch = kjt({"user": users, "item": items, "seen": seen, "region": regions})
    halves = [kjt({"user": users[a:b], "item": items[a:b], "seen": seen[a:b], "region": regions[a:b]})
              for a, b in ((0, 2), (2, 4))]  # fmt: skip
    whole, split = dynamic_ids(), dynamic_ids()
    assigned, resets = whole.update(whole.step_counts([batch]))
    mapped = whole.remap(batch, assigned)
    gathered = torch.cat([split.step_counts([half]) for half in halves], dim=1)
    split_assigned, split_resets = split.update(gathered)
    mapped_halves = [split.remap(half, split_assigned) for half in halves]
    for x, y in zip(whole.state_dict().values(), split.state_dict().values()):
        assert torch.equal(x, y)
    assert torch.equal(
        mapped.values(), torch.cat([h.values()[:2] for h in mapped_halves] + [h.values()[2:4] for h in mapped_halves]
                                   + [h.values()[4:-2] for h in mapped_halves] + [h.values()[-2:] for h in mapped_halves])
    )  # fmt: skip
    by_key = mapped.to_dict()
    assert by_key["region"].values().tolist() == [1, 2, 1, 0]  # not a dynamic feature: untouched
    user_rows = by_key["user"].values().tolist()
    assert user_rows[0] == user_rows[2] and len({user_rows[0], user_rows[1], user_rows[3]}) == 3
    item_rows = by_key["item"].values().tolist()
    seen_rows = by_key["seen"].values().tolist()
    assert item_rows[3] == 0 and item_rows[0] == item_rows[1] == seen_rows[2] and item_rows[2] == seen_rows[0]
    assert seen_rows[3] == seen_rows[4] and min(user_rows + item_rows[:3] + seen_rows) >= 1
    assert resets["t_user"].tolist() == [1, 2, 3] and resets["t_item"].tolist() == [1, 2, 3, 4]
    assert torch.equal(resets["t_item"], split_resets["t_item"])
    assert torch.equal(whole.lookup(batch).values(), mapped.values())  # eval sees the same rows


def test_padding_rows_ids_change_nothing_and_are_looked_up():
    batch = kjt(
        {"user": [[1], [2], [99]], "item": [[5], [5], [6]], "seen": [[], [], []], "region": [[0], [0], [0]]}
    )
    ids = dynamic_ids()
    assigned, _ = ids.update(ids.step_counts([batch], torch.tensor([True, True, False])))
    assert ids.totals()["t_user"]["inserted"] == 2 and ids.totals()["t_item"]["inserted"] == 1
    mapped = ids.remap(batch, assigned).to_dict()
    assert mapped["user"].values().tolist()[2] == 0 and mapped["item"].values().tolist()[2] == 0


def test_epoch_counters_start_at_each_epochs_first_step():
    ids = dynamic_ids()
    ids.begin_epoch(0)
    ids.update(
        ids.step_counts(
            [kjt({"user": [[1], [2]], "item": [[1], [1]], "seen": [[], []], "region": [[0], [0]]})]
        )
    )
    ids.begin_epoch(0)
    ids.update(ids.step_counts([kjt({"user": [[3]], "item": [[1]], "seen": [[]], "region": [[0]]})]))
    assert ids.epoch_stats()["t_user"]["inserted"] == 3
    ids.begin_epoch(1)
    ids.update(ids.step_counts([kjt({"user": [[4]], "item": [[1]], "seen": [[]], "region": [[0]]})]))
    stats = ids.epoch_stats()["t_user"]
    assert stats["inserted"] == 1 and stats["live"] == 4 and stats["fill"] == 0.5
