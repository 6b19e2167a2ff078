"""Decoded rows: Arrow tables of a data set → validated numpy columns → batches.

The one place that turns stored rows into what the model reads, for training (``towerrec.data.reader``),
up-front validation (``towerrec.data.validate``) and serving (``towerrec.serving.catalogue``):

    Arrow table (one row group, a window of them, or a whole split)
        ── decode_rows(table, spec, locator) ──▶ DecodedRows + DecodeReport
            ids: negative → error (or a skipped row), mapped to table rows (``map_ids``);
                 ``id_mapping: dynamic`` ids pass through raw (any int64; a null → ``MISSING_ID``)
            dense: NaN/inf → ``fill_nan`` or error; labels: outside their range → error
            (masked-out rows may have any label); sample weights: finite and >= 0
        ── DecodedRows.take / concat / pad ──▶ shuffled, joined, padded rows
        ── DecodedRows.to_batch(begin, end) ──▶ Batch (the one KeyedJaggedTensor builder)

Every rule names the file, row group, row and column of the first offending row (``RowLocator``);
``collect=True`` reports every rule's first row and count instead of stopping (validation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from towerrec.data.batch import Batch
from towerrec.data.cleaning import string_ids
from towerrec.data.config import MISSING_ID, DataConfig, DenseFeature, SparseFeature
from towerrec.data.dataset import RowGroup
from towerrec.data.errors import DataError
from towerrec.data.jagged import Jagged

HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class LabelSpec:
    """What the decoder needs to know about one task's label."""

    column: str
    mask_column: str | None = None
    min_value: float | None = None
    max_value: float | None = None
    binary: bool = False


@dataclass(frozen=True)
class SampledIds:
    """Ids drawn uniformly from rows [1, num_rows) of a table for every training batch (retrieval's
    sampled negatives): ``count`` of them as feature ``name`` (see ``Batch.with_sampled_ids``)."""

    name: str
    count: int
    num_rows: int
    unpooled: bool


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
    vocabulary_from_metadata: frozenset[str] = frozenset()
    """Features whose table size is the vocabulary ``metadata.json`` records: an id at or above it
    means the metadata does not describe the shards (an error, not an out-of-vocabulary id)."""
    sampled: SampledIds | None = None
    """Ids to draw for every training batch (none for evaluation)."""
    group_column: str | None = None
    """Column of each row's user (integer or string ids), read into ``Batch.group`` for GAUC
    (evaluation streams; None in training)."""

    def columns(self) -> list[str]:
        names = [f.source_column for f in self.sparse] + [f.source_column for f in self.dense]
        for label in self.labels:
            names += [label.column] + ([label.mask_column] if label.mask_column else [])
        if self.sample_weight_column:
            names.append(self.sample_weight_column)
        if self.group_column:
            names.append(self.group_column)
        return list(dict.fromkeys(names))


class TaskLabel(Protocol):
    """What reading needs of a task (``towerrec.models.config.TaskConfig`` is one)."""

    type: str
    mask: str | None
    min_value: float | None
    max_value: float | None

    @property
    def label_column(self) -> str: ...


def read_spec(
    data: DataConfig,
    tasks: Sequence[TaskLabel],
    table_rows: dict[str, int],
    columns: dict | None = None,
    sampled: SampledIds | None = None,
) -> ReadSpec:
    """What the reader needs: the ``data`` section's features and weights, each task's label.
    ``columns`` (``DatasetMeta.columns``) adds what the data set's metadata knows: label ranges a
    task leaves open, and which tables are sized by a recorded vocabulary (ids beyond it are errors)."""
    columns = columns or {}
    labels = []
    for task in tasks:
        info = columns.get(task.label_column, {})
        labels.append(
            LabelSpec(
                column=task.label_column,
                mask_column=task.mask,
                min_value=task.min_value if task.min_value is not None else info.get("min"),
                max_value=task.max_value if task.max_value is not None else info.get("max"),
                binary=task.type == "binary",
            )
        )
    from_metadata = frozenset(
        f.name for f in data.sparse
        if f.num_embeddings is None and f.id_mapping == "vocab" and columns.get(f.source_column, {}).get("num_embeddings")
    )  # fmt: skip
    return ReadSpec(
        sparse=tuple(data.sparse),
        dense=tuple(data.dense),
        labels=tuple(labels),
        num_embeddings=table_rows,
        sample_weight_column=data.sample_weight_column,
        skip_bad_rows=data.bad_rows == "skip",
        vocabulary_from_metadata=from_metadata,
        sampled=sampled,
    )


