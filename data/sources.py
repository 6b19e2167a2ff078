"""Input sources of ``towerrec prepare``: files, folders, globs and URIs, read as streams of chunks
(CSV in blocks of ``CSV_BLOCK_BYTES``, Parquet in batches of ``PARQUET_BATCH_ROWS``), compressed
or not, with the file and row of every chunk."""

from __future__ import annotations

import fnmatch
import glob as globmod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from towerrec.data.dataset import DataError

CSV_BLOCK_BYTES = 16 << 20
"""Bytes of CSV text parsed per chunk (pyarrow's streaming reader)."""
PARQUET_BATCH_ROWS = 262_144
"""Rows per chunk read from Parquet input."""


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


def open_input(path):
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
        with open_input(path) as stream:
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
        with open_input(path) as stream:
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


def csv_header(path, options) -> list[str]:
    """The column names of a CSV file: ``csv.column_names``, else its header line."""
    if not options.header:
        return list(options.column_names)
    import csv
    import io

    try:
        with open_input(path) as stream:
            head = stream.read(1 << 20)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot be read ({str(err).splitlines()[0]})") from err
    try:  # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first name
        first = head.decode("utf-8-sig").splitlines()[0] if head else ""
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
