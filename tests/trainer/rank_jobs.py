"""Functions that every rank of a ``tests.multirank.RankPool`` runs: the product's own trainer
(``towerrec.trainer.build.build`` + Lightning ``fit``) on a small data set, returning what the tests compare.

Each returns plain data: the dense parameters (name → ndarray; a replica on every rank), this
rank's embedding shards (table → [(row offset, column offset, ndarray)]), the row ids it trained on
per step, and the global step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from towerrec.data.batch import Batch

BASE_CONFIG = "configs/default.yaml"


def load(overrides: list[str], config: str = BASE_CONFIG):
    from towerrec.trainer.config import load_config

    return load_config(config, ["trainer.progress_bar=false", "trainer.num_threads=1", *overrides])


def _concat_jagged(parts: list[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    keys = parts[0].keys()
    per_part = [part.to_dict() for part in parts]
    values = [per[key].values() for key in keys for per in per_part]
    lengths = [per[key].lengths() for key in keys for per in per_part]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
    )


class ListStream:
    """In-memory stand-in for the training ``BatchStream``: yields given batches (same interface)."""

    def __init__(self, batches: list[Batch]):
        self.batches = batches
        for position, batch in enumerate(batches):
            batch.position = position
        self.consumed = 0
        self.skipped_bad_rows = 0
        self.batch_size = batches[0].batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[self.consumed :])

    def batch_rows(self, position: int) -> int:
        return self.batches[position].batch_size

    def advance_if_finished(self) -> None:
        """One epoch only: nothing to advance to."""

    def mark_consumed(self, position: int) -> None:
        self.consumed = position + 1

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


def concat_batches(parts: list[Batch]) -> Batch:
    """Row-wise concatenation of batches with the same keys (the global batch of W rank batches)."""
    return Batch(
        sparse=_concat_jagged([p.sparse for p in parts]),
        sequences=None if parts[0].sequences is None else _concat_jagged([p.sequences for p in parts]),
        dense=torch.cat([p.dense for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        label_mask=torch.cat([p.label_mask for p in parts]),
        weights=torch.cat([p.weights for p in parts]),
        row_id=torch.cat([p.row_id for p in parts]),
    )


def global_batches(cfg, world_size: int, num_steps: int, reverse: bool = False) -> list[Batch]:
    """The global batches a ``world_size``-rank run of ``cfg`` trains on in its first steps: step s
    joins every rank's batch s, read by the product's reader exactly as those ranks read them
    (``reverse``: the last rank's rows first, the same rows summed in another order)."""
    from towerrec.data.dataset import DatasetMeta
    from towerrec.data.reader import BatchStream, read_spec
    from towerrec.trainer.retrieval import sampled_ids_spec

    meta = DatasetMeta.load(cfg.data.path)
    rows = meta.table_rows(cfg.data.sparse)
    spec = read_spec(cfg.data, cfg.tasks, rows, sampled=sampled_ids_spec(cfg, rows))
    per_rank = []
    for rank in range(world_size):
        stream = BatchStream(
            meta, cfg.data.train_split, spec, batch_size=cfg.data.batch_size, rank=rank,
            world_size=world_size, seed=cfg.seed, window_rows=cfg.data.shuffle_window_rows,
            background_decode=False, drop_bag_ids=True,
        )  # fmt: skip
        batches = []
        for batch in stream:
            batches.append(batch)
            if len(batches) == num_steps:
                break
        per_rank.append(batches)
    return [concat_batches(list(step)[::-1] if reverse else list(step)) for step in zip(*per_rank)]


class RowRecorder:
    """The row ids of every trained batch, per step (padding rows dropped), in both train pipelines."""

    def __init__(self) -> None:
        import lightning as L

        recorder = self
        self.steps: list[tuple[int, np.ndarray]] = []
        self.initial: dict[str, Any] | None = None
        self._pending: torch.Tensor | None = None

        class _Callback(L.Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                recorder.initial = model_state(pl_module)

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if isinstance(batch, Batch):
                    recorder._pending = batch.row_id

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                rows, recorder._pending = recorder._pending, None
                if not pl_module.skip_step and rows is not None:
                    recorder.steps.append((trainer.current_epoch, rows[rows >= 0].numpy().copy()))

        _record_backward()
        _RECORDING[:] = [self]  # the pipeline trains batches Lightning never sees: see _record_backward
        self.callback = _Callback()


_RECORDING: list[RowRecorder] = []
"""The recorder of the run in progress on this rank (the last one made)."""


def _record_backward() -> None:
    """Wraps the sparse_dist pipeline's backward once per process, for whichever recorder is current."""
    from towerrec.trainer.pipeline import LightningSparseDistPipeline

    original = LightningSparseDistPipeline._backward
    if getattr(original, "records_rows", False):
        return

    def recording_backward(pipeline, loss_sums):
        if _RECORDING:
            _RECORDING[-1]._pending = pipeline.batches[0].row_id
        return original(pipeline, loss_sums)

    recording_backward.records_rows = True
    LightningSparseDistPipeline._backward = recording_backward


def model_state(module) -> dict[str, Any]:
    """Dense parameters (full) and this rank's embedding shards, as numpy."""
    from towerrec.models.tables import table_of_key

    dmp = module.model
    table_names = [t.name for t in module.tables]
    dense = {
        name: p.detach().float().cpu().numpy().copy()
        for name, p in dmp.module.named_parameters()
        if table_of_key(name, table_names) is None
    }
    tables: dict[str, list] = {}
    for key, value in dmp.state_dict().items():
        table = table_of_key(key, table_names)
        if table is None:
            continue
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                offsets = shard.metadata.shard_offsets
                tables.setdefault(table, []).append(
                    (offsets[0], offsets[1], shard.tensor.cpu().numpy().copy())
                )
        else:
            tables.setdefault(table, []).append((0, 0, value.detach().cpu().numpy().copy()))
    ids = getattr(module, "dynamic_ids", None)
    id_maps = {} if ids is None else {k: v.cpu().numpy().copy() for k, v in ids.state_dict().items()}
    return {
        "dense": dense,
        "tables": tables,
        "balance": module.inner.balancer.weights().cpu().numpy().copy(),
        "dynamic_ids": id_maps,
    }


def train(
    overrides: list[str],
    num_steps: int,
    reference_world_size: int | None = None,
    reverse: bool = False,
    config: str = BASE_CONFIG,
) -> dict[str, Any]:
    """Trains ``num_steps`` steps of the config (no checkpoints, no evaluation). With
    ``reference_world_size`` W (run it on one rank) the batches are the global batches a W-rank run
    of the same config trains on (see ``global_batches``)."""
    from towerrec.trainer.build import build

    cfg = load(
        [
            *overrides,
            f"trainer.max_steps={num_steps}",
            "checkpoint.resume=never",
            "checkpoint.every_n_steps=0",
        ],
        config,
    )
    recorder = RowRecorder()
    trainer, module, datamodule, checkpointing = build(cfg, extra_callbacks=[recorder.callback])
    trainer.callbacks.remove(checkpointing)
    if reference_world_size is not None:
        datamodule.train_stream = ListStream(global_batches(cfg, reference_world_size, num_steps, reverse))
    trainer.fit(module, datamodule=datamodule)
    return {
        **model_state(module),
        "initial": recorder.initial,
        "steps": recorder.steps,
        "global_step": trainer.global_step,
        "gated": module.gradient_gate is not None,
    }


def fit(overrides: list[str], config: str = BASE_CONFIG) -> dict[str, Any]:
    """The ``fit`` command's training (checkpoints and resume as configured), without evaluation."""
    from towerrec.trainer.build import build, resume_path

    cfg = load(overrides, config)
    recorder = RowRecorder()
    trainer, module, datamodule, _ = build(cfg, extra_callbacks=[recorder.callback])
    resume = resume_path(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    return {
        **model_state(module),
        "initial": recorder.initial,
        "steps": recorder.steps,
        "global_step": trainer.global_step,
    }


def fit_with_desync(overrides: list[str], perturb_at_step: int, parameter: str) -> str:
    """Trains with the replica guard on, nudging ``parameter`` on rank 1 after step
    ``perturb_at_step``; returns the error message the guard raised."""
    import lightning as L
    import torch.distributed as dist

    from towerrec.trainer.build import build
    from towerrec.trainer.errors import ReplicasDiverged

    class Nudge(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == perturb_at_step and dist.get_rank() == 1:
                with torch.no_grad():
                    dict(pl_module.model.module.named_parameters())[parameter].add_(1e-6)

    cfg = load(overrides)
    trainer, module, datamodule, _ = build(cfg, extra_callbacks=[Nudge()])
    trainer.callbacks.insert(0, trainer.callbacks.pop())  # the nudge runs before the guard
    try:
        trainer.fit(module, datamodule=datamodule)
    except ReplicasDiverged as err:
        return str(err)
    return "no error"


def evaluation_rows(seed: int, num_rows: int = 6000) -> dict[str, torch.Tensor]:
    """Evaluation rows of a rating task and two binary tasks (one masked), users with 1-40 rows,
    sample weights, and a rank of each row: users' rows spread over both ranks."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 400, num_rows) * 1_000_003
    labels = np.stack(
        [rng.integers(1, 6, num_rows), rng.integers(0, 2, num_rows), rng.integers(0, 2, num_rows)], 1
    )
    preds = np.stack(
        [labels[:, 0] + rng.normal(0, 1, num_rows),
         1 / (1 + np.exp(-(labels[:, 1] + rng.normal(0, 1.5, num_rows) - 0.5))),
         np.round(rng.random(num_rows), 2)], 1,
    ).astype(np.float32)  # fmt: skip
    mask = np.ones((num_rows, 3), np.float32)
    mask[:, 2] = labels[:, 1]  # the third task counts where the second's label is 1
    weights = (rng.random(num_rows) + 0.5).astype(np.float32)
    weights[rng.random(num_rows) < 0.05] = 0  # padding-like rows
    return {
        "preds": torch.tensor(preds), "labels": torch.tensor(labels, dtype=torch.float32),
        "mask": torch.tensor(mask), "weights": torch.tensor(weights), "groups": torch.tensor(groups),
        "rank": torch.tensor(rng.integers(0, 2, num_rows)),
    }  # fmt: skip


EVALUATION_TASKS = (["rating", "ctr", "cvr"], ["regression", "binary", "binary"])


def sharded_metrics(seed: int) -> dict:
    """``task_metrics`` of this rank's share of ``evaluation_rows`` over the process group."""
    import torch.distributed as dist

    from towerrec.trainer.distributed.collectives import ProcessGroupCollectives
    from towerrec.trainer.metrics import task_metrics

    rows = evaluation_rows(seed)
    mine = rows["rank"] == dist.get_rank()
    collectives = ProcessGroupCollectives(dist.get_world_size(), dist.group.WORLD, torch.device("cpu"))
    return task_metrics(
        rows["preds"][mine], rows["labels"][mine], rows["mask"][mine], rows["weights"][mine],
        *EVALUATION_TASKS, rows["groups"][mine], collectives,
    )  # fmt: skip


def _local(tree: Any) -> Any:
    """A checkpoint tensor tree as numpy (a sharded tensor: its local shards, by offsets)."""
    if isinstance(tree, dict):
        return {key: _local(value) for key, value in tree.items()}
    if hasattr(tree, "local_shards"):
        return [
            (tuple(s.metadata.shard_offsets), s.tensor.detach().numpy().copy()) for s in tree.local_shards()
        ]
    return tree.detach().float().numpy().copy()


def _unsharded(cfg) -> dict:
    """The state dict of the config's model built as the trainer builds it (tables on meta)."""
    from towerrec.data.dataset import DatasetMeta
    from towerrec.trainer.module import MultiTaskModule

    rows = DatasetMeta.load(cfg.data.path).table_rows(cfg.data.sparse)
    return MultiTaskModule(cfg, rows).build_model().state_dict()


def fit_capturing_state(overrides: list[str], config: str = BASE_CONFIG) -> dict[str, Any]:
    """The ``fit`` command's training (warm start and resume as configured, no evaluation), with
    every checkpoint tensor (model and optimizers, as ``strategy.checkpoint_tensors`` gives them)
    when training starts and when it ends."""
    import lightning as L

    from towerrec.trainer.build import build, resume_path
    from towerrec.trainer.warm_start import SharedTables, WarmStart, shared_tables, source_checkpoint

    captured: dict[str, Any] = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            captured["start"] = _local(trainer.strategy.checkpoint_tensors(with_optimizers=True))

        def on_train_end(self, trainer, pl_module) -> None:
            captured["end"] = _local(trainer.strategy.checkpoint_tensors(with_optimizers=True))

    cfg = load(overrides, config)
    resume = resume_path(cfg)
    warm = source_checkpoint(cfg) if resume is None else None
    callbacks = [WarmStart(warm)] if warm is not None else []
    shared = (
        shared_tables(cfg, {k: tuple(v.shape) for k, v in _unsharded(cfg).items()})
        if resume is None
        else None
    )
    callbacks += ([SharedTables(*shared)] if shared is not None else []) + [Capture()]
    trainer, module, datamodule, _ = build(cfg, extra_callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    return {**captured, "global_step": trainer.global_step}


def train_checking_resets(overrides: list[str], num_steps: int) -> dict[str, Any]:
    """Trains ``num_steps`` steps; right after each step's ids are mapped, checks every row the step
    gave to a new id on this rank's shards: its weights must be the table's initial values of that
    row and its fused optimizer state zero. Returns the rows checked and those that were not."""
    import lightning as L

    from towerrec.models.tables import table_of_key
    from towerrec.trainer.build import build
    from towerrec.trainer.distributed.sharding import hashed_rows, local_shards
    from towerrec.trainer.dynamic_ids import DynamicIdMapping

    cfg = load([*overrides, f"trainer.max_steps={num_steps}", "checkpoint.resume=never"])
    checked = {"rows": 0, "wrong_weights": 0, "wrong_state": 0, "reused": 0}
    seen_rows: dict[str, set] = {}

    class Check(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            mapping = next(c for c in trainer.callbacks if isinstance(c, DynamicIdMapping))
            dmp, tables = pl_module.model, {t.name: t for t in pl_module.tables}
            weights = {table_of_key(k, tables): v for k, v in dmp.state_dict().items()}
            states = dmp.fused_optimizer.state_dict()["state"]
            states = {table_of_key(k, tables): v for k, v in states.items()}
            for table, rows in mapping.last_resets.items():
                checked["reused"] += len(seen_rows.setdefault(table, set()) & set(rows.tolist()))
                seen_rows[table] |= set(rows.tolist())
                for row_start, col_start, shard in local_shards(weights[table]) if table in weights else ():
                    mine = rows[(rows >= row_start) & (rows < row_start + shard.shape[0])]
                    expected = hashed_rows(
                        tables[table], cfg.seed, mine, col_start, col_start + shard.shape[1]
                    )
                    checked["rows"] += mine.numel()
                    checked["wrong_weights"] += int((shard[mine - row_start] != expected).any(dim=1).sum())
                for state in states.get(table, {}).values():
                    for row_start, _, shard in local_shards(state):
                        mine = rows[(rows >= row_start) & (rows < row_start + shard.shape[0])]
                        checked["wrong_state"] += int(
                            (shard[mine - row_start] != 0).reshape(len(mine), -1).any(1).sum()
                        )

    trainer, module, datamodule, checkpointing = build(cfg, extra_callbacks=[Check()])
    trainer.callbacks.remove(checkpointing)
    trainer.fit(module, datamodule=datamodule)
    return checked


def train_checking_after_backward(
    overrides: list[str], num_steps: int, config: str = BASE_CONFIG
) -> dict[str, Any]:
    """``train`` with the step's outcome read after backward, as on CUDA (the embedding gradient
    gate of ``towerrec.trainer.module.MultiTaskModule.combined_loss``), here on CPU ranks."""
    from towerrec.trainer.module import MultiTaskModule

    MultiTaskModule.defer_step_check_on = ("cpu", "cuda")
    try:
        return train(overrides, num_steps, config=config)
    finally:
        MultiTaskModule.defer_step_check_on = ("cuda",)


def state_around_a_non_finite_step(overrides: list[str], bad_position: int, after_backward: bool) -> dict:
    """Trains this rank's first ``bad_position + 2`` batches with batch ``bad_position`` made
    non-finite on rank 0 only (infinite dense features), ``trainer.non_finite_loss: skip``, the
    outcome read before or ``after_backward`` (gradient gate); returns the model just before and
    just after that step, whether it was skipped, and the steps taken."""
    import lightning as L
    import torch.distributed as dist

    from towerrec.data.dataset import DatasetMeta
    from towerrec.data.reader import BatchStream, read_spec
    from towerrec.trainer.build import build
    from towerrec.trainer.module import MultiTaskModule

    cfg = load([*overrides, "trainer.non_finite_loss=skip", "checkpoint.resume=never", "checkpoint.every_n_steps=0",
                f"trainer.max_steps={bad_position + 2}"])  # fmt: skip
    meta = DatasetMeta.load(cfg.data.path)
    stream = BatchStream(
        meta, cfg.data.train_split, read_spec(cfg.data, cfg.tasks, meta.table_rows(cfg.data.sparse)),
        batch_size=cfg.data.batch_size, rank=dist.get_rank(), world_size=dist.get_world_size(), seed=cfg.seed,
        window_rows=cfg.data.shuffle_window_rows, background_decode=False, drop_bag_ids=True,
    )  # fmt: skip
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == bad_position + 2:
            break
    if dist.get_rank() == 0:
        batches[bad_position].dense.fill_(float("inf"))
    seen: dict[str, Any] = {}

    class Around(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch.position == bad_position:
                seen["before"] = model_state(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch.position == bad_position:
                seen["after"], seen["skipped"] = model_state(pl_module), pl_module.skip_step

    MultiTaskModule.defer_step_check_on = ("cpu", "cuda") if after_backward else ("cuda",)
    try:
        trainer, module, datamodule, checkpointing = build(cfg, extra_callbacks=[Around()])
        trainer.callbacks.remove(checkpointing)
        datamodule.train_stream = ListStream(batches)
        trainer.fit(module, datamodule=datamodule)
    finally:
        MultiTaskModule.defer_step_check_on = ("cuda",)
    return {**seen, "gated": module.gradient_gate is not None, "skipped_batches": module.skipped_batches,
            "global_step": trainer.global_step}  # fmt: skip


def reduce_partial_gradients() -> dict[str, Any]:
    """``DenseGradientReducer`` on a 3-parameter model, one parameter per bucket, where rank 0's
    batch uses ``a`` and ``b``, rank 1's only ``b``, and no rank ``c``; returns each gradient after
    ``finish()`` (None stays None) and this rank's own gradients before it; then, with every
    parameter used, how many buckets' all-reduces had started when backward returned."""
    import torch.distributed as dist

    import towerrec.trainer.distributed.sharding as sharding

    torch.manual_seed(dist.get_rank())
    params = {name: torch.nn.Parameter(torch.ones(4)) for name in "abc"}
    original, sharding.DENSE_BUCKET_BYTES = sharding.DENSE_BUCKET_BYTES, 16  # one parameter per bucket
    try:
        reducer = sharding.DenseGradientReducer(
            list(params.values()), dist.group.WORLD, dist.get_world_size()
        )
    finally:
        sharding.DENSE_BUCKET_BYTES = original
    inputs = torch.randn(4)
    used = ("a", "b") if dist.get_rank() == 0 else ("b",)
    sum((params[name] * inputs * (i + 1)).sum() for i, name in enumerate(used)).backward()
    own = {name: None if p.grad is None else p.grad.numpy().copy() for name, p in params.items()}
    reducer.finish()
    reduced = {name: None if p.grad is None else p.grad.numpy().copy() for name, p in params.items()}
    for param in params.values():
        param.grad = None
    sum((p * inputs).sum() for p in params.values()).backward()  # every parameter used
    started_during_backward = len(reducer._launched)
    reducer.finish()
    return {"own": own, "reduced": reduced, "num_buckets": len(reducer.buckets),
            "started_during_backward": started_during_backward}  # fmt: skip


def reload_first_checkpoint(overrides: list[str]) -> dict[str, Any]:
    """Trains 2 steps saving after each, then loads step 1's weights back the way the best epoch
    is loaded (``TorchRecStrategy.load_weights``); returns the order of cache resets and checkpoint
    reads it made, how many fbgemm lookups it reset, and whether the model is step 1's again."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    from towerrec.trainer.build import build
    from towerrec.trainer.distributed import checkpoint as ckpt
    from towerrec.trainer.distributed import strategy as strategy_module

    cfg = load([*overrides, "trainer.max_steps=2", "checkpoint.every_n_steps=1", "checkpoint.resume=never"])
    saved: dict[int, dict] = {}
    import lightning as L

    class Remember(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            saved[trainer.global_step] = model_state(pl_module)

    trainer, module, datamodule, _ = build(cfg, extra_callbacks=[Remember()])
    trainer.fit(module, datamodule=datamodule)
    events: list[str] = []
    reset, load_tensors = SplitTableBatchedEmbeddingBagsCodegen.reset_cache_states, ckpt.load_tensors

    def recording_reset(self) -> None:
        events.append("reset cache")
        reset(self)

    def recording_load(*args, **kwargs) -> None:
        events.append("load tensors")
        load_tensors(*args, **kwargs)

    SplitTableBatchedEmbeddingBagsCodegen.reset_cache_states = recording_reset
    strategy_module.ckpt.load_tensors = recording_load
    try:
        trainer.strategy.load_weights(ckpt.checkpoint_dir(f"{cfg.run_dir}/checkpoints", 1))
    finally:
        SplitTableBatchedEmbeddingBagsCodegen.reset_cache_states = reset
        strategy_module.ckpt.load_tensors = load_tensors
    now = model_state(module)
    same = all(np.array_equal(now["dense"][k], v) for k, v in saved[1]["dense"].items()) and all(
        np.array_equal(new[2], old[2])
        for table, shards in saved[1]["tables"].items()
        for new, old in zip(now["tables"][table], shards)
    )
    moved = not all(np.array_equal(saved[2]["dense"][k], v) for k, v in saved[1]["dense"].items())
    return {"events": events, "is_step_1": same, "moved_since": moved}


class _AllReduceInBackward(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks on the default group, in backward,
    as TorchRec's embedding output distribution and retrieval's all-gather do."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def reduce_around_a_collective_in_backward() -> dict[str, Any]:
    """``DenseGradientReducer`` (one parameter per bucket) where backward also runs a collective on
    the default group, and rank 0's bucket of ``a`` is ready before that collective while rank 1,
    whose batch does not use ``a``, starts it only after backward: the gradients after ``finish()``."""
    import torch.distributed as dist

    import towerrec.trainer.distributed.sharding as sharding

    params = {name: torch.nn.Parameter(torch.full((4,), 1.0 + i)) for i, name in enumerate("ca")}
    original, sharding.DENSE_BUCKET_BYTES = sharding.DENSE_BUCKET_BYTES, 16
    try:
        reducer = sharding.DenseReplicas().gradient_reducer(list(params.values()), dist.get_world_size())
    finally:
        sharding.DENSE_BUCKET_BYTES = original
    x = torch.arange(4.0) + dist.get_rank()
    loss = _AllReduceInBackward.apply(params["c"] * x).sum()  # created first: its backward runs last
    if dist.get_rank() == 0:
        loss = loss + (params["a"] * x).sum()
    loss.backward()
    reducer.finish()
    return {name: p.grad.numpy().copy() for name, p in params.items()}
