"""The on-disk data set: Parquet shards per split plus ``metadata.json``.

Layout::

    <path>/metadata.json            written last: its presence marks a complete data set
    <path>/<split>/part-00000.parquet ...

``metadata.json`` holds the column kinds (``sparse``, ``multi_hot``, ``dense``, ``label``, ``other``),
vocabulary sizes of id columns, per-split files with the row count of every row group, statistics
and the preparation report. Writing goes to ``<path>.partial-<host>-<pid>`` and is renamed into
place only when complete, so a crashed preparation is never mistaken for a data set; the next
preparation of the path removes the partial folders of processes of this host that are gone.

A data set grows by days (``towerrec.data.prepare.append_day``): day 0 is the first preparation,
each appended day a folder of its own, listed after the earlier days' row groups::

    <path>/days/0001/<split>/part-00000.parquet ...

and ``metadata.json``'s ``days`` index gives each day's slice ``[start, end)`` of every split's
row-group list, so reading a range of days selects its row groups without looking at the others
(``DatasetMeta.row_groups(split, days)``). A data set without the index is one day.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from towerrec.data.errors import DataError
from towerrec.data.vocab import original_ids

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 2
SHUFFLE_BUCKETS = 64
SPILL_ROWS = 1_000_000


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group: the unit that ranks read."""

    file: str
    index: int
    num_rows: int


@dataclass
class DatasetMeta:
    """Parsed ``metadata.json`` of a complete data set."""

    root: Path
    columns: dict[str, dict[str, Any]]
    splits: dict[str, list[RowGroup]]
    statistics: dict[str, Any]
    report: dict[str, Any]
    shuffled_splits: list[str]
    """Splits stored in a seeded random row order (the training split; see ``DatasetWriter``)."""
    fingerprint: str | None = None
    """Digest of how the data set was made (``data.prepare.prepared_with``); None for a data set
    written directly with ``DatasetWriter``."""
    prepared_with: dict[str, Any] | None = None
    days: list[dict[str, Any]] | None = None
    """The day index (module docstring): per day ``{"day", "splits": {split: [start, end)},
    "source", "report"}``; None for a data set of one day."""

    @classmethod
    def load(cls, path: str | os.PathLike) -> DatasetMeta:
        root = Path(path)
        if not root.exists():
            raise DataError(
                f"{root}: data set folder does not exist (run `towerrec prepare` or set data.prepare)"
            )
        meta_path = root / METADATA_FILE
        if not meta_path.exists():
            raise DataError(
                f"{meta_path}: missing, so {root} is not a complete data set "
                "(an interrupted preparation leaves no metadata; run `towerrec prepare` again)"
            )
        try:
            raw = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{meta_path}: not valid JSON ({err})") from err
        if raw.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{meta_path}: format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}: the data "
                "set was prepared by another towerrec version (version 1 kept training rows in the "
                "converter's order); prepare it again (towerrec prepare, or delete the folder)"
            )
        splits = {
            name: [RowGroup(str(root / rg[0]), int(rg[1]), int(rg[2])) for rg in groups]
            for name, groups in raw["splits"].items()
        }
        return cls(
            root,
            raw["columns"],
            splits,
            raw.get("statistics", {}),
            raw.get("report", {}),
            raw.get("shuffled_splits", []),
            raw.get("fingerprint"),
            raw.get("prepared_with"),
            raw.get("days"),
        )

    @property
    def num_days(self) -> int:
        return len(self.days) if self.days else 1

    def day_slices(self, split: str) -> list[tuple[int, int]]:
        """[start, end) of each day's row groups in ``split``'s list, in day order."""
        if not self.days:
            return [(0, len(self.splits.get(split, [])))]
        return [(int(day["splits"][split][0]), int(day["splits"][split][1])) for day in self.days]

    def row_groups(self, split: str, days: tuple[int, int] | None = None) -> list[RowGroup]:
        """The row groups of ``split``, or of its days ``[first, last]`` only (an O(1) slice)."""
        if split not in self.splits:
            raise DataError(f"{self.root / METADATA_FILE}: no split {split!r} (have: {sorted(self.splits)})")
        groups = self.splits[split]
        if days is None:
            return groups
        first, last = days
        if not 0 <= first <= last < self.num_days:
            raise DataError(
                f"{self.root / METADATA_FILE}: no days [{first}, {last}]: the data set has days 0..{self.num_days - 1}"
            )
        slices = self.day_slices(split)  # consecutive: day i's groups follow day i - 1's
        return groups[slices[first][0] : slices[last][1]]

    def num_rows(self, split: str, days: tuple[int, int] | None = None) -> int:
        return sum(rg.num_rows for rg in self.row_groups(split, days))

    def vocab_size(self, column: str) -> int | None:
        return self.columns.get(column, {}).get("num_embeddings")

    def table_rows(self, sparse) -> dict[str, int]:
        """Rows of each sparse feature's table: its ``num_embeddings`` when set, else the
        vocabulary size this data set's metadata records for its column."""
        return table_rows(sparse, self)

    def vocabulary(self, column: str) -> np.ndarray | None:
        """Raw ids of ``column``'s rows: entry r - 1 is the original id of row r (None: not saved,
        e.g. hashed ids or a data set written before vocabularies were saved)."""
        file = self.columns.get(column, {}).get("vocabulary")
        if not file:
            return None
        try:
            return pq.read_table(self.root / file).column("id").to_numpy(zero_copy_only=False)
        except (OSError, pa.ArrowInvalid, KeyError) as err:
            raise DataError(f"{self.root / file}: cannot read the vocabulary of {column!r} ({err})") from err

    def id_names(self, column: str) -> Callable[[np.ndarray], pa.Array] | None:
        """Stored values of ``column`` → the ids as the input wrote them: through its vocabulary
        (rows) or, for text ids kept raw (``id_mapping: dynamic``), its saved texts (hashes); null
        where unknown. None when the stored values are the original ids themselves."""
        info = self.columns.get(column, {})
        files = [
            info.get("originals"),
            *((day.get("originals") or {}).get(column) for day in self.days or []),
        ]
        files = [file for file in files if file]
        if files:
            keys, texts = [], []
            for file in files:  # day 0's, then each appended day's
                try:
                    saved = pq.read_table(self.root / file)
                except (OSError, pa.ArrowInvalid) as err:
                    raise DataError(f"{self.root / file}: cannot read the ids of {column!r} ({err})") from err
                keys.append(saved.column("key").to_numpy())
                texts.append(saved.column("id").to_numpy(zero_copy_only=False))
            keys, first = np.unique(np.concatenate(keys), return_index=True)
            texts = np.concatenate(texts)[first]

            def texts_of(stored: np.ndarray) -> pa.Array:
                stored = np.asarray(stored, dtype=np.int64)
                if not len(keys):
                    return pa.nulls(len(stored), pa.string())
                position = np.minimum(np.searchsorted(keys, stored), len(keys) - 1)
                return pa.array(texts[position], mask=keys[position] != stored)

            return texts_of
        vocabulary = self.vocabulary(column)
        return None if vocabulary is None else (lambda stored: original_ids(stored, vocabulary))

    def original_ids(self, column: str, stored: np.ndarray) -> pa.Array | None:
        """``id_names(column)`` applied to ``stored`` (None: the stored values are the originals)."""
        names = self.id_names(column)
        return None if names is None else names(stored)


