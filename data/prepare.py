"""``towerrec prepare``: build a Parquet data set from a known format.

Each format is a function ``(cfg: PrepareConfig, out: str) -> DatasetMeta``.
"""

from __future__ import annotations

from collections.abc import Callable

from data.config import PrepareConfig
from data.dataset import DataError, DatasetMeta
from data.formats import prepare_criteo, prepare_csv, prepare_movielens, prepare_parquet
from data.movielens import prepare_movielens100k
from data.synthetic import prepare_synthetic

FORMATS: dict[str, Callable[[PrepareConfig, str], DatasetMeta]] = {
    "synthetic": prepare_synthetic,
    "movielens100k": prepare_movielens100k,
    "movielens": prepare_movielens,
    "criteo": prepare_criteo,
    "csv": prepare_csv,
    "parquet": prepare_parquet,
}


def prepare(cfg: PrepareConfig, out: str) -> DatasetMeta:
    if cfg.format not in FORMATS:
        raise DataError(
            f"data.prepare.format: unknown format {cfg.format!r}; choose one of {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[cfg.format](cfg, out)
