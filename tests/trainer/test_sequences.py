"""Behaviour sequences end to end on a log with a planted sequential signal (``towerrec.data.samples``
``session_clicks``: the next click follows the last one): the generic CSV path builds the
histories, DIN and the transformer encoders must clearly beat a bag of the same history, and the
trained sequence model exports, serves raw histories and recommends."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import run_cli
from towerrec.data.dataset import DatasetMeta
from towerrec.data.samples import session_clicks, write_csv
from towerrec.serving.catalogue import read_rows
from towerrec.serving.export import SERVING_SPEC_FILE, export, load_serving, load_unsharded_model
from towerrec.trainer.config import load_config

pytestmark = pytest.mark.slow

CONFIG = "configs/sessions_sequence.yaml"
BAG = (
    "[{name: user, side: user, embedding_dim: 16}, {name: item, side: item, embedding_dim: 16, table: t_item},"
    " {name: hist_items, side: user, embedding_dim: 16, multi_hot: true, pooling: mean, table: t_item}]"
)
MODELS = {
    "bag": [f"--data.sparse={BAG}"],
    "din": [],
    "transformer": ["--model.sequence.encoder=transformer"],
    "hstu": [
        "--model.sequence.encoder=transformer",
        "--model.sequence.attention=pointwise",
        "--model.sequence.num_layers=2",
    ],
}


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sessions")
    write_csv(session_clicks(num_users=1000, steps=20, num_items=400, seed=0), root / "sessions.csv")
    return {"root": root, "source": root / "sessions.csv"}


def overrides(sessions, name: str) -> list[str]:
    return [
        # one data set for every model: the recipe (data.prepare) is the same, only the reading differs
        f"--data.prepare.source={sessions['source']}", f"--data.path={sessions['root'] / 'data'}",
        f"--run_dir={sessions['root'] / name}", "--trainer.progress_bar=false", *MODELS[name],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def test_auc(sessions) -> dict[str, float]:
    auc = {}
    for name in MODELS:
        result = run_cli(["fit", "--config", CONFIG, *overrides(sessions, name)], timeout=600)
        auc[name] = float(re.search(r"^test\s+ctr\s+auc=([0-9.]+)", result.stdout, re.M).group(1))
    return auc


def test_sequence_encoders_find_the_signal_a_bag_of_the_history_cannot(test_auc):
    print(test_auc)
    assert test_auc["bag"] < 0.65  # which item was clicked last is not in a mean of the history
    for name in ("din", "transformer", "hstu"):
        assert test_auc[name] > test_auc["bag"] + 0.15, test_auc


def _client(folder: Path):
    spec = importlib.util.spec_from_file_location("sequence_client", folder / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Scorer(folder)


def test_the_exported_sequence_model_scores_raw_histories_as_the_trainer_does(test_auc, sessions, tmp_path):
    args = [a.removeprefix("--") for a in overrides(sessions, "din")]
    cfg = load_config(CONFIG, args)
    out = export(cfg, None, tmp_path / "export")
    model, _ = load_unsharded_model(cfg)
    meta = DatasetMeta.load(cfg.data.path)
    rows = read_rows(cfg, meta, "test", meta.table_rows(cfg.data.sparse))
    batch = rows.decoded.to_batch(0, 300)
    with torch.inference_mode():
        from towerrec.models.heads import predictions

        want = predictions(model(batch.sparse, batch.dense, batch.sequences), model.output_kinds)
    spec = json.loads((out / SERVING_SPEC_FILE).read_text())
    names = [f["name"] for f in spec["inputs"]["sparse"]]
    values = [torch.from_numpy(rows.decoded.sparse(n).take(np.arange(300)).values) for n in names]
    lengths = [torch.from_numpy(rows.decoded.sparse(n).take(np.arange(300)).lengths()) for n in names]
    with torch.inference_mode():
        got = load_serving(out)(batch.dense, values, lengths)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # raw rows: original ids, the history as "i0012|i0345|..." oldest first, ages as bucket ids
    users, items = meta.vocabulary("user"), meta.vocabulary("item")
    raw = []
    for r in range(300):
        history = rows.decoded.sparse("hist_items").take([r]).values
        ages = rows.decoded.sparse("hist_age").take([r]).values
        raw.append({
            "user": str(users[rows.decoded.sparse("user").values[r] - 1]),
            "item": str(items[rows.decoded.sparse("item").values[r] - 1]),
            "hist_items": "|".join(str(items[h - 1]) for h in history),
            "hist_age": "|".join(map(str, ages)),
        })  # fmt: skip
    scores = _client(out).score(raw)
    np.testing.assert_allclose([s["ctr"] for s in scores], want[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    # a history longer than max_length: the client keeps the most recent, as training did
    longer = dict(raw[0], hist_items="i0001|i0002|i0003|" * 5 + raw[0]["hist_items"])
    longer["hist_age"] = "1|1|1|" * 5 + raw[0]["hist_age"]
    if raw[0]["hist_items"].count("|") >= 9:  # already full: the prefix is cut away
        assert _client(out).score([longer])[0]["ctr"] == pytest.approx(scores[0]["ctr"], abs=1e-6)


def test_recommend_reads_each_users_latest_history(test_auc, sessions):
    result = run_cli(["recommend", "--config", CONFIG, *overrides(sessions, "din"), "--k", "5", "--evaluate"])
    lists = sorted((sessions["root"] / "din" / "recommendations").glob("top5-*.parquet"))
    table = pq.read_table(lists[-1])
    assert table.num_rows == 1000 * 5
    model, popularity = re.findall(r"^(?:model|popularity)\s+([0-9.]+)", result.stdout, re.M)[:2]
    assert float(model) > 2 * float(popularity)  # precision@5: the successor of the last click
