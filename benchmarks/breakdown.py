"""Where a training step goes, and the bare TorchRec loop that the Lightning trainer is compared to.

Both build the model exactly as the trainer does (``MultiTaskModule.build_model()`` →
``towerrec.trainer.distributed.sharding.shard_model`` in a 1-process gloo group) and run on batches pre-materialised in
memory, so neither pays for reading data.
"""

from __future__ import annotations

import os
import time

import torch


def init_single_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
        dist.init_process_group("gloo", rank=0, world_size=1)


def build_dmp(cfg, num_embeddings: dict[str, int]):
    """(module, dmp, dense optimizer): the model exactly as the trainer builds it, 1 rank."""
    import torch.distributed as dist
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from towerrec.trainer.distributed.sharding import ClusterSpec, shard_model
    from towerrec.trainer.module import MultiTaskModule, dense_optimizer

    init_single_process_group()
    module = MultiTaskModule(cfg, num_embeddings)
    cluster = ClusterSpec(world_size=1, device_type="cpu", local_world_size=1)
    dmp, _, _ = shard_model(
        module.build_model(),
        tables=module.tables,
        sharding=cfg.sharding,
        embedding_optimizer=cfg.trainer.embedding_optimizer,
        batch_size=cfg.data.batch_size,
        cluster=cluster,
        process_group=dist.group.WORLD,
        device=torch.device("cpu"),
    )
    params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    optimizer = dense_optimizer(params, cfg.trainer.dense_optimizer)
    return module, dmp, optimizer


def materialize(cfg, num_embeddings: dict[str, int], num_batches: int) -> list:
    """The first ``num_batches`` training batches (cycling over epochs when the split is shorter)."""
    from towerrec.data.dataset import DatasetMeta
    from towerrec.data.reader import BatchStream, read_spec

    meta = DatasetMeta.load(cfg.data.path)
    stream = BatchStream(
        meta,
        cfg.data.train_split,
        read_spec(cfg.data, cfg.tasks, num_embeddings),
        cfg.data.batch_size,
        seed=cfg.seed,
    )
    batches: list = []
    while len(batches) < num_batches:
        batches.extend(b for b in stream if b.batch_size == cfg.data.batch_size)
    return batches[:num_batches]


