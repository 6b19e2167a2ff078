"""``towerrec init``: read a CSV/Parquet file's columns and write a commented starter config that
trains as is.

    towerrec init --source shop.csv --label click --label purchase --output shop.yaml
    towerrec init --source logs/ --label "like=rating >= 4" --label rating --user uid --item movie
    towerrec init --source plays.csv --output plays.yaml      # no label: an implicit log, retrieval

Without ``--label`` the file is an implicit log (user, item and, best, a time or a position per
user): the config trains a two-tower retrieval model on a leave-last-out split, the user tower
reading the user's earlier items as a sequence. A 0/1 column whose 0 rows share user and time
with a 1 row (sampled negatives, items shown but not chosen) marks the interactions: with or
without ``--label``, only its 1 rows are seen items and history events (and, leave-last-out,
held-out events).

Each column becomes one thing, decided from a sample of rows and said in a comment beside it:
a label (``--label``: 0/1 values → a binary task, other numbers → regression), the user and item
ids (by name, or ``--user``/``--item``), an id feature (text, integer codes, ``*_id`` names), a bag
of ids (text with ``|`` inside), a number (standardised; ``log1p`` first when heavy-tailed; and
its quantile bucket as an id feature ``<name>_q`` beside it), the
time (kept to split on; an integer column that counts each user's events from 0 or 1 is the
order of events instead) or a split column; constant and one-per-row text columns are left out,
and a label with one value is refused.
Features that never change for a user (item) get ``side: user`` (``item``), which
``towerrec recommend`` needs. Nothing is dropped or rewritten without a line in the config.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from towerrec.data.errors import DataError
from towerrec.trainer.errors import ConfigError, OutputExists

SAMPLE_ROWS = 100_000
USER_NAMES = (
    "user",
    "user_id",
    "userid",
    "uid",
    "customer",
    "customer_id",
    "visitor",
    "visitor_id",
    "member_id",
)
ITEM_NAMES = ("item", "item_id", "itemid", "iid", "product", "product_id", "sku", "movie", "movie_id", "ad", "ad_id",
              "video_id", "song_id", "article_id", "offer_id")  # fmt: skip
TIME_NAMES = ("ts", "time", "timestamp", "date", "datetime", "event_time", "created_at", "unix_time")
SPLIT_NAMES = ("split", "fold", "set", "subset", "partition")
SPLIT_VALUES = {"train", "val", "valid", "validation", "test"}
MISSING_TOKENS = ("NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "?", "-")
NUMBER_BUCKETS = 32
"""Each number also enters as its quantile bucket's embedding (the thresholds trees split on;
on the census-income benchmark +0.006 test AUC over the standardised number alone)."""
CODES_MAX = 32
"""Integer columns with at most this many distinct values are codes (an embedding), not numbers."""


@dataclass
class Column:
    name: str
    kind: str  # label, user, item, sparse, multi_hot, dense, time, split, skip
    why: str
    cardinality: int = 0
    side: str | None = None
    transforms: list[str] = field(default_factory=list)
    task_type: str | None = None
    label_range: tuple[float, float] | None = None
    expression: str | None = None
    fill: float | None = None
    values: np.ndarray | None = None  # a label's sampled values
    position: bool = False  # a time column that counts each user's events


@dataclass
class LogShape:
    """What orders a log's events and which rows are interactions."""

    order: str | None = None
    """The column ordering each user's events (a time, or a position in the user's sequence)."""
    position: bool = False
    """``order`` is a position in each user's sequence (a global time cut means nothing on it)."""
    interactions: str | None = None
    """A 0/1 column whose 1 rows are the interactions (its 0 rows share user and time with one)."""


def embedding_dim(cardinality: int) -> int:
    """Grows like n^0.56 (a common rule for categorical embeddings), between 4 and 32, a multiple of 4."""
    return int(min(32, max(4, 4 * round(1.6 * max(cardinality, 2) ** 0.56 / 4))))


