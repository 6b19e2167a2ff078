"""``towerrec predict``: per-row predictions of a checkpoint, written by every rank as Parquet, with
the row's context (user and item ids as the source wrote them, labels, kept columns)."""

from __future__ import annotations

from pathlib import Path

import torch

from towerrec.trainer.build import build
from towerrec.trainer.config import Config
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.distributed.environment import launcher_rank
from towerrec.trainer.run import finish, shared_output
from towerrec.trainer.run_folder import (
    new_output,
    user_output,
)


def _stored_names(meta, split: str) -> list[str]:
    import pyarrow.parquet as pq

    groups = meta.row_groups(split)
    return pq.ParquetFile(groups[0].file).schema_arrow.names if groups else []


def row_context(cfg: Config, split: str, rows) -> dict:
    """What a prediction row is about: the user and item ids as the source data wrote them
    (through the saved vocabularies), the columns kept as ``other`` (e.g. a timestamp or a key to
    join on) and each task's label as ``<task>_label``."""
    from towerrec.data.dataset import DatasetMeta
    from towerrec.data.reader import read_stored_columns
    from towerrec.data.vocab import original_ids

    meta = DatasetMeta.load(cfg.data.path)
    by_name = {f.name: f for f in cfg.data.sparse}
    ids = [
        by_name[n].source_column
        for n in (cfg.recommend.user_feature, cfg.recommend.item_feature)
        if n in by_name
    ]
    labels = {f"{task.name}_label": task.label_column for task in cfg.tasks}
    kept = [
        name
        for name, kind in (cfg.data.prepare.columns if cfg.data.prepare else {}).items()
        if kind == "other"
    ]
    stored_names = _stored_names(meta, split)
    kept = [name for name in kept if name in stored_names]
    stored = read_stored_columns(meta, split, list(dict.fromkeys([*ids, *labels.values(), *kept]))).take(rows)
    context = {name: stored.column(name).combine_chunks() for name in kept if name not in ids}
    for column in ids:
        vocabulary = meta.vocabulary(column)
        values = stored.column(column).combine_chunks()
        context[column] = values if vocabulary is None else original_ids(values.to_numpy(), vocabulary)
    for name, column in labels.items():
        context[name] = stored.column(column).combine_chunks()
    return context


def predict(cfg: Config, checkpoint: str | None, split: str | None, output: str | None) -> int:
    """Scores a split with a checkpoint; each rank writes ``part-rankNNNNN.parquet`` with the
    row's position in the split (``row``), its user and item ids as the source wrote them, each
    task's label (``<task>_label``) and one prediction column per task, into ``output``
    (which must not hold anything yet) or a new ``<run_dir>/predictions/<split>-<checkpoint>``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ckpt.resolve_model(checkpoint or Path(cfg.run_dir) / "checkpoints")
    split = split or cfg.data.test_split
    if output is not None and launcher_rank() == 0:
        user_output(output, "--output", folder=True)
    trainer, module, datamodule, _ = build(cfg, predict_split=split)
    outputs = trainer.predict(module, datamodule=datamodule, ckpt_path=str(path), return_predictions=True)
    out_dir = (
        Path(output)
        if output
        else shared_output(
            trainer, lambda: new_output(Path(cfg.run_dir) / "predictions", f"{split}-{path.name}")
        )
    )
    row_id = torch.cat([o["row_id"] for o in outputs]).numpy()
    preds = torch.cat([o["predictions"] for o in outputs]).numpy()
    keep = row_id >= 0
    columns = {"row": pa.array(row_id[keep]), **row_context(cfg, split, row_id[keep])}
    for t, name in enumerate(module.task_names):
        columns[name] = pa.array(np.ascontiguousarray(preds[keep, t]))
    pq.write_table(pa.table(columns), out_dir / f"part-rank{trainer.global_rank:05d}.parquet")
    if trainer.is_global_zero:
        print(f"[towerrec] predictions of {path} for split {split} in {out_dir}", flush=True)
    finish()
    return 0


def predict_command(cfg: Config, args) -> int:
    return predict(cfg, args.checkpoint, args.split, args.output)
