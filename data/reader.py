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


Segment = tuple[int, int, int]
"""(base rank, start, end): rows [start, end) of one base rank's shuffled row sequence."""


def _split(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part [lo, hi) of ``total`` rows split over ``world_size`` ranks."""
    return rank * total // world_size, (rank + 1) * total // world_size


def _length(segments: list[Segment]) -> int:
    return sum(end - start for _, start, end in segments)


def _slice(segments: list[Segment], lo: int, hi: int) -> list[Segment]:
    """The rows [lo, hi) of the sequence that ``segments`` concatenate, as segments."""
    out, offset = [], 0
    for base_rank, start, end in segments:
        size = end - start
        a, b = max(lo - offset, 0), min(hi - offset, size)
        if a < b:
            out.append((base_rank, start + a, start + b))
        offset += size
        if offset >= hi:
            break
    return out


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
        self.epoch = 0
        self.consumed = 0
        self.skipped_bad_rows = 0
        self._externally_tracked = False
        self._keys = [f.name for f in spec.sparse]
        self._files: dict[str, pq.ParquetFile] = {}
        self._base = (world_size, self.window_rows)  # the layout the epoch's base sequences follow
        self._sequence = self._base_sequence(*self._base)  # what this layout splits over the ranks
        self._start = 0  # position of this layout's first batch in the epoch

    # ----------------------------------------------------------------------------- layout
    def _base_sequence(self, world_size: int, window_rows: int) -> list[Segment]:
        del window_rows  # the base ranks' shuffle windows; the rows they hold depend on the ranks only
        parts = [_split(self.num_rows, world_size, r) for r in range(world_size)]
        return [(r, 0, hi - lo) for r, (lo, hi) in enumerate(parts)]

    @property
    def rows_per_rank(self) -> int:
        """Rows (padding included) each rank yields in this layout of the epoch."""
        return math.ceil(_length(self._sequence) / self.world_size)

    def _rank_segments(self, sequence: list[Segment], world_size: int, rank: int) -> list[Segment]:
        return _slice(sequence, *_split(_length(sequence), world_size, rank))

    def __len__(self) -> int:
        """Batches in the current epoch (for a resumed epoch: the positions of the batches trained
        before the resume, then this layout's batches)."""
        return self._start + math.ceil(self.rows_per_rank / self.batch_size)

    def batch_rows(self, position: int) -> int:
        """Rows (padding included) of this rank's batch at ``position`` in the current epoch."""
        return min(self.batch_size, self.rows_per_rank - (position - self._start) * self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "window_rows": self.window_rows,
            "seed": self.seed,
            "num_rows": self.num_rows,
        }
        if (self.world_size, self.window_rows) != self._base or self._start:
            state["remainder"] = {
                "base": list(self._base),
                "sequence": [list(segment) for segment in self._sequence],
                "start": self._start,
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position. Under another layout (world size, batch size or shuffle window)
        the interrupted epoch is finished, not restarted: the rows it has not trained on yet are
        split over this layout's ranks, so every row is still seen exactly once per epoch and the
        next epoch uses this layout."""
        if "num_rows" in state and int(state["num_rows"]) != self.num_rows:
            raise DataError(
                f"{self.meta.root}: split {self.split!r} has {self.num_rows} rows, but the checkpoint's "
                f"reader position is for {state['num_rows']}: the data set changed since the checkpoint "
                "(resume from an end-of-epoch checkpoint with checkpoint.resume=PATH, or start afresh)"
            )
        self.epoch = int(state["epoch"])
        consumed = int(state["consumed"])
        saved_world, saved_batch = int(state["world_size"]), int(state["batch_size"])
        saved_window = int(state.get("window_rows", self.window_rows))
        remainder = state.get("remainder")
        if remainder is not None:
            base = (int(remainder["base"][0]), int(remainder["base"][1]))
            sequence = [(int(r), int(a), int(b)) for r, a, b in remainder["sequence"]]
            start = int(remainder["start"])
        else:
            base, sequence, start = (
                (saved_world, saved_window),
                self._base_sequence(saved_world, saved_window),
                0,
            )
        if (saved_world, saved_batch, saved_window) == (self.world_size, self.batch_size, self.window_rows):
            self._base, self._sequence, self._start, self.consumed = base, sequence, start, consumed
            return
        trained = (consumed - start) * saved_batch  # every rank trained this many rows (or all it had)
        unseen = []
        for rank in range(saved_world):
            mine = self._rank_segments(sequence, saved_world, rank)
            unseen += _slice(mine, trained, _length(mine))
        self._base, self._sequence, self._start, self.consumed = base, unseen, consumed, consumed

    def mark_consumed(self, position: int) -> None:
        """Records that the batch at ``position`` (``Batch.position``) was trained on: the reader
        position a checkpoint saves is the next batch.

        A trainer that prefetches batches calls this per step; without any call, finishing an
        iteration counts the whole epoch as consumed.
        """
        self._externally_tracked = True
        self.consumed = position + 1

    # ----------------------------------------------------------------------------- iteration
    def advance_if_finished(self) -> None:
        """Moves to the next epoch (in this layout) when the current one is finished, so that
        ``len()`` is the coming epoch's; ``iter()`` does the same."""
        if self.consumed >= len(self):
            self.epoch += 1
            self.consumed = 0
            self._base = (self.world_size, self.window_rows)
            self._sequence = self._base_sequence(*self._base)
            self._start = 0

    def __iter__(self) -> Iterator[Batch]:
        """Starts (or resumes) an epoch: after a finished epoch, the next one begins. The epoch
        and first batch are fixed here, when ``iter()`` is called, not at the first ``next()``."""
        self.advance_if_finished()
        return self._batches(self.epoch, self.consumed)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        """This rank's batches from position ``start_batch``: its part of the layout's sequence,
        read window by window from the base ranks' shuffled sequences, cut into batches of
        ``batch_size`` (a batch may join the ends of two windows) and padded at the end."""
        order = self._epoch_order(epoch)
        base_world, base_window = self._base
        base_starts = [_split(self.num_rows, base_world, r)[0] for r in range(base_world)]
        base_sizes = [_split(self.num_rows, base_world, r)[1] - base_starts[r] for r in range(base_world)]
        mine = self._rank_segments(self._sequence, self.world_size, self.rank)
        skip = (start_batch - self._start) * self.batch_size
        padded_rows = self.rows_per_rank - skip
        segments = _slice(mine, skip, _length(mine))
        tasks = []  # (base rank, window start, first row, end row) within that window
        for base_rank, start, end in segments:
            for window_start in range(start - start % base_window, end, base_window):
                tasks.append(
                    (
                        base_rank,
                        window_start,
                        max(start, window_start) - window_start,
                        min(end, window_start + base_window) - window_start,
                    )
                )
        if not tasks and padded_rows > 0:  # no real row left for this rank: a template row to pad with
            base_rank, start, _ = (mine or self._sequence)[-1 if mine else 0]
            tasks = [(base_rank, start - start % base_window, start % base_window, start % base_window + 1)]
            template_only = True
        else:
            template_only = False

        def read(key: tuple[int, int]) -> _Window:
            base_rank, window_start = key
            window_end = min(window_start + base_window, base_sizes[base_rank])
            return self._read_window(
                order, epoch, base_rank, base_starts[base_rank], window_start, window_end
            )

        pieces: list[tuple[_Window, int, int]] = []
        buffered, position = 0, start_batch
        last: tuple[_Window, int] | None = None
        for index, window in _windows([t[:2] for t in tasks], read, self.background_decode):
            first, end = tasks[index][2:]
            if template_only:
                last = (window, first)
                break
            pieces.append((window, first, end))
            buffered += end - first
            last = (window, end - 1)
            while buffered >= self.batch_size:
                batch, pieces, buffered = self._cut(pieces, buffered)
                batch.position = position
                position += 1
                padded_rows -= batch.batch_size
                yield batch
        if padded_rows > 0:
            window, row = last
            rows = _concat([_permute(w, np.arange(a, b)) for w, a, b in pieces]) if pieces else None
            template = _permute(window, np.array([row]))
            padding = _pad(template, padded_rows - buffered)
            padding = _permute(padding, np.arange(1, padding.num_rows))  # drop the template itself
            tail = _concat([rows, padding]) if rows is not None else padding
            for begin in range(0, tail.num_rows, self.batch_size):
                batch = self._make_batch(tail, begin, min(begin + self.batch_size, tail.num_rows))
                batch.position = position
                position += 1
                yield batch
        if not self._externally_tracked:
            self.epoch, self.consumed = epoch, len(self)

    def _cut(self, pieces: list[tuple[_Window, int, int]], buffered: int):
        """The first ``batch_size`` rows of ``pieces`` as a Batch, and what is left."""
        size = self.batch_size
        window, first, end = pieces[0]
        if end - first >= size:  # the common case: the batch lies in one window
            batch = self._make_batch(window, first, first + size)
            rest = [(window, first + size, end)] if end - first > size else []
            return batch, rest + pieces[1:], buffered - size
        taken, parts, rest = 0, [], []
        for window, first, end in pieces:
            need = size - taken
            if need <= 0:
                rest.append((window, first, end))
                continue
            stop = min(end, first + need)
            parts.append(_permute(window, np.arange(first, stop)))
            taken += stop - first
            if stop < end:
                rest.append((window, stop, end))
        joined = _concat(parts)
        return self._make_batch(joined, 0, joined.num_rows), rest, buffered - size

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
        self,
        order: list[RowGroup],
        epoch: int,
        base_rank: int,
        base_start: int,
        window_start: int,
        window_end: int,
    ) -> _Window:
        """Rows [window_start, window_end) of base rank ``base_rank``'s part of the epoch sequence
        (which starts at ``base_start``): read, validated, decoded and shuffled by (seed, epoch,
        base rank, window start), so the same rows come out whichever rank reads them."""
        start, end = base_start + window_start, base_start + window_end
        table, locator = self._read_rows(order, start, end)
        window = self._decode(table, locator, start)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, base_rank, window_start])
            window = _permute(window, rng.permutation(window.num_rows))
        if self.drop_bag_ids:
            rng = np.random.default_rng([self.seed, epoch, base_rank, window_start, 1])
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


