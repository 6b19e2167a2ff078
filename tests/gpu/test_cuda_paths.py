"""The CUDA paths that CPU tests can only check by their logic (tests/trainer/test_device_paths.py):
run here on a real GPU. Skipped without one; ``benchmarks/gpu_check.sh run`` runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO, TINY_SYNTHETIC

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPU = torch.device("cuda", 0)


def test_replica_digests_run_on_the_gpu():
    """Issue 28, item 1: the positions were made on the CPU and multiplied by GPU bits."""
    from towerrec.trainer.distributed.strategy import parameter_digests

    parameters = [("w", torch.randn(64, 32, device=GPU)), ("b", torch.randn(32, device=GPU))]
    names, digests = parameter_digests(parameters)
    cpu_names, cpu_digests = parameter_digests([(n, p.cpu()) for n, p in parameters])
    assert digests.device.type == "cuda" and torch.equal(digests.cpu(), cpu_digests) and names == cpu_names


def test_the_planner_budget_is_this_gpus_memory():
    """Item 2: with hbm_gb null the planner had TorchRec's 32 GB default, not the GPU's memory."""
    from towerrec.trainer.config import ShardingConfig
    from towerrec.trainer.distributed.sharding import DEVICE_MEMORY_RESERVE_GB, GB, job_cluster, make_planner

    total_gb = torch.cuda.get_device_properties(GPU).total_memory / GB
    cluster = job_cluster(ShardingConfig(), world_size=1, local_world_size=1, device=GPU)
    assert cluster.memory_gb_per_device == pytest.approx(total_gb - DEVICE_MEMORY_RESERVE_GB)
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])]
    planner = make_planner(ShardingConfig(), 512, tables, cluster)
    assert planner._topology.devices[0].storage.hbm == int(cluster.memory_gb_per_device * GB)


def test_a_batch_for_the_gpu_is_pinned_and_copied_without_blocking():
    """Item 5: the pipeline's non-blocking copies came from pageable memory."""
    from tests.trainer.test_device_paths import tiny_batch
    from towerrec.trainer.datamodule import ParquetDataModule

    pinned = tiny_batch(0).pinned_for(GPU)
    assert pinned.dense.is_pinned() and pinned.sparse.values().is_pinned()
    moved = ParquetDataModule.__new__(ParquetDataModule).transfer_batch_to_device(tiny_batch(0), GPU, 0)
    torch.cuda.synchronize()
    assert moved.dense.device.type == "cuda" and moved.sparse.values().device.type == "cuda"
    assert torch.equal(moved.dense.cpu(), tiny_batch(0).dense)


def test_tables_start_from_the_values_a_cpu_run_starts_from():
    """Item 8: GPU generators drew other values than the CPU's for the same seed."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from towerrec.trainer.distributed import sharding

    table = EmbeddingBagConfig(name="t_items", embedding_dim=8, num_embeddings=1000, feature_names=["items"])
    key = "model.sparse.embedding_bags.t_items.weight"
    on_gpu, on_cpu = torch.empty(1000, 8, device=GPU), torch.empty(1000, 8)
    for target in (on_gpu, on_cpu):
        sharding.initialize_tables(SimpleNamespace(state_dict=lambda t=target: {key: t}), [table], seed=3)
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_loading_earlier_weights_with_uvm_caching_restores_them(tiny_data, tmp_path):
    """Item 9: with UVM-cached tables, the cache held the later rows when the best epoch's weights
    were loaded; a later flush (state_dict) would write them over the loaded ones."""
    overrides = [
        f"data.path={tiny_data}", *TINY_SYNTHETIC, f"run_dir={tmp_path}", "data.validate_on_start=false",
        "trainer.accelerator=cuda", "sharding.compute_kernel=fused_uvm_caching", "sharding.cache_load_factor=0.1",
    ]  # fmt: skip
    code = (
        "import json, sys; from tests.trainer.rank_jobs import reload_first_checkpoint; "
        "r = reload_first_checkpoint(json.loads(sys.argv[1])); print(json.dumps(r))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(overrides)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["moved_since"] and result["is_step_1"]