# ------------------------------------------------------------------------------------------ reading
def read_sample(
    source: str, delimiter: str | None, header: bool, rows: int, column_names: list[str] | None = None
) -> tuple[pa.Table, str, dict]:
    """The first ``rows`` rows of the source's first file (every cell as text for CSV), its format,
    and the CSV options found (delimiter, header, column names)."""
    from towerrec.data.sources import input_files, open_input

    files = input_files(source, key="--source")
    first = files[0]
    if str(first).endswith(".parquet") or Path(str(first)).suffix == ".parquet":
        file = pq.ParquetFile(first.open() if hasattr(first, "filesystem") else first)
        batches = []
        for batch in file.iter_batches(batch_size=min(rows, 65536)):
            batches.append(batch)
            if sum(b.num_rows for b in batches) >= rows:
                break
        if not batches:
            raise DataError(f"{first}: no rows")
        return pa.Table.from_batches(batches).slice(0, rows), "parquet", {}
    with open_input(first) as stream:
        head = stream.read(1 << 16).decode("utf-8-sig", errors="replace")
    lines = head.splitlines()
    if not lines:
        raise DataError(f"{first}: empty file")
    if delimiter is None:
        counts = {d: lines[0].count(d) for d in (",", "\t", ";", "|")}
        delimiter = max(counts, key=counts.get)
        if counts[delimiter] == 0:
            raise DataError(f"{first}: line 1 has no ',', tab, ';' or '|' (pass --delimiter)")
    width = len(lines[0].split(delimiter))
    names = None if header else (column_names or [f"c{k}" for k in range(width)])
    if names is not None and len(names) != width:
        raise ConfigError(f"--column-names: {len(names)} names for {width} columns in line 1 of {first}")
    read_options = pacsv.ReadOptions(column_names=names, block_size=1 << 22)
    parse = pacsv.ParseOptions(delimiter=delimiter)
    convert = pacsv.ConvertOptions(strings_can_be_null=False, null_values=[], column_types={})
    try:
        with open_input(first) as stream:
            reader = pacsv.open_csv(stream, read_options, parse, convert)
            schema = reader.schema
            convert = pacsv.ConvertOptions(
                column_types=dict.fromkeys(schema.names, pa.string()), null_values=[]
            )
        with open_input(first) as stream:
            reader = pacsv.open_csv(stream, read_options, parse, convert)
            batches = []
            for batch in reader:
                batches.append(batch)
                if sum(b.num_rows for b in batches) >= rows:
                    break
    except pa.ArrowInvalid as err:
        raise DataError(
            f"{first}: cannot read as CSV with delimiter {delimiter!r} ({str(err).splitlines()[0]})"
        ) from err
    table = pa.Table.from_batches(batches).slice(0, rows)
    table = pa.table({name: pc.utf8_trim_whitespace(table.column(name)) for name in table.column_names})
    return table, "csv", {"delimiter": delimiter, "header": header, "column_names": names}


