"""Converters from public formats to the project's Parquet data set, streamed in bounded memory.

Every converter reads its input as a stream of chunks, **normalizes** each chunk to canonical
types (sparse ids ``int64``: integers as they are, strings as 64-bit hashes; multi-hot ``list<int64>``;
dense and labels ``float64``, nulls allowed) and hands the stream to :func:`convert`, which makes
up to three passes over the input so that memory stays O(chunk + vocabularies):

1. only for ``time``/``leave_last_out`` splits: clean, collect the time sample / per-user last rows;
2. clean, split, count ids of the training rows (vocabularies, ``min_count``), sample dense
   values of the training rows (``clip_quantile``) and gather the events of
   ``data.prepare.histories`` (user, time and ids: O(events) memory) — skipped when there is
   nothing to fit;
3. clean, split, map ids to rows, transform dense values, build each row's histories from the
   events strictly before it (``data.history``), write train/val/test shards.

Cleaning (``towerrec.data.cleaning``) is deterministic, so every pass sees the same rows.

Formats (``data.prepare.format``):

- ``movielens``: a MovieLens folder: ``ratings.dat`` (1M/10M, ``UserID::MovieID::Rating::Timestamp``,
  optional ``users.dat``/``movies.dat``) or ``ratings.csv`` (20M/25M, optional ``movies.csv``); an
  ml-100k folder (``u.data``) is handed to the ``movielens100k`` converter.
- ``criteo``: Criteo display-ads TSV (``label I1..I13 C1..C26``, no header, empty = missing).
- ``csv`` / ``parquet``: any table described by ``data.prepare.columns``.
"""

from __future__ import annotations

import fnmatch
import glob as globmod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from towerrec.data.cleaning import (
    Cleaner,
    DenseSpec,
    DenseTransforms,
    TableSchema,
    dense_values,
    mix64,
    string_ids,
)
from towerrec.data.config import HistoryConfig, PrepareConfig
from towerrec.data.dataset import DataError, DatasetMeta, DatasetWriter
from towerrec.data.expressions import Expression, compile_all
from towerrec.data.history import MAX_AGE_BUCKET, EventLog
from towerrec.data.jagged import list_parts
from towerrec.data.splits import SPLIT_NAMES, TRAIN, SplitKeys, make_splitter
from towerrec.data.vocab import Vocabulary

CSV_BLOCK_BYTES = 16 << 20
"""Bytes of CSV text parsed per chunk (pyarrow's streaming reader)."""
PARQUET_BATCH_ROWS = 262_144
"""Rows per chunk read from Parquet input."""
KINDS = ("sparse", "multi_hot", "dense", "label", "other")
_HASH_SALT = np.uint64(0x2545F4914F6CDD1D)


# --------------------------------------------------------------------------------------------- sources
@dataclass
class Chunk:
    """One normalized chunk: ``row_index`` counts rows over all input files, ``first_row`` of this
    file; ``split`` is the split code of every row when the input says it (pre-split files)."""

    table: pa.Table
    row_index: np.ndarray
    file: str
    first_row: int
    split: int | None = None


@dataclass(frozen=True)
class InputFile:
    """One input file on a pyarrow filesystem (local, or a URI's filesystem)."""

    filesystem: pafs.FileSystem
    path: str

    def __str__(self) -> str:
        return self.path

    @property
    def suffix(self) -> str:
        return Path(self.path).suffix

    def open(self):
        """A readable stream, decompressed by the file's extension (``.gz``, ``.bz2``, ``.zst``, ...)."""
        compression = pa.Codec.detect(self.path).name if _compressed(self.path) else None
        return self.filesystem.open_input_stream(self.path, compression=compression)


def _compressed(path: str) -> bool:
    try:
        pa.Codec.detect(path)
        return True
    except (ValueError, pa.ArrowInvalid, TypeError):
        return False


class Source:
    """Re-iterable stream of raw chunks from a list of files, plus a ``normalize`` step per chunk.
    ``splits`` (one split code per file) marks pre-split input."""

    def __init__(
        self,
        files: list,
        read: Callable[[Any], Iterator[pa.Table]],
        normalize: Callable[[pa.Table, str, int], pa.Table],
        splits: list[int] | None = None,
        where: str = "data.prepare.source",
    ):
        if not files:
            raise DataError(f"{where}: no input files found")
        self.files = files
        self.read = read
        self.normalize = normalize
        self.splits = splits

    def chunks(self) -> Iterator[Chunk]:
        offset = 0
        for index, path in enumerate(self.files):
            first_row = offset
            for raw in self.read(path):
                if raw.num_rows == 0:
                    continue
                table = self.normalize(raw, str(path), offset - first_row)
                split = self.splits[index] if self.splits is not None else None
                yield Chunk(
                    table,
                    np.arange(offset, offset + raw.num_rows, dtype=np.int64),
                    str(path),
                    first_row,
                    split,
                )
                offset += raw.num_rows


