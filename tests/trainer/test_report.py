"""``towerrec report``: PNG charts and report.md from a run folder's CSV log and metrics.json."""

from __future__ import annotations

import json

import pytest

from towerrec.trainer.cli import main
from towerrec.trainer.report import ReportError, make_report, read_metrics_csv

CSV = """epoch,step,train/loss,train/rating/loss,train/ctr/loss,val/rating/rmse,val/rating/count,val/ctr/auc,val/loss
0,49,0.9,1.1,0.7,,,,
0,99,0.8,1.0,0.6,,,,
0,99,,,,1.05,100,0.61,0.9
1,149,0.7,0.9,0.5,,,,
1,199,,,,0.98,100,0.66,0.8
"""

RESULT = {
    "metrics": {
        "test": {"rating": {"rmse": 0.97, "mae": 0.8, "count": 100}, "ctr": {"auc": 0.66, "logloss": 0.6}}
    },
    "baseline": {"test": {"rating": {"rmse": 1.15, "mae": 0.96}, "ctr": {"auc": 0.5, "logloss": 0.69}}},
    "train_seconds": 1.5,
}


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text(CSV)
    (tmp_path / "metrics.json").write_text(json.dumps(RESULT))
    return tmp_path


def test_reads_sparse_csv_rows(run_dir):
    series = read_metrics_csv(run_dir / "logs" / "metrics.csv")
    assert series["train/loss"] == [(49, 0, 0.9), (99, 0, 0.8), (149, 1, 0.7)]
    assert [p[0] for p in series["val/ctr/auc"]] == [99, 199]


def test_writes_pngs_and_markdown(run_dir):
    out = make_report(run_dir)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["test_metrics.png", "train_loss.png", "val_ctr.png", "val_rating.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    markdown = (out / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in names)
    assert "| rating | rmse | 0.9700 | 1.1500 |" in markdown


def test_cli_uses_the_runs_config(run_dir, capsys):
    (run_dir / "config.yaml").write_text(open("configs/default.yaml").read())
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report" / "report.md").exists()


def test_missing_log_names_the_file(tmp_path):
    with pytest.raises(ReportError, match="metrics.csv"):
        make_report(tmp_path)
