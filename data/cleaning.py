"""Row cleaning used by the converters: exact de-duplication, missing values, dense outliers.

Rules, applied chunk by chunk in this order (each counted in :attr:`Cleaner.report`):

1. **labels**: a row whose label is missing (null/NaN) is dropped; a label outside its range
   (``click`` not in {0, 1}, a rating outside [min, max]) is an error naming file, column and row.
2. **duplicates**: a row equal to an earlier row in every column is dropped. Rows are compared by a
   64-bit hash (:func:`row_hashes`), kept in :class:`SeenHashes`: 8 bytes per distinct row, so a
   45M-row file needs about 360 MB (``data.prepare.dedup: false`` turns the rule off). Two distinct
   rows collide with probability about ``n**2 / 2**65`` (1e-4 for 45M rows).
3. **missing features**: a null sparse/multi-hot id becomes the out-of-vocabulary row 0 (``fill``)
   or drops the row (``drop``); a null/NaN dense value becomes ``dense_fill`` (``fill``) or drops
   the row (``drop``).

Dense transforms are applied after the split is known (:class:`DenseTransforms`): per column
``log(1 + max(x, 0))``, clipping (fixed, or at quantiles of the training rows), standardisation
(mean and std of the training rows) and bucketisation into ids, fitted on a bounded, seeded sample
of the training rows (:class:`BottomKSample`). :func:`describe_report` turns the counts into the
lines ``towerrec prepare`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from towerrec.data.dataset import DataError
from towerrec.data.jagged import list_parts

NULL_HASH = np.uint64(0x5BD1E9955BD1E995)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# --------------------------------------------------------------------------------------------- hashing
def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-mixing map of uint64 → uint64 (vectorized)."""
    z = np.asarray(values, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _segment_sums(terms: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum (mod 2**64) of ``terms[offsets[i]:offsets[i+1]]`` for every i; empty segments give 0."""
    cumulative = np.zeros(len(terms) + 1, dtype=np.uint64)
    np.cumsum(terms, out=cumulative[1:])
    return cumulative[offsets[1:]] - cumulative[offsets[:-1]]


def string_hashes(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hash of every string (uint64; null → ``NULL_HASH``), vectorized over the bytes.

    Each byte contributes ``mix64(byte << 32 | position)`` and the sum is mixed with the length, so
    two strings share a hash only by a 64-bit accident.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = array.cast(pa.large_binary())
    num = len(array)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + num + 1]
    data_buffer = array.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    data = data[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    position = np.arange(len(data), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    terms = mix64((data.astype(np.uint64) << np.uint64(32)) | position.astype(np.uint64))
    hashes = mix64(_segment_sums(terms, offsets) + lengths.astype(np.uint64) * _GOLDEN)
    if array.null_count:
        hashes[np.asarray(array.is_null())] = NULL_HASH
    return hashes


def string_ids(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Strings → ``int64`` ids (the 64-bit hash reinterpreted); nulls stay null."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    ids = string_hashes(array).view(np.int64)
    mask = np.asarray(array.is_null()) if array.null_count else None
    return pa.array(ids, mask=mask)


def column_hashes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """One uint64 hash per row of any column: numbers, booleans, strings, lists (nulls hash alike)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        flat, offsets = list_parts(column)
        flat_hashes = column_hashes(flat)
        lengths = np.diff(offsets)
        position = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        terms = mix64(flat_hashes ^ mix64(position.astype(np.uint64) + _GOLDEN))
        hashes = mix64(_segment_sums(terms, offsets) + lengths.astype(np.uint64) * _GOLDEN)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        return string_hashes(column)
    elif pa.types.is_floating(kind):
        values = np.asarray(column.cast(pa.float64()).fill_null(0.0), dtype=np.float64) + 0.0  # -0.0 → 0.0
        values[np.isnan(values)] = np.nan  # one NaN bit pattern
        hashes = mix64(values.view(np.uint64))
    elif pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        values = np.asarray(column.cast(pa.int64()).fill_null(0), dtype=np.int64)
        hashes = mix64(values.view(np.uint64) ^ _M2)
    else:
        return string_hashes(column.cast(pa.string()))
    if column.null_count:
        hashes[np.asarray(column.is_null())] = NULL_HASH
    return hashes


def row_hashes(table: pa.Table) -> np.ndarray:
    """One uint64 hash per row over all columns (order matters), for exact de-duplication."""
    hashes = np.full(table.num_rows, _GOLDEN, dtype=np.uint64)
    for column in table.columns:
        hashes = mix64(hashes * _M1 + column_hashes(column))
    return hashes


class SeenHashes:
    """A set of uint64 hashes as a few sorted numpy arrays of geometrically shrinking size.

    ``first_occurrences`` is vectorized: membership is a binary search per level (O(log n) levels)
    and inserting merges levels like a log-structured merge tree, so n inserts cost O(n log n).
    Memory: 8 bytes per distinct hash (twice that for a moment while the largest levels merge).
    """

    def __init__(self) -> None:
        self.levels: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(level) for level in self.levels)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(len(hashes), dtype=bool)
        for level in self.levels:
            pos = np.minimum(np.searchsorted(level, hashes), len(level) - 1)
            found |= level[pos] == hashes
        return found

    def first_occurrences(self, hashes: np.ndarray) -> np.ndarray:
        """Mask of the rows whose hash was never seen (before, or earlier in ``hashes``); adds them."""
        unique, first_index = np.unique(hashes, return_index=True)
        new = ~self.contains(unique)
        keep = np.zeros(len(hashes), dtype=bool)
        keep[first_index[new]] = True
        if new.any():
            self.levels.append(unique[new])
            while len(self.levels) > 1 and len(self.levels[-2]) <= 2 * len(self.levels[-1]):
                last = self.levels.pop()
                self.levels[-1] = np.sort(np.concatenate([self.levels[-1], last]))
        return keep


# --------------------------------------------------------------------------------------------- sampling
class BottomKSample:
    """A seeded uniform sample of at most ``capacity`` values from a stream, in bounded memory.

    Every value gets a pseudo-random priority from its global row index; the ``capacity`` values
    with the smallest priorities are kept. With fewer rows than ``capacity`` the sample is the
    whole stream, so quantiles are exact on small data and approximate (to about
    ``1/sqrt(capacity)``) on huge data.
    """

    def __init__(self, capacity: int = 1_000_000, seed: int = 0):
        self.capacity = capacity
        self.salt = mix64(np.array([seed], dtype=np.uint64) + _GOLDEN)[0]
        self.priorities = np.zeros(0, dtype=np.uint64)
        self.values = np.zeros(0, dtype=np.float64)

    def add(self, values: np.ndarray, row_index: np.ndarray) -> None:
        priorities = mix64(row_index.astype(np.uint64) ^ self.salt)
        self.priorities = np.concatenate([self.priorities, priorities])
        self.values = np.concatenate([self.values, np.asarray(values, dtype=np.float64)])
        if len(self.values) > 2 * self.capacity:
            self._shrink()

    def _shrink(self) -> None:
        if len(self.values) > self.capacity:
            keep = np.argpartition(self.priorities, self.capacity - 1)[: self.capacity]
            self.priorities, self.values = self.priorities[keep], self.values[keep]

    def quantile(self, q: float | np.ndarray) -> np.ndarray | float:
        self._shrink()
        if len(self.values) == 0:
            raise ValueError("quantile of an empty sample")
        return np.quantile(self.values, q)


# --------------------------------------------------------------------------------------------- cleaner
@dataclass
class TableSchema:
    """Column kinds of a normalized input table (see ``towerrec.data.formats``) plus label constraints."""

    kinds: dict[str, str]
    """Column → ``sparse``, ``multi_hot``, ``dense``, ``label`` or ``other`` (output order)."""
    label_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Label column → inclusive (min, max)."""
    binary_labels: tuple[str, ...] = ()
    """Labels that must be exactly 0 or 1."""
    user_column: str | None = None
    """Column that identifies the user (for ``user`` and ``leave_last_out`` splits)."""
    time_column: str | None = None
    """Column ordering interactions in time (for ``time``/``leave_last_out``; default: row order)."""
    dense_specs: dict[str, DenseSpec] = field(default_factory=dict)
    """Dense column → its transforms (see ``DenseTransforms``)."""
    dense_fill: dict[str, float] = field(default_factory=dict)
    """Dense column → the value of a missing cell (else ``missing_dense`` decides)."""
    buckets: dict[str, BucketSpec] = field(default_factory=dict)
    """Bucketised id column (output) → its numeric input column and edges."""
    delimiters: dict[str, str] = field(default_factory=dict)
    """Multi-hot column → separator inside a string cell."""
    split_column: str | None = None
    """Column naming each row's split (``given`` split)."""
    item_side: tuple[str, ...] = ()
    """Columns that describe the item (``side: item`` features): a sampled negative takes them
    from its sampled item (``negatives_per_positive``; empty without)."""
    dynamic_ids: tuple[str, ...] = ()
    """Id columns stored as raw int64 ids (``id_mapping: dynamic``): no vocabulary, text hashed."""

    def of_kind(self, *kinds: str) -> list[str]:
        return [name for name, kind in self.kinds.items() if kind in kinds]


@dataclass
class Cleaner:
    """Applies the cleaning rules to normalized chunks; one instance per pass over the input.

    Example::

        cleaner = Cleaner(schema, dedup=True, missing_sparse="fill", missing_dense="fill")
        table, row_index = cleaner.clean(chunk, row_index, where="ratings.csv")
        cleaner.report   # {"rows_in": ..., "duplicates_dropped": ..., ...}
    """

    schema: TableSchema
    dedup: bool = True
    missing_sparse: str = "fill"
    missing_dense: str = "fill"
    dense_fill: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in (("missing_sparse", self.missing_sparse), ("missing_dense", self.missing_dense)):
            if value not in ("fill", "drop"):
                raise ValueError(f"data.prepare.{key}: {value!r} is not one of fill, drop")
        self.seen = SeenHashes()
        self.filled: dict[str, np.ndarray] = {}
        self.report = {
            "rows_in": 0,
            "label_missing_dropped": {},
            "duplicates_dropped": 0,
            "sparse_missing_filled": {},
            "multi_hot_missing_empty": {},
            "sparse_missing_dropped": {},
            "dense_missing_filled": {},
            "dense_missing_dropped": {},
            "rows_out": 0,
        }

    def _count(self, rule: str, column: str, num: int) -> None:
        counts = self.report[rule]
        counts[column] = counts.get(column, 0) + int(num)

    def clean(
        self, table: pa.Table, row_index: np.ndarray, where: str, first_row: int = 0
    ) -> tuple[pa.Table, np.ndarray]:
        """Returns the kept rows and their source row indices.

        ``where`` names the file in errors and ``first_row`` is the row index of its first row, so
        errors give the row within that file.
        """
        self.report["rows_in"] += table.num_rows
        keep = np.ones(table.num_rows, dtype=bool)
        for name in self.schema.of_kind("label"):
            values = np.asarray(table.column(name).cast(pa.float64()).fill_null(np.nan), dtype=np.float64)
            missing = np.isnan(values)
            self._count("label_missing_dropped", name, missing.sum())
            keep &= ~missing
            low, high = self.schema.label_ranges.get(name, (-np.inf, np.inf))
            if name in self.schema.binary_labels:
                bad, allowed = ~missing & (values != 0) & (values != 1), "{0, 1}"
            else:
                bad, allowed = (
                    ~missing & ((values < low) | (values > high) | np.isinf(values)),
                    f"[{low}, {high}]",
                )
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"{where}: row {int(row_index[row]) - first_row}, column {name!r}: label value {values[row]} outside {allowed}"
                    f" ({int(bad.sum())} such rows in this chunk)"
                )
        if self.dedup:
            first = self.seen.first_occurrences(row_hashes(table))
            self.report["duplicates_dropped"] += int((keep & ~first).sum())
            keep &= first
        for name in self.schema.of_kind("sparse", "multi_hot"):
            missing = np.asarray(table.column(name).is_null())
            if self.missing_sparse == "drop":
                self._count("sparse_missing_dropped", name, (keep & missing).sum())
                keep &= ~missing
            elif name in self.schema.of_kind("multi_hot"):
                self._count("multi_hot_missing_empty", name, (keep & missing).sum())
            else:
                self._count("sparse_missing_filled", name, (keep & missing).sum())
        dense_columns, missing_dense = {}, {}
        for name in self.schema.of_kind("dense"):
            values = np.asarray(table.column(name).cast(pa.float64()).fill_null(np.nan), dtype=np.float64)
            missing = np.isnan(values)
            if self.missing_dense == "drop" and name not in self.schema.dense_fill:
                self._count("dense_missing_dropped", name, (keep & missing).sum())
                keep &= ~missing
            else:
                self._count("dense_missing_filled", name, (keep & missing).sum())
                values = np.where(missing, self.schema.dense_fill.get(name, self.dense_fill), values)
                missing_dense[name] = missing
            dense_columns[name] = values
        for name, values in dense_columns.items():
            table = table.set_column(table.column_names.index(name), name, pa.array(values))
        if not keep.all():
            table = table.filter(pa.array(keep))
            row_index = row_index[keep]
        # which filled values were missing, for this chunk's kept rows (a bucketised copy of a
        # number gives them the missing id 0, not the fill's bucket)
        self.filled = {name: missing[keep] for name, missing in missing_dense.items()}
        self.report["rows_out"] += table.num_rows
        return table, row_index


