"""Building and running a job: data → module → strategy → Lightning trainer → fit/evaluate/predict.

Each public function is one CLI command; ``towerrec.trainer.cli`` only parses arguments and calls these.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from towerrec.data.validate import validate_dataset
from towerrec.trainer.callbacks import BestEpoch, LineProgress, ReplicaCheck, StepCheckpoint, Throughput
from towerrec.trainer.config import Config, ConfigError, dump_yaml, validate_for_device
from towerrec.trainer.datamodule import ParquetDataModule, read_spec
from towerrec.trainer.datasets import check_data_against_config, ensure_dataset
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.distributed.environment import launch_environment, launcher_rank, set_threads
from towerrec.trainer.distributed.faults import (
    diagnose_collective_failure,
    ignore_late_signals,
    take_over_signals,
)
from towerrec.trainer.distributed.strategy import TorchRecStrategy
from towerrec.trainer.errors import EXIT_PREEMPTED
from towerrec.trainer.logs import configure_logging, progress_style
from towerrec.trainer.module import MultiTaskModule, PipelinedMultiTaskModule
from towerrec.trainer.precision import dense_macs_per_sample, resolve_precision
from towerrec.trainer.run_folder import (
    AppendingCSVLogger,
    check_writable,
    new_output,
    training_lock,
    user_output,
    write_record,
)


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


# ------------------------------------------------------------------------------------------ building
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
    meta = ensure_dataset(cfg)
    check_data_against_config(cfg, meta)
    world_size = env.world_size
    splits = [s for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split, predict_split) if s]
    for split in dict.fromkeys(splits):
        if meta.num_rows(split) < world_size:
            raise ConfigError(
                f"trainer.devices x trainer.num_nodes: {world_size} ranks but split {split!r} of "
                f"{meta.root} has only {meta.num_rows(split)} rows (every rank needs at least one)"
            )
    table_rows = meta.table_rows(cfg.data.sparse)
    spec = read_spec(cfg.data, cfg.tasks, table_rows, meta.columns)
    if cfg.data.validate_on_start:
        validate_dataset(meta, spec, splits=list(dict.fromkeys(splits)))
    pipeline = cfg.trainer.train_pipeline
    pipelined = pipeline == "sparse_dist" or (pipeline == "auto" and env.accelerator == "cuda")
    datamodule = ParquetDataModule(
        cfg.data, cfg.seed, meta, spec, predict_split=predict_split, pipelined=pipelined
    )
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
    callbacks = [checkpointing, Throughput(), RunInfo(cfg, f"{precision} ({why})"), *(extra_callbacks or [])]
    if progress == "lines":
        callbacks.append(LineProgress(cfg.trainer.log_every_n_steps))
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
        gradient_clip_val=None
        if pipelined
        else cfg.trainer.gradient_clip_val,  # pipelined: clipped in the step
        val_check_interval=cfg.trainer.val_check_interval,
        check_val_every_n_epoch=None if cfg.trainer.val_check_interval else 1,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=[
            AppendingCSVLogger(log_dir, name="logs", version=""),
            TensorBoardLogger(log_dir, name="tensorboard", version=""),
        ]
        if log_dir is not None
        else False,
        callbacks=callbacks,
        enable_checkpointing=False,
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


def resume_path(cfg: Config) -> Path | None:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return ckpt.find_latest(Path(cfg.run_dir) / "checkpoints")
    return ckpt.resolve(cfg.checkpoint.resume)


def format_metrics(metrics: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for stage, per_task in metrics.items():
        for task, values in per_task.items():
            shown = "  ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "count")
            lines.append(f"{stage:<9} {task:<12} {shown}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ commands
def fit(cfg: Config) -> int:
    """Trains (resuming from the latest checkpoint when there is one), then evaluates on the test
    split. Returns the process exit code (0, or EXIT_PREEMPTED after a preemption checkpoint)."""
    run_dir = Path(cfg.run_dir)
    trainer, module, datamodule, checkpointing = build(cfg, log_dir=run_dir)  # validates the data first
    with training_lock(run_dir, is_rank_zero=launcher_rank() == 0):
        if launcher_rank() == 0:
            check_writable(run_dir / "checkpoints")
        resume = resume_path(cfg)
        if resume is not None:
            epoch = int(ckpt.load_state(resume).get("epoch", 0))
            if epoch > cfg.trainer.max_epochs:
                raise ConfigError(
                    f"trainer.max_epochs: {cfg.trainer.max_epochs}, but {resume} is already at epoch {epoch}; "
                    "raise it to continue training, or test the run with `towerrec test`"
                )
            if trainer.is_global_zero:
                print(f"[towerrec] resuming from {resume}", flush=True)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
        except RuntimeError as err:
            raise _diagnosed(err, trainer, cfg) from err
        if checkpointing.preempted:
            if trainer.is_global_zero:
                heard = module.preemption.signal_name or "signal received by another rank"
                print(
                    f"[towerrec] preempted ({heard}): checkpoint saved, exiting {EXIT_PREEMPTED}", flush=True
                )
            finish()
            return EXIT_PREEMPTED
        best = _restore_best(cfg, trainer)
        result = _evaluate_loaded(cfg, trainer, module, datamodule, "test")
        result["train_seconds"] = module.train_seconds()
        result["global_step"] = trainer.global_step
        result["skipped_non_finite_batches"] = module.skipped_batches
        stream = datamodule.train_stream
        result["skipped_bad_rows"] = stream.skipped_bad_rows if stream is not None else 0
        if best is not None and best.get("val"):
            result["metrics"]["val"] = best["val"]
            result["tested_checkpoint"] = {k: best[k] for k in ("step", "epoch", "metric", "value")}
        elif "val" in module.last_metrics:
            result["metrics"]["val"] = module.last_metrics["val"]
        if "test" in module.last_baseline:
            result["baseline"] = {"test": module.last_baseline["test"]}
        if trainer.is_global_zero:
            (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
            _print_result(result, run_dir)
        finish()
        return 0


def _restore_best(cfg: Config, trainer: L.Trainer) -> dict | None:
    """With early stopping and ``trainer.test_best``: loads the weights of the best epoch (when it is
    not the last one) so that the test measures them; returns its ``best.json`` record."""
    if not (cfg.trainer.early_stopping_patience and cfg.trainer.test_best):
        return None
    root = Path(cfg.run_dir) / "checkpoints"
    # every rank decided alike during fit; reading best.json here could race rank 0's last write
    best = next((c.best for c in trainer.callbacks if isinstance(c, BestEpoch)), None)
    if best is None:
        return None
    path = ckpt.checkpoint_dir(root, best["step"])
    if best["step"] != trainer.global_step:
        if not ckpt.is_complete(path):
            if trainer.is_global_zero:
                print(
                    f"[towerrec] {path} (best {best['metric']}) is gone: testing the last weights", flush=True
                )
            return None
        trainer.strategy.load_weights(path)
    if trainer.is_global_zero:
        print(
            f"[towerrec] testing the weights of {path.name} (epoch {best['epoch'] + 1}): the lowest "
            f"{best['metric']}, {best['value']:.4f}",
            flush=True,
        )
    return best


def _diagnosed(err: RuntimeError, trainer: L.Trainer, cfg: Config) -> BaseException:
    """A failed collective as ``PeerLost`` (naming the lost rank), anything else unchanged."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return err
    store = dist.distributed_c10d._get_default_store()
    lost = diagnose_collective_failure(
        err, store, trainer.global_rank, trainer.world_size, cfg.trainer.collective_timeout_s
    )
    return lost or err


