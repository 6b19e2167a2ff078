"""End-to-end training through the real stack (TorchRec DMP + Lightning + Parquet), one process."""

from __future__ import annotations

import json

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import fit_args, run_cli
from towerrec.data.dataset import DatasetMeta

pytestmark = pytest.mark.slow


def test_default_config_trains_a_few_hundred_steps_and_beats_the_trivial_predictor(synthetic_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        fit_args(synthetic_data, run_dir, "--data.batch_size", "128", "--trainer.max_epochs", "2")
    )
    assert "[towerrec] per-task metrics:" in result.stdout
    out = json.loads((run_dir / "metrics.json").read_text())
    assert out["global_step"] >= 300
    test, baseline = out["metrics"]["test"], out["baseline"]["test"]
    assert test["rating"]["rmse"] < 0.9 * baseline["rating"]["rmse"]
    assert test["rating"]["mae"] < baseline["rating"]["mae"]
    assert test["ctr"]["auc"] > 0.65
    assert test["ctr"]["logloss"] < baseline["ctr"]["logloss"]
    for name in (
        "config.yaml",
        "versions.json",
        "plan.txt",
        "plan.json",
        "logs/metrics.csv",
        "checkpoints/latest",
    ):
        assert (run_dir / name).exists(), name
    assert all(f"t_{f}" in (run_dir / "plan.txt").read_text() for f in ("user_id", "item_id", "genres"))


def test_movielens_u1_config_beats_the_trivial_predictor(ml100k_dir, tmp_path):
    run_dir = tmp_path / "ml"
    args = [
        "fit", "--config", "configs/movielens100k.yaml",
        "--data.prepare.source", str(ml100k_dir),
        "--data.path", str(tmp_path / "data"),
        "--run_dir", str(run_dir),
        "--trainer.max_epochs", "2",
        "--trainer.progress_bar", "false",
    ]  # fmt: skip
    run_cli(args)
    out = json.loads((run_dir / "metrics.json").read_text())
    test, baseline = out["metrics"]["test"], out["baseline"]["test"]
    assert test["rating"]["count"] == 20_000  # the canonical u1.test
    assert test["rating"]["rmse"] < baseline["rating"]["rmse"] - 0.1
    assert test["click"]["auc"] > 0.72


def test_movielens_topk_model_beats_popularity_and_names_movielens_ids(ml100k_dir, tmp_path):
    """Trained with sampled negatives and a 'rated' task, the model's top-10 lists beat the
    popularity baseline (same code) on u1.test without any popularity prior."""
    run_dir = tmp_path / "topk"
    common = [
        "--config", "configs/movielens100k_topk.yaml",
        "--data.prepare.source", str(ml100k_dir),
        "--data.path", str(tmp_path / "data"),
        "--run_dir", str(run_dir),
    ]  # fmt: skip
    # 4 of the config's 6 epochs (its cosine schedule shortened with them): P@10 0.252 vs 0.214, recall
    # 0.1207 vs 0.1177 at seed 0; with 3 epochs recall falls below popularity's
    run_cli(["fit", *common, "--trainer.max_epochs", "4", "--trainer.progress_bar", "false"], timeout=900)
    run_cli(["rank-eval", *common, "--k", "10", "--output", str(tmp_path / "ranking.json")])
    ranking = json.loads((tmp_path / "ranking.json").read_text())
    model, popularity = ranking["model"], ranking["popularity"]
    for metric in ("precision", "recall", "ndcg", "map"):
        assert model[metric] > popularity[metric], (metric, model, popularity)
    assert ranking["score"]["popularity_exponent"] == 0.0

    users = tmp_path / "users.txt"
    users.write_text("1\n2\n")
    run_cli(["recommend", *common, "--users", str(users), "--k", "5", "--output", str(tmp_path / "recs.csv")])
    recs = pacsv.read_csv(tmp_path / "recs.csv").to_pydict()
    assert recs["rank"] == [1, 2, 3, 4, 5] * 2
    meta = DatasetMeta.load(tmp_path / "data")
    vocabulary = meta.vocabulary("item_id")
    assert recs["original_item"] == [int(vocabulary[i - 1]) for i in recs["item"]]
    assert all(1 <= i <= 1682 for i in recs["original_item"])  # MovieLens 100K item ids
    # sampled negatives do not count as seen: nothing the user rated in training is recommended
    train = pq.read_table(meta.root / "train", columns=["user_id", "item_id", "rated"]).to_pydict()
    rated = {(u, i) for u, i, r in zip(train["user_id"], train["item_id"], train["rated"]) if r == 1}
    assert not {(u, i) for u, i in zip(recs["user"], recs["item"])} & rated
