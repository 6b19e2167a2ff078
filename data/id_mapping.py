"""Raw ids → embedding rows at preparation: counting ids over a stream, the training split's
vocabulary (``min_count``) or a hash, nulls → row 0; or, for ``id_mapping: dynamic`` columns, the
raw int64 ids themselves (text hashed, the originals kept; nulls → ``MISSING_ID``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from towerrec.data.cleaning import (
    mix64,
    string_ids,
)
from towerrec.data.config import MISSING_ID
from towerrec.data.jagged import list_parts
from towerrec.data.normalize import is_text
from towerrec.data.vocab import Vocabulary

HASH_SALT = np.uint64(0x2545F4914F6CDD1D)


def id_values(
    column: pa.Array | pa.ChunkedArray,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, pa.Array]:
    """(flat int64 ids with nulls as 0, list offsets or None, flat null mask, flat original ids).
    String ids become their 64-bit hash (``cleaning.string_ids``); the originals keep the text."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = None
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column, offsets = list_parts(column)
    originals = column
    if is_text(column):
        column = string_ids(column)
    nulls = np.asarray(column.is_null()) if column.null_count else np.zeros(len(column), dtype=bool)
    return np.asarray(column.fill_null(0), dtype=np.int64), offsets, nulls, originals


class IdCounts:
    """Counts of int64 ids over a stream (sorted unique keys + counts; O(distinct ids) memory), and
    each key's original id (the text of a string id)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.originals: np.ndarray = np.zeros(0, dtype=np.int64)

    def add(self, values: np.ndarray, originals: pa.Array | None = None) -> None:
        keys, first, counts = np.unique(values, return_index=True, return_counts=True)
        new_originals = (
            np.asarray(originals.take(pa.array(first)).to_numpy(zero_copy_only=False))
            if originals is not None
            else keys
        )
        if len(self.keys):
            pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            known = self.keys[pos] == keys
            self.counts[pos[known]] += counts[known]  # keys are unique: no repeated positions
            keys, counts, new_originals = keys[~known], counts[~known], new_originals[~known]
        if len(keys):
            merged = np.concatenate([self.keys, keys])
            order = np.argsort(merged, kind="stable")
            originals = np.concatenate([self.originals, new_originals])  # object when texts join
            self.keys, self.counts = merged[order], np.concatenate([self.counts, counts])[order]
            self.originals = originals[order]

    def vocabulary(self, min_count: int) -> Vocabulary:
        kept = self.counts >= min_count
        return Vocabulary(self.keys[kept], originals=self.originals[kept])


class IdMapper:
    """Raw ids → embedding rows: a training-split vocabulary or a hash; nulls → row 0. With ``raw``
    (``id_mapping: dynamic``) the stored values are the int64 ids themselves (nulls →
    ``MISSING_ID``), and the text of every text id met is kept (``originals``) for outputs."""

    def __init__(
        self, vocabulary: Vocabulary | None = None, num_hash_buckets: int | None = None, raw: bool = False
    ):
        self.vocabulary = vocabulary
        self.num_hash_buckets = num_hash_buckets
        self.raw = raw
        self.outside = 0
        """Ids (not missing) that are not in the vocabulary (they go to row 0), counted by ``encode``."""
        self.originals = IdCounts()
        """``raw``: every text id encoded (its int64 hash → its text), in every split."""
        self.text = False
        """``raw``: the column held text ids (stored as their 64-bit hashes)."""

    @property
    def num_embeddings(self) -> int | None:
        """Table rows the stored values need (None for raw ids: the table size is the id map's)."""
        if self.raw:
            return None
        if self.vocabulary is not None:
            return self.vocabulary.num_embeddings
        return int(self.num_hash_buckets) + 1

    @property
    def missing_row(self) -> int:
        """What a missing id is stored as."""
        return MISSING_ID if self.raw else 0

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self.raw:
            return ids
        if self.vocabulary is not None:
            return self.vocabulary.lookup(ids)
        mixed = mix64(ids.view(np.uint64) ^ HASH_SALT)
        return (mixed % np.uint64(self.num_hash_buckets)).astype(np.int64) + 1

    def encode(self, column) -> pa.Array:
        ids, offsets, nulls, originals = id_values(column)
        if self.raw and is_text(originals):
            self.text = True
            present = ~nulls
            self.originals.add(ids[present], originals.filter(pa.array(present)))
        rows = np.where(nulls, self.missing_row, self.rows(ids))
        if self.vocabulary is not None:
            self.outside += int(((rows == 0) & ~nulls).sum())
        if offsets is None:
            return pa.array(rows)
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(rows))
