"""Property: on random (often malformed) tables the validator accepts exactly the valid ones,
raises DataError otherwise (never another exception), and agrees with the training reader."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from towerrec.data.config import DenseFeature, SparseFeature
from towerrec.data.dataset import FORMAT_VERSION, METADATA_FILE, DataError, DatasetMeta
from towerrec.data.reader import BatchStream, LabelSpec, ReadSpec
from towerrec.data.validate import validate_dataset

IDS = st.one_of(st.none(), st.integers(-3, 20))
FLOATS = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, 3.0])
)
GOOD_RATING = st.sampled_from([1.0, 2.5, 5.0])
GOOD_CLICK = st.sampled_from([0.0, 1.0])


@st.composite
def tables(draw):
    """(columns, expected_valid, fill_nan): each column good, of a wrong type, with bad values, or missing."""
    num = draw(st.integers(1, 12))
    valid = True
    columns: dict[str, pa.Array] = {}

    def variant(name: str) -> str:
        return draw(st.sampled_from(["good", "good", "values", "type", "missing"]), label=name)

    kind = variant("user_id")
    if kind == "good":
        columns["user_id"] = pa.array(
            draw(st.lists(st.integers(0, 20), min_size=num, max_size=num)), pa.int64()
        )
    elif kind == "values":
        values = draw(st.lists(IDS, min_size=num, max_size=num))
        valid &= all(v is None or v >= 0 for v in values)
        columns["user_id"] = pa.array(values, pa.int64())
    elif kind == "type":
        columns["user_id"] = pa.array(draw(st.lists(st.floats(0, 5), min_size=num, max_size=num)))
        valid = False
    else:
        valid = False

    kind = variant("genres")
    lists = st.lists(
        st.one_of(st.none(), st.lists(st.integers(-2, 6), max_size=3)), min_size=num, max_size=num
    )
    if kind in ("good", "values"):
        values = draw(lists)
        if kind == "good":
            values = [None if v is None else [abs(x) for x in v] for v in values]
        valid &= all(v is None or all(x >= 0 for x in v) for v in values)
        columns["genres"] = pa.array(values, pa.list_(pa.int64()))
    elif kind == "type":
        columns["genres"] = pa.array([str(k) for k in range(num)])
        valid = False
    else:
        valid = False

    fill_nan = draw(st.sampled_from([None, 0.0]))
    kind = variant("price")
    if kind in ("good", "values"):
        values = draw(
            st.lists(FLOATS if kind == "values" else st.floats(-10, 10), min_size=num, max_size=num)
        )
        valid &= fill_nan is not None or all(v is not None and math.isfinite(v) for v in values)
        columns["price"] = pa.array(values, pa.float32())
    elif kind == "type":
        columns["price"] = pa.array(["1.5"] * num)
        valid = False
    else:
        valid = False

    for name, good, check in (
        ("rating", GOOD_RATING, lambda v: v is not None and 1.0 <= v <= 5.0),
        ("click", GOOD_CLICK, lambda v: v in (0.0, 1.0)),
    ):
        kind = variant(name)
        if kind in ("good", "values"):
            values = draw(st.lists(FLOATS if kind == "values" else good, min_size=num, max_size=num))
            valid &= all(check(v) for v in values)
            columns[name] = pa.array(values, pa.float32())
        elif kind == "type":
            columns[name] = pa.array([[1]] * num, pa.list_(pa.int64()))
            valid = False
        else:
            valid = False
    return columns, valid, fill_nan


def read_spec(fill_nan) -> ReadSpec:
    return ReadSpec(
        sparse=(SparseFeature("user_id"), SparseFeature("genres", multi_hot=True)),
        dense=(DenseFeature("price", fill_nan=fill_nan),),
        labels=(LabelSpec("rating", min_value=1.0, max_value=5.0), LabelSpec("click", binary=True)),
        num_embeddings={"user_id": 21, "genres": 7},
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_validator_accepts_exactly_valid_tables(case):
    columns, expected_valid, fill_nan = case
    spec = read_spec(fill_nan)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        table = pa.table(columns) if columns else pa.table({"other": pa.array(range(3))})
        (path / "train").mkdir()
        pq.write_table(table, path / "train" / "part-00000.parquet", row_group_size=5)
        groups = [
            ["train/part-00000.parquet", i, len(table.slice(5 * i, 5))]
            for i in range(math.ceil(len(table) / 5))
        ]
        metadata = {
            "format_version": FORMAT_VERSION,
            "columns": dict.fromkeys(table.column_names, {"kind": "other"}),
        }
        (path / METADATA_FILE).write_text(json.dumps({**metadata, "splits": {"train": groups}}))
        meta = DatasetMeta.load(path)
        try:
            validate_dataset(meta, spec)
            accepted = True
        except DataError:
            accepted = False
        assert accepted == expected_valid
        try:  # the reader, which validates at read time, must agree
            for _ in BatchStream(meta, "train", spec, batch_size=4, shuffle=False):
                pass
            read_ok = True
        except DataError:
            read_ok = False
        assert read_ok == expected_valid