# --------------------------------------------------------------------------------------------- dense
@dataclass
class DenseSpec:
    """One dense column's preparation, in this order: ``log1p``, clip (fixed ``clip`` or training
    ``clip_quantile``), ``standardize`` (training mean and std)."""

    log1p: bool = False
    clip: tuple[float, float] | None = None
    clip_quantile: float | None = None
    standardize: bool = False


@dataclass
class BucketSpec:
    """A numeric input column bucketised into ids: fixed ``edges`` or ``num_buckets`` training quantiles."""

    source: str
    edges: list[float] | None = None
    num_buckets: int | None = None


def quantile_edges(values: np.ndarray, num_buckets: int) -> list[float]:
    """Ascending edges: the ``num_buckets`` training quantiles, and where a value holds
    more than one bucket's share (the zeros of ``capital_gains``) and collapses several quantiles
    into one edge, the edges left over go to quantiles of the other values, so a mostly-zero column
    still splits its non-zero part."""
    cuts = np.linspace(0, 1, num_buckets + 1)[1:-1]
    edges = set(float(q) for q in np.quantile(values, cuts))
    spare = num_buckets - 1 - len(edges)
    if spare > 0:
        distinct, counts = np.unique(values, return_counts=True)
        heavy = distinct[counts > len(values) / num_buckets]
        rest = values[~np.isin(values, heavy)]
        if len(rest):
            extra = np.quantile(rest, np.linspace(0, 1, spare + 2)[1:-1])
            edges |= set(float(q) for q in extra)
            for v in heavy:  # each heavy value gets a bucket of its own
                above = rest[rest > v]
                edges.add(float(v))
                if len(above):
                    edges.add(float((v + above.min()) / 2))
    return sorted(edges)