def _windows(keys: list, read, background: bool) -> Iterator[tuple[int, _Window]]:
    """(index, window) for each key in order, reading each distinct key once (consecutive equal
    keys share one read). ``background``: the next window is read and decoded in a thread while
    this one is consumed (pyarrow and most numpy work release the GIL); otherwise each is read when
    it is needed, in the caller's thread."""
    distinct = [key for i, key in enumerate(keys) if i == 0 or keys[i - 1] != key]
    if not background:
        reads = (read(key) for key in distinct)
    else:
        reads = _prefetched(distinct, read)
    current_key, window = None, None
    for index, key in enumerate(keys):
        if key != current_key:
            current_key, window = key, next(reads)
        yield index, window


def _prefetched(keys: list, read) -> Iterator[_Window]:
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="towerrec-reader") as pool:
        pending = pool.submit(read, keys[0]) if keys else None
        for i in range(len(keys)):
            window = pending.result()
            pending = pool.submit(read, keys[i + 1]) if i + 1 < len(keys) else None
            yield window


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


def _concat(windows: list[_Window]) -> _Window:
    """The rows of ``windows`` one after the other."""
    multi_values, multi_offsets = [], []
    for f in range(len(windows[0].multi_values)):
        values = [w.multi_values[f] for w in windows]
        shifts = np.cumsum([0] + [len(v) for v in values[:-1]])
        offsets = [np.zeros(1, dtype=np.int64)] + [
            w.multi_offsets[f][1:] + shift for w, shift in zip(windows, shifts)
        ]
        multi_values.append(np.concatenate(values))
        multi_offsets.append(np.concatenate(offsets))
    return _Window(
        np.concatenate([w.single_ids for w in windows], axis=1),
        multi_values,
        multi_offsets,
        np.concatenate([w.lengths for w in windows], axis=1),
        np.concatenate([w.dense for w in windows]),
        np.concatenate([w.labels for w in windows]),
        np.concatenate([w.label_mask for w in windows]),
        np.concatenate([w.weights for w in windows]),
        np.concatenate([w.row_id for w in windows]),
    )


def _pad(window: _Window, num_padding: int) -> _Window:
    """Appends copies of row 0 that carry no weight and no label (see module docstring)."""
    index = np.concatenate([np.arange(window.num_rows), np.zeros(num_padding, dtype=np.int64)])
    padded = _permute(window, index)
    padded.weights[window.num_rows :] = 0
    padded.label_mask[window.num_rows :] = 0
    padded.row_id[window.num_rows :] = -1
    return padded