def table_rows(sparse, meta: DatasetMeta | None) -> dict[str, int]:
    """``DatasetMeta.table_rows``, also without a data set (then every feature needs ``num_embeddings``)."""
    rows = {}
    for i, feature in enumerate(sparse):
        size = feature.num_embeddings if feature.dynamic is None else feature.dynamic_rows
        if size is None and meta is not None:
            size = meta.vocab_size(feature.source_column)
        if size is None:
            raise DataError(
                f"data.sparse[{i}].num_embeddings: not set and "
                + (
                    f"{meta.root / METADATA_FILE} has no vocabulary size for column {feature.source_column!r}"
                    if meta is not None
                    else "there is no prepared data set to take it from"
                )
            )
        rows[feature.name] = int(size)
    return rows


class DatasetWriter:
    """Streams tables into ``num_shards`` Parquet files per split, in bounded memory.

    Rows are buffered per split up to ``row_group_size`` and each full row group goes to the next
    shard in turn, so shards end up with equal row counts (± one row group).

    Splits in ``shuffle_splits`` (the training split, for the converters) are written in a seeded,
    uniformly random row order whatever order the rows arrive in: each row goes to one of
    ``SHUFFLE_BUCKETS`` random buckets (spilled to Arrow files beside the shards once more than
    ``SPILL_ROWS`` rows wait in memory); at commit each bucket is permuted and written in turn
    (memory: one bucket, about rows / ``SHUFFLE_BUCKETS``). The reader only shuffles within
    windows, so a converter that writes all sampled negatives after the rated rows (or a log sorted
    by time or label) would otherwise give batches with none of one kind.

    Example::

        writer = DatasetWriter("runs/data/x", num_shards=4, row_group_size=16384, shuffle_splits=("train",))
        for chunk in chunks:
            writer.write("train", chunk)
        writer.commit(columns={"user_id": {"kind": "sparse", "num_embeddings": 1000}, ...})
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_shards: int = 4,
        row_group_size: int = 16384,
        shuffle_splits: tuple[str, ...] = (),
        seed: int = 0,
    ):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.path = Path(path)
        self.removed_partials = [str(folder) for folder in remove_stale_partials(self.path)]
        self.tmp = self.path.parent / f"{self.path.name}.partial-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.num_shards = num_shards
        self.row_group_size = row_group_size
        self.shuffle_splits = tuple(shuffle_splits)
        self._rng = np.random.default_rng([seed, 0x5EED])
        self._writers: dict[tuple[str, int], pq.ParquetWriter] = {}
        self._buffers: dict[str, list[pa.Table]] = {}
        self._buffered_rows: dict[str, int] = {}
        self._next_shard: dict[str, int] = {}
        self._schema: pa.Schema | None = None
        self._splits_seen: set[str] = set()
        self._vocabularies: dict[str, str] = {}
        self._originals: dict[str, str] = {}
        self._buckets: dict[str, list[list[pa.Table]]] = {}
        self._bucket_rows = 0
        self._spills: dict[tuple[str, int], Any] = {}

    def write_vocabulary(self, column: str, keys: np.ndarray) -> None:
        """Saves the raw ids of ``column``'s embedding rows 1..len(keys) (row 0: unseen ids), so that
        outputs can name the original ids (``DatasetMeta.vocabulary``)."""
        file = f"vocabulary.{column}.parquet"
        pq.write_table(pa.table({"id": np.asarray(keys)}), self.tmp / file)
        self._vocabularies[column] = file

    def write_originals(self, column: str, keys: np.ndarray, originals: np.ndarray) -> None:
        """Saves, for a column of raw int64 ids that were text (``id_mapping: dynamic``), each stored
        id (the text's 64-bit hash, sorted) and its text (``DatasetMeta.original_ids``)."""
        file = f"originals.{column}.parquet"
        pq.write_table(
            pa.table({"key": np.asarray(keys, np.int64), "id": np.asarray(originals)}), self.tmp / file
        )
        self._originals[column] = file

    def write(self, split: str, table: pa.Table) -> None:
        self._splits_seen.add(split)
        if table.num_rows == 0:
            return
        if self._schema is None:
            self._schema = table.schema
        elif not table.schema.equals(self._schema):
            table = table.cast(self._schema)
        if split in self.shuffle_splits:
            self._scatter(split, table)
            return
        self._buffer(split, table)

    def _buffer(self, split: str, table: pa.Table) -> None:
        self._buffers.setdefault(split, []).append(table)
        self._buffered_rows[split] = self._buffered_rows.get(split, 0) + table.num_rows
        if self._buffered_rows[split] >= self.row_group_size:
            self._flush(split, final=False)

    def _scatter(self, split: str, table: pa.Table) -> None:
        """Sends each row of ``table`` to a random bucket of ``split`` (see the class docstring)."""
        buckets = self._buckets.setdefault(split, [[] for _ in range(SHUFFLE_BUCKETS)])
        codes = self._rng.integers(0, SHUFFLE_BUCKETS, table.num_rows)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(SHUFFLE_BUCKETS + 1))
        for bucket in range(SHUFFLE_BUCKETS):
            if bounds[bucket] < bounds[bucket + 1]:
                buckets[bucket].append(table.take(pa.array(order[bounds[bucket] : bounds[bucket + 1]])))
        self._bucket_rows += table.num_rows
        if self._bucket_rows > SPILL_ROWS:
            self._spill()

    def _spill(self) -> None:
        for split, buckets in self._buckets.items():
            for bucket, tables in enumerate(buckets):
                if not tables:
                    continue
                key = (split, bucket)
                if key not in self._spills:
                    (self.tmp / ".shuffle").mkdir(exist_ok=True)
                    sink = pa.OSFile(str(self.tmp / ".shuffle" / f"{split}-{bucket:03d}.arrow"), "wb")
                    self._spills[key] = (sink, pa.ipc.new_stream(sink, self._schema))
                for t in tables:
                    self._spills[key][1].write_table(t)
                buckets[bucket] = []
        self._bucket_rows = 0

    def _write_shuffled(self, split: str) -> None:
        """Each bucket of ``split`` in turn: its rows (spilled and in memory) permuted, written."""
        for bucket, tables in enumerate(self._buckets.pop(split, [])):
            parts = list(tables)
            spill = self._spills.pop((split, bucket), None)
            if spill is not None:
                sink, stream = spill
                stream.close()
                sink.close()
                path = self.tmp / ".shuffle" / f"{split}-{bucket:03d}.arrow"
                with pa.OSFile(str(path), "rb") as source:
                    parts.insert(0, pa.ipc.open_stream(source).read_all())
                path.unlink()
            if not parts:
                continue
            rows = pa.concat_tables(parts)
            self._buffer(split, rows.take(pa.array(self._rng.permutation(rows.num_rows))))

    def write_splits(self, table: pa.Table, codes, names: tuple[str, ...]) -> dict[str, int]:
        """Writes row i of ``table`` to split ``names[codes[i]]``; returns the rows written per split."""
        written = {}
        for code, name in enumerate(names):
            part = table.filter(pa.array(codes == code))
            written[name] = part.num_rows
            self.write(name, part)
        return written

    def _flush(self, split: str, final: bool) -> None:
        if not self._buffers.get(split):
            return
        buffered = pa.concat_tables(self._buffers.pop(split, [])).combine_chunks()
        start = 0
        while buffered.num_rows - start >= self.row_group_size or (final and start < buffered.num_rows):
            group = buffered.slice(start, self.row_group_size)
            shard = self._next_shard.get(split, 0)
            self._next_shard[split] = (shard + 1) % self.num_shards
            self._writer(split, shard).write_table(group, row_group_size=self.row_group_size)
            start += group.num_rows
        rest = buffered.slice(start)
        self._buffers[split] = [rest] if rest.num_rows else []
        self._buffered_rows[split] = rest.num_rows

    def _writer(self, split: str, shard: int) -> pq.ParquetWriter:
        key = (split, shard)
        if key not in self._writers:
            (self.tmp / split).mkdir(exist_ok=True)
            assert self._schema is not None
            self._writers[key] = pq.ParquetWriter(
                self.tmp / split / f"part-{shard:05d}.parquet", self._schema
            )
        return self._writers[key]

    def commit(
        self,
        columns: dict[str, dict[str, Any]],
        statistics: dict[str, Any] | None = None,
        report: dict[str, Any] | None = None,
    ) -> DatasetMeta:
        """Closes the shards, writes ``metadata.json`` and moves the data set into place; a failure
        (a full disk) removes the partial folder and leaves any previous data set as it was."""
        try:
            self._finish(columns, statistics, report)
        except BaseException:
            self.abort()
            raise
        old = self.path.parent / f"{self.path.name}.old-{os.getpid()}"
        if self.path.exists():
            self.path.rename(old)
        self.tmp.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)
        return DatasetMeta.load(self.path)

    def _finish(self, columns, statistics, report) -> None:
        for split in list(self._buckets):
            self._write_shuffled(split)
        shutil.rmtree(self.tmp / ".shuffle", ignore_errors=True)
        for split in list(self._buffers):
            self._flush(split, final=True)
        for writer in self._writers.values():
            writer.close()
        splits: dict[str, list[list[Any]]] = {split: [] for split in self._splits_seen}
        for split_dir in sorted(p for p in self.tmp.iterdir() if p.is_dir()):
            groups = []
            for file in sorted(split_dir.glob("*.parquet")):
                meta = pq.ParquetFile(file).metadata
                rel = f"{split_dir.name}/{file.name}"
                groups += [[rel, i, meta.row_group(i).num_rows] for i in range(meta.num_row_groups)]
            splits[split_dir.name] = groups
        columns = {
            name: {**info, "vocabulary": self._vocabularies[name]} if name in self._vocabularies else info
            for name, info in columns.items()
        }
        columns = {
            name: {**info, "originals": self._originals[name]} if name in self._originals else info
            for name, info in columns.items()
        }
        metadata = {
            "format_version": FORMAT_VERSION,
            "columns": columns,
            "splits": splits,
            "statistics": statistics or {},
            "report": {
                **(report or {}),
                **({"removed_partials": self.removed_partials} if self.removed_partials else {}),
            },
            "shuffled_splits": sorted(set(self.shuffle_splits) & self._splits_seen),
        }
        (self.tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1, sort_keys=True))

    def abort(self) -> None:
        """Closes what is open and removes the partial folder (what was written is freed)."""
        for close in [w.close for w in self._writers.values()] + [
            part.close for pair in self._spills.values() for part in reversed(pair)
        ]:
            try:
                close()
            except OSError:  # a full disk fails the close too: the folder goes anyway
                pass
        self._writers, self._spills = {}, {}
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_stale_partials(path: Path) -> list[Path]:
    """Removes ``<path>.partial-<host>-<pid>`` folders (``<path>.partial-<pid>`` before hosts were
    named) left by preparations that were killed: those of this host whose process is gone. A
    partial folder of another host is left alone (its process cannot be checked from here)."""
    removed = []
    host = socket.gethostname()
    for folder in path.parent.glob(f"{glob.escape(path.name)}.partial-*") if path.parent.is_dir() else ():
        owner = folder.name[len(path.name) + len(".partial-") :]
        owner_host, _, pid = owner.rpartition("-")
        if not pid.isdigit() or (owner_host and owner_host != host) or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a killed child not yet reaped is gone too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA_FILE).exists()
