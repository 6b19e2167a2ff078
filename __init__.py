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
    strategy = towerrec.TorchRecStrategy(sharding=cfg.sharding, ...)
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Config": "towerrec.trainer.config",
    "load_config": "towerrec.trainer.config",
    "TorchRecStrategy": "towerrec.trainer.distributed.strategy",
    "MultiTaskModule": "towerrec.trainer.module",
    "ParquetDataModule": "towerrec.trainer.datamodule",
    "build_model": "towerrec.models.builder",
    "MultiTaskModel": "towerrec.models.multitask",
    "Batch": "towerrec.data.batch",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'towerrec' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
