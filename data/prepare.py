"""``towerrec prepare``: build a Parquet data set from a known format, and grow it by days.

Each format is a function ``(cfg: PrepareConfig, out: str[, schema]) -> DatasetMeta``; the generic
formats (``csv``, ``parquet``) also take the ``TableSchema`` of the columns the config declares.
Every data set records how it was made (``metadata.json``: ``prepared_with`` and its
``fingerprint``), so that a run never trains on a data set prepared from another config.

``append_day`` (``towerrec prepare --append SOURCE``) adds a day to a ``csv``/``parquet`` data set
without touching the earlier days: the new rows are encoded as the first preparation encoded its
rows (its vocabularies, frozen: ids they do not know go to row 0 and are counted per day; or its
hash; its dense transforms and bucket edges), written to a folder of their own and committed by
one atomic replacement of ``metadata.json`` (``towerrec.data.dataset``: the day index).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from towerrec.data.cleaning import DenseTransforms, TableSchema, string_ids
from towerrec.data.config import PrepareConfig
from towerrec.data.convert import FrozenEncoding
from towerrec.data.criteo import prepare_criteo
from towerrec.data.dataset import METADATA_FILE, DataError, DatasetMeta
from towerrec.data.id_mapping import IdMapper
from towerrec.data.movielens import prepare_movielens
from towerrec.data.movielens100k import prepare_movielens100k
from towerrec.data.synthetic import prepare_synthetic
from towerrec.data.tabular import prepare_csv, prepare_parquet
from towerrec.data.vocab import Vocabulary

FORMATS: dict[str, Callable[..., DatasetMeta]] = {
    "synthetic": prepare_synthetic,
    "movielens100k": prepare_movielens100k,
    "movielens": prepare_movielens,
    "criteo": prepare_criteo,
    "csv": prepare_csv,
    "parquet": prepare_parquet,
}
GENERIC = ("csv", "parquet")


ADDED_LATER = {"histories": [], "history_max_length": 50, "item_column": None, "interaction_column": None}
"""``data.prepare`` fields added after data sets were first fingerprinted, with their defaults."""
SCHEMA_ADDED_LATER = {"item_side": [], "dynamic_ids": []}
"""``TableSchema`` fields added after data sets were first fingerprinted, with their defaults."""


def prepared_with(cfg: PrepareConfig, schema: TableSchema | None) -> dict[str, Any]:
    """What decides a data set's contents: the ``prepare`` section and, for the generic formats,
    the columns and their kinds, ranges and transforms that the config declares."""
    recipe: dict[str, Any] = {"prepare": dataclasses.asdict(cfg)}
    for (
        name,
        default,
    ) in ADDED_LATER.items():  # absent at their defaults: older data sets keep their fingerprint
        if recipe["prepare"].get(name) == default:
            del recipe["prepare"][name]
    if cfg.format == "movielens100k" and cfg.split == "leave_last_out":
        recipe["histories_through"] = "validation"  # test histories hold the validation event (new)
    if not (cfg.format in GENERIC and cfg.split == "leave_last_out"):
        del recipe["prepare"]["min_events_per_user"]  # used by nothing else
    if cfg.format in GENERIC and cfg.negatives_per_positive:
        # ignored before: a data set prepared then has no negatives, whatever its recipe says
        recipe["negatives"] = "sampled per row from the training items the user never interacted with"
    if cfg.format in GENERIC and schema is not None:
        recipe["columns"] = json.loads(json.dumps(dataclasses.asdict(schema), default=list))
        for name, default in SCHEMA_ADDED_LATER.items():
            if recipe["columns"].get(name) == default:
                del recipe["columns"][name]
    return recipe


def fingerprint(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(cfg: PrepareConfig, out: str, schema: TableSchema | None = None) -> DatasetMeta:
    if cfg.format not in FORMATS:
        raise DataError(
            f"data.prepare.format: unknown format {cfg.format!r}; choose one of {', '.join(sorted(FORMATS))}"
        )
    if cfg.format in GENERIC:
        FORMATS[cfg.format](cfg, out, schema)
    else:
        FORMATS[cfg.format](cfg, out)
    recipe = prepared_with(cfg, schema)
    path = Path(out) / METADATA_FILE
    raw = json.loads(path.read_text())
    raw.update(prepared_with=recipe, fingerprint=fingerprint(recipe))
    temporary = path.with_name(f"{METADATA_FILE}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(raw, indent=1, sort_keys=True, default=str))
    os.replace(temporary, path)
    return DatasetMeta.load(out)


# ------------------------------------------------------------------------------------------- days
DAYS_FOLDER = "days"


def _frozen_mapper(meta: DatasetMeta, name: str) -> IdMapper:
    """Column ``name``'s id mapping as the first preparation fitted it (``metadata.json``)."""
    info = meta.columns.get(name, {})
    mapping = info.get("mapping")
    if mapping == "hash":
        return IdMapper(num_hash_buckets=int(info["num_embeddings"]) - 1)
    if mapping == "dynamic":  # raw ids: nothing fitted to reproduce
        return IdMapper(raw=True)
    if mapping == "vocab":
        originals = meta.vocabulary(name)
        if originals is None:
            raise DataError(
                f"{meta.root / METADATA_FILE}: column {name!r} has no saved vocabulary to encode a new day with"
            )
        texts = originals.dtype.kind in "OUS"
        keys = (
            string_ids(pa.array(originals, pa.string())).to_numpy() if texts else originals.astype(np.int64)
        )
        return IdMapper(vocabulary=Vocabulary(keys, originals=originals))
    raise DataError(
        f"{meta.root / METADATA_FILE}: column {name!r} is mapped by {mapping!r}, which appending a day cannot "
        "reproduce (vocabularies and hashes can be appended to)"
    )


