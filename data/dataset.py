"""The on-disk data set: Parquet shards per split plus ``metadata.json``.

Layout::

    <path>/metadata.json            written last: its presence marks a complete data set
    <path>/<split>/part-00000.parquet ...

``metadata.json`` holds the column kinds (``sparse``, ``multi_hot``, ``dense``, ``label``, ``other``),
vocabulary sizes of id columns, per-split files with the row count of every row group, statistics
and the preparation report. Writing goes to ``<path>.partial-<pid>`` and is renamed into place only
when complete, so a crashed preparation is never mistaken for a data set.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1


class DataError(ValueError):
    """Bad input data: the message names the file, column (and row where it applies) and the problem."""


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
                f"{meta_path}: format_version {raw.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        splits = {
            name: [RowGroup(str(root / rg[0]), int(rg[1]), int(rg[2])) for rg in groups]
            for name, groups in raw["splits"].items()
        }
        return cls(root, raw["columns"], splits, raw.get("statistics", {}), raw.get("report", {}))

    def row_groups(self, split: str) -> list[RowGroup]:
        if split not in self.splits:
            raise DataError(f"{self.root / METADATA_FILE}: no split {split!r} (have: {sorted(self.splits)})")
        return self.splits[split]

    def num_rows(self, split: str) -> int:
        return sum(rg.num_rows for rg in self.row_groups(split))

    def vocab_size(self, column: str) -> int | None:
        return self.columns.get(column, {}).get("num_embeddings")

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


class DatasetWriter:
    """Streams tables into ``num_shards`` Parquet files per split, in bounded memory.

    Rows are buffered per split up to ``row_group_size`` and each full row group goes to the next
    shard in turn, so shards end up with equal row counts (± one row group).

    Example::

        writer = DatasetWriter("runs/data/x", num_shards=4, row_group_size=16384)
        for chunk in chunks:
            writer.write("train", chunk)
        writer.commit(columns={"user_id": {"kind": "sparse", "num_embeddings": 1000}, ...})
    """

    def __init__(self, path: str | os.PathLike, num_shards: int = 4, row_group_size: int = 16384):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.path = Path(path)
        self.tmp = self.path.parent / f"{self.path.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.num_shards = num_shards
        self.row_group_size = row_group_size
        self._writers: dict[tuple[str, int], pq.ParquetWriter] = {}
        self._buffers: dict[str, list[pa.Table]] = {}
        self._buffered_rows: dict[str, int] = {}
        self._next_shard: dict[str, int] = {}
        self._schema: pa.Schema | None = None
        self._splits_seen: set[str] = set()
        self._vocabularies: dict[str, str] = {}

    def write_vocabulary(self, column: str, keys: np.ndarray) -> None:
        """Saves the raw ids of ``column``'s embedding rows 1..len(keys) (row 0: unseen ids), so that
        outputs can name the original ids (``DatasetMeta.vocabulary``)."""
        file = f"vocabulary.{column}.parquet"
        pq.write_table(pa.table({"id": np.asarray(keys)}), self.tmp / file)
        self._vocabularies[column] = file

    def write(self, split: str, table: pa.Table) -> None:
        self._splits_seen.add(split)
        if table.num_rows == 0:
            return
        if self._schema is None:
            self._schema = table.schema
        elif not table.schema.equals(self._schema):
            table = table.cast(self._schema)
        self._buffers.setdefault(split, []).append(table)
        self._buffered_rows[split] = self._buffered_rows.get(split, 0) + table.num_rows
        if self._buffered_rows[split] >= self.row_group_size:
            self._flush(split, final=False)

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
        """Closes the shards, writes ``metadata.json`` and moves the data set into place."""
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
        metadata = {
            "format_version": FORMAT_VERSION,
            "columns": columns,
            "splits": splits,
            "statistics": statistics or {},
            "report": report or {},
        }
        (self.tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1, sort_keys=True))
        old = self.path.parent / f"{self.path.name}.old-{os.getpid()}"
        if self.path.exists():
            self.path.rename(old)
        self.tmp.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)
        return DatasetMeta.load(self.path)

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / METADATA_FILE).exists()