def _evaluate_loaded(cfg, trainer, module, datamodule, stage: str) -> dict:
    if cfg.data.test_split is None and stage == "test":
        return {"metrics": {}}
    if stage == "test":
        trainer.test(module, datamodule=datamodule, verbose=False)
    else:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return {"metrics": {stage: module.last_metrics[stage]}}


def _print_result(result: dict, folder: Path) -> None:
    print("[towerrec] per-task metrics:\n" + format_metrics(result["metrics"]), flush=True)
    if "baseline" in result:
        print(
            "[towerrec] trivial predictor (each task's mean label):\n" + format_metrics(result["baseline"]),
            flush=True,
        )
    print(f"[towerrec] results in {folder}", flush=True)


def _shared_output(trainer: L.Trainer, make) -> Path:
    """A folder chosen by global rank 0 (``make()``) and told to every rank."""
    chosen = str(make()) if trainer.is_global_zero else None
    return Path(trainer.strategy.broadcast(chosen, src=0))


def evaluate(cfg: Config, stage: str, checkpoint: str | None) -> int:
    """``validate``/``test`` a checkpoint (default: the run's best epoch when fit recorded one, else
    its latest; ``checkpoint.resolve_model``). Results go to a new folder
    ``<run_dir>/evaluations/<stage>-<checkpoint>``; the training record is left as it is."""
    path = ckpt.resolve_model(checkpoint or Path(cfg.run_dir) / "checkpoints")
    trainer, module, datamodule, _ = build(cfg)
    run = trainer.test if stage == "test" else trainer.validate
    try:
        run(module, datamodule=datamodule, ckpt_path=str(path), verbose=False)
    except RuntimeError as err:
        raise _diagnosed(err, trainer, cfg) from err
    result = {"checkpoint": str(path), "metrics": {stage: module.last_metrics[stage]}}
    command = "test" if stage == "test" else "validate"
    if stage in module.last_baseline:
        result["baseline"] = {stage: module.last_baseline[stage]}
    out = _shared_output(
        trainer, lambda: new_output(Path(cfg.run_dir) / "evaluations", f"{command}-{path.name}")
    )
    if trainer.is_global_zero:
        for name, text in {
            **record_files(cfg, trainer.strategy),
            "metrics.json": json.dumps(result, indent=1),
        }.items():
            (out / name).write_text(text)
        _print_result(result, out)
    finish()
    return 0


