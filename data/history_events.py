"""Gathering the events of ``data.prepare.histories`` during a preparation pass (user key, time
and raw ids: O(events) memory), then mapping them to table rows (``towerrec.data.history.EventLog``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from towerrec.data.cleaning import (
    TableSchema,
    dense_values,
)
from towerrec.data.config import HistoryConfig
from towerrec.data.dataset import DataError
from towerrec.data.history import EventLog
from towerrec.data.id_mapping import IdMapper, id_values
from towerrec.data.splits import SplitKeys


class HistoryEvents:
    """The training rows' events of each ``data.prepare.histories`` entry, gathered over a pass
    (user key, time and raw ids: O(events) memory), then mapped to table rows (``logs``)."""

    def __init__(self, histories: list[HistoryConfig], schema: TableSchema):
        self.histories = histories
        self.parts: list[list[tuple]] = [[] for _ in histories]
        for history in histories:
            for source in (history.column, *history.side.values()):
                if schema.kinds.get(source) != "sparse":
                    raise DataError(
                        f"data.prepare.histories.{history.name}: {source!r} is not a single-valued id column "
                        "of the data (name it in data.sparse, or in data.prepare.columns as sparse)"
                    )

    def observe(self, table: pa.Table, keys: SplitKeys, train: np.ndarray) -> None:
        for history, parts in zip(self.histories, self.parts):
            chosen = train.copy() if history.events == "train" else np.ones(len(train), dtype=bool)
            if history.where:
                values = dense_values(table.column(history.where))
                chosen &= np.isfinite(values) & (values != 0)
            sources = [history.column, *history.side.values()]
            raw = [id_values(table.column(c)) for c in sources]
            parts.append(
                (
                    keys.user[chosen],
                    keys.time[chosen],
                    [(ids[chosen], nulls[chosen]) for ids, _, nulls, _ in raw],
                )
            )

    def logs(self, mappers: dict[str, IdMapper]) -> list[EventLog]:
        logs = []
        for history, parts in zip(self.histories, self.parts):
            names = [history.name, *history.side]
            sources = [history.column, *history.side.values()]
            users = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
            times = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
            columns = {}
            for i, (name, source) in enumerate(zip(names, sources)):
                ids = np.concatenate([p[2][i][0] for p in parts]) if parts else np.zeros(0, np.int64)
                nulls = np.concatenate([p[2][i][1] for p in parts]) if parts else np.zeros(0, bool)
                columns[name] = (
                    np.where(nulls, mappers[source].missing_row, mappers[source].rows(ids))
                    if len(ids)
                    else ids
                )
            logs.append(EventLog.build(users, times, columns))
        self.parts = [[] for _ in self.histories]
        return logs
