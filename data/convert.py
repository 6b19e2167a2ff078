"""The conversion every streamed format goes through (``towerrec.data.movielens``, ``criteo``,
``tabular``): a converter reads its input as a stream of chunks (``towerrec.data.sources``),
**normalizes** each chunk (``towerrec.data.normalize``) and hands the stream to :func:`convert`,
which makes up to three passes over the input so that memory stays O(chunk + vocabularies):

1. only for ``time``/``leave_last_out`` splits: clean, collect the time sample / per-user last rows;
2. clean, split, count ids of the training rows (vocabularies, ``min_count``), sample dense
   values of the training rows (``clip_quantile``), gather the events of
   ``data.prepare.histories`` (user, time and ids: O(events) memory) and, for
   ``negatives_per_positive``, every row's (user, item) pair and the training items' item-side
   values (``towerrec.data.negatives``) — skipped when there is nothing to fit;
3. clean, split, add sampled negatives, map ids to rows, transform dense values, build each
   row's histories from the events strictly before it (``towerrec.data.history``), write
   train/val/test shards. A binary label with one value on every training row stops here
   (``ConstantLabel``), before anything is committed.

Cleaning (``towerrec.data.cleaning``) is deterministic, so every pass sees the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from towerrec.data.cleaning import (
    Cleaner,
    DenseTransforms,
    TableSchema,
    dense_values,
)
from towerrec.data.config import PrepareConfig
from towerrec.data.dataset import DataError, DatasetMeta, DatasetWriter
from towerrec.data.history import MAX_AGE_BUCKET
from towerrec.data.history_events import HistoryEvents
from towerrec.data.id_mapping import IdCounts, IdMapper, id_values
from towerrec.data.negatives import RATED, LogNegatives
from towerrec.data.normalize import KINDS
from towerrec.data.sources import (
    Chunk,
    Source,
)
from towerrec.data.splits import SPLIT_NAMES, TRAIN, LeaveLastOut, SplitKeys, make_splitter


def _split_keys(table: pa.Table, row_index: np.ndarray, schema: TableSchema, chunk: Chunk,
                cfg: PrepareConfig, keyed: bool) -> SplitKeys:  # fmt: skip
    """The chunk's split keys; with ``keyed`` (the split, histories or negatives follow each
    user's events) a row without a user or a time is an error naming its file, row and column."""
    user = time = given = interaction = None
    if schema.user_column:
        user, _, missing, _ = id_values(table.column(schema.user_column))
        if keyed and missing.any():
            _missing_key(chunk, row_index, np.flatnonzero(missing), schema.user_column, "user_column")
    if schema.time_column:
        time = dense_values(table.column(schema.time_column))
        if keyed and np.isnan(time).any():
            _missing_key(chunk, row_index, np.flatnonzero(np.isnan(time)), schema.time_column, "time_column")
    if cfg.interaction_column:
        if cfg.interaction_column not in table.column_names:
            raise DataError(
                f"data.prepare.interaction_column: {cfg.interaction_column!r} is not a column the config reads "
                "(name it as a label, a task mask or in data.prepare.columns)"
            )
        flags = dense_values(table.column(cfg.interaction_column))
        interaction = np.isfinite(flags) & (flags != 0)
    split_values = cfg.split_values
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
    return SplitKeys(row_index=row_index, user=user, time=time, given=given, interaction=interaction)


def _missing_key(chunk: Chunk, row_index: np.ndarray, rows: np.ndarray, column: str, key: str) -> None:
    raise DataError(
        f"{chunk.file}: row {int(row_index[rows[0]]) - chunk.first_row}: column {column!r} "
        f"(data.prepare.{key}) is empty ({len(rows)} such rows in this chunk): every row needs its user and time"
    )


SAMPLED_SLICE_ROWS = 262_144
"""Rows (real and sampled) encoded at once when negatives are sampled: a chunk grows k + 1 times."""


def _slices(table: pa.Table, keys: SplitKeys, codes: np.ndarray, filled: dict[str, np.ndarray], size: int):
    """(table, keys, codes, filled) of consecutive slices of at most ``size`` rows."""
    for start in range(0, max(table.num_rows, 1), size):
        part = slice(start, start + size)
        yield (
            table.slice(start, size),
            SplitKeys(keys.row_index[part], None if keys.user is None else keys.user[part],
                      None if keys.time is None else keys.time[part]),
            codes[part],
            {name: missing[part] for name, missing in filled.items()},
        )  # fmt: skip


def _event_keys(keys: SplitKeys) -> SplitKeys:
    """The keys histories order events by: the time, else the row order."""
    if keys.time is not None:
        return keys
    return SplitKeys(
        keys.row_index, keys.user, keys.row_index.astype(np.float64), keys.given, keys.interaction
    )


