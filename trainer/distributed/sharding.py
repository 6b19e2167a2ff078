"""TorchRec planning, DistributedModelParallel wrapping, dense data parallelism, table init.

Only the strategy (``towerrec.trainer.distributed.strategy``) and ``towerrec plan`` call these: models never
pick a sharding. ``towerrec plan`` uses the same planner on a hypothetical cluster without any GPU.
Each function takes the config sections it reads (``sharding``, an optimizer), not the whole config.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import Awaitable, ShardedModule, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from towerrec.models.tables import dense_named_parameters, table_of_key, table_parameters
from towerrec.trainer.config import (
    DEFAULT_CPU_SHARDING_TYPES,
    SHARDING_TYPES,
    OptimizerConfig,
    ShardingConfig,
)
from towerrec.trainer.errors import ConfigError, PlanDoesNotFit

GB = 1024**3
GATED_COLLECTIONS = (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}


def _fused_optimizer(opt: OptimizerConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    if opt.type == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": opt.lr, "eps": opt.eps}
    if opt.type == "adagrad":
        return torch.optim.Adagrad, {"lr": opt.lr, "eps": opt.eps}
    if opt.type == "adam":
        return torch.optim.Adam, {"lr": opt.lr, "eps": opt.eps, "weight_decay": opt.weight_decay}
    return torch.optim.SGD, {"lr": opt.lr}


def apply_embedding_optimizer(model: nn.Module, opt: OptimizerConfig) -> None:
    """Marks every embedding table parameter for an optimizer fused into the backward pass."""
    optimizer_class, kwargs = _fused_optimizer(opt)
    apply_optimizer_in_backward(optimizer_class, table_parameters(model), kwargs)


def planner_constraints(
    sharding: ShardingConfig,
    tables: list[BaseEmbeddingConfig],
    device_type: str,
    fused_only: frozenset[str] = frozenset(),
) -> dict[str, ParameterConstraints]:
    """Sharding types and kernels the planner may use per table; ``fused_only`` tables (dynamic
    ids: rows re-initialised in place, which a UVM cache would not see) never get a cache."""
    default_types = sharding.sharding_types
    if default_types is None:  # data_parallel only on request: its tables leave the fused optimizer
        default_types = [t for t in SHARDING_TYPES if t != "data_parallel"]
        if device_type == "cpu":
            default_types = list(DEFAULT_CPU_SHARDING_TYPES)
    # Fused kernels keep every table on the fused optimizer path. Without this constraint the
    # planner gives small data-parallel tables the "dense" kernel, whose weights then fall to the
    # dense optimizer (and fbgemm warns its CPU autograd for that kernel is not registered).
    if sharding.compute_kernel is not None:
        kernels = [sharding.compute_kernel]
    else:
        kernels = ["fused", "fused_uvm_caching"] if device_type == "cuda" else ["fused"]
    constraints = {}
    table_names = {t.name for t in tables}
    for name in sharding.table_constraints:
        if name not in table_names:
            raise ConfigError(
                f"sharding.table_constraints.{name}: no such table (tables: {', '.join(sorted(table_names))})"
            )
    for table in tables:
        types = sharding.table_constraints.get(table.name, default_types)
        # data_parallel tables only have the dense kernel: leave the kernel to the planner then.
        allows_data_parallel = types is None or "data_parallel" in types
        table_kernels = ["fused"] if table.name in fused_only and sharding.compute_kernel is None else kernels
        constraints[table.name] = ParameterConstraints(
            sharding_types=list(types) if types else None,
            compute_kernels=None
            if allows_data_parallel and sharding.compute_kernel is None
            else table_kernels,
        )
    return constraints


DEVICE_MEMORY_RESERVE_GB = 2.0
"""GPU memory kept out of the planner's budget when ``sharding.hbm_gb`` is null: the CUDA context
and NCCL's and cuBLAS's buffers, which PyTorch's allocator does not count. The planner itself keeps
15% of the budget (``HeuristicalStorageReservation``) for activations and fragmentation."""


def device_memory_gb(device: torch.device) -> float | None:
    """The planner's memory budget for ``device`` when ``sharding.hbm_gb`` is null: a GPU's total
    memory less ``DEVICE_MEMORY_RESERVE_GB``; None for a CPU (TorchRec's default host budget)."""
    if device.type != "cuda":
        return None
    total_gb = torch.cuda.get_device_properties(device).total_memory / GB
    return max(total_gb - DEVICE_MEMORY_RESERVE_GB, total_gb / 2)


@dataclass
class ClusterSpec:
    """A (possibly hypothetical) cluster to plan for."""

    world_size: int
    device_type: str
    local_world_size: int
    memory_gb_per_device: float | None = None
    ddr_gb_per_rank: float | None = None


def job_cluster(
    sharding: ShardingConfig, world_size: int, local_world_size: int, device: torch.device
) -> ClusterSpec:
    """The cluster a running job plans for: its ranks, each with ``sharding.hbm_gb`` or, when that
    is null, the memory of this rank's device (``device_memory_gb``)."""
    return ClusterSpec(
        world_size=world_size,
        device_type=device.type,
        local_world_size=local_world_size,
        memory_gb_per_device=sharding.hbm_gb or device_memory_gb(device),
    )


def make_planner(
    sharding: ShardingConfig,
    batch_size: int,
    tables: list[BaseEmbeddingConfig],
    cluster: ClusterSpec,
    dense_bytes: int | None = None,
    fused_only: frozenset[str] = frozenset(),
) -> EmbeddingShardingPlanner:
    """TorchRec's planner for ``cluster``. ``dense_bytes``: memory the dense part needs per rank
    (parameters, gradients, optimizer state); reserved before tables are placed."""
    memory = cluster.memory_gb_per_device or sharding.hbm_gb
    hbm_cap = ddr_cap = None
    if cluster.device_type == "cuda":
        hbm_cap = int(memory * GB) if memory else None
        ddr_gb = cluster.ddr_gb_per_rank or sharding.ddr_gb
        ddr_cap = int(ddr_gb * GB) if ddr_gb else None
    else:
        ddr_cap = int(memory * GB) if memory else None
    topology = TopologyFactory.create_topology(
        TrainerConfig(
            world_size=cluster.world_size,
            local_world_size=cluster.local_world_size,
            hbm_cap_bytes=hbm_cap,
            ddr_cap_bytes=ddr_cap,
        ),
        kernel_config=KernelConfig(compute_device=cluster.device_type),
    )
    with warnings.catch_warnings():  # warns on construction, whatever the arguments
        warnings.filterwarnings("ignore", message="HeuristicalStorageReservation", category=FutureWarning)
        reservation = HeuristicalStorageReservation(percentage=0.15, dense_tensor_estimate=dense_bytes)
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=planner_constraints(sharding, tables, cluster.device_type, fused_only),
        storage_reservation=reservation,
    )


