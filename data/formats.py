"""Converters from public formats to the project's Parquet data set, streamed in bounded memory.

Every converter reads its input as a stream of chunks, **normalizes** each chunk to canonical
types (sparse ids ``int64``: integers as they are, strings as 64-bit hashes; multi-hot ``list<int64>``;
dense and labels ``float64``, nulls allowed) and hands the stream to :func:`convert`, which makes
up to three passes over the input so that memory stays O(chunk + vocabularies):

1. only for ``time``/``leave_last_out`` splits: clean, collect the time sample / per-user last rows;
2. clean, split, count ids of the training rows (vocabularies, ``min_count``) and sample dense
   values of the training rows (``clip_quantile``) — skipped when there is nothing to fit;
3. clean, split, map ids to rows, transform dense values, write train/val/test shards.

Cleaning (``data.cleaning``) is deterministic, so every pass sees the same rows.

Formats (``data.prepare.format``):

- ``movielens``: a MovieLens folder: ``ratings.dat`` (1M/10M, ``UserID::MovieID::Rating::Timestamp``,
  optional ``users.dat``/``movies.dat``) or ``ratings.csv`` (20M/25M, optional ``movies.csv``); an
  ml-100k folder (``u.data``) is handed to the ``movielens100k`` converter.
- ``criteo``: Criteo display-ads TSV (``label I1..I13 C1..C26``, no header, empty = missing).
- ``csv`` / ``parquet``: any table described by ``data.prepare.columns``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.cleaning import Cleaner, DenseTransform, TableSchema, dense_values, mix64, string_ids
from data.config import PrepareConfig
from data.dataset import DataError, DatasetMeta, DatasetWriter
from data.jagged import list_parts
from data.splits import SPLIT_NAMES, TRAIN, SplitKeys, make_splitter
from data.vocab import Vocabulary

CSV_BLOCK_BYTES = 16 << 20
"""Bytes of CSV text parsed per chunk (pyarrow's streaming reader)."""
PARQUET_BATCH_ROWS = 262_144
"""Rows per chunk read from Parquet input."""
KINDS = ("sparse", "multi_hot", "dense", "label", "other")
_HASH_SALT = np.uint64(0x2545F4914F6CDD1D)


# --------------------------------------------------------------------------------------------- sources
@dataclass
class Chunk:
    """One normalized chunk: ``row_index`` counts rows over all input files, ``first_row`` of this file."""

    table: pa.Table
    row_index: np.ndarray
    file: str
    first_row: int


class Source:
    """Re-iterable stream of raw chunks from a list of files, plus a ``normalize`` step per chunk."""

    def __init__(
        self,
        files: list[Path],
        read: Callable[[Path], Iterator[pa.Table]],
        normalize: Callable[[pa.Table, str, int], pa.Table],
    ):
        if not files:
            raise DataError("data.prepare.source: no input files found")
        self.files = files
        self.read = read
        self.normalize = normalize

    def chunks(self) -> Iterator[Chunk]:
        offset = 0
        for path in self.files:
            first_row = offset
            for raw in self.read(path):
                if raw.num_rows == 0:
                    continue
                table = self.normalize(raw, str(path), offset - first_row)
                yield Chunk(
                    table, np.arange(offset, offset + raw.num_rows, dtype=np.int64), str(path), first_row
                )
                offset += raw.num_rows


def _input_files(source: str | None, pattern: str = "*") -> list[Path]:
    if not source:
        raise DataError("data.prepare.source: set it to the input file or folder")
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: data.prepare.source does not exist")
    if path.is_dir():
        return sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith((".", "_")))
    return [path]