def _frozen_encoding(meta: DatasetMeta, schema: TableSchema, day: int) -> FrozenEncoding:
    mappers = {name: _frozen_mapper(meta, name) for name in schema.of_kind("sparse", "multi_hot")}
    transforms = DenseTransforms.fitted(schema.dense_specs, schema.buckets, meta.report.get("dense", {}))
    return FrozenEncoding(mappers, transforms, dict(meta.report.get("input_types", {})), day)


class _AppendLock:
    """One append at a time per data set (an OS lock: a killed process's lock goes with it)."""

    def __init__(self, folder: Path):
        folder.mkdir(exist_ok=True)
        self.path = folder / ".append.lock"

    def __enter__(self):
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            self.file.close()
            raise DataError(
                f"{self.path.parent.parent}: another append to this data set is in progress"
            ) from err
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _day_index(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """``metadata.json``'s day index; a data set prepared in one go is day 0."""
    if raw.get("days"):
        return raw["days"]
    report = raw.get("report", {})
    return [
        {
            "day": 0,
            "splits": {split: [0, len(groups)] for split, groups in raw["splits"].items()},
            "source": report.get("source"),
            "rows_per_split": {split: sum(g[2] for g in groups) for split, groups in raw["splits"].items()},
        }
    ]


def _check_same_shards(meta: DatasetMeta, day: DatasetMeta, source: str) -> None:
    """The new day's shards must have the columns and types of the earlier days' shards."""
    first = next((groups[0].file for groups in meta.splits.values() if groups), None)
    new = next((groups[0].file for groups in day.splits.values() if groups), None)
    if first is None or new is None:
        return
    before, after = pq.read_schema(first), pq.read_schema(new)
    for field in before:
        if field.name not in after.names:
            raise DataError(
                f"{source}: the new day has no column {field.name!r}, which the earlier days have"
            )
        if after.field(field.name).type != field.type:
            raise DataError(
                f"{source}: column {field.name!r} is stored as {after.field(field.name).type}, the earlier days as "
                f"{field.type} (a day appended with another schema)"
            )


def append_day(cfg: PrepareConfig, path: str, source: str, schema: TableSchema | None) -> DatasetMeta:
    """Adds ``source`` as the next day of the data set at ``path`` (module docstring): nothing of
    the earlier days is rewritten; an interrupted append leaves the data set as it was (the
    half-written day is not in ``metadata.json`` and is removed by the next append).

    Returns the grown data set. Raises ``DataError`` naming the file and column for a day whose
    columns differ from the earlier days'."""
    root = Path(path)
    meta = DatasetMeta.load(root)
    recipe = meta.prepared_with or {}
    fmt = recipe.get("prepare", {}).get("format")
    if fmt not in GENERIC:
        raise DataError(
            f"{root / METADATA_FILE}: prepared with format {fmt!r}; days can be appended to csv and parquet data sets"
        )
    if cfg.histories:
        raise DataError("data.prepare.histories: a day's histories need the earlier days' events; appending days "
                        "to a data set with histories is not supported")  # fmt: skip
    if cfg.negatives_per_positive:
        raise DataError("data.prepare.negatives_per_positive: a day's sampled negatives need the earlier days' "
                        "interactions; appending days to a data set with sampled negatives is not supported")  # fmt: skip
    if cfg.split_files:
        raise DataError("data.prepare.split_files: an appended day is one source; mark its splits with "
                        "data.prepare.split_column, or let data.prepare.split assign them")  # fmt: skip
    days_folder = root / DAYS_FOLDER
    with _AppendLock(days_folder):
        meta = DatasetMeta.load(root)  # as it is now that no other append runs
        day = meta.num_days
        name = f"{day:04d}"
        for stale in days_folder.iterdir():  # half-written days of interrupted appends
            if stale.is_dir() and (stale.name == name or ".partial-" in stale.name or ".old-" in stale.name):
                shutil.rmtree(stale)
        frozen = _frozen_encoding(meta, schema, day)
        day_cfg = dataclasses.replace(cfg, source=source)
        day_meta = FORMATS[cfg.format](day_cfg, str(days_folder / name), schema, frozen)
        try:
            _check_same_shards(meta, day_meta, source)
        except DataError:
            shutil.rmtree(days_folder / name, ignore_errors=True)
            raise
        raw = json.loads((root / METADATA_FILE).read_text())
        index = _day_index(raw)
        splits = raw["splits"]
        entry = {"day": day, "source": source, "splits": {}, "report": day_meta.report,
                 "rows_per_split": {s: day_meta.num_rows(s) for s in day_meta.splits}}  # fmt: skip
        originals = {  # the texts of the day's dynamic text ids (DatasetMeta.id_names reads every day's)
            column: f"{DAYS_FOLDER}/{name}/{info['originals']}"
            for column, info in day_meta.columns.items()
            if info.get("originals")
        }
        if originals:
            entry["originals"] = originals
        for split in sorted(set(splits) | set(day_meta.splits)):
            groups = splits.setdefault(split, [])
            for earlier in index:
                earlier["splits"].setdefault(split, [len(groups), len(groups)])
            start = len(groups)
            groups += [
                [str(Path(rg.file).relative_to(root)), rg.index, rg.num_rows]
                for rg in day_meta.splits.get(split, [])
            ]
            entry["splits"][split] = [start, len(groups)]
        raw["days"] = [*index, entry]
        temporary = root / f"{METADATA_FILE}.tmp-{os.getpid()}"
        temporary.write_text(json.dumps(raw, indent=1, sort_keys=True, default=str))
        os.replace(temporary, root / METADATA_FILE)  # the commit: the day exists from here on
    return DatasetMeta.load(root)