def _numbers(column: pa.ChunkedArray, missing: set[str]) -> np.ndarray | None:
    """The column as float64 (NaN for empty cells and ``missing`` tokens), or None if it is text."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        if (
            pa.types.is_integer(column.type)
            or pa.types.is_floating(column.type)
            or pa.types.is_boolean(column.type)
        ):
            return np.asarray(pc.fill_null(column.cast(pa.float64()), np.nan), dtype=np.float64)
        return None
    text = pc.if_else(
        pc.is_in(column, value_set=pa.array(["", *missing])), pa.scalar(None, pa.string()), column
    )
    try:
        return np.asarray(pc.fill_null(text.cast(pa.float64()), np.nan), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def missing_tokens(table: pa.Table) -> set[str]:
    """Tokens such as 'NA' or '?' that stand for missing in columns that are otherwise numbers
    (in text columns they may be real values, e.g. a category 'NA', so only numbers decide)."""
    found = set()
    for name in table.column_names:
        column = table.column(name)
        if not pa.types.is_string(column.type):
            continue
        if _numbers(column, set()) is not None:
            continue
        for token in MISSING_TOKENS:
            if _numbers(column, {token}) is not None:
                found.add(token)
                break
    return found


# ------------------------------------------------------------------------------------------ deciding
def _is_id_name(name: str) -> bool:
    """``user_id``, ``itemId``, ``det_ind_code``, ``zip_cd``: integers that name things, not amounts."""
    return bool(re.search(r"(^|_)(id|code|cd)$|Id$|ID$|Code$", name))


def _constant_per(table: pa.Table, key: str, name: str) -> bool:
    """``name`` has one value per ``key`` value in ≥ 99% of the keys seen at least twice."""
    grouped = table.select([key, name]).group_by(key).aggregate([(name, "count_distinct"), (name, "count")])
    distinct = grouped.column(f"{name}_count_distinct").to_numpy()
    repeated = grouped.column(f"{name}_count").to_numpy() >= 2
    return bool(repeated.sum() >= 10 and (distinct[repeated] <= 1).mean() >= 0.99)


def _is_position(table: pa.Table, user: str | None, values: np.ndarray) -> bool:
    """Integers that count each user's events: per user, consecutive values from 0 or 1, each
    value on the same number of rows (1, or 1 + the sampled negatives sharing its position), for
    at least 95% of the users with two values or more (and at least 10 of them)."""
    if user is None or np.isnan(values).any() or not np.all(values == np.round(values)):
        return False
    grouped = (
        pa.table({"user": table.column(user), "value": pa.array(values)})
        .group_by("user")
        .aggregate([("value", "min"), ("value", "max"), ("value", "count_distinct"), ("value", "count")])
    )
    low, high = grouped.column("value_min").to_numpy(), grouped.column("value_max").to_numpy()
    distinct = grouped.column("value_count_distinct").to_numpy()
    rows = grouped.column("value_count").to_numpy()
    several = distinct >= 2
    if several.sum() < 10:
        return False
    ratio = rows[several] / distinct[several]
    typical = np.median(ratio)
    counting = np.isin(low[several], (0, 1)) & (high[several] - low[several] + 1 == distinct[several])
    return bool(typical == np.round(typical) and (counting & (ratio == typical)).mean() >= 0.95)


def _marks_interactions(table: pa.Table, user: str, order: str, values: np.ndarray) -> bool:
    """A 0/1 column whose 0 rows (90% of them or more) share user and time with a 1 row: sampled
    negatives or items shown beside the chosen one, not interactions of their own."""
    from towerrec.data.cleaning import column_hashes, mix64

    zeros, ones = values == 0, values == 1
    if not zeros.any() or not ones.any() or (zeros | ones).mean() < 0.99:
        return False
    keys = mix64(column_hashes(table.column(user)) ^ mix64(column_hashes(table.column(order))))
    return bool(np.isin(keys[zeros], keys[ones]).mean() >= 0.9)


def log_shape(table: pa.Table, columns: list[Column], missing: set[str]) -> LogShape:
    """The order of events (a position column before a time column) and, among the 0/1 labels (or,
    with no label, the 0/1 columns), the one that marks interactions."""
    user = next((c.name for c in columns if c.kind == "user"), None)
    times = [c for c in columns if c.kind == "time"]
    order = next((c for c in times if c.position), times[0] if times else None)
    shape = LogShape(order.name if order else None, bool(order and order.position))
    if user is None or order is None:
        return shape
    labels = [c for c in columns if c.kind == "label"]
    candidates = (
        [(c, c.values) for c in labels if c.task_type == "binary"]
        if labels
        else [(c, _numbers(table.column(c.name), missing)) for c in columns if c.kind == "sparse"]
    )
    for column, values in candidates:
        if values is not None and _marks_interactions(table, user, shape.order, values):
            shape.interactions = column.name
            if not labels:
                column.kind, column.why = "interactions", "0/1: its 0 rows share user and time with a 1 row"
            break
    return shape


def describe_columns(
    table: pa.Table,
    labels: list[str],
    derived: dict[str, str],
    user: str | None,
    item: str | None,
    missing: set[str],
    exclude: tuple[str, ...] = (),
) -> list[Column]:
    names = table.column_names
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise ConfigError(f"--exclude: no column {unknown[0]!r} (columns: {', '.join(names)})")
    lowered = {name.lower(): name for name in names}
    user = user or next((lowered[n] for n in USER_NAMES if n in lowered), None)
    item = item or next((lowered[n] for n in ITEM_NAMES if n in lowered), None)
    for flag, value in (("--user", user), ("--item", item)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag}: no column {value!r} (columns: {', '.join(names)})")
    columns: list[Column] = []
    for label in labels:
        if label in derived:
            from towerrec.data.expressions import Expression

            values = np.asarray(Expression(label, derived[label]).evaluate(table), dtype=np.float64)
        elif label not in names:
            raise ConfigError(
                f"--label: no column {label!r} (columns: {', '.join(names)}); or write NAME=EXPRESSION"
            )
        else:
            values = _numbers(table.column(label), missing)
        if values is None:
            raise ConfigError(
                f"--label {label}: the column holds text; derive a number, e.g. --label \"{label}_yes={label} == 'yes'\""
            )
        seen = values[~np.isnan(values)]
        origin = f"derived: {derived[label]}; " if label in derived else ""
        distinct = np.unique(seen)
        if len(distinct) == 1:
            raise ConfigError(
                f"--label {label}: {origin}the value {distinct[0]:g} on every one of the {seen.size:,} sampled rows "
                "(a label with one value teaches nothing: the loss is 0 and AUC undefined); choose another "
                "label, or no --label for an implicit log (a retrieval config)"
            )
        if seen.size and set(distinct) <= {0.0, 1.0}:
            columns.append(Column(label, "label", f"{origin}0/1 values: a binary task", task_type="binary",
                                  expression=derived.get(label), values=values))  # fmt: skip
        else:
            low, high = (float(seen.min()), float(seen.max())) if seen.size else (0.0, 1.0)
            columns.append(Column(label, "label", f"{origin}numbers from {low:g} to {high:g}: regression",
                                  task_type="regression", label_range=(low, high), expression=derived.get(label),
                                  values=values))  # fmt: skip
    num_rows = table.num_rows
    for name in names:
        if name in labels:
            continue
        column = table.column(name)
        distinct = pc.count_distinct(column).as_py()
        values = _numbers(column, missing)
        lower = name.lower()
        if name in exclude:
            columns.append(Column(name, "skip", "--exclude"))
        elif name == user:
            columns.append(
                Column(name, "user", f"the user id ({distinct:,} distinct in the sample)", distinct)
            )
        elif name == item:
            columns.append(
                Column(name, "item", f"the item id ({distinct:,} distinct in the sample)", distinct)
            )
        elif lower in SPLIT_NAMES and set(pc.unique(column).to_pylist()) <= SPLIT_VALUES:
            columns.append(Column(name, "split", "names each row's split: rows stay in it"))
        elif values is not None and _is_position(table, user, values):
            columns.append(Column(name, "time", "a position in each user's sequence (it restarts per user): "
                                  "the order of the user's events", position=True))  # fmt: skip
        elif lower in TIME_NAMES or lower.endswith(("_time", "_ts", "_timestamp")):
            columns.append(Column(name, "time", "the time of each row: kept to split on, not a feature"))
        elif distinct <= 1:
            columns.append(Column(name, "skip", "one value in every sampled row: nothing to learn"))
        elif values is None:
            delimited = pc.mean(pc.cast(pc.match_substring(column, "|"), pa.float64())).as_py() or 0.0
            if delimited >= 0.05:
                tags = pc.count_distinct(pc.list_flatten(pc.split_pattern(column, "|"))).as_py()
                columns.append(Column(name, "multi_hot", f"text lists ('a|b'): a bag of {tags:,} ids", tags))
            elif distinct >= 0.9 * num_rows:
                columns.append(Column(name, "skip", "text unique to almost every row (an identifier)"))
            else:
                columns.append(
                    Column(name, "sparse", f"text: an id with {distinct:,} distinct values", distinct)
                )
        else:
            seen = values[~np.isnan(values)]
            integral = seen.size > 0 and bool(np.all(seen == np.round(seen)))
            if integral and (_is_id_name(name) or distinct <= CODES_MAX):
                why = "named like an id" if _is_id_name(name) else f"{distinct} integer codes"
                columns.append(Column(name, "sparse", f"{why}: an id", distinct))
            else:
                heavy = (
                    seen.size > 0
                    and seen.min() >= 0
                    and np.quantile(seen, 0.99) > 20 * max(np.median(seen), 1e-9)
                )
                transforms = ["log1p", "standardize"] if heavy else ["standardize"]
                missing_share = float(np.isnan(values).mean())
                fill = float(f"{np.median(seen):.6g}") if missing_share and seen.size else None
                why = (
                    "a number"
                    + (", heavy-tailed (log1p first)" if heavy else "")
                    + (
                        f", {missing_share:.1%} missing: filled with the sample median"
                        if fill is not None
                        else ""
                    )
                )
                columns.append(Column(name, "dense", why, distinct, transforms=transforms, fill=fill))
    key_of = {"user": user, "item": item}
    for col in columns:
        if col.kind in ("sparse", "multi_hot", "dense"):
            for side in ("user", "item"):
                key = key_of[side]
                if key is not None and col.side is None and _constant_per(table, key, col.name):
                    col.side = side
    return columns


# ------------------------------------------------------------------------------------------ writing
def _yaml_value(value) -> str:
    """A scalar as YAML: plain when safe, else a JSON string (valid YAML)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_/.][A-Za-z0-9_./-]*", value) and value.lower() not in (
            "true",
            "false",
            "null",
            "yes",
            "no",
        )
        return value if plain else json.dumps(value)
    return str(value)


