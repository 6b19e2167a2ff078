"""The CUDA-only paths' logic, checked on CPU: tensors made where the parameters live (meta stands in
for a GPU: mixing it with CPU tensors fails as CUDA does), the planner's memory from the device's
properties, initial tables that do not depend on the device, pinned batches before a CUDA copy,
NCCL's error handling. What only a GPU can show is in tests/gpu/."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import towerrec.trainer.distributed.sharding as sharding
from towerrec.data.batch import Batch
from towerrec.trainer.config import ShardingConfig, load_config
from towerrec.trainer.datamodule import ParquetDataModule
from towerrec.trainer.distributed.faults import diagnose_collective_failure, nccl_error_handling
from towerrec.trainer.distributed.sharding import GB, initialize_tables, job_cluster, make_planner
from towerrec.trainer.distributed.strategy import parameter_digests
from towerrec.trainer.errors import ConfigError
from towerrec.trainer.pipeline import LightningSparseDistPipeline


def test_replica_digests_are_computed_on_the_parameters_device():
    parameters = [("w", torch.empty(3, 4, device="meta")), ("b", torch.empty(4, device="meta"))]
    names, digests = parameter_digests(parameters)
    assert names == ["w", "b"] and digests.shape == (2, 2) and digests.device.type == "meta"
    cpu = [("w", torch.arange(12.0).reshape(3, 4)), ("b", torch.ones(4))]
    _, values = parameter_digests(cpu)
    _, moved = parameter_digests(
        [("w", cpu[0][1].clone()), ("b", torch.tensor([1.0, 1.0, 1.0, 1.0 + 2**-20]))]
    )
    assert values[0].tolist() == moved[0].tolist() and values[1].tolist() != moved[1].tolist()


def tables_config(rows: int) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name="t_items", embedding_dim=8, num_embeddings=rows, feature_names=["items"])]


def fake_gpu(monkeypatch, total_gb: float) -> None:
    properties = SimpleNamespace(total_memory=int(total_gb * GB), major=9, minor=0, name="fake H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)


def test_the_planner_gets_the_gpus_memory_when_hbm_gb_is_null(monkeypatch):
    fake_gpu(monkeypatch, 141.0)
    cluster = job_cluster(ShardingConfig(), world_size=2, local_world_size=2, device=torch.device("cuda", 0))
    expected_gb = 141.0 - sharding.DEVICE_MEMORY_RESERVE_GB
    assert cluster.memory_gb_per_device == pytest.approx(expected_gb)
    planner = make_planner(ShardingConfig(), 512, tables_config(1000), cluster)
    assert [d.storage.hbm for d in planner._topology.devices] == [int(expected_gb * GB)] * 2
    pinned = job_cluster(ShardingConfig(hbm_gb=40), 2, 2, torch.device("cuda", 0))
    assert make_planner(ShardingConfig(hbm_gb=40), 512, tables_config(1000), pinned)._topology.devices[
        0
    ].storage.hbm == int(40 * GB)
    cpu = job_cluster(ShardingConfig(), 1, 1, torch.device("cpu"))
    assert cpu.memory_gb_per_device is None  # TorchRec's default host budget


class FakeShard:
    def __init__(self, row_offset: int, tensor: torch.Tensor):
        self.metadata = SimpleNamespace(shard_offsets=[row_offset, 0])
        self.tensor = tensor


class FakeSharded:
    """Stands in for a ShardedTensor: the row-wise shards of one table."""

    def __init__(self, shards: list[FakeShard]):
        self._shards = shards

    def local_shards(self) -> list[FakeShard]:
        return self._shards


def written_rows(monkeypatch, state: dict, tables, seed: int = 7) -> list[tuple[str, int, torch.Tensor]]:
    """What ``initialize_tables`` copies into each shard: (target device type, rows, values)."""
    writes = []

    def record(shard, row, values):
        writes.append((shard.device.type, row, values.clone()))

    monkeypatch.setattr(sharding, "_write_rows", record)
    initialize_tables(SimpleNamespace(state_dict=lambda: state), tables, seed)
    return writes


def test_initial_tables_do_not_depend_on_the_device_or_the_plan_and_are_drawn_in_chunks(monkeypatch):
    monkeypatch.setattr(sharding, "INIT_CHUNK_ROWS", 16)
    rows = 37
    tables = tables_config(rows)
    key = "model.sparse.embedding_bags.t_items.weight"
    cpu = written_rows(monkeypatch, {key: torch.empty(rows, 8)}, tables)
    meta = written_rows(monkeypatch, {key: torch.empty(rows, 8, device="meta")}, tables)  # as a GPU would
    assert {device for device, _, _ in cpu} == {"cpu"} and {device for device, _, _ in meta} == {"meta"}
    assert all(values.device.type == "cpu" for _, _, values in meta)  # drawn on the CPU, then copied
    full = torch.cat([values for _, _, values in cpu])
    assert torch.equal(full, torch.cat([values for _, _, values in meta]))
    assert full.shape == (rows, 8) and max(values.shape[0] for _, _, values in cpu) <= 16
    two_shards = FakeSharded([FakeShard(0, torch.empty(10, 8)), FakeShard(10, torch.empty(27, 8))])
    split = written_rows(monkeypatch, {key: two_shards}, tables)
    assert torch.equal(torch.cat([values for _, _, values in split]), full)  # whatever the plan


def test_16_mixed_is_refused_when_the_config_is_loaded():
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.yaml", ["trainer.precision=16-mixed"])
    message = str(err.value)
    assert message.startswith("trainer.precision: 16-mixed is not supported") and "bf16-mixed" in message


def tiny_batch(position: int) -> Batch:
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["items"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1])
    )
    ones = torch.ones(2, 1)
    return Batch(sparse=sparse, dense=ones, labels=ones, label_mask=ones, weights=torch.ones(2),
                 row_id=torch.arange(2), position=position)  # fmt: skip


def test_batches_are_pinned_and_copied_without_blocking_only_for_a_gpu(monkeypatch):
    pinned, copies = [], []
    monkeypatch.setattr(Batch, "pin_memory", lambda self: pinned.append(self.position) or self)
    monkeypatch.setattr(Batch, "to", lambda self, device, non_blocking=False: copies.append((device.type, non_blocking)) or self)  # fmt: skip
    datamodule = ParquetDataModule.__new__(ParquetDataModule)  # the copy hook reads no state
    datamodule.transfer_batch_to_device(tiny_batch(0), torch.device("cuda", 0), 0)
    on_cpu = tiny_batch(1)
    assert datamodule.transfer_batch_to_device(on_cpu, torch.device("cpu"), 0) is on_cpu  # nothing to copy
    assert pinned == [0] and copies == [("cuda", True)]

    pipeline = LightningSparseDistPipeline.__new__(LightningSparseDistPipeline)  # _next_batch's state only
    pipeline._dataloader_iter, pipeline._dataloader_exhausted = None, False
    pipeline._device = torch.device("cuda", 0)
    batches = iter([tiny_batch(2), tiny_batch(3)])
    assert pipeline._next_batch(batches).position == 2
    pipeline._device = torch.device("cpu")
    assert pipeline._next_batch(batches).position == 3
    assert pipeline._next_batch(batches) is None
    assert pinned == [0, 2]


def test_nccl_keeps_the_process_alive_on_a_lost_peer_so_the_job_can_name_it():
    environ: dict[str, str] = {}
    assert nccl_error_handling("gloo", environ) is None and environ == {}
    assert nccl_error_handling("nccl", environ) == "TORCH_NCCL_ASYNC_ERROR_HANDLING=2"
    assert environ == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"):  # the user's choice stays
        chosen = {name: "1"}
        assert nccl_error_handling("nccl", chosen) == f"{name}=1 (set by the user)" and chosen == {name: "1"}


class PeerStore:
    """The rendezvous store's record of rank 1: a process on this host with process id ``pid``."""

    def __init__(self, pid: int):
        self.entry = f"{socket.gethostname()}:{pid}".encode()

    def set_timeout(self, timeout) -> None:
        pass

    def get(self, key: str) -> bytes:
        return self.entry