def input_files(source: str | None, pattern: str = "*", key: str = "data.prepare.source") -> list:
    """The files of ``source``: a file, a folder (its files, name order, hidden ones left out), a
    glob pattern, or a URI pyarrow's filesystems understand (``file://``, ``s3://``, ...).
    Local paths are ``Path``s; URI files are ``InputFile``s."""
    if not source:
        raise DataError(f"{key}: set it to the input file, folder, glob pattern or URI")
    if "://" in source:
        try:
            filesystem, root = pafs.FileSystem.from_uri(source)
            info = filesystem.get_file_info(root)
        except (pa.ArrowInvalid, OSError, ValueError) as err:
            raise DataError(f"{key}: cannot open {source} ({err})") from err
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{key}: {source} does not exist")
        if info.type == pafs.FileType.File:
            return [InputFile(filesystem, root)]
        listed = filesystem.get_file_info(pafs.FileSelector(root, recursive=False))
        files = sorted(
            f.path for f in listed
            if f.type == pafs.FileType.File and not Path(f.path).name.startswith((".", "_"))
            and fnmatch.fnmatch(Path(f.path).name, pattern)
        )  # fmt: skip
        if not files:
            raise DataError(f"{key}: no input files ({pattern}) found in {source}")
        return [InputFile(filesystem, path) for path in files]
    if any(char in source for char in "*?["):
        files = sorted(Path(p) for p in globmod.glob(source) if Path(p).is_file())
        if not files:
            raise DataError(f"{key}: no input files match {source}")
        return files
    path = Path(source)
    if not path.exists():
        raise DataError(f"{key}: {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith((".", "_")))
        if not files:
            raise DataError(f"{key}: no input files ({pattern}) found in folder {path}")
        return files
    return [path]


def _open(path):
    """A readable (decompressing) stream of a local path or an ``InputFile``."""
    if isinstance(path, InputFile):
        return path.open()
    return pa.input_stream(str(path), compression="detect")


def read_csv_chunks(
    path,
    read_options: pacsv.ReadOptions,
    parse_options: pacsv.ParseOptions,
    convert_options: pacsv.ConvertOptions,
    header_lines: int = 0,
) -> Iterator[pa.Table]:
    """Streams a (possibly compressed) CSV file in ``CSV_BLOCK_BYTES`` blocks. A malformed line
    (wrong number of fields, bad quoting) stops with the file and its line number; a type
    conversion error names the column (read text columns as strings and convert them with
    ``parse_numbers`` to get the row)."""
    rows_read = 0
    bad_line: dict[str, Any] = {}

    def on_invalid_row(row) -> str:
        bad_line.update(
            number=row.number, text=row.text, expected=row.expected_columns, actual=row.actual_columns
        )
        return "error"

    parse_options = pacsv.ParseOptions(
        delimiter=parse_options.delimiter,
        quote_char=parse_options.quote_char,
        double_quote=parse_options.double_quote,
        escape_char=parse_options.escape_char,
        newlines_in_values=parse_options.newlines_in_values,
        ignore_empty_lines=parse_options.ignore_empty_lines,
        invalid_row_handler=on_invalid_row,
    )
    try:
        with _open(path) as stream:
            reader = pacsv.open_csv(stream, read_options, parse_options, convert_options)
            for batch in reader:
                rows_read += batch.num_rows
                yield pa.Table.from_batches([batch])
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as err:
        message = str(err).splitlines()[0]
        if bad_line:
            line = bad_line["number"]
            if line is None:  # the parallel parser does not count lines: find it again, serially
                line = _first_bad_line(path, read_options, parse_options, convert_options)
            where = f"line {line}" if line is not None else f"after data row {rows_read}"
            raise DataError(
                f"{path}: {where}: expected {bad_line['expected']} fields, found {bad_line['actual']} "
                f"({str(bad_line['text'])[:120]!r})"
            ) from err
        column = ""
        names = read_options.column_names or []
        if "CSV column #" in message and names:
            index = int(message.split("CSV column #")[1].split(":")[0])
            column = f", column {names[index]!r}" if index < len(names) else ""
        raise DataError(f"{path}: cannot parse after data row {rows_read}{column}: {message}") from err


def _first_bad_line(path, read_options, parse_options, convert_options) -> int | None:
    """The line number of the first malformed line (a second, single-threaded read)."""
    found: list[int | None] = []

    def on_invalid_row(row) -> str:
        found.append(row.number)
        return "error"

    serial = pacsv.ReadOptions(
        column_names=read_options.column_names, skip_rows=read_options.skip_rows,
        block_size=read_options.block_size, use_threads=False,
    )  # fmt: skip
    options = pacsv.ParseOptions(delimiter=parse_options.delimiter, quote_char=parse_options.quote_char,
                                 invalid_row_handler=on_invalid_row)  # fmt: skip
    try:
        with _open(path) as stream:
            for _ in pacsv.open_csv(stream, serial, options, convert_options):
                pass
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    return found[0] if found else None


def read_parquet_chunks(path, columns: list[str]) -> Iterator[pa.Table]:
    try:
        file = pq.ParquetFile(path.open() if isinstance(path, InputFile) else path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    missing = [name for name in columns if name not in file.schema_arrow.names]
    if missing:
        raise DataError(
            f"{path}: columns {missing} that the config names are missing (have: {file.schema_arrow.names})"
        )
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        yield pa.Table.from_batches([batch])


# --------------------------------------------------------------------------------------------- normalizing
_NUMBER = r"(?i)^[-+]?((\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?|nan|inf|infinity)$"


def _text(column) -> bool:
    return pa.types.is_string(column.type) or pa.types.is_large_string(column.type)


def _where(where: str, first_row: int, row: int, header_lines: int) -> str:
    """``file: row R`` (0-based data row of the file), with the CSV line when it is a CSV file."""
    index = first_row + row
    return f"{where}: row {index}" + (f" (line {index + 1 + header_lines})" if header_lines >= 0 else "")


def parse_numbers(column, where: str, name: str, first_row: int, header_lines: int = -1) -> pa.Array:
    """A column as float64: numbers as they are, text parsed (``1.5``, ``-3e4``, ``nan``); empty
    text is missing; any other text is an error naming the file, the row and the column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if _text(column):
        column = pc.utf8_trim_whitespace(column)
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
        bad = pc.invert(pc.fill_null(pc.match_substring_regex(column, _NUMBER), True))
        if pc.any(bad).as_py():
            row = pc.index(bad, True).as_py()
            raise DataError(
                f"{_where(where, first_row, row, header_lines)}: column {name!r}: {column[row].as_py()!r} is not a number"
            )
        return pc.cast(column, pa.float64())
    return _as_numbers(column, where, name)


def _as_ids(column, where: str, name: str, first_row: int, header_lines: int = -1) -> pa.Array:
    """Any id column → int64 (integers, integral floats) or string (text, trimmed; kept as written
    so that vocabularies, lists and predictions give the original ids back)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if _text(column) or pa.types.is_binary(kind):
        column = pc.utf8_trim_whitespace(column.cast(pa.string()))
        return pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return column.cast(pa.int64())
    if pa.types.is_floating(kind):
        values = dense_values(column)
        bad = np.isfinite(values) & (values != np.round(values)) | np.isinf(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{_where(where, first_row, row, header_lines)}: column {name!r}: id {values[row]} is not an integer"
            )
        return column.cast(pa.int64(), safe=False)
    if pa.types.is_null(kind):
        return pa.nulls(len(column), pa.int64())
    raise DataError(f"{where}: column {name!r} has type {kind}, expected integer or string ids")


def _as_id_lists(
    column, where: str, name: str, first_row: int, delimiter: str, header_lines: int = -1
) -> pa.Array:
    """A multi-hot column (a list, or a delimited string) → list<int64 or string>; empty tokens are dropped."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if _text(column):
        column = pc.split_pattern(column.cast(pa.string()), delimiter)
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.list_(pa.int64()))
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise DataError(
            f"{where}: column {name!r} has type {column.type}, expected a list or a delimited string"
        )
    validity = np.asarray(column.is_valid())
    flat, offsets = list_parts(column)
    ids = _as_ids(flat, where, name, first_row, header_lines)
    keep = np.asarray(ids.is_valid())
    if not keep.all():
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        offsets = kept_before[offsets]
        ids = ids.filter(pa.array(keep))
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), ids, mask=pa.array(~validity) if not validity.all() else None
    )


def _as_numbers(column, where: str, name: str) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_null(kind)
    ):
        return column.cast(pa.float64())
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        return column.cast(pa.int64()).cast(pa.float64())
    raise DataError(f"{where}: column {name!r} has type {kind}, expected numbers")


def normalize_table(
    table: pa.Table,
    schema: TableSchema,
    where: str,
    first_row: int,
    list_delimiter: str = "|",
    header_lines: int = -1,
    derived: list[Expression] = (),
) -> pa.Table:
    """Canonical types for every column of ``schema`` (and the key columns): ids int64 or string,
    bags lists of those, numbers float64; derived columns computed first. ``header_lines`` >= 0
    for CSV input (errors then give the file's line)."""
    for expression in derived:
        table = table.append_column(expression.name, expression.evaluate(table))
    columns = {}
    needed = list(schema.kinds)
    for bucket in schema.buckets.values():
        needed.append(bucket.source)
    for name in dict.fromkeys(needed):
        if name not in table.column_names:
            raise DataError(f"{where}: missing column {name!r} (have: {table.column_names})")
        column = table.column(name)
        kind = schema.kinds.get(name, "number")
        if kind == "sparse":
            columns[name] = _as_ids(column, where, name, first_row, header_lines)
        elif kind == "multi_hot":
            delimiter = schema.delimiters.get(name, list_delimiter)
            columns[name] = _as_id_lists(column, where, name, first_row, delimiter, header_lines)
        elif kind in ("dense", "label", "number"):
            columns[name] = parse_numbers(column, where, name, first_row, header_lines)
        else:
            columns[name] = column
    for key, parse in ((schema.user_column, _as_ids), (schema.time_column, parse_numbers)):
        if key and key not in columns:
            if key not in table.column_names:
                raise DataError(f"{where}: missing column {key!r} (have: {table.column_names})")
            columns[key] = parse(table.column(key), where, key, first_row, header_lines)
    if schema.split_column:
        if schema.split_column not in table.column_names:
            raise DataError(
                f"{where}: missing split column {schema.split_column!r} (have: {table.column_names})"
            )
        columns[schema.split_column] = pc.utf8_trim_whitespace(
            table.column(schema.split_column).cast(pa.string())
        )
    return pa.table(columns)


# --------------------------------------------------------------------------------------------- id mapping
def _id_values(
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
    if _text(column):
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
    """Raw ids → embedding rows: a training-split vocabulary or a hash; nulls → row 0."""

    def __init__(self, vocabulary: Vocabulary | None = None, num_hash_buckets: int | None = None):
        self.vocabulary = vocabulary
        self.num_hash_buckets = num_hash_buckets
        self.outside = 0
        """Ids (not missing) that are not in the vocabulary (they go to row 0), counted by ``encode``."""

    @property
    def num_embeddings(self) -> int:
        if self.vocabulary is not None:
            return self.vocabulary.num_embeddings
        return int(self.num_hash_buckets) + 1

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self.vocabulary is not None:
            return self.vocabulary.lookup(ids)
        mixed = mix64(ids.view(np.uint64) ^ _HASH_SALT)
        return (mixed % np.uint64(self.num_hash_buckets)).astype(np.int64) + 1

    def encode(self, column) -> pa.Array:
        ids, offsets, nulls, _ = _id_values(column)
        rows = np.where(nulls, 0, self.rows(ids))
        if self.vocabulary is not None:
            self.outside += int(((rows == 0) & ~nulls).sum())
        if offsets is None:
            return pa.array(rows)
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(rows))


# --------------------------------------------------------------------------------------------- histories
class HistoryEvents:
    """The training rows' events of each ``data.prepare.histories`` entry, gathered over a pass
    (user key, time and raw ids: O(events) memory), then mapped to table rows (``logs``)."""

    def __init__(self, histories: list[HistoryConfig], schema: TableSchema):
        self.histories = histories
        self.parts: list[list[tuple]] = [[] for _ in histories]
        for history in histories:
            for source in (history.column, *history.side.values()):
                if schema.kinds.get(source) != "sparse":
                    raise DataError(
                        f"data.prepare.histories.{history.name}: {source!r} is not a single-valued id column "
                        "of the data (name it in data.sparse, or in data.prepare.columns as sparse)"
                    )

    def observe(self, table: pa.Table, keys: SplitKeys, train: np.ndarray) -> None:
        for history, parts in zip(self.histories, self.parts):
            chosen = train.copy() if history.events == "train" else np.ones(len(train), dtype=bool)
            if history.where:
                values = dense_values(table.column(history.where))
                chosen &= np.isfinite(values) & (values != 0)
            sources = [history.column, *history.side.values()]
            raw = [_id_values(table.column(c)) for c in sources]
            parts.append(
                (
                    keys.user[chosen],
                    keys.time[chosen],
                    [(ids[chosen], nulls[chosen]) for ids, _, nulls, _ in raw],
                )
            )

    def logs(self, mappers: dict[str, IdMapper]) -> list[EventLog]:
        logs = []
        for history, parts in zip(self.histories, self.parts):
            names = [history.name, *history.side]
            sources = [history.column, *history.side.values()]
            users = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
            times = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
            columns = {}
            for i, (name, source) in enumerate(zip(names, sources)):
                ids = np.concatenate([p[2][i][0] for p in parts]) if parts else np.zeros(0, np.int64)
                nulls = np.concatenate([p[2][i][1] for p in parts]) if parts else np.zeros(0, bool)
                columns[name] = np.where(nulls, 0, mappers[source].rows(ids)) if len(ids) else ids
            logs.append(EventLog.build(users, times, columns))
        self.parts = [[] for _ in self.histories]
        return logs


# --------------------------------------------------------------------------------------------- pipeline
def _split_keys(table: pa.Table, row_index: np.ndarray, schema: TableSchema, chunk: Chunk,
                split_values: dict[str, str]) -> SplitKeys:  # fmt: skip
    user = time = given = None
    if schema.user_column:
        user, _, _, _ = _id_values(table.column(schema.user_column))
    if schema.time_column:
        time = dense_values(table.column(schema.time_column))
    if chunk.split is not None:
        given = np.full(table.num_rows, chunk.split, dtype=np.int8)
    elif schema.split_column:
        names = table.column(schema.split_column).to_pylist()
        codes = {value: SPLIT_NAMES.index(split) for value, split in split_values.items()}
        unknown = [i for i, v in enumerate(names) if v not in codes]
        if unknown:
            raise DataError(
                f"{chunk.file}: row {chunk.first_row + int(row_index[unknown[0]]) - chunk.first_row}: split column "
                f"{schema.split_column!r} has {names[unknown[0]]!r}, not one of {sorted(codes)} (data.prepare.split_values)"
            )
        given = np.array([codes[v] for v in names], dtype=np.int8)
    return SplitKeys(row_index=row_index, user=user, time=time, given=given)


def convert(
    source: Source,
    schema: TableSchema,
    cfg: PrepareConfig,
    out: str,
    report: dict[str, Any],
) -> DatasetMeta:
    """Cleans, splits, encodes and writes ``source`` (see the module docstring for the passes).

    Returns the committed data set; ``report`` (converter, source, ...) is extended with the
    cleaning counts, vocabulary sizes and rows per split and stored in ``metadata.json``.
    """
    for name, kind in schema.kinds.items():
        if kind not in KINDS:
            raise ValueError(f"data.prepare.columns.{name}: kind {kind!r} is not one of {', '.join(KINDS)}")
    given = source.splits is not None or schema.split_column is not None
    splitter = make_splitter(
        "given" if given else cfg.split,
        cfg.seed,
        cfg.val_fraction,
        cfg.test_fraction,
        cfg.cut_time,
        has_user=schema.user_column is not None,
        # train and test files without a val file: val is carved from train (a split column
        # states every row's split, val included, so nothing moves)
        given_has_val=not cfg.split_files or "val" in cfg.split_files,
    )
    id_columns = schema.of_kind("sparse", "multi_hot")
    transforms = DenseTransforms(schema.dense_specs, schema.buckets, seed=cfg.seed)

    def cleaned() -> Iterator[tuple[pa.Table, np.ndarray, SplitKeys, Cleaner]]:
        cleaner = Cleaner(schema, cfg.dedup, cfg.missing_sparse, cfg.missing_dense, cfg.dense_fill)
        for chunk in source.chunks():
            table, row_index = cleaner.clean(chunk.table, chunk.row_index, chunk.file, chunk.first_row)
            yield table, row_index, _split_keys(table, row_index, schema, chunk, cfg.split_values), cleaner

    passes = 1
    if splitter.needs_fit:  # pass 1: what the split needs to know about all rows
        passes += 1
        for _, _, keys, _ in cleaned():
            splitter.fit(keys)
        splitter.finish_fit()

    counts = {name: IdCounts() for name in id_columns} if cfg.sparse_mapping == "vocab" else {}
    events = HistoryEvents(cfg.histories, schema)
    if counts or transforms.needs_fit or cfg.histories:  # pass 2: vocabularies, quantiles, moments, events
        passes += 1
        for table, row_index, keys, _ in cleaned():
            codes = splitter.assign(keys)
            train = codes == TRAIN
            events.observe(table, keys, train)
            for name in id_columns if counts else ():
                ids, offsets, nulls, originals = _id_values(table.column(name))
                rows_of_ids = train if offsets is None else np.repeat(train, np.diff(offsets))
                chosen = rows_of_ids & ~nulls
                counts[name].add(ids[chosen], originals.filter(pa.array(chosen)))
            for name in transforms.samples:
                transforms.observe(name, dense_values(table.column(name))[train], row_index[train])
        transforms.finish_fit()
    if counts:
        mappers = {name: IdMapper(vocabulary=counts[name].vocabulary(cfg.min_count)) for name in id_columns}
    else:
        mappers = {name: IdMapper(num_hash_buckets=cfg.num_hash_buckets) for name in id_columns}

    logs = events.logs(mappers)
    writer = DatasetWriter(out, cfg.num_shards, cfg.row_group_size, shuffle_splits=("train",), seed=cfg.seed)
    rows_per_split = dict.fromkeys(SPLIT_NAMES, 0)
    try:  # the last pass: encode and write
        for name, mapper in mappers.items():
            if mapper.vocabulary is not None:
                writer.write_vocabulary(name, mapper.vocabulary.originals)
        cleaning_report: dict[str, Any] = {}
        for table, _, keys, cleaner in cleaned():
            cleaning_report = cleaner.report
            codes = splitter.assign(keys)
            encoded = {}
            for name, kind in schema.kinds.items():
                column = table.column(name)
                if kind in ("sparse", "multi_hot"):
                    encoded[name] = mappers[name].encode(column)
                elif kind == "dense":
                    encoded[name] = pa.array(transforms.apply(name, dense_values(column)).astype(np.float32))
                elif kind == "label":
                    encoded[name] = pa.array(dense_values(column).astype(np.float32))
                else:
                    encoded[name] = column
            for name, bucket in schema.buckets.items():
                values = dense_values(table.column(bucket.source))
                if bucket.source in cleaner.filled:
                    values = np.where(cleaner.filled[bucket.source], np.nan, values)
                encoded[name] = pa.array(transforms.bucketize(name, values))
            for history, log in zip(cfg.histories, logs):
                lists = log.sequences(
                    keys.user, keys.time, history.max_length or cfg.history_max_length, history.age
                )
                encoded.update({name: jagged.to_arrow(pa.int64()) for name, jagged in lists.items()})
            encoded_table = pa.table(encoded)
            for split, rows in writer.write_splits(encoded_table, codes, SPLIT_NAMES).items():
                rows_per_split[split] += rows
    except BaseException:
        writer.abort()
        raise
    if rows_per_split["train"] == 0:
        writer.abort()
        raise DataError(f"{report.get('source')}: no training rows left after cleaning and splitting")

    columns: dict[str, dict[str, Any]] = {}
    for name, kind in schema.kinds.items():
        if kind in ("sparse", "multi_hot"):
            columns[name] = {
                "kind": kind,
                "num_embeddings": mappers[name].num_embeddings,
                "mapping": cfg.sparse_mapping,
            }
        elif kind == "label":
            low, high = schema.label_ranges.get(name, (None, None))
            columns[name] = {"kind": "label", "min": low, "max": high, "binary": name in schema.binary_labels}
        elif kind == "dense":
            columns[name] = {"kind": "dense", "transforms": transforms.steps(name)}
            if name in transforms.bounds:
                columns[name]["clip"] = list(transforms.bounds[name])
        else:
            columns[name] = {"kind": "other"}
    for name, bucket in schema.buckets.items():
        columns[name] = {
            "kind": "sparse",
            "num_embeddings": transforms.num_buckets(name),
            "mapping": "buckets",
            "source": bucket.source,
            "edges": transforms.edges.get(name, []),
        }
    for history in cfg.histories:
        for name, source in [(history.name, history.column), *history.side.items()]:
            columns[name] = {
                "kind": "multi_hot", "num_embeddings": mappers[source].num_embeddings,
                "mapping": cfg.sparse_mapping, "history_of": source,
            }  # fmt: skip
        if history.age:
            columns[history.age] = {
                "kind": "multi_hot",
                "num_embeddings": MAX_AGE_BUCKET + 1,
                "mapping": "age",
            }
    report = {
        **report,
        "split": "given" if given else cfg.split,
        "seed": cfg.seed,
        "passes": passes,
        "rows_per_split": rows_per_split,
        "cleaning": cleaning_report,
        "dense": transforms.report,
        "sparse_mapping": cfg.sparse_mapping,
        "min_count": cfg.min_count,
        "vocab_sizes": {name: mapper.num_embeddings for name, mapper in mappers.items()},
        "ids_outside_vocabulary": {
            name: m.outside for name, m in mappers.items() if m.vocabulary is not None
        },
    }
    return writer.commit(columns=columns, report=report)


# --------------------------------------------------------------------------------------------- movielens
def _read_small_csv(path: Path, **options) -> pa.Table:
    """Reads a small side table (users, movies) in one go; parse errors → DataError."""
    try:
        return pacsv.read_csv(path, **options)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"{path}: cannot parse ({str(err).splitlines()[0]})") from err


def _double_colon_options(names: list[str], types: dict) -> tuple:
    """``a::b::c`` read with ``:`` as delimiter: the empty fields in between are skipped."""
    spaced = [part for name in names for part in (name, f"_gap{name}")][:-1]
    return (
        pacsv.ReadOptions(column_names=spaced, encoding="latin-1", block_size=CSV_BLOCK_BYTES),
        pacsv.ParseOptions(delimiter=":", quote_char=False),
        pacsv.ConvertOptions(column_types=types, include_columns=names),
    )


def _genre_lists(movie_ids: pa.Array, genre_strings: pa.Array) -> tuple[np.ndarray, pa.Array, list[str]]:
    """(sorted movie ids, their genre id lists, genre names); ``(no genres listed)`` is no genre."""
    order = np.argsort(np.asarray(movie_ids))
    split = pc.split_pattern(genre_strings.take(pa.array(order)), "|")
    flat = split.flatten()
    names = sorted(set(pc.unique(flat).to_pylist()) - {"(no genres listed)", "", None})
    genre_ids = pc.index_in(flat, value_set=pa.array(names, pa.string()))  # null where not a genre
    keep = np.asarray(genre_ids.is_valid())
    offsets = np.concatenate([[0], np.cumsum(keep)])[np.asarray(split.offsets)]
    values = np.asarray(genre_ids.fill_null(0), dtype=np.int64)[keep] + 1
    lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return np.asarray(movie_ids)[order], lists, names


def _lookup(keys: np.ndarray, side: pa.Array, wanted: np.ndarray) -> pa.Array:
    """``side[i]`` where ``keys[i] == wanted``; null where the key is unknown (keys sorted)."""
    if len(keys) == 0:
        return pa.nulls(len(wanted), side.type)
    pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = keys[pos] == wanted
    return side.take(pa.array(pos, mask=~found))


def prepare_movielens(cfg: PrepareConfig, out: str) -> DatasetMeta:
    """MovieLens 1M/10M (``ratings.dat``) or 20M/25M (``ratings.csv``) folder → data set.

    Columns: ``user_id``, ``item_id`` (sparse), ``gender``, ``age_bucket``, ``occupation``,
    ``zip_prefix`` (sparse, with ``users.dat``), ``genres`` (multi-hot, with the movies file),
    ``timestamp`` (other), labels ``rating`` (0.5..5) and ``click`` (= rating >= 4).
    """
    if not cfg.source:
        raise DataError(
            "data.prepare.source: set it to the MovieLens folder (with ratings.dat or ratings.csv)"
        )
    root = Path(cfg.source)
    if root.is_dir() and (root / "u.data").exists():
        from towerrec.data.movielens import prepare_movielens100k

        return prepare_movielens100k(cfg, out)
    if root.is_file():
        root = root.parent
    if (root / "ratings.dat").exists():
        ratings_file, movies_file, users_file = root / "ratings.dat", root / "movies.dat", root / "users.dat"
        read = _double_colon_options(
            ["user", "item", "rating", "timestamp"],
            {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()},
        )
    elif (root / "ratings.csv").exists():
        ratings_file, movies_file, users_file = root / "ratings.csv", root / "movies.csv", None
        read = (
            pacsv.ReadOptions(
                column_names=["user", "item", "rating", "timestamp"], skip_rows=1, block_size=CSV_BLOCK_BYTES
            ),
            pacsv.ParseOptions(delimiter=","),
            pacsv.ConvertOptions(
                column_types={
                    "user": pa.int64(),
                    "item": pa.int64(),
                    "rating": pa.float64(),
                    "timestamp": pa.int64(),
                }
            ),
        )
    else:
        raise DataError(
            f"{root}: no ratings.dat (MovieLens 1M/10M) or ratings.csv (20M/25M) in data.prepare.source"
        )

    genres = None
    if movies_file.exists():
        if movies_file.suffix == ".dat":  # titles may contain ':', so split whole lines on '::'
            lines = _read_small_csv(
                movies_file,
                read_options=pacsv.ReadOptions(column_names=["line"], encoding="latin-1"),
                parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False),
            ).column("line")
            head = pc.split_pattern(lines, "::", max_splits=1)
            tail = pc.split_pattern(lines, "::", max_splits=1, reverse=True)
            try:
                movie_ids = pc.list_element(head, 0).cast(pa.int64()).combine_chunks()
                genre_strings = pc.list_element(tail, 1).combine_chunks()
            except (pa.ArrowInvalid, IndexError) as err:
                raise DataError(f"{movies_file}: expected MovieID::Title::Genres lines ({err})") from err
        else:
            movies = _read_small_csv(
                movies_file,
                convert_options=pacsv.ConvertOptions(
                    column_types={"movieId": pa.int64(), "genres": pa.string()}
                ),
            )
            if "movieId" not in movies.column_names or "genres" not in movies.column_names:
                raise DataError(
                    f"{movies_file}: expected columns movieId, genres (have: {movies.column_names})"
                )
            movie_ids, genre_strings = (
                movies.column("movieId").combine_chunks(),
                movies.column("genres").combine_chunks(),
            )
        genres = _genre_lists(movie_ids, genre_strings)

    users = None
    if users_file is not None and users_file.exists():
        options = _double_colon_options(
            ["user", "gender", "age", "occupation", "zip"],
            {
                "user": pa.int64(),
                "gender": pa.string(),
                "age": pa.int64(),
                "occupation": pa.int64(),
                "zip": pa.string(),
            },
        )
        table = _read_small_csv(
            users_file, read_options=options[0], parse_options=options[1], convert_options=options[2]
        )
        order = np.argsort(np.asarray(table.column("user")))
        table = table.take(pa.array(order))
        users = {
            "keys": np.asarray(table.column("user")),
            "gender": table.column("gender").combine_chunks(),
            "age_bucket": table.column("age").combine_chunks(),
            "occupation": table.column("occupation").combine_chunks(),
            "zip_prefix": pc.utf8_slice_codeunits(table.column("zip"), 0, 1).combine_chunks(),
        }

    kinds = {"user_id": "sparse", "item_id": "sparse"}
    if users is not None:
        kinds.update(dict.fromkeys(("gender", "age_bucket", "occupation", "zip_prefix"), "sparse"))
    if genres is not None:
        kinds["genres"] = "multi_hot"
    kinds.update({"timestamp": "other", "rating": "label", "click": "label"})
    schema = TableSchema(
        kinds,
        label_ranges={"rating": (0.5, 5.0), "click": (0.0, 1.0)},
        binary_labels=("click",),
        user_column="user_id",
        time_column="timestamp",
    )

    def normalize(raw: pa.Table, where: str, first_row: int) -> pa.Table:
        user = np.asarray(raw.column("user").fill_null(-1), dtype=np.int64)
        item = np.asarray(raw.column("item").fill_null(-1), dtype=np.int64)
        for name, ids in (("user", user), ("item", item)):
            if (ids < 0).any():
                row = int(np.flatnonzero(ids < 0)[0])
                raise DataError(f"{where}: row {first_row + row}, column {name!r}: missing or negative id")
        columns = {"user_id": raw.column("user"), "item_id": raw.column("item")}
        if users is not None:
            for name in ("gender", "age_bucket", "occupation", "zip_prefix"):
                columns[name] = _lookup(users["keys"], users[name], user)
        if genres is not None:
            columns["genres"] = _lookup(genres[0], genres[1], item)
        rating = raw.column("rating")
        columns["timestamp"] = raw.column("timestamp")
        columns["rating"] = rating
        columns["click"] = pc.cast(pc.greater_equal(rating, 4.0), pa.float64())
        return normalize_table(pa.table(columns), schema, where, first_row)

    source = Source([ratings_file], lambda path: read_csv_chunks(path, *read), normalize)
    report = {
        "converter": "movielens",
        "source": str(ratings_file),
        "genres": genres[2] if genres is not None else [],
        "user_features": users is not None,
    }
    return convert(source, schema, cfg, out, report)


# --------------------------------------------------------------------------------------------- criteo
CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]