def dense_memory_bytes(model: nn.Module) -> int:
    """Parameters, gradients and two Adam moments of the model's dense (non-embedding) part, fp32."""
    dense = sum(p.numel() for _, p in dense_named_parameters(model))
    return 4 * 4 * dense


def sharders(sharding: ShardingConfig) -> list:
    fused_params = {}
    if sharding.compute_kernel == "fused_uvm_caching":
        fused_params["cache_load_factor"] = sharding.cache_load_factor
    return [
        EmbeddingBagCollectionSharder(fused_params=fused_params or None),
        EmbeddingCollectionSharder(fused_params=fused_params or None),
    ]


def plan_for_cluster(
    model: nn.Module,
    *,
    tables: list[BaseEmbeddingConfig],
    sharding: ShardingConfig,
    batch_size: int,
    cluster: ClusterSpec,
    process_group=None,
    fused_only: frozenset[str] = frozenset(),
) -> ShardingPlan:
    """Runs TorchRec's planner; with a process group all ranks agree on one plan (collective)."""
    planner = make_planner(sharding, batch_size, tables, cluster, dense_memory_bytes(model), fused_only)
    try:
        if process_group is not None:
            return planner.collective_plan(model, sharders(sharding), process_group)
        return planner.plan(model, sharders(sharding))
    except PlannerError as err:
        total_gb = sum(t.num_embeddings * t.embedding_dim for t in tables) * 4 / GB
        raise PlanDoesNotFit(
            f"the embedding tables ({total_gb:.1f} GB of fp32 weights before optimizer state) do not fit on "
            f"{cluster.world_size} x {cluster.device_type} devices with the given memory budget "
            f"(sharding.hbm_gb / --hbm-gb; host memory for UVM caching: sharding.ddr_gb / --ddr-gb): add "
            f"devices, raise the budget, lower embedding dims or rows, or allow fused_uvm_caching on CUDA. "
            f"Planner said: {str(err).splitlines()[0]}"
        ) from err


