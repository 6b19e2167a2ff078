"""``trainer.warm_start``: a new run that starts from a finished run's checkpoint.

What is loaded is what a resume loads, less the progress: every tensor of the checkpoint (the
model's state dict, so tables, dense weights and any other model state such as id maps; the fused
embedding optimizer's and the dense optimizers' state), through the strategy's own loaders, so a
tensor added to checkpoints is warm-started too. The step count, schedules, learning rates (the
config's) and the reader position start afresh, and the run writes only its own folder.

Checked before any process group starts, with the source's recorded ``config.yaml`` and the
checkpoint's tensor index (DCP ``.metadata``): the same features (names, tables, widths, kinds),
dense features and tasks, and every model tensor in both with the same shape. A table of another
size is refused, never grown: a larger ``num_embeddings`` would leave new rows untrained beside
rows whose optimizer state is carried over, and the rows of a vocabulary or hash of another size
do not mean the same ids.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import yaml

from towerrec.models.dynamic_ids import DynamicIds
from towerrec.trainer.config import Config, ConfigError
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.dynamic_ids import check_checkpoint
from towerrec.trainer.errors import CheckpointError

MODEL_PREFIX = "model."


def source_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint ``trainer.warm_start`` names (a run folder's best, else latest), or None."""
    if cfg.trainer.warm_start is None:
        return None
    source = Path(cfg.trainer.warm_start)
    try:
        path = ckpt.resolve_model(source)
    except CheckpointError as err:
        raise ConfigError(f"trainer.warm_start: {err}") from err
    run_dir = Path(cfg.run_dir).resolve()
    if run_dir in (source.resolve(), path.resolve().parent.parent):
        raise ConfigError(
            f"trainer.warm_start: {source} is this run's own folder (run_dir); a warm start trains a new "
            "run and never writes the source run: choose another run_dir"
        )
    return path


def _features(cfg: dict) -> dict[str, list]:
    data = cfg.get("data", {})
    return {
        "data.sparse": [
            (
                f["name"],
                f.get("table") or f"t_{f['name']}",
                f.get("embedding_dim"),
                bool(f.get("multi_hot")),
                f.get("pooling"),
                bool(f.get("sequence")),
            )
            for f in data.get("sparse", [])
        ],  # fmt: skip
        "data.dense": [f["name"] for f in data.get("dense", [])],
        "tasks": [(t["name"], t.get("type"), t.get("label") or t["name"]) for t in cfg.get("tasks", [])],
    }


def _describe(key: str, there: list, here: list) -> str:
    def name(entry) -> str:
        return entry if isinstance(entry, str) else str(entry[0])

    if [name(e) for e in there] == [name(e) for e in here]:
        changed = [f"{name(a)}: {a} there, {b} here" for a, b in zip(there, here) if a != b]
        return f"{key} differ: {'; '.join(changed)}"
    return f"{key} differ: {', '.join(map(name, there)) or 'none'} there, {', '.join(map(name, here)) or 'none'} here"