class DenseTransforms:
    """Per-column dense transforms and bucketisation, fitted on a seeded sample of the training rows
    (``BottomKSample``: exact up to a million training rows, a uniform sample above).

    ``observe`` feeds training rows; ``finish_fit`` fixes quantile bounds, means, standard
    deviations and bucket edges; ``apply`` / ``bucketize`` transform any split. ``steps(name)``
    describes what was applied (``metadata.json`` and the serving artifact replay it on raw values).
    """

    def __init__(self, specs: dict[str, DenseSpec], buckets: dict[str, BucketSpec], seed: int = 0):
        self.specs, self.buckets = specs, buckets
        fitted = {n for n, s in specs.items() if s.clip_quantile or s.standardize}
        fitted |= {b.source for b in buckets.values() if b.num_buckets}
        self.samples = {name: BottomKSample(seed=seed) for name in fitted}
        self.bounds: dict[str, tuple[float, float]] = {n: tuple(s.clip) for n, s in specs.items() if s.clip}
        self.moments: dict[str, tuple[float, float]] = {}
        self.edges: dict[str, list[float]] = {n: list(b.edges) for n, b in buckets.items() if b.edges}
        self.report: dict[str, Any] = {"clipped": {}}

    @classmethod
    def fitted(cls, specs: dict[str, DenseSpec], buckets: dict[str, BucketSpec], report: dict[str, Any]):
        """The transforms an earlier preparation fitted, from its report (``metadata.json``'s
        ``report.dense``): nothing is fitted again."""
        transforms = cls(specs, buckets)
        transforms.samples = {}
        transforms.bounds.update(
            {n: (float(lo), float(hi)) for n, (lo, hi) in report.get("clip_bounds", {}).items()}
        )
        transforms.moments = {
            n: (float(m), float(sd)) for n, (m, sd) in report.get("standardized", {}).items()
        }
        transforms.edges.update({n: list(e) for n, e in report.get("bucket_edges", {}).items()})
        return transforms

    @property
    def needs_fit(self) -> bool:
        return bool(self.samples)

    def _log(self, name: str, values: np.ndarray) -> np.ndarray:
        spec = self.specs.get(name)
        return np.log1p(np.maximum(values, 0.0)) if spec is not None and spec.log1p else values

    def observe(self, name: str, values: np.ndarray, row_index: np.ndarray) -> None:
        if name in self.samples:
            keep = np.isfinite(values)
            self.samples[name].add(values[keep], row_index[keep])

    def finish_fit(self) -> None:
        for name, spec in self.specs.items():
            if name not in self.samples or not len(self.samples[name].values):
                continue
            sample = self._log(name, self.samples[name].values)
            if spec.clip_quantile:
                low, high = np.quantile(sample, [1 - spec.clip_quantile, spec.clip_quantile])
                self.bounds[name] = (float(low), float(high))
            if name in self.bounds:
                sample = np.clip(sample, *self.bounds[name])
            if spec.standardize:
                std = float(sample.std())
                self.moments[name] = (float(sample.mean()), std if std > 0 else 1.0)
        for name, bucket in self.buckets.items():
            if (
                bucket.num_buckets
                and bucket.source in self.samples
                and len(self.samples[bucket.source].values)
            ):
                self.edges[name] = quantile_edges(self.samples[bucket.source].values, bucket.num_buckets)
        self.report["clip_bounds"] = {name: list(bounds) for name, bounds in self.bounds.items()}
        self.report["standardized"] = {name: list(m) for name, m in self.moments.items()}
        self.report["bucket_edges"] = dict(self.edges)

    def apply(self, name: str, values: np.ndarray) -> np.ndarray:
        values = self._log(name, values)
        if name in self.bounds:
            low, high = self.bounds[name]
            clipped = (values < low) | (values > high)
            counts = self.report["clipped"]
            counts[name] = counts.get(name, 0) + int(clipped.sum())
            values = np.clip(values, low, high)
        if name in self.moments:
            mean, std = self.moments[name]
            values = (values - mean) / std
        return values

    def bucketize(self, name: str, values: np.ndarray) -> np.ndarray:
        """Bucket ids: 0 for a missing value, 1..len(edges)+1 for the intervals."""
        edges = np.asarray(self.edges.get(name, []), dtype=np.float64)
        ids = np.searchsorted(edges, values, side="right") + 1
        return np.where(np.isfinite(values), ids, 0).astype(np.int64)

    def num_buckets(self, name: str) -> int:
        return len(self.edges.get(name, [])) + 2

    def steps(self, name: str) -> list[dict[str, Any]]:
        """The transform of column ``name`` as serving replays it on a raw value."""
        out: list[dict[str, Any]] = []
        spec = self.specs.get(name)
        if spec is not None and spec.log1p:
            out.append({"op": "log1p"})
        if name in self.bounds:
            out.append({"op": "clip", "low": self.bounds[name][0], "high": self.bounds[name][1]})
        if name in self.moments:
            out.append({"op": "standardize", "mean": self.moments[name][0], "std": self.moments[name][1]})
        return out


