"""Up-front check of a prepared data set against the training schema, before any training starts.

The reader (``towerrec.data.reader.BatchStream``) validates what it reads, so a bad row stops training when
it is reached, perhaps hours in. :func:`validate_dataset` reads every row group of the splits once
(only the columns training needs, one row group at a time: bounded memory, vectorized
``pyarrow.compute``) and reports every problem it finds at once:

- files listed in ``metadata.json`` that are missing, not Parquet or truncated;
- empty shards and splits; row groups whose number or row counts disagree with ``metadata.json``;
- columns of ``metadata.json`` absent from a file; columns the training needs that are missing
  or of the wrong type (sparse: integers; multi-hot: list of integers; dense, labels, masks and
  weights: numbers);
- values the reader would reject, by the reader's own rules (``towerrec.data.rows.decode_rows``): negative
  ids, NaN/inf/null dense values without ``fill_nan``, labels that are missing, outside
  ``[min_value, max_value]``, or not 0/1 for binary tasks, negative or non-finite sample weights.
  With ``skip_bad_rows`` such rows are only counted.

Example::

    spec = read_spec(cfg.data, cfg.tasks, table_rows)     # trainer.datamodule.read_spec
    summary = validate_dataset(meta, spec, splits=["train", "val", "test"])
    summary["rows"]             # {"train": 80000, ...}
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from towerrec.data.dataset import METADATA_FILE, DataError, DatasetMeta, RowGroup
from towerrec.data.rows import OutOfRangeIds, ReadSpec, RowLocator, decode_rows

MAX_REPORTED = 20
"""Problems listed in the error message (the rest are counted)."""


def _is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _is_id_list(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)


def _column_roles(spec: ReadSpec) -> dict[str, tuple[str, str]]:
    """Column → (expected type description, role) for every column the training reads."""
    roles: dict[str, tuple[str, str]] = {}
    for feature in spec.sparse:
        kind = "multi_hot" if feature.multi_hot else "sparse"
        role = f"sparse feature {feature.name!r}"
        if feature.id_mapping == "dynamic":
            role += ", id_mapping: dynamic: int64 ids, text ids hashed when `towerrec prepare` builds the data set"
        roles[feature.source_column] = (kind, role)
    for feature in spec.dense:
        roles.setdefault(feature.source_column, ("number", f"dense feature {feature.name!r}"))
    for label in spec.labels:
        roles.setdefault(label.column, ("number", "label"))
        if label.mask_column:
            roles.setdefault(label.mask_column, ("number", "label mask"))
    if spec.sample_weight_column:
        roles.setdefault(spec.sample_weight_column, ("number", "sample weight"))
    return roles


def _type_ok(expected: str, kind: pa.DataType) -> bool:
    if expected == "sparse":
        return pa.types.is_integer(kind)
    if expected == "multi_hot":
        return _is_id_list(kind)
    return _is_numeric(kind)


_EXPECTED_TEXT = {"sparse": "integer ids", "multi_hot": "a list of integer ids", "number": "numbers"}


class _Checker:
    """Collects problems across files; the value rules are the reader's (``towerrec.data.rows.decode_rows``)."""

    def __init__(self, spec: ReadSpec):
        self.spec = spec
        self.problems: list[str] = []
        self.bad_rows = 0
        self.ids_out_of_range: dict[str, int] = {}
        self.split = ""
        self.out_of_range_ids: dict[str, OutOfRangeIds] = {}  # per split

    def check_row_group(self, table: pa.Table, group: RowGroup) -> None:
        _, report = decode_rows(table, self.spec, RowLocator([(group, 0)]), collect=True)
        self.problems += report.problems
        self.bad_rows += report.bad_rows
        for name, count in report.ids_out_of_range.items():
            self.ids_out_of_range[name] = self.ids_out_of_range.get(name, 0) + count
        self.out_of_range_ids.setdefault(self.split, OutOfRangeIds()).add(report)


