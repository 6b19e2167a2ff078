"""towerrec: distributed training of multi-task recommendation models on TorchRec and Lightning.

The repository's folders are this package's subpackages (``pyproject.toml`` maps them):
``towerrec.data`` (schema, preparation, Parquet reading), ``towerrec.models`` (towers on TorchRec
collections; no ``torch.distributed``), ``towerrec.trainer`` (config, Lightning module, strategy,
checkpoints) and ``towerrec.serving`` (lists, indexes, export). Imports run one way:
data ← models ← trainer ← serving.

The names below are the public surface for use in your own scripts; they are imported on first
use, so ``import towerrec`` stays cheap::

    import lightning as L
    import towerrec

    cfg = towerrec.load_config("configs/default.yaml")
    datamodule, table_rows = towerrec.prepared_data(cfg)
    strategy = towerrec.TorchRecStrategy(sharding=cfg.sharding, ...)
    L.Trainer(strategy=strategy, ...).fit(towerrec.MultiTaskModule(cfg, table_rows), datamodule=datamodule)

The README's "Use it from Python" section has a complete example with a tower of your own.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Config": "towerrec.trainer.config",  # the typed run configuration
    "load_config": "towerrec.trainer.config",  # YAML + dotted overrides → Config, validated
    "prepared_data": "towerrec.trainer.build",  # the data set as a LightningDataModule + table rows
    "TorchRecStrategy": "towerrec.trainer.distributed.strategy",  # sharded tables, dense replicas, DCP
    "MultiTaskModule": "towerrec.trainer.module",  # the LightningModule (override build_model)
    "RetrievalModule": "towerrec.trainer.retrieval",  # the two-tower LightningModule
    "ParquetDataModule": "towerrec.trainer.datamodule",
    "build_model": "towerrec.models.builder",  # the multi-task model (tower=: your own tower)
    "build_retrieval_model": "towerrec.models.builder",
    "MultiTaskModel": "towerrec.models.multitask",
    "TwoTowerModel": "towerrec.models.retrieval",
    "Batch": "towerrec.data.batch",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'towerrec' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