def _flow(entries: dict) -> str:
    return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in entries.items()) + "}"


KINDS = ("label", "user", "item", "sparse", "multi_hot", "dense", "time", "split", "interactions", "skip")
HISTORY_LENGTH = 50


def _history_name(columns: list[Column], item: str) -> str:
    names = {c.name for c in columns}
    return "hist_items" if "hist_items" not in names else f"hist_{item}"


def _data_section(
    source: str, fmt: str, csv: dict, columns: list[Column], missing: set[str], out_name: str, shape: LogShape,
    retrieval: bool,
) -> list[str]:  # fmt: skip
    """The ``data:`` lines: how to read and split the file, its histories, its features. A
    retrieval config keeps only features with a side (a tower reads them); the others are left
    out with a comment."""
    by_kind = {kind: [c for c in columns if c.kind == kind] for kind in KINDS}
    users, items = by_kind["user"], by_kind["item"]
    split_column = by_kind["split"][0].name if by_kind["split"] else None
    item = items[0].name if items else None
    per_user = bool(users) and (
        retrieval or shape.position
    )  # the next-item protocol: each user's last events
    history = _history_name(columns, item) if item and users and (retrieval or shape.interactions) else None
    lines = [
        "data:",
        f"  path: runs/data/{Path(out_name).stem}        # the prepared Parquet data set (built on first use)",
        "  prepare:",
        f"    format: {fmt}",
        f"    source: {_yaml_value(source)}",
    ]
    if fmt == "csv":
        options = {"delimiter": csv["delimiter"], "header": csv["header"]}
        lines.append("    csv:")
        for key, value in options.items():
            lines.append(f"      {key}: {json.dumps(value) if key == 'delimiter' else _yaml_value(value)}")
        if csv.get("column_names"):
            lines.append(f"      column_names: [{', '.join(csv['column_names'])}]   # the file has no header")
        tokens = sorted(missing)
        lines.append(
            f"      null_values: [{', '.join(json.dumps(t) for t in tokens)}]"
            + ("   # found in number columns" if tokens else "   # only empty cells are missing")
        )
    derived = {c.name: c.expression for c in by_kind["label"] if c.expression}
    if derived:
        lines.append("    derive:")
        lines += [f"      {name}: {_yaml_value(expr)}" for name, expr in derived.items()]
    if split_column:
        lines.append(f"    split_column: {split_column}         # the file says each row's split")
    elif per_user:
        lines.append(
            "    split: leave_last_out         # each user's last event is test, the one before validation"
        )
        lines.append(
            "    min_events_per_user: 3        # users with fewer events keep them all in train (the published protocol)"
        )
        if shape.order:
            why = (
                "a position in each user's sequence: the order of events"
                if shape.position
                else "orders events"
            )
            lines.append(f"    time_column: {shape.order}   # {why}")
        else:
            lines.append("    # no time column: the file's row order is the order of each user's events")
    elif shape.order:
        lines.append(
            f"    split: time                   # newest 10% of rows test, the 10% before validation ({shape.order})"
        )
        lines.append(f"    time_column: {shape.order}")
    else:
        lines.append("    split: random                 # 80/10/10 by row")
    if users:
        lines.append(f"    user_column: {users[0].name}")
    if item and (retrieval or shape.interactions):
        lines.append(
            f"    item_column: {item}              # (data.prepare.negatives_per_positive samples its items)"
        )
    if shape.interactions and per_user:
        lines.append(
            f"    interaction_column: {shape.interactions}   # its 0 rows go with the held-out interaction at their time"
        )
    if retrieval:
        lines.append(
            "    missing_sparse: drop          # a row without its user or item is no event: dropped, counted"
        )
    if history:
        entry = {"name": history, "column": item}
        if shape.interactions:
            entry["where"] = shape.interactions
        entry.update(max_length=HISTORY_LENGTH, events="all")
        lines += [
            "    histories:                    # per row, its user's events strictly before it, from every split: never",
            "      # the row's own or a later one (both splits above hold out only later events: nothing leaks)",
            f"      - {_flow(entry)}",
        ]
    extra = {c.name: "other" for c in by_kind["time"]}
    if extra:
        lines.append(f"    columns: {_flow(extra)}   # kept in the data set, not features")
    lines.append("    num_shards: 2")
    left_out = list(by_kind["skip"])
    if retrieval:
        left_out += [
            c for c in (*by_kind["sparse"], *by_kind["multi_hot"], *by_kind["dense"]) if c.side is None
        ]
    for col in left_out:
        why = col.why if col.kind == "skip" else "changes from row to row (context): no tower can read it"
        lines.append(f"    # left out: {col.name} ({why})")
    if shape.interactions and retrieval:
        lines.append(
            f"  sample_weight_column: {shape.interactions}   # weight 0: rows that are no interaction are no positives"
        )
    lines += [f"  batch_size: {256 if retrieval else 512}", "  eval_batch_size: 4096", "  sparse:"]
    kept = [c for c in (*by_kind["sparse"], *by_kind["multi_hot"]) if c.side or not retrieval]
    dense = [c for c in by_kind["dense"] if c.side or not retrieval]
    for col in (*users, *items, *kept):
        entry = {"name": col.name}
        side = "user" if col.kind == "user" else "item" if col.kind == "item" else col.side
        if side:
            entry["side"] = side
        entry["embedding_dim"] = embedding_dim(col.cardinality) if col.kind not in ("user", "item") else 32
        if col.kind == "item" and history:
            entry["table"] = f"t_{item}"
        if col.kind == "multi_hot":
            entry.update(multi_hot=True, pooling="mean")
        lines.append(f"    - {_flow(entry)}   # {col.why}")
    if history:
        entry = {"name": history, "side": "user", "embedding_dim": 32, "sequence": True, "table": f"t_{item}",
                 "candidate": item, "max_length": HISTORY_LENGTH}  # fmt: skip
        lines.append(
            f"    - {_flow(entry)}   # the user's earlier {item}s, oldest first (one table with {item})"
        )
    for col in dense:
        entry = {"name": f"{col.name}_q", "column": col.name}
        if col.side:
            entry["side"] = col.side
        entry.update(buckets=NUMBER_BUCKETS, embedding_dim=8)
        lines.append(
            f"    - {_flow(entry)}   # {col.name} in {NUMBER_BUCKETS} quantile buckets, an id beside the number"
        )
    if not (users or items or kept or dense):
        raise ConfigError("the file has no column that can be a feature (text, integer codes or numbers)")
    lines.append("  dense:" if dense else "  dense: []")
    for col in dense:
        entry = f"name: {col.name}" + (f", side: {col.side}" if col.side else "")
        entry += f", transform: [{', '.join(col.transforms)}]" + (
            f", fill_nan: {col.fill:g}" if col.fill is not None else ""
        )
        lines.append(f"    - {{{entry}}}   # {col.why}")
    return lines


