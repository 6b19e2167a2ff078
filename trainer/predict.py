"""``towerrec predict``: per-row predictions of a checkpoint, written by every rank as Parquet, with
the row's context (user and item ids as the source wrote them, labels, kept columns).

Each rank scores its own part of the split (the reader's contiguous rows) and writes its own
shard batch by batch: it reads the context of only the row groups its rows lie in and holds one
batch of predictions and one row group of context at a time, whatever the split's size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa

from towerrec.trainer.build import build
from towerrec.trainer.config import Config
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.distributed.environment import launcher_rank
from towerrec.trainer.run import finish, shared_output
from towerrec.trainer.run_folder import (
    new_output,
    user_output,
)


class RowContext:
    """What a prediction row is about: the user and item ids as the source data wrote them
    (through the saved vocabularies), the columns kept as ``other`` (e.g. a timestamp or a key to
    join on) and each task's label as ``<task>_label``; read for chosen rows of the split only
    (``towerrec.data.reader.StoredRows``)."""

    def __init__(self, cfg: Config, split: str):
        import pyarrow.parquet as pq

        from towerrec.data.dataset import DatasetMeta
        from towerrec.data.reader import StoredRows
        from towerrec.trainer.datamodule import split_role

        meta = DatasetMeta.load(cfg.data.path)
        by_name = {f.name: f for f in cfg.data.sparse}
        self.ids = [
            by_name[n].source_column
            for n in (cfg.recommend.user_feature, cfg.recommend.item_feature)
            if n in by_name
        ]
        self.labels = {f"{task.name}_label": task.label_column for task in cfg.tasks}
        days = cfg.data.days(split_role(cfg.data, split))
        groups = meta.row_groups(split, days)
        stored_names = pq.ParquetFile(groups[0].file).schema_arrow.names if groups else []
        self.kept = [
            name
            for name, kind in (cfg.data.prepare.columns if cfg.data.prepare else {}).items()
            if kind == "other" and name in stored_names
        ]
        self.names = {column: meta.id_names(column) for column in self.ids}
        columns = list(dict.fromkeys([*self.ids, *self.labels.values(), *self.kept]))
        self.stored = StoredRows(meta, split, columns, days)

    def of(self, rows: np.ndarray) -> dict[str, pa.Array]:
        """The context columns of ``rows`` (positions in the split), in that order."""
        stored = self.stored.take(rows)
        context = {name: stored.column(name).combine_chunks() for name in self.kept if name not in self.ids}
        for column in self.ids:
            values = stored.column(column).combine_chunks()
            names = self.names[column]
            context[column] = values if names is None else names(values.to_numpy(zero_copy_only=False))
        for name, column in self.labels.items():
            context[name] = stored.column(column).combine_chunks()
        return context


class PredictionWriter(L.Callback):
    """Writes each predicted batch's real rows (``row``, context, one column per task) to this
    rank's ``part-rankNNNNN.parquet`` in the folder ``choose_folder()`` gives on global rank 0, as
    the batches come (one Parquet row group per batch); the file gets its name when complete."""

    def __init__(self, cfg: Config, split: str, choose_folder: Callable[[], Path]):
        self.cfg, self.split, self.choose_folder = cfg, split, choose_folder
        self.folder: Path | None = None
        self._context: RowContext | None = None
        self._writer = None
        self._task_names: list[str] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.folder = shared_output(trainer, self.choose_folder)
        self._context = RowContext(self.cfg, self.split)
        self._task_names = list(pl_module.task_names)
        self._writer = None

    def _rows(self, row_id: np.ndarray, predictions: np.ndarray) -> pa.Table:
        """(N,) row ids and (N, T) predictions → the output rows."""
        columns = {"row": pa.array(row_id), **self._context.of(row_id)}
        for t, name in enumerate(self._task_names):
            columns[name] = pa.array(np.ascontiguousarray(predictions[:, t]))
        return pa.table(columns)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        import pyarrow.parquet as pq

        row_id = outputs["row_id"].numpy()
        real = row_id >= 0  # padding rows (every rank yields as many batches) are not written
        table = self._rows(row_id[real], outputs["predictions"].numpy()[real])
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._partial(trainer), table.schema)
        self._writer.write_table(table.cast(self._writer.schema))

    def on_predict_end(self, trainer, pl_module) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:  # no batch came: the shard still exists, with no rows
            empty = self._rows(np.zeros(0, np.int64), np.zeros((0, len(self._task_names)), np.float32))
            pq.write_table(empty, self._partial(trainer))
        else:
            self._writer.close()
            self._writer = None
        self._partial(trainer).rename(self._path(trainer))

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._writer is not None:  # a failed prediction leaves no shard that looks whole
            self._writer.close()
            self._writer = None
            self._partial(trainer).unlink(missing_ok=True)

    def _path(self, trainer) -> Path:
        return self.folder / f"part-rank{trainer.global_rank:05d}.parquet"

    def _partial(self, trainer) -> Path:
        """Where the shard is written until it is complete (hidden: Parquet readers of the folder skip it)."""
        return self.folder / f".part-rank{trainer.global_rank:05d}.parquet.partial"


def predict(cfg: Config, checkpoint: str | None, split: str | None, output: str | None) -> int:
    """Scores a split with a checkpoint; each rank writes ``part-rankNNNNN.parquet`` with the
    row's position in the split (``row``), its user and item ids as the source wrote them, each
    task's label (``<task>_label``) and one prediction column per task, into ``output``
    (which must not hold anything yet) or a new ``<run_dir>/predictions/<split>-<checkpoint>``."""
    path = ckpt.resolve_model(checkpoint or Path(cfg.run_dir) / "checkpoints")
    split = split or cfg.data.test_split
    if output is not None and launcher_rank() == 0:
        user_output(output, "--output", folder=True)
    writer = PredictionWriter(
        cfg,
        split,
        lambda: (
            Path(output) if output else new_output(Path(cfg.run_dir) / "predictions", f"{split}-{path.name}")
        ),
    )
    trainer, module, datamodule, _ = build(cfg, extra_callbacks=[writer], predict_split=split)
    trainer.predict(module, datamodule=datamodule, ckpt_path=str(path), return_predictions=False)
    if trainer.is_global_zero:
        print(f"[towerrec] predictions of {path} for split {split} in {writer.folder}", flush=True)
    finish()
    return 0


def predict_command(cfg: Config, args) -> int:
    return predict(cfg, args.checkpoint, args.split, args.output)
