"""Nothing a user made is lost or written over: evaluations, predictions, serving outputs and a
second process leave a run's training record as it was; a resumed fit continues the record."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest

from tests.conftest import SMALL_SYNTHETIC, fit_args, run_cli
from tests.trainer.test_reliability import start_fit, wait_for

pytestmark = pytest.mark.slow

DERIVED = ("evaluations", "predictions", "recommendations", "rankings", "export", "report")


def record(run_dir: Path) -> dict[str, bytes]:
    """Every file of the training record (what fit wrote), by relative path."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and p.relative_to(run_dir).parts[0] not in DERIVED and p.name != ".lock"
    }


def command(name: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [name, "--config", "configs/default.yaml", "--data.path", str(data), *SMALL_SYNTHETIC, "--run_dir", str(run_dir),
            "--trainer.progress_bar", "false", *extra]  # fmt: skip


def test_evaluation_and_serving_commands_write_beside_the_training_record(synthetic_data, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(
        fit_args(synthetic_data, run_dir, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "5")
    )
    before = record(run_dir)
    assert {"metrics.json", "logs/metrics.csv", "config.yaml", "plan.txt"} <= set(before)
    for name in ("validate", "test", "test", "predict", "predict", "rank-eval", "recommend", "export"):
        run_cli(command(name, synthetic_data, run_dir))
    assert record(run_dir) == before  # not one byte of the record changed
    step = json.loads((run_dir / "metrics.json").read_text())["global_step"]
    evaluations = sorted(p.name for p in (run_dir / "evaluations").iterdir())
    checkpoint = f"step-{step:08d}"
    assert evaluations == [f"test-{checkpoint}", f"test-{checkpoint}-2", f"validate-{checkpoint}"]
    for folder in (run_dir / "evaluations").iterdir():
        result = json.loads((folder / "metrics.json").read_text())
        assert result["checkpoint"].endswith(checkpoint) and (folder / "config.yaml").exists()
    assert len(list((run_dir / "predictions").iterdir())) == 2
    assert len(list((run_dir / "recommendations").glob("*.parquet"))) == 1
    assert len(list((run_dir / "rankings").glob("*.json"))) == 1
    assert (run_dir / "export" / checkpoint / "serving.pt2").exists()
    run_cli(["report", str(run_dir)])  # the record is still whole
    # an output path that already holds something is refused before any work, naming the flag
    taken_parquet = next((run_dir / "predictions").rglob("*.parquet"))
    for name, taken in (
        ("predict", run_dir / "logs"),
        ("recommend", taken_parquet),
        ("rank-eval", run_dir / "metrics.json"),
    ):
        flag = "--output"
        refused = run_cli(command(name, synthetic_data, run_dir, flag, str(taken)), check=False)
        assert refused.returncode == 2 and f"{flag}: {taken} already exists" in refused.stderr, refused.stderr
    assert record(run_dir) == before


def test_a_resumed_fit_continues_the_training_record(synthetic_data, tmp_path):
    run_dir = tmp_path / "run"
    common = (
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "5",
        "--checkpoint.every_n_steps",
        "10",
    )
    run_cli(fit_args(synthetic_data, run_dir, *common, "--trainer.max_steps", "30"))
    first = json.loads((run_dir / "metrics.json").read_text())
    rows_before = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    run_cli(fit_args(synthetic_data, run_dir, *common))
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    assert rows[: len(rows_before)] == [
        {**row, **{k: row.get(k, "") for k in rows[0]}} for row in rows_before
    ]
    steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert min(steps) < 30 < max(steps)  # both sessions' curves are there
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["train_seconds"] > first["train_seconds"]  # summed over the sessions


def test_a_second_fit_on_a_live_run_folder_is_refused_and_a_dead_ones_lock_is_not_stale(
    synthetic_data, tmp_path
):
    run_dir = tmp_path / "run"
    # the first fit would run far longer than the test: it is still alive when the second starts
    args = fit_args(
        synthetic_data, run_dir, "--trainer.max_epochs", "1000", "--checkpoint.every_n_steps", "20"
    )
    first = start_fit(args)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists())
        second = run_cli(args, check=False)
        assert second.returncode == 2
        assert f"run_dir {run_dir}: another towerrec fit is using it (pid {first.pid} on" in second.stderr
        assert first.poll() is None  # the first one goes on
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    resumed = run_cli(
        [*args, "--trainer.max_steps", str(saved + 5)]
    )  # the killed process's lock died with it
    assert "resuming from" in resumed.stdout


def test_early_stopping_tests_the_best_epoch_and_evaluations_of_the_run_load_it(synthetic_data, tmp_path):
    run_dir = tmp_path / "run"
    # Validation AUC rises every epoch here, so as the monitored metric (lower is better) its best
    # epoch is the first: the weights tested must be epoch 1's, not the last ones. Fitted on 2 ranks
    # (each loads the best shards), evaluated on 1.
    run_cli(fit_args(synthetic_data, run_dir, "--trainer.max_epochs", "3", "--trainer.early_stopping_patience", "5",
                     "--trainer.early_stopping_metric", "val/ctr/auc", "--checkpoint.keep_last", "1"),
            nproc=2)  # fmt: skip
    out = json.loads((run_dir / "metrics.json").read_text())
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["epoch"] == 0 and best["step"] == out["global_step"] // 3
    assert out["tested_checkpoint"]["step"] == best["step"] and out["metrics"]["val"] == best["val"]
    assert (run_dir / "checkpoints" / f"step-{best['step']:08d}").exists()  # kept, although keep_last is 1

    def flat(metrics: dict) -> dict:
        return {f"{task}/{name}": value for task, values in metrics.items() for name, value in values.items()}

    def tested(name: str, checkpoint: Path) -> dict:
        run_cli(command("test", synthetic_data, tmp_path / name, "--checkpoint", str(checkpoint)))
        (path,) = (tmp_path / name / "evaluations").glob("test-*/metrics.json")
        return flat(json.loads(path.read_text())["metrics"]["test"])

    fitted = flat(out["metrics"]["test"])
    assert tested("run-folder", run_dir) == pytest.approx(fitted, rel=1e-6)  # the best epoch's weights
    last = tested("last", run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip())
    assert last["ctr/auc"] > fitted["ctr/auc"]
