"""The CUDA path: NCCL, GPU sharding types, UVM caching, TrainPipelineSparseDist, bf16.

Skipped without a GPU; `benchmarks/gpu_check.sh run` runs them on a GPU machine.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import fit_args, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    "extra",
    [
        ("--sharding.sharding_types", "[row_wise]"),
        ("--sharding.sharding_types", "[table_row_wise]"),
        ("--sharding.sharding_types", "[column_wise]"),
        ("--sharding.compute_kernel", "fused_uvm_caching", "--sharding.cache_load_factor", "0.1"),
        ("--sharding.embedding_precision", "fp16"),
    ],
    ids=["row_wise", "table_row_wise", "column_wise", "uvm_caching", "fp16_tables"],
)
def test_single_gpu_training_beats_the_trivial_predictor(synthetic_data, tmp_path, extra):
    run_dir = tmp_path / "run"
    run_cli(
        fit_args(
            synthetic_data,
            run_dir,
            "--trainer.accelerator",
            "cuda",
            "--trainer.precision",
            "bf16-mixed",
            *extra,
        )
    )
    out = json.loads((run_dir / "metrics.json").read_text())
    test, baseline = out["metrics"]["test"], out["baseline"]["test"]
    assert test["rating"]["rmse"] < baseline["rating"]["rmse"]
    assert test["ctr"]["auc"] > 0.6
    plan = json.loads((run_dir / "plan.json").read_text())
    kernels = {t["compute_kernel"] for t in plan["tables"]}
    if "fused_uvm_caching" in extra:
        assert kernels == {"fused_uvm_caching"}


def test_gpu_pipeline_matches_the_lightning_step(synthetic_data, tmp_path):
    common = ("--trainer.accelerator", "cuda", "--trainer.max_epochs", "1", "--trainer.deterministic", "true")
    run_cli(fit_args(synthetic_data, tmp_path / "a", *common, "--trainer.train_pipeline", "lightning"))
    run_cli(fit_args(synthetic_data, tmp_path / "b", *common, "--trainer.train_pipeline", "sparse_dist"))
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["metrics"]["test"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]["test"]
    assert b["rating"]["rmse"] == pytest.approx(a["rating"]["rmse"], rel=1e-3)
    assert b["ctr"]["auc"] == pytest.approx(a["ctr"]["auc"], rel=1e-3)
