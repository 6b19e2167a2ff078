"""A Lightning strategy for TorchRec: dense parameters data-parallel, embedding tables
model-parallel, sharded checkpoints through torch.distributed.checkpoint.

Lightning's ``DDPStrategy`` cannot drive a ``DistributedModelParallel`` (DMP): wrapping DMP in DDP
fails on differently sized local shards, broadcasting module states aborts for the same reason,
and its checkpoints hold only rank 0's shards. This strategy keeps DDPStrategy's process-group
setup and launchers (Lightning's own launcher, torchrun, SLURM) and replaces the rest:

- ``shard(model, tables)``: the one place that plans and wraps the model in DMP; the dense part is
  data-parallel through ``sharding.DenseReplicas`` (broadcast once when DMP is built, gradients
  all-reduced in buckets while backward runs and waited by ``average_dense_gradients``), so
  nothing is wrapped in DDP, by Lightning or by DMP, and no module state is broadcast;
- the collectives of a training step: ``all_reduce_sum`` (the step's agreement and global loss
  sums), ``mean_over_ranks``, ``average_dense_gradients``, ``dense_digests`` (replica guard);
- NCCL's error handling set before the process group starts (``faults.nccl_error_handling``);
- ``save_checkpoint``/``load_checkpoint``: tensors through DCP (every rank writes its shards and
  loads any resharding), metadata as JSON, atomically (see ``towerrec.trainer.distributed.checkpoint``).
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.optimizers import in_backward_optimizer_filter

from towerrec.trainer.config import CheckpointConfig, OptimizerConfig, ShardingConfig
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.distributed.faults import nccl_error_handling, register_rank
from towerrec.trainer.distributed.sharding import (
    RowReset,
    describe_plan,
    initialize_tables,
    job_cluster,
    shard_model,
)


class TorchRecStrategy(DDPStrategy):
    strategy_name = "torchrec"

    def __init__(
        self,
        *,
        sharding: ShardingConfig,
        embedding_optimizer: OptimizerConfig,
        batch_size: int,
        checkpoint: CheckpointConfig,
        seed: int,
        collective_timeout_s: int = 600,
        **kwargs: Any,
    ):
        super().__init__(timeout=timedelta(seconds=collective_timeout_s), **kwargs)
        self.sharding = sharding
        self.embedding_optimizer = embedding_optimizer
        self.batch_size = batch_size
        self.checkpoint_config = checkpoint
        self.seed = seed
        self.plan_text: str | None = None
        self.plan_summary: dict | None = None
        self._checkpoint_to_load: Path | None = None
        self._tables: list = []
        self._row_reset: RowReset | None = None  # views of the live shards, collected on first use

    # ------------------------------------------------------------------------------ sharding
    @property
    def process_group(self):
        return dist.group.WORLD

    def shard(self, model: torch.nn.Module, tables) -> DistributedModelParallel:
        """Plans the tables over all ranks (collectively) and wraps the model in DMP."""
        cluster = job_cluster(self.sharding, self.world_size, self.num_processes, self.root_device)
        dmp, plan, self._replicas = shard_model(
            model,
            tables=tables,
            sharding=self.sharding,
            embedding_optimizer=self.embedding_optimizer,
            batch_size=self.batch_size,
            cluster=cluster,
            process_group=self.process_group,
            device=self.root_device,
            fused_only=frozenset(self._dynamic_tables()),
            collective_timeout=self._timeout,
        )
        self._tables = tables
        initialize_tables(dmp, tables, self.seed, hashed=frozenset(self._dynamic_tables()))
        self.plan_text, self.plan_summary = describe_plan(
            plan, tables, self.world_size, self.sharding, self.embedding_optimizer.type
        )
        return dmp

    def _dynamic_tables(self) -> list[str]:
        ids = getattr(self.lightning_module, "dynamic_ids", None)
        return ids.table_names if ids is not None else []

    def reset_table_rows(self, resets: dict[str, torch.Tensor]) -> None:
        """Re-initialises rows of dynamic-id tables given to new ids (weights and fused optimizer
        state) on the ranks holding them (``sharding.RowReset``)."""
        if self._row_reset is None:
            self._row_reset = RowReset(self.dmp, self._tables, self.seed, frozenset(self._dynamic_tables()))
        self._row_reset(resets)

    # ------------------------------------------------------------------------------ data parallelism
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (a new tensor; the input is left as it is)."""
        if self.world_size == 1:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.process_group)
        return total

    def all_gather_autograd(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all ranks) concatenated along dim 0 in rank order,
        differentiable: the gradient of each rank's part sums what every rank's loss sends it
        (retrieval's candidates from the whole global batch)."""
        if self.world_size == 1:
            return tensor
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous(), group=self.process_group))

    def all_gather_varying(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (..., N_r), whose last dim differs between ranks, concatenated
        along it in rank order (the step's dynamic ids: their sizes, then one padded all-gather)."""
        if self.world_size == 1:
            return tensor
        size = torch.tensor([tensor.shape[-1]], device=tensor.device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.process_group)
        sizes = [int(s) for s in sizes]
        padded = torch.nn.functional.pad(tensor, (0, max(sizes) - tensor.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous(), group=self.process_group)
        return torch.cat([part[..., :n] for part, n in zip(parts, sizes)], dim=-1)

    def mean_over_ranks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The element-wise means over ranks of ``tensors`` (new tensors), in one all-reduce."""
        tensors = list(tensors)
        if self.world_size == 1 or not tensors:
            return tensors
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        flat.div_(self.world_size)
        return [
            part.view_as(t).to(t.dtype) for t, part in zip(tensors, flat.split([t.numel() for t in tensors]))
        ]

    def average_dense_gradients(self, extra: list[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Replaces each dense parameter's gradient by its mean over ranks (waiting for the bucketed
        all-reduces that backward started, see ``towerrec.trainer.distributed.sharding.DenseGradientReducer``),
        and returns the means of ``extra`` tensors (e.g. per-task gradients) in one more all-reduce.
        Every rank must call it after each backward, before the optimizer step."""
        extra = list(extra)
        if self.world_size == 1:
            return extra
        if self._replicas.reducer is not None:
            self._replicas.reducer.finish()
        return self.mean_over_ranks(extra)

    def dense_digests(self) -> tuple[list[str], torch.Tensor]:
        """(names, (P, 2) int64) of the dense replicas: see ``parameter_digests``."""
        return parameter_digests(self._replicas.parameters)

    @property
    def dmp(self) -> DistributedModelParallel:
        return self.lightning_module.model

    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def model_to_device(self) -> None:
        """DMP placed every shard and the dense part already."""

    def configure_ddp(self) -> None:
        """No DDP wrapper: the dense part is data-parallel through ``sharding.DenseReplicas``."""

    # ------------------------------------------------------------------------------ checkpoints
    def dense_parameter_names(self) -> dict[torch.nn.Parameter, str]:
        return {p: n for n, p in in_backward_optimizer_filter(self.dmp.named_parameters())}

    def replicated_state(self) -> dict[str, Any]:
        """Module state outside the DMP, the same on every rank: the dynamic id maps
        (``towerrec.models.dynamic_ids``) under the key ``dynamic_ids``."""
        ids = getattr(self.lightning_module, "dynamic_ids", None)
        return {"dynamic_ids": ids.state_dict()} if ids is not None else {}

    def checkpoint_tensors(self, with_optimizers: bool) -> dict[str, Any]:
        """The tensor state: model (sharded tables + dense), the replicated state (dynamic id maps),
        fused embedding optimizer, dense optimizer."""
        tensors: dict[str, Any] = {"model": self.dmp.state_dict(), **self.replicated_state()}
        if with_optimizers:
            fused = self.dmp.fused_optimizer
            fused.init_state()
            tensors["embedding_optimizer"] = fused.state_dict()["state"]
            names = self.dense_parameter_names()
            for i, optimizer in enumerate(self.optimizers):
                state = {}
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        for key, value in optimizer.state.get(param, {}).items():
                            state[f"{names[param]}/{key}"] = (
                                value if isinstance(value, torch.Tensor) else torch.tensor(value)
                            )
                tensors[f"dense_optimizer_{i}"] = state
        return tensors

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # tensors go through DCP in save_checkpoint

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return {}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        """``filepath`` is ``<checkpoints root>/step-N``; every rank takes part."""
        root = Path(filepath).parent
        fitting = bool(self.optimizers)
        tensors = self.checkpoint_tensors(with_optimizers=fitting)
        state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        state["dense_param_groups"] = [
            [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            for opt in self.optimizers
        ]
        state["world_size"] = self.world_size
        ckpt.save(
            root,
            int(checkpoint["global_step"]),
            tensors,
            state,
            is_rank_zero=self.is_global_zero,
            barrier=self.barrier,
            keep_last=self.checkpoint_config.keep_last,
            process_group=self.process_group,
        )

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        # files checked against their checksums; a resumed fit falls back to an older intact one
        resuming = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        path = ckpt.intact(ckpt.resolve(checkpoint_path), self.process_group, resuming, self.is_global_zero)
        self._checkpoint_to_load = path
        state = ckpt.load_state(path)
        state["state_dict"] = {}
        state["optimizer_states"] = []
        return state

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        assert self._checkpoint_to_load is not None
        self.load_weights(self._checkpoint_to_load)

    def load_weights(self, path: Path) -> None:
        """The model's tensors (not the optimizers') from checkpoint ``path``; every rank takes part.

        ``state_dict()`` first writes UVM-cached rows back to the tables' host-memory store (fbgemm's
        flush), then every cache is emptied, and only then are the stored weights loaded into that
        store: a row cached from the live weights can neither be read instead of the loaded one nor
        flushed over it later (a GPU-only path: CPU kernels hold no cache). TorchRec's sharded
        collections also empty their caches in their load_state_dict hook; this does not rely on it."""
        self._row_reset = None  # collected again from the loaded shards
        replicated = self.replicated_state()
        tensors = {"model": self.dmp.state_dict(), **replicated}
        invalidate_embedding_caches(self.dmp)
        ckpt.load_tensors(path, tensors, self.process_group)
        # DMP.state_dict() returns views of the live shards, but dense tensors may be copies:
        self.dmp.load_state_dict(tensors["model"])
        if "dynamic_ids" in replicated:
            self.lightning_module.dynamic_ids.load_state_dict(tensors["dynamic_ids"])

    def load_tables(self, path: Path, tables: dict[str, str]) -> None:
        """Tables of another model's checkpoint ``path`` into this model's tables (``tables``: our
        state-dict key → the checkpoint's key, both a table's weight of the same shape); loaded in
        place, resharded by DCP; every rank takes part. UVM caches are emptied first, as in
        ``load_weights``."""
        ours = self.dmp.state_dict()
        invalidate_embedding_caches(self.dmp)
        tensors = {"model": {theirs: ours[key] for key, theirs in tables.items()}}
        ckpt.load_tensors(path, tensors, self.process_group)
        # the whole state dict back: TorchRec's sharded collections look up each of their tables
        # in it (a partial one raised KeyError for a table not named)
        ours.update({key: tensors["model"][theirs] for key, theirs in tables.items()})
        self.dmp.load_state_dict(ours)

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        assert self._checkpoint_to_load is not None
        for optimizer in self.optimizers:
            _materialize_state(optimizer)  # DCP loads into existing tensors
        tensors = self.checkpoint_tensors(with_optimizers=True)
        for loaded_with_weights in ("model", *self.replicated_state()):
            del tensors[loaded_with_weights]
        ckpt.load_tensors(self._checkpoint_to_load, tensors, self.process_group)
        fused_state = self.dmp.fused_optimizer.state_dict()
        fused_state["state"] = tensors["embedding_optimizer"]
        self.dmp.fused_optimizer.load_state_dict(fused_state)
        self._row_reset = None
        names = self.dense_parameter_names()
        saved_groups = checkpoint.get("dense_param_groups", [])
        for i, optimizer in enumerate(self.optimizers):
            loaded = tensors[f"dense_optimizer_{i}"]
            for group in optimizer.param_groups:
                for param in group["params"]:
                    for key in list(optimizer.state[param]):
                        optimizer.state[param][key] = loaded[f"{names[param]}/{key}"]
            for group, saved in zip(optimizer.param_groups, saved_groups[i] if i < len(saved_groups) else []):
                group.update(saved)

    def warm_start(self, path: Path) -> None:
        """Every tensor of checkpoint ``path`` (model, embedding and dense optimizer state) and none
        of its progress or learning rates: ``trainer.warm_start`` (``towerrec.trainer.warm_start``)."""
        self._checkpoint_to_load = path
        self.load_weights(path)
        self.load_optimizer_state_dict({})
        self._checkpoint_to_load = None

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)

    def setup_environment(self) -> None:
        nccl_error_handling(self._get_process_group_backend(), os.environ)  # before NCCL starts
        super().setup_environment()
        if self.world_size > 1:  # host and pid of every rank, to name a lost one (trainer.distributed.faults)
            register_rank(dist.distributed_c10d._get_default_store(), self.global_rank)

    def teardown(self) -> None:
        interrupted = self.lightning_module is not None and (
            self.lightning_module.trainer.state.status == TrainerStatus.INTERRUPTED
        )
        if not interrupted and dist.is_available() and dist.is_initialized():
            dist.barrier()  # without it gloo can abort at interpreter exit (destroyed async work)
        super().teardown()


def invalidate_embedding_caches(dmp: torch.nn.Module) -> int:
    """Drops every row cached by a UVM-caching table without writing it back (fbgemm's
    ``reset_cache_states``; nothing to drop for an uncached table); returns the number of fbgemm
    table-batched lookups visited."""
    lookups = [  # a sharded collection holds its lookups in a plain list, outside modules()
        kernel
        for module in dmp.modules()
        for lookup in getattr(module, "_lookups", [])
        for kernel in lookup.modules()
        if isinstance(kernel, SplitTableBatchedEmbeddingBagsCodegen)
    ]
    for lookup in lookups:
        lookup.reset_cache_states()
    return len(lookups)


def parameter_digests(parameters: list[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """(names, (P, 2) int64 on the parameters' device): two checksums of each parameter's bits, equal
    on every rank exactly when the replicas are bitwise identical (up to a vanishing chance of
    collision). Everything is computed where the parameters live: no copy to the host."""
    names, rows = [], []
    device = parameters[0][1].device if parameters else torch.device("cpu")
    for name, param in parameters:
        bits = param.detach().reshape(-1).contiguous()
        bits = bits.view(torch.int32) if bits.element_size() == 4 else bits.view(torch.int16)
        bits = bits.to(torch.int64)
        positions = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
        rows.append(torch.stack([bits.sum(), (bits * positions).remainder(2_147_483_629).sum()]))
        names.append(name)
    return names, torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64, device=device)


def _materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates an optimizer's lazily built per-parameter state with one zero-learning-rate step."""
    missing = [p for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]
    if not missing:
        return
    saved = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
    for param in missing:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for param in missing:
        param.grad = None
    for group, values in zip(optimizer.param_groups, saved):
        group.update(values)
