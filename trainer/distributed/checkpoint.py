"""Atomic, sharded checkpoints: torch.distributed.checkpoint (DCP) for tensors, JSON for the rest.

Layout under ``<run_dir>/checkpoints``::

    step-00000400/            a complete checkpoint: DCP shards + .metadata + trainer_state.json
                              + checksums.json (CRC-32s of every other file)
    step-00000500.partial/    a save in progress (or one that crashed): never loaded, removed later
    latest                    text file naming the newest complete checkpoint; replaced atomically
    best.json                 with early stopping: the epoch-end checkpoint whose validation was
                              best ({"step", "metric", "value", "val"}); never pruned while named

A save writes into ``*.partial``; after every rank's DCP write has finished (DCP's own collective
finish) rank 0 writes ``trainer_state.json``, renames the folder and only then moves ``latest``.
A crash at any point leaves the previous checkpoint and pointer untouched.

Every file of a checkpoint has its checksums in ``checksums.json`` (CRC-32 of each
``CHECKSUM_CHUNK_BYTES`` of it): each rank hashes the bytes of its shard files as DCP writes them
(no second read), rank 0 the small files after. Before a checkpoint is loaded its files are
checked against them (the ranks split the files, each reads its share in parallel threads): a
damaged checkpoint is refused naming the file, and a resumed fit falls back to the newest intact
one. Checkpoints written without checksums load unchecked.

Only tensors go through DCP (loaded with ``weights_only``, and DCP's ``.metadata`` index through a
restricted unpickler); everything else (loop progress, reader position, learning rates) is JSON,
so loading never unpickles arbitrary objects.
DCP reshards on load: a checkpoint written by N ranks loads into M ranks or another plan.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from towerrec.trainer.errors import CheckpointError
from towerrec.trainer.run_folder import write_whole

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
BEST_FILE = "best.json"
CHECKSUM_FILE = "checksums.json"
CHECKSUM_CHUNK_BYTES = 64 << 20
"""Bytes per CRC-32 in ``checksums.json``: chunks are hashed in parallel, and a mismatch names its range."""
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
    checksums: bool = True,
) -> Path:
    """Saves on every rank (collective). ``tensors`` may hold ShardedTensors/DTensors.

    ``checksums``: record the checksums of every file (``checksums.json``); off only to measure
    what they cost (``benchmarks/big_tables.py``)."""
    _check_tensors_only(tensors)
    final = checkpoint_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    _, world_size = _rank_and_world(process_group)
    if is_rank_zero:
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
        except OSError as err:
            raise CheckpointError(
                f"{partial}: cannot create the checkpoint folder ({_os_error(err)})"
            ) from err
    barrier()
    try:
        writer = _ChecksummingWriter(partial) if checksums else dcp.FileSystemWriter(str(partial))
        dcp.save(tensors, checkpoint_id=str(partial), storage_writer=writer, process_group=process_group)
    except (CheckpointException, OSError) as err:  # CheckpointException is a BaseException
        _remove_partial(partial, is_rank_zero)
        raise CheckpointError(f"{partial}: saving failed ({_first_failure(err)})") from err
    files: dict[str, Any] = dict(writer.checksums) if checksums else {}  # hashed as they were written
    gathered = _gather(files, process_group, world_size)
    failure = None
    if is_rank_zero and failure is None:
        try:
            _write_json(partial / STATE_FILE, to_json_tree(state))
            if checksums:
                for part in gathered:
                    files.update(part)
                # what no rank hashed while writing (a writer that seeked back): read back
                unhashed = [
                    p.name for p in partial.iterdir() if p.suffix == ".distcp" and p.name not in files
                ]
                files.update(file_checksums(partial, [".metadata", STATE_FILE, *unhashed]))
                _write_json(
                    partial / CHECKSUM_FILE,
                    {"algorithm": "crc32", "chunk_bytes": CHECKSUM_CHUNK_BYTES, "files": files},
                )
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_json(Path(root) / LATEST_FILE, None, text=final.name + "\n")
            _prune(Path(root), keep_last, keep=final.name)
        except OSError as err:
            failure = f"{partial}: saving failed ({_os_error(err)})"
    failure = next((f for f in _gather(failure, process_group, world_size) if f), None)
    if failure is not None:
        _remove_partial(partial, is_rank_zero)
        raise CheckpointError(failure)
    return final


def _remove_partial(partial: Path, is_rank_zero: bool) -> None:
    """A failed save frees what it wrote (a full disk: the space the next save needs)."""
    if is_rank_zero:
        shutil.rmtree(partial, ignore_errors=True)


def _gather(value: Any, process_group, world_size: int) -> list[Any]:
    """Every rank's ``value`` (in rank order), on every rank."""
    if world_size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value, group=process_group)
    return gathered


def _os_error(err: OSError) -> str:
    """An OSError in a line; a full disk says so and names the path."""
    import errno

    where = f" writing {err.filename}" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device{where}"
    return f"{err.strerror or err}{where}"