class ConstantLabel(DataError):
    """A binary label with one value on every training row (the trainer names the task)."""

    def __init__(self, where: str, column: str, value: float, task: str | None = None):
        self.where, self.column, self.value = where, column, value
        owner = f"tasks: {task!r} (label column {column!r})" if task else f"label column {column!r}"
        super().__init__(
            f"{where}: {owner} is {value:g} on every training row: a binary task needs both 0 and 1 to learn "
            "anything (check the label, or its expression in data.prepare.derive)"
        )


def _negatives(cfg: PrepareConfig, schema: TableSchema) -> LogNegatives | None:
    """The sampler of ``negatives_per_positive`` (None without), its keys checked."""
    if not cfg.negatives_per_positive:
        return None
    for key in ("user_column", "item_column"):
        if not getattr(cfg, key):
            raise DataError(f"data.prepare.{key}: negatives_per_positive samples items per user: set it")
    if schema.kinds.get(cfg.item_column) != "sparse":
        raise DataError(
            f"data.prepare.item_column: {cfg.item_column!r} is not a single-valued id column of the data "
            "(name it in data.sparse)"
        )
    if RATED in schema.kinds:
        raise DataError(
            f"data.prepare.negatives_per_positive: the data already has a column {RATED!r}, the label "
            "sampled negatives add; rename it"
        )
    return LogNegatives(cfg.negatives_per_positive, cfg.user_column, cfg.item_column, list(schema.item_side),
                        cfg.seed)  # fmt: skip


@dataclass
class FrozenEncoding:
    """How an earlier preparation encoded its columns, for a day appended to it
    (``towerrec.data.prepare.append_day``): its id mappers (vocabularies or hashes), its fitted
    dense transforms and bucket edges, the normalized type of each input column, and the day's
    number (it salts the day's split and shuffle seeds)."""

    mappers: dict[str, IdMapper]
    transforms: DenseTransforms
    input_types: dict[str, str]
    day: int


def _check_input_types(chunk: Chunk, schema: TableSchema, types: dict[str, str], frozen: bool) -> None:
    """Records each column's normalized type (first chunk) or, for an appended day, refuses a
    column whose type differs from the earlier days' (integer ids against text ids would all miss
    the vocabulary)."""
    for name in schema.kinds:
        if (
            name not in chunk.table.column_names
            or chunk.table.column(name).null_count == chunk.table.num_rows
        ):
            continue
        kind = str(chunk.table.column(name).type)
        if name not in types:
            if not frozen:
                types[name] = kind
        elif types[name] != kind:
            raise DataError(
                f"{chunk.file}: column {name!r} has type {kind}, but the data set's earlier days have {types[name]} "
                "(a day appended with another schema: convert the column, or prepare a new data set)"
            )


