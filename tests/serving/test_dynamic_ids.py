"""Serving a model trained with dynamic ids, from a CSV of text ids: ``predict`` names the ids as
the file wrote them, the exported program (through ``client.py``) scores raw rows as training
scored them, ids never trained on or evicted score with row 0, and ``recommend`` takes text ids."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from towerrec.data.cleaning import string_ids

pytestmark = pytest.mark.slow
CONFIG = "configs/shop_csv_esmm.yaml"
TASKS = ("ctr", "cvr", "ctcvr")


def overrides(tmp: Path) -> list[str]:
    return [
        "--data.path", str(tmp / "data"), "--data.prepare.source", str(tmp / "shop.csv"),
        "--data.prepare.row_group_size", "1024", "--run_dir", str(tmp / "run"), "--data.batch_size", "128",
        "--trainer.max_epochs", "2", "--trainer.progress_bar", "false", "--trainer.num_threads", "1",
        "--data.sparse.0.id_mapping", "dynamic", "--data.sparse.0.dynamic", "{capacity: 250, evict_chunk: 8}",
        "--data.sparse.1.id_mapping", "dynamic", "--data.sparse.1.dynamic", "{capacity: 100, policy: lfu}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    from towerrec.data.samples import shop_impressions, write_csv

    tmp = tmp_path_factory.mktemp("dynamic_shop")
    write_csv(shop_impressions(num_rows=6000, num_users=400, num_items=150, seed=4), tmp / "shop.csv")
    env = {"OMP_NUM_THREADS": "1"}
    run_cli(["fit", "--config", CONFIG, *overrides(tmp)], env=env)
    run_cli(["predict", "--config", CONFIG, *overrides(tmp), "--output", str(tmp / "predictions")], env=env)
    run_cli(["export", "--config", CONFIG, *overrides(tmp), "--output", str(tmp / "export")], env=env)
    return tmp


def id_map(tmp: Path):
    from towerrec.serving.export import load_id_maps
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import checkpoint as ckpt

    args = overrides(tmp)
    cfg = load_config(CONFIG, [f"{k[2:]}={v}" for k, v in zip(args[::2], args[1::2])])
    return load_id_maps(cfg, ckpt.resolve_model(tmp / "run" / "checkpoints"))


def rows_of(ids, feature: str, texts: list[str]) -> np.ndarray:
    import torch

    hashes = np.asarray(string_ids(pa.array(texts)).to_numpy(zero_copy_only=False), dtype=np.int64)
    return ids.rows_of(feature, torch.from_numpy(hashes)).numpy()


def client_scores(export: Path, rows: list[dict]) -> list[dict]:
    """``client.Scorer`` in a process that has only torch and the export folder."""
    probe = "import json, sys\nfrom client import Scorer\nprint(json.dumps(Scorer('.').score(json.load(sys.stdin))))\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=export, input=json.dumps(rows), env=env,
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def test_predict_and_the_exported_client_score_raw_text_ids_alike(shop):
    predictions = pq.read_table(shop / "predictions").to_pylist()
    assert all(p["user"].startswith("u") and p["item"].startswith("sku-") for p in predictions)
    with open(shop / "shop.csv", newline="") as handle:
        raw = {(r["ts"], r["user"], r["item"]): r for r in csv.DictReader(handle)}
    sample = predictions[:: max(1, len(predictions) // 300)]
    ids = id_map(shop)
    without_row = rows_of(ids, "user", [p["user"] for p in sample]) == 0
    assert 0 < without_row.sum() < len(sample), "the sample must hold ids with and without a row"
    scores = client_scores(shop / "export", [raw[(str(p["ts"]), p["user"], p["item"])] for p in sample])
    for prediction, score in zip(sample, scores):
        for task in TASKS:
            assert score[task] == pytest.approx(prediction[task], abs=1e-5), (task, prediction)
    spec = json.loads((shop / "export" / "serving.json").read_text())
    user = spec["inputs"]["sparse"][0]
    assert user["id_mapping"] == "dynamic" and user["raw"]["mapping"] == "dynamic" and user["raw"]["text_ids"]
    assert "row 0" in user["values"]


def test_ids_never_trained_on_or_evicted_score_with_row_0(shop):
    ids = id_map(shop)
    with open(shop / "shop.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    users = sorted({r["user"] for r in rows})
    user_rows = rows_of(ids, "user", users)
    evicted, live = (
        users[int(np.flatnonzero(user_rows == 0)[0])],
        users[int(np.flatnonzero(user_rows > 0)[0])],
    )
    assert ids.totals()["t_user"]["evicted"] > 0
    template = rows[0]
    probes = [{**template, "user": user} for user in (evicted, "nobody-1", "nobody-2", live)]
    scores = client_scores(shop / "export", probes)
    assert scores[0] == scores[1] == scores[2] and scores[3] != scores[0]


def test_recommend_takes_text_ids_and_names_them(shop, tmp_path):
    with open(shop / "shop.csv", newline="") as handle:
        users = sorted({r["user"] for r in csv.DictReader(handle)})
    asked = [users[0], users[-1], "someone-new"]
    (tmp_path / "users.txt").write_text("\n".join(asked) + "\n")
    run_cli(
        ["recommend", "--config", CONFIG, *overrides(shop), "--users", str(tmp_path / "users.txt"), "--k", "5",
         "--output", str(tmp_path / "recs.csv")],
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    with open(tmp_path / "recs.csv", newline="") as handle:
        recs = list(csv.DictReader(handle))
    assert {r["original_user"] for r in recs} == set(asked)
    assert all(r["original_item"].startswith("sku-") for r in recs)
    assert sum(r["original_user"] == "someone-new" for r in recs) == 5