def prepare_criteo(cfg: PrepareConfig, out: str) -> DatasetMeta:
    """Criteo display-ads TSV (a file or a folder of files, optionally gzip) → data set.

    Columns: ``click`` (label in {0, 1}), ``I1``..``I13`` (dense: missing → ``dense_fill``, then
    ``log(1 + max(x, 0))`` unless ``log_transform: false``), ``C1``..``C26`` (sparse: hex strings
    hashed to 64-bit ids, then a training-split vocabulary with ``min_count`` or hashing). The time
    split keeps the file order (the last rows are test), as Criteo files are ordered by time.
    """
    files = input_files(cfg.source)
    names = ["click", *CRITEO_DENSE, *CRITEO_SPARSE]
    read = (
        pacsv.ReadOptions(column_names=names, block_size=CSV_BLOCK_BYTES),
        pacsv.ParseOptions(delimiter="\t", quote_char=False),
        pacsv.ConvertOptions(
            column_types={
                "click": pa.float64(),
                **dict.fromkeys(CRITEO_DENSE, pa.float64()),
                **dict.fromkeys(CRITEO_SPARSE, pa.string()),
            },
            strings_can_be_null=True,
        ),
    )
    log = True if cfg.log_transform is None else cfg.log_transform
    schema = TableSchema(
        {"click": "label", **dict.fromkeys(CRITEO_DENSE, "dense"), **dict.fromkeys(CRITEO_SPARSE, "sparse")},
        label_ranges={"click": (0.0, 1.0)},
        binary_labels=("click",),
        dense_specs={name: DenseSpec(log1p=log) for name in CRITEO_DENSE},
    )
    source = Source(
        files,
        lambda path: read_csv_chunks(path, *read),
        lambda raw, where, first_row: normalize_table(raw, schema, where, first_row),
    )
    report = {"converter": "criteo", "source": str(cfg.source), "files": [str(f) for f in files]}
    return convert(source, schema, cfg, out, report)


