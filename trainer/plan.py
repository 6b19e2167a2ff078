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


def prepare_command(cfg: Config, args=None) -> int:
    from towerrec.data.prepare import prepare
    from towerrec.trainer.datasets import input_schema, report_lines

    if cfg.data.prepare is None:
        raise ConfigError("data.prepare: not set (give --format and --source, or a config with data.prepare)")
    from towerrec.data.dataset import DatasetMeta, is_complete
    from towerrec.data.prepare import fingerprint, prepared_with

    schema = input_schema(cfg)
    if is_complete(cfg.data.path):
        existing = DatasetMeta.load(cfg.data.path)
        if existing.fingerprint == fingerprint(prepared_with(cfg.data.prepare, schema)):
            print(
                f"[towerrec] {cfg.data.path} is already prepared from this config; nothing to do", flush=True
            )
            return 0
        if not cfg.data.rebuild:
            raise ConfigError(
                f"--out / data.path: {cfg.data.path} already holds another data set; choose another folder, "
                "delete it, or pass --data.rebuild true to replace it"
            )
    meta = prepare(cfg.data.prepare, cfg.data.path, schema)
    report_lines(meta)
    print(f"[towerrec] the whole report is in {meta.root / 'metadata.json'}", flush=True)

    return 0
