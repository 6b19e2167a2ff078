"""Building a job: data set → data module → module → strategy → Lightning trainer, and what a run
folder records of how a model was made (resolved config, versions, sharding plan)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from pathlib import Path

import lightning as L
import torch

from towerrec.data.reader import count_rows, read_spec
from towerrec.data.validate import validate_dataset
from towerrec.trainer.callbacks import (
    BestEpoch,
    LineProgress,
    OutOfRangeReport,
    ReplicaCheck,
    StepCheckpoint,
    Throughput,
)
from towerrec.trainer.config import (
    Config,
    ConfigError,
    dump_yaml,
    evaluation_group_column,
    validate_for_device,
)
from towerrec.trainer.datamodule import ParquetDataModule, split_role
from towerrec.trainer.dataset_setup import check_data_against_config, ensure_dataset
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.distributed.environment import launch_environment, launcher_rank, set_threads
from towerrec.trainer.distributed.faults import (
    take_over_signals,
)
from towerrec.trainer.distributed.strategy import TorchRecStrategy
from towerrec.trainer.dynamic_ids import DynamicIdMapping
from towerrec.trainer.logs import configure_logging, progress_style
from towerrec.trainer.module import MultiTaskModule, PipelinedMultiTaskModule
from towerrec.trainer.precision import dense_macs_per_sample, resolve_precision
from towerrec.trainer.retrieval import PipelinedRetrievalModule, RetrievalModule, sampled_ids_spec
from towerrec.trainer.run_folder import make_loggers, write_record


def versions() -> dict[str, str]:
    import fbgemm_gpu
    import pyarrow
    import torchrec

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrec": torchrec.__version__,
        "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
        "lightning": L.__version__,
        "pyarrow": pyarrow.__version__,
        "git_commit": commit or "unknown",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }


def record_files(cfg: Config, strategy: TorchRecStrategy) -> dict[str, str]:
    """What a run folder (or an evaluation folder) records of how a model was made."""
    files = {"config.yaml": dump_yaml(cfg), "versions.json": json.dumps(versions(), indent=1)}
    if strategy.plan_text:
        files["plan.txt"] = strategy.plan_text + "\n"
        files["plan.json"] = json.dumps(strategy.plan_summary, indent=1)
    return files


class RunInfo(L.Callback):
    """Prints the sharding plan once the sharded model exists; in ``fit``, also writes the
    training record (resolved config, versions, plan) into the run folder (see
    ``towerrec.trainer.run_folder.write_record``)."""

    def __init__(self, cfg: Config, precision: str = ""):
        self.cfg = cfg
        self.precision = (
            precision  # the dense precision and why (``towerrec.trainer.precision.resolve_precision``)
        )
        self._printed = False

    def _print_plan(self, trainer) -> None:
        if not self._printed and trainer.is_global_zero and trainer.strategy.plan_text:
            self._printed = True
            print(
                f"[towerrec] sharding plan ({trainer.world_size} ranks):\n{trainer.strategy.plan_text}\n"
                f"[towerrec] dense precision: {self.precision}",
                flush=True,
            )

    def on_train_start(self, trainer, pl_module) -> None:  # after a resume has restored the step
        self._print_plan(trainer)
        if trainer.is_global_zero:
            run_dir = Path(self.cfg.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            for name, text in record_files(self.cfg, trainer.strategy).items():
                write_record(run_dir / name, text, trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._print_plan(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._print_plan(trainer)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._print_plan(trainer)


def prepared_data(
    cfg: Config, world_size: int = 1, predict_split: str | None = None, pipelined: bool = False
) -> tuple[ParquetDataModule, dict[str, int]]:
    """The data set of ``cfg`` as a Lightning data module, and the table rows of each sparse
    feature: prepared on first use (``data.prepare``), checked against the config and, with
    ``data.validate_on_start``, read once to report every bad value up front. What ``build`` and
    your own ``lightning.Trainer`` scripts start from (README: "Use it from Python")."""
    meta = ensure_dataset(cfg)
    check_data_against_config(cfg, meta)
    roles = [("train", cfg.data.train_split), ("val", cfg.data.val_split), ("test", cfg.data.test_split)]
    if predict_split:
        roles.append((split_role(cfg.data, predict_split), predict_split))
    read = {(split, cfg.data.days(role)) for role, split in roles if split}  # (split, days) pairs
    for split, days in sorted(read, key=str):
        rows = meta.num_rows(split, days)
        if rows < world_size:
            where = f"split {split!r}" + (f" (days {list(days)})" if days else "")
            raise ConfigError(
                f"trainer.devices x trainer.num_nodes: {world_size} ranks but {where} of "
                f"{meta.root} has only {rows} rows (every rank needs at least one)"
            )
    table_rows = meta.table_rows(cfg.data.sparse)
    spec = read_spec(cfg.data, cfg.tasks, table_rows, meta.columns, sampled_ids_spec(cfg, table_rows))
    if cfg.data.validate_on_start:
        summary = validate_dataset(
            meta, spec, splits=sorted({split for split, _ in read}), days=read_days(read)
        )
        for split, found in summary["out_of_range_ids"].items():
            lines = found.describe(table_rows)
            if lines and launcher_rank() == 0:
                print(
                    f"[towerrec] split {split!r}: ids read as row 0 (at or above num_embeddings): {'; '.join(lines)}",
                    flush=True,
                )
            found.check(cfg.data.max_out_of_range_fraction, table_rows, f"{meta.root}: split {split!r}")
    eval_spec = dataclasses.replace(spec, sampled=None, group_column=evaluation_group_column(cfg))
    datamodule = ParquetDataModule(
        cfg.data, cfg.seed, meta, spec, predict_split=predict_split, pipelined=pipelined, eval_spec=eval_spec
    )
    return datamodule, table_rows


def build(
    cfg: Config,
    extra_callbacks: list | None = None,
    predict_split: str | None = None,
    log_dir: Path | None = None,
):
    """Returns (trainer, module, datamodule, checkpoint callback) for ``cfg``. ``log_dir``: where
    the CSV and TensorBoard logs go (``fit``: the run folder); None logs nothing (evaluations
    write their own results)."""
    configure_logging()  # again: Lightning, now imported, set up loggers of its own
    env = launch_environment(cfg.trainer)
    validate_for_device(cfg, env.accelerator)
    set_threads(cfg.trainer.num_threads, env.devices)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    pipeline = cfg.trainer.train_pipeline
    dynamic = bool(cfg.data.dynamic_tables)  # mapped in Lightning's own step (trainer.dynamic_ids)
    pipelined = pipeline == "sparse_dist" or (
        pipeline == "auto" and env.accelerator == "cuda" and not dynamic
    )
    datamodule, table_rows = prepared_data(
        cfg, world_size=env.world_size, predict_split=predict_split, pipelined=pipelined
    )
    meta = datamodule.meta
    if cfg.model.objective == "retrieval":
        item = next(f for f in cfg.data.sparse if f.name == cfg.recommend.item_feature)
        counts = count_rows(meta, cfg.data.train_split, item, table_rows[item.name])
        module = (PipelinedRetrievalModule if pipelined else RetrievalModule)(cfg, table_rows, counts)
    else:
        module = (PipelinedMultiTaskModule if pipelined else MultiTaskModule)(cfg, table_rows)
    precision, why = resolve_precision(
        cfg.trainer.precision,
        env.accelerator,
        cfg.data.batch_size,
        dense_macs_per_sample(module.build_model()),
    )
    run_dir = Path(cfg.run_dir)
    checkpointing = StepCheckpoint(run_dir / "checkpoints", cfg.checkpoint.every_n_steps)
    progress = progress_style(cfg.trainer.progress_bar)
    out_of_range = OutOfRangeReport(
        [f.name for f in cfg.data.sparse if f.id_mapping == "vocab"],
        table_rows,
        cfg.data.max_out_of_range_fraction,
        f"{meta.root}: split {cfg.data.train_split!r}",
    )
    callbacks = [
        checkpointing, Throughput(), RunInfo(cfg, f"{precision} ({why})"), out_of_range, *(extra_callbacks or [])
    ]  # fmt: skip
    if progress == "lines":
        callbacks.append(LineProgress(cfg.trainer.log_every_n_steps))
    if dynamic:
        callbacks.insert(0, DynamicIdMapping(cfg.data.sparse, cfg.data.path, print_lines=progress != "off"))
    if cfg.trainer.check_replicas_every_n_steps:
        callbacks.append(ReplicaCheck(cfg.trainer.check_replicas_every_n_steps))
    if cfg.trainer.early_stopping_patience:
        if cfg.trainer.test_best:
            callbacks.append(BestEpoch(run_dir / "checkpoints", cfg.trainer.early_stopping_metric))
        callbacks.append(
            L.pytorch.callbacks.EarlyStopping(
                monitor=cfg.trainer.early_stopping_metric,
                patience=cfg.trainer.early_stopping_patience,
                mode="min",
            )
        )
    trainer = L.Trainer(
        accelerator=env.accelerator,
        devices=env.devices,
        num_nodes=env.num_nodes,
        strategy=TorchRecStrategy(
            sharding=cfg.sharding,
            embedding_optimizer=cfg.trainer.embedding_optimizer,
            batch_size=cfg.data.batch_size,
            checkpoint=cfg.checkpoint,
            seed=cfg.seed,
            collective_timeout_s=cfg.trainer.collective_timeout_s,
            cluster_environment=env.cluster,
        ),
        max_epochs=cfg.trainer.max_epochs,
        max_steps=cfg.trainer.max_steps,
        precision=precision,
        gradient_clip_val=None,  # clipped in the module's own step (MultiTaskModule.dense_step)
        val_check_interval=cfg.trainer.val_check_interval,
        check_val_every_n_epoch=None if cfg.trainer.val_check_interval else 1,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=make_loggers(cfg.trainer.loggers, log_dir) or False if log_dir is not None else False,
        callbacks=callbacks,
        enable_checkpointing=True,  # StepCheckpoint is the only checkpoint callback
        enable_progress_bar=progress == "bar",
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        reload_dataloaders_every_n_epochs=1,  # epochs may differ in length after a resume (reader docs)
        limit_val_batches=None if cfg.data.val_split else 0,
        deterministic=cfg.trainer.deterministic or None,
    )
    take_over_signals(trainer, module.preemption)
    return trainer, module, datamodule, checkpointing


def read_days(read: set[tuple[str, tuple[int, int] | None]]) -> dict[str, tuple[int, int] | None]:
    """Per split, the days any reading of it covers (None: every day)."""
    covered: dict[str, tuple[int, int] | None] = {}
    for split, days in read:
        if split in covered and (covered[split] is None or days is None):
            covered[split] = None
        elif split in covered:
            covered[split] = (min(covered[split][0], days[0]), max(covered[split][1], days[1]))
        else:
            covered[split] = days
    return covered


def resume_path(cfg: Config) -> Path | None:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return ckpt.find_latest(Path(cfg.run_dir) / "checkpoints")
    return ckpt.resolve(cfg.checkpoint.resume)
