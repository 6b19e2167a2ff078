"""The exported client reads a raw id as the preparation did (``data.normalize.ID_RULE``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "serving" / "templates" / "client.py"


@pytest.fixture(scope="module")
def client():
    spec = importlib.util.spec_from_file_location("towerrec_client_template", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def feature(client, tmp_path: Path, mapping: str):
    (tmp_path / "user.json").write_text(json.dumps(["3", "4", "u7"]))
    raw = {"input": "user", "mapping": mapping, "vocabulary": "user.json", "hash_buckets": 1000}
    spec = {"name": "user", "multi_hot": False, "raw": raw, "id_range": [0, 1000], "id_mapping": "identity"}
    return client.Feature(spec, tmp_path)


@pytest.mark.parametrize("mapping", ["vocabulary", "hash"])
def test_an_id_written_as_a_float_is_the_integer_it_equals(client, tmp_path, mapping):
    user = feature(client, tmp_path, mapping)
    assert user.rows_of(" 3.0") == user.rows_of("3") == user.rows_of("3.00") != [0]
    assert user.rows_of("2.5") == [0]  # refused by the preparation: an id no model has seen
    assert user.rows_of("u7") != [0]