class RowLocator:
    """Maps a row of a decoded table back to (file, row group, row) for error messages."""

    def __init__(self, parts: list[tuple[RowGroup, int]]):
        self.parts = parts  # (row group, first row read from it)
        self.starts = np.cumsum([0] + [rg.num_rows - first for rg, first in parts[:-1]])

    @property
    def file(self) -> str:
        return self.parts[0][0].file

    def describe(self, row: int) -> str:
        part = int(np.searchsorted(self.starts, row, side="right") - 1)
        rg, first = self.parts[part]
        return f"{rg.file}: row group {rg.index}, row {first + row - int(self.starts[part])}"


@dataclass
class DecodedRows:
    """Decoded, validated rows (numpy, row-major).

    Single-valued ids of all features sit in one (F_single, N) matrix so that shuffling them is one
    gather; each multi-hot feature is a ``Jagged``; ``lengths`` (F, N) holds every feature's bag
    sizes in ``keys`` order (the KeyedJaggedTensor's).
    """

    keys: list[str]  # sparse features, spec order
    multi_hot: list[bool]
    single_ids: np.ndarray  # (F_single, N) int64
    bags: list[Jagged]  # one per multi-hot feature
    lengths: np.ndarray  # (F, N) int32
    dense: np.ndarray  # (N, num_dense) float32
    labels: np.ndarray  # (N, T) float32
    label_mask: np.ndarray  # (N, T) float32
    weights: np.ndarray  # (N,) float32
    row_id: np.ndarray  # (N,) int64
    unpooled: list[bool] | None = None  # per key: looked up unpooled (sequence tables); None: none
    group: np.ndarray | None = None  # (N,) int64: each row's user (ReadSpec.group_column); None: not read

    @property
    def num_rows(self) -> int:
        return len(self.weights)

    @classmethod
    def from_columns(
        cls,
        sparse: dict[str, Jagged],
        multi_hot: dict[str, bool],
        dense: np.ndarray,
        labels: np.ndarray | None = None,
        label_mask: np.ndarray | None = None,
    ) -> DecodedRows:
        """Rows from per-feature ids (already table rows), e.g. constructed (user, item) pairs."""
        keys = list(sparse)
        num_rows = len(dense)
        singles = [sparse[k].values for k in keys if not multi_hot[k]]
        labels = np.zeros((num_rows, 0), np.float32) if labels is None else labels
        return cls(
            keys, [multi_hot[k] for k in keys],
            np.stack(singles).astype(np.int64) if singles else np.zeros((0, num_rows), np.int64),
            [sparse[k] for k in keys if multi_hot[k]],
            np.stack([sparse[k].lengths() for k in keys]).astype(np.int32),
            np.asarray(dense, np.float32), labels,
            np.ones_like(labels) if label_mask is None else label_mask,
            np.ones(num_rows, np.float32), np.arange(num_rows, dtype=np.int64),
        )  # fmt: skip

    def sparse(self, name: str) -> Jagged:
        """Feature ``name``'s ids per row (table rows)."""
        index = self.keys.index(name)
        if self.multi_hot[index]:
            return self.bags[sum(self.multi_hot[:index])]
        return Jagged.single(self.single_ids[index - sum(self.multi_hot[:index])])

    def take(self, rows: np.ndarray) -> DecodedRows:
        """The rows ``rows`` in that order (a permutation, a subset; repeats for padding)."""
        bags = [bag.take(rows) for bag in self.bags]
        lengths = np.ones((len(self.keys), len(rows)), dtype=np.int32)  # a single-valued feature: 1 id a row
        for index, bag in zip((i for i, multi in enumerate(self.multi_hot) if multi), bags):
            np.subtract(bag.offsets[1:], bag.offsets[:-1], out=lengths[index], casting="unsafe")
        return DecodedRows(
            self.keys, self.multi_hot, np.take(self.single_ids, rows, axis=1), bags, lengths,
            np.take(self.dense, rows, axis=0), np.take(self.labels, rows, axis=0),
            np.take(self.label_mask, rows, axis=0), np.take(self.weights, rows), np.take(self.row_id, rows),
            self.unpooled, None if self.group is None else np.take(self.group, rows),
        )  # fmt: skip

    @staticmethod
    def concat(parts: Sequence[DecodedRows]) -> DecodedRows:
        """The rows of ``parts`` one after the other."""
        first = parts[0]
        return DecodedRows(
            first.keys, first.multi_hot,
            np.concatenate([p.single_ids for p in parts], axis=1),
            [Jagged.concat([p.bags[f] for p in parts]) for f in range(len(first.bags))],
            np.concatenate([p.lengths for p in parts], axis=1),
            np.concatenate([p.dense for p in parts]), np.concatenate([p.labels for p in parts]),
            np.concatenate([p.label_mask for p in parts]), np.concatenate([p.weights for p in parts]),
            np.concatenate([p.row_id for p in parts]), first.unpooled,
            None if first.group is None else np.concatenate([p.group for p in parts]),
        )  # fmt: skip

    def padding(self, num_rows: int) -> DecodedRows:
        """``num_rows`` copies of row 0 that carry no weight, no label and ``row_id`` -1."""
        padded = self.take(np.zeros(num_rows, dtype=np.int64))
        padded.weights[:] = 0
        padded.label_mask[:] = 0
        padded.row_id[:] = -1
        return padded

    def to_batch(self, begin: int = 0, end: int | None = None) -> Batch:
        """Rows [begin, end) as a Batch: the pooled features' ids as one KeyedJaggedTensor, those of
        sequence tables (unpooled) as another (``Batch.sequences``)."""
        end = self.num_rows if end is None else end
        unpooled = self.unpooled or [False] * len(self.keys)
        groups: dict[bool, tuple[list, list, list]] = {False: ([], [], []), True: ([], [], [])}
        single = multi = 0
        for index, is_multi in enumerate(self.multi_hot):
            keys, values, lengths = groups[unpooled[index]]
            if is_multi:
                bag = self.bags[multi]
                values.append(bag.values[bag.offsets[begin] : bag.offsets[end]])
                multi += 1
            else:
                values.append(self.single_ids[single, begin:end])
                single += 1
            keys.append(self.keys[index])
            lengths.append(self.lengths[index, begin:end])

        def jagged(group: bool) -> KeyedJaggedTensor | None:
            keys, values, lengths = groups[group]
            if group and not keys:
                return None
            return KeyedJaggedTensor(
                keys=keys,
                values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
                lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
                stride=end - begin,
            )

        return Batch(
            sparse=jagged(False),
            dense=torch.from_numpy(self.dense[begin:end]),
            labels=torch.from_numpy(self.labels[begin:end]),
            label_mask=torch.from_numpy(self.label_mask[begin:end]),
            weights=torch.from_numpy(self.weights[begin:end]),
            row_id=torch.from_numpy(self.row_id[begin:end]),
            sequences=jagged(True),
            group=None if self.group is None else torch.from_numpy(self.group[begin:end]),
        )

    def drop_bag_ids(self, features: Sequence[SparseFeature], rng: np.random.Generator) -> DecodedRows:
        """Leaves out each id of a multi-hot bag with its feature's ``train_drop_prob`` (in place)."""
        multi_index = 0
        for index, feature in enumerate(features):
            if not feature.multi_hot:
                continue
            if feature.train_drop_prob > 0:
                bag = self.bags[multi_index]
                kept = rng.random(len(bag.values)) >= feature.train_drop_prob
                kept_before = np.zeros(len(bag.values) + 1, dtype=np.int64)
                np.cumsum(kept, out=kept_before[1:])
                self.bags[multi_index] = Jagged(bag.values[kept], kept_before[bag.offsets])
                self.lengths[index] = np.diff(self.bags[multi_index].offsets)
            multi_index += 1
        return self


