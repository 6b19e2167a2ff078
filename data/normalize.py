"""Normalizing input chunks to canonical types: sparse ids ``int64`` (integers as they are, strings
as 64-bit hashes), multi-hot ``list<int64>``, dense values and labels ``float64`` with nulls; a
value that cannot be read names its file, row and column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from towerrec.data.cleaning import (
    TableSchema,
    dense_values,
)
from towerrec.data.dataset import DataError
from towerrec.data.expressions import Expression
from towerrec.data.jagged import list_parts

KINDS = ("sparse", "multi_hot", "dense", "label", "other")


_NUMBER = r"(?i)^[-+]?((\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?|nan|inf|infinity)$"


def is_text(column) -> bool:
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
    if is_text(column):
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


# A number written as a float: with a decimal point (``3.0``, ``.5``, ``2.5e3``). Not ``1e3``
# alone: hexadecimal ids (Criteo's ``0002e668``) are digits around an ``e``.
_FLOAT_WRITTEN = r"(?i)^[-+]?(\d+\.\d*|\.\d+)(e[-+]?\d+)?$"
_EXACT = 2.0**53  # floats are exact integers up to here
ID_RULE = (
    "ids are integers or text; a float id is read as the integer it equals (3.0 as 3) and refused otherwise"
)


def _integral(values: np.ndarray, present: np.ndarray, where: str, name: str, first_row: int,
              header_lines: int, shown) -> np.ndarray:  # fmt: skip
    """``values`` (float64) as int64 where ``present``; a value that is not an exact integer is an
    error naming the file, row and column (``shown(row)``: the value as the input wrote it)."""
    bad = present & ~(np.isfinite(values) & (values == np.round(values)) & (np.abs(values) < _EXACT))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        problem = (
            "is too large to be an exact integer"
            if np.isfinite(values[row]) and np.abs(values[row]) >= _EXACT
            else "is not an integer"
        )
        raise DataError(
            f"{_where(where, first_row, row, header_lines)}: column {name!r}: id {shown(row)} {problem} ({ID_RULE})"
        )
    return np.where(present, values, 0).astype(np.int64)


def _as_ids(column, where: str, name: str, first_row: int, header_lines: int = -1) -> pa.Array:
    """Any id column → int64 (integers) or string (text, trimmed; kept as written so that
    vocabularies, lists and predictions give the original ids back). One rule for floats in every
    format (``ID_RULE``): a Parquet float column, or a CSV cell written as a float, is the integer
    it equals (``3.0`` → 3, as ``3`` in text), and a non-integral one (``2.5``) is refused."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if is_text(column) or pa.types.is_binary(kind):
        column = pc.utf8_trim_whitespace(column.cast(pa.string()))
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
        written = np.asarray(pc.fill_null(pc.match_substring_regex(column, _FLOAT_WRITTEN), False))
        if not written.any():
            return column
        values = dense_values(pc.if_else(pa.array(written), column, pa.scalar(None, pa.string())))
        integers = _integral(
            values, written, where, name, first_row, header_lines, lambda row: repr(column[row].as_py())
        )
        return pc.if_else(pa.array(written), pa.array(integers).cast(pa.string()), column)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return column.cast(pa.int64())
    if pa.types.is_floating(kind):
        values = dense_values(column)
        present = ~np.isnan(values)  # null (or NaN): a missing id
        integers = _integral(values, present, where, name, first_row, header_lines, lambda row: values[row])
        return pa.array(integers, mask=~present)
    if pa.types.is_null(kind):
        return pa.nulls(len(column), pa.int64())
    raise DataError(f"{where}: column {name!r} has type {kind}, expected integer or string ids")


def _as_id_lists(
    column, where: str, name: str, first_row: int, delimiter: str, header_lines: int = -1
) -> pa.Array:
    """A multi-hot column (a list, or a delimited string) → list<int64 or string>; empty tokens are dropped."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if is_text(column):
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


def clean_text(table: pa.Table, options) -> pa.Table:
    """Text cells: spaces stripped (``csv.strip``), and a cell equal to a ``csv.null_values`` token
    (or empty) made missing."""
    tokens = pa.array(["", *options.null_values], pa.string())
    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if not is_text(column):
            continue
        if options.strip:
            column = pc.utf8_trim_whitespace(column)
        column = pc.if_else(pc.is_in(column, value_set=tokens), pa.scalar(None, column.type), column)
        table = table.set_column(index, name, column)
    return table
