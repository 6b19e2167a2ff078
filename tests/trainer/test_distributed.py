"""Two processes under torchrun (gloo): the smoke test of what ``test_multirank.py`` proves in process."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import SMALL_SYNTHETIC, fit_args, run_cli
from tests.trainer.test_logs import assert_readable_log

pytestmark = pytest.mark.slow

COMMON = (
    "--trainer.max_epochs",
    "2",
    "--checkpoint.every_n_steps",
    "8",
    "--model.dropout",
    "0.1",
    "--trainer.log_every_n_steps",
    "5",
)


def metrics(run_dir, stage="test"):
    return json.loads((run_dir / "metrics.json").read_text())["metrics"][stage]


def evaluation(run_dir, stage="test"):
    """The metrics of the one evaluation a ``test``/``validate`` command wrote under ``run_dir``."""
    (path,) = (run_dir / "evaluations").glob(f"{stage}-*/metrics.json")
    return json.loads(path.read_text())["metrics"][stage]


def flat(per_task: dict) -> dict:
    return {f"{task}/{name}": value for task, values in per_task.items() for name, value in values.items()}


def test_torchrun_two_ranks_place_tables_apart_resume_and_reshard_to_one_process(synthetic_data, tmp_path):
    """The torchrun smoke test. The in-process harness (``test_multirank.py``) proves the invariants
    bit for bit: 2 ranks train the 1-rank model, exact resume, resume on another world size (2→1,
    1→2), metrics over ranks equal one process's; here the real launcher and the CLI do the same
    steps once: tables apart, a stop at step 30 and a resume, the 2-rank checkpoint tested in one
    process with the fit's test metrics, and the AUC over both ranks within its bound."""
    run = tmp_path / "two"
    run_cli(fit_args(synthetic_data, run, *COMMON, "--trainer.max_steps", "30"), nproc=2)
    plan = json.loads((run / "plan.json").read_text())
    ranks = {t["table"]: t["ranks"] for t in plan["tables"]}
    assert ranks["t_user_id"] != ranks["t_item_id"] and len(ranks["t_user_id"]) == 1
    resumed = run_cli(fit_args(synthetic_data, run, *COMMON), nproc=2)
    assert "resuming from" in resumed.stdout and "step-00000030" in resumed.stdout
    assert json.loads((run / "metrics.json").read_text())["global_step"] > 30
    assert_readable_log(resumed.stdout + resumed.stderr, world_size=2)

    evaluate = ["test", "--config", "configs/default.yaml", "--data.path", str(synthetic_data), *SMALL_SYNTHETIC,
                "--trainer.progress_bar", "false", "--model.dropout", "0.1"]  # fmt: skip
    run_cli([*evaluate, "--run_dir", str(tmp_path / "eval1"), "--checkpoint", str(run)])
    assert flat(evaluation(tmp_path / "eval1")) == pytest.approx(flat(metrics(run)), rel=1e-6)
    run_cli(["predict", "--config", "configs/default.yaml", "--data.path", str(synthetic_data), *SMALL_SYNTHETIC,
             "--model.dropout", "0.1", "--run_dir", str(run), "--output", str(tmp_path / "preds"),
             "--trainer.progress_bar", "false"])  # fmt: skip
    preds = pq.read_table(tmp_path / "preds")
    rows, scores = preds.column("row").to_numpy(), preds.column("ctr").to_numpy()
    labels = pq.read_table(synthetic_data / "test", columns=["click"]).column(0).to_numpy()
    assert sorted(rows) == list(range(len(labels)))
    ctr = metrics(run)["ctr"]
    assert 0 < ctr["auc_error_bound"] < 1e-3
    assert abs(ctr["auc"] - roc_auc_score(labels[rows], scores)) <= ctr["auc_error_bound"] + 1e-6
