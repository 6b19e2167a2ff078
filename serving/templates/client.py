"""Scores raw rows with an exported towerrec model, or retrieves items for raw users with an
exported retrieval model. Needs torch and this folder only.

    from client import Scorer
    scorer = Scorer("path/to/export")
    scorer.score([{"user": "u123", "item": "i7", "price": 12.5, "tags": ["a", "b"]}])
    # -> [{"ctr": 0.031, "cvr": 0.12}]

    from client import Retriever
    Retriever("path/to/export").top_k({"user": "u123", "hist_items": ["i3", "i7"]}, k=10, exclude=["i3", "i7"])
    # -> ["i42", "i8", ...]

Every raw value goes through what the data set's preparation and the training reader did, as
``serving.json`` records it: ids through the saved vocabulary (unknown ids: row 0), a hash, or
bucket edges, and ids of ``id_mapping: dynamic`` features as raw int64 ids (text through the same
64-bit hash as preparation), which the program looks up in the id map training left (an id never
trained on or evicted: row 0); numbers through their transforms (log1p, clip, standardize; a
missing value takes the recorded fill). Features a row leaves out count as missing, and so do text cells equal to one of the
data set's missing-value tokens (an empty cell and ``csv.null_values``), so rows read from the
original CSV score as they are.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

MASK = (1 << 64) - 1
M1, M2, GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15
READ_HASH_MULTIPLIER = 0x9E3779B97F4A7C15
PREPARE_HASH_SALT = 0x2545F4914F6CDD1D
FLOAT_WRITTEN = re.compile(r"(?i)^[-+]?(\d+\.\d*|\.\d+)(e[-+]?\d+)?$")  # as data.normalize reads ids


def mix64(z: int) -> int:
    z &= MASK
    z = ((z ^ (z >> 30)) * M1) & MASK
    z = ((z ^ (z >> 27)) * M2) & MASK
    return z ^ (z >> 31)


def string_id(text: str) -> int:
    """The 64-bit hash the preparation gives a string id (as a signed int64)."""
    data = text.encode()
    total = 0
    for position, byte in enumerate(data):
        total = (total + mix64((byte << 32) | position)) & MASK
    value = mix64((total + len(data) * GOLDEN) & MASK)
    return value - (1 << 64) if value >= 1 << 63 else value


class Feature:
    """Raw value(s) → embedding rows of one sparse feature."""

    def __init__(self, spec: dict, folder: Path):
        self.name, self.multi_hot = spec["name"], spec["multi_hot"]
        self.input = spec["raw"]["input"]
        self.mapping = spec["raw"]["mapping"]
        self.rows = spec["id_range"][1] + 1
        self.read_mapping = spec["id_mapping"]
        self.edges = spec["raw"].get("edges", [])
        self.buckets = spec["raw"].get("hash_buckets")
        self.delimiter = spec["raw"].get("delimiter")
        self.max_length = spec.get("max_length") if spec.get("sequence") else None
        self.text_ids = spec["raw"].get("text_ids", False)
        self.missing_id = spec["raw"].get("missing_id")
        self.lookup = {}
        if self.mapping == "vocabulary":
            originals = json.loads((folder / spec["raw"]["vocabulary"]).read_text())
            self.lookup = {str(value): row + 1 for row, value in enumerate(originals)}

    def _row(self, value) -> int:
        if self.mapping == "dynamic":
            return self._raw_id(value)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return 0
        if self.mapping == "buckets":
            number = float(value)
            return sum(number >= edge for edge in self.edges) + 1
        if isinstance(value, str) and FLOAT_WRITTEN.match(value.strip()):
            number = float(value)  # the preparation read an id written 3.0 as 3, and refused 2.5
            if not (number.is_integer() and abs(number) < 2.0**53):
                return 0
            value = str(int(number))
        if self.mapping == "vocabulary":
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 17.0 is the id written 17
            row = self.lookup.get(str(value).strip(), 0)
        elif self.mapping == "hash":
            key = string_id(value.strip()) if isinstance(value, str) else int(value)
            row = mix64((key & MASK) ^ PREPARE_HASH_SALT) % self.buckets + 1
        else:  # the data set's own ids
            row = max(int(value), 0)
        if self.read_mapping == "hash":
            return ((((row & MASK) * READ_HASH_MULTIPLIER) & MASK) >> 17) % self.rows
        return row if row < self.rows else 0

    def _raw_id(self, value) -> int:
        """The int64 id training read (the program maps it to a row)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return self.missing_id
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 17.0 is the id written 17
        if self.text_ids:
            return string_id(str(value).strip())
        return int(value)

    def rows_of(self, value) -> list[int]:
        if not self.multi_hot:
            return [self._row(value)]
        if value is None:
            return []
        if isinstance(value, str):
            value = [v for v in value.split(self.delimiter or "|") if v.strip()]
        if self.max_length is not None:
            value = list(value)[-self.max_length :]  # a history, oldest first: keep the most recent
        return [self._row(v) for v in value]