# --------------------------------------------------------------------------------------------- generic
def _generic_inputs(cfg: PrepareConfig, pattern: str) -> tuple[list, list[int] | None, str]:
    """(files, split code per file or None, a description) of ``source`` or ``split_files``."""
    if cfg.split_files:
        files, splits = [], []
        for name in SPLIT_NAMES:
            if name in cfg.split_files:
                found = input_files(cfg.split_files[name], pattern, key=f"data.prepare.split_files.{name}")
                files += found
                splits += [SPLIT_NAMES.index(name)] * len(found)
        return files, splits, str(cfg.split_files)
    return input_files(cfg.source, pattern), None, str(cfg.source)


def _needed_inputs(schema: TableSchema, derived: list[Expression]) -> list[str]:
    """Input columns to read: every schema column not derived, bucket sources, keys, expression inputs."""
    made = {e.name for e in derived}
    names = [n for n in schema.kinds if n not in made]
    names += [b.source for b in schema.buckets.values() if b.source not in made]
    names += [c for c in (schema.user_column, schema.time_column, schema.split_column) if c and c not in made]
    for expression in derived:
        names += [c for c in expression.columns if c not in made]
    return list(dict.fromkeys(names))


def _require_schema(schema: TableSchema | None, fmt: str) -> TableSchema:
    if schema is None or not schema.kinds:
        raise DataError(
            f"data.prepare.format: {fmt} needs the columns to read: declare them in data.sparse, data.dense "
            "and tasks (towerrec init writes a starter config from a file)"
        )
    return schema