class _ChecksumStream(io.RawIOBase):
    """A DCP shard file being written, its CRC-32s (one per ``CHECKSUM_CHUNK_BYTES``) computed from
    the bytes as they pass: no second read. Put in ``record`` on close, unless the writer moved
    back in the file (then the file is read back instead)."""

    def __init__(self, raw, record: dict[str, Any], name: str):
        super().__init__()
        self.raw, self.record, self.name = raw, record, name
        self.crcs: list[int] = []
        self.crc = self.filled = self.size = 0
        self.sequential = True

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = self.raw.write(data)
        view = memoryview(data)
        view = (view.cast("B") if view.c_contiguous else memoryview(view.tobytes()))[:written]
        self.size += len(view)
        while len(view):
            part = view[: CHECKSUM_CHUNK_BYTES - self.filled]
            self.crc = zlib.crc32(part, self.crc)
            self.filled += len(part)
            view = view[len(part) :]
            if self.filled == CHECKSUM_CHUNK_BYTES:
                self.crcs.append(self.crc)
                self.crc = self.filled = 0
        return written

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.sequential = False
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # flushes
        finally:
            self.raw.close()
        if self.sequential:
            crcs = self.crcs + [self.crc] if self.filled or not self.crcs else self.crcs
            self.record[self.name] = {"size": self.size, "crc32": crcs}


class _ChecksummingFileSystem(dcp.filesystem.FileSystem):
    def __init__(self, record: dict[str, Any]):
        super().__init__()
        self.record = record

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            if mode != "wb" or Path(path).suffix != ".distcp":
                yield stream
                return
            hashed = _ChecksumStream(stream, self.record, Path(path).name)
            try:
                yield hashed
            finally:
                hashed.close()


class _ChecksummingWriter(dcp.FileSystemWriter):
    """DCP's writer, recording in ``checksums`` the CRC-32s of the shard files this rank writes."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.checksums: dict[str, Any] = {}
        self.fs = _ChecksummingFileSystem(self.checksums)


def _write_json(path: Path, tree: Any, text: str | None = None) -> None:
    """Writes ``path`` whole or not at all (``run_folder.write_whole``)."""
    write_whole(path, json.dumps(tree) if text is None else text)


def _rank_and_world(process_group) -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


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
        return json.loads(path.read_bytes().decode())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a readable best-epoch record ({err})") from err


def write_best(root: str | os.PathLike, record: dict[str, Any]) -> None:
    """Replaces ``best.json`` atomically (rank 0 only)."""
    _write_json(Path(root) / BEST_FILE, None, text=json.dumps(record, indent=1))


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).exists() and (path / ".metadata").exists()


def find_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``latest`` if complete, else the newest complete one, else None
    (also when ``root`` is not a folder: the run folder's check reports that)."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / LATEST_FILE
    if pointer.exists():
        try:
            name = pointer.read_bytes().decode().strip()
        except (OSError, UnicodeDecodeError) as err:
            name = ""
            print(
                f"[towerrec] {pointer} is damaged ({err}): using the newest complete checkpoint", flush=True
            )
        if STEP_DIR.match(name) and is_complete(root / name):
            return root / name
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
        return from_json_tree(json.loads((path / STATE_FILE).read_bytes().decode()))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path / STATE_FILE}: cannot be read ({err})") from err


# ------------------------------------------------------------------------------------ checksums
def _chunk_crc(path: Path, offset: int, size: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return zlib.crc32(f.read(size))  # zlib releases the GIL: threads hash in parallel


def _hashing_threads() -> int:
    """This process's share of the node's CPUs (they are idle while a checkpoint is written)."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def file_checksums(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "crc32": [one per CHECKSUM_CHUNK_BYTES]}}`` of files in ``folder``, the
    chunks hashed in parallel by this process's share of the node's CPUs."""
    sizes = {name: (folder / name).stat().st_size for name in names}
    tasks = [
        (name, offset) for name in names for offset in range(0, max(sizes[name], 1), CHECKSUM_CHUNK_BYTES)
    ]
    with ThreadPoolExecutor(max(1, min(len(tasks), _hashing_threads()))) as pool:
        crcs = list(pool.map(lambda task: _chunk_crc(folder / task[0], task[1], CHECKSUM_CHUNK_BYTES), tasks))
    files: dict[str, dict[str, Any]] = {name: {"size": sizes[name], "crc32": []} for name in names}
    for (name, _), crc in zip(tasks, crcs):
        files[name]["crc32"].append(crc)
    return files


def _recorded_checksums(path: Path) -> dict[str, dict[str, Any]] | str | None:
    """The checkpoint's recorded checksums, None if it has none, or what is wrong with the record."""
    manifest = path / CHECKSUM_FILE
    if not manifest.exists():
        return None
    try:
        record = json.loads(manifest.read_bytes().decode())
        if record["chunk_bytes"] != CHECKSUM_CHUNK_BYTES or record["algorithm"] != "crc32":
            return f"{manifest}: checksums of another kind ({record['algorithm']}, {record['chunk_bytes']} bytes)"
        return dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest}: damaged ({err})"