class DenseReplicas(DataParallelWrapper):
    """DMP's data parallelism for the unsharded (dense) part, without DDP.

    TorchRec's default wraps the dense part in DDP with ``static_graph=True``, whose reducer goes
    wrong when per-task gradients are taken with ``torch.autograd.grad`` before ``backward()``
    (PCGrad, GradNorm): it stops averaging some or all dense gradients and the replicas drift apart.
    Here the dense parameters are broadcast from rank 0 once, and their gradients are averaged by a
    ``DenseGradientReducer`` (bucketed all-reduces launched while backward runs, waited by
    ``TorchRecStrategy.average_dense_gradients`` before the optimizer step), whatever the loss
    balancing; a single process does no communication at all. ``parameters`` lists (name,
    parameter) of the dense part.
    """

    def __init__(self, collective_timeout: timedelta | None = None) -> None:
        self.parameters: list[tuple[str, nn.Parameter]] = []
        self.reducer: DenseGradientReducer | None = None
        self.collective_timeout = collective_timeout

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        module = dmp._dmp_wrapped_module.to(device)
        sharded = set(DistributedModelParallel._sharded_parameter_names(module))
        self.parameters = [(n, p) for n, p in module.named_parameters() if n not in sharded]
        if env.world_size > 1 and self.parameters:
            with torch.no_grad():
                tensors = [p.data for _, p in self.parameters]
                flat = torch.cat([t.reshape(-1) for t in tensors])
                torch.distributed.broadcast(flat, src=0, group=env.process_group)
                for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                    tensor.copy_(part.view_as(tensor))
            self.reducer = self.gradient_reducer(
                [p for _, p in self.parameters if p.requires_grad], env.world_size
            )

    def gradient_reducer(self, parameters: list[nn.Parameter], world_size: int) -> DenseGradientReducer:
        """The reducer of ``parameters``' gradients, in a process group of its own (every rank calls
        this): its buckets start whenever backward makes them ready, which may fall before or after
        TorchRec's collectives in backward (or a loss's) depending on a rank's unused parameters; in
        one group that order would have to be the same on every rank."""
        group = torch.distributed.new_group(timeout=self.collective_timeout)
        return DenseGradientReducer(parameters, group, world_size)


DENSE_BUCKET_BYTES = 4 * 2**20
"""Gradient bytes per all-reduce of ``DenseGradientReducer``: small enough that the first buckets
go out while backward still runs, large enough that a tower needs only a few collectives."""