def _check_file(file: str, groups: list[RowGroup], meta: DatasetMeta, checker: _Checker) -> int:
    """Checks one Parquet file; returns its rows (0 when it could not be read)."""
    problems = checker.problems
    if not Path(file).exists():
        problems.append(f"{file}: listed in {METADATA_FILE} but missing")
        return 0
    try:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
    except (pa.ArrowInvalid, OSError) as err:
        problems.append(f"{file}: not a readable Parquet file (not Parquet, or truncated: {err})")
        return 0
    structural = len(problems)
    num_rows = parquet.metadata.num_rows
    if num_rows == 0:
        problems.append(f"{file}: empty shard (0 rows)")
    listed = {group.index: group.num_rows for group in groups}
    if parquet.num_row_groups != len(listed):
        problems.append(
            f"{file}: has {parquet.num_row_groups} row groups, {METADATA_FILE} lists {len(listed)}"
        )
    for index, rows in listed.items():
        if index >= parquet.num_row_groups:
            problems.append(f"{file}: row group {index} listed in {METADATA_FILE} does not exist")
        elif parquet.metadata.row_group(index).num_rows != rows:
            actual = parquet.metadata.row_group(index).num_rows
            problems.append(f"{file}: row group {index} has {actual} rows, {METADATA_FILE} says {rows}")
    for name in meta.columns:
        if name not in schema.names:
            problems.append(f"{file}: column {name!r} of {METADATA_FILE} is missing from the file")
    for name, (expected, role) in _column_roles(checker.spec).items():
        if name not in schema.names:
            if name in meta.columns:
                continue  # already reported
            problems.append(f"{file}: missing column {name!r} ({role})")
        elif not _type_ok(expected, schema.field(name).type):
            problems.append(
                f"{file}: column {name!r} ({role}) has type {schema.field(name).type}, expected {_EXPECTED_TEXT[expected]}"
            )
    if len(problems) > structural:
        return num_rows
    columns = list(_column_roles(checker.spec))
    for index in sorted(listed):
        try:
            table = parquet.read_row_group(index, columns=columns)
        except (pa.ArrowInvalid, OSError) as err:
            problems.append(f"{file}: row group {index} cannot be read (truncated or corrupt: {err})")
            continue
        checker.check_row_group(table, RowGroup(file, index, table.num_rows))
    return num_rows


def validate_dataset(
    meta: DatasetMeta,
    spec: ReadSpec,
    splits: Iterable[str] | None = None,
    days: dict[str, tuple[int, int] | None] | None = None,
) -> dict[str, Any]:
    """Checks the splits of ``meta`` against ``spec``; raises one ``DataError`` listing all problems.

    Args:
        meta: the loaded data set (``DatasetMeta.load(path)``).
        spec: what training reads (``towerrec.trainer.datamodule.read_spec``).
        splits: split names to check (default: every split in ``metadata.json``).
        days: per split, the days ``[first, last]`` to check (a data set grown by days; default:
            every day).

    Returns:
        ``{"rows": {split: rows}, "bad_rows": n, "ids_out_of_range": {feature: n}, "out_of_range_ids":
        {split: OutOfRangeIds}}``; ``bad_rows`` counts rows the reader will skip (only with
        ``spec.skip_bad_rows``), ``ids_out_of_range`` vocabulary ids >= ``num_embeddings`` that the
        reader maps to row 0 (``out_of_range_ids``: per split, with the ids read).
    """
    checker = _Checker(spec)
    rows: dict[str, int] = {}
    for split in list(splits) if splits is not None else sorted(meta.splits):
        if split not in meta.splits:
            checker.problems.append(
                f"{meta.root / METADATA_FILE}: no split {split!r} (have: {sorted(meta.splits)})"
            )
            continue
        groups = meta.row_groups(split, (days or {}).get(split))
        checker.split = split
        if not groups:
            checker.problems.append(f"{meta.root / METADATA_FILE}: split {split!r} is empty (no row groups)")
        by_file: dict[str, list[RowGroup]] = {}
        for group in groups:
            by_file.setdefault(group.file, []).append(group)
        rows[split] = sum(
            _check_file(file, file_groups, meta, checker) for file, file_groups in by_file.items()
        )
    problems = checker.problems
    if problems:
        more = (
            f"\n  ... and {len(problems) - MAX_REPORTED} more problems"
            if len(problems) > MAX_REPORTED
            else ""
        )
        raise DataError(
            f"{meta.root}: data set does not match the training schema ({len(problems)} problems):\n  "
            + "\n  ".join(problems[:MAX_REPORTED])
            + more
        )
    return {
        "rows": rows,
        "bad_rows": checker.bad_rows,
        "ids_out_of_range": checker.ids_out_of_range,
        "out_of_range_ids": checker.out_of_range_ids,
    }