@dataclass
class DecodeReport:
    """What the rules found: each broken rule's first row, count and message; rows to skip; per
    ``vocab`` feature, its ids read and those at or above its table size (read as row 0)."""

    problems: list[str] = field(default_factory=list)
    bad_rows: int = 0
    ids_out_of_range: dict[str, int] = field(default_factory=dict)
    ids_read: dict[str, int] = field(default_factory=dict)


@dataclass
class OutOfRangeIds:
    """Per ``vocab`` feature: ids read and ids at or above its ``num_embeddings``, which are read
    as row 0 (the out-of-vocabulary row), summed over row groups, windows (and ranks, by the caller)."""

    found: dict[str, int] = field(default_factory=dict)
    read: dict[str, int] = field(default_factory=dict)

    def add(self, report: DecodeReport | OutOfRangeIds) -> None:
        found = report.ids_out_of_range if isinstance(report, DecodeReport) else report.found
        read = report.ids_read if isinstance(report, DecodeReport) else report.read
        for name, count in read.items():
            self.read[name] = self.read.get(name, 0) + count
            self.found[name] = self.found.get(name, 0) + found.get(name, 0)

    def describe(self, num_embeddings: dict[str, int]) -> list[str]:
        """One text per feature with ids out of range: ``user_id: 12 of 3,000 ids (0.40%) >= 1,000``."""
        return [
            f"{name}: {count:,} of {self.read[name]:,} ids ({count / self.read[name]:.2%}) >= {num_embeddings[name]:,}"
            for name, count in sorted(self.found.items())
            if count
        ]

    def check(self, max_fraction: float, num_embeddings: dict[str, int], where: str) -> None:
        """Stops (``DataError``) at the first feature whose ids out of range are more than
        ``max_fraction`` of its ids (``data.max_out_of_range_fraction``)."""
        for name, count in sorted(self.found.items()):
            if count > max_fraction * self.read[name]:
                size = num_embeddings[name]
                raise DataError(
                    f"{where}: {count:,} of the {self.read[name]:,} ids of feature {name!r} "
                    f"({count / self.read[name]:.2%}) are at or above its num_embeddings ({size:,}) and would be "
                    f"read as row 0, more than data.max_out_of_range_fraction ({max_fraction:g}) allows: raise the "
                    "feature's num_embeddings (null: the vocabulary's size) or data.max_out_of_range_fraction"
                )


