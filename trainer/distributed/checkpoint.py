"""Atomic, sharded checkpoints: torch.distributed.checkpoint (DCP) for tensors, JSON for the rest.

Layout under ``<run_dir>/checkpoints``::

    step-00000400/            a complete checkpoint: DCP shards + .metadata + trainer_state.json
    step-00000500.partial/    a save in progress (or one that crashed): never loaded, removed later
    latest                    text file naming the newest complete checkpoint; replaced atomically
    best.json                 with early stopping: the epoch-end checkpoint whose validation was
                              best ({"step", "metric", "value", "val"}); never pruned while named

A save writes into ``*.partial``; after every rank's DCP write has finished (DCP's own collective
finish) rank 0 writes ``trainer_state.json``, renames the folder and only then moves ``latest``.
A crash at any point leaves the previous checkpoint and pointer untouched.

Only tensors go through DCP (loaded with ``weights_only``, and DCP's ``.metadata`` index through a
restricted unpickler); everything else (loop progress, reader position, learning rates) is JSON,
so loading never unpickles arbitrary objects.
DCP reshards on load: a checkpoint written by N ranks loads into M ranks or another plan.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from towerrec.trainer.errors import CheckpointError

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
BEST_FILE = "best.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------------------------ JSON encoding
def to_json_tree(value: Any) -> Any:
    """Converts Lightning's checkpoint metadata (which may hold scalar tensors) to JSON-able values."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {str(k): to_json_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_tree(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(
        f"checkpoint metadata value of type {type(value).__name__} is not JSON-serialisable: {value!r}"
    )


def from_json_tree(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        if "__float__" in value:
            return float(value["__float__"])
        return {k: from_json_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_tree(v) for v in value]
    return value


def _check_tensors_only(tree: Any, path: str = "") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_tensors_only(v, f"{path}.{k}" if path else str(k))
    else:
        assert isinstance(tree, torch.Tensor), (
            f"non-tensor {type(tree).__name__} at {path} would be pickled by DCP"
        )


# ------------------------------------------------------------------------------------ save / load
def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save(
    root: str | os.PathLike,
    step: int,
    tensors: dict[str, Any],
    state: dict[str, Any],
    is_rank_zero: bool,
    barrier,
    keep_last: int,
    process_group=None,
) -> Path:
    """Saves on every rank (collective). ``tensors`` may hold ShardedTensors/DTensors."""
    _check_tensors_only(tensors)
    final = checkpoint_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if is_rank_zero:
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
        except OSError as err:
            raise CheckpointError(
                f"{partial}: cannot create the checkpoint folder ({err.strerror or err})"
            ) from err
    barrier()
    try:
        dcp.save(tensors, checkpoint_id=str(partial), process_group=process_group)
    except (CheckpointException, OSError) as err:  # CheckpointException is a BaseException
        raise CheckpointError(f"{partial}: saving failed ({_first_failure(err)})") from err
    barrier()
    if is_rank_zero:
        state_path = partial / STATE_FILE
        with open(state_path, "w") as f:
            json.dump(to_json_tree(state), f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        pointer = Path(root) / (LATEST_FILE + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, Path(root) / LATEST_FILE)
        _prune(Path(root), keep_last, keep=final.name)
    barrier()
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    best = read_best(root)
    kept = {keep, checkpoint_dir(root, best["step"]).name if best else None}
    for old in complete[:-keep_last]:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob("step-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def read_best(root: str | os.PathLike) -> dict[str, Any] | None:
    """The best epoch recorded under ``root`` (``best.json``), if any."""
    path = Path(root) / BEST_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


def write_best(root: str | os.PathLike, record: dict[str, Any]) -> None:
    """Replaces ``best.json`` atomically (rank 0 only)."""
    path = Path(root) / BEST_FILE
    partial = path.with_name(BEST_FILE + ".tmp")
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, path)


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).exists() and (path / ".metadata").exists()


def find_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest`` if complete, else the newest complete one, else None."""
    root = Path(root)
    if not root.exists():
        return None
    pointer = root / LATEST_FILE
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and is_complete(p))
    return complete[-1] if complete else None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a checkpoints root / run folder (→ its latest complete checkpoint)."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        latest = find_latest(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"{path}: no complete checkpoint there (a folder with .metadata and {STATE_FILE})")


def resolve_model(path: str | os.PathLike) -> Path:
    """The checkpoint whose weights to evaluate or serve: a checkpoint folder as given; a run folder
    or checkpoints root → its best epoch when fit recorded one (early stopping) and it is complete,
    else its latest complete checkpoint."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        best = read_best(root) if root.is_dir() else None
        if best is not None and is_complete(checkpoint_dir(root, best["step"])):
            return checkpoint_dir(root, best["step"])
    return resolve(path)


def load_state(path: Path) -> dict[str, Any]:
    try:
        return from_json_tree(json.loads((path / STATE_FILE).read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: cannot be read ({err})") from err


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` index allowing only the classes such an index is made of."""

    ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
    }

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}: refusing to unpickle it")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader, except that the metadata index is read with a restricted unpickler (the
    tensors themselves are already loaded with ``weights_only=True``)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_tensors(path: Path, tensors: dict[str, Any], process_group=None) -> None:
    """Loads in place into ``tensors`` (the live, possibly differently sharded, state)."""
    try:
        dcp.load(tensors, storage_reader=SafeFileSystemReader(str(path)), process_group=process_group)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot be loaded into this model ({_first_failure(err)})") from err


def _first_failure(err: BaseException) -> str:
    if isinstance(err, CheckpointException) and err.failures:
        rank, failure = sorted(err.failures.items())[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {str(inner).splitlines()[0][:500]}"
    return str(err).splitlines()[0][:500]
