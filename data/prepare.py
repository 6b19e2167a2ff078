"""``towerrec prepare``: build a Parquet data set from a known format.

Each format is a function ``(cfg: PrepareConfig, out: str[, schema]) -> DatasetMeta``; the generic
formats (``csv``, ``parquet``) also take the ``TableSchema`` of the columns the config declares.
Every data set records how it was made (``metadata.json``: ``prepared_with`` and its
``fingerprint``), so that a run never trains on a data set prepared from another config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from towerrec.data.cleaning import TableSchema
from towerrec.data.config import PrepareConfig
from towerrec.data.criteo import prepare_criteo
from towerrec.data.dataset import METADATA_FILE, DataError, DatasetMeta
from towerrec.data.movielens import prepare_movielens
from towerrec.data.movielens100k import prepare_movielens100k
from towerrec.data.synthetic import prepare_synthetic
from towerrec.data.tabular import prepare_csv, prepare_parquet

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
SCHEMA_ADDED_LATER = {"item_side": []}
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
