"""Variable-length rows of ids, as flat values plus offsets, with vectorized gathers.

    row r holds values[offsets[r]:offsets[r + 1]]         offsets: (N + 1,) int64, offsets[0] == 0

The one implementation of jagged arrays on the data side (bags of ids, histories): readers,
converters and recommendation all gather rows through ``Jagged.take``; no per-row Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass
class Jagged:
    values: np.ndarray  # (N_values,)
    offsets: np.ndarray  # (N + 1,) int64

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> Jagged:
        """The rows ``rows`` (any index array: a permutation, a subset, repeats)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = np.diff(self.offsets)[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = np.repeat(self.offsets[:-1][rows] - offsets[:-1], lengths)
        return Jagged(self.values[np.arange(offsets[-1]) + starts], offsets)

    @classmethod
    def single(cls, values: np.ndarray) -> Jagged:
        """One value per row."""
        values = np.asarray(values)
        return cls(values, np.arange(len(values) + 1, dtype=np.int64))

    @classmethod
    def empty(cls, num_rows: int, dtype=np.int64) -> Jagged:
        return cls(np.zeros(0, dtype=dtype), np.zeros(num_rows + 1, dtype=np.int64))

    @classmethod
    def concat(cls, parts: Sequence[Jagged]) -> Jagged:
        """The rows of ``parts`` one after the other."""
        shifts = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
        offsets = [np.zeros(1, dtype=np.int64)] + [p.offsets[1:] + shift for p, shift in zip(parts, shifts)]
        return cls(np.concatenate([p.values for p in parts]), np.concatenate(offsets))

    @classmethod
    def from_arrow(cls, column: pa.Array | pa.ChunkedArray) -> Jagged:
        """A list column (nulls: empty lists) as numpy values and offsets starting at 0."""
        values, offsets = list_parts(column)
        return cls(np.asarray(values.to_numpy(zero_copy_only=False)), offsets)

    def to_arrow(self, value_type: pa.DataType | None = None) -> pa.ListArray:
        return pa.ListArray.from_arrays(
            pa.array(self.offsets.astype(np.int32)), pa.array(self.values, type=value_type)
        )


def list_parts(column: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """A list column as (its flat values, as Arrow, of the rows only; int64 offsets from 0). Null
    lists read as empty ones. The one decoder of Arrow list columns (bags, delimited strings)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        array = array.fill_null([])
    offsets = np.asarray(array.offsets, dtype=np.int64)
    return array.values.slice(offsets[0], offsets[-1] - offsets[0]), offsets - offsets[0]
