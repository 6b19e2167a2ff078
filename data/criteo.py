"""Criteo display-ads TSV (``label I1..I13 C1..C26``, no header, empty = missing) → the project's
Parquet data set."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv

from towerrec.data.cleaning import (
    DenseSpec,
    TableSchema,
)
from towerrec.data.config import PrepareConfig
from towerrec.data.convert import convert
from towerrec.data.dataset import DatasetMeta
from towerrec.data.normalize import normalize_table
from towerrec.data.sources import (
    CSV_BLOCK_BYTES,
    Source,
    input_files,
    read_csv_chunks,
)

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]


def prepare_criteo(cfg: PrepareConfig, out: str) -> DatasetMeta:
    """Criteo display-ads TSV (a file or a folder of files, optionally gzip) → data set.

    Columns: ``click`` (label in {0, 1}), ``I1``..``I13`` (dense: missing → ``dense_fill``, then
    ``log(1 + max(x, 0))`` unless ``log_transform: false``), ``C1``..``C26`` (sparse: hex strings
    hashed to 64-bit ids, then a training-split vocabulary with ``min_count`` or hashing). The time
    split keeps the file order (the last rows are test), as Criteo files are ordered by time.
    """
    files = input_files(cfg.source)
    names = ["click", *CRITEO_DENSE, *CRITEO_SPARSE]
    read = (
        pacsv.ReadOptions(column_names=names, block_size=CSV_BLOCK_BYTES),
        pacsv.ParseOptions(delimiter="\t", quote_char=False),
        pacsv.ConvertOptions(
            column_types={
                "click": pa.float64(),
                **dict.fromkeys(CRITEO_DENSE, pa.float64()),
                **dict.fromkeys(CRITEO_SPARSE, pa.string()),
            },
            strings_can_be_null=True,
        ),
    )
    log = True if cfg.log_transform is None else cfg.log_transform
    schema = TableSchema(
        {"click": "label", **dict.fromkeys(CRITEO_DENSE, "dense"), **dict.fromkeys(CRITEO_SPARSE, "sparse")},
        label_ranges={"click": (0.0, 1.0)},
        binary_labels=("click",),
        dense_specs={name: DenseSpec(log1p=log) for name in CRITEO_DENSE},
    )
    source = Source(
        files,
        lambda path: read_csv_chunks(path, *read),
        lambda raw, where, first_row: normalize_table(raw, schema, where, first_row),
    )
    report = {"converter": "criteo", "source": str(cfg.source), "files": [str(f) for f in files]}
    return convert(source, schema, cfg, out, report)