def _csv_header(path, options) -> list[str]:
    """The column names of a CSV file: ``csv.column_names``, else its header line."""
    if not options.header:
        return list(options.column_names)
    import csv
    import io

    try:
        with _open(path) as stream:
            head = stream.read(1 << 20)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot be read ({str(err).splitlines()[0]})") from err
    try:
        first = head.decode("utf-8").splitlines()[0] if head else ""
        header = next(csv.reader(io.StringIO(first), delimiter=options.delimiter))
    except (UnicodeDecodeError, StopIteration, csv.Error) as err:
        raise DataError(f"{path}: line 1: cannot read the CSV header ({err})") from err
    names = [name.strip() if options.strip else name for name in header]
    if options.column_names:
        if len(options.column_names) != len(names):
            raise DataError(
                f"{path}: line 1 has {len(names)} columns but data.prepare.csv.column_names gives "
                f"{len(options.column_names)}"
            )
        return list(options.column_names)
    return names


def _clean_text(table: pa.Table, options) -> pa.Table:
    """Text cells: spaces stripped (``csv.strip``), and a cell equal to a ``csv.null_values`` token
    (or empty) made missing."""
    tokens = pa.array(["", *options.null_values], pa.string())
    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if not _text(column):
            continue
        if options.strip:
            column = pc.utf8_trim_whitespace(column)
        column = pc.if_else(pc.is_in(column, value_set=tokens), pa.scalar(None, column.type), column)
        table = table.set_column(index, name, column)
    return table


