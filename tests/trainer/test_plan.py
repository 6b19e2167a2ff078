"""Planning without a GPU: CUDA clusters, huge tables, UVM caching, refusal when nothing fits."""

from __future__ import annotations

import pytest

from towerrec.trainer.config import load_config
from towerrec.trainer.errors import PlanDoesNotFit
from towerrec.trainer.plan import plan_command

LARGE = "configs/large_tables.yaml"


def plan(capsys, *args, overrides=(), **kwargs):
    plan_command(load_config(LARGE, list(overrides)), *args, **kwargs)
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("t_") and len(parts) >= 6:
            rows[parts[0]] = {"sharding": parts[3], "kernel": parts[4], "ranks": parts[5]}
    return out, rows


def test_eight_h200_cluster_row_shards_huge_tables_and_keeps_small_ones_whole(capsys):
    out, rows = plan(capsys, 1, 8, 141.0, "cuda")
    assert "1 node(s) x 8 cuda device(s), 141 GB each; 26 tables, 59.99 B embedding parameters" in out
    for huge in ("t_user_id", "t_item_id"):
        assert rows[huge]["sharding"] in ("row_wise", "table_row_wise")
        assert rows[huge]["ranks"] == "0,1,2,3,4,5,6,7"
    small = [name for name in rows if name not in ("t_user_id", "t_item_id")]
    # one rank: table_wise, or a (table_)column_wise plan whose column shards all landed on it
    assert all(rows[name]["sharding"] in ("table_wise", "table_column_wise", "column_wise") for name in small)
    assert all("," not in rows[name]["ranks"] for name in small)  # a small table lives on one GPU
    assert all(row["kernel"] == "fused" for row in rows.values())
    placed = {rows[name]["ranks"] for name in small}
    assert len(placed) == 8  # small tables are spread over every GPU


def test_one_gpu_over_budget_uses_uvm_caching_when_host_memory_allows(capsys):
    out, rows = plan(capsys, 1, 1, 141.0, "cuda", ddr_gb=2000.0)
    assert rows["t_user_id"]["kernel"] == "fused_uvm_caching"
    assert "host memory per rank for UVM-cached tables" in out


def test_a_model_that_cannot_fit_is_refused_with_a_clear_message(capsys):
    with pytest.raises(PlanDoesNotFit, match=r"do not fit on 1 x cuda devices .* --hbm-gb"):
        plan(capsys, 1, 1, 141.0, "cuda", overrides=["sharding.compute_kernel=fused"])


def test_cpu_plan_for_the_default_config(capsys):
    plan_command(load_config("configs/default.yaml", ["data.path=/nonexistent", *[
        f"data.sparse.{i}.num_embeddings=1000" for i in range(7)]]), 1, 2, 4.0, "cpu")  # fmt: skip
    out = capsys.readouterr().out
    assert "2 cpu device(s)" in out and "t_user_id" in out