class DenseGradientReducer:
    """Averages the dense gradients over ranks while backward runs.

    The parameters are cut into buckets of about ``DENSE_BUCKET_BYTES``, last parameters first
    (backward produces their gradients first). A hook on each parameter's gradient accumulation
    marks it ready; a bucket's asynchronous all-reduce starts once all its parameters are ready and
    every earlier bucket has started, so every rank issues the same collectives in the same order.
    ``finish()`` (after backward) starts the buckets backward left incomplete, waits for all of
    them and writes the means into ``.grad``.

    The all-reduces run in a process group of their own (``DenseReplicas.wrap``). Every rank
    all-reduces every parameter every step, with zeros where it has no gradient (a
    parameter its batch did not use), plus one count per parameter of the ranks that had one: a
    parameter gets the mean when any rank had a gradient, and keeps ``None`` when none had, as a
    single process would (only a rank that lacked a gradient reads the counts back to the host).
    """

    def __init__(self, parameters: list[nn.Parameter], process_group, world_size: int):
        self.process_group = process_group
        self.world_size = world_size
        self.buckets: list[list[nn.Parameter]] = []
        size = DENSE_BUCKET_BYTES
        for param in reversed(parameters):
            fits = size + param.numel() * param.element_size() <= DENSE_BUCKET_BYTES
            if self.buckets and fits and self.buckets[-1][0].dtype == param.dtype:
                self.buckets[-1].append(param)
                size += param.numel() * param.element_size()
            else:
                self.buckets.append([param])
                size = param.numel() * param.element_size()
        self.bucket_of = {param: i for i, bucket in enumerate(self.buckets) for param in bucket}
        self._ready = [0] * len(self.buckets)
        self._launched: list[tuple[torch.distributed.Work, torch.Tensor, list[bool]]] = []
        self._seen: set[nn.Parameter] = set()
        for param in parameters:
            param.register_post_accumulate_grad_hook(self._on_gradient)

    def _on_gradient(self, param: nn.Parameter) -> None:
        assert param not in self._seen, "a dense gradient was accumulated twice before finish()"
        self._seen.add(param)
        index = self.bucket_of[param]
        self._ready[index] += 1
        while len(self._launched) < len(self.buckets):
            next_bucket = len(self._launched)
            if self._ready[next_bucket] < len(self.buckets[next_bucket]):
                break
            self._launch(next_bucket)

    def _launch(self, index: int) -> None:
        params = self.buckets[index]
        missing = [p.grad is None for p in params]
        parts = [torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1) for p in params]
        counts = torch.tensor([0.0 if m else 1.0 for m in missing], dtype=params[0].dtype)
        flat = torch.cat([*parts, counts.to(params[0].device, non_blocking=True)])
        work = torch.distributed.all_reduce(
            flat, op=torch.distributed.ReduceOp.SUM, group=self.process_group, async_op=True
        )
        self._launched.append((work, flat, missing))

    def finish(self) -> None:
        """Starts the buckets still waiting, waits for every all-reduce and writes the means."""
        for index in range(len(self._launched), len(self.buckets)):
            self._launch(index)
        for (work, flat, missing), params in zip(self._launched, self.buckets):
            work.wait()
            sizes = [p.numel() for p in params]
            means = flat[: sum(sizes)].div_(self.world_size).split(sizes)
            counts = flat[sum(sizes) :].tolist() if any(missing) else None  # only where this rank lacked one
            for i, (param, mean) in enumerate(zip(params, means)):
                if param.grad is not None:
                    param.grad.copy_(mean.view_as(param))
                elif counts[i] > 0:
                    param.grad = mean.view_as(param).clone()
        self._ready = [0] * len(self.buckets)
        self._launched = []
        self._seen = set()


class _GateGradient(torch.autograd.Function):
    """Identity forward; backward passes the gradient where ``gate`` (a device bool) is true, else
    zeros. ``gate`` is read when backward runs, so it can be set after forward."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.gate = gate  # not saved_tensors: it is written in place between forward and backward
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.where(ctx.gate, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


class EmbeddingGradientGate:
    """Zeroes, on the device, the gradients that reach the embedding tables' fused optimizer when
    ``close_unless(flag)`` was given a false flag before backward: a step whose loss turned out
    non-finite then leaves every table as it was, without the host reading the flag first.

    A zero gradient is no update for SGD, Adagrad and row-wise Adagrad (``GATED_OPTIMIZERS``); Adam
    would still move rows by its momentum, so with it the trainer reads the flag before backward
    instead. It wraps the outputs of the DMP's sharded collections (a callback on their awaitables,
    so it works inside TorchRec's train pipelines too): one autograd node per collection output.
    """

    GATED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")

    def __init__(self, dmp: DistributedModelParallel, device: torch.device):
        self.open = torch.ones((), dtype=torch.bool, device=device)
        self.collections = [m for m in dmp.modules() if isinstance(m, GATED_COLLECTIONS)]
        for module in self.collections:
            module.register_forward_hook(self._hook)

    @staticmethod
    def covers(dmp: DistributedModelParallel) -> bool:
        """Whether every sharded module of ``dmp`` is a collection the gate wraps."""
        return all(isinstance(m, GATED_COLLECTIONS) for m in dmp.modules() if isinstance(m, ShardedModule))

    def close_unless(self, flag: torch.Tensor) -> None:
        self.open.copy_(flag)

    def _hook(self, module, inputs, output):
        if not torch.is_grad_enabled():
            return output
        if isinstance(output, Awaitable):
            output.callbacks.append(self._gated)
            return output
        return self._gated(output)

    def _gated(self, output):
        if isinstance(output, KeyedTensor):
            return KeyedTensor(
                keys=output.keys(),
                length_per_key=output.length_per_key(),
                values=_GateGradient.apply(output.values(), self.open),
                key_dim=output.key_dim(),
            )
        return {  # EmbeddingCollection: feature -> JaggedTensor
            name: JaggedTensor(
                values=_GateGradient.apply(jagged.values(), self.open),
                weights=jagged.weights_or_none(),
                lengths=jagged.lengths_or_none(),
                offsets=jagged.offsets_or_none(),
            )
            for name, jagged in output.items()
        }


def shard_model(
    model: nn.Module,
    *,
    tables: list[BaseEmbeddingConfig],
    sharding: ShardingConfig,
    embedding_optimizer: OptimizerConfig,
    batch_size: int,
    cluster: ClusterSpec,
    process_group,
    device: torch.device,
    fused_only: frozenset[str] = frozenset(),
    collective_timeout: timedelta | None = None,
) -> tuple[DistributedModelParallel, ShardingPlan, DenseReplicas]:
    """Fused optimizer → plan → DMP. Tables built on ``meta`` are materialised on their shards;
    ``fused_only``: tables kept off UVM caching (``planner_constraints``); ``collective_timeout``:
    of the dense gradients' process group (default: PyTorch's)."""
    apply_embedding_optimizer(model, embedding_optimizer)
    plan = plan_for_cluster(
        model,
        tables=tables,
        sharding=sharding,
        batch_size=batch_size,
        cluster=cluster,
        process_group=process_group,
        fused_only=fused_only,
    )
    replicas = DenseReplicas(collective_timeout)
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(process_group),
        device=device,
        plan=plan,
        sharders=sharders(sharding),
        data_parallel_wrapper=replicas,
    )
    return dmp, plan, replicas


INIT_CHUNK_ROWS = 65536


def local_shards(value) -> list[tuple[int, int, torch.Tensor]]:
    """(first row, first column, tensor) of each shard of a table's (or its optimizer state's)
    state-dict entry this rank holds: a ShardedTensor's local shards, or a whole plain tensor."""
    if not hasattr(value, "local_shards"):
        return [(0, 0, value)]
    shards = []
    for shard in value.local_shards():
        offsets = list(shard.metadata.shard_offsets) + [0]
        shards.append((offsets[0], offsets[1], shard.tensor))
    return shards