def prepare_csv(cfg: PrepareConfig, out: str, schema: TableSchema | None = None) -> DatasetMeta:
    """CSV files (with or without a header, any one-character delimiter, compressed or not) whose
    columns the config declares (``data.sparse``, ``data.dense``, ``tasks``: see ``schema``)."""
    schema = _require_schema(schema, "csv")
    options = cfg.csv
    derived = compile_all(cfg.derive)
    wanted = _needed_inputs(schema, derived)
    files, splits, described = _generic_inputs(cfg, "*.csv*")

    def read(path) -> Iterator[pa.Table]:
        names = _csv_header(path, options)
        missing = [name for name in wanted if name not in names]
        if missing:
            raise DataError(f"{path}: columns {missing} that the config names are missing (have: {names})")
        yield from read_csv_chunks(
            path,
            pacsv.ReadOptions(
                column_names=names, skip_rows=1 if options.header else 0, block_size=CSV_BLOCK_BYTES
            ),
            pacsv.ParseOptions(delimiter=options.delimiter),
            pacsv.ConvertOptions(
                column_types=dict.fromkeys(wanted, pa.string()),
                include_columns=wanted,
                null_values=["", *options.null_values],
                strings_can_be_null=True,
            ),
            header_lines=1 if options.header else 0,
        )

    header_lines = 1 if options.header else 0
    source = Source(
        files,
        read,
        lambda raw, where, first_row: normalize_table(
            _clean_text(raw, options), schema, where, first_row, cfg.list_delimiter, header_lines, derived
        ),
        splits,
    )
    report = {"converter": "csv", "source": described, "files": [str(f) for f in files]}
    return convert(source, schema, cfg, out, report)


def prepare_parquet(cfg: PrepareConfig, out: str, schema: TableSchema | None = None) -> DatasetMeta:
    """Parquet files whose columns the config declares (``data.sparse``, ``data.dense``, ``tasks``)."""
    schema = _require_schema(schema, "parquet")
    derived = compile_all(cfg.derive)
    wanted = _needed_inputs(schema, derived)
    files, splits, described = _generic_inputs(cfg, "*.parquet")
    source = Source(
        files,
        lambda path: read_parquet_chunks(path, wanted),
        lambda raw, where, first_row: normalize_table(
            raw, schema, where, first_row, cfg.list_delimiter, -1, derived
        ),
        splits,
    )
    report = {"converter": "parquet", "source": described, "files": [str(f) for f in files]}
    return convert(source, schema, cfg, out, report)
