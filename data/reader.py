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

import bisect
import itertools
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from towerrec.data.batch import Batch
from towerrec.data.config import SparseFeature
from towerrec.data.dataset import DatasetMeta, RowGroup
from towerrec.data.errors import DataError
from towerrec.data.rows import (
    DecodedRows,
    LabelSpec,
    OutOfRangeIds,
    ReadSpec,
    RowLocator,
    SampledIds,
    decode_rows,
    map_ids,
    read_spec,
)

__all__ = [
    "BatchStream",
    "StoredRows",
    "LabelSpec",
    "ReadSpec",
    "SampledIds",
    "count_rows",
    "map_ids",
    "read_spec",
    "read_split",
]


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
        days: tuple[int, int] | None = None,
    ):
        """``days``: read only the split's rows of days ``[first, last]`` of a data set grown by
        days (their row groups are a slice of the split's: ``DatasetMeta.row_groups``)."""
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
        self.row_groups = meta.row_groups(split, days)
        self.num_rows = sum(rg.num_rows for rg in self.row_groups)
        if self.num_rows < world_size:
            where = f"split {split!r}" + (f" of days {list(days)}" if days is not None else "")
            raise DataError(
                f"{meta.root}: {where} has {self.num_rows} rows, fewer than the {world_size} ranks "
                "that must each read a part of it"
            )
        self.epoch = 0
        self.consumed = 0
        self.skipped_bad_rows = 0
        self.out_of_range_ids = OutOfRangeIds()
        """Ids of the windows read so far at or above their table's size (read as row 0), per feature."""
        self._files = threading.local()
        self._externally_tracked = False
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
        ends = list(itertools.accumulate(rg.num_rows for rg in order))
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

        def read(key: tuple[int, int]) -> DecodedRows:
            base_rank, window_start = key
            window_end = min(window_start + base_window, base_sizes[base_rank])
            return self._read_window(
                order, ends, epoch, base_rank, base_starts[base_rank], window_start, window_end
            )

        pieces: list[tuple[DecodedRows, int, int]] = []
        buffered, position = 0, start_batch
        last: tuple[DecodedRows, int] | None = None
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
                yield self._with_sampled(batch, epoch)
        if padded_rows > 0:
            window, row = last
            padding = window.take(np.array([row])).padding(padded_rows - buffered)
            tail = DecodedRows.concat([*(w.take(np.arange(a, b)) for w, a, b in pieces), padding])
            for begin in range(0, tail.num_rows, self.batch_size):
                batch = tail.to_batch(begin, min(begin + self.batch_size, tail.num_rows))
                batch.position = position
                position += 1
                yield self._with_sampled(batch, epoch)
        if not self._externally_tracked:
            self.epoch, self.consumed = epoch, len(self)

    def _with_sampled(self, batch: Batch, epoch: int) -> Batch:
        """A training batch with the spec's sampled ids (``ReadSpec.sampled``), drawn from (seed,
        epoch, rank, position): a resumed run draws the same ones."""
        sampled = self.spec.sampled
        if sampled is None or not self.shuffle:
            return batch
        if sampled.count > batch.batch_size:
            raise DataError(
                f"{sampled.name}: {sampled.count} sampled ids do not fit a batch of {batch.batch_size} rows "
                "(model.retrieval.num_sampled_negatives must not exceed data.batch_size)"
            )
        rng = np.random.default_rng([self.seed, epoch, self.rank, batch.position, 3])
        ids = torch.from_numpy(rng.integers(1, sampled.num_rows, size=sampled.count, dtype=np.int64))
        return batch.with_sampled_ids(sampled.name, ids, sampled.unpooled)

    def _cut(self, pieces: list[tuple[DecodedRows, int, int]], buffered: int):
        """The first ``batch_size`` rows of ``pieces`` as a Batch, and what is left."""
        size = self.batch_size
        window, first, end = pieces[0]
        if end - first >= size:  # the common case: the batch lies in one window
            batch = window.to_batch(first, first + size)
            rest = [(window, first + size, end)] if end - first > size else []
            return batch, rest + pieces[1:], buffered - size
        taken, parts, rest = 0, [], []
        for window, first, end in pieces:
            need = size - taken
            if need <= 0:
                rest.append((window, first, end))
                continue
            stop = min(end, first + need)
            parts.append(window.take(np.arange(first, stop)))
            taken += stop - first
            if stop < end:
                rest.append((window, stop, end))
        return DecodedRows.concat(parts).to_batch(), rest, buffered - size

    def _epoch_order(self, epoch: int) -> list[RowGroup]:
        if not self.shuffle:
            return self.row_groups
        rng = np.random.default_rng([self.seed, epoch])
        return [self.row_groups[i] for i in rng.permutation(len(self.row_groups))]

    def _read_rows(
        self, order: list[RowGroup], ends: list[int], start: int, end: int
    ) -> tuple[pa.Table, RowLocator]:
        """Rows [start, end) of the epoch sequence (``ends``: cumulative row counts of ``order``),
        reading only the row groups that overlap them, found by bisection: a window costs
        O(log row groups), however many days a data set has."""
        first_group = bisect.bisect_right(ends, start)
        tables, parts = [], []
        files = self._open_files()
        for index in range(first_group, len(order)):
            rg_start = ends[index - 1] if index else 0
            if rg_start >= end:
                break
            rg = order[index]
            table = read_row_group(files, rg, self.spec.columns())
            first = max(start - rg_start, 0)
            tables.append(table.slice(first, min(end, ends[index]) - rg_start - first))
            parts.append((rg, first))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return table, RowLocator(parts)

    def _open_files(self) -> dict[str, pq.ParquetFile]:
        """This thread's open shards (windows are read in several threads; a ParquetFile is not
        shared between them), at most ``OPEN_FILES_PER_THREAD`` (the oldest is closed first), so
        that a window does not open its shards and parse their footers again."""
        files = getattr(self._files, "open", None)
        if files is None:
            files = self._files.open = _BoundedFiles()
        return files

    def _read_window(
        self,
        order: list[RowGroup],
        ends: list[int],
        epoch: int,
        base_rank: int,
        base_start: int,
        window_start: int,
        window_end: int,
    ) -> DecodedRows:
        """Rows [window_start, window_end) of base rank ``base_rank``'s part of the epoch sequence
        (which starts at ``base_start``): read, validated, decoded and shuffled by (seed, epoch,
        base rank, window start), so the same rows come out whichever rank reads them."""
        start, end = base_start + window_start, base_start + window_end
        table, locator = self._read_rows(order, ends, start, end)
        window, report = decode_rows(table, self.spec, locator, first_row_id=start)
        with _COUNT_LOCK:  # windows decode in several threads
            self.skipped_bad_rows += report.bad_rows
            self.out_of_range_ids.add(report)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, base_rank, window_start])
            window = window.take(rng.permutation(window.num_rows))
        if self.drop_bag_ids:
            rng = np.random.default_rng([self.seed, epoch, base_rank, window_start, 1])
            window = window.drop_bag_ids(self.spec.sparse, rng)
        return window


