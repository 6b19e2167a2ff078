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
  one before it is val (when ``val_fraction > 0``), the rest train; users with fewer than
  ``min_events_per_user`` interactions (default 3, the SASRec/BERT4Rec/HSTU protocol) keep them
  all in train. With an interaction flag (``data.prepare.interaction_column``) only flagged rows
  are interactions, and an unflagged row (a sampled or shown-but-not-chosen item) goes to the
  split of its user's held-out interaction at the same time, else to train. Memory: O(number
  of users).

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
    interaction: np.ndarray | None = None
    """True where the row is an interaction (``data.prepare.interaction_column`` non-zero); None:
    every row is one."""


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
    """Per user with at least ``min_events`` interactions: the last one → test, the one before →
    val (if ``val_fraction > 0``), the rest → train; other users → train. Order: time, then row.

    ``fit`` keeps, per user, the count and the two latest (time, row index) pairs in sorted numpy
    arrays, merged chunk by chunk (vectorized, O(users) memory). Rows that are not interactions
    (``SplitKeys.interaction`` false) are not counted; ``assign`` sends them to the split of the
    held-out interaction at their time (test before val), else to train.
    """

    needs_fit = True

    def __init__(self, val_fraction: float, min_events: int = 3):
        self.with_val = val_fraction > 0
        self.min_events = min_events
        empty = np.zeros(0, dtype=np.int64)
        self.users = empty
        self.counts = empty
        self.last = (np.zeros(0), empty)  # (time, row)
        self.previous = (np.zeros(0), empty)

    @staticmethod
    def _time(keys: SplitKeys) -> np.ndarray:
        return (keys.time if keys.time is not None else keys.row_index).astype(np.float64)

    def fit(self, keys: SplitKeys) -> None:
        assert keys.user is not None, "leave_last_out needs the user column"
        chosen = np.ones(len(keys.row_index), bool) if keys.interaction is None else keys.interaction
        new_users, new_times, new_rows = keys.user[chosen], self._time(keys)[chosen], keys.row_index[chosen]
        if len(new_users) == 0:
            return
        has_previous = self.counts > 1
        users = np.concatenate([new_users, self.users, self.users[has_previous]])
        times = np.concatenate([new_times, self.last[0], self.previous[0][has_previous]])
        rows = np.concatenate([new_rows, self.last[1], self.previous[1][has_previous]])
        weights = np.concatenate(
            [np.ones(len(new_users), np.int64), self.counts, np.zeros(int(has_previous.sum()), np.int64)]
        )
        order = np.lexsort((rows, times, users))
        users, times, rows = users[order], times[order], rows[order]
        ends = np.flatnonzero(np.append(users[1:] != users[:-1], True))
        starts = np.concatenate([[0], ends[:-1] + 1])
        self.users = users[ends]
        self.counts = np.add.reduceat(weights[order], starts)
        self.last = (times[ends], rows[ends])
        previous = np.where(ends > starts, ends - 1, ends)
        self.previous = (times[previous], np.where(ends > starts, rows[previous], -1))

    def finish_fit(self) -> None:
        pass

    @property
    def num_held_out_users(self) -> int:
        """Users with enough interactions to give their last ones to test (and val)."""
        return int((self.counts >= self.min_events).sum())

    def assign(self, keys: SplitKeys) -> np.ndarray:
        codes = np.full(len(keys.row_index), TRAIN, dtype=np.int8)
        if len(self.users) == 0:
            return codes
        pos = np.minimum(np.searchsorted(self.users, keys.user), len(self.users) - 1)
        held_out = (self.users[pos] == keys.user) & (self.counts[pos] >= self.min_events)
        if keys.interaction is None:
            is_val = self.previous[1][pos] == keys.row_index
            is_test = self.last[1][pos] == keys.row_index
        else:  # a row that is no interaction follows the held-out interaction at its time
            time = self._time(keys)
            flagged = keys.interaction
            is_val = np.where(flagged, self.previous[1][pos] == keys.row_index, self.previous[0][pos] == time)
            is_test = np.where(flagged, self.last[1][pos] == keys.row_index, self.last[0][pos] == time)
        if self.with_val:
            codes[held_out & is_val] = VAL
        codes[held_out & is_test] = TEST
        return codes


def make_splitter(
    rule: str,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    cut_time: float | None = None,
    has_user: bool = True,
    given_has_val: bool = True,
    min_events_per_user: int = 3,
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
    return LeaveLastOut(val_fraction, min_events_per_user)