def map_ids(values: np.ndarray, feature: SparseFeature, num_embeddings: int) -> np.ndarray:
    """Raw ids → table rows, as training reads them (``vocab``: out of range → row 0; ``hash``;
    ``dynamic``: the raw ids themselves, mapped in the model by ``towerrec.models.dynamic_ids``)."""
    if feature.id_mapping == "dynamic":
        return values
    if feature.id_mapping == "hash":
        mixed = values.astype(np.uint64) * HASH_MULTIPLIER
        return ((mixed >> np.uint64(17)) % np.uint64(num_embeddings)).astype(np.int64)
    return np.where(values < num_embeddings, values, 0)


class _Rules:
    """Applies the row rules: raises at the first broken one, or (``collect``) records them all."""

    def __init__(self, locator: RowLocator, num_rows: int, skip_bad_rows: bool, collect: bool):
        self.locator, self.skip, self.collect = locator, skip_bad_rows, collect
        self.bad = np.zeros(num_rows, dtype=bool)
        self.report = DecodeReport()

    def check(self, broken: np.ndarray, message: Callable[[int], str], skippable: bool = True) -> None:
        """``broken``: (N,) bool of the rows breaking a rule; ``message(row)`` describes the first."""
        if not broken.any():
            return
        row = int(np.flatnonzero(broken)[0])
        if skippable and self.skip:
            self.bad |= broken
            return
        text = f"{self.locator.describe(row)}: {message(row)}"
        if not self.collect:
            raise DataError(text)
        count = int(broken.sum())
        self.report.problems.append(text + (f" ({count} rows like it)" if count > 1 else ""))


def _column(table: pa.Table, name: str, locator: RowLocator) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(f"{locator.file}: missing column {name!r}")
    return table.column(name)


def _wrong_id_type(feature: SparseFeature, kind, locator: RowLocator, what: str = "integer ids") -> DataError:
    dynamic = (
        f" (feature {feature.name!r}, id_mapping: dynamic: text ids are hashed to int64 when `towerrec prepare` "
        "builds the data set from data.prepare; a data set written otherwise must store int64 ids)"
        if feature.id_mapping == "dynamic"
        else ""
    )
    return DataError(
        f"{locator.file}: column {feature.source_column!r} has type {kind}, expected {what}{dynamic}"
    )


def _ints(column, feature: SparseFeature, locator: RowLocator) -> np.ndarray:
    if not pa.types.is_integer(column.type):
        raise _wrong_id_type(feature, column.type, locator)
    if column.null_count:
        column = column.fill_null(MISSING_ID if feature.id_mapping == "dynamic" else 0)
    return np.asarray(column.to_numpy(), dtype=np.int64)