def _windows(keys: list, read, background: bool) -> Iterator[tuple[int, DecodedRows]]:
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


OPEN_FILES_PER_THREAD = 64


class _BoundedFiles(dict):
    """Open shards by path, the oldest closed beyond ``OPEN_FILES_PER_THREAD`` (file descriptors)."""

    def __setitem__(self, path: str, file: pq.ParquetFile) -> None:
        if len(self) >= OPEN_FILES_PER_THREAD:
            oldest = next(iter(self))
            self.pop(oldest).close()
        super().__setitem__(path, file)


def open_parquet(path: str) -> pq.ParquetFile:
    """A shard named in ``metadata.json``, memory-mapped (its pages are read without a copy into
    pyarrow's buffers); a missing or unreadable file is a DataError naming it."""
    try:
        return pq.ParquetFile(path, memory_map=True)
    except FileNotFoundError as err:
        raise DataError(f"{path}: listed in metadata.json but missing") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err


_COUNT_LOCK = threading.Lock()
PREFETCH_WINDOWS = 2
"""Windows read and decoded ahead, each in its own thread (Parquet decoding and numpy's gathers
release the GIL, so two windows decode side by side on two cores)."""


def _prefetched(keys: list, read) -> Iterator[DecodedRows]:
    with ThreadPoolExecutor(max_workers=PREFETCH_WINDOWS, thread_name_prefix="towerrec-reader") as pool:
        pending = [pool.submit(read, key) for key in keys[:PREFETCH_WINDOWS]]
        for i in range(len(keys)):
            window = pending.pop(0).result()
            if i + PREFETCH_WINDOWS < len(keys):
                pending.append(pool.submit(read, keys[i + PREFETCH_WINDOWS]))
            yield window


