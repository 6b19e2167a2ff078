"""TorchRec's TrainPipelineSparseDist inside Lightning (the default on CUDA) runs on CPU too: it must
train exactly like Lightning's own step (gradient clipping included). Its 2-rank equivalence and
exact resume are in test_multirank (in process, every balancer)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import fit_args, run_cli

pytestmark = pytest.mark.slow


def result(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_sparse_dist_pipeline_trains_exactly_like_the_lightning_step(synthetic_data, tmp_path):
    common = ("--trainer.max_epochs", "1", "--model.dropout", "0.1", "--trainer.gradient_clip_val", "1.0")
    run_cli(fit_args(synthetic_data, tmp_path / "plain", *common, "--trainer.train_pipeline", "lightning"))
    run_cli(fit_args(synthetic_data, tmp_path / "piped", *common, "--trainer.train_pipeline", "sparse_dist"))
    plain, piped = result(tmp_path / "plain"), result(tmp_path / "piped")
    assert piped["global_step"] == plain["global_step"]
    assert piped["metrics"] == plain["metrics"]