def dense_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as float64 numpy (nulls → NaN)."""
    return np.asarray(pc.fill_null(column.cast(pa.float64()), np.nan), dtype=np.float64)


def describe_report(report: dict[str, Any]) -> list[str]:
    """The cleaning and transform counts of a preparation as lines for the user (every rule that
    changed or dropped a row, with its count; nothing happens to the data unannounced)."""
    lines = []
    for folder in report.get("removed_partials", []):
        lines.append(f"removed {folder}, left by a preparation that was interrupted")
    cleaning = report.get("cleaning", {})
    if cleaning:
        lines.append(f"rows read: {cleaning.get('rows_in', 0):,}; rows kept: {cleaning.get('rows_out', 0):,}")
    labels = {k: v for k, v in cleaning.get("label_missing_dropped", {}).items() if v}
    for name, count in labels.items():
        lines.append(f"dropped {count:,} rows without a value in label column {name!r}")
    if cleaning.get("duplicates_dropped"):
        lines.append(
            f"dropped {cleaning['duplicates_dropped']:,} exact duplicate rows (data.prepare.dedup: true)"
        )
    for rule, what in (
        ("sparse_missing_filled", "missing ids set to the out-of-vocabulary row 0 in"),
        ("multi_hot_missing_empty", "missing lists read as empty in"),
        ("sparse_missing_dropped", "rows dropped for a missing id in"),
        ("dense_missing_filled", "missing values filled in"),
        ("dense_missing_dropped", "rows dropped for a missing value in"),
    ):
        for name, count in cleaning.get(rule, {}).items():
            if count:
                lines.append(f"{count:,} {what} column {name!r}")
    dense = report.get("dense", {})
    for name, count in dense.get("clipped", {}).items():
        if count:
            lines.append(
                f"clipped {count:,} values of column {name!r} to {dense.get('clip_bounds', {}).get(name)}"
            )
    for name, (mean, std) in dense.get("standardized", {}).items():
        lines.append(f"standardized column {name!r} (training mean {mean:.4g}, std {std:.4g})")
    for name, edges in dense.get("bucket_edges", {}).items():
        lines.append(f"bucketized into {name!r}: {len(edges) + 1} buckets")
    for name, count in report.get("ids_outside_vocabulary", {}).items():
        if count:
            lines.append(f"{count:,} ids of column {name!r} not in the training vocabulary (row 0)")
    return lines