def bare_step(dmp, optimizer, batch) -> torch.Tensor:
    """One training step without Lightning: forward, per-task losses, balance, backward, dense step."""
    inner = dmp.module
    if _takes_batch(inner):  # trainer.module.TrainingModel: model(batch) -> (loss sums (2, T), outputs)
        (sums, totals), _ = dmp(batch)
        losses = sums / totals.clamp_min(1e-12)
    else:
        losses = inner.losses(dmp(batch.sparse, batch.dense), batch.labels, batch.label_mask, batch.weights)
    loss = inner.balancer(losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # embedding rows are updated here by the fused optimizer
    optimizer.step()
    return loss


def _takes_batch(model) -> bool:
    try:
        from towerrec.trainer.module import TrainingModel
    except ImportError:
        return False
    return isinstance(model, TrainingModel)


def time_bare_loop(dmp, optimizer, batches: list, warmup: int = 3) -> float:
    """Samples/s of ``bare_step`` over ``batches`` (after ``warmup`` steps)."""
    for batch in batches[:warmup]:
        bare_step(dmp, optimizer, batch)
    started = time.perf_counter()
    rows = 0
    for batch in batches[warmup:]:
        bare_step(dmp, optimizer, batch)
        rows += batch.batch_size
    return rows / (time.perf_counter() - started)


def profile(cfg, num_steps: int = 20) -> dict:
    """Milliseconds per step of each part, measured one part at a time on the same batches:

    data          BatchStream → Batch (window read, decode, shuffle, KJT construction)
    embedding     sharded EBC forward (input dist, lookup, output dist) + backward with the fused update
    dense         interaction + tower + heads + losses, forward + backward (embeddings as inputs)
    dense_opt     Adam step + zero_grad over the dense parameters
    bare_step     the whole step without Lightning (``bare_step``)

    With ``trainer.precision: bf16-mixed`` (or ``auto`` resolving to it) the dense part and the bare
    step run under CPU bf16 autocast, as the trainer runs them.
    """
    from towerrec.data.dataset import DatasetMeta

    torch.set_num_threads(cfg.trainer.num_threads or 2)
    num_embeddings = DatasetMeta.load(cfg.data.path).table_rows(cfg.data.sparse)
    batches = materialize(cfg, num_embeddings, num_steps + 3)
    module, dmp, optimizer = build_dmp(cfg, num_embeddings)
    inner = dmp.module
    from towerrec.trainer.precision import dense_macs_per_sample, resolve_precision

    precision, _ = resolve_precision(  # what the trainer runs (``auto`` resolved as it would be)
        cfg.trainer.precision, "cpu", cfg.data.batch_size, dense_macs_per_sample(module.build_model())
    )
    result: dict = {"batch_size": cfg.data.batch_size, "precision": precision}
    bf16 = precision == "bf16-mixed"

    # data: a fresh stream per pass, over at least two shuffle windows (a window is read and
    # decoded at once: fewer batches than a window would charge its whole decode to them)
    from towerrec.data.reader import BatchStream, read_spec

    meta, spec = DatasetMeta.load(cfg.data.path), read_spec(cfg.data, cfg.tasks, num_embeddings)
    stream = BatchStream(meta, cfg.data.train_split, spec, cfg.data.batch_size, seed=cfg.seed)
    data_batches = max(num_steps, 2 * stream.window_rows // cfg.data.batch_size)
    started, count = time.perf_counter(), 0
    while count < data_batches:
        for _ in BatchStream(meta, cfg.data.train_split, spec, cfg.data.batch_size, seed=cfg.seed):
            count += 1
            if count == data_batches:
                break
    result["data_ms"] = (time.perf_counter() - started) / data_batches * 1e3

    def timed(fn) -> float:
        for batch in batches[:3]:
            fn(batch)
        started = time.perf_counter()
        for batch in batches[3:]:
            fn(batch)
        return (time.perf_counter() - started) / (len(batches) - 3) * 1e3

    def embedding_fwd(batch):
        return inner.embeddings(batch.sparse).to_dict()

    def embedding_fwd_bwd(batch):
        pooled = embedding_fwd(batch)
        torch.autograd.backward(
            [pooled[name] for name in inner.feature_names],
            [torch.ones_like(pooled[name]) * 1e-6 for name in inner.feature_names],
        )

    cached = [{k: v.detach() for k, v in embedding_fwd(b).items()} for b in batches]
    by_id = {id(b): c for b, c in zip(batches, cached)}

    def dense_fwd_bwd(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = dense_forward(batch)
        loss.backward()

    def dense_forward(batch):
        pooled = {k: v.requires_grad_(True) for k, v in by_id[id(batch)].items()}
        features = inner.interaction([pooled[name] for name in inner.feature_names], batch.dense)
        outputs = inner.heads(inner.tower(features))
        return inner.balancer(inner.losses(outputs, batch.labels, batch.label_mask, batch.weights))

    def dense_opt(batch):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        optimizer.step()

    result["embedding_fwd_ms"] = timed(embedding_fwd)
    result["embedding_fwd_bwd_ms"] = timed(embedding_fwd_bwd)
    result["dense_fwd_bwd_ms"] = timed(dense_fwd_bwd)
    result["dense_opt_ms"] = timed(dense_opt)

    def whole_step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            bare_step(dmp, optimizer, batch)

    result["bare_step_ms"] = timed(whole_step)
    result["num_lookups_per_step"] = int(batches[0].sparse.values().numel())
    return result


def prototypes(cfg, num_steps: int = 20, reps: int = 3) -> dict:
    """PROTOTYPES, monkeypatched inside this benchmark process only (product code is unchanged):
    bare-loop samples/s of the model as it is vs with a candidate change, alternating, median of
    ``reps``. Candidates:

    gate_einsum   ``towerrec.models.layers.Gate.forward`` mixes experts with ``einsum("be,bed->bd")`` (what it
                  did before the broadcast multiply + sum it uses now)
    gate_bmm      the same mix as ``torch.bmm`` (B,1,E) @ (B,E,D)
    threads_1     the model as it is with ``torch.set_num_threads(1)``
    """
    import statistics

    import towerrec.models.layers as layers
    from towerrec.data.dataset import DatasetMeta

    threads = cfg.trainer.num_threads or 2
    torch.set_num_threads(threads)
    num_embeddings = DatasetMeta.load(cfg.data.path).table_rows(cfg.data.sparse)
    batches = materialize(cfg, num_embeddings, num_steps + 3)
    _, dmp, optimizer = build_dmp(cfg, num_embeddings)
    original = layers.Gate.forward

    def gate_bmm(self, x, expert_outputs):
        probabilities = torch.softmax(self.logits(x), dim=-1)
        return torch.bmm(probabilities.unsqueeze(1), expert_outputs).squeeze(1)

    def gate_einsum(self, x, expert_outputs):
        probabilities = torch.softmax(self.logits(x), dim=-1)
        return torch.einsum("be,bed->bd", probabilities, expert_outputs)

    variants = {
        "as_is": (original, threads),
        "gate_einsum": (gate_einsum, threads),
        "gate_bmm": (gate_bmm, threads),
        "threads_1": (original, 1),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, (forward, num_threads) in variants.items():
            layers.Gate.forward = forward
            torch.set_num_threads(num_threads)
            rates[name].append(time_bare_loop(dmp, optimizer, batches))
    layers.Gate.forward = original
    return {name: statistics.median(values) for name, values in rates.items()}
