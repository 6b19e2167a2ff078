"""Streaming, rank-sharded, deterministically shuffled batches from Parquet row groups.

How one epoch is laid out (for ``world_size`` W and ``batch_size`` B)::

    row groups of the split ── seeded permutation (seed, epoch) ──▶ one sequence of N rows
    rank r reads rows [r*N//W, (r+1)*N//W): only the row groups overlapping that range
    each rank's range is cut into windows of ``window_rows`` (a multiple of B); a window is read,
    validated, decoded to numpy, shuffled by (seed, epoch, rank, window) and sliced into batches

Every rank yields the same number of batches, ``ceil(ceil(N/W) / B)``: a rank with one row fewer
gets a padding row (weight 0, mask 0, ``row_id`` -1), so collectives never wait on a rank that ran
out of data and every real row is seen exactly once per epoch. Because the order is a pure
function of (seed, epoch, rank, W, B), the reader's position is just (epoch, batches consumed):
resuming skips whole windows by row count without reading them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import Batch
from data.config import DenseFeature, SparseFeature
from data.dataset import DataError, DatasetMeta, RowGroup

HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class LabelSpec:
    """What the reader needs to know about one task's label."""

    column: str
    mask_column: str | None = None
    min_value: float | None = None
    max_value: float | None = None
    binary: bool = False


@dataclass(frozen=True)
class ReadSpec:
    """Columns to read and how to turn them into a Batch."""

    sparse: tuple[SparseFeature, ...]
    dense: tuple[DenseFeature, ...]
    labels: tuple[LabelSpec, ...]
    num_embeddings: dict[str, int]
    """Rows of each sparse feature's table (resolved from config or metadata)."""
    sample_weight_column: str | None = None
    skip_bad_rows: bool = False

    def columns(self) -> list[str]:
        names = [f.source_column for f in self.sparse] + [f.source_column for f in self.dense]
        for label in self.labels:
            names += [label.column] + ([label.mask_column] if label.mask_column else [])
        if self.sample_weight_column:
            names.append(self.sample_weight_column)
        return list(dict.fromkeys(names))


@dataclass
class _Window:
    """Decoded, validated and shuffled rows of one window (numpy, row-major by shuffled order).

    Single-valued ids of all features sit in one (F_single, N) matrix so that shuffling them is one
    gather; ``lengths`` (F, N) holds every feature's bag sizes in KJT order.
    """

    single_ids: np.ndarray  # (F_single, N) int64
    multi_values: list[np.ndarray]  # per multi-hot feature, its flat ids
    multi_offsets: list[np.ndarray]  # per multi-hot feature, (N + 1,) offsets into its ids
    lengths: np.ndarray  # (F, N) int32, features in spec order
    dense: np.ndarray
    labels: np.ndarray
    label_mask: np.ndarray
    weights: np.ndarray
    row_id: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.weights)


class _Locator:
    """Maps a window row back to (file, row group, row) for error messages."""

    def __init__(self, parts: list[tuple[RowGroup, int]]):
        self.parts = parts  # (row group, first row read from it)
        self.starts = np.cumsum([0] + [rg.num_rows - first for rg, first in parts[:-1]])

    def describe(self, row: int) -> str:
        part = int(np.searchsorted(self.starts, row, side="right") - 1)
        rg, first = self.parts[part]
        return f"{rg.file}: row group {rg.index}, row {first + row - int(self.starts[part])}"