_MIX1 = -49064778989728563  # murmur3 fmix64 constants (0xff51afd7ed558ccd, 0xc4ceb9fe1a85ec53) as int64
_MIX2 = -4265267296055464877


def _fmix64(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 64-bit finaliser in wrapping int64 arithmetic (logical shifts by masking)."""
    low31 = (1 << 31) - 1
    x = x ^ ((x >> 33) & low31)
    x = x * _MIX1
    x = x ^ ((x >> 33) & low31)
    x = x * _MIX2
    return x ^ ((x >> 33) & low31)


def hashed_rows(
    table: BaseEmbeddingConfig, seed: int, rows: torch.Tensor, col_start: int, col_end: int
) -> torch.Tensor:
    """Initial values (len(rows), col_end - col_start) of ``rows`` of an ``id_mapping: dynamic``
    table, a function of (seed, table name, row, column) alone computed per element (a counter-based
    hash, 24 bits uniform in TorchRec's default range): a row given to a new id during training is
    re-initialised to exactly its initial value on whichever rank holds it, at the cost of the rows
    reset (the chunked generator of the other tables would draw 65536 rows for one)."""
    low, high = table.get_weight_init_min(), table.get_weight_init_max()
    base = int(_fmix64(torch.tensor([(seed * 1_000_003 + zlib.crc32(table.name.encode())) % 2**62]))[0])
    columns = torch.arange(col_start, col_end, device=rows.device)
    counters = rows.to(torch.int64)[:, None] * table.embedding_dim + columns
    bits = (_fmix64(counters ^ base) >> 40) & ((1 << 24) - 1)
    return low + (high - low) * (bits.to(torch.float32) / 2**24)


def initialize_tables(
    dmp: DistributedModelParallel,
    tables: list[BaseEmbeddingConfig],
    seed: int,
    hashed: frozenset[str] = frozenset(),
) -> None:
    """Writes every table's initial values as a function of (seed, table name, row) alone, uniform
    in TorchRec's default range ±sqrt(1 / rows): a table starts the same whatever the plan, the
    world size, the rank holding it and the device it lives on (TorchRec draws them on each shard's
    rank and device, so 1 and 2 ranks, or a CPU and a GPU run, would start from different tables).
    Rows are drawn on the CPU in chunks of ``INIT_CHUNK_ROWS`` (``initial_rows``), so memory stays
    bounded whatever the table's size; each shard copies in the rows and columns it holds.
    The ``hashed`` tables (``id_mapping: dynamic``) take ``hashed_rows`` (integer hashing, the
    same on any device), which ``RowReset`` writes again into rows given to new ids."""
    by_name = {t.name: t for t in tables}
    for key, value in dmp.state_dict().items():  # views of the live shards
        name = table_of_key(key, by_name)
        if name is None:
            continue
        table = by_name[name]
        for row_start, col_start, tensor in local_shards(value):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            if name in hashed:
                for first in range(0, tensor.shape[0], INIT_CHUNK_ROWS):
                    last = min(first + INIT_CHUNK_ROWS, tensor.shape[0])
                    rows = torch.arange(row_start + first, row_start + last, device=tensor.device)
                    with torch.no_grad():
                        tensor[first:last].copy_(
                            hashed_rows(table, seed, rows, col_start, col_start + tensor.shape[1])
                        )
                continue
            row_end, col_end = row_start + tensor.shape[0], col_start + tensor.shape[1]
            for chunk in range(row_start // INIT_CHUNK_ROWS, (row_end - 1) // INIT_CHUNK_ROWS + 1):
                first = chunk * INIT_CHUNK_ROWS
                values = initial_rows(table, seed, chunk)
                lo, hi = max(first, row_start), min(first + values.shape[0], row_end)
                _write_rows(tensor, lo - row_start, values[lo - first : hi - first, col_start:col_end])


def initial_rows(table: BaseEmbeddingConfig, seed: int, chunk: int) -> torch.Tensor:
    """(rows, dim) float32 on the CPU: the initial values of rows ``chunk * INIT_CHUNK_ROWS`` onwards
    (at most ``INIT_CHUNK_ROWS``), from a CPU generator seeded by (seed, table name, chunk)."""
    first = chunk * INIT_CHUNK_ROWS
    last = min(first + INIT_CHUNK_ROWS, table.num_embeddings)
    table_seed = zlib.crc32(table.name.encode())
    generator = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + table_seed) * 1_000_003 + chunk)
    values = torch.empty(last - first, table.embedding_dim)
    return values.uniform_(table.get_weight_init_min(), table.get_weight_init_max(), generator=generator)


def _write_rows(shard: torch.Tensor, row: int, values: torch.Tensor) -> None:
    """Copies CPU ``values`` into ``shard`` from local row ``row`` (to the shard's device and dtype)."""
    with torch.no_grad():
        shard[row : row + values.shape[0]].copy_(values, non_blocking=False)


class RowReset:
    """Re-initialises rows of ``hashed`` tables where this rank holds them: the weights back to
    ``hashed_rows``, the fused optimizer's state of those rows to zero (a row given to a new id must
    not start from the evicted id's vector nor its learning-rate state). The views of the live
    shards are collected once (``DMP.state_dict()`` costs ~2 ms a step at a few tables); make a new
    one after loading a checkpoint.

        resetter = RowReset(dmp, tables, seed, hashed={"t_user"})
        resetter({"t_user": torch.tensor([3, 17])})      # sorted rows, on every rank
    """

    def __init__(
        self,
        dmp: DistributedModelParallel,
        tables: list[BaseEmbeddingConfig],
        seed: int,
        hashed: frozenset[str],
    ):
        self.seed = seed
        self.tables = {t.name: t for t in tables if t.name in hashed}
        self.weights: dict[str, list[tuple[int, int, torch.Tensor]]] = {name: [] for name in self.tables}
        self.states: dict[str, list[tuple[int, torch.Tensor]]] = {name: [] for name in self.tables}
        for key, value in dmp.state_dict().items():  # views of the live shards
            name = table_of_key(key, self.tables)
            if name is not None:
                self.weights[name] += local_shards(value)
        for key, states in dmp.fused_optimizer.state_dict()["state"].items():
            name = table_of_key(key, self.tables)
            for state in states.values() if name is not None else ():
                if isinstance(state, torch.Tensor) and state.dim() > 0:
                    self.states[name] += [(start, shard) for start, _, shard in local_shards(state)]

    @staticmethod
    def _within(start: int, shard: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        bounds = torch.tensor([start, start + shard.shape[0]], device=rows.device)
        low, high = torch.searchsorted(rows, bounds).tolist()
        return rows[low:high].to(shard.device) - start

    @torch.no_grad()
    def __call__(self, resets: dict[str, torch.Tensor]) -> None:
        for name, rows in resets.items():
            if not rows.numel():
                continue
            for row_start, col_start, shard in self.weights[name]:
                local = self._within(row_start, shard, rows)
                if local.numel():
                    values = hashed_rows(
                        self.tables[name], self.seed, local + row_start, col_start, col_start + shard.shape[1]
                    )
                    shard.index_copy_(0, local, values.to(shard.dtype))
            for row_start, shard in self.states[name]:
                local = self._within(row_start, shard, rows)
                if local.numel():
                    shard.index_fill_(0, local, 0)


def describe_plan(
    plan: ShardingPlan,
    tables: list[BaseEmbeddingConfig],
    world_size: int,
    sharding: ShardingConfig,
    embedding_optimizer: str,
) -> tuple[str, dict]:
    """Human-readable table of the plan and an estimate of each rank's embedding memory.

    Memory per rank = weights (rows × dim × bytes) + optimizer state of its shards (row-wise
    Adagrad: one float per row; Adagrad: one per element; Adam: two per element; SGD: none).
    """
    by_name = {t.name: t for t in tables}
    bytes_per = BYTES_PER_ELEMENT[sharding.embedding_precision]
    opt = embedding_optimizer
    per_rank = [0.0] * world_size  # on the device (HBM, or host memory for CPU ranks)
    host_per_rank = [0.0] * world_size  # UVM-cached tables keep all but the cache in host memory
    rows_out = []
    for module_plan in plan.plan.values():
        for table_name, table_sharding in module_plan.items():
            table = by_name[table_name]
            shards = []
            if table_sharding.sharding_spec is not None:
                for shard in table_sharding.sharding_spec.shards:
                    rank = shard.placement.rank()
                    rows, cols = shard.shard_sizes
                    shards.append((rank, rows, cols))
            else:  # data_parallel: a full replica on every rank
                shards = [(r, table.num_embeddings, table.embedding_dim) for r in range(world_size)]
            for rank, rows, cols in shards:
                state = {
                    "rowwise_adagrad": rows * 4,
                    "adagrad": rows * cols * 4,
                    "adam": 2 * rows * cols * 4,
                }.get(opt, 0)
                weights = rows * cols * bytes_per
                if table_sharding.compute_kernel == "fused_uvm_caching":
                    cached = sharding.cache_load_factor
                    per_rank[rank] += weights * cached + state
                    host_per_rank[rank] += weights * (1 - cached)
                else:
                    per_rank[rank] += weights + state
            ranks = sorted({s[0] for s in shards})
            rows_out.append(
                (
                    table_name,
                    table.num_embeddings,
                    table.embedding_dim,
                    table_sharding.sharding_type,
                    table_sharding.compute_kernel,
                    ranks,
                )
            )
    lines = [f"{'table':<24} {'rows':>14} {'dim':>5}  {'sharding':<18} {'kernel':<18} ranks"]
    for name, rows, dim, kind, kernel, ranks in sorted(rows_out):
        shown = (
            ",".join(map(str, ranks)) if len(ranks) <= 16 else f"{len(ranks)} ranks ({ranks[0]}..{ranks[-1]})"
        )
        lines.append(f"{name:<24} {rows:>14,} {dim:>5}  {kind:<18} {kernel:<18} {shown}")
    lines.append(
        f"embedding memory per rank on the device (weights + optimizer state): max {_human(max(per_rank))}, "
        f"min {_human(min(per_rank))}, total {_human(sum(per_rank))} over {world_size} ranks"
    )
    if any(host_per_rank):
        lines.append(f"host memory per rank for UVM-cached tables: max {_human(max(host_per_rank))}")
    summary = {
        "tables": [
            {"table": n, "rows": r, "dim": d, "sharding_type": k, "compute_kernel": c, "ranks": rk}
            for n, r, d, k, c, rk in sorted(rows_out)
        ],
        "memory_gb_per_rank": [b / GB for b in per_rank],
        "host_memory_gb_per_rank": [b / GB for b in host_per_rank],
    }
    return "\n".join(lines), summary


def _human(num_bytes: float) -> str:
    for unit, size in (("GB", GB), ("MB", 1024**2), ("KB", 1024)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes:.0f} B"