TRAINER_LINES = [
    "trainer:",
    "  embedding_optimizer: {type: rowwise_adagrad, lr: 0.05}",
    "  dense_optimizer: {type: adam, lr: 0.002}",
    "",
    "checkpoint:",
    "  every_n_steps: 0              # a checkpoint at the end of each epoch",
]


def starter_config(
    source: str, fmt: str, csv: dict, columns: list[Column], missing: set[str], num_rows: int, out_name: str,
    shape: LogShape | None = None,
) -> str:  # fmt: skip
    """A multi-task ranking config for a log with labels (``towerrec init --label ...``)."""
    shape = shape or LogShape(next((c.name for c in columns if c.kind == "time"), None))
    labels = [c for c in columns if c.kind == "label"]
    users, items = [c for c in columns if c.kind == "user"], [c for c in columns if c.kind == "item"]
    lines = [
        f"# Starter config written by `towerrec init` from {source} ({num_rows:,} sampled rows).",
        "# Every column is used once, as the comment beside it says; edit freely, then:",
        f"#   towerrec fit --config {out_name}",
        "# Keys and their meaning: `towerrec config` (or configs/REFERENCE.md).",
        "seed: 0",
        f"run_dir: runs/{Path(out_name).stem}",
        "",
        *_data_section(source, fmt, csv, columns, missing, out_name, shape, retrieval=False),
        "",
        "tasks:",
    ]
    for col in labels:
        task = {"name": col.name, "type": col.task_type or "binary", "label": col.name}
        if col.label_range is not None:
            task.update(min_value=col.label_range[0], max_value=col.label_range[1])
        lines.append(f"  - {_flow(task)}   # {col.why}")
    lines += [
        "",
        "model:",
        "  tower: "
        + ("mmoe                   # experts shared by the tasks" if len(labels) > 1 else "shared_bottom"),
        "  interaction: dcn              # DCNv2 cross layers over the embeddings and numbers",
        "  wide: true                    # and a linear (wide) part beside the tower",
        "  bottom_dims: [256, 128]",
        "  head_dims: [64]",
    ]
    if len(labels) > 1:
        lines += ["  num_experts: 4", "  expert_dims: [256, 128]"]
    if users and items:
        binary = [c.name for c in labels if c.task_type == "binary"]
        relevant = shape.interactions or (binary[0] if binary else None)
        lines += ["", "recommend:", f"  user_feature: {users[0].name}", f"  item_feature: {items[0].name}"]
        if relevant:
            lines.append(f"  relevance_task: {relevant}")
            lines.append(f"  task_weights: {{{relevant}: 1.0}}")
        if shape.interactions:
            lines.append(
                f"  interaction_column: {shape.interactions}   # its 0 rows are neither seen items nor popularity"
            )
    lines += [
        "",
        "trainer:",
        "  max_epochs: 8",
        "  early_stopping_patience: 2     # stop when val/loss has not improved for 2 epochs",
        "  early_stopping_metric: val/loss",
        *TRAINER_LINES[1:],
    ]
    return "\n".join(lines) + "\n"


