"""End-to-end training through the real stack (TorchRec DMP + Lightning + Parquet), one process."""

from __future__ import annotations

import json

import pytest

from tests.conftest import fit_args, run_cli

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


def test_stop_and_resume_gives_the_same_metrics_as_an_uninterrupted_run(synthetic_data, tmp_path):
    common = ("--trainer.max_epochs", "2", "--checkpoint.every_n_steps", "10", "--model.dropout", "0.1")
    run_cli(fit_args(synthetic_data, tmp_path / "straight", *common))
    interrupted = tmp_path / "interrupted"
    run_cli(fit_args(synthetic_data, interrupted, *common, "--trainer.max_steps", "57"))
    resumed = run_cli(fit_args(synthetic_data, interrupted, *common))
    assert "resuming from" in resumed.stdout and "step-00000057" in resumed.stdout
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    again = json.loads((interrupted / "metrics.json").read_text())
    assert again["global_step"] == straight["global_step"]
    assert again["metrics"] == straight["metrics"]