def finish() -> None:
    """The job's outcome is saved: late signals are ignored, and the process group is closed."""
    import torch.distributed as dist

    ignore_late_signals()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _stored_names(meta, split: str) -> list[str]:
    import pyarrow.parquet as pq

    groups = meta.row_groups(split)
    return pq.ParquetFile(groups[0].file).schema_arrow.names if groups else []


def row_context(cfg: Config, split: str, rows) -> dict:
    """What a prediction row is about: the user and item ids as the source data wrote them
    (through the saved vocabularies), the columns kept as ``other`` (e.g. a timestamp or a key to
    join on) and each task's label as ``<task>_label``."""
    from towerrec.data.dataset import DatasetMeta
    from towerrec.data.reader import read_stored_columns
    from towerrec.data.vocab import original_ids

    meta = DatasetMeta.load(cfg.data.path)
    by_name = {f.name: f for f in cfg.data.sparse}
    ids = [
        by_name[n].source_column
        for n in (cfg.recommend.user_feature, cfg.recommend.item_feature)
        if n in by_name
    ]
    labels = {f"{task.name}_label": task.label_column for task in cfg.tasks}
    kept = [
        name
        for name, kind in (cfg.data.prepare.columns if cfg.data.prepare else {}).items()
        if kind == "other"
    ]
    stored_names = _stored_names(meta, split)
    kept = [name for name in kept if name in stored_names]
    stored = read_stored_columns(meta, split, list(dict.fromkeys([*ids, *labels.values(), *kept]))).take(rows)
    context = {name: stored.column(name).combine_chunks() for name in kept if name not in ids}
    for column in ids:
        vocabulary = meta.vocabulary(column)
        values = stored.column(column).combine_chunks()
        context[column] = values if vocabulary is None else original_ids(values.to_numpy(), vocabulary)
    for name, column in labels.items():
        context[name] = stored.column(column).combine_chunks()
    return context


def predict(cfg: Config, checkpoint: str | None, split: str | None, output: str | None) -> int:
    """Scores a split with a checkpoint; each rank writes ``part-rankNNNNN.parquet`` with the
    row's position in the split (``row``), its user and item ids as the source wrote them, each
    task's label (``<task>_label``) and one prediction column per task, into ``output``
    (which must not hold anything yet) or a new ``<run_dir>/predictions/<split>-<checkpoint>``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ckpt.resolve_model(checkpoint or Path(cfg.run_dir) / "checkpoints")
    split = split or cfg.data.test_split
    if output is not None and launcher_rank() == 0:
        user_output(output, "--output", folder=True)
    trainer, module, datamodule, _ = build(cfg, predict_split=split)
    outputs = trainer.predict(module, datamodule=datamodule, ckpt_path=str(path), return_predictions=True)
    out_dir = (
        Path(output)
        if output
        else _shared_output(
            trainer, lambda: new_output(Path(cfg.run_dir) / "predictions", f"{split}-{path.name}")
        )
    )
    row_id = torch.cat([o["row_id"] for o in outputs]).numpy()
    preds = torch.cat([o["predictions"] for o in outputs]).numpy()
    keep = row_id >= 0
    columns = {"row": pa.array(row_id[keep]), **row_context(cfg, split, row_id[keep])}
    for t, name in enumerate(module.task_names):
        columns[name] = pa.array(np.ascontiguousarray(preds[keep, t]))
    pq.write_table(pa.table(columns), out_dir / f"part-rank{trainer.global_rank:05d}.parquet")
    if trainer.is_global_zero:
        print(f"[towerrec] predictions of {path} for split {split} in {out_dir}", flush=True)
    finish()
    return 0


# ------------------------------------------------------------------------------------------ CLI entries
def fit_command(cfg: Config, args) -> int:
    return fit(cfg)


def validate_command(cfg: Config, args) -> int:
    return evaluate(cfg, "val", args.checkpoint)


def test_command(cfg: Config, args) -> int:
    return evaluate(cfg, "test", args.checkpoint)


def predict_command(cfg: Config, args) -> int:
    return predict(cfg, args.checkpoint, args.split, args.output)
