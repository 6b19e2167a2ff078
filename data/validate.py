"""Up-front check of a prepared data set against the training schema, before any training starts.

The reader (``data.reader.BatchStream``) validates what it reads, so a bad row stops training when
it is reached, perhaps hours in. :func:`validate_dataset` reads every row group of the splits once
(only the columns training needs, one row group at a time: bounded memory, vectorized
``pyarrow.compute``) and reports every problem it finds at once:

- files listed in ``metadata.json`` that are missing, not Parquet or truncated;
- empty shards and splits; row groups whose number or row counts disagree with ``metadata.json``;
- columns of ``metadata.json`` absent from a file; columns the training needs that are missing
  or of the wrong type (sparse: integers; multi-hot: list of integers; dense, labels, masks and
  weights: numbers);
- values the reader would reject: negative ids, NaN/inf/null dense values without ``fill_nan``,
  labels that are missing, outside ``[min_value, max_value]``, or not 0/1 for binary tasks,
  negative or non-finite sample weights. With ``skip_bad_rows`` such rows are only counted.

Example::

    spec = read_spec(cfg, num_embeddings)                 # trainer.datamodule.read_spec
    summary = validate_dataset(meta, spec, splits=["train", "val", "test"])
    summary["rows"]             # {"train": 80000, ...}
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.dataset import METADATA_FILE, DataError, DatasetMeta, RowGroup
from data.reader import ReadSpec

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
        roles[feature.source_column] = (kind, f"sparse feature {feature.name!r}")
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
    """Collects problems; value checks return the bad-row mask's first row and count."""

    def __init__(self, spec: ReadSpec):
        self.spec = spec
        self.problems: list[str] = []
        self.bad_rows = 0
        self.ids_out_of_range: dict[str, int] = {}

    def value_problem(
        self, where: str, mask: pa.Array, column: str, what: str, values: pa.Array
    ) -> pa.Array | None:
        """Records rows where ``mask`` is true; returns the mask when rows are to be skipped instead."""
        mask = pc.fill_null(mask, True)
        count = pc.sum(mask).as_py() or 0
        if not count:
            return None
        row = pc.index(mask, True).as_py()
        value = values[row].as_py()
        if self.spec.skip_bad_rows:
            return mask
        self.problems.append(
            f"{where}, row {row}: column {column!r} {what} (value {value!r}; {count} such rows)"
        )
        return None

    def check_row_group(self, table: pa.Table, where: str) -> None:
        spec = self.spec
        bad = pa.array([False] * table.num_rows)

        def merge(mask: pa.Array | None) -> None:
            nonlocal bad
            if mask is not None:
                bad = pc.or_(bad, mask)

        for feature in spec.sparse:
            column = table.column(feature.source_column).combine_chunks()
            values = column.flatten() if feature.multi_hot else column
            negative = pc.less(values, 0)
            if feature.multi_hot:
                parents = column.value_parent_indices()
                negative_rows = pc.filter(parents, pc.fill_null(negative, False))
                if len(negative_rows):
                    mask = pc.is_in(
                        pa.array(range(table.num_rows), pa.int64()), value_set=negative_rows.cast(pa.int64())
                    )
                    merge(
                        self.value_problem(
                            where, mask, feature.source_column, "has a negative id in its list", column
                        )
                    )
            else:
                merge(
                    self.value_problem(
                        where,
                        pc.fill_null(negative, False),
                        feature.source_column,
                        "has a negative id",
                        column,
                    )
                )
            size = spec.num_embeddings.get(feature.name)
            if feature.id_mapping == "vocab" and size is not None:
                outside = pc.sum(pc.fill_null(pc.greater_equal(values, size), False)).as_py() or 0
                if outside:
                    self.ids_out_of_range[feature.name] = self.ids_out_of_range.get(feature.name, 0) + outside
        for feature in spec.dense:
            if feature.fill_nan is not None:
                continue
            values = table.column(feature.source_column).combine_chunks().cast(pa.float64())
            invalid = pc.invert(pc.fill_null(pc.is_finite(values), False))
            hint = f"is NaN/inf/missing (set fill_nan for dense feature {feature.name!r})"
            merge(self.value_problem(where, invalid, feature.source_column, hint, values))
        for label in spec.labels:
            values = table.column(label.column).combine_chunks().cast(pa.float64())
            invalid = pc.invert(pc.fill_null(pc.is_finite(values), False))
            if label.binary:
                invalid = pc.or_(
                    invalid, pc.invert(pc.fill_null(pc.is_in(values, value_set=pa.array([0.0, 1.0])), False))
                )
                allowed = "{0, 1}"
            else:
                if label.min_value is not None:
                    invalid = pc.or_(invalid, pc.fill_null(pc.less(values, label.min_value), False))
                if label.max_value is not None:
                    invalid = pc.or_(invalid, pc.fill_null(pc.greater(values, label.max_value), False))
                allowed = f"[{label.min_value}, {label.max_value}]"
            if label.mask_column:  # rows the task's mask leaves out may have any label (or none)
                mask = table.column(label.mask_column).combine_chunks().cast(pa.float64())
                counted = pc.fill_null(pc.and_(pc.is_finite(mask), pc.not_equal(mask, 0.0)), False)
                invalid = pc.and_(invalid, counted)
            merge(
                self.value_problem(
                    where, invalid, label.column, f"is a label outside {allowed} or missing", values
                )
            )
        if spec.sample_weight_column:
            values = table.column(spec.sample_weight_column).combine_chunks().cast(pa.float64())
            invalid = pc.invert(
                pc.fill_null(pc.and_(pc.is_finite(values), pc.greater_equal(values, 0.0)), False)
            )
            if pc.any(invalid).as_py():  # the reader rejects bad weights even with skip_bad_rows
                row = pc.index(invalid, True).as_py()
                self.problems.append(
                    f"{where}, row {row}: sample weight column {spec.sample_weight_column!r} has invalid value "
                    f"{values[row].as_py()!r} (must be finite and >= 0)"
                )
        self.bad_rows += pc.sum(bad).as_py() or 0


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
        checker.check_row_group(table, f"{file}: row group {index}")
    return num_rows


def validate_dataset(
    meta: DatasetMeta, spec: ReadSpec, splits: Iterable[str] | None = None
) -> dict[str, Any]:
    """Checks the splits of ``meta`` against ``spec``; raises one ``DataError`` listing all problems.

    Args:
        meta: the loaded data set (``DatasetMeta.load(path)``).
        spec: what training reads (``trainer.datamodule.read_spec(cfg, num_embeddings)``).
        splits: split names to check (default: every split in ``metadata.json``).

    Returns:
        ``{"rows": {split: rows}, "bad_rows": n, "ids_out_of_range": {feature: n}}``; ``bad_rows``
        counts rows the reader will skip (only with ``spec.skip_bad_rows``), ``ids_out_of_range``
        vocabulary ids >= ``num_embeddings`` that the reader maps to row 0.
    """
    checker = _Checker(spec)
    rows: dict[str, int] = {}
    for split in list(splits) if splits is not None else sorted(meta.splits):
        if split not in meta.splits:
            checker.problems.append(
                f"{meta.root / METADATA_FILE}: no split {split!r} (have: {sorted(meta.splits)})"
            )
            continue
        groups = meta.splits[split]
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
    return {"rows": rows, "bad_rows": checker.bad_rows, "ids_out_of_range": checker.ids_out_of_range}
