"""Dynamic ids in training: each training batch's raw ids of ``id_mapping: dynamic`` features are
mapped to table rows right before the step's sharded lookup, in batch order, by the id maps of
``towerrec.models.dynamic_ids`` (held by the LightningModule as ``dynamic_ids``, replicated)::

    on_train_batch_start (every rank, every step):
        this rank's (table, id, count) ──strategy.all_gather_varying──▶ every rank's, the same everywhere
        DynamicIds.update ──▶ rows of the step's ids + rows given to new ids
        strategy.reset_table_rows: those rows' weights back to their initial values (same
            (seed, table, row) function as the tables' initialisation), fused optimizer state zeroed
        batch.sparse / batch.sequences: raw ids → rows
    validation / test / predict batches: lookups only (unknown or evicted ids → row 0)

A step whose loss is skipped (``trainer.non_finite_loss: skip``) has already updated the maps:
deterministically on every rank and in a resume alike. Only Lightning's own step maps in order:
``trainer.train_pipeline: sparse_dist`` prefetches batches (the map would run ahead of the trained
step) and is refused with dynamic ids (``towerrec.trainer.config.validate``).

Per epoch, rank 0 prints and every rank logs each table's ids inserted, evicted, expired and
overflowed (new ids left on row 0) and the fill (``ids/<table>/<counter>``); ``metrics.json`` gets
the last epoch's and the cumulative counters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from towerrec.data.config import SparseFeature
from towerrec.models.dynamic_ids import DynamicIds, TableTooSmall
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.errors import CheckpointError, ConfigError

SETTINGS_KEY = "dynamic_ids"
"""Where a checkpoint's ``trainer_state.json`` records each dynamic table's map settings (the map
tensors themselves are under the same key in the checkpoint's tensors)."""
SHAPE_SETTINGS = ("capacity", "evict_chunk", "delta_capacity")


def settings_of(ids: DynamicIds) -> dict[str, dict[str, Any]]:
    """Each table's map settings as the map resolved them (what its tensors' shapes follow)."""
    return {
        table: {
            "capacity": m.capacity,
            "policy": m.policy,
            "ttl_steps": m.ttl_steps,
            "evict_chunk": m.evict_chunk,
            "delta_capacity": m.delta_capacity,
        }
        for table, m in ids.maps.items()
    }


def _key_of(sparse: list[SparseFeature], table: str, setting: str) -> str:
    index = next((i for i, f in enumerate(sparse) if f.table_name == table), 0)
    return f"data.sparse[{index}].dynamic.{setting}"


def check_checkpoint(checkpoint: dict[str, Any], ids: DynamicIds | None, sparse: list[SparseFeature]) -> None:
    """Before a checkpoint's tensors are loaded: its id maps must be the config's (same tables,
    same capacity and buffer sizes). A map of another capacity is refused naming the key: a resume
    continues a run exactly, a warm start keeps every tensor's size (``load_grown`` loads a map into
    a larger one, for a table grown by other means)."""
    saved = checkpoint.get(SETTINGS_KEY) or {}
    mine = settings_of(ids) if ids is not None else {}
    if set(saved) != set(mine):
        raise CheckpointError(
            f"the checkpoint has dynamic id maps for tables {sorted(saved) or 'none'}, the config for "
            f"{sorted(mine) or 'none'} (data.sparse[i].id_mapping): it was trained on other features"
        )
    for table, settings in mine.items():
        for setting in SHAPE_SETTINGS:
            if saved[table][setting] != settings[setting]:
                raise CheckpointError(
                    f"{_key_of(sparse, table, setting)}: the checkpoint's id map of table {table!r} has "
                    f"{setting} {saved[table][setting]}, the config {settings[setting]}; a resume or a warm start keeps "
                    "the map's sizes (set it back; towerrec.trainer.dynamic_ids.load_grown loads a map into a larger one)"
                )


def epoch_line(epoch: int, stats: dict[str, dict[str, float]]) -> str:
    parts = [
        f"{table}: {int(s['inserted']):,} new, {int(s['evicted']):,} evicted, {int(s['expired']):,} expired, "
        f"{int(s['overflow']):,} overflow, {int(s['live']):,} ids ({s['fill']:.1%} full)"
        for table, s in stats.items()
    ]
    return f"epoch {epoch + 1} dynamic ids: " + "; ".join(parts)


class DynamicIdMapping(L.Callback):
    """Maps every batch's dynamic ids (see the module docstring); ``sparse`` names the config keys
    in errors; ``print_lines``: rank 0 prints the per-epoch counters."""

    def __init__(self, sparse: list[SparseFeature], data_path: str, print_lines: bool = True):
        self.sparse = list(sparse)
        self.data_path = data_path
        self.print_lines = print_lines
        self.last_resets: dict = {}
        """The rows the last training step re-initialised, per table."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids: DynamicIds = pl_module.dynamic_ids
        ids.begin_epoch(trainer.current_epoch)
        local = ids.step_counts([batch.sparse, batch.sequences], batch.row_id >= 0)
        try:
            assigned, resets = ids.update(trainer.strategy.all_gather_varying(local))
        except TableTooSmall as err:  # every rank sees the same global ids: all raise together
            features = ", ".join(repr(name) for name in ids.features_of(err.table))
            raise ConfigError(
                f"{_key_of(self.sparse, err.table, 'capacity')}: table {err.table!r} (features {features}) holds "
                f"{err.capacity:,} ids, but training step {trainer.global_step} (epoch {trainer.current_epoch + 1}) "
                f"of {self.data_path} brings {err.distinct:,} distinct ids of it in its global batch "
                f"(data.batch_size x {trainer.world_size} ranks): raise the capacity or lower the batch size"
            ) from err
        trainer.strategy.reset_table_rows(resets)
        self.last_resets = resets
        batch.sparse = ids.remap(batch.sparse, assigned)
        batch.sequences = ids.remap(batch.sequences, assigned)

    def _lookup(self, pl_module, batch) -> None:
        batch.sparse = pl_module.dynamic_ids.lookup(batch.sparse)
        batch.sequences = pl_module.dynamic_ids.lookup(batch.sequences)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._lookup(pl_module, batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._lookup(pl_module, batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._lookup(pl_module, batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stats = pl_module.dynamic_ids.epoch_stats()
        pl_module.last_dynamic_ids = stats
        pl_module.log_dict(
            {
                f"ids/{table}/{name}": value
                for table, values in stats.items()
                for name, value in values.items()
            },
            sync_dist=False,
        )
        if self.print_lines and trainer.is_global_zero:
            print(f"[towerrec] {epoch_line(trainer.current_epoch, stats)}", flush=True)


def report(module) -> dict[str, Any]:
    """What ``metrics.json`` records of the id maps: the last epoch's counters and the totals."""
    return {"last_epoch": getattr(module, "last_dynamic_ids", {}), "totals": module.dynamic_ids.totals()}


def saved_maps(path: Path) -> dict[str, torch.Tensor]:
    """The id map tensors of checkpoint ``path`` at the shapes they were saved with (the
    ``state_dict`` of its ``DynamicIds``), read in this process without a process group."""
    index = ckpt.SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = SETTINGS_KEY + "."
    state = {
        key[len(prefix) :]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for key, entry in index.items()
        if key.startswith(prefix)
    }
    ckpt.load_tensors(path, {SETTINGS_KEY: state})
    return state


def load_grown(ids: DynamicIds, path: Path, sparse: list[SparseFeature]) -> None:
    """Loads the id maps of a finished run's checkpoint ``path`` into ``ids`` whose tables may be
    larger (a warm start onto grown tables): every id keeps its row, the rows beyond the old
    capacity are free. A table that shrank, or a map the run did not have, is a CheckpointError
    naming the key. (The tables' own rows 0..old capacity carry over as they are.)"""
    state = saved_maps(path)
    for table in ids.table_names:
        prefix = f"maps.{table}."
        saved = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if not saved:
            raise CheckpointError(
                f"{path}: has no id map of table {table!r} (data.sparse[i].id_mapping: dynamic)"
            )
        try:
            ids.maps[table].load_smaller(saved)
        except ValueError as err:  # its message starts with the setting: "capacity: ..."
            setting, _, problem = str(err).partition(": ")
            raise CheckpointError(
                f"{path}: {_key_of(sparse, table, setting)}: table {table!r}: {problem}"
            ) from err
    ids.epoch_start.zero_()
    ids.epoch.fill_(-1)