class BatchStream:
    """Iterable over one split's batches for one rank; stateful (``state_dict``) for exact resume.

    Example::

        stream = BatchStream(meta, "train", spec, batch_size=512, rank=0, world_size=2, seed=0)
        for batch in stream:       # epoch 0; iterating again gives epoch 1, and so on
            ...
    """

    def __init__(
        self,
        meta: DatasetMeta,
        split: str,
        spec: ReadSpec,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        window_rows: int = 65536,
        background_decode: bool = True,
        drop_bag_ids: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.meta = meta
        self.split = split
        self.spec = spec
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.window_rows = max(1, window_rows // batch_size) * batch_size
        self.background_decode = background_decode
        self.drop_bag_ids = drop_bag_ids and any(f.train_drop_prob > 0 for f in spec.sparse)
        self.row_groups = meta.row_groups(split)
        self.num_rows = sum(rg.num_rows for rg in self.row_groups)
        if self.num_rows < world_size:
            raise DataError(
                f"{meta.root}: split {split!r} has {self.num_rows} rows, fewer than the {world_size} ranks "
                "that must each read a part of it"
            )
        self.rows_per_rank = math.ceil(self.num_rows / world_size)
        self.epoch = 0
        self.consumed = 0
        self.skipped_bad_rows = 0
        self._externally_tracked = False
        self._keys = [f.name for f in spec.sparse]
        self._files: dict[str, pq.ParquetFile] = {}

    # ----------------------------------------------------------------------------- position
    def __len__(self) -> int:
        return math.ceil(self.rows_per_rank / self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position; a different world or batch size restarts the interrupted epoch."""
        self.epoch = int(state["epoch"])
        same_layout = (
            state.get("world_size") == self.world_size and state.get("batch_size") == self.batch_size
        )
        self.consumed = int(state["consumed"]) if same_layout else 0

    def mark_consumed(self, position: int) -> None:
        """Records that the batch at ``position`` (``Batch.position``) was trained on: the reader
        position a checkpoint saves is the next batch.

        A trainer that prefetches batches calls this per step; without any call, finishing an
        iteration counts the whole epoch as consumed.
        """
        self._externally_tracked = True
        self.consumed = position + 1

    # ----------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Batch]:
        """Starts (or resumes) an epoch: after a finished epoch, the next one begins. The epoch
        and first batch are fixed here, when ``iter()`` is called, not at the first ``next()``."""
        if self.consumed >= len(self):
            self.epoch += 1
            self.consumed = 0
        return self._batches(self.epoch, self.consumed)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        order = self._epoch_order(epoch)
        lo = self.rank * self.num_rows // self.world_size
        hi = (self.rank + 1) * self.num_rows // self.world_size
        skip_rows = start_batch * self.batch_size
        starts = list(range(skip_rows - skip_rows % self.window_rows, self.rows_per_rank, self.window_rows))

        def read(window_start: int) -> _Window:
            window_end = min(window_start + self.window_rows, self.rows_per_rank)
            real_end = min(window_end, hi - lo)
            return self._read_window(
                order, lo + window_start, lo + real_end, window_end - real_end, epoch, window_start
            )

        for window_start, window in _windows(starts, read, self.background_decode):
            first = max(skip_rows - window_start, 0)
            for begin in range(first, window.num_rows, self.batch_size):
                batch = self._make_batch(window, begin, min(begin + self.batch_size, window.num_rows))
                batch.position = (window_start + begin) // self.batch_size
                yield batch
        if not self._externally_tracked:
            self.epoch, self.consumed = epoch, len(self)

    def _epoch_order(self, epoch: int) -> list[RowGroup]:
        if not self.shuffle:
            return self.row_groups
        rng = np.random.default_rng([self.seed, epoch])
        return [self.row_groups[i] for i in rng.permutation(len(self.row_groups))]

    def _file(self, path: str) -> pq.ParquetFile:
        if path not in self._files:
            try:
                self._files[path] = pq.ParquetFile(path)
            except FileNotFoundError as err:
                raise DataError(f"{path}: listed in metadata.json but missing") from err
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{path}: not a readable Parquet file ({err})") from err
        return self._files[path]

    def _read_rows(self, order: list[RowGroup], start: int, end: int) -> tuple[pa.Table, _Locator]:
        """Rows [start, end) of the epoch sequence, reading only the row groups that overlap them."""
        tables, parts, offset = [], [], 0
        columns = self.spec.columns()
        for rg in order:
            rg_start, rg_end = offset, offset + rg.num_rows
            offset = rg_end
            if rg_end <= start:
                continue
            if rg_start >= end:
                break
            try:
                table = self._file(rg.file).read_row_group(rg.index, columns=columns)
            except KeyError as err:
                raise DataError(f"{rg.file}: missing column {err} (needed: {columns})") from err
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{rg.file}: row group {rg.index} cannot be read ({err})") from err
            if table.num_rows != rg.num_rows:
                raise DataError(
                    f"{rg.file}: row group {rg.index} has {table.num_rows} rows, metadata.json says {rg.num_rows}"
                )
            first = max(start - rg_start, 0)
            tables.append(table.slice(first, min(end, rg_end) - rg_start - first))
            parts.append((rg, first))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return table, _Locator(parts)

    def _read_window(
        self, order: list[RowGroup], start: int, end: int, num_padding: int, epoch: int, window_start: int
    ) -> _Window:
        if start == end:  # a window of padding only: decode one real row as the template, then drop it
            table, locator = self._read_rows(order, start - 1, start)
            padded = _pad(self._decode(table, locator, start - 1), num_padding)
            window = _permute(padded, np.arange(1, padded.num_rows))
        else:
            table, locator = self._read_rows(order, start, end)
            window = self._decode(table, locator, start)
            if num_padding:
                window = _pad(window, num_padding)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, self.rank, window_start])
            window = _permute(window, rng.permutation(window.num_rows))
        if self.drop_bag_ids:
            rng = np.random.default_rng([self.seed, epoch, self.rank, window_start, 1])
            window = _drop_bag_ids(window, self.spec.sparse, rng)
        return window

    # ----------------------------------------------------------------------------- decoding
    def _decode(self, table: pa.Table, locator: _Locator, first_row_id: int) -> _Window:
        spec = self.spec
        num_rows = table.num_rows
        bad = np.zeros(num_rows, dtype=bool)
        single_ids = np.empty((sum(not f.multi_hot for f in spec.sparse), num_rows), dtype=np.int64)
        multi_values, multi_offsets = [], []
        lengths = np.ones((len(spec.sparse), num_rows), dtype=np.int32)
        for index, feature in enumerate(spec.sparse):
            column = _column(table, feature.source_column, locator)
            if feature.multi_hot:
                if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
                    raise DataError(
                        f"{locator.parts[0][0].file}: column {feature.source_column!r} has type {column.type}, "
                        "expected a list of integer ids (multi_hot: true)"
                    )
                array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
                if array.null_count:
                    array = array.fill_null([]) if hasattr(array, "fill_null") else array
                offsets = array.offsets.to_numpy().astype(np.int64)
                values = _ints(array.values.slice(offsets[0], offsets[-1] - offsets[0]), feature, locator)
                offsets = offsets - offsets[0]
                lengths[index] = np.diff(offsets)
                row_of_value = np.repeat(np.arange(num_rows), lengths[index])
            else:
                values = _ints(column, feature, locator)
                row_of_value = None
            negative = values < 0
            if negative.any():
                rows = row_of_value[negative] if row_of_value is not None else np.flatnonzero(negative)
                if not spec.skip_bad_rows:
                    row = int(rows[0])
                    raise DataError(
                        f"{locator.describe(row)}: column {feature.source_column!r} has negative id "
                        f"{int(values[negative][0])}"
                    )
                bad[rows] = True
                values = np.where(negative, 0, values)
            values = map_ids(values, feature, spec.num_embeddings[feature.name])
            if feature.multi_hot:
                multi_values.append(values)
                multi_offsets.append(offsets)
            else:
                single_ids[index - len(multi_values)] = values

        dense = np.empty((num_rows, len(spec.dense)), dtype=np.float32)
        for j, feature in enumerate(spec.dense):
            values = _floats(_column(table, feature.source_column, locator), feature.source_column, locator)
            non_finite = ~np.isfinite(values)
            if non_finite.any():
                if feature.fill_nan is not None:
                    values = np.where(non_finite, np.float32(feature.fill_nan), values)
                elif spec.skip_bad_rows:
                    bad |= non_finite
                    values = np.where(non_finite, 0, values)
                else:
                    row = int(np.flatnonzero(non_finite)[0])
                    raise DataError(
                        f"{locator.describe(row)}: column {feature.source_column!r} has non-finite value {values[row]} "
                        f"(set fill_nan for data.dense feature {feature.name!r} to replace it)"
                    )
            dense[:, j] = values

        labels = np.empty((num_rows, len(spec.labels)), dtype=np.float32)
        label_mask = np.ones((num_rows, len(spec.labels)), dtype=np.float32)
        counted_by_mask: dict[str, np.ndarray] = {}  # tasks often share a mask column (e.g. rated)
        for j, label in enumerate(spec.labels):
            values = _floats(_column(table, label.column, locator), label.column, locator)
            counted = np.ones(num_rows, dtype=bool)
            if label.mask_column:
                if label.mask_column not in counted_by_mask:
                    mask = _floats(_column(table, label.mask_column, locator), label.mask_column, locator)
                    counted_by_mask[label.mask_column] = np.isfinite(mask) & (mask != 0)
                counted = counted_by_mask[label.mask_column]
                label_mask[:, j] = counted
                # a masked-out row's label is undefined (e.g. no rating for a sampled negative)
                values = np.where(counted, values, 0.0).astype(np.float32)
            invalid = ~np.isfinite(values)
            if label.binary:
                invalid |= (values != 0) & (values != 1)
                allowed = "{0, 1}"
            else:
                if label.min_value is not None:
                    invalid |= values < label.min_value
                if label.max_value is not None:
                    invalid |= values > label.max_value
                allowed = f"[{label.min_value}, {label.max_value}]"
            invalid &= counted
            if invalid.any():
                if not spec.skip_bad_rows:
                    row = int(np.flatnonzero(invalid)[0])
                    raise DataError(
                        f"{locator.describe(row)}: label column {label.column!r} has value {values[row]} outside {allowed}"
                    )
                bad |= invalid
                values = np.where(invalid, 0, values)
            labels[:, j] = values

        if spec.sample_weight_column:
            weights = _floats(
                _column(table, spec.sample_weight_column, locator), spec.sample_weight_column, locator
            )
            if (~np.isfinite(weights) | (weights < 0)).any():
                row = int(np.flatnonzero(~np.isfinite(weights) | (weights < 0))[0])
                raise DataError(
                    f"{locator.describe(row)}: sample weight column {spec.sample_weight_column!r} has "
                    f"invalid value {weights[row]} (must be finite and >= 0)"
                )
        else:
            weights = np.ones(num_rows, dtype=np.float32)
        if bad.any():
            self.skipped_bad_rows += int(bad.sum())
            label_mask[bad] = 0
            weights = np.where(bad, 0, weights).astype(np.float32)
        row_id = np.arange(first_row_id, first_row_id + num_rows, dtype=np.int64)
        return _Window(
            single_ids, multi_values, multi_offsets, lengths, dense, labels, label_mask, weights, row_id
        )

    def _make_batch(self, window: _Window, begin: int, end: int) -> Batch:
        values = []
        single, multi = 0, 0
        for feature in self.spec.sparse:
            if feature.multi_hot:
                offsets = window.multi_offsets[multi]
                values.append(window.multi_values[multi][offsets[begin] : offsets[end]])
                multi += 1
            else:
                values.append(window.single_ids[single, begin:end])
                single += 1
        sparse = KeyedJaggedTensor(
            keys=self._keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(window.lengths[:, begin:end].ravel()),
            stride=end - begin,
        )
        return Batch(
            sparse=sparse,
            dense=torch.from_numpy(window.dense[begin:end]),
            labels=torch.from_numpy(window.labels[begin:end]),
            label_mask=torch.from_numpy(window.label_mask[begin:end]),
            weights=torch.from_numpy(window.weights[begin:end]),
            row_id=torch.from_numpy(window.row_id[begin:end]),
        )


def _windows(starts: list[int], read, background: bool) -> Iterator[tuple[int, _Window]]:
    """(start, window) for each start, in order. ``background``: the next window is read and
    decoded in a thread while this one is consumed (pyarrow and most numpy work release the GIL);
    otherwise each is read when it is needed, in the caller's thread."""
    if not background:
        for start in starts:
            yield start, read(start)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="towerrec-reader") as pool:
        pending = pool.submit(read, starts[0]) if starts else None
        for i, start in enumerate(starts):
            window = pending.result()
            pending = pool.submit(read, starts[i + 1]) if i + 1 < len(starts) else None
            yield start, window


def _column(table: pa.Table, name: str, locator: _Locator) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(f"{locator.parts[0][0].file}: missing column {name!r}")
    return table.column(name)


def _ints(column, feature: SparseFeature, locator: _Locator) -> np.ndarray:
    if not pa.types.is_integer(column.type):
        raise DataError(
            f"{locator.parts[0][0].file}: column {feature.source_column!r} has type {column.type}, expected integer ids"
        )
    if column.null_count:
        column = column.fill_null(0)
    return np.asarray(column.to_numpy(), dtype=np.int64)


def _floats(column, name: str, locator: _Locator) -> np.ndarray:
    if not (
        pa.types.is_floating(column.type)
        or pa.types.is_integer(column.type)
        or pa.types.is_boolean(column.type)
    ):
        raise DataError(
            f"{locator.parts[0][0].file}: column {name!r} has type {column.type}, expected numbers"
        )
    if column.null_count:
        column = column.cast(pa.float32()).fill_null(float("nan"))
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float32)


def map_ids(values: np.ndarray, feature: SparseFeature, num_embeddings: int) -> np.ndarray:
    """Raw ids → table rows, as training reads them (``vocab``: out of range → row 0; ``hash``)."""
    if feature.id_mapping == "hash":
        mixed = values.astype(np.uint64) * HASH_MULTIPLIER
        return ((mixed >> np.uint64(17)) % np.uint64(num_embeddings)).astype(np.int64)
    return np.where(values < num_embeddings, values, 0)


def _permute(window: _Window, perm: np.ndarray) -> _Window:
    """Rows of ``window`` in the order ``perm`` (a permutation, or any row index: padding repeats rows)."""
    multi_values, multi_offsets = [], []
    for values, offsets in zip(window.multi_values, window.multi_offsets):
        lengths = np.take(np.diff(offsets), perm)
        new_offsets = np.zeros(len(perm) + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_offsets[1:])
        starts = np.repeat(np.take(offsets[:-1], perm) - new_offsets[:-1], lengths)
        multi_values.append(np.take(values, np.arange(new_offsets[-1]) + starts))
        multi_offsets.append(new_offsets)
    return _Window(
        np.take(window.single_ids, perm, axis=1),
        multi_values,
        multi_offsets,
        np.take(window.lengths, perm, axis=1),
        np.take(window.dense, perm, axis=0),
        np.take(window.labels, perm, axis=0),
        np.take(window.label_mask, perm, axis=0),
        np.take(window.weights, perm),
        np.take(window.row_id, perm),
    )


def _drop_bag_ids(window: _Window, features: tuple[SparseFeature, ...], rng: np.random.Generator) -> _Window:
    """Leaves out each id of a multi-hot bag with its feature's ``train_drop_prob`` (in place)."""
    multi_index = 0
    for index, feature in enumerate(features):
        if not feature.multi_hot:
            continue
        if feature.train_drop_prob > 0:
            values, offsets = window.multi_values[multi_index], window.multi_offsets[multi_index]
            kept = rng.random(len(values)) >= feature.train_drop_prob
            kept_before = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum(kept, out=kept_before[1:])
            window.multi_values[multi_index] = values[kept]
            window.multi_offsets[multi_index] = kept_before[offsets]
            window.lengths[index] = np.diff(window.multi_offsets[multi_index])
        multi_index += 1
    return window


def _pad(window: _Window, num_padding: int) -> _Window:
    """Appends copies of row 0 that carry no weight and no label (see module docstring)."""
    index = np.concatenate([np.arange(window.num_rows), np.zeros(num_padding, dtype=np.int64)])
    padded = _permute(window, index)
    padded.weights[window.num_rows :] = 0
    padded.label_mask[window.num_rows :] = 0
    padded.row_id[window.num_rows :] = -1
    return padded