def read_split(
    meta: DatasetMeta, split: str, spec: ReadSpec, extra_columns: tuple[str, ...] = ()
) -> tuple[DecodedRows, dict[str, pa.ChunkedArray]]:
    """Every row of ``split`` in stored order, decoded and validated like training reads them
    (bad values stop with the file, row group and row named), plus ``extra_columns`` as stored
    (e.g. raw ids for serving). Holds the whole split in memory."""
    columns = list(dict.fromkeys([*spec.columns(), *extra_columns]))
    parts, extras = [], {name: [] for name in extra_columns}
    offset = 0
    for group, table in iter_row_groups(meta.row_groups(split), columns):
        rows, _ = decode_rows(table, spec, RowLocator([(group, 0)]), first_row_id=offset)
        parts.append(rows)
        for name in extra_columns:
            extras[name].append(table.column(name))
        offset += table.num_rows
    if not parts:
        empty = pa.table({name: pa.array([], pa.int64()) for name in columns})
        rows, _ = decode_rows(empty, spec, RowLocator([(RowGroup(str(meta.root), 0, 0), 0)]))
        return rows, {name: pa.chunked_array([], pa.int64()) for name in extra_columns}
    chunked = {
        name: pa.chunked_array([c for column in cols for c in column.chunks]) for name, cols in extras.items()
    }
    return DecodedRows.concat(parts), chunked


class StoredRows:
    """``columns`` of chosen rows of ``split`` as stored (no decoding), reading only the row groups
    that hold them. A row is its position in the split's stored order (the ``row_id`` an unshuffled
    ``BatchStream`` gives), found in a row group by bisecting the groups' cumulative row counts; the
    last row group read is kept for the next call, so rows asked for in ascending order, a batch at
    a time (a rank's predictions), read each of their row groups once.

    Example::

        stored = StoredRows(meta, "test", ["user_id", "click"])
        stored.take(np.array([5, 6, 7]))     # pa.Table of 3 rows: reads the group(s) holding 5..7
    """

    def __init__(
        self, meta: DatasetMeta, split: str, columns: list[str], days: tuple[int, int] | None = None
    ):
        """``days``: the split's rows of those days only (a data set grown by days), as a stream of
        the same days numbers them."""
        self.groups = meta.row_groups(split, days)
        self.starts = np.cumsum([0, *(group.num_rows for group in self.groups)])  # (G + 1,)
        self.columns = columns
        self._files: dict[str, pq.ParquetFile] = {}
        self._last: tuple[int, pa.Table] | None = None

    def _group(self, index: int) -> pa.Table:
        if self._last is None or self._last[0] != index:
            self._last = (index, read_row_group(self._files, self.groups[index], self.columns))
        return self._last[1]

    def take(self, rows: np.ndarray) -> pa.Table:
        """The stored rows ``rows`` (positions in the split; any order), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return self._group(0).slice(0, 0)
        assert rows.min() >= 0 and rows.max() < self.starts[-1], "rows outside the split"
        group_of = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(group_of, kind="stable")
        groups, firsts, counts = np.unique(group_of[order], return_index=True, return_counts=True)
        pieces = [
            self._group(int(group)).take(rows[order[first : first + count]] - self.starts[group])
            for group, first, count in zip(groups, firsts, counts)
        ]
        table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
        return table if np.all(order[1:] > order[:-1]) else table.take(np.argsort(order))


def iter_row_groups(groups: list[RowGroup], columns: list[str]) -> Iterator[tuple[RowGroup, pa.Table]]:
    """(row group, its ``columns``) for each of ``groups`` in order, each file opened once."""
    files: dict[str, pq.ParquetFile] = {}
    for group in groups:
        yield group, read_row_group(files, group, columns)


def read_row_group(files: dict[str, pq.ParquetFile], group: RowGroup, columns: list[str]) -> pa.Table:
    """The one reader of a stored row group: ``columns`` of ``group`` (its file opened into
    ``files`` on first use), checked against the row count ``metadata.json`` records; a missing
    file or column, or an unreadable group, is a DataError naming the file and group."""
    if group.file not in files:
        files[group.file] = open_parquet(group.file)
    try:
        table = files[group.file].read_row_group(group.index, columns=columns)
    except KeyError as err:
        raise DataError(f"{group.file}: missing column {err} (needed: {columns})") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{group.file}: row group {group.index} cannot be read ({err})") from err
    if table.num_rows != group.num_rows:
        raise DataError(
            f"{group.file}: row group {group.index} has {table.num_rows} rows, metadata.json says {group.num_rows}"
        )
    return table


def count_rows(meta: DatasetMeta, split: str, feature: SparseFeature, num_embeddings: int) -> np.ndarray:
    """How many rows of ``split`` hold each table row of a single-valued ``feature``: (num_embeddings,)
    int64, read one row group and one column at a time (O(table) memory, not O(split))."""
    counts = np.zeros(num_embeddings, dtype=np.int64)
    for _, table in iter_row_groups(meta.row_groups(split), [feature.source_column]):
        values = np.asarray(table.column(0).combine_chunks().fill_null(0), dtype=np.int64)
        counts += np.bincount(map_ids(values, feature, num_embeddings), minlength=num_embeddings)
    return counts
