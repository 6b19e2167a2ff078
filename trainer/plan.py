"""``towerrec plan`` and ``towerrec prepare``: planning without a GPU, building data sets."""

from __future__ import annotations

from towerrec.data.dataset import DatasetMeta, is_complete, table_rows
from towerrec.models.builder import build_model, embedding_tables
from towerrec.trainer.config import Config
from towerrec.trainer.distributed.sharding import (
    ClusterSpec,
    apply_embedding_optimizer,
    describe_plan,
    plan_for_cluster,
)
from towerrec.trainer.errors import ConfigError


def run_plan(cfg: Config, args) -> int:
    """``towerrec plan`` (see ``towerrec.trainer.commands``)."""
    return plan_command(cfg, args.nodes, args.gpus_per_node, args.hbm_gb, args.device, args.ddr_gb)


def plan_command(
    cfg: Config, nodes: int, gpus_per_node: int, hbm_gb: float, device: str, ddr_gb: float | None = None
) -> int:
    """Plans the config's tables for ``nodes`` × ``gpus_per_node`` devices of ``hbm_gb`` and prints it."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    if hbm_gb <= 0:
        raise ConfigError("--hbm-gb must be > 0")
    meta = DatasetMeta.load(cfg.data.path) if is_complete(cfg.data.path) else None
    rows = table_rows(cfg.data.sparse, meta)
    model = build_model(
        sparse=cfg.data.sparse,
        num_dense=len(cfg.data.dense),
        tasks=cfg.tasks,
        model=cfg.model,
        table_rows=rows,
        precision=cfg.sharding.embedding_precision,
        embedding_device="meta",
    )
    tables = embedding_tables(cfg.data.sparse, rows, cfg.sharding.embedding_precision)  # pooled and sequence
    apply_embedding_optimizer(model, cfg.trainer.embedding_optimizer)
    world_size = nodes * gpus_per_node
    cluster = ClusterSpec(
        world_size, device, gpus_per_node, memory_gb_per_device=hbm_gb, ddr_gb_per_rank=ddr_gb
    )
    plan = plan_for_cluster(
        model, tables=tables, sharding=cfg.sharding, batch_size=cfg.data.batch_size, cluster=cluster
    )
    text, _ = describe_plan(plan, tables, world_size, cfg.sharding, cfg.trainer.embedding_optimizer.type)
    params = sum(t.num_embeddings * t.embedding_dim for t in tables)
    print(
        f"cluster: {nodes} node(s) x {gpus_per_node} {device} device(s), {hbm_gb:g} GB each; "
        f"{len(tables)} tables, {params / 1e9:.2f} B embedding parameters"
    )
    print(text)

    return 0