def read_csv_chunks(
    path: Path,
    read_options: pacsv.ReadOptions,
    parse_options: pacsv.ParseOptions,
    convert_options: pacsv.ConvertOptions,
) -> Iterator[pa.Table]:
    """Streams a (possibly compressed) CSV file in ``CSV_BLOCK_BYTES`` blocks; parse errors → DataError."""
    rows_read = 0
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            reader = pacsv.open_csv(stream, read_options, parse_options, convert_options)
            for batch in reader:
                rows_read += batch.num_rows
                yield pa.Table.from_batches([batch])
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as err:
        message = str(err).splitlines()[0]
        column = ""
        names = read_options.column_names or []
        if "CSV column #" in message and names:
            index = int(message.split("CSV column #")[1].split(":")[0])
            column = f", column {names[index]!r}" if index < len(names) else ""
        raise DataError(f"{path}: cannot parse after data row {rows_read}{column}: {message}") from err


def read_parquet_chunks(path: Path, columns: list[str]) -> Iterator[pa.Table]:
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    missing = [name for name in columns if name not in file.schema_arrow.names]
    if missing:
        raise DataError(
            f"{path}: columns {missing} named in data.prepare.columns are missing (have: {file.schema_arrow.names})"
        )
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        yield pa.Table.from_batches([batch])


# --------------------------------------------------------------------------------------------- normalizing
def _as_ids(column: pa.ChunkedArray | pa.Array, where: str, name: str, first_row: int) -> pa.Array:
    """Any id column → int64 (strings hashed); fractional numbers are an error."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        return string_ids(column)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return column.cast(pa.int64())
    if pa.types.is_floating(kind):
        values = dense_values(column)
        bad = np.isfinite(values) & (values != np.round(values)) | np.isinf(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{where}: row {first_row + row}, column {name!r}: id {values[row]} is not an integer"
            )
        return column.cast(pa.int64(), safe=False)
    if pa.types.is_null(kind):
        return pa.nulls(len(column), pa.int64())
    raise DataError(f"{where}: column {name!r} has type {kind}, expected integer or string ids")


def _as_id_lists(column, where: str, name: str, first_row: int, delimiter: str) -> pa.Array:
    """A multi-hot column (list, or delimited string) → list<int64>; empty tokens are dropped."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.split_pattern(column.cast(pa.string()), delimiter)
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.list_(pa.int64()))
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise DataError(
            f"{where}: column {name!r} has type {column.type}, expected a list or a delimited string"
        )
    validity = np.asarray(column.is_valid())
    flat, offsets = list_parts(column)
    keep = np.asarray(flat.is_valid())
    if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
        keep &= np.asarray(pc.utf8_length(flat).fill_null(0)) > 0
    flat_ids = np.asarray(_as_ids(flat, where, name, first_row).fill_null(0), dtype=np.int64)
    if not keep.all():
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        offsets = kept_before[offsets]
        flat_ids = flat_ids[keep]
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)),
        pa.array(flat_ids),
        mask=pa.array(~validity) if not validity.all() else None,
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
    table: pa.Table, schema: TableSchema, where: str, first_row: int, list_delimiter: str = "|"
) -> pa.Table:
    """Canonical types for every column of ``schema`` (and the user/time key columns)."""
    columns = {}
    for name, kind in schema.kinds.items():
        if name not in table.column_names:
            raise DataError(f"{where}: missing column {name!r} (have: {table.column_names})")
        column = table.column(name)
        if kind == "sparse":
            columns[name] = _as_ids(column, where, name, first_row)
        elif kind == "multi_hot":
            columns[name] = _as_id_lists(column, where, name, first_row, list_delimiter)
        elif kind in ("dense", "label"):
            columns[name] = _as_numbers(column, where, name)
        else:
            columns[name] = column
    if schema.user_column and schema.user_column not in columns:
        columns[schema.user_column] = _as_ids(
            table.column(schema.user_column), where, schema.user_column, first_row
        )
    if schema.time_column and schema.time_column not in columns:
        columns[schema.time_column] = _as_numbers(table.column(schema.time_column), where, schema.time_column)
    return pa.table(columns)


