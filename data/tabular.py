"""Any CSV or Parquet table described by the config (``data.prepare.format``: ``csv`` / ``parquet``):
the columns that ``data.sparse``, ``data.dense``, ``tasks`` and ``data.prepare.columns`` name,
read as they are written (header or not, any delimiter, missing-value tokens, pre-split files)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv

from towerrec.data.cleaning import (
    TableSchema,
)
from towerrec.data.config import PrepareConfig
from towerrec.data.convert import FrozenEncoding, convert
from towerrec.data.dataset import DataError, DatasetMeta
from towerrec.data.expressions import Expression, compile_all
from towerrec.data.normalize import clean_text, normalize_table
from towerrec.data.sources import (
    CSV_BLOCK_BYTES,
    Source,
    csv_header,
    input_files,
    read_csv_chunks,
    read_parquet_chunks,
)
from towerrec.data.splits import SPLIT_NAMES


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


def prepare_csv(
    cfg: PrepareConfig, out: str, schema: TableSchema | None = None, frozen: FrozenEncoding | None = None
) -> DatasetMeta:
    """CSV files (with or without a header, any one-character delimiter, compressed or not) whose
    columns the config declares (``data.sparse``, ``data.dense``, ``tasks``: see ``schema``)."""
    schema = _require_schema(schema, "csv")
    options = cfg.csv
    derived = compile_all(cfg.derive)
    wanted = _needed_inputs(schema, derived)
    files, splits, described = _generic_inputs(cfg, "*.csv*")

    def read(path) -> Iterator[pa.Table]:
        names = csv_header(path, options)
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
            clean_text(raw, options), schema, where, first_row, cfg.list_delimiter, header_lines, derived
        ),
        splits,
    )
    report = {"converter": "csv", "source": described, "files": [str(f) for f in files]}
    return convert(source, schema, cfg, out, report, frozen)


def prepare_parquet(
    cfg: PrepareConfig, out: str, schema: TableSchema | None = None, frozen: FrozenEncoding | None = None
) -> DatasetMeta:
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
    return convert(source, schema, cfg, out, report, frozen)