class Number:
    """A raw number → the value the model saw."""

    def __init__(self, spec: dict):
        self.name, self.input = spec["name"], spec["raw"]["input"]
        self.transforms, self.fill = spec["raw"]["transforms"], spec["raw"]["fill"]

    def value(self, raw) -> float:
        x = self.fill if raw is None or (isinstance(raw, float) and math.isnan(raw)) else float(raw)
        for step in self.transforms:
            if step["op"] == "log1p":
                x = math.log1p(max(x, 0.0))
            elif step["op"] == "clip":
                x = min(max(x, step["low"]), step["high"])
            elif step["op"] == "standardize":
                x = (x - step["mean"]) / step["std"]
        return x


class _Inputs:
    """Raw rows → the program's (dense, values, lengths), as ``serving.json`` says."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        self.spec = json.loads((folder / "serving.json").read_text())
        self.program = torch.export.load(folder / self.spec["file"]).module()
        self.features = [Feature(s, folder) for s in self.spec["inputs"]["sparse"]]
        self.numbers = [Number(s) for s in self.spec["inputs"]["dense"]["features"]]
        missing = self.spec["inputs"].get("missing", {"tokens": [""], "strip": True})
        self.missing_tokens, self.strip = set(missing["tokens"]), missing["strip"]

    def _cell(self, row: dict, column: str):
        value = row.get(column)
        if isinstance(value, str):
            value = value.strip() if self.strip else value
            if value in self.missing_tokens:
                return None
        return value

    def _run(self, rows: list[dict]) -> torch.Tensor:
        dense = torch.tensor([[n.value(self._cell(row, n.input)) for n in self.numbers] for row in rows],
                             dtype=torch.float32).reshape(len(rows), len(self.numbers))  # fmt: skip
        values, lengths = [], []
        for feature in self.features:
            ids = [feature.rows_of(self._cell(row, feature.input)) for row in rows]
            values.append(torch.tensor([i for row_ids in ids for i in row_ids], dtype=torch.int64))
            lengths.append(torch.tensor([len(row_ids) for row_ids in ids], dtype=torch.int64))
        with torch.no_grad():
            return self.program(dense, values, lengths)


class Scorer(_Inputs):
    """Predictions of an exported ranking model for raw (user, item) rows."""

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        self.tasks = [c["task"] for c in self.spec["outputs"]["columns"]]

    def score(self, rows: list[dict]) -> list[dict[str, float]]:
        return [dict(zip(self.tasks, map(float, row))) for row in self._run(rows)]


class Retriever(_Inputs):
    """Top-K items of an exported retrieval model for raw users: each user's raw features and
    history (raw item ids, oldest first) → the user tower's vector → the items with the highest
    inner product, ``exclude`` (raw item ids, e.g. what the user already saw) left out.

        retriever = Retriever("path/to/export")
        retriever.top_k({"user": "u1", "hist_items": ["i3", "i9"]}, k=10, exclude=["i3", "i9"])
    """

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        items = self.spec["items"]
        self.vectors = torch.load(self.folder / items["vectors"], weights_only=True)
        self.ids = json.loads((self.folder / items["ids"]).read_text())
        self.position = {str(item): i for i, item in enumerate(self.ids)}

    def top_k(self, user: dict, k: int = 10, exclude=()) -> list:
        return self.top_k_many([user], k, [exclude])[0]

    def top_k_many(self, users: list[dict], k: int = 10, exclude: list | None = None) -> list[list]:
        scores = self._run(users) @ self.vectors.T  # (U, N)
        for row, excluded in enumerate(exclude or []):
            positions = [self.position[str(i)] for i in excluded if str(i) in self.position]
            scores[row, positions] = -math.inf
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return [
            [self.ids[i] for i, score in zip(items.tolist(), values.tolist()) if score > -math.inf]
            for items, values in zip(top.indices, top.values)
        ]