# --------------------------------------------------------------------------------------------- id mapping
class IdCounts:
    """Counts of int64 ids over a stream (sorted unique keys + counts; O(distinct ids) memory)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        keys, counts = np.unique(values, return_counts=True)
        if len(self.keys):
            pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            known = self.keys[pos] == keys
            self.counts[pos[known]] += counts[known]  # keys are unique: no repeated positions
            keys, counts = keys[~known], counts[~known]
        if len(keys):
            merged = np.concatenate([self.keys, keys])
            order = np.argsort(merged, kind="stable")
            self.keys, self.counts = merged[order], np.concatenate([self.counts, counts])[order]

    def vocabulary(self, min_count: int) -> Vocabulary:
        return Vocabulary(self.keys[self.counts >= min_count])


def _id_values(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(flat int64 ids with nulls as 0, list offsets or None, flat null mask)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = None
    if pa.types.is_list(column.type):
        column, offsets = list_parts(column)
    nulls = np.asarray(column.is_null()) if column.null_count else np.zeros(len(column), dtype=bool)
    return np.asarray(column.fill_null(0), dtype=np.int64), offsets, nulls


class IdMapper:
    """Raw ids → embedding rows: a training-split vocabulary or a hash; nulls → row 0."""

    def __init__(self, vocabulary: Vocabulary | None = None, num_hash_buckets: int | None = None):
        self.vocabulary = vocabulary
        self.num_hash_buckets = num_hash_buckets

    @property
    def num_embeddings(self) -> int:
        return self.vocabulary.num_embeddings if self.vocabulary is not None else self.num_hash_buckets + 1

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self.vocabulary is not None:
            return self.vocabulary.lookup(ids)
        hashed = mix64(ids.view(np.uint64) ^ _HASH_SALT) % np.uint64(self.num_hash_buckets)
        return hashed.astype(np.int64) + 1

    def encode(self, column) -> pa.Array:
        ids, offsets, nulls = _id_values(column)
        rows = np.where(nulls, 0, self.rows(ids))
        if offsets is None:
            return pa.array(rows)
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(rows))


# --------------------------------------------------------------------------------------------- pipeline
def _check_options(cfg: PrepareConfig) -> None:
    if cfg.sparse_mapping not in ("vocab", "hash"):
        raise ValueError(f"data.prepare.sparse_mapping: {cfg.sparse_mapping!r} is not one of vocab, hash")
    if cfg.min_count < 1:
        raise ValueError(f"data.prepare.min_count: must be >= 1, got {cfg.min_count}")
    if cfg.num_hash_buckets < 1:
        raise ValueError(f"data.prepare.num_hash_buckets: must be >= 1, got {cfg.num_hash_buckets}")


def _split_keys(table: pa.Table, row_index: np.ndarray, schema: TableSchema) -> SplitKeys:
    user = time = None
    if schema.user_column:
        user = np.asarray(table.column(schema.user_column).fill_null(0), dtype=np.int64)
    if schema.time_column:
        time = dense_values(table.column(schema.time_column))
    return SplitKeys(row_index=row_index, user=user, time=time)


def convert(
    source: Source,
    schema: TableSchema,
    cfg: PrepareConfig,
    out: str,
    report: dict[str, Any],
    log_transform: bool = False,
) -> DatasetMeta:
    """Cleans, splits, encodes and writes ``source`` (see the module docstring for the passes).

    Returns the committed data set; ``report`` (converter, source, ...) is extended with the
    cleaning counts, vocabulary sizes and rows per split and stored in ``metadata.json``.
    """
    _check_options(cfg)
    for name, kind in schema.kinds.items():
        if kind not in KINDS:
            raise ValueError(f"data.prepare.columns.{name}: kind {kind!r} is not one of {', '.join(KINDS)}")
    splitter = make_splitter(
        cfg.split,
        cfg.seed,
        cfg.val_fraction,
        cfg.test_fraction,
        cfg.cut_time,
        has_user=schema.user_column is not None,
    )
    dense_columns = schema.of_kind("dense")
    id_columns = schema.of_kind("sparse", "multi_hot")
    transform = DenseTransform(dense_columns, log_transform, cfg.clip_quantile, seed=cfg.seed)

    def cleaned() -> Iterator[tuple[pa.Table, np.ndarray, SplitKeys, Cleaner]]:
        cleaner = Cleaner(schema, cfg.dedup, cfg.missing_sparse, cfg.missing_dense, cfg.dense_fill)
        for chunk in source.chunks():
            table, row_index = cleaner.clean(chunk.table, chunk.row_index, chunk.file, chunk.first_row)
            yield table, row_index, _split_keys(table, row_index, schema), cleaner

    passes = 1
    if splitter.needs_fit:  # pass 1: what the split needs to know about all rows
        passes += 1
        for _, _, keys, _ in cleaned():
            splitter.fit(keys)
        splitter.finish_fit()

    counts = {name: IdCounts() for name in id_columns} if cfg.sparse_mapping == "vocab" else {}
    if counts or transform.needs_fit:  # pass 2: vocabularies and clipping bounds from training rows
        passes += 1
        for table, row_index, keys, _ in cleaned():
            train = splitter.assign(keys) == TRAIN
            for name in id_columns if counts else ():
                ids, offsets, nulls = _id_values(table.column(name))
                rows_of_ids = train if offsets is None else np.repeat(train, np.diff(offsets))
                counts[name].add(ids[rows_of_ids & ~nulls])
            for name in dense_columns:
                transform.observe(name, dense_values(table.column(name))[train], row_index[train])
        transform.finish_fit()
    if counts:
        mappers = {name: IdMapper(vocabulary=counts[name].vocabulary(cfg.min_count)) for name in id_columns}
    else:
        mappers = {name: IdMapper(num_hash_buckets=cfg.num_hash_buckets) for name in id_columns}

    writer = DatasetWriter(out, cfg.num_shards, cfg.row_group_size, shuffle_splits=("train",), seed=cfg.seed)
    rows_per_split = dict.fromkeys(SPLIT_NAMES, 0)
    try:  # the last pass: encode and write
        for name, mapper in mappers.items():
            if mapper.vocabulary is not None:
                writer.write_vocabulary(name, mapper.vocabulary.keys)
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
                    encoded[name] = pa.array(transform.apply(name, dense_values(column)).astype(np.float32))
                elif kind == "label":
                    encoded[name] = pa.array(dense_values(column).astype(np.float32))
                else:
                    encoded[name] = column
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
            columns[name] = {"kind": "dense", "log_transform": log_transform}
            if name in transform.bounds:
                columns[name]["clip"] = list(transform.bounds[name])
        else:
            columns[name] = {"kind": "other"}
    report = {
        **report,
        "split": cfg.split,
        "seed": cfg.seed,
        "passes": passes,
        "rows_per_split": rows_per_split,
        "cleaning": cleaning_report,
        "dense": transform.report,
        "sparse_mapping": cfg.sparse_mapping,
        "min_count": cfg.min_count,
        "vocab_sizes": {name: mapper.num_embeddings for name, mapper in mappers.items()},
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
        from data.movielens import prepare_movielens100k

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
    log = bool(cfg.log_transform)
    return convert(source, schema, cfg, out, report, log_transform=log)


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
    files = _input_files(cfg.source)
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
    schema = TableSchema(
        {"click": "label", **dict.fromkeys(CRITEO_DENSE, "dense"), **dict.fromkeys(CRITEO_SPARSE, "sparse")},
        label_ranges={"click": (0.0, 1.0)},
        binary_labels=("click",),
    )
    source = Source(
        files,
        lambda path: read_csv_chunks(path, *read),
        lambda raw, where, first_row: normalize_table(raw, schema, where, first_row),
    )
    report = {"converter": "criteo", "source": str(cfg.source), "files": [str(f) for f in files]}
    log = True if cfg.log_transform is None else cfg.log_transform
    return convert(source, schema, cfg, out, report, log_transform=log)


# --------------------------------------------------------------------------------------------- generic
def _generic_schema(cfg: PrepareConfig) -> TableSchema:
    if not cfg.columns:
        raise ValueError(
            "data.prepare.columns: map each input column to a kind (sparse, multi_hot, dense, label, other)"
        )
    for name, kind in cfg.columns.items():
        if kind not in KINDS:
            raise ValueError(f"data.prepare.columns.{name}: kind {kind!r} is not one of {', '.join(KINDS)}")
    ranges = {}
    for name in [n for n, k in cfg.columns.items() if k == "label"]:
        bounds = cfg.label_ranges.get(name)
        if name in cfg.binary_labels:
            bounds = bounds or [0.0, 1.0]
        if bounds is None or len(bounds) != 2 or bounds[0] > bounds[1]:
            raise ValueError(
                f"data.prepare.label_ranges.{name}: give [min, max] for every label column (got {bounds})"
            )
        ranges[name] = (float(bounds[0]), float(bounds[1]))
    for key in ("label_ranges", "binary_labels"):
        for name in getattr(cfg, key):
            if cfg.columns.get(name) != "label":
                raise ValueError(f"data.prepare.{key}: {name!r} is not a label in data.prepare.columns")
    return TableSchema(
        dict(cfg.columns),
        ranges,
        tuple(cfg.binary_labels),
        user_column=cfg.user_column,
        time_column=cfg.time_column,
    )


def _read_columns(cfg: PrepareConfig) -> list[str]:
    return list(dict.fromkeys([*cfg.columns, *(c for c in (cfg.user_column, cfg.time_column) if c)]))


def prepare_csv(cfg: PrepareConfig, out: str) -> DatasetMeta:
    """Any CSV file (or folder of CSV files) with a header, described by ``data.prepare.columns``."""
    schema = _generic_schema(cfg)
    files = _input_files(cfg.source, "*.csv*")
    wanted = _read_columns(cfg)
    types = {}
    for name in wanted:
        kind = cfg.columns.get(name, "other")
        if kind in ("sparse", "multi_hot") or name == cfg.user_column:
            types[name] = pa.string()
        elif kind in ("dense", "label") or name == cfg.time_column:
            types[name] = pa.float64()
    if len(cfg.csv_delimiter) != 1:
        raise ValueError(f"data.prepare.csv_delimiter: must be one character, got {cfg.csv_delimiter!r}")

    def read(path: Path) -> Iterator[pa.Table]:
        try:
            with pa.input_stream(str(path), compression="detect") as stream:
                header = pacsv.open_csv(
                    stream, parse_options=pacsv.ParseOptions(delimiter=cfg.csv_delimiter)
                ).schema.names
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: cannot read the CSV header ({str(err).splitlines()[0]})") from err
        missing = [name for name in wanted if name not in header]
        if missing:
            raise DataError(
                f"{path}: columns {missing} named in data.prepare are missing from the header (have: {header})"
            )
        yield from read_csv_chunks(
            path,
            pacsv.ReadOptions(column_names=header, skip_rows=1, block_size=CSV_BLOCK_BYTES),
            pacsv.ParseOptions(delimiter=cfg.csv_delimiter),
            pacsv.ConvertOptions(column_types=types, include_columns=wanted, strings_can_be_null=True),
        )

    source = Source(
        files,
        read,
        lambda raw, where, first_row: normalize_table(raw, schema, where, first_row, cfg.list_delimiter),
    )
    report = {"converter": "csv", "source": str(cfg.source), "files": [str(f) for f in files]}
    return convert(source, schema, cfg, out, report, log_transform=bool(cfg.log_transform))


def prepare_parquet(cfg: PrepareConfig, out: str) -> DatasetMeta:
    """Any Parquet file (or folder of ``*.parquet``), described by ``data.prepare.columns``."""
    schema = _generic_schema(cfg)
    files = _input_files(cfg.source, "*.parquet")
    wanted = _read_columns(cfg)
    source = Source(
        files,
        lambda path: read_parquet_chunks(path, wanted),
        lambda raw, where, first_row: normalize_table(raw, schema, where, first_row, cfg.list_delimiter),
    )
    report = {"converter": "parquet", "source": str(cfg.source), "files": [str(f) for f in files]}
    return convert(source, schema, cfg, out, report, log_transform=bool(cfg.log_transform))
