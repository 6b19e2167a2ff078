"""Running the commands on a built job: ``fit`` (train, resume, test the best epoch, record),
``validate``/``test`` of a checkpoint, and the CLI entries (``towerrec.trainer.cli`` only parses
arguments and calls these). Building is ``towerrec.trainer.build``; per-row predictions are
``towerrec.trainer.predict``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from towerrec.trainer.build import build, record_files, resume_path
from towerrec.trainer.callbacks import BestEpoch, OutOfRangeReport
from towerrec.trainer.config import Config, ConfigError
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.distributed.environment import launcher_rank
from towerrec.trainer.distributed.faults import (
    diagnose_collective_failure,
    ignore_late_signals,
)
from towerrec.trainer.dynamic_ids import report as dynamic_ids_report
from towerrec.trainer.errors import EXIT_PREEMPTED
from towerrec.trainer.run_folder import (
    AppendingCSVLogger,
    check_writable,
    new_output,
    training_lock,
    write_whole,
)
from towerrec.trainer.warm_start import (
    SharedTables,
    WarmStart,
    check_compatible,
    shared_tables,
    source_checkpoint,
)


# ------------------------------------------------------------------------------------------ commands
def format_metrics(metrics: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for stage, per_task in metrics.items():
        for task, values in per_task.items():
            shown = "  ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "count")
            lines.append(f"{stage:<9} {task:<12} {shown}")
    return "\n".join(lines)


def fit(cfg: Config) -> int:
    """Trains (resuming from the latest checkpoint when there is one), then evaluates on the test
    split. Returns the process exit code (0, or EXIT_PREEMPTED after a preemption checkpoint)."""
    run_dir = Path(cfg.run_dir)
    # a warm-started run interrupted and run again resumes from its own checkpoint instead
    warm_start = source_checkpoint(cfg) if resume_path(cfg) is None else None
    callbacks = [WarmStart(warm_start)] if warm_start is not None else []
    trainer, module, datamodule, checkpointing = build(
        cfg, callbacks, log_dir=run_dir
    )  # validates the data first
    shapes = {k: tuple(v.shape) for k, v in module.build_model().state_dict().items()}
    if warm_start is not None:
        check_compatible(cfg, warm_start, shapes)
    shared = shared_tables(cfg, shapes) if resume_path(cfg) is None else None
    if shared is not None:
        trainer.callbacks.append(SharedTables(*shared))
    with training_lock(run_dir, is_rank_zero=launcher_rank() == 0):
        if launcher_rank() == 0:
            check_writable(run_dir / "checkpoints")
        resume = resume_path(cfg)
        if resume is not None:
            try:
                epoch = int(ckpt.load_state(resume).get("epoch", 0))
            except ckpt.CheckpointError:  # damaged: loading checks it and falls back to an intact one
                epoch = 0
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
        result["out_of_range_ids"] = next(
            (c.last_epoch for c in trainer.callbacks if isinstance(c, OutOfRangeReport)), None
        )
        if warm_start is not None:
            result["warm_started_from"] = str(warm_start)
        if module.dynamic_ids is not None:
            result["dynamic_ids"] = dynamic_ids_report(module)
        if best is not None and best.get("val"):
            result["metrics"]["val"] = best["val"]
            result["tested_checkpoint"] = {k: best[k] for k in ("step", "epoch", "metric", "value")}
        elif "val" in module.last_metrics:
            result["metrics"]["val"] = module.last_metrics["val"]
        if "test" in module.last_baseline:
            result["baseline"] = {"test": module.last_baseline["test"]}
        if trainer.is_global_zero:
            write_whole(run_dir / "metrics.json", json.dumps(result, indent=1))
            for log in trainer.loggers:
                if isinstance(log, AppendingCSVLogger):
                    log.seal()  # this session's rows stay, whatever a later session resumes from
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
        problem = "is gone" if not ckpt.is_complete(path) else None
        if problem is None:
            damage = ckpt.check_intact(path, trainer.strategy.process_group)  # every rank takes part
            problem = f"is damaged ({damage})" if damage else None
        if problem is not None:
            if trainer.is_global_zero:
                print(
                    f"[towerrec] {path} (best {best['metric']}) {problem}: testing the last weights",
                    flush=True,
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


def shared_output(trainer: L.Trainer, make) -> Path:
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
    out = shared_output(
        trainer, lambda: new_output(Path(cfg.run_dir) / "evaluations", f"{command}-{path.name}")
    )
    if trainer.is_global_zero:
        for name, text in {
            **record_files(cfg, trainer.strategy),
            "metrics.json": json.dumps(result, indent=1),
        }.items():
            write_whole(out / name, text)
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


# ------------------------------------------------------------------------------------------ CLI entries
def fit_command(cfg: Config, args) -> int:
    return fit(cfg)


def validate_command(cfg: Config, args) -> int:
    return evaluate(cfg, "val", args.checkpoint)


def test_command(cfg: Config, args) -> int:
    return evaluate(cfg, "test", args.checkpoint)