def floats(column, name: str, locator: RowLocator) -> np.ndarray:
    """A numeric (or boolean) column as float32; nulls become NaN."""
    if not (
        pa.types.is_floating(column.type)
        or pa.types.is_integer(column.type)
        or pa.types.is_boolean(column.type)
    ):
        raise DataError(f"{locator.file}: column {name!r} has type {column.type}, expected numbers")
    if column.null_count:
        column = column.cast(pa.float32()).fill_null(float("nan"))
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float32)


def group_ids(column, name: str, locator: RowLocator) -> np.ndarray:
    """A user column as int64 group ids: integers as they are, strings by their 64-bit hash
    (``cleaning.string_ids``, as preparation hashes string ids); nulls are group 0."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = string_ids(column)
    elif not pa.types.is_integer(column.type):
        raise DataError(
            f"{locator.file}: column {name!r} has type {column.type}, expected integer or string user ids"
        )
    return np.array(column.fill_null(0).to_numpy(), dtype=np.int64)  # a copy: batches hand it to torch


def flags(column, name: str, locator: RowLocator) -> np.ndarray:
    """A mask-like column as booleans: true where the value is finite and non-zero (null: false)."""
    values = floats(column, name, locator)
    return np.isfinite(values) & (values != 0)


def _rows_holding(
    selected: np.ndarray, row_of_value: np.ndarray, values: np.ndarray, num_rows: int
) -> tuple[np.ndarray, dict[int, int]]:
    """The rows holding a ``selected`` value, and each such row's first selected value."""
    broken = np.zeros(num_rows, dtype=bool)
    broken[row_of_value[selected]] = True
    first = {int(r): int(v) for r, v in zip(row_of_value[selected][::-1], values[selected][::-1])}
    return broken, first