def retrieval_config(
    source: str, fmt: str, csv: dict, columns: list[Column], missing: set[str], num_rows: int, out_name: str,
    shape: LogShape,
) -> str:  # fmt: skip
    """A two-tower retrieval config for an implicit log (``towerrec init`` without ``--label``)."""
    users, items = [c for c in columns if c.kind == "user"], [c for c in columns if c.kind == "item"]
    if not (users and items):
        raise ConfigError(
            "--label: none given, so the file is read as an implicit log (a retrieval config), which needs a user "
            "and an item column (--user, --item); or name the label column(s)"
        )
    stem = Path(out_name).stem
    order = (
        f"{shape.order} orders each user's events" if shape.order else "the row order is each user's order"
    )
    lines = [
        f"# Retrieval config written by `towerrec init` from {source} ({num_rows:,} sampled rows): an implicit",
        f"# log (no label: every row is an event; {order}). Two towers, trained by a softmax",
        "# over the batch's items; evaluated on each user's held-out last event (HR@10, NDCG@10):",
        f"#   towerrec fit --config {out_name} ; towerrec recommend --config {out_name} --k 10 --evaluate",
        f"#   towerrec fit --config {out_name} --model.sequence.encoder mean --run_dir runs/{stem}-mean",
        "# Keys and their meaning: `towerrec config` (or configs/REFERENCE.md).",
        "seed: 0",
        f"run_dir: runs/{stem}",
        "",
        *_data_section(source, fmt, csv, columns, missing, out_name, shape, retrieval=True),
        "",
        "tasks: []                         # a retrieval model has no pointwise tasks (every row is a positive)",
        "",
        "model:",
        "  objective: retrieval            # two towers: side: user features (and the history), side: item ones",
        "  sequence: {encoder: transformer, attention: softmax, num_layers: 2, num_heads: 2}   # the history encoder",
        "  retrieval:",
        "    dim: 64",
        "    temperature: 0.05",
        "    num_sampled_negatives: 0",
        "    logq_correction: true",
        "    all_positions: false",
        "",
        "recommend:",
        f"  user_feature: {users[0].name}",
        f"  item_feature: {items[0].name}",
        "  k: 10",
    ]
    if shape.interactions:
        lines.append(
            f"  interaction_column: {shape.interactions}   # its 0 rows are neither seen items nor popularity"
        )
    lines += [
        "",
        "trainer:",
        "  max_epochs: 10",
        "  early_stopping_patience: 2     # stop when val/loss has not improved for 2 epochs; test the best epoch",
        "  early_stopping_metric: val/loss",
        *TRAINER_LINES[1:],
    ]
    return "\n".join(lines) + "\n"