def convert(
    source: Source,
    schema: TableSchema,
    cfg: PrepareConfig,
    out: str,
    report: dict[str, Any],
    frozen: FrozenEncoding | None = None,
) -> DatasetMeta:
    """Cleans, splits, encodes and writes ``source`` (see the module docstring for the passes).

    Returns the committed data set; ``report`` (converter, source, ...) is extended with the
    cleaning counts, vocabulary sizes and rows per split and stored in ``metadata.json``.
    ``frozen``: an appended day, encoded as the earlier days were (no vocabulary or transform is
    fitted; ids the vocabularies do not know go to row 0 and are counted).
    """
    for name, kind in schema.kinds.items():
        if kind not in KINDS:
            raise ValueError(f"data.prepare.columns.{name}: kind {kind!r} is not one of {', '.join(KINDS)}")
    given = source.splits is not None or schema.split_column is not None
    seed = cfg.seed if frozen is None else cfg.seed + 1_000_003 * frozen.day
    splitter = make_splitter(
        "given" if given else cfg.split,
        seed,
        cfg.val_fraction,
        cfg.test_fraction,
        cfg.cut_time,
        has_user=schema.user_column is not None,
        # train and test files without a val file: val is carved from train (a split column
        # states every row's split, val included, so nothing moves)
        given_has_val=not cfg.split_files or "val" in cfg.split_files,
        min_events_per_user=cfg.min_events_per_user,
    )
    negatives = _negatives(cfg, schema)
    keyed = cfg.split == "leave_last_out" or bool(cfg.histories) or negatives is not None
    id_columns = schema.of_kind("sparse", "multi_hot")
    transforms = DenseTransforms(schema.dense_specs, schema.buckets, seed=cfg.seed)
    if frozen is not None:
        transforms = frozen.transforms
    input_types = dict(frozen.input_types) if frozen is not None else {}

    def cleaned() -> Iterator[tuple[pa.Table, np.ndarray, SplitKeys, Cleaner, Chunk]]:
        cleaner = Cleaner(schema, cfg.dedup, cfg.missing_sparse, cfg.missing_dense, cfg.dense_fill)
        for chunk in source.chunks():
            _check_input_types(chunk, schema, input_types, frozen is not None)
            table, row_index = cleaner.clean(chunk.table, chunk.row_index, chunk.file, chunk.first_row)
            yield table, row_index, _split_keys(table, row_index, schema, chunk, cfg, keyed), cleaner, chunk

    passes = 1
    split_report: dict[str, Any] = {}
    if splitter.needs_fit:  # pass 1: what the split needs to know about all rows
        passes += 1
        for _, _, keys, _, _ in cleaned():
            splitter.fit(keys)
        splitter.finish_fit()
    if isinstance(splitter, LeaveLastOut) and not given:
        held_out = splitter.num_held_out_users
        split_report = {"min_events_per_user": cfg.min_events_per_user, "users_held_out": held_out,
                        "users_train_only": len(splitter.users) - held_out}  # fmt: skip
        if held_out == 0:
            most = int(splitter.counts.max()) if len(splitter.counts) else 0
            raise DataError(
                f"{report.get('source')}: no user has data.prepare.min_events_per_user = {cfg.min_events_per_user} "
                f"interactions (the most any of its {len(splitter.users):,} users has: {most}), so leave_last_out "
                "leaves no validation or test row; lower the key or choose another data.prepare.split"
            )

    vocabulary_columns = [name for name in id_columns if name not in schema.dynamic_ids]
    counts = (
        {name: IdCounts() for name in vocabulary_columns}
        if cfg.sparse_mapping == "vocab" and frozen is None
        else {}
    )
    events = HistoryEvents(cfg.histories, schema)
    to_fit = counts or transforms.needs_fit or cfg.histories or negatives is not None
    if to_fit:  # pass 2: vocabularies, quantiles, moments, events, pairs of negatives
        passes += 1
        for table, row_index, keys, cleaner, _ in cleaned():
            codes = splitter.assign(keys)
            train = codes == TRAIN
            events.observe(table, _event_keys(keys), train)
            if negatives is not None:
                negatives.observe(table, keys, codes, cleaner.filled)
            for name in counts:
                ids, offsets, nulls, originals = id_values(table.column(name))
                rows_of_ids = train if offsets is None else np.repeat(train, np.diff(offsets))
                chosen = rows_of_ids & ~nulls
                counts[name].add(ids[chosen], originals.filter(pa.array(chosen)))
            for name in transforms.samples:
                transforms.observe(name, dense_values(table.column(name))[train], row_index[train])
        transforms.finish_fit()
    if frozen is not None:
        mappers = frozen.mappers
    elif counts:
        mappers = {name: IdMapper(vocabulary=counts[name].vocabulary(cfg.min_count)) for name in counts}
    else:
        mappers = {name: IdMapper(num_hash_buckets=cfg.num_hash_buckets) for name in vocabulary_columns}
    mappers.update({name: IdMapper(raw=True) for name in id_columns if name in schema.dynamic_ids})

    logs = events.logs(mappers)
    if negatives is not None:
        negatives.finish(mappers[negatives.item_column], str(report.get("source")))
    label_values = {name: set() for name in schema.binary_labels}
    # tasks' labels and masks (they have a range) are missing on sampled rows; weights are copied
    missing_on_sampled = [name for name in schema.of_kind("label") if name in schema.label_ranges]

    def encode(table: pa.Table, keys: SplitKeys, filled: dict[str, np.ndarray]) -> pa.Table:
        """Ids → rows, dense transforms, buckets and histories of cleaned (and augmented) rows."""
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
            if bucket.source in filled:
                values = np.where(filled[bucket.source], np.nan, values)
            encoded[name] = pa.array(transforms.bucketize(name, values))
        if negatives is not None:
            encoded[RATED] = table.column(RATED)
        event_keys = _event_keys(keys)
        for history, log in zip(cfg.histories, logs):
            length = history.max_length or cfg.history_max_length
            lists = log.sequences(event_keys.user, event_keys.time, length, history.age)
            encoded.update({name: jagged.to_arrow(pa.int64()) for name, jagged in lists.items()})
        return pa.table(encoded)

    writer = DatasetWriter(out, cfg.num_shards, cfg.row_group_size, shuffle_splits=("train",), seed=seed)
    rows_per_split = dict.fromkeys(SPLIT_NAMES, 0)
    try:  # the last pass: encode and write
        for name, mapper in mappers.items():
            if mapper.vocabulary is not None and frozen is None:  # a day keeps day 0's vocabularies
                writer.write_vocabulary(name, mapper.vocabulary.originals)
        cleaning_report: dict[str, Any] = {}
        for table, _, keys, cleaner, chunk in cleaned():
            cleaning_report = cleaner.report
            codes = splitter.assign(keys)
            for name, seen in label_values.items():  # the training rows' values of each binary label
                values = dense_values(table.column(name))[codes == TRAIN]
                seen.update(np.unique(values[np.isfinite(values)]).tolist())
            parts = iter([(table, keys, codes, cleaner.filled)])
            if negatives is not None:  # slice by slice: k + 1 rows out per row in, histories copied
                size = max(1, SAMPLED_SLICE_ROWS // (1 + negatives.per_row))
                parts = (
                    negatives.augment(*part, missing_on_sampled, chunk.file, chunk.first_row)
                    for part in _slices(table, keys, codes, cleaner.filled, size)
                )
            for part_table, part_keys, part_codes, filled in parts:
                encoded_table = encode(part_table, part_keys, filled)
                for split, rows in writer.write_splits(encoded_table, part_codes, SPLIT_NAMES).items():
                    rows_per_split[split] += rows
        for name, mapper in mappers.items():
            if mapper.text:  # dynamic text ids: their hashes are stored, outputs name the texts
                writer.write_originals(name, mapper.originals.keys, mapper.originals.originals)
    except BaseException:
        writer.abort()
        raise
    if rows_per_split["train"] == 0:
        writer.abort()
        raise DataError(
            f"{report.get('source')}: no training rows left after cleaning and splitting "
            f"({_why_no_rows(cleaning_report, rows_per_split)})"
        )
    constant = {name: seen for name, seen in label_values.items() if len(seen) == 1}
    if constant:
        writer.abort()
        name, (value,) = next(iter(constant.items()))
        raise ConstantLabel(str(report.get("source")), name, value)

    def mapping(name: str) -> dict[str, Any]:
        if mappers[name].raw:
            return {"mapping": "dynamic", "id_type": "text" if mappers[name].text else "integer"}
        return {"num_embeddings": mappers[name].num_embeddings, "mapping": cfg.sparse_mapping}

    columns: dict[str, dict[str, Any]] = {}
    for name, kind in schema.kinds.items():
        if kind in ("sparse", "multi_hot"):
            columns[name] = {"kind": kind, **mapping(name)}
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
    if negatives is not None:
        columns[RATED] = {"kind": "label", "min": 0.0, "max": 1.0, "binary": True}
    for history in cfg.histories:
        for name, source in [(history.name, history.column), *history.side.items()]:
            columns[name] = {"kind": "multi_hot", **mapping(source), "history_of": source}
        if history.age:
            columns[history.age] = {
                "kind": "multi_hot",
                "num_embeddings": MAX_AGE_BUCKET + 1,
                "mapping": "age",
            }
    report = {
        **report,
        "split": "given" if given else cfg.split,
        **({"leave_last_out": split_report} if split_report else {}),
        **({"negatives_per_positive": cfg.negatives_per_positive} if negatives is not None else {}),
        "seed": cfg.seed,
        "passes": passes,
        "rows_per_split": rows_per_split,
        "cleaning": cleaning_report,
        "dense": transforms.report,
        "sparse_mapping": cfg.sparse_mapping,
        "min_count": cfg.min_count,
        "vocab_sizes": {name: mapper.num_embeddings for name, mapper in mappers.items() if not mapper.raw},
        "dynamic_id_columns": sorted(name for name, mapper in mappers.items() if mapper.raw),
        "ids_outside_vocabulary": {
            name: m.outside for name, m in mappers.items() if m.vocabulary is not None
        },
        "input_types": input_types,
    }
    return writer.commit(columns=columns, report=report)


def _why_no_rows(cleaning: dict[str, Any], rows_per_split: dict[str, int]) -> str:
    """What took every training row: an entirely empty label column is named first."""
    rows = int(cleaning.get("rows_in", 0))
    if rows == 0:
        return "the input has no rows"
    empty = [name for name, count in cleaning.get("label_missing_dropped", {}).items() if count == rows]
    if empty:
        return f"label column {empty[0]!r} is empty in all {rows:,} rows: is it the column you meant?"
    dropped = [
        f"{rule.replace('_', ' ')} {name!r}: {count:,}"
        for rule, counts in cleaning.items()
        if rule.endswith("_dropped") and isinstance(counts, dict)
        for name, count in counts.items()
        if count
    ]
    if cleaning.get("duplicates_dropped"):
        dropped.append(f"duplicates: {cleaning['duplicates_dropped']:,}")
    kept = {split: count for split, count in rows_per_split.items() if count}
    return f"{rows:,} rows read; dropped: {'; '.join(dropped) or 'none'}; rows per split: {kept or 'none'}"