def decode_rows(
    table: pa.Table, spec: ReadSpec, locator: RowLocator, first_row_id: int = 0, collect: bool = False
) -> tuple[DecodedRows, DecodeReport]:
    """Decodes and validates ``table`` (see the module docstring). Rows that break a rule stop the
    read with the file, row group, row and column named; with ``spec.skip_bad_rows`` they get
    weight 0 and no label and are counted; with ``collect`` every broken rule is reported in
    ``DecodeReport.problems`` instead (nothing is raised for values)."""
    num_rows = table.num_rows
    rules = _Rules(locator, num_rows, spec.skip_bad_rows, collect)
    single_ids = np.empty((sum(not f.multi_hot for f in spec.sparse), num_rows), dtype=np.int64)
    bags: list[Jagged] = []
    lengths = np.ones((len(spec.sparse), num_rows), dtype=np.int32)
    sequence_lengths: dict[str, np.ndarray] = {}
    for index, feature in enumerate(spec.sparse):
        column = _column(table, feature.source_column, locator)
        if feature.multi_hot:
            if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
                raise _wrong_id_type(feature, column.type, locator, "a list of integer ids (multi_hot: true)")
            bag = Jagged.from_arrow(column)
            if not np.issubdtype(bag.values.dtype, np.integer):
                raise _wrong_id_type(feature, column.type, locator, "a list of integer ids")
            if feature.sequence:
                bag = most_recent(bag, feature.max_length)
                sequence_lengths[feature.name] = bag.lengths()
            values = bag.values.astype(np.int64)
            lengths[index] = bag.lengths()
            row_of_value = np.repeat(np.arange(num_rows), lengths[index])
        else:
            values = _ints(column, feature, locator)
            row_of_value = np.arange(num_rows)
        negative = values < 0
        if feature.id_mapping != "dynamic" and negative.any():
            broken, first_value = _rows_holding(negative, row_of_value, values, num_rows)
            rules.check(
                broken,
                lambda row, ids=first_value, f=feature: (
                    f"column {f.source_column!r} has negative id {ids[row]}"
                ),
            )
            values = np.where(negative, 0, values)
        size = spec.num_embeddings[feature.name]
        if feature.id_mapping == "vocab":
            rules.report.ids_read[feature.name] = len(values)
            outside = values >= size
            if outside.any():
                rules.report.ids_out_of_range[feature.name] = int(outside.sum())
                if feature.name in spec.vocabulary_from_metadata:
                    broken, first_id = _rows_holding(outside, row_of_value, values, num_rows)
                    rules.check(
                        broken,
                        lambda row, ids=first_id, f=feature, n=size: (
                            f"column {f.source_column!r} has id {ids[row]}, "
                            f"but metadata.json gives its vocabulary {n} rows (ids 0..{n - 1}): the metadata does "
                            "not describe these shards"
                        ),
                        skippable=False,
                    )
        values = map_ids(values, feature, size)
        if feature.multi_hot:
            bags.append(Jagged(values, bag.offsets))
        else:
            single_ids[index - len(bags)] = values

    for feature in spec.sparse:
        if feature.align_with and feature.align_with in sequence_lengths:
            mine, theirs = sequence_lengths[feature.name], sequence_lengths[feature.align_with]
            rules.check(
                mine != theirs,
                lambda row, f=feature, a=mine, b=theirs: (
                    f"column {f.source_column!r} has {a[row]} ids but the sequence it is aligned with, "
                    f"{f.align_with!r}, has {b[row]} (after keeping the last {f.max_length})"
                ),
                skippable=False,
            )

    dense = np.empty((num_rows, len(spec.dense)), dtype=np.float32)
    for j, feature in enumerate(spec.dense):
        values = floats(_column(table, feature.source_column, locator), feature.source_column, locator)
        non_finite = ~np.isfinite(values)
        if non_finite.any():
            if feature.fill_nan is not None:
                values = np.where(non_finite, np.float32(feature.fill_nan), values)
            else:
                rules.check(
                    non_finite,
                    lambda row, v=values, f=feature: (
                        f"column {f.source_column!r} has non-finite value {v[row]} "
                        f"(set fill_nan for data.dense feature {f.name!r} to replace it)"
                    ),
                )
                values = np.where(non_finite, 0, values)
        dense[:, j] = values

    labels = np.empty((num_rows, len(spec.labels)), dtype=np.float32)
    label_mask = np.ones((num_rows, len(spec.labels)), dtype=np.float32)
    counted_by_mask: dict[str, np.ndarray] = {}  # tasks often share a mask column (e.g. rated)
    for j, label in enumerate(spec.labels):
        values = floats(_column(table, label.column, locator), label.column, locator)
        counted = np.ones(num_rows, dtype=bool)
        if label.mask_column:
            if label.mask_column not in counted_by_mask:
                column = _column(table, label.mask_column, locator)
                counted_by_mask[label.mask_column] = flags(column, label.mask_column, locator)
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
        rules.check(
            invalid,
            lambda row, v=values, c=label.column, a=allowed: (
                f"label column {c!r} has value {v[row]} outside {a}"
                if np.isfinite(v[row])
                else f"label column {c!r} has no value (null or NaN), expected one in {a}"
            ),
        )
        labels[:, j] = np.where(invalid, 0, values)

    if spec.sample_weight_column:
        name = spec.sample_weight_column
        weights = floats(_column(table, name, locator), name, locator)
        invalid = ~np.isfinite(weights) | (weights < 0)
        rules.check(  # a weight is not a row to skip: it decides how much every row counts
            invalid,
            lambda row: (
                f"sample weight column {name!r} has invalid value {weights[row]} (must be finite and >= 0)"
            ),
            skippable=False,
        )
        weights = np.where(invalid, 0, weights).astype(np.float32)
    else:
        weights = np.ones(num_rows, dtype=np.float32)
    if rules.bad.any():
        rules.report.bad_rows = int(rules.bad.sum())
        label_mask[rules.bad] = 0
        weights = np.where(rules.bad, 0, weights).astype(np.float32)
    row_id = np.arange(first_row_id, first_row_id + num_rows, dtype=np.int64)
    sequence_tables = {f.table_name for f in spec.sparse if f.sequence}
    group = None
    if spec.group_column:
        group = group_ids(_column(table, spec.group_column, locator), spec.group_column, locator)
    rows = DecodedRows(
        [f.name for f in spec.sparse], [f.multi_hot for f in spec.sparse],
        single_ids, bags, lengths, dense, labels, label_mask, weights, row_id,
        [f.table_name in sequence_tables for f in spec.sparse] if sequence_tables else None, group,
    )  # fmt: skip
    return rows, rules.report


def most_recent(rows: Jagged, max_length: int) -> Jagged:
    """Each row's last ``max_length`` values (a sequence is stored oldest first)."""
    lengths = rows.lengths()
    if not len(lengths) or lengths.max() <= max_length:
        return rows
    kept = np.minimum(lengths, max_length)
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(kept, out=offsets[1:])
    starts = np.repeat(rows.offsets[1:] - kept - offsets[:-1], kept)
    return Jagged(rows.values[np.arange(offsets[-1]) + starts], offsets)