def parse_labels(given: list[str]) -> tuple[list[str], dict[str, str]]:
    names, derived = [], {}
    for entry in given:
        name, sep, expression = entry.partition("=")
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--label {entry!r}: a label is a column name or NAME=EXPRESSION")
        if sep:
            derived[name] = expression.strip()
        names.append(name)
    return names, derived


def run_init(cfg, args: argparse.Namespace) -> int:
    output = Path(args.output or f"{Path(str(args.source).rstrip('/')).stem or 'towerrec'}.yaml")
    if output.exists():
        raise OutputExists(f"--output: {output} exists; towerrec init never writes over a config")
    labels, derived = parse_labels(args.label)
    names = [name.strip() for name in args.column_names.split(",")] if args.column_names else None
    if names and not args.no_header:
        raise ConfigError("--column-names: names are for a file without a header line (add --no-header)")
    table, fmt, csv = read_sample(args.source, args.delimiter, not args.no_header, args.sample_rows, names)
    missing = missing_tokens(table) if fmt == "csv" else set()
    columns = describe_columns(table, labels, derived, args.user, args.item, missing, tuple(args.exclude))
    shape = log_shape(table, columns, missing)
    write = starter_config if labels else retrieval_config
    text = write(args.source, fmt, csv, columns, missing, table.num_rows, str(output), shape)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    counts = {
        kind: sum(c.kind == kind for c in columns)
        for kind in ("sparse", "multi_hot", "dense", "label", "skip")
    }
    ids = counts["sparse"] + counts["multi_hot"] + sum(c.kind in ("user", "item") for c in columns)
    what = f"{counts['label']} tasks" if labels else "a retrieval config for an implicit log (no label)"
    then = "" if labels else f", then: towerrec recommend --config {output} --k 10 --evaluate"
    print(
        f"[towerrec] wrote {output}: {what}, {ids} id features, {counts['dense']} numbers, {counts['skip']} columns "
        f"left out (see the comments); train with: towerrec fit --config {output}{then}",
        flush=True,
    )
    return 0
