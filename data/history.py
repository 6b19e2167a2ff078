"""Behaviour histories: for each row, the events of its user strictly before the row's own time.

    events (user key, time, item id, side ids...)       rows (user key, time)
        └─ sorted by (user, time) once ─▶ for each row, the range [first, end) of its user's events
           with time < the row's time (``earlier_events``: two searchsorted calls, no per-row Python)
        └─ the last ``max_length`` of that range, oldest first ─▶ one ``Jagged`` per output list

Strictly earlier: an event at the row's own timestamp (the row itself, or an event logged at the
same second) is never in its history, nor is any later one. The one implementation behind the
MovieLens converters' history features and the generic ``data.prepare.histories`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from towerrec.data.jagged import Jagged

MAX_AGE_BUCKET = 63


def earlier_events(keys: np.ndarray, times: np.ndarray, event_keys: np.ndarray, event_times: np.ndarray):
    """For each row (key, time): the events of that key strictly before that time, as the range
    [first, end) of the events sorted by (key, time). Returns (sort order of the events, first
    (N,), end (N,)). Times are numbers (int or float); keys are int64."""
    order = np.lexsort((event_times, event_keys))
    first, end = _ranges(event_keys[order], event_times[order], keys, times)
    return order, first, end


def _ranges(sorted_keys, sorted_times, keys, times) -> tuple[np.ndarray, np.ndarray]:
    first = np.searchsorted(sorted_keys, keys, side="left")
    low, high = first.copy(), np.searchsorted(sorted_keys, keys, side="right")
    # within a key's block the times are sorted: bisect for the row's time, all rows at once
    while True:
        active = np.flatnonzero(low < high)
        if not len(active):
            return first, low
        middle = (low[active] + high[active]) // 2
        before = sorted_times[middle] < times[active]
        low[active[before]] = middle[before] + 1
        high[active[~before]] = middle[~before]


def age_buckets(row_times: np.ndarray, event_times: np.ndarray) -> np.ndarray:
    """Bucket id of the time from an event to the row: 1 + floor(log2(1 + Δ)) in the time column's
    unit, at most ``MAX_AGE_BUCKET`` (id 0 stays for padding and unknown)."""
    delta = np.maximum(np.asarray(row_times, np.float64) - np.asarray(event_times, np.float64), 0.0)
    return np.minimum(1 + np.floor(np.log2(1.0 + delta)), MAX_AGE_BUCKET).astype(np.int64)


@dataclass
class EventLog:
    """Events sorted by (user, time), with aligned id columns (e.g. item, category, rating level)."""

    users: np.ndarray  # (E,) int64, sorted
    times: np.ndarray  # (E,) sorted within each user
    columns: dict[str, np.ndarray]  # name -> (E,) int64

    @classmethod
    def build(cls, users: np.ndarray, times: np.ndarray, columns: dict[str, np.ndarray]) -> EventLog:
        users, times = np.asarray(users, np.int64), np.asarray(times)
        order = np.lexsort((times, users))
        return cls(
            users[order], times[order], {k: np.asarray(v, np.int64)[order] for k, v in columns.items()}
        )

    def sequences(
        self, users: np.ndarray, times: np.ndarray, max_length: int, age: str | None = None
    ) -> dict[str, Jagged]:
        """Per row, the user's last ``max_length`` events strictly before the row's time, oldest
        first: one list per event column (aligned: equal lengths), plus ``age`` (time-since buckets)."""
        users, times = np.asarray(users, np.int64), np.asarray(times)
        first, end = _ranges(self.users, self.times, users, times)
        begin = np.maximum(first, end - max_length)
        lengths = end - begin
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        positions = np.repeat(begin - offsets[:-1], lengths) + np.arange(offsets[-1])
        out = {name: Jagged(values[positions], offsets) for name, values in self.columns.items()}
        if age is not None:
            out[age] = Jagged(age_buckets(np.repeat(times, lengths), self.times[positions]), offsets)
        return out