def check_compatible(cfg: Config, path: Path, model_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raises ConfigError naming what differs between the checkpoint at ``path`` and this run:
    features or tasks (from the source run's ``config.yaml``), then tensors missing on either side
    or of another shape (``model_shapes``: this run's unsharded model, name → shape)."""
    where = f"trainer.warm_start: {path}"
    recorded = path.parent.parent / "config.yaml"
    if recorded.exists():
        ours = _features(yaml.safe_load(yaml.safe_dump(_as_dict(cfg))))
        theirs = _features(yaml.safe_load(recorded.read_text()))
        for key in ours:
            if ours[key] != theirs[key]:
                raise ConfigError(f"{where}: {_describe(key, theirs[key], ours[key])}")
    try:  # the id maps of id_mapping: dynamic tables: same tables, same sizes (trainer.dynamic_ids)
        check_checkpoint(ckpt.load_state(path), DynamicIds.of(cfg.data.sparse), cfg.data.sparse)
    except CheckpointError as err:
        raise ConfigError(f"{where}: {err}") from err
    stored = checkpoint_shapes(path)
    missing = sorted(set(model_shapes) - set(stored))
    unexpected = sorted(set(stored) - set(model_shapes))
    if missing or unexpected:
        raise ConfigError(
            f"{where}: the model's tensors differ: "
            + "; ".join(
                part
                for part in (
                    f"not in the checkpoint: {', '.join(missing[:5])}" if missing else "",
                    f"only in the checkpoint: {', '.join(unexpected[:5])}" if unexpected else "",
                )
                if part
            )
        )
    for name, shape in model_shapes.items():
        if tuple(stored[name]) != tuple(shape):
            there, here = " x ".join(map(str, stored[name])), " x ".join(map(str, shape))
            raise ConfigError(
                f"{where}: {name} is {there} there, {here} here: a warm start never grows or shrinks a "
                "tensor (a table's num_embeddings, a vocabulary, a layer width must stay as they were)"
            )


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every model tensor in checkpoint ``path`` (from DCP's index, no tensor read)."""
    try:
        metadata = ckpt.SafeFileSystemReader(str(path)).read_metadata()
    except (OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint's index ({err})") from err
    return {
        key[len(MODEL_PREFIX) :]: tuple(entry.size)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and hasattr(entry, "size")
    }


def _as_dict(cfg: Config) -> dict:
    from towerrec.trainer.config import to_dict

    return to_dict(cfg)


class WarmStart(L.Callback):
    """Loads the source checkpoint once the model is sharded and the optimizers exist, unless the
    run resumes from a checkpoint of its own (which already holds the warm-started weights)."""

    def __init__(self, path: Path):
        self.path = path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            return
        trainer.strategy.warm_start(self.path)
        ids = getattr(pl_module, "dynamic_ids", None)
        if ids is not None:  # this run's epochs count their own ids (the source's epoch 0 is not ours)
            ids.epoch.fill_(-1)
        if trainer.is_global_zero:
            print(
                f"[towerrec] warm start from {self.path} (tables, dense weights, optimizer state)", flush=True
            )


def shared_tables(cfg: Config, model_keys: dict[str, tuple[int, ...]]) -> tuple[Path, dict[str, str]] | None:
    """``trainer.tables_from``: (the source checkpoint, our state-dict key → its key) for each
    table to start from it, checked before any process group starts (a named table missing on
    either side, or of another shape, stops with exit 2 naming it). ``model_keys``: this run's
    unsharded model's state-dict shapes. None when the key is not set."""
    from towerrec.models.tables import TABLE_CONTAINERS

    trainer = cfg.trainer
    if trainer.tables_from is None:
        return None
    try:
        path = ckpt.resolve_model(trainer.tables_from)
    except CheckpointError as err:
        raise ConfigError(f"trainer.tables_from: {err}") from err

    def tables(keys) -> dict[str, str]:  # table name → its weight's key
        return {
            key.split(".")[-2]: key
            for key in keys
            if key.endswith(".weight") and len(key.split(".")) >= 3 and key.split(".")[-3] in TABLE_CONTAINERS
        }

    theirs_shapes = checkpoint_shapes(path)
    ours, theirs = tables(model_keys), tables(theirs_shapes)
    names = (
        trainer.tables_from_names
        if trainer.tables_from_names is not None
        else sorted(set(ours) & set(theirs))
    )
    if not names:
        raise ConfigError(
            f"trainer.tables_from: {path} has no table of this model's ({', '.join(sorted(ours))})"
        )
    pairs = {}
    for name in names:
        if name not in ours or name not in theirs:
            side = "this model" if name not in ours else str(path)
            raise ConfigError(f"trainer.tables_from_names: {name!r} is not a table of {side}")
        if tuple(model_keys[ours[name]]) != tuple(theirs_shapes[theirs[name]]):
            raise ConfigError(
                f"trainer.tables_from: table {name!r} is {' x '.join(map(str, theirs_shapes[theirs[name]]))} in "
                f"{path}, {' x '.join(map(str, model_keys[ours[name]]))} here (the same vocabulary and "
                "embedding_dim are needed)"
            )
        pairs[ours[name]] = theirs[name]
    return path, pairs


class SharedTables(L.Callback):
    """Starts the named tables from another run's checkpoint once the model is sharded, unless the
    run resumes from a checkpoint of its own."""

    def __init__(self, path: Path, pairs: dict[str, str]):
        self.path, self.pairs = path, pairs

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            return
        trainer.strategy.load_tables(self.path, self.pairs)
        if trainer.is_global_zero:
            names = ", ".join(key.split(".")[-2] for key in self.pairs)
            print(f"[towerrec] tables {names} start from {self.path}", flush=True)