def find_damage(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """What is wrong with this rank's share (every ``world_size``-th file) of the checkpoint's
    files against their recorded checksums, or None."""
    recorded = _recorded_checksums(path)
    if recorded is None or isinstance(recorded, str):
        return recorded
    names = sorted(recorded)[rank::world_size]
    for name in names:
        file = path / name
        if not file.is_file():
            return f"{file}: missing (the checkpoint's checksums list it)"
        if file.stat().st_size != recorded[name]["size"]:
            return f"{file}: {file.stat().st_size} bytes, {recorded[name]['size']} when it was written"
    try:
        found = file_checksums(path, names)
    except OSError as err:
        return f"{path}: cannot be read ({_os_error(err)})"
    for name in names:
        for chunk, (crc, expected) in enumerate(zip(found[name]["crc32"], recorded[name]["crc32"])):
            if crc != expected:
                start = chunk * CHECKSUM_CHUNK_BYTES
                end = min(start + CHECKSUM_CHUNK_BYTES, found[name]["size"])
                return f"{path / name}: bytes {start}-{end} differ from their checksum recorded when it was written"
    return None


_intact: set[tuple] = set()  # checkpoints this process found intact, with their files' stat


def check_intact(path: Path, process_group=None) -> str | None:
    """What is wrong with checkpoint ``path``'s files (checksums), or None; collective when there
    is a process group (the ranks split the files, and all get the same answer). A checkpoint found
    intact is not read again while its files keep their size and modification time."""
    key = _stat_key(Path(path))
    rank, world_size = _rank_and_world(process_group)
    mine = None if key in _intact else find_damage(path, rank, world_size)  # every rank gathers
    damage = next((d for d in _gather(mine, process_group, world_size) if d), None)
    if damage is None:
        _intact.add(key)
    return damage


def _stat_key(path: Path) -> tuple:
    try:
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir())
    except OSError:
        files = []
    return (str(path.resolve()), tuple(files))


def intact(path: Path, process_group=None, fallback: bool = False, is_rank_zero: bool = True) -> Path:
    """``path`` if its files match their checksums; else, with ``fallback``, the newest intact
    complete checkpoint older than it in the same folder (each damaged one named on stdout);
    else ``CheckpointError`` naming the damaged file."""
    older = sorted(
        (p for p in path.parent.iterdir() if STEP_DIR.match(p.name) and p.name < path.name and is_complete(p)),
        reverse=True,
    ) if fallback else []  # fmt: skip
    damaged = []
    for candidate in [path, *older]:
        damage = check_intact(candidate, process_group)
        if damage is None:
            if damaged and is_rank_zero:
                print(f"[towerrec] resuming from {candidate}, the newest intact checkpoint", flush=True)
            return candidate
        damaged.append(damage)
        if fallback and is_rank_zero:
            print(f"[towerrec] checkpoint {candidate} is damaged: {damage}", flush=True)
    if fallback:
        raise CheckpointError(
            f"{path.parent}: no intact checkpoint to resume from ({damaged[0]}); start afresh with "
            "checkpoint.resume=never and another run_dir, or restore the files"
        )
    raise CheckpointError(f"{path}: damaged: {damaged[0]}")


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
        raise CheckpointError(
            f"it refers to {module}.{name}, which a checkpoint index never holds: refusing to unpickle it "
            "(damaged, or not a towerrec checkpoint)"
        )


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's reader, except that the metadata index is read with a restricted unpickler (the
    tensors themselves are already loaded with ``weights_only=True``), once: a damaged index is a
    ``CheckpointError`` naming the file, not DCP's fallbacks to per-rank indexes that never exist."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        if self._metadata is None:
            path = Path(self._get_metadata_path())
            try:
                with self.fs.create_stream(path, "rb") as stream:
                    metadata = _MetadataUnpickler(stream).load()
            except CheckpointError as err:
                raise CheckpointError(f"{path}: {err}") from err
            except Exception as err:  # noqa: BLE001 - anything a damaged pickle raises
                raise CheckpointError(
                    f"{path}: damaged or not a checkpoint index ({type(err).__name__}: {_one_line(err)})"
                ) from err
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._metadata = metadata
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def load_tensors(path: Path, tensors: dict[str, Any], process_group=None) -> None:
    """Loads in place into ``tensors`` (the live, possibly differently sharded, state), after
    checking the files against their checksums (``check_intact``; collective with a group)."""
    damage = check_intact(path, process_group)
    if damage is not None:
        raise CheckpointError(f"{path}: damaged: {damage}")
    reader = SafeFileSystemReader(str(path))
    reader.read_metadata()  # a damaged index: one clear error, before DCP logs its fallbacks
    try:
        dcp.load(tensors, storage_reader=reader, process_group=process_group)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot be loaded into this model ({_first_failure(err)})") from err


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if "weights_only" in text:  # torch.load's advice to unpickle arbitrary code: never ours to give
        return "a tensor file is damaged or is not a checkpoint shard"
    if isinstance(err, OSError):
        return _os_error(err)
    return text.splitlines()[0][:500] if text else type(err).__name__


def _first_failure(err: BaseException) -> str:
    if isinstance(err, CheckpointException) and err.failures:
        rank, failure = sorted(err.failures.items())[0]
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {_one_line(inner)}"
    return _one_line(err)