NCCL_ABORTED = (
    "NCCL communicator was aborted on rank 0.  Original reason for failure was: [Rank 0] Watchdog caught "
    "collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE, NumelIn=7, NumelOut=7, "
    "Timeout(ms)=600000) ran for 600021 milliseconds before timing out."
)


def test_nccl_errors_after_the_watchdog_aborted_the_communicator_name_the_lost_rank():
    """The error PyTorch raises for a collective once the watchdog aborted NCCL (mode 2), with the
    peer's process gone, or still running (hung)."""
    gone = diagnose_collective_failure(RuntimeError(NCCL_ABORTED), PeerStore(2**22 + 1), 0, 2, 600)
    assert gone is not None and gone.exit_code == 4
    assert str(gone).startswith(f"rank 0: rank 1 (pid {2**22 + 1} on {socket.gethostname()}) is gone")
    hung = diagnose_collective_failure(RuntimeError(NCCL_ABORTED), PeerStore(os.getpid()), 0, 2, 600)
    assert "a peer rank is dead or hung: no answer within trainer.collective_timeout_s=600s" in str(hung)
    assert diagnose_collective_failure(RuntimeError("CUDA out of memory"), PeerStore(1), 0, 2, 600) is None


def test_loading_earlier_weights_empties_the_table_caches_before_reading_the_checkpoint(
    rank_pools, tiny_data, tmp_path
):
    """With UVM caching (CUDA) a cached row would shadow the loaded one: load_weights resets every
    fbgemm lookup's cache after its rows were flushed and before the checkpoint is read into the
    backing store (TorchRec's own load hook resets them again afterwards). On CPU the reset finds no
    cache; what only a GPU shows is in tests/gpu."""
    from tests.conftest import TINY_SYNTHETIC
    from tests.trainer import rank_jobs

    overrides = [
        f"data.path={tiny_data}",
        *TINY_SYNTHETIC,
        f"run_dir={tmp_path}",
        "data.validate_on_start=false",
    ]
    (result,) = rank_pools(1).run(rank_jobs.reload_first_checkpoint, overrides)
    assert result["moved_since"] and result["is_step_1"]
    assert result["events"].count("load tensors") == 1
    assert "reset cache" in result["events"][: result["events"].index("load tensors")]
