"""Deterministic train/val/test assignment of streamed rows (codes 0 = train, 1 = val, 2 = test).

Rules (``data.prepare.split``):

- ``random``: a seeded hash of the source row index: stable under any chunking.
- ``user``: a seeded hash of the user id: all rows of a user land in one split.
- ``time``: a global time cut: rows at or after the ``1 - test_fraction`` quantile of time are
  test, rows at or after the ``1 - test_fraction - val_fraction`` quantile are val. Quantiles come
  from a seeded sample of at most 1M timestamps (exact below that). ``cut_time`` fixes the test
  cut instead (val is then a hashed ``val_fraction`` of the earlier rows). Without a time column,
  the row order is the time (Criteo's files are ordered by time).
- ``given``: the input's own split (``split_files`` or ``split_column``): every row stays in it.
- ``leave_last_out``: each user's last interaction (latest time, then latest row) is test and the
  one before it is val (when ``val_fraction > 0``); users need 2 (3) interactions to give up one
  to test (val). Memory: O(number of users).

Example::

    splitter = make_splitter("random", seed=0, val_fraction=0.1, test_fraction=0.1)
    codes = splitter.assign(SplitKeys(row_index=np.arange(1000)))    # int8 array of 0/1/2
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from towerrec.data.cleaning import BottomKSample, mix64

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")
RULES = ("random", "time", "leave_last_out", "user", "given")


@dataclass
class SplitKeys:
    """Per-row keys of one chunk: source row index always, user and time where the data has them."""

    row_index: np.ndarray
    user: np.ndarray | None = None
    time: np.ndarray | None = None
    given: np.ndarray | None = None
    """Split codes the input states itself (pre-split files or a split column)."""


def unit_hash(keys: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """A seeded hash of int64 keys mapped to uniform floats in [0, 1)."""
    key_salt = mix64(
        np.array([seed % 2**64], dtype=np.uint64) ^ mix64(np.array([salt + 1], dtype=np.uint64))
    )[0]
    mixed = mix64(np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64) ^ key_salt)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def codes_from_unit(unit: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    codes = np.full(len(unit), TRAIN, dtype=np.int8)
    codes[unit < test_fraction + val_fraction] = VAL
    codes[unit < test_fraction] = TEST
    return codes


class GivenSplit:
    """The split the input states (``data.prepare.split_files`` or ``split_column``): rows stay put.
    Input without validation rows (``carve_val``: e.g. train and test files only) gives a seeded
    ``val_fraction`` of its training rows to val, as the other rules do; test rows never move."""

    needs_fit = False

    def __init__(self, seed: int = 0, val_fraction: float = 0.0, carve_val: bool = False):
        self.seed, self.val_fraction, self.carve_val = seed, val_fraction, carve_val

    def assign(self, keys: SplitKeys) -> np.ndarray:
        assert keys.given is not None, "a given split needs split codes"
        if not (self.carve_val and self.val_fraction):
            return keys.given
        codes = keys.given.copy()
        held_out = (codes == TRAIN) & (unit_hash(keys.row_index, self.seed, salt=2) < self.val_fraction)
        codes[held_out] = VAL
        return codes


class RandomSplit:
    """Row-level random split by a hash of (row index, seed)."""

    needs_fit = False

    def __init__(self, seed: int, val_fraction: float, test_fraction: float):
        self.seed, self.val_fraction, self.test_fraction = seed, val_fraction, test_fraction

    def assign(self, keys: SplitKeys) -> np.ndarray:
        return codes_from_unit(unit_hash(keys.row_index, self.seed), self.val_fraction, self.test_fraction)


class UserSplit(RandomSplit):
    """Every row of a user goes to the split chosen by a hash of (user id, seed)."""

    def assign(self, keys: SplitKeys) -> np.ndarray:
        assert keys.user is not None, "user split needs the user column"
        return codes_from_unit(unit_hash(keys.user, self.seed, salt=1), self.val_fraction, self.test_fraction)


class TimeSplit:
    """Global time cut at quantiles of time (or at ``cut_time``)."""

    def __init__(self, seed: int, val_fraction: float, test_fraction: float, cut_time: float | None = None):
        self.seed, self.val_fraction, self.test_fraction = seed, val_fraction, test_fraction
        self.cut_time = cut_time
        self.needs_fit = cut_time is None
        self.sample = BottomKSample(seed=seed)
        self.val_cut = self.test_cut = None

    @staticmethod
    def _time(keys: SplitKeys) -> np.ndarray:
        return keys.time if keys.time is not None else keys.row_index

    def fit(self, keys: SplitKeys) -> None:
        self.sample.add(self._time(keys), keys.row_index)

    def finish_fit(self) -> None:
        if len(self.sample.values) == 0:
            return
        self.val_cut, self.test_cut = self.sample.quantile(
            [1 - self.test_fraction - self.val_fraction, 1 - self.test_fraction]
        )

    def assign(self, keys: SplitKeys) -> np.ndarray:
        time = self._time(keys).astype(np.float64)
        if self.cut_time is not None:
            codes = codes_from_unit(unit_hash(keys.row_index, self.seed), self.val_fraction, 0.0)
            codes[time >= self.cut_time] = TEST
            return codes
        codes = np.full(len(time), TRAIN, dtype=np.int8)
        if self.test_cut is None:
            return codes
        if self.val_fraction > 0:
            codes[time >= self.val_cut] = VAL
        if self.test_fraction > 0:
            codes[time >= self.test_cut] = TEST
        return codes


class LeaveLastOut:
    """Per user: last interaction → test, the one before → val (if ``val_fraction > 0``).

    ``fit`` keeps, per user, the count and the two latest (time, row index) pairs in sorted numpy
    arrays, merged chunk by chunk (vectorized, O(users) memory).
    """

    needs_fit = True

    def __init__(self, val_fraction: float):
        self.with_val = val_fraction > 0
        empty = np.zeros(0, dtype=np.int64)
        self.users = empty
        self.counts = empty
        self.last = (empty, empty)  # (time, row)
        self.previous = (empty, empty)

    def fit(self, keys: SplitKeys) -> None:
        assert keys.user is not None, "leave_last_out needs the user column"
        if len(keys.user) == 0:
            return
        time = keys.time if keys.time is not None else keys.row_index
        none = np.full(len(self.users), np.iinfo(np.int64).min)
        users = np.concatenate([keys.user, self.users, self.users])
        times = np.concatenate(
            [time.astype(np.int64), self.last[0], np.where(self.counts > 1, self.previous[0], none)]
        )
        rows = np.concatenate([keys.row_index, self.last[1], np.where(self.counts > 1, self.previous[1], -1)])
        weights = np.concatenate(
            [np.ones(len(keys.user), np.int64), self.counts, np.zeros(len(self.users), np.int64)]
        )
        valid = rows >= 0
        users, times, rows, weights = users[valid], times[valid], rows[valid], weights[valid]
        order = np.lexsort((rows, times, users))
        users, times, rows = users[order], times[order], rows[order]
        ends = np.flatnonzero(np.append(users[1:] != users[:-1], True))
        starts = np.concatenate([[0], ends[:-1] + 1])
        self.users = users[ends]
        self.counts = np.add.reduceat(weights[order], starts)
        self.last = (times[ends], rows[ends])
        has_previous = ends > starts
        prev = np.where(has_previous, ends - 1, ends)
        self.previous = (np.where(has_previous, times[prev], 0), np.where(has_previous, rows[prev], -1))

    def finish_fit(self) -> None:
        pass

    def assign(self, keys: SplitKeys) -> np.ndarray:
        codes = np.full(len(keys.row_index), TRAIN, dtype=np.int8)
        if len(self.users) == 0:
            return codes
        pos = np.minimum(np.searchsorted(self.users, keys.user), len(self.users) - 1)
        known = self.users[pos] == keys.user
        counts = np.where(known, self.counts[pos], 0)
        if self.with_val:
            codes[known & (counts >= 3) & (self.previous[1][pos] == keys.row_index)] = VAL
        codes[known & (counts >= 2) & (self.last[1][pos] == keys.row_index)] = TEST
        return codes


def make_splitter(
    rule: str,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    cut_time: float | None = None,
    has_user: bool = True,
    given_has_val: bool = True,
) -> GivenSplit | RandomSplit | UserSplit | TimeSplit | LeaveLastOut:
    """The splitter for ``data.prepare.split``; errors name the key and the allowed values."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"data.prepare.{key}: must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"data.prepare: val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}"
        )
    if rule not in RULES:
        raise ValueError(f"data.prepare.split: {rule!r} is not one of {', '.join(RULES)}")
    if rule in ("user", "leave_last_out") and not has_user:
        raise ValueError(f"data.prepare.split: {rule!r} needs a user column (set data.prepare.user_column)")
    if rule == "given":
        return GivenSplit(seed, val_fraction, carve_val=not given_has_val)
    if rule == "random":
        return RandomSplit(seed, val_fraction, test_fraction)
    if rule == "user":
        return UserSplit(seed, val_fraction, test_fraction)
    if rule == "time":
        return TimeSplit(seed, val_fraction, test_fraction, cut_time)
    return LeaveLastOut(val_fraction)
